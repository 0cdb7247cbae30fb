"""The result of a paired analysis (per-layer divergence, logit-lens statistics, attention to the context), and its
folder on disk: `divergence.json` and `arrays.safetensors`, a run's `layers/<model>/`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from interp.core import runs
from interp.core.errors import UserError
from interp.core.runs import LAYERS_ARRAYS_FILE as ARRAYS_FILE
from interp.core.runs import LAYERS_META_FILE as META_FILE
from interp.core.store import atomic_dir, atomic_write_json, is_regular, read_json

SCHEMA_VERSION = 1  # of a LayerDivergence folder; another version is refused with a one-line error
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


def save_divergence(div: LayerDivergence, folder: str | os.PathLike, overwrite: bool = False) -> Path:
    """Save as `folder/divergence.json` (settings, examples, schema version) and `folder/arrays.safetensors`."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    arrays = {name: np.ascontiguousarray(getattr(div, name)) for name in array_fields()}
    offsets = np.cumsum([0] + [a.shape[-1] for a in div.attn_ctx_tokens]).tolist()
    if div.attn_ctx_tokens:
        arrays["attn_ctx_tokens"] = np.ascontiguousarray(np.concatenate(div.attn_ctx_tokens, axis=-1))
    meta = {"schema_version": SCHEMA_VERSION, "meta": div.meta, "examples": div.examples, "attn_ctx_tokens_offsets": offsets}
    with atomic_dir(folder, overwrite=overwrite) as tmp:
        save_file(arrays, str(tmp / ARRAYS_FILE))
        atomic_write_json(tmp / META_FILE, meta)
    return folder


def load_divergence(folder: str | os.PathLike) -> LayerDivergence:
    """Load a folder written by save_divergence; another schema version or a damaged file is a one-line error."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder of layer-divergence results; write one with `python -m interp analyze`")
    meta = read_json(folder / META_FILE)
    version = meta.get("schema_version") if isinstance(meta, dict) else None
    if version != SCHEMA_VERSION:
        raise UserError(
            f"{folder / META_FILE} has schema version {version}, this toolkit reads version {SCHEMA_VERSION}; "
            "rerun `python -m interp analyze` to rewrite it"
        )
    arrays_path = folder / ARRAYS_FILE
    if not arrays_path.exists():
        raise UserError(f"{arrays_path} is missing; rerun `python -m interp analyze`")
    if not is_regular(arrays_path):  # a FIFO would block the reader
        raise UserError(f"{arrays_path} is not a regular file; rerun `python -m interp analyze`")
    try:
        arrays = load_file(str(arrays_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{arrays_path} is damaged ({err}); rerun `python -m interp analyze`") from err
    missing = [name for name in array_fields() if name not in arrays]
    if missing:
        raise UserError(f"{arrays_path} lacks {', '.join(missing)}; rerun `python -m interp analyze`")
    joined = arrays.get("attn_ctx_tokens")
    offsets = meta.get("attn_ctx_tokens_offsets", [0])
    width = joined.shape[-1] if joined is not None and joined.ndim >= 1 else 0
    if (not isinstance(offsets, list) or not offsets or not all(type(o) is int for o in offsets)
            or offsets[0] != 0 or any(b < a for a, b in zip(offsets, offsets[1:])) or offsets[-1] != width):
        raise UserError(f"{folder / META_FILE} is damaged: 'attn_ctx_tokens_offsets' should be rising integers from 0 "
                        f"to {width}; rerun `python -m interp analyze`")
    per_example = [joined[..., a:b] for a, b in zip(offsets[:-1], offsets[1:])] if joined is not None else []
    examples, info = meta.get("examples", []), meta.get("meta", {})
    try:
        return LayerDivergence(
            **{name: arrays[name] for name in array_fields()},
            attn_ctx_tokens=per_example,
            examples=examples,
            meta=info,
        )
    except UserError as err:
        raise UserError(f"{folder} is damaged: {err}; rerun `python -m interp analyze`") from None


def load_layers(path: str | os.PathLike, model: str) -> LayerDivergence:
    """The LayerDivergence of one model of a run (base or a student)."""
    return load_divergence(Path(path) / runs.LAYERS_DIR / model)


def load_all_layers(path: str | os.PathLike) -> dict[str, LayerDivergence]:
    """Every model's LayerDivergence of a run, by model name; a bare layers folder counts as one model."""
    path = Path(path)
    if runs.is_layers_folder(path) and not runs.is_run(path):
        div = load_divergence(path)
        return {str(div.meta.get("model_name") or div.meta.get("adapter") or path.name): div}
    return {m: load_layers(path, m) for m in runs.layer_models(path)}
