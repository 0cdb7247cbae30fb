"""`python -m training experience` on the tiny model: the suite it writes trains as it is, the test split never feeds
the experience, the same seed gives the same experience, and bad input is a one-line error that writes nothing."""

import json
import sys
from pathlib import Path

import pytest

from training.__main__ import main
from training.experience import (EXPERIENCE_TEXT, LESSONS_PROMPT, MANIFEST, TRACES, ExperienceSettings, build,
                                 suite_file_name)
from training.tasks import load_task

WORDS = ["apple", "river", "candle", "falcon", "meadow", "harbor", "lantern", "orchid", "glacier", "pepper", "saddle",
         "thimble", "walrus", "zephyr", "quartz", "bramble"]
SMALL = ["--model", "tiny-random-llama", "--prompts", "6", "--samples", "2", "--max-new-tokens", "6", "--n-test", "4",
         "--max-examples", "3", "--lesson-tokens", "8"]


def _suite(path, verifier="regex", answer=r"\w"):
    """A user suite whose verifier the tiny random model passes now and then (`\\w`: any word)."""
    rows = []
    for w in WORDS:
        row = {"context": "Say something.", "prompt": f"Tell me about the {w}.", "answer": answer}
        if verifier is not None:
            row["verifier"] = verifier
        rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cli(capsys, monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", ["training", *args])
    with pytest.raises(SystemExit) as exit_:
        main()
    out = capsys.readouterr()
    return (exit_.value.code or 0), out.out, out.err


def test_the_suite_trains_and_keeps_the_test_split_unseen(tmp_path, capsys, monkeypatch):
    src = _suite(tmp_path / "words.jsonl")
    out = tmp_path / "exp"
    code, stdout, err = _cli(capsys, monkeypatch, "experience", "--task", str(src), "--out", str(out), *SMALL)
    assert code == 0, err
    suite = out / suite_file_name(str(src), "examples")
    assert suite.name == "words_examples.jsonl" and f"wrote {suite}" in stdout
    for name in (TRACES, EXPERIENCE_TEXT, MANIFEST):
        assert (out / name).is_file()
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["model"] == "tiny-random-llama" and manifest["seed"] == 0 and manifest["settings"]["samples"] == 2
    assert manifest["context_in_attempts"] is False and manifest["attempts"] == 12

    source = load_task(str(src), seed=0, n_test=4)
    traces = [json.loads(line) for line in (out / TRACES).read_text().splitlines()]
    assert {"prompt", "sample", "verdict"} <= set(traces[0])
    experience = (out / EXPERIENCE_TEXT).read_text()
    train_prompts = {e.prompt for e in source.train}
    assert {t["prompt"] for t in traces} <= train_prompts
    for e in source.test:  # the test prompts feed nothing: no attempt, no worked example
        word = e.prompt.split()[-1].rstrip(".")
        assert word not in experience and all(word not in t["prompt"] for t in traces)

    # The suite loads with its own split (whatever the seed) and trains one step as it is.
    for seed in (0, 3):
        task = load_task(str(suite), seed=seed, n_test=4)
        assert [e.prompt for e in task.test] == [e.prompt for e in source.test]
        assert {e.prompt for e in task.train} == train_prompts
        assert all(e.context == experience.rstrip("\n") for e in task.train + task.test)
    code, stdout, err = _cli(capsys, monkeypatch, "train", "--task", str(suite), "--model", "tiny-random-llama", "--steps", "1",
                             "--batch-size", "2", "--max-new-tokens", "3", "--n-test", "4", "--out", str(tmp_path / "run" / "opcd"))
    assert code == 0, err
    assert (tmp_path / "run" / "opcd" / "adapter_model.safetensors").is_file()

    # Lessons from the same traces, without sampling again; the lessons prompt holds no test prompt either.
    lessons = tmp_path / "lessons"
    code, stdout, err = _cli(capsys, monkeypatch, "experience", "--task", str(src), "--out", str(lessons), "--kind", "lessons",
                             "--traces", str(out), *SMALL)
    assert code == 0, err
    prompt = (lessons / LESSONS_PROMPT).read_text()
    assert "Graded" in prompt and (lessons / TRACES).read_text() == (out / TRACES).read_text()
    assert all(e.prompt not in prompt for e in source.test)
    assert load_task(str(lessons / "words_lessons.jsonl"), n_test=4).train[0].context.startswith("Lessons")


def test_same_seed_same_experience(tmp_path, tiny):
    src = _suite(tmp_path / "words.jsonl")
    s = dict(task=str(src), model="tiny-random-llama", n_test=4, prompts=6, samples=2, max_new_tokens=6, max_examples=3)
    a, b = build(ExperienceSettings(**s), lm=tiny), build(ExperienceSettings(**s), lm=tiny)
    assert a.traces == b.traces and a.context == b.context and a.records == b.records
    c = build(ExperienceSettings(**s, seed=1), lm=tiny)
    assert [t.sample for t in c.traces] != [t.sample for t in a.traces]


@pytest.mark.parametrize("case,message", [
    ("empty", "error: none of the 12 attempts was verified correct"),
    ("no_verifier", "record 1 has no verifier"),
    ("kind", "error: unknown kind 'recipes'; use one of examples, lessons"),
    ("exists", "already exists"),
    ("teacher", "error: --teacher-model writes lessons"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch, case, message):
    src = _suite(tmp_path / "words.jsonl", answer="zzqqxx" if case == "empty" else r"\w",
                 verifier=None if case == "no_verifier" else "regex")
    out = tmp_path / "exp"
    extra = {"kind": ["--kind", "recipes"], "teacher": ["--teacher-model", "tiny-random-llama"]}.get(case, [])
    if case == "exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = _cli(capsys, monkeypatch, "experience", "--task", str(src), "--out", str(out), *SMALL, *extra)
    assert code == 2
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and not line.startswith("attempts")]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err  # the progress bar aside
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output folder, no temporary left behind
    if case == "exists":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_a_fixed_split_is_checked(tmp_path):
    path = tmp_path / "s.jsonl"
    rows = [{"context": "c", "prompt": "p1", "answer": "a", "split": "train"}, {"context": "c", "prompt": "p1", "answer": "a", "split": "test"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match="in both splits"):
        load_task(str(path))
    rows[1] = {"context": "c", "prompt": "p2", "answer": "a"}
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match="give every record a split or none"):
        load_task(str(path))


def test_the_experience_study_plans(tmp_path, monkeypatch):
    from training.study import load_study, plan

    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the suite path in the file is relative to the repository
    spec = load_study("studies/experience.toml", str(tmp_path / "runs"), str(tmp_path / "results"))
    assert {s.name for s in spec.students} == {"opcd", "opcd_reg", "offpolicy", "offpolicy_reg"}
    task = load_task(spec.specs[spec.suites[0]].suite, n_test=spec.n_test)
    assert len(task.test) == 40 and not {e.prompt for e in task.test} & {e.prompt for e in task.train}
    assert "12 cells" in plan(spec)
