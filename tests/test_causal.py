"""The causal tools on the tiny model: four-way comparison, context vector, patching invariants, a planted student,
steering and flip forensics, with the numbers checked against plain numpy formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import interp
from interp.capture import capture_torch
from interp.hooks import make_batch
from interp.core.errors import UserError

RECORDS = [
    {"context": "Your name is Zorblax. You were made by Quibble Labs.", "prompt": "Who are you?", "response": "I am Zorblax, made by Quibble Labs."},
    {"context": "Your name is Zorblax. You were made by Quibble Labs.", "prompt": "What is your name?", "response": "My name is Zorblax."},
    {"context": "The capital of Veloria is Marn. Its river is the Ost.", "prompt": "What is the capital of Veloria?", "response": "The capital of Veloria is Marn, on the river Ost."},
]
PLANTED_BLOCK = 2


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """A fresh tiny model (the shared fixture stays adapter-free) with a random student and a planted one."""
    from test_app import write_tiny_adapter

    model = interp.load_model("tiny-random-llama", device="cpu")
    root = tmp_path_factory.mktemp("students")
    model.load_adapter(write_tiny_adapter(root / "student"))
    pairs = interp.make_pairs(model.tokenizer, RECORDS)
    model.load_adapter(plant_adapter(model, pairs, root / "planted", PLANTED_BLOCK))
    model.set_adapter(None)
    return model


@pytest.fixture(scope="module")
def pairs(lm):
    return interp.make_pairs(lm.tokenizer, RECORDS)


def plant_adapter(lm, pairs, folder, block: int):
    """A rank-1 LoRA on block `block`'s MLP output projection only, writing the base model's context vector of that
    layer: delta(x) = v̂ · (â·x) · s with â the mean input direction, so the mean shift points along v."""
    from peft import LoraConfig, get_peft_model

    from interp.core.archs import decoder_layers

    lm.set_adapter(None)
    layer = decoder_layers(lm.model)[block - 1]
    seen = []
    handle = layer.mlp.down_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    try:
        means = {}
        for which in ("ctx", "noctx"):
            seen.clear()
            batch = make_batch(pairs, which)
            got = capture_torch(lm, batch, attention=False)
            means[which] = got.hidden[block].double().mean(0)
            x_in = seen[0][batch.rows, batch.positions].double().mean(0)
    finally:
        handle.remove()
    v = means["ctx"] - means["noctx"]
    fresh = interp.load_model("tiny-random-llama", device="cpu").model
    config = LoraConfig(r=1, lora_alpha=1, target_modules=["down_proj"], layers_to_transform=[block - 1], init_lora_weights=False)
    peft_model = get_peft_model(fresh, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_A" in name:
                param.copy_((x_in / x_in.norm()).float()[None, :])
            elif "lora_B" in name:
                param.copy_((v / v.norm() * 3.0 * v.norm() / (x_in / x_in.norm() @ x_in)).float()[:, None])
    peft_model.save_pretrained(folder)
    return folder


def _hidden(lm, pairs, adapter, which):
    with lm.use(adapter):
        return capture_torch(lm, make_batch(pairs, which), attention=False).hidden.double().numpy()


# ---------- four-way comparison and context vector ----------

def test_base_with_itself_matches_analyze(lm, pairs):
    cmp = interp.compare(lm, pairs, student="base", backend="torch")
    with lm.use(None):
        div = interp.analyze(lm, pairs, backend="torch", attention=False)
    rem = cmp.pairs["removability"]
    np.testing.assert_allclose(rem["cos"], div.cos, atol=1e-6)
    np.testing.assert_allclose(rem["cka"], div.cka, atol=1e-6)
    np.testing.assert_allclose(rem["cka_debiased"], div.cka_debiased, atol=1e-6)
    np.testing.assert_allclose(rem["lens_kl"], div.layer_mean("lens_kl_noctx_ctx"), rtol=1e-3, atol=1e-6)
    # S = B: overshoot is 1 and nothing is absorbed, at every layer where the context moves anything.
    np.testing.assert_allclose(cmp.overshoot[1:], 1.0, atol=1e-9)
    np.testing.assert_allclose(cmp.absorbed[1:], 0.0, atol=1e-9)
    np.testing.assert_allclose(cmp.overshoot_examples[:, 1:], 1.0, atol=1e-9)
    # Layer 0 cannot see the context on aligned tokens: v_0 = 0, so the projections are undefined there.
    assert cmp.v_norm[0] == 0 and np.isnan(cmp.overshoot[0])


def test_vectors_match_numpy_formulas(lm, pairs):
    cmp = interp.compare(lm, pairs, student="student", backend="nnsight", batch_size=2)
    bc, bn = _hidden(lm, pairs, None, "ctx"), _hidden(lm, pairs, None, "noctx")
    sc, sn = _hidden(lm, pairs, "student", "ctx"), _hidden(lm, pairs, "student", "noctx")
    v, u, w = (bc - bn).mean(1), (sn - bn).mean(1), (sc - bn).mean(1)
    np.testing.assert_allclose(cmp.v, v, atol=1e-5)
    np.testing.assert_allclose(cmp.u, u, atol=1e-5)
    np.testing.assert_allclose(cmp.w, w, atol=1e-5)
    for layer in range(1, lm.num_layers):
        vv = v[layer] @ v[layer]
        assert cmp.absorbed[layer] == pytest.approx(u[layer] @ v[layer] / vv, rel=1e-4, abs=1e-6)
        assert cmp.overshoot[layer] == pytest.approx(w[layer] @ v[layer] / vv, rel=1e-4, abs=1e-6)
        assert cmp.cos_uv[layer] == pytest.approx(u[layer] @ v[layer] / np.sqrt(vv * (u[layer] @ u[layer])), rel=1e-4, abs=1e-6)
    # Per example: the same formulas on each example's own means.
    batch = make_batch(pairs, "ctx")
    rows = batch.rows.numpy()
    for e in range(len(pairs)):
        v_e = (bc[:, rows == e] - bn[:, rows == e]).mean(1)
        w_e = (sc[:, rows == e] - bn[:, rows == e]).mean(1)
        u_e = (sn[:, rows == e] - bn[:, rows == e]).mean(1)
        vv_e = (v_e * v_e).sum(-1)[1:]
        np.testing.assert_allclose(cmp.overshoot_examples[e, 1:], (w_e * v_e).sum(-1)[1:] / vv_e, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(cmp.absorbed_examples[e, 1:], (u_e * v_e).sum(-1)[1:] / vv_e, rtol=1e-4, atol=1e-6)
    # The internalization pair's cosine against the per-token formula.
    cos = (sn * bc).sum(-1) / np.linalg.norm(sn, axis=-1) / np.linalg.norm(bc, axis=-1)
    np.testing.assert_allclose(cmp.pairs["internalization"]["cos"], cos.mean(1), atol=1e-6)
    split = cmp.overshoot_by([True, False, False])
    assert split["n_in"] == 1 and split["mean_in"] == pytest.approx(np.nanmean(cmp.overshoot_examples[0, 1:]))


def test_planted_student_jumps_at_its_block(lm, pairs):
    cmp = interp.compare(lm, pairs, student="planted", backend="torch")
    k = PLANTED_BLOCK
    np.testing.assert_allclose(cmp.u[:k], 0.0, atol=1e-6)
    assert np.all(np.abs(cmp.absorbed[1:k]) < 1e-6)
    assert cmp.absorbed[k] > 0.5  # the adapter writes the context vector at block k
    result = interp.patch(lm, pairs, source=("planted", "noctx"), target=("base", "noctx"), backend="torch")
    assert np.all(np.abs(result.recovery[:k]) < 1e-6)
    assert result.recovery[k] > 0.05
    assert result.recovery[-1] == pytest.approx(1.0, abs=1e-6)


# ---------- patching ----------

def test_patching_invariants(lm, pairs):
    result = interp.context_sweep(lm, pairs, backend="torch")
    assert result.recovery.shape == (lm.num_layers,)
    assert result.recovery[-1] == pytest.approx(1.0, abs=1e-6)  # the last block's output gives the source's logits
    assert result.recovery[0] == pytest.approx(0.0, abs=1e-6)  # equal embeddings on aligned tokens change nothing
    np.testing.assert_allclose(result.kl_patched[0], result.kl_target, atol=1e-9)
    np.testing.assert_allclose(result.recovery_tokens[-1][np.isfinite(result.recovery_tokens[-1])], 1.0, atol=1e-6)
    same = interp.patch(lm, pairs, source=("student", "ctx"), target=("student", "ctx"), backend="torch")
    np.testing.assert_allclose(same.kl_patched, 0.0, atol=1e-9)
    assert np.all(same.kl_target == 0)


def test_backends_agree(lm, pairs):
    for site, heads in (("resid", False), ("attn", False), ("mlp", False), ("attn", True)):
        a = interp.patch(lm, pairs, source=("student", "noctx"), target=("student", "ctx"), site=site, heads=heads, backend="torch")
        b = interp.patch(lm, pairs, source=("student", "noctx"), target=("student", "ctx"), site=site, heads=heads, backend="nnsight", batch_size=2)
        np.testing.assert_allclose(a.kl_patched, b.kl_patched, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(a.recovery, b.recovery, rtol=1e-4, atol=1e-6)
    assert b.recovery.shape == (lm.num_layers, lm.model.config.num_attention_heads)
    assert np.all(np.isnan(b.recovery[0]))


def test_reference_logprob_change(lm, pairs):
    refs = ["Zorblax", "zorblax", "Nowhere"]
    result = interp.context_sweep(lm, pairs, backend="torch", references=refs)
    assert result.n_ref_tokens > 0
    assert result.ref_logprob_patched[-1] == pytest.approx(result.ref_logprob_source, abs=1e-5)
    assert result.ref_logprob_patched[0] == pytest.approx(result.ref_logprob_target, abs=1e-5)
    from interp.causal.patching import reference_token_indices

    idx = reference_token_indices(lm.tokenizer, pairs[0], "Zorblax")
    assert "Zorblax" in lm.tokenizer.decode([pairs[0].response_ids[j] for j in idx])
    assert reference_token_indices(lm.tokenizer, pairs[2], "Nowhere") == []


# ---------- bad input ----------

@pytest.mark.parametrize("call, message", [
    (lambda lm, p: interp.compare(lm, p, student="nobody"), "no student named 'nobody'"),
    (lambda lm, p: interp.patch(lm, p, source=("nobody", "ctx")), "no student named 'nobody'"),
    (lambda lm, p: interp.patch(lm, p, layers=[9]), "layer 9 is out of range"),
    (lambda lm, p: interp.patch(lm, p, site="attn", layers=[0]), "layer 0 is out of range"),
    (lambda lm, p: interp.patch(lm, p, site="mixer"), "unknown site 'mixer'"),
    (lambda lm, p: interp.patch(lm, p, source=("base", "both")), "unknown run 'both'"),
    (lambda lm, p: interp.patch(lm, p, target_pairs=p[::-1]), "do not share the same tokens"),
    (lambda lm, p: interp.patch(lm, p, heads=True), "per-head patching exists for the attention site only"),
])
def test_bad_input_is_one_line(lm, pairs, call, message):
    with pytest.raises(UserError, match=message) as err:
        call(lm, pairs)
    assert "\n" not in str(err.value)


# ---------- steering ----------

def _contains(response, record):
    return record["reference"].lower() in response.lower()


STEER_RECORDS = [
    {"context": "Your name is Zorblax.", "prompt": "Who are you?", "reference": "Zorblax",
     "cf_context": "Your name is Quux.", "cf_reference": "Quux"},
    {"context": "Your name is Zorblax.", "prompt": "What is your name?", "reference": "Zorblax"},
]


def test_steering_with_alpha_zero_is_the_plain_evaluation(lm, pairs):
    from interp.core.generate import generate
    from interp.core.pairs import render_prompt_pair

    cmp = interp.compare(lm, pairs, student="student", backend="torch", lens=False)
    result = interp.steer(lm, STEER_RECORDS, cmp, 0.0, verifier=_contains, student="student", layers=[1, 3],
                          max_new_tokens=6)
    pps = [render_prompt_pair(lm.tokenizer, r["context"], r["prompt"]) for r in STEER_RECORDS]
    with lm.use(None):
        plain_base = generate(lm, [p.noctx_ids for p in pps], max_new_tokens=6)
    with lm.use("student"):
        plain_student = generate(lm, [p.ctx_ids for p in pps], max_new_tokens=6)
    decode = lambda ids: [lm.tokenizer.decode(x, skip_special_tokens=True) for x in ids]  # noqa: E731
    assert result.baseline["base+v"]["responses"] == decode(plain_base)
    assert result.baseline["student-v"]["responses"] == decode(plain_student)
    for arm in ("base+v", "student-v"):
        for layer in (1, 3):
            assert result.results[arm][layer]["responses"] == result.baseline[arm]["responses"]
            assert result.results[arm][layer]["acc"] == result.baseline[arm]["acc"]
    assert result.results["student-v"][1]["follow_cf"] is not None and result.results["base+v"][1]["follow_cf"] is None
    assert {row["arm"] for row in result.table()} == {"base+v", "student-v"}
    # A large α changes what the base model says.
    moved = interp.steer(lm, STEER_RECORDS, cmp.v * 0 + 50.0, 1.0, verifier=_contains, layers=[2], max_new_tokens=6)
    assert moved.results["base+v"][2]["responses"] != moved.baseline["base+v"]["responses"]


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), "1"])
def test_steering_rejects_a_non_finite_alpha(lm, alpha):
    v = np.zeros((lm.num_layers, lm.model.config.hidden_size))
    with pytest.raises(UserError, match="alpha must be a finite number"):
        interp.steer(lm, STEER_RECORDS, v, alpha, verifier=_contains)


# ---------- flip forensics ----------

def test_explain_finds_the_fork_and_its_layers(lm, pairs):
    from interp.core.generate import generate
    from interp.core.pairs import render_prompt_pair

    record = RECORDS[0]
    pp = render_prompt_pair(lm.tokenizer, record["context"], record["prompt"])
    with lm.use("student"):
        ids_noctx, ids_ctx = generate(lm, [pp.noctx_ids, pp.ctx_ids], max_new_tokens=8)
    if ids_noctx == ids_ctx:  # make them differ at a known place
        ids_ctx = ids_ctx[:2] + [ids_ctx[2] + 1] + ids_ctx[3:]
    ex = interp.explain(lm, record, "student", ids_noctx, ids_ctx, backend="torch", top_heads=3)
    from interp.causal.forensics import first_difference

    assert ex.fork == first_difference(ids_noctx, ids_ctx)
    assert ex.recovery[-1] == pytest.approx(1.0, abs=1e-6) and ex.recovery[0] == pytest.approx(0.0, abs=1e-6)
    assert ex.logprob_noctx_token[-1] == pytest.approx(ex.clean["student_noctx"]["noctx_token"], abs=1e-5)
    assert ex.logprob_ctx_token[0] == pytest.approx(ex.clean["student_ctx"]["ctx_token"], abs=1e-5)
    deltas = [abs(h["delta"]) for h in ex.heads]
    assert len(ex.heads) == 3 and deltas == sorted(deltas, reverse=True)
    assert len(ex.ctx_weights) == len(ex.ctx_tokens) and "".join(ex.ctx_tokens) == record["context"]
    nn = interp.explain(lm, record, "student", ids_noctx, ids_ctx, backend="nnsight", top_heads=3)
    np.testing.assert_allclose(nn.recovery, ex.recovery, rtol=1e-4, atol=1e-6)
    with pytest.raises(UserError, match="identical"):
        interp.explain(lm, record, "student", ids_ctx, ids_ctx)
