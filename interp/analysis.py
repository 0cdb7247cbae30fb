"""Paired analysis: capture both runs of each pair, then turn them into per-layer divergence, lens and attention numbers."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Sequence, cast

import numpy as np
import torch
from tqdm.auto import tqdm

from interp.attention import AttentionMeans
from interp.capture import get_backend
from interp.core import distributed
from interp.core.errors import UserError
from interp.core.archs import unembed
from interp.core.models import load_model
from interp.core.pairs import Pair, SCOPES, pair_from_ids, render_prompt_pair
from interp.core.remote import remote_target
from interp.core.runs import read_examples, read_run
from interp.core.store import check_member_name
from interp.divergence import LayerDivergence, lens_field_names, save_divergence
from interp.hooks import make_batch
from interp.lens import DEFAULT_CHUNK, lens_statistics
from interp.metrics import CKAAccumulator, cosine_per_token
from interp.tuned_lens import check_lens_available, check_lens_choice, resolve_lens

__all__ = ["analyze", "analyze_run", "LayerDivergence"]


def analyze(
    lm,
    pairs: Sequence[Pair],
    backend: str = "nnsight",
    *,
    scope: str = "response",
    batch_size: int = 8,
    padding: str = "right",
    attention: bool = True,
    lens: bool = True,
    lens_chunk: int = DEFAULT_CHUNK,
    progress: bool = False,
    remote: bool = False,
    lens_type="logit",
) -> LayerDivergence:
    """Compare `lm`'s hidden states with and without the context on the aligned tokens of `pairs`.

    `lm` is a LoadedModel (its active adapter is the model measured). Measured positions are those that predict
    the response tokens (`scope="response"`, the positions the training losses score) or every shared token
    (`scope="shared"`: user turn and response). Batches are padded; the numbers equal one pair at a time.
    `attention=False` or `lens=False` skip those measures (their arrays are NaN). `remote=True` (nnsight only)
    runs the traces on NDIF, on the model and adapter named by their Hugging Face ids (`interp.core.remote`); what NDIF
    cannot load by id is refused before any work, and the artifact names what ran remotely.
    `lens_type`: "logit" (default), "tuned" (the tuned lens of the model's base, from the cache: `python -m interp
    tune-lens`), a tuned-lens folder, or an `interp.tuned_lens.TunedLens`; the artifact records which lens read it.
    """

    check_lens_choice(lens_type)
    capture = get_backend(backend)
    target = None
    if remote:
        if backend != "nnsight":
            raise UserError(f"remote execution needs the nnsight backend, not '{backend}'")
        target = remote_target(lm)
        capture = functools.partial(capture, remote=True)
    if scope not in SCOPES:
        raise UserError(f"unknown scope '{scope}'; use one of {', '.join(SCOPES)}")
    for name, value in (("batch_size", batch_size), ("lens_chunk", lens_chunk)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise UserError(f"{name} must be an integer of at least 1 (got {value!r})")
    if not hasattr(lm, "model") or not hasattr(lm, "tokenizer"):
        raise UserError(f"analyze needs a model from interp.load_model (got {type(lm).__name__})")
    if pairs is None or isinstance(pairs, (str, bytes, dict)):
        raise UserError(f"pairs must be a list of aligned pairs from interp.make_pairs (got {type(pairs).__name__})")
    pairs = list(pairs)
    if not pairs:
        raise UserError("no pairs to analyze")
    for i, p in enumerate(pairs, 1):
        if not isinstance(p, Pair):
            raise UserError(f"pair {i} is a {type(p).__name__}, not an aligned pair; build pairs with "
                            "interp.make_pairs(lm.tokenizer, records) first")
    max_len = getattr(lm.model.config, "max_position_embeddings", None)
    for i, p in enumerate(pairs, 1):
        if max_len and len(p.ctx_ids) > max_len:
            raise UserError(f"pair {i} has {len(p.ctx_ids)} tokens with the context, more than the model's window of {max_len}")
    pad_id = lm.tokenizer.pad_token_id or 0
    tuned = resolve_lens(lm, lens_type) if lens else None

    # Under torchrun each process measures every world-th batch (rank 0 the first); the sums are reduced and the
    # per-token arrays gathered below, so every process ends with the numbers a single process computes.
    rank, world = distributed.world()
    batches = [(k, pairs[s : s + batch_size]) for k, s in enumerate(range(0, len(pairs), batch_size))]
    mine = batches[rank::world]
    n_layers, d = lm.num_layers, cast(int, unembed(lm.model).in_features)  # nn.Module attributes are typed Tensor | Module
    heads = lm.model.config.num_attention_heads
    n_blocks = n_layers - 1
    cka = CKAAccumulator(n_layers, d)
    # Attention masses are summed over measured tokens in float64 where the model runs; means are taken at the end.
    attn = AttentionMeans(n_blocks, heads, _stats_device(lm))
    per_batch = {}
    bar = tqdm(total=len(pairs), desc=f"analyze ({backend})", unit="pair", disable=not (progress and rank == 0))
    for i, (k, chunk) in enumerate(mine):
        start = k * batch_size
        sides = {which: make_batch(chunk, which, scope, padding, pad_id) for which in ("ctx", "noctx")}
        if not torch.equal(sides["ctx"].targets, sides["noctx"].targets):
            raise AssertionError("measured tokens differ between the with- and without-context runs")
        got = {which: capture(lm, batch, attention=attention) for which, batch in sides.items()}
        h_ctx, h_noctx = got["ctx"].hidden, got["noctx"].hidden
        if i == 0 and world > 1:
            _share_shift(cka, h_ctx, h_noctx)
        cka.update(h_ctx, h_noctx)
        rows = sides["ctx"].rows
        part: dict[str, Any] = {
            "cos": torch.stack([cosine_per_token(a, b) for a, b in zip(h_ctx, h_noctx)]).float(),
            "token_example": rows + start,
            "token_id": sides["ctx"].input_ids[rows, sides["ctx"].positions],
            "target_id": sides["ctx"].targets,
        }
        if lens:
            part["lens"] = lens_statistics(lm.model, h_ctx, h_noctx, sides["ctx"].targets, chunk=lens_chunk, to_host=False,
                                           tuned=tuned)
        if attention:  # capture(attention=True) fills every attention field
            assert got["ctx"].attn_ctx is not None and got["ctx"].attn_sink is not None and got["noctx"].attn_sink is not None
            assert got["ctx"].attn_ctx_tokens is not None
            attn.update(got["ctx"], got["noctx"])
            part["attn_ctx_tokens"] = [
                got["ctx"].attn_ctx_tokens[:, rows.to(got["ctx"].attn_ctx_tokens.device) == b, :, : pair.ctx_span[1] - pair.ctx_span[0]].mean(1)
                for b, pair in enumerate(chunk)
            ]  # per pair [blocks, heads, n_ctx]
        per_batch[k] = part
        bar.update(len(chunk) * world)
    bar.close()
    if world > 1 and not mine:  # more processes than batches: this one only joins the collectives
        _share_shift(cka, None, None, n_layers=n_layers, d=d, device=_stats_device(lm))
    if world > 1:
        cka.all_reduce()
        attn.all_reduce()

    # The per-token arrays cross to the host once, here, and are put back in batch order.
    per_batch = {k: _to_host(part) for k, part in per_batch.items()}
    if world > 1:
        per_batch = {k: part for shard in distributed.all_gather_objects(per_batch) for k, part in shard.items()}
    ordered = [per_batch[k] for k in sorted(per_batch)]
    cos_per_token = torch.cat([p["cos"] for p in ordered], dim=1).numpy()
    if lens:
        lens_arrays = {name: torch.cat([p["lens"][name] for p in ordered], dim=1).numpy() for name in lens_field_names()}
    else:
        lens_arrays = {name: np.full(cos_per_token.shape, np.nan, dtype=np.float32) for name in lens_field_names()}
    if attention:
        attn_means = attn.result()
        attn_ctx_tokens = [t.numpy() for p in ordered for t in p["attn_ctx_tokens"]]
    else:
        attn_means = {k: np.full((n_blocks, heads), np.nan) for k in AttentionMeans.NAMES}
        attn_ctx_tokens = []
    debiased = cka.result(debiased=True) if cka.n >= 4 else np.full(cos_per_token.shape[0], np.nan)
    tokens = torch.cat([p["token_id"] for p in ordered]).numpy()
    targets = torch.cat([p["target_id"] for p in ordered]).numpy()
    examples_of = torch.cat([p["token_example"] for p in ordered]).numpy()
    return LayerDivergence(
        cos=cos_per_token.astype(np.float64).mean(1),
        cka=np.asarray(cka.result(debiased=False), dtype=np.float64),
        cka_debiased=np.asarray(debiased, dtype=np.float64),
        cos_per_token=cos_per_token,
        **attn_means,
        **lens_arrays,
        token_example=examples_of,
        token_id=tokens,
        target_id=targets,
        attn_ctx_tokens=attn_ctx_tokens,
        examples=[_describe(lm.tokenizer, p, tokens[examples_of == i], targets[examples_of == i]) for i, p in enumerate(pairs)],
        meta={
            "model": lm.spec if target is None else target.model_id,
            "adapter": lm.active_adapter,
            "adapter_path": lm.adapters.get(lm.active_adapter) if target is None and lm.active_adapter else (target and target.adapter_id),
            **({"remote": "ndif"} if target is not None else {}),
            "backend": backend,
            "scope": scope,
            "padding": padding,
            "placement": pairs[0].placement,
            "num_layers": int(cos_per_token.shape[0]),
            "num_heads": int(heads),
            "n_examples": len(pairs),
            "n_tokens": int(tokens.shape[0]),
            "lens": "tuned" if tuned is not None else "logit",
            "lens_id": tuned.describe() if tuned is not None else None,
        },
    )


def _stats_device(lm) -> torch.device:
    """Where the float64 sums live: the model's device, except MPS (no float64)."""
    dev = lm.device
    return torch.device("cpu") if dev.type == "mps" else dev


def _share_shift(cka: CKAAccumulator, h_ctx, h_noctx, *, n_layers=None, d=None, device=None) -> None:
    """Give every process rank 0's first measured token as the CKA shift, so their sums can be added together
    (a single process shifts by the same row: the first token of the first batch)."""
    if h_ctx is not None:
        x0, y0 = h_ctx[:, :1].double(), h_noctx[:, :1].double()
    else:
        x0 = y0 = torch.zeros(n_layers, 1, d, dtype=torch.float64, device=device)
    both = distributed.broadcast(torch.cat([x0, y0], dim=1), src=0)
    cka.set_shift(both[:, :1], both[:, 1:])


def _to_host(part: dict) -> dict:
    out: dict[str, Any] = {}
    for key, value in part.items():
        if isinstance(value, dict):
            out[key] = {k: v.cpu() for k, v in value.items()}
        elif isinstance(value, list):
            out[key] = [v.cpu() for v in value]
        else:
            out[key] = value.cpu()
    return out


def _describe(tokenizer, pair: Pair, tokens: np.ndarray, targets: np.ndarray) -> dict:
    start, end = pair.ctx_span
    as_text = lambda ids: [tokenizer.decode([int(t)]) for t in ids]  # noqa: E731
    return {
        "context": pair.context,
        "prompt": pair.prompt,
        "response": pair.response,
        "placement": pair.placement,
        "ctx_tokens": as_text(pair.ctx_ids[start:end]),
        "tokens": as_text(tokens),
        "target_tokens": as_text(targets),
    }


def run_pairs(lm, run_dir: str | Path, model: str, max_examples: int | None = None) -> list[Pair]:
    """The aligned pairs of one model's evaluation: each test example with the exact token ids the model generated
    without the context (never re-tokenized text). Examples with an empty answer have nothing to measure."""

    info = read_run(run_dir)
    rows = read_examples(run_dir)
    if rows is None:
        raise UserError(f"{run_dir} has no evaluation yet; run `python -m training eval {run_dir}` first")
    mine = [r for r in rows if r.model == model and r.ids_noctx][:max_examples]
    pairs = []
    for r in mine:
        pp = render_prompt_pair(lm.tokenizer, r.context, r.prompt, info.placement, no_context=info.no_context)
        pairs.append(pair_from_ids(pp, r.ids_noctx, r.context, r.prompt, r.response_noctx, info.placement))
    return pairs


def analyze_run(
    run_dir: str | Path,
    models: Sequence[str] | None = None,
    backend: str = "nnsight",
    *,
    batch_size: int = 8,
    max_examples: int | None = None,
    device: str | None = None,
    progress: bool = True,
    dtype: str | torch.dtype | None = "auto",
    lm=None,
    lens_type="logit",
) -> dict[str, Path]:
    """Analyze each model of a training run (base and every evaluated student) on the test examples, with the
    tokens each model generated without the context, and save the results under `run_dir/layers/<model>/`.
    `lm`: the run's model already loaded (the evaluation passes its own, so one copy is in memory).

    Under `torchrun` the pairs are shared out between the processes (gloo on CPU, NCCL on GPUs) and rank 0 writes.
    `lens_type`: the lens that reads the layers (see `analyze`); one tuned lens, the base's, reads every student.
    """

    distributed.init_from_env()
    run_dir = Path(run_dir)
    info = read_run(run_dir)
    if max_examples is not None and max_examples < 1:
        raise UserError(f"--max-examples must be at least 1 (got {max_examples})")
    rows = read_examples(run_dir)
    if rows is None:
        raise UserError(f"{run_dir} has no evaluation yet; run `python -m training eval {run_dir}` first")
    available = sorted({r.model for r in rows if r.model != "teacher"})  # the teacher is the base's weights
    wanted = list(models) if models else available
    unknown = [m for m in wanted if m not in available]
    if unknown:
        raise UserError(f"{run_dir} has no evaluated model named {', '.join(unknown)}; evaluated: {', '.join(available)}")
    for name in wanted:
        if name != "base":  # each becomes a folder name: RUN/<name> (the adapter) and RUN/layers/<name>
            check_member_name(name, run_dir / "eval")
    check_lens_choice(lens_type)
    if lm is None:
        check_lens_available(lens_type, info.model)
    lm = lm or load_model(info.model, device=device, dtype=dtype)
    tuned = resolve_lens(lm, lens_type)  # before any adapter loads: the base's identity, refused in one line
    written = {}
    for name in wanted:
        adapter = None if name == "base" else lm.load_adapter(run_dir / name, name=name)
        pairs = run_pairs(lm, run_dir, name, max_examples)
        if not pairs:
            continue
        with lm.use(adapter):
            div = analyze(lm, pairs, backend=backend, batch_size=batch_size, progress=progress,
                          lens_type=tuned if tuned is not None else "logit")
        div.meta["run"] = str(run_dir)
        div.meta["model_name"] = name
        target = run_dir / "layers" / name
        if distributed.is_main():
            save_divergence(div, target, overwrite=True)
        distributed.barrier()  # the artifact exists for every process once this returns
        written[name] = target
    return written
