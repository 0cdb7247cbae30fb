"""Plotly figures (and a little HTML) of the causal results: the four-way comparison, the context vector's
projections, patching curves, steering and flip forensics. Pure: data in, figure out."""

from __future__ import annotations

import html
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from interp.views.plots import LAYER_AXIS, _layout, format_value, model_colors, token_label

if TYPE_CHECKING:
    from interp.causal.results import PatchResult

PAIR_LABELS = {
    "internalization": "internalization: S·noctx vs B·ctx",
    "removability": "removability: S·noctx vs S·ctx",
    "context_kept": "context use kept: S·ctx vs B·ctx",
    "base_context": "base's context effect: B·noctx vs B·ctx",
    "adapter": "adapter effect: S·noctx vs B·noctx",
}
_PAIR_COLORS = {"internalization": "#2ca02c", "removability": "#1f77b4", "context_kept": "#9467bd",
                "base_context": "#7f7f7f", "adapter": "#ff7f0e"}


def _x(n: int) -> list[int]:
    return list(range(n))


def _y(values) -> list:
    """Plotly draws None as a gap; NaN would break the JSON."""
    return [None if not np.isfinite(v) else float(v) for v in np.asarray(values, dtype=np.float64)]


def fourway(cmp, measure: str = "cos", title: str | None = None) -> go.Figure:
    """Per-layer similarity (`cos`, `cka`, `cka_debiased`) or lens KL (`lens_kl`) for each pair of runs."""
    fig = go.Figure()
    for name, values in cmp.pairs.items():
        fig.add_trace(go.Scatter(x=_x(cmp.num_layers), y=_y(values[measure]), mode="lines+markers",
                                 name=PAIR_LABELS.get(name, name), line=dict(color=_PAIR_COLORS.get(name)),
                                 hovertemplate=f"{name}<br>{measure}[%{{x}}] = %{{y:.4f}}<extra></extra>"))
    fig.update_xaxes(title=LAYER_AXIS, dtick=1 if cmp.num_layers <= 32 else None)
    fig.update_yaxes(title="KL(a ‖ b), nats" if measure == "lens_kl" else measure)
    who = cmp.meta.get("student_name") or cmp.student
    read = f" ({'tuned' if cmp.meta.get('lens') == 'tuned' else 'logit'} lens)" if measure == "lens_kl" else ""
    return _layout(fig, title or f"Four-way comparison ({who} vs base): {measure}{read} per layer", 400)


def vectors(cmp, title: str | None = None) -> go.Figure:
    """absorbed_l, overshoot_l and cos(u_l, v_l) per layer (left), |v_l| (right); the dotted lines at 0 and 1 are
    'nothing absorbed' and 'the context applied once'."""
    fig = make_subplots(rows=1, cols=2, column_widths=[0.7, 0.3], horizontal_spacing=0.08,
                        subplot_titles=("projections on the context vector", "|v_l|"))
    x = _x(cmp.num_layers)
    for name, values, color in (("absorbed", cmp.absorbed, "#2ca02c"), ("overshoot", cmp.overshoot, "#d62728"),
                                ("cos(u, v)", cmp.cos_uv, "#1f77b4")):
        fig.add_trace(go.Scatter(x=x, y=_y(values), mode="lines+markers", name=name, line=dict(color=color),
                                 hovertemplate=f"{name}[%{{x}}] = %{{y:.3f}}<extra></extra>"), row=1, col=1)
    for level in (0.0, 1.0):
        fig.add_hline(y=level, line=dict(dash="dot", color="#999"), row=1, col=1)
    fig.add_trace(go.Bar(x=x, y=_y(cmp.v_norm), name="|v|", marker_color="#7f7f7f", showlegend=False,
                         hovertemplate="|v[%{x}]| = %{y:.3f}<extra></extra>"), row=1, col=2)
    fig.update_xaxes(title=LAYER_AXIS)
    who = cmp.meta.get("student_name") or cmp.student
    return _layout(fig, title or f"Context vector ({who}): absorbed = ⟨u,v⟩/|v|², overshoot = ⟨w,v⟩/|v|²", 400)


def overshoot_groups(cmp, groups: Mapping[str, Sequence[bool]], title: str | None = None) -> go.Figure:
    """Per-example overshoot (mean over layers 1..N), split by each group's mask (e.g. degenerate vs clean)."""
    split = {g: cmp.overshoot_by(mask) for g, mask in groups.items()}
    fig = go.Figure()
    for g, s in split.items():
        values = np.asarray(s["per_example"], dtype=np.float64)
        mask = np.asarray(groups[g], dtype=bool)
        for side, sel, color in ((g, mask, "#d62728"), (f"not {g}", ~mask, "#1f77b4")):
            fig.add_trace(go.Box(y=_y(values[sel]), name=f"{side} (n={int(sel.sum())})", boxpoints="all",
                                 marker_color=color, jitter=0.4))
    fig.add_hline(y=1.0, line=dict(dash="dot", color="#999"))
    fig.update_yaxes(title="overshoot, mean over layers")
    return _layout(fig, title or "Per-example overshoot by group", 380)


def patch_curves(results: Mapping[str, PatchResult], reference: bool = True, title: str | None = None) -> go.Figure:
    """Recovery per layer for each patching result (left) and the change of the reference answer's
    log-probability (right, where there is one)."""
    has_ref = reference and any(r.ref_logprob_patched is not None for r in results.values())
    fig = make_subplots(rows=1, cols=2 if has_ref else 1, horizontal_spacing=0.1,
                        subplot_titles=("recovery", "Δ log p(reference)") if has_ref else ("recovery",))
    colors = model_colors(list(results))
    for name, r in results.items():
        y = r.recovery if not r.heads else np.nanmean(r.recovery, axis=1)
        label = f"{name}: {r.source} → {r.target} ({r.site})"
        fig.add_trace(go.Scatter(x=_x(len(y)), y=_y(y), mode="lines+markers", name=label, legendgroup=name,
                                 line=dict(color=colors[name]),
                                 hovertemplate=f"{name}<br>recovery[%{{x}}] = %{{y:.3f}}<extra></extra>"), row=1, col=1)
        if has_ref and r.ref_logprob_patched is not None:
            change = r.ref_logprob_change
            assert change is not None  # set whenever ref_logprob_patched is
            change = change if not r.heads else np.nanmean(change, axis=1)
            fig.add_trace(go.Scatter(x=_x(len(change)), y=_y(change), mode="lines+markers", name=label, legendgroup=name,
                                     showlegend=False, line=dict(color=colors[name], dash="dash"),
                                     hovertemplate=f"{name}<br>Δ log p[%{{x}}] = %{{y:.3f}}<extra></extra>"), row=1, col=2)
    fig.update_xaxes(title=LAYER_AXIS)
    return _layout(fig, title or "Activation patching: recovery per layer", 400)


def patch_heads(result, title: str | None = None) -> go.Figure:
    """Per-head recovery, layers (decoder blocks) × heads."""
    z = np.asarray(result.recovery, dtype=np.float64)[1:]
    fig = go.Figure(go.Heatmap(z=[_y(row) for row in z], x=_x(z.shape[1]), y=list(range(1, z.shape[0] + 1)),
                               colorscale="RdBu", zmid=0, colorbar=dict(title="recovery"),
                               hovertemplate="layer %{y} · head %{x}<br>recovery %{z:.3f}<extra></extra>"))
    fig.update_xaxes(title="head", dtick=1)
    fig.update_yaxes(title="layer (decoder block)")
    return _layout(fig, title or f"Per-head patching: {result.source} → {result.target}", max(320, 16 * z.shape[0] + 140))


def steer_table(result, title: str | None = None) -> go.Figure:
    rows = result.table()
    columns = ["arm", "layer", "alpha", "acc", "acc_plain", "degenerate", "degenerate_plain", "follow_cf", "n"]
    fig = go.Figure(go.Table(header=dict(values=columns, fill_color="#e8eef7", align="left"),
                             cells=dict(values=[[format_value(r.get(c)) for r in rows] for c in columns], align="left")))
    return _layout(fig, title or f"Steering with α = {result.alpha}", 80 + 28 * (len(rows) + 1))


def flip(ex, title: str | None = None) -> go.Figure:
    """At the fork: recovery per layer when the student's no-context state is patched in (left), and the
    log-probabilities of the two candidate tokens (right)."""
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.1,
                        subplot_titles=("recovery at the fork (S·noctx → S·ctx)", "log p of each answer's token"))
    x = _x(len(ex.recovery))
    fig.add_trace(go.Scatter(x=x, y=_y(ex.recovery), mode="lines+markers", name="recovery", line=dict(color="#2ca02c")),
                  row=1, col=1)
    for name, values, color in ((f"without: {ex.token_noctx!r}", ex.logprob_noctx_token, "#1f77b4"),
                                (f"with: {ex.token_ctx!r}", ex.logprob_ctx_token, "#d62728")):
        fig.add_trace(go.Scatter(x=x, y=_y(values), mode="lines+markers", name=name, line=dict(color=color)), row=1, col=2)
    fig.update_xaxes(title=LAYER_AXIS)
    return _layout(fig, title or f"Why this flip: response token {ex.fork}", 380)


def flip_heads(ex, title: str | None = None) -> go.Figure:
    """The heads whose attention to the context moved most at the fork: base and student side by side."""
    labels = [f"L{h['layer']}·H{h['head']}" for h in ex.heads]
    fig = go.Figure([go.Bar(x=labels, y=[h["attn_base"] for h in ex.heads], name="base (with context)", marker_color="#7f7f7f"),
                     go.Bar(x=labels, y=[h["attn_student"] for h in ex.heads], name="student (with context)", marker_color="#d62728")])
    fig.update_yaxes(title="attention mass on the context at the fork")
    return _layout(fig, title or "Heads whose reading of the context moved most", 340)


def highlight_html(tokens: Sequence[str], weights: Sequence[float] | np.ndarray) -> str:
    """The context text with each token's background as strong as its weight (relative to the largest)."""
    w = np.asarray(weights, dtype=np.float64)
    top = w.max() if w.size and w.max() > 0 else 1.0
    spans = [f"<span title='{v:.3f}' style='background: rgba(214,39,40,{min(1.0, v / top):.2f})'>{html.escape(t)}</span>"
             for t, v in zip(tokens, w)]
    return "<div style='line-height:1.8; font-family: monospace'>" + "".join(spans) + "</div>"


def highlight_text(tokens: Sequence[str], weights: Sequence[float] | np.ndarray, top: int = 5) -> str:
    """Plain-text version: the `top` most-read tokens in [brackets]."""
    w = np.asarray(weights, dtype=np.float64)
    chosen = set(np.argsort(-w)[:top].tolist()) if w.size else set()
    return "".join(f"[{t}]" if i in chosen else t for i, t in enumerate(tokens))


def head_tokens_table(ex) -> list[dict]:
    """One row per head for a table: where it looks and how much that moved."""
    return [{"layer": h["layer"], "head": h["head"], "base": round(h["attn_base"], 4), "student": round(h["attn_student"], 4),
             "delta": round(h["delta"], 4), "reads": ", ".join(f"{token_label(t['token'])} ({t['weight']:.2f})" for t in h["top_tokens"])}
            for h in ex.heads]


def causal_json(causal: Mapping[str, Mapping]) -> dict:
    """Every per-layer causal number of a run, by student, for layer_divergence.json."""
    out = {}
    for student, got in causal.items():
        entry: dict = {}
        cmp = got.get("comparison")
        if cmp is not None:
            entry["comparison"] = {"per_layer": cmp.per_layer_table(), "meta": {k: v for k, v in cmp.meta.items() if k != "groups"},
                                   "groups": {g: {k: v for k, v in s.items() if k in ("n_in", "n_out", "mean_in", "mean_out")}
                                              for g, s in cmp.meta.get("groups", {}).items()}}
        if got.get("patch"):
            entry["patch"] = {name: {"source": r.source, "target": r.target, "site": r.site, "heads": r.heads,
                                     "per_layer": r.per_layer_table()} for name, r in got["patch"].items()}
        if got.get("steer") is not None:
            entry["steer"] = got["steer"].table()
        out[student] = entry
    return _finite_tree(out)


def _finite_tree(value):
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_tree(v) for v in value]
    return value


def causal_section_html(causal: Mapping[str, Mapping], figure_html) -> str:
    """The report's "Internalization" section of one run: per student, the four-way curves, the context vector,
    the overshoot of degenerate and flipped answers, the patching curves, steering and each explained flip."""
    parts = ["<h3>Internalization</h3>"]
    for student, got in causal.items():
        parts.append(f"<h4>{html.escape(student)}</h4>")
        cmp = got.get("comparison")
        if cmp is not None:
            parts += [figure_html(fourway(cmp, "cos")), figure_html(fourway(cmp, "lens_kl")), figure_html(vectors(cmp))]
            groups = {g: s["mask"] for g, s in cmp.meta.get("groups", {}).items() if "mask" in s and any(s["mask"])}
            if groups:
                parts.append(figure_html(overshoot_groups(cmp, groups)))
        curves = {name: r for name, r in got.get("patch", {}).items() if not r.heads}
        if curves:
            parts.append(figure_html(patch_curves(curves)))
        for name, r in got.get("patch", {}).items():
            if r.heads:
                parts.append(figure_html(patch_heads(r, title=f"{name}: per-head recovery")))
        if got.get("steer") is not None:
            parts.append(figure_html(steer_table(got["steer"])))
        for example, ex in got.get("explain", {}).items():
            parts += [f"<h5>Why this flip: example {example}</h5>",
                      f"<p>The answers part at response token {ex.fork}, after {html.escape(repr(ex.prefix))}: "
                      f"{html.escape(repr(ex.token_noctx))} without the context, {html.escape(repr(ex.token_ctx))} with it.</p>",
                      figure_html(flip(ex)), figure_html(flip_heads(ex)), highlight_html(ex.ctx_tokens, ex.ctx_weights)]
    return "\n".join(parts)
