"""The training losses (docs/measures.md#training): distillation (reverse KL, forward KL, cross-entropy), the stop-gradient consistency loss, the evidence mask and the λ schedule."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-mean over every masked-in response token of the batch (not a mean of per-row means)."""
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(1.0)


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, top_k: int | None = None) -> torch.Tensor:
    """L_opd = mean_t KL(p_θ(·|x,y<t) || p_T(·|c,x,y<t)) = mean_t Σ_v p_s (log p_s − log p_t).

    With `top_k` the sum runs over the student's top-k tokens only, without renormalizing (as OPCD does);
    k equal to the vocabulary size gives the full value.
    """
    logp_s = F.log_softmax(student_logits.float(), dim=-1)
    logp_t = F.log_softmax(teacher_logits.float(), dim=-1)
    if top_k is not None:
        index = student_logits.detach().topk(min(top_k, student_logits.shape[-1]), dim=-1).indices
        logp_s, logp_t = logp_s.gather(-1, index), logp_t.gather(-1, index)
    per_token = (logp_s.exp() * (logp_s - logp_t)).sum(-1)
    return masked_mean(per_token, mask)


def consistency_kl(noctx_logits: torch.Tensor, ctx_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L_cons = mean_t KL(sg[p(·|x,y<t)] || p_θ(·|c,x,y<t)): forward KL from the stop-gradient no-context anchor
    to the with-context output. No gradient reaches `noctx_logits`."""
    logp_a = F.log_softmax(noctx_logits.detach().float(), dim=-1)
    logp_c = F.log_softmax(ctx_logits.float(), dim=-1)
    per_token = (logp_a.exp() * (logp_a - logp_c)).sum(-1)
    return masked_mean(per_token, mask)


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mean_t KL(p_T || p_θ) = mean_t Σ_v p_t (log p_t − log p_s): the off-policy distillation loss (mass-covering)."""
    logp_s = F.log_softmax(student_logits.float(), dim=-1)
    logp_t = F.log_softmax(teacher_logits.detach().float(), dim=-1)
    per_token = (logp_t.exp() * (logp_t - logp_s)).sum(-1)
    return masked_mean(per_token, mask)


def cross_entropy(student_logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mean_t −log p_θ(y_t | x, y<t): supervised learning of the sampled tokens (with teacher samples: off-policy
    context distillation by sequence-level imitation)."""
    logp = F.log_softmax(student_logits.float(), dim=-1)
    per_token = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return masked_mean(per_token, mask)


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
