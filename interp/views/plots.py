"""Plotly figures of a LayerDivergence, an evaluation table and training curves; the app, report and notebooks share them."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from interp.core.store import atomic_write_text

if TYPE_CHECKING:
    from interp.divergence import LayerDivergence

MEASURES = ("cos", "cka", "cka_debiased")
MEASURE_LABELS = {"cos": "cosine", "cka": "CKA", "cka_debiased": "CKA (debiased)"}
_DASH = {"cos": "solid", "cka": "dash", "cka_debiased": "dot"}
LENS_STAT_LABELS = {  # axis labels of the per-token lens statistics (names: interp.divergence.LENS_STATS)
    "target_prob": "probability of the actual token",
    "top1_prob": "top-1 probability",
    "target_rank": "rank of the actual token",
    "entropy": "entropy (nats)",
    "kl_final": "KL(final || lens)",
}
TRAINING_KEYS = ("loss", "L_opd", "L_cons", "lam", "response_len")
LAYER_AXIS = "layer (0 = embeddings)"
_PALETTE = qualitative.Plotly


def model_colors(names: Sequence[str]) -> dict[str, str]:
    """A fixed colour per model name, the same in every figure of one page."""
    return {name: _PALETTE[i % len(_PALETTE)] for i, name in enumerate(names)}


def token_label(text: str, max_len: int = 14) -> str:
    """A token as it can be read on an axis: whitespace made visible, long runs cut (a token of 30 spaces exists)."""
    label = str(text).replace("\n", "⏎").replace("\t", "⇥").replace(" ", "·") or "∅"
    return label if len(label) <= max_len else label[: max_len - 1] + "…"


def _layout(fig: go.Figure, title: str, height: int) -> go.Figure:
    fig.update_layout(title=title, height=height, margin=dict(l=60, r=20, t=60, b=50), template="plotly_white",
                      hoverlabel=dict(namelength=-1))
    return fig


def layer_divergence(divs: Mapping[str, LayerDivergence], measures: Sequence[str] = MEASURES, divergence: bool = False,
                     title: str | None = None) -> go.Figure:
    """Per-layer similarity of the with- and without-context hidden states, one colour per model and one dash per
    measure; `divergence=True` draws 1 − similarity instead."""
    fig = go.Figure()
    colors = model_colors(list(divs))
    for name, div in divs.items():
        for m in measures:
            values = np.asarray(getattr(div, m), dtype=np.float64)
            y = 1.0 - values if divergence else values
            fig.add_trace(go.Scatter(
                x=list(range(len(y))), y=y, mode="lines+markers", name=f"{name} · {MEASURE_LABELS.get(m, m)}",
                line=dict(color=colors[name], dash=_DASH.get(m, "solid")), marker=dict(size=5),
                legendgroup=name,
                hovertemplate=f"{name}<br>{'1 − ' if divergence else ''}{m}[%{{x}}] = %{{y:.4f}}<extra></extra>",
            ))
    what = "1 − similarity" if divergence else "similarity"
    fig.update_xaxes(title=LAYER_AXIS, dtick=1 if max((d.num_layers for d in divs.values()), default=0) <= 32 else None)
    fig.update_yaxes(title=f"{what} (with vs without context)")
    return _layout(fig, title or f"Layer divergence: {what} of hidden states with and without the context", 420)


def _decode_all(ids: np.ndarray, decode: Callable[[int], str] | None) -> np.ndarray:
    """Token strings for an integer array; ids stand in when no tokenizer is at hand."""
    flat = ids.astype(np.int64).ravel()
    cache: dict[int, str] = {}
    out = []
    for raw in flat:
        i = int(raw)
        if i not in cache:
            cache[i] = token_label(decode(i)) if decode else f"#{i}"
        out.append(cache[i])
    return np.array(out, dtype=object).reshape(ids.shape)


def example_token_labels(div, example: int) -> list[str]:
    """Axis labels for one example's measured positions: the token each position predicts."""
    ex = div.examples[example] if example < len(div.examples) else {}
    idx = div.example_tokens(example)
    targets = ex.get("target_tokens") or [f"#{int(t)}" for t in div.target_id[idx]]
    return [f"{j}:{token_label(t)}" for j, t in enumerate(targets)]


def logit_lens(div, example: int, stat: str = "target_prob", decode: Callable[[int], str] | None = None,
               title: str | None = None, show_text: bool | None = None) -> go.Figure:
    """Layers × response tokens of one example, without and with the context side by side: colour is `stat`, the
    cell text the lens's top-1 token (written in the cells when they are few, always in the hover, with the top-1
    probability and the actual token's probability and rank)."""
    idx = div.example_tokens(example)
    if idx.size == 0:
        raise ValueError(f"example {example} has no measured tokens")
    labels = example_token_labels(div, example)
    ex = div.examples[example] if example < len(div.examples) else {}
    x = list(range(idx.size))
    y = list(range(div.num_layers))
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.04,
                        subplot_titles=("without context", "with context"))
    if show_text is None:
        # Thousands of SVG labels make the browser slow to draw; past this the top-1 token is in the hover only.
        show_text = idx.size <= 24 and idx.size * div.num_layers <= 600
    for col, side in enumerate(("noctx", "ctx"), 1):
        z = np.round(np.asarray(getattr(div, f"lens_{stat}_{side}"), dtype=np.float64)[:, idx], 5)
        top1 = _decode_all(np.asarray(getattr(div, f"lens_top1_{side}"))[:, idx], decode)
        top1_prob = np.round(np.asarray(getattr(div, f"lens_top1_prob_{side}"), dtype=np.float64)[:, idx], 4)
        target_prob = np.round(np.asarray(getattr(div, f"lens_target_prob_{side}"), dtype=np.float64)[:, idx], 4)
        rank = np.asarray(getattr(div, f"lens_target_rank_{side}"))[:, idx].astype(np.int64)
        custom = np.stack([np.broadcast_to(np.array(labels, dtype=object), z.shape), top1, top1_prob.astype(object),
                           target_prob.astype(object), rank.astype(object)], axis=-1)
        fig.add_trace(go.Heatmap(
            z=z, x=x, y=y, text=top1 if show_text else None, texttemplate="%{text}" if show_text else None,
            textfont=dict(size=9), customdata=custom, coloraxis="coloraxis",
            hovertemplate=(f"{side} · layer %{{y}} · position %{{customdata[0]}}"
                           "<br>top-1 %{customdata[1]} (p=%{customdata[2]})<br>actual token p=%{customdata[3]}, "
                           f"rank %{{customdata[4]}}<br>{stat} = %{{z:.4f}}<extra></extra>"),
        ), row=1, col=col)
        fig.update_xaxes(tickmode="array", tickvals=x, ticktext=labels, tickangle=-60, row=1, col=col)
    zrange = dict(cmin=0.0, cmax=1.0) if stat in ("target_prob", "top1_prob") else {}
    fig.update_layout(coloraxis=dict(colorscale="Viridis", colorbar=dict(title=stat), **zrange))
    fig.update_yaxes(title=LAYER_AXIS, row=1, col=1)
    head = (ex.get("prompt") or "")[:60]
    return _layout(fig, title or f"Logit lens, example {example} ({head!r}): {LENS_STAT_LABELS.get(stat, stat)}",
                   max(380, 18 * div.num_layers + 160))


def lens_kl(divs: Mapping[str, LayerDivergence], examples: Mapping[str, int | None] | None = None,
            title: str | None = None) -> go.Figure:
    """Per layer, KL(lens^noctx || lens^ctx) averaged over the measured tokens (of one example, where given)."""
    fig = go.Figure()
    colors = model_colors(list(divs))
    for name, div in divs.items():
        example = (examples or {}).get(name)
        if example is None:
            y = div.layer_mean("lens_kl_noctx_ctx")
        else:
            idx = div.example_tokens(example)
            y = np.asarray(div.lens_kl_noctx_ctx, dtype=np.float64)[:, idx].mean(axis=1)
        fig.add_trace(go.Scatter(x=list(range(len(y))), y=y, mode="lines+markers", name=name,
                                 line=dict(color=colors[name]),
                                 hovertemplate=f"{name}<br>KL[%{{x}}] = %{{y:.4f}} nats<extra></extra>"))
    fig.update_xaxes(title=LAYER_AXIS, dtick=1 if max((d.num_layers for d in divs.values()), default=0) <= 32 else None)
    fig.update_yaxes(title="KL(lens without || lens with context), nats")
    return _layout(fig, title or "Logit-lens KL between the runs without and with the context, per layer", 360)


def attention(div, title: str | None = None, pickable: bool = False) -> go.Figure:
    """attn_ctx[layer, head] (mass on the context's tokens) beside the attention sink (mass on the first token),
    both from the with-context run; rows are decoder blocks, numbered as layers (block l outputs layer l).
    `pickable` lays a clickable point on each attn_ctx cell (heatmaps themselves cannot be selected), so that an
    app can pick a layer and head by clicking."""
    blocks, heads = np.asarray(div.attn_ctx).shape
    y = list(range(1, blocks + 1))
    x = list(range(heads))
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.2,
                        subplot_titles=("attention to the context (attn_ctx)", "attention sink (first token)"))
    for col, (name, values, axis) in enumerate((("attn_ctx", div.attn_ctx, "coloraxis"),
                                                ("attn_sink", div.attn_sink, "coloraxis2")), 1):
        hover = f"layer %{{y}} · head %{{x}}<br>{name} = %{{z:.4f}}<extra></extra>"
        fig.add_trace(go.Heatmap(z=np.asarray(values, dtype=np.float64), x=x, y=y, coloraxis=axis,
                                 hovertemplate=hover, hoverinfo="skip" if pickable and col == 1 else None),
                      row=1, col=col)
        fig.update_xaxes(title="head", dtick=1, row=1, col=col)
    if pickable:
        hx, hy = np.meshgrid(x, y)
        fig.add_trace(go.Scatter(
            x=hx.ravel(), y=hy.ravel(), customdata=np.asarray(div.attn_ctx, dtype=np.float64).ravel(), mode="markers",
            marker=dict(symbol="square-open", size=14, color="rgba(0,0,0,0)", line=dict(width=2)),
            selected=dict(marker=dict(color="#d62728", opacity=1)), unselected=dict(marker=dict(opacity=0)),
            showlegend=False, name="pick",
            hovertemplate="layer %{y} · head %{x}<br>attn_ctx = %{customdata:.4f}<br>click to see its weights<extra></extra>",
        ), row=1, col=1)
    fig.update_yaxes(dtick=1 if blocks <= 32 else None)
    fig.update_yaxes(title="layer (decoder block)", row=1, col=1)
    # Each panel keeps its own colour scale: the sink usually takes far more mass than the context.
    fig.update_layout(coloraxis=dict(colorscale="Blues", colorbar=dict(title="ctx", x=0.41, xanchor="left", thickness=12)),
                      coloraxis2=dict(colorscale="Greys", colorbar=dict(title="sink", x=1.0, xanchor="left", thickness=12)))
    return _layout(fig, title or "Attention to the context, per layer and head (with-context run)",
                   max(360, 16 * blocks + 140))


def head_weights(div, example: int, layer: int, head: int, title: str | None = None) -> go.Figure:
    """One head's attention over the context's tokens for one example; `layer` counts decoder blocks from 1."""
    weights = np.asarray(div.attn_ctx_tokens[example][layer - 1, head], dtype=np.float64)
    ex = div.examples[example] if example < len(div.examples) else {}
    tokens = ex.get("ctx_tokens") or [f"#{i}" for i in range(weights.size)]
    labels = [f"{j}:{token_label(t)}" for j, t in enumerate(tokens)]
    fig = go.Figure(go.Bar(x=list(range(weights.size)), y=weights, customdata=labels, marker_color="#1f77b4",
                           hovertemplate="%{customdata}<br>weight %{y:.4f}<extra></extra>"))
    fig.update_xaxes(tickmode="array", tickvals=list(range(weights.size)), ticktext=labels, tickangle=-60,
                     title="context token")
    fig.update_yaxes(title="mean attention weight over the measured positions")
    return _layout(fig, title or f"Layer {layer}, head {head}: attention over the context tokens (example {example})", 380)


def format_value(value) -> str:
    """A table cell: three decimals for floats, a dash for a missing value."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def eval_table(rows: Sequence[Mapping], columns: Sequence[str] | None = None, title: str | None = None) -> go.Figure:
    """The evaluation table (one row per model) as a figure."""
    columns = list(columns or (rows[0].keys() if rows else ["model"]))
    cells = [[format_value(r.get(c)) for r in rows] for c in columns]
    fig = go.Figure(go.Table(header=dict(values=columns, fill_color="#e8eef7", align="left"),
                             cells=dict(values=cells, align="left")))
    return _layout(fig, title or "Evaluation (test split)", 80 + 28 * (len(rows) + 1))


def training_curves(metrics: Mapping[str, Sequence[Mapping]], keys: Sequence[str] = TRAINING_KEYS,
                    title: str | None = None) -> go.Figure:
    """Training curves from metrics.jsonl: one panel per quantity, one line per student."""
    keys = [k for k in keys if any(k in row for rows in metrics.values() for row in rows)]
    keys = keys or ["loss"]
    fig = make_subplots(rows=1, cols=len(keys), subplot_titles=keys, horizontal_spacing=0.06)
    colors = model_colors(list(metrics))
    for col, key in enumerate(keys, 1):
        for name, rows in metrics.items():
            points = [(r.get("step", i), r[key]) for i, r in enumerate(rows) if r.get(key) is not None]
            if not points:
                continue
            steps, values = zip(*points)
            fig.add_trace(go.Scatter(x=steps, y=values, mode="lines", name=name, legendgroup=name,
                                     showlegend=col == 1, line=dict(color=colors[name]),
                                     hovertemplate=f"{name}<br>step %{{x}}<br>{key} = %{{y:.4g}}<extra></extra>"),
                          row=1, col=col)
        fig.update_xaxes(title="step", row=1, col=col)
    return _layout(fig, title or "Training curves", 340)


def lens_summary(div, stats: Sequence[str] = ("target_prob", "entropy", "kl_final"), title: str | None = None) -> go.Figure:
    """Per layer, the token-mean of logit-lens statistics with the context (solid) and without it (dashed), as
    tuned-lens draws them: one panel per statistic."""
    fig = make_subplots(rows=1, cols=len(stats), subplot_titles=[LENS_STAT_LABELS.get(s, s) for s in stats],
                        horizontal_spacing=0.07)
    for col, stat in enumerate(stats, 1):
        for side, dash, color in (("ctx", "solid", "#d62728"), ("noctx", "dash", "#1f77b4")):
            y = div.layer_mean(f"lens_{stat}_{side}")
            fig.add_trace(go.Scatter(x=list(range(len(y))), y=y, mode="lines+markers", name=side, legendgroup=side,
                                     showlegend=col == 1, line=dict(dash=dash, color=color), marker=dict(size=4),
                                     hovertemplate=f"{side}<br>layer %{{x}}<br>{stat} = %{{y:.4f}}<extra></extra>"),
                          row=1, col=col)
        fig.update_xaxes(title=LAYER_AXIS, row=1, col=col)
    return _layout(fig, title or "Logit lens per layer, mean over the measured tokens", 360)


def frontier_figure(study: Mapping, x: str = "card_effect:loops", y: str = "follow_cf_clean", budget: int | None = None) -> go.Figure:
    """The removability frontier of a study, the seed the unit: one point per setting and suite at one budget (the
    full one by default), the mean over seeds with its hierarchical-bootstrap 95% interval as error bars.

    x: the card's own effect on loops (`card_effect:loops`; 0 = the card changes the model's loops as it changes the
    base's), y: `follow_cf` among clean counterfactual answers (still listens). One colour per setting, named in the
    legend; the base is a black diamond; an unhealthy setting (no-card loops above the base's by more than the
    study's margin) is drawn hollow; a setting measured on fewer seeds than the suite's most is drawn small (its
    interval is of fewer seeds, not only wider). The goal is the top middle: listens, and the card adds nothing of its
    own."""
    rows = [r for r in study.get("settings", []) if r.get("budget") == (budget or (study.get("budgets") or [None])[-1])]

    def stat(r: Mapping, key: str):
        if key.startswith("card_effect:"):
            if r["model"] == "base":  # the base's own effect is the reference: 0 by definition
                return {"value": 0.0, "ci": None}
            return (r.get("card_effect") or {}).get(key.split(":", 1)[1])
        return r.get(key)

    def label(key: str) -> str:
        return f"card effect on {key.split(':', 1)[1]}" if key.startswith("card_effect:") else key

    suites = list(dict.fromkeys(r["suite"] for r in rows)) or ["(no results yet)"]
    fig = make_subplots(rows=1, cols=len(suites), subplot_titles=suites, shared_yaxes=True, horizontal_spacing=0.05)
    names = list(dict.fromkeys(r["model"] for r in rows if r["model"] != "base"))
    colors = model_colors(names)
    most = {s: max((len(r.get("seeds", [])) for r in rows if r["suite"] == s), default=0) for s in suites}
    shown: set[str] = set()
    xs: list[float] = []
    few_seeds = False
    for col, suite in enumerate(suites, 1):
        for r in (r for r in rows if r["suite"] == suite):
            sx, sy = stat(r, x), stat(r, y)
            if not sx or not sy or sx.get("value") is None or sy.get("value") is None:
                continue
            vx, vy = sx["value"], sy["value"]
            xs += [vx, *(sx.get("ci") or [])]
            ref = r["model"] == "base"
            health = (r.get("health") or {}).get("verdict")
            hollow = health == "unhealthy"
            n_seeds = len(r.get("seeds", []))
            few = n_seeds < most[suite]
            few_seeds |= few
            ex, ey = sx.get("ci") or [vx, vx], sy.get("ci") or [vy, vy]
            harm = r.get("harm") or {}
            hover = (f"<b>{r['model']}</b> ({suite}, {len(r.get('seeds', []))} seeds, budget {r.get('budget')})<br>"
                     f"{label(x)} = {vx:+.2f} [{ex[0]:+.2f}, {ex[1]:+.2f}]<br>{y} = {vy:.2f} [{ey[0]:.2f}, {ey[1]:.2f}]<br>"
                     + (f"health: {health} (no-card loops − base's {r['health']['loops']['value']:+.2f})<br>" if health else "")
                     + (f"harm {harm.get('k')}/{harm.get('n')}" if harm.get("n") else "") + "<extra></extra>")
            name = r["model"]
            color = "black" if ref else colors[r["model"]]
            fig.add_trace(go.Scatter(
                x=[vx], y=[vy], mode="markers",
                error_x=dict(type="data", symmetric=False, array=[ex[1] - vx], arrayminus=[vx - ex[0]], color=color, thickness=1),
                error_y=dict(type="data", symmetric=False, array=[ey[1] - vy], arrayminus=[vy - ey[0]], color=color, thickness=1),
                marker=dict(size=8 if few else 13, color=color, symbol=("diamond" if ref else "circle") + ("-open" if hollow else ""),
                            line=dict(width=2, color=color)),
                name=name, legendgroup=name, showlegend=False, hovertemplate=hover,
            ), row=1, col=col)
            if name not in shown:  # the legend shows each setting's colour filled, whatever its first point's health
                fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=name, legendgroup=name, hoverinfo="skip",
                                         marker=dict(size=13, color=color, symbol="diamond" if ref else "circle")), row=1, col=1)
                shown.add(name)
        fig.add_vline(x=0, line=dict(color="#999", dash="dot", width=1), row=1, col=col)
    if any((r.get("health") or {}).get("verdict") == "unhealthy" for r in rows):  # what a hollow marker means
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name="hollow: unhealthy",
                                 marker=dict(size=13, symbol="circle-open", color="#555", line=dict(width=2)), hoverinfo="skip"),
                      row=1, col=1)
    if few_seeds:  # what a small marker means
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name="small: fewer seeds", hoverinfo="skip",
                                 marker=dict(size=8, symbol="circle", color="#555")), row=1, col=1)
    if rows and not xs:  # results, but none with both measures: say why the panels are empty
        fig.add_annotation(text=f"No point to draw: no setting of this study has both {label(x)} and {y} "
                                "(a study without counterfactual cards measures no follow_cf).",
                           xref="paper", yref="paper", x=0.5, y=0.5, showarrow=False, font=dict(size=14))
    span = max([0.3] + [abs(v) for v in xs]) * 1.15
    for col in range(1, len(suites) + 1):
        fig.update_xaxes(title_text=label(x), range=[-span, span], row=1, col=col)
    fig.update_yaxes(title_text=f"{y} (higher: still listens)", range=[-0.05, 1.05], row=1, col=1)
    fig.update_layout(legend=dict(title="setting", orientation="h", yanchor="top", y=-0.22, x=0))
    return _layout(fig, f"Removability frontier: {study.get('name', '')} (mean over seeds, 95% interval; ◆ base)", 520)


def write_plotlyjs(folder: str | os.PathLike) -> Path:
    """`folder`/plotly.min.js: the plotly.js of the installed plotly package, written once (again only if it differs).

    The study figures of a results folder share this one copy (they load `../plotly.min.js` and so open offline);
    it is written by the study command and by `make setup`, never committed (4.8 MB)."""
    from plotly.offline import get_plotlyjs  # plotly's bundled script, read only when figures are written

    target = Path(folder) / "plotly.min.js"
    js = get_plotlyjs()
    if not target.exists() or target.read_text(encoding="utf-8") != js:
        atomic_write_text(target, js)
    return target


def figure_html(fig: go.Figure, plotlyjs: str) -> str:
    """A whole HTML page for `fig` that loads plotly.js from the relative path `plotlyjs`, and from plotly's CDN
    (the same version) where that file is missing (a fresh clone before `make setup`, a folder copied alone). The
    same figure gives the same page, byte for byte: its element id is a digest of the figure, not a random one, so a
    rebuilt study's committed figure changes only when the figure does."""
    from plotly.offline import get_plotlyjs_version

    div_id = "fig-" + hashlib.sha256(fig.to_json().encode("utf-8")).hexdigest()[:16]
    html = fig.to_html(include_plotlyjs=plotlyjs, full_html=True, div_id=div_id)
    tag = f'<script charset="utf-8" src="{plotlyjs}"></script>'
    if html.count(tag) != 1:
        raise RuntimeError(f"plotly's HTML no longer has one {tag!r}; update figure_html")
    cdn = f"https://cdn.plot.ly/plotly-{get_plotlyjs_version()}.min.js"
    fallback = f"<script>window.Plotly || document.write('<script src=\"{cdn}\"><\\/script>')</script>"
    return html.replace(tag, tag + fallback)


def write_study_figures(folder: str | os.PathLike, data: Mapping) -> None:
    """results/<study>/frontier.html (the frontier figure of study.json's `data`) and the plotly.js it loads,
    results/plotly.min.js: one copy for every study in the results folder."""
    folder = Path(folder)
    write_plotlyjs(folder.parent)
    atomic_write_text(folder / "frontier.html", figure_html(frontier_figure(data), "../plotly.min.js"))
