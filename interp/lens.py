"""Logit lens: what each layer would predict, read through the final norm and the unembedding, in token chunks."""

from __future__ import annotations

import os
import warnings
from typing import cast

import torch

from interp.core.archs import apply_softcap, decoder_layers, final_norm, softcap, unembed
from interp.divergence import LENS_STATS  # the statistics' names: one home
from interp.divergence import lens_field_names

# Tokens projected at once: the vocabulary projection of a chunk is [chunk, vocab] floats (256 x 49152 = 50 MB).
DEFAULT_CHUNK = 256


def logit_lens(model, hidden: torch.Tensor, layer: int | None = None) -> torch.Tensor:
    """`unembed(final_norm(h))` for a `[n, d]` hidden state of `layer` (0 = embeddings, last = last block's output);
    `model` is a LoadedModel (like every public function's) or the bare transformers model,
    soft-capped as the model caps its own logits (Gemma 2/3), as float32.

    The same projection serves every layer (that is the logit lens); `layer` is only range-checked. At the last
    layer the result equals the model's own logits, because hidden states here are taken before the final norm and
    the softcap is the model's. The cap is applied in float32 (a bf16 model caps in bf16: the lens is the more exact).
    """
    model = getattr(model, "model", model) if not isinstance(model, torch.nn.Module) else model  # a LoadedModel too
    if hidden.ndim != 2:
        raise ValueError(f"logit_lens expects a [n, d] hidden state, got shape {tuple(hidden.shape)}")
    norm, head = final_norm(model), unembed(model)
    if hidden.shape[-1] != head.in_features:
        raise ValueError(f"hidden size {hidden.shape[-1]} does not match the unembedding's {head.in_features}")
    if layer is not None:
        n_layers = len(decoder_layers(model))
        if not 0 <= layer <= n_layers:
            raise ValueError(f"layer {layer} is outside 0..{n_layers}")
    param = cast(torch.Tensor, head.weight)  # nn.Module attributes are typed Tensor | Module
    return apply_softcap(head(norm(hidden.to(device=param.device, dtype=param.dtype))).float(), softcap(model))


def _run_stats(z, pz_final, h_final, targets):
    """Statistics of one run's lens logits z [c, vocab], as reductions over each row (fused when compiled);
    `pz_final` [c] is sum_v p_final,v z_v, the final distribution's expectation of these logits."""
    m, top1 = z.max(dim=-1)
    e = torch.exp(z - m[:, None])
    s = e.sum(-1)
    lse = m + torch.log(s)
    entropy = lse - (e * z).sum(-1) / s
    target_logit = z.gather(-1, targets[:, None])
    target_prob = torch.exp(target_logit.squeeze(-1) - lse)
    rank = (z > target_logit).sum(-1)
    kl_final = -h_final - pz_final + lse  # KL(final || lens) = -H(final) - sum p_final log p_lens
    return e, s, lse, top1, 1.0 / s, target_prob, rank, entropy, kl_final


def _layer_stats(z_ctx, z_noctx, pz_final_ctx, pz_final_noctx, h_final_ctx, h_final_noctx, targets):
    """Both runs' statistics at one layer, plus KL(lens^noctx || lens^ctx), for a chunk of tokens."""
    ctx = _run_stats(z_ctx, pz_final_ctx, h_final_ctx, targets)
    noctx = _run_stats(z_noctx, pz_final_noctx, h_final_noctx, targets)
    e_n, s_n, lse_c, entropy_n = noctx[0], noctx[1], ctx[2], noctx[7]
    kl_noctx_ctx = -entropy_n - (e_n * z_ctx).sum(-1) / s_n + lse_c
    return ctx[3:], noctx[3:], kl_noctx_ctx


# Below this many (layer, token) rows the eager version is faster than compiling (about 15 s once per process).
COMPILE_MIN_ROWS = 4096
_compiled = None


def _stats_fn(rows: int):
    """The fused (torch.compile) statistics for large work, the same Python function run eagerly otherwise.

    CTXINT_LENS_COMPILE=0 turns compilation off, =1 forces it; a failed compilation falls back to eager.
    """
    global _compiled
    mode = os.environ.get("CTXINT_LENS_COMPILE", "auto")
    if mode == "0" or (mode == "auto" and rows < COMPILE_MIN_ROWS) or _compiled is False:
        return _layer_stats
    if _compiled is None:
        _compiled = torch.compile(_layer_stats, dynamic=True)
    return _compiled


def _call_stats(rows, *args):
    global _compiled
    fn = _stats_fn(rows)
    try:
        return fn(*args)
    except Exception as err:  # no C++ compiler, an unsupported device: the eager path gives the same numbers
        if fn is _layer_stats:
            raise
        warnings.warn(f"logit-lens compilation failed ({type(err).__name__}); using the eager path", stacklevel=2)
        _compiled = False
        return _layer_stats(*args)


class _Projection:
    """The lens's vocabulary projection z = softcap(W norm(h) + b), and sum_v p_v z_v for a fixed distribution p.

    Without a softcap z is linear in norm(h), so sum_v p_v z_v = (p W) . norm(h) + p . b: the final distribution
    enters each layer's statistics as a [c, d] matrix instead of a [c, vocab] one (the lens holds 2 x 50 MB less per
    256-token chunk at a 49k vocabulary, and reads that much less per layer). A soft-capped model (Gemma 2/3) or
    weights in another dtype than float32 keep p itself and take the sum over the vocabulary.
    """

    def __init__(self, model):
        model = model if isinstance(model, torch.nn.Module) else getattr(model, "model", model)  # a LoadedModel too
        self.model, self.norm, self.head = model, final_norm(model), unembed(model)
        self.weight = cast(torch.Tensor, self.head.weight)  # nn.Module attributes are typed Tensor | Module
        self.linear = softcap(model) is None and self.weight.dtype == torch.float32

    def normed(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(hidden.to(device=self.weight.device, dtype=self.weight.dtype))

    def logits(self, normed: torch.Tensor) -> torch.Tensor:
        return apply_softcap(self.head(normed).float(), softcap(self.model))

    def final(self, hidden: torch.Tensor):
        """The final layer's entropy, and what `expect` needs of its distribution: p W and p . b, or p itself."""
        logp = torch.log_softmax(self.logits(self.normed(hidden)), dim=-1)
        p = logp.exp()
        entropy = -logp.mul_(p).sum(-1)  # in place: no third [c, vocab] tensor
        del logp
        if not self.linear:
            return entropy, p
        bias = getattr(self.head, "bias", None)
        return entropy, (p @ self.weight, p @ bias.float() if bias is not None else None)

    def expect(self, final, normed: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """sum_v p_final,v z_v per row, for the lens logits z = logits(normed)."""
        if not self.linear:
            return (final * z).sum(-1)
        pw, pb = final
        out = (pw * normed.float()).sum(-1)
        return out + pb if pb is not None else out


@torch.no_grad()
def lens_statistics(model, hidden_ctx: torch.Tensor, hidden_noctx: torch.Tensor, targets: torch.Tensor, chunk: int = DEFAULT_CHUNK,
                    to_host: bool = True, tuned=None) -> dict[str, torch.Tensor]:
    """Per-layer, per-token logit-lens statistics for the with- and without-context runs on aligned tokens.

    `hidden_*` are [num_layers, n, d] (layer 0 = embeddings, last = last block's output); `targets` [n] are the
    tokens each position predicts. Returns arrays [num_layers, n] named `lens_<stat>_ctx` / `lens_<stat>_noctx`
    for stat in top1, top1_prob, target_prob, target_rank, entropy, kl_final (KL(final || lens_l)), and
    `lens_kl_noctx_ctx` (KL(lens_l^noctx || lens_l^ctx)). Never holds more than one chunk's logits per run.
    `to_host=False` leaves the arrays on the model's device (an analysis over many batches copies them once at the end).
    `tuned`: an `interp.tuned_lens.TunedLens` reads the layers through its translators (the tuned lens) instead of
    the logit lens; the final distribution is the same either way (the last layer has no translator).
    """
    if hidden_ctx.shape != hidden_noctx.shape:
        raise ValueError(f"hidden states differ in shape: {tuple(hidden_ctx.shape)} vs {tuple(hidden_noctx.shape)}")
    if hidden_ctx.ndim != 3 or targets.shape != (hidden_ctx.shape[1],):
        raise ValueError(f"expected hidden [layers, n, d] and targets [n], got {tuple(hidden_ctx.shape)} and {tuple(targets.shape)}")
    L, n, _ = hidden_ctx.shape
    integer = ("lens_top1_ctx", "lens_top1_noctx", "lens_target_rank_ctx", "lens_target_rank_noctx")
    device = cast(torch.Tensor, unembed(model).weight).device
    # The per-token arrays fill on the model's device and cross to the host once, at the end (no per-chunk copies).
    out = {name: torch.empty(L, n, dtype=torch.long if name in integer else torch.float32, device=device) for name in lens_field_names()}
    proj = _Projection(model)
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        tgt = targets[a:b].to(device)
        h_ctx, f_ctx = proj.final(hidden_ctx[-1, a:b])
        h_noctx, f_noctx = proj.final(hidden_noctx[-1, a:b])
        for layer in range(L):
            h_c, h_n = hidden_ctx[layer, a:b], hidden_noctx[layer, a:b]
            if tuned is not None:
                h_c, h_n = tuned.translate(h_c, layer), tuned.translate(h_n, layer)
            # Both runs' chunk in one vocabulary projection (2c rows): faster than two of c (docs/benchmarks.md).
            normed = proj.normed(torch.cat([h_c, h_n]))
            z = proj.logits(normed)
            z_ctx, z_noctx = z.chunk(2)
            n_ctx, n_noctx = normed.chunk(2)
            pz_ctx, pz_noctx = proj.expect(f_ctx, n_ctx, z_ctx), proj.expect(f_noctx, n_noctx, z_noctx)
            ctx, noctx, kl = _call_stats(L * n, z_ctx, z_noctx, pz_ctx, pz_noctx, h_ctx, h_noctx, tgt)
            for run, values in (("ctx", ctx), ("noctx", noctx)):
                for stat, value in zip(LENS_STATS, values):
                    out[f"lens_{stat}_{run}"][layer, a:b] = value.to(out[f"lens_{stat}_{run}"].dtype)
            out["lens_kl_noctx_ctx"][layer, a:b] = kl
    # Rounding can leave KLs a hair below zero; they are non-negative by definition.
    for name in ("lens_kl_final_ctx", "lens_kl_final_noctx", "lens_kl_noctx_ctx"):
        out[name].clamp_(min=0.0)
    return {name: value.cpu() for name, value in out.items()} if to_host else out
