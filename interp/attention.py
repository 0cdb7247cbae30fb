"""Attention to the context: how much of each head's attention, from the measured queries, lands on the context's tokens."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from interp.capture import Batch


def reduce_attention(pattern: torch.Tensor, batch: "Batch") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
