"""Batched generation from token ids (greedy or sampled), with the KV cache, returning only the new tokens.

A model carrying an active LoRA adapter generates with the adapter merged into its weights for the duration of the
call (`merged_lora`): the same function, without the adapter's extra small matrix products at every layer and step
(they made generation 2.9× the bare model's on CPU; merged, 1.1×: bench/generate.py). The weights are restored
exactly afterwards, so training keeps seeing the unmerged LoRA parameters (docs/measures.md#generation).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch


def stop_ids(model, tokenizer) -> list[int]:
    """Token ids that end a response: the tokenizer's EOS and whatever the generation config lists."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return sorted(i for i in ids if i is not None)


def left_pad(batch: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded input ids and attention mask, so every row's last token sits in the last column."""
    width = max(len(x) for x in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, x in enumerate(batch):
        ids[row, width - len(x) :] = torch.tensor(list(x), dtype=torch.long)
        mask[row, width - len(x) :] = 1
    return ids.to(device), mask.to(device)


def _lora_layers(model) -> list:
    """The model's LoRA layers whose adapter is switched on (peft's `LoraLayer`), or [] for a model without any."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # peft is a dependency; a model without adapters needs none of this
        return []
    return [m for m in model.modules() if isinstance(m, LoraLayer) and not m.disable_adapters and not m.merged]


@contextlib.contextmanager
def merged_lora(model) -> Iterator[bool]:
    """Inside the block the active LoRA adapters are merged into fresh copies of their base weights (W + s·BA) and
    the adapter branches are skipped; on leaving, the original weight tensors are put back untouched (no
    subtraction, so no rounding is left behind) and the branches come back. Yields whether anything was merged.

    Only for inference (no gradient reaches the merged copies). It costs one extra copy of the adapted weights while
    it lasts. Adapters that cannot be merged exactly this way (DoRA and other variants) are left unmerged."""
    layers = [m for m in _lora_layers(model) if not getattr(m, "lora_variant", None)]
    saved = []
    try:
        for layer in layers:
            active = [a for a in layer.active_adapters if a in layer.lora_A]
            if not active:
                continue
            base = layer.get_base_layer()
            bias = getattr(base, "bias", None)
            saved.append((layer, base.weight.data, bias.data if bias is not None else None))
            # safe_merge builds W + ΔW in a new tensor and points the weight at it: the old tensor stays as it was.
            layer.merge(safe_merge=True, adapter_names=active)
        yield bool(saved)
    finally:
        for layer, weight, bias in saved:
            base = layer.get_base_layer()
            base.weight.data = weight
            if bias is not None:
                base.bias.data = bias
            layer.merged_adapters.clear()


@torch.no_grad()
def generate(
    lm,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    batch_size: int = 16,
    seed: int | None = None,
    keep_stop: bool = False,
    merge: bool = True,
    min_new_tokens: int = 0,
) -> list[list[int]]:
    """Continue each prompt (a list of token ids) with `lm.model`; temperature 0 is greedy decoding.

    Returns the new tokens of each prompt, in the input order, cut before the first stop token
    (or after it with `keep_stop`). Prompts are batched by length so padding stays small. An active LoRA adapter is
    merged for the call (`merged_lora`) unless `merge=False`. `min_new_tokens` keeps the stop token away that long
    (benchmarks use it to time equal token counts).
    """
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    model, tokenizer = lm.model, lm.tokenizer
    stops = stop_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int] | None] = [None] * len(prompts)
    was_training = model.training
    model.eval()
    merging = merged_lora(model) if merge else contextlib.nullcontext()
    with merging, torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
        if seed is not None:
            torch.manual_seed(seed)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            ids, mask = left_pad([prompts[i] for i in rows], pad_id, device)
            sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else dict(do_sample=False)
            new = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                min_new_tokens=min_new_tokens,
                pad_token_id=pad_id,
                eos_token_id=stops,
                **sampling,
            )[:, ids.shape[1] :].tolist()
            for i, tokens in zip(rows, new):
                out[i] = _cut(tokens, stops, keep_stop)
    model.train(was_training)
    return out  # type: ignore[return-value]


def _cut(tokens: list[int], stops: list[int], keep_stop: bool) -> list[int]:
    for j, t in enumerate(tokens):
        if t in stops:
            return tokens[: j + 1] if keep_stop else tokens[:j]
    return tokens
