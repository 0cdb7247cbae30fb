"""The causal results on disk, under RUN/causal/<student>/: JSON files (NaN written as null) and the context vectors
as safetensors. Every file is written atomically."""

from __future__ import annotations

import functools
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from interp.core.errors import UserError
from interp.core.runs import CAUSAL_DIR
from interp.core.store import atomic_write_json, folder_lock, is_regular, read_json

from interp.causal.results import Comparison, Explanation, PatchResult, SteerResult

SCHEMA_VERSION = 1
COMPARISON_FILE = "comparison.json"
VECTORS_FILE = "vectors.safetensors"


def causal_dir(run_dir: str | Path, student: str) -> Path:
    return Path(run_dir) / CAUSAL_DIR / student


def _plain(value):
    """JSON-ready: arrays to lists, NaN and infinities to null."""
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(float(value)) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _deep_array(value) -> np.ndarray:
    """Nested lists with nulls back into a float array."""
    def fix(v):
        if isinstance(v, list):
            return [fix(x) for x in v]
        return np.nan if v is None else v
    return np.asarray(fix(value), dtype=np.float64)


def _damaged_is_an_error(load):
    """A result file whose fields are missing or of the wrong kind is a one-line error, not a traceback."""
    @functools.wraps(load)
    def wrapped(path, *args, **kw):
        try:
            return load(path, *args, **kw)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
            if isinstance(err, UserError):
                raise
            raise UserError(f"{path} is damaged ({type(err).__name__}: {str(err)[:100]}); rerun the command that "
                            "wrote it") from None
    return wrapped


def _locked_write(path: Path, obj) -> None:
    """One result file, replaced in one rename while its folder's lock is held (as save_comparison does)."""
    with folder_lock(path.parent):
        atomic_write_json(path, obj)


def _read(path: Path, kind: str) -> dict:
    data = read_json(path)
    if not isinstance(data, dict) or data.get("kind") != kind or data.get("schema_version") != SCHEMA_VERSION:
        raise UserError(f"{path} is not a {kind} result of schema version {SCHEMA_VERSION}; rerun the command that wrote it")
    return data


# ---------- comparison ----------

def save_comparison(cmp: Comparison, folder: str | Path) -> Path:
    """comparison.json and vectors.safetensors, written under the folder's lock, each through a temporary file of
    its own and one rename: two commands saving into one folder take turns (the second is refused while the first
    writes) and a reader never sees one command's vectors beside another's numbers."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    with folder_lock(folder):
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{VECTORS_FILE}.", dir=folder)
        os.close(fd)
        try:
            save_file({k: np.ascontiguousarray(getattr(cmp, k)) for k in ("v", "u", "w")}, tmp)
            atomic_write_json(folder / COMPARISON_FILE, _plain({
                "kind": "comparison", "schema_version": SCHEMA_VERSION, "student": cmp.student, "meta": cmp.meta,
                "pairs": cmp.pairs, **{k: getattr(cmp, k) for k in ("v_norm", "cos_uv", "absorbed", "overshoot",
                                                                   "absorbed_examples", "overshoot_examples", "example_tokens")},
                "examples": cmp.examples}))
            os.replace(tmp, folder / VECTORS_FILE)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return folder / COMPARISON_FILE


def _vectors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    if not (path.exists() or path.is_symlink()):
        return {}
    if not is_regular(path):
        raise UserError(f"{path} is not a regular file; rerun `python -m interp compare`")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{path} is damaged ({str(err).splitlines()[0][:200] if str(err) else type(err).__name__}); "
                        "rerun `python -m interp compare`") from None


def load_comparison(folder: str | Path) -> Comparison:
    folder = Path(folder)
    data = _read(folder / COMPARISON_FILE, "comparison")
    vectors = _vectors(folder / VECTORS_FILE)
    try:
        L = len(data["v_norm"])
        empty = np.full((L, 0), np.nan)
        return Comparison(
            student=data["student"], pairs={c: {m: _deep_array(v) for m, v in d.items()} for c, d in data["pairs"].items()},
            v=vectors.get("v", empty), u=vectors.get("u", empty), w=vectors.get("w", empty),
            **{k: _deep_array(data[k]) for k in ("v_norm", "cos_uv", "absorbed", "overshoot", "absorbed_examples",
                                                 "overshoot_examples")},
            example_tokens=np.asarray(data["example_tokens"]), examples=data.get("examples", []), meta=data.get("meta", {}))
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise UserError(f"{folder / COMPARISON_FILE} is damaged ({type(err).__name__}: {str(err)[:100]}); "
                        "rerun `python -m interp compare`") from None


# ---------- patching ----------

def save_patch(result: PatchResult, path: str | Path) -> Path:
    path = Path(path)
    _locked_write(path, _plain({
        "kind": "patch", "schema_version": SCHEMA_VERSION, "source": result.source, "target": result.target,
        "site": result.site, "layers": result.layers, "heads": result.heads, "recovery": result.recovery,
        "kl_patched": result.kl_patched, "kl_target": result.kl_target, "token_example": result.token_example,
        "target_id": result.target_id, "ref_logprob_source": result.ref_logprob_source,
        "ref_logprob_target": result.ref_logprob_target, "ref_logprob_patched": result.ref_logprob_patched,
        "n_ref_tokens": result.n_ref_tokens, "meta": result.meta}))
    return path


@_damaged_is_an_error
def load_patch(path: str | Path) -> PatchResult:
    data = _read(Path(path), "patch")
    nan = lambda v: float("nan") if v is None else float(v)  # noqa: E731
    return PatchResult(
        source=data["source"], target=data["target"], site=data["site"], layers=list(data["layers"]),
        recovery=_deep_array(data["recovery"]), kl_patched=_deep_array(data["kl_patched"]),
        kl_target=_deep_array(data["kl_target"]), token_example=np.asarray(data["token_example"], dtype=np.int64),
        target_id=np.asarray(data["target_id"], dtype=np.int64), ref_logprob_source=nan(data["ref_logprob_source"]),
        ref_logprob_target=nan(data["ref_logprob_target"]),
        ref_logprob_patched=None if data["ref_logprob_patched"] is None else _deep_array(data["ref_logprob_patched"]),
        n_ref_tokens=int(data["n_ref_tokens"]), heads=bool(data["heads"]), meta=data.get("meta", {}))


# ---------- steering and forensics ----------

def save_steer(result: SteerResult, path: str | Path) -> Path:
    path = Path(path)
    _locked_write(path, _plain({"kind": "steer", "schema_version": SCHEMA_VERSION, "alpha": result.alpha,
                                    "layers": result.layers, "results": result.results, "baseline": result.baseline,
                                    "meta": result.meta}))
    return path


@_damaged_is_an_error
def load_steer(path: str | Path) -> SteerResult:
    data = _read(Path(path), "steer")
    results = {arm: {int(layer): r for layer, r in per.items()} for arm, per in data["results"].items()}
    return SteerResult(alpha=data["alpha"], layers=list(data["layers"]), results=results, baseline=data["baseline"],
                       meta=data.get("meta", {}))


def save_explanation(ex: Explanation, path: str | Path) -> Path:
    path = Path(path)
    fields = {k: getattr(ex, k) for k in Explanation.__dataclass_fields__}
    _locked_write(path, _plain({"kind": "explanation", "schema_version": SCHEMA_VERSION, **fields}))
    return path


@_damaged_is_an_error
def load_explanation(path: str | Path) -> Explanation:
    data = _read(Path(path), "explanation")
    arrays = ("recovery", "logprob_ctx_token", "logprob_noctx_token", "attn_student", "attn_base", "ctx_weights")
    fields: dict[str, Any] = {k: (_deep_array(data[k]) if k in arrays else data[k]) for k in Explanation.__dataclass_fields__}
    return Explanation(**fields)


def explanation_file(run_dir: str | Path, student: str, example: int) -> Path:
    return causal_dir(run_dir, student) / f"explain_{int(example)}.json"


def patch_file(run_dir: str | Path, student: str, sweep: str, site: str = "resid", heads: bool = False) -> Path:
    return causal_dir(run_dir, student) / f"patch_{sweep}_{site}{'_heads' if heads else ''}.json"


def steer_file(run_dir: str | Path, student: str) -> Path:
    return causal_dir(run_dir, student) / "steer.json"


def causal_students(run_dir: str | Path) -> list[str]:
    """Students with causal results in a run, in name order."""
    root = Path(run_dir) / CAUSAL_DIR
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def load_all(run_dir: str | Path, student: str) -> dict:
    """Whatever causal results a student has: comparison, patch sweeps by file stem, steer, explanations by example."""
    folder = causal_dir(run_dir, student)
    out: dict = {"comparison": None, "patch": {}, "steer": None, "explain": {}}
    if not folder.is_dir():
        return out
    if (folder / COMPARISON_FILE).exists():
        out["comparison"] = load_comparison(folder)
    for p in sorted(folder.glob("patch_*.json")):
        out["patch"][p.stem[len("patch_"):]] = load_patch(p)
    if (folder / "steer.json").exists():
        out["steer"] = load_steer(folder / "steer.json")
    for p in sorted(folder.glob("explain_*.json")):
        out["explain"][int(p.stem.split("_")[1])] = load_explanation(p)
    return out
