"""The verifiers, under the name the training side has always used. Their one home is interp.core.verifiers: the causal
commands judge answers too, and interp never imports training."""

from interp.core.verifiers import KINDS, check_kind, is_degenerate, verify

__all__ = ["is_degenerate", "verify", "check_kind", "KINDS"]
