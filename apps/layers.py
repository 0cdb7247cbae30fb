"""The layer-divergence app: training runs, their evaluation, and each layer with and without the context (`streamlit run apps/layers.py`)."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import streamlit as st

# `streamlit run apps/layers.py` puts apps/ on the path, not the repository root; an uninstalled checkout still works.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import interp  # noqa: E402
from interp import divergence  # noqa: E402
from interp.causal import artifacts  # noqa: E402
from interp.core import runs  # noqa: E402
from interp.core.errors import UserError  # noqa: E402
from interp.core.adapters import adapter_key  # noqa: E402
from interp.core.specs import BUILTIN_SPECS  # noqa: E402
from interp.core.settings import AnalysisSettings  # noqa: E402
from interp.core.studies import calibration_line, is_study, read_study  # noqa: E402
from interp.views import causal as views_causal  # noqa: E402
from interp.views import plots, tables  # noqa: E402

VIEWS = ("Layer divergence", "Logit lens", "Attention", "Internalization", "Training")
LIVE_DEFAULT_MODEL = AnalysisSettings.model
# The longest the hidden views wait on a session's first page for the browser to report the first figure drawn
# (see first_page_waits); 0 draws everything at once.
FIRST_PAINT_S = float(os.environ.get("LAYERS_FIRST_PAINT_S", "15"))
# Runs in the page (st.components.v2: no iframe): reports once the first figure's traces are in the document, or
# after the wait above, whichever comes first.
FIRST_FIGURE_JS = """
export default function(component) {
    const { data, setTriggerValue } = component;
    const started = performance.now();
    const check = () => {
        if (document.querySelector(data.selector) || performance.now() - started > data.wait_ms) {
            setTriggerValue("drawn", true);
        } else {
            setTimeout(check, 25);
        }
    };
    check();
}
"""
FIRST_FIGURE_SELECTOR = ".st-key-fig_run_layer_divergence .js-plotly-plot .scatterlayer .trace"
NO_ADAPTER = "none (base model)"
OTHER_ADAPTER = "another adapter folder…"
# LAYERS_LIVE_RUNS_ONLY=1: live mode loads only the models the runs name and the adapters inside the runs folder,
# and the runs folder cannot be changed from the browser (for an app that others can reach).
LIVE_RUNS_ONLY_ENV = "LAYERS_LIVE_RUNS_ONLY"
# What the empty states tell a user to run.
MAKE_RUN_COMMAND = "python -m training pair --task persona --steps 30 --out runs/persona"
LAYERS_COMMAND = "python -m interp analyze-run {run}"


def overview(summaries: list) -> list[dict]:
    """One row per run for the run picker: what it is, what it has so far, or what is wrong with it."""
    return [{"run": r.name, "task": r.task, "model": r.model, "students": ", ".join(r.students),
             "evaluated": r.has_eval, "layers": ", ".join(r.layer_models), "error": r.error or ""} for r in summaries]


def live_runs_only() -> bool:
    return os.environ.get(LIVE_RUNS_ONLY_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def live_refusal(spec: str, adapter: Path | None, root: str) -> str | None:
    """Why live mode, limited to the runs folder, may not load this model or adapter; None when it may."""
    base = Path(root).resolve()

    def inside(path) -> bool:
        return Path(path).resolve().is_relative_to(base)

    if adapter is not None and not inside(adapter):
        return (f"adapter {adapter} is outside the runs folder {root}; this app only loads adapters from it "
                f"({LIVE_RUNS_ONLY_ENV} is set)")
    named = {r.model for r in runs.list_runs(root) if r.model and not r.error}
    if spec in BUILTIN_SPECS or spec in named or (Path(spec).is_dir() and inside(spec)):
        return None
    return (f"model '{spec}' is neither built in nor the model of a run under {root}; this app only loads those "
            f"({LIVE_RUNS_ONLY_ENV} is set): {', '.join(sorted(set(BUILTIN_SPECS) | named))}")


# ---------- cached reading: runs refresh when their files change, models load once per process ----------

def _root_stamp(root: str) -> tuple:
    path = Path(root)
    if not path.is_dir():
        return ()
    return tuple((p.name, runs.signature(p)) for p in sorted(path.iterdir()) if p.is_dir())


@st.cache_data(show_spinner=False)
def cached_runs(root: str, stamp: tuple) -> list:
    return runs.list_runs(root)


@st.cache_data(show_spinner=False)
def cached_eval(path: str, stamp: tuple) -> list[dict]:
    return tables.eval_rows(runs.load_eval(path))


@st.cache_data(show_spinner=False)
def cached_example_rows(path: str, stamp: tuple) -> list[dict]:
    return tables.load_examples(path) or []


@st.cache_data(show_spinner=False)
def cached_examples(path: str, stamp: tuple) -> list[dict]:
    return tables.example_table(cached_example_rows(path, stamp))


@st.cache_data(show_spinner=False)
def cached_metrics(path: str, stamp: tuple) -> dict:
    return runs.load_all_metrics(path)


@st.cache_resource(show_spinner=False, max_entries=8)
def cached_layers(path: str, stamp: tuple) -> dict:
    # A resource, not data: the arrays are read-only here, and copying them on every rerun would cost the view switch.
    return divergence.load_all_layers(path)


def _causal_stamp(path: str) -> tuple:
    root = Path(path) / runs.CAUSAL_DIR
    if not root.is_dir():
        return ()
    return tuple(sorted((str(p.relative_to(root)), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()))


@st.cache_resource(show_spinner=False, max_entries=8)
def cached_causal(path: str, stamp: tuple) -> dict:
    return {s: artifacts.load_all(path, s) for s in artifacts.causal_students(path)}


@st.cache_resource(show_spinner="Loading the model (once per app process)…", max_entries=2)
def cached_model(spec: str):
    # At most two models stay in memory: each typed spec would otherwise keep its weights until the app stops.
    return interp.load_model(spec)


@st.cache_resource
def model_lock() -> threading.Lock:
    # One model object serves every browser session; adapters are switched on it in place.
    return threading.Lock()


# ---------- shared views: both the run view and the live view call these ----------

def show_layer_divergence(divs: dict, key: str) -> None:
    c1, c2, c3 = st.columns([3, 3, 2])
    chosen = c1.multiselect("Models", list(divs), default=list(divs), key=f"{key}_models")
    measures = c2.multiselect("Measures", list(plots.MEASURES), default=list(plots.MEASURES), key=f"{key}_measures",
                              format_func=lambda m: plots.MEASURE_LABELS[m])
    divergence = c3.toggle("Show 1 − similarity", key=f"{key}_divergence")
    shown = {m: divs[m] for m in chosen} or divs
    st.plotly_chart(plots.layer_divergence(shown, measures or plots.MEASURES, divergence=divergence),
                    key=f"fig_{key}_layer_divergence")
    st.caption("Layer 0 is the embedding output, layer l the output of decoder block l. On aligned tokens the "
               "embedding layer cannot see the context, so its similarity is 1.")


def show_logit_lens(divs: dict, examples: dict, key: str, decode=None) -> None:
    c1, c2, c3 = st.columns([3, 3, 2])
    model = c1.selectbox("Model", list(divs), index=len(divs) - 1 if len(divs) > 1 else 0, key=f"{key}_lens_model")
    stat = c2.selectbox("Colour", list(plots.LENS_STAT_LABELS), format_func=lambda s: plots.LENS_STAT_LABELS[s], key=f"{key}_lens_stat")
    in_cells = c3.toggle("Top-1 tokens in every cell", key=f"{key}_lens_text",
                         help="Always in the hover; written in the cells by default only when they are few.")
    example = examples.get(model)
    if example is None:
        st.warning(f"The chosen example was not analyzed for model '{model}'; pick another example or model.")
    else:
        fig = plots.logit_lens(divs[model], example, stat=stat, decode=decode or tables.token_decoder(divs[model]),
                               show_text=True if in_cells else None)
        st.plotly_chart(fig, key=f"fig_{key}_logit_lens")
    st.plotly_chart(plots.lens_kl(divs, {m: examples.get(m) for m in divs}), key=f"fig_{key}_lens_kl")
    read = {m: "tuned lens" if (d.meta or {}).get("lens") == "tuned" else "logit lens" for m, d in divs.items()}
    st.caption("KL per layer over the chosen example's tokens, for every model that has it (all tokens otherwise). "
               "Read with the " + ", ".join(f"{v} ({m})" for m, v in read.items()) + "; analyze with `--lens tuned` for the tuned lens.")


def _pick_head_from_click(key: str) -> None:
    """A click on the attention heatmap sets the layer and head pickers below it."""
    event = st.session_state.get(f"fig_{key}_attention")
    points = event.get("selection", {}).get("points", []) if event else []
    if points and "x" in points[0] and "y" in points[0]:
        st.session_state[f"{key}_head"] = int(points[0]["x"])
        st.session_state[f"{key}_layer"] = int(points[0]["y"])


def show_attention(divs: dict, examples: dict, key: str) -> None:
    model = st.selectbox("Model", list(divs), index=len(divs) - 1 if len(divs) > 1 else 0, key=f"{key}_attn_model")
    div = divs[model]
    st.plotly_chart(plots.attention(div, pickable=True), key=f"fig_{key}_attention", on_select=lambda: _pick_head_from_click(key),
                    selection_mode="points")
    blocks, heads = div.attn_ctx.shape
    c1, c2 = st.columns(2)
    layer = c1.selectbox("Layer (decoder block)", list(range(1, blocks + 1)), key=f"{key}_layer")
    head = c2.selectbox("Head", list(range(heads)), key=f"{key}_head")
    example = examples.get(model)
    if example is None or example >= len(div.attn_ctx_tokens):
        st.info("No per-token attention for the chosen example in this model's results.")
    else:
        st.plotly_chart(plots.head_weights(div, example, layer, head), key=f"fig_{key}_head")


# ---------- a run ----------

def example_label(row: dict) -> str:
    flag = " ⚠ flipped" if row["flipped_any"] else ""
    return f"#{row['example']}{flag}: {row['prompt'][:70]}"


def select_example_from_table() -> None:
    """The examples table's row selection picks the example every view shows."""
    state = st.session_state.get("examples_table")
    rows = state.selection.rows if state is not None else []
    shown = st.session_state.get("_shown_examples", [])
    if rows and rows[0] < len(shown):
        st.session_state["example"] = shown[rows[0]]


def show_examples_table(table: list[dict]) -> None:
    import pandas as pd

    st.subheader("Examples")
    c1, c2 = st.columns([2, 3])
    only_flipped = c1.checkbox("Only flipped ones (right without the context, wrong with it)", key="only_flipped")
    models = runs.model_order(k[: -len(":ctx")] for row in table for k in row if k.endswith(":ctx"))
    flipped_for = c2.multiselect("…flipped for", models, default=[], key="flipped_for",
                                 help="Empty: flipped for any model.")
    rows = [r for r in table if not only_flipped or
            (r["flipped_any"] if not flipped_for else any(m in r["flipped_models"] for m in flipped_for))]
    st.session_state["_shown_examples"] = [r["example"] for r in rows]
    if not rows:
        st.info("No example matches the filter.")
        return
    frame = pd.DataFrame([{"example": r["example"], "flipped": ", ".join(r["flipped_models"]), "prompt": r["prompt"],
                           **{k: r.get(k) for m in models for k in (f"{m}:noctx", f"{m}:ctx")},
                           "reference": r["reference"], "context": r["context"]} for r in rows])
    styled = frame.style.apply(
        lambda row: ["background-color: #ffe4e1" if row["flipped"] else ""] * len(row), axis=1)
    st.dataframe(styled, key="examples_table", on_select=select_example_from_table, selection_mode="single-row",
                 hide_index=True)
    st.caption("Rows in red flipped: right without the context, wrong with it, for the models named. "
               "Select a row to show that example above.")


def show_run(summary) -> bool:
    """The run's page; True while its first page waits for the browser to report the first figure drawn (the
    caller's own tables wait too)."""
    if summary.error:
        st.error(f"Run '{summary.name}' could not be read: {summary.error}")
        return False
    path, stamp = str(summary.path), runs.signature(summary.path)
    st.header(summary.name)
    st.caption(f"task **{summary.task or '?'}** · model **{summary.model or '?'}** · students: "
               f"{', '.join(summary.students) or 'none'} · `{path}`")
    try:
        eval_rows = cached_eval(path, stamp)
        table = cached_examples(path, stamp)
        divs = cached_layers(path, stamp)
    except UserError as err:
        st.error(f"Run '{summary.name}' is damaged: {err}")
        return False
    wait = bool(divs) and first_page_waits()
    if eval_rows and wait:
        st.caption("Drawing the evaluation table…")
    elif eval_rows:
        st.dataframe(eval_rows, hide_index=True, column_order=["model", *runs.EVAL_METRICS, "n"],
                     column_config={m: st.column_config.NumberColumn(format="%.3f") for m in runs.EVAL_METRICS})
    else:
        st.info(f"Not evaluated yet: `python -m training eval {path}` writes the evaluation table.")

    by_id = {r["example"]: r for r in table}
    if table:
        if st.session_state.get("example") not in by_id:
            st.session_state["example"] = table[0]["example"]
        st.sidebar.selectbox("Example", list(by_id), key="example", format_func=lambda e: example_label(by_id[e]))
    if not divs:
        st.info(f"No layer results yet. Write them with `{LAYERS_COMMAND.format(run=path)}`.")
        if st.toggle("Show training curves", key="show_training"):
            show_training(path, stamp)
    else:
        chosen = by_id.get(st.session_state.get("example"))
        examples = {m: (tables.match_example(d, chosen["context"], chosen["prompt"], chosen["example"]) if chosen else 0)
                    for m, d in divs.items()}
        if chosen:
            st.markdown(f"**Example #{chosen['example']}** · prompt: {chosen['prompt'][:200]}")
            with st.expander("What each model answered on this example"):
                if not wait:
                    st.dataframe(tables.example_responses(cached_example_rows(path, stamp), chosen["example"]), hide_index=True)
            with st.expander("Why this flip", expanded=bool(chosen.get("flipped_any"))):
                show_why_this_flip(summary, chosen)
        # Tabs, not a rerun per view: every view is drawn once, so a switch is instant in the browser. The first
        # tab is filled before the examples table and the rest after it, so the first figure comes first.
        tabs = st.tabs(VIEWS, key="view")
        with tabs[0]:
            show_layer_divergence(divs, "run")
    if table and not wait:
        show_examples_table(table)
    if wait:
        report_first_figure(tabs[1:])
    elif divs:
        with tabs[1]:
            show_logit_lens(divs, examples, "run")
        with tabs[2]:
            show_attention(divs, examples, "run")
        with tabs[3]:
            show_internalization(path, chosen)
        with tabs[4]:
            show_training(path, stamp)
    return wait


def _first_figure_drawn() -> None:
    st.session_state["_first_page_drawn"] = True


def first_page_waits() -> bool:
    """On a session's first run page, everything but the first figure (the tables, the hidden views) waits until the
    browser reports that figure drawn (`report_first_figure`; the report reruns the page). The browser draws every
    plotly figure it holds once plotly.js has loaded, so figures that arrive before the first one is drawn delay it,
    and a table sent before it makes the browser fetch and draw the grid before it asks for plotly.js. A fixed
    1.5 s wait before the hidden views lost that race on busy cores (first figure 12–20 s in timelines of single
    starts, 7 s where the figure won; docs/benchmarks.md). Streamlit's lazy tabs (`on_change="rerun"`, drawing only
    the open tab) were measured as the alternative: first figure 5.39 s against 5.24 s, and a switch 0.70 s
    against 0.12 s, since every switch becomes a rerun."""
    return FIRST_PAINT_S > 0 and not st.session_state.get("_first_page_drawn")


def report_first_figure(hidden_tabs) -> None:
    """Mark the hidden views as coming, and mount the in-page script that reports the first figure drawn."""
    for tab in hidden_tabs:
        tab.caption("Drawing…")
    _first_figure_reporter()(data={"selector": FIRST_FIGURE_SELECTOR, "wait_ms": int(FIRST_PAINT_S * 1000)},
                             key="first_figure_drawn", on_drawn_change=_first_figure_drawn)


@st.cache_resource
def _first_figure_reporter():
    return st.components.v2.component("layers_first_figure_drawn", js=FIRST_FIGURE_JS)


def show_training(path: str, stamp: tuple) -> None:
    try:
        metrics = cached_metrics(path, stamp)
    except UserError as err:
        st.error(str(err))
        return
    if metrics:
        st.plotly_chart(plots.training_curves(metrics), key="fig_training")
    else:
        st.info("No training metrics (metrics.jsonl) in this run yet.")


# ---------- internalization: the causal results of `python -m interp compare|patch|steer|explain` ----------

CAUSAL_COMMANDS = ("python -m interp compare {run} --student {student}", "python -m interp patch {run} --student {student}",
                   "python -m interp steer {run} --student {student} --alpha 1")


def show_internalization(path: str, chosen: dict | None) -> None:
    try:
        results = cached_causal(path, _causal_stamp(path))
    except UserError as err:
        st.error(str(err))
        return
    if not results:
        students = runs.load_run_info(path).get("students", []) if runs.is_run(Path(path)) else []
        commands = "\n".join(c.format(run=path, student=(students or ["STUDENT"])[0]) for c in CAUSAL_COMMANDS)
        st.info("No causal results in this run yet. Write them with\n\n```\n" + commands + "\n```")
        return
    student = st.selectbox("Student", list(results), key="causal_student")
    got = results[student]
    cmp = got["comparison"]
    if cmp is not None:
        measure = st.radio("Four-way measure", ["cos", "cka", "cka_debiased", "lens_kl"], horizontal=True, key="causal_measure")
        st.plotly_chart(views_causal.fourway(cmp, measure), key="fig_causal_fourway")
        st.plotly_chart(views_causal.vectors(cmp), key="fig_causal_vectors")
        groups = {g: v["mask"] for g, v in cmp.meta.get("groups", {}).items() if "mask" in v and any(v["mask"])}
        if groups:
            st.plotly_chart(views_causal.overshoot_groups(cmp, groups), key="fig_causal_groups")
    else:
        st.caption(f"No four-way comparison yet: `{CAUSAL_COMMANDS[0].format(run=path, student=student)}`")
    curves = {name: r for name, r in got["patch"].items() if not r.heads}
    if curves:
        st.plotly_chart(views_causal.patch_curves(curves), key="fig_causal_patch")
    for name, r in got["patch"].items():
        if r.heads:
            st.plotly_chart(views_causal.patch_heads(r, title=f"{name}: per-head recovery"), key=f"fig_causal_heads_{name}")
    if got["steer"] is not None:
        st.plotly_chart(views_causal.steer_table(got["steer"]), key="fig_causal_steer")
    st.caption("absorbed = ⟨u,v⟩/|v|²: how much of the context's shift the student carries without it; overshoot = "
               "⟨w,v⟩/|v|²: above 1, the context applied on top of itself. Recovery 1: the patched layer carries all "
               "of the source's output. Definitions: docs/measures.md.")


def _explain_live(summary, student: str, example: int):
    from interp.causal.forensics import explain  # lazy: torch loads when a model is used, not before the first figure
    from interp.core.students import open_student  # lazy: as above

    info = runs.read_info(summary.path)
    lm = cached_model(info["model"])
    row = {r.example: r for r in runs.model_rows(summary.path, student)}[example]
    with model_lock():
        lm, name = open_student(summary.path, student, model=lm, name=adapter_key(runs.student_dir(summary.path, student)))
        return explain(lm, {"context": row.context, "prompt": row.prompt}, name,
                       runs.response_ids(lm.tokenizer, row, "noctx"), runs.response_ids(lm.tokenizer, row, "ctx"),
                       placement=info["placement"] or "system", backend="torch")


def show_why_this_flip(summary, chosen: dict) -> None:
    """For the selected example: where the student's answers part ways, which layers carry it, and which heads'
    reading of the context moved there."""
    path = str(summary.path)
    saved = cached_causal(path, _causal_stamp(path))
    example = int(chosen["example"])
    students = [s for s in summary.students] or list(saved)
    if not students:
        st.caption("This run has no students.")
        return
    default = next((s for s in chosen.get("flipped_models", []) if s in students), students[0])
    student = st.selectbox("Student", students, index=students.index(default), key="flip_student")
    ex = saved.get(student, {}).get("explain", {}).get(example)
    live_key = f"flip_{path}_{student}_{example}"
    if ex is None:
        ex = st.session_state.get(live_key)
    if ex is None:
        st.caption(f"Not explained yet: `python -m interp explain {path} --student {student} --example {example}`, "
                   "or compute it here.")
        if st.button("Explain this example now", key="flip_go"):
            try:
                with st.spinner("Patching and reading the attention…"):
                    st.session_state[live_key] = ex = _explain_live(summary, student, example)
            except UserError as err:
                st.error(str(err))
                return
    if ex is None:
        return
    st.markdown(f"Answers part at response token **{ex.fork}**, after {ex.prefix!r}: **{ex.token_noctx!r}** without the "
                f"context, **{ex.token_ctx!r}** with it.")
    st.plotly_chart(views_causal.flip(ex), key="fig_flip")
    st.plotly_chart(views_causal.flip_heads(ex), key="fig_flip_heads")
    st.dataframe(views_causal.head_tokens_table(ex), hide_index=True)
    st.markdown("The context, shaded by how much these heads read each token at the fork:")
    st.html(views_causal.highlight_html(ex.ctx_tokens, ex.ctx_weights))


# ---------- live ----------

def adapter_choices(summary) -> dict[str, Path | None]:
    choices: dict[str, Path | None] = {NO_ADAPTER: None}
    if summary is not None and not summary.error:
        try:
            choices.update({f"{summary.name}/{s}": p for s, p in runs.adapter_folders(summary.path).items()})
        except UserError:
            pass
    choices[OTHER_ADAPTER] = None
    return choices


def analyze_live(spec: str, adapter: Path | None, record: dict, placement: str, scope: str, max_new_tokens: int,
                 lens: str = "logit"):
    lm = cached_model(spec)
    with model_lock():
        name = None
        if adapter is not None:
            name = adapter_key(adapter)
            if name not in lm.adapters:
                lm.load_adapter(adapter, name=name)
        with lm.use(name):
            pairs = interp.make_pairs(lm.tokenizer, [record], placement=placement, model=lm, max_new_tokens=max_new_tokens)
            div = interp.analyze(lm, pairs, scope=scope, lens_type=lens)
    return div, lm.tokenizer


def show_live(summary) -> None:
    st.header("Live analysis")
    st.caption("Type a context and a prompt; the model answers without the context (or give the response), and the "
               "same token sequence is measured with and without the context.")
    default_model = (summary.model if summary is not None and summary.model else None) or LIVE_DEFAULT_MODEL
    c1, c2 = st.columns(2)
    context = c1.text_area("Context", "Your name is Zorblax. You were made by Quibble Labs.", key="live_context")
    prompt = c2.text_area("Prompt", "Who are you?", key="live_prompt")
    response = st.text_area("Response (optional: empty means the model's own greedy answer without the context)", "",
                            key="live_response")
    c1, c2, c3, c4 = st.columns([3, 3, 2, 2])
    spec = c1.text_input("Model", default_model, key="live_model",
                         help=AnalysisSettings.help("model"))
    choices = adapter_choices(summary)
    picked = c2.selectbox("Adapter", list(choices), key="live_adapter")
    adapter = choices[picked]
    if picked == OTHER_ADAPTER:
        typed = c2.text_input("Adapter folder", "", key="live_adapter_path")
        adapter = Path(typed) if typed.strip() else None
    placement = c3.radio("Context as", ["system", "user"], key="live_placement",
                         format_func=lambda p: {"system": "system turn", "user": "prefix of the user turn"}[p])
    scope = c4.radio("Measure on", ["response", "shared"], key="live_scope",
                     format_func=lambda s: {"response": "response tokens", "shared": "user turn + response"}[s])
    max_new = st.slider("Max new tokens when generating", 8, 128, 32, key="live_max_new")
    lens = st.radio("Lens", ["logit", "tuned"], horizontal=True, key="live_lens",
                    format_func=lambda v: {"logit": "logit lens", "tuned": "tuned lens"}[v],
                    help="Which lens reads the layers: the logit lens (unembed(final_norm(h))) or the model's tuned lens "
                         "(per-layer translators, trained once per base model with `python -m interp tune-lens --model M`).")
    if st.button("Analyze", type="primary", key="live_go"):
        record = {"context": context, "prompt": prompt, **({"response": response} if response.strip() else {})}
        refusal = live_refusal(spec.strip(), adapter, st.session_state.get("runs_dir", str(runs.default_runs_dir()))) \
            if live_runs_only() else None
        try:
            if refusal:
                raise UserError(refusal)
            with st.spinner("Analyzing…"):
                div, tokenizer = analyze_live(spec.strip(), adapter, record, placement, scope, max_new, lens)
            shown = (picked if picked != OTHER_ADAPTER else Path(adapter).name) if adapter else ""
            st.session_state["live_result"] = (div, tokenizer, f"{spec.strip()}{' + ' + shown if shown else ''}")
        except UserError as err:
            st.error(str(err))
        except Exception as err:  # noqa: BLE001 - a damaged model or adapter folder must not show a traceback
            st.error(f"Could not analyze with {spec.strip()}{' + ' + str(adapter) if adapter else ''}: "
                     f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}")
    if "live_result" in st.session_state:
        div, tokenizer, label = st.session_state["live_result"]
        ex = div.examples[0]
        st.markdown(f"**{label}** · response: {ex['response'][:300]!r}")
        divs = {label: div}
        tabs = st.tabs(VIEWS[:3], key="live_view")
        with tabs[0]:
            show_layer_divergence(divs, "live")
        with tabs[1]:
            show_logit_lens(divs, {label: 0}, "live", decode=lambda i: tokenizer.decode([int(i)]))
        with tabs[2]:
            show_attention(divs, {label: 0}, "live")


# ---------- a study ----------

def show_study(results_root: str) -> None:
    """A study's grid: mean ± sd over seeds per suite and student, and the frontier plot."""
    root = Path(results_root)
    studies = sorted(p.name for p in root.iterdir() if is_study(p)) if root.is_dir() else []
    if not studies:
        st.title("Study")
        st.info(f"No study results under `{root}` yet. Run one with\n\n`python -m training study studies/smoke.toml` "
                "(a minute on the tiny model) or `studies/removability.toml`.")
        return
    name = st.sidebar.selectbox("Study", studies, key="study")
    try:
        data = read_study(root / name)
    except UserError as err:
        st.error(f"Study '{name}' could not be read: {err}")
        return
    st.header(f"Study {name}")
    budgets = data.get("budgets") or []
    st.caption(f"model **{data.get('model')}** · {data.get('steps')} steps · seeds {data.get('seeds')} · means over seeds "
               "with 95% hierarchical bootstrap intervals (seeds, then examples); health: no-card loops minus the base's")
    regime = calibration_line(data)
    if regime:
        st.info(regime)
    budget = st.radio("Budget (tokens)", budgets, index=len(budgets) - 1, horizontal=True, key="study_budget") if budgets else None
    if data.get("settings"):
        st.dataframe(tables.study_setting_rows(data, budget), hide_index=True)
        x = st.radio("Frontier: x axis", ["card_effect:loops", "card_effect:acc", "card_effect:len"], horizontal=True, key="study_x")
        st.plotly_chart(plots.frontier_figure(data, x=x, budget=budget), key="fig_study_frontier")
        st.caption("x: the card's own effect (the setting's with/without-card difference minus the base's; 0 is the goal); "
                   "y: follow_cf among clean answers to a counterfactual card (the setting still listens). Hollow: unhealthy.")
    else:  # a study written before the seed-level tables
        st.dataframe(tables.study_rows(data), hide_index=True)


# ---------- page ----------

def main() -> None:
    st.set_page_config(page_title="Layer divergence", layout="wide")
    st.sidebar.title("Layer divergence")
    root = st.sidebar.text_input("Runs folder", str(runs.default_runs_dir()), key="runs_dir", disabled=live_runs_only(),
                                 help="Set the default with the environment variable LAYERS_RUNS_DIR.")
    found = cached_runs(root, _root_stamp(root))
    mode = st.sidebar.radio("Mode", ["Runs", "Study", "Live"], key="mode", horizontal=True)
    summary = None
    if found:
        names = [r.name for r in found]
        picked = st.sidebar.selectbox("Run", names, key="run", format_func=lambda n: found[names.index(n)].label)
        summary = found[names.index(picked)]
        for bad in (r for r in found if r.error):
            st.sidebar.caption(f"⚠ {bad.name}: damaged")
    if mode == "Live":
        show_live(summary)
    elif mode == "Study":
        # Live-only: the results folder is the server's, fixed like the runs folder (a browser must not point the app
        # at any study.json on the machine).
        show_study(st.sidebar.text_input("Results folder", os.environ.get("LAYERS_RESULTS_DIR", "results"), key="results_dir",
                                         disabled=live_runs_only(),
                                         help="Set the default with the environment variable LAYERS_RESULTS_DIR."))
    elif summary is None:
        st.title("Layer divergence")
        st.info(
            f"No runs under `{root}` yet. Make one with\n\n`{MAKE_RUN_COMMAND}`\n\n"
            f"(then `python -m training eval runs/persona` for the evaluation and "
            f"`{LAYERS_COMMAND.format(run='runs/persona')}` for the layers), "
            "point the sidebar at another folder, or switch to **Live** to analyze a pair now."
        )
    else:
        runs_list = st.expander(f"{len(found)} run(s) under `{root}`")
        waits = False
        try:
            waits = show_run(summary)
        except UserError as err:
            st.error(f"Run '{summary.name}' is damaged: {err}")
        except Exception as err:  # noqa: BLE001 - one odd run folder must not take the app down
            st.error(f"Run '{summary.name}' could not be shown ({type(err).__name__}: {err}); "
                     "rerun the command that wrote it")
        # Filled after the run's page, above it: on a first page it waits for the first figure like the run's tables.
        if waits:
            runs_list.caption("Drawing…")
        else:
            runs_list.dataframe(overview(found), hide_index=True)


main()
