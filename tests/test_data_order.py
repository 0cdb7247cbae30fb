"""batch_indices: the same order as the original per-example reshuffle, at a cost that does not grow with the suite."""

import random
import time

import pytest

from training.data_order import batch_indices


def original_batch_indices(step, n, batch_size, seed, rank=0, world=1):
    """The implementation the order is defined by (a fresh shuffle for every example)."""
    out = []
    start = step * batch_size * world + rank * batch_size
    for p in range(start, start + batch_size):
        epoch, i = divmod(p, n)
        perm = list(range(n))
        random.Random(seed * 1_000_003 + epoch).shuffle(perm)
        out.append(perm[i])
    return out


@pytest.mark.parametrize("n,batch_size,world", [(7, 3, 1), (10, 4, 2), (50, 8, 1), (5, 5, 3), (1, 1, 1)])
@pytest.mark.parametrize("seed", [0, 1, 12345])
def test_same_order_as_before(n, batch_size, world, seed):
    for step in range(12):
        for rank in range(world):
            assert batch_indices(step, n, batch_size, seed, rank, world) == original_batch_indices(step, n, batch_size, seed, rank, world)


def test_cost_does_not_grow_with_the_suite():
    n = 1_000_000
    batch_indices(0, n, 8, seed=3)  # the epoch's permutation, once
    start = time.perf_counter()
    for step in range(1, 201):
        batch_indices(step, n, 8, seed=3)
    per_step = (time.perf_counter() - start) / 200
    assert per_step < 5e-3, f"{per_step * 1e3:.2f} ms per step at a million examples"
    assert batch_indices(17, n, 8, seed=3) == original_batch_indices(17, n, 8, seed=3)
