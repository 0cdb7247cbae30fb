"""Reading a training run for the causal commands: the one place that knows the run-folder format.

It reads the typed records of interp.runs (`read_run`, `read_examples` with the generated ids): the causal tools
measure exactly the tokens each model generated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from interp import runs
from interp.errors import UserError

from interp.causal.sites import BASE
from interp.verifiers import verify


# A run's (model, example) row: the run format's own record, with the generated ids and the stored verdicts.
RunRow = runs.ExampleRow


def read_info(run_dir: Path) -> dict:
    """task, model, seed, placement, n_test, students."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a folder; pass a run folder written by `python -m training pair`")
    info = runs.read_run(run_dir)
    return {k: getattr(info, k, None) for k in ("task", "model", "seed", "placement", "n_test", "students")}


def adapter_dir(run_dir: Path, student: str) -> Path:
    return runs.student_dir(run_dir, student)


def check_student(run_dir: Path, student: str) -> None:
    """A student the run has (with an adapter folder), or `base`; else a one-line error before anything loads."""
    if student == BASE:
        return
    info = read_info(run_dir)
    if student not in info["students"] or not (adapter_dir(run_dir, student) / "adapter_config.json").exists():
        have = [s for s in info["students"] if (adapter_dir(run_dir, s) / "adapter_config.json").exists()]
        raise UserError(f"{run_dir} has no student named '{student}'; it has: {', '.join(have) or 'none'}")


def read_rows(run_dir: Path) -> list[RunRow]:
    """Every (model, example) row of the run's evaluation."""
    run_dir = Path(run_dir)
    examples = runs.read_examples(run_dir)
    if examples is None:
        raise UserError(f"{run_dir} has no evaluation yet; run `python -m training eval {run_dir}` first")
    return examples


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
    """The generated ids of one answer (an empty answer is its stop token)."""
    ids = row.ids_ctx if which == "ctx" else row.ids_noctx
    return list(ids) or [tokenizer.eos_token_id]


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
    pairs = make_pairs(lm.tokenizer, records, placement=info["placement"] or "system", no_context=info.get("no_context") or "default")
    return pairs, rows


def is_degenerate(row: RunRow, which: str) -> bool:
    """The run's own verdict on the answer with (`ctx`) or without (`noctx`) the context."""
    return bool(row.degenerate_ctx if which == "ctx" else row.degenerate_noctx)


def verifier_for(rows: list[RunRow]) -> Callable[[str, object], bool]:
    """The run's verifiers as `verifier(response, record)`: each example's own kind, as the run stored it."""
    kinds = {r.example: r.verifier for r in rows}

    def verifier(response: str, record) -> bool:
        get: Callable[[str], Any] = record.get if isinstance(record, dict) else (lambda k: getattr(record, k, None))
        kind = get("verifier") or kinds[get("example")]
        return verify(kind, response, get("reference"))

    return verifier
