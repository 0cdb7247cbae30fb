"""Logit lens against full softmax formulas written here, and the last layer against the model's logits."""

import pytest
import torch

from interp import analyze, make_pairs
from interp.capture import capture_torch
from interp.hooks import make_batch
from interp import lens as lens_module
from interp.lens import lens_statistics, logit_lens


def _full_stats(logits, final, targets):
    logp = torch.log_softmax(logits.double(), -1)
    p = logp.exp()
    logp_final = torch.log_softmax(final.double(), -1)
    target_logp = logp.gather(-1, targets[:, None]).squeeze(-1)
    return {
        "top1": logp.argmax(-1),
        "top1_prob": p.max(-1).values,
        "target_prob": target_logp.exp(),
        "target_rank": (logp > target_logp[:, None]).sum(-1),
        "entropy": -(p * logp).sum(-1),
        "kl_final": (logp_final.exp() * (logp_final - logp)).sum(-1),
    }


def _captured(lm, records):
    pairs = make_pairs(lm.tokenizer, records)
    ctx, noctx = make_batch(pairs, "ctx"), make_batch(pairs, "noctx")
    return pairs, ctx, capture_torch(lm, ctx), capture_torch(lm, noctx)


def test_last_layer_lens_equals_model_logits(tiny, records):
    pairs, batch, got, _ = _captured(tiny, records)
    with torch.no_grad():
        logits = tiny.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[batch.rows, batch.positions]
    torch.testing.assert_close(logit_lens(tiny.model, got.hidden[-1], tiny.num_layers - 1), logits, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="expects a \\[n, d\\]"):
        logit_lens(tiny.model, got.hidden[-1][None])
    with pytest.raises(ValueError, match="outside"):
        logit_lens(tiny.model, got.hidden[-1], 99)


@pytest.mark.embedded
def test_last_layer_lens_equals_model_logits_on_embedded(smol, records):
    pairs, batch, got, _ = _captured(smol, records[:1])
    with torch.no_grad():
        logits = smol.model(input_ids=batch.input_ids).logits[batch.rows, batch.positions]
    torch.testing.assert_close(logit_lens(smol.model, got.hidden[-1]), logits, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("linear", [True, False])
@pytest.mark.parametrize("compiled", ["0", "1"])
def test_statistics_match_full_softmax(tiny, records, compiled, linear, monkeypatch):
    monkeypatch.setenv("CTXINT_LENS_COMPILE", compiled)  # the fused path and the eager path give the same numbers
    if not linear:  # the path soft-capped and non-float32 models take: the final distribution kept over the vocabulary
        init = lens_module._Projection.__init__

        def general(self, model):
            init(self, model)
            self.linear = False

        monkeypatch.setattr(lens_module._Projection, "__init__", general)
    else:
        assert lens_module._Projection(tiny.model).linear
    _, batch, ctx, noctx = _captured(tiny, records)
    stats = lens_statistics(tiny.model, ctx.hidden, noctx.hidden, batch.targets, chunk=7)  # odd chunk: crosses rows
    for run, got in (("ctx", ctx), ("noctx", noctx)):
        final = logit_lens(tiny.model, got.hidden[-1])
        for layer in range(tiny.num_layers):
            ref = _full_stats(logit_lens(tiny.model, got.hidden[layer]), final, batch.targets)
            for name, value in ref.items():
                torch.testing.assert_close(stats[f"lens_{name}_{run}"][layer].to(value.dtype), value, atol=2e-5, rtol=1e-4,
                                           msg=lambda m, name=name, run=run, layer=layer: f"{name} {run} layer {layer}: {m}")
    for layer in range(tiny.num_layers):
        lp_c = torch.log_softmax(logit_lens(tiny.model, ctx.hidden[layer]).double(), -1)
        lp_n = torch.log_softmax(logit_lens(tiny.model, noctx.hidden[layer]).double(), -1)
        kl = (lp_n.exp() * (lp_n - lp_c)).sum(-1)
        torch.testing.assert_close(stats["lens_kl_noctx_ctx"][layer].double(), kl, atol=2e-5, rtol=1e-4)
    assert (stats["lens_kl_final_ctx"][-1].abs() < 1e-5).all()


def test_last_layer_kl_is_the_consistency_loss(tiny, records):
    """At the last layer, KL(lens^noctx || lens^ctx) averaged over response tokens is the training loss L_cons
    (training.losses.consistency_kl, the student anchor) on these examples, computed by the trainer's own batching."""
    from training.losses import consistency_kl
    from training.rollout import collate, response_logits

    pairs = make_pairs(tiny.tokenizer, records)
    div = analyze(tiny, pairs, backend="torch")
    batch = collate(pairs, tiny.tokenizer.pad_token_id)
    with torch.no_grad():
        loss = consistency_kl(response_logits(tiny.model, batch.noctx), response_logits(tiny.model, batch.ctx), batch.mask)
    assert div.layer_mean("lens_kl_noctx_ctx")[-1] == pytest.approx(float(loss), rel=1e-4)
