"""Whether an answer loops: the stand-in verdict where a run does not store its own."""

from __future__ import annotations

from typing import Sequence


def loops(ids: Sequence[int], min_repeats: int = 3, max_period: int = 8, min_span: int = 6) -> bool:
    """Whether a response loops: some block of 1..`max_period` tokens repeats back to back at least `min_repeats`
    times, covering at least `min_span` tokens ("Nova, Nova, Nova," is the block ", Nova" three times)."""
    ids = list(ids)
    n = len(ids)
    for period in range(1, max_period + 1):
        run = 0  # length of the current stretch where ids[i] == ids[i - period]
        for i in range(period, n):
            run = run + 1 if ids[i] == ids[i - period] else 0
            span = run + period
            if span >= max(min_span, period * min_repeats):
                return True
    return False
