"""Hostile input to the study file, the causal results and the readers, table-driven like tests/test_bad_inputs.py.

Each class of attack is a table: study files (names that are paths, numbers that are not numbers, strings read as
booleans, duplicates, results and runs folders), readers (pickles, FIFOs and devices, damaged records, strict JSON)
and the commands around them. Every case must end in a one-line UserError (exit status 2 from a command, no
traceback) and leave the folder exactly as it was. Plus: a property test of the study reader on generated TOML
documents, strict JSON round trips, the lock on causal results, a `study --jobs 2` killed with SIGKILL that must
leave no process behind, and the app's live-only mode.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from interp.core.errors import UserError
from test_bad_inputs import ENV, SMALL_TRAIN, TINY, PAIR, _listing, made  # noqa: F401 - `made` is a fixture

ROOT = Path(__file__).resolve().parents[1]
PICKLE = b"\x80\x04\x95\x1c\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94\x8c\x06system\x94\x93\x94."


# --- writing TOML (the study reader is tested on documents, not only on bytes) --------------------------------------


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # JSON's string escapes are TOML's basic-string escapes
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(type(v))


def toml_doc(doc: dict) -> str:
    return "".join(f"{json.dumps(str(k))} = {toml_value(v)}\n" for k, v in doc.items())


BASE = {"name": "t", "model": "tiny-random-llama", "suites": ["persona"], "seeds": [0], "steps": 1,
        "train": {"batch_size": 2, "max_new_tokens": 4}, "eval": {"n_test": 2, "max_new_tokens": 4},
        "students": [{"name": "a"}]}


def _set(*path_and_value):
    """A change to the base document: _set("train", "lam", True) sets doc["train"]["lam"] = True."""
    *path, value = path_and_value

    def change(doc, tmp):
        node = doc
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value(tmp) if callable(value) else value
    return change


def _student(**entry):
    return _set("students", [{"name": "a"}, entry] if "name" in entry else [{"name": "a", **entry}])


def _jsonl(tmp: Path, rel: str) -> str:
    path = tmp / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"context": "c", "prompt": f"p{i}", "answer": "a"}) + "\n" for i in range(6)))
    return str(path)


@dataclass
class StudyCase:
    id: str
    change: Callable | None  # change(doc, tmp) on a copy of BASE
    expect: str
    setup: Callable | None = None  # setup(tmp) before the listing is taken
    text: str | None = None  # the file's bytes instead of a document
    cli: bool = False  # also run `python -m training study FILE` (exit 2, one line, nothing written)
    fast: float | None = None  # seconds the refusal may take


def _study_results_of(data: dict):
    def setup(tmp):
        folder = tmp / "results" / "t"
        folder.mkdir(parents=True)
        (folder / "study.json").write_text(json.dumps(data))
    return setup


STUDY_CASES = [
    # 1. names are identifiers, not paths: one rule for the study, students and suites
    StudyCase("student-absolute", _student(name="/tmp/ctxint-evil"), "cannot be used", cli=True),
    StudyCase("student-dotdot", _student(name="../../outside"), "cannot be used", cli=True),
    StudyCase("student-nested", _student(name="a/b"), "cannot be used"),
    StudyCase("student-backslash", _student(name="a\\b"), "cannot be used"),
    StudyCase("student-nul", _student(name="a\x00b"), "cannot be used"),
    StudyCase("student-300-chars", _student(name="x" * 300), "(300 characters)"),
    StudyCase("student-leading-dot", _student(name=".hidden"), "cannot be used"),
    StudyCase("student-leading-dash", _student(name="-rf"), "cannot be used"),
    StudyCase("student-space", _student(name="my student"), "cannot be used"),
    StudyCase("student-newline", _student(name="a\nb"), "cannot be used"),
    StudyCase("student-unicode", _student(name="stüdent"), "cannot be used"),
    StudyCase("student-dot", _student(name="reg_0.1"), "cannot be used"),
    StudyCase("student-base", _student(name="base"), "not one of base"),
    StudyCase("student-teacher", _student(name="teacher"), "cannot be used"),
    StudyCase("student-causal", _student(name="causal"), "cannot be used"),
    StudyCase("student-eval", _student(name="eval"), "cannot be used"),
    StudyCase("student-number", _student(name=5), "of type int"),
    StudyCase("student-list", _student(name=["a"]), "of type list"),
    StudyCase("student-empty", _student(name=""), "cannot be used"),
    StudyCase("students-same-but-case", _set("students", [{"name": "Reg"}, {"name": "reg"}]), "two students are named 'Reg' and 'reg'"),
    StudyCase("study-name-dotdot", _set("name", "../x"), "'name' '../x' is not a name", cli=True),
    StudyCase("study-name-absolute", _set("name", "/etc"), "is not a name"),
    StudyCase("study-name-empty", _set("name", ""), "is not a name"),
    StudyCase("study-name-nul", _set("name", "a\x00"), "is not a name"),
    StudyCase("study-name-long", _set("name", "n" * 65), "(65 characters)"),
    StudyCase("study-name-table", _set("name", {"a": 1}), "of type dict"),
    StudyCase("suite-stem-not-a-name", _set("suites", lambda tmp: [_jsonl(tmp, "in/my suite.jsonl")]), "rename the file"),
    StudyCase("suite-stem-dots", _set("suites", lambda tmp: [_jsonl(tmp, "in/a.b.jsonl")]), "rename the file"),
    StudyCase("suite-same-stem", _set("suites", lambda tmp: [_jsonl(tmp, "x/q.jsonl"), _jsonl(tmp, "y/q.jsonl")]),
              "would share the run folder 'q'", cli=True),
    StudyCase("suite-same-stem-case", _set("suites", lambda tmp: [_jsonl(tmp, "x/q.jsonl"), _jsonl(tmp, "y/Q.jsonl")]),
              "would share the run folder"),
    StudyCase("suite-shadows-builtin", _set("suites", lambda tmp: ["persona", _jsonl(tmp, "x/persona.jsonl")]),
              "would share the run folder 'persona'"),
    StudyCase("suite-shadows-builtin-alone", _set("suites", lambda tmp: [_jsonl(tmp, "x/Facts.jsonl")]), "would share the run folder"),
    StudyCase("suite-fifo", _set("suites", lambda tmp: [str(tmp / "in" / "f.jsonl")]), "unknown suite",
              setup=lambda tmp: ((tmp / "in").mkdir(), os.mkfifo(tmp / "in" / "f.jsonl")), fast=10),
    StudyCase("suite-folder", _set("suites", lambda tmp: [str(tmp / "in" / "d.jsonl")]), "unknown suite",
              setup=lambda tmp: (tmp / "in" / "d.jsonl").mkdir(parents=True)),
    StudyCase("suite-number", _set("suites", [3]), "suites[0] must be a suite name or a table"),
    StudyCase("suite-table-nul", _set("suites", [{"suite": "pers\x00ona"}]), "holds a NUL"),
    StudyCase("suite-nul", _set("suites", ["pers\x00ona"]), "holds a NUL"),
    # 2. numbers that are not numbers, and budgets beyond the model's window
    StudyCase("eval-max-new-tokens-nan", _set("eval", "max_new_tokens", math.nan), "eval: 'max_new_tokens' must be an integer (got nan)", cli=True),
    StudyCase("eval-max-new-tokens-inf", _set("eval", "max_new_tokens", math.inf), "must be an integer (got inf)"),
    StudyCase("eval-max-new-tokens-2.5", _set("eval", "max_new_tokens", 2.5), "must be an integer (got 2.5)"),
    StudyCase("eval-max-new-tokens-window", _set("eval", "max_new_tokens", 10**6), "does not fit the model's window of 2048"),
    StudyCase("eval-max-new-tokens-negative", _set("eval", "max_new_tokens", -3), "--max-new-tokens must be at least 1"),
    StudyCase("train-max-new-tokens-window", _set("train", "max_new_tokens", 2048), "does not fit the model's window"),
    StudyCase("train-max-new-tokens-2.5", _set("train", "max_new_tokens", 2.5), "'max_new_tokens' must be an integer"),
    StudyCase("train-batch-size-1.5", _set("train", "batch_size", 1.5), "train: 'batch_size' must be an integer (got 1.5)"),
    StudyCase("train-checkpoint-every-0.5", _set("train", "checkpoint_every", 0.5), "'checkpoint_every' must be an integer"),
    StudyCase("train-lr-inf", _set("train", "lr", math.inf), "'lr' must be a finite number"),
    StudyCase("train-lr-nan", _set("train", "lr", math.nan), "'lr' must be a finite number"),
    StudyCase("train-lr-string", _set("train", "lr", "1e-4"), "'lr' must be a number"),
    StudyCase("train-nested-list", _set("train", "lam", [[1.0]]), "'lam' must be a number (got a list"),
    StudyCase("train-top-k-1.5", _set("train", "top_k", 1.5), "'top_k' must be an integer"),
    StudyCase("train-chunk-huge", _set("train", "chunk", 2**62), "out of range"),
    StudyCase("train-temperature-text", _set("train", "temperature", "hot"), "'temperature' must be a number"),
    StudyCase("train-table", _set("train", [1, 2]), "train must be a table"),
    StudyCase("student-lora-r-2.5", _student(lora_r=2.5), "students[0] (a): 'lora_r' must be an integer (got 2.5)"),
    StudyCase("student-lam-true", _student(lam=True), "'lam' must be a number (got True)"),
    StudyCase("student-lam-nan", _student(lam=math.nan), "'lam' must be a finite number"),
    StudyCase("student-grid-setting", _student(out="/tmp/x"), "unknown setting 'out'"),
    StudyCase("student-seed-setting", _student(seed=3), "unknown setting 'seed'"),
    StudyCase("eval-n-test-2.5", _set("eval", "n_test", 2.5), "eval: 'n_test' must be an integer"),
    StudyCase("eval-n-test-0", _set("eval", "n_test", 0), "--n-test must be at least 1"),
    StudyCase("eval-n-0", _set("eval", "n", 0), "--n must be at least 1"),
    StudyCase("eval-bootstrap-seed-float", _set("eval", "bootstrap_seed", 0.5), "'bootstrap_seed' must be an integer"),
    StudyCase("seed-2-63", _set("seeds", [2**63 - 1]), "'seeds[0]' is out of range"),
    StudyCase("seed-2-40", _set("seeds", [2**40]), "seeds: 1099511627776 is out of range"),
    StudyCase("seed-negative", _set("seeds", [-1]), "is out of range; seeds are 0..4294967295"),
    StudyCase("seed-float", _set("seeds", [0.5]), "'seeds[0]' must be an integer"),
    StudyCase("seed-nested", _set("seeds", [[0]]), "'seeds[0]' must be an integer"),
    StudyCase("seed-bool", _set("seeds", [True]), "'seeds[0]' must be an integer"),
    StudyCase("seeds-not-a-list", _set("seeds", 0), "'seeds' must be a list"),
    StudyCase("steps-true", _set("steps", True), "'steps' must be an integer (got True)"),
    StudyCase("steps-text", _set("steps", "3"), "'steps' must be an integer"),
    StudyCase("steps-2.0", _set("steps", 2.0), "'steps' must be an integer"),
    StudyCase("steps-0", _set("steps", 0), "--steps must be at least 1"),
    StudyCase("model-number", _set("model", 5), "'model' must be a string"),
    StudyCase("model-empty", _set("model", " "), "'model' must be a model spec"),
    StudyCase("runs-dir-number", _set("runs_dir", 5), "'runs_dir' must be a string"),
    StudyCase("runs-dir-nul", _set("runs_dir", "r\x00"), "holds a NUL"),
    # 3. strings are not booleans
    StudyCase("train-gradient-checkpointing-no", _set("train", "gradient_checkpointing", "no"),
              "'gradient_checkpointing' must be true or false (got 'no')", cli=True),
    StudyCase("train-gradient-checkpointing-0", _set("train", "gradient_checkpointing", 0), "must be true or false (got 0)"),
    StudyCase("student-gradient-checkpointing-yes", _student(gradient_checkpointing="yes"), "must be true or false"),
    StudyCase("eval-allow-degenerate-no", _set("eval", "allow_degenerate", "no"), "'allow_degenerate' must be true or false (got 'no')"),
    StudyCase("eval-counterfactual-false-string", _set("eval", "counterfactual", "false"), "must be true or false"),
    StudyCase("eval-drift-1", _set("eval", "drift", 1), "'drift' must be true or false (got 1)"),
    # 4. duplicates
    StudyCase("seeds-twice", _set("seeds", [0, 0]), "'seeds' lists 0 twice", cli=True),
    StudyCase("suites-twice", _set("suites", ["persona", "facts", "persona"]), "'suites' lists 'persona' twice"),
    StudyCase("suite-file-twice", _set("suites", lambda tmp: [_jsonl(tmp, "x/q.jsonl")] * 2), "twice"),
    StudyCase("student-seeds-twice", _student(seeds=[0, 0]), "'seeds' lists 0 twice"),
    StudyCase("student-seeds-empty", _student(seeds=[]), "'seeds' must be a non-empty list"),
    StudyCase("student-seeds-other", _student(seeds=[7]), "must be a subset of the study's seeds"),
    StudyCase("students-twice", _set("students", [{"name": "a"}, {"name": "a"}]), "two students are named 'a'"),
    StudyCase("million-duplicate-seeds", None, "'seeds' has 1000000 entries, more than 1000", fast=20, cli=True,
              text=toml_doc({**BASE, "seeds": [0] * 1_000_000})),
    StudyCase("thousand-duplicate-seeds", None, "'seeds' lists 0 twice", fast=5, text=toml_doc({**BASE, "seeds": [0] * 1000})),
    StudyCase("million-seeds", None, "more than 1000", fast=20, text=toml_doc({**BASE, "seeds": list(range(1_000_000))})),
    StudyCase("too-many-cells", None, "20000 cells (suites × seeds × students) are more than 10000", fast=20,
              text=toml_doc({**BASE, "seeds": list(range(100)), "students": [{"name": f"s{i}"} for i in range(200)]})),
    # the study's folders, checked before anything trains
    StudyCase("results-dir-a-file", None, "--results-dir", cli=True, setup=lambda tmp: (tmp / "results").write_text("x")),
    StudyCase("results-dir-under-a-file", _set("results_dir", lambda tmp: str(tmp / "f" / "deeper")), "is a file, not a folder",
              setup=lambda tmp: (tmp / "f").write_text("x")),
    StudyCase("results-folder-symlink", None, "is a symbolic link", setup=lambda tmp: ((tmp / "elsewhere").mkdir(),
              (tmp / "results").mkdir(), (tmp / "results" / "t").symlink_to(tmp / "elsewhere"))),
    StudyCase("runs-folder-symlink", None, "--runs-dir", setup=lambda tmp: ((tmp / "elsewhere").mkdir(),
              (tmp / "runs").mkdir(), (tmp / "runs" / "t").symlink_to(tmp / "elsewhere"))),
    StudyCase("runs-dir-a-file", None, "--runs-dir", setup=lambda tmp: (tmp / "runs").write_text("x")),
    StudyCase("results-of-another-model", None, "holds the results of another study",
              setup=_study_results_of({"name": "t", "model": "smollm2-135m-instruct", "summary": [], "cells": []})),
    StudyCase("results-of-another-study-same-name", None, "holds the results of another study of the same name",
              setup=_study_results_of({"name": "t", "model": "tiny-random-llama", "train": {"batch_size": 4},
                                       "summary": [], "cells": []})),
    StudyCase("results-other-student-settings", None, "student 'a' has other settings",
              setup=_study_results_of({"name": "t", "model": "tiny-random-llama", "train": {"batch_size": 2, "max_new_tokens": 4},
                                       "n_test": 2, "students": [{"name": "a", "settings": {"lam": 1.0}}], "summary": [], "cells": []})),
    StudyCase("results-study-json-fifo", None, "not a regular file", fast=10,
              setup=lambda tmp: ((tmp / "results" / "t").mkdir(parents=True), os.mkfifo(tmp / "results" / "t" / "study.json"))),
    # the file itself
    StudyCase("file-fifo", None, "not a regular file", fast=10, setup=lambda tmp: os.mkfifo(tmp / "s.toml")),
    StudyCase("file-folder", None, "is a folder", setup=lambda tmp: (tmp / "s.toml").mkdir()),
    StudyCase("file-binary", None, "is binary", text="name = 't'\x00"),
    StudyCase("file-deep-arrays", None, "not valid TOML", text="seeds = " + "[" * 100_000),
    StudyCase("file-unknown-key", None, "unknown key", text=toml_doc({**BASE, "x" * 5000: 1})),
    StudyCase("file-students-not-tables", _set("students", [1]), "students[0] must be a table"),
]


def _study_paths(tmp: Path) -> tuple[Path, Path, Path]:
    return tmp / "s.toml", tmp / "runs", tmp / "results"


def _prepare_study(case: StudyCase, tmp: Path) -> Path:
    path, _, _ = _study_paths(tmp)
    if case.setup:
        case.setup(tmp)
    if not path.exists() and not path.is_symlink():
        if case.text is not None:
            path.write_text(case.text)
        else:
            doc = copy.deepcopy(BASE)
            if case.change:
                case.change(doc, tmp)
            path.write_text(toml_doc(doc))
    return path


def test_the_study_table_is_large_enough():
    assert len(STUDY_CASES) >= 100 and len({c.id for c in STUDY_CASES}) == len(STUDY_CASES)


@pytest.mark.parametrize("case", STUDY_CASES, ids=lambda c: c.id)
def test_hostile_study_file(case: StudyCase, tmp_path, monkeypatch):
    from training.study import check_cells, check_results, load_study

    monkeypatch.chdir(tmp_path)
    path = _prepare_study(case, tmp_path)
    _, runs, results = _study_paths(tmp_path)
    before = _listing(tmp_path)
    # `fast` bounds the reader's own work (CPU seconds of this process: a million seeds must not cost a quadratic
    # check), not the wall clock, which other load on the machine stretches; a reader that blocks is the alarm's.
    t0 = time.process_time()
    with _alarm(60), pytest.raises(UserError) as info:
        try:
            study = load_study(path, str(runs))
        except UserError as err:
            assert str(path) in str(err), err  # the file's mistakes name the file
            raise
        check_results(study)
        check_cells(study)
    message = str(info.value)
    assert case.expect in message and "\n" not in message, message
    if case.fast:
        assert time.process_time() - t0 < case.fast
    assert _listing(tmp_path) == before


@pytest.mark.parametrize("case", [c for c in STUDY_CASES if c.cli], ids=lambda c: c.id)
def test_hostile_study_file_cli(case: StudyCase, tmp_path):
    path = _prepare_study(case, tmp_path)
    _, runs, results = _study_paths(tmp_path)
    before = _listing(tmp_path)
    result = subprocess.run([sys.executable, "-m", "training", "study", str(path), "--runs-dir", str(runs)],
                            cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    err = result.stderr.strip()
    assert "Traceback" not in result.stderr + result.stdout, err[-3000:]
    assert result.returncode == 2 and len(err.splitlines()) == 1 and case.expect in err, err[-2000:]
    assert _listing(tmp_path) == before
    assert not Path("/tmp/ctxint-evil").exists()


class _alarm:
    """Fail a call that blocks (a reader opening a FIFO) instead of hanging the test run."""

    def __init__(self, seconds: int):
        self.seconds = seconds

    def __enter__(self):
        def fire(signum, frame):
            raise TimeoutError(f"blocked for {self.seconds} s")
        self.previous = signal.signal(signal.SIGALRM, fire)
        signal.alarm(self.seconds)

    def __exit__(self, *exc):
        signal.alarm(0)
        signal.signal(signal.SIGALRM, self.previous)
        return False


# --- the study reader on generated TOML documents --------------------------------------------------------------------

_NAMES = st.sampled_from(["a", "reg", "unreg", "Reg", "s-1", "s_2", "../x", "/abs", "a/b", "", ".h", "base", "causal",
                          "x" * 65, "é", "a\x00b", "-x", "a b", "a.b"]) | st.text(max_size=6)
_INTS = st.sampled_from([0, 1, 2, 3, -1, 2**31, 2**53 + 1, 2**63 - 1]) | st.integers(min_value=-(2**63), max_value=2**63 - 1)
_FLOATS = st.sampled_from([0.0, 0.5, 1.0, 2.5, math.nan, math.inf, -math.inf, 1e-4]) | st.floats()
_SCALARS = _INTS | _FLOATS | st.booleans() | st.sampled_from(["no", "yes", "true", "0", "persona", "all-linear"]) | st.text(max_size=5)
_VALUES = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=3), max_leaves=4)


def _settings_strategy(keys):
    return st.dictionaries(st.sampled_from(keys), _VALUES, max_size=3)


def _train_keys():
    from training.config import TrainConfig

    return sorted(f.name for f in fields(TrainConfig)) + ["wings"]


def _eval_keys():
    from training.evaluate import EvalSettings

    return sorted(f.name for f in fields(EvalSettings)) + ["n_test", "colour"]


_VALID_TRAIN = {"batch_size": st.integers(1, 4), "lam": st.floats(0, 2), "gradient_checkpointing": st.booleans(),
                "max_new_tokens": st.integers(1, 64), "lr": st.floats(1e-5, 1e-2), "top_k": st.integers(1, 50),
                "anchor": st.sampled_from(["student", "ema", "teacher"]), "checkpoint_every": st.integers(0, 5)}
_VALID_EVAL = {"n_test": st.integers(1, 8), "max_new_tokens": st.integers(1, 64), "allow_degenerate": st.booleans(),
               "counterfactual": st.booleans(), "n": st.integers(1, 8)}


def _valid_table(spec):
    return st.lists(st.sampled_from(sorted(spec)), unique=True, max_size=3).flatmap(
        lambda keys: st.fixed_dictionaries({k: spec[k] for k in keys}))


@st.composite
def _documents(draw):
    """A valid study document, then up to three hostile changes anywhere in it (so that both the refusals and the
    studies that load are exercised)."""
    seeds = draw(st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=3, unique=True))
    names = draw(st.lists(st.sampled_from(["a", "b", "reg", "unreg", "s-1", "S_2"]), min_size=1, max_size=3, unique=True))
    students = []
    for name in names:
        entry = {"name": name, **draw(_valid_table(_VALID_TRAIN))}
        if draw(st.booleans()):
            entry["seeds"] = draw(st.lists(st.sampled_from(seeds), min_size=1, max_size=len(seeds), unique=True))
        students.append(entry)
    doc = {"name": draw(st.sampled_from(["t", "study-1", "S_2"])), "model": "tiny-random-llama",
           "suites": draw(st.lists(st.sampled_from(["persona", "facts"]), min_size=1, max_size=2, unique=True)),
           "seeds": seeds, "steps": draw(st.integers(1, 5)), "train": draw(_valid_table(_VALID_TRAIN)),
           "eval": draw(_valid_table(_VALID_EVAL)), "students": students}
    for _ in range(draw(st.integers(0, 3))):
        where = draw(st.sampled_from(["name", "model", "steps", "suites", "seeds", "train", "eval", "student", "student-name",
                                      "student-seeds", "runs_dir"]))
        hostile = draw(_VALUES)
        if where in ("name", "model", "steps", "runs_dir"):
            doc[where] = draw(_NAMES) if where == "name" else hostile
        elif where in ("suites", "seeds"):
            doc[where] = doc[where] + [draw(st.sampled_from(doc[where]) | _VALUES)]
        elif where in ("train", "eval"):
            keys = _train_keys() if where == "train" else _eval_keys()
            doc[where][draw(st.sampled_from(keys))] = hostile
        else:
            entry = draw(st.sampled_from(doc["students"]))
            if where == "student-name":
                entry["name"] = draw(_NAMES)
            elif where == "student-seeds":
                entry["seeds"] = draw(st.lists(_INTS | st.sampled_from(seeds), max_size=3))
            else:
                entry[draw(st.sampled_from(_train_keys()))] = hostile
    return doc


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=_documents())
def test_study_reader_on_generated_documents(doc):
    """Whatever the document, load_study either refuses it in one line naming the file, or returns a study whose
    every cell is a TrainConfig of the declared types, inside the runs folder, within the model's window."""
    import typing

    from interp.core.models import model_window
    from interp.core.runs import RESERVED_NAMES
    from interp.core.store import NAME_PATTERN
    from interp.core.typed import check_value
    from training.config import MAX_SEED, TrainConfig
    from training.study import load_study

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.toml"
        path.write_text(toml_doc(doc))
        before = _listing(Path(tmp))
        try:
            with _alarm(60):
                study = load_study(path)
        except UserError as err:
            assert "\n" not in str(err) and str(path) in str(err), str(err)
            assert _listing(Path(tmp)) == before
            return
        assert NAME_PATTERN.fullmatch(study.name)
        names = [s.name for s in study.students]
        assert all(NAME_PATTERN.fullmatch(n) and n not in RESERVED_NAMES for n in names)
        assert len({n.lower() for n in names}) == len(names)
        assert len(set(study.seeds)) == len(study.seeds) and all(type(s) is int and 0 <= s <= MAX_SEED for s in study.seeds)
        assert len(set(study.suites)) == len(study.suites)
        hints = typing.get_type_hints(TrainConfig)
        window = model_window(study.model)
        runs = Path(os.path.abspath(study.runs_dir))
        for cell in study.cells():
            cfg = cell.config()
            for f in fields(TrainConfig):
                value = getattr(cfg, f.name)
                assert check_value(value, hints[f.name], f.name) == value or value != value
            assert Path(os.path.abspath(cell.out)).parent.parent.parent.parent == runs
            assert window is None or cfg.max_new_tokens < window
            assert study.allow_longer_eval or cfg.max_new_tokens >= study.eval.max_new_tokens  # every judged token trained
        assert window is None or study.eval.max_new_tokens < window
        for s in study.students:
            assert s.seeds is None or (len(set(s.seeds)) == len(s.seeds) and set(s.seeds) <= set(study.seeds))


# --- readers and commands: pickles, FIFOs, damaged records -----------------------------------------------------------


@dataclass
class Case:
    id: str
    cmd: list[str] | None  # python -m <cmd[0]> <cmd[1:]>, with {tmp} replaced
    expect: str
    setup: Callable | None = None  # setup(tmp, made)
    call: Callable | None = None  # call(tmp) must raise UserError
    hangs: bool = False  # a FIFO: the call must not block


def _run(change=None):
    def setup(tmp, _made):
        shutil.copytree(_made / "run", tmp / "run")
        if change:
            change(tmp / "run")
    return setup


def _pickled_adapter(folder: Path) -> None:
    (folder / "adapter_model.safetensors").unlink()
    (folder / "adapter_model.bin").write_bytes(PICKLE)


def _adapter(change):
    def setup(tmp, _made):
        folder = tmp / "in" / "adapter"
        shutil.copytree(_made / "run" / "s", folder, ignore=shutil.ignore_patterns("checkpoints", "metrics.jsonl", "train_config.json"))
        change(folder)
    return setup


def _edit_json(rel: str, fn):
    def change(run):
        path = run / rel
        path.write_text(json.dumps(fn(json.loads(path.read_text()))))
    return change


def _fifo(rel: str):
    def change(run):
        path = run / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            path.unlink()
        os.mkfifo(path)
    return change


def _write(rel: str, data):
    def change(run):
        path = run / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return change


def _row(**fields) -> dict:
    row = {"model": "s", "example": 0, "context": "c", "prompt": "p", "reference": "r", "verifier": "contains",
           "response_noctx": "a", "response_ctx": "b", "ids_noctx": [1], "ids_ctx": [2], "correct_noctx": True,
           "correct_ctx": False, "degenerate_noctx": False, "degenerate_ctx": False, "truncated_noctx": False,
           "truncated_ctx": False}
    return {**row, **fields}


def _examples(*rows):
    return _write("eval_examples.jsonl", "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def _study_json(summary):
    def setup(tmp, _made):
        folder = tmp / "res" / "x"
        folder.mkdir(parents=True)
        (folder / "study.json").write_text(json.dumps({"name": "x", "model": "tiny-random-llama", "cells": [], "summary": summary}))
    return setup


def _layers(change):
    def setup(tmp, _made):
        from interp.divergence import save_divergence
        from interp.views.synthetic import synthetic_divergence

        change(save_divergence(synthetic_divergence(), tmp / "in" / "layers"))
    return setup


def _read_examples(tmp):
    from interp.core.runs import read_examples

    return read_examples(tmp / "run")


def _load_adapter(tmp):
    from interp import load_model

    return load_model("tiny-random-llama", adapter=tmp / "in" / "adapter", device="cpu")


def _comparison(change):
    """A run-less causal folder holding a small comparison, then damaged by `change(folder)`."""
    def setup(tmp, _made):
        import numpy as np

        from interp.causal.artifacts import save_comparison
        from interp.causal.results import Comparison

        a = np.zeros(3)
        cmp = Comparison(student="s", pairs={"removability": {m: a for m in ("cos", "cka", "cka_debiased", "lens_kl")}},
                         v=np.ones((3, 4)), u=np.ones((3, 4)), w=np.ones((3, 4)), v_norm=a, cos_uv=a, absorbed=a,
                         overshoot=a, absorbed_examples=np.zeros((1, 3)), overshoot_examples=np.zeros((1, 3)),
                         example_tokens=np.ones(1))
        save_comparison(cmp, tmp / "in" / "cmp")
        change(tmp / "in" / "cmp")
    return setup


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _api(module: str, name: str, *args):
    def call(tmp):
        import importlib

        fn = getattr(importlib.import_module(module), name)
        return fn(*[a(tmp) if callable(a) else a for a in args])
    return call


RUN = "{tmp}/run"
READER_CASES = [
    # 5. no user file is unpickled
    Case("analyze-adapter-pickle", ["interp", "analyze", *TINY, *PAIR, "--adapter", "{tmp}/in/adapter"],
         "unpickling a file can run code", setup=_adapter(_pickled_adapter)),
    Case("api-adapter-pickle", None, "adapter_model.bin, a pickle", setup=_adapter(_pickled_adapter), call=_load_adapter),
    Case("api-adapter-pytorch-model-bin", None, "pytorch_model.bin, a pickle", call=_load_adapter,
         setup=_adapter(lambda f: ((f / "adapter_model.safetensors").unlink(), (f / "pytorch_model.bin").write_bytes(PICKLE)))),
    Case("api-adapter-no-weights", None, "has no adapter_model.safetensors", call=_load_adapter,
         setup=_adapter(lambda f: (f / "adapter_model.safetensors").unlink())),
    Case("api-adapter-weights-fifo", None, "are not a regular file", call=_load_adapter, hangs=True,
         setup=_adapter(lambda f: ((f / "adapter_model.safetensors").unlink(), os.mkfifo(f / "adapter_model.safetensors")))),
    Case("api-adapter-weights-folder", None, "are not a regular file", call=_load_adapter,
         setup=_adapter(lambda f: ((f / "adapter_model.safetensors").unlink(), (f / "adapter_model.safetensors").mkdir()))),
    Case("api-adapter-r-nan", None, "'r' must be a positive integer", call=_load_adapter,
         setup=_adapter(lambda f: (f / "adapter_config.json").write_text(
             (f / "adapter_config.json").read_text().replace('"r": 16', '"r": NaN')))),
    Case("api-adapter-r-float", None, "'r' must be a positive integer", call=_load_adapter,
         setup=_adapter(_edit_json("adapter_config.json", lambda c: {**c, "r": 2.5}))),
    Case("api-adapter-alpha-inf", None, "'lora_alpha' must be a finite number", call=_load_adapter,
         setup=_adapter(_edit_json("adapter_config.json", lambda c: {**c, "lora_alpha": 1e999}))),
    Case("compare-student-pickle", ["interp", "compare", RUN, "--student", "s"], "unpickling a file can run code",
         setup=_run(lambda run: _pickled_adapter(run / "s"))),
    # 6. readers that would hang: FIFOs and devices
    Case("report-eval-json-fifo", ["interp", "report", RUN, "--out", "{tmp}/rep"], "not a regular file",
         setup=_run(_fifo("eval.json")), hangs=True),
    Case("report-metrics-fifo", ["interp", "report", RUN, "--out", "{tmp}/rep"], "not a regular file",
         setup=_run(_fifo("s/metrics.jsonl")), hangs=True),
    Case("api-run-json-fifo", None, "not a regular file", setup=_run(_fifo("run.json")), hangs=True,
         call=lambda tmp: _raise_summary_error(tmp / "run")),
    Case("api-examples-fifo", None, "not a regular file", setup=_run(_fifo("eval_examples.jsonl")), hangs=True, call=_read_examples),
    Case("api-model-eval-fifo", None, "not a regular file", setup=_run(_fifo("eval/s.json")), hangs=True,
         call=_api("interp.core.runs", "read_model_eval", lambda tmp: tmp / "run", "s")),
    Case("api-train-config-fifo", None, "not a regular file", setup=_run(_fifo("s/train_config.json")), hangs=True,
         call=_api("interp.core.runs", "run_settings", lambda tmp: tmp / "run")),
    Case("api-read-json-device", None, "not a regular file", call=_api("interp.core.store", "read_json", "/dev/zero")),
    Case("api-read-text-device", None, "is not a regular file", call=_api("interp.core.store", "read_text_file", "/dev/zero")),
    Case("api-vectors-fifo", None, "not a regular file", setup=_comparison(_fifo("vectors.safetensors")), hangs=True,
         call=_api("interp.causal.artifacts", "load_comparison", lambda tmp: tmp / "in" / "cmp")),
    Case("app-study-json-fifo", None, "not a regular file", setup=lambda tmp, _made: ((tmp / "res" / "x").mkdir(parents=True),
                                                                                     os.mkfifo(tmp / "res" / "x" / "study.json")),
         hangs=True, call=_api("interp.core.studies", "read_study", lambda tmp: tmp / "res" / "x")),
    # 3. (records) strings are not booleans, ids are of one type
    Case("examples-degenerate-no", None, "'degenerate_ctx' must be true or false (got 'no')",
         setup=_run(_examples(_row(degenerate_ctx="no"))), call=_read_examples),
    Case("examples-correct-1", None, "'correct_ctx' must be true or false (got 1)",
         setup=_run(_examples(_row(correct_ctx=1))), call=_read_examples),
    Case("examples-mixed-ids", None, "'example' must be an integer (got '1')",
         setup=_run(_examples(_row(example=0), _row(example="1"))), call=_read_examples),
    Case("examples-id-float", None, "'example' must be an integer (got 1.5)", setup=_run(_examples(_row(example=1.5))), call=_read_examples),
    Case("examples-ids-floats", None, "'ids_ctx[0]' must be an integer", setup=_run(_examples(_row(ids_ctx=[1.0]))), call=_read_examples),
    Case("examples-ids-negative", None, "'ids_ctx' must be a list of token ids", setup=_run(_examples(_row(ids_ctx=[-1]))), call=_read_examples),
    Case("examples-prompt-number", None, "'prompt' must be a string", setup=_run(_examples(_row(prompt=3))), call=_read_examples),
    # 7. tracebacks that are now one line
    Case("examples-a-folder", None, "is a folder", setup=_run(lambda run: (run / "eval_examples.jsonl").mkdir()), call=_read_examples),
    Case("examples-deeply-nested", None, "nested too deeply",
         setup=_run(_examples("[" * 100_000 + "]" * 100_000)), call=_read_examples),
    Case("examples-array-line", None, "expected a JSON object", setup=_run(_examples("[1, 2]")), call=_read_examples),
    Case("examples-not-utf8", None, "not UTF-8", setup=_run(_write("eval_examples.jsonl", b"\xff\xfe{}\n")), call=_read_examples),
    Case("compare-out-a-file", ["interp", "compare", RUN, "--student", "s", "--out", "{tmp}/in/file"], "is a file; give a folder path",
         setup=lambda tmp, _made: (_run()(tmp, _made), (tmp / "in").mkdir(), (tmp / "in" / "file").write_text("x"))),
    Case("compare-out-under-proc", ["interp", "compare", RUN, "--student", "s", "--out", "/proc/ctxint-never/x"], "cannot be written",
         setup=_run()),
    Case("compare-batch-size-0", ["interp", "compare", RUN, "--student", "s", "--batch-size", "0"], "--batch-size must be at least 1",
         setup=_run()),
    Case("steer-batch-size-0", ["interp", "steer", RUN, "--student", "s", "--batch-size", "0"], "--batch-size must be at least 1",
         setup=_run()),
    Case("steer-max-new-tokens-window", ["interp", "steer", RUN, "--student", "s", "--max-new-tokens", "100000"],
         "does not fit the model's window", setup=_run()),
    Case("patch-batch-size-0", ["interp", "patch", RUN, "--student", "s", "--batch-size", "0"], "--batch-size must be at least 1",
         setup=_run()),
    Case("api-vectors-truncated", None, "vectors.safetensors is damaged", setup=_comparison(lambda f: _truncate(f / "vectors.safetensors")),
         call=_api("interp.causal.artifacts", "load_comparison", lambda tmp: tmp / "in" / "cmp")),
    Case("api-comparison-fields-missing", None, "comparison.json is damaged",
         setup=_comparison(lambda f: _edit_json("comparison.json", lambda d: {k: v for k, v in d.items() if k != "pairs"})(f)),
         call=_api("interp.causal.artifacts", "load_comparison", lambda tmp: tmp / "in" / "cmp")),
    Case("api-steer-fields-missing", None, "is damaged",
         setup=lambda tmp, _made: _write("s.json", json.dumps({"kind": "steer", "schema_version": 1}))(tmp),
         call=_api("interp.causal.artifacts", "load_steer", lambda tmp: tmp / "s.json")),
    Case("report-metrics-not-utf8", ["interp", "report", RUN, "--out", "{tmp}/rep"], "not UTF-8",
         setup=_run(_write("s/metrics.jsonl", b'{"step": 1}\n\xff\xfe\n'))),
    Case("report-metrics-arrays", ["interp", "report", RUN, "--out", "{tmp}/rep"], "expected a JSON object",
         setup=_run(_write("s/metrics.jsonl", "[1, 2]\n[3]\n"))),
    Case("report-study-strings", ["interp", "report", "{tmp}/res/x", "--out", "{tmp}/rep"], "'acc_ctx' whose mean or sd is not a number",
         setup=_study_json([{"suite": "persona", "student": "a", "lam": 0.0, "seeds": [0], "acc_ctx": {"mean": "high", "sd": None}}])),
    Case("api-study-lam-string", None, "'lam' that is not a number",
         setup=_study_json([{"suite": "persona", "student": "a", "lam": "zero", "seeds": [0]}]),
         call=_api("interp.core.studies", "read_study", lambda tmp: tmp / "res" / "x")),
    Case("api-study-row-list", None, "summary[0] is not an object", setup=_study_json([[1]]),
         call=_api("interp.core.studies", "read_study", lambda tmp: tmp / "res" / "x")),
    Case("train-out-a-file", ["training", "train", *SMALL_TRAIN, "--out", "{tmp}/in/file"], "is a file; give a folder path",
         setup=lambda tmp, _made: ((tmp / "in").mkdir(), (tmp / "in" / "file").write_text("x"))),
    Case("train-out-under-a-file", ["training", "train", *SMALL_TRAIN, "--out", "{tmp}/in/file/s"], "is a file, not a folder",
         setup=lambda tmp, _made: ((tmp / "in").mkdir(), (tmp / "in" / "file").write_text("x"))),
    Case("train-out-symlink", ["training", "train", *SMALL_TRAIN, "--overwrite", "--out", "{tmp}/r/s"], "is a symbolic link",
         setup=lambda tmp, _made: ((tmp / "r").mkdir(), (tmp / "elsewhere").mkdir(), (tmp / "elsewhere" / "keep").write_text("x"),
                                  (tmp / "r" / "s").symlink_to(tmp / "elsewhere"))),
    Case("train-out-student-dotdot", ["training", "train", *SMALL_TRAIN, "--out", "{tmp}/r/.."], "cannot be used"),
    Case("train-out-student-space", ["training", "train", *SMALL_TRAIN, "--out", "{tmp}/r/my student"], "cannot be used"),
    Case("train-seed-huge", ["training", "train", *SMALL_TRAIN, "--seed", str(2**63 - 1), "--out", "{tmp}/r/s"], "--seed must be in"),
    Case("train-max-new-tokens-window", ["training", "train", *SMALL_TRAIN, "--max-new-tokens", "4096", "--out", "{tmp}/r/s"],
         "does not fit the model's window of 2048"),
    Case("eval-max-new-tokens-window", ["training", "eval", RUN, "--max-new-tokens", "5000", "--no-layers"],
         "does not fit the model's window of 2048", setup=_run()),
    Case("pair-eval-new-tokens-window", ["training", "pair", *SMALL_TRAIN, "--eval-new-tokens", "4096", "--out", "{tmp}/p"],
         "does not fit the model's window"),
    Case("api-layers-arrays-fifo", None, "arrays.safetensors is not a regular file", hangs=True, setup=_layers(_fifo("arrays.safetensors")),
         call=_api("interp.divergence", "load_divergence", lambda tmp: tmp / "in" / "layers")),
    Case("api-safetensors-fifo", None, "not a regular file", hangs=True,
         setup=lambda tmp, _made: os.mkfifo(tmp / "w.safetensors"),
         call=_api("interp.core.adapters", "check_safetensors", lambda tmp: tmp / "w.safetensors")),
    Case("api-train-config-bool-string", None, "'gradient_checkpointing' must be true or false",
         call=lambda tmp: __import__("training.config").config.TrainConfig.from_json({"gradient_checkpointing": "no"}, "train_config.json")),
    Case("api-train-config-steps-float", None, "'steps' must be an integer",
         call=lambda tmp: __import__("training.config").config.TrainConfig.from_json({"steps": 2.5}, "train_config.json")),
    Case("api-name-rule", None, "is not a name", call=_api("interp.core.store", "check_name", "..")),
    Case("api-student-name-rule", None, "is not a valid student name", call=_api("interp.core.runs", "check_student_name", "a b")),
]


def _raise_summary_error(run: Path):
    """The app's run picker: a damaged run carries its error (the page renders) instead of blocking."""
    from interp.core.runs import summarize

    summary = summarize(run)
    if summary.error:
        raise UserError(summary.error)


def test_the_reader_table_is_large_enough():
    assert len(READER_CASES) >= 50 and len({c.id for c in READER_CASES}) == len(READER_CASES)


@pytest.mark.parametrize("case", READER_CASES, ids=lambda c: c.id)
def test_hostile_reader_input(case: Case, made, tmp_path):  # noqa: F811 - the fixture imported above
    tmp = tmp_path / "case"
    tmp.mkdir()
    if case.setup:
        case.setup(tmp, made)
    before = _listing(tmp)
    if case.call is not None:
        with _alarm(60), pytest.raises(UserError) as info:
            case.call(tmp)
        message = str(info.value)
        assert case.expect in message and "\n" not in message.strip(), message
    else:
        module, *args = case.cmd
        args = [a.replace("{tmp}", str(tmp)) for a in args]
        result = subprocess.run([sys.executable, "-m", module, *args], cwd=tmp, env=ENV, capture_output=True, text=True,
                                timeout=300)
        err = result.stderr.strip()
        assert "Traceback" not in result.stderr + result.stdout, err[-3000:]
        assert result.returncode == 2, (result.returncode, err[-2000:])
        assert len(err.splitlines()) == 1 and err.startswith("error: ") and case.expect in err, err
    assert _listing(tmp) == before


# --- strict JSON: NaN is null with its reason, shown as NaN, never as "undefined" ----------------------------------------


def _strict_loads(text: str):
    def refuse(token):
        raise ValueError(f"bare {token}")
    return json.loads(text, parse_constant=refuse)


def test_json_is_written_strict_and_read_back_with_its_nans(tmp_path):
    import numpy as np

    from interp.core.store import NONFINITE_KEY, atomic_write_json, read_json

    data = {"summary": [{"harm": {"mean": math.nan, "sd": None}, "x/y": [1.0, math.inf, np.float32("nan")]}],
            "arr": np.array([-math.inf, 2.0])}
    atomic_write_json(tmp_path / "d.json", data)
    written = _strict_loads((tmp_path / "d.json").read_text())  # what a strict reader (JSON.parse) accepts
    assert written["summary"][0]["harm"] == {"mean": None, "sd": None}
    assert written[NONFINITE_KEY] == {"/summary/0/harm/mean": "NaN", "/summary/0/x~1y/1": "Infinity",
                                      "/summary/0/x~1y/2": "NaN", "/arr/0": "-Infinity"}
    back = read_json(tmp_path / "d.json")
    assert math.isnan(back["summary"][0]["harm"]["mean"]) and back["summary"][0]["harm"]["sd"] is None
    assert back["summary"][0]["x/y"][1] == math.inf and back["arr"][0] == -math.inf and NONFINITE_KEY not in back
    for damaged in ({"/a": [1]}, {"/a/b/c": "NaN"}, {"/0": "NaN"}, [1], {"a": "Infinity"}, {"/a": "nan"}):
        (tmp_path / "x.json").write_text(json.dumps({"a": None, NONFINITE_KEY: damaged}))
        got = read_json(tmp_path / "x.json")  # a damaged key is left as it is, never a traceback
        assert got["a"] is None


def test_nan_is_shown_as_nan_and_undefined_as_a_dash():
    from interp.core.studies import format_stat
    from interp.views.tables import study_rows
    from training.study.results import _fmt, _mean_sd

    assert format_stat(None) == "–" and format_stat(math.nan) == "NaN" and format_stat(0.5, math.nan) == "0.50 ± NaN"
    assert _mean_sd({"mean": math.nan, "sd": None}) == "NaN" and _mean_sd({"mean": None, "sd": None}) == "–"
    assert _fmt(math.nan) == "nan" and _fmt(None) == ""
    rows = study_rows({"summary": [{"suite": "p", "student": "a", "lam": 0, "seeds": [0],
                                    "harm": {"mean": math.nan, "sd": None}, "acc_ctx": {"mean": None, "sd": None}}]})
    assert rows[0]["harm"] == "NaN" and rows[0]["acc_ctx"] == "–"


def test_report_writes_layer_divergence_json_strict(tmp_path):
    from interp.views.report import write_report
    from interp.views.synthetic import write_synthetic_run

    run = write_synthetic_run(tmp_path / "run")
    write_report([run], tmp_path / "rep", decode_tokens=False)
    _strict_loads((tmp_path / "rep" / "layer_divergence.json").read_text())


# --- races: causal results are written under the folder's lock ------------------------------------------------------


def test_two_writers_of_one_causal_folder_take_turns(tmp_path):
    from interp.core.store import FolderLocked

    _comparison(lambda f: None)(tmp_path, None)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom interp.core.store import folder_lock\n"
                               f"with folder_lock({str(tmp_path / 'in' / 'cmp')!r}):\n    print('held', flush=True)\n    time.sleep(60)\n"],
                              env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderLocked, match="is being written by process"):
            _save_again(tmp_path / "in" / "cmp")
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in (tmp_path / "in" / "cmp").iterdir()) == ["comparison.json", "vectors.safetensors"]


def _save_again(folder: Path) -> None:
    from interp.causal.artifacts import load_comparison, save_comparison

    save_comparison(load_comparison(folder), folder)


# --- a study killed with SIGKILL leaves no process behind -------------------------------------------------------------


def _session_processes(sid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields_ = stat.rsplit(")", 1)[1].split()
        if int(fields_[3]) == sid and fields_[0] != "Z":
            out.append(int(entry.name))
    return out


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux)")
def test_study_jobs_2_killed_leaves_no_process(tmp_path):
    doc = {**BASE, "seeds": [0, 1], "steps": 200, "allow_longer_eval": True,
           "train": {"batch_size": 1, "max_new_tokens": 2, "checkpoint_every": 0},
           "students": [{"name": "a"}, {"name": "b"}]}
    path = tmp_path / "s.toml"
    path.write_text(toml_doc(doc))
    study = subprocess.Popen([sys.executable, "-m", "training", "study", str(path), "--jobs", "2", "--runs-dir", str(tmp_path / "runs"),
                              "--results-dir", str(tmp_path / "results")], cwd=tmp_path, env=ENV, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sid = study.pid
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not list((tmp_path / "runs").rglob("metrics.jsonl")):
            assert study.poll() is None, "the study ended before it was killed"
            time.sleep(0.5)
        assert list((tmp_path / "runs").rglob("metrics.jsonl")), "no cell started training"
        assert len(_session_processes(sid)) >= 4  # the study, its manager, two cells (and the resource tracker)
        os.kill(study.pid, signal.SIGKILL)
        study.wait()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and _session_processes(sid):
            time.sleep(0.5)
        left = _session_processes(sid)
        names = [(p, Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ")[:120]) for p in left]
        assert not left, names
    finally:
        for pid in _session_processes(sid):  # only the processes this test started (its own session)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# --- the app: live-only mode fixes the results folder too; a damaged study is an error on the page ------------------


def test_live_only_app_fixes_the_results_folder(monkeypatch, tmp_path):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("LAYERS_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("LAYERS_RESULTS_DIR", str(tmp_path / "res"))
    monkeypatch.setenv("LAYERS_LIVE_RUNS_ONLY", "1")
    _study_json([{"suite": "persona", "student": "a", "lam": 0.0, "seeds": [0], "acc_ctx": {"mean": "high", "sd": None}}])(tmp_path, None)
    at = AppTest.from_file(str(ROOT / "apps" / "layers.py"), default_timeout=120).run()
    at.sidebar.radio(key="mode").set_value("Study").run()
    assert not at.exception, [e.value for e in at.exception]
    box = at.sidebar.text_input(key="results_dir")
    assert box.disabled
    assert any("could not be read" in e.value and "not a number" in e.value for e in at.error), [e.value for e in at.error]
    monkeypatch.delenv("LAYERS_LIVE_RUNS_ONLY")
    at = AppTest.from_file(str(ROOT / "apps" / "layers.py"), default_timeout=120).run()
    at.sidebar.radio(key="mode").set_value("Study").run()
    assert not at.sidebar.text_input(key="results_dir").disabled


def test_the_app_renders_beside_a_run_json_that_is_a_fifo(monkeypatch, tmp_path):
    from streamlit.testing.v1 import AppTest

    from interp.views.synthetic import write_synthetic_run

    write_synthetic_run(tmp_path / "runs" / "good")
    (tmp_path / "runs" / "evil").mkdir()
    os.mkfifo(tmp_path / "runs" / "evil" / "run.json")
    monkeypatch.setenv("LAYERS_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.delenv("LAYERS_LIVE_RUNS_ONLY", raising=False)
    at = AppTest.from_file(str(ROOT / "apps" / "layers.py"), default_timeout=120).run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("evil: damaged" in c.value for c in at.sidebar.caption), [c.value for c in at.sidebar.caption]


def test_a_second_study_on_the_same_results_is_refused_while_the_first_runs(tmp_path, monkeypatch):
    from interp.core.store import FolderLocked
    from training.study import load_study, run_study

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "s.toml"
    path.write_text(toml_doc(BASE))
    study = load_study(path, str(tmp_path / "runs"), str(tmp_path / "results"))
    holder = subprocess.Popen([sys.executable, "-c", "import time\nfrom interp.core.store import folder_lock\n"
                               f"with folder_lock({str(tmp_path / 'results' / 't')!r}):\n    print('held', flush=True)\n    time.sleep(60)\n"],
                              env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderLocked, match="another study writes these results"):
            run_study(study, progress=False)
    finally:
        holder.kill()
        holder.wait()
    assert not (tmp_path / "runs").exists()
