"""Degenerate (looping) answers: the one definition the evaluation's verdicts and the causal tools share
(docs/measures.md#degenerate-answers)."""

from __future__ import annotations

import string

_EDGE_PUNCT = string.punctuation + "“”‘’«»…"
# A loop is wrong whatever it contains (docs/measures.md#degenerate). Words are compared lowercased with the
# punctuation around them stripped, so "Nova, Nova, Nova" and "Nova Nova Nova" are the same loop.
SHORT_SPAN = 4  # spans of 1..SHORT_SPAN words must repeat SHORT_REPEATS times back to back
SHORT_REPEATS = 3
LONG_SPAN = 40  # longer spans (clauses, up to LONG_SPAN words) must repeat twice back to back
LONG_REPEATS = 2


def words(text: str) -> list[str]:
    return [w for w in (t.strip(_EDGE_PUNCT).lower() for t in text.split()) if w]


def is_degenerate(text: str) -> bool:
    """True when a short span (1-4 words) repeats at least 3 times back to back, or a clause (5-40 words) at
    least twice back to back. "I'm Nova. Nova is my name." is not degenerate; "Nova, Nova, Nova" is, and so is
    "I'm Nova, made by Quibble Labs. I'm Nova, made by Quibble Labs."."""
    ws = words(text)
    for k in range(1, min(LONG_SPAN, len(ws) // 2) + 1):
        need = SHORT_REPEATS if k <= SHORT_SPAN else LONG_REPEATS
        for i in range(len(ws) - need * k + 1):
            span = ws[i : i + k]
            if all(ws[i + c * k : i + (c + 1) * k] == span for c in range(1, need)):
                return True
    return False
