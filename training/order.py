"""Data order: one seeded permutation per epoch, computed once and reused for every step of that epoch."""

from __future__ import annotations

import functools
import random


@functools.lru_cache(maxsize=4)  # a batch spans at most two epochs; processes of one run share (seed, n)
def epoch_permutation(seed: int, epoch: int, n: int) -> tuple[int, ...]:
    """The order of the `n` training examples in `epoch`: the shuffle `batch_indices` has always used."""
    perm = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(perm)
    return tuple(perm)
