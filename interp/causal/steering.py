"""Steering with the context vector: add α·v_l to the base model without the context, subtract it from the student
with the context, and re-run greedy generation under the intervention (docs/measures.md)."""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from interp.core.errors import UserError
from interp.core.generate import generate
from interp.core.pairs import render_prompt_pair

from interp.core.degenerate import is_degenerate
from interp.causal.results import SteerResult
from interp.causal.sites import BASE, check_layers, check_student, site_module

# Arms: which weights, which run, and the sign of the added vector.
ARMS = {"base+v": (BASE, "noctx", +1.0), "student-v": ("student", "ctx", -1.0)}
BASELINES = {"base+v": "base·noctx", "student-v": "student·ctx"}


def _field(record, name):
    return record.get(name) if isinstance(record, Mapping) else getattr(record, name, None)


@contextlib.contextmanager
def add_vector(lm, layer: int, vector: torch.Tensor | None):
    """Add `vector` [d] to the residual stream at `layer` (every position) while the block runs; None adds nothing."""
    if vector is None:
        yield
        return
    module = site_module(lm.model, "resid", layer)

    def hook(module, args, output):
        if isinstance(output, (tuple, list)):
            return (output[0] + vector.to(output[0].device, output[0].dtype), *output[1:])
        return output + vector.to(output.device, output.dtype)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _evaluate(lm, prompts, records, references, verifier, degenerate, max_new_tokens, batch_size) -> dict:
    ids = generate(lm, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    texts = [lm.tokenizer.decode(x, skip_special_tokens=True) for x in ids]
    correct = [bool(verifier(t, r if ref is None else {**_as_dict(r), "reference": ref})) for t, r, ref in zip(texts, records, references)]
    loops_ = [bool(degenerate(t)) for t in texts]
    n = len(ids)
    return {"acc": sum(correct) / n, "degenerate": sum(loops_) / n, "n": n, "responses": texts, "correct": correct,
            "loops": loops_}


def _as_dict(record) -> dict:
    if isinstance(record, Mapping):
        return dict(record)
    return {k: getattr(record, k) for k in ("context", "prompt", "reference", "verifier") if hasattr(record, k)}


@torch.no_grad()
def steer(
    lm,
    records: Sequence,
    vectors,
    alpha: float,
    *,
    verifier: Callable[[str, object], bool],
    student: str | None = None,
    layers: Sequence[int] | int | None = None,
    placement: str = "system",
    max_new_tokens: int = 32,
    batch_size: int = 16,
    degenerate: Callable[[str], bool] = is_degenerate,
) -> SteerResult:
    """Greedy generation under `α·v_l` added at one layer at a time (each of `layers`; default every block):

    - `base+v`: the base model without the context, plus α·v_l (internalization without training);
    - `student-v`: `student` with the context, minus α·v_l (the context taken back out once: if the student loops
      because the context is applied on top of itself, this should cure it).

    `records` carry `context`, `prompt`, `reference` and optionally `cf_context` / `cf_reference` (a counterfactual
    card: `follow_cf` is the share of the student's answers to it that the verifier accepts). `vectors` is
    [num_layers, d] (a Comparison's `v`, or the Comparison). `verifier(response, record)` says whether an answer is
    right; `degenerate(text)` whether it loops (interp.core.degenerate by default). α = 0 gives exactly the plain evaluation.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise UserError(f"alpha must be a finite number, got {alpha!r}")
    if student is not None:
        check_student(lm, student)
    v = np.asarray(getattr(vectors, "v", vectors), dtype=np.float64)
    if v.ndim != 2 or v.shape[0] != lm.num_layers:
        raise UserError(f"the context vectors have shape {v.shape}; expected [{lm.num_layers}, hidden size]")
    layers = check_layers(lm, list(range(1, lm.num_layers)) if layers is None else layers, "resid")
    records = list(records)
    if not records:
        raise UserError("no examples to steer")
    if max_new_tokens < 1:
        raise UserError("max new tokens must be at least 1")
    pps = [render_prompt_pair(lm.tokenizer, _field(r, "context"), _field(r, "prompt"), placement) for r in records]
    cf = [r for r in records if _field(r, "cf_context") and _field(r, "cf_reference")]
    cf_pps = [render_prompt_pair(lm.tokenizer, _field(r, "cf_context"), _field(r, "prompt"), placement) for r in cf]
    arms = {arm: spec for arm, spec in ARMS.items() if arm == "base+v" or student is not None}
    options = dict(max_new_tokens=max_new_tokens, batch_size=batch_size)

    def run(arm, layer):
        model, run_, sign = arms[arm]
        vec = None if layer is None else torch.tensor(sign * alpha * v[layer], dtype=torch.float32)
        with lm.use(None if model == BASE else student), add_vector(lm, layer if layer is not None else 0, vec):
            prompts = [p.ctx_ids if run_ == "ctx" else p.noctx_ids for p in pps]
            out = _evaluate(lm, prompts, records, [None] * len(records), verifier, degenerate, **options)
            out["follow_cf"] = None
            if arm == "student-v" and cf:
                got = _evaluate(lm, [p.ctx_ids for p in cf_pps], cf, [_field(r, "cf_reference") for r in cf], verifier,
                                degenerate, **options)
                out["follow_cf"], out["responses_cf"] = got["acc"], got["responses"]
        return out

    with lm.use(lm.active_adapter):
        baseline = {arm: run(arm, None) for arm in arms}
        results = {arm: {layer: run(arm, layer) for layer in layers} for arm in arms}
    return SteerResult(alpha=float(alpha), layers=layers, results=results, baseline=baseline,
                       meta={"model": lm.spec, "student": student, "placement": placement, "n_examples": len(records),
                             "max_new_tokens": max_new_tokens, "n_counterfactual": len(cf)})
