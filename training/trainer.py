"""The training loop: on-policy context distillation into a LoRA student, with an optional consistency regularizer."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from interp.core.degenerate import loop_start
from interp.core.errors import UserError
from interp.core.generate import stop_ids
from interp.core.models import LoadedModel, load_model
from interp.core.pairs import render_prompt_pair
from interp.core.runs import TRAIN_CONFIG_FILE as CONFIG_FILE
from interp.core.runs import METRICS_FILE, RunInfo, add_student, append_metrics
from interp.core.store import atomic_write_json, check_out, folder_lock, read_json
from training.checkpoints import TrainingError, adapter_is_current, clean_leftovers, assert_finite_params, kill_point, load_checkpoint, save_checkpoint
from training.checkpoints import list_checkpoints as checkpoints
from training.checkpoints import lora_params as _lora_params
from training.checkpoints import rng_state as _rng_state
from training.checkpoints import truncate_metrics as _truncate_metrics
from training.config import RESUMABLE, TrainConfig, defaults
from training.losses import consistency_kl, cross_entropy, evidence_mask, forward_kl, lam_at, masked_mean, reverse_kl
from training.rollout import MIN_SHARED_PREFIX, Batch, both_sides, collate, prefix_cache, response_logits, rollout
from training.tasks import load_task

__all__ = ["TrainConfig", "TrainResult", "TrainingError", "train"]


@dataclass
class TrainResult:
    out: Path
    steps: int
    last: dict = field(default_factory=dict)  # the last metrics line
    step_seconds: float = 0.0  # mean over the steps this call ran, first step excluded


# --- data order ----------------------------------------------------------------------------------------------------


def batch_indices(step: int, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> list[int]:
    """Training-example indices for `step` on process `rank`: a fresh seeded permutation every epoch, so the order
    is a pure function of (seed, step) and a resumed run sees exactly the data it would have seen. Each epoch's
    permutation is computed once and cached, so a step costs O(batch_size) after the first step of an epoch."""
    from training.order import epoch_permutation

    start = step * batch_size * world + rank * batch_size
    return [epoch_permutation(seed, epoch, n)[i] for epoch, i in (divmod(p, n) for p in range(start, start + batch_size))]


# --- the run folder ----------------------------------------------------------------------------------------------------


def _config_dict(cfg: TrainConfig) -> dict:
    return cfg.to_json()


def config_conflict(saved: dict, cfg: TrainConfig) -> tuple[str, object, object] | None:
    """The first setting a resume may not change (all but RESUMABLE) in which a run's saved train_config.json
    differs from `cfg`, as (key, saved value, cfg's value); None when they agree. A setting the run predates counts
    as its default: settings are added with the default that keeps the earlier behaviour."""
    ours, default = _config_dict(cfg), defaults()
    for k in ours:
        if k not in RESUMABLE and saved.get(k, default.get(k)) != ours[k]:
            return k, saved.get(k), ours[k]
    return None


def prepare_out(cfg: TrainConfig, resume: bool, overwrite: bool) -> Path | None:
    """Check the student folder; returns the checkpoint to resume from, if any. Never touches an existing folder
    unless told to."""
    out = Path(cfg.out)
    if out.is_symlink():  # --overwrite would empty the folder it points to, outside the run folder
        raise UserError(f"--out {out} is a symbolic link; give the student folder itself")
    check_out(out, overwrite=True)  # not a file, not under a file, in a folder this process can write
    if resume:
        if not (out / CONFIG_FILE).exists():
            raise UserError(f"nothing to resume in {out}: it has no {CONFIG_FILE}; drop --resume to start a new run")
        conflict = config_conflict(read_json(out / CONFIG_FILE, expect=dict), cfg)
        if conflict:
            k, theirs, ours = conflict
            raise UserError(
                f"{out} was trained with {k}={theirs!r} but this command says {k}={ours!r}; "
                f"resume with the same settings or train into another --out"
            )
        found = checkpoints(out)
        if not found:
            raise UserError(f"{out} has no checkpoint to resume from; rerun without --resume (and with --overwrite)")
        return found[-1]
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"{out} already exists; pass --overwrite to replace it, --resume to continue it, or choose another --out")
    return None


def clear_out(out: Path) -> None:
    """Empty the student folder (after --overwrite), keeping nothing from an earlier run."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def update_run_json(run_dir: Path, cfg: TrainConfig, student: str) -> None:
    """run.json in the parent folder (interp.runs.RunInfo): enough for `eval` to rebuild the task and the model."""
    assert cfg.placement is not None  # train() resolved it from the suite
    add_student(run_dir, RunInfo(task=cfg.task, model=cfg.model, seed=cfg.seed, placement=cfg.placement, n_test=cfg.n_test,
                                 no_context=cfg.no_context), student)


def save_adapter(model, out: Path, lm: LoadedModel | None = None) -> None:
    """adapter_config.json + adapter_model.safetensors (+ base_model.json, the base model's identity, given `lm`)
    into `out`, each replaced in one rename."""
    from interp.core.adapters import write_base_identity

    kill_point("before_adapter")
    tmp = out / ".adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    if lm is not None:
        write_base_identity(tmp, lm)
    # Not peft's generated README; the weights go last, so that their presence means the whole adapter is there.
    for name in (["base_model.json"] if lm is not None else []) + ["adapter_config.json", "adapter_model.safetensors"]:
        os.replace(tmp / name, out / name)
    shutil.rmtree(tmp, ignore_errors=True)


def remove_adapter(out: Path) -> None:
    """Remove a saved adapter, weights first: their presence is what marks an adapter as whole."""
    for name in ("adapter_model.safetensors", "adapter_config.json", "base_model.json"):
        (out / name).unlink(missing_ok=True)


# --- the loop ----------------------------------------------------------------------------------------------------------


def lora_model(lm: LoadedModel, cfg: TrainConfig):
    from peft import LoraConfig, get_peft_model

    targets = cfg.target_modules if cfg.target_modules == "all-linear" else [m.strip() for m in cfg.target_modules.split(",") if m.strip()]
    config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets, task_type="CAUSAL_LM")  # type: ignore[arg-type]  # peft annotates lora_alpha as int; a float works (scale = alpha / r)
    torch.manual_seed(cfg.seed)  # LoRA's A matrices are random: seed them so every student starts the same
    try:
        return get_peft_model(lm.model, config)
    except ValueError as err:
        raise UserError(f"--target-modules {cfg.target_modules!r} does not fit this model ({str(err).splitlines()[0][:160]})") from err


def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
          lm: LoadedModel | None = None, on_step=None) -> TrainResult:
    """Train one student into `cfg.out` (a folder inside a run folder) and return where it is.

    `on_step(step, steps)` is called after every step (the study's progress bar). The student folder is locked for
    the whole run: a second writer gets a one-line error instead of mixing its steps into this run's."""
    cfg.check()
    # Under torchrun only the first process takes the lock: the others would wait on it forever.
    main_process = int(os.environ.get("RANK", "0")) == 0
    with folder_lock(cfg.out) if main_process else contextlib.nullcontext():
        if main_process:
            clean_leftovers(cfg.out)  # a checkpoint write that was killed half-way
        return _train(cfg, resume=resume, overwrite=overwrite, progress=progress, lm=lm, on_step=on_step)


def _train(cfg: TrainConfig, *, resume: bool, overwrite: bool, progress: bool, lm: LoadedModel | None, on_step) -> TrainResult:
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    cfg.check()
    task = load_task(cfg.task, seed=cfg.seed, n_test=cfg.n_test)
    cfg.resolve(task.placement)
    out = Path(cfg.out)
    check_tracker(cfg.report_to)
    # Trackers (tensorboard, wandb, trackio) mirror metrics.jsonl, which stays the record the app reads.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), log_with=cfg.report_to, project_dir=str(out / "logs") if cfg.report_to else None)
    rank, world = accelerator.process_index, accelerator.num_processes
    per_step = cfg.batch_size * cfg.grad_accum
    if len(task.train) < per_step * world:
        raise UserError(
            f"a batch of {cfg.batch_size} × {cfg.grad_accum} micro-batches × {world} process(es) does not fit the "
            f"{len(task.train)} training examples of '{cfg.task}'; lower --batch-size or --grad-accum"
        )
    start_from = prepare_out(cfg, resume, overwrite)

    # Training and generation run sdpa (where the architecture has it): eager attention builds T×T weight matrices
    # that only capture needs. `auto` precision: bf16 on a CUDA GPU that supports it, fp32 elsewhere.
    device = str(accelerator.device)
    dtype = cfg.dtype
    lm = lm or load_model(cfg.model, device=device, dtype=dtype)
    teacher_lm = load_teacher(cfg, lm, device, dtype)
    tok = lm.tokenizer
    stops = set(stop_ids(lm.model, tok))
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    window = getattr(lm.model.config, "max_position_embeddings", None)
    prompt_pairs: dict[int, object] = {}  # rendered on first use: a long suite need not be tokenized up front

    def prompt_pair(i: int):
        if i not in prompt_pairs:
            e = task.train[i]
            assert cfg.placement is not None  # resolved above
            pp = render_prompt_pair(tok, e.context, e.prompt, cfg.placement, no_context=cfg.no_context)
            if window and len(pp.ctx_ids) + cfg.max_new_tokens > window:
                raise UserError(
                    f"training example {i} with its context plus {cfg.max_new_tokens} new tokens needs "
                    f"{len(pp.ctx_ids) + cfg.max_new_tokens} positions, beyond the model's {window}; shorten it or lower --max-new-tokens"
                )
            prompt_pairs[i] = pp
        return prompt_pairs[i]

    for i in range(min(len(task.train), 64)):  # fail before the first step, not in the middle of the run
        prompt_pair(i)

    peft_model = lora_model(lm, cfg)
    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing needs no inputs that require grad, so frozen embeddings are fine with LoRA.
        peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    # Only now, with every setting checked, is the folder touched.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        update_run_json(out.parent, cfg, out.name)
        if start_from is None:
            clear_out(out)
            atomic_write_json(out / CONFIG_FILE, _config_dict(cfg))
    accelerator.wait_for_everyone()
    params = list(_lora_params(peft_model).values())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # Linear warm-up, then constant: the schedule does not depend on --steps, so a run can be resumed and extended.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (cfg.lr_warmup + 1)))
    model, optimizer = accelerator.prepare(peft_model, optimizer)  # the scheduler stays ours: accelerate would step it once per process
    student = LoadedModel(model=peft_model, tokenizer=tok, spec=cfg.model)

    step0, ema = 0, None
    if start_from is not None:
        step0, ema = load_checkpoint(start_from, peft_model, optimizer, scheduler, rank)
        if step0 == cfg.steps and not adapter_is_current(peft_model, out):
            # Killed between its last checkpoint and the adapter write: finishing it is writing the adapter.
            if accelerator.is_main_process:
                save_adapter(peft_model, out, lm)
            accelerator.wait_for_everyone()
            return TrainResult(out=out, steps=cfg.steps)
        if step0 >= cfg.steps:
            raise UserError(f"{out} is already at step {step0}; pass --steps above {step0} to train further")
        if accelerator.is_main_process:
            # Extending a finished run: its adapter is the earlier last step's, and left in place it would pass for the
            # extended run's until the new one is written (an evaluation or a study would read the old weights).
            remove_adapter(out)
            # Only RESUMABLE settings can differ (steps among them): the record follows the latest command, once
            # the checkpoint has loaded (a damaged one leaves the folder as it was).
            atomic_write_json(out / CONFIG_FILE, _config_dict(cfg))
    if cfg.anchor == "ema" and ema is None:
        ema = {n: p.detach().clone() for n, p in _lora_params(peft_model).items()}
    metrics_path = out / METRICS_FILE
    if accelerator.is_main_process:
        _truncate_metrics(metrics_path, step0)

    if cfg.report_to:
        accelerator.init_trackers(out.name, config={k: v for k, v in cfg.to_json().items() if v is not None})
    teacher_kv: dict = {}  # the frozen teacher's encoding of a shared context prefix, computed once
    bar = tqdm(range(step0, cfg.steps), initial=step0, total=cfg.steps, desc=out.name, disable=not (progress and accelerator.is_main_process))
    last, times = {}, []
    with out_of_memory_is_a_user_error(cfg):
        for step in bar:
            t0 = time.perf_counter()
            lam = lam_at(step, cfg.lam, cfg.lam_warmup, cfg.ramp())
            idx = batch_indices(step, len(task.train), per_step, cfg.seed, rank, world)
            examples, pps = [task.train[i] for i in idx], [prompt_pair(i) for i in idx]

            # 1. rollouts: the student answers without the context; a guided share (or all, off-policy) comes from
            # the teacher with the context, then every sample is scored the same way
            pairs, guided = sample_rollouts(student, peft_model, teacher_lm, cfg, examples, pps, seed=cfg.seed * 1_000_003 + step * 101 + rank)
            t_rollout = time.perf_counter() - t0
            starts = rollout_loops(pairs, tok)  # where each sample starts to loop (None: it does not): a health signal

            # 2-3. forward passes and losses, micro-batch by micro-batch; gradients add up to the full batch's
            model.train()
            parts = step_losses(model, peft_model, teacher_lm, cfg, pairs, pad_id, lam, ema, accelerator, teacher_kv,
                                starts if cfg.loop_mask else None)

            loss = parts["loss"]
            if bool(accelerator.reduce(torch.tensor(0.0 if math.isfinite(loss) else 1.0, device=accelerator.device), "max")):
                good = checkpoints(out)
                where = f"the last good checkpoint is {good[-1]}" if good else "no checkpoint was written yet"
                raise TrainingError(f"the loss became {loss} at step {step + 1}; {where}; lower --lr or --lam and resume or rerun")

            # 4. update
            grad_norm = accelerator.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            assert_finite_params(params, out, step + 1)  # before any checkpoint: exploded weights are never saved
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                update_ema(ema, peft_model, cfg.ema_decay)

            # 5. log and checkpoint
            dt = time.perf_counter() - t0
            n_tokens = sum(p.response_len for p in pairs)
            row = {
                "step": step + 1,
                **parts,
                "lam": lam,
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm),
                "response_len": n_tokens / len(pairs),
                "rollout_loops": sum(s is not None for s in starts) / len(pairs),
                "rollout_stopped": sum(p.response_ids[-1] in stops for p in pairs) / len(pairs),
                "guided": guided,
                "tokens": n_tokens,
                "tokens_per_s": n_tokens / dt,
                "rollout_s": t_rollout,
                "step_s": dt,
                "processes": world,
            }
            row = _mean_over_processes(accelerator, row)
            last = row
            times.append(dt)
            if accelerator.is_main_process:
                append_metrics(out, row)
            if cfg.report_to:
                accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}, step=step + 1)
            bar.set_postfix(loss=f"{row['loss']:.3f}", opd=f"{row['L_opd']:.3f}", cons="-" if row["L_cons"] is None else f"{row['L_cons']:.3f}",
                            lam=f"{lam:g}", len=f"{row['response_len']:.0f}", loops=f"{row['rollout_loops']:.2f}", tok_s=f"{row['tokens_per_s']:.0f}")
            # The last step is checkpointed too, so that `--resume --steps N` can extend a finished run.
            if cfg.checkpoint_every and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps):
                rngs = _gather_rng(accelerator)
                digests = _agreeing_adapters(accelerator, peft_model, out, step + 1)
                if accelerator.is_main_process:
                    save_checkpoint(out, step + 1, peft_model, optimizer, scheduler, ema, rngs, digests)
                accelerator.wait_for_everyone()
            if on_step is not None:
                on_step(step + 1, cfg.steps)

    accelerator.wait_for_everyone()
    if cfg.report_to:
        accelerator.end_training()
    if not cfg.checkpoint_every:  # otherwise the last step's checkpoint has just checked them
        _agreeing_adapters(accelerator, peft_model, out, cfg.steps)
    if accelerator.is_main_process:
        save_adapter(accelerator.unwrap_model(model), out, lm)
    accelerator.wait_for_everyone()
    mean_step = sum(times[1:]) / len(times[1:]) if len(times) > 1 else (times[0] if times else 0.0)
    return TrainResult(out=out, steps=cfg.steps, last=last, step_seconds=mean_step)


def check_tracker(name: str | None) -> None:
    """A tracker whose package is missing is a one-line error before anything runs (they are optional extras)."""
    package = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}.get(name or "")
    if package:
        import importlib.util

        if importlib.util.find_spec(package) is None:
            raise UserError(f"--report-to {name} needs the '{package}' package: pip install {package}")


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
    """Per rollout, how many of its tokens come before its answer is first a loop (interp.degenerate.loop_start), or
    None for a rollout that does not loop."""
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    return [loop_start(p.response_ids, decode) for p in pairs]


def step_losses(model, peft_model, teacher_lm, cfg: TrainConfig, pairs, pad_id: int, lam: float, ema, accelerator,
                teacher_kv: dict | None = None, loop_starts: Sequence[int | None] | None = None) -> dict:
    """Forward, losses and backward over micro-batches of `cfg.batch_size` pairs. Each micro-batch's token sums
    are divided by the whole batch's token count, so the accumulated gradient equals one pass over all pairs.

    `loop_starts` (with `loop_mask`): per pair, the response tokens from that index on (where its answer has begun to
    loop) are left out of the distillation loss; the consistency loss still sees every token."""
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
    if lam > 0 and not share:  # one stacked pass: the no-context rows are padded to the with-context length
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
    L_cons = consistency_kl(s_noctx if anchor is None else anchor, s_ctx, batch.mask, chunk=cfg.chunk) if lam > 0 else None
    loss = L_opd + lam * L_cons if L_cons is not None else L_opd
    out = {"loss": loss, "L_opd": L_opd.detach(), "L_cons": None if L_cons is None else L_cons.detach()}
    if cfg.evidence_mask is not None:
        out["evidence_share"] = masked_mean(mask, batch.mask).detach()
    return out


def _same_vocab(teacher: torch.Tensor, student: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Models of one family can pad their output layers to different sizes; the shared tokenizer's ids come first."""
    v = min(teacher.shape[-1], student.shape[-1])
    return teacher[..., :v], student[..., :v]


@contextlib.contextmanager
def out_of_memory_is_a_user_error(cfg: TrainConfig):
    """A batch that does not fit in memory ends the run with one line saying what to lower."""
    try:
        yield
    except torch.OutOfMemoryError as err:
        raise UserError(f"a batch of {cfg.batch_size} × {cfg.max_new_tokens} new tokens does not fit in memory; lower --batch-size or --max-new-tokens") from err
    except RuntimeError as err:
        if "allocate" not in str(err).lower():
            raise
        raise UserError(f"a batch of {cfg.batch_size} × {cfg.max_new_tokens} new tokens does not fit in memory ({str(err).splitlines()[0][:100]}); lower --batch-size or --max-new-tokens") from err


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


def _mean_over_processes(accelerator, row: dict) -> dict:
    if accelerator.num_processes == 1:
        return row
    keys = [k for k, v in row.items() if isinstance(v, (int, float)) and k != "step"]
    values = accelerator.reduce(torch.tensor([float(row[k]) for k in keys], device=accelerator.device), "mean")
    return {**row, **{k: v for k, v in zip(keys, values.tolist())}}


def _agreeing_adapters(accelerator, peft_model, out: Path, step: int) -> list[str]:
    """The sha256 of every process's LoRA weights. Data-parallel processes must hold the same adapter after every
    update (gradients are all-reduced before the optimizer steps); one that drifted would make the saved adapter one
    process's alone, so it stops the run instead of being saved."""
    import hashlib

    from accelerate.utils import gather_object

    h = hashlib.sha256()
    for name, p in sorted(_lora_params(peft_model).items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    digests = [h.hexdigest()] if accelerator.num_processes == 1 else gather_object([h.hexdigest()])
    if len(set(digests)) > 1:
        raise TrainingError(
            f"after step {step} the {len(digests)} processes hold different adapters (sha256 "
            f"{', '.join(d[:12] for d in digests)}); nothing was saved for that step in {out}; report this with your launcher settings"
        )
    return digests


def _gather_rng(accelerator) -> list:
    if accelerator.num_processes == 1:
        return [_rng_state()]
    from accelerate.utils import gather_object

    return gather_object([_rng_state()])
