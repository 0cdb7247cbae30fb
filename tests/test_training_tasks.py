"""Verifiers on hand-written cases; suites split without overlap; user JSONL suites and their errors."""

import json

import pytest

from interp.core.errors import UserError
from training.tasks import SUITES, load_task
from interp.core.verifiers import verify


@pytest.mark.parametrize(
    "kind,response,reference,ok",
    [
        ("contains", "I'm Nova, made by Quibble Labs.", "Nova", True),
        ("contains", "i am NOVA", "nova", True),
        ("contains", "I am SmolLM.", "Nova", False),
        ("contains", "It is the ostrel.", "euro|ostrel", True),
        ("exact", "  Positive. ", "positive", True),
        ("exact", "Positive, clearly", "positive", False),
        ("first_word", "Positive", "positive", True),
        ("first_word", "**Negative**.", "negative", True),
        ("first_word", "negative, because it broke", "negative", True),
        ("first_word", "The review is negative.", "negative", False),
        ("first_word", "Positively great", "positive", False),
        ("first_word", "", "positive", False),
        ("regex", "The answer is 42.", r"\b42\b", True),
        ("regex", "The answer is 421.", r"\b42\b", False),
    ],
)
def test_verifiers(kind, response, reference, ok):
    assert verify(kind, response, reference) is ok


def test_unknown_verifier():
    with pytest.raises(UserError, match="unknown verifier"):
        verify("fuzzy", "a", "a")


@pytest.mark.parametrize("name", list(SUITES))
def test_splits_never_overlap(name):
    task = load_task(name, seed=3)
    train = {(e.context, e.prompt) for e in task.train}
    test = {(e.context, e.prompt) for e in task.test}
    assert train and test and not train & test
    assert len(train) == len(task.train) and len(test) == len(task.test)
    assert load_task(name, seed=3).test == task.test  # the seed fixes the split
    assert load_task(name, seed=4).test != task.test
    for e in task.test[:5]:
        assert e.check(e.reference.split("|")[0])  # the reference itself passes its verifier


def test_unknown_task():
    with pytest.raises(UserError, match="unknown task 'nope'.*persona"):
        load_task("nope")


def test_jsonl_suite(tmp_path):
    path = tmp_path / "suite.jsonl"
    lines = [{"context": "Always say hi.", "prompt": f"Question {i}?", "answer": "hi", "verifier": "contains"} for i in range(10)]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    task = load_task(str(path), seed=0, n_test=3)
    assert len(task.test) == 3 and len(task.train) == 7
    assert task.test[0].verifier == "contains"


@pytest.mark.parametrize(
    "bad,match",
    [
        ("{not json", "line 2: not valid JSON"),
        ('{"context": "c", "prompt": "p"}', "line 2: missing or empty field 'answer'"),
        ('{"context": "c", "prompt": "p", "answer": "a", "verifier": "fuzzy"}', "line 2: unknown verifier"),
        ('{"context": "c", "prompt": "p", "answer": "(", "verifier": "regex"}', "line 2: the regex"),
        ('["c", "p", "a"]', "line 2: expected a JSON object"),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path, bad, match):
    path = tmp_path / "suite.jsonl"
    path.write_text('{"context": "c", "prompt": "p0", "answer": "a"}\n' + bad + "\n")
    with pytest.raises(UserError, match=match):
        load_task(str(path))
