"""A self-contained HTML report of one or more runs side by side, with every per-layer number as JSON and CSV."""

from __future__ import annotations

import csv
import html
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from interp import divergence
from interp.causal import artifacts
from interp.core import runs
from interp.core.studies import calibration_line, is_study, read_study
from interp.views import causal as views_causal
from interp.views import plots, tables
from interp.core.errors import UserError
from interp.core.store import atomic_dir, atomic_write_json, atomic_write_text

HTML_FILE = "report.html"
JSON_FILE = "layer_divergence.json"
CSV_FILE = "layer_divergence.csv"
REPORT_SCHEMA_VERSION = 1


@dataclass
class RunData:
    """Everything the report shows about one run (or one bare layers folder)."""

    name: str
    path: Path
    settings: dict = field(default_factory=dict)
    eval_rows: list[dict] = field(default_factory=list)
    examples: list[dict] = field(default_factory=list)
    layers: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    causal: dict = field(default_factory=dict)  # per student: what `python -m interp compare|patch|steer|explain` saved


def load_run_data(path: str | Path, name: str | None = None) -> RunData:
    """Read a run folder (or a folder written by `python -m interp analyze`); a missing or damaged one is a UserError."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path} is not a folder; pass run folders (with run.json), layer folders (with divergence.json) or study results (with study.json)")
    if not runs.is_run(path) and not runs.is_layers_folder(path):
        raise UserError(f"{path} is neither a run (no {runs.RUN_FILE}), a layers folder (no divergence.json) nor study results (no study.json)")
    layers = divergence.load_all_layers(path)
    settings = runs.run_settings(path)
    settings["layers"] = {m: div.meta for m, div in layers.items()}
    return RunData(name=name or path.name, path=path, settings=settings, eval_rows=tables.eval_rows(runs.load_eval(path)),
                   examples=tables.example_table(tables.load_examples(path)), layers=layers,
                   metrics=runs.load_all_metrics(path), causal=_load_causal(path))


def _load_causal(path: Path) -> dict:
    return {s: artifacts.load_all(path, s) for s in artifacts.causal_students(path)}


def unique_names(paths: Sequence[Path]) -> list[str]:
    """Run names for the report: the folder name, with its parent's name in front where two would collide."""
    names = [p.name for p in paths]
    out = [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in paths]
    return [f"{n}#{i}" if out.count(n) > 1 else n for i, n in enumerate(out)]


def _finite(value):
    """JSON has no NaN or infinity: those become null (debiased CKA is undefined below 4 tokens)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def layers_json(div) -> dict:
    """One model's numbers: every per-layer value (LayerDivergence.per_layer_table) and the per-head attention."""
    return {
        "meta": div.meta,
        "n_examples": len(div.examples),
        "n_tokens": div.n_tokens,
        "per_layer": {k: _finite(v) for k, v in div.per_layer_table().items()},
        "attn_ctx": _finite(np.asarray(div.attn_ctx, dtype=np.float64).tolist()),
        "attn_sink": _finite(np.asarray(div.attn_sink, dtype=np.float64).tolist()),
        "attn_sink_noctx": _finite(np.asarray(div.attn_sink_noctx, dtype=np.float64).tolist()),
    }


def report_json(data: Sequence[RunData]) -> dict:
    """The content of layer_divergence.json: stable keys, no timestamps, so two reports diff cleanly."""
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "runs": {
            d.name: {"path": str(d.path), "settings": d.settings, "eval": d.eval_rows,
                     "layers": {m: layers_json(div) for m, div in d.layers.items()},
                     **({"causal": views_causal.causal_json(d.causal)} if d.causal else {})}
            for d in data
        },
    }


def report_csv(data: Sequence[RunData]) -> str:
    """layer_divergence.csv: one row per (run, model, layer), one column per per-layer number."""
    rows = []
    for d in data:
        for model, div in d.layers.items():
            table = div.per_layer_table()
            for i in range(len(table["layer"])):
                rows.append({"run": d.name, "model": model, **{k: v[i] for k, v in table.items()}})
    columns = list(dict.fromkeys(k for r in rows for k in r)) or ["run", "model", "layer"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _figure_html(fig) -> str:
    # plotly.js is embedded once in <head>; each figure carries only its data.
    return fig.to_html(full_html=False, include_plotlyjs=False, config={"displaylogo": False, "responsive": True})


def _table_html(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return "<p class='muted'>none yet</p>"
    columns = list(columns or rows[0].keys())
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(plots.format_value(r.get(c)))}</td>" for c in columns) + "</tr>" for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _value(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _settings_html(settings: dict) -> str:
    """run.json as setting/value rows; the students' training settings and the analysis settings as one column per
    student or model, with the rows where they differ in bold (usually λ and little else)."""
    parts = [_table_html([{"setting": k, "value": _value(v)} for k, v in settings.get("run", {}).items()], ["setting", "value"])]
    for title, columns in (("Training, per student", settings.get("students", {})), ("Analysis, per model", settings.get("layers", {}))):
        if not columns:
            continue
        names = list(columns)
        keys = list(dict.fromkeys(k for c in columns.values() for k in c))
        head = "<th>setting</th>" + "".join(f"<th>{html.escape(n)}</th>" for n in names)
        body = []
        for k in keys:
            values = [_value(columns[n].get(k)) if k in columns[n] else "–" for n in names]
            style = " style='font-weight:bold'" if len(set(values)) > 1 else ""
            body.append(f"<tr{style}><td>{html.escape(k)}</td>" + "".join(f"<td>{html.escape(v)}</td>" for v in values) + "</tr>")
        parts.append(f"<h4>{title}</h4><table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")
    return "\n".join(parts)


def shown_example(d: RunData, model: str) -> int:
    """The example the report draws for a model: the first one that flipped for it, else the first."""
    div = d.layers[model]
    for row in d.examples:
        if model in row["flipped_models"]:
            i = tables.match_example(div, row["context"], row["prompt"], row["example"])
            if i is not None:
                return i
    return 0


def lens_label(meta: dict | None) -> str:
    """'tuned lens' or 'logit lens', from an artifact's meta (artifacts written before the choice existed: logit)."""
    return "tuned lens" if (meta or {}).get("lens") == "tuned" else "logit lens"


def _lenses(divs) -> str:
    """The lens that read a run's artifacts, from their meta ('logit lens', 'tuned lens', or both when mixed)."""
    labels = sorted({lens_label(div.meta) for div in divs.values()})
    return " / ".join(labels) if labels else "logit lens"


def _run_section(d: RunData, decode) -> str:
    parts = [f"<h2>{html.escape(d.name)}</h2>", f"<p class='muted'>{html.escape(str(d.path))}</p>",
             "<h3>Evaluation</h3>", _table_html(d.eval_rows, ["model", *runs.EVAL_METRICS, "n"])]
    if d.layers:
        parts += ["<h3>Layer divergence</h3>", _figure_html(plots.layer_divergence(d.layers, title=f"{d.name}: layer divergence")),
                  _figure_html(plots.lens_kl(d.layers, title=f"{d.name}: {_lenses(d.layers)} KL(noctx || ctx) per layer"))]
        for model, div in d.layers.items():
            example = shown_example(d, model)
            parts.append(f"<h3>{html.escape(model)}</h3>")
            if div.n_tokens and example < len(div.examples):
                parts.append(_figure_html(plots.logit_lens(div, example, decode=decode(div),
                                                           title=f"{model}: {lens_label(div.meta)}, example {example}")))
            parts.append(_figure_html(plots.attention(div, title=f"{model}: attention to the context")))
            if div.attn_ctx_tokens and example < len(div.attn_ctx_tokens):
                # The head that attends most to the context overall is the one worth a closer look.
                block, head = np.unravel_index(int(np.argmax(div.attn_ctx)), np.asarray(div.attn_ctx).shape)
                parts.append(_figure_html(plots.head_weights(div, example, int(block) + 1, int(head))))
    else:
        parts.append("<p class='muted'>No layer results in this run yet.</p>")
    if d.causal:
        parts.append(views_causal.causal_section_html(d.causal, _figure_html))
    if d.metrics:
        parts += ["<h3>Training</h3>", _figure_html(plots.training_curves(d.metrics))]
    parts += ["<h3>Settings</h3>", _settings_html(d.settings)]
    return "<section class='run'>" + "\n".join(parts) + "</section>"


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
.runs { display: flex; gap: 1.5em; overflow-x: auto; align-items: flex-start; }
.run { flex: 1 1 0; min-width: 640px; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #e8eef7; }
.muted { color: #777; font-size: 0.9em; }
"""


def _markdown_inline(text: str) -> str:
    """A sentence's inline Markdown (**bold**, `code`) as HTML, everything else escaped."""
    out = html.escape(text)
    out = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", out)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", out)


def study_section(name: str, study: dict) -> str:
    """A study's summary table (mean ± sd over seeds), its frontier plot and the paired tests."""
    parts = [f"<h2>Study {html.escape(name)}</h2>",
             f"<p class='muted'>model {html.escape(str(study.get('model')))}, {study.get('steps')} steps, seeds {study.get('seeds')}; "
             "means over seeds with 95% hierarchical bootstrap intervals (seeds, then examples); health: no-card loops minus "
             "the base's; card effect: the setting's with/without-card difference minus the base's</p>",
             *([f"<p>{_markdown_inline(regime)}</p>"] if (regime := calibration_line(study)) else []),
             _table_html(tables.study_setting_rows(study) if study.get("settings") else tables.study_rows(study)),
             _figure_html(plots.frontier_figure(study)),
             _figure_html(plots.frontier_figure(study, x="card_effect:acc"))]
    paired = study.get("paired") or []
    if paired:
        parts += ["<h3>Paired with the first student (with the context, same examples)</h3>",
                  _table_html([{k: p.get(k) for k in ("suite", "seed", "student", "vs", "a_only", "b_only", "n", "p_mcnemar")} for p in paired])]
    return "<section class='study'>" + "\n".join(parts) + "</section>"


def report_html(data: Sequence[RunData], decode=lambda div: None, studies: dict | None = None) -> str:
    """The whole page: plotly.js inline once, the studies, then a combined divergence figure and one column per run."""
    from plotly.offline import get_plotlyjs

    studies = studies or {}
    title = "Report: " + ", ".join([*studies, *(d.name for d in data)])
    body = [f"<h1>{html.escape(title)}</h1>"] + [study_section(n, s) for n, s in studies.items()]
    combined = {f"{d.name}/{m}": div for d in data for m, div in d.layers.items()}
    if len(data) > 1 and combined:
        body.append(_figure_html(plots.layer_divergence(combined, title="All runs: layer divergence")))
    if data:
        body.append("<div class='runs'>" + "\n".join(_run_section(d, decode) for d in data) + "</div>")
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style>"
        f"<script type='text/javascript'>{get_plotlyjs()}</script></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def is_report_folder(path: Path) -> bool:
    """A folder holding nothing but an earlier report's files: safe to replace without being told."""
    return path.is_dir() and set(p.name for p in path.iterdir()) <= {HTML_FILE, JSON_FILE, CSV_FILE}


def write_report(paths: Sequence[str | Path], out: str | Path = "report", overwrite: bool = False,
                 decode_tokens: bool = True) -> Path:
    """Write out/report.html, out/layer_divergence.json and out/layer_divergence.csv for the given runs.
    The folder appears whole or not at all; an earlier report there is replaced, any other folder only with
    `overwrite`."""
    folders = [Path(p) for p in paths]
    if not folders:
        raise UserError("no runs given; pass one or more run folders, e.g. `python -m interp report runs/persona`")
    studies = {p.name: read_study(p) for p in folders if is_study(p)}
    run_paths = [p for p in folders if not is_study(p)]
    data = [load_run_data(p, name) for p, name in zip(run_paths, unique_names(run_paths))]
    decode = tables.token_decoder if decode_tokens else (lambda div: None)
    out = Path(out)
    with atomic_dir(out, overwrite=overwrite or is_report_folder(out)) as tmp:
        atomic_write_text(tmp / HTML_FILE, report_html(data, decode, studies))
        atomic_write_json(tmp / JSON_FILE, report_json(data))
        atomic_write_text(tmp / CSV_FILE, report_csv(data))
    return out
