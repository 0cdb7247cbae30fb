"""The calibration gate: healthy and absorbing on every suite, the healthiest passing setting chosen (rule written here)."""

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
    return {"suites": ["a", "b"], "eval": {"max_new_tokens": 96}, "settings": base + rows + short}


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


def test_a_setting_missing_a_suite_does_not_pass():
    data = _data([_row("a", "x", 0.0, 0.9)])
    assert choose(data)[:2] == ("x", False)
    assert verdicts({"suites": [], "eval": {"max_new_tokens": 96}, "settings": []}) == []
