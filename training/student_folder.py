"""A student folder's life: checked before training, emptied or resumed, its settings recorded, its adapter
written whole (weights last) or removed, and its run folder's run.json kept up to date."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from interp.core.errors import UserError
from interp.core.adapters import write_base_identity
from interp.core.models import LoadedModel
from interp.core.runs import TRAIN_CONFIG_FILE as CONFIG_FILE
from interp.core.runs import ADAPTER_CONFIG, ADAPTER_WEIGHTS, BASE_MODEL_FILE, RunInfo, add_student
from interp.core.store import check_out, read_json
from training.checkpoints import kill_point
from training.checkpoints import list_checkpoints as checkpoints
from training.config import RESUMABLE, TrainConfig, defaults


def config_dict(cfg: TrainConfig) -> dict:
    """train_config.json: every setting of the run."""
    return cfg.to_json()


def config_conflict(saved: dict, cfg: TrainConfig) -> tuple[str, object, object] | None:
    """The first setting a resume may not change (all but RESUMABLE) in which a run's saved train_config.json
    differs from `cfg`, as (key, saved value, cfg's value); None when they agree. A setting the run predates counts
    as its default: settings are added with the default that keeps the earlier behaviour."""
    ours, default = config_dict(cfg), defaults()
    for k in ours:
        if k not in RESUMABLE and saved.get(k, default.get(k)) != ours[k]:
            return k, saved.get(k), ours[k]
    return None


def prepare_out(cfg: TrainConfig, resume: bool, overwrite: bool) -> Path | None:
    """Check the student folder; returns the checkpoint to resume from, if any. Never touches an existing folder
    unless told to."""
    out = Path(cfg.out)
    if out.is_symlink():  # --overwrite would empty the folder it points to, outside the run folder
        raise UserError(f"--out {out} is a symbolic link; give the student folder itself")
    check_out(out, overwrite=True)  # not a file, not under a file, in a folder this process can write
    if resume:
        if not (out / CONFIG_FILE).exists():
            raise UserError(f"nothing to resume in {out}: it has no {CONFIG_FILE}; drop --resume to start a new run")
        conflict = config_conflict(read_json(out / CONFIG_FILE, expect=dict), cfg)
        if conflict:
            k, theirs, ours = conflict
            raise UserError(
                f"{out} was trained with {k}={theirs!r} but this command says {k}={ours!r}; "
                f"resume with the same settings or train into another --out"
            )
        found = checkpoints(out)
        if not found:
            raise UserError(f"{out} has no checkpoint to resume from; rerun without --resume (and with --overwrite)")
        return found[-1]
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"{out} already exists; pass --overwrite to replace it, --resume to continue it, or choose another --out")
    return None


def clear_out(out: Path) -> None:
    """Empty the student folder (after --overwrite), keeping nothing from an earlier run."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def update_run_json(run_dir: Path, cfg: TrainConfig, student: str) -> None:
    """run.json in the parent folder (interp.core.runs.RunInfo): enough for `eval` to rebuild the task and the model."""
    assert cfg.placement is not None  # train() resolved it from the suite
    add_student(run_dir, RunInfo(task=cfg.task, model=cfg.model, seed=cfg.seed, placement=cfg.placement, n_test=cfg.n_test,
                                 no_context=cfg.no_context), student)


def save_adapter(model, out: Path, lm: LoadedModel | None = None) -> None:
    """adapter_config.json + adapter_model.safetensors (+ base_model.json, the base model's identity, given `lm`)
    into `out`, each replaced in one rename."""
    kill_point("before_adapter")
    tmp = out / ".adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    if lm is not None:
        write_base_identity(tmp, lm)
    # Not peft's generated README; the weights go last, so that their presence means the whole adapter is there.
    for name in ([BASE_MODEL_FILE] if lm is not None else []) + [ADAPTER_CONFIG, ADAPTER_WEIGHTS]:
        os.replace(tmp / name, out / name)
    shutil.rmtree(tmp, ignore_errors=True)


def remove_adapter(out: Path) -> None:
    """Remove a saved adapter, weights first: their presence is what marks an adapter as whole."""
    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG, BASE_MODEL_FILE):
        (out / name).unlink(missing_ok=True)
