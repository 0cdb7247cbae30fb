"""The CUDA paths, on a machine that has a CUDA GPU (skipped elsewhere, so CI on CPU skips the whole file): `auto`
precision is bf16 there; the chunked losses in bf16 on the GPU equal the fp32 formulas; two training steps run in bf16
on the GPU and the saved adapter loads on CPU in fp32 to the same logits; generation merges the adapter on the GPU,
restores the weights bit for bit, and its greedy decoding loop gives HF `generate`'s tokens; capture's statistics on
the GPU in bf16 are close to CPU fp32's; `pair` + `eval` run end to end on the GPU."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from test_generation import PROMPTS, _student

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_auto_precision_is_bf16_on_the_gpu():
    from interp.core.models import load_model, resolve_dtype

    assert resolve_dtype("auto", "cuda") is torch.bfloat16 and resolve_dtype("auto", "cpu") is torch.float32
    lm = load_model("tiny-random-llama", device="cuda")
    p = next(lm.model.parameters())
    assert p.device.type == "cuda" and p.dtype is torch.bfloat16


@pytest.mark.parametrize("top_k", [None, 32])
def test_chunked_losses_in_bf16_on_the_gpu_equal_the_fp32_formulas(top_k):
    """At the study's shape (batch 8, 96 tokens, SmolLM2's 49,152-token vocabulary), bf16 logits on the GPU."""
    from test_losses_chunked import unchunked_consistency_kl, unchunked_reverse_kl

    from training.losses import consistency_kl, reverse_kl

    g = torch.Generator(device="cuda").manual_seed(0)
    B, R, V = 8, 96, 49152
    s = (2 * torch.randn(B, R, V, generator=g, device="cuda")).bfloat16()
    t = (2 * torch.randn(B, R, V, generator=g, device="cuda")).bfloat16()
    mask = torch.ones(B, R, device="cuda")
    mask[1, 40:] = 0
    mask[5, 3:] = 0

    def grads(fn, *args, **kw):
        x, y = (a.clone().requires_grad_(True) for a in args)
        loss = fn(x, y, mask, **kw)
        loss.backward()
        return [loss.detach()] + [a.grad for a in (x, y) if a.grad is not None]  # consistency_kl's anchor has none

    for fn, formula, kw in ((reverse_kl, unchunked_reverse_kl, dict(top_k=top_k)),
                            (consistency_kl, unchunked_consistency_kl, {})):
        want = grads(formula, s, t, **kw)
        got = grads(fn, s, t, **kw)
        assert len(got) == len(want) == (3 if fn is reverse_kl else 2)
        for w, h, what in zip(want, got, ("value", "grad", "grad")):
            assert h.dtype == (torch.float32 if what == "value" else torch.bfloat16) and torch.isfinite(h).all(), what
            torch.testing.assert_close(h.float(), w.float(), atol=2e-3, rtol=2e-2, msg=f"{fn.__name__} {what}")


def test_two_training_steps_in_bf16_on_the_gpu_and_the_adapter_loads_on_cpu(tmp_path):
    from interp.core.archs import inner_model
    from interp.core.models import load_model
    from training.trainer import TrainConfig, train

    cfg = TrainConfig(model="tiny-random-llama", task="persona", out=str(tmp_path / "run" / "reg"), steps=2, batch_size=2,
                      max_new_tokens=4, n_test=3, checkpoint_every=0, lr=1e-2, lam=1.0)
    result = train(cfg, progress=False)
    rows = [json.loads(line) for line in (result.out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) and r["L_cons"] is not None for r in rows)

    ids = torch.tensor([[1, 5, 9, 33, 7, 8, 2, 300]])
    gpu = load_model("tiny-random-llama", device="cuda", adapter=result.out)
    cpu = load_model("tiny-random-llama", device="cpu", dtype="fp32", adapter=result.out)
    assert next(gpu.model.parameters()).dtype is torch.bfloat16
    with torch.no_grad():
        logits = lambda lm, x: inner_model(lm.model)(input_ids=x).logits.float().cpu()  # noqa: E731
        on_gpu, on_cpu = logits(gpu, ids.cuda()), logits(cpu, ids)
        with gpu.use(None), cpu.use(None):
            base_gap = (logits(gpu, ids.cuda()) - logits(cpu, ids)).abs().max()
    # The bf16 model is not the fp32 one (its weights are rounded); the adapter may add no more than that gap again.
    assert 0 < (on_gpu - on_cpu).abs().max() <= 2 * base_gap


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_merged_generation_on_the_gpu_restores_the_weights_and_keeps_the_logits(dtype):
    """fp32: merged equals unmerged to float tolerance. bf16: merging rounds W + s·BA to bf16 once, where the unmerged
    branch rounds each product; neither is exact, so the bar is the model's own bf16 error: the merged logits are no
    further from the fp32 model's than twice the unmerged bf16 logits are."""
    import copy

    from interp.core.generate import generate, merged_lora

    lm, peft_model = _student(None, device="cuda", dtype=dtype)
    before = {n: (p.detach().clone(), p.data_ptr()) for n, p in peft_model.named_parameters()}
    ids = torch.tensor([PROMPTS[0]], device="cuda")
    with torch.no_grad():
        plain = peft_model(input_ids=ids).logits.float()
        with merged_lora(peft_model) as merged:
            fused = peft_model(input_ids=ids).logits.float()
        exact = copy.deepcopy(peft_model).float()(input_ids=ids).logits
    assert merged
    if dtype == "fp32":
        torch.testing.assert_close(fused, plain, atol=1e-4, rtol=1e-4)
    else:
        assert (fused - exact).abs().max() <= 2 * (plain - exact).abs().max()
    out = generate(lm, PROMPTS, max_new_tokens=12, merge=True)
    assert len(out) == len(PROMPTS) and all(0 < len(o) <= 12 for o in out)
    for n, p in peft_model.named_parameters():
        assert p.data_ptr() == before[n][1] and torch.equal(p.detach(), before[n][0]), n


def test_the_decoding_loop_gives_hf_generates_greedy_tokens_on_the_gpu():
    """fp32 on the GPU, rows leaving the batch as they stop (as tests/test_generation.py checks on CPU)."""
    from interp.core.generate import _loop_supported, generate
    from interp.core.models import load_model

    lm = load_model("tiny-random-llama", device="cuda", dtype="fp32")
    assert _loop_supported(lm.model)  # the loop itself runs, not the fallback to HF generate
    loop = generate(lm, PROMPTS, max_new_tokens=16, engine="loop")
    hf = generate(lm, PROMPTS, max_new_tokens=16, engine="hf")
    assert loop == hf


def test_capture_in_bf16_on_the_gpu_is_close_to_cpu_fp32(records):
    from test_archs import assert_bf16_statistics_close

    from interp import analyze, make_pairs
    from interp.core.models import load_model

    cpu = load_model("tiny-random-llama", device="cpu", dtype="fp32")
    gpu = load_model("tiny-random-llama", device="cuda")
    pairs = make_pairs(cpu.tokenizer, records)
    assert_bf16_statistics_close(analyze(gpu, pairs, backend="torch"), analyze(cpu, pairs, backend="torch"))


def test_pair_then_eval_on_the_gpu(tmp_path):
    from typer.testing import CliRunner

    from training.__main__ import app

    run = tmp_path / "smoke"
    small = ["--model", "tiny-random-llama", "--steps", "2", "--batch-size", "2", "--max-new-tokens", "4", "--n-test", "2"]
    result = CliRunner().invoke(app, ["pair", "--task", "facts", *small, "--eval-new-tokens", "4", "--no-layers", "--out", str(run)])
    assert result.exit_code == 0, result.output
    config = json.loads((run / "reg" / "train_config.json").read_text())
    assert config["dtype"] == "auto"
    rows = [json.loads(line) for line in (run / "reg" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(np.isfinite(r["loss"]) for r in rows)
    assert json.loads((run / "eval.json").read_text())["n"] >= 1
