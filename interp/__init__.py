"""Per-layer comparison of a model's hidden states with and without a context, on the same tokens."""

import importlib

from interp.errors import UserError

__all__ = ["Comparison", "Explanation", "LoadedModel", "LayerDivergence", "Pair", "PatchResult", "SteerResult", "UserError",
           "analyze", "compare", "context_sweep", "explain", "load_model", "make_pairs", "patch", "repair_sweep", "steer"]

# Everything but the error type is imported on first use: reading runs and drawing plots needs no torch.
_LAZY = {
    "load_model": "interp.models",
    "LoadedModel": "interp.models",
    "make_pairs": "interp.pairs",
    "Pair": "interp.pairs",
    "analyze": "interp.analysis",
    "LayerDivergence": "interp.divergence",
    # Causal and cross-model tools (interp/causal/).
    "compare": "interp.causal",
    "Comparison": "interp.causal",
    "patch": "interp.causal",
    "PatchResult": "interp.causal",
    "context_sweep": "interp.causal",
    "repair_sweep": "interp.causal",
    "steer": "interp.causal",
    "SteerResult": "interp.causal",
    "explain": "interp.causal",
    "Explanation": "interp.causal",
}
_SUBMODULES = {"analysis", "archs", "attention", "capture", "causal", "cli", "distributed", "divergence", "generate",
               "lens", "metrics", "models", "pairs", "plots", "remote", "report", "runs", "store", "tuned_lens"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"interp.{name}")
    raise AttributeError(f"module 'interp' has no attribute '{name}'")
