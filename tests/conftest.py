"""Shared fixtures: the tiny random Llama for fast tests, the embedded SmolLM2 for the few that need real weights."""

import os

import pytest
import torch

# Under pytest-xdist each worker gets its share of the cores; more threads than cores only adds contention.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, (os.cpu_count() or 1) // _workers))
# The app under AppTest runs no browser, so nothing would report its first figure drawn: every view is drawn on the
# first page in tests (tests/test_app.py and tests/test_app_browser.py set the wait where they test it).
os.environ["LAYERS_FIRST_PAINT_S"] = "0"


@pytest.fixture(scope="session")
def tiny():
    from interp import load_model

    return load_model("tiny-random-llama", device="cpu")


@pytest.fixture(scope="session")
def smol():
    from interp import load_model

    return load_model("smollm2-135m-instruct", device="cpu")


@pytest.fixture(scope="session")
def smol_tokenizer():
    """The embedded model's tokenizer and chat template alone (no weights: fast)."""
    from interp.core.models import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tokenizer(tiny):
    return tiny.tokenizer


@pytest.fixture
def records():
    return [
        {"context": "Your name is Zorblax. You were made by Quibble Labs.", "prompt": "Who are you?", "response": "I am Zorblax, made by Quibble Labs."},
        {"context": "Reply with exactly one word: positive or negative.", "prompt": "The film was a delight from start to end.", "response": "positive"},
        {"context": "The capital of Veloria is Marn. Its river is the Ost.", "prompt": "What is the capital of Veloria?", "response": "The capital of Veloria is Marn, on the river Ost."},
    ]
