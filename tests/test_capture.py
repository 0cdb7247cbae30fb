"""Capture backends against Hugging Face's own outputs, and padding invariance of the whole analysis."""

import numpy as np
import pytest
import torch

from interp import UserError, analyze, make_pairs
from interp.attention import reduce_attention
from interp.capture import BACKENDS, get_backend
from interp.hooks import make_batch


def hf_reference(lm, batch):
    """Block outputs through plain forward hooks, embeddings and attention through transformers' own outputs
    (with eager attention, as capture switches to when it reads attention weights)."""
    from interp.core.archs import eager_attention

    blocks = []
    handles = [layer.register_forward_hook(lambda m, i, o: blocks.append(o[0] if isinstance(o, tuple) else o))
               for layer in lm.model.model.layers]
    try:
        with torch.no_grad(), eager_attention(lm.model):
            out = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           position_ids=batch.position_ids, output_hidden_states=True, output_attentions=True)
    finally:
        for h in handles:
            h.remove()
    hidden = torch.stack([out.hidden_states[0]] + blocks)[:, batch.rows, batch.positions]
    return hidden, out.attentions, out.logits[batch.rows, batch.positions]


def _pairs(lm, records):
    return make_pairs(lm.tokenizer, records)


def _compare_backends(lm, pairs, atol):
    for which in ("ctx", "noctx"):
        batch = make_batch(pairs, which, padding="left")
        hidden, attentions, _ = hf_reference(lm, batch)
        for name in BACKENDS:
            got = get_backend(name)(lm, batch, attention=True)
            torch.testing.assert_close(got.hidden, hidden, atol=atol, rtol=0)
            # Attention mass on the context, recomputed here from transformers' attention weights.
            for layer, pattern in enumerate(attentions):
                q = pattern[batch.rows, :, batch.positions, :]  # [n, heads, T]
                mass = (q * batch.ctx_mask[batch.rows][:, None, :]).sum(-1)
                torch.testing.assert_close(got.attn_ctx[layer], mass, atol=atol, rtol=0)
                sink = q[torch.arange(len(batch.rows)), :, batch.sink[batch.rows]]
                torch.testing.assert_close(got.attn_sink[layer], sink, atol=atol, rtol=0)


def test_backends_equal_huggingface_on_tiny(tiny, records):
    _compare_backends(tiny, _pairs(tiny, records), atol=1e-5)


@pytest.mark.embedded
def test_backends_equal_huggingface_on_embedded(smol, records):
    _compare_backends(smol, _pairs(smol, records[:2]), atol=1e-5)


def test_reduce_attention_handcrafted():
    # One row, 6 positions: [sink, c, c, x, q, q]; context at 1..2, measured queries at 4 and 5.
    pattern = torch.zeros(1, 2, 6, 6)
    pattern[0, 0, 4] = torch.tensor([0.1, 0.2, 0.3, 0.0, 0.4, 0.0])
    pattern[0, 0, 5] = torch.tensor([0.5, 0.0, 0.1, 0.1, 0.1, 0.2])
    pattern[0, 1, 4] = torch.tensor([0.0, 0.0, 0.0, 0.5, 0.5, 0.0])
    pattern[0, 1, 5] = torch.tensor([0.0, 0.5, 0.5, 0.0, 0.0, 0.0])
    from interp.hooks import Batch

    batch = Batch(
        input_ids=torch.zeros(1, 6, dtype=torch.long), attention_mask=torch.ones(1, 6, dtype=torch.long),
        position_ids=torch.arange(6)[None], rows=torch.tensor([0, 0]), positions=torch.tensor([4, 5]),
        targets=torch.tensor([0, 0]), sink=torch.tensor([0]), ctx_mask=torch.tensor([[0, 1, 1, 0, 0, 0.0]]),
        ctx_positions=torch.tensor([[1, 2]]), ctx_valid=torch.ones(1, 2),
    )
    ctx, sink, per_token = reduce_attention(pattern, batch)
    torch.testing.assert_close(ctx, torch.tensor([[0.5, 0.0], [0.1, 1.0]]))
    torch.testing.assert_close(sink, torch.tensor([[0.1, 0.0], [0.5, 0.0]]))
    torch.testing.assert_close(per_token[:, 0], torch.tensor([[0.2, 0.3], [0.0, 0.1]]))
    with pytest.raises(ValueError, match="does not match the batch"):
        reduce_attention(pattern[:, :, :5, :5], batch)


def test_padding_and_batching_do_not_change_numbers(tiny, records):
    # Unequal lengths: responses of different sizes, prompts of different sizes.
    pairs = _pairs(tiny, records)
    one_by_one = [analyze(tiny, [p], backend="torch") for p in pairs]
    for padding in ("right", "left"):
        batched = analyze(tiny, pairs, backend="torch", batch_size=3, padding=padding)
        cos = np.concatenate([d.cos_per_token for d in one_by_one], axis=1)
        np.testing.assert_allclose(batched.cos_per_token, cos, atol=1e-6)
        for name in ("lens_kl_noctx_ctx", "lens_entropy_ctx", "lens_target_prob_noctx"):
            np.testing.assert_allclose(getattr(batched, name), np.concatenate([getattr(d, name) for d in one_by_one], axis=1), atol=1e-5)
        for i, d in enumerate(one_by_one):
            np.testing.assert_allclose(batched.attn_ctx_tokens[i], d.attn_ctx_tokens[0], atol=1e-6)
        # attn_ctx is a token-weighted mean of the per-pair values.
        weights = np.array([d.n_tokens for d in one_by_one], dtype=float)
        expected = sum(w * d.attn_ctx for w, d in zip(weights, one_by_one)) / weights.sum()
        np.testing.assert_allclose(batched.attn_ctx, expected, atol=1e-6)


def test_layer_zero_is_context_free_and_backends_agree_end_to_end(tiny, records):
    pairs = _pairs(tiny, records)
    results = {name: analyze(tiny, pairs, backend=name) for name in BACKENDS}
    ref = results["torch"]
    # Without absolute position embeddings the embedding output cannot see the context.
    assert ref.cos[0] == pytest.approx(1.0, abs=1e-12) and ref.cka[0] == pytest.approx(1.0, abs=1e-9)
    assert ref.cka_debiased[0] == pytest.approx(1.0, abs=1e-9)
    assert ref.cos[-1] < 0.999  # deeper layers do see it
    for name, div in results.items():
        for field in ("cos", "cka", "cka_debiased", "attn_ctx", "attn_sink", "lens_kl_noctx_ctx"):
            np.testing.assert_allclose(getattr(div, field), getattr(ref, field), atol=1e-5, err_msg=f"{name}.{field}")
    assert ((ref.attn_ctx >= 0) & (ref.attn_ctx <= 1)).all() and ((ref.attn_sink >= 0) & (ref.attn_sink <= 1)).all()
    assert ref.attn_ctx.shape == (tiny.num_layers - 1, tiny.model.config.num_attention_heads)
    assert len(ref.examples) == len(pairs) and ref.examples[0]["target_tokens"]


def test_bad_backend_and_scope(tiny, records):
    pairs = _pairs(tiny, records[:1])
    with pytest.raises(UserError, match="unknown backend 'nope'"):
        analyze(tiny, pairs, backend="nope")
    with pytest.raises(UserError, match="unknown scope"):
        analyze(tiny, pairs, scope="all")


def test_shared_scope_measures_more_tokens(tiny, records):
    pairs = _pairs(tiny, records[:1])
    response = analyze(tiny, pairs, backend="torch")
    shared = analyze(tiny, pairs, backend="torch", scope="shared")
    assert shared.n_tokens == pairs[0].shared_len - 1 > response.n_tokens == pairs[0].response_len
    # The response positions are the last ones of the shared scope.
    np.testing.assert_allclose(shared.cos_per_token[:, -response.n_tokens:], response.cos_per_token, atol=1e-6)
