"""Per-layer comparison of a model's hidden states with and without a context, on the same tokens."""

import importlib

from interp.errors import UserError

__all__ = ["LoadedModel", "LayerDivergence", "Pair", "UserError", "analyze", "load_model", "make_pairs"]

# Everything but the error type is imported on first use: reading runs and drawing plots needs no torch.
_LAZY = {
    "load_model": "interp.models",
    "LoadedModel": "interp.models",
    "make_pairs": "interp.pairs",
    "Pair": "interp.pairs",
    "analyze": "interp.analysis",
    "LayerDivergence": "interp.divergence",
}
_SUBMODULES = {"analysis", "archs", "attention", "capture", "cli", "distributed", "divergence", "generate", "lens",
               "metrics", "models", "pairs", "plots", "remote", "report", "runs", "store"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"interp.{name}")
    raise AttributeError(f"module 'interp' has no attribute '{name}'")
