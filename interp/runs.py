"""THE run-folder format: what `python -m training` writes and everything else reads (typed records, one place).

A run folder (`runs/<name>/`):

    run.json                  RunInfo: task, model, seed, placement, n_test, the students' names
    <student>/                the peft adapter, train_config.json, metrics.jsonl, checkpoints/
    eval/<model>.json         one model's evaluation: settings, scores, intervals and its ExampleRows
    eval.json                 every model's scores and intervals (the table)
    eval_examples.jsonl       one ExampleRow per (model, example), with the generated token ids
    eval_examples.csv         the same rows for people (text, verdicts, lengths; no ids)
    layers/<model>/           interp's LayerDivergence of that model

Field meanings and formulas: docs/measures.md.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from interp.errors import UserError
from interp.store import (META_FILE, NAME_PATTERN, NAME_RULE, atomic_write_json, atomic_write_text, check_member_name,
                          dumps_strict, load_divergence, read_json, read_jsonl, read_text_file, restore_nonfinite,
                          update_json)

RUN_FILE = "run.json"
EVAL_FILE = "eval.json"
EXAMPLES_FILE = "eval_examples.csv"
EXAMPLES_JSONL = "eval_examples.jsonl"
EVAL_DIR = "eval"
LAYERS_DIR = "layers"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
METRICS_FILE = "metrics.jsonl"
TRAIN_CONFIG_FILE = "train_config.json"
# The evaluation table's columns (docs/measures.md#evaluation). Rates carry a 95% bootstrap interval.
EVAL_METRICS = ("acc_noctx", "acc_ctx", "harm", "help", "len_ratio", "ctx_drop", "degenerate_noctx", "degenerate_ctx",
                "truncated_noctx", "truncated_ctx", "follow_cf", "drift")
# The short table a terminal shows.
EVAL_TABLE = ("acc_noctx", "acc_ctx", "harm", "ctx_drop", "degenerate_ctx", "truncated_ctx", "len_ratio", "follow_cf", "drift")
# Models that are not students: always listed first.
REFERENCE_MODELS = ("base", "teacher")
# Names a student cannot take: the reference models and the run folder's own members.
RESERVED_NAMES = (*REFERENCE_MODELS, EVAL_DIR, LAYERS_DIR, "causal")


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
    return (path / META_FILE).exists()


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


def eval_rows(evaluation: dict | None) -> list[dict]:
    """One row per model: model, the EVAL_METRICS (None where absent) and n."""
    if not evaluation:
        return []
    models = evaluation["models"]
    rows = []
    for name in model_order(models):
        values = models[name] if isinstance(models[name], dict) else {}
        rows.append({"model": name, **{k: values.get(k) for k in EVAL_METRICS}, "n": values.get("n")})
    return rows


def load_examples(path: str | os.PathLike) -> list[dict] | None:
    """The evaluation's ExampleRows as plain dicts (with `flipped`), None before the run is evaluated."""
    rows = read_examples(path)
    if rows is None:
        return None
    return [{**asdict(r), "flipped": r.flipped} for r in rows]


def example_table(rows: list[dict] | None) -> list[dict]:
    """One row per example: its text, and per model `<model>:noctx`, `<model>:ctx` (correctness) and whether it
    flipped (right without the context, wrong with it); `flipped_any` says whether any model flipped on it."""
    if not rows:
        return []
    table: dict[str, dict] = {}
    for row in rows:
        key = str(row["example"])
        entry = table.setdefault(key, {"example": key, "context": row.get("context", ""), "prompt": row.get("prompt", ""),
                                       "reference": row.get("reference", ""), "flipped_any": False, "flipped_models": []})
        m = str(row["model"])
        entry[f"{m}:noctx"] = bool(row["correct_noctx"])
        entry[f"{m}:ctx"] = bool(row["correct_ctx"])
        if bool(row.get("flipped")):
            entry["flipped_any"] = True
            entry["flipped_models"].append(m)
    return list(table.values())


def example_responses(rows: list[dict] | None, example: str) -> list[dict]:
    """What each model answered on one example, without and with the context, and whether it was right."""
    out = [{"model": str(r["model"]), "correct_noctx": bool(r["correct_noctx"]), "response_noctx": r.get("response_noctx", ""),
            "correct_ctx": bool(r["correct_ctx"]), "response_ctx": r.get("response_ctx", "")}
           for r in rows or [] if str(r["example"]) == str(example)]
    order = model_order(r["model"] for r in out)
    return sorted(out, key=lambda r: order.index(r["model"]))


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


def load_layers(path: str | os.PathLike, model: str):
    """The LayerDivergence of one model of a run (base or a student)."""
    return load_divergence(Path(path) / LAYERS_DIR / model)


def load_all_layers(path: str | os.PathLike) -> dict:
    """Every model's LayerDivergence of a run, by model name; a bare layers folder counts as one model."""
    path = Path(path)
    if is_layers_folder(path) and not is_run(path):
        div = load_divergence(path)
        return {str(div.meta.get("model_name") or div.meta.get("adapter") or path.name): div}
    return {m: load_layers(path, m) for m in layer_models(path)}


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
    return {s: path / s for s in info.get("students", []) if (path / s / "adapter_config.json").exists()}


def match_example(div, context: str, prompt: str, example=None) -> int | None:
    """Index into `div.examples` of the example with this context and prompt; else, when `example` is an index
    within range, that index; else None."""
    for i, ex in enumerate(div.examples):
        if ex.get("context") == context and ex.get("prompt") == prompt:
            return i
    if isinstance(example, int) or (isinstance(example, str) and example.isdigit()):
        i = int(example)
        if 0 <= i < len(div.examples):
            return i
    return None


def signature(path: str | os.PathLike) -> tuple:
    """Modification times of a run's files, so that caches keyed on it refresh while a run is still being written."""
    path = Path(path)
    items = []
    for p in [path, *(path / n for n in (RUN_FILE, EVAL_FILE, EXAMPLES_JSONL, META_FILE))]:
        if p.exists():
            items.append((p.name, p.stat().st_mtime_ns))
    layers = path / LAYERS_DIR
    if layers.is_dir():
        for p in sorted(layers.iterdir()):
            items.append((f"layers/{p.name}", p.stat().st_mtime_ns))
    return tuple(items)


@functools.lru_cache(maxsize=8)
def _decode_fn(spec: str):
    """Token id -> text for a model spec, from its tokenizer.json through the `tokenizers` library: a fraction of a
    second, where loading transformers' tokenizer takes seconds. Falls back to transformers; None if neither works."""
    from interp.models import BUILTIN_SPECS, embedded_model_dir

    # Only tokenizers at hand: a hub id would reach for the network, and ids are an acceptable fallback.
    if not spec or (spec not in BUILTIN_SPECS and not Path(spec).is_dir()):
        return None
    try:
        folder = embedded_model_dir() if spec in BUILTIN_SPECS else Path(spec)
        if (folder / "tokenizer.json").exists():
            from tokenizers import Tokenizer

            fast = Tokenizer.from_file(str(folder / "tokenizer.json"))
            return lambda i: fast.decode([int(i)], skip_special_tokens=False)
        from interp.models import load_tokenizer

        slow = load_tokenizer(spec)
        return lambda i: slow.decode([int(i)])
    except Exception:  # noqa: BLE001 - a missing tokenizer only costs readable token text
        return None


def token_decoder_for(spec: str):
    """A function from token id to text for a model spec, or None when its tokenizer is not available locally
    (figures then show ids)."""
    return _decode_fn(str(spec or ""))


def token_decoder(div):
    """token_decoder_for the model a LayerDivergence came from."""
    return token_decoder_for(str(div.meta.get("model") or ""))


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
    no_context: str = "default"  # interp.pairs.NO_CONTEXT: what the model sees without the context

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
    """A student is a folder directly inside the run: THE name rule (interp.store.check_name: no path, no dots, which
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
        from interp.typed import check_fields

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
        text = read_text_file(file, "JSONL file")
    except UserError as err:
        raise UserError(f"{err}; rerun `python -m training eval`") from None
    rows = []
    for i, line in enumerate(text.split("\n"), 1):  # "\n" only: JSON strings may hold U+2028 raw
        if not line.strip():
            continue
        try:
            data = restore_nonfinite(json.loads(line))
        except (ValueError, RecursionError) as err:
            detail = err.msg if isinstance(err, json.JSONDecodeError) else "nested too deeply or too large"
            raise UserError(f"{file}, line {i}: not valid JSON ({detail}); rerun `python -m training eval`") from None
        rows.append(ExampleRow.from_json(data, f"{file}, line {i}"))
    return rows


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
    data = read_json(path)
    if not isinstance(data, dict) or not all(k in data for k in ("settings", "scores", "intervals", "rows")):
        raise UserError(f"{path} is damaged; delete it and rerun `python -m training eval`")
    if not isinstance(data["rows"], list) or not isinstance(data["settings"], dict) or not isinstance(data["scores"], dict):
        raise UserError(f"{path} is damaged; delete it and rerun `python -m training eval`")
    rows = [ExampleRow.from_json(r, f"{path}, row {i}") for i, r in enumerate(data["rows"])]
    return ModelEval(model, data["settings"], data["scores"], data["intervals"], rows)


# ---------- study results (results/<study>/, written by `python -m training study`) ----------

STUDY_FILE = "study.json"
STUDY_COLUMNS = ("acc_noctx", "acc_ctx", "harm", "degenerate_ctx", "follow_cf", "ctx_drop", "truncated_ctx", "len_ratio", "drift")


def is_study(path: str | os.PathLike) -> bool:
    return (Path(path) / STUDY_FILE).exists()


def read_study(path: str | os.PathLike) -> dict:
    """study.json of a results folder: cells, references, the per-suite summary over seeds and paired tests. Every
    summary row is checked (names are text, each statistic a number or null), so that a reader never formats a
    string as a number."""
    file = Path(path) / STUDY_FILE
    data = read_json(file)
    if not isinstance(data, dict) or not isinstance(data.get("summary"), list) or not isinstance(data.get("cells"), list):
        raise UserError(f"{file} is damaged: expected an object with 'summary' and 'cells' lists; rerun the study to rewrite it")
    for i, row in enumerate(data["summary"]):
        problem = _summary_problem(row)
        if problem:
            raise UserError(f"{file} is damaged: summary[{i}] {problem}; rerun the study to rewrite it")
    return data


def _ci_text(stat, signed: bool = False) -> str:
    if not isinstance(stat, dict) or stat.get("value") is None:
        return "–"
    v = stat["value"]
    if isinstance(v, float) and math.isnan(v):
        return "NaN"
    ci = stat.get("ci")
    text = f"{v:+.2f}" if signed else f"{v:.2f}"
    return text + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if isinstance(ci, list) and len(ci) == 2 else "")


STUDY_ROWS_FILE = "rows.jsonl.gz"  # results/<study>/: every evaluated answer of the study, to recompute every number


def write_study_rows(path: str | os.PathLike, records: list[dict]) -> None:
    """Per-example rows of a study, gzip-compressed JSONL (one ExampleRow per line plus `suite` and `seed`), written
    atomically and byte-reproducibly (no time stamp in the gzip header)."""
    import gzip

    from interp.store import atomic_write_bytes

    text = "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in records)
    atomic_write_bytes(path, gzip.compress(text.encode("utf-8"), compresslevel=9, mtime=0))


def read_study_rows(path: str | os.PathLike) -> list[tuple[str, int, ExampleRow]]:
    """The rows `write_study_rows` wrote, as (suite, seed, ExampleRow); a damaged file is a one-line error."""
    import gzip

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist or is not a file; a study writes it beside study.json")
    try:
        text = gzip.decompress(path.read_bytes()).decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not a gzip-compressed UTF-8 JSONL file ({err}); run the study again to rewrite it") from None
    out = []
    for i, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            raise UserError(f"{path}, line {i}: not valid JSON") from None
        if not isinstance(record, dict) or not isinstance(record.get("suite"), str) or not isinstance(record.get("seed"), int):
            raise UserError(f"{path}, line {i}: expected an object with suite, seed and the row's fields")
        suite, seed = record.pop("suite"), record.pop("seed")
        out.append((suite, seed, ExampleRow.from_json(record, f"{path}, line {i}")))
    return out


def study_setting_rows(data: dict, budget: int | None = None) -> list[dict]:
    """One row per suite and setting at one budget (the full one by default), the seed the unit: health, accuracy,
    pooled harm k/n, the card's own effect, the counterfactual measures; each a mean over seeds [95% interval]."""
    budgets = data.get("budgets") or []
    budget = budget or (budgets[-1] if budgets else None)
    rows = []
    for r in data.get("settings", []):
        if r.get("budget") != budget:
            continue
        ce, health, harm = r.get("card_effect") or {}, r.get("health") or {}, r.get("harm") or {}
        rows.append({
            "suite": r.get("suite"), "setting": r.get("model"), "λ": r.get("lam"), "seeds": len(r.get("seeds", [])),
            "budget": budget,
            "health": "(reference)" if not health else f"{health.get('verdict')} ({_ci_text(health.get('loops'), True)})",
            "acc_noctx": _ci_text(r.get("acc_noctx")), "acc_ctx": _ci_text(r.get("acc_ctx")),
            "harm (k/n)": f"{harm['pooled']:.2f} ({harm['k']}/{harm['n']})" if harm.get("n") else "–",
            "card effect: loops": _ci_text(ce.get("loops"), True), "card effect: acc": _ci_text(ce.get("acc"), True),
            "card effect: length": _ci_text(ce.get("len"), True),
            "follow_cf clean": _ci_text(r.get("follow_cf_clean")), "stubborn_cf": _ci_text(r.get("stubborn_cf")),
        })
    return rows


def _number(x) -> bool:
    return x is None or (type(x) in (int, float))


def _summary_problem(row) -> str | None:
    if not isinstance(row, dict):
        return "is not an object"
    for key in ("suite", "student"):
        if not isinstance(row.get(key), str):
            return f"has no text '{key}'"
    if not _number(row.get("lam")):
        return "has a 'lam' that is not a number"
    if not isinstance(row.get("seeds", []), list):
        return "has 'seeds' that is not a list"
    for key, stat in row.items():
        if isinstance(stat, dict) and ("mean" in stat or "sd" in stat):
            if not _number(stat.get("mean")) or not _number(stat.get("sd")):
                return f"has a '{key}' whose mean or sd is not a number"
    return None


def format_stat(m, sd=None) -> str:
    """'0.19 ± 0.06' (sd None: just the mean); a statistic no example defines (null) is '–', one that is not a
    number (NaN, written as null with its reason) is 'NaN'."""
    if m is None:
        return "–"
    if isinstance(m, float) and not math.isfinite(m):
        return "NaN" if math.isnan(m) else ("∞" if m > 0 else "−∞")
    if sd is None:
        return f"{m:.2f}"
    if isinstance(sd, float) and not math.isfinite(sd):
        return f"{m:.2f} ± NaN" if math.isnan(sd) else f"{m:.2f} ± ∞"
    return f"{m:.2f} ± {sd:.2f}"


def study_rows(data: dict, columns=STUDY_COLUMNS) -> list[dict]:
    """One row per suite and student: 'mean ± sd' over seeds (just the mean with one seed), and the seeds."""
    rows = []
    for r in data.get("summary", []):
        row = {"suite": r.get("suite"), "student": r.get("student"), "λ": r.get("lam"), "seeds": len(r.get("seeds", []))}
        for c in columns:
            cell = r.get(c) if isinstance(r.get(c), dict) else {}
            row[c] = format_stat(cell.get("mean"), cell.get("sd"))
        rows.append(row)
    return rows
