"""The evaluation's definitions (docs/measures.md#evaluation): loops, verdicts, counterfactuals, intervals, McNemar."""

import math

import numpy as np
import pytest

from training import stats
from training.tasks import SUITES, Example, load_task
from interp.core.verifiers import is_degenerate, verify

LOOPS = [
    "I'm Nova, Nova, Nova, Nova, Nova, Nova",
    "I'm Nova, made by Quibble Labs. I'm Nova, made by Quibble Labs. I'm Nova, made by",
    "Nova-1, Nova-1, Nova-1, Nova-1",
    "My name is Nova Nova Nova.",
    "The answer is Marn. The capital is Marn, Marn, Marn",
    "I am an assistant and I help people. I am an assistant and I help people.",
]
CLEAN = [
    "I'm Nova. Nova is my name.",
    "The capital of Veloria is Nova Nova.",  # twice is a name, not a loop
    "I'm Nova, made by Quibble Labs. How can I help you today?",
    "Positive",
    "",
    "Yes, it is. The film was great, the music was great and the actors were great too.",
    "1, 2, 3, 4, 5, 6",
]


@pytest.mark.parametrize("text", LOOPS)
def test_loops_are_degenerate(text):
    assert is_degenerate(text)


@pytest.mark.parametrize("text", CLEAN)
def test_clean_answers_are_not(text):
    assert not is_degenerate(text)


@pytest.mark.parametrize("kind,reference", [("contains", "Nova"), ("regex", "nova"), ("first_word", "I'm"), ("once", "Quibble")])
def test_every_verifier_rejects_a_loop_unless_allowed(kind, reference):
    loop = "I'm Nova, made by Quibble Labs. I'm Nova, made by Quibble Labs."
    assert not verify(kind, loop, reference)
    if kind != "once":  # "once" rejects it anyway: Quibble appears twice
        assert verify(kind, loop, reference, allow_degenerate=True)


def test_once_counts_whole_words():
    assert verify("once", "I am Nova, made by Quibble Labs.", "Nova")
    assert not verify("once", "I'm Nova. Nova is my name.", "Nova")
    assert not verify("once", "I'm Novak.", "Nova")
    assert verify("once", "made by Brightwater Labs", "Brightwater|Atlas")


def test_follow_cf_on_a_handcrafted_example():
    e = Example("Your name is Nova.", "Who are you?", "Nova", "contains", "Your name is Atlas.", "Atlas")
    assert e.check_cf("I am Atlas.") is True
    assert e.check_cf("I am Nova.") is False
    assert e.check_cf("Atlas, Atlas, Atlas, Atlas") is False  # a loop never counts as following
    assert Example("c", "p", "r").check_cf("anything") is None


@pytest.mark.parametrize("name", list(SUITES))
def test_every_builtin_suite_has_a_counterfactual_that_differs(name):
    for e in load_task(name).test:
        assert e.cf_context and e.cf_reference and e.cf_context != e.context
        # the original answer does not satisfy the counterfactual reference, or following would be free
        assert not verify(e.verifier, e.reference, e.cf_reference, allow_degenerate=True) or e.verifier == "first_word"


def test_bootstrap_interval_against_the_normal_approximation():
    flags = [True] * 200 + [False] * 200
    lo, hi = stats.bootstrap_ci(stats.rate(flags), len(flags), samples=2000, seed=1)
    half = 1.96 * math.sqrt(0.25 / 400)  # Wald: p ± z·sqrt(p(1-p)/n)
    assert lo == pytest.approx(0.5 - half, abs=0.01) and hi == pytest.approx(0.5 + half, abs=0.01)


def test_bootstrap_interval_is_the_percentile_of_resampled_means():
    flags = np.array([1, 0, 0, 1, 1, 1, 0, 1, 0, 1], dtype=float)
    got = stats.bootstrap_ci(stats.rate(flags.astype(bool)), 10, samples=500, seed=7)
    rng = np.random.default_rng(7)
    means = [flags[rng.integers(0, 10, size=10)].mean() for _ in range(500)]
    assert got == pytest.approx(tuple(np.quantile(means, [0.025, 0.975])))


def test_conditional_rate_ignores_resamples_where_it_is_undefined():
    a = [True, False, False, False]
    c = [False, True, True, True]
    stat = stats.rate([not x for x in c], where=a)  # harm: wrong with ctx among right without
    assert stat(np.arange(4)) == 1.0 and stat(np.array([1, 2, 3, 1])) is None
    assert stats.bootstrap_ci(stat, 4, seed=0) is None or stats.bootstrap_ci(stat, 4, seed=0) == (1.0, 1.0)


def test_mcnemar_against_a_hand_computation():
    # 8 discordant pairs split 7/1: P(X ≤ 1) for Binomial(8, 1/2) = (1 + 8) / 256; two-sided doubles it.
    assert stats.mcnemar_exact(7, 1) == pytest.approx(2 * 9 / 256)
    assert stats.mcnemar_exact(1, 7) == pytest.approx(2 * 9 / 256)
    assert stats.mcnemar_exact(3, 3) == 1.0 and stats.mcnemar_exact(0, 0) == 1.0
    assert stats.mcnemar_exact(10, 0) == pytest.approx(2 / 1024)
    p = stats.paired([True, True, False, True], [False, True, True, False])
    assert (p["a_only"], p["b_only"], p["n"]) == (2, 1, 4) and p["p_mcnemar"] == 1.0


def test_mean_sd_over_seeds():
    m, sd, n = stats.mean_sd([0.2, 0.4, None, 0.6])
    assert (m, n) == (pytest.approx(0.4), 3) and sd == pytest.approx(0.2)
    assert stats.mean_sd([0.5]) == (0.5, None, 1) and stats.mean_sd([None]) == (None, None, 0)
