"""Causal and cross-model tools: the four-way comparison of a base model and a student, the context vector,
activation patching, steering and flip forensics (definitions in docs/measures.md)."""

import importlib

__all__ = ["Comparison", "Explanation", "PatchResult", "SteerResult", "compare", "context_sweep", "explain", "patch",
           "repair_sweep", "steer"]

_LAZY = {
    "Comparison": "interp.causal.results",
    "compare": "interp.causal.fourway",
    "PatchResult": "interp.causal.results",
    "patch": "interp.causal.patching",
    "context_sweep": "interp.causal.patching",
    "repair_sweep": "interp.causal.patching",
    "SteerResult": "interp.causal.results",
    "steer": "interp.causal.steering",
    "Explanation": "interp.causal.results",
    "explain": "interp.causal.forensics",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'interp.causal' has no attribute '{name}'")
