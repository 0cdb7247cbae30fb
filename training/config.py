"""Training settings: one dataclass, declared once. Validation and the command-line options are derived from it.

Each field carries its help text and (where the flag is not simply the field name) its flag in `metadata`; the
CLI (`training/__main__.py`) builds its typer options from these fields, so a new setting needs one line here.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from interp.core.errors import UserError
from interp.core.models import model_window
from interp.core.specs import EMBEDDED
from interp.core.pairs import NO_CONTEXT, PLACEMENTS
from interp.core.runs import RESERVED_NAMES
from interp.core.store import NAME_PATTERN, NAME_RULE
from interp.core.typed import check_fields

TEACHERS = ("base", "live")
ANCHORS = ("student", "ema", "teacher")
CONS_PREFIX = ("exact", "fixed")
ROLLOUTS = ("student", "teacher")
LOSSES = ("reverse_kl", "forward_kl", "ce")
DTYPES = ("auto", "fp32", "bf16", "fp16")  # what interp.core.models.resolve_dtype accepts by these names
# Settings that may differ when resuming: where to write, how long to run, how often to checkpoint, where to log, and
# the loss chunk size (it changes memory and speed, not the losses: tests/test_losses_chunked.py checks chunked
# against whole-sequence losses).
RESUMABLE = ("out", "steps", "checkpoint_every", "report_to", "chunk")
# Seeds seed numpy as well as torch: numpy takes 0 .. 2**32 - 1.
MAX_SEED = 2**32 - 1


def opt(default, help: str, **meta):
    """A field with its help text; `meta` may hold `flag` (the CLI name when it is not the field's)."""
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class TrainConfig:
    """Every setting of one training run. Formulas: docs/measures.md#training."""

    out: str = opt("runs/persona/student", "student folder inside a run folder, e.g. runs/persona/reg")
    task: str = opt("persona", "a built-in suite (`python -m training tasks`) or a .jsonl file")
    model: str = opt(EMBEDDED, "smollm2-135m-instruct, tiny-random-llama, a Hugging Face id or a folder")
    seed: int = opt(0, "seed of the data split, the data order, LoRA's init and the rollouts")
    placement: str | None = opt(None, "system or user (default: the suite's own)")
    no_context: str = opt("default", "what stands in the system turn without the context: default (the chat template's own, "
                          "an identity for SmolLM2), neutral ('You are a helpful assistant.') or empty")
    steps: int = opt(40, "optimizer steps")
    batch_size: int = opt(8, "rollouts per step and process")
    grad_accum: int = opt(1, "micro-batches per optimizer step (the effective batch is batch-size × grad-accum)")
    lr: float = opt(2e-4, "learning rate (AdamW)")
    lr_warmup: int = opt(3, "linear learning-rate warm-up steps, then constant")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    grad_clip: float = opt(1.0, "gradient-norm clip")
    lora_r: int = opt(16, "LoRA rank")
    lora_alpha: float = opt(32.0, "LoRA alpha (scale = alpha / r)")
    lora_dropout: float = opt(0.0, "LoRA dropout")
    target_modules: str = opt("all-linear", "all-linear or a comma list, e.g. q_proj,v_proj")
    dtype: str = opt("auto", "auto (bf16 on CUDA, fp32 on CPU), fp32, bf16 or fp16")
    gradient_checkpointing: bool = opt(False, "recompute activations in the backward pass (less memory, more time)")
    max_new_tokens: int = opt(96, "rollout budget: rollouts run to the stop token or this many tokens; at least the evaluation's "
                              "budget (96), so that every token an answer is judged on was trained")
    loop_mask: bool = opt(False, "keep a rollout's tokens from the point its answer starts to loop out of the distillation loss "
                          "(once a loop has begun every model here continues it, so the teacher's agreement there is no evidence)")
    stop_mask: bool = opt(False, "keep the stop token that ends a rollout out of the distillation loss (the teacher with the "
                          "context is less ready to stop there, so the student would learn to stop later: results/why_loops)")
    temperature: float = opt(1.0, "rollout temperature (0: greedy)")
    rollouts: str = opt("student", "who samples the responses: student (on-policy) or teacher (off-policy baseline, with the context)")
    guided_share: float = opt(0.0, "share of each batch's rollouts sampled from the teacher with the context (EDGE-OPD guided rollouts)")
    loss: str = opt("reverse_kl", "distillation loss: reverse_kl (on-policy default), forward_kl or ce (cross-entropy on the sampled tokens)")
    top_k: int | None = opt(None, "reverse KL over the student's top-k tokens (default: the full vocabulary)")
    evidence_mask: float | None = opt(None, "count only positions where the context raises the teacher's log-prob of the sampled token by ≥ tau (EDGE-OPD)")
    teacher: str = opt("base", "base (adapter disabled, with context) or live (the student with context)")
    teacher_model: str | None = opt(None, "a separate teacher model (same tokenizer), e.g. a larger one: cross-size distillation")
    lam: float = opt(0.0, "weight λ of the consistency loss L_cons; 0 = unregularized")
    lam_warmup: int = opt(0, "steps with λ=0 before the ramp")
    lam_ramp: int | None = opt(None, "steps of the linear ramp to λ (default: half the warm-up)")
    anchor: str = opt("student", "anchor of L_cons: student, ema or teacher")
    cons_prefix: str = opt("exact", "the L_cons gradient through a long context shared by the batch (≥ 32 tokens): exact, or "
                           "fixed (the context's keys and values encoded without gradient: the same loss, an approximate "
                           "gradient, no backward through the context; docs/measures.md#training)")
    ema_decay: float = opt(0.9, "decay of the EMA anchor's weight average")
    chunk: int | None = opt(None, "positions per chunk in the losses (default: as many as fit 16 MiB of fp32 log-probabilities)")
    checkpoint_every: int = opt(10, "checkpoint every N steps (0: only the last step is not checkpointed either)")
    n_test: int = opt(40, "held-out test examples (never trained on)")
    report_to: str | None = opt(None, "also log to tensorboard, wandb or trackio (metrics.jsonl is always written)")

    def ramp(self) -> int:
        return self.lam_warmup // 2 if self.lam_ramp is None else self.lam_ramp

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict, source: str = "the settings") -> "TrainConfig":
        if not isinstance(data, dict):
            raise UserError(f"{source} is not a JSON object of settings")
        return cls(**check_fields(cls, data, source))

    def check(self) -> "TrainConfig":
        """Every bad setting is a one-line UserError saying what to pass instead; returns self."""
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"--{flag(f.name)} must be a finite number (got {value})")
        student = Path(self.out).name
        window = model_window(self.model)
        checks = [
            (0 <= self.seed <= MAX_SEED, f"--seed must be in 0..{MAX_SEED} (got {self.seed})"),
            (self.steps >= 1, f"--steps must be at least 1 (got {self.steps})"),
            (self.batch_size >= 1, f"--batch-size must be at least 1 (got {self.batch_size})"),
            (self.grad_accum >= 1, f"--grad-accum must be at least 1 (got {self.grad_accum})"),
            (self.lam >= 0, f"--lam must be ≥ 0 (got {self.lam}); 0 trains the unregularized student"),
            (self.lam_warmup >= 0, f"--lam-warmup must be ≥ 0 steps (got {self.lam_warmup})"),
            (self.lam_ramp is None or self.lam_ramp >= 0, f"--lam-ramp must be ≥ 0 steps (got {self.lam_ramp})"),
            (0 < self.lr <= 1.0, f"--lr must be in (0, 1] (got {self.lr}); typical LoRA rates are 1e-4 to 1e-3"),
            (self.lr_warmup >= 0, f"--lr-warmup must be ≥ 0 (got {self.lr_warmup})"),
            (self.weight_decay >= 0, f"--weight-decay must be ≥ 0 (got {self.weight_decay})"),
            (self.grad_clip > 0, f"--grad-clip must be positive (got {self.grad_clip})"),
            (self.lora_r >= 1, f"--lora-r must be at least 1 (got {self.lora_r})"),
            (self.lora_alpha > 0, f"--lora-alpha must be positive (got {self.lora_alpha})"),
            (0 <= self.lora_dropout < 1, f"--lora-dropout must be in [0, 1) (got {self.lora_dropout})"),
            (self.dtype in DTYPES, f"unknown --dtype '{self.dtype}'; use one of {', '.join(DTYPES)}"),
            (self.max_new_tokens >= 1, f"--max-new-tokens must be at least 1 (got {self.max_new_tokens})"),
            (window is None or self.max_new_tokens < window,
             f"--max-new-tokens {self.max_new_tokens} does not fit the model's window of {window} tokens; use fewer"),
            (self.temperature >= 0, f"--temperature must be ≥ 0 (got {self.temperature}); 0 samples greedily"),
            (self.rollouts in ROLLOUTS, f"unknown --rollouts '{self.rollouts}'; use one of {', '.join(ROLLOUTS)}"),
            (0 <= self.guided_share <= 1, f"--guided-share must be in [0, 1] (got {self.guided_share})"),
            (self.loss in LOSSES, f"unknown --loss '{self.loss}'; use one of {', '.join(LOSSES)}"),
            (self.top_k is None or self.top_k >= 1, f"--top-k must be at least 1 (got {self.top_k}); leave it out for the full vocabulary"),
            (self.top_k is None or self.loss == "reverse_kl", "--top-k applies to --loss reverse_kl only"),
            (self.teacher in TEACHERS, f"unknown teacher '{self.teacher}'; use one of {', '.join(TEACHERS)}"),
            (self.teacher_model is None or self.teacher == "base", "--teacher-model replaces the base teacher; it cannot be combined with --teacher live"),
            (self.anchor in ANCHORS, f"unknown anchor '{self.anchor}'; use one of {', '.join(ANCHORS)}"),
            (self.cons_prefix in CONS_PREFIX, f"unknown --cons-prefix '{self.cons_prefix}'; use one of {', '.join(CONS_PREFIX)}"),
            (0 <= self.ema_decay < 1, f"--ema-decay must be in [0, 1) (got {self.ema_decay})"),
            (self.chunk is None or self.chunk >= 1, f"--chunk must be at least 1 (got {self.chunk})"),
            (self.checkpoint_every >= 0, f"--checkpoint-every must be ≥ 0 (got {self.checkpoint_every}); 0 turns checkpoints off"),
            (self.n_test >= 1, f"--n-test must be at least 1 (got {self.n_test})"),
            (self.no_context in NO_CONTEXT, f"unknown --no-context '{self.no_context}'; use one of {', '.join(NO_CONTEXT)}"),
            (self.placement is None or self.placement in PLACEMENTS, f"unknown placement '{self.placement}'; use one of {', '.join(PLACEMENTS)}"),
            (self.report_to in (None, "tensorboard", "wandb", "trackio"), f"unknown --report-to '{self.report_to}'; use tensorboard, wandb or trackio"),
            # The folder name becomes the adapter's name when the run is evaluated, and torch module names cannot hold a dot.
            # The same name rule as every folder a study makes (interp.core.store.check_name).
            (NAME_PATTERN.fullmatch(student) is not None and student not in RESERVED_NAMES,
             f"the student folder name {student[:64]!r} cannot be used: pick {NAME_RULE}, not one of "
             f"{', '.join(RESERVED_NAMES)} (e.g. reg_lam01)"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        return self

    def resolve(self, suite_placement: str) -> "TrainConfig":
        """Fill the settings left to the suite (placement); off-policy rollouts are all the teacher's."""
        if self.placement is None:
            self.placement = suite_placement
        return self


def flag(name: str) -> str:
    return name.replace("_", "-")


def defaults(cls=TrainConfig) -> dict:
    return {f.name: f.default for f in fields(cls) if f.default is not MISSING}
