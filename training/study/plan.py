"""A study's plan: its cells (suite entry × seed × student) and their folders, how each cell's answers are judged,
what is done, and the time the rest will take (the study file is read by training.study.study_file)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from interp.core.errors import UserError
from interp.core.models import load_tokenizer
from interp.core.runs import ADAPTER_WEIGHTS, RUN_FILE, TRAIN_CONFIG_FILE, ModelEval, model_eval_path, read_model_eval, write_model_eval
from interp.core.store import check_name, check_out, read_json
from training.checkpoints import list_checkpoints as checkpoints
from training.config import TrainConfig
from training.evaluate import EvalSettings, fingerprint, rescored
from training.losses import lam_at
from training.student_folder import config_conflict
from training.study import records
from training.study.seed_level import HEALTH_MARGIN
from training.tasks import Example, load_task, trains_as

# Seconds per step (λ=0, λ>0) at 96-token rollouts and per evaluated student (40 examples, three context kinds, 96
# tokens, drift, with loading the model), for --dry-run's estimate and --hours. The embedded model's are the means of
# the calibrated removability study's quiet cells (2 quiet cores, one process with one thread: one job of a
# `--jobs 2` study; batch 8, persona and persona_luna, 9 cells, 270 steps; the study's pinned commit decodes with
# HF `generate` on the merged adapter): 41.9 s a step at λ=0 (41.5 s in a regularized student's warm-up), 53.9 s a
# step at λ>0, 286 s a student's evaluation. The decoding loop since (bench/generate.py: rollouts 0.74×, evaluation
# 0.92× of `generate`) makes these an upper bound, which --hours corrects by the run's own finished cells. A step
# at λ=0 during warm-up costs what an unregularized one does (no anchor forward), so a cell's steps are priced by
# the λ each will have. Steps scale with the rollout budget (`[train] max_new_tokens`).
COST = {"smollm2-135m-instruct": (42.0, 54.0, 286.0), "tiny-random-llama": (0.1, 0.15, 2.0)}
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
class SuiteSpec:
    """One entry of a study's `suites`."""

    key: str  # its run folder and its name in the tables
    suite: str  # the suite whose verifiers judge it: a built-in name or a .jsonl file
    settings: dict  # training settings its cells add to the study's [train]
    folder: str  # the run folder it trains and answers in: its own key, or that of the suite it is re-scored from

    @property
    def task(self) -> str:
        """The suite its cells train and answer as (itself, or the one it differs from only in its verifiers)."""
        return trains_as(self.suite)


@dataclass
class Study:
    name: str
    model: str
    suites: list[str]  # the suite entries' keys, in the file's order
    specs: dict[str, SuiteSpec]
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
    calibration: dict | None = None  # the calibration whose chosen regime [train] starts from (study_file._calibration)
    role: str = "study"  # "calibration": its gate chooses a regime for main studies; "study": the gate is a report
    _examples: dict = field(default_factory=dict, repr=False, compare=False)
    _judged: dict = field(default_factory=dict, repr=False, compare=False)
    _tokenizer: Any = field(default=None, repr=False, compare=False)
    _records: dict = field(default_factory=dict, repr=False, compare=False)

    def cells(self) -> list["Cell"]:
        """Every (suite, seed, student) in the order they run: first the main students (those on every seed), suite
        by suite as the file lists them and seed by seed within a suite; then the settings on fewer seeds, those on
        the most seeds first, each group suite by suite and seed by seed. A study cut short thus loses the settings on
        the fewest seeds first (a one-seed anchor before a 3-seed λ's third seed), never a main student's seed."""
        main = [s for s in self.students if s.seeds is None]
        extra = [s for s in self.students if s.seeds is not None]
        out = [Cell(self, suite, seed, s) for suite in self.suites for seed in self.seeds for s in main]
        for n in sorted({len(s.seeds or ()) for s in extra}, reverse=True):
            group = [s for s in extra if len(s.seeds or ()) == n]
            out += [Cell(self, suite, seed, s) for suite in self.suites for seed in self.seeds for s in group
                    if seed in (s.seeds or ())]
        return out

    def trained_cells(self) -> list[int]:
        """The indices (into cells()) of the cells that train: one per student folder, the first cell naming it (a
        re-scored suite's cells share the folders of the suite they are re-scored from)."""
        first: dict[Path, int] = {}
        for i, c in enumerate(self.cells()):
            first.setdefault(c.out, i)
        return sorted(first.values())

    def run_dir(self, suite: str, seed: int) -> Path:
        """The run folder a suite entry's cells of one seed train and answer in."""
        return self.runs_dir / self.name / self.specs[suite].folder / f"seed-{seed}"

    def examples(self, suite: str, seed: int) -> list[Example]:
        """The test examples a suite entry is judged on (its own verifiers)."""
        key = (suite, seed)
        if key not in self._examples:
            task = load_task(self.specs[suite].suite, seed=seed, n_test=self.n_test)
            self._examples[key] = task.test[: self.eval.n] if self.eval.n else task.test
        return self._examples[key]

    def judged(self, suite: str, seed: int, ev: ModelEval, base: ModelEval | None = None) -> ModelEval:
        """`ev` as this suite entry's verifiers judge its answers (training.evaluate.rescored): the same numbers for
        the suite it was answered as, a re-scoring for one that differs only in its verifiers or whose verifier
        changed. Answers to other examples than the suite has now are an error, not a silent mismatch."""
        stamp = lambda model: (_stamp(model_eval_path(self.run_dir(suite, seed), model)),  # noqa: E731
                               _stamp(self.record_path(suite, seed, model)))
        memo = (suite, seed, ev.model, stamp(ev.model), stamp("base") if base is not None else None)
        if memo not in self._judged:
            out = rescored(ev, self.examples(suite, seed), self.decode, base)
            if out is None:
                raise UserError(f"{self.run_dir(suite, seed)}: the answers of {ev.model} were given to other examples than "
                                f"'{self.specs[suite].suite}' has now (its file changed?); delete that run folder to train anew")
            self._judged[memo] = out
        return self._judged[memo]

    def decode(self, ids) -> str:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.model)
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def base_evaluation(self, suite: str, seed: int) -> ModelEval | None:
        """The base model's evaluation with the study's settings, judged by the suite entry's verifiers: the run
        folder's, else its record's (training.study.records)."""
        ev = self.local_base(suite, seed) or self.recorded_base(suite, seed)
        return None if ev is None else self.judged(suite, seed, ev)

    def record_path(self, suite: str, seed: int, model: str) -> Path:
        """results/<study>/cells/<run folder>/seed-<s>/<model>.json.gz (training.study.records)."""
        return records.record_path(self.results_dir / self.name, self.specs[suite].folder, seed, model)

    def read_record(self, path: Path) -> dict | None:
        """records.read_record, read once per version of the file (its modification time and size): a study asks
        for each cell's record several times while it plans, runs and writes its results."""
        key = (path, _stamp(path))
        if key not in self._records:
            self._records[key] = records.read_record(path)
        return self._records[key]

    def recorded_base(self, suite: str, seed: int) -> ModelEval | None:
        """The base model's recorded evaluation for a suite entry and seed, when made with the study's settings."""
        record = self.read_record(self.record_path(suite, seed, "base"))
        if record is None or record["model"] != "base" or not records.same_eval(record["eval"], asdict(self.eval)):
            return None
        return record["eval"]

    def restore_base(self, suite: str, seed: int) -> bool:
        """Put a run folder's recorded base evaluation back into it (eval/base.json), so that a study resumed on a
        fresh machine does not answer the base model again: only into a run folder that exists, describes the same
        run as the record and has no base evaluation of its own. True when restored."""
        run_dir = self.run_dir(suite, seed)
        if not (run_dir / RUN_FILE).exists() or model_eval_path(run_dir, "base").exists():
            return False
        ev = self.recorded_base(suite, seed)
        record = self.read_record(self.record_path(suite, seed, "base")) if ev is not None else None
        if ev is None or record is None or record["run"] != records.run_description(run_dir):
            return False
        write_model_eval(run_dir, ev)
        return True

    def local_base(self, suite: str, seed: int) -> ModelEval | None:
        """The base model's evaluation in a suite entry's run folder with the study's settings, as stored."""
        ev = read_model_eval(self.run_dir(suite, seed), "base")
        if ev is None or {k: v for k, v in ev.settings.items() if k != "adapter"} != asdict(self.eval):
            return None
        return ev

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
    def spec(self) -> SuiteSpec:
        return self.study.specs[self.suite]

    @property
    def run_dir(self) -> Path:
        return self.study.run_dir(self.suite, self.seed)

    @property
    def out(self) -> Path:
        return self.run_dir / self.student.name

    def config(self) -> TrainConfig:
        s = self.study
        return TrainConfig(**{**s.train, **self.spec.settings, **self.student.settings, "task": self.spec.task, "seed": self.seed, "model": s.model,
                              "steps": s.steps, "out": str(self.out), "n_test": s.n_test})

    def trained_steps(self) -> int:
        """Steps the student has trained: its last checkpoint's or, saved without checkpoints, its train record's;
        with no adapter here, its cell record's (the study's steps when the record still describes the cell)."""
        found = checkpoints(self.out)
        if found:
            return int(found[-1].name.split("-")[-1])
        if (self.out / ADAPTER_WEIGHTS).exists() and (self.out / TRAIN_CONFIG_FILE).exists():
            return int(read_json(self.out / TRAIN_CONFIG_FILE, expect=dict).get("steps", 0))
        if self._from_record():
            return self.study.steps
        return 0

    def trained(self) -> bool:
        """Its adapter is whole (the weights are written last) and of the study's step count: a study whose
        `steps` was raised continues its cells from their last checkpoints. A cell whose run folder holds nothing of
        it is trained when its record says so (training.study.records)."""
        if (self.out / ADAPTER_WEIGHTS).exists():
            return self.trained_steps() == self.study.steps
        return self._from_record()

    def _from_record(self) -> bool:
        """No adapter and no checkpoint here, and a cell record that describes this cell as the study gives it now."""
        if (self.out / ADAPTER_WEIGHTS).exists() or checkpoints(self.out):
            return False
        return self.recorded_evaluation() is not None

    def record_path(self) -> Path:
        return self.study.record_path(self.suite, self.seed, self.student.name)

    def recorded_evaluation(self) -> ModelEval | None:
        """The cell's recorded evaluation when the record still describes it: trained for the study's steps with the
        settings the study gives the cell now, evaluated with the study's evaluation settings; else None (the cell
        then trains anew)."""
        record = self.study.read_record(self.record_path())
        if record is None or record["model"] != self.student.name:
            return None
        if record["config"].get("steps") != self.study.steps or config_conflict(record["config"], self.resolved_config()) is not None:
            return None  # trained for another step count (a study's steps raised: no checkpoint here to go on from)
        ev: ModelEval = record["eval"]
        return ev if records.same_eval(ev, asdict(self.study.eval)) else None

    def resolved_config(self) -> TrainConfig:
        """The cell's training settings with the placement resolved as training resolves it (left to the suite)."""
        cfg = self.config()
        if cfg.placement is None:
            cfg.resolve(load_task(self.spec.task, seed=self.seed, n_test=self.study.n_test).placement)
        return cfg

    def check(self) -> None:
        """A cell trained with other settings than the study's now are is refused, not silently reused."""
        record = self.out / TRAIN_CONFIG_FILE
        if not record.exists():
            self._check_record()
            return
        where = f"{self.study.source or 'the study'}: {self.label()} ({self.out})"
        conflict = config_conflict(read_json(record, expect=dict), self.resolved_config())
        if conflict:
            k, theirs, ours = conflict
            raise UserError(f"{where} was trained with {k}={theirs!r}, the study now says {k}={ours!r}; give the "
                            f"student another name, or delete that folder to train it anew")
        if (steps := self.trained_steps()) > self.study.steps:
            raise UserError(f"{where} has trained {steps} steps, more than the study's steps={self.study.steps}; "
                            f"raise 'steps', or delete that folder to train it anew")

    def _check_record(self) -> None:
        """A cell record made with other training settings than the study gives the cell now is refused, as a run
        folder's student is (check)."""
        saved = self.study.read_record(self.record_path())
        if saved is None or saved["model"] != self.student.name:
            return
        conflict = config_conflict(saved["config"], self.resolved_config())
        if conflict:
            k, theirs, ours = conflict
            raise UserError(f"{self.study.source or 'the study'}: {self.label()} is recorded in {self.record_path()} as trained "
                            f"with {k}={theirs!r}, the study now says {k}={ours!r}; give the student another name, or "
                            f"delete that record to train it anew")

    def evaluation(self):
        """The student's evaluation with the study's settings and of its current adapter (a ModelEval), judged by
        the suite entry's verifiers (Study.judged), or None."""
        ev = self._stored()
        if ev is None:
            return None
        base = self.study.base_evaluation(self.suite, self.seed)
        return self.study.judged(self.suite, self.seed, ev, base) if base is not None else None

    def local_evaluation(self):
        """The run folder's evaluation of this cell's current adapter with the study's settings, as stored (no record)."""
        if not (self.out / ADAPTER_WEIGHTS).exists() or not self.trained():
            return None
        ev = read_model_eval(self.run_dir, self.student.name)
        if ev is None or {k: v for k, v in ev.settings.items() if k != "adapter"} != asdict(self.study.eval):
            return None
        if ev.settings.get("adapter") != fingerprint(self.out):
            return None  # evaluated before the adapter changed (a study's steps raised): evaluate again
        return ev

    def _stored(self):
        """The run folder's evaluation, else (nothing of the cell here) its record's."""
        if (self.out / ADAPTER_WEIGHTS).exists() or checkpoints(self.out):
            return self.local_evaluation()
        return self.recorded_evaluation()

    def evaluated(self) -> bool:
        return self._stored() is not None

    def label(self) -> str:
        return f"{self.suite}/seed-{self.seed}/{self.student.name}"


def _stamp(path: Path) -> tuple[int, int] | None:
    """A file's version for a memo: its modification time and size (an evaluation is rewritten whole, atomically)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def suite_folder(name: str) -> str:
    """The run folder of a suite: a built-in suite's name, or a .jsonl file's stem; always a name (check_name)."""
    return check_name(Path(name).stem if name.endswith(".jsonl") else name, "suite")


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
        before = data.get("suite_settings") if isinstance(data.get("suite_settings"), dict) else {}
        now = suite_settings(study)
        differs += [f"suite '{k}'" for k in now if k in before and before[k] != now[k]]
        previous = {s.get("name"): s.get("settings") for s in data.get("students") or [] if isinstance(s, dict)}
        differs += [f"student '{s.name}'" for s in study.students if s.name in previous and previous[s.name] != s.settings]
        if differs:
            raise UserError(f"{folder} holds the results of another study of the same name (its {differs[0]} has other "
                            f"settings); choose another --results-dir or name, or delete that folder")
    return folder


def estimate(study: Study, cells: Sequence[Cell]) -> float:
    """Seconds the cells still need, from measured per-step and per-evaluation costs on 2 CPU cores: each step left
    at the cost of the λ it will train with (a warm-up step at λ=0 costs an unregularized one)."""
    unreg, reg, per_eval = COST.get(study.model, DEFAULT_COST)
    total = 0.0
    for c in cells:
        if not c.trained():
            cfg = c.config()
            scale = cfg.max_new_tokens / 96 * cfg.batch_size / 8 * cfg.grad_accum
            total += sum(reg if lam_at(s, cfg.lam, cfg.lam_warmup, cfg.ramp()) > 0 else unreg
                         for s in range(c.trained_steps(), study.steps)) * scale
        if not c.evaluated():
            total += per_eval
    return total


def plan(study: Study) -> str:
    check_cells(study)
    cells = study.cells()
    todo = [cells[i] for i in study.trained_cells() if not (cells[i].trained() and cells[i].evaluated())]
    lines = [f"study {study.name}: {len(study.suites)} suites × {len(study.seeds)} seeds, {len(study.students)} students, "
             f"{len(cells)} cells ({sum(c.trained() and c.evaluated() for c in cells)} done), {study.steps} steps each, model {study.model}"]
    for c in cells:
        steps = c.trained_steps()
        state = ("done" if c.evaluated() else "trained") if c.trained() else (f"{steps}/{study.steps}" if steps else "todo")
        state = "recorded" if state == "done" and c._from_record() else state
        settings = ", ".join(f"{k}={v}" for k, v in {**c.spec.settings, **c.student.settings}.items()) or "defaults"
        if c.spec.folder != c.suite:
            settings += f" (re-scored from {c.spec.folder}'s answers)"
        lines.append(f"  {state:>7}  {c.label():<40} {settings}")
    left = estimate(study, todo)
    source = COST_SOURCE if study.model in COST else "a guess for a model not measured here"
    lines.append(f"estimated time left: {format_hours(left)} of cell time; about {format_hours(left / 2)} with --jobs 2 on 2 CPU cores "
                 f"(rates {source}; bench/generate.py and the metrics' step_s give your machine's)")
    return "\n".join(lines)


def format_hours(seconds: float) -> str:
    h, m = divmod(int(seconds // 60), 60)
    return f"{h} h {m:02d} min" if h else f"{m} min"


def suite_settings(study: Study) -> dict:
    """Per suite entry: the suite that judges it, the one it trains and answers as, its own training settings, and
    the run folder its cells share (another entry's when it is that entry's re-scoring)."""
    return {k: {"suite": sp.suite, "trains_as": sp.task, "settings": sp.settings, "folder": sp.folder}
            for k, sp in study.specs.items()}
