"""Removability evaluation: greedy answers without the context, with it and with a counterfactual context, for the
base model, the teacher and every student; rates with 95% bootstrap intervals (docs/measures.md#evaluation)."""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence, cast

import numpy as np
import torch

from interp.analysis import analyze_run
from interp.core.degenerate import loop_rules
from interp.core.errors import UserError
from interp.core.generate import generate
from interp.core.adapters import check_safetensors
from interp.core.models import LoadedModel, load_model
from interp.core.pairs import render_prompt_pair
from interp.core.runs import (
    ADAPTER_WEIGHTS,
    EVAL_DIR,
    EVAL_FILE,
    EVAL_TABLE,
    ExampleRow,
    ModelEval,
    RunInfo,
    adapter_dir,
    read_model_eval,
    read_run,
    write_examples,
    write_model_eval,
)
from interp.core.store import atomic_write_json
from training import stats
from training.tasks import SUITES, Example, load_task

DEFAULT_NEW_TOKENS = 96  # long enough that clean answers end on their own; loops hit it (truncated_*)
DEFAULT_BUDGETS = (32, 64)  # the answers are judged at these cut-offs too
EVAL_BATCH = 48  # rows per generation batch: on CPU a decode step of 48 rows costs about 1.8× one of 8 (bench/generate.py)
DRIFT_PROMPTS = 8  # held-out prompts per other suite for `drift`
DRIFT_NEW_TOKENS = 32
# The suites whose prompts measure drift: fixed, so that a suite added later does not change what drift means.
DRIFT_SUITES = ("persona", "format", "facts", "persona_luna", "persona_once", "opener", "signoff")


@dataclass
class EvalSettings:
    """What an evaluation depends on besides the weights; a model evaluated with other settings is evaluated again."""

    n: int | None = None
    max_new_tokens: int = DEFAULT_NEW_TOKENS
    allow_degenerate: bool = False
    counterfactual: bool = True
    drift: bool = True
    bootstrap_seed: int = 0
    # Shorter budgets at which the same answers are judged again (cut-offs, not new generations).
    budgets: list[int] = field(default_factory=lambda: list(DEFAULT_BUDGETS))

    def check(self) -> "EvalSettings":
        if self.n is not None and self.n < 1:
            raise UserError(f"--n must be at least 1 (got {self.n})")
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be at least 1 (got {self.max_new_tokens})")
        if not isinstance(self.budgets, list) or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in self.budgets):
            raise UserError(f"budgets must be a list of token counts of at least 1 (got {self.budgets!r})")
        self.budgets = sorted({b for b in self.budgets if b < self.max_new_tokens})
        return self

    @property
    def cuts(self) -> list[int]:
        """Every budget the answers are judged at, the full one last."""
        return [*self.budgets, self.max_new_tokens]


def verdicts(e: Example, ids_noctx: Sequence[int], ids_ctx: Sequence[int], ids_cf: Sequence[int] | None, budget: int,
             decode, allow_degenerate: bool = False) -> dict:
    """Every verdict on one example's three answers cut at `budget` tokens (an answer that stopped earlier is
    whole): right, looping (and by which rule), truncated (reached the budget), length; under the counterfactual
    context: follows it, loops, and `stubborn_cf` (a clean answer that still gives the trained answer)."""
    out: dict = {}
    for side, ids in (("noctx", ids_noctx), ("ctx", ids_ctx), ("cf", ids_cf)):
        if ids is None:
            out.update({f"degenerate_{side}": None, f"loop_short_{side}": None, f"loop_clause_{side}": None,
                        f"truncated_{side}": None, f"len_{side}": None})
            continue
        cut = list(ids[:budget])
        text = decode(cut)
        short, clause = loop_rules(text)
        out.update({f"degenerate_{side}": short or clause, f"loop_short_{side}": short, f"loop_clause_{side}": clause,
                    f"truncated_{side}": len(ids) >= budget, f"len_{side}": len(cut)})
        if side == "cf":
            out["follow_cf"] = e.check_cf(text, allow_degenerate)
            out["stubborn_cf"] = e.check(text, False) if e.cf_reference != e.reference else None
        else:
            out[f"correct_{side}"] = e.check(text, allow_degenerate)
    if ids_cf is None:
        out["follow_cf"] = out["stubborn_cf"] = None
    return out


def answer(lm: LoadedModel, examples: Sequence[Example], placement: str, model: str, *, max_new_tokens: int,
           batch_size: int = 48, counterfactual: bool = True, allow_degenerate: bool = False,
           budgets: Sequence[int] = (), no_context: str = "default") -> list[ExampleRow]:
    """Greedy answers of the model as it is now (whatever adapter is active), as ExampleRows: without the context,
    with it and with the counterfactual context, generated together (one batched pass over all three kinds) at the
    full budget, and judged at that budget and at each of `budgets` (cut-offs of the same answers)."""
    tok = lm.tokenizer
    pps = [render_prompt_pair(tok, e.context, e.prompt, placement, no_context=no_context) for e in examples]
    has_cf = [counterfactual and e.cf_context is not None for e in examples]
    cf_prompts = [render_prompt_pair(tok, e.cf_context, e.prompt, placement, no_context=no_context).ctx_ids
                  for e, h in zip(examples, has_cf) if h and e.cf_context is not None]
    n = len(pps)
    out = generate(lm, [p.noctx_ids for p in pps] + [p.ctx_ids for p in pps] + cf_prompts, max_new_tokens=max_new_tokens,
                   batch_size=batch_size)
    noctx, ctx, cf_iter = out[:n], out[n : 2 * n], iter(out[2 * n :])
    dec = lambda ids: cast(str, tok.decode(ids, skip_special_tokens=True))  # noqa: E731
    cuts = sorted({b for b in budgets if b < max_new_tokens} | {max_new_tokens})
    rows = []
    for i, (e, a, b, h) in enumerate(zip(examples, noctx, ctx, has_cf)):
        c = next(cf_iter) if h else None
        judged = {str(k): verdicts(e, a, b, c, k, dec, allow_degenerate) for k in cuts}
        full = judged[str(max_new_tokens)]
        tc = dec(c) if c is not None else None
        rows.append(ExampleRow(
            model=model, example=i, context=e.context, prompt=e.prompt, reference=e.reference, verifier=e.verifier,
            response_noctx=dec(a), response_ctx=dec(b), ids_noctx=list(a), ids_ctx=list(b),
            correct_noctx=full["correct_noctx"], correct_ctx=full["correct_ctx"],
            degenerate_noctx=full["degenerate_noctx"], degenerate_ctx=full["degenerate_ctx"],
            truncated_noctx=full["truncated_noctx"], truncated_ctx=full["truncated_ctx"],
            cf_context=e.cf_context if h else None, cf_reference=e.cf_reference if h else None,
            response_cf=tc, ids_cf=list(c) if c is not None else None,
            follow_cf=full["follow_cf"], degenerate_cf=full["degenerate_cf"], stubborn_cf=full["stubborn_cf"],
            budgets=judged,
        ))
    return rows


def rejudge(rows: Sequence[ExampleRow], examples: Sequence[Example], decode, *,
            allow_degenerate: bool = False) -> list[ExampleRow] | None:
    """The same answers judged by `examples`' verifiers: every verdict, at the full budget and at each cut-off the
    rows carry, recomputed from the stored token ids. This is how a suite that differs from another only in its
    verifier (`persona_once`) is scored from the other's answers, and how a changed verifier is applied without
    generating again. None when the rows answer other examples (another context, prompt, reference or
    counterfactual): those answers must be generated again."""
    if len(rows) > len(examples):
        return None
    out = []
    for r in rows:
        e = examples[r.example]
        asked_cf = r.ids_cf is not None
        if (r.context, r.prompt, r.reference) != (e.context, e.prompt, e.reference) or (
                asked_cf and (r.cf_context, r.cf_reference) != (e.cf_context, e.cf_reference)):
            return None
        cf = r.ids_cf if asked_cf else None
        cuts = sorted(int(k) for k in r.budgets) if r.budgets else []
        full_budget = max(cuts) if cuts else max(len(r.ids_noctx), len(r.ids_ctx), len(cf or []), 1)
        judged = {str(k): verdicts(e, r.ids_noctx, r.ids_ctx, cf, k, decode, allow_degenerate) for k in (cuts or [full_budget])}
        full = judged[str(full_budget)]
        out.append(replace(r, verifier=e.verifier, correct_noctx=full["correct_noctx"], correct_ctx=full["correct_ctx"],
                           follow_cf=full["follow_cf"], stubborn_cf=full["stubborn_cf"],
                           budgets=judged if r.budgets else r.budgets))
    return out


def rescored(ev: ModelEval, examples: Sequence[Example], decode, base: ModelEval | None = None) -> ModelEval | None:
    """`ev` judged by `examples`' verifiers (rejudge), its scores and intervals computed again against `base` (the
    base model's evaluation, judged the same way; None when `ev` is the base's). `drift` does not depend on the
    verifier and is kept. None when the rows answer other examples."""
    rows = rejudge(ev.rows, examples, decode, allow_degenerate=bool(ev.settings.get("allow_degenerate", False)))
    if rows is None:
        return None
    teacher = [r.correct_ctx for r in (rows if base is None else base.rows)]
    scores, intervals = score(rows, teacher, seed=int(ev.settings.get("bootstrap_seed", 0)))
    scores["drift"], intervals["drift"] = ev.scores.get("drift"), ev.intervals.get("drift")
    return ModelEval(ev.model, ev.settings, scores, intervals, rows)


def score(rows: Sequence[ExampleRow], teacher_ctx: Sequence[bool] | None = None, *, seed: int = 0,
          drift: Sequence[tuple[float, int]] | None = None) -> tuple[dict, dict]:
    """The evaluation metrics of one model and their 95% bootstrap intervals (docs/measures.md#evaluation).

    `teacher_ctx`: the teacher's with-context verdicts on the same examples (for ctx_drop; default: this model's
    own, so ctx_drop is 0). `drift`: per drift prompt, (summed KL, tokens). Undefined values are None.
    """
    n = len(rows)
    if n == 0:
        raise UserError("no test examples to evaluate; raise --n-test")
    col = lambda name: np.array([bool(getattr(r, name)) for r in rows])  # noqa: E731
    a, c = col("correct_noctx"), col("correct_ctx")
    t = c if teacher_ctx is None else np.asarray(teacher_ctx, dtype=bool)
    len_a = np.array([len(r.ids_noctx) for r in rows], dtype=float)
    len_c = np.array([len(r.ids_ctx) for r in rows], dtype=float)
    cf_rows = [i for i, r in enumerate(rows) if r.follow_cf is not None]
    follow = np.array([bool(rows[i].follow_cf) for i in cf_rows])

    def ratio(idx):
        den = len_a[idx].mean()
        return float(len_c[idx].mean() / den) if den > 0 else None

    stat = {
        "acc_noctx": stats.rate(a),
        "acc_ctx": stats.rate(c),
        "harm": stats.rate(~c, where=a),
        "help": stats.rate(c, where=~a),
        "len_ratio": ratio,
        "ctx_drop": lambda idx: float(t[idx].mean() - c[idx].mean()),
        "degenerate_noctx": stats.rate(col("degenerate_noctx")),
        "degenerate_ctx": stats.rate(col("degenerate_ctx")),
        "truncated_noctx": stats.rate(col("truncated_noctx")),
        "truncated_ctx": stats.rate(col("truncated_ctx")),
    }
    everything = np.arange(n)
    scores = {k: f(everything) for k, f in stat.items()}
    intervals = {k: stats.bootstrap_ci(f, n, seed=seed) for k, f in stat.items()}
    # follow_cf is a rate over the examples that have a counterfactual context (all of them for built-in suites).
    scores["follow_cf"] = float(follow.mean()) if cf_rows else None
    intervals["follow_cf"] = stats.bootstrap_ci(stats.rate(follow), len(follow), seed=seed) if cf_rows else None
    if drift:
        kl = np.array([d[0] for d in drift]); tokens = np.array([d[1] for d in drift], dtype=float)  # noqa: E702
        per = lambda idx: float(kl[idx].sum() / tokens[idx].sum()) if tokens[idx].sum() > 0 else None  # noqa: E731
        scores["drift"] = per(np.arange(len(drift)))
        intervals["drift"] = stats.bootstrap_ci(per, len(drift), seed=seed)
    else:
        scores["drift"], intervals["drift"] = None, None
    scores["n"] = n
    return scores, {k: (list(v) if v else None) for k, v in intervals.items()}


# --- drift: what the distillation cost elsewhere -----------------------------------------------------------------------


def drift_examples(task: str, seed: int) -> list[Example]:
    """Held-out prompts of the *other* drift suites (`DRIFT_SUITES`: those with another context), without any context."""
    own = load_task(task, seed=seed, n_test=1).test[0].context if task in SUITES else None
    out = []
    for name in DRIFT_SUITES:
        t = load_task(name, seed=seed, n_test=DRIFT_PROMPTS)
        if t.test[0].context != own and name != task:
            out.extend(t.test[:DRIFT_PROMPTS])
    return out


@torch.no_grad()
def drift_kl(lm: LoadedModel, student: str, prompts: list[list[int]], responses: list[list[int]]) -> list[tuple[float, int]]:
    """Per prompt: Σ_t KL(p_S(·|x,y<t) ‖ p_0(·|x,y<t)) over the base model's greedy response y, and the token count."""
    out = []
    for p, r in zip(prompts, responses):
        if not r:
            out.append((0.0, 0))
            continue
        ids = torch.tensor([list(p) + list(r)], device=lm.device)
        positions = slice(len(p) - 1, len(p) + len(r) - 1)
        with lm.use(None):
            base = torch.log_softmax(lm.model(input_ids=ids).logits[0, positions].float(), -1)
        with lm.use(student):
            stud = torch.log_softmax(lm.model(input_ids=ids).logits[0, positions].float(), -1)
        out.append((float((stud.exp() * (stud - base)).sum()), len(r)))
    return out


# --- the run ---------------------------------------------------------------------------------------------------------


def fingerprint(path: Path) -> str:
    """A student's identity for the evaluation cache: the hash of its adapter weights."""
    h = hashlib.sha256()
    with open(path / ADAPTER_WEIGHTS, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


@dataclass
class EvalResult:
    run_dir: Path
    report: dict  # what eval.json holds
    table: str


def evaluate_run(
    run_dir: str | Path,
    *,
    settings: EvalSettings | None = None,
    models: Sequence[str] | None = None,
    batch_size: int = EVAL_BATCH,
    layers: bool = True,
    lm: LoadedModel | None = None,
    progress: bool = False,
) -> EvalResult:
    """Evaluate base, teacher and every finished student of a run on the held-out test split (or only `models`):
    one eval/<model>.json each, reused while the settings and the adapter are the same; then eval.json,
    eval_examples.jsonl and .csv for all evaluated models, and, with `layers`, the per-layer analysis on the same
    loaded model."""
    settings = (settings or EvalSettings()).check()
    run_dir = Path(run_dir)
    info = read_run(run_dir)
    students = list(info.students) if models is None else [m for m in models if m not in ("base", "teacher")]
    unknown = [s for s in students if s not in info.students]
    if unknown:
        raise UserError(f"{run_dir} has no student named {unknown[0]}; its students: {', '.join(info.students) or 'none'}")
    folders = {s: adapter_dir(run_dir, s) for s in students}  # an unfinished student is an error, not a silent skip
    for folder in folders.values():  # a damaged adapter fails now, not after minutes of generation for the others
        check_safetensors(folder / ADAPTER_WEIGHTS, "adapter weights")
    task = load_task(info.task, seed=info.seed, n_test=info.n_test)
    examples = task.test[: settings.n] if settings.n else task.test
    base_settings = asdict(settings)

    lm_holder: list[LoadedModel] = [lm] if lm is not None else []

    def model() -> LoadedModel:
        if not lm_holder:
            lm_holder.append(load_model(info.model))
        return lm_holder[0]

    drift_cache: dict = {}

    def drift_inputs():
        if not drift_cache:
            m = model()
            ex = drift_examples(info.task, info.seed)
            prompts = [render_prompt_pair(m.tokenizer, e.context, e.prompt, info.placement, no_context=info.no_context).noctx_ids
                       for e in ex]
            with m.use(None):
                drift_cache["v"] = (prompts, generate(m, prompts, max_new_tokens=DRIFT_NEW_TOKENS, batch_size=batch_size))
        return drift_cache["v"]

    def evaluated(name: str, adapter: str | None) -> ModelEval:
        # One process at a time per model and run folder: a study's parallel cells share the base model's evaluation.
        with _eval_lock(run_dir, name):
            return _evaluated(name, adapter)

    def _evaluated(name: str, adapter: str | None) -> ModelEval:
        wanted = {**base_settings, "adapter": fingerprint(folders[name]) if adapter else "base"}
        cached = read_model_eval(run_dir, name)
        if cached is not None and cached.settings == wanted:
            return cached
        m = model()
        if adapter:
            m.load_adapter(folders[name], name=adapter)
        with m.use(adapter):
            rows = answer(m, examples, info.placement, name, max_new_tokens=settings.max_new_tokens, batch_size=batch_size,
                          counterfactual=settings.counterfactual, allow_degenerate=settings.allow_degenerate,
                          budgets=settings.budgets, no_context=info.no_context)
        drift = drift_kl(m, adapter, *drift_inputs()) if (adapter and settings.drift) else None
        base_rows = rows if adapter is None else evaluated("base", None).rows
        scores, intervals = score(rows, [r.correct_ctx for r in base_rows], seed=settings.bootstrap_seed, drift=drift)
        if adapter is None and settings.drift:
            scores["drift"], intervals["drift"] = 0.0, [0.0, 0.0]  # the base model's distance from itself
        ev = ModelEval(name, wanted, scores, intervals, rows)
        write_model_eval(run_dir, ev)
        return ev

    results = {"base": evaluated("base", None)}
    for name in students:
        results[name] = evaluated(name, name)
    # Every model evaluated so far with these settings goes into the table (the study evaluates students one by one).
    for name in info.students:
        if name not in results:
            cached = read_model_eval(run_dir, name)
            if cached is not None and {k: v for k, v in cached.settings.items() if k != "adapter"} == base_settings:
                results[name] = cached
    report = build_report(info, task.name, settings, results)
    rows = [r for ev in results.values() for r in ev.rows]
    write_examples(run_dir, rows)
    atomic_write_json(run_dir / EVAL_FILE, report)
    if layers:
        analyze_run(run_dir, lm=model(), progress=progress)
    return EvalResult(run_dir, report, format_table(report))


@contextlib.contextmanager
def _eval_lock(run_dir: Path, model: str):
    """An advisory lock (flock) on eval/.<model>.lock: a second evaluator of the same model waits, then finds the
    first one's result in the cache."""
    import fcntl

    folder = run_dir / EVAL_DIR
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f".{model}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_report(info: RunInfo, task: str, settings: EvalSettings, results: dict[str, ModelEval]) -> dict:
    """eval.json: every model's scores and intervals; the teacher row is the base model read with the context; each
    student's paired comparison with the first student (flips with the context both ways, McNemar's p)."""
    base = results["base"]
    models = {"base": base.scores, "teacher": base.scores}
    intervals = {"base": base.intervals, "teacher": base.intervals}
    students = [s for s in info.students if s in results]
    for s in students:
        models[s], intervals[s] = results[s].scores, results[s].intervals
    paired = {}
    if students:
        ref = students[0]
        for s in students[1:]:
            paired[s] = {"vs": ref, "ctx": stats.paired([r.correct_ctx for r in results[s].rows], [r.correct_ctx for r in results[ref].rows]),
                         "noctx": stats.paired([r.correct_noctx for r in results[s].rows], [r.correct_noctx for r in results[ref].rows])}
    return {"task": task, "model": info.model, "split": "test", "n": base.scores["n"], "placement": info.placement,
            "settings": asdict(settings), "models": models, "intervals": intervals, "paired": paired}


def format_table(report: dict, columns: Sequence[str] = EVAL_TABLE) -> str:
    """The evaluation as a fixed-width table, one row per model ("–": undefined)."""
    head = f"{report['task']} · {report['model']} · {report['split']} split, n={report['n']}"
    width = max(12, *(len(name) for name in report["models"]))
    lines = [head, "  ".join([f"{'model':<{width}}"] + [f"{c:>16}" for c in columns])]
    for name, m in report["models"].items():
        cells = [f"{name:<{width}}"]
        for k in columns:
            v = m.get(k)
            ci = (report.get("intervals", {}).get(name) or {}).get(k)
            text = "–" if v is None else f"{v:.2f}" + (f" [{ci[0]:.2f},{ci[1]:.2f}]" if ci and k != "drift" else "")
            cells.append(f"{text:>16}")
        lines.append("  ".join(cells))
    return "\n".join(lines)
