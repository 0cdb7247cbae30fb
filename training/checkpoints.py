"""Resumable training state without pickle: tensors in safetensors, everything else in JSON.

A checkpoint is a folder `OUT/checkpoints/step-NNNNNN/` written in one rename:

- `adapter.safetensors`: the LoRA weights, by parameter name;
- `state.safetensors`: the optimizer's and the EMA's tensors;
- `state.json`: the step, the optimizer's and the scheduler's other values, and every process's RNG state (torch's
  as base64 of its byte tensor, Python's as a list of integers).

Nothing here unpickles: a shared run folder cannot run code on the machine that resumes it. A `state.pt` that
someone planted beside these files is never opened. A truncated or hand-edited file is a one-line UserError.
"""

from __future__ import annotations

import base64
import json
import math
import os
import random
import shutil
from pathlib import Path

import torch

from interp.core.errors import UserError
from interp.core.runs import ADAPTER_CONFIG, ADAPTER_WEIGHTS, BASE_MODEL_FILE, METRICS_FILE, TRAIN_CONFIG_FILE
from interp.core.store import atomic_dir, atomic_write_text, dumps_strict, read_json, read_jsonl

CHECKPOINTS_DIR = "checkpoints"
WEIGHTS_FILE = "adapter.safetensors"
TENSORS_FILE = "state.safetensors"
STATE_FILE = "state.json"
FORMAT = 1
# The pickle file of earlier versions: recognized only to refuse it, never opened.
LEGACY_STATE = "state.pt"
# A LoRA weight this large means the update blew up (a healthy one stays below about 10).
PARAM_LIMIT = 1e4
# Test hook: `CTXINT_TEST_KILL_AT=during_checkpoint:2` ends the process with SIGKILL's status at that moment.
KILL_ENV = "CTXINT_TEST_KILL_AT"


class TrainingError(UserError):
    """The run itself failed (a non-finite loss, exploded weights); the message says where the last good checkpoint is."""


def kill_point(moment: str, step: int | None = None) -> None:
    """End the process at once, as SIGKILL would, when $CTXINT_TEST_KILL_AT names this moment (and step). The kill
    tests use it to stop a run at exact places: `after_checkpoint:3`, `during_checkpoint:2`, `before_adapter`."""
    wanted = os.environ.get(KILL_ENV)
    if not wanted:
        return
    for item in wanted.split("|"):
        name, _, at = item.partition(":")
        if name == moment and (not at or (step is not None and at == str(step))):
            os._exit(137)


# --- parameters -------------------------------------------------------------------------------------------------------


def lora_params(model) -> dict[str, torch.nn.Parameter]:
    """The trainable (LoRA) parameters, by name."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def last_good(out: Path) -> str:
    good = list_checkpoints(out)
    return f"the last good checkpoint is {good[-1]}" if good else "no checkpoint was written yet"


def assert_finite_params(params, out: str | os.PathLike, step: int, limit: float = PARAM_LIMIT) -> None:
    """After an update: every weight finite and below `limit` in size, or a TrainingError naming the last good
    checkpoint. Called before any checkpoint of this step, so that non-finite or exploded weights are never saved."""
    values = params.values() if isinstance(params, dict) else params
    worst = 0.0
    with torch.no_grad():
        for p in values:
            if p.numel() == 0:
                continue
            m = p.detach().abs().max().item()
            if not math.isfinite(m):
                worst = m
                break
            worst = max(worst, m)
    if math.isfinite(worst) and worst <= limit:
        return
    what = "non-finite" if not math.isfinite(worst) else f"exploded (largest |w| = {worst:.3g}, limit {limit:.0e})"
    raise TrainingError(f"the weights became {what} after the update of step {step}; {last_good(Path(out))}; "
                        "lower --lr and resume or rerun")


# --- RNG states as JSON -----------------------------------------------------------------------------------------------


def _bytes(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text, validate=True)), dtype=torch.uint8).clone()


def rng_state() -> dict:
    """This process's RNG states as JSON values."""
    version, internal, gauss = random.getstate()
    state = {"python": [version, list(internal), gauss], "torch": _bytes(torch.get_rng_state())}
    if torch.cuda.is_available():
        state["cuda"] = [_bytes(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), None if gauss is None else float(gauss)))
    torch.set_rng_state(_tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_tensor(s) for s in state["cuda"]])


# --- nested state <-> JSON + named tensors ------------------------------------------------------------------------------


def _encode(value, prefix: str, tensors: dict):
    """JSON for `value`, with its tensors moved into `tensors` under dotted names. Dicts whose keys are not all
    strings (the optimizer's per-parameter state) and tuples keep their type through a tag."""
    if isinstance(value, torch.Tensor):
        tensors[prefix] = value.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode(v, f"{prefix}.{k}", tensors) for k, v in value.items()}
        return {"__items__": [[k, _encode(v, f"{prefix}.{k}", tensors)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, f"{prefix}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{prefix}.{i}", tensors) for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot checkpoint a {type(value).__name__} at {prefix}")


def _decode(value, tensors: dict):
    if isinstance(value, dict):
        if set(value) == {"__tensor__"}:
            return tensors[value["__tensor__"]]
        if set(value) == {"__items__"}:
            return {k: _decode(v, tensors) for k, v in value["__items__"]}
        if set(value) == {"__tuple__"}:
            return tuple(_decode(v, tensors) for v in value["__tuple__"])
        return {k: _decode(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    return value


# --- checkpoint folders -----------------------------------------------------------------------------------------------


def list_checkpoints(out: str | os.PathLike) -> list[Path]:
    """The finished checkpoints of a student folder, oldest first (temporary folders start with a dot)."""
    folder = Path(out) / CHECKPOINTS_DIR
    return sorted(p for p in folder.glob("step-*") if p.is_dir()) if folder.is_dir() else []


def clean_leftovers(out: str | os.PathLike) -> list[Path]:
    """Remove what a killed writer left in a student folder: half-written checkpoints (`.step-*.tmp-*`), checkpoints
    set aside for replacement (`.step-*.old-*`), the adapter's temporary folder and temporary files of atomic writes.
    Call it only while holding the folder's lock (interp.core.store.folder_lock): a live writer's files look the same."""
    out = Path(out)
    found = []
    folder = out / CHECKPOINTS_DIR
    if folder.is_dir():
        found += [*folder.glob(".step-*.tmp-*"), *folder.glob(".step-*.old-*"), *folder.glob(".step-*.lock")]
    if out.is_dir():
        found += [p for p in out.glob(".adapter.tmp*")]
        for name in (METRICS_FILE, TRAIN_CONFIG_FILE, ADAPTER_CONFIG, ADAPTER_WEIGHTS, BASE_MODEL_FILE):
            found += [p for p in out.glob(f".{name}.*") if not p.name.endswith(".lock")]
    for p in found:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return found


def save_checkpoint(out: Path, step: int, model, optimizer, scheduler, ema: dict | None, rng_states: list,
                    adapter_sha256: list[str] | None = None) -> Path:
    """LoRA weights, optimizer, scheduler, EMA, every process's RNG state (as returned by rng_state()), the sha256
    of every process's adapter (they agree: the trainer checks) and the step (which fixes the data position), written
    as one folder in one rename; older checkpoints and leftovers of killed writes are removed only after it is in
    place."""
    from safetensors.torch import save_file

    out = Path(out)
    path = out / CHECKPOINTS_DIR / f"step-{step:06d}"
    tensors: dict[str, torch.Tensor] = {}
    state = {
        "format": FORMAT,
        "step": step,
        "optimizer": _encode(optimizer.state_dict(), "optimizer", tensors),
        "scheduler": _encode(scheduler.state_dict(), "scheduler", tensors),
        "ema": _encode(ema, "ema", tensors),
        "rng": rng_states,
        "adapter_sha256": adapter_sha256,
    }
    with atomic_dir(path, overwrite=True) as tmp:
        save_file({n: p.detach().cpu().contiguous() for n, p in lora_params(model).items()}, str(tmp / WEIGHTS_FILE))
        save_file(tensors, str(tmp / TENSORS_FILE))
        atomic_write_text(tmp / STATE_FILE, json.dumps(state) + "\n")
        kill_point("during_checkpoint", step)
    for old in list_checkpoints(out):
        if old != path:
            shutil.rmtree(old, ignore_errors=True)
    clean_leftovers(out)
    kill_point("after_checkpoint", step)
    return path


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise UserError(f"checkpoint file {path} is missing; resume from another checkpoint or rerun with --overwrite")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"checkpoint file {path} is damaged ({str(err).splitlines()[0][:120]}); "
                        "delete that checkpoint folder to resume from an earlier one, or rerun with --overwrite") from err


def load_checkpoint(path: Path, model, optimizer, scheduler, rank: int = 0) -> tuple[int, dict | None]:
    """Restore weights, optimizer, scheduler and this process's RNG state; returns (step, ema)."""
    path = Path(path)
    if not (path / STATE_FILE).exists() and (path / LEGACY_STATE).exists():
        raise UserError(f"checkpoint {path} holds its state as a pickle ({LEGACY_STATE}), which is not loaded because "
                        "unpickling a file can run code; retrain with this version (--overwrite)")
    weights = _load_tensors(path / WEIGHTS_FILE)
    tensors = _load_tensors(path / TENSORS_FILE)
    state = read_json(path / STATE_FILE, expect=dict)
    params = lora_params(model)
    if set(weights) != set(params):
        raise UserError(f"checkpoint {path} holds other LoRA weights than this model has; start a new run with another --out")
    damaged = f"checkpoint {path} is damaged"
    try:
        if state.get("format") != FORMAT:
            raise UserError(f"{path / STATE_FILE} has format {state.get('format')!r}, this toolkit reads format {FORMAT}; "
                            "rerun with --overwrite")
        step = state["step"]
        if type(step) is not int or step < 0:
            raise UserError(f"{damaged}: its step is {step!r}")
        for name, p in params.items():
            if weights[name].shape != p.shape:
                raise UserError(f"{damaged}: {name} has shape {list(weights[name].shape)}, the model {list(p.shape)}")
        optimizer_state = _decode(state["optimizer"], tensors)
        scheduler_state = _decode(state["scheduler"], tensors)
        ema = _decode(state["ema"], tensors)
        rngs = state["rng"]
        if not isinstance(rngs, list) or not rngs:
            raise UserError(f"{damaged}: it holds no RNG state")
        if ema is not None and (not isinstance(ema, dict) or set(ema) != set(params)):
            raise UserError(f"{damaged}: its EMA does not match the LoRA weights")
        _check_optimizer_shapes(optimizer, optimizer_state, damaged)
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(weights[name].to(p.device))
        optimizer.load_state_dict(optimizer_state)
        scheduler.load_state_dict(scheduler_state)
        set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
    except UserError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as err:
        raise UserError(f"{damaged} ({type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else 'bad value'}); "
                        "delete that checkpoint folder to resume from an earlier one, or rerun with --overwrite") from err
    if ema is not None:
        ema = {n: t.to(params[n].device) for n, t in ema.items()}
    return step, ema


def _check_optimizer_shapes(optimizer, state: dict, damaged: str) -> None:
    """torch's load_state_dict takes moment tensors of any shape and fails at the next step; check them here."""
    ours = [p for group in optimizer.param_groups for p in group["params"]]
    saved = [i for group in state["param_groups"] for i in group["params"]]
    if len(saved) != len(ours):
        raise UserError(f"{damaged}: its optimizer covers {len(saved)} tensors, the model has {len(ours)}")
    where = dict(zip(saved, ours))
    for index, values in state["state"].items():
        p = where.get(index)
        if p is None or not isinstance(values, dict):
            raise UserError(f"{damaged}: its optimizer state names parameter {index!r}, which it does not list")
        for key, value in values.items():
            if torch.is_tensor(value) and value.dim() > 0 and value.shape != p.shape:
                raise UserError(f"{damaged}: optimizer {key} of parameter {index} has shape {list(value.shape)}, "
                                f"the parameter {list(p.shape)}")


# --- the rest of a student folder on resume ------------------------------------------------------------------------------


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop the metric lines of steps after the checkpoint (they will be run again) and a half-written
    last line left by a killed run."""
    path = Path(path)
    if not path.exists():
        return
    rows = read_jsonl(path, partial_ok=True, allow_empty=True)
    keep = [r for r in rows if isinstance(r.get("step"), int) and r["step"] <= step]
    atomic_write_text(path, "".join(dumps_strict(r) + "\n" for r in keep))


def adapter_is_current(model, out: str | os.PathLike) -> bool:
    """Whether the student folder's saved adapter holds exactly the model's current LoRA weights: false when a run
    was killed between its last checkpoint and the adapter write (then resuming only has to write the adapter)."""
    from peft import get_peft_model_state_dict
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = Path(out) / ADAPTER_WEIGHTS
    if not file.is_file():
        return False
    try:
        saved = load_file(str(file))
    except (SafetensorError, OSError, ValueError):
        return False
    ours = get_peft_model_state_dict(model)
    return set(saved) == set(ours) and all(torch.equal(saved[k], ours[k].detach().cpu()) for k in ours)
