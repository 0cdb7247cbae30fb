"""Attention to the context: how much of each head's attention, from the measured queries, lands on the context's tokens."""

from __future__ import annotations

import torch

from interp.core import distributed
from interp.hooks import Batch


def reduce_attention(pattern: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From one layer's attention weights [B, heads, T, T], the measured queries' mass on the context, on the
    first token, and on each context token: [n, heads], [n, heads], [n, heads, C]. Every backend calls this.
    """
    B, H, T, _ = pattern.shape
    if B != batch.input_ids.shape[0] or T != batch.input_ids.shape[1]:
        raise ValueError(f"attention pattern {tuple(pattern.shape)} does not match the batch {tuple(batch.input_ids.shape)}")
    queries = pattern[batch.rows, :, batch.positions, :].float()  # [n, H, T]
    ctx_mass = (queries * batch.ctx_mask[batch.rows][:, None, :]).sum(-1)
    sink = queries.gather(-1, batch.sink[batch.rows][:, None, None].expand(-1, H, 1)).squeeze(-1)
    index = batch.ctx_positions[batch.rows][:, None, :].expand(-1, H, -1)
    per_token = queries.gather(-1, index) * batch.ctx_valid[batch.rows][:, None, :]
    return ctx_mass, sink, per_token


class AttentionMeans:
    """`attn_ctx`, `attn_sink` and `attn_sink_noctx` per block and head: the mean over every measured token of its
    attention mass on the context, on the first token with the context, and on the first token without it
    (docs/measures.md). Sums accumulate in float64 on `device`; `all_reduce()` joins processes before `result`."""

    NAMES = ("attn_ctx", "attn_sink", "attn_sink_noctx")

    def __init__(self, n_blocks: int, heads: int, device):
        self.sums = torch.zeros(len(self.NAMES), n_blocks, heads, dtype=torch.float64, device=device)
        self.n = 0

    def update(self, ctx, noctx) -> None:
        """`ctx`, `noctx`: the two sides' captures of one batch ([blocks, n, heads] fields from reduce_attention)."""
        got = torch.stack([ctx.attn_ctx, ctx.attn_sink, noctx.attn_sink]).double()
        self.sums += got.sum(2).to(self.sums.device)
        self.n += got.shape[2]

    def all_reduce(self) -> None:
        self.sums = distributed.all_reduce_sum(self.sums)
        self.n = int(distributed.all_reduce_sum(torch.tensor([float(self.n)], dtype=torch.float64)).item())

    def result(self) -> dict:
        means = (self.sums / self.n).cpu().numpy()
        return dict(zip(self.NAMES, means))
