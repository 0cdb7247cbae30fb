"""Per-layer comparison of a model's hidden states with and without a context, on the same tokens."""

import importlib

from interp.errors import UserError
from interp.models import LoadedModel, load_model
from interp.pairs import Pair, make_pairs

__all__ = ["LoadedModel", "LayerDivergence", "Pair", "UserError", "analyze", "load_model", "make_pairs"]

_SUBMODULES = {"analysis", "attention", "capture", "cli", "divergence", "generate", "lens", "metrics", "models",
               "pairs", "plots", "report", "runs", "store"}


def __getattr__(name):
    # The capture backends, plotting and reports pull in heavy libraries: import them when first used.
    if name in ("analyze", "LayerDivergence"):
        return getattr(importlib.import_module("interp.analysis"), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"interp.{name}")
    raise AttributeError(f"module 'interp' has no attribute '{name}'")
