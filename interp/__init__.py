"""Per-layer comparison of a model's hidden states with and without a context, on the same tokens."""

import importlib

from interp.core.errors import UserError

__all__ = ["AnalysisSettings", "Comparison", "Explanation", "LoadedModel", "LayerDivergence", "Pair", "PatchResult",
           "SteerResult", "UserError", "analyze", "compare", "context_sweep", "explain", "load_model", "make_pairs",
           "open_student", "patch", "repair_sweep", "steer"]

# Everything but the error type is imported on first use: reading runs and drawing plots needs no torch.
_LAZY = {
    "AnalysisSettings": "interp.core.settings",
    "open_student": "interp.core.students",
    "load_model": "interp.core.models",
    "LoadedModel": "interp.core.models",
    "make_pairs": "interp.core.pairs",
    "Pair": "interp.core.pairs",
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
# The floors (docs/architecture.md): core < the measures < causal < views < cli.
_SUBMODULES = {"analysis", "attention", "capture", "causal", "cli", "core", "divergence", "hooks", "lens", "metrics",
               "tuned_lens", "views"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"interp.{name}")
    raise AttributeError(f"module 'interp' has no attribute '{name}'")
