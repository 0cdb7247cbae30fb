"""Command line: `python -m training train | pair | eval | study | tasks | experience | cf-names | loop-credit | random-adapter` (also under `accelerate launch -m training` or
`torchrun -m training`). The training options are built from `training.config.TrainConfig`'s fields."""

from __future__ import annotations

import inspect
import math
import sys
import typing
from dataclasses import fields, replace
from pathlib import Path
from typing import Optional

import typer

from interp.core.errors import UserError
from interp.core.specs import EMBEDDED
from training.config import TrainConfig, flag
from training.experience import command as experience_command

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train LoRA students that internalize a context, and evaluate whether they stay stable when it returns.")


def _option_type(tp):
    """typer wants Optional[X] for `X | None`."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if args and len(args) < len(typing.get_args(tp)):
        return Optional[args[0]]
    return tp


def config_command(*, exclude: tuple[str, ...] = (), overrides: dict | None = None, extra: tuple[inspect.Parameter, ...] = ()):
    """Give a command one `--option` per TrainConfig field (help text and default from the field), plus `extra`.
    The command receives them all as keyword arguments; `config_from(kwargs)` turns them into a TrainConfig."""
    overrides = overrides or {}
    hints = typing.get_type_hints(TrainConfig)

    def decorate(fn):
        params = list(extra)
        for f in fields(TrainConfig):
            if f.name in exclude:
                continue
            default = overrides.get(f.name, f.default)
            tp = _option_type(hints[f.name])
            names = [f"--{flag(f.name)}/--no-{flag(f.name)}"] if tp is bool else [f"--{flag(f.name)}"]
            params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=tp,
                                            default=typer.Option(default, *names, help=f.metadata.get("help", ""))))
        fn.__signature__ = inspect.Signature(params)
        return fn

    return decorate


def config_from(kwargs: dict, **fixed) -> TrainConfig:
    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{**{k: v for k, v in kwargs.items() if k in names}, **fixed})


def _param(name: str, annotation, default) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)


@app.command()
@config_command(exclude=("out",), extra=(
    _param("out", Path, typer.Option(..., "--out", help="student folder inside a run folder, e.g. runs/persona/reg")),
    _param("resume", bool, typer.Option(False, "--resume", help="continue from the folder's last checkpoint")),
    _param("overwrite", bool, typer.Option(False, "--overwrite", help="replace an existing student folder")),
))
def train(**kw):
    """Train one student into OUT (run.json is written in the parent folder if missing)."""
    from training.trainer import train as run_train  # lazy: the commands' help and bad input answer before torch loads

    cfg = config_from(kw, out=str(kw["out"]))
    result = run_train(cfg, resume=kw["resume"], overwrite=kw["overwrite"])
    _print_main(f"{result.out}: {result.steps} steps, {result.step_seconds:.1f} s/step, last loss {result.last.get('loss', float('nan')):.4f}")


@app.command()
@config_command(exclude=("out",), overrides={"lam": 1.0}, extra=(
    _param("out", Path, typer.Option(..., "--out", help="run folder; the students go to OUT/unreg and OUT/reg")),
    _param("eval_new_tokens", int, typer.Option(96, "--eval-new-tokens", help="greedy answer budget in the evaluation")),
    _param("overwrite", bool, typer.Option(False, "--overwrite")),
    _param("layers", bool, typer.Option(True, "--layers/--no-layers", help="run interp's per-layer analysis after the evaluation")),
))
def pair(**kw):
    """Train the unregularized (λ=0) and the regularized student (--lam, --lam-warmup…) with the same seed and data
    order, then evaluate both."""
    from training.evaluate import EvalSettings  # lazy: the commands' help and bad input answer before torch loads
    from training.student_folder import prepare_out  # lazy: the commands' help and bad input answer before torch loads
    from training.trainer import train as run_train  # lazy: the commands' help and bad input answer before torch loads

    out = kw["out"]
    if kw["lam"] <= 0:
        raise UserError(f"pair needs --lam > 0 for the regularized student (got {kw['lam']}); use `train --lam 0` for one student")
    reg = config_from(kw, out=str(out / "reg"))
    unreg = replace(reg, out=str(out / "unreg"), lam=0.0, lam_warmup=0, lam_ramp=None)
    from interp.core.models import model_window  # lazy: the commands' help and bad input answer before torch loads

    window = model_window(reg.model)
    if window is not None and kw["eval_new_tokens"] >= window:  # found before training, not after
        raise UserError(f"--eval-new-tokens {kw['eval_new_tokens']} does not fit the model's window of {window} tokens; use fewer")
    for cfg in (unreg, reg):  # fail on a bad flag or an existing folder before the first student spends minutes
        cfg.check()
        prepare_out(cfg, resume=False, overwrite=kw["overwrite"])
    for cfg in (unreg, reg):
        result = run_train(cfg, overwrite=kw["overwrite"])
        _print_main(f"{result.out}: {result.steps} steps, {result.step_seconds:.1f} s/step, last loss {result.last.get('loss', float('nan')):.4f}")
    _evaluate(out, EvalSettings(max_new_tokens=kw["eval_new_tokens"]), 48, kw["layers"])


@app.command("eval")
def eval_(
    run: Path = typer.Argument(..., help="run folder with run.json and student folders"),
    n: Optional[int] = typer.Option(None, "--n", help="evaluate only the first N test examples"),
    max_new_tokens: int = typer.Option(96, "--max-new-tokens", help="greedy answer budget; answers that reach it count as truncated"),
    batch_size: int = typer.Option(48, "--batch-size", help="rows per generation batch (the three context kinds are batched together)"),
    counterfactual: bool = typer.Option(True, "--counterfactual/--no-counterfactual", help="also answer with the counterfactual context (follow_cf)"),
    drift: bool = typer.Option(True, "--drift/--no-drift", help="measure each student's KL from the base model on other suites' prompts"),
    allow_degenerate: bool = typer.Option(False, "--allow-degenerate", help="let looping answers pass the verifier (the old verdicts)"),
    layers: bool = typer.Option(True, "--layers/--no-layers", help="run interp's per-layer analysis after the evaluation"),
):
    """Evaluate base, teacher and every student of RUN on the held-out split; write eval.json and eval_examples.*"""
    from training.evaluate import EvalSettings  # lazy: the commands' help and bad input answer before torch loads

    settings = EvalSettings(n=n, max_new_tokens=max_new_tokens, allow_degenerate=allow_degenerate, counterfactual=counterfactual, drift=drift)
    _evaluate(run, settings, batch_size, layers)


@app.command()
def study(
    file: Path = typer.Argument(..., help="a study file (TOML), e.g. studies/removability.toml"),
    jobs: int = typer.Option(1, "--jobs", help="cells trained in parallel processes (each gets its share of the cores)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the plan and the estimated time, train nothing"),
    runs_dir: Optional[str] = typer.Option(None, "--runs-dir", help="where the cells' run folders go (default: the file's runs_dir or runs/)"),
    results_dir: Optional[str] = typer.Option(None, "--results-dir", help="where results/<study>/ goes (default: results/)"),
    hours: Optional[float] = typer.Option(None, "--hours", help="start no cell that would not end within this many hours of wall "
                                          "time (by the measured rates, corrected by this run's finished cells); the rest "
                                          "wait for the next run, here or on another machine with results/<study>/"),
):
    """Train, evaluate and summarize a grid of suites × seeds × students; resumable, skips finished cells."""
    from interp.views.plots import write_study_figures  # lazy: the commands' help and bad input answer before torch loads
    from training.study import check_results, load_study, markdown, plan, run_study  # lazy: the commands' help and bad input answer before torch loads

    spec = load_study(file, runs_dir, results_dir)
    if jobs < 1:
        raise UserError(f"--jobs must be at least 1 (got {jobs})")
    if hours is not None and not (hours > 0 and math.isfinite(hours)):
        raise UserError(f"--hours must be a positive number of hours (got {hours})")
    check_results(spec)
    print(plan(spec))
    if dry_run:
        return
    data = run_study(spec, jobs=jobs, on_results=write_study_figures, hours=hours)
    print(markdown(data))
    print(f"wrote {spec.results_dir / spec.name}/study.json, study.csv, summary.md and frontier.html")


def _state():
    """The process group this command runs in (several processes under `torchrun` or `accelerate launch`)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def _check_window(run: Path, max_new_tokens: int) -> None:
    """The answer budget fits the run's model (read from run.json without loading the model)."""
    from interp.core.models import model_window  # lazy: the commands' help and bad input answer before torch loads
    from interp.core.runs import is_run, read_run  # lazy: the commands' help and bad input answer before torch loads

    window = model_window(read_run(run).model) if is_run(run) else None
    if window is not None and max_new_tokens >= window:
        raise UserError(f"--max-new-tokens {max_new_tokens} does not fit the model's window of {window} tokens; use fewer")


def _evaluate(run: Path, settings, batch_size: int, layers: bool) -> None:
    from training.evaluate import evaluate_run  # lazy: the commands' help and bad input answer before torch loads

    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1 (got {batch_size})")
    settings.check()
    _check_window(run, settings.max_new_tokens)
    state = _state()
    if state.is_main_process:  # greedy evaluation is cheap next to training: one process does it
        result = evaluate_run(run, settings=settings, batch_size=batch_size, layers=layers)
        print(result.table)
        print(f"wrote {run / 'eval.json'} and {run / 'eval_examples.jsonl'} (.csv)")
    state.wait_for_everyone()


@app.command()
def tasks():
    """List the built-in task suites with one example each."""
    from training.tasks import SUITES, load_task  # lazy: the commands' help and bad input answer before torch loads

    for name, suite in SUITES.items():
        t = load_task(name)
        e = t.test[0]
        print(f"{name}: {suite.description}")
        where = "as the system turn" if suite.placement == "system" else "before the prompt in the user turn"
        print(f"  {len(t.train)} train / {len(t.test)} test, context {where}")
        print(f"  context:    {e.context}")
        print(f"  prompt:     {e.prompt}")
        print(f"  reference:  {e.reference} ({e.verifier})")
        if e.cf_context:
            print(f"  counterfactual: {e.cf_context} -> {e.cf_reference}")


app.command("experience")(experience_command)


@app.command("cf-names")
def cf_names(
    model: str = typer.Option(EMBEDDED, help="the base model whose following is measured"),
    no_context: str = typer.Option("neutral", help="the no-card turn of the unprompted answers: default, neutral or empty"),
    max_new_tokens: int = typer.Option(48, help="budget of each greedy answer"),
    out: Optional[Path] = typer.Option(None, help="also write the table as JSON to this file"),
):
    """Measure how often the base model follows candidate counterfactual names and makers given as a card (and says
    them unprompted): the table the persona suites' counterfactual identity is chosen from."""
    from interp.core.models import load_model  # lazy: the commands' help and bad input answer before torch loads
    from interp.core.pairs import NO_CONTEXT  # lazy: the commands' help and bad input answer before torch loads
    from interp.core.store import atomic_write_json  # lazy: the commands' help and bad input answer before torch loads
    from training import counterfactual  # lazy: the commands' help and bad input answer before torch loads

    if no_context not in NO_CONTEXT:
        raise UserError(f"unknown --no-context '{no_context}'; use one of {', '.join(NO_CONTEXT)}")
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1 (got {max_new_tokens})")
    if out is not None and (out.is_dir() or not out.parent.is_dir()):
        raise UserError(f"--out {out} must be a file in an existing folder")
    rows = counterfactual.follow_table(load_model(model), no_context=no_context, max_new_tokens=max_new_tokens)
    print(counterfactual.markdown(rows))
    for kind in ("name", "maker"):
        b = counterfactual.best(rows, kind)
        print(f"best {kind}: {b.candidate} (follows {b.follow_k}/{b.follow_n}, said unprompted {b.unprompted_k}/{b.unprompted_n})")
    if out is not None:
        atomic_write_json(out, {"model": model, "no_context": no_context, "max_new_tokens": max_new_tokens,
                                "rows": counterfactual.to_json(rows)})


@app.command("loop-credit")
def loop_credit(
    suite: Optional[str] = typer.Option(None, help="the suite whose training prompts are sampled (default: the student's)"),
    seed: Optional[int] = typer.Option(None, help="the suite's split seed, also the sampling seed (default: the student's)"),
    run: Optional[Path] = typer.Option(None, help="a run folder: measure its --student instead of the base at step 0"),
    student: Optional[str] = typer.Option(None, help="the student in --run whose rollouts are measured"),
    model: str = typer.Option(EMBEDDED, help="the base model (without --run)"),
    no_context: Optional[str] = typer.Option(None, help="the no-card turn: default, neutral or empty (default: the student's, else neutral)"),
    temperature: Optional[float] = typer.Option(None, help="rollout temperature (default: the student's, else 1.0)"),
    max_new_tokens: Optional[int] = typer.Option(None, help="rollout budget (default: the student's, else 96)"),
    prompts: int = typer.Option(24, help="how many training prompts are sampled"),
    samples: Optional[int] = typer.Option(None, help="rollouts per prompt (default: 2, or 1 for greedy rollouts)"),
    loss: Optional[str] = typer.Option(None, help="whose one step is measured: reverse_kl or forward_kl (default: the student's, else reverse_kl)"),
    out: Optional[Path] = typer.Option(None, help="also write the result as JSON to this file"),
):
    """Why distillation can teach loops: on rollouts sampled as the trainer samples them, the teacher's log-ratio
    to the student and the share of tokens one step of the loss raises, for clean tokens, tokens before a loop and
    tokens of the loop (training/loop_credit.py, docs/measures.md#loop-credit)."""
    from interp.core.pairs import NO_CONTEXT  # lazy: the commands' help and bad input answer before torch loads
    from interp.core.runs import TRAIN_CONFIG_FILE, check_student, student_dir  # lazy: as above
    from interp.core.store import atomic_write_json, read_json  # lazy: as above

    cfg: dict = {}
    if (run is None) != (student is None):
        raise UserError("--run and --student go together: name both to measure a trained student, neither for the base")
    if run is not None and student is not None:
        check_student(run, student)
        cfg = read_json(student_dir(run, student) / TRAIN_CONFIG_FILE, expect=dict)
    suite = suite or cfg.get("task")
    seed = seed if seed is not None else cfg.get("seed")
    no_context = no_context or cfg.get("no_context") or "neutral"
    temperature = temperature if temperature is not None else float(cfg.get("temperature", 1.0))
    max_new_tokens = max_new_tokens or int(cfg.get("max_new_tokens", 96))
    samples = samples if samples is not None else (1 if temperature == 0 else 2)
    loss = loss or cfg.get("loss") or "reverse_kl"
    if suite is None or seed is None:
        raise UserError("name the suite and seed (--suite, --seed), or a trained student (--run, --student)")
    if no_context not in NO_CONTEXT:
        raise UserError(f"unknown --no-context '{no_context}'; use one of {', '.join(NO_CONTEXT)}")
    for name, value, low in (("--prompts", prompts, 1), ("--samples", samples, 1), ("--max-new-tokens", max_new_tokens, 1)):
        if value < low:
            raise UserError(f"{name} must be at least {low} (got {value})")
    if temperature < 0:
        raise UserError(f"--temperature must be 0 (greedy) or more (got {temperature})")
    if loss not in ("reverse_kl", "forward_kl"):
        raise UserError(f"--loss must be reverse_kl or forward_kl (got '{loss}'); loop credit measures a distillation step")
    if temperature == 0 and samples > 1:
        raise UserError(f"greedy rollouts (temperature 0) of one prompt are all the same; use --samples 1 (got {samples})")
    if out is not None and (out.is_dir() or not out.parent.is_dir()):
        raise UserError(f"--out {out} must be a file in an existing folder")

    from tqdm.auto import tqdm

    from interp.core.models import load_model  # lazy: as above
    from interp.core.students import open_student  # lazy: as above
    from training import loop_credit as lc  # lazy: as above
    from training import stats  # lazy: as above
    from training.tasks import load_task  # lazy: as above

    task = load_task(suite, seed=seed, n_test=cfg.get("n_test", 40))
    top_k = cfg.get("top_k") if loss == "reverse_kl" else None
    if run is not None and student is not None:
        lm, adapter = open_student(run, student)
        spec, who = lm.spec, student
    else:
        lm, adapter, spec, who = load_model(model), None, model, "base (step 0)"
    examples = task.train[:prompts]
    bar = tqdm(total=len(examples) * samples, desc="loop-credit", unit="rollout")
    scored = lc.measure(lm, examples, adapter=adapter, placement=cfg.get("placement") or task.placement, no_context=no_context,
                        samples=samples, temperature=temperature, max_new_tokens=max_new_tokens, top_k=top_k, loss=loss,
                        seed=seed, progress=bar.update)
    bar.close()
    n, looping = len(scored), sum(r.start is not None for r in scored)
    wil = stats.wilson(looping, n)
    result = lc.Credit(spec, who, suite, seed, no_context, temperature, max_new_tokens, top_k, n, looping,
                       None if wil is None else list(wil), lc.summarize(scored), loss)
    print(lc.markdown(result))
    if out is not None:
        atomic_write_json(out, lc.to_json(result))


@app.command("random-adapter")
def random_adapter(
    like: Path = typer.Option(..., help="a trained student's adapter folder"),
    out: Path = typer.Option(..., help="the control's new folder (a student folder: put it in a run to evaluate it)"),
    seed: int = typer.Option(0, help="seed of the random directions"),
):
    """The drift control: an adapter that changes every adapted matrix by as much as the trained one (the same
    Frobenius norm of its update) in random directions (training/drift_control.py)."""
    from training.drift_control import write_random_like  # lazy: the commands' help and bad input answer before torch loads

    n = write_random_like(like, out, seed)
    print(f"{out}: {n} matrices, each changed by as much as in {like}, in random directions (seed {seed})")


def _print_main(text: str) -> None:
    if _state().is_main_process:
        print(text)


def main() -> None:
    from interp.core.models import quiet_known_warnings  # lazy: the commands' help and bad input answer before torch loads

    quiet_known_warnings()
    try:
        app()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
