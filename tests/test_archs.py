"""Every supported architecture, as a tiny random model built from its config class: capture equals the model's own
outputs in every backend, the lens at the last layer equals the logits (softcapping included), two training steps
run, and the adapter saves and loads. Plus: tuple-returning blocks, unsupported models, precision and sdpa."""

import json

import numpy as np
import pytest
import torch

from interp import UserError, analyze, make_pairs
from interp.core.archs import ARCHS, arch_of, eager_attention, final_norm, inner_model, softcap
from interp.capture import BACKENDS, get_backend
from interp.hooks import make_batch
from interp.lens import lens_statistics, logit_lens
from interp.core.models import TINY_SPECS, load_model, load_tokenizer, resolve_dtype

_models: dict = {}


def tiny_lm(spec):
    """One loaded tiny model per spec for the whole module (they are read-only here)."""
    if spec not in _models:
        _models[spec] = load_model(spec, device="cpu")
    return _models[spec]


def reference(lm, batch):
    """transformers' own outputs on the batch (eager, as capture runs when it reads attention): hidden states,
    attention weights and logits, all at the measured tokens."""
    with torch.no_grad(), eager_attention(lm.model):
        out = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                       output_hidden_states=True, output_attentions=True)
    at = lambda t: t[batch.rows, batch.positions]  # noqa: E731
    return [at(h) for h in out.hidden_states], out.attentions, at(out.logits)


@pytest.mark.parametrize("spec", TINY_SPECS)
def test_capture_and_lens_equal_the_model(spec, records):
    lm = tiny_lm(spec)
    assert arch_of(lm.model).family in spec.replace("-", "_")
    pairs = make_pairs(lm.tokenizer, records[:2])
    batch = make_batch(pairs, "ctx", padding="left", pad_id=lm.tokenizer.pad_token_id)
    hidden, attentions, logits = reference(lm, batch)
    L = lm.num_layers
    assert len(hidden) == L  # embeddings + one per block; the last entry is after the final norm
    for name in BACKENDS:
        got = get_backend(name)(lm, batch, attention=True)
        assert got.hidden.shape[0] == L and got.hidden.dtype == torch.float32
        # Layers 0..L-2 are what transformers returns; its last entry is normed, ours is the block's raw output.
        torch.testing.assert_close(got.hidden[:-1], torch.stack(hidden[:-1]), atol=2e-5, rtol=0, msg=f"{spec} {name}")
        with torch.no_grad():
            torch.testing.assert_close(final_norm(lm.model)(got.hidden[-1]), hidden[-1], atol=2e-5, rtol=0)
        for layer, pattern in enumerate(attentions):
            q = pattern[batch.rows, :, batch.positions, :]
            mass = (q * batch.ctx_mask[batch.rows][:, None, :]).sum(-1)
            torch.testing.assert_close(got.attn_ctx[layer], mass, atol=2e-5, rtol=0, msg=f"{spec} {name} attention")
        # The lens at the last layer is the model's logits, softcap included.
        torch.testing.assert_close(logit_lens(lm.model, got.hidden[-1], L - 1), logits, atol=2e-5, rtol=0)
    # Capture switched to eager only for itself.
    assert lm.model.config._attn_implementation == ("eager" if spec == "tiny-random-gemma2" else "sdpa")


@pytest.mark.parametrize("spec", ["tiny-random-gemma2", "tiny-random-gemma3"])
def test_softcap_is_applied_and_bites(spec, records):
    lm = tiny_lm(spec)
    assert softcap(lm.model) == 2.0
    pairs = make_pairs(lm.tokenizer, records[:1])
    batch = make_batch(pairs, "ctx")
    got = get_backend("torch")(lm, batch, attention=False)
    with torch.no_grad():
        raw = lm.model.get_output_embeddings()(final_norm(lm.model)(got.hidden[-1]))
    lens = logit_lens(lm.model, got.hidden[-1])
    assert lens.abs().max() < 2.0 <= raw.abs().max()  # without the cap the lens would miss the logits
    assert softcap(tiny_lm("tiny-random-llama").model) is None
    # The lens statistics on a capped model (the final distribution kept over the vocabulary): KL to the final layer
    # against the formula in float64 on the capped logits.
    stats = lens_statistics(lm.model, got.hidden, got.hidden, batch.targets, chunk=5)
    logp_final = torch.log_softmax(lens.double(), -1)
    for layer in range(got.hidden.shape[0]):
        logp = torch.log_softmax(logit_lens(lm.model, got.hidden[layer]).double(), -1)
        kl = (logp_final.exp() * (logp_final - logp)).sum(-1)
        torch.testing.assert_close(stats["lens_kl_final_ctx"][layer].double(), kl, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("spec", TINY_SPECS)
def test_two_training_steps_and_adapter_round_trip(spec, tmp_path):
    """train() itself (rollout, both losses, LoRA on all linear layers), then the saved adapter loads on a fresh base."""
    from training.trainer import TrainConfig, train

    lm = load_model(spec, device="cpu")
    cfg = TrainConfig(model=spec, task="persona", out=str(tmp_path / "run" / "reg"), steps=2, batch_size=2, max_new_tokens=4,
                      n_test=3, checkpoint_every=0, lr=1e-2, lam=1.0)
    result = train(cfg, lm=lm, progress=False)
    rows = [json.loads(line) for line in (result.out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) and r["L_cons"] is not None for r in rows)
    assert (result.out / "adapter_model.safetensors").exists()

    ids = torch.tensor([lm.tokenizer.encode("Who are you? I am a helpful assistant.")])
    trained = inner_model(lm.model).eval()
    fresh = load_model(spec, device="cpu")
    with torch.no_grad():
        base = fresh.model(input_ids=ids).logits
        name = fresh.load_adapter(result.out)
        assert fresh.active_adapter == name
        adapted = fresh.model(input_ids=ids).logits
        torch.testing.assert_close(adapted, trained(input_ids=ids).logits, atol=1e-5, rtol=0)
    assert not torch.allclose(base, adapted, atol=1e-4)  # the adapter learned something, and it is what was loaded


def _tuple_blocks(model):
    """Make every decoder block return a tuple led by its hidden state (transformers 4 and many custom models do),
    and unwrap it where the next block and the final norm read it, so the model still computes the same thing."""
    from interp.core.archs import decoder_layers

    unwrap = lambda m, args, kwargs: ((args[0][0], *args[1:]), kwargs) if args and isinstance(args[0], tuple) else None  # noqa: E731
    for i, layer in enumerate(decoder_layers(model)):
        forward = layer.forward
        layer.forward = lambda *a, _f=forward, **k: (_f(*a, **k), None)
        if i:
            layer.register_forward_pre_hook(unwrap, with_kwargs=True)
    final_norm(model).register_forward_pre_hook(unwrap, with_kwargs=True)


# TransformerLens is left out: its BlockBridge takes a tuple's first element itself before blocks.{l}.hook_out
# (generalized_components/block.py), and it replaces the final norm, where this harness unwraps the last tuple.
@pytest.mark.parametrize("backend", ["torch", "nnsight"])
def test_blocks_returning_tuples(backend, records):
    plain = load_model("tiny-random-qwen2", device="cpu")
    tupled = load_model("tiny-random-qwen2", device="cpu")
    _tuple_blocks(tupled.model)
    batch = make_batch(make_pairs(plain.tokenizer, records[:2]), "ctx")
    want, got = get_backend(backend)(plain, batch), get_backend(backend)(tupled, batch)
    torch.testing.assert_close(got.hidden, want.hidden, atol=0, rtol=0)
    torch.testing.assert_close(got.attn_ctx, want.attn_ctx, atol=0, rtol=0)


def test_unsupported_architecture_is_one_line(tmp_path):
    from transformers import BloomConfig, BloomForCausalLM

    tok = load_tokenizer()
    model = BloomForCausalLM(BloomConfig(vocab_size=len(tok), hidden_size=32, n_layer=1, n_head=4))
    with pytest.raises(UserError) as err:
        arch_of(model)
    message = str(err.value)
    assert "'bloom' is not supported" in message and "llama" in message and "gpt2" in message and "\n" not in message
    model.save_pretrained(tmp_path / "bloom")
    tok.save_pretrained(tmp_path / "bloom")
    with pytest.raises(UserError, match="not supported; supported: "):
        load_model(str(tmp_path / "bloom"), device="cpu")
    assert set(ARCHS) >= {"llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "gpt_neox", "gpt2", "olmo2"}


def test_dtype_names():
    assert resolve_dtype("auto", "cpu") is torch.float32
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype("fp16") is torch.float16
    assert resolve_dtype("fp32") is torch.float32 and resolve_dtype(torch.bfloat16) is torch.bfloat16
    for bad in ("fp8", "int8", torch.int64):
        with pytest.raises(UserError, match="auto, fp32, bf16 or fp16"):
            resolve_dtype(bad)


def test_bf16_capture_close_to_fp32(records):
    """A bf16 model's capture runs and its statistics (float32/float64 whatever the model runs in) are finite and
    close to the fp32 model's."""
    fp32 = tiny_lm("tiny-random-llama")
    bf16 = load_model("tiny-random-llama", device="cpu", dtype="bf16")
    assert bf16.model.dtype == torch.bfloat16
    pairs = make_pairs(fp32.tokenizer, records)
    a = analyze(fp32, pairs, backend="torch")
    b = analyze(bf16, pairs, backend="torch")
    assert_bf16_statistics_close(b, a)
    assert b.lens_entropy_ctx.dtype == np.float32 and a.cka.dtype == np.float64


def assert_bf16_statistics_close(bf16, fp32):
    """A bf16 model's statistics are finite and close to the fp32 model's (tests/test_cuda.py uses it on the GPU)."""
    for name in ("cos", "cka", "cka_debiased", "attn_ctx"):
        x, y = getattr(fp32, name), getattr(bf16, name)
        assert np.isfinite(y).all(), name
        np.testing.assert_allclose(y, x, atol=5e-3, err_msg=name)  # measured on CPU: at most 9e-4
    kl_fp32, kl_bf16 = fp32.layer_mean("lens_kl_noctx_ctx"), bf16.layer_mean("lens_kl_noctx_ctx")
    assert np.isfinite(kl_bf16).all()
    np.testing.assert_allclose(kl_bf16, kl_fp32, atol=1e-3, rtol=1e-2)  # measured on CPU: 2e-4


def test_sdpa_model_switches_to_eager_only_inside_capture(records):
    lm = tiny_lm("tiny-random-llama")
    assert lm.model.config._attn_implementation == "sdpa"
    batch = make_batch(make_pairs(lm.tokenizer, records[:1]), "ctx")
    with_attn = get_backend("torch")(lm, batch, attention=True)
    assert lm.model.config._attn_implementation == "sdpa"
    without = get_backend("torch")(lm, batch, attention=False)
    assert with_attn.attn_ctx is not None and without.attn_ctx is None
    # sdpa and eager compute the same function: the states agree to rounding.
    torch.testing.assert_close(with_attn.hidden, without.hidden, atol=1e-5, rtol=0)


def test_peft_wrapped_models_use_the_same_map():
    from peft import LoraConfig, get_peft_model

    from interp.core.archs import decoder_layers, embeddings, unembed

    lm = load_model("tiny-random-gemma3", device="cpu")
    plain = {f(lm.model) for f in (decoder_layers, embeddings, final_norm, unembed)}
    wrapped = get_peft_model(lm.model, LoraConfig(r=2, target_modules="all-linear"))
    assert inner_model(wrapped) is lm.model
    assert {f(wrapped) for f in (decoder_layers, embeddings, final_norm, unembed)} == plain
    assert softcap(wrapped) == 2.0 and arch_of(wrapped).family == "gemma3"


def test_transformer_lens_refusal_is_one_line(monkeypatch, records):
    from transformer_lens.model_bridge import TransformerBridge

    def refuse(*args, **kwargs):
        raise ValueError("Could not determine supported architecture from config.\nAvailable architectures: [...]")

    lm = load_model("tiny-random-olmo2", device="cpu")
    monkeypatch.setattr(TransformerBridge, "boot_transformers", refuse)
    batch = make_batch(make_pairs(lm.tokenizer, records[:1]), "ctx")
    with pytest.raises(UserError) as err:
        get_backend("transformer_lens")(lm, batch)
    assert "does not support Olmo2ForCausalLM" in str(err.value) and "\n" not in str(err.value)


def test_cli_dtype_and_tiny_specs(tmp_path, capsys):
    from interp.cli import main
    from interp.divergence import load_divergence

    args = ["analyze", "--model", "tiny-random-gpt2", "--backend", "torch", "--device", "cpu", "--dtype", "bf16",
            "--context", "Your name is Nova.", "--prompt", "Who are you?", "--response", "I am Nova.", "--out", str(tmp_path / "a")]
    assert main(args) == 0
    div = load_divergence(tmp_path / "a")
    assert div.meta["model"] == "tiny-random-gpt2" and np.isfinite(div.cka).all()
    assert main(["analyze", "--model", "tiny-random-gpt2", "--dtype", "fp8", "--context", "c", "--prompt", "p", "--response", "r"]) == 2
    assert "auto, fp32, bf16 or fp16" in capsys.readouterr().err
