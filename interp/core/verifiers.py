"""Verifiers: does a response pass, given the example's reference? One small function per kind."""

from __future__ import annotations

import re
import string

from interp.core.degenerate import is_degenerate, words as _words
from interp.core.errors import UserError

__all__ = ["is_degenerate", "verify", "check_kind", "KINDS"]

KINDS = ("contains", "exact", "first_word", "regex", "once", "starts_once", "ends_once")
_EDGE_PUNCT = string.punctuation + "“”‘’«»…"


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def contains(response: str, reference: str) -> bool:
    """The reference (or any of its `|`-separated alternatives) occurs in the response, ignoring case."""
    text = _norm(response)
    return any(_norm(alt) in text for alt in reference.split("|") if alt.strip())


def exact(response: str, reference: str) -> bool:
    """The whole response is the reference, ignoring case, surrounding whitespace and trailing punctuation."""
    return _norm(response).strip(_EDGE_PUNCT + " ") == _norm(reference).strip(_EDGE_PUNCT + " ")


def first_word(response: str, reference: str) -> bool:
    """The response's first word is the reference (or one of its `|` alternatives), ignoring case and punctuation around it."""
    words = response.split()
    if not words:
        return False
    first = words[0].strip(_EDGE_PUNCT).lower()
    # "**positive**" and "Positive." count as the label; a word glued to more text ("positively") does not.
    return first in {alt.strip().lower() for alt in reference.split("|") if alt.strip()}


def regex(response: str, reference: str) -> bool:
    """The reference is a regular expression that matches somewhere in the response (case-insensitive)."""
    return re.search(reference, response, flags=re.IGNORECASE | re.DOTALL) is not None


def _phrase_count(text: str, phrase: str) -> int:
    return _norm(text).count(_norm(phrase))


def once(response: str, reference: str) -> bool:
    """The reference (or one of its `|` alternatives) occurs exactly once as a whole word or phrase, ignoring case:
    "I'm Nova" passes, "I'm Nova, Nova is my name" does not (the context applied twice)."""
    words = _words(response)
    total = 0
    for alt in reference.split("|"):
        phrase = _words(alt)
        if phrase:
            total += sum(words[i : i + len(phrase)] == phrase for i in range(len(words) - len(phrase) + 1))
    return total == 1


def starts_once(response: str, reference: str) -> bool:
    """The response starts with the phrase and says it exactly once (ignoring case): applying the rule twice fails."""
    text = _norm(response).lstrip(_EDGE_PUNCT + " ")
    return text.startswith(_norm(reference)) and _phrase_count(response, reference) == 1


def ends_once(response: str, reference: str) -> bool:
    """The response ends with the phrase (trailing spaces and quotes aside) and says it exactly once."""
    text = _norm(response).rstrip(" \"'”’")
    return text.endswith(_norm(reference)) and _phrase_count(response, reference) == 1


_VERIFIERS = {"contains": contains, "exact": exact, "first_word": first_word, "regex": regex, "once": once,
              "starts_once": starts_once, "ends_once": ends_once}

def check_kind(kind: str, reference: str | None = None) -> None:
    """Fail in one line on an unknown verifier kind or a regex that does not compile."""
    if kind not in _VERIFIERS:
        raise UserError(f"unknown verifier '{kind}'; use one of {', '.join(KINDS)}")
    if kind == "regex" and reference is not None:
        try:
            re.compile(reference)
        except re.error as err:
            raise UserError(f"the regex {reference!r} does not compile ({err})") from err


def verify(kind: str, response: str, reference: str, allow_degenerate: bool = False) -> bool:
    """True when `response` passes the verifier `kind` against `reference`; a degenerate (looping) answer fails
    unless `allow_degenerate`."""
    check_kind(kind)
    if not allow_degenerate and is_degenerate(response):
        return False
    return _VERIFIERS[kind](response, reference)
