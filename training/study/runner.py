"""Running a study: every unfinished cell trained (or resumed) and evaluated, one process per job, with one progress
bar and, at the end, the time each cell took. A killed study resumes where it stopped."""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

from interp.core.errors import UserError
from interp.core.models import quiet_known_warnings
from interp.core.runs import RUN_FILE, TRAIN_CONFIG_FILE, read_model_eval
from interp.core.store import atomic_write_json, folder_lock, read_json
from training.checkpoints import list_checkpoints as checkpoints
from training.evaluate import evaluate_run
from training.study.plan import Cell, Study, check_cells, check_results, estimate, format_hours
from training.study.results import write_results
from training.study.study_file import load_study
from training.trainer import train

# --- running ---------------------------------------------------------------------------------------------------------


def run_cell(cell: Cell, on_step=None) -> None:
    """Train (or resume, or skip) one cell, then evaluate its student (and the base model, once per run folder)."""
    if not cell.trained():
        resume = bool(checkpoints(cell.out)) and (cell.out / TRAIN_CONFIG_FILE).exists()
        train(cell.config(), resume=resume, overwrite=not resume, progress=False, on_step=on_step)
    if not cell.evaluated():
        cell.study.restore_base(cell.suite, cell.seed)  # a base answered on another machine is not answered again
        evaluate_run(cell.run_dir, settings=cell.study.eval, models=[cell.student.name], layers=False)


def _die_with_parent() -> None:
    """A cell process ends when the study process does (killed or not): an orphan would go on training unseen."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the pool's own clean-up still applies on a normal exit
        pass


def _worker(args):
    source, runs_dir, results_dir, index, threads, queue = args
    import torch

    quiet_known_warnings()
    torch.set_num_threads(threads)
    study = load_study(source, runs_dir, results_dir)
    cell = study.cells()[index]
    t0 = time.time()
    run_cell(cell, on_step=lambda s, n: queue.put(("step", 1)))
    return index, time.time() - t0


def run_study(study: Study, jobs: int = 1, progress: bool = True, on_results: Callable[[Path, dict], None] | None = None,
              hours: float | None = None) -> dict:
    """Run every unfinished cell (`jobs` processes at a time), then write the study's results; `on_results(folder,
    data)` is called after each writing (the study command writes the figures there). The results folder is locked for the whole run: a second study writing the same results/<name>/ is refused, not interleaved.
    With `hours`, no cell starts that would not end within that much wall time (see Budget); the cells left wait
    for the next run, which resumes from the cell records on any machine."""
    if jobs < 1:
        raise UserError(f"--jobs must be at least 1 (got {jobs})")
    if hours is not None and not (hours > 0 and math.isfinite(hours)):
        raise UserError(f"--hours must be a positive number of hours (got {hours})")
    check_results(study)
    with folder_lock(study.results_dir / study.name, hint="another study writes these results; wait for it to finish "
                                                          "or choose another --results-dir"):
        return _run_study(study, jobs, progress, on_results, hours)


class Budget:
    """Which cells may still start within a wall-time budget. A cell starts when its estimated time (plan.estimate,
    from measured rates), scaled by how long this run's finished cells took against their own estimates, ends
    before the budget does. Cells start in the study's order and the first that does not fit stops the starting, so
    a budget never lets a later (one-seed) setting overtake a main student's cell."""

    def __init__(self, study: Study, hours: float | None):
        self.study, self.seconds = study, (None if hours is None else hours * 3600.0)
        self.t0 = time.perf_counter()
        self.spent = self.expected = 0.0
        self.closed = False

    def estimate(self, cell: Cell) -> float:
        return estimate(self.study, [cell])

    def scale(self) -> float:
        return self.spent / self.expected if self.expected > 0 else 1.0

    def admits(self, cell: Cell) -> bool:
        if self.seconds is None:
            return True
        if not self.closed:
            self.closed = time.perf_counter() - self.t0 + self.estimate(cell) * self.scale() > self.seconds
        return not self.closed

    def finished(self, expected: float, seconds: float) -> None:
        self.expected += expected
        self.spent += seconds


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: a container's or `taskset`'s share), else all."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def busy_note(cores: int | None = None) -> str | None:
    """A line when the machine is already busy as the study starts (the 1-minute load at least half the usable
    cores), else None. Cells beside another study's, or a test run's, oversubscribe the cores: each job takes its
    share of the cores as threads, and a 135M cell's step went from about 40 s to 500 s beside another study."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
    n = cores or usable_cores()
    if load < n / 2:
        return None
    return (f"note: the machine is already busy (load {load:.1f} on {n} cores): the cells will be slower than "
            "estimated and record slower times; run one study at a time, or pause the other (SIGSTOP, then SIGCONT, "
            "to its process group)")


def _run_study(study: Study, jobs: int, progress: bool, on_results, hours: float | None = None) -> dict:
    def results() -> dict:
        data = write_results(study)
        if on_results is not None:
            on_results(study.results_dir / study.name, data)
        return data

    from tqdm.auto import tqdm

    check_results(study)
    check_cells(study)
    cells = study.cells()
    # A re-scored suite's cells share their student folders with the suite they are re-scored from: each folder
    # trains and answers once (the first cell that names it), and the others read its answers.
    units = study.trained_cells()
    todo = [i for i in units if not (cells[i].trained() and cells[i].evaluated())]
    # One bar for the whole grid, in training steps (an evaluation counts as a few steps' worth of time).
    eval_steps = max(1, study.steps // 5)
    total = sum(study.steps + eval_steps for _ in units)
    done = sum(study.steps + eval_steps if i not in todo else cells[i].trained_steps() for i in units)
    note = busy_note() if todo and progress else None
    if note:
        print(note, file=sys.stderr)
    bar = tqdm(total=total, initial=done, desc=f"study {study.name}", unit="step", disable=not progress, smoothing=0.05)
    times: dict[str, float] = {}
    t_start = time.perf_counter()
    budget = Budget(study, hours)
    try:
        if jobs == 1:
            for i in todo:
                cell = cells[i]
                if not budget.admits(cell):
                    break
                bar.set_postfix_str(cell.label())
                t0, expected = time.perf_counter(), budget.estimate(cell)
                run_cell(cell, on_step=lambda s, n: bar.update(1))
                times[cell.label()] = time.perf_counter() - t0
                budget.finished(expected, times[cell.label()])
                record_time(study, cell, times[cell.label()], expected, jobs=1)
                bar.update(eval_steps)
                results()
        else:
            times.update(_run_parallel(study, todo, jobs, bar, eval_steps, results, budget))
    finally:
        bar.close()
    data = results()
    if times and progress:
        print(cell_times(times, time.perf_counter() - t_start, jobs))
    left = len(todo) - len(times)
    if budget.closed and left and progress:
        print(f"{left} cell(s) left for the next run: the next would not have ended within --hours {hours:g} "
              f"(estimates scaled by {budget.scale():.2f}, this run's measured against estimated). Run the same command "
              f"again to go on, here or on another machine with results/{study.name}/ (its cells/ records).")
    return data


TIMES_FILE = "cell_times.json"


def record_time(study: Study, cell: Cell, seconds: float, expected: float, jobs: int, threads: int | None = None) -> None:
    """results/<study>/cell_times.json: per cell, the wall time its last run took (training from where it stood, and
    its evaluation), the plan's estimate, and how the machine was shared, so that a study's cost is committed with
    its results (the study writes it under its lock on the results folder)."""
    import datetime

    import torch

    path = study.results_dir / study.name / TIMES_FILE
    data = read_json(path, expect=dict) if path.exists() else {}
    data[cell.label()] = {"seconds": round(seconds, 1), "estimate": round(expected, 1), "jobs": jobs,
                          "threads": torch.get_num_threads() if threads is None else threads,
                          "cpus": usable_cores(), "device": "cuda" if torch.cuda.is_available() else "cpu",
                          "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    atomic_write_json(path, dict(sorted(data.items())))


def cell_times(times: dict[str, float], wall: float, jobs: int) -> str:
    """What the cells of this run took: per cell (training from where it stood, and its evaluation) and in all."""
    values = sorted(times.values())
    lines = [f"{len(values)} cells in {format_hours(wall)} of wall time with {jobs} job(s): {statistics.median(values) / 60:.1f} min "
             f"per cell (median; {values[0] / 60:.1f}–{values[-1] / 60:.1f}), {format_hours(sum(values))} of cell time"]
    lines += [f"  {label:<48} {seconds / 60:6.1f} min" for label, seconds in times.items()]
    return "\n".join(lines)


def _run_parallel(study: Study, todo: list[int], jobs: int, bar, eval_steps: int, results, budget: Budget | None = None) -> dict[str, float]:
    """Cells in `jobs` spawned processes, each with its share of the cores; the base model's evaluation of a run
    folder is done before its students' cells start, so two processes never evaluate it at once."""
    import multiprocessing as mp

    cells = study.cells()
    for i in todo:
        study.restore_base(cells[i].suite, cells[i].seed)
    for run_dir in dict.fromkeys(cells[i].run_dir for i in todo):
        if read_model_eval(run_dir, "base") is None and (run_dir / RUN_FILE).exists():
            evaluate_run(run_dir, settings=study.eval, models=[], layers=False)
    ctx = mp.get_context("spawn")
    threads = max(1, usable_cores() // jobs)
    from multiprocessing.managers import SyncManager

    # The manager process, like the cells, ends with the study process (killed or not): an orphaned manager would
    # hold the resource tracker's pipe open and both would outlive a `kill -9`.
    manager = SyncManager(ctx=ctx)
    manager.start(_die_with_parent)
    with manager:
        queue = manager.Queue()
        budget = budget or Budget(study, None)
        with ctx.Pool(jobs, initializer=_die_with_parent) as pool:
            waiting = list(todo)
            running: dict[int, tuple] = {}  # cell index -> (its AsyncResult, its estimate)
            times: dict[str, float] = {}
            while waiting or running:
                while waiting and len(running) < jobs and budget.admits(cells[waiting[0]]):
                    i = waiting.pop(0)
                    args = (study.source, str(study.runs_dir), str(study.results_dir), i, threads, queue)
                    running[i] = (pool.apply_async(_worker, (args,)), budget.estimate(cells[i]))
                if budget.closed:
                    waiting.clear()
                while not queue.empty():
                    queue.get()
                    bar.update(1)
                done = [i for i, (r, _) in running.items() if r.ready()]
                if not done:
                    time.sleep(0.5)
                    continue
                for i in done:
                    result, expected = running.pop(i)
                    index, seconds = result.get()  # a cell's error is raised here, as the study's
                    times[cells[index].label()] = seconds
                    budget.finished(expected, seconds)
                    record_time(study, cells[index], seconds, expected, jobs=jobs, threads=threads)
                    bar.update(eval_steps)
                    results()
    return times
