"""The result of a paired analysis: per-layer divergence, logit-lens statistics and attention to the context."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np

# Per-token logit-lens statistics, each an array [num_layers, n_tokens], once for each run ("_ctx", "_noctx").
LENS_STATS = ("top1", "top1_prob", "target_prob", "target_rank", "entropy", "kl_final")


@dataclass
class LayerDivergence:
    """Everything measured on a batch of aligned pairs. Layer 0 is the embedding output, layer l the output of
    decoder block l (before the final norm). `n` counts the measured tokens of all examples together; token j
    belongs to example `token_example[j]`.
    """

    # Per layer [num_layers].
    cos: np.ndarray
    cka: np.ndarray
    cka_debiased: np.ndarray
    # Per layer and token [num_layers, n].
    cos_per_token: np.ndarray
    # Attention, per decoder block and head [num_blocks, num_heads], mean over measured query positions.
    attn_ctx: np.ndarray  # mass on the context text's tokens, with-context run
    attn_sink: np.ndarray  # mass on the first token, with-context run
    attn_sink_noctx: np.ndarray  # mass on the first token, without-context run
    # Logit lens [num_layers, n]: lens_<stat>_ctx, lens_<stat>_noctx, and KL(lens^noctx || lens^ctx).
    lens_top1_ctx: np.ndarray
    lens_top1_noctx: np.ndarray
    lens_top1_prob_ctx: np.ndarray
    lens_top1_prob_noctx: np.ndarray
    lens_target_prob_ctx: np.ndarray
    lens_target_prob_noctx: np.ndarray
    lens_target_rank_ctx: np.ndarray
    lens_target_rank_noctx: np.ndarray
    lens_entropy_ctx: np.ndarray
    lens_entropy_noctx: np.ndarray
    lens_kl_final_ctx: np.ndarray
    lens_kl_final_noctx: np.ndarray
    lens_kl_noctx_ctx: np.ndarray
    # Per token [n]: which example, the token at the measured position, and the token it predicts.
    token_example: np.ndarray
    token_id: np.ndarray
    target_id: np.ndarray
    # Per example: attention of each head to each context token [num_blocks, num_heads, n_ctx_tokens_i].
    attn_ctx_tokens: list[np.ndarray] = field(default_factory=list)
    # Per example: context, prompt, response, the context's token strings, the measured tokens' strings.
    examples: list[dict] = field(default_factory=list)
    # Settings: model, adapter, backend, placement, scope, layer and head counts.
    meta: dict = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return int(self.cos.shape[0])

    @property
    def n_tokens(self) -> int:
        return int(self.token_id.shape[0])

    @property
    def cos_divergence(self) -> np.ndarray:
        return 1.0 - self.cos

    @property
    def cka_divergence(self) -> np.ndarray:
        return 1.0 - self.cka

    def layer_mean(self, name: str) -> np.ndarray:
        """Mean over tokens of a per-token array, e.g. `layer_mean("lens_kl_noctx_ctx")` -> [num_layers]."""
        values = getattr(self, name)
        if values.ndim != 2:
            raise ValueError(f"{name} is not a per-layer, per-token array (shape {values.shape})")
        return values.astype(np.float64).mean(axis=1)

    def example_tokens(self, example: int) -> np.ndarray:
        """Indices of the measured tokens that belong to one example."""
        return np.flatnonzero(self.token_example == example)

    def per_layer_table(self) -> dict[str, list[float]]:
        """Every per-layer number, by name: the rows of layer_divergence.json and .csv."""
        table = {"layer": list(range(self.num_layers)), "cos": self.cos.tolist(), "cka": self.cka.tolist(),
                 "cka_debiased": self.cka_debiased.tolist()}
        for name in array_fields():
            if name.startswith("lens_") and not name.startswith("lens_top1_ctx") and not name.startswith("lens_top1_noctx"):
                table[name] = self.layer_mean(name).tolist()
        return table


def lens_field_names() -> list[str]:
    """The per-token logit-lens arrays: lens_<stat>_ctx, lens_<stat>_noctx, lens_kl_noctx_ctx."""
    return [f"lens_{stat}_{run}" for run in ("ctx", "noctx") for stat in LENS_STATS] + ["lens_kl_noctx_ctx"]


def array_fields() -> list[str]:
    """Names of the fields that are plain numpy arrays (everything but the per-example lists and meta)."""
    return [f.name for f in fields(LayerDivergence) if f.name not in ("attn_ctx_tokens", "examples", "meta")]
