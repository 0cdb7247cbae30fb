"""App benchmark: seconds from `streamlit run` to the layer-divergence figure drawn in Chromium, and per view switch.

A precomputed run of 64 examples at the embedded model's shape (31 layers, 9 heads, about 40 response tokens each)
is written to a temporary folder. A switch is a click on a view's tab until its figure is visible. The baseline,
measured in the same run, is a Streamlit script that draws one small figure per view and nothing else: the floor
that the server and the browser set on this machine at this moment. Goal (issue 5): first figure within 5 s, a
switch within 0.5 s, on CPU. Needs Debian's chromium. Last line: `first_figure_s=<x> switch_s=<y>`.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from apps.serve import APP, CHROMIUM_ARGS, running_app  # noqa: E402
from bench.machine import load_line  # noqa: E402
from interp.views.synthetic import write_synthetic_run  # noqa: E402

DIVERGENCE = ".st-key-fig_run_layer_divergence .js-plotly-plot .scatterlayer .trace"
LENS = ".st-key-fig_run_logit_lens .js-plotly-plot .heatmaplayer"
ATTENTION = ".st-key-fig_run_attention .js-plotly-plot .heatmaplayer"
# The floor: a script that draws one small figure per view, with the same keys, and does nothing else.
BASELINE_APP = """
import plotly.graph_objects as go
import streamlit as st
view = st.segmented_control("View", ["Layer divergence", "Logit lens"], default="Layer divergence", key="view", required=True)
if view == "Layer divergence":
    st.plotly_chart(go.Figure(go.Scatter(x=list(range(31)), y=list(range(31)))), key="fig_run_layer_divergence")
else:
    st.plotly_chart(go.Figure(go.Heatmap(z=[[1, 2], [3, 4]])), key="fig_run_logit_lens")
"""


def first_figure(browser, runs_dir: Path, app: Path = APP) -> float:
    """Seconds from starting the server to the figure's lines in a fresh browser context (nothing cached)."""
    context = browser.new_context(viewport={"width": 1500, "height": 1100})
    try:
        page = context.new_page()
        with running_app(runs_dir, app) as (url, started):
            page.goto(url)
            page.wait_for_selector(DIVERGENCE, timeout=120_000)
            return time.perf_counter() - started
    finally:
        context.close()


def switches(browser, runs_dir: Path, views, rounds: int, app: Path = APP) -> dict[str, list[float]]:
    """Seconds per view switch, once the first page is drawn: each round visits every view in `views`."""
    context = browser.new_context(viewport={"width": 1500, "height": 1100})
    try:
        page = context.new_page()
        with running_app(runs_dir, app) as (url, _):
            page.goto(url)
            page.wait_for_selector(DIVERGENCE, timeout=120_000)
            times = {view: [] for view, _ in views}
            for _ in range(rounds):
                for view, selector in views:
                    times[view].append(switch(page, view, selector))
            return times
    finally:
        context.close()


def switch(page, view: str, selector: str) -> float:
    """Seconds from clicking a view's tab (or segmented-control button) to its figure visible."""
    started = time.perf_counter()
    tab = page.get_by_role("tab", name=view)
    (tab if tab.count() else page.locator(".st-key-view").get_by_text(view, exact=True)).click()
    page.wait_for_selector(selector, state="visible", timeout=60_000)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--starts", type=int, default=3, help="app starts to time (alternating with the baseline)")
    parser.add_argument("--rounds", type=int, default=3, help="view-switch rounds (each visits every view)")
    args = parser.parse_args()
    print(load_line(), flush=True)
    chromium = shutil.which("chromium")
    if not chromium:
        sys.exit("Debian's chromium is needed: `make browser` (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as p:
        tmp = Path(tmp)
        runs_dir = tmp / "runs"
        t0 = time.perf_counter()
        write_synthetic_run(runs_dir / "bench", n_examples=args.examples, num_blocks=30, num_heads=9, tokens=40)
        print(f"wrote a {args.examples}-example run (31 layers, 9 heads, 3 models) in {time.perf_counter() - t0:.1f} s")
        baseline_script = tmp / "baseline_app.py"
        baseline_script.write_text(BASELINE_APP)
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
        baselines, firsts = [], []
        for _ in range(args.starts):  # alternating, so that load from elsewhere on the machine hits both alike
            baselines.append(first_figure(browser, runs_dir, app=baseline_script))
            firsts.append(first_figure(browser, runs_dir))
        baseline, first = statistics.median(baselines), statistics.median(firsts)
        print("baseline (a one-figure-per-view streamlit script), first figure: " + ", ".join(f"{v:.2f}" for v in baselines)
              + f" s; median {baseline:.2f} s")
        print("app, first layer-divergence figure: " + ", ".join(f"{v:.2f}" for v in firsts)
              + f" s; median {first:.2f} s ({first / baseline:.2f}x the baseline)")
        base_times = switches(browser, runs_dir, (("Logit lens", LENS), ("Layer divergence", DIVERGENCE)), args.rounds,
                              app=baseline_script)
        times = switches(browser, runs_dir, (("Logit lens", LENS), ("Attention", ATTENTION), ("Layer divergence", DIVERGENCE)),
                         args.rounds)
        browser.close()
    base_switch = statistics.median([v for values in base_times.values() for v in values])
    print("baseline switch: " + ", ".join(f"{v:.2f}" for values in base_times.values() for v in values)
          + f" s; median {base_switch:.2f} s")
    for view, values in times.items():
        print(f"switch to {view}: " + ", ".join(f"{v:.2f}" for v in values) + " s")
    # The first switch to the logit lens also loads the tokenizer once; the median is the steady state.
    every = [v for values in times.values() for v in values]
    switch_s = statistics.median(every)
    print(f"app switch: median {switch_s:.2f} s ({switch_s / base_switch:.2f}x the baseline)")
    print(f"first_figure_s={first:.2f} switch_s={switch_s:.2f}")


if __name__ == "__main__":
    main()
