"""Where an intervention happens: a model state (which weights, which run), a site (residual, attention, MLP, head)
and a layer, checked once and named the same way as LayerDivergence (0 = embeddings, l = decoder block l)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from interp.core.errors import UserError
from interp.core.archs import decoder_layers, embeddings
from interp.core.runs import BASE

SITES = ("resid", "attn", "mlp")
RUNS = ("ctx", "noctx")


@dataclass(frozen=True)
class State:
    """One of the four runs of a comparison: which weights (`base` or an adapter name) and whether the context is in."""

    model: str
    run: str

    @property
    def adapter(self) -> str | None:
        return None if self.model == BASE else self.model

    @property
    def label(self) -> str:
        return f"{self.model}·{self.run}"


def state(spec, lm=None) -> State:
    """A State from `("base", "ctx")`, `"unreg·noctx"`/`"unreg:noctx"` or a State; checks the adapter is loaded."""
    if isinstance(spec, State):
        out = spec
    elif isinstance(spec, str):
        parts = spec.replace("·", ":").split(":")
        if len(parts) != 2:
            raise UserError(f"cannot read the run '{spec}'; write it as MODEL:RUN, e.g. base:ctx or unreg:noctx")
        out = State(parts[0], parts[1])
    else:
        try:
            model, run = spec
        except (TypeError, ValueError):
            raise UserError(f"a run is a pair (model, run) such as ('base', 'ctx'), got {spec!r}") from None
        out = State(str(model), str(run))
    if out.run not in RUNS:
        raise UserError(f"unknown run '{out.run}'; use one of {', '.join(RUNS)}")
    if lm is not None:
        check_student(lm, out.model)
    return out


def check_student(lm, name: str) -> None:
    """`base`, or the name of an adapter loaded on `lm`; anything else is a one-line error."""
    if name != BASE and name not in lm.adapters:
        raise UserError(f"no student named '{name}'; loaded: {', '.join(['base', *sorted(lm.adapters)])}")


def check_site(site: str) -> None:
    if site not in SITES:
        raise UserError(f"unknown site '{site}'; use one of {', '.join(SITES)}")


def check_layers(lm, layers, site: str = "resid") -> list[int]:
    """The layers to visit, in order: all of them by default. Attention and MLP outputs exist for blocks 1..N only
    (layer 0 is the embeddings)."""
    check_site(site)
    n = lm.num_layers
    first = 0 if site == "resid" else 1
    if layers is None:
        return list(range(first, n))
    if isinstance(layers, int):
        layers = [layers]
    out = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, (int,)) and not hasattr(layer, "__index__"):
            raise UserError(f"layer {layer!r} is not a whole number")
        layer = int(layer)
        if not first <= layer < n:
            what = "layers" if site == "resid" else f"'{site}' layers (decoder blocks; 0 is the embeddings)"
            raise UserError(f"layer {layer} is out of range; this model has {what} {first}..{n - 1}")
        out.append(layer)
    if not out:
        raise UserError("no layers given")
    return out


# The parts of a decoder block. Llama-style names; the per-architecture map will own these three lines.
def block_attention(layer: torch.nn.Module) -> torch.nn.Module:
    return layer.self_attn  # type: ignore[return-value]  # nn.Module.__getattr__ is typed Tensor | Module


def block_mlp(layer: torch.nn.Module) -> torch.nn.Module:
    return layer.mlp  # type: ignore[return-value]  # nn.Module.__getattr__ is typed Tensor | Module


def attention_out_proj(layer: torch.nn.Module) -> torch.nn.Module:
    """The attention's output projection: its input is the heads' outputs side by side, [.., heads * head_dim]."""
    return layer.self_attn.o_proj  # type: ignore[union-attr,return-value]  # nn.Module.__getattr__ is typed Tensor | Module


def site_module(model, site: str, layer: int, head: bool = False) -> torch.nn.Module:
    """The module whose output (or, for one head, whose input) a site at `layer` reads and writes."""
    if site == "resid":
        return embeddings(model) if layer == 0 else decoder_layers(model)[layer - 1]
    block = decoder_layers(model)[layer - 1]
    if site == "attn":
        return attention_out_proj(block) if head else block_attention(block)
    return block_mlp(block)


def num_heads(model) -> tuple[int, int]:
    """(heads, head_dim) of the attention."""
    config = model.config
    heads = config.num_attention_heads
    return heads, getattr(config, "head_dim", None) or config.hidden_size // heads
