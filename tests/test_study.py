"""The study command on the tiny model: the grid, the results, resuming after a kill, and bad study files."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from interp.core.errors import UserError
from training.study import load_study

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "studies" / "smoke.toml"


def _study(runs, results, *extra, wait=True):
    cmd = [sys.executable, "-m", "training", "study", str(SMOKE), "--runs-dir", str(runs), "--results-dir", str(results), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if wait:
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)


def _summary(results):
    data = json.loads((results / "smoke" / "study.json").read_text())
    return data, (results / "smoke" / "study.csv").read_text()


def test_smoke_study_killed_and_resumed_ends_like_an_uninterrupted_one(tmp_path):
    whole = _study(tmp_path / "a" / "runs", tmp_path / "a" / "results")
    assert whole.returncode == 0, whole.stderr[-3000:]
    data, csv_whole = _summary(tmp_path / "a" / "results")
    cells = load_study(SMOKE).cells()
    assert len(data["cells"]) == len(cells) == 8  # 2 suites × 2 seeds × 2 students
    assert data["gate"]["cells"] == [8, 8] and data["gate"]["complete"] is True
    assert {(c["suite"], c["seed"], c["student"]) for c in data["cells"]} == {(c.suite, c.seed, c.student.name) for c in cells}
    for c in data["cells"]:
        assert set(c["scores"]) >= {"acc_noctx", "acc_ctx", "harm", "degenerate_ctx", "follow_cf", "drift", "truncated_ctx"}
    rows = {(r["suite"], r["student"]) for r in data["summary"]}
    assert rows == {(s, m) for s in ("persona", "facts") for m in ("unreg", "reg", "base", "teacher")}
    unreg = next(r for r in data["summary"] if r["suite"] == "persona" and r["student"] == "unreg")
    base, teacher = (next(r for r in data["summary"] if r["suite"] == "persona" and r["student"] == m) for m in ("base", "teacher"))
    for mine, bases in (("acc_noctx", "acc_ctx"), ("acc_ctx", "acc_ctx"), ("degenerate_noctx", "degenerate_ctx"),
                        ("follow_cf", "follow_cf")):  # the teacher is the base with the context, in both columns
        assert teacher[mine]["mean"] == base[bases]["mean"]
    assert teacher["harm"]["mean"] is None and teacher["ctx_drop"]["mean"] == 0
    per_seed = [c["scores"]["drift"] for c in data["cells"] if c["suite"] == "persona" and c["student"] == "unreg"]
    assert unreg["drift"]["mean"] == pytest.approx(sum(per_seed) / 2) and unreg["drift"]["n"] == 2
    assert len(data["paired"]) == 4 and all(p["vs"] == "unreg" for p in data["paired"])
    md = (tmp_path / "a" / "results" / "smoke" / "summary.md").read_text().splitlines()
    # the seed-level tables: every setting and the base per suite and budget, the comparisons, then the per-cell view
    assert data["budgets"] == [4, 8]
    assert {(r["suite"], r["model"], r["budget"]) for r in data["settings"]} == {
        (s, m, b) for s in ("persona", "facts") for m in ("base", "unreg", "reg") for b in (4, 8)}
    assert len(data["comparisons"]) == 2 * 3 and all(c["vs"] == "unreg" and "p_holm" in c for c in data["comparisons"])
    tables = [i for i, x in enumerate(md) if x.startswith("| suite |")]
    assert len(tables) == 4
    last = md[tables[-1]:]
    table_rows = [x for x in last if x.startswith("| persona |") or x.startswith("| facts |")]
    assert len(table_rows) == len(data["summary"])
    cols = last[0].strip("|").split("|")
    row = next(x for x in last if x.startswith("| persona | unreg |")).strip("|").split("|")
    drift_cell = row[[c.strip() for c in cols].index("`drift`")].strip()
    assert drift_cell == f"{unreg['drift']['mean']:.2f} ± {unreg['drift']['sd']:.2f}"
    from plotly.offline import get_plotlyjs

    folder = tmp_path / "a" / "results" / "smoke"
    html = (folder / "frontier.html").read_text()
    assert get_plotlyjs() not in html and "Removability frontier" in html  # one plotly.js beside the figures, not inlined
    # one plotly.js for every study of the results folder, and plotly's CDN (the same version) where it is missing
    from plotly.offline import get_plotlyjs_version

    cdn = f"https://cdn.plot.ly/plotly-{get_plotlyjs_version()}.min.js"  # written by the fallback only if Plotly is absent
    assert re.findall(r"<script[^>]*\bsrc\s*=\s*\"([^\"]+)\"", html) == ["../plotly.min.js", cdn]
    assert "window.Plotly || document.write(" in html
    assert (folder.parent / "plotly.min.js").read_text() == get_plotlyjs() and not (folder / "plotly.min.js").exists()
    # every number recomputable from the committed rows: 2 suites × 2 seeds × (base + 2 students) × 4 examples
    from interp.core.studies import read_study_rows

    rows = read_study_rows(folder / "rows.jsonl.gz")
    assert len(rows) == 2 * 2 * 3 * 4
    base_rows = [r for s, _, r in rows if s == "persona" and r.model == "base"]
    per_seed = [sum(r.correct_ctx for r in base_rows[i * 4:(i + 1) * 4]) / 4 for i in range(2)]
    base_row = next(r for r in data["settings"] if r["suite"] == "persona" and r["model"] == "base" and r["budget"] == 8)
    assert base_row["acc_ctx"]["value"] == pytest.approx(sum(per_seed) / 2)

    # the same study killed in the middle of its third cell, then run again
    runs, results = tmp_path / "b" / "runs", tmp_path / "b" / "results"
    proc = _study(runs, results, wait=False)
    third = runs / "smoke" / "persona" / "seed-0" / "reg" / "checkpoints"
    deadline = time.time() + 600
    while time.time() < deadline and not (third.exists() and any(third.iterdir())):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (runs / "smoke" / "persona" / "seed-1" / "reg" / "adapter_config.json").exists()
    again = _study(runs, results)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "done" in again.stdout  # the plan shows the finished cells it skips
    data_b, csv_b = _summary(results)
    assert csv_b == csv_whole
    # a resumed cell matches to float rounding (its weights to 1e-6), so its verdicts are the same and KLs agree closely
    for b, a in zip(data_b["cells"], data["cells"]):
        assert b["scores"].keys() == a["scores"].keys()
        for k, v in a["scores"].items():
            assert b["scores"][k] == (None if v is None else pytest.approx(v, rel=1e-5, abs=1e-7)), k

    # a third run finds nothing to do
    t0 = time.time()
    done = _study(runs, results)
    assert done.returncode == 0 and "8 cells (8 done)" in done.stdout
    assert time.time() - t0 < 120


def test_dry_run_prints_the_plan_and_trains_nothing(tmp_path):
    result = _study(tmp_path / "runs", tmp_path / "results", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "8 cells (0 done)" in result.stdout and "estimated time left" in result.stdout
    assert not (tmp_path / "runs").exists() and not (tmp_path / "results").exists()


BAD = [
    ("name = 'x'\nsuites = ['persona']\nseeds = [0]\nsteps = 1\ncolour = 'red'\n[[students]]\nname = 'a'\n", "unknown key 'colour'"),
    ("name = 'x'\nsuites = ['persona']\nseeds = [0]\nsteps = 1\n[[students]]\nlam = 1.0\n", "students[0] has no name"),
    ("name = 'x'\nsuites = ['nope']\nseeds = [0]\nsteps = 1\n[[students]]\nname = 'a'\n", "unknown suite 'nope'"),
    ("name = 'x'\nsuites = ['persona']\nseeds = [0]\nsteps = 1\n[[students]]\nname = 'a'\nlam = -1.0\n", "persona/seed-0/a: --lam must be ≥ 0"),
    ("name = 'x'\nsuites = ['persona']\nseeds = [0]\nsteps = 1\n[[students]]\nname = 'a'\nwings = 2\n", "students[0] (a): unknown setting 'wings'"),
    ("name = 'x'\nsuites = ['persona']\nseeds = [0]\nsteps = 1\n[train]\nstep = 3\n[[students]]\nname = 'a'\n", "train: unknown setting 'step'"),
    ("name = 'x'\nsuites = ['persona']\nseeds = [0]\n[[students]]\nname = 'a'\n", "missing key 'steps'"),
    ("name = 'x'\nsuites = ['persona']\nseeds = [0]\nsteps = 1\n[[students]]\nname = 'a'\n[[students]]\nname = 'a'\n", "two students are named 'a'"),
    ("name = 'x'\nsuites = ['persona']\nseeds = [0]\nsteps = 1\n[[students]]\nname = 'a.b'\n", "cannot be used"),
    ("name = 'x'\nsuites = ['persona']\nseeds = [0]\nsteps = 1\n[eval]\nmax_new_tokens = 0\n[[students]]\nname = 'a'\n", "eval: --max-new-tokens must be at least 1"),
    ("name = [1]\n", "missing key"),
    ("this is not toml = = =", "not valid TOML"),
]


@pytest.mark.parametrize("text,message", BAD)
def test_bad_study_files_are_one_line_errors_naming_the_file(tmp_path, text, message):
    path = tmp_path / "s.toml"
    path.write_text(text)
    with pytest.raises(UserError) as err:
        load_study(path)
    assert str(path) in str(err.value) and message in str(err.value) and "\n" not in str(err.value)


def test_results_of_another_study_are_refused(tmp_path):
    folder = tmp_path / "results" / "smoke"
    folder.mkdir(parents=True)
    (folder / "study.json").write_text(json.dumps({"name": "smoke", "model": "smollm2-135m-instruct"}))
    result = _study(tmp_path / "runs", tmp_path / "results")
    assert result.returncode == 2 and "holds the results of another study" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()


def test_cli_study_bad_file_exits_2(tmp_path):
    path = tmp_path / "s.toml"
    path.write_bytes(b"\xff\xfe\x00garbage")
    result = subprocess.run([sys.executable, "-m", "training", "study", str(path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is a dev dependency
    given = None

if given is not None:

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.binary(max_size=300))
    def test_study_reader_on_arbitrary_bytes(tmp_path, data):
        path = tmp_path / "any.toml"
        path.write_bytes(data)
        try:
            study = load_study(path)
        except UserError as err:
            assert "\n" not in str(err) and str(path) in str(err)
        else:  # bytes that happen to be a valid study
            assert study.cells()


def test_main_students_run_before_the_one_seed_settings():
    # A study cut short loses one-seed settings first, never a main student's seed (and suites in the file's order).
    study = load_study(ROOT / "studies" / "removability.toml")
    cells = study.cells()
    main = [c.student.seeds is None for c in cells]
    assert main == sorted(main, reverse=True) and any(main) and not all(main)
    assert len(cells) == len({(c.suite, c.seed, c.student.name) for c in cells})
    first = [c.suite for c in cells if c.student.seeds is None]
    assert first == sorted(first, key=study.suites.index)
    assert sum(main) == len(study.suites) * len(study.seeds) * sum(s.seeds is None for s in study.students)


def test_settings_on_more_seeds_run_before_those_on_fewer(tmp_path, monkeypatch):
    """The calibrated study's 3-seed λ values run before its one-seed anchors, on every suite: cut short, it loses
    the anchors first (the grid's "cut these first") and keeps the λ values' seeds."""
    monkeypatch.chdir(ROOT)  # its calibrated_by names the committed results/calibration_confirm
    study = load_study(ROOT / "studies" / "removability_calibrated.toml", tmp_path / "runs", tmp_path / "results")
    cells = study.cells()
    widths = [len(c.student.seeds or study.seeds) for c in cells]
    assert widths == sorted(widths, reverse=True) and set(widths) == {5, 3, 1}
    three = [(c.suite, c.seed) for c in cells if len(c.student.seeds or ()) == 3]
    assert three == sorted(three, key=lambda k: (study.suites.index(k[0]), k[1]))  # suite by suite, seed by seed


def _small_study(path: Path, steps: int, reg_lam: float = 1.0) -> Path:
    path.write_text(f"name = 'grow'\nmodel = 'tiny-random-llama'\nsuites = ['persona']\nseeds = [0]\nsteps = {steps}\n"
                    "[train]\nbatch_size = 2\nmax_new_tokens = 8\ncheckpoint_every = 1\nlr = 1e-2\n"
                    "[eval]\nn_test = 4\nmax_new_tokens = 8\n"
                    f"[[students]]\nname = 'unreg'\nlam = 0.0\n[[students]]\nname = 'reg'\nlam = {reg_lam}\n")
    return path


def test_raising_a_studys_steps_continues_its_cells_like_a_longer_study(tmp_path):
    """steps 2 → 3: each cell resumes at its step-2 checkpoint (no retraining), its old adapter and evaluation are not
    reused, and the result equals a study run with 3 steps from the start (the lr schedule ignores --steps)."""
    from safetensors.torch import load_file

    from training.evaluate import fingerprint
    from training.study import run_cell, run_study
    from training.study.results import _paired

    grown = _small_study(tmp_path / "grow.toml", steps=2)
    run_study(load_study(grown, tmp_path / "a" / "runs", tmp_path / "a" / "results"), progress=False)
    _small_study(grown, steps=3)
    study = load_study(grown, tmp_path / "a" / "runs", tmp_path / "a" / "results")
    assert [c.trained_steps() for c in study.cells()] == [2, 2] and not any(c.trained() for c in study.cells())
    first_lines = {c.student.name: (c.out / "metrics.jsonl").read_text().splitlines() for c in study.cells()}
    run_cell(study.cells()[1])  # `reg` grown first: no pairing with `unreg`'s evaluation of step 2
    assert study.cells()[1].evaluation() is not None and _paired(study) == []
    grown_data = run_study(study, progress=False)
    fresh = load_study(_small_study(tmp_path / "fresh.toml", steps=3), tmp_path / "b" / "runs", tmp_path / "b" / "results")
    fresh_data = run_study(fresh, progress=False)
    for g, f in zip(study.cells(), fresh.cells()):
        lines = (g.out / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == 3 and lines[:2] == first_lines[g.student.name]  # steps 1–2 kept, step 3 added
        assert g.trained() and g.evaluation().settings["adapter"] == fingerprint(g.out)
        assert json.loads((g.out / "train_config.json").read_text())["steps"] == 3
        mine, theirs = load_file(g.out / "adapter_model.safetensors"), load_file(f.out / "adapter_model.safetensors")
        assert mine.keys() == theirs.keys() and all(torch.allclose(mine[k], theirs[k], atol=1e-6) for k in mine)
    assert [c["scores"] for c in grown_data["cells"]] == [c["scores"] for c in fresh_data["cells"]]
    assert len(grown_data["paired"]) == 1 and grown_data["paired"] == fresh_data["paired"]


def test_a_cell_trained_with_other_settings_is_refused_before_anything_trains(tmp_path):
    from training.study import plan, run_study

    path = _small_study(tmp_path / "s.toml", steps=2)
    run_study(load_study(path, tmp_path / "runs", tmp_path / "results"), progress=False)
    out = tmp_path / "runs" / "grow" / "persona" / "seed-0"
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    # the results folder would refuse the changed study first (tests/test_trust.py): here the cells must refuse it
    shutil.rmtree(tmp_path / "results")
    for steps, lam, message in ((2, 0.5, "grow/persona/seed-0/reg"), (1, 1.0, "has trained 2 steps, more than the study's steps=1")):
        _small_study(path, steps=steps, reg_lam=lam)
        study = load_study(path, tmp_path / "runs", tmp_path / "results")
        for call in (lambda s: run_study(s, progress=False), plan):
            with pytest.raises(UserError) as err:
                call(study)
            text = str(err.value)
            assert str(path) in text and message in text and "\n" not in text
    assert "was trained with lam=1.0, the study now says lam=0.5" in _refusal(path, tmp_path, lam=0.5)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before  # nothing touched


def _refusal(path: Path, tmp_path: Path, lam: float) -> str:
    result = subprocess.run([sys.executable, "-m", "training", "study", str(_small_study(path, steps=2, reg_lam=lam)),
                             "--runs-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path / "results")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result.stderr


def test_the_estimate_prices_each_step_at_the_lambda_it_trains_with(tmp_path):
    """A warm-up step (λ = 0) costs an unregularized step; only the steps with λ > 0 pay the anchor's forward."""
    from training.study.plan import COST, estimate

    study = load_study(ROOT / "studies" / "removability_calibrated.toml", tmp_path / "runs", tmp_path / "results")
    unreg, reg, per_eval = COST[study.model]
    cells = {c.student.name: c for c in study.cells() if c.suite == "persona_luna" and c.seed == 0}
    for c in cells.values():
        cfg = c.config()
        assert (cfg.max_new_tokens, cfg.batch_size, cfg.grad_accum) == (96, 8, 1)
        with_lam = study.steps - cfg.lam_warmup if cfg.lam > 0 else 0
        assert estimate(study, [c]) == pytest.approx((study.steps - with_lam) * unreg + with_lam * reg + per_eval)
    # by hand: 30 steps; reg_w03 has λ = 0 for its first 15 (the ramp's steps have λ > 0), lam1 none
    assert estimate(study, [cells["unreg"]]) == pytest.approx(30 * 42.0 + 286.0)
    assert estimate(study, [cells["reg_w03"]]) == pytest.approx(15 * 42.0 + 15 * 54.0 + 286.0)
    assert estimate(study, [cells["lam1"]]) == pytest.approx(30 * 54.0 + 286.0)


def test_a_study_started_on_a_busy_machine_says_so(monkeypatch):
    """Cells beside another study oversubscribe the cores: a study that starts while the 1-minute load is at least
    half the usable cores says so in one line, and says nothing on a quiet machine."""
    from training.study import runner

    monkeypatch.setattr(runner.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(runner.os, "getloadavg", lambda: (1.9, 1.0, 0.5))
    note = runner.busy_note()
    assert note is not None and "load 1.9 on 2 cores" in note and "\n" not in note
    assert runner.usable_cores() == 2
    monkeypatch.setattr(runner.os, "getloadavg", lambda: (0.4, 1.0, 0.5))
    assert runner.busy_note() is None
    assert runner.busy_note(cores=16) is None
    monkeypatch.setattr(runner.os, "getloadavg", lambda: (8.0, 8.0, 8.0))
    assert "load 8.0 on 16 cores" in runner.busy_note(cores=16)
