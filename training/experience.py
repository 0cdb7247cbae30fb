"""Experiential knowledge distillation (OPCD's first application): the model attempts a suite's training prompts, a
verifier grades every attempt, and what the graded traces teach is written as a context, the *experience*. The
result is a suite file that `train`, `pair` and `study` take as they are, so on-policy context distillation can move
the experience into the weights.

Two kinds of experience:
- `examples`: the model's own verified answers, as worked examples (one per prompt, the shortest verified sample);
- `lessons`: lessons written by a chosen model (the model itself or `--teacher-model`) from successes and failures;
  the prompt that asked for them is saved.

The attempts are made WITHOUT the suite's own context, in the setting the student is later judged in: the experience
is then what the model found out by itself, not a paraphrase of a card (a card is distilled directly by `train`).
Only the training split's prompts are attempted; the output suite keeps the source's test split, marked with a
`split` field, so that a student is never judged on a prompt whose solution is in its context.

Output folder (written atomically; `docs/measures.md#experience`):
    <source>_<kind>.jsonl   the experience suite: context = the experience, the source's prompts, answers, verifiers
    traces.jsonl            every attempt: prompt, sample, verdict (+ example, sample index, reference, verifier)
    experience.txt          the experience text
    lessons_prompt.txt      (lessons) the prompt the lesson writer answered
    manifest.json           model, suite, seed and settings
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import typer

from interp.core.errors import UserError
from interp.core.specs import EMBEDDED
from interp.core.generate import generate
from interp.core.models import load_model
from interp.core.pairs import has_chat_template, render_prompt_pair
from interp.core.store import atomic_dir, atomic_write_text, check_out, read_json, read_jsonl
from training.tasks import SUITES, Example, Task, load_task

KINDS = ("examples", "lessons")
MANIFEST = "manifest.json"
TRACES = "traces.jsonl"
EXPERIENCE_TEXT = "experience.txt"
LESSONS_PROMPT = "lessons_prompt.txt"
FORMAT = 1
EXAMPLES_HEADER = "Worked examples of this task, answers that were checked and found correct:"
LESSONS_HEADER = "Lessons learned from earlier attempts at this task:"
LESSONS_ASK = (
    "Below are attempts at a task, each graded correct or wrong. Write at most five short lessons, as a list, that "
    "would help someone answer new questions of this task correctly. Write only the lessons."
)


@dataclass
class ExperienceSettings:
    """Everything the experience depends on; recorded in the manifest."""

    task: str = "arith"
    kind: str = "examples"
    model: str = EMBEDDED
    teacher_model: str | None = None  # the lesson writer (default: the model itself)
    seed: int = 0
    n_test: int = 40  # the source split: the same seed and n_test as `train` uses
    prompts: int = 32  # training prompts attempted (at most the training split)
    samples: int = 4  # samples per prompt
    temperature: float = 1.0
    max_new_tokens: int = 64
    max_examples: int = 8  # worked examples in the experience; successes and failures shown to the lesson writer
    lesson_tokens: int = 160
    batch_size: int = 16

    def check(self) -> "ExperienceSettings":
        if self.kind not in KINDS:
            raise UserError(f"unknown kind '{self.kind}'; use one of {', '.join(KINDS)}")
        if self.teacher_model is not None and self.kind != "lessons":
            raise UserError("--teacher-model writes lessons; use it with --kind lessons")
        for name, low in (("prompts", 1), ("samples", 1), ("max_new_tokens", 1), ("max_examples", 1), ("lesson_tokens", 1),
                          ("batch_size", 1), ("n_test", 1)):
            if getattr(self, name) < low:
                raise UserError(f"--{name.replace('_', '-')} must be at least {low} (got {getattr(self, name)})")
        if not self.temperature >= 0:
            raise UserError(f"--temperature must be ≥ 0 (got {self.temperature}); 0 samples greedily")
        return self


@dataclass(frozen=True)
class Trace:
    example: int  # index in the training split
    sample_index: int
    prompt: str
    sample: str
    verdict: bool
    reference: str
    verifier: str
    truncated: bool = False  # the sample reached max_new_tokens: a worked example only if its prompt has no other


@dataclass
class Experience:
    settings: ExperienceSettings
    context: str
    traces: list[Trace]
    records: list[dict]  # the suite's JSONL records
    lessons_prompt: str | None = None

    @property
    def verified(self) -> int:
        return sum(t.verdict for t in self.traces)


def suite_file_name(task: str, kind: str) -> str:
    stem = Path(task).stem if task.endswith(".jsonl") else task
    return f"{stem}_{kind}.jsonl"


def check_verifiers(task: str) -> None:
    """A user suite must name its verifier on every record: the attempts are graded by it (the `contains` default of
    `train` would grade silently by a rule nobody chose)."""
    if task in SUITES:
        return
    path = Path(task)
    if not path.is_file():
        return  # load_task's own error names the choices
    for i, r in enumerate(read_jsonl(path, required=("context", "prompt", "answer")), 1):
        if not isinstance(r.get("verifier"), str) or not r["verifier"].strip():
            raise UserError(f"{path}: record {i} has no verifier; experience grades the attempts with it: add e.g. "
                            "\"verifier\": \"contains\" to every record")


def load_source(settings: ExperienceSettings) -> Task:
    check_verifiers(settings.task)
    return load_task(settings.task, seed=settings.seed, n_test=settings.n_test)


def chosen_prompts(task: Task, settings: ExperienceSettings) -> list[int]:
    """The training examples attempted: a seeded choice among the training split only."""
    idx = list(range(len(task.train)))
    random.Random(settings.seed).shuffle(idx)
    return sorted(idx[: settings.prompts])


def attempt(lm, task: Task, settings: ExperienceSettings, progress: bool = False) -> list[Trace]:
    """`samples` answers per chosen training prompt, without the suite's context, graded by the example's verifier."""
    from tqdm.auto import tqdm

    tok = lm.tokenizer
    jobs = [(i, s) for i in chosen_prompts(task, settings) for s in range(settings.samples)]
    ids = {i: list(render_prompt_pair(tok, task.train[i].context, task.train[i].prompt, task.placement).noctx_ids)
           for i, _ in jobs}
    traces: list[Trace] = []
    bs = settings.batch_size
    chunks = range(0, len(jobs), bs)
    for n, start in enumerate(tqdm(chunks, desc="attempts", unit="batch", disable=not progress)):
        part = jobs[start : start + bs]
        # A seed per chunk: the same settings give the same samples whatever else ran before.
        out = generate(lm, [ids[i] for i, _ in part], max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                       batch_size=bs, seed=settings.seed * 100_003 + n)
        for (i, s), new in zip(part, out):
            e = task.train[i]
            text = str(tok.decode(new, skip_special_tokens=True)).strip()
            traces.append(Trace(i, s, e.prompt, text, bool(text) and e.check(text), e.reference, e.verifier,
                                len(new) >= settings.max_new_tokens))
    return traces


def best_per_prompt(traces: Sequence[Trace], verdict: bool) -> list[Trace]:
    """One trace per prompt with this verdict: an answer that ended on its own before one cut by the budget, then the
    shortest (ties: the first sampled), in prompt order. Measured on arith: "One possible approach is to say 4 + 2 = 6,
    … However, a more precise way to" passes a last-number verifier but makes a poor worked example."""
    key = lambda t: (t.truncated, len(t.sample))  # noqa: E731
    best: dict[int, Trace] = {}
    for t in traces:
        if t.verdict == verdict and t.sample and (t.example not in best or key(t) < key(best[t.example])):
            best[t.example] = t
    return [best[i] for i in sorted(best)]


def pick(items: list[Trace], k: int, seed: int) -> list[Trace]:
    if len(items) <= k:
        return items
    chosen = random.Random(seed).sample(range(len(items)), k)
    return [items[i] for i in sorted(chosen)]


def examples_context(traces: Sequence[Trace], max_examples: int, seed: int) -> str:
    shown = pick(best_per_prompt(traces, True), max_examples, seed)
    if not shown:
        raise UserError(f"none of the {len(traces)} attempts was verified correct, so there is no worked example; "
                        "raise --samples or --prompts, use --kind lessons, or choose a suite the model sometimes solves")
    return EXAMPLES_HEADER + "\n\n" + "\n\n".join(f"Question: {t.prompt}\nAnswer: {t.sample}" for t in shown)


def lessons_prompt(traces: Sequence[Trace], max_examples: int, seed: int) -> str:
    good = pick(best_per_prompt(traces, True), max_examples, seed)
    bad = pick(best_per_prompt(traces, False), max_examples, seed + 1)
    if not good and not bad:
        raise UserError("no attempt has a non-empty answer; nothing to write lessons from (raise --max-new-tokens)")
    parts = [LESSONS_ASK]
    if good:
        parts.append("Graded correct:\n\n" + "\n\n".join(f"Question: {t.prompt}\nAnswer: {t.sample}" for t in good))
    if bad:
        parts.append("Graded wrong:\n\n" + "\n\n".join(
            f"Question: {t.prompt}\nAnswer: {t.sample}\nThe grader ({t.verifier}) wanted: {t.reference}" for t in bad))
    return "\n\n".join(parts)


def write_lessons(writer, prompt: str, max_new_tokens: int) -> str:
    """The writer's greedy answer to the lessons prompt, as a user turn (plain text for a model without a template)."""
    tok = writer.tokenizer
    if has_chat_template(tok):
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True, add_generation_prompt=True)
        ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    else:
        ids = list(tok(prompt + "\n")["input_ids"])
    out = generate(writer, [ids], max_new_tokens=max_new_tokens, temperature=0.0)[0]
    text = str(tok.decode(out, skip_special_tokens=True)).strip()
    if not text:
        raise UserError("the lesson writer wrote nothing (it stopped at once); try another --teacher-model")
    return LESSONS_HEADER + "\n" + text


def suite_records(task: Task, context: str) -> list[dict]:
    """The experience suite: every source example with the experience as its context, each marked with its split (the
    source's own, so the test prompts stay those no attempt saw). No counterfactual: the experience is the model's own
    record of this task, and no other record exists whose following a verifier could tell apart."""
    def record(e: Example, split: str) -> dict:
        return {"context": context, "prompt": e.prompt, "answer": e.reference, "verifier": e.verifier, "split": split}

    return [record(e, "train") for e in task.train] + [record(e, "test") for e in task.test]


def read_traces(path: str | Path, task: Task, settings: ExperienceSettings) -> list[Trace]:
    """Traces saved by an earlier run (its traces.jsonl), to build another kind of experience without sampling again.
    Its manifest must agree on the suite, model, seed and split; every prompt must be a training prompt."""
    path = Path(path)
    if path.is_dir():
        path = path / TRACES
    if not path.is_file():
        raise UserError(f"--traces {path} does not exist; give the traces.jsonl of an earlier `experience` run")
    manifest = read_json(path.parent / MANIFEST, expect=dict) if (path.parent / MANIFEST).is_file() else None
    if manifest is None:
        raise UserError(f"--traces {path}: no {MANIFEST} beside it; give the traces of an earlier `experience` run")
    src = manifest.get("settings", {})
    for key in ("task", "model", "seed", "n_test"):
        if src.get(key) != getattr(settings, key):
            raise UserError(f"--traces {path} were sampled with {key}={src.get(key)!r}, this run says {getattr(settings, key)!r}")
    train = {e.prompt for e in task.train}
    out = []
    for r in read_jsonl(path, required=("prompt",)):
        if r["prompt"] not in train:
            raise UserError(f"--traces {path}: prompt {r['prompt'][:40]!r} is not in the training split")
        out.append(Trace(int(r["example"]), int(r["sample_index"]), r["prompt"], str(r.get("sample", "")), bool(r["verdict"]),
                         str(r["reference"]), str(r["verifier"]), bool(r.get("truncated", False))))
    return out


def build(settings: ExperienceSettings, *, traces_from: str | Path | None = None, lm=None, progress: bool = False) -> Experience:
    """Attempt, grade and write the experience (in memory; `write` puts it on disk)."""
    settings.check()
    task = load_source(settings)
    if traces_from is not None:
        traces = read_traces(traces_from, task, settings)
    else:
        lm = lm or load_model(settings.model)
        traces = attempt(lm, task, settings, progress=progress)
    prompt = None
    if settings.kind == "examples":
        context = examples_context(traces, settings.max_examples, settings.seed)
    else:
        prompt = lessons_prompt(traces, settings.max_examples, settings.seed)
        if settings.teacher_model is not None:
            writer = load_model(settings.teacher_model)
        else:
            writer = lm or load_model(settings.model)
        context = write_lessons(writer, prompt, settings.lesson_tokens)
    test_prompts = {e.prompt for e in task.test}
    assert not any(t.prompt in test_prompts for t in traces), "a test prompt was attempted"
    return Experience(settings, context, traces, suite_records(task, context), prompt)


def write(exp: Experience, out: str | Path, overwrite: bool = False) -> Path:
    """The output folder, in one rename; returns the suite file's path."""
    s = exp.settings
    name = suite_file_name(s.task, s.kind)
    lines = lambda rows: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)  # noqa: E731
    manifest = {
        "format": FORMAT, "kind": s.kind, "model": s.model, "writer": (s.teacher_model or s.model) if s.kind == "lessons" else None,
        "suite": s.task, "seed": s.seed, "suite_file": name, "settings": asdict(s),
        "context_in_attempts": False, "attempts": len(exp.traces), "verified": exp.verified,
        "truncated": sum(t.truncated for t in exp.traces),
        "prompts_attempted": len({t.example for t in exp.traces}),
        "n_train": sum(r["split"] == "train" for r in exp.records), "n_test": sum(r["split"] == "test" for r in exp.records),
        "experience_chars": len(exp.context),
    }
    with atomic_dir(out, overwrite=overwrite) as tmp:
        atomic_write_text(tmp / name, lines(exp.records))
        atomic_write_text(tmp / TRACES, lines(asdict(t) for t in exp.traces))
        atomic_write_text(tmp / EXPERIENCE_TEXT, exp.context + "\n")
        if exp.lessons_prompt is not None:
            atomic_write_text(tmp / LESSONS_PROMPT, exp.lessons_prompt + "\n")
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return Path(out) / name


def run(settings: ExperienceSettings, out: str | Path, *, overwrite: bool = False, traces_from: str | Path | None = None,
        progress: bool = True) -> tuple[Experience, Path]:
    """Check everything that can be checked, then build and write; a failure writes nothing."""
    settings.check()
    check_out(out, overwrite)
    load_source(settings)
    exp = build(settings, traces_from=traces_from, progress=progress)
    return exp, write(exp, out, overwrite)


# --- command line (`python -m training experience`; registered in training/__main__.py) -------------------------------


def command(
    task: str = typer.Option(..., "--task", help="a built-in suite (`python -m training tasks`) or a .jsonl file with a verifier on every record"),
    out: Path = typer.Option(..., "--out", help="new folder for the experience suite, traces.jsonl, experience.txt and manifest.json"),
    kind: str = typer.Option("examples", "--kind", help="examples (the model's verified answers as worked examples) or lessons (written by --teacher-model or the model)"),
    model: str = typer.Option(ExperienceSettings.model, "--model", help="the model that attempts the prompts"),
    teacher_model: Optional[str] = typer.Option(None, "--teacher-model", help="the model that writes the lessons (default: --model)"),
    seed: int = typer.Option(0, "--seed", help="seed of the split (as `train --seed`), the prompts chosen and the samples"),
    n_test: int = typer.Option(40, "--n-test", help="held-out test examples of the source split (as `train --n-test`); never attempted"),
    prompts: int = typer.Option(ExperienceSettings.prompts, "--prompts", help="training prompts attempted"),
    samples: int = typer.Option(ExperienceSettings.samples, "--samples", help="samples per prompt"),
    temperature: float = typer.Option(1.0, "--temperature", help="sampling temperature (0: greedy)"),
    max_new_tokens: int = typer.Option(ExperienceSettings.max_new_tokens, "--max-new-tokens", help="answer budget of each attempt"),
    max_examples: int = typer.Option(ExperienceSettings.max_examples, "--max-examples", help="worked examples in the experience (lessons: successes and failures shown)"),
    lesson_tokens: int = typer.Option(ExperienceSettings.lesson_tokens, "--lesson-tokens", help="budget of the written lessons"),
    batch_size: int = typer.Option(16, "--batch-size", help="attempts generated together"),
    traces: Optional[Path] = typer.Option(None, "--traces", help="reuse an earlier run's traces (its folder or traces.jsonl) instead of sampling again"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing --out folder"),
):
    """Let the model attempt a suite's TRAINING prompts, grade them, and write what it learned as a context (the
    experience): a suite file that `train`, `pair` and `study` take as it is, with the test split kept unseen."""
    settings = ExperienceSettings(task=task, kind=kind, model=model, teacher_model=teacher_model, seed=seed, n_test=n_test,
                                  prompts=prompts, samples=samples, temperature=temperature, max_new_tokens=max_new_tokens,
                                  max_examples=max_examples, lesson_tokens=lesson_tokens, batch_size=batch_size)
    exp, path = run(settings, out, overwrite=overwrite, traces_from=traces)
    print(f"{exp.verified} of {len(exp.traces)} attempts verified on {len({t.example for t in exp.traces})} training prompts; "
          f"{settings.kind} experience of {len(exp.context)} characters")
    print(f"wrote {path} (train with: python -m training train --task {path} --out runs/<name>/<student>)")
