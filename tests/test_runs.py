"""Run folders: discovery, reading, damage per run (on interp.views.synthetic's made-up run)."""

from __future__ import annotations


import pytest

from interp import divergence
from interp.core import runs
from interp.views import tables
from interp.core.errors import UserError
from interp.views.synthetic import write_synthetic_run

@pytest.fixture
def run_dir(tmp_path):
    return write_synthetic_run(tmp_path / "runs" / "facts")


def test_list_runs_reads_a_run(run_dir):
    (found,) = runs.list_runs(run_dir.parent)
    assert found.name == "facts" and found.task == "facts" and found.error is None
    assert found.students == ["unreg", "reg"]
    assert found.layer_models == ["base", "unreg", "reg"]
    assert found.has_eval and found.has_examples


def test_list_runs_empty_and_missing_root(tmp_path):
    assert runs.list_runs(tmp_path) == []
    assert runs.list_runs(tmp_path / "nowhere") == []


def test_eval_rows_in_model_order(run_dir):
    rows = tables.eval_rows(runs.load_eval(run_dir))
    assert [r["model"] for r in rows] == ["base", "teacher", "unreg", "reg"]
    assert set(runs.EVAL_METRICS) <= set(rows[0])


def test_examples_table_marks_flipped(run_dir):
    rows = tables.load_examples(run_dir)
    assert isinstance(rows[0]["correct_noctx"], bool)
    table = tables.example_table(rows)
    assert len(table) == 3
    assert table[0]["flipped_any"] and "unreg" in table[0]["flipped_models"]
    assert table[0]["unreg:noctx"] is True and table[0]["unreg:ctx"] is False


def test_example_responses(run_dir):
    answers = tables.example_responses(tables.load_examples(run_dir), "0")
    assert [a["model"] for a in answers] == ["base", "teacher", "unreg", "reg"]
    assert answers[2]["correct_noctx"] and not answers[2]["correct_ctx"]


def test_layers_roundtrip_and_example_match(run_dir):
    div = divergence.load_layers(run_dir, "unreg")
    assert div.num_layers == 4 and div.attn_ctx.shape == (3, 4)
    ex = div.examples[1]
    assert tables.match_example(div, ex["context"], ex["prompt"]) == 1
    assert tables.match_example(div, "other", "other", example="2") == 2
    assert tables.match_example(div, "other", "other", example=99) is None


def test_folders_being_written_are_not_models(run_dir):
    import shutil

    shutil.copytree(run_dir / "layers" / "reg", run_dir / "layers" / ".reg.tmp-abc")
    assert runs.layer_models(run_dir) == ["base", "unreg", "reg"]


def test_metrics_and_settings(run_dir):
    metrics = runs.load_all_metrics(run_dir)
    assert set(metrics) == {"unreg", "reg"} and len(metrics["reg"]) == 5
    # A half-written last line (training still running) is skipped, not an error.
    with (run_dir / "reg" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "lo')
    assert len(runs.load_metrics(run_dir, "reg")) == 5
    settings = runs.run_settings(run_dir)
    assert settings["run"]["task"] == "facts" and settings["students"]["reg"]["lam"] == 1.0


def test_run_still_training_shows_what_there_is(tmp_path):
    folder = write_synthetic_run(tmp_path / "r", with_layers=False, with_eval=False)
    (found,) = runs.list_runs(tmp_path)
    assert found.error is None and not found.has_eval and found.layer_models == []
    assert runs.load_eval(folder) is None and tables.load_examples(folder) is None


def test_damaged_run_is_an_error_for_that_run_only(tmp_path):
    write_synthetic_run(tmp_path / "good", with_layers=False)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "run.json").write_text("{not json")
    found = {r.name: r for r in runs.list_runs(tmp_path)}
    assert found["good"].error is None
    assert "damaged" in found["bad"].error and "run.json" in found["bad"].error


def test_damaged_files_raise_user_errors(run_dir):
    (run_dir / "eval.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="eval.json"):
        runs.load_eval(run_dir)
    (run_dir / "eval_examples.jsonl").write_text('{"model": "base"}\n')
    with pytest.raises(UserError, match="eval_examples.jsonl, line 1 is damaged"):
        tables.load_examples(run_dir)
    (run_dir / "eval_examples.jsonl").write_text("not json\n")
    with pytest.raises(UserError, match="line 1: not valid JSON"):
        tables.load_examples(run_dir)
    (run_dir / "layers" / "reg" / "arrays.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="damaged"):
        divergence.load_layers(run_dir, "reg")
