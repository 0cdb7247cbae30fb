"""Opening a run's student: the run's base model with the student's adapter loaded, the one way the CLI, the app and
the notebooks get a model to measure from a run folder."""

from __future__ import annotations

import os
from pathlib import Path

from interp.core.models import EMBEDDED, LoadedModel, load_model
from interp.core.runs import BASE, check_student, read_info, student_dir
from interp.core.settings import AnalysisSettings


def open_student(run: str | os.PathLike, student: str, settings: AnalysisSettings | None = None, *,
                 model: LoadedModel | None = None, name: str | None = None) -> tuple[LoadedModel, str]:
    """The run's base model (the run's own model, loaded with `settings`' device and dtype, or `model` when one is
    already loaded for it) with `student`'s adapter loaded as `name` (default: the student's name) and no adapter
    active; `base` opens the base model alone. Returns (model, the adapter's name, or 'base'). A run or a student
    that does not exist is a one-line UserError before anything loads."""
    run = Path(run)
    info = read_info(run)
    check_student(run, student)
    settings = settings or AnalysisSettings()
    lm = model if model is not None else load_model(info["model"] or EMBEDDED, device=settings.device,
                                                    dtype=settings.dtype)
    if student == BASE:
        key = BASE
    else:
        key = name or student
        if key not in lm.adapters:
            key = lm.load_adapter(student_dir(run, student), name=key)
    lm.set_adapter(None)
    return lm, key
