"""Context vector, adapter shift and their projections (docs/measures.md, "Causal and cross-model measures").

Pure functions on per-layer mean hidden states; nothing here touches a model.
"""

from __future__ import annotations

import numpy as np

__all__ = ["MeanAccumulator", "context_vectors", "projection", "row_cosine"]


def context_vectors(base_ctx: np.ndarray, base_noctx: np.ndarray, student_ctx: np.ndarray, student_noctx: np.ndarray) -> dict[str, np.ndarray]:
    """From the four runs' mean hidden states [..., layers, d]: the context vector `v = B·ctx − B·noctx`, the
    adapter shift `u = S·noctx − B·noctx` and both together `w = S·ctx − B·noctx` (the mean of differences is the
    difference of means, the tokens being the same in every run)."""
    return {"v": base_ctx - base_noctx, "u": student_noctx - base_noctx, "w": student_ctx - base_noctx}


def projection(x: np.ndarray, v: np.ndarray) -> np.ndarray:
    """`<x, v> / |v|²` over the last axis: how many context vectors' worth of `x` points along `v`.
    NaN where `v` is zero (layer 0 on aligned tokens: the embeddings cannot see the context)."""
    x, v = np.asarray(x, dtype=np.float64), np.asarray(v, dtype=np.float64)
    den = (v * v).sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, (x * v).sum(-1) / np.where(den > 0, den, 1.0), np.nan)


def row_cosine(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Cosine over the last axis; NaN where either vector is zero."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    den = np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, (x * y).sum(-1) / np.where(den > 0, den, 1.0), np.nan)


class MeanAccumulator:
    """Per-layer sums of hidden states over tokens, in float64, overall and per example, so that means over any
    number of batches equal the mean over all tokens at once."""

    def __init__(self):
        self.total: np.ndarray | None = None  # [L, d]
        self.count = 0
        self.examples: list[np.ndarray] = []  # per example, [L, d] mean
        self.example_counts: list[int] = []

    def update(self, hidden, token_example: np.ndarray) -> None:
        """`hidden` [L, n, d] of one batch; `token_example` [n] numbers the batch's examples from 0."""
        h = np.asarray(hidden, dtype=np.float64)
        s = h.sum(1)
        self.total = s if self.total is None else self.total + s
        self.count += h.shape[1]
        for e in range(int(token_example.max()) + 1 if token_example.size else 0):
            sel = token_example == e
            self.examples.append(h[:, sel].mean(1))
            self.example_counts.append(int(sel.sum()))

    def mean(self) -> np.ndarray:
        return self.total / self.count

    def example_means(self) -> np.ndarray:
        """[n_examples, L, d]."""
        return np.stack(self.examples)
