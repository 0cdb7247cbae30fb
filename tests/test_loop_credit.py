"""Loop credit: the teacher's log-ratio on the student's own tokens, and the sign of one step of the loss on them,
each checked against an independent computation (a plain forward per rollout, a small step taken by hand)."""

import numpy as np
import pytest
import torch

from interp.core.generate import stop_ids
from interp.core.models import load_model
from interp.core.pairs import render_prompt_pair
from training import loop_credit as lc
from training.tasks import load_task


def _hand_reverse_kl(z, t):
    """Σ_t Σ_v p_s (log p_s − log p_t) over the full vocabulary, written out."""
    ls, lt = torch.log_softmax(z, -1), torch.log_softmax(t, -1)
    return (ls.exp() * (ls - lt)).sum()


def _hand_forward_kl(z, t):
    """Σ_t Σ_v p_t (log p_t − log p_s) over the full vocabulary, written out."""
    ls, lt = torch.log_softmax(z, -1), torch.log_softmax(t, -1)
    return (lt.exp() * (lt - ls)).sum()


@pytest.mark.parametrize("top_k,loss", [(None, "reverse_kl"), (11, "reverse_kl"), (None, "forward_kl")])
def test_change_is_the_first_order_effect_of_a_small_step(top_k, loss):
    g = torch.Generator().manual_seed(0)
    z, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    y = torch.randint(0, 11, (2, 5), generator=g)
    mask = torch.ones(2, 5)
    mask[1, 3:] = 0
    log_ratio, change = lc.token_credit(z, t, y, mask, top_k, loss)
    ls, lt = torch.log_softmax(z, -1), torch.log_softmax(t, -1)
    want = (lt.gather(-1, y[..., None]) - ls.gather(-1, y[..., None])).squeeze(-1) * mask
    assert torch.allclose(log_ratio, want, atol=1e-6)
    # A small gradient step on the hand-written loss, position by position, changes log p_S(y_t) by eps × change.
    zz = z.clone().requires_grad_(True)
    hand = _hand_reverse_kl if loss == "reverse_kl" else _hand_forward_kl
    (grad,) = torch.autograd.grad(hand(zz[mask.bool()], t[mask.bool()]), zz)
    eps = 1e-3
    stepped = torch.log_softmax(z - eps * grad, -1).gather(-1, y[..., None]).squeeze(-1)
    finite = (stepped - ls.gather(-1, y[..., None]).squeeze(-1)) / eps * mask
    assert torch.allclose(change, finite, atol=1e-3)
    assert (change[1, 3:] == 0).all() and (log_ratio[1, 3:] == 0).all()


@pytest.mark.parametrize("loss", ["reverse_kl", "forward_kl"])
def test_stop_mass_change_is_the_first_order_effect_of_a_small_step(loss):
    g = torch.Generator().manual_seed(1)
    z, t = torch.randn(2, 4, 9, generator=g), torch.randn(2, 4, 9, generator=g)
    mask = torch.ones(2, 4)
    mask[0, 2:] = 0
    stops = [7, 2]
    p_s, p_t, ratio, change = lc.stop_credit(z, t, stops, mask, None, loss)
    ls, lt = torch.log_softmax(z, -1), torch.log_softmax(t, -1)
    want_s = (ls[..., 2].exp() + ls[..., 7].exp()) * mask
    assert torch.allclose(p_s, want_s, atol=1e-6)
    assert torch.allclose(p_t, (lt[..., 2].exp() + lt[..., 7].exp()) * mask, atol=1e-6)
    assert torch.allclose(ratio, (torch.log(p_t + (1 - mask)) - torch.log(p_s + (1 - mask))), atol=1e-5)
    zz = z.clone().requires_grad_(True)
    hand = _hand_reverse_kl if loss == "reverse_kl" else _hand_forward_kl
    (grad,) = torch.autograd.grad(hand(zz[mask.bool()], t[mask.bool()]), zz)
    eps = 1e-3
    after = torch.log_softmax(z - eps * grad, -1)
    stepped = torch.log(after[..., 2].exp() + after[..., 7].exp())
    finite = (stepped - torch.log(ls[..., 2].exp() + ls[..., 7].exp())) / eps * mask
    assert torch.allclose(change, finite, atol=1e-3)
    assert (change[0, 2:] == 0).all()


def test_rollouts_scored_as_a_plain_forward_scores_them(tiny):
    task = load_task("persona_luna", seed=3, n_test=8)
    scored = lc.measure(tiny, task.train[:3], placement=task.placement, samples=2, max_new_tokens=6, seed=3, batch_size=4)
    assert len(scored) == 6
    tok = tiny.tokenizer
    jobs = [e for e in task.train[:3] for _ in range(2)]
    for r, e in zip(scored, jobs):  # one rollout at a time, no padding, no shared code with the batched path
        pp = render_prompt_pair(tok, e.context, e.prompt, task.placement, no_context="neutral")
        with torch.no_grad():
            s = torch.log_softmax(tiny.model(torch.tensor([list(pp.noctx_ids) + r.response_ids])).logits[0].float(), -1)
            t = torch.log_softmax(tiny.model(torch.tensor([list(pp.ctx_ids) + r.response_ids])).logits[0].float(), -1)
        n = len(r.response_ids)
        ys = torch.tensor(r.response_ids)
        ps = s[len(pp.noctx_ids) - 1 : len(pp.noctx_ids) - 1 + n].gather(-1, ys[:, None]).squeeze(-1)
        pt = t[len(pp.ctx_ids) - 1 : len(pp.ctx_ids) - 1 + n].gather(-1, ys[:, None]).squeeze(-1)
        assert np.allclose(r.log_ratio, (pt - ps).numpy(), atol=1e-4)
        assert np.allclose(r.p_student, ps.exp().numpy(), atol=1e-5)
        assert set(np.unique(r.raised)) <= {0.0, 1.0}
        assert r.stopped == (r.response_ids[-1] in set(stop_ids(tiny.model, tok)))
        stops = sorted(set(stop_ids(tiny.model, tok)))
        mass_s = s[len(pp.noctx_ids) - 1 : len(pp.noctx_ids) - 1 + n][:, stops].exp().sum(-1)
        mass_t = t[len(pp.ctx_ids) - 1 : len(pp.ctx_ids) - 1 + n][:, stops].exp().sum(-1)
        assert np.allclose(r.stop_mass[0], mass_s.numpy(), atol=1e-5)
        assert np.allclose(r.stop_mass[2], (mass_t.log() - mass_s.log()).numpy(), atol=1e-3)


def test_groups_split_every_token_once():
    rng = np.random.default_rng(0)

    def row(n, start, stopped=False):
        return lc.Scored(list(range(n)), start, stopped, *(rng.random(n) for _ in range(3)), (rng.random(n) > 0.5).astype(float))

    rows = [row(10, None), row(8, 3), row(6, None), row(9, 0), row(5, None, stopped=True)]
    groups = {g.group: g for g in lc.summarize(rows)}
    assert [groups[g].tokens for g in lc.GROUPS] == [16 + 4, 3, 5 + 9, 1]
    assert [groups[g].rollouts for g in lc.GROUPS] == [3, 1, 2, 1]  # a loop from token 0 has no "before" tokens
    assert groups["stop"].log_ratio == pytest.approx(rows[4].log_ratio[-1])
    loop = np.concatenate([rows[1].log_ratio[3:], rows[3].log_ratio])
    assert groups["loop"].log_ratio == pytest.approx(loop.mean())  # pooled over tokens
    assert groups["loop"].log_ratio_ci[0] <= groups["loop"].log_ratio <= groups["loop"].log_ratio_ci[1]
    assert groups["clean"].raised == pytest.approx(np.concatenate([rows[0].raised, rows[2].raised, rows[4].raised[:-1]]).mean())
    empty = lc.summarize([row(4, None)])
    assert empty[2].tokens == 0 and empty[2].log_ratio is None and empty[3].tokens == 0
    assert lc.STOP_MASS not in {g.group for g in empty}  # not measured: no row


def test_stop_mass_is_read_where_the_rollout_went_on():
    rng = np.random.default_rng(1)

    def row(n, stopped):
        mass = tuple(rng.random(n) for _ in range(4))
        return lc.Scored(list(range(n)), None, stopped, *(rng.random(n) for _ in range(4)), mass)

    rows = [row(6, True), row(4, False)]
    got = {g.group: g for g in lc.summarize(rows)}[lc.STOP_MASS]
    assert got.tokens == 5 + 4
    want = np.concatenate([rows[0].stop_mass[2][:-1], rows[1].stop_mass[2]]).mean()
    assert got.log_ratio == pytest.approx(want)


@pytest.mark.parametrize("args, says", [
    (["--run", "x"], "--run and --student go together"),
    (["--suite", "persona_luna"], "name the suite and seed"),
    (["--suite", "persona_luna", "--seed", "1", "--prompts", "0"], "--prompts must be at least 1"),
    (["--suite", "persona_luna", "--seed", "1", "--no-context", "odd"], "unknown --no-context"),
    (["--suite", "persona_luna", "--seed", "1", "--temperature", "-1"], "--temperature must be 0 (greedy) or more"),
    (["--suite", "persona_luna", "--seed", "1", "--temperature", "0", "--samples", "2"], "use --samples 1"),
    (["--suite", "persona_luna", "--seed", "1", "--loss", "ce"], "--loss must be reverse_kl or forward_kl"),
])
def test_bad_input_is_one_line(args, says, tmp_path):
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "training", "loop-credit", *args], capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    assert says in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_load_model_is_untouched_by_measure():
    lm = load_model("tiny-random-llama")
    task = load_task("facts", seed=0, n_test=8)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    lc.measure(lm, task.train[:2], placement=task.placement, samples=1, max_new_tokens=4)
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())
