"""The training losses (docs/measures.md#training): distillation (reverse KL, forward KL, cross-entropy), the stop-gradient consistency loss, the evidence mask and the λ schedule."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-mean over every masked-in response token of the batch (not a mean of per-row means)."""
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(1.0)


# Positions per chunk when `chunk` is None: one fp32 [chunk, vocab] block is then at most 2**22 floats (16 MiB),
# 85 positions at a 49k vocabulary and 32 at 128k, whatever the batch and response lengths; a handful of such
# blocks are alive at once, in the forward and in the backward.
CHUNK_FLOATS = 2**22


def _chunk_rows(chunk: int | None, vocab: int) -> int:
    if chunk is None:
        return max(1, CHUNK_FLOATS // max(1, vocab))
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of positions (got {chunk})")
    return chunk


def _kl_rows(a: torch.Tensor, b: torch.Tensor, top_k: int | None):
    """Per-row KL(softmax(a) || softmax(b)) in float32, over the full vocabulary or over a's top-k (not
    renormalized); also both log-probabilities and the top-k indices (None: full vocabulary)."""
    logp = F.log_softmax(a.float(), dim=-1)
    logq = F.log_softmax(b.float(), dim=-1)
    if top_k is None:
        return (logp.exp() * (logp - logq)).sum(-1), logp, logq, None
    index = a.detach().topk(min(top_k, a.shape[-1]), dim=-1).indices
    lp, lq = logp.gather(-1, index), logq.gather(-1, index)
    return (lp.exp() * (lp - lq)).sum(-1), logp, logq, index


class _ChunkedKL(torch.autograd.Function):
    """Σ_rows mask·KL over [N, V] logits, one chunk of rows at a time, with the gradient written out analytically.

    Per row, with p = softmax(a), l = log p, π = softmax(b), q = log π and K the summed support (all of V, or the
    top-k of `a`, not renormalized): f = Σ_{v∈K} p_v (l_v − q_v), P = Σ_{v∈K} p_v, and
        ∂f/∂a_j = [j∈K] p_j (l_j − q_j + 1) − p_j (f + P)      (K = V, P = 1: the usual p_j (l_j − q_j − f))
        ∂f/∂b_j = π_j P − [j∈K] p_j.
    Only one chunk's fp32 log-probabilities exist at a time, in the forward and in the backward (recomputed there:
    nothing of vocabulary size is saved but the inputs themselves). The gradients go into one buffer per input, in
    the input's dtype, as autograd through `.float()` would give them.
    """

    @staticmethod
    def forward(ctx, a, b, mask, top_k, rows):
        ctx.save_for_backward(a, b, mask)
        ctx.top_k, ctx.rows = top_k, rows
        total = torch.zeros((), dtype=torch.float32, device=a.device)
        for start in range(0, a.shape[0], rows):
            f = _kl_rows(a[start : start + rows], b[start : start + rows], top_k)[0]
            total += (f * mask[start : start + rows]).sum()
        return total

    @staticmethod
    def backward(ctx, grad):
        a, b, mask = ctx.saved_tensors
        want_a, want_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_a = torch.empty_like(a) if want_a else None
        grad_b = torch.empty_like(b) if want_b else None
        for start in range(0, a.shape[0], ctx.rows):
            sl = slice(start, start + ctx.rows)
            f, logp, logq, support = _kl_rows(a[sl], b[sl], ctx.top_k)
            p = logp.exp()
            g = (grad * mask[sl])[:, None]  # the upstream gradient of each row
            # In-place arithmetic: a handful of [chunk, V] fp32 blocks live at once, not one per term.
            if support is None:  # K = V, P = 1
                if want_a:
                    grad_a[sl].copy_(logp.sub(logq).sub_(f[:, None]).mul_(p).mul_(g))
                if want_b:
                    grad_b[sl].copy_(logq.exp_().sub_(p).mul_(g))
                continue
            in_k = torch.zeros_like(p).scatter_(-1, support, p.gather(-1, support))
            mass = in_k.sum(-1, keepdim=True)  # P
            if want_a:
                grad_a[sl].copy_(logp.sub(logq).add_(1.0).mul_(in_k).sub_(p * (f[:, None] + mass)).mul_(g))
            if want_b:
                grad_b[sl].copy_(logq.exp_().mul_(mass).sub_(in_k).mul_(g))
        return grad_a, grad_b, None, None, None


def _chunked_kl_mean(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, top_k: int | None, chunk: int | None) -> torch.Tensor:
    """Token-mean over the masked-in positions of the per-position KL(softmax(a) || softmax(b)), in position chunks."""
    V = a.shape[-1]
    m = mask.reshape(-1).to(device=a.device, dtype=torch.float32)
    total = _ChunkedKL.apply(a.reshape(-1, V), b.reshape(-1, V), m, top_k, _chunk_rows(chunk, V))
    return total / m.sum().clamp_min(1.0)


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, top_k: int | None = None,
               *, chunk: int | None = None) -> torch.Tensor:
    """L_opd = mean_t KL(p_θ(·|x,y<t) || p_T(·|c,x,y<t)) = mean_t Σ_v p_s (log p_s − log p_t).

    With `top_k` the sum runs over the student's top-k tokens only, without renormalizing (as OPCD does);
    k equal to the vocabulary size gives the full value. Computed in float32 over chunks of `chunk` positions
    (default: as many as fit 16 MiB of fp32 log-probabilities), never for the whole batch at once.
    """
    return _chunked_kl_mean(student_logits, teacher_logits, mask, top_k, chunk)


def consistency_kl(noctx_logits: torch.Tensor, ctx_logits: torch.Tensor, mask: torch.Tensor, *, chunk: int | None = None) -> torch.Tensor:
    """L_cons = mean_t KL(sg[p(·|x,y<t)] || p_θ(·|c,x,y<t)): forward KL from the stop-gradient no-context anchor
    to the with-context output. No gradient reaches `noctx_logits`. Chunked over positions like `reverse_kl`."""
    return _chunked_kl_mean(noctx_logits.detach(), ctx_logits, mask, None, chunk)


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, *, chunk: int | None = None) -> torch.Tensor:
    """mean_t KL(p_T || p_θ) = mean_t Σ_v p_t (log p_t − log p_θ): the off-policy distillation loss (mass-covering).
    Chunked over positions like `reverse_kl`; no gradient reaches the teacher."""
    return _chunked_kl_mean(teacher_logits.detach(), student_logits, mask, None, chunk)


def cross_entropy(student_logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mean_t −log p_θ(y_t | x, y<t): supervised learning of the sampled tokens (with teacher samples: off-policy
    context distillation by sequence-level imitation). torch's fused cross-entropy, in float32."""
    V = student_logits.shape[-1]
    per_token = F.cross_entropy(student_logits.reshape(-1, V).float(), targets.reshape(-1), reduction="none")
    return masked_mean(per_token.reshape(targets.shape), mask)


def evidence_mask(teacher_ctx: torch.Tensor, teacher_noctx: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, tau: float) -> torch.Tensor:
    """EDGE-OPD's evidence mask: 1 where the context raises the teacher's log-probability of the sampled token by at
    least `tau`, log p_T(y_t|c,x,y<t) − log p_T(y_t|x,y<t) ≥ tau, within `mask`; 0 elsewhere."""
    index = targets.unsqueeze(-1)
    lp_ctx = F.log_softmax(teacher_ctx.float(), dim=-1).gather(-1, index).squeeze(-1)
    lp_noctx = F.log_softmax(teacher_noctx.float(), dim=-1).gather(-1, index).squeeze(-1)
    return ((lp_ctx - lp_noctx) >= tau).to(mask.dtype) * mask


def lam_at(step: int, lam: float, warmup: int = 0, ramp: int = 0) -> float:
    """λ for 0-based `step`: 0 for the first `warmup` steps, then a linear ramp over `ramp` steps up to `lam`.

    Anchoring to a no-context output that has not absorbed the context yet pulls the with-context output down to
    it; the warm-up lets the student learn from the teacher first.
    """
    if step < warmup:
        return 0.0
    if ramp > 0 and step < warmup + ramp:
        return lam * (step - warmup + 1) / ramp
    return lam
