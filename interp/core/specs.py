"""The model specs the toolkit knows by name, apart from the code that loads them (interp.core.models imports
torch; the app, the tables and the settings need only the names and where converted models are kept)."""

import os
from pathlib import Path

EMBEDDED = "smollm2-135m-instruct"
TINY = "tiny-random-llama"
# One tiny random model per supported family, built from its config class (nothing is downloaded): `tiny-random-<family>`.
TINY_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "gpt-neox", "gpt2", "olmo2")
TINY_SPECS = tuple(f"tiny-random-{f}" for f in TINY_FAMILIES)
BUILTIN_SPECS = (EMBEDDED, *TINY_SPECS)


def cache_dir() -> Path:
    """Where converted models live: $CTXINT_CACHE, else ~/.cache/ctx-internalization."""
    return Path(os.environ.get("CTXINT_CACHE", Path.home() / ".cache" / "ctx-internalization"))
