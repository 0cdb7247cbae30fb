"""A study's cell records: each finished cell's evaluation, kept beside its results, so that a study resumes on
another machine (a fresh checkout, a preempted cloud machine, the next working day) from what was committed.

results/<study>/cells/<run folder>/seed-<n>/<model>.json.gz holds, gzip-compressed and byte-reproducible:
  model    the student's name, or "base"
  config   the settings the student was trained with (its train_config.json); absent for the base model
  run      the run folder's description (run.json's task, model, seed, placement, n_test, no_context)
  eval     its evaluation as eval/<model>.json holds it (settings with the adapter's hash, scores, intervals, rows)

A record stands in for a cell whose run folder is gone: the cell counts as done when its record's training settings
are the ones the study file gives it now and its evaluation settings are the study's. Where the run folder still
holds the student's adapter, the run folder decides, exactly as without records. The adapters themselves (tens of MB
each) are not kept: the causal commands need a student trained again (training is deterministic on one machine)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from interp.core.errors import UserError
from interp.core.runs import ModelEval, model_eval_from_json, read_run
from interp.core.store import atomic_write_bytes, dumps_strict, read_regular, restore_nonfinite

CELLS_DIR = "cells"
RUN_KEYS = ("task", "model", "seed", "placement", "n_test", "no_context")


def record_path(results: Path, folder: str, seed: int, model: str) -> Path:
    """Where a run folder's model of one seed is recorded, under results/<study>/ (re-scored suites share the
    records of the folder they are re-scored from)."""
    return results / CELLS_DIR / folder / f"seed-{seed}" / f"{model}.json.gz"


def read_record(path: Path) -> dict | None:
    """A record as written (its `eval` a ModelEval), or None when there is none; a damaged one is a one-line error."""
    if not path.exists() and not path.is_symlink():
        return None
    fix = "delete it (the cell is then trained again) or restore it from version control"
    try:
        data = restore_nonfinite(json.loads(gzip.decompress(read_regular(path, "cell record")).decode("utf-8")))
    except (OSError, EOFError, UnicodeDecodeError, ValueError, RecursionError):
        raise UserError(f"{path} is not a gzip-compressed JSON cell record; {fix}") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), str) or not isinstance(data.get("run"), dict):
        raise UserError(f"{path} is damaged (no model or run); {fix}")
    if data["model"] != "base" and not isinstance(data.get("config"), dict):
        raise UserError(f"{path} is damaged (a student's record without its training settings); {fix}")
    data["eval"] = model_eval_from_json(data.get("eval"), data["model"], path, fix)
    return data


def write_record(path: Path, model: str, run_dir: Path, ev: ModelEval, config: dict | None = None) -> bool:
    """Write a record (byte-reproducible: sorted keys, no time stamp) unless the same bytes are there already; True
    when written."""
    record = {"model": model, "run": run_description(run_dir), "eval": ev.to_json()}
    if config is not None:
        record["config"] = config
    text = dumps_strict(record, sort_keys=True, ensure_ascii=False) + "\n"
    data = gzip.compress(text.encode("utf-8"), compresslevel=9, mtime=0)
    if path.is_file() and not path.is_symlink() and path.read_bytes() == data:
        return False
    atomic_write_bytes(path, data)
    return True


def run_description(run_dir: Path) -> dict:
    """What a record keeps of run.json: the settings a base evaluation depends on."""
    info = read_run(run_dir)
    return {k: getattr(info, k) for k in RUN_KEYS}


def same_eval(ev: ModelEval, settings: dict) -> bool:
    """Evaluated with these evaluation settings (the adapter's hash aside)."""
    return {k: v for k, v in ev.settings.items() if k != "adapter"} == settings
