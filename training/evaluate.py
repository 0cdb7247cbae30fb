"""Removability evaluation: greedy answers with and without the context for base, teacher and every student."""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from interp.errors import UserError
from interp.generate import generate
from interp.models import LoadedModel, load_model
from interp.pairs import render_prompt_pair
from interp.store import atomic_write_json, atomic_write_text, read_json
from training.tasks import Example, load_task

EVAL_FILE = "eval.json"
EXAMPLES_FILE = "eval_examples.csv"
CSV_FIELDS = ["model", "example", "context", "prompt", "reference", "response_noctx", "response_ctx", "correct_noctx",
              "correct_ctx", "len_noctx", "len_ctx", "flipped"]
METRICS = ("acc_noctx", "acc_ctx", "harm", "help", "len_ratio", "ctx_drop")


@dataclass
class Answers:
    """One model's greedy answers to the test examples, without and with the context."""

    noctx: list[list[int]]
    ctx: list[list[int]]
    text_noctx: list[str]
    text_ctx: list[str]
    correct_noctx: list[bool]
    correct_ctx: list[bool]


@dataclass
class Scores:
    acc_noctx: float
    acc_ctx: float
    harm: float | None  # None when no example is right without the context
    help: float | None  # None when every example is right without the context
    len_ratio: float | None
    ctx_drop: float
    n: int


def answer(lm: LoadedModel, examples: Sequence[Example], placement: str, *, max_new_tokens: int = 48, batch_size: int = 16) -> Answers:
    """Greedy answers of the model as it is now (whatever adapter is active) without and with the context."""
    pps = [render_prompt_pair(lm.tokenizer, e.context, e.prompt, placement) for e in examples]
    noctx = generate(lm, [p.noctx_ids for p in pps], max_new_tokens=max_new_tokens, batch_size=batch_size)
    ctx = generate(lm, [p.ctx_ids for p in pps], max_new_tokens=max_new_tokens, batch_size=batch_size)
    dec = lambda ids: lm.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    tn, tc = [dec(i) for i in noctx], [dec(i) for i in ctx]
    return Answers(noctx, ctx, tn, tc, [e.check(t) for e, t in zip(examples, tn)], [e.check(t) for e, t in zip(examples, tc)])


def score(ans: Answers, teacher_acc_ctx: float | None = None) -> Scores:
    """The DESIGN.md metrics from one model's answers; `teacher_acc_ctx` defaults to this model's own (ctx_drop 0)."""
    n = len(ans.correct_noctx)
    if n == 0:
        raise UserError("no test examples to evaluate; raise --n-test")
    acc_noctx = sum(ans.correct_noctx) / n
    acc_ctx = sum(ans.correct_ctx) / n
    right = [c for a, c in zip(ans.correct_noctx, ans.correct_ctx) if a]
    wrong = [c for a, c in zip(ans.correct_noctx, ans.correct_ctx) if not a]
    harm = sum(not c for c in right) / len(right) if right else None
    help_ = sum(wrong) / len(wrong) if wrong else None
    mean_noctx = sum(map(len, ans.noctx)) / n
    mean_ctx = sum(map(len, ans.ctx)) / n
    len_ratio = mean_ctx / mean_noctx if mean_noctx > 0 else None
    ctx_drop = (acc_ctx if teacher_acc_ctx is None else teacher_acc_ctx) - acc_ctx
    return Scores(acc_noctx, acc_ctx, harm, help_, len_ratio, ctx_drop, n)


def csv_rows(model: str, examples: Sequence[Example], ans: Answers) -> list[dict]:
    return [
        {
            "model": model, "example": i, "context": e.context, "prompt": e.prompt, "reference": e.reference,
            "response_noctx": ans.text_noctx[i], "response_ctx": ans.text_ctx[i],
            "correct_noctx": int(ans.correct_noctx[i]), "correct_ctx": int(ans.correct_ctx[i]),
            "len_noctx": len(ans.noctx[i]), "len_ctx": len(ans.ctx[i]),
            "flipped": int(ans.correct_noctx[i] and not ans.correct_ctx[i]),
        }
        for i, e in enumerate(examples)
    ]


def students(run_dir: Path, listed: Sequence[str] = ()) -> list[str]:
    """Student folders of a run (those holding an adapter), in run.json's order, then any others by name. A student
    run.json lists without a finished adapter is an error, not a silent omission."""
    from interp.store import check_member_name

    found = sorted(p.name for p in run_dir.iterdir() if not p.name.startswith(".") and (p / "adapter_model.safetensors").exists()
                   and (p / "adapter_config.json").exists())
    for s in listed:
        check_member_name(s, run_dir / "run.json")
        if s not in found:
            raise UserError(f"student '{s}' in {run_dir / 'run.json'} is unfinished (no adapter in {run_dir / s}); finish it with "
                            f"`python -m training train --resume --out {run_dir / s}` and its settings, or remove it from run.json")
    return [s for s in listed if s in found] + [s for s in found if s not in listed]


@dataclass
class EvalResult:
    run_dir: Path
    report: dict  # what eval.json holds
    table: str


def evaluate_run(
    run_dir: str | Path,
    *,
    n: int | None = None,
    max_new_tokens: int = 48,
    batch_size: int = 16,
    layers: bool = True,
    lm: LoadedModel | None = None,
) -> EvalResult:
    """Evaluate base, teacher and every student of a run on the held-out test split; write eval.json and
    eval_examples.csv, then the per-layer analysis if interp offers it."""
    run_dir = Path(run_dir)
    if not (run_dir / "run.json").exists():
        raise UserError(f"{run_dir} is not a run folder (no run.json); create one with `python -m training pair` or `train`")
    run = read_json(run_dir / "run.json")
    for key in ("task", "model", "seed"):
        if key not in run:
            raise UserError(f"{run_dir / 'run.json'} lacks '{key}'; rerun `python -m training pair` to rewrite it")
    if n is not None and n < 1:
        raise UserError(f"--n must be at least 1 (got {n})")
    task = load_task(run["task"], seed=run["seed"], n_test=run.get("n_test", 40))
    placement = run.get("placement") or task.placement
    examples = task.test[:n] if n else task.test
    names = students(run_dir, run.get("students", []))
    lm = lm or load_model(run["model"])
    adapter = {name: name.replace(".", "_") for name in names}  # torch module names cannot hold a dot
    for name in names:  # check every adapter before spending minutes on generation
        lm.load_adapter(run_dir / name, name=adapter[name])

    options = dict(max_new_tokens=max_new_tokens, batch_size=batch_size)
    with lm.use(None):
        base = answer(lm, examples, placement, **options)
    answers = {"base": base, "teacher": base}  # the teacher is the base model read with the context
    for name in names:
        with lm.use(adapter[name]):
            answers[name] = answer(lm, examples, placement, **options)

    teacher_acc_ctx = sum(base.correct_ctx) / len(examples)
    models = {}
    for name, ans in answers.items():
        models[name] = asdict(score(ans, teacher_acc_ctx))
    report = {"task": run["task"], "model": run["model"], "split": "test", "n": len(examples), "placement": placement, "models": models}
    rows = [row for name, ans in answers.items() for row in csv_rows(name, examples, ans)]
    atomic_write_json(run_dir / EVAL_FILE, report)
    atomic_write_text(run_dir / EXAMPLES_FILE, _csv(rows))
    if layers:
        analyze_layers(run_dir)
    return EvalResult(run_dir, report, format_table(report))


def analyze_layers(run_dir: Path) -> bool:
    """Hand the run to interp's per-layer analysis (writes run_dir/layers/<model>/); returns whether it ran."""
    from interp.analysis import analyze_run

    analyze_run(run_dir)
    return True


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def format_table(report: dict) -> str:
    """The evaluation as a fixed-width table, one row per model."""
    head = f"{report['task']} · {report['model']} · {report['split']} split, n={report['n']}"
    width = max(12, *(len(name) for name in report["models"]))
    lines = [head, "  ".join([f"{'model':<{width}}"] + [f"{c:>10}" for c in METRICS])]
    for name, m in report["models"].items():
        cells = [f"{name:<{width}}"] + [f"{'–' if m[k] is None else format(m[k], '.2f'):>10}" for k in METRICS]
        lines.append("  ".join(cells))
    return "\n".join(lines)
