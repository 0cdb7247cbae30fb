"""The calibration gate: healthy and absorbing on every suite, the healthiest passing setting chosen (rule written here);
and a study trained in the regime a calibration chose (`calibrated_by`)."""

import json
import re

import pytest

from interp.core.errors import UserError
from training.study import load_study
from training.study.calibration import choose, markdown, verdicts


def _row(suite, model, excess, acc_noctx, acc_ctx=None, margin=0.05):
    health = {"loops": {"value": excess, "ci": [excess - 0.1, excess + 0.1]},
              "verdict": "unhealthy" if excess > margin else "healthy"}
    return {"suite": suite, "model": model, "budget": 96, "seeds": [100, 101], "health": health,
            "acc_noctx": {"value": acc_noctx}, "acc_ctx": {"value": acc_ctx}}


def _data(rows):
    base = [{"suite": s, "model": "base", "budget": 96, "seeds": [100, 101], "acc_ctx": {"value": 0.8},
             "acc_noctx": {"value": 0.0}, "health": None} for s in ("a", "b")]
    short = [{**r, "budget": 32} for r in rows]  # another budget: ignored
    return {"role": "calibration", "suites": ["a", "b"], "eval": {"max_new_tokens": 96}, "settings": base + rows + short}


def test_the_healthiest_setting_that_absorbs_on_every_suite_is_chosen():
    data = _data([
        _row("a", "lr1", 0.01, 0.5), _row("b", "lr1", 0.04, 0.45),   # passes, worst excess 0.04
        _row("a", "lr2", 0.00, 0.6), _row("b", "lr2", 0.02, 0.41),   # passes, worst excess 0.02: chosen
        _row("a", "lr3", -0.05, 0.39), _row("b", "lr3", -0.05, 0.9),  # healthiest, but absorbs too little on a (0.39 < 0.4)
        _row("a", "lr4", 0.30, 0.9), _row("b", "lr4", 0.0, 0.9),      # unhealthy on a
    ])
    pick, ok, vs = choose(data)
    assert (pick, ok) == ("lr2", True)
    by = {(v.student, v.suite): v for v in vs}
    assert len(vs) == 8 and not by[("lr3", "a")].absorbs and by[("lr3", "b")].absorbs
    assert not by[("lr4", "a")].healthy and by[("lr4", "b")].healthy
    assert "Chosen: **lr2**" in markdown(data)


def test_when_nothing_passes_the_healthiest_is_named_as_failing():
    data = _data([_row("a", "x", 0.2, 0.1), _row("b", "x", 0.3, 0.9), _row("a", "y", 0.1, 0.1), _row("b", "y", 0.4, 0.9)])
    pick, ok, _ = choose(data)
    assert (pick, ok) == ("x", False)  # worst-suite excess 0.3 against 0.4
    assert "No setting passes the gate" in markdown(data)


def test_a_calibrated_study_reports_the_gate_and_chooses_nothing():
    """A main study (`calibrated_by`) runs in its calibration's regime: its summary lists who passes the gate, and
    never says that a main study will run at one of its own settings."""
    rows = [_row("a", "lr1", 0.01, 0.5), _row("b", "lr1", 0.04, 0.45), _row("a", "lr2", 0.00, 0.6),
            _row("b", "lr2", 0.02, 0.41), _row("a", "lr4", 0.30, 0.9), _row("b", "lr4", 0.0, 0.9)]
    main = {**_data(rows), "role": "study", "calibrated_by": {"name": "cal", "choice": "fkl", "passes": False}}
    text = markdown(main)
    assert "Healthy and absorbing on every suite: **lr2**, **lr1**." in text
    assert "Chosen" not in text and "main study runs at" not in text
    failing = {**_data([_row("a", "x", 0.2, 0.1), _row("b", "x", 0.3, 0.9)]), "role": "study", "calibrated_by": {"name": "cal"},
               "gate": {"complete": False, "cells": [2, 60]}}
    text = markdown(failing)
    assert "Healthy and absorbing on every suite: **none**." in text and "**Partial: 2 of 60 cells evaluated.**" in text
    assert "refuses a partial calibration" not in text and "No setting passes" not in text


def test_only_a_calibration_chooses():
    """A study that is not a calibration (no `role = "calibration"`: the experience study, say) reports who passes
    the gate and chooses nothing, even without `calibrated_by`; and its results folder cannot calibrate a study."""
    rows = [_row("a", "lr1", 0.01, 0.5), _row("b", "lr1", 0.04, 0.45)]
    for data in ({**_data(rows), "role": "study"}, {k: v for k, v in _data(rows).items() if k != "role"}):
        text = markdown(data)
        assert "Healthy and absorbing on every suite: **lr1**. This study is not a calibration" in text
        assert "Chosen" not in text and "main study runs at" not in text


def test_a_setting_missing_a_suite_does_not_pass():
    data = _data([_row("a", "x", 0.0, 0.9)])
    assert choose(data)[:2] == ("x", False)
    assert verdicts({"suites": [], "eval": {"max_new_tokens": 96}, "settings": []}) == []


# ---- a study trained in the regime a calibration chose (`calibrated_by`) ----

def _calibration(folder, choice="lr2_mask", passes=True, model="tiny-random-llama", cells=(4, 4)):
    folder.mkdir(parents=True, exist_ok=True)
    data = {"name": "cal", "role": "calibration", "model": model, "steps": 7, "train": {"batch_size": 2, "max_new_tokens": 8, "no_context": "neutral"},
            "students": [{"name": "lr1", "settings": {"lr": 1e-4}, "seeds": None},
                         {"name": "lr2_mask", "settings": {"lr": 2e-4, "loop_mask": True}, "seeds": None}],
            "gate": {"choice": choice, "passes": passes, "absorb_share": 0.5, "cells": list(cells),
                     "complete": cells[0] == cells[1]}}
    (folder / "study.json").write_text(json.dumps(data))
    return folder


def _main(tmp_path, cal, extra="", student="", steps=""):
    path = tmp_path / "main.toml"
    path.write_text(f'name = "main"\nmodel = "tiny-random-llama"\nsuites = ["facts", {{suite = "persona", no_context = "default"}}]\n'
                    f'seeds = [0]\n{steps}calibrated_by = "{cal}"\n[train]\ncheckpoint_every = 3\n{extra}\n[eval]\nn_test = 4\n'
                    f'max_new_tokens = 8\n[[students]]\nname = "unreg"\n{student}\n[[students]]\nname = "reg"\nlam = 0.1\n')
    return path


def test_a_calibrated_study_trains_in_the_chosen_regime(tmp_path):
    cal = _calibration(tmp_path / "results" / "cal")
    study = load_study(_main(tmp_path, cal), tmp_path / "runs", tmp_path / "out")
    assert study.steps == 7 and study.calibration["choice"] == "lr2_mask" and study.calibration["passes"]
    by = {(c.suite, c.student.name): c.config() for c in study.cells()}
    for cfg in by.values():  # the chosen student's settings over the calibration's [train], the study's own added
        assert (cfg.lr, cfg.loop_mask, cfg.batch_size, cfg.max_new_tokens, cfg.steps, cfg.checkpoint_every) == (2e-4, True, 2, 8, 7, 3)
    assert by[("facts", "unreg")].no_context == "neutral" and by[("persona", "unreg")].no_context == "default"  # a suite departs
    assert by[("facts", "reg")].lam == 0.1 and by[("facts", "unreg")].lam == 0.0


@pytest.mark.parametrize("extra, student, steps, says", [
    ("lr = 3e-4", "", "", "[train] lr = 0.0003 contradicts the calibrated regime (lr = 0.0002"),
    ("", "loop_mask = false", "", "student 'unreg' sets loop_mask = False, which the calibration fixes"),
    ("", "", "steps = 9\n", "steps = 9 contradicts the calibrated regime (steps = 7)"),
])
def test_contradicting_the_calibration_is_refused(tmp_path, extra, student, steps, says):
    cal = _calibration(tmp_path / "cal")
    with pytest.raises(UserError, match=re.escape(says)):
        load_study(_main(tmp_path, cal, extra, student, steps))


def test_a_calibration_without_results_or_choice_or_of_another_model_is_one_line(tmp_path):
    with pytest.raises(UserError, match="does not exist; run the calibration study first"):
        load_study(_main(tmp_path, tmp_path / "nowhere"))
    with pytest.raises(UserError, match="no chosen setting yet"):
        load_study(_main(tmp_path, _calibration(tmp_path / "a", choice=None)))
    with pytest.raises(UserError, match="the calibration trained 'other'"):
        load_study(_main(tmp_path, _calibration(tmp_path / "b", model="other")))
    for role, says in (("study", "role = 'study'"), (None, "no role: written before studies declared one")):
        folder = _calibration(tmp_path / f"r{role}")
        data = json.loads((folder / "study.json").read_text())
        data.pop("role") if role is None else data.update(role=role)
        (folder / "study.json").write_text(json.dumps(data))
        with pytest.raises(UserError, match=re.escape(f"is not a calibration's results ({says}); name the results")):
            load_study(_main(tmp_path, folder))


def test_a_role_is_calibration_or_study(tmp_path):
    path = tmp_path / "s.toml"
    for role, ok in (('"calibration"', True), ('"study"', True), ('"main"', False), ("true", False)):
        path.write_text(f'name = "s"\nmodel = "tiny-random-llama"\nrole = {role}\nsuites = ["facts"]\nseeds = [0]\n'
                        f'steps = 2\n[[students]]\nname = "a"\n')
        if ok:
            assert load_study(path).role == role.strip('"')
        else:
            with pytest.raises(UserError, match="'role' must be \"calibration\""):
                load_study(path)


def test_a_partial_calibration_is_refused_and_marked(tmp_path):
    """A calibration cut short (a session ended, a cell failed) has a choice in study.json, but one that can change:
    the main study refuses it, and its summary says it is partial."""
    with pytest.raises(UserError, match=r"is a partial calibration \(3 of 12 cells evaluated\); finish"):
        load_study(_main(tmp_path, _calibration(tmp_path / "p", cells=(3, 12))))
    old = _calibration(tmp_path / "old")  # a study.json written before the gate recorded its completeness
    data = json.loads((old / "study.json").read_text())
    del data["gate"]["complete"], data["gate"]["cells"]
    (old / "study.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match="it does not say that every cell was evaluated"):
        load_study(_main(tmp_path, old))
    table = _data([_row("a", "x", 0.0, 0.9), _row("b", "x", 0.0, 0.9)])
    assert "Partial" not in markdown(table)
    table["gate"] = {"cells": [2, 8], "complete": False}
    assert "**Partial: 2 of 8 cells evaluated.**" in markdown(table)


def test_the_summary_names_the_calibration_and_its_verdict():
    from training.study.results import markdown as study_markdown

    data = {"settings": [], "budgets": [96], "eval": {"max_new_tokens": 96}, "summary": [],
            "calibrated_by": {"from": "results/cal", "name": "cal", "choice": "lr1", "passes": False,
                              "regime": {"lr": 1e-4}, "steps": 30}}
    text = study_markdown(data)
    assert "calibration `cal` (results/cal): `lr1`, which **fails the gate**" in text and "lr = 0.0001, 30 steps" in text


def test_the_committed_calibrated_study_loads_once_its_calibration_has_chosen(tmp_path, monkeypatch):
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "studies" / "removability_calibrated.toml"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="run the calibration study first"):
        load_study(path)
    cal = _calibration(tmp_path / "results" / "calibration_confirm", model="smollm2-135m-instruct")
    data = json.loads((cal / "study.json").read_text())
    data["train"] = {"batch_size": 8, "max_new_tokens": 96, "no_context": "neutral", "checkpoint_every": 5}
    (cal / "study.json").write_text(json.dumps(data))
    study = load_study(path)
    cells = study.cells()
    assert len(cells) == 3 * 5 * 2 + 3 * 3 * 2 + 3 * 4
    assert {c.config().no_context for c in cells if c.suite == "persona"} == {"default"}
    assert {(c.config().lr, c.config().loop_mask) for c in cells} == {(2e-4, True)}


def test_the_confirming_calibration_reads_only_cells_no_screening_saw():
    """Round 3's gate: seeds disjoint from the screening rounds' (100) and from the main study's, every suite the
    main study calibrates on, and the regime fields the main study would take from its choice all valid."""
    from pathlib import Path

    studies = Path(__file__).resolve().parents[1] / "studies"
    confirm = load_study(studies / "calibration_confirm.toml")
    screening = {*load_study(studies / "calibration.toml").seeds, *load_study(studies / "calibration_fkl.toml").seeds}
    assert not set(confirm.seeds) & {100}
    assert set(load_study(studies / "calibration_fkl.toml").seeds) == {100} and 100 in screening
    import tomllib

    main_seeds = set(tomllib.loads((studies / "removability_calibrated.toml").read_text())["seeds"])
    assert main_seeds == {0, 1, 2, 3, 4}
    assert not set(confirm.seeds) & main_seeds
    assert set(confirm.suites) == {"persona_luna", "facts"}
    cells = confirm.cells()
    assert len(cells) == len(confirm.students) * 4
    assert cells[-1].student.name == "rkl"  # the reference runs last: a session cut short loses it first
    assert all(c.config().max_new_tokens == 96 and c.config().steps == 30 for c in cells)


def test_every_committed_result_records_its_study_files_role():
    """A committed results/<study>/study.json says the role its study file declares (a calibration's results written
    before roles existed would be refused by `calibrated_by`, and would read as a study's)."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    checked = 0
    for toml in sorted((root / "studies").glob("*.toml")):
        data = tomllib.loads(toml.read_text())
        result = root / "results" / data.get("name", toml.stem) / "study.json"
        if result.exists():
            assert json.loads(result.read_text()).get("role", "study") == data.get("role", "study"), toml.name
            checked += 1
    assert checked >= 4
