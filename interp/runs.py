"""Run folders written by `python -m training`: find them, and read their evaluation, examples, layers and curves."""

from __future__ import annotations

import csv
import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from interp.errors import UserError
from interp.store import META_FILE, check_member_name, load_divergence, read_json

RUN_FILE = "run.json"
EVAL_FILE = "eval.json"
EXAMPLES_FILE = "eval_examples.csv"
LAYERS_DIR = "layers"
METRICS_FILE = "metrics.jsonl"
TRAIN_CONFIG_FILE = "train_config.json"
# The evaluation table's columns, in the order DESIGN.md defines them.
EVAL_METRICS = ("acc_noctx", "acc_ctx", "harm", "help", "len_ratio", "ctx_drop")
# Models that are not students: always listed first.
REFERENCE_MODELS = ("base", "teacher")
# What the empty states tell a user to run.
MAKE_RUN_COMMAND = "python -m training pair --task persona --steps 60 --out runs/persona"
LAYERS_COMMAND = "python -m interp analyze-run {run}"


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


def overview(summaries: list[RunSummary]) -> list[dict]:
    """One row per run for the run picker: what it is, what it has so far, or what is wrong with it."""
    return [{"run": r.name, "task": r.task, "model": r.model, "students": ", ".join(r.students),
             "evaluated": r.has_eval, "layers": ", ".join(r.layer_models), "error": r.error or ""} for r in summaries]


def summarize(path: str | os.PathLike) -> RunSummary:
    path = Path(path)
    summary = RunSummary(name=path.name, path=path)
    try:
        info = load_run_info(path)
        summary.task, summary.model = str(info.get("task", "")), str(info.get("model", ""))
        summary.students = [str(s) for s in info.get("students", [])]
        summary.has_eval = (path / EVAL_FILE).exists()
        summary.has_examples = (path / EXAMPLES_FILE).exists()
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


def _parse_cell(value: str):
    """CSV cells come back as text: turn booleans and numbers back into values, leave the rest."""
    low = value.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(value)
    except ValueError:
        pass
    try:
        return float(value)
    except ValueError:
        return value


_EXAMPLE_NUMERIC = ("correct_noctx", "correct_ctx", "len_noctx", "len_ctx", "flipped")
_EXAMPLE_TEXT = ("model", "example", "context", "prompt", "reference", "response_noctx", "response_ctx")


def load_examples(path: str | os.PathLike) -> list[dict] | None:
    """eval_examples.csv as a list of rows (None when absent); one row per (model, example)."""
    file = Path(path) / EXAMPLES_FILE
    if not file.exists():
        return None
    try:
        with file.open(newline="") as f:
            reader = csv.DictReader(f)
            missing = {"model", "example", "correct_noctx", "correct_ctx"} - set(reader.fieldnames or [])
            if missing:
                raise UserError(f"{file} is damaged: it lacks the column(s) {', '.join(sorted(missing))}")
            rows = []
            for row in reader:
                if None in row:  # more cells than header columns
                    raise UserError(f"{file} is damaged: line {reader.line_num} has more cells than the header")
                rows.append({k: (_parse_cell(v) if k in _EXAMPLE_NUMERIC else (v or "")) for k, v in row.items()})
    except (UnicodeDecodeError, csv.Error) as err:
        raise UserError(f"{file} is damaged ({err}); rerun `python -m training evaluate`") from err
    for row in rows:
        if "flipped" not in row or row["flipped"] == "":
            row["flipped"] = bool(row["correct_noctx"]) and not bool(row["correct_ctx"])
    return rows


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
    lines = file.read_text().splitlines()
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as err:
            if i == len(lines):
                break
            raise UserError(f"{file} is damaged at line {i} ({err.msg})") from err
    return out


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
    for p in [path, *(path / n for n in (RUN_FILE, EVAL_FILE, EXAMPLES_FILE, META_FILE))]:
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
