"""Capture per-layer hidden states on measured tokens, and attention from them to the context, through one of three backends."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch

from interp.attention import reduce_attention
from interp.core.archs import (arch_of, attention_module, block_input, block_output, decoder_layers, eager_attention,
                               inner_model)
from interp.core.errors import UserError
from interp.core.remote import remote_envoy
from interp.hooks import Batch, batch_to, envoy, gather_tokens, model_inputs, nnsight_model

BACKENDS = ("nnsight", "transformer_lens", "torch")


@dataclass
class Captured:
    """What one forward yields on the measured tokens, on the model's device (the caller decides when to go to the host)."""

    hidden: torch.Tensor  # [num_layers, n, d] float32: the first block's input (embeddings), then each block's output
    attn_ctx: torch.Tensor | None  # [num_blocks, n, heads] attention mass on context tokens
    attn_sink: torch.Tensor | None  # [num_blocks, n, heads] attention on the first token
    attn_ctx_tokens: torch.Tensor | None  # [num_blocks, n, heads, C] attention on each context token


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
    b = batch_to(batch, device)
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
            model(**model_inputs(batch, device), logits_to_keep=1, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return _stack(hidden, attn if attention else None)


@torch.no_grad()
def capture_nnsight(lm, batch: Batch, attention: bool = True, remote: bool = False) -> Captured:
    """nnsight tracing: reads the same module inputs and outputs as the torch backend, through nnsight envoys.

    `remote=True` runs the trace on NDIF with the model and adapter named by their Hugging Face ids
    (`interp.core.remote.remote_target`): a model or adapter NDIF cannot see is refused, never replaced by the base model.
    """
    model = lm.model
    traced = remote_envoy(lm, attention) if remote else nnsight_model(lm)
    b = batch_to(batch, lm.device)
    blocks = decoder_layers(model)
    # Module paths are the same on the remote model: nnsight attaches the adapter in place, as peft does here.
    root = inner_model(model) if remote else model
    block_envoys = [envoy(traced, root, layer) for layer in blocks]
    attn_envoys = [envoy(traced, root, attention_module(layer, model)) for layer in blocks] if attention else []
    hidden, attn = [], []
    # The trace body runs inside nnsight; values leave it through `.save()`, and module values must be requested in
    # the order the model computes them (block 0's input, then per block its attention, then its output).
    with eager_attention(model, attention and not remote):
        with traced.trace(**model_inputs(batch, lm.device), logits_to_keep=1, use_cache=False, **({"remote": True} if remote else {})):
            for i, layer in enumerate(block_envoys):
                if i == 0:
                    hidden.append(gather_tokens(block_output(layer.input), b).save())  # type: ignore[attr-defined]  # inside a trace these are nnsight proxies, which have .save()
                if attention:
                    attn.append(tuple(x.save() for x in reduce_attention(attn_envoys[i].output[1], b)))  # type: ignore[attr-defined]  # inside a trace these are nnsight proxies, which have .save()
                hidden.append(gather_tokens(block_output(layer.output), b).save())  # type: ignore[attr-defined]  # inside a trace these are nnsight proxies, which have .save()
    return _stack(hidden, attn if attention else None)


@torch.no_grad()
def capture_transformer_lens(lm, batch: Batch, attention: bool = True) -> Captured:
    """TransformerLens 4's TransformerBridge: blocks.0.hook_in, blocks.{l}.hook_out and blocks.{l}.attn.hook_pattern."""
    bridge = _bridge(lm)
    b = batch_to(batch, lm.device)
    n_blocks = len(decoder_layers(lm.model))
    # blocks.0.hook_in, not hook_embed: for GPT-2 the residual stream entering block 0 includes the position embedding.
    wanted = {"blocks.0.hook_in"} | {f"blocks.{i}.hook_out" for i in range(n_blocks)}
    if attention:
        wanted |= {f"blocks.{i}.attn.hook_pattern" for i in range(n_blocks)}
    inputs = model_inputs(batch, lm.device)
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
