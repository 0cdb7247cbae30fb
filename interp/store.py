"""Artifacts on disk: a LayerDivergence as a versioned folder, and the atomic writes every artifact uses."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from interp.divergence import LayerDivergence, array_fields
from interp.errors import UserError

SCHEMA_VERSION = 1
META_FILE = "divergence.json"
ARRAYS_FILE = "arrays.safetensors"


def _default_mode(is_dir: bool) -> int:
    """The permissions a plain open()/mkdir() would give under the current umask (mkstemp/mkdtemp give owner-only)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if is_dir else 0o666) & ~umask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a file so that readers see either the old content or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _default_mode(is_dir=False))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")


@contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary folder beside `path`; on success it replaces `path` in one rename, on failure it vanishes."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise UserError(f"{path} already exists; choose another folder or pass --overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    os.chmod(tmp, _default_mode(is_dir=True))
    try:
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_json(path: str | os.PathLike):
    """Read a JSON file, or fail in one line naming the file."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} is missing")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is damaged (not valid JSON: {err}); rerun the command that wrote it") from err


def read_jsonl(path: str | os.PathLike, required: tuple[str, ...] = (), check=None) -> list[dict]:
    """Records from a JSONL file, each an object whose `required` fields are non-empty strings; `check(record)` may
    raise UserError for more. A bad line is an error naming the file and the line.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    records = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}, line {i}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}, line {i}: expected a JSON object with {', '.join(required) or 'fields'}")
        for key in required:
            if not isinstance(record.get(key), str) or not record[key].strip():
                raise UserError(f"{path}, line {i}: missing or empty field '{key}'")
        if check is not None:
            try:
                check(record)
            except UserError as err:
                raise UserError(f"{path}, line {i}: {err}") from None
        records.append(record)
    if not records:
        raise UserError(f"{path} has no records")
    return records


def save_divergence(div: LayerDivergence, folder: str | os.PathLike, overwrite: bool = False) -> Path:
    """Save as `folder/divergence.json` (settings, examples, schema version) and `folder/arrays.safetensors`."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    arrays = {name: np.ascontiguousarray(getattr(div, name)) for name in array_fields()}
    offsets = np.cumsum([0] + [a.shape[-1] for a in div.attn_ctx_tokens]).tolist()
    if div.attn_ctx_tokens:
        arrays["attn_ctx_tokens"] = np.ascontiguousarray(np.concatenate(div.attn_ctx_tokens, axis=-1))
    meta = {"schema_version": SCHEMA_VERSION, "meta": div.meta, "examples": div.examples, "attn_ctx_tokens_offsets": offsets}
    with atomic_dir(folder, overwrite=overwrite) as tmp:
        save_file(arrays, str(tmp / ARRAYS_FILE))
        atomic_write_json(tmp / META_FILE, meta)
    return folder


def load_divergence(folder: str | os.PathLike) -> LayerDivergence:
    """Load a folder written by save_divergence; another schema version or a damaged file is a one-line error."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder of layer-divergence results; write one with `python -m interp analyze`")
    meta = read_json(folder / META_FILE)
    version = meta.get("schema_version") if isinstance(meta, dict) else None
    if version != SCHEMA_VERSION:
        raise UserError(
            f"{folder / META_FILE} has schema version {version}, this toolkit reads version {SCHEMA_VERSION}; "
            "rerun `python -m interp analyze` to rewrite it"
        )
    arrays_path = folder / ARRAYS_FILE
    if not arrays_path.exists():
        raise UserError(f"{arrays_path} is missing; rerun `python -m interp analyze`")
    try:
        arrays = load_file(str(arrays_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{arrays_path} is damaged ({err}); rerun `python -m interp analyze`") from err
    missing = [name for name in array_fields() if name not in arrays]
    if missing:
        raise UserError(f"{arrays_path} lacks {', '.join(missing)}; rerun `python -m interp analyze`")
    offsets = meta.get("attn_ctx_tokens_offsets", [0])
    joined = arrays.get("attn_ctx_tokens")
    per_example = [joined[..., a:b] for a, b in zip(offsets[:-1], offsets[1:])] if joined is not None else []
    return LayerDivergence(
        **{name: arrays[name] for name in array_fields()},
        attn_ctx_tokens=per_example,
        examples=meta.get("examples", []),
        meta=meta.get("meta", {}),
    )
