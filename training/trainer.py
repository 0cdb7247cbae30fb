"""The training loop: on-policy context distillation into a LoRA student, with an optional consistency regularizer."""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from interp.errors import UserError
from interp.models import EMBEDDED, LoadedModel, load_model
from interp.pairs import PLACEMENTS, render_prompt_pair
from interp.store import atomic_write_json, read_json
from training.checkpoints import TrainingError, adapter_is_current, assert_finite_params, kill_point, load_checkpoint, save_checkpoint
from training.checkpoints import list_checkpoints as checkpoints
from training.checkpoints import lora_params as _lora_params
from training.checkpoints import rng_state as _rng_state
from training.checkpoints import truncate_metrics as _truncate_metrics
from training.losses import consistency_kl, lam_at, reverse_kl
from training.rollout import both_sides, collate, response_logits, rollout
from training.tasks import Task, load_task

TEACHERS = ("base", "live")
ANCHORS = ("student", "ema", "teacher")
CONFIG_FILE = "train_config.json"
METRICS_FILE = "metrics.jsonl"
RUN_FILE = "run.json"
# Settings that may differ when resuming: where to write, how long to run, how often to checkpoint.
RESUMABLE = ("out", "steps", "checkpoint_every")


@dataclass
class TrainConfig:
    task: str = "persona"
    out: str = "runs/persona/reg"
    model: str = EMBEDDED
    seed: int = 0
    placement: str | None = None  # None: the suite's own placement
    steps: int = 40
    batch_size: int = 8
    lr: float = 2e-4
    lr_warmup: int = 3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: str = "all-linear"
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int | None = None
    teacher: str = "base"
    lam: float = 0.0
    lam_warmup: int = 0
    lam_ramp: int | None = None  # None: half the warm-up
    anchor: str = "student"
    ema_decay: float = 0.9
    checkpoint_every: int = 10
    n_test: int = 40

    def ramp(self) -> int:
        return self.lam_warmup // 2 if self.lam_ramp is None else self.lam_ramp


@dataclass
class TrainResult:
    out: Path
    steps: int
    last: dict = field(default_factory=dict)  # the last metrics line
    step_seconds: float = 0.0  # mean over the steps this call ran, first step excluded


def validate(cfg: TrainConfig) -> None:
    """Every bad setting is a one-line UserError saying what to pass instead."""
    checks = [
        (cfg.steps >= 1, f"--steps must be at least 1 (got {cfg.steps})"),
        (cfg.batch_size >= 1, f"--batch-size must be at least 1 (got {cfg.batch_size})"),
        (cfg.lam >= 0 and math.isfinite(cfg.lam), f"--lam must be a finite number ≥ 0 (got {cfg.lam}); 0 trains the unregularized student"),
        (cfg.lam_warmup >= 0, f"--lam-warmup must be ≥ 0 steps (got {cfg.lam_warmup})"),
        (cfg.lam_ramp is None or cfg.lam_ramp >= 0, f"--lam-ramp must be ≥ 0 steps (got {cfg.lam_ramp})"),
        (cfg.lr > 0, f"--lr must be positive (got {cfg.lr})"),
        (cfg.lr_warmup >= 0, f"--lr-warmup must be ≥ 0 (got {cfg.lr_warmup})"),
        (cfg.grad_clip > 0, f"--grad-clip must be positive (got {cfg.grad_clip})"),
        (cfg.lora_r >= 1, f"--lora-r must be at least 1 (got {cfg.lora_r})"),
        (cfg.max_new_tokens >= 1, f"--max-new-tokens must be at least 1 (got {cfg.max_new_tokens})"),
        (cfg.temperature >= 0, f"--temperature must be ≥ 0 (got {cfg.temperature}); 0 samples greedily"),
        (cfg.top_k is None or cfg.top_k >= 1, f"--top-k must be at least 1 (got {cfg.top_k}); leave it out for the full vocabulary"),
        (cfg.teacher in TEACHERS, f"unknown teacher '{cfg.teacher}'; use one of {', '.join(TEACHERS)}"),
        (cfg.anchor in ANCHORS, f"unknown anchor '{cfg.anchor}'; use one of {', '.join(ANCHORS)}"),
        (0 <= cfg.ema_decay < 1, f"--ema-decay must be in [0, 1) (got {cfg.ema_decay})"),
        (cfg.checkpoint_every >= 0, f"--checkpoint-every must be ≥ 0 (got {cfg.checkpoint_every}); 0 turns checkpoints off"),
        (cfg.placement is None or cfg.placement in PLACEMENTS, f"unknown placement '{cfg.placement}'; use one of {', '.join(PLACEMENTS)}"),
        # The folder name becomes the adapter's name when the run is evaluated, and torch module names cannot hold a dot.
        ("." not in Path(cfg.out).name and Path(cfg.out).name not in ("", "base", "teacher"),
         f"the student folder name '{Path(cfg.out).name}' cannot be used: pick a name without dots that is not base or teacher (e.g. reg_lam01)"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)


def resolve(cfg: TrainConfig, task: Task) -> TrainConfig:
    """Fill the settings left to the suite (placement)."""
    if cfg.placement is None:
        cfg.placement = task.placement
    return cfg


# --- data order ----------------------------------------------------------------------------------------------------


def batch_indices(step: int, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> list[int]:
    """Training-example indices for `step` on process `rank`: a fresh seeded permutation every epoch, so the order
    is a pure function of (seed, step) and a resumed run sees exactly the data it would have seen."""
    out = []
    start = step * batch_size * world + rank * batch_size
    for p in range(start, start + batch_size):
        epoch, i = divmod(p, n)
        perm = list(range(n))
        random.Random(seed * 1_000_003 + epoch).shuffle(perm)
        out.append(perm[i])
    return out


# --- the run folder ----------------------------------------------------------------------------------------------------


def _config_dict(cfg: TrainConfig) -> dict:
    return asdict(cfg)


def prepare_out(cfg: TrainConfig, resume: bool, overwrite: bool) -> Path | None:
    """Check the student folder; returns the checkpoint to resume from, if any. Never touches an existing folder
    unless told to."""
    out = Path(cfg.out)
    if resume:
        if not (out / CONFIG_FILE).exists():
            raise UserError(f"nothing to resume in {out}: it has no {CONFIG_FILE}; drop --resume to start a new run")
        saved = read_json(out / CONFIG_FILE)
        ours = _config_dict(cfg)
        diff = [k for k in ours if k not in RESUMABLE and saved.get(k) != ours[k]]
        if diff:
            k = diff[0]
            raise UserError(
                f"{out} was trained with {k}={saved.get(k)!r} but this command says {k}={ours[k]!r}; "
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
    """run.json in the parent folder: enough for `eval` to rebuild the task and the model; lists the students."""
    path = run_dir / RUN_FILE
    run = read_json(path) if path.exists() else {"task": cfg.task, "model": cfg.model, "seed": cfg.seed, "placement": cfg.placement, "n_test": cfg.n_test, "students": []}
    for key in ("task", "model", "seed", "placement"):
        if run.get(key) != getattr(cfg, key):
            raise UserError(
                f"{path} is a run of {key}={run.get(key)!r}, but this student uses {key}={getattr(cfg, key)!r}; "
                "put it in another run folder"
            )
    if student not in run["students"]:
        run["students"].append(student)
        atomic_write_json(path, run)


def save_adapter(model, out: Path, lm: LoadedModel | None = None) -> None:
    """adapter_config.json + adapter_model.safetensors (+ base_model.json, the base model's identity, given `lm`)
    into `out`, each replaced in one rename."""
    from interp.models import write_base_identity

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


# --- the loop ----------------------------------------------------------------------------------------------------------


def lora_model(lm: LoadedModel, cfg: TrainConfig):
    from peft import LoraConfig, get_peft_model

    targets = cfg.target_modules if cfg.target_modules == "all-linear" else [m.strip() for m in cfg.target_modules.split(",") if m.strip()]
    config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets, task_type="CAUSAL_LM")
    torch.manual_seed(cfg.seed)  # LoRA's A matrices are random: seed them so every student starts the same
    try:
        return get_peft_model(lm.model, config)
    except ValueError as err:
        raise UserError(f"--target-modules {cfg.target_modules!r} does not fit this model ({str(err).splitlines()[0][:160]})") from err


def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True, lm: LoadedModel | None = None) -> TrainResult:
    """Train one student into `cfg.out` (a folder inside a run folder) and return where it is."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    validate(cfg)
    task = load_task(cfg.task, seed=cfg.seed, n_test=cfg.n_test)
    resolve(cfg, task)
    out = Path(cfg.out)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    rank, world = accelerator.process_index, accelerator.num_processes
    if len(task.train) < cfg.batch_size * world:
        raise UserError(
            f"a batch of {cfg.batch_size} × {world} process(es) does not fit the {len(task.train)} training examples of '{cfg.task}'; "
            "lower --batch-size"
        )
    start_from = prepare_out(cfg, resume, overwrite)

    lm = lm or load_model(cfg.model, device=str(accelerator.device))
    tok = lm.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    window = getattr(lm.model.config, "max_position_embeddings", None)
    prompt_pairs: dict[int, object] = {}  # rendered on first use: a long suite need not be tokenized up front

    def prompt_pair(i: int):
        if i not in prompt_pairs:
            e = task.train[i]
            pp = render_prompt_pair(tok, e.context, e.prompt, cfg.placement)
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
    if cfg.anchor == "ema" and ema is None:
        ema = {n: p.detach().clone() for n, p in _lora_params(peft_model).items()}
    metrics_path = out / METRICS_FILE
    if accelerator.is_main_process:
        _truncate_metrics(metrics_path, step0)

    bar = tqdm(range(step0, cfg.steps), initial=step0, total=cfg.steps, desc=out.name, disable=not (progress and accelerator.is_main_process))
    last, times = {}, []
    with out_of_memory_is_a_user_error(cfg):
        for step in bar:
            t0 = time.perf_counter()
            lam = lam_at(step, cfg.lam, cfg.lam_warmup, cfg.ramp())
            idx = batch_indices(step, len(task.train), cfg.batch_size, cfg.seed, rank, world)
            examples, pps = [task.train[i] for i in idx], [prompt_pair(i) for i in idx]

            # 1. rollout: the student answers without the context
            pairs = rollout(
                student, examples, pps, cfg.placement,
                max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, batch_size=cfg.batch_size,
                seed=cfg.seed * 1_000_003 + step * 101 + rank,
            )
            batch = collate(pairs, pad_id).to(accelerator.device)
            t_rollout = time.perf_counter() - t0

            # 2. forward passes: student without context (and with it, when λ>0 needs it), teacher under no_grad.
            # A fixed anchor goes first: the EMA one swaps weights in place, which must not happen inside the graph.
            anchor = fixed_anchor_logits(cfg.anchor, peft_model, batch, ema) if lam > 0 and cfg.anchor != "student" else None
            model.train()
            # The with-context rows join the graph only when L_cons needs their gradient.
            if lam > 0:
                logits = response_logits(model, both_sides(batch.noctx, batch.ctx, pad_id))
                s_noctx, s_ctx = logits.split(len(pairs))
            else:
                s_noctx, s_ctx = response_logits(model, batch.noctx), None
            with torch.no_grad():
                if cfg.teacher == "base":
                    with peft_model.disable_adapter():
                        t_ctx = response_logits(peft_model, batch.ctx)
                else:  # live: the student itself with the context, as a fixed target this step
                    t_ctx = s_ctx.detach() if s_ctx is not None else response_logits(model, batch.ctx)

            # 3. losses
            L_opd = reverse_kl(s_noctx, t_ctx, batch.mask, cfg.top_k)
            L_cons = None
            if lam > 0:
                L_cons = consistency_kl(s_noctx if anchor is None else anchor, s_ctx, batch.mask)  # detached inside
            loss = L_opd + lam * L_cons if L_cons is not None else L_opd

            if bool(accelerator.reduce((~torch.isfinite(loss.detach())).float(), "max")):  # every process stops together
                good = checkpoints(out)
                where = f"the last good checkpoint is {good[-1]}" if good else "no checkpoint was written yet"
                raise TrainingError(f"the loss became {loss.item()} at step {step + 1}; {where}; lower --lr or --lam and resume or rerun")

            # 4. update
            accelerator.backward(loss)
            grad_norm = accelerator.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            assert_finite_params(params, out, step + 1)  # before any checkpoint: exploded weights are never saved
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                update_ema(ema, peft_model, cfg.ema_decay)

            # 5. log and checkpoint
            dt = time.perf_counter() - t0
            row = {
                "step": step + 1,
                "loss": loss.item(),
                "L_opd": L_opd.item(),
                "L_cons": None if L_cons is None else L_cons.item(),
                "lam": lam,
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm),
                "response_len": sum(batch.response_lens) / len(pairs),
                "tokens": batch.n_tokens,
                "tokens_per_s": batch.n_tokens / dt,
                "rollout_s": t_rollout,
                "step_s": dt,
                "processes": world,
            }
            row = _mean_over_processes(accelerator, row)
            last = row
            times.append(dt)
            if accelerator.is_main_process:
                with metrics_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                bar.set_postfix(loss=f"{row['loss']:.3f}", opd=f"{row['L_opd']:.3f}", cons="-" if row["L_cons"] is None else f"{row['L_cons']:.3f}", lam=f"{lam:g}", tok_s=f"{row['tokens_per_s']:.0f}")
            # The last step is checkpointed too, so that `--resume --steps N` can extend a finished run.
            if cfg.checkpoint_every and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps):
                rngs = _gather_rng(accelerator)
                if accelerator.is_main_process:
                    save_checkpoint(out, step + 1, peft_model, optimizer, scheduler, ema, rngs)
                accelerator.wait_for_everyone()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_adapter(accelerator.unwrap_model(model), out, lm)
    accelerator.wait_for_everyone()
    mean_step = sum(times[1:]) / len(times[1:]) if len(times) > 1 else (times[0] if times else 0.0)
    return TrainResult(out=out, steps=cfg.steps, last=last, step_seconds=mean_step)


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


def _gather_rng(accelerator) -> list:
    if accelerator.num_processes == 1:
        return [_rng_state()]
    from accelerate.utils import gather_object

    return gather_object([_rng_state()])
