"""Flip forensics for one example: where the student's answers with and without the context part ways, which layers
carry the fork, and which heads' reading of the context moved there (docs/measures.md)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch

from interp.capture import capture_torch
from interp.hooks import make_batch
from interp.core.errors import UserError
from interp.core.pairs import pair_from_ids, render_prompt_pair

from interp.causal.forward import Op, check_backend, kl_rows, last_layer_op, log_probs, run_ops
from interp.causal.results import Explanation
from interp.causal.sites import BASE, check_student


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first position where two token lists differ (a list ending counts as a difference); None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


@torch.no_grad()
def explain(
    lm,
    record,
    student: str,
    ids_noctx: Sequence[int],
    ids_ctx: Sequence[int],
    *,
    placement: str = "system",
    top_heads: int = 5,
    top_tokens: int = 5,
    backend: str = "nnsight",
) -> Explanation:
    """Flip forensics for one example: `record` has `context` and `prompt`; `ids_noctx` / `ids_ctx` are the
    student's greedy answers (token ids) without and with the context."""
    check_student(lm, student)
    check_backend(backend)
    get: Callable[[str], Any] = (lambda k: record.get(k)) if isinstance(record, dict) else (lambda k: getattr(record, k, None))
    context, prompt = get("context"), get("prompt")
    fork = first_difference(list(ids_noctx), list(ids_ctx))
    if fork is None:
        raise UserError("the student's answers with and without the context are identical; there is no fork to explain")
    tok = lm.tokenizer
    eos = tok.eos_token_id
    id_ctx = int(ids_ctx[fork]) if fork < len(ids_ctx) else eos
    id_noctx = int(ids_noctx[fork]) if fork < len(ids_noctx) else eos
    prefix = list(ids_ctx[:fork])
    pp = render_prompt_pair(tok, context, prompt, placement)
    pair = pair_from_ids(pp, prefix + [id_ctx], context, prompt, tok.decode(prefix + [id_ctx]), placement)
    pad_id = tok.pad_token_id or 0
    adapter = None if student == BASE else student
    L = lm.num_layers

    with lm.use(lm.active_adapter):
        lm.set_adapter(adapter)
        # The fork's prediction is the last measured position; every shared position is patched.
        sb, tb = make_batch([pair], "noctx", "shared", "right", pad_id), make_batch([pair], "ctx", "shared", "right", pad_id)
        reads = [Op(0, "embed")] + [Op(layer, "block") for layer in range(1, L)] + [last_layer_op(lm.model)]
        got = run_ops(lm, sb, reads, backend)
        last_src = got[-1]
        assert last_src is not None  # reads always return a tensor
        logp_src = log_probs(lm, last_src)[-1:]
        last_tgt = run_ops(lm, tb, [last_layer_op(lm.model)], backend)[0]
        assert last_tgt is not None
        logp_tgt = log_probs(lm, last_tgt)[-1:]
        den = float(kl_rows(logp_src, logp_tgt)[0])
        recovery, lp_ctx, lp_noctx = np.zeros(L), np.zeros(L), np.zeros(L)
        for layer in range(L):
            op = Op(layer, "embed" if layer == 0 else "block", got[layer])
            last = run_ops(lm, tb, [op, last_layer_op(lm.model)], backend)[1]
            assert last is not None  # a read
            logp = log_probs(lm, last)[-1:]
            recovery[layer] = 1.0 - float(kl_rows(logp_src, logp)[0]) / den if den > 0 else np.nan
            lp_ctx[layer], lp_noctx[layer] = float(logp[0, id_ctx]), float(logp[0, id_noctx])
        clean = {"student_ctx": {"ctx_token": float(logp_tgt[0, id_ctx]), "noctx_token": float(logp_tgt[0, id_noctx])},
                 "student_noctx": {"ctx_token": float(logp_src[0, id_ctx]), "noctx_token": float(logp_src[0, id_noctx])}}

        # Attention from the fork to the context: the student against the base, both with the context.
        batch = make_batch([pair], "ctx", "response", "right", pad_id)
        attn = {}
        for who, name in (("student", adapter), ("base", None)):
            lm.set_adapter(name)
            cap = capture_torch(lm, batch, attention=True)
            assert cap.attn_ctx is not None and cap.attn_ctx_tokens is not None  # set with attention=True
            attn[who] = (cap.attn_ctx[:, -1].double().numpy(), cap.attn_ctx_tokens[:, -1].double().numpy())
    start, end = pair.ctx_span
    n_ctx = end - start
    ctx_tokens = [tok.decode([t]) for t in pair.ctx_ids[start:end]]
    a_s, a_b = attn["student"][0], attn["base"][0]
    delta = a_s - a_b
    order = np.argsort(-np.abs(delta), axis=None)[:top_heads]
    heads, weights = [], []
    for flat in order:
        block, head = np.unravel_index(int(flat), delta.shape)
        w = attn["student"][1][block, head, :n_ctx]
        weights.append(w)
        best = np.argsort(-w)[:top_tokens]
        heads.append({"layer": int(block) + 1, "head": int(head), "attn_student": float(a_s[block, head]),
                      "attn_base": float(a_b[block, head]), "delta": float(delta[block, head]),
                      "top_tokens": [{"index": int(i), "token": ctx_tokens[i], "weight": float(w[i])} for i in best]})
    return Explanation(
        example={"context": context, "prompt": prompt, "response_noctx": tok.decode(list(ids_noctx)),
                 "response_ctx": tok.decode(list(ids_ctx))},
        fork=int(fork), prefix=tok.decode(prefix), token_ctx=tok.decode([id_ctx]), token_noctx=tok.decode([id_noctx]),
        id_ctx=id_ctx, id_noctx=id_noctx, recovery=recovery, logprob_ctx_token=lp_ctx, logprob_noctx_token=lp_noctx,
        clean=clean, attn_student=a_s, attn_base=a_b, heads=heads, ctx_tokens=ctx_tokens,
        ctx_weights=np.mean(weights, axis=0) if weights else np.zeros(n_ctx),
        meta={"model": lm.spec, "student": student, "placement": placement, "backend": backend},
    )
