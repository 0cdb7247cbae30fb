"""Activation patching on aligned tokens: run a target state with a source state's activation at one layer (and
site) on the measured positions, and measure how far the target's output moves to the source's
(docs/measures.md, "Causal and cross-model measures")."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from interp.hooks import make_batch
from interp.core.errors import UserError
from interp.core.pairs import SCOPES, Pair

from interp.causal.forward import Op, check_backend, kl_rows, last_layer_op, log_probs, run_ops
from interp.causal.results import PatchResult
from interp.causal.sites import BASE, check_layers, num_heads, state


def reference_token_indices(tokenizer, pair: Pair, reference: str | None) -> list[int]:
    """Indices, among the pair's response tokens, of the tokens that spell the first occurrence of the reference
    (or of any of its `|` alternatives, ignoring case) in the response; empty when it does not occur."""
    if not reference:
        return []
    ids = list(pair.response_ids)
    ends, text = [], ""
    for j in range(len(ids)):
        text = tokenizer.decode(ids[: j + 1])
        ends.append(len(text))
    low = text.lower()
    hits = [(low.find(alt.strip().lower()), len(alt.strip())) for alt in reference.split("|") if alt.strip()]
    hits = [(s, n) for s, n in hits if s >= 0]
    if not hits:
        return []
    start, length = min(hits)
    end = start + length
    begins = [0] + ends[:-1]
    return [j for j, (b, e) in enumerate(zip(begins, ends)) if b < end and e > start]


def _check_pairs(pairs: Sequence[Pair], target_pairs: Sequence[Pair] | None) -> list[Pair]:
    pairs = list(pairs)
    if not pairs:
        raise UserError("no pairs to patch")
    if target_pairs is not None:
        target_pairs = list(target_pairs)
        if len(target_pairs) != len(pairs):
            raise UserError(f"{len(pairs)} source pairs but {len(target_pairs)} target pairs; patching needs one target per source")
        for i, (a, b) in enumerate(zip(pairs, target_pairs), 1):
            if a.shared_len != b.shared_len or a.ctx_ids[-a.shared_len :] != b.ctx_ids[-b.shared_len :]:
                raise UserError(f"pair {i}: the source and target pairs do not share the same tokens; positions would not correspond")
    for i, p in enumerate(pairs, 1):
        if p.ctx_ids[-p.shared_len :] != p.noctx_ids[-p.shared_len :]:
            raise UserError(f"pair {i}: the shared tokens differ with and without the context; build pairs with interp.make_pairs")
    return pairs


def _site_ops(site: str, layer: int, heads: bool) -> str:
    if site == "resid":
        return "embed" if layer == 0 else "block"
    if site == "attn":
        return "head_in" if heads else "attn"
    return "mlp"


@torch.no_grad()
def patch(
    lm,
    pairs: Sequence[Pair],
    source=("base", "ctx"),
    target=("base", "noctx"),
    layers: Sequence[int] | int | None = None,
    site: str = "resid",
    *,
    heads: bool = False,
    backend: str = "nnsight",
    scope: str = "response",
    references: Sequence[str | None] | None = None,
    target_pairs: Sequence[Pair] | None = None,
    batch_size: int = 8,
    progress: bool = False,
    remote: bool = False,
) -> PatchResult:
    """Run `target` (model, run) with `source`'s activation at each of `layers` put in on the measured positions,
    one layer at a time, and measure the recovery of the source's output (docs/measures.md).

    `model` is "base" or a loaded adapter's name; `run` is "ctx" or "noctx". Sites: `resid` (the residual stream:
    embeddings at layer 0, block l's output at layer l), `attn` (block l's attention output; `heads=True` patches
    one head at a time, through the input of the output projection) and `mlp` (block l's MLP output). `scope`
    picks the patched and measured positions (`response`, or `shared`: user turn and response). `references`
    (one string or None per pair) adds the log-probability change of the reference answer's tokens where the
    response contains them. The nnsight and torch backends give the same numbers.
    """
    src, tgt = state(source, lm), state(target, lm)
    layers = check_layers(lm, layers, site)
    check_backend(backend)
    if scope not in SCOPES:
        raise UserError(f"unknown scope '{scope}'; use one of {', '.join(SCOPES)}")
    if heads and site != "attn":
        raise UserError("per-head patching exists for the attention site only (site='attn')")
    if batch_size < 1:
        raise UserError("batch size must be at least 1")
    pairs = _check_pairs(pairs, target_pairs)
    tgt_pairs = list(target_pairs) if target_pairs is not None else pairs
    if references is not None and len(references) != len(pairs):
        raise UserError(f"{len(references)} references for {len(pairs)} pairs")
    n_heads, head_dim = num_heads(lm.model)
    L = lm.num_layers
    shape = (L, n_heads) if heads else (L,)
    pad_id = lm.tokenizer.pad_token_id or 0

    kl_patched, kl_target, token_example, target_id = [], [], [], []
    ref_sum_src, ref_sum_tgt, ref_n = 0.0, 0.0, 0
    ref_sum_patched = np.zeros(shape)
    units = [(layer, h) for layer in layers for h in (range(n_heads) if heads else [None])]
    bar = tqdm(total=len(pairs) * len(units), desc=f"patch {src.label} → {tgt.label}", disable=not progress)
    with lm.use(lm.active_adapter):
        for start in range(0, len(pairs), batch_size):
            chunk, tchunk = pairs[start : start + batch_size], tgt_pairs[start : start + batch_size]
            sb = make_batch(chunk, src.run, scope, "right", pad_id)
            tb = make_batch(tchunk, tgt.run, scope, "right", pad_id)
            if not torch.equal(sb.targets, tb.targets):
                raise UserError(f"pairs {start + 1}..{start + len(chunk)}: the measured tokens of source and target differ")
            n = sb.targets.shape[0]
            # Which measured tokens spell the reference answer, per batch.
            ref_list: list[int] = []
            if references is not None:
                offset = 0
                for b, p in enumerate(chunk):
                    m = p.measured(scope, tgt.run)
                    first_response = len(p.ctx_ids if tgt.run == "ctx" else p.noctx_ids) - p.response_len - 1 - m.start
                    ref_list += [offset + first_response + j for j in reference_token_indices(lm.tokenizer, p, references[start + b])]
                    offset += len(m)
            ref_idx = torch.tensor(ref_list, dtype=torch.long)

            lm.set_adapter(src.adapter)
            reads = [Op(layer, _site_ops(site, layer, heads)) for layer in layers] + [last_layer_op(lm.model)]
            got = run_ops(lm, sb, reads, backend, remote)
            last_src = got[-1]
            assert last_src is not None  # reads always return a tensor
            acts, logp_src = dict(zip(layers, got[:-1])), log_probs(lm, last_src)
            lm.set_adapter(tgt.adapter)
            last_tgt = run_ops(lm, tb, [last_layer_op(lm.model)], backend, remote)[0]
            assert last_tgt is not None
            logp_tgt = log_probs(lm, last_tgt)
            p_src = logp_src.exp()
            kl_target.append(kl_rows(logp_src, logp_tgt, p_src).numpy())
            batch_kl = np.full(shape + (n,), np.nan)
            tgt_ids = tb.targets
            if ref_idx.numel():
                ref_sum_src += float(logp_src[ref_idx, tgt_ids[ref_idx]].double().sum())
                ref_sum_tgt += float(logp_tgt[ref_idx, tgt_ids[ref_idx]].double().sum())
                ref_n += int(ref_idx.numel())
            for layer, h in units:
                value = acts[layer]
                assert value is not None  # a read
                if h is not None:
                    cols = (h * head_dim, (h + 1) * head_dim)
                    op = Op(layer, "head_in", value[:, cols[0] : cols[1]], cols)
                else:
                    op = Op(layer, _site_ops(site, layer, heads), value)
                last = run_ops(lm, tb, [op, last_layer_op(lm.model)], backend, remote)[1]
                assert last is not None  # a read
                logp = log_probs(lm, last)
                index = (layer, h) if h is not None else (layer,)
                batch_kl[index] = kl_rows(logp_src, logp, p_src).numpy()
                if ref_idx.numel():
                    ref_sum_patched[index] += float(logp[ref_idx, tgt_ids[ref_idx]].double().sum())
                bar.update(len(chunk))
            kl_patched.append(batch_kl)
            token_example.append(sb.rows.numpy() + start)
            target_id.append(tgt_ids.numpy())
    bar.close()

    kl_patched_all = np.concatenate(kl_patched, axis=-1)
    kl_target_all = np.concatenate(kl_target)
    den = kl_target_all.mean()
    with np.errstate(divide="ignore", invalid="ignore"):
        recovery = 1.0 - kl_patched_all.mean(-1) / den if den > 0 else np.full(shape, np.nan)
    visited = np.zeros(L, dtype=bool)
    visited[layers] = True
    recovery[~visited] = np.nan
    ref_patched = None
    if ref_n:
        ref_patched = ref_sum_patched / ref_n
        ref_patched[~visited] = np.nan
    return PatchResult(
        source=src.label, target=tgt.label, site=site, layers=layers, recovery=recovery,
        kl_patched=kl_patched_all, kl_target=kl_target_all, token_example=np.concatenate(token_example),
        target_id=np.concatenate(target_id),
        ref_logprob_source=ref_sum_src / ref_n if ref_n else float("nan"),
        ref_logprob_target=ref_sum_tgt / ref_n if ref_n else float("nan"),
        ref_logprob_patched=ref_patched, n_ref_tokens=ref_n, heads=heads,
        meta={"model": lm.spec, "source": [src.model, src.run], "target": [tgt.model, tgt.run], "site": site,
              "heads": heads, "backend": backend, "scope": scope, "n_examples": len(pairs),
              "n_tokens": int(kl_target_all.shape[0]), "num_layers": L},
    )


def context_sweep(lm, pairs: Sequence[Pair], site: str = "resid", layers=None, **options) -> PatchResult:
    """Where the context's effect is carried: the base model with the context patched into the base model without
    it (B·ctx → B·noctx), one layer at a time."""
    return patch(lm, pairs, source=(BASE, "ctx"), target=(BASE, "noctx"), layers=layers, site=site, **options)


def repair_sweep(lm, pairs: Sequence[Pair], student: str, site: str = "resid", layers=None, **options) -> PatchResult:
    """Which layers, restored to the no-context state, undo what the context does to the student: the student
    without the context patched into the student with it (S·noctx → S·ctx), one layer at a time. Run it on the
    student's answers with the context (the degenerate ones) to see which layers carry the degradation."""
    return patch(lm, pairs, source=(student, "noctx"), target=(student, "ctx"), layers=layers, site=site, **options)
