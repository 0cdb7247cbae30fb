"""`python -m interp compare|patch|steer|explain RUN --student NAME`: the causal tools on a training run.

Everything is checked (run, student, layers, site, α) before the model loads, and nothing is written on an error.
Results go to RUN/causal/<student>/ unless --no-save.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer

from interp.capture import get_backend
from interp.causal.artifacts import (COMPARISON_FILE, causal_dir, explanation_file, load_comparison, patch_file,
                                     save_comparison, save_explanation, save_patch, save_steer)
from interp.causal.forensics import explain
from interp.causal.forward import check_backend
from interp.causal.fourway import compare
from interp.causal.patching import context_sweep, repair_sweep
from interp.causal.sites import check_layers, check_site
from interp.causal.steering import steer
from interp.cli.options import settings_from, with_settings
from interp.core import runs
from interp.core.errors import UserError
from interp.core.models import model_window
from interp.core.pairs import SCOPES
from interp.core.settings import AnalysisSettings
from interp.core.store import check_out
from interp.core.students import open_student
from interp.tuned_lens import check_lens_available
from interp.views.causal import highlight_text

RunArg = Annotated[Path, typer.Argument(metavar="RUN", help="A run folder written by `python -m training pair` and evaluated.")]
StudentOpt = Annotated[str, typer.Option("--student", help="The student (adapter folder of the run) to explain, or 'base'.")]
SaveOpt = Annotated[bool, typer.Option("--save/--no-save", help="Write the results under RUN/causal/<student>/.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the per-layer numbers as JSON.")]
SWEEPS = ("context", "repair")


def _fmt(x, width: int = 9, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return f"{'–':>{width}}"
    return f"{x:{width}.{digits}f}"


def _setup(run: Path, student: str, backend: str | None = None):
    """Check the run, the student and the backend before anything loads; returns the run's settings."""
    info = runs.read_info(run)
    runs.check_student(run, student)
    if backend is not None:
        check_backend(backend)
    return info


def parse_layers(text: str | None):
    """'all' or nothing: every layer; else comma-separated whole numbers."""
    if text is None or text.strip().lower() == "all":
        return None
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"--layers takes comma-separated whole numbers or 'all', got '{text}'") from None


def _out_dir(run: Path, student: str, out: Path | None) -> Path:
    return out if out is not None else causal_dir(run, student)


def _check_save(run: Path, student: str, out: Path | None, save: bool) -> None:
    """Before the model loads: the results folder can be written (not a file, not under a file, not read-only)."""
    if save:
        check_out(_out_dir(run, student, out), overwrite=True)


@with_settings("backend", "max_examples", "batch_size", "device", "dtype", "lens")
def compare_command(run: RunArg, student: StudentOpt,
                    out: Annotated[Optional[Path], typer.Option(help="Folder for the results (default RUN/causal/STUDENT).")] = None,
                    save: SaveOpt = True, as_json: JsonOpt = False, **options):
    """Four-way comparison (base and student, with and without the context) on the student's own answers without
    the context: per-layer cos/CKA/lens KL, the context vector, absorbed_l and overshoot_l, and the per-example
    overshoot of degenerate and flipped answers against the rest."""
    settings = settings_from(options)
    backend, batch_size, max_examples, lens = settings.backend, settings.batch_size, settings.max_examples, settings.lens
    info = _setup(run, student)
    _check_save(run, student, out, save)
    get_backend(backend)  # compare reads hidden states through interp.capture: nnsight, transformer_lens or torch
    check_lens_available(lens, info["model"] or AnalysisSettings.model)
    lm, name = open_student(run, student, settings)
    pairs, rows = runs.load_run_pairs(lm, run, student, "noctx", max_examples)
    cmp = compare(lm, pairs, student=name, backend=backend, batch_size=batch_size, progress=len(pairs) > batch_size,
                  lens_type=lens)
    cmp.meta.update(run=str(run), student_name=student)
    groups = {"degenerate_ctx": [runs.is_degenerate(r, "ctx") for r in rows],
              "flipped": [r.flipped for r in rows]}
    cmp.meta["groups"] = {g: cmp.overshoot_by(mask) | {"mask": mask} for g, mask in groups.items()}
    if save:
        folder = _out_dir(run, student, out)
        save_comparison(cmp, folder)
    if as_json:
        typer.echo(json.dumps(cmp.per_layer_table()))
        return
    typer.echo(f"{student} vs base · {len(pairs)} examples, {cmp.meta['n_tokens']} tokens (the student's answers without the context)"
               f" · {cmp.meta['lens']} lens")
    p = cmp.pairs
    typer.echo(f"{'layer':>5} {'int_cos':>9} {'rem_cos':>9} {'kept_cos':>9} {'int_cka':>9} {'int_kl':>9} {'rem_kl':>9} "
               f"{'|v|':>9} {'cos(u,v)':>9} {'absorbed':>9} {'overshoot':>9}")
    for layer in range(cmp.num_layers):
        typer.echo(f"{layer:>5} " + " ".join(_fmt(float(x)) for x in (
            p["internalization"]["cos"][layer], p["removability"]["cos"][layer], p["context_kept"]["cos"][layer],
            p["internalization"]["cka"][layer], p["internalization"]["lens_kl"][layer], p["removability"]["lens_kl"][layer],
            cmp.v_norm[layer], cmp.cos_uv[layer], cmp.absorbed[layer], cmp.overshoot[layer])))
    for g, split in cmp.meta["groups"].items():
        typer.echo(f"mean overshoot (layers 1..{cmp.num_layers - 1}), {g}: {_fmt(split['mean_in'], 0, 3).strip()} "
                   f"(n={split['n_in']}) vs the rest {_fmt(split['mean_out'], 0, 3).strip()} (n={split['n_out']})")
    if save:
        typer.echo(f"saved to {_out_dir(run, student, out)}")


@with_settings("backend", "max_examples", "batch_size", "device", "dtype")
def patch_command(run: RunArg, student: StudentOpt,
                  sweep: Annotated[str, typer.Option(help="context (B·ctx → B·noctx, on the base's answers with the context), repair (S·noctx → S·ctx, on the student's answers with the context) or both.")] = "both",
                  site: Annotated[str, typer.Option(help="resid (residual stream), attn (attention output) or mlp (MLP output).")] = "resid",
                  heads: Annotated[bool, typer.Option("--heads", help="Patch one attention head at a time (site attn).")] = False,
                  layers: Annotated[Optional[str], typer.Option(help="Comma-separated layers, or 'all' (default).")] = None,
                  scope: Annotated[str, typer.Option(help="Patched and measured positions: response or shared.")] = "response",
                  out: Annotated[Optional[Path], typer.Option(help="Folder for the results (default RUN/causal/STUDENT).")] = None,
                  save: SaveOpt = True, as_json: JsonOpt = False, **options):
    """Layer-by-layer activation patching: where the context's effect is carried in the base model (context sweep)
    and which layers, restored to the no-context state, undo what the context does to the student (repair sweep)."""
    settings = settings_from(options)
    backend, batch_size, max_examples = settings.backend, settings.batch_size, settings.max_examples
    sweeps = list(SWEEPS) if sweep == "both" else [sweep]
    if sweep != "both" and sweep not in SWEEPS:
        raise UserError(f"unknown sweep '{sweep}'; use context, repair or both")
    check_site(site)
    if heads and site != "attn":
        raise UserError("--heads needs --site attn")
    if scope not in SCOPES:
        raise UserError(f"unknown scope '{scope}'; use one of {', '.join(SCOPES)}")
    wanted = parse_layers(layers)
    _setup(run, student, backend)
    if "repair" in sweeps and student == "base":
        raise UserError("the repair sweep needs a student; pass --student NAME or --sweep context")
    _check_save(run, student, out, save)
    lm, name = open_student(run, student, settings)
    check_layers(lm, wanted, site)
    options = dict(site=site, layers=wanted, heads=heads, scope=scope, backend=backend, batch_size=batch_size)
    results, splits = {}, {}
    for s in sweeps:
        model = "base" if s == "context" else student
        pairs, rows = runs.load_run_pairs(lm, run, model, "ctx", max_examples)
        refs = [r.reference or None for r in rows]
        fn = (lambda p, **o: context_sweep(lm, p, **o)) if s == "context" else (lambda p, **o: repair_sweep(lm, p, name, **o))
        result = fn(pairs, references=refs, progress=True, **options)
        result.meta.update(run=str(run), student_name=student, sweep=s)
        loops_ = [runs.is_degenerate(r, "ctx") for r in rows]
        if any(loops_) and not heads:
            per_example = np.stack([result.example_recovery(i) for i in range(len(rows))])
            mask = np.asarray(loops_)
            splits[s] = (np.nanmean(per_example[mask], 0), np.nanmean(per_example[~mask], 0) if (~mask).any() else None, int(mask.sum()))
        results[s] = result
    if save:
        folder = _out_dir(run, student, out)
        for s, result in results.items():
            save_patch(result, folder / patch_file(run, student, s, site, heads).name)
    if as_json:
        typer.echo(json.dumps({s: r.per_layer_table() for s, r in results.items()}))
        return
    for s, result in results.items():
        typer.echo(f"{s} sweep: {result.source} → {result.target}, site {site}, {result.meta['n_examples']} examples, "
                   f"{result.meta['n_tokens']} tokens; reference tokens: {result.n_ref_tokens}")
    if heads:
        for s, result in results.items():
            typer.echo(f"{s}: recovery per layer (rows) and head (columns)")
            for layer in range(result.num_layers):
                typer.echo(f"{layer:>5} " + " ".join(_fmt(float(x), 7, 3) for x in result.recovery[layer]))
        return
    head = f"{'layer':>5}" + "".join(f" {s + '_rec':>12} {s + '_dref':>12}" for s in results)
    if splits:
        head += "".join(f" {s + '_rec_loop':>14} {s + '_rec_clean':>14}" for s in splits)
    typer.echo(head)
    for layer in range(lm.num_layers):
        line = f"{layer:>5}"
        for r in results.values():
            change = r.ref_logprob_change
            line += " " + _fmt(float(r.recovery[layer]), 12) + " " + _fmt(None if change is None else float(change[layer]), 12)
        for loop, clean, _ in splits.values():
            line += " " + _fmt(float(loop[layer]), 14) + " " + _fmt(None if clean is None else float(clean[layer]), 14)
        typer.echo(line)
    typer.echo("rec: recovery of the source's output; dref: change of the reference answer's log-probability"
               + ("; rec_loop / rec_clean: recovery on the looping answers / the others" if splits else ""))
    if save:
        typer.echo(f"saved to {_out_dir(run, student, out)}")


@with_settings("max_examples", "device", "dtype")
def steer_command(run: RunArg, student: StudentOpt,
                  alpha: Annotated[float, typer.Option(help="Multiple of the context vector added to the base (without the context) and subtracted from the student (with it).")] = 1.0,
                  layer: Annotated[Optional[str], typer.Option(help="Layer (decoder block) to steer at, comma-separated layers, or 'all' (one at a time). Default: the middle block.")] = None,
                  max_new_tokens: Annotated[int, typer.Option(help="Longest answer, in tokens.")] = 32,
                  batch_size: Annotated[int, typer.Option(help="Prompts per generation batch.")] = 16,
                  out: Annotated[Optional[Path], typer.Option(help="Folder for the results (default RUN/causal/STUDENT).")] = None,
                  save: SaveOpt = True, as_json: JsonOpt = False, **options):
    """Steer with the context vector v_l (from `compare`, or computed now): base without the context plus α·v_l,
    student with the context minus α·v_l; greedy answers re-evaluated with the task's verifier."""
    settings = settings_from(options)
    max_examples = settings.max_examples
    if not math.isfinite(alpha):
        raise UserError(f"--alpha must be a finite number, got {alpha}")
    if max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")
    if batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    if student == "base":
        raise UserError("steering needs a student; pass --student NAME")
    wanted = parse_layers(layer) if layer is not None else "middle"
    info = _setup(run, student)
    _check_save(run, student, out, save)
    window = model_window(info["model"] or AnalysisSettings.model)
    if window is not None and max_new_tokens >= window:
        raise UserError(f"--max-new-tokens {max_new_tokens} does not fit the model's window of {window} tokens; use fewer")
    lm, name = open_student(run, student, settings)
    layers = [lm.num_layers // 2] if wanted == "middle" else check_layers(lm, wanted if wanted is not None else list(range(1, lm.num_layers)))
    check_layers(lm, layers)
    rows = runs.model_rows(run, student, max_examples)
    saved = causal_dir(run, student) / COMPARISON_FILE
    cmp = load_comparison(saved.parent) if saved.exists() else None
    hidden_size = lm.model.config.hidden_size  # type: ignore[union-attr]  # a transformers model's config
    if cmp is None or cmp.v.shape != (lm.num_layers, hidden_size):
        pairs, _ = runs.load_run_pairs(lm, run, student, "noctx", max_examples)
        cmp = compare(lm, pairs, student=name, lens=False, comparisons=["removability"])
    records = [{"context": r.context, "prompt": r.prompt, "reference": r.reference, "example": r.example,
                "verifier": r.verifier} for r in rows]
    result = steer(lm, records, cmp.v, alpha, verifier=runs.verifier_for(rows), student=name, layers=layers,
                   placement=info["placement"] or "system", max_new_tokens=max_new_tokens, batch_size=batch_size)
    result.meta.update(run=str(run), student_name=student)
    if save:
        save_steer(result, _out_dir(run, student, out) / "steer.json")
    if as_json:
        typer.echo(json.dumps(result.table()))
        return
    typer.echo(f"steering with α={alpha} · {len(rows)} examples · greedy, up to {max_new_tokens} tokens")
    typer.echo(f"{'arm':<10} {'layer':>5} {'acc':>7} {'plain':>7} {'degen':>7} {'plain':>7} {'follow_cf':>9}")
    for row in result.table():
        typer.echo(f"{row['arm']:<10} {row['layer']:>5} {row['acc']:7.2f} {row['acc_plain']:7.2f} {row['degenerate']:7.2f} "
                   f"{row['degenerate_plain']:7.2f} {_fmt(row['follow_cf'], 9, 2)}")
    typer.echo("base+v: base model without the context plus α·v_l; student-v: the student with the context minus α·v_l; "
               "plain: the same runs without steering")


@with_settings("backend", "device", "dtype")
def explain_command(run: RunArg, student: StudentOpt,
                    example: Annotated[int, typer.Option(help="The example's number (the 'example' column of eval_examples.csv).")],
                    top_heads: Annotated[int, typer.Option(help="How many heads to show.")] = 5,
                    out: Annotated[Optional[Path], typer.Option(help="Folder for the results (default RUN/causal/STUDENT).")] = None,
                    save: SaveOpt = True, as_json: JsonOpt = False, **options):
    """Flip forensics for one example: the first token where the student's answers with and without the context
    part ways, the layer patching curve at that token, and the heads whose reading of the context moved most."""
    settings = settings_from(options)
    backend = settings.backend
    if top_heads < 1:
        raise UserError("--top-heads must be at least 1")
    info = _setup(run, student, backend)
    if student == "base":
        raise UserError("flip forensics needs a student; pass --student NAME")
    _check_save(run, student, out, save)
    rows = {r.example: r for r in runs.model_rows(run, student)}
    if example not in rows:
        raise UserError(f"{run} has no example {example} for '{student}'; examples: {min(rows)}..{max(rows)}")
    lm, name = open_student(run, student, settings)
    row = rows[example]
    ex = explain(lm, {"context": row.context, "prompt": row.prompt}, name, runs.response_ids(lm.tokenizer, row, "noctx"),
                 runs.response_ids(lm.tokenizer, row, "ctx"), placement=info["placement"] or "system",
                 top_heads=top_heads, backend=backend)
    ex.meta.update(run=str(run), student_name=student, example=example, flipped=row.flipped,
                   correct_noctx=row.correct_noctx, correct_ctx=row.correct_ctx)
    if save:
        save_explanation(ex, _out_dir(run, student, out) / explanation_file(run, student, example).name)
    if as_json:
        typer.echo(json.dumps({"fork": ex.fork, "token_ctx": ex.token_ctx, "token_noctx": ex.token_noctx,
                               "recovery": [None if not math.isfinite(x) else x for x in ex.recovery.tolist()],
                               "heads": ex.heads}))
        return
    flag = "flipped (right without the context, wrong with it)" if row.flipped else \
        f"right without the context: {row.correct_noctx}, with it: {row.correct_ctx}"
    typer.echo(f"example {example} · {student} · {flag}")
    typer.echo(f"prompt: {row.prompt!r}")
    typer.echo(f"without the context: {ex.example['response_noctx']!r}")
    typer.echo(f"with the context:    {ex.example['response_ctx']!r}")
    typer.echo(f"they part at response token {ex.fork}, after {ex.prefix!r}: {ex.token_noctx!r} without, {ex.token_ctx!r} with the context")
    typer.echo(f"{'layer':>5} {'recovery':>9} {'lp_noctx':>9} {'lp_ctx':>9}   (S·noctx patched into S·ctx at the fork)")
    for layer in range(len(ex.recovery)):
        typer.echo(f"{layer:>5} {_fmt(float(ex.recovery[layer]))} {_fmt(float(ex.logprob_noctx_token[layer]))} {_fmt(float(ex.logprob_ctx_token[layer]))}")
    typer.echo("heads whose attention to the context moved most at the fork (student vs base, both with the context):")
    for h in ex.heads:
        tokens = ", ".join(f"{t['token']!r} {t['weight']:.2f}" for t in h["top_tokens"])
        typer.echo(f"  layer {h['layer']:>2} head {h['head']:>2}: {h['attn_base']:.3f} → {h['attn_student']:.3f} ({h['delta']:+.3f}); reads {tokens}")
    typer.echo("context, the top heads' most-read tokens in [brackets]: " + highlight_text(ex.ctx_tokens, ex.ctx_weights))
    if save:
        typer.echo(f"saved to {_out_dir(run, student, out)}")


def register(app: typer.Typer) -> None:
    app.command("compare")(compare_command)
    app.command("patch")(patch_command)
    app.command("steer")(steer_command)
    app.command("explain")(explain_command)
