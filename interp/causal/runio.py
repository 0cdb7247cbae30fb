"""Reading a training run for the causal commands: the one place that knows the run-folder format.

Today it reads run.json and eval_examples.csv and re-tokenizes the response text. Where interp.runs offers typed
records (`read_run`, `read_examples` with the generated ids, `adapter_dir`), those are used instead, ids included.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from interp import runs
from interp.errors import UserError

from interp.causal.sites import BASE
from interp.degenerate import is_degenerate as degenerate_text


@dataclass
class RunRow:
    """One (model, example) row of a run's evaluation."""

    model: str
    example: int
    context: str
    prompt: str
    reference: str
    verifier: str | None
    response_noctx: str
    response_ctx: str
    ids_noctx: list[int] | None
    ids_ctx: list[int] | None
    correct_noctx: bool
    correct_ctx: bool
    degenerate_noctx: bool | None
    degenerate_ctx: bool | None

    @property
    def flipped(self) -> bool:
        return self.correct_noctx and not self.correct_ctx


def read_info(run_dir: Path) -> dict:
    """task, model, seed, placement, n_test, students."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a folder; pass a run folder written by `python -m training pair`")
    typed = getattr(runs, "read_run", None)
    if typed is not None:
        info = typed(run_dir)
        return {k: getattr(info, k, None) for k in ("task", "model", "seed", "placement", "n_test", "students")}
    info = runs.load_run_info(run_dir)
    return {"task": info.get("task"), "model": info.get("model", "smollm2-135m-instruct"), "seed": info.get("seed", 0),
            "placement": info.get("placement") or "system", "n_test": info.get("n_test"),
            "students": [str(s) for s in info.get("students", [])]}


def adapter_dir(run_dir: Path, student: str) -> Path:
    typed = getattr(runs, "adapter_dir", None)
    return Path(typed(run_dir, student)) if typed is not None else Path(run_dir) / student


def check_student(run_dir: Path, student: str) -> None:
    """A student the run has (with an adapter folder), or `base`; else a one-line error before anything loads."""
    if student == BASE:
        return
    info = read_info(run_dir)
    if student not in info["students"] or not (adapter_dir(run_dir, student) / "adapter_config.json").exists():
        have = [s for s in info["students"] if (adapter_dir(run_dir, s) / "adapter_config.json").exists()]
        raise UserError(f"{run_dir} has no student named '{student}'; it has: {', '.join(have) or 'none'}")


def _bool(value) -> bool | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true")
    return bool(value)


def read_rows(run_dir: Path) -> list[RunRow]:
    """Every (model, example) row of the run's evaluation."""
    run_dir = Path(run_dir)
    typed = getattr(runs, "read_examples", None)
    if typed is not None:
        raw = [{k: getattr(r, k, None) for k in RunRow.__dataclass_fields__} for r in typed(run_dir)]
    else:
        raw = runs.load_examples(run_dir)
        if raw is None:
            raise UserError(f"{run_dir} has no evaluation yet; run `python -m training eval {run_dir}` first")
    out = []
    for r in raw:
        ids_n, ids_c = r.get("ids_noctx"), r.get("ids_ctx")
        out.append(RunRow(
            model=str(r["model"]), example=int(r["example"]), context=str(r.get("context") or ""),
            prompt=str(r.get("prompt") or ""), reference=str(r.get("reference") or ""), verifier=r.get("verifier") or None,
            response_noctx=str(r.get("response_noctx") or ""), response_ctx=str(r.get("response_ctx") or ""),
            ids_noctx=list(ids_n) if ids_n else None, ids_ctx=list(ids_c) if ids_c else None,
            correct_noctx=bool(_bool(r.get("correct_noctx"))), correct_ctx=bool(_bool(r.get("correct_ctx"))),
            degenerate_noctx=_bool(r.get("degenerate_noctx")), degenerate_ctx=_bool(r.get("degenerate_ctx")),
        ))
    return out


def model_rows(run_dir: Path, model: str, max_examples: int | None = None) -> list[RunRow]:
    """The rows of one model (`base` or a student), in example order."""
    rows = sorted((r for r in read_rows(run_dir) if r.model == model), key=lambda r: r.example)
    if not rows:
        raise UserError(f"{run_dir} has no evaluated examples for '{model}'; run `python -m training eval {run_dir}`")
    if max_examples is not None:
        if max_examples < 1:
            raise UserError("--max-examples must be at least 1")
        rows = rows[:max_examples]
    return rows


def response_ids(tokenizer, row: RunRow, which: str) -> list[int]:
    """The generated ids of one answer: stored ones where the run has them, else the text re-tokenized."""
    ids = row.ids_ctx if which == "ctx" else row.ids_noctx
    if ids:
        return list(ids)
    text = row.response_ctx if which == "ctx" else row.response_noctx
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) or [tokenizer.eos_token_id]


def load_run_pairs(lm, run_dir: Path, model: str, response: str = "noctx", max_examples: int | None = None):
    """Aligned pairs of a run's test examples, on the answers `model` gave without (`response="noctx"`) or with
    the context; returns (pairs, rows)."""
    from interp.pairs import make_pairs

    if response not in ("noctx", "ctx"):
        raise UserError(f"unknown response '{response}'; use noctx or ctx")
    info = read_info(run_dir)
    rows = model_rows(run_dir, model, max_examples)
    records = [{"context": r.context, "prompt": r.prompt, "response_ids": response_ids(lm.tokenizer, r, response)}
               for r in rows]
    pairs = make_pairs(lm.tokenizer, records, placement=info["placement"] or "system")
    return pairs, rows


def is_degenerate(tokenizer, row: RunRow, which: str) -> bool:
    """The run's own verdict where it has one, else the loop detector on the answer's text."""
    stored = row.degenerate_ctx if which == "ctx" else row.degenerate_noctx
    if stored is not None:
        return bool(stored)
    text = row.response_ctx if which == "ctx" else row.response_noctx
    return degenerate_text(text)


def verifier_for(run_dir: Path, rows: list[RunRow]) -> Callable[[str, object], bool]:
    """The task's verifier as `verifier(response, record)`: the kind stored per example, else the task's own."""
    from training.tasks import load_task
    from training.verifiers import verify

    kinds = {r.example: r.verifier for r in rows if r.verifier}
    if len(kinds) < len(rows):
        info = read_info(run_dir)
        try:
            task = load_task(info["task"], seed=info["seed"] or 0, n_test=info["n_test"] or 40)
            kinds.update({i: e.verifier for i, e in enumerate(task.test) if i not in kinds})
        except UserError:
            pass

    def verifier(response: str, record) -> bool:
        get = record.get if isinstance(record, dict) else (lambda k: getattr(record, k, None))
        kind = get("verifier") or kinds.get(get("example"), "contains")
        return verify(kind, response, get("reference"))

    return verifier
