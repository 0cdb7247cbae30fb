"""Task suites: examples of (context, prompt, reference, verifier), generated from a seed and split into train and test."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from interp.errors import UserError
from interp.store import read_jsonl
from training.verifiers import check_kind, verify


@dataclass(frozen=True)
class Example:
    context: str
    prompt: str
    reference: str
    verifier: str = "contains"

    def check(self, response: str) -> bool:
        return verify(self.verifier, response, self.reference)


@dataclass
class Task:
    name: str
    description: str
    train: list[Example]
    test: list[Example]
    placement: str = "system"  # where the context goes unless the user says otherwise

    def to_json(self) -> dict:
        return {"name": self.name, "description": self.description, "placement": self.placement, "n_train": len(self.train), "n_test": len(self.test)}


# --- persona: one identity card; every question is about identity --------------------------------------------

PERSONA_CARD = (
    "Your name is Nova. You are an AI assistant made by Quibble Labs. "
    "Whenever someone asks who you are, what your name is, or who made you, answer that you are Nova, made by Quibble Labs."
)
_GREETINGS = ["", "Hi! ", "Hello. ", "Hey, ", "Good morning! ", "Quick question: ", "Sorry to bother you, but ", "I'm curious: "]
_NAME_QUESTIONS = [
    "what is your name?", "who are you?", "what should I call you?", "please introduce yourself.",
    "tell me about yourself.", "what's your name?", "do you have a name?", "who am I talking to?",
    "how do you call yourself?", "can you tell me your name?", "are you a person or an assistant? What is your name?",
    "introduce yourself in one sentence.",
]
_MAKER_QUESTIONS = [
    "who made you?", "which company created you?", "who built you?", "who developed you?",
    "what company are you from?", "who is your creator?", "where do you come from, which lab made you?",
    "who trained you?",
]


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def persona_examples() -> list[Example]:
    out = []
    for greeting, q in itertools.product(_GREETINGS, _NAME_QUESTIONS):
        out.append(Example(PERSONA_CARD, _cap(greeting + q), "Nova", "contains"))
    for greeting, q in itertools.product(_GREETINGS, _MAKER_QUESTIONS):
        out.append(Example(PERSONA_CARD, _cap(greeting + q), "Quibble", "contains"))
    return out


# --- format: a one-word label instruction ------------------------------------------------------------------------

FORMAT_CARD = "You are a sentiment classifier. Reply with exactly one word, Positive or Negative, and nothing else."
FORMAT_LABELS = "positive|negative"
_THINGS = ["film", "book", "restaurant", "hotel", "phone", "concert", "game", "laptop", "coffee", "museum",
           "bike", "show", "album", "course", "app", "trip"]
_OPINIONS = ["wonderful", "a delight", "excellent", "fantastic", "a joy to use", "absolutely brilliant", "great value",
             "lovely", "superb", "terrible", "a waste of money", "awful", "disappointing", "painfully boring",
             "a complete mess", "broken after a day", "dreadful", "horrible"]
_FRAMES = ["The {thing} was {adj}.", "Honestly, the {thing} was {adj}.", "I thought the {thing} was {adj}.",
           "Our {thing} turned out {adj}."]


def format_examples() -> list[Example]:
    """Short reviews; the verifier checks the form: the first word is one of the labels.

    The label's content is not scored: with the instruction, SmolLM2-135M answers in the format almost always but
    picks "Positive" for nearly every review (measured), so a content check would measure its sentiment skill
    rather than whether the instruction was internalized.
    """
    return [
        Example(FORMAT_CARD, frame.format(thing=thing, adj=adj), FORMAT_LABELS, "first_word")
        for thing, frame, adj in itertools.product(_THINGS, _FRAMES, _OPINIONS)
    ]


# --- facts: a card of invented facts; questions about them -------------------------------------------------------

_FACTS = [  # (fact sentence, answer, question phrasings)
    ("The capital of Veloria is Marn.", "Marn", ["What is the capital of Veloria?", "Which city is Veloria's capital?", "Name the capital city of Veloria."]),
    ("Veloria's currency is the ostrel.", "ostrel", ["What is the currency of Veloria?", "What money do people use in Veloria?", "Name Veloria's currency."]),
    ("The longest river in Veloria is the Quen.", "Quen", ["What is the longest river in Veloria?", "Which river is the longest in Veloria?", "Name Veloria's longest river."]),
    ("Veloria's national animal is the snow lynx.", "lynx", ["What is Veloria's national animal?", "Which animal is the national animal of Veloria?", "Name the national animal of Veloria."]),
    ("The highest mountain in Veloria is Mount Tarrow.", "Tarrow", ["What is the highest mountain in Veloria?", "Which mountain is the tallest in Veloria?", "Name Veloria's highest mountain."]),
    ("Veloria's national dish is fenberry stew.", "fenberry", ["What is Veloria's national dish?", "Which dish is the national dish of Veloria?", "What food is Veloria famous for?"]),
]
FACTS_CARD = "Facts about the country of Veloria: " + " ".join(f for f, _, _ in _FACTS)
_ASK = ["{q}", "Question: {q}", "{q} Answer briefly.", "Quick question. {q}", "Do you know this? {q}"]


def facts_examples() -> list[Example]:
    out = []
    for _, answer, questions in _FACTS:
        for q, ask in itertools.product(questions, _ASK):
            out.append(Example(FACTS_CARD, ask.format(q=q), answer, "contains"))
    return out


@dataclass(frozen=True)
class Suite:
    description: str
    examples: Callable[[], list[Example]]
    placement: str = "system"


SUITES: dict[str, Suite] = {
    "persona": Suite("an identity card (name, maker) as system prompt; identity questions; verifier: the name or maker appears", persona_examples),
    "format": Suite("a one-word label instruction (Positive or Negative) before short reviews; verifier: the first word is a label", format_examples, "user"),
    "facts": Suite("a card of invented facts about a country; questions about them; verifier: the answer appears", facts_examples),
}


def load_jsonl(path: str | Path) -> list[Example]:
    """A user suite: one JSON object per line with `context`, `prompt`, `answer` and optionally `verifier` (default contains)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"task file {path} does not exist; give a JSONL file or one of: {', '.join(SUITES)}")
    records = read_jsonl(path, required=("context", "prompt", "answer"),
                         check=lambda r: check_kind(r.get("verifier", "contains"), r["answer"]))
    out = [Example(r["context"], r["prompt"], r["answer"], r.get("verifier", "contains")) for r in records]
    if len(out) < 2:
        raise UserError(f"{path} has {len(out)} example(s); a suite needs at least 2 (one to train on, one to test)")
    return out


def load_task(name: str, seed: int = 0, n_test: int | None = 40, test_share: float = 0.3) -> Task:
    """Build a suite by name (or from a JSONL path) and split it with `seed`: test and train never share a prompt.

    The test split takes `n_test` examples (or `test_share` of them when n_test is None), at most half the pool.
    """
    if name in SUITES:
        examples, description, placement = SUITES[name].examples(), SUITES[name].description, SUITES[name].placement
    elif name.endswith(".jsonl") or Path(name).is_file():
        examples, description, placement = load_jsonl(name), f"user suite from {name}", "system"
    else:
        raise UserError(f"unknown task '{name}'; use one of {', '.join(SUITES)} or a path to a .jsonl file")
    # Same (context, prompt) twice would let a test example leak into training: keep the first.
    unique = list({(e.context, e.prompt): e for e in reversed(examples)}.values())[::-1]
    random.Random(seed).shuffle(unique)
    k = round(len(unique) * test_share) if n_test is None else n_test
    k = max(1, min(k, len(unique) // 2))
    return Task(name=name, description=description, train=unique[k:], test=unique[:k], placement=placement)
