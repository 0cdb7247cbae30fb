"""`python -m interp`: analyze pairs or a whole training run, and write reports."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Optional

import typer

from interp.analysis import analyze as run_analysis
from interp.analysis import analyze_run
from interp.capture import BACKENDS
from interp.cli import causal
from interp.cli.options import settings_from, with_settings
from interp.core import distributed
from interp.core.errors import UserError
from interp.core.models import load_model, quiet_known_warnings
from interp.core.pairs import make_pairs
from interp.core.store import check_out, folder_lock, read_jsonl
from interp.divergence import save_divergence
from interp.tuned_lens import TuneSettings, check_lens_available, format_heldout, tune_lens
from interp.views.report import CSV_FILE, HTML_FILE, JSON_FILE, write_report

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Compare a model's hidden states with and without a context, layer by layer, on the same tokens.",
)


def format_table(div) -> str:
    """Per-layer numbers as an aligned text table."""
    kl = div.layer_mean("lens_kl_noctx_ctx")
    attn = [float("nan")] + div.attn_ctx.mean(axis=1).tolist()  # layer 0 (embeddings) has no attention
    lines = [f"{'layer':>5} {'cos':>8} {'cka':>8} {'cka_deb':>8} {'attn_ctx':>8} {'lens_kl':>8}"]
    for layer in range(div.num_layers):
        lines.append(
            f"{layer:>5} {div.cos[layer]:8.4f} {div.cka[layer]:8.4f} {div.cka_debiased[layer]:8.4f} "
            f"{attn[layer]:8.4f} {kl[layer]:8.4f}"
        )
    return "\n".join(lines)


def _at_least_one(**options: int) -> None:
    for name, value in options.items():
        if value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1 (got {value})")


@app.command()
@with_settings("model", "backend", "batch_size", "device", "dtype", "lens")
def analyze(
    context: Optional[str] = typer.Option(None, help="The context (system prompt, persona card, hint, fact sheet)."),
    prompt: Optional[str] = typer.Option(None, help="The user prompt, seen with and without the context."),
    response: Optional[str] = typer.Option(None, help="The response to measure; generated greedily when left out."),
    pairs: Optional[Path] = typer.Option(None, "--pairs", help="JSONL file of records with context, prompt and optionally response (instead of --context/--prompt)."),
    adapter: Optional[Path] = typer.Option(None, help="A LoRA adapter folder (peft) to load on top of the model."),
    placement: str = typer.Option("system", help="Where the context goes: 'system' (system turn) or 'user' (prefix of the user turn)."),
    scope: str = typer.Option("response", help="Measured tokens: 'response' (positions predicting the response) or 'shared' (user turn and response)."),
    respond: str = typer.Option("noctx", help="When generating a response: from the model without the context ('noctx') or with it ('ctx')."),
    max_new_tokens: int = typer.Option(64, help="Longest generated response, in tokens."),
    out: Optional[Path] = typer.Option(None, help="Save the results as an artifact folder here (see interp.divergence)."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print the per-layer numbers as JSON instead of a table."),
    **options,
):
    """Measure one pair (--context/--prompt) or a JSONL file of pairs (--pairs)."""
    backend, batch_size, model, lens = options["backend"], options["batch_size"], options["model"], options["lens"]
    if backend not in BACKENDS:
        raise UserError(f"unknown backend '{backend}'; use one of {', '.join(BACKENDS)}")
    _at_least_one(max_new_tokens=max_new_tokens)
    settings = settings_from(options)
    check_lens_available(lens, model)  # an unknown --lens, or no tuned lens for the model: one line, before any work
    if adapter is not None and adapter.exists() and not adapter.is_dir():
        raise UserError(f"--adapter {adapter} is a file; pass the adapter folder that holds adapter_config.json")
    if adapter is not None and not adapter.exists():
        raise UserError(f"adapter folder {adapter} does not exist; pass a folder written by `python -m training train`")
    if pairs is not None:
        if context is not None or prompt is not None:
            raise UserError("give either --pairs or --context/--prompt, not both")
        records = read_jsonl(pairs, required=("context", "prompt"))
    else:
        if context is None or prompt is None:
            raise UserError("give --context and --prompt (or --pairs FILE.jsonl)")
        records = [{"context": context, "prompt": prompt, "response": response}]
    if out is not None:
        check_out(out, overwrite)
    distributed.init_from_env()  # under torchrun the pairs are shared out; rank 0 prints and writes
    writes = out is not None and distributed.is_main()
    # Held by the writing process from before the analysis to the rename: a second `analyze --out` of the same
    # folder stops at once.
    with folder_lock(out) if writes and out is not None else contextlib.nullcontext():
        if writes and out is not None:
            check_out(out, overwrite)  # again under the lock: another writer may have finished in between
        lm = load_model(model, adapter, device=settings.device, dtype=settings.dtype)
        built = make_pairs(lm.tokenizer, records, placement, model=lm, respond=respond, max_new_tokens=max_new_tokens,
                           max_length=getattr(lm.model.config, "max_position_embeddings", None))
        div = run_analysis(lm, built, backend=backend, scope=scope, batch_size=batch_size, progress=len(built) > batch_size,
                           lens_type=lens)
        if not distributed.is_main():
            distributed.barrier()
            return
        if out is not None:
            save_divergence(div, out, overwrite=overwrite)
        distributed.barrier()
    if as_json:
        typer.echo(json.dumps(div.per_layer_table()))
    else:
        if len(built) == 1:
            typer.echo(f"response: {built[0].response!r}")
        typer.echo(f"{div.meta['n_examples']} pair(s), {div.n_tokens} measured tokens, model {model}"
                   + (f" + {adapter}" if adapter else "") + f", backend {backend}, {div.meta['lens']} lens")
        typer.echo(format_table(div))
        if out is not None:
            typer.echo(f"saved to {out}")


@app.command("analyze-run")
@with_settings("backend", "batch_size", "max_examples", "device", "dtype", "lens")
def analyze_run_command(
    run: Path = typer.Argument(..., help="A run folder written by `python -m training pair` and evaluated."),
    models: Optional[str] = typer.Option(None, help="Comma-separated models to analyze (default: base and every student)."),
    **options,
):
    """Analyze every model of a training run on its test examples; results go to RUN/layers/<model>/.
    Under `torchrun --nproc_per_node N` the examples are shared out between the processes."""
    settings = settings_from(options)
    written = analyze_run(run, models.split(",") if models else None, settings.backend, batch_size=settings.batch_size,
                          max_examples=settings.max_examples, device=settings.device, dtype=settings.dtype,
                          progress=distributed.is_main(), lens_type=settings.lens)
    if not distributed.is_main():
        return
    for name, folder in written.items():
        typer.echo(f"{name}: {folder}")


@app.command("report")
def report_command(
    runs: list[Path] = typer.Argument(..., metavar="RUN...", help="Run folders (with run.json), folders written by `python -m interp analyze`, or study results (results/<study>/)."),
    out: Path = typer.Option(Path("report"), "--out", "-o", help="Folder for report.html, layer_divergence.json and layer_divergence.csv."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the output folder even if it holds more than an earlier report."),
    tokens: bool = typer.Option(True, "--tokens/--no-tokens", help="Show the logit lens's top-1 tokens as text (loads the model's tokenizer); ids otherwise."),
) -> None:
    """Write a self-contained HTML report (opens offline) of runs side by side and of studies, with every per-layer number as JSON and CSV."""
    folder = write_report(runs, out, overwrite=overwrite, decode_tokens=tokens)
    typer.echo(f"wrote {folder / HTML_FILE}, {folder / JSON_FILE} and {folder / CSV_FILE}")


@app.command("tune-lens")
@with_settings("model", "device", "dtype")
def tune_lens_command(
    steps: int = typer.Option(60, help="Optimizer steps (Adam). Raising it later continues the saved training."),
    prompts: int = typer.Option(32, help="Training prompts the model answers (its own sampled answers are the training text)."),
    heldout_prompts: int = typer.Option(8, help="Held-out prompts (other prompts): the KL reported is read on their answers."),
    tokens_per_step: int = typer.Option(64, help="Tokens drawn per step from all training answers, read with and without their context (each costs one unembedding per layer)."),
    max_new_tokens: int = typer.Option(40, help="Longest sampled answer, in tokens."),
    lr: float = typer.Option(1e-3, help="Adam's learning rate for the translators."),
    temperature: float = typer.Option(1.0, help="Sampling temperature of the answers (0: greedy)."),
    seed: int = typer.Option(0, help="Seed of the prompts' split, the sampling and the data order."),
    out: Optional[Path] = typer.Option(None, help="Folder for the lens and its training state (default: the cache, keyed by the base model's identity, where --lens tuned finds it)."),
    restart: bool = typer.Option(False, "--restart", help="Forget a saved training of this lens and start over."),
    **options,
):
    """Train the tuned lens of a base model: one affine translator per layer (h + A h + b, then the final norm and the
    unembedding) fitted to KL(final || lens_l) on the model's own answers. Killed, it continues where it stopped."""
    settings = TuneSettings(steps=steps, prompts=prompts, heldout_prompts=heldout_prompts, tokens_per_step=tokens_per_step, max_new_tokens=max_new_tokens, lr=lr, temperature=temperature, seed=seed)
    settings.check()
    analysis = settings_from(options)
    if out is not None and out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder path")
    lm = load_model(analysis.model, device=analysis.device, dtype=analysis.dtype)
    result = tune_lens(lm, settings, folder=out, restart=restart)
    if result.resumed_from:
        typer.echo(f"continued from step {result.resumed_from}")
    typer.echo(f"held-out KL(final || lens) per layer, {result.n_heldout_tokens} tokens:")
    typer.echo(format_heldout(result.heldout))
    typer.echo(f"tuned lens of {analysis.model} saved to {result.folder}")


causal.register(app)


def main(argv: list[str] | None = None) -> int:
    """Entry point: user mistakes print one line (no traceback) and exit with status 2."""
    quiet_known_warnings()
    try:
        app(args=argv, prog_name="python -m interp", standalone_mode=False)
    except UserError as err:
        typer.echo(f"error: {err}", err=True)
        return 2
    except Exception as err:
        # Usage errors (unknown option, bad value) come from typer's click: print its usage message.
        if hasattr(err, "show") and hasattr(err, "exit_code"):
            err.show()
            return err.exit_code
        if type(err).__name__ in ("Exit", "Abort"):
            return getattr(err, "exit_code", 1)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
