"""The app's Internalization tab and "Why this flip" panel, on a run whose causal results the CLI wrote, and the
panel's live path on a run without them."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from interp.cli import main
from test_app import APP, write_tiny_adapter
from interp.views.synthetic import write_synthetic_run


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    run = write_synthetic_run(root / "facts", with_layers=True)
    for student in ("unreg", "reg"):
        write_tiny_adapter(run / student)
    tiny = ["--device", "cpu", "--backend", "torch"]
    assert main(["compare", str(run), "--student", "unreg", *tiny]) == 0
    assert main(["patch", str(run), "--student", "unreg", *tiny]) == 0
    assert main(["explain", str(run), "--student", "unreg", "--example", "0", *tiny]) == 0
    return root


def _app(monkeypatch, root: Path) -> AppTest:
    monkeypatch.setenv("LAYERS_RUNS_DIR", str(root))
    return AppTest.from_file(APP, default_timeout=300)


def test_internalization_tab_and_flip_panel(monkeypatch, root):
    at = _app(monkeypatch, root).run()
    assert not at.exception, [e.value for e in at.exception]
    tab = next(t for t in at.tabs if t.label == "Internalization")
    specs = [c.proto.spec for c in tab.get("plotly_chart")]
    # Four-way curves, context vector projections, per-example overshoot of the flipped example, patching curves.
    assert len(specs) == 4
    assert "Four-way comparison" in specs[0] and "overshoot" in specs[1] and "Per-example overshoot" in specs[2]
    assert "recovery" in specs[3]
    at.radio(key="causal_measure").set_value("lens_kl").run()
    assert not at.exception
    # Example 0 flipped for unreg: its saved forensics show in the panel.
    assert any("Answers part at response token" in m.value for m in at.markdown)
    assert any("Why this flip" in c.proto.spec for c in at.get("plotly_chart"))


def test_flip_panel_computes_live(monkeypatch, root):
    at = _app(monkeypatch, root).run()
    at.selectbox(key="flip_student").set_value("reg").run()
    assert any("Not explained yet" in c.value for c in at.caption)
    at.button(key="flip_go").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("Answers part at response token" in m.value for m in at.markdown)


def test_report_has_the_internalization_section(root, tmp_path):
    import json

    from interp.views.report import HTML_FILE, JSON_FILE, write_report

    out = write_report([root / "facts"], tmp_path / "report", decode_tokens=False)
    page = (out / HTML_FILE).read_text()
    assert "<h3>Internalization</h3>" in page and "Why this flip: example 0" in page
    causal = json.loads((out / JSON_FILE).read_text())["runs"]["facts"]["causal"]["unreg"]
    assert len(causal["comparison"]["per_layer"]["overshoot"]) == 4
    assert causal["comparison"]["per_layer"]["overshoot"][0] is None  # undefined at the embeddings, null in JSON
    assert set(causal["patch"]) == {"context_resid", "repair_resid"}
    assert causal["patch"]["context_resid"]["per_layer"]["recovery"][-1] == 1.0
