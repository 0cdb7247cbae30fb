"""Analysis settings: how a model is loaded and measured, declared once (one dataclass, a help text on every field).

`python -m interp analyze`, `analyze-run` and the causal commands build their options from these fields
(interp.cli.options), the app and the notebooks pass the same object to `interp.core.students.open_student`, so a
new setting needs one line here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from interp.core.specs import EMBEDDED

LENS_KINDS = ("logit", "tuned")
LENS_HELP = ("Which lens reads the layers: 'logit' (unembed(final_norm(h)), the default) or 'tuned' (per-layer "
             "translators trained by `python -m interp tune-lens --model M`, read from the cache); or the folder of "
             "a tuned lens.")


def opt(default, help: str, **meta):
    """A field with its help text; `meta` may hold `flag` (the CLI name when it is not the field's)."""
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class AnalysisSettings:
    """Every setting that says which model runs where and how it is measured."""

    model: str = opt(EMBEDDED, f"{EMBEDDED} (embedded), tiny-random-llama, a Hugging Face id or a local folder.")
    device: str | None = opt(None, "cpu, cuda, ... (default: cuda when available).")
    dtype: str = opt("auto", "Weights' precision: auto (bf16 on a CUDA GPU that has it, else fp32), fp32, bf16 or fp16. "
                             "Statistics stay float32/float64.")
    backend: str = opt("nnsight", "Capture backend: nnsight (the default), transformer_lens or torch (plain hooks); "
                                  "the same numbers. The causal patching reads through nnsight or torch.")
    batch_size: int = opt(8, "Pairs per forward pass.")
    max_examples: int | None = opt(None, "Use at most this many test examples of a run (per model).")
    lens: str = opt("logit", LENS_HELP)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def help(cls, name: str) -> str:
        """A setting's help text (the CLI's, the app's)."""
        return next(f.metadata["help"] for f in fields(cls) if f.name == name)
