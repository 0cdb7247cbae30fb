"""Rollouts: the student samples responses without the context; the samples become aligned pairs and padded batches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, cast

import torch

from interp.core.generate import cache_argument, generate
from interp.core.models import LoadedModel
from interp.core.pairs import Pair, PromptPair, pair_from_ids


def sample(
    lm: LoadedModel,
    prompt_pairs: Sequence[PromptPair],
    *,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    seed: int | None = None,
    batch_size: int = 16,
    side: str = "noctx",
) -> list[list[int]]:
    """Sample one response per prompt from `lm` without the context (`side="ctx"`: with it), batched with the KV
    cache.

    The stop token is kept, so the losses also teach the student where to stop.
    """
    return generate(
        lm,
        [pp.noctx_ids if side == "noctx" else pp.ctx_ids for pp in prompt_pairs],
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        batch_size=batch_size,
        seed=seed,
        keep_stop=True,
    )


def rollout(lm: LoadedModel, examples, prompt_pairs: Sequence[PromptPair], placement: str, **options) -> list[Pair]:
    """Sample responses (without the context unless `side="ctx"`) and pair each with its twin on the other side
    (same response tokens)."""
    responses = sample(lm, prompt_pairs, **options)
    tok = lm.tokenizer
    return [
        pair_from_ids(pp, ids, ex.context, ex.prompt, cast(str, tok.decode(ids, skip_special_tokens=True)), placement)
        for ex, pp, ids in zip(examples, prompt_pairs, responses)
    ]


@dataclass
class Side:
    """Right-padded sequences plus where their response-predicting logits sit.

    `keep` is how many trailing positions the model must return logits for; `positions[b, t]` indexes into those
    kept logits the position that predicts response token t of row b (padded rows point at 0 and are masked).
    """

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    positions: torch.Tensor  # [B, R]
    keep: int
    prefix: int = 0  # leading columns identical in every row and before every response: encoded once, shared

    def to(self, device) -> "Side":
        return Side(self.input_ids.to(device), self.attention_mask.to(device), self.positions.to(device), self.keep, self.prefix)


@dataclass
class Batch:
    noctx: Side
    ctx: Side
    mask: torch.Tensor  # [B, R], 1 for real response tokens
    response_lens: list[int]
    targets: torch.Tensor  # [B, R] the response tokens (0 where padded)
    opd_keep: torch.Tensor | None = None  # [B, R] 1 where the distillation loss may count a token (loop_mask), else None

    @property
    def n_tokens(self) -> int:
        return int(self.mask.sum())

    def to(self, device) -> "Batch":
        keep = self.opd_keep.to(device) if self.opd_keep is not None else None
        return Batch(self.noctx.to(device), self.ctx.to(device), self.mask.to(device), self.response_lens, self.targets.to(device), keep)


def make_side(sequences: Sequence[Sequence[int]], response_lens: Sequence[int], pad_id: int) -> Side:
    """Right-pad `sequences` (each ending in its response). Right padding needs no position ids: causal attention
    keeps the trailing pads from touching real tokens."""
    width = max(len(s) for s in sequences)
    r_max = max(response_lens)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(sequences), width), dtype=torch.long)
    starts = []
    for row, (seq, r) in enumerate(zip(sequences, response_lens)):
        ids[row, : len(seq)] = torch.tensor(list(seq), dtype=torch.long)
        attn[row, : len(seq)] = 1
        starts.append(len(seq) - r - 1)  # position t-1 predicts token t: the first response token is predicted here
    lo = min(starts)
    positions = torch.zeros((len(sequences), r_max), dtype=torch.long)
    for row, (start, r) in enumerate(zip(starts, response_lens)):
        positions[row, :r] = torch.arange(start, start + r) - lo
    return Side(ids, attn, positions, keep=width - lo, prefix=min(_common_prefix(sequences), lo))


def _common_prefix(sequences: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix every sequence shares (the template and a shared context, typically)."""
    first, n = sequences[0], min(len(s) for s in sequences)
    for i in range(n):
        if any(s[i] != first[i] for s in sequences[1:]):
            return i
    return n


def collate(pairs: Sequence[Pair], pad_id: int, loop_starts: Sequence[int | None] | None = None) -> Batch:
    """One training batch from aligned pairs: both sides right-padded, one response mask shared by both.
    `loop_starts`: per pair, the index of the first response token the distillation loss leaves out (None: none)."""
    lens = [p.response_len for p in pairs]
    mask = torch.zeros((len(pairs), max(lens)), dtype=torch.float32)
    targets = torch.zeros((len(pairs), max(lens)), dtype=torch.long)
    for row, (r, p) in enumerate(zip(lens, pairs)):
        mask[row, :r] = 1.0
        targets[row, :r] = torch.tensor(p.response_ids, dtype=torch.long)
    noctx = make_side([p.noctx_ids for p in pairs], lens, pad_id)
    ctx = make_side([p.ctx_ids for p in pairs], lens, pad_id)
    keep = None
    if loop_starts is not None:
        keep = mask.clone()
        for row, start in enumerate(loop_starts):
            if start is not None:
                keep[row, start:] = 0.0
    return Batch(noctx, ctx, mask, lens, targets, keep)


# Below this many shared tokens, a second forward call costs more than it saves.
MIN_SHARED_PREFIX = 32


def prefix_cache(model, side: Side) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Keys and values of every layer for the side's shared prefix, encoded once: [(k, v)], each [1, heads, P, d]."""
    out = model(input_ids=side.input_ids[:1, : side.prefix], use_cache=True)
    # Newer transformers 5 releases name the returned cache `cache` (and deprecate `past_key_values`); earlier 5.x
    # releases, which pyproject.toml also allows, have only `past_key_values`.
    cache = out.cache if "cache" in out else out.past_key_values
    return [(layer.keys, layer.values) for layer in cache.layers]


def response_logits(model, side: Side, *, share_prefix: bool = False, kv: list | None = None) -> torch.Tensor:
    """Logits at the positions that predict the response tokens: [B, R, V]. Only the trailing `keep` positions go
    through the unembedding, which on a 49k vocabulary saves most of its cost.

    `share_prefix`: the prefix every row shares (a long system prompt) is encoded once and broadcast to the batch,
    its gradient flowing through that one encoding; `kv` gives that prefix's keys and values already encoded (a
    frozen teacher's, computed once per run). Same logits as encoding every row whole, to float tolerance."""
    B = side.input_ids.shape[0]
    if (share_prefix or kv is not None) and side.prefix >= MIN_SHARED_PREFIX and (B > 1 or kv is not None):
        from transformers import DynamicCache

        kv = kv if kv is not None else prefix_cache(model, side)
        cache = DynamicCache(ddp_cache_data=[(k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)) for k, v in kv])
        P, L = side.prefix, side.input_ids.shape[1]
        position_ids = torch.arange(P, L, device=side.input_ids.device).expand(B, -1)
        out = model(input_ids=side.input_ids[:, P:], attention_mask=side.attention_mask, position_ids=position_ids,
                    logits_to_keep=side.keep, use_cache=False, **{cache_argument(model) or "cache": cache})
    else:
        out = model(input_ids=side.input_ids, attention_mask=side.attention_mask, logits_to_keep=side.keep, use_cache=False)
    logits = out.logits
    index = side.positions.unsqueeze(-1).expand(-1, -1, logits.shape[-1])
    return logits.gather(1, index)


def both_sides(noctx: Side, ctx: Side, pad_id: int) -> Side:
    """The no-context and with-context rows stacked into one batch (one forward pass instead of two)."""
    width = max(noctx.input_ids.shape[1], ctx.input_ids.shape[1])

    def widen(side: Side) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        extra = width - side.input_ids.shape[1]
        ids = torch.nn.functional.pad(side.input_ids, (0, extra), value=pad_id)
        attn = torch.nn.functional.pad(side.attention_mask, (0, extra), value=0)
        # Positions were relative to the side's first kept column; make them relative to the joint one.
        return ids, attn, side.positions + (width - extra - side.keep)

    keep = max(noctx.keep + width - noctx.input_ids.shape[1], ctx.keep + width - ctx.input_ids.shape[1])
    a, b = widen(noctx), widen(ctx)
    lo = width - keep
    positions = torch.cat([a[2], b[2]]) - lo
    return Side(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]]), positions, keep)
