"""Batched generation from token ids (greedy or sampled), with the KV cache, returning only the new tokens.

The decoding loop is our own (`decode`): a row that has given its stop token leaves the batch and the KV cache, so
the rows still writing decode faster (on CPU a step of 1 row costs 0.38 of a step of 8), and none of `generate`'s
per-step machinery runs (0.83 of its step). Greedy answers are HF `generate`'s token for token; sampled ones have
its distribution (`tests/test_generation.py`; bench/decode_profile.py has the profile behind both).

A model carrying an active LoRA adapter generates with the adapter merged into its weights for the duration of the
call (`merged_lora`): the same function, without the adapter's extra small matrix products at every layer and step
(they made generation 2.9× the bare model's on CPU; merged, 1.1×: bench/generate.py). The weights are restored
exactly afterwards, so training keeps seeing the unmerged LoRA parameters (docs/measures.md#generation).
"""

from __future__ import annotations

import contextlib
import inspect
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
    engine: str = "loop",
) -> list[list[int]]:
    """Continue each prompt (a list of token ids) with `lm.model`; temperature 0 is greedy decoding.

    Returns the new tokens of each prompt, in the input order, cut before the first stop token
    (or after it with `keep_stop`). Prompts are batched by length so padding stays small. An active LoRA adapter is
    merged for the call (`merged_lora`) unless `merge=False`. `min_new_tokens` keeps the stop token away that long
    (benchmarks use it to time equal token counts). `engine="hf"` decodes with HF `generate` instead of `decode`
    (benchmarks and tests compare the two; a model `decode` cannot drive falls back to it).
    """
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    if engine not in ("loop", "hf"):
        raise ValueError(f"unknown engine '{engine}': use loop or hf")
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
            if engine == "loop" and _loop_supported(model):
                new = decode(model, ids, mask, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, stops=stops,
                             temperature=temperature)
            else:
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


# Generation-config settings that add a logits processor `decode` does not apply: a model that sets one decodes with
# HF `generate` (none of the toolkit's models does).
_PROCESSORS = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "bad_words_ids": None, "suppress_tokens": None,
               "begin_suppress_tokens": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
               "sequence_bias": None, "encoder_repetition_penalty": 1.0, "exponential_decay_length_penalty": None}


def _decoder(model):
    """The transformers model under a peft wrapper (its LoRA layers sit inside it), or the model itself."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def cache_argument(model) -> str | None:
    """The name under which the model's forward takes a KV cache: `cache` in current transformers 5 releases,
    `past_key_values` in the earlier 5.x ones (pyproject.toml allows both), or None where it takes neither."""
    params = inspect.signature(_decoder(model).forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def _loop_supported(model) -> bool:
    inner = _decoder(model)
    config = getattr(inner, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    params = inspect.signature(inner.forward).parameters
    if cache_argument(inner) is None or not {"attention_mask", "position_ids"} <= params.keys():
        return False
    gen = getattr(inner, "generation_config", None)
    return all(getattr(gen, k, default) in (default, None) for k, default in _PROCESSORS.items())


def decode(model, ids: torch.Tensor, mask: torch.Tensor, *, max_new_tokens: int, min_new_tokens: int = 0,
           stops: Sequence[int], temperature: float = 0.0) -> list[list[int]]:
    """Decode left-padded rows with the KV cache; each row's new tokens up to and including its first stop token.

    Greedy (temperature 0: the arg max of the float32 logits) or sampled from softmax(logits / temperature), as HF
    `generate` does with `top_k=0, top_p=1`; a stop token is not chosen before `min_new_tokens`. A row that gives a
    stop token leaves the batch: its KV cache rows are dropped (`Cache.batch_select_indices`), so later steps compute
    only the rows still writing. Positions are HF's: the mask's running count minus one, 0 on the padding.
    """
    from transformers import DynamicCache

    inner = _decoder(model)
    cache = DynamicCache(config=inner.config.get_text_config(decoder=True))
    keep_logits = "logits_to_keep" in inspect.signature(inner.forward).parameters
    extra = {"logits_to_keep": 1} if keep_logits else {}
    cache_name = cache_argument(inner) or "cache"
    stop_t = torch.tensor(list(stops), device=ids.device)
    pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    out: list[list[int]] = [[] for _ in range(ids.shape[0])]
    live = torch.arange(ids.shape[0], device=ids.device)  # the original row of each row still in the batch
    step_ids = ids
    for step in range(max_new_tokens):
        logits = inner(input_ids=step_ids, attention_mask=mask, position_ids=pos, use_cache=True,
                       **{cache_name: cache}, **extra).logits[:, -1].float()
        if step < min_new_tokens and len(stops):
            logits[:, stop_t] = -float("inf")
        if temperature > 0:
            nxt = torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1)
        else:
            nxt = logits.argmax(-1, keepdim=True)
        for row, token in zip(live.tolist(), nxt[:, 0].tolist()):
            out[row].append(token)
        if step == max_new_tokens - 1:
            break
        going = ~torch.isin(nxt[:, 0], stop_t)
        if not bool(going.all()):
            if not bool(going.any()):
                break
            kept = going.nonzero()[:, 0]
            cache.batch_select_indices(kept)
            live, nxt, mask, pos = live[kept], nxt[kept], mask[kept], pos[kept]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        pos = pos[:, -1:] + 1
        step_ids = nxt
    return out


def _cut(tokens: list[int], stops: list[int], keep_stop: bool) -> list[int]:
    for j, t in enumerate(tokens):
        if t in stops:
            return tokens[: j + 1] if keep_stop else tokens[:j]
    return tokens
