"""Command line: `python -m training train | pair | eval | tasks` (also under `accelerate launch -m training` or `torchrun -m training`)."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Optional

import typer

from interp.errors import UserError
from interp.models import EMBEDDED

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train LoRA students that internalize a context, and evaluate whether they stay stable when it returns.")


def _config(**kw):
    from training.trainer import TrainConfig

    return TrainConfig(**kw)


# Options shared by `train` and `pair`; typer reads them from the signatures below.
TASK = typer.Option("persona", "--task", help="persona, format, facts, or a .jsonl file (context, prompt, answer, verifier)")
MODEL = typer.Option(EMBEDDED, "--model", help="smollm2-135m-instruct, tiny-random-llama, a Hugging Face id or a folder")


def _train_kwargs(task, model, seed, placement, steps, batch_size, lr, lr_warmup, lora_r, lora_alpha, target_modules,
                  max_new_tokens, temperature, top_k, teacher, anchor, ema_decay, checkpoint_every, n_test, grad_clip):
    return dict(task=task, model=model, seed=seed, placement=placement, steps=steps, batch_size=batch_size, lr=lr,
                lr_warmup=lr_warmup, lora_r=lora_r, lora_alpha=lora_alpha, target_modules=target_modules,
                max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, teacher=teacher, anchor=anchor,
                ema_decay=ema_decay, checkpoint_every=checkpoint_every, n_test=n_test, grad_clip=grad_clip)


@app.command()
def train(
    out: Path = typer.Option(..., "--out", help="student folder inside a run folder, e.g. runs/persona/reg"),
    task: str = TASK,
    model: str = MODEL,
    lam: float = typer.Option(0.0, "--lam", help="weight λ of the consistency loss L_cons; 0 = unregularized"),
    lam_warmup: int = typer.Option(0, "--lam-warmup", help="steps with λ=0 before the ramp"),
    lam_ramp: Optional[int] = typer.Option(None, "--lam-ramp", help="steps of the linear ramp to λ (default: half the warm-up)"),
    seed: int = typer.Option(0, "--seed"),
    placement: Optional[str] = typer.Option(None, "--placement", help="system or user (default: the suite's)"),
    steps: int = typer.Option(40, "--steps"),
    batch_size: int = typer.Option(8, "--batch-size", help="rollouts per step and process"),
    lr: float = typer.Option(2e-4, "--lr"),
    lr_warmup: int = typer.Option(3, "--lr-warmup"),
    lora_r: int = typer.Option(16, "--lora-r"),
    lora_alpha: int = typer.Option(32, "--lora-alpha"),
    target_modules: str = typer.Option("all-linear", "--target-modules", help="all-linear or a comma list, e.g. q_proj,v_proj"),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", help="rollout length"),
    temperature: float = typer.Option(1.0, "--temperature", help="rollout temperature"),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="reverse KL over the student's top-k tokens (default: full vocabulary)"),
    teacher: str = typer.Option("base", "--teacher", help="base (adapter disabled, with context) or live (the student with context)"),
    anchor: str = typer.Option("student", "--anchor", help="anchor of L_cons: student, ema or teacher"),
    ema_decay: float = typer.Option(0.9, "--ema-decay"),
    grad_clip: float = typer.Option(1.0, "--grad-clip"),
    checkpoint_every: int = typer.Option(10, "--checkpoint-every", help="0 = no checkpoints"),
    n_test: int = typer.Option(40, "--n-test", help="held-out test examples (never trained on)"),
    resume: bool = typer.Option(False, "--resume", help="continue from the folder's last checkpoint"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing student folder"),
):
    """Train one student into OUT (run.json is written in the parent folder if missing)."""
    from training.trainer import train as run_train

    cfg = _config(out=str(out), lam=lam, lam_warmup=lam_warmup, lam_ramp=lam_ramp, **_train_kwargs(
        task, model, seed, placement, steps, batch_size, lr, lr_warmup, lora_r, lora_alpha, target_modules,
        max_new_tokens, temperature, top_k, teacher, anchor, ema_decay, checkpoint_every, n_test, grad_clip))
    result = run_train(cfg, resume=resume, overwrite=overwrite)
    _print_main(f"{result.out}: {result.steps} steps, {result.step_seconds:.1f} s/step, last loss {result.last.get('loss', float('nan')):.4f}")


@app.command()
def pair(
    out: Path = typer.Option(..., "--out", help="run folder; the students go to OUT/unreg and OUT/reg"),
    task: str = TASK,
    model: str = MODEL,
    lam: float = typer.Option(1.0, "--lam", help="λ of the regularized student"),
    lam_warmup: int = typer.Option(0, "--lam-warmup"),
    lam_ramp: Optional[int] = typer.Option(None, "--lam-ramp"),
    seed: int = typer.Option(0, "--seed"),
    placement: Optional[str] = typer.Option(None, "--placement"),
    steps: int = typer.Option(40, "--steps"),
    batch_size: int = typer.Option(8, "--batch-size"),
    lr: float = typer.Option(2e-4, "--lr"),
    lr_warmup: int = typer.Option(3, "--lr-warmup"),
    lora_r: int = typer.Option(16, "--lora-r"),
    lora_alpha: int = typer.Option(32, "--lora-alpha"),
    target_modules: str = typer.Option("all-linear", "--target-modules"),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens"),
    temperature: float = typer.Option(1.0, "--temperature"),
    top_k: Optional[int] = typer.Option(None, "--top-k"),
    teacher: str = typer.Option("base", "--teacher"),
    anchor: str = typer.Option("student", "--anchor"),
    ema_decay: float = typer.Option(0.9, "--ema-decay"),
    grad_clip: float = typer.Option(1.0, "--grad-clip"),
    checkpoint_every: int = typer.Option(10, "--checkpoint-every"),
    n_test: int = typer.Option(40, "--n-test"),
    eval_new_tokens: int = typer.Option(48, "--eval-new-tokens", help="greedy answer length in the evaluation"),
    overwrite: bool = typer.Option(False, "--overwrite"),
    layers: bool = typer.Option(True, "--layers/--no-layers", help="run interp's per-layer analysis after the evaluation"),
):
    """Train the unregularized (λ=0) and the regularized student with the same seed and data order, then evaluate."""
    from training.trainer import train as run_train

    if lam <= 0:
        raise UserError(f"pair needs --lam > 0 for the regularized student (got {lam}); use `train --lam 0` for one student")
    base = _config(out=str(out / "unreg"), lam=0.0, **_train_kwargs(
        task, model, seed, placement, steps, batch_size, lr, lr_warmup, lora_r, lora_alpha, target_modules,
        max_new_tokens, temperature, top_k, teacher, anchor, ema_decay, checkpoint_every, n_test, grad_clip))
    reg = replace(base, out=str(out / "reg"), lam=lam, lam_warmup=lam_warmup, lam_ramp=lam_ramp)
    from training.trainer import prepare_out, validate

    for cfg in (base, reg):  # fail on a bad flag or an existing folder before the first student spends minutes
        validate(cfg)
        prepare_out(cfg, resume=False, overwrite=overwrite)
    for cfg in (base, reg):
        result = run_train(cfg, overwrite=overwrite)
        _print_main(f"{result.out}: {result.steps} steps, {result.step_seconds:.1f} s/step, last loss {result.last.get('loss', float('nan')):.4f}")
    _evaluate(out, None, eval_new_tokens, 16, layers)


@app.command("eval")
def eval_(
    run: Path = typer.Argument(..., help="run folder with run.json and student folders"),
    n: Optional[int] = typer.Option(None, "--n", help="evaluate only the first N test examples"),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens"),
    batch_size: int = typer.Option(16, "--batch-size"),
    layers: bool = typer.Option(True, "--layers/--no-layers", help="run interp's per-layer analysis after the evaluation"),
):
    """Evaluate base, teacher and every student of RUN on the held-out split; write eval.json and eval_examples.csv."""
    _evaluate(run, n, max_new_tokens, batch_size, layers)


def _state():
    """The process group this command runs in (several processes under `torchrun` or `accelerate launch`)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def _evaluate(run: Path, n, max_new_tokens, batch_size, layers) -> None:
    from training.evaluate import evaluate_run

    state = _state()
    if state.is_main_process:  # greedy evaluation is cheap next to training: one process does it
        if max_new_tokens < 1 or batch_size < 1:
            raise UserError("--max-new-tokens and --batch-size must be at least 1")
        result = evaluate_run(run, n=n, max_new_tokens=max_new_tokens, batch_size=batch_size, layers=layers)
        print(result.table)
        print(f"wrote {run / 'eval.json'} and {run / 'eval_examples.csv'}")
    state.wait_for_everyone()


@app.command()
def tasks():
    """List the built-in task suites with one example each."""
    from training.tasks import SUITES, load_task

    for name, suite in SUITES.items():
        t = load_task(name)
        e = t.test[0]
        print(f"{name}: {suite.description}")
        where = "as the system turn" if suite.placement == "system" else "before the prompt in the user turn"
        print(f"  {len(t.train)} train / {len(t.test)} test, context {where}")
        print(f"  context:   {e.context}")
        print(f"  prompt:    {e.prompt}")
        print(f"  reference: {e.reference} ({e.verifier})")


def _print_main(text: str) -> None:
    if _state().is_main_process:
        print(text)


def main() -> None:
    import warnings

    # peft asks transformers a deprecated question on every adapter load; the answer is right, the warning is noise.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    try:
        app()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
