"""The chunked losses against the unchunked formulas written out here: same values and same gradients, fp32 and bf16
inputs, full vocabulary and top-k, any chunk size; and no full-batch fp32 log-probabilities."""

import pytest
import torch
import torch.nn.functional as F

from training.losses import consistency_kl, reverse_kl


def unchunked_reverse_kl(s, t, mask, top_k=None):
    """The formula as it was before chunking: whole-batch fp32 log-probabilities."""
    logp_s = F.log_softmax(s.float(), dim=-1)
    logp_t = F.log_softmax(t.float(), dim=-1)
    if top_k is not None:
        index = s.detach().topk(min(top_k, s.shape[-1]), dim=-1).indices
        logp_s, logp_t = logp_s.gather(-1, index), logp_t.gather(-1, index)
    per_token = (logp_s.exp() * (logp_s - logp_t)).sum(-1)
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(1.0)


def unchunked_consistency_kl(a, c, mask):
    logp_a = F.log_softmax(a.detach().float(), dim=-1)
    logp_c = F.log_softmax(c.float(), dim=-1)
    per_token = (logp_a.exp() * (logp_a - logp_c)).sum(-1)
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(1.0)


def _inputs(dtype, B=3, R=5, V=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (2 * torch.randn(B, R, V, generator=g)).to(dtype)
    t = (2 * torch.randn(B, R, V, generator=g)).to(dtype)
    mask = torch.ones(B, R)
    mask[1, 3:] = 0
    mask[2, 1:] = 0
    return s, t, mask


def _grads(fn, s, t, mask, **kw):
    s, t = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
    loss = fn(s, t, mask, **kw)
    loss.backward()
    return loss.detach(), s.grad, t.grad


TOL = {torch.float32: dict(atol=1e-6, rtol=1e-5), torch.bfloat16: dict(atol=2e-3, rtol=2e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("top_k", [None, 7, 50])
@pytest.mark.parametrize("chunk", [1, 4, None, 1000])
def test_reverse_kl_values_and_gradients(dtype, top_k, chunk):
    s, t, mask = _inputs(dtype)
    want = _grads(unchunked_reverse_kl, s, t, mask, top_k=top_k)
    got = _grads(reverse_kl, s, t, mask, top_k=top_k, chunk=chunk)
    assert got[1].dtype == dtype and got[2].dtype == dtype
    for w, g, what in zip(want, got, ("value", "student grad", "teacher grad")):
        torch.testing.assert_close(g.float(), w.float(), **TOL[dtype], msg=what)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1, 4, None])
def test_consistency_kl_values_and_gradients(dtype, chunk):
    a, c, mask = _inputs(dtype, seed=1)
    want = _grads(unchunked_consistency_kl, a, c, mask)
    got = _grads(consistency_kl, a, c, mask, chunk=chunk)
    assert got[2] is not None
    assert want[1] is None and got[1] is None  # the anchor gets no gradient
    for w, g in ((want[0], got[0]), (want[2], got[2])):
        torch.testing.assert_close(g.float(), w.float(), **TOL[dtype])


def test_second_use_of_student_logits_accumulates():
    """The student's no-context logits feed L_opd and (as the stop-gradient anchor) L_cons: only L_opd's gradient."""
    s, t, mask = _inputs(torch.float32)
    c = t.clone().requires_grad_(True)
    s1 = s.clone().requires_grad_(True)
    (reverse_kl(s1, t, mask, chunk=2) + 0.5 * consistency_kl(s1, c, mask, chunk=2)).backward()
    s2 = s.clone().requires_grad_(True)
    c2 = t.clone().requires_grad_(True)
    (unchunked_reverse_kl(s2, t, mask) + 0.5 * unchunked_consistency_kl(s2, c2, mask)).backward()
    torch.testing.assert_close(s1.grad, s2.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(c.grad, c2.grad, atol=1e-6, rtol=1e-5)


def test_no_full_batch_fp32_log_probabilities(monkeypatch):
    """Every log_softmax the loss takes, forward and backward, covers at most `chunk` positions."""
    s, t, mask = _inputs(torch.bfloat16, B=4, R=8, V=64)
    seen = []
    real = F.log_softmax

    def spy(x, *args, **kw):
        seen.append(x.shape[0] if x.ndim == 2 else x.shape[0] * x.shape[1])
        return real(x, *args, **kw)

    monkeypatch.setattr(F, "log_softmax", spy)
    _grads(reverse_kl, s, t, mask, top_k=5, chunk=3)
    _grads(consistency_kl, s, t, mask, chunk=3)
    assert seen and max(seen) <= 3


def test_bad_chunk():
    s, t, mask = _inputs(torch.float32)
    with pytest.raises(ValueError, match="positive"):
        reverse_kl(s, t, mask, chunk=0)
