"""Run and study tables: rows for people (the app, the HTML report, the notebooks) from the run-folder and
study-results records, and token ids decoded to text for the figures."""

from __future__ import annotations

import functools
import math
import os
from dataclasses import asdict
from pathlib import Path

from interp.core.runs import EVAL_METRICS, model_order, read_examples
from interp.core.specs import BUILTIN_SPECS, EMBEDDED, cache_dir
from interp.core.studies import format_stat


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


@functools.lru_cache(maxsize=8)
def _decode_fn(spec: str):
    """Token id -> text for a model spec, from its tokenizer.json through the `tokenizers` library: a fraction of a
    second, where loading transformers' tokenizer takes seconds. Falls back to transformers; None if neither works."""
    # Only tokenizers at hand: a hub id would reach for the network, and ids are an acceptable fallback.
    if not spec or (spec not in BUILTIN_SPECS and not Path(spec).is_dir()):
        return None
    try:
        folder = cache_dir() / EMBEDDED if spec in BUILTIN_SPECS else Path(spec)
        if not (folder / "tokenizer.json").exists() and spec in BUILTIN_SPECS:
            from interp.core.models import embedded_model_dir  # torch: only when the embedded model was never converted

            folder = embedded_model_dir()
        if (folder / "tokenizer.json").exists():
            from tokenizers import Tokenizer

            fast = Tokenizer.from_file(str(folder / "tokenizer.json"))
            return lambda i: fast.decode([int(i)], skip_special_tokens=False)
        from interp.core.models import load_tokenizer  # torch (see above)

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


STUDY_COLUMNS = ("acc_noctx", "acc_ctx", "harm", "degenerate_ctx", "follow_cf", "ctx_drop", "truncated_ctx", "len_ratio", "drift")


def _ci_text(stat, signed: bool = False) -> str:
    if not isinstance(stat, dict) or stat.get("value") is None:
        return "–"
    v = stat["value"]
    if isinstance(v, float) and math.isnan(v):
        return "NaN"
    ci = stat.get("ci")
    text = f"{v:+.2f}" if signed else f"{v:.2f}"
    return text + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if isinstance(ci, list) and len(ci) == 2 else "")


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
