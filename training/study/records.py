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
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from interp.core.errors import UserError
from interp.core.runs import RUN_FILE, TRAIN_CONFIG_FILE, ModelEval, model_eval_from_json, model_eval_path, read_run, write_model_eval
from interp.core.store import atomic_write_bytes, dumps_strict, read_json, read_regular, restore_nonfinite

if TYPE_CHECKING:
    from training.study.plan import Cell, Study

CELLS_DIR = "cells"
RUN_KEYS = ("task", "model", "seed", "placement", "n_test", "no_context")


def record_path(study: "Study", suite: str, seed: int, model: str) -> Path:
    """Where a suite entry's model of one seed is recorded (re-scored suites share the records of their folder)."""
    return study.results_dir / study.name / CELLS_DIR / study.specs[suite].folder / f"seed-{seed}" / f"{model}.json.gz"


def _encode(record: dict) -> bytes:
    text = dumps_strict(record, sort_keys=True, ensure_ascii=False) + "\n"
    return gzip.compress(text.encode("utf-8"), compresslevel=9, mtime=0)


def read_record(path: Path) -> dict | None:
    """A record as written, or None when there is none; a damaged one is a one-line error."""
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


def _write(path: Path, record: dict) -> bool:
    """Write a record unless the same bytes are there already; True when written."""
    data = _encode(record)
    if path.is_file() and not path.is_symlink() and path.read_bytes() == data:
        return False
    atomic_write_bytes(path, data)
    return True


def _run(run_dir: Path) -> dict:
    info = read_run(run_dir)
    return {k: getattr(info, k) for k in RUN_KEYS}


def write_records(study: "Study") -> int:
    """Record every cell the run folders hold evaluated (and each run folder's base model); returns how many
    records were written or rewritten. Called with the study's results, so records follow each finished cell."""
    written = 0
    done_bases: set[Path] = set()
    for cell in study.cells():
        if cell.run_dir in done_bases or not (cell.run_dir / RUN_FILE).exists():
            continue
        ev = cell.study.local_base(cell.suite, cell.seed)
        if ev is not None:
            done_bases.add(cell.run_dir)
            written += _write(record_path(study, cell.suite, cell.seed, "base"),
                              {"model": "base", "run": _run(cell.run_dir), "eval": ev.to_json()})
    for i in study.trained_cells():
        cell = study.cells()[i]
        ev = cell.local_evaluation()
        if ev is None:
            continue
        config = read_json(cell.out / TRAIN_CONFIG_FILE, expect=dict)
        written += _write(cell.record_path(), {"model": cell.student.name, "config": config, "run": _run(cell.run_dir),
                                               "eval": ev.to_json()})
    return written


def recorded_evaluation(cell: "Cell") -> ModelEval | None:
    """The cell's recorded evaluation when the record still describes it: trained with the settings the study
    gives the cell now, evaluated with the study's evaluation settings; else None (the cell then trains anew)."""
    from training.student_folder import config_conflict

    record = read_record(cell.record_path())
    if record is None or record["model"] != cell.student.name:
        return None
    if record["config"].get("steps") != cell.study.steps or config_conflict(record["config"], cell.resolved_config()) is not None:
        return None  # trained for another step count (a study's steps raised: no checkpoint here to go on from)
    ev: ModelEval = record["eval"]
    return ev if _same_eval(ev, cell.study) else None


def recorded_base(study: "Study", suite: str, seed: int) -> ModelEval | None:
    record = read_record(record_path(study, suite, seed, "base"))
    if record is None or record["model"] != "base":
        return None
    ev: ModelEval = record["eval"]
    return ev if _same_eval(ev, study) else None


def _same_eval(ev: ModelEval, study: "Study") -> bool:
    return {k: v for k, v in ev.settings.items() if k != "adapter"} == asdict(study.eval)


def restore_base(study: "Study", suite: str, seed: int) -> bool:
    """Put a run folder's recorded base evaluation back into it (eval/base.json), so that a study resumed on a fresh
    machine does not answer the base model again: only into a run folder that exists, describes the same run as the
    record and has no base evaluation of its own. True when restored."""
    run_dir = study.run_dir(suite, seed)
    if not (run_dir / RUN_FILE).exists() or model_eval_path(run_dir, "base").exists():
        return False
    record = read_record(record_path(study, suite, seed, "base"))
    if record is None or record["model"] != "base" or not _same_eval(record["eval"], study):
        return False
    if record["run"] != _run(run_dir):
        return False
    write_model_eval(run_dir, record["eval"])
    return True
