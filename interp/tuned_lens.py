"""Tuned lens: one affine translator per layer, trained so that each layer's decoded distribution matches the final one.

The logit lens reads early and middle layers badly: their residual stream is not yet in the basis the unembedding
expects, so a lens statistic there mixes "the context changed what the layer says" with "the lens cannot read this
layer". The tuned lens (Belrose et al. 2023, "Eliciting Latent Predictions from Transformers with the Tuned Lens";
the design of the `tuned-lens` package, AlignmentResearch/tuned-lens, `tuned_lens/nn/lenses.py` and
`scripts/train_loop.py`) reads layer l as

    tuned_l(h) = unembed(final_norm(h + A_l h + b_l))

with A_l and b_l zero at the start (the translator starts as the identity, so training starts from the logit lens)
and trained to minimise KL(final ‖ tuned_l) on the model's own tokens. The last layer has no translator: there the
tuned lens is the logit lens, exactly. Its authors report that a lens trained on a base model transfers to its
fine-tunes, so the toolkit keeps one lens per base model, keyed by the identity adapters carry
(`interp.core.adapters.base_identity`), and reads every student of that base with it.

The package itself is not a dependency: it needs wandb, datasets, torchdata and accelerate, saves translators with
`torch.save` and loads them with `torch.load` (the toolkit never unpickles a user file), and reads
`output_hidden_states`, whose last entry transformers 5 takes after the final norm. What is needed is here, small:
translators are saved as safetensors with a JSON description.

Training text: the model's own sampled answers (temperature 1, the rollouts' temperature) to a wide set of prompts,
the toolkit's task suites' prompts with their contexts and generic prompts written below, each measured with and
without a context on the same tokens, as every lens statistic in the toolkit is. That is exactly the text the lens
is later read on (chat-template answers of this model, with and without a context), it needs nothing beyond the
model, and it works offline for any model. A corpus shipped in a package (Python's own documentation strings, for
one) would be prose of another kind, read through no chat template, and the translators would be fitted to states
the toolkit never measures. Held out: a fixed share of the prompts (never their tokens), so the held-out KL is read
on answers to prompts the translators never saw.
"""

from __future__ import annotations

import json
import math
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence, cast

import torch

from interp.capture import capture_torch
from interp.core.errors import UserError
from interp.core.generate import generate
from interp.core.adapters import base_identity, check_safetensors
from interp.core.archs import unembed
from interp.core.models import cache_dir
from interp.core.pairs import pair_from_ids, render_prompt_pair
from interp.core.settings import LENS_KINDS
from interp.core.store import atomic_dir, atomic_write_json, atomic_write_text, folder_lock, read_json, read_jsonl
from interp.hooks import make_batch
from interp.lens import logit_lens

FORMAT = "ctxint-tuned-lens/1"
LENS_FOLDER = "lens"  # the finished lens inside a model's cache folder
TRAIN_FOLDER = "train"  # the resumable training state
SAMPLES_FILE = "samples.jsonl"
WEIGHTS_FILE = "lens.safetensors"
META_FILE = "lens.json"


# --- the lens ----------------------------------------------------------------------------------------------------


class TunedLens(torch.nn.Module):
    """Affine translators for layers 0..L-2 of a model with L measured layers (layer L-1, the last block's output,
    has none: the tuned lens is the logit lens there). `weight[l]` is A_l [d, d], `bias[l]` is b_l [d]; zero is
    the identity translator."""

    def __init__(self, num_layers: int, d_model: int, identity: dict | None = None, meta: dict | None = None):
        super().__init__()
        if num_layers < 1 or d_model < 1:
            raise ValueError(f"a tuned lens needs at least one layer and one dimension (got {num_layers}, {d_model})")
        self.num_layers, self.d_model = int(num_layers), int(d_model)
        self.weight = torch.nn.Parameter(torch.zeros(num_layers - 1, d_model, d_model))
        self.bias = torch.nn.Parameter(torch.zeros(num_layers - 1, d_model))
        self.identity = dict(identity or {})  # the base model: {"model": spec, "fingerprint": ...}
        self.meta = dict(meta or {})
        self.folder: Path | None = None

    def translate(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        """h + A_l h + b_l for `hidden` [..., d] of `layer`; the last layer's hidden state is returned as it is."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} is outside 0..{self.num_layers - 1}")
        if layer == self.num_layers - 1:
            return hidden
        w, b = self.weight[layer], self.bias[layer]
        h = hidden.to(w.dtype) if hidden.device == w.device else hidden.to(device=w.device, dtype=w.dtype)
        return (h + h @ w.T + b).to(hidden.device)

    def describe(self) -> dict:
        """What an artifact records about the lens that read it."""
        out = {"kind": "tuned", **self.identity, "num_layers": self.num_layers}
        for key in ("steps", "tokens_seen", "adapter"):
            if key in self.meta:
                out[key] = self.meta[key]
        if self.folder is not None:
            out["folder"] = str(self.folder)
        return out


def read_lens(model, hidden: torch.Tensor, layer: int, lens: TunedLens | None = None) -> torch.Tensor:
    """The lens logits of a [n, d] hidden state of `layer`: the logit lens, or the tuned lens when `lens` is given."""

    return logit_lens(model, hidden if lens is None else lens.translate(hidden, layer), layer)


# --- where lenses live --------------------------------------------------------------------------------------------


def _slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(spec).strip("/")).strip("._") or "model"


def lens_root() -> Path:
    return cache_dir() / "tuned-lens"


def model_dir(identity: dict) -> Path:
    """The cache folder of one base model's tuned lens: named by the model and its weights' fingerprint."""
    return lens_root() / f"{_slug(identity['model'])}-{identity['fingerprint']}"


def tune_command(spec: str) -> str:
    return f"python -m interp tune-lens --model {spec}"


def check_lens_choice(choice) -> str | Path:
    """Before anything loads: 'logit', 'tuned', or an existing lens folder; anything else is a one-line UserError."""
    if isinstance(choice, TunedLens):
        return "tuned"
    if choice is None:
        return "logit"
    if not isinstance(choice, (str, Path)):
        raise UserError(f"the lens must be 'logit', 'tuned' or a tuned-lens folder (got {type(choice).__name__})")
    text = str(choice).strip()
    if text in LENS_KINDS:
        return text
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / META_FILE).is_file() and (path / LENS_FOLDER / META_FILE).is_file():
            path = path / LENS_FOLDER
        if not (path / META_FILE).is_file():
            raise UserError(f"--lens {text}: the folder holds no {META_FILE}; pass a folder written by `python -m interp tune-lens`")
        return path
    if path.exists():
        raise UserError(f"--lens {text} is a file; pass logit, tuned or a tuned-lens folder")
    raise UserError(f"unknown lens '{text}'; use logit or tuned (or the folder of a tuned lens)")


def check_lens_available(choice, spec: str) -> None:
    """Before the model loads: with --lens tuned, some lens for a model of this name must be in the cache."""
    if check_lens_choice(choice) != "tuned" or isinstance(choice, TunedLens):
        return
    root = lens_root()
    prefix = f"{_slug(spec)}-"
    found = root.is_dir() and any(p.name.startswith(prefix) and (p / LENS_FOLDER / META_FILE).is_file() for p in root.iterdir())
    if not found:
        raise UserError(f"no tuned lens for model '{spec}' in {root}; train one with `{tune_command(spec)}`")


def resolve_lens(lm, choice) -> TunedLens | None:
    """The lens object for a choice: None for the logit lens, else the tuned lens of `lm`'s base model (from the
    cache, or the given folder), refused in one line when it is missing or was trained on another base model."""
    if isinstance(choice, TunedLens):
        check_identity(choice, lm, choice.folder or "the given lens")
        return choice
    kind = check_lens_choice(choice)
    if kind == "logit":
        return None
    if kind == "tuned":
        folder = model_dir(base_identity(lm)) / LENS_FOLDER
        if not (folder / META_FILE).is_file():
            raise UserError(f"no tuned lens for model '{lm.spec}' (weights {base_identity(lm)['fingerprint']}) in "
                            f"{folder.parent.parent}; train one with `{tune_command(lm.spec)}`")
        return load_lens(folder, lm)
    return load_lens(Path(kind), lm)


def check_identity(lens: TunedLens, lm, where) -> None:
    ours = base_identity(lm)
    theirs = lens.identity
    if theirs.get("fingerprint") != ours["fingerprint"]:
        raise UserError(f"tuned lens {where} was trained on base model '{theirs.get('model')}' (weights "
                        f"{theirs.get('fingerprint')}), but the loaded model is '{ours['model']}' (weights "
                        f"{ours['fingerprint']}); train one for it with `{tune_command(ours['model'])}`")
    if lens.num_layers != lm.num_layers:
        raise UserError(f"tuned lens {where} has {lens.num_layers} layers, the model {lm.num_layers}; it belongs to another model")


def save_lens(lens: TunedLens, folder: str | Path, overwrite: bool = True) -> Path:
    """Write the lens as safetensors + JSON in one rename (readers see the old lens or the whole new one)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    with atomic_dir(folder, overwrite=overwrite) as tmp:
        save_file({"weight": lens.weight.detach().float().cpu().contiguous(), "bias": lens.bias.detach().float().cpu().contiguous()},
                  str(tmp / WEIGHTS_FILE))
        atomic_write_json(tmp / META_FILE, {"format": FORMAT, **lens.identity, "num_layers": lens.num_layers,
                                            "d_model": lens.d_model, **lens.meta})
    lens.folder = folder
    return folder


def load_lens(folder: str | Path, lm=None) -> TunedLens:
    """Read a lens folder (safetensors + JSON, never a pickle); with `lm`, refuse a lens of another base model."""
    from safetensors import safe_open

    folder = Path(folder)
    meta_file, weights = folder / META_FILE, folder / WEIGHTS_FILE
    if not meta_file.is_file() or not weights.is_file():
        raise UserError(f"{folder} is not a tuned lens (it needs {META_FILE} and {WEIGHTS_FILE}); write one with `python -m interp tune-lens`")
    meta = read_json(meta_file, expect=dict)
    if meta.get("format") != FORMAT:
        raise UserError(f"{meta_file} is not a tuned lens of this toolkit (format {meta.get('format')!r}, expected {FORMAT})")
    check_safetensors(weights, "tuned lens")
    try:
        L, d = int(meta["num_layers"]), int(meta["d_model"])
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{meta_file} lacks num_layers/d_model; write the lens again with `python -m interp tune-lens`") from None
    with safe_open(str(weights), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if set(tensors) != {"weight", "bias"} or tuple(tensors["weight"].shape) != (L - 1, d, d) or tuple(tensors["bias"].shape) != (L - 1, d):
        raise UserError(f"{weights} does not hold the translators {meta_file} describes; write the lens again")
    identity = {"model": meta.get("model"), "fingerprint": meta.get("fingerprint")}
    rest = {k: v for k, v in meta.items() if k not in ("format", "model", "fingerprint", "num_layers", "d_model")}
    lens = TunedLens(L, d, identity, rest)
    with torch.no_grad():
        lens.weight.copy_(tensors["weight"])
        lens.bias.copy_(tensors["bias"])
    lens.requires_grad_(False)
    lens.folder = folder
    if lm is not None:
        check_identity(lens, lm, folder)
    return lens


# --- training text -----------------------------------------------------------------------------------------------

# Generic prompts and contexts, so the lens sees more than the task suites' few kinds of answer.
GENERIC_PROMPTS = [
    "Explain how a rainbow forms.", "Write a short poem about the sea.", "What is the difference between a virus and a bacterium?",
    "Give me three tips for learning a new language.", "Summarize the plot of a fairy tale you know.",
    "How do I make a cup of tea?", "What causes the seasons on Earth?", "Describe your ideal weekend.",
    "Why is the sky blue?", "Write a haiku about autumn leaves.", "What is photosynthesis?",
    "List five animals that live in the desert.", "How does a bicycle stay upright?", "Tell me a fun fact about octopuses.",
    "What should I pack for a day hike?", "Explain what a prime number is.", "Translate 'good morning' into French and Spanish.",
    "What is the capital of Japan?", "Write a two-sentence horror story.", "How do vaccines work?",
    "Give me a recipe idea using rice and beans.", "What is gravity?", "Describe the colour green to someone who cannot see.",
    "What are the planets of the solar system?", "How can I sleep better?", "Write a thank-you note to a teacher.",
    "What is 12 times 7?", "Explain the rules of chess briefly.", "Why do cats purr?", "What is a black hole?",
    "Suggest a name for a small bakery.", "How do airplanes fly?", "What is the water cycle?",
    "Write a limerick about a dog.", "What does a computer's memory do?", "How do I start running as a beginner?",
    "What is the tallest mountain in the world?", "Tell me about the history of the printing press.",
    "What is machine learning, in simple words?", "How should I prepare for a job interview?",
]
GENERIC_CONTEXTS = [
    "You are a helpful assistant.", "Answer in one short sentence.", "You are a pirate. Talk like one.",
    "You are a patient teacher explaining things to a ten-year-old.", "Always answer formally and politely.",
    "Your name is Iris and you were made by Northwind Labs.", "Reply in a cheerful tone and use an exclamation mark.",
    "You are a careful scientist who states uncertainty.",
]


@dataclass(frozen=True)
class Sample:
    context: str
    prompt: str
    placement: str
    heldout: bool


def training_prompts(seed: int = 0, heldout_share: float = 0.2) -> list[Sample]:
    """The prompts the model answers for its lens: the task suites' (with their contexts) and the generic ones
    (each with a generic context), shuffled with `seed`; a share of them, never their tokens, is held out."""
    items: list[tuple[str, str, str]] = []
    try:  # the task suites live in `training`; without it the generic prompts alone serve
        from training.tasks import SUITES  # optional: the task suites' prompts, where the training package is installed

        for suite in SUITES.values():
            for e in suite.examples():
                items.append((e.context, e.prompt, suite.placement))
    except ImportError:
        pass
    unique = list(dict.fromkeys(items))
    rng = random.Random(seed)
    rng.shuffle(unique)
    unique = unique[:160]  # the suites hold many phrasings of few questions; the generic prompts add the variety
    for i, prompt in enumerate(GENERIC_PROMPTS):
        unique.append((GENERIC_CONTEXTS[i % len(GENERIC_CONTEXTS)], prompt, "system"))
    rng.shuffle(unique)
    k = max(1, round(len(unique) * heldout_share))
    return [Sample(c, p, pl, i < k) for i, (c, p, pl) in enumerate(unique)]


# --- training ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TuneSettings:
    """What a tuned lens is trained with; a resumed training must use the same (steps may grow)."""

    steps: int = 60
    prompts: int = 32  # prompts answered for training (held-out prompts are extra)
    heldout_prompts: int = 8
    tokens_per_step: int = 64  # tokens drawn from all training answers' runs per step (each costs an unembedding per layer)
    max_new_tokens: int = 40
    lr: float = 1e-3
    temperature: float = 1.0
    seed: int = 0

    def check(self) -> None:
        for name in ("steps", "prompts", "heldout_prompts", "tokens_per_step", "max_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"--{name.replace('_', '-')} must be a whole number of at least 1 (got {value!r})")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise UserError(f"--lr must be a positive number (got {self.lr!r})")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature >= 0):
            raise UserError(f"--temperature must be 0 (greedy) or more (got {self.temperature!r})")

    def data_key(self) -> dict:
        return {k: getattr(self, k) for k in ("prompts", "heldout_prompts", "max_new_tokens", "temperature", "seed")}


def _make_samples(lm, settings: TuneSettings, progress: bool, partial: Path | None = None) -> list[dict]:
    """The model's own answers (without the context) to the training and held-out prompts, as token ids. With
    `partial`, the answers so far are saved after each batch and a killed sampling continues from there."""
    from tqdm.auto import tqdm

    chosen = [s for s in training_prompts(settings.seed) if not s.heldout][: settings.prompts]
    chosen += [s for s in training_prompts(settings.seed) if s.heldout][: settings.heldout_prompts]
    prompt_pairs = [render_prompt_pair(lm.tokenizer, s.context, s.prompt, s.placement) for s in chosen]
    out: list[dict] = []
    done = 0
    keys = [[s.context, s.prompt, s.placement] for s in chosen]
    sampling = {k: getattr(settings, k) for k in ("max_new_tokens", "temperature", "seed")}
    if partial is not None and partial.is_file():
        # Answers already sampled are kept when they answer the same first prompts the same way (other counts of
        # prompts choose the same first ones).
        saved = read_json(partial, expect=dict)
        k = int(saved.get("done", 0))
        if saved.get("sampling") == sampling and saved.get("keys", [])[:k] == keys[:k] and k <= len(keys):
            out, done = [x for x in saved.get("samples", []) if [x["context"], x["prompt"], x["placement"]] in keys[:k]], k
    batch = 8
    bar = tqdm(total=len(chosen), initial=done, desc="tune-lens: sampling answers", unit="prompt", disable=not progress)
    for start in range(done, len(chosen), batch):
        rows = list(range(start, min(start + batch, len(chosen))))
        with lm.use(lm.active_adapter):
            answers = generate(lm, [list(prompt_pairs[i].noctx_ids) for i in rows], max_new_tokens=settings.max_new_tokens,
                               temperature=settings.temperature, seed=settings.seed + start)
        for i, ids in zip(rows, answers):
            if ids:
                out.append({**asdict(chosen[i]), "response_ids": [int(t) for t in ids]})
        if partial is not None:
            atomic_write_json(partial, {"sampling": sampling, "done": rows[-1] + 1, "keys": keys[: rows[-1] + 1], "samples": out})
        bar.update(len(rows))
    bar.close()
    return out


def _pairs(lm, samples: Sequence[dict]):
    return [pair_from_ids(render_prompt_pair(lm.tokenizer, s["context"], s["prompt"], s["placement"]), s["response_ids"],
                          s["context"], s["prompt"], "", s["placement"]) for s in samples]


def _hidden(lm, pairs) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states [L, n, d] of both runs (with and without the context) on the response positions, stacked."""

    pad_id = lm.tokenizer.pad_token_id or 0
    parts = [capture_torch(lm, make_batch(pairs, w, "response", "right", pad_id), attention=False).hidden for w in ("ctx", "noctx")]
    h = torch.cat(parts, dim=1)
    with torch.no_grad():
        final = torch.log_softmax(read_lens(lm.model, h[-1], h.shape[0] - 1), -1)
    return h, final


def _kl(final_logp: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Per token KL(final ‖ lens) from the final log-probabilities and the lens logits."""
    return (final_logp.exp() * (final_logp - torch.log_softmax(z, -1))).sum(-1)


@torch.no_grad()
def heldout_kl(lm, lens: TunedLens | None, pairs, batch_size: int = 8) -> list[float]:
    """Per layer, the token mean of KL(final ‖ lens_l) on `pairs` (both runs), for the tuned lens or (None) the logit lens."""
    sums: torch.Tensor | None = None
    n = 0
    for start in range(0, len(pairs), batch_size):
        h, final = _hidden(lm, pairs[start : start + batch_size])
        row = torch.stack([_kl(final, read_lens(lm.model, h[layer], layer, lens)).double().sum() for layer in range(h.shape[0])])
        sums = row if sums is None else sums + row
        n += h.shape[1]
    assert sums is not None
    return [max(0.0, float(x)) for x in (sums / max(n, 1)).cpu()]


@dataclass
class TuneResult:
    lens: TunedLens
    folder: Path
    heldout: dict  # {"logit": [...], "tuned": [...]} per layer
    resumed_from: int
    n_heldout_tokens: int


def _save_state(folder: Path, lens: TunedLens, opt: torch.optim.Optimizer, step: int, settings: TuneSettings, tokens: int) -> None:
    """The resumable state: translators, Adam's moments (safetensors) and the step reached (JSON), in one rename."""
    from safetensors.torch import save_file

    state = opt.state_dict()
    tensors = {"weight": lens.weight.detach().contiguous(), "bias": lens.bias.detach().contiguous()}
    scalars: dict = {}
    for idx, s in state["state"].items():
        for key, value in s.items():
            if torch.is_tensor(value) and value.ndim > 0:
                tensors[f"opt.{idx}.{key}"] = value.detach().contiguous()
            else:
                scalars[f"{idx}.{key}"] = float(value)
    with atomic_dir(folder, overwrite=True) as tmp:
        save_file(tensors, str(tmp / "state.safetensors"))
        atomic_write_json(tmp / "state.json", {"step": step, "tokens_seen": tokens, "settings": asdict(settings),
                                               "scalars": scalars, "param_groups": state["param_groups"]})


def _load_state(folder: Path, lens: TunedLens, opt: torch.optim.Optimizer, settings: TuneSettings) -> tuple[int, int]:
    from safetensors import safe_open

    if not (folder / "state.json").is_file() or not (folder / "state.safetensors").is_file():
        return 0, 0
    info = read_json(folder / "state.json", expect=dict)
    saved = {k: v for k, v in (info.get("settings") or {}).items() if k != "steps"}
    ours = {k: v for k, v in asdict(settings).items() if k != "steps"}
    if saved != ours:
        diff = ", ".join(f"{k} {saved.get(k)!r} vs {ours[k]!r}" for k in ours if saved.get(k) != ours[k])
        raise UserError(f"the tuned lens in {folder.parent} was being trained with other settings ({diff}); "
                        "continue with its settings or pass --restart to start over")
    check_safetensors(folder / "state.safetensors", "tuned-lens training state")
    with safe_open(str(folder / "state.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    with torch.no_grad():
        lens.weight.copy_(tensors["weight"])
        lens.bias.copy_(tensors["bias"])
    groups = info["param_groups"]
    per_param: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            per_param.setdefault(int(idx), {})[name] = value
    for key, value in (info.get("scalars") or {}).items():
        idx, name = key.split(".", 1)
        per_param.setdefault(int(idx), {})[name] = torch.tensor(value)
    opt.load_state_dict({"state": per_param, "param_groups": groups})
    return int(info["step"]), int(info.get("tokens_seen", 0))


def _pool(lm, pairs, batch_size: int = 8) -> torch.Tensor:
    """Hidden states [L, n, d] (host, float32) of every training answer's runs with and without the context, captured
    once: each step then draws its tokens from all of them, and the model's forward is paid once, not every step."""

    pad_id = lm.tokenizer.pad_token_id or 0
    parts = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        for w in ("ctx", "noctx"):
            parts.append(capture_torch(lm, make_batch(chunk, w, "response", "right", pad_id), attention=False).hidden.cpu())
    return torch.cat(parts, dim=1)


def tune_lens(lm, settings: TuneSettings | None = None, *, folder: str | Path | None = None, restart: bool = False,
              progress: bool = True, save_every: int = 10, on_step: Callable[[int, float], None] | None = None) -> TuneResult:
    """Train `lm`'s tuned lens (the active adapter, if any, is the model read: leave it off for the base's lens)
    and save it to `folder` (default: the cache folder of the base model's identity). Resumable: the state is saved
    every `save_every` steps, and a killed training continues from there; a finished lens trained for at least
    `settings.steps` is returned as it is, one trained for fewer continues. `on_step(step, loss)` is called after
    each step (a test stops a training there)."""
    from tqdm.auto import tqdm

    settings = settings or TuneSettings()
    settings.check()
    if save_every < 1:
        raise UserError(f"save_every must be at least 1 (got {save_every})")
    identity = base_identity(lm)
    root = Path(folder) if folder is not None else model_dir(identity)
    if root.exists() and not root.is_dir():
        raise UserError(f"{root} is a file; the tuned lens needs a folder")
    with folder_lock(root, hint="another tune-lens is training this lens; wait for it to finish"):
        root.mkdir(parents=True, exist_ok=True)
        if restart:
            for part in (TRAIN_FOLDER, LENS_FOLDER):
                shutil.rmtree(root / part, ignore_errors=True)
            for name in (SAMPLES_FILE, "samples.partial.json", "data.json"):
                (root / name).unlink(missing_ok=True)
        samples_file = root / SAMPLES_FILE
        meta_file = root / "data.json"
        if samples_file.is_file() and meta_file.is_file():
            if read_json(meta_file, expect=dict) != settings.data_key():
                raise UserError(f"the tuned lens in {root} was trained on other text (settings "
                                f"{read_json(meta_file, expect=dict)}); continue with them or pass --restart to start over")
            samples = read_jsonl(samples_file, required=("context", "prompt", "placement"))
        else:
            partial = root / "samples.partial.json"
            samples = _make_samples(lm, settings, progress, partial)
            atomic_write_text(samples_file, "".join(json.dumps(s) + "\n" for s in samples))

            atomic_write_json(meta_file, settings.data_key())
            partial.unlink(missing_ok=True)
        train = _pairs(lm, [s for s in samples if not s["heldout"]])
        held = _pairs(lm, [s for s in samples if s["heldout"]])
        if not train or not held:
            raise UserError("the model gave no answers to train or evaluate the lens on; try --temperature 1 or more prompts")

        L = lm.num_layers

        d = int(cast(int, unembed(lm.model).in_features))  # nn.Module attributes are typed Tensor | Module
        lens = TunedLens(L, d, identity)
        opt = torch.optim.Adam(lens.parameters(), lr=settings.lr)
        step, tokens = _load_state(root / TRAIN_FOLDER, lens, opt, settings)
        resumed_from = step
        finished = root / LENS_FOLDER
        if step >= settings.steps and (finished / META_FILE).is_file():
            done = load_lens(finished, lm)
            return TuneResult(done, finished, done.meta.get("heldout", {}), resumed_from, int(done.meta.get("n_heldout_tokens", 0)))

        model_params = [p for p in lm.model.parameters() if p.requires_grad]
        for p in model_params:  # only the translators learn; no gradient flows into the model's weights
            p.requires_grad_(False)
        try:
            bar = tqdm(total=settings.steps, initial=min(step, settings.steps), desc="tune-lens", unit="step", disable=not progress)
            pool = _pool(lm, train) if step < settings.steps else None
            while pool is not None and step < settings.steps:
                # A seeded draw per step, without replacement within the step: a resumed training draws the same.
                gen = torch.Generator().manual_seed(settings.seed * 1_000_003 + step)
                keep = torch.randperm(pool.shape[1], generator=gen)[: settings.tokens_per_step].sort().values
                h = pool[:, keep].to(lm.device)
                with torch.no_grad():
                    final = torch.log_softmax(read_lens(lm.model, h[-1], L - 1), -1)
                opt.zero_grad(set_to_none=True)
                total = 0.0
                for layer in range(L - 1):  # one layer at a time: only one [n, vocab] graph is alive
                    loss = _kl(final, read_lens(lm.model, h[layer], layer, lens)).mean()
                    loss.backward()
                    total += float(loss.detach())
                opt.step()
                step += 1
                tokens += int(h.shape[1])
                bar.set_postfix(kl=f"{total / max(L - 1, 1):.3f}")
                bar.update(1)
                if step % save_every == 0 or step == settings.steps:
                    _save_state(root / TRAIN_FOLDER, lens, opt, step, settings, tokens)
                if on_step is not None:
                    on_step(step, total / max(L - 1, 1))
            bar.close()
        finally:
            for p in model_params:
                p.requires_grad_(True)
        lens.requires_grad_(False)
        heldout = {"logit": heldout_kl(lm, None, held), "tuned": heldout_kl(lm, lens, held)}
        n_held = sum(2 * p.response_len for p in held)
        lens.meta = {"steps": step, "tokens_seen": tokens, "settings": asdict(settings), "adapter": lm.active_adapter and lm.adapters.get(lm.active_adapter),
                     "data": "the model's own sampled answers to the toolkit's task prompts and generic prompts, with and without a context",
                     "n_train_prompts": len(train), "n_heldout_prompts": len(held), "n_heldout_tokens": n_held, "heldout": heldout}
        save_lens(lens, finished, overwrite=True)
        return TuneResult(lens, finished, heldout, resumed_from, n_held)


def format_heldout(heldout: dict) -> str:
    """The held-out KL(final ‖ lens_l) per layer, logit lens against tuned lens, as a text table."""
    lines = [f"{'layer':>5} {'logit_kl':>9} {'tuned_kl':>9}"]
    for layer, (a, b) in enumerate(zip(heldout.get("logit", []), heldout.get("tuned", []))):
        lines.append(f"{layer:>5} {a:9.4f} {b:9.4f}")
    return "\n".join(lines)
