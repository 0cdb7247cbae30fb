"""Each training option changes the loss the way its definition says (docs/measures.md#training): tested on one
fixed batch against formulas written here, so an option that were ignored would fail."""

import json

import pytest
import torch
import torch.nn.functional as F

from interp.core.models import LoadedModel, load_model
from interp.core.pairs import render_prompt_pair
from training.config import TrainConfig
from training.losses import consistency_kl, evidence_mask, masked_mean
from training.rollout import collate, response_logits, rollout
from training.tasks import load_task
from training.step import lora_model, micro_losses, sample_rollouts, step_losses


def _kl(p_logits, q_logits):  # Σ_v p (log p − log q), per token
    lp, lq = F.log_softmax(p_logits.double(), -1), F.log_softmax(q_logits.double(), -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def _mean(per_token, mask):
    return float((per_token * mask).sum() / mask.sum())


class Accel:
    device = torch.device("cpu")

    @staticmethod
    def backward(loss):
        loss.backward()


@pytest.fixture(scope="module")
def setup():
    lm = load_model("tiny-random-llama", device="cpu")  # its own copy (LoRA is injected in place), on the CPU as Accel
    cfg = TrainConfig(model="tiny-random-llama", out="never/s", placement="system", batch_size=4, max_new_tokens=5)
    peft = lora_model(lm, cfg)
    torch.manual_seed(1)
    with torch.no_grad():  # a student that differs from its base: LoRA's B starts at zero
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    task = load_task("persona")
    examples = task.train[:4]
    pps = [render_prompt_pair(lm.tokenizer, e.context, e.prompt, "system") for e in examples]
    student = LoadedModel(model=peft, tokenizer=lm.tokenizer, spec="tiny-random-llama")
    pairs = rollout(student, examples, pps, "system", max_new_tokens=5, temperature=1.0, seed=3)
    pad = lm.tokenizer.pad_token_id
    batch = collate(pairs, pad)
    with torch.no_grad():
        s_noctx, s_ctx = response_logits(peft, batch.noctx), response_logits(peft, batch.ctx)
        with peft.disable_adapter():
            b_noctx, b_ctx = response_logits(peft, batch.noctx), response_logits(peft, batch.ctx)
    return dict(cfg=cfg, peft=peft, student=student, examples=examples, pps=pps, pairs=pairs, batch=batch, pad=pad,
                s_noctx=s_noctx, s_ctx=s_ctx, b_noctx=b_noctx, b_ctx=b_ctx)


def _losses(setup, lam=1.0, ema=None, **change):
    cfg = TrainConfig(**{**setup["cfg"].__dict__, "lam": lam, **change})
    with torch.no_grad():
        out = micro_losses(setup["peft"], setup["peft"], None, cfg, setup["batch"], setup["pad"], lam, ema)
    return {k: (None if v is None else float(v)) for k, v in out.items()}


def test_default_losses_are_the_formulas(setup):
    m = setup["batch"].mask
    got = _losses(setup)
    assert got["L_opd"] == pytest.approx(_mean(_kl(setup["s_noctx"], setup["b_ctx"]), m), rel=1e-4)
    assert got["L_cons"] == pytest.approx(_mean(_kl(setup["s_noctx"], setup["s_ctx"]), m), rel=1e-4)
    assert got["loss"] == pytest.approx(got["L_opd"] + got["L_cons"], rel=1e-5)
    half = _losses(setup, lam=0.5)
    assert half["loss"] == pytest.approx(half["L_opd"] + 0.5 * half["L_cons"], rel=1e-5)


def test_teacher_anchor_is_the_base_model_without_context(setup):
    m = setup["batch"].mask
    got = _losses(setup, anchor="teacher")
    want = _mean(_kl(setup["b_noctx"], setup["s_ctx"]), m)
    assert got["L_cons"] == pytest.approx(want, rel=1e-4)
    assert abs(got["L_cons"] - _losses(setup)["L_cons"]) > 1e-4  # differs from the student anchor


def test_ema_anchor_uses_the_averaged_weights(setup):
    # An EMA of all-zero LoRA weights is the base model: the EMA anchor then equals the teacher anchor.
    zeros = {n: torch.zeros_like(p) for n, p in setup["peft"].named_parameters() if p.requires_grad}
    assert _losses(setup, anchor="ema", ema=zeros)["L_cons"] == pytest.approx(_losses(setup, anchor="teacher")["L_cons"], rel=1e-5)
    live = {n: p.detach().clone() for n, p in setup["peft"].named_parameters() if p.requires_grad}
    assert _losses(setup, anchor="ema", ema=live)["L_cons"] == pytest.approx(_losses(setup)["L_cons"], rel=1e-5)


def test_top_k_sums_over_the_students_top_k_only(setup):
    m, k = setup["batch"].mask, 8
    lp_s, lp_t = F.log_softmax(setup["s_noctx"].double(), -1), F.log_softmax(setup["b_ctx"].double(), -1)
    idx = setup["s_noctx"].topk(k, -1).indices
    per = (lp_s.gather(-1, idx).exp() * (lp_s.gather(-1, idx) - lp_t.gather(-1, idx))).sum(-1)
    got = _losses(setup, lam=0.0, top_k=k)["L_opd"]
    assert got == pytest.approx(_mean(per, m), rel=1e-4)
    assert abs(got - _losses(setup, lam=0.0)["L_opd"]) > 1e-5


def test_live_teacher_is_the_student_with_context(setup):
    m = setup["batch"].mask
    got = _losses(setup, lam=0.0, teacher="live")["L_opd"]
    assert got == pytest.approx(_mean(_kl(setup["s_noctx"], setup["s_ctx"]), m), rel=1e-4)
    assert abs(got - _losses(setup, lam=0.0)["L_opd"]) > 1e-4


def test_forward_kl_and_cross_entropy(setup):
    m, batch = setup["batch"].mask, setup["batch"]
    fwd = _losses(setup, lam=0.0, loss="forward_kl")["L_opd"]
    assert fwd == pytest.approx(_mean(_kl(setup["b_ctx"], setup["s_noctx"]), m), rel=1e-4)
    ce = _losses(setup, lam=0.0, loss="ce")["L_opd"]
    nll = -F.log_softmax(setup["s_noctx"].double(), -1).gather(-1, batch.targets.unsqueeze(-1)).squeeze(-1)
    assert ce == pytest.approx(_mean(nll, m), rel=1e-4)


def test_evidence_mask_counts_exactly_the_positions_above_tau():
    # vocabulary of 3; the sampled token is 0 everywhere; log-prob gains chosen by hand
    targets = torch.zeros((1, 4), dtype=torch.long)
    gains = torch.tensor([[-1.0, 0.0, 0.5, 2.0]])
    noctx = torch.zeros((1, 4, 3))
    # raise token 0's logit by g and lower the others so that its log-prob rises by exactly g: set log-probs directly
    lp_noctx = torch.log(torch.tensor([0.2, 0.4, 0.4]))
    noctx[:] = lp_noctx
    ctx = noctx.clone()
    for t in range(4):
        p0 = float(torch.exp(lp_noctx[0] + gains[0, t]))
        rest = (1 - p0) / 2
        ctx[0, t] = torch.log(torch.tensor([p0, rest, rest]))
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # the last position is padding
    got = evidence_mask(ctx, noctx, targets, mask, tau=0.5)
    assert got.tolist() == [[0.0, 0.0, 1.0, 0.0]]
    assert evidence_mask(ctx, noctx, targets, mask, tau=-2.0).tolist() == [[1.0, 1.0, 1.0, 0.0]]


def test_evidence_mask_changes_the_distillation_loss(setup):
    m = setup["batch"].mask
    tau = 0.0
    kept = evidence_mask(setup["b_ctx"], setup["b_noctx"], setup["batch"].targets, m, tau)
    got = _losses(setup, lam=0.0, evidence_mask=tau)
    assert got["L_opd"] == pytest.approx(_mean(_kl(setup["s_noctx"], setup["b_ctx"]), kept), rel=1e-4)
    assert got["evidence_share"] == pytest.approx(float(masked_mean(kept, m)))
    assert 0 < got["evidence_share"] < 1


@pytest.mark.parametrize("share,expected", [(0.0, 0), (0.5, 2), (1.0, 4)])
def test_guided_share_samples_that_share_from_the_teacher_with_context(setup, share, expected):
    cfg = TrainConfig(**{**setup["cfg"].__dict__, "guided_share": share})
    pairs, guided = sample_rollouts(setup["student"], setup["peft"], None, cfg, setup["examples"], setup["pps"], seed=5)
    assert guided == expected
    n = len(pairs)
    # the guided rows are what the base model samples *with* the context, with the same seed
    with setup["peft"].disable_adapter():
        teacher = LoadedModel(model=setup["peft"], tokenizer=setup["student"].tokenizer, spec="t")
        want = rollout(teacher, setup["examples"][n - expected:], setup["pps"][n - expected:], "system",
                       max_new_tokens=5, temperature=1.0, batch_size=4, seed=5 + 7, side="ctx") if expected else []
    assert [p.response_ids for p in pairs[n - expected:]] == [p.response_ids for p in want]
    own = rollout(setup["student"], setup["examples"][: n - expected], setup["pps"][: n - expected], "system",
                  max_new_tokens=5, temperature=1.0, batch_size=4, seed=5) if expected < n else []
    assert [p.response_ids for p in pairs[: n - expected]] == [p.response_ids for p in own]
    off = TrainConfig(**{**setup["cfg"].__dict__, "rollouts": "teacher"})
    assert sample_rollouts(setup["student"], setup["peft"], None, off, setup["examples"], setup["pps"], seed=5)[1] == n


def test_gradient_accumulation_equals_one_large_batch(setup):
    grads = {}
    for accum, bs in ((1, 4), (2, 2), (4, 1)):
        cfg = TrainConfig(**{**setup["cfg"].__dict__, "batch_size": bs, "grad_accum": accum, "lam": 0.5})
        setup["peft"].zero_grad(set_to_none=True)
        parts = step_losses(setup["peft"], setup["peft"], None, cfg, setup["pairs"], setup["pad"], 0.5, None, Accel())
        grads[accum] = ({n: p.grad.clone() for n, p in setup["peft"].named_parameters() if p.requires_grad}, parts["loss"])
    setup["peft"].zero_grad(set_to_none=True)
    for accum in (2, 4):
        assert grads[accum][1] == pytest.approx(grads[1][1], rel=1e-5)
        for n, g in grads[1][0].items():
            torch.testing.assert_close(grads[accum][0][n], g, rtol=1e-4, atol=1e-6)


def test_consistency_gets_no_gradient_through_the_anchor(setup):
    a = setup["s_noctx"].clone().requires_grad_(True)
    c = setup["s_ctx"].clone().requires_grad_(True)
    consistency_kl(a, c, setup["batch"].mask).backward()
    assert a.grad is None and c.grad is not None and c.grad.abs().sum() > 0


def test_every_setting_has_a_flag():
    from dataclasses import fields

    import typer

    from training.__main__ import app

    command = typer.main.get_command(app)
    for name in ("train", "pair"):
        opts = {o for p in command.commands[name].params for o in p.opts}
        for f in fields(TrainConfig):
            assert "--" + f.name.replace("_", "-") in opts, (name, f.name)


def test_a_shared_context_prefix_gives_the_same_logits_and_gradients(setup):
    from training.rollout import MIN_SHARED_PREFIX, prefix_cache

    peft, side = setup["peft"], setup["batch"].ctx
    assert side.prefix >= MIN_SHARED_PREFIX  # the template and the persona card
    params = [p for p in peft.parameters() if p.requires_grad]
    results = []
    for share in (False, True):
        peft.zero_grad(set_to_none=True)
        logits = response_logits(peft, side, share_prefix=share)
        (logits.float().log_softmax(-1)[..., :50].exp().sum() * 1e-2).backward()
        results.append((logits.detach(), [p.grad.clone() for p in params]))
    peft.zero_grad(set_to_none=True)
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-4)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-6)
    # a frozen teacher's prefix, encoded once and reused
    with torch.no_grad(), peft.disable_adapter():
        kv = prefix_cache(peft, side)
        torch.testing.assert_close(response_logits(peft, side, kv=kv), setup["b_ctx"], rtol=1e-4, atol=1e-4)


def test_losses_with_the_teacher_prefix_cached_equal_the_plain_ones(setup):
    cfg = TrainConfig(**{**setup["cfg"].__dict__, "lam": 0.5})
    with torch.no_grad():
        cache = {}
        first = micro_losses(setup["peft"], setup["peft"], None, cfg, setup["batch"], setup["pad"], 0.5, None, cache)
        assert len(cache) == 1
        again = micro_losses(setup["peft"], setup["peft"], None, cfg, setup["batch"], setup["pad"], 0.5, None, cache)
        plain = micro_losses(setup["peft"], setup["peft"], None, TrainConfig(**{**cfg.__dict__, "gradient_checkpointing": True}),
                             setup["batch"], setup["pad"], 0.5, None, None)  # checkpointing turns sharing off
    for k in ("L_opd", "L_cons", "loss"):
        assert float(first[k]) == pytest.approx(float(plain[k]), rel=1e-4)
        assert float(again[k]) == float(first[k])


def test_tensorboard_tracker_holds_every_step(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from training.trainer import train

    cfg = TrainConfig(model="tiny-random-llama", task="persona", steps=3, batch_size=2, max_new_tokens=3, n_test=3,
                      checkpoint_every=0, out=str(tmp_path / "run" / "s"), report_to="tensorboard")
    train(cfg, progress=False)
    events = list((tmp_path / "run" / "s" / "logs").rglob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("L_opd")]
    assert steps == [1, 2, 3]
    lines = [json.loads(x) for x in (tmp_path / "run" / "s" / "metrics.jsonl").read_text().splitlines()]
    assert [e.value for e in acc.Scalars("L_opd")] == pytest.approx([x["L_opd"] for x in lines], rel=1e-6)


def test_gradient_checkpointing_gives_the_same_first_step(tmp_path):
    from training.trainer import train

    first = {}
    for gc in (False, True):
        cfg = TrainConfig(model="tiny-random-llama", task="persona", steps=1, batch_size=2, max_new_tokens=3, n_test=3,
                          checkpoint_every=0, lam=0.5, out=str(tmp_path / "run" / f"gc{int(gc)}"), gradient_checkpointing=gc)
        first[gc] = train(cfg, progress=False).last
    for k in ("loss", "L_opd", "L_cons", "grad_norm"):
        assert first[True][k] == pytest.approx(first[False][k], rel=1e-4)


def test_cons_prefix_fixed_keeps_the_loss_and_holds_the_contexts_keys_and_values(setup):
    """`cons_prefix = "fixed"`: the same losses; the gradient is the exact one of a forward whose keys and values at
    the context's positions are detached (built here with hooks on k_proj and v_proj over whole rows, no sharing)."""
    from training.rollout import MIN_SHARED_PREFIX

    peft, batch = setup["peft"], setup["batch"]
    P = batch.ctx.prefix
    assert P >= MIN_SHARED_PREFIX
    params = [p for p in peft.parameters() if p.requires_grad]

    def grads(cons_prefix, hooks=False):
        cfg = TrainConfig(**{**setup["cfg"].__dict__, "lam": 1.0, "cons_prefix": cons_prefix})
        handles = []
        if hooks:  # detach the projections' outputs at the shared prefix of the with-context rows (the second half)
            B = batch.mask.shape[0]

            def detach_prefix(module, inputs, out):
                if out.shape[0] != 2 * B:
                    return out
                out = out.clone()
                out[B:, :P] = out[B:, :P].detach()
                return out

            for name, module in peft.named_modules():
                if name.endswith(("k_proj", "v_proj")) and hasattr(module, "base_layer"):
                    handles.append(module.register_forward_hook(detach_prefix))
        try:
            peft.zero_grad(set_to_none=True)
            out = micro_losses(peft, peft, None, cfg, batch, setup["pad"], 1.0, None)
            out["loss"].backward()
        finally:
            for h in handles:
                h.remove()
        g = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
        peft.zero_grad(set_to_none=True)
        return {k: float(v.detach()) for k, v in out.items() if v is not None}, g

    exact, g_exact = grads("exact")
    fixed, g_fixed = grads("fixed")
    # whole rows (checkpointing turns sharing off), the context's keys and values detached by hooks
    cfg_plain = {**setup["cfg"].__dict__}
    setup["cfg"].__dict__["gradient_checkpointing"] = True
    try:
        hand, g_hand = grads("exact", hooks=True)
    finally:
        setup["cfg"].__dict__.update(cfg_plain)
    for k in ("L_opd", "L_cons", "loss"):
        assert fixed[k] == pytest.approx(exact[k], rel=1e-4)
    for a, b in zip(g_fixed, g_hand):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)
    assert max(float((a - b).abs().max()) for a, b in zip(g_fixed, g_exact)) > 1e-4  # it does change the gradient


def test_cons_prefix_is_checked():
    from interp.core.errors import UserError

    with pytest.raises(UserError, match="unknown --cons-prefix 'half'"):
        TrainConfig(model="tiny-random-llama", out="x/s", cons_prefix="half").check()
