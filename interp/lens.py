"""Logit lens: what each layer would predict, read through the final norm and the unembedding, in token chunks."""

from __future__ import annotations

import torch

from interp.models import decoder_layers, final_norm, unembed

# Tokens projected at once: the vocabulary projection of a chunk is [chunk, vocab] floats (256 x 49152 = 50 MB).
DEFAULT_CHUNK = 256


def logit_lens(model, hidden: torch.Tensor, layer: int | None = None) -> torch.Tensor:
    """`unembed(final_norm(h))` for a `[n, d]` hidden state of `layer` (0 = embeddings, last = last block's output).

    The same projection serves every layer (that is the logit lens); `layer` is only range-checked. At the last
    layer the result equals the model's own logits, because hidden states here are taken before the final norm.
    """
    if hidden.ndim != 2:
        raise ValueError(f"logit_lens expects a [n, d] hidden state, got shape {tuple(hidden.shape)}")
    norm, head = final_norm(model), unembed(model)
    if hidden.shape[-1] != head.in_features:
        raise ValueError(f"hidden size {hidden.shape[-1]} does not match the unembedding's {head.in_features}")
    if layer is not None:
        n_layers = len(decoder_layers(model))
        if not 0 <= layer <= n_layers:
            raise ValueError(f"layer {layer} is outside 0..{n_layers}")
    param = head.weight
    return head(norm(hidden.to(device=param.device, dtype=param.dtype))).float()


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot product [c, v] x [c, v] -> [c] in one fused pass (no [c, v] temporary)."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


class _Dist:
    """A chunk of lens logits with what the statistics reuse: the max, the normalizer and the probabilities."""

    def __init__(self, logits: torch.Tensor):
        self.logits = logits
        self.max, self.top1 = logits.max(dim=-1)
        self.exp = torch.exp(logits - self.max[:, None])
        self.sum = self.exp.sum(-1)
        self.lse = self.max + torch.log(self.sum)
        self.probs = self.exp.div_(self.sum[:, None])  # in place: the unnormalized exp is not needed again

    @property
    def top1_prob(self) -> torch.Tensor:
        return 1.0 / self.sum  # exp(max - lse)

    def entropy(self) -> torch.Tensor:
        return self.lse - _dot(self.probs, self.logits)

    def kl_from(self, other: "_Dist", other_entropy: torch.Tensor) -> torch.Tensor:
        """KL(other || self) = -H(other) - sum_v p_other(v) log p_self(v)."""
        return -other_entropy - _dot(other.probs, self.logits) + self.lse

    def target_stats(self, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Probability of each row's target token and its rank (0 = the top prediction)."""
        target_logit = self.logits.gather(-1, targets[:, None])
        prob = torch.exp(target_logit.squeeze(-1) - self.lse)
        rank = (self.logits > target_logit).sum(-1)
        return prob, rank


@torch.no_grad()
def lens_statistics(model, hidden_ctx: torch.Tensor, hidden_noctx: torch.Tensor, targets: torch.Tensor, chunk: int = DEFAULT_CHUNK) -> dict[str, torch.Tensor]:
    """Per-layer, per-token logit-lens statistics for the with- and without-context runs on aligned tokens.

    `hidden_*` are [num_layers, n, d] (layer 0 = embeddings, last = last block's output); `targets` [n] are the
    tokens each position predicts. Returns arrays [num_layers, n] named `lens_<stat>_ctx` / `lens_<stat>_noctx`
    for stat in top1, top1_prob, target_prob, target_rank, entropy, kl_final (KL(final || lens_l)), and
    `lens_kl_noctx_ctx` (KL(lens_l^noctx || lens_l^ctx)). Never holds more than one chunk's logits per run.
    """
    if hidden_ctx.shape != hidden_noctx.shape:
        raise ValueError(f"hidden states differ in shape: {tuple(hidden_ctx.shape)} vs {tuple(hidden_noctx.shape)}")
    if hidden_ctx.ndim != 3 or targets.shape != (hidden_ctx.shape[1],):
        raise ValueError(f"expected hidden [layers, n, d] and targets [n], got {tuple(hidden_ctx.shape)} and {tuple(targets.shape)}")
    L, n, _ = hidden_ctx.shape
    names = [f"lens_{s}_{run}" for run in ("ctx", "noctx") for s in ("top1", "top1_prob", "target_prob", "target_rank", "entropy", "kl_final")]
    out = {name: torch.empty(L, n, dtype=torch.long if name.startswith(("lens_top1_c", "lens_top1_n", "lens_target_rank")) else torch.float32) for name in names}
    out["lens_kl_noctx_ctx"] = torch.empty(L, n)
    device = unembed(model).weight.device
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        tgt = targets[a:b].to(device)
        final = {}
        # Walk from the last layer down so the final distributions (for KL(final || lens_l)) exist first.
        for layer in reversed(range(L)):
            dists, entropies = {}, {}
            for run, hidden in (("ctx", hidden_ctx), ("noctx", hidden_noctx)):
                d = _Dist(logit_lens(model, hidden[layer, a:b]))
                dists[run], entropies[run] = d, d.entropy()
                if layer == L - 1:
                    final[run] = (d, entropies[run])
                prob, rank = d.target_stats(tgt)
                f, f_entropy = final[run]
                values = {"top1": d.top1, "top1_prob": d.top1_prob, "target_prob": prob, "target_rank": rank,
                          "entropy": entropies[run], "kl_final": d.kl_from(f, f_entropy)}
                for stat, value in values.items():
                    out[f"lens_{stat}_{run}"][layer, a:b] = value.to("cpu", out[f"lens_{stat}_{run}"].dtype)
            out["lens_kl_noctx_ctx"][layer, a:b] = dists["ctx"].kl_from(dists["noctx"], entropies["noctx"]).cpu()
    # Rounding can leave KLs a hair below zero; they are non-negative by definition.
    for name in ("lens_kl_final_ctx", "lens_kl_final_noctx", "lens_kl_noctx_ctx"):
        out[name].clamp_(min=0.0)
    return out
