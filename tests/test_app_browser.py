"""The app in a real browser: `streamlit run` on a free port, Debian's chromium driven by Playwright (no browser download)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from apps.serve import chromium_page, running_app
from interp.views.synthetic import write_synthetic_run

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
# Where the layer-divergence figure is drawn: Streamlit marks a keyed element's container with st-key-<key>.
DIVERGENCE_PLOT = ".st-key-fig_run_layer_divergence .js-plotly-plot .scatterlayer .trace"


def chromium_or_skip() -> str:
    path = shutil.which("chromium")
    if path:
        return path
    reason = "Debian's chromium is not installed (`make browser` or `apt-get install chromium`)"
    if os.environ.get("REQUIRE_BROWSER") == "1":
        pytest.fail(f"REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason)


@pytest.mark.browser
def test_app_draws_the_layer_divergence_figure(tmp_path, monkeypatch):
    chromium = chromium_or_skip()
    # The first page's hidden views wait for the page to report the first figure drawn: the report must arrive.
    monkeypatch.setenv("LAYERS_FIRST_PAINT_S", "60")
    runs_dir = tmp_path / "runs"
    write_synthetic_run(runs_dir / "facts")
    ARTIFACTS.mkdir(exist_ok=True)
    with running_app(runs_dir) as (url, _), chromium_page(chromium) as page:
        page.goto(url)
        page.wait_for_selector(DIVERGENCE_PLOT, timeout=60_000)
        # 3 models x 3 measures, one line each.
        assert page.locator(DIVERGENCE_PLOT).count() == 9
        assert "Layer divergence" in page.locator(".st-key-fig_run_layer_divergence .gtitle").text_content()
        page.wait_for_timeout(500)  # let the rest of the page settle for the screenshot
        page.screenshot(path=str(ARTIFACTS / "app_layer_divergence.png"), full_page=True)
        # A view switch draws the logit lens.
        page.get_by_role("tab", name="Logit lens").click()
        page.wait_for_selector(".st-key-fig_run_logit_lens .js-plotly-plot .heatmaplayer", state="visible", timeout=30_000)
        page.screenshot(path=str(ARTIFACTS / "app_logit_lens.png"), full_page=True)
        # Clicking a cell of the attention heatmap picks that layer and head for the per-token view.
        page.get_by_role("tab", name="Attention").click()
        page.wait_for_selector(".st-key-fig_run_attention .js-plotly-plot .heatmaplayer", state="visible", timeout=30_000)
        title = page.locator(".st-key-fig_run_head .gtitle")
        assert title.text_content().startswith("Layer 1, head 0")
        box = page.locator(".st-key-fig_run_attention .js-plotly-plot .nsewdrag").first.bounding_box()
        # The top row is the last decoder block (3), the last column head 3 (of 4).
        page.mouse.click(box["x"] + box["width"] * 7 / 8, box["y"] + box["height"] / 6)
        page.wait_for_function("() => document.querySelector('.st-key-fig_run_head .gtitle')?.textContent.startsWith('Layer 3, head 3')",
                               timeout=30_000)
        page.screenshot(path=str(ARTIFACTS / "app_attention.png"), full_page=True)
        assert not page.locator("[data-testid='stException']").count()


def test_without_chromium_the_browser_test_skips_or_fails_when_required(monkeypatch):
    import test_app_browser

    monkeypatch.setattr(test_app_browser.shutil, "which", lambda name: None)
    monkeypatch.delenv("REQUIRE_BROWSER", raising=False)
    with pytest.raises(pytest.skip.Exception, match="chromium is not installed"):
        chromium_or_skip()
    monkeypatch.setenv("REQUIRE_BROWSER", "1")
    with pytest.raises(pytest.fail.Exception, match="REQUIRE_BROWSER=1"):
        chromium_or_skip()
