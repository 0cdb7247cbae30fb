"""Hooks on a model's forward pass: a batch of pairs padded into tensors with its measured positions, the model's one
cached nnsight wrapper, and the way from a torch module to its nnsight envoy. The capture backends (interp.capture)
and the causal tools' engine (interp.causal.forward) both read and write activations through these."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from interp.core.errors import UserError
from interp.core.pairs import Pair

PADDING = ("right", "left")


@dataclass
class Batch:
    """One side (with or without context) of a batch of pairs, padded, with the indices of what is measured.

    Measured tokens are flattened across rows: token j sits at row `rows[j]`, position `positions[j]`.
    """

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    position_ids: torch.Tensor  # [B, T], counted from each row's first real token
    rows: torch.Tensor  # [n]
    positions: torch.Tensor  # [n]
    targets: torch.Tensor  # [n] the token each measured position predicts
    sink: torch.Tensor  # [B] position of each row's first real token (the attention sink)
    ctx_mask: torch.Tensor  # [B, T] 1.0 on the context text's own tokens (all zero without context)
    ctx_positions: torch.Tensor  # [B, C] positions of context tokens, padded with 0
    ctx_valid: torch.Tensor  # [B, C] 1.0 where ctx_positions is a real context token


def make_batch(pairs: Sequence[Pair], which: str, scope: str = "response", padding: str = "right", pad_id: int = 0) -> Batch:
    """Pad one side of `pairs` into tensors and record where the measured tokens and the context are."""
    if which not in ("ctx", "noctx"):
        raise ValueError(f"which must be 'ctx' or 'noctx', got {which!r}")
    if padding not in PADDING:
        raise UserError(f"unknown padding '{padding}'; use one of {', '.join(PADDING)}")
    seqs = [p.ctx_ids if which == "ctx" else p.noctx_ids for p in pairs]
    width = max(len(s) for s in seqs)
    n_ctx = max(p.ctx_span[1] - p.ctx_span[0] for p in pairs) if which == "ctx" else 0
    B = len(seqs)
    ids = torch.full((B, width), pad_id, dtype=torch.long)
    mask = torch.zeros((B, width), dtype=torch.long)
    ctx_mask = torch.zeros((B, width))
    ctx_positions = torch.zeros((B, max(n_ctx, 1)), dtype=torch.long)
    ctx_valid = torch.zeros((B, max(n_ctx, 1)))
    rows, positions, targets, sink = [], [], [], []
    for b, (pair, seq) in enumerate(zip(pairs, seqs)):
        offset = width - len(seq) if padding == "left" else 0
        ids[b, offset : offset + len(seq)] = torch.tensor(seq)
        mask[b, offset : offset + len(seq)] = 1
        sink.append(offset)
        for t in pair.measured(scope, which):
            rows.append(b)
            positions.append(offset + t)
            targets.append(seq[t + 1])
        if which == "ctx":
            start, end = pair.ctx_span
            ctx_mask[b, offset + start : offset + end] = 1.0
            ctx_positions[b, : end - start] = torch.arange(offset + start, offset + end)
            ctx_valid[b, : end - start] = 1.0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    as_long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return Batch(ids, mask, position_ids, as_long(rows), as_long(positions), as_long(targets), as_long(sink), ctx_mask, ctx_positions, ctx_valid)


def gather_tokens(hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
    """[B, T, d] -> [n, d]: the measured tokens only."""
    return hidden[batch.rows, batch.positions]


def model_inputs(batch: Batch, device) -> dict:
    return dict(
        input_ids=batch.input_ids.to(device),
        attention_mask=batch.attention_mask.to(device),
        position_ids=batch.position_ids.to(device),
    )


def batch_to(batch: Batch, device) -> Batch:
    return Batch(**{k: v.to(device) for k, v in batch.__dict__.items()})


def nnsight_model(lm):
    """The nnsight wrapper of a LoadedModel: one per model, built on first use; LoRA adapters switch in place
    underneath it."""
    cached = lm.__dict__.get("_nnsight")
    if cached is None or cached[0] is not lm.model:
        from nnsight.modeling.transformers import TransformersModel  # nnsight: loaded only when a trace asks for it

        cached = (lm.model, TransformersModel(lm.model, tokenizer=lm.tokenizer))
        lm.__dict__["_nnsight"] = cached
    return cached[1]


def envoy(root_envoy, modules_root: torch.nn.Module, module: torch.nn.Module):
    """The nnsight envoy of `module`, found by its dotted path under `modules_root` (the model the envoy wraps), so
    that the architecture accessors of interp.core stay the only place that knows where a module sits."""
    names = modules_root.__dict__.setdefault("_module_paths", {})
    path = names.get(id(module))
    if path is None or modules_root.get_submodule(path) is not module:  # new modules (an adapter), or an id reused
        names.clear()
        names.update({id(m): n for n, m in modules_root.named_modules()})
        path = names[id(module)]
    node = root_envoy
    for part in path.split(".") if path else []:
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node
