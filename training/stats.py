"""Intervals and paired tests for the evaluation's rates (docs/measures.md#intervals)."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

BOOTSTRAP_SAMPLES = 1000
LEVEL = 0.95


def bootstrap_ci(stat: Callable[[np.ndarray], float | None], n: int, *, samples: int = BOOTSTRAP_SAMPLES,
                 seed: int = 0, level: float = LEVEL) -> tuple[float, float] | None:
    """Percentile bootstrap over examples: resample the n example indices with replacement `samples` times, apply
    `stat` to each index array, and take the (1−level)/2 and (1+level)/2 quantiles of the defined values.

    `stat` returns None where the statistic is undefined on a resample (a conditional rate with an empty
    condition); those resamples are dropped. None when fewer than half the resamples are defined.
    """
    if n == 0:
        return None
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(samples):
        v = stat(rng.integers(0, n, size=n))
        if v is not None and math.isfinite(v):
            values.append(v)
    if len(values) < samples / 2:
        return None
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def rate(flags: Sequence[bool] | np.ndarray, where: Sequence[bool] | np.ndarray | None = None) -> Callable[[np.ndarray], float | None]:
    """The share of True in `flags` (among examples where `where` holds), as a statistic of resampled indices."""
    f = np.asarray(flags, dtype=float)
    w = np.ones_like(f, dtype=bool) if where is None else np.asarray(where, dtype=bool)

    def stat(idx: np.ndarray) -> float | None:
        keep = w[idx]
        return float(f[idx][keep].mean()) if keep.any() else None

    return stat


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Exact two-sided McNemar p-value from the discordant pairs: `a_only` examples right for A and wrong for B,
    `b_only` the reverse. Under H0 each discordant pair goes either way with probability 1/2:
    p = min(1, 2 · P(Binomial(a_only + b_only, 1/2) ≤ min(a_only, b_only)))."""
    n = a_only + b_only
    if n == 0:
        return 1.0
    k = min(a_only, b_only)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired(a: Sequence[bool], b: Sequence[bool]) -> dict:
    """Paired comparison of two models' verdicts on the same examples: flips both ways and McNemar's p."""
    if len(a) != len(b):
        raise ValueError("paired verdicts must cover the same examples")
    a_only = sum(x and not y for x, y in zip(a, b))
    b_only = sum(y and not x for x, y in zip(a, b))
    return {"n": len(a), "a_only": a_only, "b_only": b_only, "p_mcnemar": mcnemar_exact(a_only, b_only)}


def mean_sd(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    """Mean and sample standard deviation (n−1) over seeds of the defined values, and how many there were."""
    v = [x for x in values if x is not None]
    if not v:
        return None, None, 0
    m = sum(v) / len(v)
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else None
    return m, sd, len(v)
