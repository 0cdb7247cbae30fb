"""Capture per-layer hidden states on measured tokens, and attention from them to the context, through one of three backends."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from interp.attention import reduce_attention
from interp.errors import UserError
from interp.models import decoder_layers, embeddings
from interp.pairs import Pair

BACKENDS = ("nnsight", "transformer_lens", "torch")
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


@dataclass
class Captured:
    """What one forward yields on the measured tokens."""

    hidden: torch.Tensor  # [num_layers, n, d]: embeddings, then each decoder block's output
    attn_ctx: torch.Tensor | None  # [num_blocks, n, heads] attention mass on context tokens
    attn_sink: torch.Tensor | None  # [num_blocks, n, heads] attention on the first token
    attn_ctx_tokens: torch.Tensor | None  # [num_blocks, n, heads, C] attention on each context token


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


def _model_inputs(batch: Batch, device) -> dict:
    return dict(
        input_ids=batch.input_ids.to(device),
        attention_mask=batch.attention_mask.to(device),
        position_ids=batch.position_ids.to(device),
    )


def _to(batch: Batch, device) -> Batch:
    return Batch(**{k: v.to(device) for k, v in batch.__dict__.items()})


def _stack(hidden: list, attn: list | None) -> Captured:
    hidden = torch.stack([h.detach().float().cpu() for h in hidden])
    if not attn:
        return Captured(hidden, None, None, None)
    parts = [torch.stack([a[i].detach().cpu() for a in attn]) for i in range(3)]
    return Captured(hidden, *parts)


def _check_attention(model, attention: bool) -> None:
    impl = getattr(model.config, "_attn_implementation", None)
    if attention and impl not in (None, "eager"):
        raise UserError(
            f"attention weights need eager attention, but this model uses '{impl}'; load it with "
            "load_model(..., attn_implementation='eager') (the default) or pass attention=False"
        )


@torch.no_grad()
def capture_torch(lm, batch: Batch, attention: bool = True) -> Captured:
    """Plain PyTorch forward hooks on the embedding and each decoder block: the reference backend."""
    model = lm.model
    _check_attention(model, attention)
    device = lm.device
    b = _to(batch, device)
    hidden: list[torch.Tensor] = []
    attn: list[tuple] = []
    handles = [embeddings(model).register_forward_hook(lambda m, i, o: hidden.append(gather_tokens(_tensor(o), b)))]
    for layer in decoder_layers(model):
        if attention:
            handles.append(layer.self_attn.register_forward_hook(lambda m, i, o: attn.append(reduce_attention(o[1], b))))
        handles.append(layer.register_forward_hook(lambda m, i, o: hidden.append(gather_tokens(_tensor(o), b))))
    try:
        # Only the last position's logits: the lens recomputes what it needs on the measured tokens.
        model(**_model_inputs(batch, device), logits_to_keep=1, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return _stack(hidden, attn if attention else None)


def _tensor(output):
    """Decoder blocks return a tensor in transformers 5 and a tuple before; take the hidden state either way."""
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def capture_nnsight(lm, batch: Batch, attention: bool = True, remote: bool = False) -> Captured:
    """nnsight tracing: reads the same module outputs as the torch backend, through an nnsight envoy.

    `remote=True` runs the trace on NDIF (nnsight's hosted models) instead of locally: the path for models that
    outgrow one machine. It needs an NDIF API key and a model NDIF serves; everything else stays the same.
    """
    model = lm.model
    _check_attention(model, attention)
    traced = _nnsight_model(lm)
    b = _to(batch, lm.device)
    hidden, attn = [], []
    # The trace body runs inside nnsight; values leave it through `.save()`, and module outputs must be
    # requested in the order the model computes them (attention before the block's own output).
    with traced.trace(**_model_inputs(batch, lm.device), logits_to_keep=1, use_cache=False, **({"remote": True} if remote else {})):
        hidden.append(gather_tokens(traced.model.embed_tokens.output, b).save())
        for layer in traced.model.layers:
            if attention:
                attn.append(tuple(x.save() for x in reduce_attention(layer.self_attn.output[1], b)))
            hidden.append(gather_tokens(layer.output, b).save())
    return _stack(hidden, attn if attention else None)


def _nnsight_model(lm):
    """One nnsight envoy per LoadedModel; LoRA adapters switch in place underneath it."""
    cached = getattr(lm, "_nnsight", None)
    if cached is None or cached[0] is not lm.model:
        from nnsight.modeling.transformers import TransformersModel

        cached = (lm.model, TransformersModel(lm.model, tokenizer=lm.tokenizer))
        lm._nnsight = cached
    return cached[1]


@torch.no_grad()
def capture_transformer_lens(lm, batch: Batch, attention: bool = True) -> Captured:
    """TransformerLens 4's TransformerBridge: hook_embed, blocks.{l}.hook_out and blocks.{l}.attn.hook_pattern."""
    bridge = _bridge(lm)
    b = _to(batch, lm.device)
    n_blocks = len(decoder_layers(lm.model))
    wanted = {"hook_embed"} | {f"blocks.{i}.hook_out" for i in range(n_blocks)}
    if attention:
        wanted |= {f"blocks.{i}.attn.hook_pattern" for i in range(n_blocks)}
    inputs = _model_inputs(batch, lm.device)
    _, cache = bridge.run_with_cache(
        inputs.pop("input_ids"), names_filter=lambda name: name in wanted, return_type="logits", **inputs
    )
    hidden = [gather_tokens(cache["hook_embed"], b)] + [gather_tokens(cache[f"blocks.{i}.hook_out"], b) for i in range(n_blocks)]
    attn = [reduce_attention(cache[f"blocks.{i}.attn.hook_pattern"], b) for i in range(n_blocks)] if attention else None
    return _stack(hidden, attn)


def _bridge(lm):
    """A TransformerBridge over a copy of the model with the active adapter merged (the bridge wants plain weights)."""
    from transformer_lens.model_bridge import TransformerBridge

    key = lm.active_adapter
    bridges = lm.__dict__.setdefault("_bridges", {})
    if key not in bridges:
        if lm.peft is None:
            plain = copy.deepcopy(lm.model)
        else:
            wrapped = copy.deepcopy(lm.peft)
            if key is None:
                plain = wrapped.unload()
            else:
                wrapped.base_model.enable_adapter_layers()
                wrapped.set_adapter(key)
                plain = wrapped.merge_and_unload(adapter_names=[key])
        plain.config._attn_implementation = "eager"
        bridges[key] = TransformerBridge.boot_transformers(lm.spec, hf_model=plain, tokenizer=lm.tokenizer)
    return bridges[key]


CAPTURE: dict[str, Callable[..., Captured]] = {
    "nnsight": capture_nnsight,
    "transformer_lens": capture_transformer_lens,
    "torch": capture_torch,
}


def get_backend(name: str) -> Callable[..., Captured]:
    if name not in CAPTURE:
        raise UserError(f"unknown backend '{name}'; use one of {', '.join(BACKENDS)}")
    return CAPTURE[name]
