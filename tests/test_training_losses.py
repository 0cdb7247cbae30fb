"""The losses against formulas written out here, the stop-gradient, top-k, and the λ schedule."""

import math

import pytest
import torch

from training.losses import consistency_kl, lam_at, reverse_kl


def _kl(p, q):
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))


def _softmax(row):
    m = max(row)
    e = [math.exp(x - m) for x in row]
    return [x / sum(e) for x in e]


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 7, generator=g)
    t = torch.randn(2, 3, 7, generator=g)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])  # row 2 has one real response token
    return s, t, mask


def _token_mean(s, t, mask, kl):
    vals = [kl(_softmax(s[b, i].tolist()), _softmax(t[b, i].tolist())) for b in range(2) for i in range(3) if mask[b, i]]
    return sum(vals) / len(vals)


def test_reverse_kl_matches_formula(logits):
    s, t, mask = logits
    expected = _token_mean(s, t, mask, _kl)  # KL(student || teacher), token-mean over the 4 real tokens
    assert reverse_kl(s, t, mask).item() == pytest.approx(expected, rel=1e-5)


def test_reverse_kl_top_k(logits):
    s, t, mask = logits
    full = reverse_kl(s, t, mask)
    assert reverse_kl(s, t, mask, top_k=7).item() == pytest.approx(full.item(), rel=1e-6)
    assert reverse_kl(s, t, mask, top_k=100).item() == pytest.approx(full.item(), rel=1e-6)

    def top2(p, q):  # the student's two most likely tokens, not renormalized
        idx = sorted(range(len(p)), key=lambda v: -p[v])[:2]
        return sum(p[v] * (math.log(p[v]) - math.log(q[v])) for v in idx)

    assert reverse_kl(s, t, mask, top_k=2).item() == pytest.approx(_token_mean(s, t, mask, top2), rel=1e-5)


def test_consistency_kl_matches_formula(logits):
    s, t, mask = logits
    # KL(sg[p_noctx] || p_ctx): the no-context distribution is the first argument.
    assert consistency_kl(s, t, mask).item() == pytest.approx(_token_mean(s, t, mask, _kl), rel=1e-5)
    assert consistency_kl(s, s.clone(), mask).item() == pytest.approx(0.0, abs=1e-6)


def test_consistency_kl_stop_gradient(logits):
    s, t, mask = logits
    noctx = s.clone().requires_grad_(True)
    ctx = t.clone().requires_grad_(True)
    consistency_kl(noctx, ctx, mask).backward()
    assert noctx.grad is None  # the anchor gets no gradient
    assert ctx.grad is not None and ctx.grad.abs().sum() > 0
    assert ctx.grad[1, 1:].abs().sum() == 0  # padded positions get none either


def test_reverse_kl_gradient_reaches_student_only_through_its_logits(logits):
    s, t, mask = logits
    student = s.clone().requires_grad_(True)
    teacher = t.clone()
    reverse_kl(student, teacher, mask).backward()
    assert student.grad.abs().sum() > 0


def test_padding_does_not_count(logits):
    s, t, mask = logits
    s2, t2 = s.clone(), t.clone()
    s2[1, 1:] += 50.0  # garbage in padded positions changes nothing
    assert reverse_kl(s2, t2, mask).item() == pytest.approx(reverse_kl(s, t, mask).item(), rel=1e-6)


def test_lam_schedule():
    assert [lam_at(s, 1.0) for s in range(3)] == [1.0, 1.0, 1.0]
    assert [lam_at(s, 1.0, warmup=2, ramp=0) for s in range(4)] == [0.0, 0.0, 1.0, 1.0]
    assert [lam_at(s, 2.0, warmup=2, ramp=4) for s in range(8)] == [0.0, 0.0, 0.5, 1.0, 1.5, 2.0, 2.0, 2.0]
    assert lam_at(5, 0.0, warmup=1, ramp=2) == 0.0
