"""End to end on the tiny model, each stage reading what the one before wrote: `training pair` → `training eval` with
layers → `interp report` → the app; and a study → the app's Study view. No hand-built run folders."""

import json
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest
from typer.testing import CliRunner

from interp import divergence
from interp.core import runs

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--model", "tiny-random-llama", "--steps", "2", "--batch-size", "2", "--max-new-tokens", "4", "--n-test", "3",
         "--checkpoint-every", "1", "--lr", "1e-2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from training.__main__ import app

    root = tmp_path_factory.mktemp("glue")
    run = root / "runs" / "persona"
    result = CliRunner().invoke(app, ["pair", "--task", "persona", *SMALL, "--eval-new-tokens", "6", "--out", str(run)])
    assert result.exit_code == 0, result.output
    return run


def test_eval_with_layers_measures_the_generated_tokens(trained):
    info = runs.read_run(trained)
    assert info.students == ["unreg", "reg"] and info.task == "persona"
    rows = runs.read_examples(trained)
    assert {r.model for r in rows} == {"base", "unreg", "reg"}
    for model in ("base", "unreg", "reg"):
        div = divergence.load_layers(trained, model)
        mine = [r for r in rows if r.model == model and r.ids_noctx]
        # the layers are measured on exactly the ids the model generated, example by example
        assert len(div.examples) == len(mine)
        for i, r in enumerate(mine):
            targets = np.asarray(div.target_id)[np.asarray(div.token_example) == i]
            assert targets.tolist() == r.ids_noctx
        np.testing.assert_allclose(div.cos[0], 1.0, atol=1e-6)  # aligned tokens: the embeddings cannot see the context
    report = json.loads((trained / "eval.json").read_text())
    assert list(report["models"]) == ["base", "teacher", "unreg", "reg"]


def test_report_reads_what_training_wrote(trained, tmp_path):
    from interp.cli import main

    assert main(["report", str(trained), "--out", str(tmp_path / "rep"), "--no-tokens"]) == 0
    data = json.loads((tmp_path / "rep" / "layer_divergence.json").read_text())
    assert set(data["runs"]["persona"]["layers"]) == {"base", "unreg", "reg"}
    page = (tmp_path / "rep" / "report.html").read_text()
    assert "degenerate_ctx" in page and "follow_cf" in page


def test_app_reads_what_training_wrote(trained, monkeypatch):
    monkeypatch.setenv("LAYERS_RUNS_DIR", str(trained.parent))
    monkeypatch.setenv("LAYERS_FIRST_PAINT_S", "0")
    at = AppTest.from_file(str(ROOT / "apps" / "layers.py"), default_timeout=120).run()
    assert not at.exception, at.exception
    assert any("persona" in (h.value or "") for h in at.header)
    assert at.dataframe  # the evaluation table


def test_study_then_the_apps_study_view(tmp_path, monkeypatch):
    from training.study import load_study, run_study

    study_file = tmp_path / "mini.toml"
    study_file.write_text(
        "name = 'mini'\nmodel = 'tiny-random-llama'\nsuites = ['facts']\nseeds = [0]\nsteps = 1\n"
        "[train]\nbatch_size = 2\nmax_new_tokens = 4\n[eval]\nn_test = 3\nmax_new_tokens = 4\n"
        "[[students]]\nname = 'unreg'\n[[students]]\nname = 'reg'\nlam = 1.0\n"
    )
    study = load_study(study_file, str(tmp_path / "runs"), str(tmp_path / "results"))
    data = run_study(study, progress=False)
    assert {r["student"] for r in data["summary"]} == {"unreg", "reg", "base", "teacher"}
    monkeypatch.setenv("LAYERS_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("LAYERS_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv("LAYERS_FIRST_PAINT_S", "0")
    at = AppTest.from_file(str(ROOT / "apps" / "layers.py"), default_timeout=120).run()
    at.sidebar.radio(key="mode").set_value("Study").run()
    assert not at.exception, at.exception
    assert any("Study mini" in (h.value or "") for h in at.header)
    assert at.dataframe and at.get("plotly_chart")
