"""NDIF (nnsight's hosted models): run a trace remotely on exactly the model and adapter the analysis names.

NDIF knows models by their Hugging Face id and loads a LoRA adapter only by its hub id (`peft=`). So the remote
model is built from the id the run used, with the active adapter's id, never by wrapping the local weights (whose
`_name_or_path` may be a toolkit spec or a folder NDIF has never seen). What cannot be named that way (the embedded
model, a tiny random model, a local folder, a local adapter folder) is refused in one line: measuring the base
model while the artifact names the student is the failure this module exists to prevent.
"""

from __future__ import annotations

from dataclasses import dataclass

from interp.core.errors import UserError
from interp.core.models import EMBEDDED, TINY_SPECS, is_hub_id


@dataclass(frozen=True)
class RemoteTarget:
    """What a remote trace runs: the base model's hub id and the active adapter's hub id (None: the base alone)."""

    model_id: str
    adapter_id: str | None


def remote_target(lm) -> RemoteTarget:
    """The hub ids of `lm`'s base model and active adapter, or a one-line UserError saying why NDIF cannot run it."""
    spec = lm.spec
    if spec in TINY_SPECS:
        raise UserError(f"'{spec}' is built on this machine and exists nowhere else; NDIF cannot run it (drop remote)")
    if spec == EMBEDDED:
        raise UserError(
            "the embedded model is a dequantized GGUF build, not the hub's weights; to measure on NDIF load the model "
            "by its Hugging Face id (--model HuggingFaceTB/SmolLM2-135M-Instruct) and train or load adapters on that"
        )
    if not is_hub_id(spec):
        raise UserError(f"model '{spec}' is a local folder; NDIF serves models by Hugging Face id: load it by its id (org/name)")
    name = lm.active_adapter
    if name is None:
        return RemoteTarget(spec, None)
    source = lm.hub_adapters.get(name)
    if source is None:
        raise UserError(
            f"adapter '{name}' was loaded from the local folder {lm.adapters.get(name)}; NDIF loads adapters only by "
            "Hugging Face id: push it to the hub and load it with load_adapter('org/name'), or measure locally (drop remote)"
        )
    return RemoteTarget(spec, source)


def _model_class():
    from nnsight.modeling.transformers import TransformersModel

    return TransformersModel


def remote_envoy(lm, attention: bool):
    """The nnsight model for NDIF: built from the hub id with the adapter's hub id (no weights are loaded here).

    Eager attention is requested when attention weights are read (nnsight sends the implementation with the request).
    """
    target = remote_target(lm)
    cache = lm.__dict__.setdefault("_remote", {})
    key = (target, attention)
    if key not in cache:
        cache[key] = _model_class()(target.model_id, tokenizer=lm.tokenizer, peft=target.adapter_id,
                                    attn_implementation="eager" if attention else "sdpa")
    return cache[key]
