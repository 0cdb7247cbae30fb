"""Per-layer comparison of a model's hidden states with and without a context, on the same tokens."""

from interp.errors import UserError
from interp.models import LoadedModel, load_model
from interp.pairs import Pair, make_pairs

__all__ = ["LoadedModel", "Pair", "UserError", "load_model", "make_pairs", "analyze", "LayerDivergence"]


def __getattr__(name):  # analyze pulls in the capture backends; import them only when asked for
    if name in ("analyze", "LayerDivergence"):
        from interp import analysis

        return getattr(analysis, name)
    raise AttributeError(name)
