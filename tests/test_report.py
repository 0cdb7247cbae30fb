"""The report: HTML that opens offline, JSON and CSV equal to the LayerDivergence they came from."""

from __future__ import annotations

import csv
import json
import math
import re

import pytest
from plotly.offline import get_plotlyjs

from interp.views import report
from interp import divergence
from interp.core import runs
from interp.core.errors import UserError
from interp.views.synthetic import write_synthetic_run


def _same(a, b) -> bool:
    if a is None or b is None:  # NaN is written as null
        return (a is None or math.isnan(a)) and (b is None or math.isnan(b))
    return a == b


@pytest.fixture
def two_runs(tmp_path):
    a = write_synthetic_run(tmp_path / "runs" / "facts")
    b = write_synthetic_run(tmp_path / "runs" / "persona", students=("unreg",), num_blocks=2, num_heads=3)
    return a, b


def test_report_json_equals_the_layer_divergence(two_runs, tmp_path):
    out = report.write_report(two_runs, tmp_path / "report", decode_tokens=False)
    data = json.loads((out / report.JSON_FILE).read_text())
    assert set(data["runs"]) == {"facts", "persona"}
    for run in two_runs:
        for model in runs.layer_models(run):
            div = divergence.load_layers(run, model)
            written = data["runs"][run.name]["layers"][model]
            expected = div.per_layer_table()
            assert set(written["per_layer"]) == set(expected)
            for key, values in expected.items():
                assert len(written["per_layer"][key]) == div.num_layers
                assert all(_same(x, y) for x, y in zip(written["per_layer"][key], values)), key
            assert written["attn_ctx"] == div.attn_ctx.astype(float).tolist()
            assert written["attn_sink"] == div.attn_sink.astype(float).tolist()
    assert [r["model"] for r in data["runs"]["facts"]["eval"]] == ["base", "teacher", "unreg", "reg"]
    assert data["runs"]["facts"]["settings"]["run"]["task"] == "facts"


def test_report_csv_has_every_per_layer_number(two_runs, tmp_path):
    out = report.write_report(two_runs, tmp_path / "report", decode_tokens=False)
    rows = list(csv.DictReader((out / report.CSV_FILE).open()))
    # facts: 3 models x 4 layers; persona: 2 models x 3 layers
    assert len(rows) == 3 * 4 + 2 * 3
    div = divergence.load_layers(two_runs[0], "reg")
    mine = [r for r in rows if r["run"] == "facts" and r["model"] == "reg"]
    for key, values in div.per_layer_table().items():
        assert [float(r[key]) for r in mine] == pytest.approx(values, rel=1e-12, abs=0), key


def test_report_html_is_self_contained(two_runs, tmp_path):
    out = report.write_report(two_runs, tmp_path / "report", decode_tokens=False)
    page = (out / report.HTML_FILE).read_text()
    plotly_js = get_plotlyjs()
    assert page.count(plotly_js) == 1, "plotly.js must be inline exactly once"
    rest = page.replace(plotly_js, "")
    assert not re.search(r"<script[^>]*\bsrc\s*=", rest, re.I), "no script may load from elsewhere"
    assert "http" not in rest.lower(), "no network URL outside plotly.js itself"
    assert rest.count("Plotly.newPlot") >= 8
    for name in ("facts", "persona", "acc_noctx", "ctx_drop", "Settings"):
        assert name in rest


def test_report_rejects_bad_input(tmp_path):
    with pytest.raises(UserError, match="no runs"):
        report.write_report([], tmp_path / "r")
    with pytest.raises(UserError, match="not a folder"):
        report.write_report([tmp_path / "nowhere"], tmp_path / "r")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="neither a run"):
        report.write_report([tmp_path / "empty"], tmp_path / "r")
    assert not (tmp_path / "r").exists(), "a failed report leaves nothing behind"


def test_report_replaces_an_earlier_report_but_nothing_else(two_runs, tmp_path):
    report.write_report(two_runs[:1], tmp_path / "r", decode_tokens=False)
    report.write_report(two_runs[1:], tmp_path / "r", decode_tokens=False)
    assert set(json.loads((tmp_path / "r" / report.JSON_FILE).read_text())["runs"]) == {"persona"}
    (tmp_path / "r" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists"):
        report.write_report(two_runs[:1], tmp_path / "r", decode_tokens=False)
    assert (tmp_path / "r" / "notes.txt").exists()
    report.write_report(two_runs[:1], tmp_path / "r", overwrite=True, decode_tokens=False)


def test_report_command(two_runs, tmp_path):
    from interp.cli import main

    assert main(["report", str(two_runs[0]), "--out", str(tmp_path / "rep"), "--no-tokens"]) == 0
    assert (tmp_path / "rep" / report.JSON_FILE).exists()
    assert main(["report", str(tmp_path / "nowhere"), "--out", str(tmp_path / "rep2")]) == 2
    assert not (tmp_path / "rep2").exists()


def test_report_of_a_study(tmp_path):
    from interp.core.store import atomic_write_json

    study = {"name": "s", "model": "tiny-random-llama", "steps": 2, "seeds": [0, 1], "cells": [], "paired": [],
             "summary": [{"suite": "persona", "student": "unreg", "lam": 0.0, "seeds": [0, 1],
                          **{k: {"mean": 0.25, "sd": 0.05, "n": 2} for k in ("acc_noctx", "acc_ctx", "harm", "degenerate_ctx", "follow_cf", "ctx_drop", "truncated_ctx", "len_ratio", "drift")}},
                         {"suite": "persona", "student": "base", "lam": None, "seeds": [0, 1],
                          **{k: {"mean": 0.5, "sd": None, "n": 2} for k in ("acc_noctx", "acc_ctx", "harm", "degenerate_ctx", "follow_cf", "ctx_drop", "truncated_ctx", "len_ratio", "drift")}}]}
    atomic_write_json(tmp_path / "results" / "s" / "study.json", study)
    out = report.write_report([tmp_path / "results" / "s"], tmp_path / "rep", decode_tokens=False)
    page = (out / report.HTML_FILE).read_text()
    assert "Study s" in page and "0.25 ± 0.05" in page and "Removability frontier" in page
    assert "calibration" not in page.lower()  # no regime line for a study without one
    study["calibrated_by"] = {"from": "results/cal", "name": "cal<x>", "choice": "lr1e4", "passes": False,
                              "regime": {"lr": 1e-4, "temperature": 0.0}, "steps": 30}
    atomic_write_json(tmp_path / "results" / "s" / "study.json", study)
    page = (report.write_report([tmp_path / "results" / "s"], tmp_path / "rep2", decode_tokens=False) / report.HTML_FILE).read_text()
    assert ("Training regime chosen by the calibration <code>cal&lt;x&gt;</code> (results/cal): <code>lr1e4</code>, which "
            "<b>fails the gate</b>") in page and "lr = 0.0001, temperature = 0.0, 30 steps" in page


def test_report_on_a_bare_layers_folder(two_runs, tmp_path):
    out = report.write_report([two_runs[0] / "layers" / "reg"], tmp_path / "r", decode_tokens=False)
    data = json.loads((out / report.JSON_FILE).read_text())
    assert list(data["runs"]["reg"]["layers"]) == ["reg"]


def test_figures_show_the_numbers_of_the_layer_divergence():
    import numpy as np

    from interp.views import plots
    from interp.views.synthetic import synthetic_divergence

    divs = {"base": synthetic_divergence(seed=0), "reg": synthetic_divergence(seed=1)}
    fig = plots.layer_divergence(divs)
    assert len(fig.data) == 2 * 3
    assert np.allclose(fig.data[0].y, divs["base"].cos) and np.allclose(fig.data[5].y, divs["reg"].cka_debiased)
    assert np.allclose(plots.layer_divergence(divs, ["cka"], divergence=True).data[1].y, 1 - divs["reg"].cka)
    div = divs["reg"]
    idx = div.example_tokens(1)
    lens = plots.logit_lens(div, 1, decode=lambda i: f"t{i}")
    assert np.allclose(lens.data[0].z, div.lens_target_prob_noctx[:, idx], atol=1e-5)
    assert np.allclose(lens.data[1].z, div.lens_target_prob_ctx[:, idx], atol=1e-5)
    assert lens.data[1].customdata[0, 0][1] == f"t{div.lens_top1_ctx[0, idx[0]]}"
    assert np.allclose(plots.lens_kl(divs).data[0].y, divs["base"].layer_mean("lens_kl_noctx_ctx"))
    attn = plots.attention(div, pickable=True)
    assert np.allclose(attn.data[0].z, div.attn_ctx) and np.allclose(attn.data[1].z, div.attn_sink)
    assert np.allclose(plots.head_weights(div, 1, 2, 3).data[0].y, div.attn_ctx_tokens[1][1, 3])
    assert plots.format_value(0.12345) == "0.123" and plots.format_value(None) == "–"


def test_frontier_draws_a_setting_on_fewer_seeds_small():
    from interp.views import plots

    def row(model, seeds):
        return {"suite": "persona", "model": model, "budget": 96, "seeds": seeds, "health": {"verdict": "healthy", "loops": {"value": 0.0}},
                "card_effect": {"loops": {"value": 0.1, "ci": [0.0, 0.2]}},
                "follow_cf_clean": {"value": 0.5, "ci": [0.4, 0.6]}}

    study = {"name": "s", "budgets": [96], "settings": [row("base", [0, 1, 2]), row("unreg", [0, 1, 2]), row("lam1", [0])]}
    fig = plots.frontier_figure(study)
    sizes = {t.name: t.marker.size for t in fig.data if t.x and t.x[0] is not None}
    assert sizes == {"base": 13, "unreg": 13, "lam1": 8}
    assert "small: fewer seeds" in {t.name for t in fig.data}
    study["settings"] = study["settings"][:2]  # every setting on every seed: nothing small, no legend entry for it
    assert "small: fewer seeds" not in {t.name for t in plots.frontier_figure(study).data}
    # a study without counterfactuals (experience): empty panels that say why
    for r in study["settings"]:
        r["follow_cf_clean"] = None
    assert "No point to draw" in plots.frontier_figure(study).layout.annotations[-1].text
    assert not any("No point" in a.text for a in fig.layout.annotations)
    # a rebuilt figure is the same page byte for byte (a committed figure changes only with its data)
    page = plots.figure_html(plots.frontier_figure(study), "../plotly.min.js")
    assert page == plots.figure_html(plots.frontier_figure(study), "../plotly.min.js")
    assert page != plots.figure_html(fig, "../plotly.min.js")
