"""The training loop: on-policy context distillation into a LoRA student, with an optional consistency regularizer."""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from interp.core.errors import UserError
from interp.core.generate import stop_ids
from interp.core.models import LoadedModel, load_model
from interp.core.pairs import render_prompt_pair
from interp.core.runs import METRICS_FILE, append_metrics
from interp.core.runs import TRAIN_CONFIG_FILE as CONFIG_FILE
from interp.core.store import atomic_write_json, folder_lock
from training.checkpoints import (
    TrainingError,
    adapter_is_current,
    assert_finite_params,
    clean_leftovers,
    load_checkpoint,
    save_checkpoint,
)
from training.checkpoints import list_checkpoints as checkpoints
from training.checkpoints import lora_params as _lora_params
from training.checkpoints import rng_state as _rng_state
from training.checkpoints import truncate_metrics as _truncate_metrics
from training.config import TrainConfig
from training.data_order import batch_indices
from training.losses import lam_at
from training.step import load_teacher, lora_model, opd_cuts, rollout_loops, sample_rollouts, step_losses, update_ema
from training.student_folder import clear_out, config_dict, prepare_out, remove_adapter, save_adapter, update_run_json
from training.tasks import load_task

__all__ = ["TrainConfig", "TrainResult", "TrainingError", "train"]

@dataclass
class TrainResult:
    out: Path
    steps: int
    last: dict = field(default_factory=dict)  # the last metrics line
    step_seconds: float = 0.0  # mean over the steps this call ran, first step excluded


# --- the loop ----------------------------------------------------------------------------------------------------------


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
    # A model passed in (`lm`: the study's and the tests' shared copy) trains where it already is; otherwise on the GPU
    # when there is one.
    on_cpu = lm.device.type == "cpu" if lm is not None else not torch.cuda.is_available()
    accelerator = Accelerator(cpu=on_cpu, log_with=cfg.report_to, project_dir=str(out / "logs") if cfg.report_to else None)
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
        # Current transformers 5 releases call it activation checkpointing (the old name is deprecated); earlier 5.x
        # releases, which pyproject.toml also allows, have only the old name.
        if hasattr(peft_model.get_base_model(), "activation_checkpointing_enable"):
            peft_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    # Only now, with every setting checked, is the folder touched.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        update_run_json(out.parent, cfg, out.name)
        if start_from is None:
            clear_out(out)
            atomic_write_json(out / CONFIG_FILE, config_dict(cfg))
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
            atomic_write_json(out / CONFIG_FILE, config_dict(cfg))
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
                                opd_cuts(pairs, starts, stops, loop_mask=cfg.loop_mask, stop_mask=cfg.stop_mask))

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
