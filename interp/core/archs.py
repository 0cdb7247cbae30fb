"""Per-architecture map: where a causal LM keeps its embedding, decoder blocks, final norm, unembedding and logit softcapping.

Everything in the toolkit that reaches into a model's modules (capture, lens, patching, training) asks this module,
so a new architecture is one entry in `ARCHS`. The embedding and the unembedding come from transformers' own
`get_input_embeddings()` / `get_output_embeddings()`, the decoder from `get_decoder()`; the map only names what
those do not expose: the attribute holding the blocks, the final norm, each block's self-attention, and the config
attribute of the final logit softcapping.

Layer 0 of the toolkit is the residual stream entering the first block (what `output_hidden_states[0]` returns):
for Llama-like models that is the token embedding; for GPT-2 it already includes the learned position embedding,
and for Gemma the embedding times sqrt(d). Hooking the first block's input gets it right for every architecture.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from interp.core.errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["ARCHS", "Arch", "arch_of", "attention_module", "block_input", "block_output", "decoder_layers",
           "eager_attention", "embeddings", "final_norm", "inner_model", "softcap", "supported", "unembed"]


@dataclass(frozen=True)
class Arch:
    """How one family lays out its modules, relative to `model.get_decoder()` and to each block."""

    family: str
    layers: str = "layers"  # attribute of the decoder holding the blocks (a ModuleList)
    norm: str = "norm"  # attribute of the decoder holding the final norm
    attention: str = "self_attn"  # attribute of a block holding its self-attention (returns (output, weights))
    softcap: str | None = None  # config attribute of the final logit softcapping: logits = c * tanh(logits / c)


_LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2")

# Keyed by `config.model_type`. Gemma 3's text-only model is `gemma3_text`; the multimodal `gemma3` wraps it.
ARCHS: dict[str, Arch] = {
    **{t: Arch(t) for t in _LLAMA_LIKE},
    "gemma2": Arch("gemma2", softcap="final_logit_softcapping"),
    "gemma3_text": Arch("gemma3", softcap="final_logit_softcapping"),
    "gpt_neox": Arch("gpt_neox", norm="final_layer_norm", attention="attention"),
    "gpt2": Arch("gpt2", layers="h", norm="ln_f", attention="attn"),
}


def supported() -> str:
    return ", ".join(sorted(ARCHS))


def inner_model(model) -> PreTrainedModel:
    """The transformers model under a peft wrapper (PeftModel -> LoraModel -> ForCausalLM), if any."""
    if not type(model).__module__.startswith("peft"):
        return model
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTuner

    if isinstance(model, PeftModel):
        model = model.base_model
    if isinstance(model, BaseTuner):
        model = model.model
    return model


def arch_of(model) -> Arch:
    """The map entry for `model` (peft-wrapped or not); an unsupported model is a one-line UserError."""
    inner = inner_model(model)
    model_type = getattr(getattr(inner, "config", None), "model_type", None)
    arch = ARCHS.get(model_type) if model_type is not None else None
    if arch is None:
        raise UserError(f"architecture '{model_type or type(inner).__name__}' is not supported; supported: {supported()}")
    return arch


def _decoder(model) -> torch.nn.Module:
    inner = inner_model(model)
    getter = getattr(inner, "get_decoder", None)
    decoder = getter() if getter is not None else None
    return decoder if decoder is not None else inner.base_model


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder blocks, in order."""
    layers = getattr(_decoder(model), arch_of(model).layers)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        raise UserError(f"{type(inner_model(model)).__name__} has no decoder blocks where its architecture keeps them")
    return layers


def embeddings(model) -> torch.nn.Module:
    """The token embedding (layer 0 itself is taken at the first block's input, see the module's note)."""
    return inner_model(model).get_input_embeddings()


def final_norm(model) -> torch.nn.Module:
    return getattr(_decoder(model), arch_of(model).norm)


def unembed(model) -> torch.nn.Module:
    head = inner_model(model).get_output_embeddings()
    if head is None:
        raise UserError(f"{type(inner_model(model)).__name__} has no unembedding (output embeddings); load a causal LM")
    return head


def softcap(model) -> float | None:
    """The final logit softcapping constant c (logits = c·tanh(z/c)), or None where the model has none."""
    name = arch_of(model).softcap
    value = getattr(inner_model(model).config, name, None) if name else None
    return float(value) if value else None


def apply_softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """The model's own final-logit transform: identity, or c·tanh(z/c) for soft-capped families (Gemma 2/3)."""
    return logits if cap is None else torch.tanh(logits / cap) * cap


def attention_module(block: torch.nn.Module, model) -> torch.nn.Module:
    return getattr(block, arch_of(model).attention)


def block_output(output) -> torch.Tensor:
    """A block's hidden state, whether it returns a tensor (transformers 5) or a tuple led by it (earlier, or custom)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def block_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden state a block receives: its first positional argument, else its `hidden_states` keyword."""
    if args:
        return block_output(args[0])
    return block_output(kwargs["hidden_states"])


@contextlib.contextmanager
def eager_attention(model, needed: bool = True):
    """Run a block with eager attention, the only implementation that returns attention weights, then switch back.

    Models load with sdpa (faster, no T×T weights kept); capture asks for eager only when it reads attention.
    transformers 5 reads the implementation from the config at every forward, so the switch is in place.
    """
    inner = inner_model(model)
    previous = getattr(inner.config, "_attn_implementation", None)
    if not needed or previous in (None, "eager"):
        yield
        return
    inner.set_attn_implementation("eager")
    if inner.config._attn_implementation != "eager":
        raise UserError(f"{type(inner).__name__} cannot switch to eager attention, which attention weights need; pass attention=False")
    try:
        yield
    finally:
        inner.set_attn_implementation(previous)
