"""The across-seeds statistics (training/stats.py, docs/measures.md#across-seeds), each number against an independent
implementation: scipy, statsmodels where it is installed, brute-force enumeration or a hand computation."""

import itertools
import math
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from training import stats

scipy_stats = pytest.importorskip("scipy.stats")
try:  # statsmodels is a second oracle where it is installed
    from statsmodels.stats import contingency_tables, multitest
except ImportError:
    contingency_tables = multitest = None
needs_statsmodels = pytest.mark.skipif(multitest is None, reason="statsmodels is not installed")


def flags(rng, p, n):
    return rng.random(n) < p


# --- small-count intervals ---------------------------------------------------------------------------------------------

COUNTS = [(0, 1), (1, 1), (0, 5), (2, 5), (5, 5), (1, 2), (9, 10), (3, 40), (20, 40), (39, 40), (0, 200), (117, 300), (1, 1000)]


@pytest.mark.parametrize("k,n", COUNTS)
@pytest.mark.parametrize("level", [0.9, 0.95, 0.99])
def test_wilson_and_clopper_pearson_against_scipy(k, n, level):
    test = scipy_stats.binomtest(k, n)
    for mine, method in ((stats.wilson, "wilson"), (stats.clopper_pearson, "exact")):
        ci = test.proportion_ci(confidence_level=level, method=method)
        lo, hi = mine(k, n, level)
        assert lo == pytest.approx(ci.low, abs=1e-10, rel=1e-8) and hi == pytest.approx(ci.high, abs=1e-10, rel=1e-8), method


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3000).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))))
def test_intervals_hold_the_rate_and_match_scipy_anywhere(kn):
    k, n = kn
    test = scipy_stats.binomtest(k, n)
    for mine, method in ((stats.wilson, "wilson"), (stats.clopper_pearson, "exact")):
        lo, hi = mine(k, n)
        assert 0 <= lo <= k / n <= hi <= 1
        ci = test.proportion_ci(method=method)
        assert lo == pytest.approx(ci.low, abs=1e-9, rel=1e-7) and hi == pytest.approx(ci.high, abs=1e-9, rel=1e-7)


def test_clopper_pearson_covers_every_rate_and_empty_counts_have_none():
    n = 20
    cps = [stats.clopper_pearson(k, n) for k in range(n + 1)]
    for p in np.linspace(0.001, 0.999, 97):  # exact coverage: the binomial mass of the k whose interval holds p
        pmf = scipy_stats.binom.pmf(np.arange(n + 1), n, p)
        assert sum(q for q, (lo, hi) in zip(pmf, cps) if lo <= p <= hi) >= 0.95 - 1e-12
    assert stats.wilson(0, 0) is None and stats.clopper_pearson(0, 0) is None
    # by hand: no loops in 40 answers, the exact upper bound is 1 − 0.025^(1/40)
    assert stats.clopper_pearson(0, 40)[1] == pytest.approx(1 - 0.025 ** (1 / 40), rel=1e-12)
    for bad in ((3, 2), (-1, 4), (1.5, 4)):
        with pytest.raises(ValueError):
            stats.wilson(*bad)
    with pytest.raises(ValueError):
        stats.clopper_pearson(1, 4, level=1.0)


# --- the hierarchical bootstrap ----------------------------------------------------------------------------------------


def reference_hierarchical(values, where, samples, seed, level=0.95):
    """The documented algorithm written as plain loops: seeds in the canonical order, seed choices first, then each
    seed's example draws in (sample, position) order."""
    seeds = []
    for v, w in zip(values, where):
        v, w = np.asarray(v, float), np.asarray(w, bool)
        if w.sum() > 0:
            seeds.append((v, w))
    seeds.sort(key=lambda d: (len(d[0]), tuple(d[0].tolist()), tuple(d[1].astype(float).tolist())))
    S = len(seeds)
    rng = np.random.default_rng(seed)
    choice = np.zeros((samples, S), int) if S == 1 else rng.integers(0, S, size=(samples, S))
    stat = {}
    for s, (v, w) in enumerate(seeds):
        for b in range(samples):
            for j in range(S):
                if choice[b, j] == s:
                    idx = rng.integers(0, len(v), size=len(v))
                    stat[b, j] = v[idx][w[idx]].mean() if w[idx].any() else None
    means = []
    for b in range(samples):
        got = [stat[b, j] for j in range(S) if stat[b, j] is not None]
        if got:
            means.append(sum(got) / len(got))
    return tuple(np.quantile(means, [(1 - level) / 2, (1 + level) / 2]))


def test_seed_mean_against_a_loop_implementation_of_the_hierarchical_bootstrap():
    rng = np.random.default_rng(3)
    right_noctx = [flags(rng, 0.6, n) for n in (12, 9, 15)]
    right_ctx = [flags(rng, 0.5, n) for n in (12, 9, 15)]
    harm = [~c for c in right_ctx]
    got = stats.seed_mean(harm, where=right_noctx, samples=300, seed=11)
    want_value = np.mean([h[a].mean() for h, a in zip(harm, right_noctx)])
    assert got.value == pytest.approx(want_value) and got.n_seeds == 3 and got.seeds == 3
    assert got.ci == pytest.approx(reference_hierarchical(harm, right_noctx, 300, 11), abs=1e-12)


def test_one_seed_is_the_example_bootstrap_draw_for_draw():
    rng = np.random.default_rng(0)
    a, c = flags(rng, 0.6, 37), flags(rng, 0.5, 37)
    for v, w in ((a, None), (~c, a), (c, ~a)):
        for seed in (0, 5):
            got = stats.seed_mean([v], where=None if w is None else [w], samples=700, seed=seed)
            assert got.ci == stats.bootstrap_ci(stats.rate(v, where=w), 37, samples=700, seed=seed)
            assert got.value == stats.rate(v, where=w)(np.arange(37)) and got.n_seeds == 1
    lengths = rng.integers(5, 96, size=23).astype(float)
    got = stats.seed_mean([lengths], samples=500, seed=2)
    want = stats.bootstrap_ci(lambda idx: float(lengths[idx].mean()), 23, samples=500, seed=2)
    assert got.ci == pytest.approx(want, rel=1e-12)


def test_one_example_per_seed_is_a_bootstrap_of_the_seeds():
    x = np.array([0.31, 0.12, 0.55, 0.4, 0.27, 0.6])
    got = stats.seed_mean([[v] for v in x], samples=800, seed=4)
    xs = np.sort(x)  # the canonical order of one-value seeds
    want = stats.bootstrap_ci(lambda idx: float(xs[idx].mean()), len(xs), samples=800, seed=4)
    assert got.ci == pytest.approx(want, rel=1e-12) and got.value == pytest.approx(x.mean())


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.randoms(use_true_random=False))
def test_seed_mean_does_not_depend_on_the_order_of_seeds(data_seed, shuffler):
    rng = np.random.default_rng(data_seed)
    sizes = rng.integers(1, 12, size=int(rng.integers(1, 6)))
    a = [flags(rng, 0.5, n) for n in sizes]
    v = [flags(rng, 0.4, n) for n in sizes]
    order = list(range(len(sizes)))
    shuffler.shuffle(order)
    one = stats.seed_mean(v, where=a, samples=200, seed=1)
    two = stats.seed_mean([v[i] for i in order], where=[a[i] for i in order], samples=200, seed=1)
    assert one.ci == two.ci and one.n_seeds == two.n_seeds
    assert one.value == pytest.approx(two.value, abs=1e-15)
    assert two.per_seed == [one.per_seed[i] for i in order]
    if one.ci is not None:  # a rate's interval stays in [0, 1]
        assert 0 <= one.ci[0] <= one.ci[1] <= 1


def test_seeds_that_do_not_define_a_conditional_rate_are_not_counted():
    right_noctx = [[True, True, False], [False, False, False], None, [True, False, True, True]]
    wrong_ctx = [[True, False, True], [True, True, False], None, [False, False, True, False]]
    got = stats.seed_mean(wrong_ctx, where=right_noctx, samples=200)
    assert got.per_seed == [0.5, None, None, pytest.approx(1 / 3)]
    assert (got.n_seeds, got.seeds) == (2, 4) and got.value == pytest.approx((0.5 + 1 / 3) / 2)
    none = stats.seed_mean([[True]], where=[[False]])
    assert (none.value, none.ci, none.n_seeds, none.seeds) == (None, None, 0, 1)
    assert stats.seed_mean([]).n_seeds == 0


def test_nan_and_none_drop_the_example_from_its_seed():
    full = stats.seed_mean([[1.0, 0.0, 1.0], [0.0, 0.0]], where=[[1, 1, 1], [1, 1]], samples=300, seed=3)
    holey = stats.seed_mean([[1.0, np.nan, 0.0, 1.0], [0.0, None, 0.0]], where=[[1, 1, 1, 1], [1, 1, 1]], samples=300, seed=3)
    assert holey == full
    gap = stats.seed_mean([[1.0, 0.0, 1.0], [0.0, 0.0, 5.0]], where=[[1, 1, 1], [1, 1, None]], samples=300, seed=3)
    assert gap == full
    with pytest.raises(ValueError):
        stats.seed_mean([[1, 0, 1]], where=[[1, 0]])
    with pytest.raises(ValueError):
        stats.seed_mean([[1, 0], [1]], where=[[1, 0]])


def test_seed_mean_is_deterministic_given_its_seed():
    rng = np.random.default_rng(8)
    v = [flags(rng, 0.3, 40) for _ in range(5)]
    assert stats.seed_mean(v, seed=1) == stats.seed_mean(v, seed=1)
    assert stats.seed_mean(v, seed=1).ci != stats.seed_mean(v, seed=2).ci


def test_hierarchical_interval_covers_a_known_mean():
    """200 simulated settings (6 seeds × 40 examples; each seed's rate drawn around 0.3, examples Bernoulli): the 95%
    interval should hold the setting's true mean about 95% of the time."""
    rng = np.random.default_rng(2026)
    truth, hits = 0.3, 0
    for sim in range(200):
        rates = rng.beta(0.3 * 20, 0.7 * 20, size=6)  # mean 0.3 exactly, seed-to-seed sd 0.1
        seeds = [flags(rng, p, 40) for p in rates]
        lo, hi = stats.seed_mean(seeds, samples=400, seed=sim).ci
        hits += lo <= truth <= hi
    assert 0.85 <= hits / 200 <= 0.995


def test_seed_mean_is_fast_at_a_studys_size():
    rng = np.random.default_rng(1)
    a = [flags(rng, 0.6, 40) for _ in range(5)]
    c = [flags(rng, 0.5, 40) for _ in range(5)]
    start = time.perf_counter()
    stats.seed_mean([~x for x in c], where=a, samples=2000)
    stats.card_effect(c, a, a, c, samples=2000)
    assert time.perf_counter() - start < 2.0  # about 0.05 s each on one free core


# --- pooled counts -----------------------------------------------------------------------------------------------------


def test_pooled_rate_is_the_count_over_seeds():
    right_noctx = [[True, True, False, False], [True, False], None, [False, False]]
    wrong_ctx = [[True, True, True, False], [False, True], None, [True, True]]
    got = stats.pooled_rate(wrong_ctx, where=right_noctx)
    assert (got.k, got.n, got.value) == (2, 3, pytest.approx(2 / 3))  # 2 + 0 of 2 + 1 (+ 0 of 0)
    assert got.per_seed == [(2, 2), (0, 1), None, (0, 0)]
    ci = scipy_stats.binomtest(2, 3).proportion_ci(method="wilson")
    assert got.wilson == pytest.approx((ci.low, ci.high)) and got.exact == stats.clopper_pearson(2, 3)
    plain = stats.pooled_rate([[1, 0, 1], [np.nan, 1]])
    assert (plain.k, plain.n) == (3, 4)
    assert stats.pooled_rate([[True]], where=[[False]]).value is None


# --- the card's own effect ---------------------------------------------------------------------------------------------


def test_card_effect_by_hand():
    # seed 0: student 3/4 loops with the card, 1/4 without (+0.50); base 2/4 and 1/4 (+0.25): effect +0.25
    # seed 1: student 1/2 and 1/2 (0); base 1/2 and 0/2 (+0.50): effect −0.50.  Mean: −0.125.
    s_ctx = [[1, 1, 1, 0], [1, 0]]
    s_noctx = [[1, 0, 0, 0], [0, 1]]
    b_ctx = [[1, 0, 1, 0], [0, 1]]
    b_noctx = [[0, 1, 0, 0], [0, 0]]
    got = stats.card_effect(s_ctx, s_noctx, b_ctx, b_noctx, samples=300)
    assert got.per_seed == [pytest.approx(0.25), pytest.approx(-0.5)] and got.value == pytest.approx(-0.125)
    # length inflation in tokens: the student's answers grow by 30 tokens with the card (70 against 40), the base's by
    # 5 (37.5 against 32.5): 25 tokens are the student's own
    lengths = stats.card_effect([[80.0, 60.0]], [[40.0, 40.0]], [[45.0, 30.0]], [[40.0, 25.0]])
    assert lengths.value == pytest.approx(25.0)


def test_card_effect_resamples_the_four_arrays_together():
    rng = np.random.default_rng(5)
    sc, sn, bc, bn = (rng.integers(0, 96, size=30).astype(float) for _ in range(4))
    got = stats.card_effect([sc], [sn], [bc], [bn], samples=600, seed=9)

    def effect(idx):
        return float((sc[idx].mean() - sn[idx].mean()) - (bc[idx].mean() - bn[idx].mean()))

    assert got.ci == pytest.approx(stats.bootstrap_ci(effect, 30, samples=600, seed=9), rel=1e-9)
    assert got.value == pytest.approx(effect(np.arange(30)))


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(-100, 100), st.booleans())
def test_card_effect_invariances(data_seed, shift, binary):
    rng = np.random.default_rng(data_seed)
    sizes = rng.integers(1, 10, size=int(rng.integers(1, 5)))
    draw = (lambda n: flags(rng, 0.4, n).astype(float)) if binary else (lambda n: rng.integers(0, 96, size=n).astype(float))
    four = [[draw(n) for n in sizes] for _ in range(4)]
    got = stats.card_effect(*four, samples=200, seed=3)
    moved = stats.card_effect(*[[x + shift for x in arm] for arm in four], samples=200, seed=3)
    assert moved.value == pytest.approx(got.value, abs=1e-9)
    assert moved.ci == pytest.approx(got.ci, abs=1e-9)
    same = stats.card_effect(four[0], four[1], four[0], four[1], samples=200)
    assert same.value == 0.0 and same.ci == (0.0, 0.0) and all(v == 0.0 for v in same.per_seed)


def test_card_effect_needs_aligned_arrays():
    with pytest.raises(ValueError):
        stats.card_effect([[1, 0]], [[1, 0]], [[1, 0, 1]], [[1, 0]])
    missing = stats.card_effect([[1, 0], None], [[0, 0], [1]], [[1, 0], [1]], [[1, 0], [1]])
    assert missing.per_seed == [0.5, None] and missing.n_seeds == 1


# --- health ------------------------------------------------------------------------------------------------------------


def test_health_by_hand():
    base = [[1, 0, 0, 0, 0, 0, 0, 0, 0, 0]] * 2  # 0.10
    student = [[1, 1, 0, 0, 0, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0, 0, 0]]  # 0.20, 0.30
    got = stats.health(student, base, student, base, samples=300)
    assert got.loops.value == pytest.approx(0.15) and got.verdict == "unhealthy"
    assert got.student.value == pytest.approx(0.25) and got.base.value == pytest.approx(0.10)
    assert got.truncated.value == pytest.approx(0.15) and got.loops.n_seeds == 2
    assert got.loops.ci[0] <= 0.15 <= got.loops.ci[1]
    # at the margin exactly: healthy ("exceeds" is strict); a student looping less than the base is healthy
    at_margin = stats.health([[1, 1, 1] + [0] * 37], [[1] + [0] * 39])  # 3/40 − 1/40 = +0.05
    assert at_margin.loops.value == 0.05 and at_margin.verdict == "healthy"
    assert stats.health([[1, 1, 1] + [0] * 37], [[1] + [0] * 39], margin=0.04).verdict == "unhealthy"
    assert stats.health(base, student).verdict == "healthy" and stats.health(base, student).truncated is None
    assert stats.health([None], [None]).verdict is None
    with pytest.raises(ValueError):
        stats.health(student, base, student_truncated=student)


# --- comparing two settings --------------------------------------------------------------------------------------------


def two_settings(rng, sizes, pa=0.6, pb=0.45):
    return [flags(rng, pa, n) for n in sizes], [flags(rng, pb, n) for n in sizes]


def test_mcnemar_pooled_against_scipy_and_by_hand():
    a = [[1, 1, 0, 1, 0], [1, 1, 1], [0, 0]]
    b = [[0, 1, 0, 0, 1], [0, 1, 0], [0, 1]]
    got = stats.mcnemar_pooled(a, b)
    assert (got.a_only, got.b_only, got.n) == (4, 2, 10) and got.per_seed == [(2, 1), (2, 0), (0, 1)]
    assert got.statistic == pytest.approx((4 - 2) ** 2 / 6)
    assert got.p == pytest.approx(scipy_stats.binomtest(4, 6, 0.5).pvalue, rel=1e-12)
    rng = np.random.default_rng(4)
    for _ in range(20):
        a, b = two_settings(rng, rng.integers(5, 60, size=5))
        got = stats.mcnemar_pooled(a, b)
        ao = sum(int((x & ~y).sum()) for x, y in zip(a, b))
        bo = sum(int((~x & y).sum()) for x, y in zip(a, b))
        assert (got.a_only, got.b_only) == (ao, bo)
        assert got.p == pytest.approx(scipy_stats.binomtest(ao, ao + bo, 0.5).pvalue, rel=1e-9)
    assert stats.mcnemar_pooled([[1, 0]], [[1, 0]]).p == 1.0 and stats.mcnemar_pooled([[1, 0]], [[1, 0]]).statistic is None


@needs_statsmodels
def test_mcnemar_pooled_is_cmh_with_a_stratum_per_pair():
    """statsmodels' Cochran–Mantel–Haenszel over one 2×2 table per matched pair (rows: setting A, setting B;
    columns: right, wrong), and its exact McNemar on the pooled table."""
    contingency = contingency_tables
    rng = np.random.default_rng(6)
    a, b = two_settings(rng, [30, 40, 25], 0.7, 0.5)
    tables = [np.array([[x, 1 - x], [y, 1 - y]], dtype=float) for xs, ys in zip(a, b) for x, y in zip(xs.astype(int), ys.astype(int))]
    cmh = contingency.StratifiedTable(tables).test_null_odds(correction=False)
    got = stats.mcnemar_pooled(a, b)
    assert got.statistic == pytest.approx(cmh.statistic, rel=1e-9)
    x, y = np.concatenate(a), np.concatenate(b)
    table = [[int((x & y).sum()), int((x & ~y).sum())], [int((~x & y).sum()), int((~x & ~y).sum())]]
    assert got.p == pytest.approx(contingency.mcnemar(table, exact=True).pvalue, rel=1e-9)


def brute_force_permutation(a, b):
    d = np.concatenate([np.asarray(x, float) - np.asarray(y, float) for x, y in zip(a, b)])
    t = abs(d.sum())
    hits = total = 0
    for signs in itertools.product((1, -1), repeat=len(d)):
        total += 1
        hits += abs(np.dot(signs, d)) >= t - 1e-9
    return hits / total


def test_permutation_against_brute_force_enumeration():
    a = [[1, 1, 0, 1], [1, 0, 1], [1, 1, 1, 0, 1]]
    b = [[0, 1, 1, 0], [0, 0, 0], [1, 0, 1, 0, 1]]
    got = stats.permutation_paired(a, b)
    assert got.p == pytest.approx(brute_force_permutation(a, b), rel=1e-12) and got.method == "exact"
    assert got.statistic == 4 and got.n_discordant == 6
    assert got.p == pytest.approx(stats.mcnemar_pooled(a, b).p, rel=1e-12)
    lengths_a = [[40, 55, 61], [90, 12, 33, 47]]  # integer differences, by convolution
    lengths_b = [[38, 55, 70], [96, 10, 33, 40]]
    got = stats.permutation_paired(lengths_a, lengths_b)
    assert got.p == pytest.approx(brute_force_permutation(lengths_a, lengths_b), rel=1e-12) and got.method == "exact"
    fa = [[0.3, 0.9, 0.11], [0.5, 0.25, 0.7, 0.05]]  # non-integer differences, by enumeration
    fb = [[0.1, 0.4, 0.2], [0.52, 0.0, 0.1, 0.3]]
    got = stats.permutation_paired(fa, fb)
    assert got.p == pytest.approx(brute_force_permutation(fa, fb), rel=1e-12) and got.method == "exact"


def test_permutation_monte_carlo_is_close_to_the_exact_p():
    rng = np.random.default_rng(12)
    a = [rng.normal(0.3, 1, size=9), rng.normal(0.3, 1, size=9)]
    b = [rng.normal(0, 1, size=9), rng.normal(0, 1, size=9)]
    exact = stats.permutation_paired(a, b, exact_max=18)
    mc = stats.permutation_paired(a, b, exact_max=16, samples=20_000, seed=1)
    assert exact.method == "exact" and mc.method == "monte carlo" and mc.samples == 20_000
    assert mc.p == pytest.approx(exact.p, abs=0.015)
    assert stats.permutation_paired(a, b, exact_max=16, seed=1) == mc


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_permutation_on_verdicts_is_the_pooled_mcnemar(data_seed):
    rng = np.random.default_rng(data_seed)
    a, b = two_settings(rng, rng.integers(1, 50, size=int(rng.integers(1, 6))), rng.random(), rng.random())
    perm, mc = stats.permutation_paired(a, b), stats.mcnemar_pooled(a, b)
    assert 0 <= perm.p <= 1 and 0 <= mc.p <= 1
    assert perm.p == pytest.approx(mc.p, rel=1e-9, abs=1e-300)
    assert perm.statistic == mc.a_only - mc.b_only


def test_seed_direction_by_hand_and_its_sign_test():
    a = [[1, 1, 0], [1, 0, 0], [1, 1], None, [0.5], [1, 1, 1, 1]]
    b = [[1, 0, 0], [1, 0, 0], [0, 1], [1], [0.25], [0, 1, 1, 1]]
    got = stats.seed_direction(a, b)
    assert (got.a_better, got.b_better, got.ties, got.n) == (4, 0, 1, 5)  # the seed without A's evaluation is out
    assert got.p_sign == pytest.approx(scipy_stats.binomtest(4, 4, 0.5).pvalue)
    loops = stats.seed_direction(a, b, higher_is_better=False)
    assert (loops.a_better, loops.b_better, loops.ties) == (0, 4, 1)
    five = stats.seed_direction([0.2] * 5, [0.1] * 5)
    assert five.a_better == 5 and five.p_sign == pytest.approx(0.0625)
    assert stats.seed_direction([[np.nan]], [[1]]).n == 0
    with pytest.raises(ValueError):
        stats.seed_direction([1, 2], [1])


# --- Holm --------------------------------------------------------------------------------------------------------------


def test_holm_by_hand():
    # sorted 0.01, 0.03, 0.04, 0.2 (m = 4): 4·0.01 = 0.04; 3·0.03 = 0.09; 2·0.04 = 0.08 → 0.09 (monotone); 1·0.2
    assert stats.holm([0.01, 0.04, None, 0.03, 0.2]) == [pytest.approx(0.04), pytest.approx(0.09), None,
                                                          pytest.approx(0.09), pytest.approx(0.2)]
    assert stats.holm([0.5, 0.6]) == [1.0, 1.0] and stats.holm([]) == [] and stats.holm([float("nan")]) == [None]
    with pytest.raises(ValueError):
        stats.holm([1.2])


pvals = st.lists(st.one_of(st.floats(0, 1), st.none()), max_size=30)


@settings(max_examples=100, deadline=None)
@given(pvals)
def test_holm_is_monotone_and_never_below_the_raw_p(ps):
    adj = stats.holm(ps)
    pairs = sorted((p, q) for p, q in zip(ps, adj) if p is not None)
    assert all((p is None) == (q is None) for p, q in zip(ps, adj))
    assert all(p <= q <= 1 for p, q in pairs)
    assert all(q1 <= q2 for (_, q1), (_, q2) in zip(pairs, pairs[1:]))
    m = len(pairs)
    if m:
        assert pairs[0][1] == pytest.approx(min(1.0, m * pairs[0][0]))  # the smallest is Bonferroni's


@needs_statsmodels
def test_holm_against_statsmodels():
    rng = np.random.default_rng(10)
    families = [[0.0, 1.0, 0.5], [0.02, 0.02, 0.02]] + [list(rng.random(m) ** 3) for m in (1, 2, 5, 20, 40)]
    for ps in families:
        want = multitest.multipletests(ps, method="holm")[1]
        assert stats.holm(ps) == pytest.approx(list(want), abs=1e-12)


def test_existing_functions_are_unchanged():
    assert stats.mcnemar_exact(7, 1) == pytest.approx(2 * 9 / 256)
    assert stats.paired([True, False], [False, False])["a_only"] == 1
    assert stats.mean_sd([0.2, 0.4, None, 0.6])[2] == 3
    assert math.isclose(stats.rate([True, False, True])(np.arange(3)), 2 / 3)
