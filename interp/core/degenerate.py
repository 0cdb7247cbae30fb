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


def loop_rules(text: str) -> tuple[bool, bool]:
    """Which rule makes an answer a loop, each looping answer counted under one: (short: a span of 1-4 words at
    least 3 times back to back; clause: otherwise, a span of 5-40 words at least twice back to back). So
    short + clause = `is_degenerate`, and "Nova Nova Nova Nova Nova Nova" is a short loop, not also a clause one."""
    ws = words(text)
    for k in range(1, min(LONG_SPAN, len(ws) // 2) + 1):
        need = SHORT_REPEATS if k <= SHORT_SPAN else LONG_REPEATS
        for i in range(len(ws) - need * k + 1):
            span = ws[i : i + k]
            if all(ws[i + c * k : i + (c + 1) * k] == span for c in range(1, need)):
                return (True, False) if k <= SHORT_SPAN else (False, True)
    return False, False


def is_degenerate(text: str) -> bool:
    """True when a short span (1-4 words) repeats at least 3 times back to back, or a clause (5-40 words) at
    least twice back to back. "I'm Nova. Nova is my name." is not degenerate; "Nova, Nova, Nova" is, and so is
    "I'm Nova, made by Quibble Labs. I'm Nova, made by Quibble Labs."."""
    return any(loop_rules(text))


def loop_start(ids, decode) -> int | None:
    """The number of leading tokens of `ids` after which the answer is first a loop (`is_degenerate` of their text),
    or None when it never loops. An answer that loops still loops as it goes on, so this is a binary search: about
    log2(len) decodes."""
    if not ids or not is_degenerate(decode(list(ids))):
        return None
    lo, hi = 0, len(ids)  # decode(ids[:lo]) is clean, decode(ids[:hi]) loops
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if is_degenerate(decode(list(ids[:mid]))):
            hi = mid
        else:
            lo = mid
    return hi
