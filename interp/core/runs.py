"""The run-folder format: its file names, typed records, readers and writers, what `python -m training` writes and
everything else reads (the CLI, the causal commands, the app, the notebooks).

A run folder (`runs/<name>/`):

    run.json                  RunInfo: task, model, seed, placement, n_test, the students' names
    <student>/                the peft adapter (adapter_config.json, adapter_model.safetensors, base_model.json),
                              train_config.json, metrics.jsonl, checkpoints/
    eval/<model>.json         one model's evaluation: settings, scores, intervals and its ExampleRows
    eval.json                 every model's scores and intervals (the table)
    eval_examples.jsonl       one ExampleRow per (model, example), with the generated token ids
    eval_examples.csv         the same rows for people (text, verdicts, lengths; no ids)
    layers/<model>/           interp's LayerDivergence of that model (divergence.json, arrays.safetensors; read and
                              written by interp.divergence)
    causal/<student>/         the causal commands' results (interp.causal.artifacts)

Field meanings and formulas: docs/measures.md.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from interp.core.errors import UserError
from interp.core.pairs import make_pairs
from interp.core.store import (NAME_PATTERN, NAME_RULE, append_jsonl, atomic_write_json, atomic_write_text,
                               check_member_name, dumps_strict, jsonl_records, read_json, read_jsonl, read_text_file,
                               update_json)
from interp.core.typed import check_fields
from interp.core.verifiers import verify

RUN_FILE = "run.json"
EVAL_FILE = "eval.json"
EXAMPLES_FILE = "eval_examples.csv"
EXAMPLES_JSONL = "eval_examples.jsonl"
EVAL_DIR = "eval"
LAYERS_DIR = "layers"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Beside adapter_config.json: which base model an adapter was trained on, with a fingerprint of its weights.
BASE_MODEL_FILE = "base_model.json"
METRICS_FILE = "metrics.jsonl"
TRAIN_CONFIG_FILE = "train_config.json"
# A LayerDivergence folder (layers/<model>/, or any folder `python -m interp analyze --out` wrote).
LAYERS_META_FILE = "divergence.json"
LAYERS_ARRAYS_FILE = "arrays.safetensors"
# The evaluation table's columns (docs/measures.md#evaluation). Rates carry a 95% bootstrap interval.
EVAL_METRICS = ("acc_noctx", "acc_ctx", "harm", "help", "len_ratio", "ctx_drop", "degenerate_noctx", "degenerate_ctx",
                "truncated_noctx", "truncated_ctx", "follow_cf", "drift")
# The short table a terminal shows.
EVAL_TABLE = ("acc_noctx", "acc_ctx", "harm", "ctx_drop", "degenerate_ctx", "truncated_ctx", "len_ratio", "follow_cf", "drift")
# Models that are not students: always listed first.
BASE = "base"
REFERENCE_MODELS = (BASE, "teacher")
# The causal commands' results: causal/<student>/ (interp.causal.artifacts).
CAUSAL_DIR = "causal"
# Names a student cannot take: the reference models and the run folder's own members.
RESERVED_NAMES = (*REFERENCE_MODELS, EVAL_DIR, LAYERS_DIR, CAUSAL_DIR)


def default_runs_dir() -> Path:
    """$LAYERS_RUNS_DIR, else ./runs."""
    return Path(os.environ.get("LAYERS_RUNS_DIR") or "runs")


@dataclass
class RunSummary:
    """What the run picker shows; `error` is set (and the rest may be empty) when the run folder is damaged."""

    name: str
    path: Path
    task: str = ""
    model: str = ""
    students: list[str] = field(default_factory=list)
    has_eval: bool = False
    has_examples: bool = False
    layer_models: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def label(self) -> str:
        if self.error:
            return f"{self.name} (error)"
        return f"{self.name} ({self.task})" if self.task else self.name


def is_run(path: Path) -> bool:
    return (path / RUN_FILE).exists()


def is_layers_folder(path: Path) -> bool:
    """A bare LayerDivergence folder (what `python -m interp analyze` writes), not a run."""
    return (path / LAYERS_META_FILE).exists()


def list_runs(root: str | os.PathLike) -> list[RunSummary]:
    """Every run folder directly under `root`, sorted by name; a damaged one carries its error instead of raising."""
    root = Path(root)
    if not root.is_dir():
        return []
    return [summarize(p) for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".") and is_run(p)]


def summarize(path: str | os.PathLike) -> RunSummary:
    path = Path(path)
    summary = RunSummary(name=path.name, path=path)
    try:
        info = load_run_info(path)
        summary.task, summary.model = str(info.get("task", "")), str(info.get("model", ""))
        summary.students = [str(s) for s in info.get("students", [])]
        summary.has_eval = (path / EVAL_FILE).exists()
        summary.has_examples = (path / EXAMPLES_JSONL).exists()
        summary.layer_models = layer_models(path)
    except UserError as err:
        summary.error = str(err)
    return summary


def load_run_info(path: str | os.PathLike) -> dict:
    """run.json: task, model, seed, placement and the students' names."""
    path = Path(path)
    info = read_json(path / RUN_FILE)
    if not isinstance(info, dict):
        raise UserError(f"{path / RUN_FILE} is damaged: expected a JSON object, found {type(info).__name__}")
    students = info.get("students", [])
    if not isinstance(students, list):
        raise UserError(f"{path / RUN_FILE} is damaged: 'students' should be a list of names")
    for name in students:  # a name like "../../etc" would send every reader outside the run folder
        check_member_name(name, path / RUN_FILE)
    return info


def load_eval(path: str | os.PathLike) -> dict | None:
    """eval.json, or None while the run has not been evaluated yet."""
    file = Path(path) / EVAL_FILE
    if not file.exists():
        return None
    data = read_json(file)
    if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
        raise UserError(f"{file} is damaged: expected an object with a 'models' mapping")
    return data


def model_order(names) -> list[str]:
    """base, teacher, then the students in their given order."""
    names = list(dict.fromkeys(names))
    return [n for n in REFERENCE_MODELS if n in names] + [n for n in names if n not in REFERENCE_MODELS]


def layer_models(path: str | os.PathLike) -> list[str]:
    """Names of the models that have layer results in `path/layers/`, base first."""
    path = Path(path)
    folder = path / LAYERS_DIR
    if not folder.is_dir():
        return []
    # Dot folders are atomic writes in progress (or set aside): not results.
    found = {p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".") and is_layers_folder(p)}
    # The students in run.json's order (unreg before reg), then anything else found.
    students = [str(s) for s in load_run_info(path).get("students", [])] if is_run(path) else []
    return model_order([*(s for s in students if s in found), *sorted(found)])


def load_metrics(path: str | os.PathLike, student: str) -> list[dict]:
    """A student's training curve (metrics.jsonl, one object per step); empty when it has none yet.
    A half-written last line (training still running) is skipped; damage elsewhere is an error."""
    file = Path(path) / student / METRICS_FILE
    if not file.exists():
        return []
    try:
        return read_jsonl(file, partial_ok=True, allow_empty=True)
    except UserError as err:
        raise UserError(f"{err}; the training curve of '{student}' is damaged") from None


def load_all_metrics(path: str | os.PathLike) -> dict[str, list[dict]]:
    path = Path(path)
    info = load_run_info(path) if is_run(path) else {}
    return {s: m for s in info.get("students", []) if (m := load_metrics(path, s))}


def run_settings(path: str | os.PathLike) -> dict:
    """The settings a run used: run.json, and each student's train_config.json where present."""
    path = Path(path)
    if not is_run(path):
        return {}
    info = load_run_info(path)
    students = {}
    for s in info.get("students", []):
        config = path / s / TRAIN_CONFIG_FILE
        if config.exists():
            students[s] = read_json(config)
    return {"run": info, "students": students}


def adapter_folders(path: str | os.PathLike) -> dict[str, Path]:
    """The students' LoRA adapter folders of a run, by name (only those that exist)."""
    path = Path(path)
    info = load_run_info(path)
    return {s: path / s for s in info.get("students", []) if (path / s / ADAPTER_CONFIG).exists()}


def signature(path: str | os.PathLike) -> tuple:
    """Modification times of a run's files, so that caches keyed on it refresh while a run is still being written."""
    path = Path(path)
    items = []
    for p in [path, *(path / n for n in (RUN_FILE, EVAL_FILE, EXAMPLES_JSONL, LAYERS_META_FILE))]:
        if p.exists():
            items.append((p.name, p.stat().st_mtime_ns))
    layers = path / LAYERS_DIR
    if layers.is_dir():
        for p in sorted(layers.iterdir()):
            items.append((f"layers/{p.name}", p.stat().st_mtime_ns))
    return tuple(items)


# ---------- typed records: written by training, read by interp, the app and the tests ----------


@dataclass
class RunInfo:
    """run.json: enough to rebuild the task split and the model, and the students' names in training order."""

    task: str
    model: str
    seed: int
    placement: str
    n_test: int = 40
    students: list[str] = field(default_factory=list)
    no_context: str = "default"  # interp.core.pairs.NO_CONTEXT: what the model sees without the context

    def __post_init__(self):
        if not isinstance(self.students, list) or not all(isinstance(s, str) for s in self.students):
            raise UserError("run.json is damaged: 'students' should be a list of names")
        for s in self.students:
            check_student_name(s)

    def same_run(self, other: "RunInfo") -> str | None:
        """The first setting on which two run descriptions disagree (they then cannot share a folder), else None."""
        for key in ("task", "model", "seed", "placement", "n_test", "no_context"):
            if getattr(self, key) != getattr(other, key):
                return key
        return None


def check_student_name(name: str) -> str:
    """A student is a folder directly inside the run: THE name rule (interp.core.store.check_name: no path, no dots, which
    torch module names cannot hold), and not a reference model's or a run member's name."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or name in RESERVED_NAMES:
        shown = repr(name[:64]) if isinstance(name, str) else type(name).__name__
        raise UserError(f"{shown} is not a valid student name: use {NAME_RULE}, not one of {', '.join(RESERVED_NAMES)}")
    return name


def read_run(run_dir: str | os.PathLike) -> RunInfo:
    run_dir = Path(run_dir)
    if not (run_dir / RUN_FILE).exists():
        raise UserError(f"{run_dir} is not a run folder (no {RUN_FILE}); create one with `python -m training train` or `pair`")
    data = load_run_info(run_dir)
    missing = [k for k in ("task", "model", "seed") if k not in data]
    if missing:
        raise UserError(f"{run_dir / RUN_FILE} lacks '{missing[0]}'; rerun `python -m training train` to rewrite it")
    known = {f.name for f in fields(RunInfo)}
    try:
        return RunInfo(**{k: v for k, v in data.items() if k in known and v is not None} | {"placement": data.get("placement") or "system"})
    except TypeError as err:
        raise UserError(f"{run_dir / RUN_FILE} is damaged ({err})") from err


def write_run(run_dir: str | os.PathLike, info: RunInfo) -> None:
    atomic_write_json(Path(run_dir) / RUN_FILE, asdict(info))


def add_student(run_dir: str | os.PathLike, info: RunInfo, student: str) -> RunInfo:
    """Create run.json or check that this student belongs to the run it describes, and list the student."""
    run_dir = Path(run_dir)
    check_student_name(student)
    if (run_dir / RUN_FILE).exists():  # checked before the locked update: a mismatch writes nothing
        current = read_run(run_dir)
        key = current.same_run(info)
        if key:
            raise UserError(
                f"{run_dir / RUN_FILE} is a run of {key}={getattr(current, key)!r}, but this student uses "
                f"{key}={getattr(info, key)!r}; put it in another run folder"
            )
        if student in current.students:  # already listed: run.json is left as it is (a failed resume changes nothing)
            return current

    def listed(current: dict | None) -> dict:
        # Students of one run trained at once (a study's parallel cells) add themselves under run.json's lock.
        run = RunInfo(**{**asdict(info), "students": []}) if current is None else RunInfo(**{**asdict(info), "students": list(current.get("students", []))})
        if student not in run.students:
            run.students.append(student)
        return asdict(run)

    return RunInfo(**update_json(run_dir / RUN_FILE, listed))


def student_dir(run_dir: str | os.PathLike, student: str) -> Path:
    return Path(run_dir) / check_student_name(student)


def adapter_dir(run_dir: str | os.PathLike, student: str) -> Path:
    """The student's adapter folder; an error when the student has not finished training."""
    folder = student_dir(run_dir, student)
    if not (folder / ADAPTER_CONFIG).exists() or not (folder / ADAPTER_WEIGHTS).exists():  # the weights are written last
        raise UserError(f"student '{student}' of {run_dir} has no adapter yet (training unfinished); "
                        f"finish it with `python -m training train --out {folder} --resume`")
    return folder


@dataclass
class ExampleRow:
    """One model's answers to one test example, without the context, with it and with the counterfactual context.

    `ids_*` are the generated token ids (the stop token excluded): the layer analysis measures exactly these.
    Verdicts follow the example's verifier, and a degenerate (looping) answer is wrong unless the evaluation
    allowed it.
    """

    model: str
    example: int
    context: str
    prompt: str
    reference: str
    verifier: str
    response_noctx: str
    response_ctx: str
    ids_noctx: list[int]
    ids_ctx: list[int]
    correct_noctx: bool
    correct_ctx: bool
    degenerate_noctx: bool
    degenerate_ctx: bool
    truncated_noctx: bool
    truncated_ctx: bool
    cf_context: str | None = None
    cf_reference: str | None = None
    response_cf: str | None = None
    ids_cf: list[int] | None = None
    follow_cf: bool | None = None
    degenerate_cf: bool | None = None
    stubborn_cf: bool | None = None  # under the counterfactual context, a clean answer that still gives the trained answer
    # Verdicts of the same answers cut at each budget (str(tokens) -> {verdict name: value}): greedy answers at a
    # shorter budget are prefixes of these (docs/measures.md#budgets). The fields above are at the full budget.
    budgets: dict[str, dict] | None = None

    @property
    def flipped(self) -> bool:
        """Right without the context, wrong with it."""
        return self.correct_noctx and not self.correct_ctx

    def csv_row(self) -> dict:
        row = {k: v for k, v in asdict(self).items() if not k.startswith("ids_")}
        row.update(len_noctx=len(self.ids_noctx), len_ctx=len(self.ids_ctx), flipped=self.flipped)
        return {k: (int(v) if isinstance(v, bool) else ("" if v is None else v)) for k, v in row.items()}

    @classmethod
    def from_json(cls, data: dict, where: str) -> "ExampleRow":
        """A row read back, every field of its declared type (a verdict is true or false, never the string "no")."""
        if not isinstance(data, dict):
            raise UserError(f"{where}: expected a JSON object")
        known = {f.name for f in fields(cls)}
        try:
            row = cls(**check_fields(cls, {k: v for k, v in data.items() if k in known}, where))
        except TypeError as err:
            raise UserError(f"{where} is damaged ({err}); rerun `python -m training eval`") from err
        except UserError as err:
            raise UserError(f"{err}; rerun `python -m training eval`") from None
        for name in ("ids_noctx", "ids_ctx", "ids_cf"):
            ids = getattr(row, name)
            if name == "ids_cf" and ids is None:
                continue
            if not isinstance(ids, list) or not all(isinstance(i, int) and i >= 0 for i in ids):
                raise UserError(f"{where}: '{name}' must be a list of token ids (non-negative integers)")
        return row


CSV_FIELDS = [f.name for f in fields(ExampleRow) if not f.name.startswith("ids_")] + ["len_noctx", "len_ctx", "flipped"]


def write_examples(run_dir: str | os.PathLike, rows: list[ExampleRow]) -> None:
    """eval_examples.jsonl (with token ids) and eval_examples.csv (for people), each replaced in one rename."""
    run_dir = Path(run_dir)
    atomic_write_text(run_dir / EXAMPLES_JSONL, "".join(dumps_strict(asdict(r)) + "\n" for r in rows))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS)
    writer.writeheader()
    writer.writerows(r.csv_row() for r in rows)
    atomic_write_text(run_dir / EXAMPLES_FILE, buf.getvalue())


def read_examples(run_dir: str | os.PathLike) -> list[ExampleRow] | None:
    """Every ExampleRow of a run's evaluation (None before the run is evaluated)."""
    file = Path(run_dir) / EXAMPLES_JSONL
    if not file.exists() and not file.is_symlink():
        return None
    try:
        records = jsonl_records(read_text_file(file, "JSONL file"), file)
    except UserError as err:
        raise UserError(f"{err}; rerun `python -m training eval`") from None
    rows: list[ExampleRow] = []
    while True:  # each row is checked before the next line is read
        try:
            item = next(records, None)
        except UserError as err:
            raise UserError(f"{err}; rerun `python -m training eval`") from None
        if item is None:
            return rows
        rows.append(ExampleRow.from_json(item[1], f"{file}, line {item[0]}"))


@dataclass
class ModelEval:
    """One model's evaluation (eval/<model>.json): the settings it was made with, its scores and intervals, its rows."""

    model: str
    settings: dict
    scores: dict
    intervals: dict
    rows: list[ExampleRow]

    def to_json(self) -> dict:
        return {"model": self.model, "settings": self.settings, "scores": self.scores, "intervals": self.intervals,
                "rows": [asdict(r) for r in self.rows]}


def model_eval_path(run_dir: str | os.PathLike, model: str) -> Path:
    return Path(run_dir) / EVAL_DIR / f"{model}.json"


def write_model_eval(run_dir: str | os.PathLike, ev: ModelEval) -> None:
    atomic_write_json(model_eval_path(run_dir, ev.model), ev.to_json())


def read_model_eval(run_dir: str | os.PathLike, model: str) -> ModelEval | None:
    path = model_eval_path(run_dir, model)
    if not path.exists():
        return None
    return model_eval_from_json(read_json(path), model, path, "delete it and rerun `python -m training eval`")


def model_eval_from_json(data, model: str, where, fix: str) -> ModelEval:
    """A ModelEval from what ModelEval.to_json wrote; anything else is a one-line error naming `where` and `fix`."""
    if not isinstance(data, dict) or not all(k in data for k in ("settings", "scores", "intervals", "rows")):
        raise UserError(f"{where} is damaged; {fix}")
    if not isinstance(data["rows"], list) or not isinstance(data["settings"], dict) or not isinstance(data["scores"], dict):
        raise UserError(f"{where} is damaged; {fix}")
    rows = [ExampleRow.from_json(r, f"{where}, row {i}") for i, r in enumerate(data["rows"])]
    return ModelEval(model, data["settings"], data["scores"], data["intervals"], rows)


def append_metrics(student_dir: str | os.PathLike, row: dict) -> None:
    """Add one training step's record to the student's metrics.jsonl (strict JSON, one line, see load_metrics)."""
    append_jsonl(Path(student_dir) / METRICS_FILE, row)


# ---------- a run read for the causal commands, the app and the notebooks: the tokens each model generated ----------

def read_info(run_dir: str | os.PathLike) -> dict:
    """task, model, seed, placement, n_test, students."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a folder; pass a run folder written by `python -m training pair`")
    info = read_run(run_dir)
    return {k: getattr(info, k, None) for k in ("task", "model", "seed", "placement", "n_test", "students")}


def has_adapter_config(run_dir: str | os.PathLike, student: str) -> bool:
    return (student_dir(run_dir, student) / ADAPTER_CONFIG).exists()


def check_student(run_dir: str | os.PathLike, student: str) -> None:
    """A student the run has (with an adapter folder), or `base`; else a one-line error before anything loads."""
    if student == BASE:
        return
    info = read_info(run_dir)
    if student not in info["students"] or not has_adapter_config(run_dir, student):
        have = [s for s in info["students"] if has_adapter_config(run_dir, s)]
        raise UserError(f"{run_dir} has no student named '{student}'; it has: {', '.join(have) or 'none'}")


def evaluated_rows(run_dir: str | os.PathLike) -> list[ExampleRow]:
    """Every (model, example) row of the run's evaluation; an error before the run is evaluated."""
    run_dir = Path(run_dir)
    examples = read_examples(run_dir)
    if examples is None:
        raise UserError(f"{run_dir} has no evaluation yet; run `python -m training eval {run_dir}` first")
    return examples


def model_rows(run_dir: str | os.PathLike, model: str, max_examples: int | None = None) -> list[ExampleRow]:
    """The rows of one model (`base` or a student), in example order."""
    rows = sorted((r for r in evaluated_rows(run_dir) if r.model == model), key=lambda r: r.example)
    if not rows:
        raise UserError(f"{run_dir} has no evaluated examples for '{model}'; run `python -m training eval {run_dir}`")
    if max_examples is not None:
        if max_examples < 1:
            raise UserError("--max-examples must be at least 1")
        rows = rows[:max_examples]
    return rows


def response_ids(tokenizer, row: ExampleRow, which: str) -> list[int]:
    """The generated ids of one answer (an empty answer is its stop token)."""
    ids = row.ids_ctx if which == "ctx" else row.ids_noctx
    return list(ids) or [tokenizer.eos_token_id]


def load_run_pairs(lm, run_dir: str | os.PathLike, model: str, response: str = "noctx", max_examples: int | None = None):
    """Aligned pairs of a run's test examples, on the answers `model` gave without (`response="noctx"`) or with
    the context; returns (pairs, rows)."""
    if response not in ("noctx", "ctx"):
        raise UserError(f"unknown response '{response}'; use noctx or ctx")
    info = read_info(run_dir)
    rows = model_rows(run_dir, model, max_examples)
    records = [{"context": r.context, "prompt": r.prompt, "response_ids": response_ids(lm.tokenizer, r, response)}
               for r in rows]
    pairs = make_pairs(lm.tokenizer, records, placement=info["placement"] or "system", no_context=info.get("no_context") or "default")
    return pairs, rows


def is_degenerate(row: ExampleRow, which: str) -> bool:
    """The run's own verdict on the answer with (`ctx`) or without (`noctx`) the context."""
    return bool(row.degenerate_ctx if which == "ctx" else row.degenerate_noctx)


def verifier_for(rows: list[ExampleRow]) -> Callable[[str, object], bool]:
    """The run's verifiers as `verifier(response, record)`: each example's own kind, as the run stored it."""
    kinds = {r.example: r.verifier for r in rows}

    def verifier(response: str, record) -> bool:
        get: Callable[[str], Any] = record.get if isinstance(record, dict) else (lambda k: getattr(record, k, None))
        kind = get("verifier") or kinds[get("example")]
        return verify(kind, response, get("reference"))

    return verifier
