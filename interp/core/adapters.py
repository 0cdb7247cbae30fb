"""LoRA adapters on disk: the checks before one loads (its config, safetensors weights and never a pickle, the base
model it was trained on), the base model's identity an adapter records, and adapters' names."""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path


from interp.core.errors import UserError
from interp.core.runs import ADAPTER_CONFIG, ADAPTER_WEIGHTS, BASE_MODEL_FILE
from interp.core.store import atomic_write_json, is_regular, read_json


def peft_name(name: str) -> str:
    """An adapter's name as peft can hold it: peft stores adapters as submodules, and module names cannot hold "."."""
    return name.replace(".", "_")


def adapter_key(path: str | os.PathLike) -> str:
    """One adapter name per adapter folder, for a model that holds adapters of several runs (two runs both have an
    'unreg'): the folder's name and a hash of its full path."""
    p = Path(path).resolve()
    return peft_name(f"{p.name}-{hashlib.sha256(str(p).encode()).hexdigest()[:10]}")


def check_adapter(path: Path, lm) -> None:
    """Fail early, in one line, when an adapter folder is missing, damaged, or was trained on another base model
    than the LoadedModel `lm`."""
    path = Path(path)
    config_file = path / ADAPTER_CONFIG
    if path.exists() and not path.is_dir():
        raise UserError(f"adapter {path} is a file; pass the adapter folder that holds adapter_config.json")
    if not path.is_dir():
        raise UserError(f"adapter folder {path} does not exist; pass a folder written by `python -m training train`")
    if not config_file.exists():
        raise UserError(f"{path} has no adapter_config.json; it is not a peft adapter folder")
    config = read_json(config_file, expect=dict)
    check_adapter_config(config, config_file)
    check_adapter_weights(path)
    identity = path / BASE_MODEL_FILE
    if identity.exists():
        saved = read_json(identity, expect=dict)
        ours = base_identity(lm)
        if saved.get("fingerprint") and saved.get("fingerprint") != ours["fingerprint"]:
            same_name = _same_base(str(saved.get("model", "")), ours["model"])
            raise UserError(
                f"adapter {path} was trained on base model '{saved.get('model')}' (weights {saved.get('fingerprint')}), "
                f"but the loaded model is '{ours['model']}' (weights {ours['fingerprint']})"
                + ("; the same name with other weights: load the model the adapter was trained on" if same_name
                   else f"; load it with --model {saved.get('model')}")
            )
        return
    trained_on = config.get("base_model_name_or_path")
    loaded = base_name(lm.model)
    if trained_on and loaded and not _same_base(trained_on, loaded):
        raise UserError(
            f"adapter {path} was trained on base model '{trained_on}', but the loaded model is '{loaded}'; "
            f"load it with --model {trained_on}"
        )


# Files peft (and torch) would unpickle: never loaded here, whatever the folder holds besides.
PICKLED_WEIGHTS = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "pytorch_model.bin")


def check_adapter_weights(path: Path) -> None:
    """An adapter folder's weights are a whole safetensors file; a pickled adapter (adapter_model.bin, written by
    torch.save) is refused, since unpickling a file can run code. peft reads the safetensors file first when both
    are there, so with it present a .bin beside it is never opened."""
    weights = path / ADAPTER_WEIGHTS
    if not is_regular(weights):
        pickled = next((n for n in PICKLED_WEIGHTS if (path / n).exists()), None)
        if pickled:
            raise UserError(f"adapter {path} holds {pickled}, a pickle, and no {ADAPTER_WEIGHTS}: it is not loaded "
                            "because unpickling a file can run code; save the adapter as safetensors (peft's default)")
        if weights.exists():
            raise UserError(f"adapter weights {weights} are not a regular file; train it again or copy it again")
        raise UserError(f"adapter {path} has no {ADAPTER_WEIGHTS}; train it again or copy it again")
    check_safetensors(weights, "adapter weights")


def check_adapter_config(config: dict, where: Path) -> None:
    """The numbers peft builds the LoRA layers from: a rank that is a positive integer, a finite alpha and dropout."""
    r, alpha, dropout = config.get("r", 8), config.get("lora_alpha", 8), config.get("lora_dropout", 0.0)
    if type(r) is not int or not 1 <= r <= 1 << 16:
        raise UserError(f"{where} is damaged: 'r' must be a positive integer (got {str(r)[:40]}); train the adapter again")
    for key, value in (("lora_alpha", alpha), ("lora_dropout", dropout)):
        if type(value) not in (int, float) or not math.isfinite(value):
            raise UserError(f"{where} is damaged: '{key}' must be a finite number (got {str(value)[:40]}); train the adapter again")


def hub_adapter_folder(adapter_id: str) -> Path:
    """A hub adapter's local copy holding only its config and safetensors weights (a pickled adapter is refused
    before peft could unpickle it)."""
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(adapter_id, allow_patterns=[ADAPTER_CONFIG, ADAPTER_WEIGHTS, BASE_MODEL_FILE]))
    except Exception as err:  # noqa: BLE001 - offline, unknown id, network: one line either way
        raise UserError(f"adapter '{adapter_id}' could not be fetched from the Hugging Face hub ({error_line(err)})") from err
    if not (folder / ADAPTER_CONFIG).exists():
        raise UserError(f"adapter '{adapter_id}' on the hub has no adapter_config.json; it is not a peft adapter")
    check_adapter_config(read_json(folder / ADAPTER_CONFIG, expect=dict), folder / ADAPTER_CONFIG)
    if not (folder / ADAPTER_WEIGHTS).exists():
        raise UserError(f"adapter '{adapter_id}' on the hub has no {ADAPTER_WEIGHTS}: a pickled adapter is not loaded "
                        "because unpickling a file can run code")
    check_adapter_weights(folder)
    return folder


def check_safetensors(path: Path, what: str = "weights") -> None:
    """A one-line UserError when a safetensors file is truncated or not a safetensors file at all (opening checks
    that the header's offsets cover the file exactly; nothing is read into memory)."""
    from safetensors import SafetensorError, safe_open

    if not is_regular(path):  # a FIFO would block the reader
        raise UserError(f"{what} {path} is missing or not a regular file; train it again or copy it again")
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{what} {path} is damaged ({error_line(err)}); train it again or copy it again") from err


def base_identity(lm) -> dict:
    """The base model an adapter is trained on: its spec and a fingerprint of its weights (the first 16 hex digits
    of a sha256 of the input embedding matrix, rounded to bfloat16 so the fingerprint does not depend on the dtype
    the model was loaded in). Computed once per loaded model."""
    if lm._fingerprint is None:
        import torch  # lazy: a loaded model has torch already; the app's first page reads adapters' names without it

        from interp.core.archs import embeddings  # lazy: as above (archs imports torch)

        weight = torch.as_tensor(embeddings(lm.model).weight).detach()
        data = weight.to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes()
        lm._fingerprint = hashlib.sha256(data).hexdigest()[:16]
    return {"model": str(lm.spec), "fingerprint": lm._fingerprint}


def write_base_identity(adapter_dir: str | os.PathLike, lm) -> dict:
    """Record the base model in an adapter folder: `base_model_name_or_path` in adapter_config.json and
    base_model.json with the fingerprint, so that check_adapter refuses the adapter on another model."""
    adapter_dir = Path(adapter_dir)
    identity = base_identity(lm)
    config_file = adapter_dir / ADAPTER_CONFIG
    if config_file.exists():
        config = read_json(config_file, expect=dict)
        config["base_model_name_or_path"] = identity["model"]
        atomic_write_json(config_file, config)
    atomic_write_json(adapter_dir / BASE_MODEL_FILE, identity)
    return identity


def error_line(err: BaseException) -> str:
    """The first non-blank line of an error's message (at most 200 characters), or its type's name."""
    lines = [x for x in str(err).splitlines() if x.strip()]
    return (lines[0] if lines else type(err).__name__)[:200]


def _same_base(a: str, b: str) -> bool:
    norm = lambda s: str(s).rstrip("/").split("/")[-1].lower()  # noqa: E731 - local ids and hub ids compare by name
    return norm(a) == norm(b)


def base_name(model) -> str:
    return getattr(model.config, "_name_or_path", "") or ""
