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


def batch_indices(step: int, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> list[int]:
    """Training-example indices for `step` on process `rank`: a fresh seeded permutation every epoch, so the order
    is a pure function of (seed, step) and a resumed run sees exactly the data it would have seen. Each epoch's
    permutation is computed once and cached, so a step costs O(batch_size) after the first step of an epoch."""
    start = step * batch_size * world + rank * batch_size
    return [epoch_permutation(seed, epoch, n)[i] for epoch, i in (divmod(p, n) for p in range(start, start + batch_size))]
