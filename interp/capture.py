"""Capture per-layer hidden states on measured tokens, and attention from them to the context, through one of three backends."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from interp.archs import arch_of, attention_module, block_input, block_output, eager_attention, inner_model
from interp.attention import reduce_attention
from interp.errors import UserError
from interp.models import decoder_layers
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
    """What one forward yields on the measured tokens, on the model's device (the caller decides when to go to the host)."""

    hidden: torch.Tensor  # [num_layers, n, d] float32: the first block's input (embeddings), then each block's output
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
    # float32 whatever the model runs in: the measures downstream need it, and bf16 states would round them.
    stacked = torch.stack([h.detach().float() for h in hidden])
    if not attn:
        return Captured(stacked, None, None, None)
    parts = [torch.stack([a[i].detach() for a in attn]) for i in range(3)]
    return Captured(stacked, *parts)


@torch.no_grad()
def capture_torch(lm, batch: Batch, attention: bool = True) -> Captured:
    """Plain PyTorch hooks on the first block's input and on each decoder block: the reference backend."""
    model = lm.model
    device = lm.device
    b = _to(batch, device)
    hidden: list[torch.Tensor] = []
    attn: list[tuple] = []
    layers = decoder_layers(model)
    # Layer 0 is the residual stream entering block 0 (token embeddings, plus position embeddings or scaling where
    # the architecture adds them), which is what output_hidden_states[0] holds too.
    handles = [layers[0].register_forward_pre_hook(
        lambda m, args, kwargs: hidden.append(gather_tokens(block_input(args, kwargs), b)), with_kwargs=True)]
    for layer in layers:
        if attention:
            handles.append(attention_module(layer, model).register_forward_hook(lambda m, i, o: attn.append(reduce_attention(o[1], b))))
        handles.append(layer.register_forward_hook(lambda m, i, o: hidden.append(gather_tokens(block_output(o), b))))
    try:
        with eager_attention(model, attention):
            # Only the last position's logits: the lens recomputes what it needs on the measured tokens.
            model(**_model_inputs(batch, device), logits_to_keep=1, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return _stack(hidden, attn if attention else None)


def _envoy(root_envoy, paths: dict, module: torch.nn.Module):
    """The nnsight envoy of `module`, found by its dotted path (`paths`: id -> name under the root) in any layout."""
    path = paths[id(module)]
    envoy = root_envoy
    for part in path.split(".") if path else []:
        envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
    return envoy


@torch.no_grad()
def capture_nnsight(lm, batch: Batch, attention: bool = True, remote: bool = False) -> Captured:
    """nnsight tracing: reads the same module inputs and outputs as the torch backend, through nnsight envoys.

    `remote=True` runs the trace on NDIF with the model and adapter named by their Hugging Face ids
    (`interp.remote.remote_target`): a model or adapter NDIF cannot see is refused, never replaced by the base model.
    """
    model = lm.model
    if remote:
        from interp.remote import remote_envoy

        traced = remote_envoy(lm, attention)
    else:
        traced = _nnsight_model(lm)
    b = _to(batch, lm.device)
    blocks = decoder_layers(model)
    # Module paths are the same on the remote model: nnsight attaches the adapter in place, as peft does here.
    paths = {id(m): name for name, m in (inner_model(model) if remote else model).named_modules()}
    block_envoys = [_envoy(traced, paths, layer) for layer in blocks]
    attn_envoys = [_envoy(traced, paths, attention_module(layer, model)) for layer in blocks] if attention else []
    hidden, attn = [], []
    # The trace body runs inside nnsight; values leave it through `.save()`, and module values must be requested in
    # the order the model computes them (block 0's input, then per block its attention, then its output).
    with eager_attention(model, attention and not remote):
        with traced.trace(**_model_inputs(batch, lm.device), logits_to_keep=1, use_cache=False, **({"remote": True} if remote else {})):
            for i, layer in enumerate(block_envoys):
                if i == 0:
                    hidden.append(gather_tokens(block_output(layer.input), b).save())  # type: ignore[attr-defined]  # inside a trace these are nnsight proxies, which have .save()
                if attention:
                    attn.append(tuple(x.save() for x in reduce_attention(attn_envoys[i].output[1], b)))  # type: ignore[attr-defined]  # inside a trace these are nnsight proxies, which have .save()
                hidden.append(gather_tokens(block_output(layer.output), b).save())  # type: ignore[attr-defined]  # inside a trace these are nnsight proxies, which have .save()
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
    """TransformerLens 4's TransformerBridge: blocks.0.hook_in, blocks.{l}.hook_out and blocks.{l}.attn.hook_pattern."""
    bridge = _bridge(lm)
    b = _to(batch, lm.device)
    n_blocks = len(decoder_layers(lm.model))
    # blocks.0.hook_in, not hook_embed: for GPT-2 the residual stream entering block 0 includes the position embedding.
    wanted = {"blocks.0.hook_in"} | {f"blocks.{i}.hook_out" for i in range(n_blocks)}
    if attention:
        wanted |= {f"blocks.{i}.attn.hook_pattern" for i in range(n_blocks)}
    inputs = _model_inputs(batch, lm.device)
    _, cache = bridge.run_with_cache(
        inputs.pop("input_ids"), names_filter=lambda name: name in wanted, return_type="logits", **inputs
    )
    hidden = [gather_tokens(cache["blocks.0.hook_in"], b)] + [gather_tokens(cache[f"blocks.{i}.hook_out"], b) for i in range(n_blocks)]
    attn = [reduce_attention(cache[f"blocks.{i}.attn.hook_pattern"], b) for i in range(n_blocks)] if attention else None
    return _stack(hidden, attn)


def _bridge(lm):
    """A TransformerBridge over a copy of the model with the active adapter merged (the bridge wants plain weights)."""
    from transformer_lens.model_bridge import TransformerBridge

    arch_of(lm.model)
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
        plain = inner_model(plain)
        plain.set_attn_implementation("eager")  # the bridge reads attention patterns, which only eager returns
        try:
            bridges[key] = TransformerBridge.boot_transformers(lm.spec, hf_model=plain, tokenizer=lm.tokenizer)
        except (ValueError, NotImplementedError, KeyError) as err:
            raise UserError(f"TransformerLens's TransformerBridge does not support {type(plain).__name__} "
                            f"({str(err).splitlines()[0][:120]}); use --backend nnsight or torch") from err
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
