"""A study's results with the seed as the unit: per suite, setting and budget, every measure as a mean over seeds
with a hierarchical bootstrap interval; the card's own effect (the student's with/without difference minus the
base's); a health verdict; `harm` as a pooled count; settings compared pooled over seeds with Holm's correction
(docs/measures.md#across-seeds).

Pure functions of the evaluations' per-example rows: `measure_setting` for one setting, `compare` for two,
`study_tables` for the whole grid. Rendering (markdown, CSV, figure) lives with the study's files.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Mapping, Sequence

import numpy as np

from interp.core.runs import ExampleRow
from training import stats

# Measures per model: (name, row key, condition key or None, negate the condition). Row keys are ExampleRow verdicts
# at a budget (interp.core.runs.ExampleRow.budgets); "len_*" are answer lengths in tokens.
RATES = (
    ("acc_noctx", "correct_noctx", None),
    ("acc_ctx", "correct_ctx", None),
    ("loops_noctx", "degenerate_noctx", None),
    ("loops_ctx", "degenerate_ctx", None),
    ("loops_short_noctx", "loop_short_noctx", None),
    ("loops_short_ctx", "loop_short_ctx", None),
    ("loops_clause_noctx", "loop_clause_noctx", None),
    ("loops_clause_ctx", "loop_clause_ctx", None),
    ("truncated_noctx", "truncated_noctx", None),
    ("truncated_ctx", "truncated_ctx", None),
    ("len_noctx", "len_noctx", None),
    ("len_ctx", "len_ctx", None),
    ("follow_cf", "follow_cf", None),
    ("follow_cf_clean", "follow_cf", "clean_cf"),  # among the counterfactual answers that do not loop
    ("loops_cf", "degenerate_cf", None),
    ("stubborn_cf", "stubborn_cf", None),
)
# The card's own effect on these measures: (m_ctx − m_noctx)_student − (m_ctx − m_noctx)_base.
CARD_EFFECT = {"loops": ("degenerate_ctx", "degenerate_noctx"), "acc": ("correct_ctx", "correct_noctx"),
               "len": ("len_ctx", "len_noctx")}
# Verdicts on which two settings are compared (paired on the same examples within a seed).
COMPARED = ("correct_ctx", "degenerate_ctx", "correct_noctx")
HEALTH_MARGIN = 0.05
# Each seed's judged rows; None where a seed was not judged on an example of the union (`align`).
Rows = Mapping[int, Sequence[ExampleRow | None]]


def row_value(row: ExampleRow, key: str, budget: int, full: int):
    """A verdict of one row at `budget` tokens; rows judged only at the full budget (older evaluations) answer there."""
    if row.budgets and str(budget) in row.budgets:
        judged = row.budgets[str(budget)]
        if key == "clean_cf":
            return None if judged.get("degenerate_cf") is None else not judged["degenerate_cf"]
        return judged.get(key)
    if budget != full:
        return None
    if key in ("len_noctx", "len_ctx", "len_cf"):
        ids = getattr(row, "ids_" + key[4:])
        return None if ids is None else len(ids)
    if key == "clean_cf":
        return None if row.degenerate_cf is None else not row.degenerate_cf
    return getattr(row, key, None)


def column(rows: Sequence[ExampleRow | None], key: str, budget: int, full: int) -> np.ndarray | None:
    """One verdict over a seed's examples as floats (NaN where undefined, and where the row is None: an example
    of the union this seed was not judged on, see `align`), or None when no example defines it."""
    values = [None if r is None else row_value(r, key, budget, full) for r in rows]
    if all(v is None for v in values):
        return None
    return np.array([np.nan if v is None else float(v) for v in values])


def _seeds(per_seed: Rows, key: str, budget: int, full: int) -> list:
    return [column(per_seed[s], key, budget, full) for s in sorted(per_seed)]


def _mean(m: stats.SeedMean) -> dict:
    return {"value": m.value, "ci": list(m.ci) if m.ci else None, "seeds": m.n_seeds, "of": m.seeds}


def example_keys(rows: Sequence[ExampleRow | None]) -> list[tuple | None]:
    """Each row's identity: (context, prompt, reference) and its occurrence among equal rows of the seed (a prompt
    drawn twice is two examples); None for a None row."""
    seen: dict[tuple, int] = {}
    out: list[tuple | None] = []
    for r in rows:
        if r is None:
            out.append(None)
            continue
        k = (r.context, r.prompt, r.reference)
        out.append((k, seen.get(k, 0)))
        seen[k] = seen.get(k, 0) + 1
    return out


def shared_examples(*per_seed: Rows) -> bool:
    """Were two or more seeds judged on some of the same examples? (A suite file with a fixed split judges every
    seed on the same prompts; a suite drawn per seed from a finite pool shares a part of them: the removability
    suites' seeds share 57 of their 121 prompts.) Then the examples are crossed with the seeds, not nested in them:
    the intervals resample the examples once for all seeds and the comparisons flip signs per example, over the
    union of the seeds' examples (`align`, `stats.seed_mean`, `compare`)."""
    owner: dict[tuple, int] = {}
    for ps in per_seed:
        for s, rows in ps.items():
            for k in example_keys(rows):
                if k is not None and owner.setdefault(k, s) != s:
                    return True
    return False


def align(*per_seed: Rows) -> list[dict[int, list[ExampleRow | None]]]:
    """Each seed's rows laid out over the union of the examples of every seed (and every model given: a student and
    the base are judged on the same examples per seed): one position per example, in the order examples first
    appear (seeds in ascending order, models in the order given), None where a seed was not judged on it. Seeds
    judged on the same examples in the same order keep that order; aligning aligned rows changes nothing."""
    union: dict[tuple, int] = {}
    for s in sorted({s for ps in per_seed for s in ps}):
        for ps in per_seed:
            for k in example_keys(ps.get(s, ())):
                if k is not None:
                    union.setdefault(k, len(union))
    out = []
    for ps in per_seed:
        laid: dict[int, list[ExampleRow | None]] = {}
        for s, rows in ps.items():
            row_at: list[ExampleRow | None] = [None] * len(union)
            for k, r in zip(example_keys(rows), rows):
                if k is not None:
                    row_at[union[k]] = r
            laid[s] = row_at
        out.append(laid)
    return out


def measure_model(per_seed: Rows, budget: int, full: int, *, seed: int = 0,
                  shared: bool | None = None) -> dict:
    """Every measure of one model (a student setting, or the base) at one budget, over its seeds. `shared` (None:
    detected by `shared_examples`) says whether the seeds share examples; their rows are then laid over the union
    (`align`)."""
    shared = shared_examples(per_seed) if shared is None else shared
    if shared:
        (per_seed,) = align(per_seed)
    out: dict[str, Any] = {}
    for name, key, where in RATES:
        values = _seeds(per_seed, key, budget, full)
        cond = _seeds(per_seed, where, budget, full) if where else None
        if all(v is None for v in values):
            out[name] = None
            continue
        out[name] = _mean(stats.seed_mean(values, cond, seed=seed, shared=shared))
    right = _seeds(per_seed, "correct_noctx", budget, full)
    wrong_ctx = [None if c is None else 1.0 - c for c in _seeds(per_seed, "correct_ctx", budget, full)]
    harm = stats.seed_mean(wrong_ctx, right, seed=seed, shared=shared)
    pooled = stats.pooled_rate(wrong_ctx, right)  # positions a seed was not judged on are NaN: left out
    out["harm"] = {**_mean(harm), "k": pooled.k, "n": pooled.n, "pooled": pooled.value,
                   "wilson": list(pooled.wilson) if pooled.wilson else None}
    return out


def measure_setting(student: Rows, base: Rows, budget: int, full: int, *, margin: float = HEALTH_MARGIN,
                    drift: dict[int, float | None] | None = None, seed: int = 0) -> dict:
    """A student setting against the base on the seeds both have: its measures, the card's own effect on loops,
    accuracy and length, `ctx_drop` (the teacher's with-context accuracy minus the student's), its health, and
    `follow_cf_vs_base` (its clean follow rate over the base's)."""
    seeds = sorted(set(student) & set(base))
    s: Rows = {k: student[k] for k in seeds}
    b: Rows = {k: base[k] for k in seeds}
    shared = shared_examples(s, b)
    if shared:
        s, b = align(s, b)
    out = measure_model(s, budget, full, seed=seed, shared=shared)
    effects = {}
    for name, (ctx_key, noctx_key) in CARD_EFFECT.items():
        cols = [_seeds(s, ctx_key, budget, full), _seeds(s, noctx_key, budget, full), _seeds(b, ctx_key, budget, full),
                _seeds(b, noctx_key, budget, full)]
        effects[name] = _mean(stats.card_effect(*cols, seed=seed, shared=shared))
    out["card_effect"] = effects
    teacher = _seeds(b, "correct_ctx", budget, full)
    mine = _seeds(s, "correct_ctx", budget, full)
    drop = [None if t is None or m is None else t - m for t, m in zip(teacher, mine)]
    out["ctx_drop"] = _mean(stats.seed_mean(drop, seed=seed, shared=shared))
    h = stats.health(_seeds(s, "degenerate_noctx", budget, full), _seeds(b, "degenerate_noctx", budget, full),
                     _seeds(s, "truncated_noctx", budget, full), _seeds(b, "truncated_noctx", budget, full),
                     margin=margin, seed=seed, shared=shared)
    health = asdict(h)
    if drift is not None:
        d = [drift.get(k) for k in seeds]
        defined = [x for x in d if x is not None]
        health["drift"] = {"value": float(np.mean(defined)) if defined else None, "seeds": len(defined), "per_seed": d}
    out["health"] = health
    mine_f, base_f = out.get("follow_cf_clean"), measure_model(b, budget, full, seed=seed, shared=shared).get("follow_cf_clean")
    out["follow_cf_vs_base"] = (mine_f["value"] / base_f["value"]
                                if mine_f and base_f and mine_f["value"] is not None and base_f["value"] else None)
    out["seeds"] = seeds
    out["shared_examples"] = shared
    return out


def compare(a: Rows, b: Rows, key: str, budget: int, full: int,
            *, higher_is_better: bool = True) -> dict:
    """Two settings on the same examples, pooled over the seeds both have: the pooled exact McNemar (CMH for matched
    pairs), the seed-level direction (k of n seeds), and the discordant counts.

    When seeds share examples (`shared_examples`: all of them, or some), pairs of different seeds on one example are
    not independent, and the pooled McNemar would count each example once per seed that has it. `p` is then the exact
    sign-flip test with one sign per example of the union (`align`; `stats.permutation_paired` on the per-example
    sums over the seeds that have it: d_i = Σ_s (a_si − b_si), T = Σ_i d_i, the same T as McNemar's a_only −
    b_only); `test` says which. The discordant counts stay per (seed, example) pair."""
    seeds = sorted(set(a) & set(b))
    xa = [column(a[s], key, budget, full) for s in seeds]
    xb = [column(b[s], key, budget, full) for s in seeds]
    m = stats.mcnemar_pooled(xa, xb)
    d = stats.seed_direction(xa, xb, higher_is_better=higher_is_better)
    p, test = m.p, "mcnemar_pooled"
    defined = [(x, y) for x, y in zip(xa, xb) if x is not None and y is not None]
    on_a: Rows = {s: a[s] for s in seeds}
    on_b: Rows = {s: b[s] for s in seeds}
    if shared_examples(on_a, on_b) and len(defined) > 1:
        on_a, on_b = align(on_a, on_b)
        ya = [column(on_a[s], key, budget, full) for s in seeds]
        yb = [column(on_b[s], key, budget, full) for s in seeds]
        both = [(x, y) for x, y in zip(ya, yb) if x is not None and y is not None]
        p, test = sign_flip_per_example([x for x, _ in both], [y for _, y in both]), "sign_flip_per_example"
    return {"key": key, "budget": budget, "seeds": seeds, "a_only": m.a_only, "b_only": m.b_only, "n": m.n, "p": p,
            "test": test, "a_better_seeds": d.a_better, "b_better_seeds": d.b_better, "tied_seeds": d.ties,
            "p_sign": d.p_sign}


def sign_flip_per_example(xa: Sequence[np.ndarray], xb: Sequence[np.ndarray]) -> float:
    """Two-sided exact p of a against b over seeds that share examples (one array per seed, aligned by example, NaN
    where a seed lacks one: `align`):
    `stats.permutation_paired` on the per-example sums over seeds, one sign per example; an example undefined (NaN)
    in either for a seed adds nothing for that seed."""
    bad = [np.isnan(x) | np.isnan(y) for x, y in zip(xa, xb)]
    sum_a = np.sum([np.where(u, 0.0, x) for x, u in zip(xa, bad)], axis=0)
    sum_b = np.sum([np.where(u, 0.0, y) for y, u in zip(xb, bad)], axis=0)
    return stats.permutation_paired([sum_a], [sum_b]).p


def holm_family(comparisons: list[dict]) -> None:
    """Holm's correction across the study's comparisons (in place: `p_holm` beside each `p`)."""
    adjusted = stats.holm([c["p"] for c in comparisons])
    for c, p in zip(comparisons, adjusted):
        c["p_holm"] = p


__all__ = ["Rows", "example_keys", "shared_examples", "align", "sign_flip_per_example", "measure_model", "measure_setting", "compare", "holm_family", "row_value", "column", "RATES", "CARD_EFFECT",
           "COMPARED", "HEALTH_MARGIN"]
