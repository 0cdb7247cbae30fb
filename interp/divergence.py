"""The result of a paired analysis: per-layer divergence, logit-lens statistics and attention to the context."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np

from interp.errors import UserError

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

    def __post_init__(self) -> None:
        check_shapes(self)

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


def check_shapes(div: LayerDivergence) -> None:
    """Every array has the shape its field promises, consistent with the others; a UserError says which does not.

    Run when a LayerDivergence is built, so that a damaged artifact fails where it is read, not in a plot later.
    """
    for name in array_fields():
        value = getattr(div, name)
        if not isinstance(value, np.ndarray):
            raise UserError(f"'{name}' should be an array, found {type(value).__name__}")
    if div.cos.ndim != 1 or div.cos.shape[0] < 1:
        raise UserError(f"'cos' should have shape [num_layers], found {list(div.cos.shape)}")
    if div.token_id.ndim != 1:
        raise UserError(f"'token_id' should have shape [n_tokens], found {list(div.token_id.shape)}")
    layers, n = div.cos.shape[0], div.token_id.shape[0]
    expected = {"cka": (layers,), "cka_debiased": (layers,), "cos_per_token": (layers, n), "token_example": (n,),
                "target_id": (n,), **{name: (layers, n) for name in lens_field_names()}}
    for name, shape in expected.items():
        got = getattr(div, name).shape
        if got != shape:
            raise UserError(f"'{name}' has shape {list(got)}, expected {list(shape)} ({layers} layers, {n} tokens)")
    heads_shape = div.attn_ctx.shape
    if div.attn_ctx.ndim != 2 or heads_shape[0] != layers - 1:
        raise UserError(f"'attn_ctx' has shape {list(heads_shape)}, expected [{layers - 1} blocks, num_heads]")
    for name in ("attn_sink", "attn_sink_noctx"):
        if getattr(div, name).shape != heads_shape:
            raise UserError(f"'{name}' has shape {list(getattr(div, name).shape)}, expected {list(heads_shape)} like 'attn_ctx'")
    for name in ("token_example", "token_id", "target_id"):
        if n and not np.issubdtype(getattr(div, name).dtype, np.integer):
            raise UserError(f"'{name}' should hold integers, found {getattr(div, name).dtype}")
    if not isinstance(div.attn_ctx_tokens, list) or not isinstance(div.examples, list) or not isinstance(div.meta, dict):
        raise UserError("'attn_ctx_tokens' and 'examples' should be lists and 'meta' a mapping")
    for i, a in enumerate(div.attn_ctx_tokens):
        if not isinstance(a, np.ndarray) or a.ndim != 3 or a.shape[:2] != heads_shape:
            found = str(list(a.shape)) if isinstance(a, np.ndarray) else type(a).__name__
            raise UserError(f"'attn_ctx_tokens' of example {i} has shape {found}, expected [{heads_shape[0]} blocks, "
                            f"{heads_shape[1]} heads, context tokens]")
    if div.examples and div.attn_ctx_tokens and len(div.attn_ctx_tokens) != len(div.examples):
        raise UserError(f"'attn_ctx_tokens' covers {len(div.attn_ctx_tokens)} examples, but there are {len(div.examples)}")
    if div.examples and n and (div.token_example.min() < 0 or div.token_example.max() >= len(div.examples)):
        raise UserError(f"'token_example' names examples outside 0..{len(div.examples) - 1}")
