"""The study's seed-level results from hand-made evaluation rows: each number against a hand computation. Also the
verdicts at several budgets, the no-context turn, the loop detector's two rules and the training horizon rule."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest

from interp.core.errors import UserError
from interp.core.runs import ExampleRow
from training import stats
from training.study.seed_level import align, column, compare, measure_model, measure_setting, shared_examples, sign_flip_per_example

_PROMPTS = itertools.count()


def _row(i: int, *, a: bool, c: bool, la: bool = False, lc: bool = False, len_a: int = 5, len_c: int = 5,
         follow: bool | None = None, loop_cf: bool | None = None, stubborn: bool | None = None,
         prompt: str | None = None) -> ExampleRow:
    """A judged row; each row its own prompt unless `prompt` is given (seeds that share examples share prompts)."""
    judged = {"correct_noctx": a, "correct_ctx": c, "degenerate_noctx": la, "degenerate_ctx": lc, "truncated_noctx": False,
              "truncated_ctx": False, "len_noctx": len_a, "len_ctx": len_c, "loop_short_noctx": la, "loop_short_ctx": lc,
              "loop_clause_noctx": False, "loop_clause_ctx": False, "follow_cf": follow, "degenerate_cf": loop_cf,
              "stubborn_cf": stubborn, "truncated_cf": None if follow is None else False, "len_cf": None,
              "loop_short_cf": loop_cf, "loop_clause_cf": None if loop_cf is None else False}
    return ExampleRow(model="m", example=i, context="c", prompt=prompt or f"p{next(_PROMPTS)}", reference="r", verifier="contains", response_noctx="",
                      response_ctx="", ids_noctx=[1] * len_a, ids_ctx=[1] * len_c, correct_noctx=a, correct_ctx=c,
                      degenerate_noctx=la, degenerate_ctx=lc, truncated_noctx=False, truncated_ctx=False,
                      follow_cf=follow, degenerate_cf=loop_cf, stubborn_cf=stubborn, budgets={"8": judged})


def test_card_effect_health_harm_and_follow_by_hand():
    # seed 0: 4 examples; seed 1: 4 examples. Student loops with the card more than the base does.
    base = {0: [_row(0, a=True, c=True), _row(1, a=True, c=True), _row(2, a=False, c=True, lc=True), _row(3, a=False, c=False)],
            1: [_row(0, a=True, c=True), _row(1, a=False, c=True), _row(2, a=True, c=True), _row(3, a=False, c=False)]}
    student = {0: [_row(0, a=True, c=False, lc=True, len_c=9), _row(1, a=True, c=True), _row(2, a=True, c=False, lc=True, la=True),
                   _row(3, a=False, c=False, follow=True, loop_cf=False)],
               1: [_row(0, a=True, c=False, lc=True, follow=False, loop_cf=True), _row(1, a=True, c=True, follow=True, loop_cf=False),
                   _row(2, a=True, c=True, stubborn=True, follow=False, loop_cf=False), _row(3, a=False, c=False)]}
    out = measure_setting(student, base, 8, 8, margin=0.05)
    # loops: student ctx − noctx per seed: seed 0 (2/4 − 1/4) = 0.25, seed 1 (1/4 − 0) = 0.25;
    # base: seed 0 (1/4 − 0) = 0.25, seed 1 0 → card effect = mean(0.25 − 0.25, 0.25 − 0) = 0.125
    assert out["card_effect"]["loops"]["value"] == pytest.approx(0.125)
    # acc: student seed 0 (1/4 − 3/4) = −0.5, seed 1 (2/4 − 3/4) = −0.25; base seed 0 (3/4 − 2/4) = 0.25, seed 1 (3/4 − 2/4) = 0.25
    assert out["card_effect"]["acc"]["value"] == pytest.approx(((-0.5 - 0.25) + (-0.25 - 0.25)) / 2)
    # length: only student seed 0 example 0 is longer with the card (+4 over 4 examples = +1), base 0
    assert out["card_effect"]["len"]["value"] == pytest.approx((1.0 + 0.0) / 2)
    lo, hi = out["card_effect"]["loops"]["ci"]
    assert lo <= 0.125 <= hi
    # health: no-card loops student − base: seed 0 1/4 − 0, seed 1 0 − 0 → 0.125 > 0.05: unhealthy
    assert out["health"]["loops"]["value"] == pytest.approx(0.125) and out["health"]["verdict"] == "unhealthy"
    # harm pooled: right without the card: seed 0 {0,1,2}, seed 1 {0,1,2}; wrong with it: seed 0 {0,2}, seed 1 {0} → 3/6
    assert (out["harm"]["k"], out["harm"]["n"]) == (3, 6) and out["harm"]["pooled"] == pytest.approx(0.5)
    assert out["harm"]["value"] == pytest.approx((2 / 3 + 1 / 3) / 2)
    # follow_cf among clean counterfactual answers: seed 0 {3: follows} = 1.0; seed 1 clean {1: yes, 2: no} = 0.5
    assert out["follow_cf_clean"]["value"] == pytest.approx(0.75)
    assert out["follow_cf"]["value"] == pytest.approx((1.0 + 1 / 3) / 2)  # every counterfactual answer, loops included
    assert out["loops_cf"]["value"] == pytest.approx((0.0 + 1 / 3) / 2)
    assert out["stubborn_cf"]["value"] == pytest.approx(1.0) and out["stubborn_cf"]["seeds"] == 1
    # ctx_drop: base acc_ctx − student acc_ctx per seed: (3/4 − 1/4), (3/4 − 2/4)
    assert out["ctx_drop"]["value"] == pytest.approx((0.5 + 0.25) / 2)
    # the base measured alone: its own rates, and the student equal to the base has no card effect at all
    same = measure_setting(base, base, 8, 8)
    assert all(same["card_effect"][k]["value"] == 0 for k in ("loops", "acc", "len"))
    assert same["health"]["verdict"] == "healthy" and same["follow_cf_vs_base"] is None
    assert measure_model(base, 8, 8)["acc_ctx"]["value"] == pytest.approx(0.75)


def test_comparison_pools_over_seeds():
    a = {0: [_row(i, a=True, c=i < 3) for i in range(4)], 1: [_row(i, a=True, c=i < 2) for i in range(4)]}
    b = {0: [_row(i, a=True, c=i < 1) for i in range(4)], 1: [_row(i, a=True, c=i < 1) for i in range(4)]}
    c = compare(a, b, "correct_ctx", 8, 8)
    assert (c["a_only"], c["b_only"], c["n"]) == (3, 0, 8)
    assert c["p"] == pytest.approx(2 * 0.5**3)  # exact: 2·P(Bin(3, ½) ≤ 0)
    assert (c["a_better_seeds"], c["b_better_seeds"], c["tied_seeds"]) == (2, 0, 0)


def test_seeds_that_share_their_examples_are_crossed_not_nested():
    # A suite file with a fixed split judges every seed on the same prompts. A second seed identical to the first then
    # adds no evidence: the comparison's p and the interval's width stay those of one seed, where treating the two
    # seeds' examples as independent would halve p's evidence threshold and narrow the interval by about √2.
    flags_a = [i % 3 != 0 for i in range(30)]
    flags_b = [i % 5 == 0 for i in range(30)]
    one_a = [_row(i, a=True, c=f, prompt=f"q{i}") for i, f in enumerate(flags_a)]
    one_b = [_row(i, a=True, c=f, prompt=f"q{i}") for i, f in enumerate(flags_b)]
    a, b = {0: one_a, 1: one_a}, {0: one_b, 1: one_b}
    assert shared_examples(a, b) and not shared_examples({0: one_a}, {0: one_b})
    other = {0: one_a, 1: [_row(i, a=True, c=f) for i, f in enumerate(flags_a)]}  # seed 1 judged on other prompts
    assert not shared_examples(other)
    single = compare({0: one_a}, {0: one_b}, "correct_ctx", 8, 8)
    crossed = compare(a, b, "correct_ctx", 8, 8)
    assert single["test"] == "mcnemar_pooled" and crossed["test"] == "sign_flip_per_example"
    assert crossed["p"] == pytest.approx(single["p"])  # the same evidence, the same p
    assert (crossed["a_only"], crossed["b_only"]) == (2 * single["a_only"], 2 * single["b_only"])
    assert stats.mcnemar_pooled([column(one_a, "correct_ctx", 8, 8)] * 2, [column(one_b, "correct_ctx", 8, 8)] * 2).p < single["p"] / 2
    # the interval: as wide as one seed's when crossed; about 1/√2 as wide when each seed's examples are redrawn apart
    col = column(one_a, "correct_ctx", 8, 8)
    width = lambda m: m.ci[1] - m.ci[0]  # noqa: E731
    w1 = width(stats.seed_mean([col], samples=4000))
    w_crossed = width(stats.seed_mean([col, col], samples=4000, shared=True))
    w_nested = width(stats.seed_mean([col, col], samples=4000))
    assert w_crossed == pytest.approx(w1, rel=0.12) and w_nested == pytest.approx(w1 / math.sqrt(2), rel=0.15)
    # measure_model detects the sharing; values are the same either way, and an undefined example weighs nothing
    crossed_rates = measure_model(a, 8, 8)
    assert crossed_rates["acc_ctx"]["value"] == pytest.approx(sum(flags_a) / 30)
    assert width_of(crossed_rates["acc_ctx"]) == pytest.approx(width_of(measure_model({0: one_a}, 8, 8)["acc_ctx"]), rel=0.12)
    holes = col.copy()
    holes[:10] = float("nan")
    got = stats.seed_mean([holes, col], shared=True)
    assert got.per_seed == pytest.approx([sum(flags_a[10:]) / 20, sum(flags_a) / 30])
    setting = measure_setting(a, b, 8, 8)
    # card effect on accuracy: (ctx − no ctx) of a minus that of b; every answer is right without the card
    assert setting["shared_examples"] and setting["card_effect"]["acc"]["value"] == pytest.approx((sum(flags_a) - sum(flags_b)) / 30)
    assert setting["health"]["verdict"] == "healthy" and setting["health"]["loops"]["value"] == 0


def test_seeds_that_share_part_of_their_examples_are_crossed_over_the_union():
    # A suite drawn per seed from a finite pool: seeds 0 and 1 share 20 of their 30 prompts (in another order), seed 2
    # shares 10 with seed 0. The union has 30 + 10 + 20 = 60 examples; each seed's rows sit at their prompt's position.
    rng = __import__("random").Random(3)
    flags = {f"q{i}": (rng.random() < 0.6, rng.random() < 0.4) for i in range(60)}
    prompts = {0: [f"q{i}" for i in range(30)], 1: [f"q{i}" for i in range(39, 9, -1)], 2: [f"q{i}" for i in (*range(20, 30), *range(40, 60))]}

    def rows(model: int) -> dict:
        return {s: [_row(j, a=True, c=flags[q][model], prompt=q) for j, q in enumerate(qs)] for s, qs in prompts.items()}

    a, b = rows(0), rows(1)
    assert shared_examples(a) and shared_examples(a, b)
    assert not shared_examples({0: a[0], 1: [_row(j, a=True, c=True) for j in range(30)]})  # other prompts: nested
    la, lb = align(a, b)
    assert {len(v) for v in (*la.values(), *lb.values())} == {60}
    assert [r.prompt for r in la[0][:30]] == prompts[0]  # the first seed keeps its order
    assert {r.prompt for r in la[1] if r is not None} == set(prompts[1]) and sum(r is None for r in la[1]) == 30
    assert align(la, lb) == [la, lb]  # aligning aligned rows changes nothing
    # values are the per-seed means, as nested
    m = measure_model(a, 8, 8)
    assert m["acc_ctx"]["value"] == pytest.approx(sum(sum(flags[q][0] for q in qs) / 30 for qs in prompts.values()) / 3)
    assert m["acc_ctx"]["value"] == measure_model(a, 8, 8, shared=False)["acc_ctx"]["value"]
    # the comparison: one sign per example of the union, on the per-example sums over the seeds that have it
    sums = {q: [0, 0] for q in flags}
    for qs in prompts.values():
        for q in qs:
            sums[q][0] += flags[q][0]
            sums[q][1] += flags[q][1]
    by_hand = stats.permutation_paired([[v[0] for v in sums.values()]], [[v[1] for v in sums.values()]]).p
    c = compare(a, b, "correct_ctx", 8, 8)
    assert c["test"] == "sign_flip_per_example" and c["p"] == pytest.approx(by_hand)
    ya = [column(la[s], "correct_ctx", 8, 8) for s in sorted(la)]
    yb = [column(lb[s], "correct_ctx", 8, 8) for s in sorted(lb)]
    assert c["p"] == sign_flip_per_example(ya, yb)
    # a later seed judged on the first seed's examples in another order is laid out in the first seed's: the same
    # draws, the same interval as the same order
    same = {0: a[0], 1: [_row(j, a=True, c=flags[q][0], prompt=q) for j, q in enumerate(prompts[0])]}
    other_order = {0: a[0], 1: list(reversed(same[1]))}
    assert measure_model(other_order, 8, 8)["acc_ctx"]["ci"] == measure_model(same, 8, 8)["acc_ctx"]["ci"]
    # the interval lies between the nested one (every (seed, example) pair new) and one seed repeated three times
    nested = measure_model(a, 8, 8, shared=False)["acc_ctx"]
    assert width_of(m["acc_ctx"]) > width_of(nested)


def width_of(m: dict) -> float:
    return m["ci"][1] - m["ci"][0]


def test_rows_without_budgets_answer_at_the_full_budget_only():
    r = _row(0, a=True, c=False)
    r.budgets = None
    out = measure_model({0: [r]}, 8, 8)
    assert out["acc_noctx"]["value"] == 1.0 and out["len_ctx"]["value"] == 5
    assert measure_model({0: [r]}, 4, 8)["acc_noctx"] is None


def test_verdicts_at_a_budget_cut_the_same_answer(tokenizer):
    from training.evaluate import verdicts
    from training.tasks import Example

    e = Example("Your name is Luna.", "Who are you?", "Luna", "contains", "Your name is Orin.", "Orin")
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    dec = lambda x: tokenizer.decode(x, skip_special_tokens=True)  # noqa: E731
    a = ids("Hello there, I am an assistant and my name is Luna.")
    b = ids("Luna Luna Luna Luna Luna Luna Luna Luna Luna Luna Luna")
    c = ids("I am Luna, nice to meet you.")
    full = verdicts(e, a, b, c, 10_000, dec)
    assert full["correct_noctx"] and not full["correct_ctx"] and full["degenerate_ctx"] and full["loop_short_ctx"]
    assert not full["loop_clause_ctx"] and not full["truncated_noctx"] and full["len_noctx"] == len(a)
    assert full["follow_cf"] is False and full["stubborn_cf"] is True  # says the trained name under the other card
    short = verdicts(e, a, b, c, 3, dec)
    assert short["len_noctx"] == 3 and short["truncated_noctx"] and not short["correct_noctx"]  # "Luna" comes later


def test_loop_rules_and_loop_start(tokenizer):
    from interp.core.degenerate import is_degenerate, loop_rules, loop_start

    assert loop_rules("Nova, Nova, Nova") == (True, False)
    clause = "I'm Nova, made by Quibble Labs. I'm Nova, made by Quibble Labs."
    assert loop_rules(clause) == (False, True) and is_degenerate(clause)
    assert loop_rules("I'm Nova. Nova is my name.") == (False, False)
    ids = tokenizer("I like tea. Nova Nova Nova Nova Nova", add_special_tokens=False)["input_ids"]
    dec = lambda x: tokenizer.decode(x, skip_special_tokens=True)  # noqa: E731
    k = loop_start(ids, dec)
    assert k is not None and is_degenerate(dec(ids[:k])) and not is_degenerate(dec(ids[: k - 1]))
    assert loop_start(tokenizer("I like tea.", add_special_tokens=False)["input_ids"], dec) is None


@pytest.mark.parametrize("no_context", ["default", "neutral", "empty"])
@pytest.mark.parametrize("placement", ["system", "user"])
def test_no_context_turns_keep_the_pair_aligned(smol_tokenizer, no_context, placement):
    from interp.core.pairs import NEUTRAL_SYSTEM, render_prompt_pair

    pp = render_prompt_pair(smol_tokenizer, "Your name is Luna.", "Who are you?", placement, no_context=no_context)
    assert pp.ctx_ids[-pp.shared_len:] == pp.noctx_ids[-pp.shared_len:]
    noctx = smol_tokenizer.decode(pp.noctx_ids)
    assert ("SmolLM" in noctx) == (no_context == "default")
    assert (NEUTRAL_SYSTEM in noctx) == (no_context == "neutral")
    assert "Luna" not in noctx and "Luna" in smol_tokenizer.decode(pp.ctx_ids)


def test_unknown_no_context_is_a_one_line_error(tokenizer):
    from interp.core.pairs import render_prompt_pair
    from training.config import TrainConfig

    with pytest.raises(UserError, match="no_context"):
        render_prompt_pair(tokenizer, "c", "p", no_context="silent")
    with pytest.raises(UserError, match="--no-context"):
        TrainConfig(no_context="silent").check()


def test_a_study_judging_past_its_rollouts_is_refused(tmp_path):
    from training.study import load_study

    smoke = (Path(__file__).resolve().parents[1] / "studies" / "smoke.toml").read_text()
    short = smoke.replace("max_new_tokens = 8   #", "max_new_tokens = 4   #", 1)
    assert short != smoke
    f = tmp_path / "s.toml"
    f.write_text(short)
    with pytest.raises(UserError, match="never trained.*allow_longer_eval"):
        load_study(f)
    f.write_text("allow_longer_eval = true\n" + short)
    assert load_study(f).allow_longer_eval
    f.write_text("health_margin = 2\n" + smoke)
    with pytest.raises(UserError, match="health_margin"):
        load_study(f)
    assert math.isclose(load_study(Path(__file__).resolve().parents[1] / "studies" / "smoke.toml").health_margin, 0.05)


def test_loop_mask_keeps_looping_tokens_out_of_the_distillation_loss(tiny):
    """collate's keep mask drops the tokens from each pair's loop start; L_opd over it equals L_opd over the pairs'
    clean prefixes alone (the same token-mean, computed by hand)."""
    import torch

    from interp.core.pairs import pair_from_ids, render_prompt_pair
    from training.losses import reverse_kl
    from training.rollout import collate

    tok = tiny.tokenizer
    pp = render_prompt_pair(tok, "Your name is Luna.", "Who are you?", "user")
    pairs = [pair_from_ids(pp, ids, "c", "p", "r", "user") for ids in ([5, 6, 7, 8, 9, 10], [11, 12, 13])]
    batch = collate(pairs, 0, [2, None])
    assert batch.opd_keep.tolist() == [[1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]]
    assert batch.mask.tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]]
    torch.manual_seed(0)
    s, t = torch.randn(2, 6, 50), torch.randn(2, 6, 50)
    kept = reverse_kl(s, t, batch.mask * batch.opd_keep)
    ls, lt = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    per = (ls.exp() * (ls - lt)).sum(-1)
    by_hand = (per[0, :2].sum() + per[1, :3].sum()) / 5
    assert torch.allclose(kept, by_hand, atol=1e-6)
    assert collate(pairs, 0).opd_keep is None


def test_training_logs_rollout_health_and_takes_the_loop_mask(tmp_path):
    import json

    from training.config import TrainConfig
    from training.trainer import train

    cfg = TrainConfig(out=str(tmp_path / "run" / "s"), model="tiny-random-llama", task="persona", steps=2, batch_size=2,
                      max_new_tokens=6, n_test=2, checkpoint_every=0, loop_mask=True, no_context="neutral")
    result = train(cfg, progress=False)
    rows = [json.loads(x) for x in (result.out / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= r["rollout_loops"] <= 1 and 0 <= r["rollout_stopped"] <= 1 for r in rows)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["no_context"] == "neutral"


def test_the_training_bar_shows_the_loss_without_a_tracker(tmp_path):
    """The progress bar's loss, rollout length and loops show with no --report-to (they used to need a tracker)."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", "training", "train", "--model", "tiny-random-llama", "--task", "persona",
                          "--steps", "2", "--batch-size", "2", "--max-new-tokens", "4", "--n-test", "2", "--checkpoint-every", "0",
                          "--out", str(tmp_path / "run" / "s")], cwd=root, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "loss=" in out.stderr and "loops=" in out.stderr and "len=" in out.stderr


def test_stop_mask_keeps_the_final_stop_token_out_of_the_distillation_loss(tiny):
    """opd_cuts: the loop mask cuts from the loop's start, the stop mask cuts the last token of a rollout that ends
    in a stop token, both together the earlier of the two; a rollout that runs to the budget keeps its last token."""
    from interp.core.pairs import pair_from_ids, render_prompt_pair
    from training.rollout import collate
    from training.step import opd_cuts

    tok = tiny.tokenizer
    pp = render_prompt_pair(tok, "Your name is Luna.", "Who are you?", "user")
    stop = 2
    rows = ([5, 6, 7, 8, 9, stop], [11, 12, 13], [5, stop], [7, 7, 7, stop])
    pairs = [pair_from_ids(pp, ids, "c", "p", "r", "user") for ids in rows]
    starts = [None, None, None, 1]
    assert opd_cuts(pairs, starts, {stop}, loop_mask=False, stop_mask=False) is None
    assert opd_cuts(pairs, starts, {stop}, loop_mask=False, stop_mask=True) == [5, None, 1, 3]
    assert opd_cuts(pairs, starts, {stop}, loop_mask=True, stop_mask=False) == [None, None, None, 1]
    assert opd_cuts(pairs, starts, {stop}, loop_mask=True, stop_mask=True) == [5, None, 1, 1]
    batch = collate(pairs, 0, opd_cuts(pairs, starts, {stop}, loop_mask=False, stop_mask=True))
    assert batch.opd_keep.tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]]


def test_training_takes_the_stop_mask(tmp_path):
    import json

    from training.config import TrainConfig
    from training.trainer import train

    cfg = TrainConfig(out=str(tmp_path / "run" / "s"), model="tiny-random-llama", task="persona", steps=1, batch_size=2,
                      max_new_tokens=6, n_test=2, checkpoint_every=0, stop_mask=True, loop_mask=True)
    result = train(cfg, progress=False)
    assert json.loads((result.out / "train_config.json").read_text())["stop_mask"] is True
