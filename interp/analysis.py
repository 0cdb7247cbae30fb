"""Paired analysis: capture both runs of each pair, then turn them into per-layer divergence, lens and attention numbers."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from interp.capture import get_backend, make_batch
from interp.divergence import LayerDivergence, lens_field_names
from interp.errors import UserError
from interp.lens import DEFAULT_CHUNK, lens_statistics
from interp.metrics import CKAAccumulator, cosine_per_token
from interp.pairs import SCOPES, Pair, make_pairs
from interp.store import check_member_name, read_json, save_divergence

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
) -> LayerDivergence:
    """Compare `lm`'s hidden states with and without the context on the aligned tokens of `pairs`.

    `lm` is a LoadedModel (its active adapter is the model measured). Measured positions are those that predict
    the response tokens (`scope="response"`, the positions the training losses score) or every shared token
    (`scope="shared"`: user turn and response). Batches are padded; the numbers equal one pair at a time.
    `attention=False` or `lens=False` skip those measures (their arrays are NaN). `remote=True` (nnsight only)
    runs the traces on NDIF.
    """
    capture = get_backend(backend)
    if remote:
        if backend != "nnsight":
            raise UserError(f"remote execution needs the nnsight backend, not '{backend}'")
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

    cka = None
    cos, lens_parts, token_example, token_id, target_id = [], [], [], [], []
    attn_ctx, attn_sink, attn_sink_noctx, attn_ctx_tokens = [], [], [], []
    bar = tqdm(total=len(pairs), desc=f"analyze ({backend})", unit="pair", disable=not progress)
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        sides = {which: make_batch(chunk, which, scope, padding, pad_id) for which in ("ctx", "noctx")}
        if not torch.equal(sides["ctx"].targets, sides["noctx"].targets):
            raise AssertionError("measured tokens differ between the with- and without-context runs")
        got = {which: capture(lm, batch, attention=attention) for which, batch in sides.items()}
        h_ctx, h_noctx = got["ctx"].hidden, got["noctx"].hidden
        if cka is None:
            cka = CKAAccumulator(h_ctx.shape[0], h_ctx.shape[-1])
        cka.update(h_ctx, h_noctx)
        cos.append(torch.stack([cosine_per_token(a, b) for a, b in zip(h_ctx, h_noctx)]).float())
        if lens:
            lens_parts.append(lens_statistics(lm.model, h_ctx, h_noctx, sides["ctx"].targets, chunk=lens_chunk))
        rows = sides["ctx"].rows
        token_example.append(rows + start)
        token_id.append(sides["ctx"].input_ids[rows, sides["ctx"].positions])
        target_id.append(sides["ctx"].targets)
        if attention:
            attn_ctx.append(got["ctx"].attn_ctx)
            attn_sink.append(got["ctx"].attn_sink)
            attn_sink_noctx.append(got["noctx"].attn_sink)
            for b, pair in enumerate(chunk):
                n_ctx = pair.ctx_span[1] - pair.ctx_span[0]
                per_query = got["ctx"].attn_ctx_tokens[:, rows == b, :, :n_ctx]  # [blocks, n_b, heads, n_ctx]
                attn_ctx_tokens.append(per_query.mean(1).numpy())
        bar.update(len(chunk))
    bar.close()

    cos_per_token = torch.cat(cos, dim=1).numpy()
    if lens:
        lens_arrays = {name: torch.cat([part[name] for part in lens_parts], dim=1).numpy() for name in lens_parts[0]}
    else:
        lens_arrays = {name: np.full(cos_per_token.shape, np.nan, dtype=np.float32) for name in lens_field_names()}
    n_blocks = cos_per_token.shape[0] - 1
    heads = lm.model.config.num_attention_heads
    mean_over_tokens = lambda parts: torch.cat(parts, dim=1).double().mean(1).numpy()  # noqa: E731 - [blocks, heads]
    if attention:
        attn = {"attn_ctx": mean_over_tokens(attn_ctx), "attn_sink": mean_over_tokens(attn_sink), "attn_sink_noctx": mean_over_tokens(attn_sink_noctx)}
    else:
        attn = {k: np.full((n_blocks, heads), np.nan) for k in ("attn_ctx", "attn_sink", "attn_sink_noctx")}
    debiased = cka.result(debiased=True) if cka.n >= 4 else np.full(cos_per_token.shape[0], np.nan)
    tokens = torch.cat(token_id).numpy()
    targets = torch.cat(target_id).numpy()
    examples_of = torch.cat(token_example).numpy()
    return LayerDivergence(
        cos=cos_per_token.astype(np.float64).mean(1),
        cka=np.asarray(cka.result(debiased=False), dtype=np.float64),
        cka_debiased=np.asarray(debiased, dtype=np.float64),
        cos_per_token=cos_per_token,
        **attn,
        **lens_arrays,
        token_example=examples_of,
        token_id=tokens,
        target_id=targets,
        attn_ctx_tokens=attn_ctx_tokens,
        examples=[_describe(lm.tokenizer, p, tokens[examples_of == i], targets[examples_of == i]) for i, p in enumerate(pairs)],
        meta={
            "model": lm.spec,
            "adapter": lm.active_adapter,
            "adapter_path": lm.adapters.get(lm.active_adapter) if lm.active_adapter else None,
            "backend": backend,
            "scope": scope,
            "padding": padding,
            "placement": pairs[0].placement,
            "num_layers": int(cos_per_token.shape[0]),
            "num_heads": int(heads),
            "n_examples": len(pairs),
            "n_tokens": int(tokens.shape[0]),
        },
    )


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
    from interp.pairs import pair_from_ids, render_prompt_pair
    from interp.runs import read_examples, read_run

    info = read_run(run_dir)
    rows = read_examples(run_dir)
    if rows is None:
        raise UserError(f"{run_dir} has no evaluation yet; run `python -m training eval {run_dir}` first")
    mine = [r for r in rows if r.model == model and r.ids_noctx][:max_examples]
    pairs = []
    for r in mine:
        pp = render_prompt_pair(lm.tokenizer, r.context, r.prompt, info.placement)
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
    lm=None,
) -> dict[str, Path]:
    """Analyze each model of a training run (base and every evaluated student) on the test examples, with the
    tokens each model generated without the context, and save the results under `run_dir/layers/<model>/`.
    `lm`: the run's model already loaded (the evaluation passes its own, so one copy is in memory)."""
    from interp.models import load_model
    from interp.runs import read_examples, read_run

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
    lm = lm or load_model(info.model, device=device)
    written = {}
    for name in wanted:
        adapter = None if name == "base" else lm.load_adapter(run_dir / name, name=name)
        pairs = run_pairs(lm, run_dir, name, max_examples)
        if not pairs:
            continue
        with lm.use(adapter):
            div = analyze(lm, pairs, backend=backend, batch_size=batch_size, progress=progress)
        div.meta["run"] = str(run_dir)
        div.meta["model_name"] = name
        written[name] = save_divergence(div, run_dir / "layers" / name, overwrite=True)
    return written
