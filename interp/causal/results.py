"""The results of the causal tools as plain numpy dataclasses (no torch), so that the app, the report and the
artifact reader load them without the model stack. Definitions: docs/measures.md, "Causal and cross-model measures"."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from interp.core.errors import UserError

PER_LAYER = ("cos", "cka", "cka_debiased", "lens_kl")


@dataclass
class Comparison:
    """Per-layer numbers of the four-way comparison; layer 0 is the embeddings, layer l the output of block l.

    `pairs[name][measure]` is [num_layers] for measure in cos, cka, cka_debiased, lens_kl. `v`, `u`, `w` are
    [num_layers, d]; `absorbed`, `overshoot`, `cos_uv`, `v_norm` are [num_layers]; the `*_examples` arrays are
    [n_examples, num_layers]: the same projections with each example's own means (its own `v`).
    """

    student: str
    pairs: dict[str, dict[str, np.ndarray]]
    v: np.ndarray
    u: np.ndarray
    w: np.ndarray
    v_norm: np.ndarray
    cos_uv: np.ndarray
    absorbed: np.ndarray
    overshoot: np.ndarray
    absorbed_examples: np.ndarray
    overshoot_examples: np.ndarray
    example_tokens: np.ndarray  # [n_examples] measured tokens per example
    examples: list[dict] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return int(self.v.shape[0])

    def overshoot_by(self, mask: Sequence[bool] | np.ndarray, layers: Sequence[int] | None = None) -> dict:
        """Mean per-example overshoot of the examples where `mask` is true against the rest (e.g. degenerate vs
        clean answers), averaged over `layers` (default: every layer but the embeddings)."""
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (self.overshoot_examples.shape[0],):
            raise UserError(f"the mask has {mask.size} entries for {self.overshoot_examples.shape[0]} examples")
        layers = list(range(1, self.num_layers)) if layers is None else list(layers)
        per_example = np.nanmean(self.overshoot_examples[:, layers], axis=1) if layers else np.full(mask.size, np.nan)
        mean = lambda sel: float(np.nanmean(per_example[sel])) if sel.any() else None  # noqa: E731
        return {"n_in": int(mask.sum()), "n_out": int((~mask).sum()), "mean_in": mean(mask), "mean_out": mean(~mask),
                "per_example": per_example.tolist()}

    def per_layer_table(self) -> dict[str, list]:
        """Every per-layer number by name, `<pair>_<measure>` and the vector measures."""
        table: dict[str, list] = {"layer": list(range(self.num_layers))}
        for name, values in self.pairs.items():
            for m in PER_LAYER:
                table[f"{name}_{m}"] = np.asarray(values[m], dtype=np.float64).tolist()
        for m in ("v_norm", "cos_uv", "absorbed", "overshoot"):
            table[m] = np.asarray(getattr(self, m), dtype=np.float64).tolist()
        return table


@dataclass
class PatchResult:
    """Recovery per layer (0 = embeddings, l = block l), mean over the measured tokens and per token.

    `recovery[l] = 1 − mean_t KL(p_src ‖ p_patched,l) / mean_t KL(p_src ‖ p_tgt)`; NaN for layers not visited and
    where source and target agree. With `heads=True` the arrays gain a head axis after the layer axis.
    `ref_logprob_*` are mean log-probabilities of the reference answer's tokens in the responses (NaN without one).
    """

    source: str
    target: str
    site: str
    layers: list[int]
    recovery: np.ndarray  # [L] or [L, H]
    kl_patched: np.ndarray  # [L, n] or [L, H, n]
    kl_target: np.ndarray  # [n]
    token_example: np.ndarray  # [n]
    target_id: np.ndarray  # [n]
    ref_logprob_source: float = float("nan")
    ref_logprob_target: float = float("nan")
    ref_logprob_patched: np.ndarray | None = None  # [L] or [L, H]
    n_ref_tokens: int = 0
    heads: bool = False
    meta: dict = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return int(self.recovery.shape[0])

    @property
    def recovery_tokens(self) -> np.ndarray:
        """Per-token recovery `1 − KL_t(src ‖ patched) / KL_t(src ‖ tgt)`; NaN where the two runs agree on a token."""
        den = self.kl_target
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(den > 1e-12, 1.0 - self.kl_patched / np.where(den > 1e-12, den, 1.0), np.nan)

    @property
    def ref_logprob_change(self) -> np.ndarray | None:
        """Patched minus target log-probability of the reference tokens, per layer."""
        return None if self.ref_logprob_patched is None else self.ref_logprob_patched - self.ref_logprob_target

    def example_recovery(self, example: int) -> np.ndarray:
        """Recovery per layer over one example's tokens."""
        sel = self.token_example == example
        kt = self.kl_target[sel].mean()
        with np.errstate(divide="ignore", invalid="ignore"):
            return 1.0 - self.kl_patched[..., sel].mean(-1) / kt if kt > 0 else np.full(self.recovery.shape, np.nan)

    def per_layer_table(self) -> dict[str, list]:
        table = {"layer": list(range(self.num_layers)), "recovery": np.asarray(self.recovery, dtype=np.float64).tolist()}
        if self.ref_logprob_patched is not None:
            table["ref_logprob_change"] = np.asarray(self.ref_logprob_change, dtype=np.float64).tolist()
        return table


@dataclass
class SteerResult:
    """Per arm and layer: acc, degenerate, follow_cf (None where no counterfactual is given) and the responses.
    `baseline[arm]` holds the same numbers without any intervention (base·noctx, student·ctx)."""

    alpha: float
    layers: list[int]
    results: dict[str, dict[int, dict]]
    baseline: dict[str, dict]
    meta: dict = field(default_factory=dict)

    def table(self) -> list[dict]:
        """One row per arm and layer, with the unsteered numbers beside."""
        rows = []
        for arm, per_layer in self.results.items():
            base = self.baseline[arm]
            for layer, r in per_layer.items():
                rows.append({"arm": arm, "layer": layer, "alpha": self.alpha, "acc": r["acc"], "acc_plain": base["acc"],
                             "degenerate": r["degenerate"], "degenerate_plain": base["degenerate"],
                             "follow_cf": r["follow_cf"], "follow_cf_plain": base["follow_cf"], "n": r["n"]})
        return rows


@dataclass
class Explanation:
    """Why one example's answer changes when the context comes back, for one student.

    `fork`: index of the first response token where the answers without and with the context differ; the
    token each run puts there (`token_noctx`, `token_ctx`; the end of the answer counts as a token). At that
    position, per layer: `recovery` of the no-context prediction when the student's no-context residual stream is
    patched into its with-context run (S·noctx → S·ctx, on every shared position), and the log-probabilities of
    both tokens under that patch. `heads`: the heads whose attention to the context at the fork moved most between
    the base model and the student (both with the context), with the context tokens each reads most.
    """

    example: dict
    fork: int
    prefix: str
    token_ctx: str
    token_noctx: str
    id_ctx: int
    id_noctx: int
    recovery: np.ndarray  # [L]
    logprob_ctx_token: np.ndarray  # [L] under the patch
    logprob_noctx_token: np.ndarray  # [L] under the patch
    clean: dict  # log-probabilities of both tokens in the unpatched runs (student ctx and noctx)
    attn_student: np.ndarray  # [blocks, heads] attention mass on the context at the fork, student with context
    attn_base: np.ndarray  # [blocks, heads] the same for the base model
    heads: list[dict]
    ctx_tokens: list[str]
    ctx_weights: np.ndarray  # [n_ctx] mean attention of the top heads (student) over the context tokens
    meta: dict = field(default_factory=dict)
