"""Cell records: a study resumes on a fresh machine from its committed results/<study>/cells/ (tiny model)."""

import gzip
import json
import shutil
from pathlib import Path

import pytest

from interp.core.errors import UserError
from training.study import load_study, plan, run_study
from training.study.records import read_record


def _study_file(path: Path, reg_lam: float = 1.0, eval_tokens: int = 8) -> Path:
    path.write_text("name = 'carry'\nmodel = 'tiny-random-llama'\nsuites = ['persona']\nseeds = [0]\nsteps = 2\n"
                    "[train]\nbatch_size = 2\nmax_new_tokens = 8\ncheckpoint_every = 1\nlr = 1e-2\n"
                    f"[eval]\nn_test = 4\nmax_new_tokens = {eval_tokens}\n"
                    f"[[students]]\nname = 'unreg'\nlam = 0.0\n[[students]]\nname = 'reg'\nlam = {reg_lam}\n")
    return path


def _results(folder: Path) -> tuple[dict, bytes]:
    data = json.loads((folder / "study.json").read_text())
    return data, (folder / "rows.jsonl.gz").read_bytes()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One study run to the end; its run folders are then deleted, as on a fresh checkout of committed results."""
    tmp = tmp_path_factory.mktemp("carry")
    path = _study_file(tmp / "carry.toml")
    run_study(load_study(path, tmp / "runs", tmp / "results"), progress=False)
    shutil.rmtree(tmp / "runs")
    return path, tmp / "results"


def _copy(results: Path, to: Path) -> Path:
    shutil.copytree(results, to)
    return to


def test_records_are_written_per_cell_and_byte_reproducible(finished):
    path, results = finished
    cells = results / "carry" / "cells" / "persona" / "seed-0"
    assert sorted(p.name for p in cells.iterdir()) == ["base.json.gz", "reg.json.gz", "unreg.json.gz"]
    raw = gzip.decompress((cells / "reg.json.gz").read_bytes())
    record = json.loads(raw)
    assert record["model"] == "reg" and record["config"]["lam"] == 1.0 and record["config"]["steps"] == 2
    assert record["run"]["task"] == "persona" and record["run"]["seed"] == 0
    assert len(record["eval"]["rows"]) == 4 and len(record["eval"]["settings"]["adapter"]) == 16
    study_json = json.loads((results / "carry" / "study.json").read_text())
    reg = next(c for c in study_json["cells"] if c["student"] == "reg")
    assert reg["scores"] == pytest.approx(record["eval"]["scores"], nan_ok=True)
    assert gzip.decompress((cells / "reg.json.gz").read_bytes())[:1] == b"{" and (cells / "reg.json.gz").read_bytes()[4:8] == b"\0\0\0\0"


def test_a_study_on_a_fresh_machine_trains_nothing_recorded_and_writes_the_same_results(finished, tmp_path):
    path, results = finished
    moved = _copy(results, tmp_path / "results")
    before = {p: p.read_bytes() for p in (moved / "carry").rglob("*") if p.is_file()}
    study = load_study(path, tmp_path / "runs", moved)
    text = plan(study)
    assert "2 cells (2 done)" in text and text.count("recorded") == 2
    data = run_study(study, progress=False)
    assert not (tmp_path / "runs").exists()  # nothing trained, nothing answered
    assert data["gate"]["cells"] == [2, 2]
    after = {p: p.read_bytes() for p in (moved / "carry").rglob("*") if p.is_file()}
    assert after == before  # study.json, the rows, the records: the same bytes


def test_a_missing_record_trains_only_its_cell_and_the_base_is_not_answered_again(finished, tmp_path, monkeypatch):
    import training.evaluate as ev

    path, results = finished
    moved = _copy(results, tmp_path / "results")
    (moved / "carry" / "cells" / "persona" / "seed-0" / "reg.json.gz").unlink()
    original, _ = _results(results / "carry")
    answered = []
    real = ev.answer

    def counting(m, examples, placement, name, **kw):
        answered.append(name)
        return real(m, examples, placement, name, **kw)

    monkeypatch.setattr(ev, "answer", counting)
    data = run_study(load_study(path, tmp_path / "runs", moved), progress=False)
    assert answered == ["reg"]  # the base came back from its record, unreg was not trained or answered
    run = tmp_path / "runs" / "carry" / "persona" / "seed-0"
    assert (run / "reg" / "adapter_model.safetensors").exists() and not (run / "unreg").exists()
    for mine, theirs in zip(data["cells"], original["cells"]):  # training is deterministic: the same numbers
        assert mine["student"] == theirs["student"]
        for k, v in theirs["scores"].items():
            assert mine["scores"][k] == (None if v is None else pytest.approx(v, rel=1e-5, abs=1e-7)), k
    assert read_record(moved / "carry" / "cells" / "persona" / "seed-0" / "reg.json.gz")["model"] == "reg"


def test_a_record_made_with_other_settings_is_refused_in_one_line_and_nothing_is_written(finished, tmp_path):
    path, results = finished
    moved = _copy(results, tmp_path / "results")
    before = {p: p.read_bytes() for p in moved.rglob("*") if p.is_file()}
    changed = _study_file(tmp_path / "carry.toml", reg_lam=0.5)
    # the results folder itself refuses a student whose settings changed; without study.json the record must
    (moved / "carry" / "study.json").unlink()
    before.pop(moved / "carry" / "study.json")
    for call in (lambda s: run_study(s, progress=False), plan):
        with pytest.raises(UserError) as err:
            call(load_study(changed, tmp_path / "runs", moved))
        text = str(err.value)
        assert ": persona/seed-0/reg is recorded in" in text and "lam=1.0, the study now says lam=0.5" in text
        assert "\n" not in text
    assert {p: p.read_bytes() for p in moved.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "runs").exists()


def test_a_record_of_other_evaluation_settings_does_not_count_as_done(finished, tmp_path):
    path, results = finished
    moved = _copy(results, tmp_path / "results")
    study = load_study(_study_file(tmp_path / "carry.toml", eval_tokens=6), tmp_path / "runs", moved)
    assert not any(c.trained() or c.evaluated() for c in study.cells())
    assert study.base_evaluation("persona", 0) is None


@pytest.mark.parametrize("content", [b"", b"not gzip", gzip.compress(b"[1, 2]", mtime=0), gzip.compress(b'{"model": "reg", "run": {}}', mtime=0)],
                         ids=["empty", "not-gzip", "a-list", "no-config"])
def test_a_damaged_record_is_a_one_line_error(finished, tmp_path, content):
    path, results = finished
    moved = _copy(results, tmp_path / "results")
    (moved / "carry" / "cells" / "persona" / "seed-0" / "reg.json.gz").write_bytes(content)
    with pytest.raises(UserError) as err:
        plan(load_study(path, tmp_path / "runs", moved))
    assert "reg.json.gz" in str(err.value) and "\n" not in str(err.value)


def test_a_record_of_fewer_steps_than_the_study_now_asks_is_not_done(finished, tmp_path):
    path, results = finished
    moved = _copy(results, tmp_path / "results")
    text = path.read_text().replace("steps = 2", "steps = 3")
    study = load_study(_write(tmp_path / "carry.toml", text), tmp_path / "runs", moved)
    assert [c.trained_steps() for c in study.cells()] == [0, 0] and not any(c.evaluated() for c in study.cells())


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_a_jobs_2_study_ends_like_a_jobs_1_study(finished, tmp_path):
    path, results = finished
    original, rows = _results(results / "carry")
    data = run_study(load_study(path, tmp_path / "runs", tmp_path / "results"), jobs=2, progress=False)
    times = json.loads((tmp_path / "results" / "carry" / "cell_times.json").read_text())
    assert sorted(times) == ["persona/seed-0/reg", "persona/seed-0/unreg"]
    assert all(t["seconds"] > 0 and t["estimate"] > 0 and t["jobs"] == 2 and t["device"] == "cpu" for t in times.values())
    assert [c["student"] for c in data["cells"]] == [c["student"] for c in original["cells"]]
    for mine, theirs in zip(data["cells"], original["cells"]):
        for k, v in theirs["scores"].items():
            assert mine["scores"][k] == (None if v is None else pytest.approx(v, rel=1e-5, abs=1e-7)), k


def test_hours_starts_no_cell_that_would_not_end_in_time_and_the_next_run_goes_on(finished, tmp_path, capsys):
    from training.study.runner import Budget

    path, _ = finished
    study = load_study(path, tmp_path / "runs", tmp_path / "results")
    first = Budget(study, 1.0).estimate(study.cells()[0])
    assert first > 0
    # a budget that holds the first cell's estimate and not two: one cell runs (the second's estimate is then
    # scaled by how long the first really took), the other is left
    data = run_study(study, hours=1.5 * first / 3600)
    assert data["gate"]["cells"] == [1, 2] and [c["student"] for c in data["cells"]] == ["unreg"]
    times = json.loads((tmp_path / "results" / "carry" / "cell_times.json").read_text())
    assert list(times) == ["persona/seed-0/unreg"] and times["persona/seed-0/unreg"]["jobs"] == 1
    out = capsys.readouterr().out
    assert "1 cell(s) left for the next run" in out and "--hours" in out
    # nothing fits: nothing starts, the results are written all the same
    again = run_study(load_study(path, tmp_path / "runs", tmp_path / "results"), hours=1e-9, progress=False)
    assert again["gate"]["cells"] == [1, 2] and not (tmp_path / "runs" / "carry" / "persona" / "seed-0" / "reg").exists()
    done = run_study(load_study(path, tmp_path / "runs", tmp_path / "results"), progress=False)
    assert done["gate"]["cells"] == [2, 2]
    with pytest.raises(UserError, match="--hours must be a positive number"):
        run_study(study, hours=0.0)


def test_cli_bad_hours_exits_2_in_one_line(finished, tmp_path):
    import subprocess
    import sys

    path, _ = finished
    for value in ("0", "-1", "nan"):
        r = subprocess.run([sys.executable, "-m", "training", "study", str(path), "--hours", value, "--runs-dir",
                            str(tmp_path / "runs"), "--results-dir", str(tmp_path / "results")], capture_output=True, text=True)
        assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "--hours must be a positive number" in r.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "results").exists()
