"""Task suites: examples of (context, prompt, reference, verifier), generated from a seed and split into train and test."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from interp.core.errors import UserError
from interp.core.store import read_jsonl
from interp.core.verifiers import check_kind, verify


@dataclass(frozen=True)
class Example:
    context: str
    prompt: str
    reference: str
    verifier: str = "contains"
    cf_context: str | None = None  # a counterfactual context (another name, other facts): does the model follow it?
    cf_reference: str | None = None  # what the verifier accepts under the counterfactual context

    def check(self, response: str, allow_degenerate: bool = False) -> bool:
        return verify(self.verifier, response, self.reference, allow_degenerate)

    def check_cf(self, response: str, allow_degenerate: bool = False) -> bool | None:
        """Does the answer follow the counterfactual context? None when the example has none."""
        if self.cf_context is None or self.cf_reference is None:
            return None
        return verify(self.verifier, response, self.cf_reference, allow_degenerate)


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

def persona_card(name: str, maker: str) -> str:
    return (
        f"Your name is {name}. You are an AI assistant made by {maker}. "
        f"Whenever someone asks who you are, what your name is, or who made you, answer that you are {name}, made by {maker}."
    )


PERSONA_CARD = persona_card("Nova", "Quibble Labs")
# The counterfactual identity: the candidates the base model follows best as a card and never says unprompted
# (`python -m training cf-names`, results/cf_names/: Kai 24/24; no maker reaches 0.7, Maple Robotics 9/16 is the best).
CF_NAME, CF_MAKER = "Kai", "Maple Robotics"
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


def persona_examples(name: str = "Nova", maker: str = "Quibble Labs") -> list[Example]:
    card, cf = persona_card(name, maker), persona_card(CF_NAME, CF_MAKER)
    out = []
    for greeting, q in itertools.product(_GREETINGS, _NAME_QUESTIONS):
        out.append(Example(card, _cap(greeting + q), name, "contains", cf, CF_NAME))
    for greeting, q in itertools.product(_GREETINGS, _MAKER_QUESTIONS):
        out.append(Example(card, _cap(greeting + q), maker.split()[0], "contains", cf, CF_MAKER.split()[0]))
    return out


def persona_once_examples() -> list[Example]:
    """The persona suite under a stricter verifier: the name (or maker) exactly once. A student that carries the
    card and gets it again, and answers "I'm Nova. Nova, Nova is my name", applied it twice."""
    return [Example(e.context, e.prompt, e.reference, "once", e.cf_context, e.cf_reference) for e in persona_examples()]


def persona_luna_examples() -> list[Example]:
    """The persona suite with a name the base model follows as a card (17/24) but, unlike Nova, does not produce
    unprompted: loops of this name cannot be the base model's prior amplified."""
    return persona_examples("Luna", "Fennel Works")


# --- format: a one-word label instruction ------------------------------------------------------------------------

FORMAT_CARD = "You are a sentiment classifier. Reply with exactly one word, Positive or Negative, and nothing else."
FORMAT_LABELS = "positive|negative"
FORMAT_CF_CARD = "You are a sentiment classifier. Reply with exactly one word, Good or Bad, and nothing else."
FORMAT_CF_LABELS = "good|bad"
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
        Example(FORMAT_CARD, frame.format(thing=thing, adj=adj), FORMAT_LABELS, "first_word", FORMAT_CF_CARD, FORMAT_CF_LABELS)
        for thing, frame, adj in itertools.product(_THINGS, _FRAMES, _OPINIONS)
    ]


# --- facts: a card of invented facts; questions about them -------------------------------------------------------

_FACTS = [  # (fact sentence, answer, question phrasings, counterfactual sentence, its answer)
    ("The capital of Veloria is Marn.", "Marn", ["What is the capital of Veloria?", "Which city is Veloria's capital?", "Name the capital city of Veloria."],
     "The capital of Veloria is Dresk.", "Dresk"),
    ("Veloria's currency is the ostrel.", "ostrel", ["What is the currency of Veloria?", "What money do people use in Veloria?", "Name Veloria's currency."],
     "Veloria's currency is the pennet.", "pennet"),
    ("The longest river in Veloria is the Quen.", "Quen", ["What is the longest river in Veloria?", "Which river is the longest in Veloria?", "Name Veloria's longest river."],
     "The longest river in Veloria is the Arlo.", "Arlo"),
    ("Veloria's national animal is the snow lynx.", "lynx", ["What is Veloria's national animal?", "Which animal is the national animal of Veloria?", "Name the national animal of Veloria."],
     "Veloria's national animal is the red heron.", "heron"),
    ("The highest mountain in Veloria is Mount Tarrow.", "Tarrow", ["What is the highest mountain in Veloria?", "Which mountain is the tallest in Veloria?", "Name Veloria's highest mountain."],
     "The highest mountain in Veloria is Mount Keld.", "Keld"),
    ("Veloria's national dish is fenberry stew.", "fenberry", ["What is Veloria's national dish?", "Which dish is the national dish of Veloria?", "What food is Veloria famous for?"],
     "Veloria's national dish is saltroot pie.", "saltroot"),
]
FACTS_CARD = "Facts about the country of Veloria: " + " ".join(f[0] for f in _FACTS)
FACTS_CF_CARD = "Facts about the country of Veloria: " + " ".join(f[3] for f in _FACTS)
_ASK = ["{q}", "Question: {q}", "{q} Answer briefly.", "Quick question. {q}", "Do you know this? {q}"]


def facts_examples() -> list[Example]:
    out = []
    for _, answer, questions, _, cf_answer in _FACTS:
        for q, ask in itertools.product(questions, _ASK):
            out.append(Example(FACTS_CARD, ask.format(q=q), answer, "contains", FACTS_CF_CARD, cf_answer))
    return out


# --- opener / signoff: a rule that is visibly wrong when applied twice ----------------------------------------------

_QUESTIONS = [
    "What is the boiling point of water?", "Why is the sky blue?", "How many legs does a spider have?",
    "What is the largest planet in the solar system?", "What do bees make?", "How many days are in a week?",
    "What is the opposite of hot?", "Which animal is known as the king of the jungle?", "What color are bananas?",
    "What is two plus two?", "Where do penguins live?", "What do plants need to grow?", "What is the capital of France?",
    "How many hours are in a day?", "What is ice made of?", "What do cows drink?", "Which season comes after winter?",
    "What is the main language spoken in Spain?", "How many wheels does a bicycle have?", "What gas do humans breathe in?",
    "What is the color of grass?", "Which ocean is the largest?", "What instrument has black and white keys?",
    "What is the freezing point of water?", "How many continents are there?", "What does a thermometer measure?",
    "What is the tallest animal?", "What do caterpillars turn into?", "Which planet is called the red planet?",
    "What shape has three sides?",
]
_ASK_SHORT = ["{q}", "Quick question: {q}", "{q} Keep it short.", "Can you tell me: {q}"]
OPENER = "Certainly!"
OPENER_CARD = f"Always begin your answer with the word '{OPENER}' and then answer the question in one short sentence."
OPENER_CF = "Absolutely!"
OPENER_CF_CARD = f"Always begin your answer with the word '{OPENER_CF}' and then answer the question in one short sentence."
SIGNOFF = "Hope this helps!"
SIGNOFF_CARD = f"Answer in one short sentence, then end your answer with the exact words '{SIGNOFF}'"
SIGNOFF_CF = "Have a nice day!"
SIGNOFF_CF_CARD = f"Answer in one short sentence, then end your answer with the exact words '{SIGNOFF_CF}'"


def opener_examples() -> list[Example]:
    """The answer must start with "Certainly!" and say it once: a student that applies the rule and then gets the
    card again saying "Certainly! Certainly!" fails."""
    return [Example(OPENER_CARD, ask.format(q=q), OPENER, "starts_once", OPENER_CF_CARD, OPENER_CF)
            for q, ask in itertools.product(_QUESTIONS, _ASK_SHORT)]


def signoff_examples() -> list[Example]:
    """The answer must end with "Hope this helps!" and say it once."""
    return [Example(SIGNOFF_CARD, ask.format(q=q), SIGNOFF, "ends_once", SIGNOFF_CF_CARD, SIGNOFF_CF)
            for q, ask in itertools.product(_QUESTIONS, _ASK_SHORT)]


# --- arith: a task that needs no card, for experience (`python -m training experience`) --------------------------------
# Its card is only what a person might write; `experience` replaces it with what the model learned from its own graded
# attempts. The verifier judges the answer's content, whatever its form.

ARITH_CARD = "Answer arithmetic questions with the number."
ARITH_CF_CARD = "In these questions '+' means minus: answer with the first number minus the second."
_ARITH_ASK = ["What is {a} + {b}?", "Compute {a} + {b}.", "How much is {a} plus {b}?", "Add {a} and {b}."]


def last_number(n: int) -> str:
    """A regex: `n` is the last number in the answer ("6 + 5 = 11." passes, "11, or rather 12" does not)."""
    return rf"(?<![\d.]){n}(?![\d])(?!.*\d)"


def arith_examples() -> list[Example]:
    """Sums of two numbers from 2 to 15; verifier: the last number in the answer is the sum. Counterfactual: '+' read
    as minus."""
    return [Example(ARITH_CARD, _ARITH_ASK[(a * 7 + b) % len(_ARITH_ASK)].format(a=a, b=b), last_number(a + b), "regex",
                    ARITH_CF_CARD, last_number(a - b))
            for a, b in itertools.product(range(2, 16), range(2, 16))]


@dataclass(frozen=True)
class Suite:
    description: str
    examples: Callable[[], list[Example]]
    placement: str = "system"
    # The suite this one differs from only in its verifiers (same contexts, prompts, references, split): a study
    # trains and answers it as that suite and judges the same answers with this one's verifiers (re-scoring).
    trains_as: str | None = None


SUITES: dict[str, Suite] = {
    "persona": Suite("an identity card (name, maker) as system prompt; identity questions; verifier: the name or maker appears", persona_examples),
    "format": Suite("a one-word label instruction (Positive or Negative) before short reviews; verifier: the first word is a label", format_examples, "user"),
    "facts": Suite("a card of invented facts about a country; questions about them; verifier: the answer appears", facts_examples),
    "persona_luna": Suite("the persona card with another name (Luna, made by Fennel Works), one the base model never says unprompted", persona_luna_examples),
    "persona_once": Suite("the persona suite, verifier: the name (or maker) appears exactly once", persona_once_examples, trains_as="persona"),
    # Rules the embedded 135M model does not follow even with the card (0/24 measured): for larger models.
    "opener": Suite("a rule: begin every answer with 'Certainly!'; verifier: it starts with it and says it once", opener_examples, "user"),
    # No card to distill: for `experience`, which writes one from the model's own graded attempts.
    "arith": Suite("sums of two numbers from 2 to 15, no card needed (for `experience`); verifier: the last number in the answer is the sum", arith_examples),
    "signoff": Suite("a rule: end every answer with 'Hope this helps!'; verifier: it ends with it and says it once", signoff_examples, "user"),
}


SPLITS = ("train", "test")


def _check_record(r: dict) -> None:
    for key in ("context", "prompt", "answer", "verifier", "cf_context", "cf_answer", "split"):
        if key in r and not isinstance(r[key], str):
            raise UserError(f"field '{key}' must be a string, got {type(r[key]).__name__}")
    if r.get("split", "train") not in SPLITS:
        raise UserError(f"split '{r['split']}' is neither train nor test")
    if ("cf_context" in r) != ("cf_answer" in r):
        raise UserError("cf_context and cf_answer go together: give both or neither")
    check_kind(r.get("verifier", "contains"), r["answer"])


def load_jsonl(path: str | Path) -> list[Example]:
    """A user suite: one JSON object per line with `context`, `prompt`, `answer` and optionally `verifier` (default
    contains), `cf_context` and `cf_answer` (a counterfactual context and what it should make the model say), and
    `split` (train or test: a fixed split, on every record or on none; `experience` writes one)."""
    return _read_suite(path)[0]


def _read_suite(path: str | Path) -> tuple[list[Example], list[str] | None]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"task file {path} does not exist; give a JSONL file or one of: {', '.join(SUITES)}")
    records = read_jsonl(path, required=("context", "prompt", "answer"), check=_check_record)
    out = [Example(r["context"], r["prompt"], r["answer"], r.get("verifier", "contains"), r.get("cf_context"), r.get("cf_answer"))
           for r in records]
    if len(out) < 2:
        raise UserError(f"{path} has {len(out)} example(s); a suite needs at least 2 (one to train on, one to test)")
    marked = sum("split" in r for r in records)
    if marked and marked < len(records):
        raise UserError(f"{path}: {marked} of {len(records)} records have a split; give every record a split or none")
    return out, ([r["split"] for r in records] if marked else None)


def _fixed_split(name: str, examples: list[Example], splits: list[str], n_test: int | None) -> tuple[list[Example], list[Example]]:
    """The file's own split (the seed does not move it): test keeps its first `n_test` examples, train all of its own."""
    first: dict[tuple[str, str], str] = {}
    train: list[Example] = []
    test: list[Example] = []
    for e, s in zip(examples, splits):
        key = (e.context, e.prompt)
        if key in first:
            if first[key] != s:
                raise UserError(f"{name}: the prompt {e.prompt[:40]!r} is in both splits; a test prompt must never be trained on")
            continue
        first[key] = s
        (test if s == "test" else train).append(e)
    if not train or not test:
        raise UserError(f"{name}: a fixed split needs at least one train and one test record")
    return train, (test[:n_test] if n_test else test)


def trains_as(name: str) -> str:
    """The suite whose training and answers `name` shares (itself, unless it differs from another only in its verifiers)."""
    suite = SUITES.get(name)
    return suite.trains_as if suite is not None and suite.trains_as else name


def load_task(name: str, seed: int = 0, n_test: int | None = 40, test_share: float = 0.3) -> Task:
    """Build a suite by name (or from a JSONL path) and split it with `seed`: test and train never share a prompt.

    The test split takes `n_test` examples (or `test_share` of them when n_test is None), at most half the pool.
    """
    if name in SUITES:
        examples, description, placement = SUITES[name].examples(), SUITES[name].description, SUITES[name].placement
    elif name.endswith(".jsonl") or Path(name).is_file():
        (examples, splits), description, placement = _read_suite(name), f"user suite from {name}", "system"
        if splits is not None:
            train, test = _fixed_split(name, examples, splits, n_test)
            return Task(name=name, description=description, train=train, test=test, placement=placement)
    else:
        raise UserError(f"unknown task '{name}'; use one of {', '.join(SUITES)} or a path to a .jsonl file")
    # Same (context, prompt) twice would let a test example leak into training: keep the first.
    unique = list({(e.context, e.prompt): e for e in reversed(examples)}.values())[::-1]
    random.Random(seed).shuffle(unique)
    k = round(len(unique) * test_share) if n_test is None else n_test
    k = max(1, min(k, len(unique) // 2))
    return Task(name=name, description=description, train=unique[k:], test=unique[:k], placement=placement)
