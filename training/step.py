"""One training step's work, loss by loss: the rollouts (on-policy, guided or the teacher's), the teacher's and the
anchors' logits, and the losses of each micro-batch (the formulas are in training.losses; docs/measures.md#training)."""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

import torch

from interp.core.degenerate import loop_start
from interp.core.errors import UserError
from interp.core.models import LoadedModel, load_model
from training.checkpoints import lora_params as _lora_params
from training.config import TrainConfig
from training.losses import consistency_kl, cross_entropy, evidence_mask, forward_kl, masked_mean, reverse_kl
from training.rollout import MIN_SHARED_PREFIX, Batch, both_sides, collate, prefix_cache, response_logits, rollout


def lora_model(lm: LoadedModel, cfg: TrainConfig):
    from peft import LoraConfig, get_peft_model

    targets = cfg.target_modules if cfg.target_modules == "all-linear" else [m.strip() for m in cfg.target_modules.split(",") if m.strip()]
    config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets, task_type="CAUSAL_LM")  # type: ignore[arg-type]  # peft annotates lora_alpha as int; a float works (scale = alpha / r)
    torch.manual_seed(cfg.seed)  # LoRA's A matrices are random: seed them so every student starts the same
    try:
        return get_peft_model(lm.model, config)
    except ValueError as err:
        raise UserError(f"--target-modules {cfg.target_modules!r} does not fit this model ({str(err).splitlines()[0][:160]})") from err


def load_teacher(cfg: TrainConfig, lm: LoadedModel, device: str, dtype: str) -> LoadedModel | None:
    """A separate teacher model (`--teacher-model`), which must share the student's tokenizer: the losses compare
    distributions over the same token ids. None: the teacher is the student's base weights (adapter disabled)."""
    if cfg.teacher_model is None:
        return None
    teacher = load_model(cfg.teacher_model, device=device, dtype=dtype)
    if teacher.tokenizer.get_vocab() != lm.tokenizer.get_vocab():
        raise UserError(
            f"the teacher '{cfg.teacher_model}' has another tokenizer than the student '{cfg.model}'; "
            "distillation compares token distributions, so pick a teacher of the same model family"
        )
    for p in teacher.model.parameters():
        p.requires_grad_(False)
    return teacher


@contextlib.contextmanager
def teacher_weights(peft_model, teacher_lm: LoadedModel | None, live: bool):
    """The teacher's model for a block: the separate teacher, the live student, or the base weights (adapter off)."""
    if teacher_lm is not None:
        yield teacher_lm.model
    elif live:
        yield peft_model
    else:
        with peft_model.disable_adapter():
            yield peft_model


def sample_rollouts(student: LoadedModel, peft_model, teacher_lm, cfg: TrainConfig, examples, pps, seed: int):
    """This step's responses as aligned pairs, and how many came from the teacher with the context.

    `rollouts=student`: the student samples without the context, except a `guided_share` of the batch (the last
    rows) that the teacher samples with the context (EDGE-OPD guided rollouts). `rollouts=teacher`: every row is the
    teacher's with-context sample (the off-policy baseline)."""
    n = len(examples)
    assert cfg.placement is not None  # train() resolved it from the suite
    guided = n if cfg.rollouts == "teacher" else round(cfg.guided_share * n)
    options = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, batch_size=cfg.batch_size)
    pairs = []
    if guided < n:
        pairs += rollout(student, examples[: n - guided], pps[: n - guided], cfg.placement, seed=seed, **options)
    if guided:
        with teacher_weights(peft_model, teacher_lm, cfg.teacher == "live") as m:
            teacher = LoadedModel(model=m, tokenizer=student.tokenizer, spec=cfg.teacher_model or cfg.model)
            pairs += rollout(teacher, examples[n - guided :], pps[n - guided :], cfg.placement, seed=seed + 7, side="ctx", **options)
    return pairs, guided


def rollout_loops(pairs, tokenizer) -> list[int | None]:
    """Per rollout, how many of its tokens come before its answer is first a loop (interp.core.degenerate.loop_start), or
    None for a rollout that does not loop."""
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    return [loop_start(p.response_ids, decode) for p in pairs]


def opd_cuts(pairs, starts: Sequence[int | None], stops: set[int], *, loop_mask: bool, stop_mask: bool) -> list[int | None] | None:
    """Per rollout, the index of its first response token the distillation loss leaves out (None: it keeps them all);
    None when neither mask is on. `loop_mask`: from where the answer starts to loop (`starts`); `stop_mask`: the stop
    token that ends it (its last token, when that is one of `stops`)."""
    if not (loop_mask or stop_mask):
        return None
    out: list[int | None] = []
    for pair, start in zip(pairs, starts):
        cut = start if loop_mask else None
        if stop_mask and pair.response_ids and pair.response_ids[-1] in stops:
            last = pair.response_len - 1
            cut = last if cut is None else min(cut, last)
        out.append(cut)
    return out


def step_losses(model, peft_model, teacher_lm, cfg: TrainConfig, pairs, pad_id: int, lam: float, ema, accelerator,
                teacher_kv: dict | None = None, loop_starts: Sequence[int | None] | None = None) -> dict:
    """Forward, losses and backward over micro-batches of `cfg.batch_size` pairs. Each micro-batch's token sums
    are divided by the whole batch's token count, so the accumulated gradient equals one pass over all pairs.

    `loop_starts` (`opd_cuts`, with `loop_mask` or `stop_mask`): per pair, the response tokens from that index on (where
    its answer has begun to loop, or its final stop token) are left out of the distillation loss; the consistency
    loss still sees every token."""
    starts = list(loop_starts) if loop_starts is not None else [None] * len(pairs)
    total = sum(p.response_len for p in pairs)
    sums: dict[str, Any] = {"loss": 0.0, "L_opd": 0.0, "L_cons": 0.0, "evidence_share": 0.0}
    for i in range(0, len(pairs), cfg.batch_size):
        chunk = pairs[i : i + cfg.batch_size]
        batch = collate(chunk, pad_id, starts[i : i + cfg.batch_size] if loop_starts is not None else None).to(accelerator.device)
        weight = batch.n_tokens / total
        parts = micro_losses(model, peft_model, teacher_lm, cfg, batch, pad_id, lam, ema, teacher_kv)
        accelerator.backward(parts["loss"] * weight)
        for k in sums:
            value = parts.get(k)
            sums[k] += 0.0 if value is None else float(value.detach()) * weight
    if not (lam > 0):
        sums["L_cons"] = None
    if cfg.evidence_mask is None:
        sums.pop("evidence_share")
    return sums


def micro_losses(model, peft_model, teacher_lm, cfg: TrainConfig, batch: Batch, pad_id: int, lam: float, ema,
                 teacher_kv: dict | None = None) -> dict:
    """The losses of one micro-batch (token means over its response tokens): L_opd, L_cons and their sum.

    With a long context shared by the batch (`batch.ctx.prefix` tokens), the context is encoded once: once per
    micro-batch for the student (its gradient flows through that one encoding), and once per run for a frozen
    teacher (`teacher_kv` caches its keys and values by prefix)."""
    B = batch.mask.shape[0]
    share = batch.ctx.prefix >= MIN_SHARED_PREFIX and not cfg.gradient_checkpointing
    # A fixed anchor goes first: the EMA one swaps weights in place, which must not happen inside the graph.
    anchor = fixed_anchor_logits(cfg.anchor, peft_model, batch, ema) if lam > 0 and cfg.anchor != "student" else None
    # The with-context rows join the graph only when L_cons needs their gradient.
    if lam > 0 and cfg.cons_prefix == "fixed" and batch.ctx.prefix >= MIN_SHARED_PREFIX:
        # The context's keys and values held fixed: the same forward, no gradient (and no backward) through them.
        with torch.no_grad():
            held = prefix_cache(model, batch.ctx)
        s_noctx = response_logits(model, batch.noctx, share_prefix=share)
        s_ctx = response_logits(model, batch.ctx, kv=held)
    elif lam > 0 and not share:  # one stacked pass: the no-context rows are padded to the with-context length
        s_noctx, s_ctx = response_logits(model, both_sides(batch.noctx, batch.ctx, pad_id)).split(B)
    elif lam > 0:  # two passes, the shared context encoded once
        s_noctx = response_logits(model, batch.noctx, share_prefix=True)
        s_ctx = response_logits(model, batch.ctx, share_prefix=True)
    else:
        s_noctx, s_ctx = response_logits(model, batch.noctx, share_prefix=share), None
    mask = batch.mask
    live = cfg.teacher == "live" and teacher_lm is None
    with torch.no_grad():
        if live and s_ctx is not None:
            t_ctx = s_ctx.detach()  # the live student with the context, as a fixed target this step
        else:
            with teacher_weights(peft_model, teacher_lm, cfg.teacher == "live") as m:
                kv = None
                if share and not live and teacher_kv is not None:  # frozen weights: the prefix's encoding never changes
                    key = tuple(batch.ctx.input_ids[0, : batch.ctx.prefix].tolist())
                    if key not in teacher_kv:
                        teacher_kv.clear()  # one context at a time is the common case; keep memory flat
                        teacher_kv[key] = prefix_cache(m, batch.ctx)
                    kv = teacher_kv[key]
                t_ctx = response_logits(m, batch.ctx, share_prefix=share, kv=kv)
                t_noctx = response_logits(m, batch.noctx, share_prefix=share) if cfg.evidence_mask is not None else None
        if cfg.evidence_mask is not None:
            if live and s_ctx is not None:
                t_noctx = s_noctx.detach()
            assert t_noctx is not None  # computed above whenever evidence_mask is set
            mask = evidence_mask(t_ctx, t_noctx, batch.targets, batch.mask, cfg.evidence_mask)
    if batch.opd_keep is not None:  # loop_mask: the tokens of a sample that has begun to loop teach nothing
        mask = mask * batch.opd_keep
    t_ctx, s_noctx_v = _same_vocab(t_ctx, s_noctx)
    if cfg.loss == "reverse_kl":
        L_opd = reverse_kl(s_noctx_v, t_ctx, mask, cfg.top_k, chunk=cfg.chunk)
    elif cfg.loss == "forward_kl":
        L_opd = forward_kl(s_noctx_v, t_ctx, mask, chunk=cfg.chunk)
    else:
        L_opd = cross_entropy(s_noctx, batch.targets, mask)
    # detached inside: no gradient reaches the anchor
    L_cons = consistency_kl(s_noctx if anchor is None else anchor, s_ctx, batch.mask, chunk=cfg.chunk) if s_ctx is not None else None
    loss = L_opd + lam * L_cons if L_cons is not None else L_opd
    out = {"loss": loss, "L_opd": L_opd.detach(), "L_cons": None if L_cons is None else L_cons.detach()}
    if cfg.evidence_mask is not None:
        out["evidence_share"] = masked_mean(mask, batch.mask).detach()
    return out


def _same_vocab(teacher: torch.Tensor, student: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Models of one family can pad their output layers to different sizes; the shared tokenizer's ids come first."""
    v = min(teacher.shape[-1], student.shape[-1])
    return teacher[..., :v], student[..., :v]


def fixed_anchor_logits(anchor: str, peft_model, batch, ema: dict | None) -> torch.Tensor:
    """The no-context distribution L_cons pulls the with-context output towards, for the anchors other than
    `student` (which is this step's own no-context output, already computed for L_opd).

    `teacher`: the base model without the context. `ema`: the no-context output of an exponential moving average
    of the LoRA weights. An EMA of the *outputs* is not defined, since every step scores different rollouts, so
    the weights are averaged instead.
    """
    with torch.no_grad():
        if anchor == "teacher":
            with peft_model.disable_adapter():
                return response_logits(peft_model, batch.noctx)
        assert ema is not None  # the ema anchor keeps one
        params = _lora_params(peft_model)
        live = {n: p.detach().clone() for n, p in params.items()}
        try:
            for n, p in params.items():
                p.copy_(ema[n])
            return response_logits(peft_model, batch.noctx)
        finally:
            for n, p in params.items():
                p.copy_(live[n])


def update_ema(ema: dict, peft_model, decay: float) -> None:
    with torch.no_grad():
        for n, p in _lora_params(peft_model).items():
            ema[n].mul_(decay).add_(p.detach(), alpha=1 - decay)
