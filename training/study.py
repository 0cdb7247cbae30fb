"""The removability study: a grid of suites × seeds × students, trained, evaluated and summed up.

A study file (TOML) names the suites, the seeds, the step count, the settings shared by every student and the
students themselves (name → the settings that differ: λ, warm-up, anchor, teacher, guided share, evidence mask…).
`run_study` trains every cell into `runs/<study>/<suite>/seed-<s>/<student>`, evaluates it, and writes
`results/<study>/study.json`, `study.csv` and `frontier.html`. Finished cells are skipped and a killed cell resumes
from its last checkpoint, so a study can be stopped and restarted at will.
"""

from __future__ import annotations

import csv
import io
import math
import os
import statistics
import time
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Sequence

from interp.core.errors import UserError
from interp.core.models import model_window
from interp.core.runs import ADAPTER_WEIGHTS, TRAIN_CONFIG_FILE, read_model_eval
from interp.core.studies import STUDY_ROWS_FILE, write_study_rows
from interp.core.store import (NAME_PATTERN, NAME_RULE, atomic_write_json, atomic_write_text, check_name, check_out, folder_lock,
                          is_regular, read_json, read_text_file, shown_name)
from interp.core.typed import check_fields, check_value, field_types
from training import stats
from training.config import MAX_SEED, TrainConfig, defaults
from training.evaluate import EvalSettings, evaluate_run
from training.study_results import COMPARED, HEALTH_MARGIN, compare, holm_family, measure_model, measure_setting
from training.tasks import SUITES, load_task

STUDY_KEYS = ("name", "model", "suites", "seeds", "steps", "train", "eval", "students", "runs_dir", "results_dir",
              "health_margin", "allow_longer_eval")
STUDENT_ONLY = ("name", "seeds")
# Settings that belong to the grid (suite, seed, model, steps, where) rather than to a student.
GRID_SETTINGS = ("task", "seed", "model", "steps", "out", "n_test")
EVAL_KEYS = tuple(f.name for f in fields(EvalSettings)) + ("n_test",)
# The rates the study summarizes over seeds (docs/measures.md#evaluation).
SUMMARY = ("acc_noctx", "acc_ctx", "harm", "ctx_drop", "degenerate_noctx", "degenerate_ctx", "truncated_ctx", "len_ratio",
           "follow_cf", "drift")
# Seconds per step (λ=0, λ>0) at 96-token rollouts and per evaluated student (40 examples, three context kinds, 96
# tokens, drift), for --dry-run's estimate. The embedded model's were measured on this toolkit's reference machine
# (2 quiet cores, one process with one thread: one job of a `--jobs 2` study; batch 8, persona_luna; step time: the
# rollout 25 s, forward and backward 23 s at λ=0). Steps scale with the rollout budget (`[train] max_new_tokens`).
COST = {"smollm2-135m-instruct": (48.0, 62.0, 274.0), "tiny-random-llama": (0.1, 0.15, 2.0)}
COST_SOURCE = "measured on 2 quiet cores, 1 thread per job, 96-token rollouts, batch 8"
DEFAULT_COST = (180.0, 240.0, 1200.0)


@dataclass
class Student:
    name: str
    settings: dict  # TrainConfig fields that differ from the study's shared ones
    seeds: list[int] | None = None  # None: every seed of the study

    @property
    def lam(self) -> float:
        return float(self.settings.get("lam", 0.0))


@dataclass
class Study:
    name: str
    model: str
    suites: list[str]
    seeds: list[int]
    steps: int
    train: dict  # shared TrainConfig settings
    eval: EvalSettings
    n_test: int
    students: list[Student]
    runs_dir: Path
    results_dir: Path
    source: str = ""
    health_margin: float = HEALTH_MARGIN  # a cell is unhealthy when its no-card loops exceed the base's by more than this
    allow_longer_eval: bool = False  # answers judged past the rollout budget (tokens no loss ever saw) only if asked

    def cells(self) -> list["Cell"]:
        """Every (suite, seed, student) in the order they run: first the main students (those on every seed), suite
        by suite as the file lists them and seed by seed within a suite; then the one-seed settings, suite by suite.
        A study cut short thus loses one-seed settings first, never a main student's seed."""
        main = [s for s in self.students if s.seeds is None]
        extra = [s for s in self.students if s.seeds is not None]
        out = [Cell(self, suite, seed, s) for suite in self.suites for seed in self.seeds for s in main]
        out += [Cell(self, suite, seed, s) for suite in self.suites for seed in self.seeds for s in extra
                if seed in (s.seeds or ())]
        return out

    def run_dir(self, suite: str, seed: int) -> Path:
        return self.runs_dir / self.name / _safe(suite) / f"seed-{seed}"

    def fingerprint(self) -> dict:
        """What a results folder must agree with to be this study's."""
        return {"name": self.name, "model": self.model}


@dataclass
class Cell:
    study: Study
    suite: str
    seed: int
    student: Student

    @property
    def run_dir(self) -> Path:
        return self.study.run_dir(self.suite, self.seed)

    @property
    def out(self) -> Path:
        return self.run_dir / self.student.name

    def config(self) -> TrainConfig:
        s = self.study
        return TrainConfig(**{**s.train, **self.student.settings, "task": self.suite, "seed": self.seed, "model": s.model,
                              "steps": s.steps, "out": str(self.out), "n_test": s.n_test})

    def trained_steps(self) -> int:
        """Steps the student has trained: its last checkpoint's or, saved without checkpoints, its record's."""
        from training.trainer import checkpoints

        found = checkpoints(self.out)
        if found:
            return int(found[-1].name.split("-")[-1])
        if (self.out / ADAPTER_WEIGHTS).exists() and (self.out / TRAIN_CONFIG_FILE).exists():
            return int(read_json(self.out / TRAIN_CONFIG_FILE, expect=dict).get("steps", 0))
        return 0

    def trained(self) -> bool:
        """Its adapter is whole (the weights are written last) and of the study's step count: a study whose
        `steps` was raised continues its cells from their last checkpoints."""
        return (self.out / ADAPTER_WEIGHTS).exists() and self.trained_steps() == self.study.steps

    def check(self) -> None:
        """A cell trained with other settings than the study's now are is refused, not silently reused."""
        from training.trainer import config_conflict

        record = self.out / TRAIN_CONFIG_FILE
        if not record.exists():
            return
        where = f"{self.study.source or 'the study'}: {self.label()} ({self.out})"
        cfg = self.config()
        if cfg.placement is None:  # left to the suite, as training resolves it
            cfg.resolve(load_task(self.suite, seed=self.seed, n_test=self.study.n_test).placement)
        conflict = config_conflict(read_json(record, expect=dict), cfg)
        if conflict:
            k, theirs, ours = conflict
            raise UserError(f"{where} was trained with {k}={theirs!r}, the study now says {k}={ours!r}; give the "
                            f"student another name, or delete that folder to train it anew")
        if (steps := self.trained_steps()) > self.study.steps:
            raise UserError(f"{where} has trained {steps} steps, more than the study's steps={self.study.steps}; "
                            f"raise 'steps', or delete that folder to train it anew")

    def evaluation(self):
        """The student's evaluation with the study's settings and of its current adapter (a ModelEval), or None."""
        from training.evaluate import fingerprint

        ev = read_model_eval(self.run_dir, self.student.name) if self.trained() else None
        if ev is None or {k: v for k, v in ev.settings.items() if k != "adapter"} != asdict(self.study.eval):
            return None
        if ev.settings.get("adapter") != fingerprint(self.out):
            return None  # evaluated before the adapter changed (a study's steps raised): evaluate again
        return ev

    def evaluated(self) -> bool:
        return self.evaluation() is not None

    def label(self) -> str:
        return f"{self.suite}/seed-{self.seed}/{self.student.name}"


def _safe(name: str) -> str:
    """The run folder of a suite: a built-in suite's name, or a .jsonl file's stem; always a name (check_name)."""
    return check_name(Path(name).stem if name.endswith(".jsonl") else name, "suite")


def _fail(path: Path, message: str):
    raise UserError(f"{path}: {message}")


# No list in a study file is longer: a study of more cells than this would not finish, and checking a million
# duplicate seeds one by one took minutes.
MAX_ENTRIES = 1000
MAX_CELLS = 10_000


def _unique(values: list, key: str, fold=lambda v: v) -> None:
    """Lists hold unique values: a seed or suite listed twice would run once and be counted twice."""
    seen: dict = {}
    for v in values:
        k = fold(v)
        if k in seen:
            raise UserError(f"'{key}' lists {v!r} twice" + (f" (as {seen[k]!r} and {v!r})" if seen[k] != v else "")
                            + "; list each once")
        seen[k] = v


def _list(data: dict, key: str, item_type, *, required: bool = True):
    value = check_value(data[key], list[item_type], key)
    if required and not value:
        raise UserError(f"'{key}' must be a non-empty list")
    if len(value) > MAX_ENTRIES:
        raise UserError(f"'{key}' has {len(value)} entries, more than {MAX_ENTRIES}; split the study")
    return value


def _suite_keys(suites: list[str]) -> list[str]:
    """Each suite's run-folder key, checked: a .jsonl suite is a regular file whose stem is a name that neither a
    built-in suite nor another .jsonl suite has (case-insensitively, for case-insensitive file systems). Two suites
    with one key would share run folders: the second would never train and would report the first's numbers."""
    keys = []
    for suite in suites:
        if suite in SUITES:
            keys.append(suite)
            continue
        if not suite.endswith(".jsonl") or not is_regular(suite):
            raise UserError(f"suites: unknown suite '{suite[:200]}'; use one of {', '.join(SUITES)} or a .jsonl file")
        try:
            keys.append(_safe(suite))
        except UserError as err:
            raise UserError(f"suites: {err}; its run folders are named after the file's stem, so rename the file") from None
    seen: dict[str, str] = {name.lower(): name for name in SUITES if name not in suites}
    for suite, key in zip(suites, keys):
        other = seen.get(key.lower())
        if other is not None and other != suite:
            raise UserError(f"suites: '{suite}' and '{other}' would share the run folder '{key}'; rename one of the files")
        seen[key.lower()] = suite
    return keys


def _student_name(entry: dict, where: str) -> str:
    from interp.core.runs import RESERVED_NAMES

    name = entry.get("name")
    if name is None:
        raise UserError(f"{where} has no name")
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or name in RESERVED_NAMES:
        raise UserError(f"{where}: the student name {shown_name(name)} cannot be used: use {NAME_RULE} (a name, not a path), "
                        f"not one of {', '.join(RESERVED_NAMES)}")
    return name


def _parse(data: dict, runs_dir: str | os.PathLike | None, results_dir: str | os.PathLike | None, source: str) -> Study:
    """The study file's tables, every value checked against the type of the TrainConfig / EvalSettings field it
    sets (interp.typed), before any training starts."""
    unknown = [k for k in data if k not in STUDY_KEYS]
    if unknown:
        raise UserError(f"unknown key '{str(unknown[0])[:64]}'; a study has {', '.join(STUDY_KEYS)}")
    for key in ("name", "suites", "seeds", "steps", "students"):
        if key not in data:
            raise UserError(f"missing key '{key}'")
    types = field_types(TrainConfig)
    name = check_name(data["name"], "'name'")
    suites = _list(data, "suites", str)
    _unique(suites, "suites")
    _suite_keys(suites)
    seeds = _list(data, "seeds", types["seed"])
    _unique(seeds, "seeds")
    steps = check_value(data["steps"], types["steps"], "steps")
    model = check_value(data.get("model", defaults()["model"]), types["model"], "model")
    if not model.strip():
        raise UserError("'model' must be a model spec, e.g. tiny-random-llama")
    train = check_fields(TrainConfig, data.get("train", {}), "train", exclude=GRID_SETTINGS)
    ev = check_fields(EvalSettings, data.get("eval", {}), "eval", extra={"n_test": types["n_test"]})
    n_test = ev.pop("n_test", 40)
    try:
        eval_settings = EvalSettings(**ev).check()
    except (TypeError, UserError) as err:
        raise UserError(f"eval: {err}") from None
    window = model_window(model)
    if window is not None and eval_settings.max_new_tokens >= window:
        raise UserError(f"eval: max_new_tokens {eval_settings.max_new_tokens} does not fit the model's window of "
                        f"{window} tokens; use fewer")
    raw = data["students"]
    if not isinstance(raw, list) or not raw:
        raise UserError("'students' must be a list of [[students]] tables")
    if len(raw) > MAX_ENTRIES:
        raise UserError(f"'students' has {len(raw)} entries, more than {MAX_ENTRIES}; split the study")
    students = []
    for i, entry in enumerate(raw):
        where = f"students[{i}]"
        if not isinstance(entry, dict):
            raise UserError(f"{where} must be a table")
        s_name = _student_name(entry, where)
        where = f"{where} ({s_name})"
        settings = check_fields(TrainConfig, {k: v for k, v in entry.items() if k not in STUDENT_ONLY}, where,
                                exclude=GRID_SETTINGS)
        s_seeds = entry.get("seeds")
        if s_seeds is not None:
            try:
                s_seeds = _list(entry, "seeds", types["seed"])
                _unique(s_seeds, "seeds")
            except UserError as err:
                raise UserError(f"{where}: {err}") from None
            if not set(s_seeds) <= set(seeds):
                raise UserError(f"{where}: 'seeds' must be a subset of the study's seeds {seeds[:20]}")
        students.append(Student(s_name, settings, s_seeds))
    names = [s.name for s in students]
    folded = [n.lower() for n in names]  # one folder on a case-insensitive file system
    dup = next((n for n, f in zip(names, folded) if folded.count(f) > 1), None)
    if dup:
        other = next(n for n, f in zip(names, folded) if f == dup.lower() and n != dup) if names.count(dup) == 1 else dup
        raise UserError(f"two students are named '{dup}'" + (f" and '{other}' (one folder where case is ignored)" if other != dup else ""))
    in_file = {k: check_value(data.get(k, k.removesuffix("_dir")), str, k) for k in ("runs_dir", "results_dir")}
    given = {k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in (("runs_dir", runs_dir), ("results_dir", results_dir))}
    where_runs = check_value(given["runs_dir"] if runs_dir is not None else in_file["runs_dir"], str, "--runs-dir")
    where_results = check_value(given["results_dir"] if results_dir is not None else in_file["results_dir"], str, "--results-dir")
    if not where_runs.strip() or not where_results.strip():
        raise UserError("'runs_dir' and 'results_dir' must be folder paths")
    margin = data.get("health_margin", HEALTH_MARGIN)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not (0 <= margin < 1):
        raise UserError(f"'health_margin' must be a number in [0, 1) (got {shown_name(margin)})")
    longer = data.get("allow_longer_eval", False)
    if not isinstance(longer, bool):
        raise UserError(f"'allow_longer_eval' must be true or false (got {shown_name(longer)})")
    study = Study(name=name, model=model, suites=suites, seeds=seeds, steps=steps, train=train, eval=eval_settings,
                  n_test=n_test, students=students, runs_dir=Path(where_runs), results_dir=Path(where_results), source=source,
                  health_margin=float(margin), allow_longer_eval=longer)
    bad_seed = next((x for x in seeds if not 0 <= x <= MAX_SEED), None)
    if bad_seed is not None:
        raise UserError(f"seeds: {bad_seed} is out of range; seeds are 0..{MAX_SEED}")
    n_cells = len(suites) * len(seeds) * len(students)
    if n_cells > MAX_CELLS:
        raise UserError(f"{n_cells} cells (suites × seeds × students) are more than {MAX_CELLS}; split the study")
    # Every cell valid before the first one trains; cells differ across seeds only by the seed, checked above.
    checked: set = set()
    for cell in study.cells():
        if (cell.suite, cell.student.name) in checked:
            continue
        checked.add((cell.suite, cell.student.name))
        try:
            cfg = cell.config().check()
        except (TypeError, UserError) as err:
            raise UserError(f"{cell.label()}: {err}") from None
        if cfg.max_new_tokens < eval_settings.max_new_tokens and not longer:
            raise UserError(f"{cell.label()}: rollouts of {cfg.max_new_tokens} tokens but answers judged at "
                            f"{eval_settings.max_new_tokens}: the tokens past the rollout budget are never trained; raise "
                            f"[train] max_new_tokens to at least {eval_settings.max_new_tokens}, or set allow_longer_eval = true")
    for cell in study.cells():  # no cell's folder leaves the runs folder, whatever the names say
        if not Path(os.path.abspath(cell.out)).is_relative_to(os.path.abspath(study.runs_dir)):
            raise UserError(f"{cell.label()}: its folder {cell.out} is outside the runs folder {study.runs_dir}")
    return study


def load_study(path: str | os.PathLike, runs_dir: str | os.PathLike | None = None,
               results_dir: str | os.PathLike | None = None) -> Study:
    """Read and check a study file: every mistake is a one-line error naming the file and the key, before any
    training starts. Every value is checked against the type of the TrainConfig / EvalSettings field it sets, every
    name against the name rule (interp.store.check_name), and every cell's settings are validated as a TrainConfig."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise UserError(f"study file {path} does not exist; see studies/smoke.toml for an example")
    try:
        text = read_text_file(path, "study file (TOML)")
    except UserError as err:
        raise UserError(f"study file {err}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        _fail(path, f"not valid TOML ({str(err).splitlines()[0]})")
    except RecursionError:
        _fail(path, "not valid TOML (nested too deeply)")
    try:
        return _parse(data, runs_dir, results_dir, str(path))
    except UserError as err:
        _fail(path, str(err))
        raise


def check_cells(study: Study) -> None:
    """Every cell already begun agrees with the study file, before anything trains."""
    for cell in study.cells():
        cell.check()


def check_results(study: Study) -> Path:
    """results/<study>/ must be this study's (or new), and a folder this process can write: checked before anything
    trains, so that a study never finishes training only to find it cannot write its results. Another study is one
    with another name or model, other shared settings, or a student of the same name with other settings (adding
    seeds, suites, students or steps keeps it the same study)."""
    folder = study.results_dir / study.name
    for where, option in ((folder, "--results-dir"), (study.runs_dir / study.name, "--runs-dir")):
        if where.is_symlink():  # writing through it would touch a folder the user did not name
            raise UserError(f"{option} {where} is a symbolic link; give a real folder")
        check_out(where, overwrite=True, option=option)
    meta = folder / "study.json"
    if meta.exists() or meta.is_symlink():
        data = read_json(meta)
        theirs = {k: data.get(k) for k in study.fingerprint()} if isinstance(data, dict) else None
        if theirs != study.fingerprint():
            raise UserError(f"{folder} holds the results of another study ({theirs}); choose another --results-dir or name")
        ours = {"train": study.train, "n_test": study.n_test}
        differs = [k for k in ours if k in data and data[k] != ours[k]]
        previous = {s.get("name"): s.get("settings") for s in data.get("students") or [] if isinstance(s, dict)}
        differs += [f"student '{s.name}'" for s in study.students if s.name in previous and previous[s.name] != s.settings]
        if differs:
            raise UserError(f"{folder} holds the results of another study of the same name (its {differs[0]} has other "
                            f"settings); choose another --results-dir or name, or delete that folder")
    return folder


def estimate(study: Study, cells: Sequence[Cell]) -> float:
    """Seconds the cells still need, from rough per-step and per-evaluation costs on 2 CPU cores."""
    unreg, reg, per_eval = COST.get(study.model, DEFAULT_COST)
    total = 0.0
    for c in cells:
        if not c.trained():
            left = study.steps - c.trained_steps()
            cfg = c.config()
            scale = cfg.max_new_tokens / 96 * cfg.batch_size / 8 * cfg.grad_accum
            total += left * (reg if c.student.lam > 0 else unreg) * scale
        if not c.evaluated():
            total += per_eval
    return total


def plan(study: Study) -> str:
    check_cells(study)
    cells = study.cells()
    todo = [c for c in cells if not (c.trained() and c.evaluated())]
    lines = [f"study {study.name}: {len(study.suites)} suites × {len(study.seeds)} seeds, {len(study.students)} students, "
             f"{len(cells)} cells ({len(cells) - len(todo)} done), {study.steps} steps each, model {study.model}"]
    for c in cells:
        steps = c.trained_steps()
        state = ("done" if c.evaluated() else "trained") if c.trained() else (f"{steps}/{study.steps}" if steps else "todo")
        settings = ", ".join(f"{k}={v}" for k, v in c.student.settings.items()) or "defaults"
        lines.append(f"  {state:>7}  {c.label():<40} {settings}")
    left = estimate(study, todo)
    source = COST_SOURCE if study.model in COST else "a guess for a model not measured here"
    lines.append(f"estimated time left: {_hours(left)} of cell time; about {_hours(left / 2)} with --jobs 2 on 2 CPU cores "
                 f"(rates {source}; bench/generate.py and the metrics' step_s give your machine's)")
    return "\n".join(lines)


def _hours(seconds: float) -> str:
    h, m = divmod(int(seconds // 60), 60)
    return f"{h} h {m:02d} min" if h else f"{m} min"


# --- running ---------------------------------------------------------------------------------------------------------


def run_cell(cell: Cell, on_step=None) -> None:
    """Train (or resume, or skip) one cell, then evaluate its student (and the base model, once per run folder)."""
    from training.trainer import checkpoints, train

    if not cell.trained():
        resume = bool(checkpoints(cell.out)) and (cell.out / "train_config.json").exists()
        train(cell.config(), resume=resume, overwrite=not resume, progress=False, on_step=on_step)
    if not cell.evaluated():
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

    from interp.core.models import quiet_known_warnings

    quiet_known_warnings()
    torch.set_num_threads(threads)
    study = load_study(source, runs_dir, results_dir)
    cell = study.cells()[index]
    t0 = time.time()
    run_cell(cell, on_step=lambda s, n: queue.put(("step", 1)))
    return index, time.time() - t0


def run_study(study: Study, jobs: int = 1, progress: bool = True) -> dict:
    """Run every unfinished cell (`jobs` processes at a time), then write the study's results. The results folder
    is locked for the whole run: a second study writing the same results/<name>/ is refused, not interleaved."""
    if jobs < 1:
        raise UserError(f"--jobs must be at least 1 (got {jobs})")
    check_results(study)
    with folder_lock(study.results_dir / study.name, hint="another study writes these results; wait for it to finish "
                                                          "or choose another --results-dir"):
        return _run_study(study, jobs, progress)


def _run_study(study: Study, jobs: int, progress: bool) -> dict:
    from tqdm.auto import tqdm

    check_results(study)
    check_cells(study)
    cells = study.cells()
    todo = [i for i, c in enumerate(cells) if not (c.trained() and c.evaluated())]
    # One bar for the whole grid, in training steps (an evaluation counts as a few steps' worth of time).
    eval_steps = max(1, study.steps // 5)
    total = sum(study.steps + eval_steps for _ in cells)
    done = sum(study.steps + eval_steps if i not in todo else cells[i].trained_steps() for i in range(len(cells)))
    bar = tqdm(total=total, initial=done, desc=f"study {study.name}", unit="step", disable=not progress, smoothing=0.05)
    times: dict[str, float] = {}
    t_start = time.perf_counter()
    try:
        if jobs == 1:
            for i in todo:
                cell = cells[i]
                bar.set_postfix_str(cell.label())
                t0 = time.perf_counter()
                run_cell(cell, on_step=lambda s, n: bar.update(1))
                times[cell.label()] = time.perf_counter() - t0
                bar.update(eval_steps)
                write_results(study)
        else:
            times.update(_run_parallel(study, todo, jobs, bar, eval_steps))
    finally:
        bar.close()
    data = write_results(study)
    if times and progress:
        print(cell_times(times, time.perf_counter() - t_start, jobs))
    return data


def cell_times(times: dict[str, float], wall: float, jobs: int) -> str:
    """What the cells of this run took: per cell (training from where it stood, and its evaluation) and in all."""
    values = sorted(times.values())
    lines = [f"{len(values)} cells in {_hours(wall)} of wall time with {jobs} job(s): {statistics.median(values) / 60:.1f} min "
             f"per cell (median; {values[0] / 60:.1f}–{values[-1] / 60:.1f}), {_hours(sum(values))} of cell time"]
    lines += [f"  {label:<48} {seconds / 60:6.1f} min" for label, seconds in times.items()]
    return "\n".join(lines)


def _run_parallel(study: Study, todo: list[int], jobs: int, bar, eval_steps: int) -> dict[str, float]:
    """Cells in `jobs` spawned processes, each with its share of the cores; the base model's evaluation of a run
    folder is done before its students' cells start, so two processes never evaluate it at once."""
    import multiprocessing as mp

    cells = study.cells()
    for run_dir in dict.fromkeys(cells[i].run_dir for i in todo):
        if read_model_eval(run_dir, "base") is None and (run_dir / "run.json").exists():
            evaluate_run(run_dir, settings=study.eval, models=[], layers=False)
    ctx = mp.get_context("spawn")
    threads = max(1, (os.cpu_count() or 1) // jobs)
    from multiprocessing.managers import SyncManager

    # The manager process, like the cells, ends with the study process (killed or not): an orphaned manager would
    # hold the resource tracker's pipe open and both would outlive a `kill -9`.
    manager = SyncManager(ctx=ctx)
    manager.start(_die_with_parent)
    with manager:
        queue = manager.Queue()
        with ctx.Pool(jobs, initializer=_die_with_parent) as pool:
            args = [(study.source, str(study.runs_dir), str(study.results_dir), i, threads, queue) for i in todo]
            pending = pool.imap_unordered(_worker, args)
            times: dict[str, float] = {}
            while len(times) < len(todo):
                while not queue.empty():
                    queue.get()
                    bar.update(1)
                try:
                    index, seconds = pending.next(timeout=1.0)
                except mp.TimeoutError:
                    continue
                times[cells[index].label()] = seconds
                bar.update(eval_steps)
                write_results(study)
    return times


# --- results ---------------------------------------------------------------------------------------------------------


def collect(study: Study) -> dict:
    """study.json: per cell the student's scores and intervals; per (suite, student) mean ± sd over seeds; the base
    model and teacher per suite; paired comparisons with the first student."""
    cells: list[dict[str, Any]] = []
    for c in study.cells():
        ev = c.evaluation()
        if ev is None:
            continue
        cells.append({"suite": c.suite, "seed": c.seed, "student": c.student.name, "lam": c.student.lam,
                      "settings": c.student.settings, "scores": ev.scores, "intervals": ev.intervals})
    references: list[dict[str, Any]] = []
    for suite in study.suites:
        for seed in study.seeds:
            base = read_model_eval(study.run_dir(suite, seed), "base")
            if base is None:
                continue
            for name in ("base", "teacher"):
                references.append({"suite": suite, "seed": seed, "model": name, "scores": base.scores, "intervals": base.intervals})
    summary = []
    for suite in study.suites:
        for student in study.students:
            mine = [c for c in cells if c.get("suite") == suite and c["student"] == student.name]
            if mine:
                summary.append({"suite": suite, "student": student.name, "lam": student.lam, "settings": student.settings,
                                "seeds": [c["seed"] for c in mine], **_over_seeds([c["scores"] for c in mine])})
        refs = [r for r in references if r["suite"] == suite and r["model"] == "base"]
        if refs:
            for name in ("base", "teacher"):
                summary.append({"suite": suite, "student": name, "lam": None, "settings": {}, "seeds": [r["seed"] for r in refs],
                                **_over_seeds([_as_teacher(r["scores"]) if name == "teacher" else r["scores"] for r in refs])})
    settings, comparisons = seed_level(study)
    return {**study.fingerprint(), "suites": study.suites, "seeds": study.seeds, "steps": study.steps, "train": study.train,
            "eval": asdict(study.eval), "budgets": study.eval.cuts, "n_test": study.n_test, "health_margin": study.health_margin,
            "students": [{"name": s.name, "settings": s.settings, "seeds": s.seeds} for s in study.students],
            "cells": cells, "references": references, "summary": summary, "paired": _paired(study),
            "settings": settings, "comparisons": comparisons}


def _rows(study: Study) -> tuple[dict, dict, dict]:
    """The evaluated rows: students[(suite, name)][seed], base[suite][seed], and each student cell's drift."""
    students: dict = {}
    drift: dict = {}
    for c in study.cells():
        ev = c.evaluation()
        if ev is not None:
            students.setdefault((c.suite, c.student.name), {})[c.seed] = ev.rows
            drift.setdefault((c.suite, c.student.name), {})[c.seed] = ev.scores.get("drift")
    base: dict = {}
    for suite in study.suites:
        for seed in study.seeds:
            ev = read_model_eval(study.run_dir(suite, seed), "base")
            if ev is not None and {k: v for k, v in ev.settings.items() if k != "adapter"} == asdict(study.eval):
                base.setdefault(suite, {})[seed] = ev.rows
    return students, base, drift


def seed_level(study: Study) -> tuple[list[dict], list[dict]]:
    """Per suite, model and budget every measure over seeds (training.study_results); the base and the teacher (the
    base read with the context) as references; each student compared with the first student, pooled over seeds,
    at the full budget, with Holm's correction across all the study's comparisons."""
    students, base, drift = _rows(study)
    full = study.eval.max_new_tokens
    out: list[dict] = []
    for suite in study.suites:
        b = base.get(suite)
        if not b:
            continue
        for budget in study.eval.cuts:
            out.append({"suite": suite, "model": "base", "lam": None, "budget": budget, "seeds": sorted(b),
                        **measure_model(b, budget, full)})
            for s in study.students:
                mine = students.get((suite, s.name))
                if mine:
                    out.append({"suite": suite, "model": s.name, "lam": s.lam, "settings": s.settings, "budget": budget,
                                **measure_setting(mine, b, budget, full, margin=study.health_margin,
                                                  drift=drift.get((suite, s.name)))})
    comparisons: list[dict] = []
    ref = study.students[0]
    for suite in study.suites:
        a_ref = students.get((suite, ref.name))
        for s in study.students[1:]:
            mine = students.get((suite, s.name))
            if not mine or not a_ref:
                continue
            for key in COMPARED:
                better_high = key != "degenerate_ctx"
                comparisons.append({"suite": suite, "model": s.name, "vs": ref.name,
                                    **compare(mine, a_ref, key, full, full, higher_is_better=better_high)})
    holm_family(comparisons)
    return out, comparisons


def _as_teacher(scores: dict) -> dict:
    """The teacher is the base model read with the context, always: both of its columns are the base's with-context
    answers (acc, loops, truncation), so it has no harm to report (nothing to lose by adding a context it has)."""
    return {**scores, "acc_noctx": scores.get("acc_ctx"), "degenerate_noctx": scores.get("degenerate_ctx"),
            "truncated_noctx": scores.get("truncated_ctx"), "harm": None, "ctx_drop": 0.0, "len_ratio": 1.0}


def _over_seeds(scores: list[dict]) -> dict:
    out = {}
    for k in SUMMARY:
        m, sd, n = stats.mean_sd([s.get(k) for s in scores])
        out[k] = {"mean": m, "sd": sd, "n": n}
    return out


def _paired(study: Study) -> list[dict]:
    """Each student against the first one on the same examples (with the context), per suite and seed."""
    out = []
    ref = study.students[0]
    for c in study.cells():
        a = None if c.student is ref else c.evaluation()
        if a is None:
            continue
        b = Cell(study, c.suite, c.seed, ref).evaluation()  # the same checks as the student's: settings, current adapter
        if b is None or len(a.rows) != len(b.rows):
            continue
        out.append({"suite": c.suite, "seed": c.seed, "student": c.student.name, "vs": ref.name,
                    **stats.paired([r.correct_ctx for r in a.rows], [r.correct_ctx for r in b.rows])})
    return out


CSV_COLUMNS = ["suite", "student", "lam", "seeds"] + [f"{k}_{p}" for k in SUMMARY for p in ("mean", "sd")]


def write_results(study: Study) -> dict:
    """results/<study>/study.json, study.csv (one row per suite and student, mean and sd over seeds), summary.md (the
    same as a markdown table, with the paired comparisons) and frontier.html (the frontier plot, plotly inlined:
    opens offline)."""
    from interp.views.plots import frontier_figure

    folder = check_results(study)
    data = collect(study)
    atomic_write_json(folder / "study.json", data)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    for row in data["summary"]:
        flat = {"suite": row["suite"], "student": row["student"], "lam": row["lam"], "seeds": " ".join(map(str, row["seeds"]))}
        for k in SUMMARY:
            flat[f"{k}_mean"] = _fmt(row[k]["mean"])
            flat[f"{k}_sd"] = _fmt(row[k]["sd"])
        writer.writerow(flat)
    atomic_write_text(folder / "study.csv", buf.getvalue())
    atomic_write_text(folder / "summary.md", markdown(data))
    write_study_rows(folder / STUDY_ROWS_FILE, study_rows_records(study))
    fig = frontier_figure(data)
    write_plotlyjs(folder)
    atomic_write_text(folder / "frontier.html", fig.to_html(include_plotlyjs="plotly.min.js", full_html=True))
    return data


def study_rows_records(study: Study) -> list[dict]:
    """Every evaluated answer of the study (students and the base, per suite and seed), for rows.jsonl.gz."""
    students, base, _ = _rows(study)
    records = []
    for suite in study.suites:
        for seed, rows in sorted((base.get(suite) or {}).items()):
            records += [{"suite": suite, "seed": seed, **asdict(r)} for r in rows]
        for s in study.students:
            for seed, rows in sorted((students.get((suite, s.name)) or {}).items()):
                records += [{"suite": suite, "seed": seed, **asdict(r)} for r in rows]
    return records


def write_plotlyjs(folder: Path) -> None:
    """One plotly.js beside a study's figures (they load it by relative path and open offline), written once."""
    from plotly.offline import get_plotlyjs

    target = folder / "plotly.min.js"
    js = get_plotlyjs()
    if not target.exists() or target.stat().st_size != len(js.encode("utf-8")):
        atomic_write_text(target, js)


def _fmt(v):
    """A CSV cell: empty for a statistic no example defines, "NaN" for one that is not a number."""
    if v is None:
        return ""
    return str(v) if isinstance(v, float) and not math.isfinite(v) else round(v, 4)


MARKDOWN = ("acc_noctx", "acc_ctx", "harm", "degenerate_noctx", "degenerate_ctx", "truncated_ctx", "follow_cf", "ctx_drop", "drift")


def _num(v, digits: int = 2) -> str:
    """A number as the tables show it: "–" undefined (no example defines it), "NaN" a value that is not a number."""
    if v is None:
        return "–"
    if isinstance(v, float) and math.isnan(v):
        return "NaN"
    return f"{v:+.{digits}f}" if digits < 0 else f"{v:.{digits}f}"


def _ci(stat: dict | None, signed: bool = False) -> str:
    """"0.23 [0.10, 0.35]": a mean over seeds with its hierarchical bootstrap interval; "–" undefined."""
    if not stat or stat.get("value") is None:
        return "–"
    v = stat["value"]
    text = (f"{v:+.2f}" if signed else f"{v:.2f}") if not (isinstance(v, float) and math.isnan(v)) else "NaN"
    ci = stat.get("ci")
    return text + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def _mean_sd(stat: dict) -> str:
    """"0.19 ± 0.06" over seeds; one seed has no sd; a rate no example defines (harm when none was right) is "–", one
    that is not a number "NaN"."""
    from interp.core.studies import format_stat

    return format_stat(stat["mean"], stat["sd"])


def _health(row: dict) -> str:
    h = row.get("health")
    if not h:
        return "(reference)"
    loops = h["loops"]
    verdict = h.get("verdict") or "–"
    return f"{'**unhealthy**' if verdict == 'unhealthy' else verdict} ({_ci(loops, signed=True)})"


def _harm(row: dict) -> str:
    h = row.get("harm")
    if not h or not h.get("n"):
        return "– (0/0)"
    return f"{h['pooled']:.2f} ({h['k']}/{h['n']})"


def markdown(data: dict) -> str:
    """The study's tables, the seed the unit: per suite at the full budget, each model's health (no-card loops minus
    the base's, with the verdict against the study's margin), accuracy, pooled harm k/n, the card's own effect on
    loops, accuracy and length, and the counterfactual measures, each a mean over seeds [hierarchical bootstrap 95%
    interval]; then the same answers judged at each shorter budget; then each setting against the first student,
    pooled over seeds (exact McNemar/CMH), the seed-level direction, and Holm's correction across the study."""
    settings = data.get("settings") or []
    budgets = data.get("budgets") or [data.get("eval", {}).get("max_new_tokens")]
    full = budgets[-1]
    margin = data.get("health_margin", 0.05)
    lines = [f"Budget {full} tokens (answers judged at {', '.join(map(str, budgets))}). Means over seeds with 95% "
             f"hierarchical bootstrap intervals (seeds, then examples); `seeds` counts the seeds that define the row. "
             f"Health: no-card loops minus the base's, unhealthy above {margin:.2f}. card effect: (ctx − no ctx) of the "
             "model minus the base's. harm: pooled over seeds, k/n.", ""]
    head = ("| suite | model | seeds | health | `acc_noctx` | `acc_ctx` | `harm` | card effect: loops | card effect: acc | "
            "card effect: length | `follow_cf` clean | `loops_cf` | `stubborn_cf` | drift |")
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for row in (r for r in settings if r["budget"] == full):
        ce = row.get("card_effect") or {}
        drift = (row.get("health") or {}).get("drift") or {}
        lines.append(f"| {row['suite']} | {row['model']} | {len(row['seeds'])} | {_health(row)} | {_ci(row.get('acc_noctx'))} | "
                     f"{_ci(row.get('acc_ctx'))} | {_harm(row)} | {_ci(ce.get('loops'), True)} | {_ci(ce.get('acc'), True)} | "
                     f"{_ci(ce.get('len'), True)} | {_ci(row.get('follow_cf_clean'))} | {_ci(row.get('loops_cf'))} | "
                     f"{_ci(row.get('stubborn_cf'))} | {_num(drift.get('value'), 3)} |")
    if len(budgets) > 1:
        lines += ["", "The same answers at each budget (loops: either rule; short: a 1–4-word span 3×; clause: 5–40 words 2×):", "",
                  "| suite | model | budget | `acc_noctx` | `acc_ctx` | loops no ctx (short / clause) | loops ctx (short / clause) | "
                  "card effect: loops | card effect: acc |", "|---|---|---|---|---|---|---|---|---|"]
        for row in settings:
            ce = row.get("card_effect") or {}
            short = lambda k, r=row: _ci(r.get(k)).split(" [")[0]  # noqa: E731
            lines.append(f"| {row['suite']} | {row['model']} | {row['budget']} | {_ci(row.get('acc_noctx'))} | {_ci(row.get('acc_ctx'))} | "
                         f"{_ci(row.get('loops_noctx'))} ({short('loops_short_noctx')} / {short('loops_clause_noctx')}) | "
                         f"{_ci(row.get('loops_ctx'))} ({short('loops_short_ctx')} / {short('loops_clause_ctx')}) | "
                         f"{_ci(ce.get('loops'), True)} | {_ci(ce.get('acc'), True)} |")
    if data.get("comparisons"):
        lines += ["", f"Each setting against `{data['comparisons'][0]['vs']}` on the same examples, pooled over seeds (exact "
                  "McNemar on the pooled discordant pairs = CMH for matched pairs), the seeds where each is ahead, and "
                  f"Holm's correction across all {len(data['comparisons'])} comparisons of the study:", "",
                  "| suite | model | verdict | right/looping only for it | only for the other | p | p (Holm) | seeds ahead / behind / tied |",
                  "|---|---|---|---|---|---|---|---|"]
        for c in data["comparisons"]:
            lines.append(f"| {c['suite']} | {c['model']} | `{c['key']}` | {c['a_only']} | {c['b_only']} | {c['p']:.3f} | "
                         f"{_num(c.get('p_holm'), 3)} | {c['a_better_seeds']} / {c['b_better_seeds']} / {c['tied_seeds']} |")
    lines += ["", "Mean ± sd over seeds of each cell's own scores (the per-adapter view):", "",
              "| suite | model | seeds | " + " | ".join(f"`{c}`" for c in MARKDOWN) + " |", "|---|---|---|" + "---|" * len(MARKDOWN)]
    for row in data["summary"]:
        lines.append(f"| {row['suite']} | {row['student']} | {len(row['seeds'])} | " + " | ".join(_mean_sd(row[c]) for c in MARKDOWN) + " |")
    return "\n".join(lines) + "\n"


__all__ = ["Study", "Student", "Cell", "load_study", "run_study", "plan", "write_results", "collect", "markdown"]
