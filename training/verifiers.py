"""Verifiers: does a response pass, given the example's reference? One small function per kind."""

from __future__ import annotations

import re
import string

from interp.errors import UserError

KINDS = ("contains", "exact", "first_word", "regex")
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


_VERIFIERS = {"contains": contains, "exact": exact, "first_word": first_word, "regex": regex}


def check_kind(kind: str, reference: str | None = None) -> None:
    """Fail in one line on an unknown verifier kind or a regex that does not compile."""
    if kind not in _VERIFIERS:
        raise UserError(f"unknown verifier '{kind}'; use one of {', '.join(KINDS)}")
    if kind == "regex" and reference is not None:
        try:
            re.compile(reference)
        except re.error as err:
            raise UserError(f"the regex {reference!r} does not compile ({err})") from err


def verify(kind: str, response: str, reference: str) -> bool:
    """True when `response` passes the verifier `kind` against `reference`."""
    check_kind(kind)
    return _VERIFIERS[kind](response, reference)
