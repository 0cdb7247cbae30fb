"""Intervals and paired tests for the evaluation's rates (docs/measures.md#intervals-and-comparisons), and the
statistics that make the seed the unit of a study (docs/measures.md#across-seeds)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Callable, Sequence

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


# --- across seeds: the seed is the unit (docs/measures.md#across-seeds) -----------------------------------------------
#
# Inputs are per seed: a sequence with one entry per seed, each an array of per-example values (booleans or floats,
# in the examples' order), or None where the seed has no evaluation. Arrays that are compared or combined within a
# seed (flags and where, student and base, setting A and setting B) must cover the same examples in the same order.
# A NaN (or None) value drops that example, from every array of its seed. Results are frozen dataclasses:
# `dataclasses.asdict` gives their JSON form.

PerSeed = Sequence[Any]
_CHUNK = 1 << 22  # resampled example indices drawn at once (int64: 32 MiB)


def _check_level(level: float) -> None:
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")


def _check_count(k: int, n: int) -> None:
    if not (0 <= k <= n) or int(k) != k or int(n) != n:
        raise ValueError(f"a count needs integers 0 ≤ k ≤ n, got k={k}, n={n}")


def wilson(k: int, n: int, level: float = LEVEL) -> tuple[float, float] | None:
    """Wilson score interval for `k` successes in `n` trials. With p̂ = k/n and z = Φ⁻¹((1+level)/2):

        (p̂ + z²/2n ± z·√(p̂(1−p̂)/n + z²/4n²)) / (1 + z²/n)

    None when n = 0. Which interval a study shows for a rate that rests on a small count (n under about 30, or
    k = 0 or k = n, where the example bootstrap collapses to a point: harm "0.90" from 2 examples): **Wilson**, next to
    the count k/n. Its coverage is close to the nominal level on average and it never degenerates at k = 0 or n.
    `clopper_pearson` is for a bound stated as a guarantee ("no loops in 40 answers: at most 0.09").
    """
    _check_count(k, n)
    _check_level(level)
    if n == 0:
        return None
    z = NormalDist().inv_cdf((1 + level) / 2)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return lo, hi


def _log_binom_tail(k: int, n: int, p: float, upper: bool, lgam: np.ndarray) -> float:
    """log P(X ≥ k) (upper) or log P(X ≤ k) for X ~ Binomial(n, p), 0 < p < 1, summed in log space; lgam[j] is
    log j!."""
    i = np.arange(k, n + 1) if upper else np.arange(0, k + 1)
    terms = lgam[n] - lgam[i] - lgam[n - i] + i * math.log(p) + (n - i) * math.log1p(-p)
    top = terms.max()
    return float(top + math.log(np.exp(terms - top).sum()))


def _bisect(f: Callable[[float], float], increasing: bool) -> float:
    """The root of a monotone f on (0, 1) by bisection (100 halvings: far below float precision of any bound)."""
    lo, hi = 0.0, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        if (f(mid) < 0) == increasing:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def clopper_pearson(k: int, n: int, level: float = LEVEL) -> tuple[float, float] | None:
    """Clopper–Pearson ("exact") interval for `k` successes in `n` trials, with α = 1 − level:

        lower = the p with P(Binomial(n, p) ≥ k) = α/2   (0 when k = 0)
        upper = the p with P(Binomial(n, p) ≤ k) = α/2   (1 when k = n)

    (the α/2 and 1−α/2 quantiles of Beta(k, n−k+1) and Beta(k+1, n−k)). Coverage is at least `level` for every
    true rate, and it is usually wider than `wilson`: use it where a bound must hold as a guarantee. None when n = 0.
    Solved by bisection on the binomial tails summed in log space (numpy and the standard library only).
    """
    _check_count(k, n)
    _check_level(level)
    if n == 0:
        return None
    k, n = int(k), int(n)
    log_a = math.log((1 - level) / 2)
    lgam = np.array([math.lgamma(j + 1) for j in range(n + 1)])
    lo = 0.0 if k == 0 else _bisect(lambda p: _log_binom_tail(k, n, p, True, lgam) - log_a, increasing=True)
    hi = 1.0 if k == n else _bisect(lambda p: _log_binom_tail(k, n, p, False, lgam) - log_a, increasing=False)
    return lo, hi


def _arrays(entry: Any) -> np.ndarray | None:
    if entry is None:
        return None
    return np.asarray(entry, dtype=float).reshape(-1)


def _aligned(*entries: Any) -> list[np.ndarray] | None:
    """One seed's arrays as float, with every example where any of them is NaN dropped from all; None when any
    entry is None (the seed has no evaluation). Arrays of different lengths are an error: they must be aligned."""
    arrays = [_arrays(e) for e in entries]
    if any(a is None for a in arrays):
        return None
    sizes = {len(a) for a in arrays}  # type: ignore[arg-type]
    if len(sizes) > 1:
        raise ValueError(f"arrays of one seed must cover the same examples, got lengths {sorted(sizes)}")
    keep = np.logical_and.reduce([~np.isnan(a) for a in arrays])  # type: ignore[arg-type]
    return [a[keep] for a in arrays]  # type: ignore[index]


def _per_seed(*columns: PerSeed | None) -> list[list[np.ndarray] | None]:
    """Zip per-seed columns (None for a column: absent) into each seed's aligned arrays."""
    given = [c for c in columns if c is not None]
    counts = {len(c) for c in given}
    if len(counts) > 1:
        raise ValueError(f"every input needs one entry per seed, got {sorted(counts)} seeds")
    return [_aligned(*(c[s] for c in given)) for s in range(counts.pop() if counts else 0)]


@dataclass(frozen=True)
class SeedMean:
    """A setting's statistic over seeds: `value` the mean over the seeds that define it, `ci` its hierarchical
    bootstrap interval, `n_seeds` how many seeds define it out of `seeds` given, `per_seed` each seed's own value in the
    order given (None where undefined: no evaluation, or an empty condition)."""

    value: float | None
    ci: tuple[float, float] | None
    n_seeds: int
    seeds: int
    per_seed: list[float | None]


def _ratio(v: np.ndarray, w: np.ndarray) -> float | None:
    den = w.sum()
    return float((v * w).sum() / den) if den > 0 else None


def _hierarchical(data: list[tuple[np.ndarray, np.ndarray] | None], samples: int, seed: int, level: float,
                 shared: bool = False) -> SeedMean:
    """The engine of `seed_mean`: per seed (values v, condition w), statistic Σ v·w / Σ w. `shared`: every seed's
    arrays cover the same examples at the same positions, and each resample draws one set of example indices for
    all its seeds."""
    _check_level(level)
    per = [None if d is None else _ratio(*d) for d in data]
    defined = [d for d, p in zip(data, per) if d is not None and p is not None]
    if not defined:
        return SeedMean(None, None, 0, len(data), per)
    value = float(np.mean([p for p in per if p is not None]))
    # A canonical order (by the data) makes the result independent of the order the seeds are given in.
    defined.sort(key=lambda d: (len(d[0]), tuple(d[0].tolist()), tuple(d[1].tolist())))
    S = len(defined)
    rng = np.random.default_rng(seed)
    choice = np.zeros((samples, S), dtype=np.int64) if S == 1 else rng.integers(0, S, size=(samples, S))
    stat = np.full((samples, S), np.nan)
    if shared:
        n = len(defined[0][0])
        ratios = np.full((S, samples), np.nan)
        step = max(1, _CHUNK // n)
        for start in range(0, samples, step):
            idx = rng.integers(0, n, size=(min(step, samples - start), n))
            for s, (v, w) in enumerate(defined):
                num, den = (v * w)[idx].sum(axis=1), w[idx].sum(axis=1)
                with np.errstate(invalid="ignore", divide="ignore"):
                    ratios[s, start:start + len(idx)] = np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)
        stat = ratios[choice, np.arange(samples)[:, None]]
    for s, (v, w) in enumerate([] if shared else defined):
        rows, cols = np.nonzero(choice == s)
        n = len(v)
        vw = v * w
        step = max(1, _CHUNK // n)
        for start in range(0, len(rows), step):
            r, c = rows[start:start + step], cols[start:start + step]
            idx = rng.integers(0, n, size=(len(r), n))
            num, den = vw[idx].sum(axis=1), w[idx].sum(axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                stat[r, c] = np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)
    ok = ~np.isnan(stat)
    count = ok.sum(axis=1)
    total = np.where(ok, stat, 0.0).sum(axis=1)
    good = count > 0
    if good.sum() < samples / 2:
        return SeedMean(value, None, S, len(data), per)
    lo, hi = np.quantile(total[good] / count[good], [(1 - level) / 2, (1 + level) / 2])
    return SeedMean(value, (float(lo), float(hi)), S, len(data), per)


def seed_mean(values: PerSeed, where: PerSeed | None = None, *, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0,
              level: float = LEVEL, shared: bool = False) -> SeedMean:
    """A setting's rate or mean over seeds, with a hierarchical bootstrap interval.

    Per seed s with examples i: m_s = Σ_i v_si·w_si / Σ_i w_si (`where` w absent: every example, a plain rate or
    mean; with `where`: a conditional rate such as `harm`, v = wrong with the context, w = right without it). A seed
    with Σ_i w_si = 0 (an empty condition) or no evaluation (None) does not define m_s and is left out: `n_seeds`
    counts the seeds that define it. value = mean of m_s over those seeds.

    Interval: each of `samples` resamples draws the defining seeds with replacement (as many as there are), then
    for each drawn seed its examples with replacement, and takes the mean over the drawn seeds of m_s recomputed
    (a drawn seed whose resampled condition is empty is left out of that mean; a resample with none left is
    dropped); the interval is the (1−level)/2 and (1+level)/2 quantiles of the resampled values, None when fewer
    than half are defined. Deterministic given `seed`, and independent of the order the seeds are given in (they
    are put in a canonical order by their data first). With one seed this is `bootstrap_ci(rate(v, w), n, seed=seed)`
    draw for draw; with one example per seed, a bootstrap of the seeds' values. With few seeds (5) the seed level
    has only a handful of distinct resamples: read the interval as a rough one and show `n_seeds` beside it.

    `shared=True`: the seeds' arrays are aligned by example (the same examples in the same order, as a suite file
    with a fixed split judges them; or laid over the union of overlapping test sets, NaN where a seed lacks an
    example: `training.study.seed_level.align`), so examples and seeds are crossed, not nested: each resample draws
    the seeds as above and ONE set of example indices that every drawn seed uses. Resampling each seed's examples
    apart would count the same examples as new ones in every seed and narrow the interval by up to √(seeds). An
    example undefined in a seed (NaN) has weight 0 there, which leaves m_s as above. Duplicating a seed then leaves the interval as wide as the one seed's.
    """
    if shared:
        return _hierarchical(_crossed(values, where), samples, seed, level, shared=True)
    data = [None if d is None else (d[0], d[1] != 0 if len(d) > 1 else np.ones(len(d[0]), dtype=bool))
            for d in _per_seed(values, where)]
    return _hierarchical(data, samples, seed, level)


def _crossed(values: PerSeed, where: PerSeed | None) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """Each seed's (v, w) over every example position, for examples shared by the seeds: an example with a NaN in v
    or w gets v = 0, w = False (it adds nothing to Σ v·w or Σ w), so positions stay aligned across seeds."""
    if where is not None and len(where) != len(values):
        raise ValueError(f"every input needs one entry per seed, got {sorted({len(values), len(where)})} seeds")
    out: list[tuple[np.ndarray, np.ndarray] | None] = []
    for i, entry in enumerate(values):
        v = _arrays(entry)
        w = None if where is None else _arrays(where[i])
        if v is None or (where is not None and w is None):
            out.append(None)
            continue
        if w is None:
            w = np.ones(len(v))
        if len(w) != len(v):
            raise ValueError(f"arrays of one seed must cover the same examples, got lengths {sorted({len(v), len(w)})}")
        keep = ~np.isnan(v) & ~np.isnan(w)
        out.append((np.where(keep, v, 0.0), keep & (np.where(keep, w, 0.0) != 0)))
    sizes = {len(d[0]) for d in out if d is not None}
    if len(sizes) > 1:
        raise ValueError(f"shared examples: every seed must cover the same examples, got lengths {sorted(sizes)}")
    return out


@dataclass(frozen=True)
class Count:
    """A rate pooled over seeds from its count: `k` of `n`, `value` = k/n, `wilson` and `exact` (Clopper–Pearson)
    intervals, and each seed's own (k, n) in the order given (None: no evaluation)."""

    k: int
    n: int
    value: float | None
    wilson: tuple[float, float] | None
    exact: tuple[float, float] | None
    per_seed: list[tuple[int, int] | None]


def pooled_rate(flags: PerSeed, where: PerSeed | None = None, level: float = LEVEL) -> Count:
    """A (conditional) rate pooled over seeds as a count: k = Σ_s Σ_i f_si·w_si, n = Σ_s Σ_i w_si, value k/n, with
    its `wilson` interval (the one to show, beside "k/n") and `clopper_pearson` (`exact`). `harm` pooled this way
    says "9 of 10" where the mean over seeds would say 0.90 from a seed with 2 examples. The pooled count treats
    examples as independent across seeds; the spread between seeds is `seed_mean`'s to show."""
    per: list[tuple[int, int] | None] = []
    for d in _per_seed(flags, where):
        if d is None:
            per.append(None)
            continue
        f = d[0] != 0
        w = d[1] != 0 if len(d) > 1 else np.ones(len(f), dtype=bool)
        per.append((int((f & w).sum()), int(w.sum())))
    k = sum(p[0] for p in per if p is not None)
    n = sum(p[1] for p in per if p is not None)
    return Count(k, n, k / n if n else None, wilson(k, n, level), clopper_pearson(k, n, level), per)


def card_effect(student_ctx: PerSeed, student_noctx: PerSeed, base_ctx: PerSeed, base_noctx: PerSeed, *,
                samples: int = BOOTSTRAP_SAMPLES, seed: int = 0, level: float = LEVEL, shared: bool = False) -> SeedMean:
    """The card's own effect on a measure m, beyond what the card does to the base model:

        card_effect(m) = (m_ctx − m_noctx)_student − (m_ctx − m_noctx)_base

    Per seed on the examples all four arrays cover (aligned; an example with a NaN in any of them is dropped from
    all four): d_i = (s_ctx,i − s_noctx,i) − (b_ctx,i − b_noctx,i), and the seed's effect is mean_i d_i (which is
    the formula above on the seed's means). value = mean over seeds; the interval is `seed_mean`'s hierarchical
    bootstrap of d, so the four arrays are resampled with the same example indices. m may be a flag (loops:
    `degenerate`, verdicts: accuracy) or a number (answer length in tokens: the paper's length inflation).
    Exactly 0 when the student's arrays are the base's. `shared`: the seeds share their examples (`seed_mean`)."""
    ds: list[Any] = []
    if shared:  # positions kept: an example with a NaN anywhere is NaN in d, and weight 0 in `seed_mean`
        ds = [_diff(_diff(sc, sn), _diff(bc, bn)) for sc, sn, bc, bn in zip(student_ctx, student_noctx, base_ctx, base_noctx)]
        return seed_mean(ds, samples=samples, seed=seed, level=level, shared=True)
    for d in _per_seed(student_ctx, student_noctx, base_ctx, base_noctx):
        ds.append(None if d is None else (d[0] - d[1]) - (d[2] - d[3]))
    return seed_mean(ds, samples=samples, seed=seed, level=level)


def _diff(a: Any, b: Any) -> np.ndarray | None:
    """a − b per example with positions kept (NaN where either is NaN); None when either is None."""
    x, y = _arrays(a), _arrays(b)
    if x is None or y is None:
        return None
    if len(x) != len(y):
        raise ValueError(f"arrays of one seed must cover the same examples, got lengths {sorted({len(x), len(y)})}")
    return x - y


@dataclass(frozen=True)
class Health:
    """`health`'s answer: `loops` is (student − base) loops without the context over seeds, `truncated` the same for
    answers cut at the budget (None when not given), `student` and `base` their loop rates, `verdict` "healthy",
    "unhealthy" or None (no seed to judge), against `margin`."""

    loops: SeedMean
    truncated: SeedMean | None
    student: SeedMean
    base: SeedMean
    margin: float
    verdict: str | None


def health(student_loops: PerSeed, base_loops: PerSeed, student_truncated: PerSeed | None = None,
           base_truncated: PerSeed | None = None, *, margin: float = 0.05, samples: int = BOOTSTRAP_SAMPLES,
           seed: int = 0, level: float = LEVEL, shared: bool = False) -> Health:
    """Is the student still a working model without the card? Per seed, on the same examples, the student's and
    the base's no-context loop flags (and truncation flags): the difference of rates

        loops = mean over seeds of (mean_i loop_student,si − mean_i loop_base,si)

    with the hierarchical bootstrap interval of the per-example differences (`seed_mean`); `truncated` the same.

    Rule: **unhealthy when the point estimate of `loops` exceeds `margin`** (0.05 by default), healthy otherwise;
    truncation is reported, not judged (an answer cut at the budget is long, and its verdict already counts it).
    Why the point estimate and not the interval's lower end: the gate has to flag a broken regime at the study's
    size (5 seeds × 40 examples: intervals ±0.05–0.10 wide); "unhealthy only if the lower end exceeds the margin"
    would pass a student whose loops are +0.10 whenever the data are too thin to prove it, and "healthy only if the
    upper end is below" would fail nearly everything. The point estimate is the best single guess; the interval
    is reported beside it so a reader sees how sure the verdict is. (The first study's students: +0.40 and more.)
    """
    def diffs(a: PerSeed, b: PerSeed) -> list:
        if shared:
            if len(a) != len(b):
                raise ValueError(f"every input needs one entry per seed, got {sorted({len(a), len(b)})} seeds")
            return [_diff(x, y) for x, y in zip(a, b)]
        return [None if d is None else d[0] - d[1] for d in _per_seed(a, b)]

    def mean(values: PerSeed) -> SeedMean:
        return seed_mean(values, samples=samples, seed=seed, level=level, shared=shared)

    loops = mean(diffs(student_loops, base_loops))
    truncated = None
    if student_truncated is not None or base_truncated is not None:
        if student_truncated is None or base_truncated is None:
            raise ValueError("truncation needs both the student's and the base's flags")
        truncated = mean(diffs(student_truncated, base_truncated))
    verdict = None if loops.value is None else ("unhealthy" if loops.value > margin else "healthy")
    return Health(loops, truncated, mean(student_loops), mean(base_loops), margin, verdict)


# --- comparing two settings pooled over seeds ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PooledMcNemar:
    """`mcnemar_pooled`'s answer: discordant pairs pooled over seeds (`a_only`: right for A, wrong for B), `n` pairs,
    `statistic` the CMH (= McNemar) chi-square without continuity correction (None without discordant pairs), `p`
    the exact two-sided p-value, `per_seed` each seed's (a_only, b_only) in the order given."""

    a_only: int
    b_only: int
    n: int
    statistic: float | None
    p: float
    per_seed: list[tuple[int, int] | None]


def mcnemar_pooled(a: PerSeed, b: PerSeed) -> PooledMcNemar:
    """Two settings' paired binary verdicts (same seed, same examples), pooled over seeds: the Cochran–Mantel–
    Haenszel test stratified by matched pair, which is the stratified McNemar test.

    Each pair (example i of seed s) is its own 2×2 stratum; concordant pairs carry no information, and with
    a_only = Σ_s #{A right, B wrong}, b_only = Σ_s #{A wrong, B right} the CMH statistic for matched pairs equals
    McNemar's on the pooled discordant counts: (a_only − b_only)² / (a_only + b_only). Conditional on the
    discordant count, each discordant pair goes either way with probability 1/2 under H0, so `p` is the **exact
    binomial** two-sided p-value `mcnemar_exact(a_only, b_only)` = min(1, 2·P(Binomial(a_only+b_only, ½) ≤
    min(a_only, b_only))), not the chi-square approximation. Seeds stratify trivially: pairs never cross seeds."""
    per: list[tuple[int, int] | None] = []
    n = 0
    for d in _per_seed(a, b):
        if d is None:
            per.append(None)
            continue
        x, y = d[0] != 0, d[1] != 0
        per.append((int((x & ~y).sum()), int((~x & y).sum())))
        n += len(x)
    a_only = sum(p[0] for p in per if p is not None)
    b_only = sum(p[1] for p in per if p is not None)
    m = a_only + b_only
    return PooledMcNemar(a_only, b_only, n, (a_only - b_only) ** 2 / m if m else None, mcnemar_exact(a_only, b_only), per)


@dataclass(frozen=True)
class Permutation:
    """`permutation_paired`'s answer: `statistic` Σ (a − b) over every pair of every seed, `p` the two-sided
    p-value, `n_discordant` the pairs whose difference is not 0, `method` "exact" or "monte carlo" (then `samples`)."""

    statistic: float
    p: float
    n_discordant: int
    method: str
    samples: int | None


def permutation_paired(a: PerSeed, b: PerSeed, *, samples: int = 20_000, seed: int = 0, exact_max: int = 16) -> Permutation:
    """Paired permutation (sign-flip) test of two settings within seeds: per pair (seed s, example i) the
    difference d_si = a_si − b_si; statistic T = Σ_s Σ_i d_si. Under H0 (the two settings exchangeable within each
    pair) each d_si is as likely to have its sign flipped: T* = Σ ε_si d_si with independent signs ε = ±1, and
    p = P(|T*| ≥ |T|). Flips never move a difference out of its seed, so the test is stratified by seed.

    Exact when the nonzero differences are integers (binary verdicts, lengths in tokens): the distribution of T*
    by convolution, at any size; else by enumerating the 2^m sign patterns when m = n_discordant ≤ `exact_max`;
    else Monte Carlo with `samples` sign patterns from `seed`, p = (1 + #{|T*| ≥ |T|}) / (1 + samples). Ties in
    |T*| ≥ |T| are judged with a relative tolerance of 1e-9 for non-integer differences. On binary verdicts the
    exact p equals `mcnemar_pooled`'s (T = a_only − b_only)."""
    ds = [d[0] - d[1] for d in _per_seed(a, b) if d is not None]
    d = np.concatenate(ds) if ds else np.zeros(0)
    d = d[d != 0]
    t = float(d.sum())
    m = len(d)
    if m == 0:
        return Permutation(t, 1.0, 0, "exact", None)
    mag = np.abs(d)
    if np.all(mag == np.round(mag)) and m * mag.sum() <= 50_000_000:  # the convolution costs m·Σ|d|
        ints = mag.astype(np.int64)
        total = int(ints.sum())
        dist = np.zeros(2 * total + 1)  # P(T* = j − total)
        dist[total] = 1.0
        for x in ints:
            dist = 0.5 * (np.roll(dist, int(x)) + np.roll(dist, -int(x)))  # no wrap: |partial sums| ≤ total
        values = np.abs(np.arange(-total, total + 1))
        p = float(dist[values >= abs(round(t))].sum())
        return Permutation(t, min(1.0, p), m, "exact", None)
    tol = 1e-9 * float(mag.sum())
    if m <= exact_max:
        bits = (np.arange(2**m)[:, None] >> np.arange(m)) & 1
        tstar = ((1 - 2 * bits) * d).sum(axis=1)
        return Permutation(t, float(np.mean(np.abs(tstar) >= abs(t) - tol)), m, "exact", None)
    rng = np.random.default_rng(seed)
    hits, step = 0, max(1, _CHUNK // m)
    for start in range(0, samples, step):
        flipped = rng.integers(0, 2, size=(min(step, samples - start), m), dtype=np.int8)
        hits += int((np.abs(t - 2 * (flipped.astype(np.float64) @ d)) >= abs(t) - tol).sum())
    return Permutation(t, (1 + hits) / (1 + samples), m, "monte carlo", samples)


@dataclass(frozen=True)
class Direction:
    """`seed_direction`'s answer: in how many of `n` seeds A did better (`a_better`), B did better, or they tied,
    and the exact sign-test p over the untied seeds (`p_sign`)."""

    a_better: int
    b_better: int
    ties: int
    n: int
    p_sign: float


def seed_direction(a: PerSeed, b: PerSeed, *, higher_is_better: bool = True) -> Direction:
    """The seed-level direction of two settings: per seed, each setting's mean (an entry may be an array of
    per-example values, NaN dropped, or the seed's own number, e.g. `SeedMean.per_seed`); A beats B in a seed when its
    mean is higher (`higher_is_better`; lower for loops), ties (|difference| ≤ 1e-12) counted apart, and a seed where
    either is undefined (None, empty) not counted in `n`. `p_sign` = `mcnemar_exact(a_better, b_better)`, the exact
    two-sided sign test: with 5 seeds it cannot go below 0.0625, which is what "5 of 5" is worth."""
    if len(a) != len(b):
        raise ValueError(f"one entry per seed for both settings, got {len(a)} and {len(b)}")
    wins = losses = ties = 0
    for x, y in zip(a, b):
        mx, my = _mean_or_none(x), _mean_or_none(y)
        if mx is None or my is None:
            continue
        diff = (mx - my) if higher_is_better else (my - mx)
        if abs(diff) <= 1e-12:
            ties += 1
        elif diff > 0:
            wins += 1
        else:
            losses += 1
    return Direction(wins, losses, ties, wins + losses + ties, mcnemar_exact(wins, losses))


def _mean_or_none(x: Any) -> float | None:
    v = _arrays(x)
    if v is None:
        return None
    v = v[~np.isnan(v)]
    return float(v.mean()) if len(v) else None


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down correction across a family of m p-values (None or NaN: not in the family, returned as
    None). With the defined p-values sorted, p_(1) ≤ … ≤ p_(m):

        adjusted p_(i) = min(1, max_{j ≤ i} (m − j + 1)·p_(j))

    returned in the order given. Reject at α the hypotheses whose adjusted p ≤ α: the family-wise error stays ≤ α."""
    vals = [None if p is None or (isinstance(p, float) and math.isnan(p)) else float(p) for p in pvalues]
    for p in vals:
        if p is not None and not 0 <= p <= 1:
            raise ValueError(f"p-values lie in [0, 1], got {p}")
    idx = [i for i, p in enumerate(vals) if p is not None]
    order = sorted(idx, key=lambda i: vals[i])  # type: ignore[arg-type, return-value]
    m = len(order)
    out: list[float | None] = [None] * len(vals)
    running = 0.0
    for j, i in enumerate(order):
        running = max(running, min(1.0, (m - j) * vals[i]))  # type: ignore[operator]
        out[i] = running
    return out
