"""The app under Streamlit's AppTest: empty, a run present, a broken run, and the live view on the tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from interp.views.synthetic import write_synthetic_run

APP = str(Path(__file__).resolve().parents[1] / "apps" / "layers.py")


def _app(monkeypatch, root: Path, first_paint_s: str = "0") -> AppTest:
    monkeypatch.setenv("LAYERS_RUNS_DIR", str(root))
    monkeypatch.setenv("LAYERS_FIRST_PAINT_S", first_paint_s)  # "0": every view at once (AppTest has no browser)
    return AppTest.from_file(APP, default_timeout=120)


def _charts(at: AppTest) -> list:
    return at.get("plotly_chart")


def _no_exception(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


def test_empty_state_names_the_command(monkeypatch, tmp_path):
    at = _app(monkeypatch, tmp_path / "runs").run()
    _no_exception(at)
    text = " ".join(i.value for i in at.info)
    assert "python -m training pair" in text and "Live" in text


def test_a_run_shows_every_view(monkeypatch, tmp_path):
    write_synthetic_run(tmp_path / "runs" / "facts")
    at = _app(monkeypatch, tmp_path / "runs").run()
    _no_exception(at)
    assert at.header[0].value == "facts"
    assert len(at.dataframe) == 4  # all runs, evaluation, answers to the chosen example, examples
    # One tab per view: layer divergence (1 figure), logit lens (2), attention (2), internalization (none yet), training (1).
    assert [t.label for t in at.tabs] == ["Layer divergence", "Logit lens", "Attention", "Internalization", "Training"]
    assert [len(t.get("plotly_chart")) for t in at.tabs] == [1, 2, 2, 0, 1]
    # Another example drives the views; the flipped filter narrows the table.
    at.sidebar.selectbox(key="example").set_value("2").run()
    _no_exception(at)
    assert "Example #2" in " ".join(m.value for m in at.markdown)
    at.checkbox(key="only_flipped").check().run()
    _no_exception(at)
    # The views' own pickers: another model and colour for the lens, another layer and head for attention.
    at.selectbox(key="run_lens_model").set_value("base")
    at.selectbox(key="run_lens_stat").set_value("entropy")
    at.selectbox(key="run_layer").set_value(3)
    at.selectbox(key="run_head").set_value(2).run()
    _no_exception(at)
    assert "Layer 3, head 2" in at.tabs[2].get("plotly_chart")[1].proto.spec


def test_the_first_page_draws_the_rest_once_the_first_figure_is_reported(monkeypatch, tmp_path):
    write_synthetic_run(tmp_path / "runs" / "facts")
    at = _app(monkeypatch, tmp_path / "runs", first_paint_s="15").run()
    _no_exception(at)
    # The first figure alone: no table, the hidden views marked as coming.
    assert [len(t.get("plotly_chart")) for t in at.tabs] == [1, 0, 0, 0, 0]
    assert len(at.dataframe) == 0
    assert all("Drawing…" in [c.value for c in t.caption] for t in at.tabs[1:])
    at.session_state["_first_page_drawn"] = True  # what the page's report (its trigger's callback) sets
    at.run()
    _no_exception(at)
    assert [len(t.get("plotly_chart")) for t in at.tabs] == [1, 2, 2, 0, 1]
    assert len(at.dataframe) == 4


def test_layer_divergence_options(monkeypatch, tmp_path):
    write_synthetic_run(tmp_path / "runs" / "facts")
    at = _app(monkeypatch, tmp_path / "runs").run()
    at.multiselect(key="run_models").set_value(["base", "reg"]).run()
    at.toggle(key="run_divergence").set_value(True).run()
    _no_exception(at)
    assert len(at.tabs[0].get("plotly_chart")) == 1


def test_switching_between_runs_of_other_shapes(monkeypatch, tmp_path):
    write_synthetic_run(tmp_path / "runs" / "a_facts")
    write_synthetic_run(tmp_path / "runs" / "b_small", students=("unreg",), num_blocks=2, num_heads=2)
    at = _app(monkeypatch, tmp_path / "runs").run()
    at.selectbox(key="run_layer").set_value(3)
    at.selectbox(key="run_head").set_value(3)
    at.sidebar.selectbox(key="example").set_value("2").run()
    at.sidebar.selectbox(key="run").set_value("b_small").run()
    _no_exception(at)
    assert at.header[0].value == "b_small" and len(_charts(at)) == 6
    at.sidebar.selectbox(key="run").set_value("a_facts").run()
    _no_exception(at)


def test_a_broken_run_is_an_error_for_that_run_only(monkeypatch, tmp_path):
    write_synthetic_run(tmp_path / "runs" / "good")
    bad = tmp_path / "runs" / "bad"
    bad.mkdir()
    (bad / "run.json").write_text("{broken")
    worse = write_synthetic_run(tmp_path / "runs" / "worse")
    (worse / "layers" / "reg" / "arrays.safetensors").write_bytes(b"not safetensors")
    at = _app(monkeypatch, tmp_path / "runs").run()
    _no_exception(at)
    at.sidebar.selectbox(key="run").set_value("bad").run()
    _no_exception(at)
    assert "run.json" in at.error[0].value and "damaged" in at.error[0].value
    at.sidebar.selectbox(key="run").set_value("worse").run()
    _no_exception(at)
    assert "arrays.safetensors" in at.error[0].value
    at.sidebar.selectbox(key="run").set_value("good").run()
    _no_exception(at)
    assert not at.error and len(_charts(at)) == 6
    # Arrays of inconsistent shapes (an edited or truncated file) are an error for that run as well.
    from interp.divergence import load_divergence, save_divergence

    div = load_divergence(worse / "layers" / "unreg")
    div.lens_top1_ctx = div.lens_top1_ctx[:, :2]
    save_divergence(div, worse / "layers" / "unreg", overwrite=True)
    (worse / "layers" / "reg").rename(worse / "layers" / ".reg-moved")
    at.sidebar.selectbox(key="run").set_value("worse").run()
    _no_exception(at)
    assert "is damaged" in at.error[0].value and "'lens_top1_ctx' has shape" in at.error[0].value  # named where it is read


def test_a_run_still_training(monkeypatch, tmp_path):
    write_synthetic_run(tmp_path / "runs" / "young", with_layers=False, with_eval=False)
    at = _app(monkeypatch, tmp_path / "runs").run()
    _no_exception(at)
    text = " ".join(i.value for i in at.info)
    assert "Not evaluated yet" in text and "No layer results yet" in text


def test_live_view_on_the_tiny_model(monkeypatch, tmp_path):
    at = _app(monkeypatch, tmp_path / "runs").run()
    at.sidebar.radio(key="mode").set_value("Live").run()
    _no_exception(at)
    at.text_input(key="live_model").set_value("tiny-random-llama")
    at.text_area(key="live_response").set_value("I am Zorblax, made by Quibble Labs.")
    at.button(key="live_go").click().run(timeout=300)
    _no_exception(at)
    assert not at.error, [e.value for e in at.error]
    div, _, _ = at.session_state["live_result"]
    assert div.num_layers == 4 and div.cos[0] == pytest.approx(1.0)
    assert [len(t.get("plotly_chart")) for t in at.tabs] == [1, 2, 2]
    # A user mistake is a message, not a crash.
    at.text_area(key="live_context").set_value("  ")
    at.button(key="live_go").click().run(timeout=120)
    _no_exception(at)
    assert "context" in at.error[0].value and "empty" in at.error[0].value


def write_tiny_adapter(folder: Path) -> Path:
    """A LoRA adapter with random weights for the tiny model, standing in for a trained student."""
    import torch
    from peft import LoraConfig, get_peft_model

    from interp import load_model

    model = load_model("tiny-random-llama", device="cpu").model
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, 0.2)
    peft_model.save_pretrained(folder)
    return folder


def test_live_view_with_an_adapter_folder(monkeypatch, tmp_path):
    adapter = write_tiny_adapter(tmp_path / "student")
    at = _app(monkeypatch, tmp_path / "runs").run()
    at.sidebar.radio(key="mode").set_value("Live").run()
    at.text_input(key="live_model").set_value("tiny-random-llama")
    at.text_area(key="live_response").set_value("I am Zorblax.")
    at.button(key="live_go").click().run(timeout=300)
    base, _, _ = at.session_state["live_result"]
    at.selectbox(key="live_adapter").set_value("another adapter folder…").run()
    at.text_input(key="live_adapter_path").set_value(str(adapter))
    at.button(key="live_go").click().run(timeout=300)
    _no_exception(at)
    assert not at.error, [e.value for e in at.error]
    student, _, label = at.session_state["live_result"]
    assert label == "tiny-random-llama + student" and student.meta["adapter"] is not None
    assert not (student.cos[1:] == base.cos[1:]).all(), "the adapter must change the hidden states"
    # A folder that is not an adapter is a message.
    at.text_input(key="live_adapter_path").set_value(str(tmp_path))
    at.button(key="live_go").click().run(timeout=120)
    _no_exception(at)
    assert "adapter_config.json" in at.error[0].value


@pytest.mark.embedded
def test_live_view_on_the_embedded_model(monkeypatch, tmp_path):
    at = _app(monkeypatch, tmp_path / "runs").run()
    at.sidebar.radio(key="mode").set_value("Live").run()
    assert at.text_input(key="live_model").value == "smollm2-135m-instruct"
    at.slider(key="live_max_new").set_value(16)
    at.button(key="live_go").click().run(timeout=600)
    _no_exception(at)
    assert not at.error, [e.value for e in at.error]
    div, _, _ = at.session_state["live_result"]
    assert div.num_layers == 31 and div.attn_ctx.shape == (30, 9)
    assert div.cos[0] == pytest.approx(1.0, abs=1e-5)


def test_the_first_page_loads_no_torch(tmp_path):
    # Importing torch costs seconds on a CPU machine: the first figure must not wait for it (live mode loads it).
    import subprocess
    import sys

    script = f"""
import os, sys
sys.path.insert(0, {str(Path(APP).parents[1])!r})
from interp.views.synthetic import write_synthetic_run
from pathlib import Path
write_synthetic_run(Path({str(tmp_path / "runs" / "r")!r}), n_examples=4, num_blocks=3, num_heads=2, tokens=5)
os.environ["LAYERS_RUNS_DIR"] = {str(tmp_path / "runs")!r}
from streamlit.testing.v1 import AppTest
at = AppTest.from_file({APP!r}, default_timeout=120).run()
assert not at.exception, [e.value for e in at.exception]
assert at.get("plotly_chart"), "no figure on the first page"
print(sorted(m for m in ("torch", "transformers", "peft", "scipy") if m in sys.modules))
"""
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip().splitlines()[-1] == "[]"


def test_study_view_names_the_calibrated_regime(monkeypatch, tmp_path):
    from interp.core.store import atomic_write_json

    row = {k: {"mean": 0.25, "sd": 0.05, "n": 2} for k in ("acc_noctx", "acc_ctx", "harm", "degenerate_ctx", "follow_cf",
                                                            "ctx_drop", "truncated_ctx", "len_ratio", "drift")}
    study = {"name": "s", "model": "tiny-random-llama", "steps": 30, "seeds": [0, 1], "cells": [], "paired": [],
             "summary": [{"suite": "persona", "student": "unreg", "lam": 0.0, "seeds": [0, 1], **row}],
             "calibrated_by": {"from": "results/cal", "name": "cal", "choice": "lr1e4_greedy", "passes": True,
                               "regime": {"lr": 1e-4, "temperature": 0.0}, "steps": 30}}
    atomic_write_json(tmp_path / "results" / "s" / "study.json", study)
    monkeypatch.setenv("LAYERS_RESULTS_DIR", str(tmp_path / "results"))
    at = _app(monkeypatch, tmp_path / "runs").run()
    at.sidebar.radio(key="mode").set_value("Study").run()
    _no_exception(at)
    assert any("calibration `cal`" in i.value and "`lr1e4_greedy`, which passes the gate" in i.value for i in at.info)
