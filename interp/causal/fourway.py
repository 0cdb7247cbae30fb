"""Four-way comparison of a base model B and a student S, with and without the context, on identical tokens
(docs/measures.md, "Causal and cross-model measures")."""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from interp.capture import get_backend
from interp.hooks import make_batch
from interp.core.errors import UserError
from interp.lens import DEFAULT_CHUNK
from interp.tuned_lens import check_lens_choice, read_lens, resolve_lens
from interp.metrics import CKAAccumulator, cosine_per_token
from interp.core.pairs import SCOPES, Pair

from interp.causal.results import Comparison
from interp.causal.sites import BASE, check_student
from interp.causal.vectors import MeanAccumulator, context_vectors, projection, row_cosine

RUN_NAMES = ("base_ctx", "base_noctx", "student_ctx", "student_noctx")
# Each comparison is (a, b); its lens KL is KL(lens_a || lens_b), so that at the last layer `internalization` is the
# distillation loss L_opd and `removability` the consistency loss L_cons on these tokens.
COMPARISONS = {
    "internalization": ("student_noctx", "base_ctx"),
    "removability": ("student_noctx", "student_ctx"),
    "context_kept": ("student_ctx", "base_ctx"),
    "base_context": ("base_noctx", "base_ctx"),
    "adapter": ("student_noctx", "base_noctx"),
}


def _lens_kls(model, hidden: dict[str, torch.Tensor], names: Sequence[str], chunk: int, tuned=None) -> dict[str, torch.Tensor]:
    """KL(lens(h_a) || lens(h_b)) per layer and token [L, n] for each comparison, in chunks of tokens. Each run is
    projected once per layer and chunk, however many comparisons it takes part in (the projection is the cost).
    `tuned`: a TunedLens reads every run (the base's lens, also for the student), else the logit lens."""
    runs = sorted({r for c in names for r in COMPARISONS[c]})
    L, n, _ = hidden[runs[0]].shape
    out = {c: torch.empty(L, n, dtype=torch.float64) for c in names}
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        for layer in range(L):
            # Runs that are one tensor (the base compared with itself) are projected once.
            by_id: dict[int, torch.Tensor] = {}
            for r in runs:
                if id(hidden[r]) not in by_id:
                    by_id[id(hidden[r])] = torch.log_softmax(read_lens(model, hidden[r][layer, a:b], layer, tuned), -1)
            logp = {r: by_id[id(hidden[r])] for r in runs}
            for c in names:
                x, y = COMPARISONS[c]
                out[c][layer, a:b] = (logp[x].exp() * (logp[x] - logp[y])).sum(-1).clamp_min(0.0).double().cpu()
    return out


@torch.no_grad()
def compare(
    lm,
    pairs: Sequence[Pair],
    student: str,
    backend: str = "nnsight",
    *,
    scope: str = "response",
    batch_size: int = 8,
    lens: bool = True,
    comparisons: Sequence[str] | None = None,
    lens_chunk: int = DEFAULT_CHUNK,
    progress: bool = False,
    remote: bool = False,
    lens_type="logit",
) -> Comparison:
    """Four-way comparison of the base model (adapter off) and `student` (a loaded adapter, or "base" to compare the
    base with itself: a check) on the aligned tokens of `pairs`: runs B·ctx, B·noctx, S·ctx, S·noctx, per-layer
    cos / CKA / lens KL for each pair of runs in COMPARISONS, and the context vector with `absorbed_l` and
    `overshoot_l` (docs/measures.md). One model stays in memory; the adapter is switched in place.
    `lens_type`: "logit" (default), "tuned" (the base's tuned lens, which reads all four runs), a tuned-lens folder
    or a TunedLens; the result's meta records which.
    """
    check_student(lm, student)
    check_lens_choice(lens_type)
    tuned = resolve_lens(lm, lens_type) if lens else None
    capture = get_backend(backend)
    if remote:
        capture = functools.partial(capture, remote=True)
    if scope not in SCOPES:
        raise UserError(f"unknown scope '{scope}'; use one of {', '.join(SCOPES)}")
    if batch_size < 1:
        raise UserError("batch size must be at least 1")
    names = list(COMPARISONS) if comparisons is None else list(comparisons)
    unknown = [c for c in names if c not in COMPARISONS]
    if unknown:
        raise UserError(f"unknown comparison '{unknown[0]}'; use any of {', '.join(COMPARISONS)}")
    pairs = list(pairs)
    if not pairs:
        raise UserError("no pairs to compare")
    pad_id = lm.tokenizer.pad_token_id or 0
    adapter = None if student == BASE else student

    means = {r: MeanAccumulator() for r in RUN_NAMES}
    cka: dict[str, CKAAccumulator] = {}
    cos: dict[str, list] = {c: [] for c in names}
    kl: dict[str, list] = {c: [] for c in names}
    bar = tqdm(total=len(pairs), desc=f"compare ({backend})", unit="pair", disable=not progress)
    with lm.use(lm.active_adapter):  # restores whatever adapter was active
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            sides = {w: make_batch(chunk, w, scope, "right", pad_id) for w in ("ctx", "noctx")}
            if not torch.equal(sides["ctx"].targets, sides["noctx"].targets):
                raise UserError(f"pairs {start + 1}..{start + len(chunk)}: the measured tokens differ with and without the context; rebuild the pairs with interp.make_pairs")
            hidden: dict[str, torch.Tensor] = {}
            for who, name in ((BASE, None), ("student", adapter)):
                if who == "student" and adapter is None:
                    hidden["student_ctx"], hidden["student_noctx"] = hidden["base_ctx"], hidden["base_noctx"]
                    continue
                lm.set_adapter(name)
                for w in ("ctx", "noctx"):
                    hidden[f"{'base' if who == BASE else 'student'}_{w}"] = capture(lm, sides[w], attention=False).hidden
            token_example = sides["ctx"].rows.numpy()
            for r in RUN_NAMES:
                means[r].update(hidden[r], token_example)
            for c in names:
                a, b = (hidden[x] for x in COMPARISONS[c])
                if c not in cka:
                    cka[c] = CKAAccumulator(a.shape[0], a.shape[-1])
                cka[c].update(a, b)
                cos[c].append(torch.stack([cosine_per_token(x, y) for x, y in zip(a, b)]))
            if lens:
                for c, values in _lens_kls(lm.model, hidden, names, lens_chunk, tuned).items():
                    kl[c].append(values)
            bar.update(len(chunk))
    bar.close()

    mean = {r: means[r].mean() for r in RUN_NAMES}
    vec = context_vectors(mean["base_ctx"], mean["base_noctx"], mean["student_ctx"], mean["student_noctx"])
    per_ex = {r: means[r].example_means() for r in RUN_NAMES}
    vec_ex = context_vectors(per_ex["base_ctx"], per_ex["base_noctx"], per_ex["student_ctx"], per_ex["student_noctx"])
    n_tokens = means["base_ctx"].count
    result_pairs = {}
    for c in names:
        per_token = torch.cat(cos[c], dim=1).double()
        result_pairs[c] = {
            "cos": per_token.mean(1).numpy(),
            "cka": np.asarray(cka[c].result(debiased=False), dtype=np.float64),
            "cka_debiased": np.asarray(cka[c].result(debiased=True), dtype=np.float64) if n_tokens >= 4 else np.full(per_token.shape[0], np.nan),
            "lens_kl": torch.cat(kl[c], dim=1).mean(1).numpy() if lens else np.full(per_token.shape[0], np.nan),
        }
    v = vec["v"]
    return Comparison(
        student=student,
        pairs=result_pairs,
        v=v, u=vec["u"], w=vec["w"],
        v_norm=np.linalg.norm(v, axis=-1),
        cos_uv=row_cosine(vec["u"], v),
        absorbed=projection(vec["u"], v),
        overshoot=projection(vec["w"], v),
        absorbed_examples=projection(vec_ex["u"], vec_ex["v"]),
        overshoot_examples=projection(vec_ex["w"], vec_ex["v"]),
        example_tokens=np.asarray(means["base_ctx"].example_counts),
        examples=[{"context": p.context, "prompt": p.prompt, "response": p.response} for p in pairs],
        meta={"model": lm.spec, "student": student, "backend": backend, "scope": scope, "placement": pairs[0].placement,
              "num_layers": int(v.shape[0]), "n_examples": len(pairs), "n_tokens": int(n_tokens),
              "comparisons": {c: list(COMPARISONS[c]) for c in names},
              "lens": "tuned" if tuned is not None else "logit", "lens_id": tuned.describe() if tuned is not None else None},
    )
