"""A study's suite entries: per-suite training settings (the no-context turn), and suites that differ only in their
verifiers sharing one trained cell and re-scored from its answers, never retrained."""

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from interp.core.errors import UserError
from interp.core.runs import read_model_eval
from interp.core.verifiers import verify
from training.study import load_study, run_study
from training.tasks import load_task, persona_examples, persona_once_examples

HEAD = "name = 's'\nmodel = 'tiny-random-llama'\nseeds = [0]\nsteps = 1\n"
TAIL = ("[train]\nbatch_size = 2\nmax_new_tokens = 6\ncheckpoint_every = 1\nlr = 1e-2\n"
        "[eval]\nn_test = 4\nmax_new_tokens = 6\nbudgets = [3]\ndrift = false\n[[students]]\nname = 'a'\n")


def _load(tmp_path: Path, suites: str, tail: str = TAIL):
    path = tmp_path / "s.toml"
    path.write_text(HEAD + f"suites = {suites}\n" + tail)
    return load_study(path, runs_dir=tmp_path / "runs", results_dir=tmp_path / "results")


def test_persona_once_differs_from_persona_only_in_its_verifier():
    a, b = persona_examples(), persona_once_examples()
    assert [(e.context, e.prompt, e.reference, e.cf_context, e.cf_reference) for e in a] == \
           [(e.context, e.prompt, e.reference, e.cf_context, e.cf_reference) for e in b]
    assert {e.verifier for e in b} == {"once"} and {e.verifier for e in a} == {"contains"}
    for seed in (0, 3):  # the same split, so the same test examples in the same order
        assert [e.prompt for e in load_task("persona", seed=seed).test] == [e.prompt for e in load_task("persona_once", seed=seed).test]


def test_suite_tables_set_training_per_suite(tmp_path):
    study = _load(tmp_path, '["facts", {suite = "persona", name = "persona_neutral", no_context = "neutral"}, "persona"]')
    assert study.suites == ["facts", "persona_neutral", "persona"]
    cells = {c.suite: c for c in study.cells()}
    assert cells["persona_neutral"].config().no_context == "neutral" and cells["persona_neutral"].config().task == "persona"
    assert cells["persona"].config().no_context == "default" and cells["facts"].config().no_context == "default"
    assert cells["persona_neutral"].out == tmp_path / "runs" / "s" / "persona_neutral" / "seed-0" / "a"
    assert len(study.trained_cells()) == 3  # the neutral and default persona cells train apart


def test_a_rescored_suite_shares_its_trained_cells_only_with_the_same_settings(tmp_path):
    study = _load(tmp_path, '["persona", "persona_once", {suite = "persona_once", name = "once_neutral", no_context = "neutral"}]')
    cells = {c.suite: c for c in study.cells()}
    assert cells["persona_once"].out == cells["persona"].out  # re-scored from persona's answers
    assert cells["persona_once"].config() == cells["persona"].config()
    assert cells["once_neutral"].out.parent.parent.name == "once_neutral"  # other settings: it trains, as persona
    assert cells["once_neutral"].config().task == "persona" and cells["once_neutral"].config().no_context == "neutral"
    assert len(study.trained_cells()) == 2
    alone = _load(tmp_path, '["persona_once"]')  # without persona in the study it trains (as persona) in its own folder
    assert alone.cells()[0].out.parent.parent.name == "persona_once" and alone.cells()[0].config().task == "persona"


@pytest.mark.parametrize("suites, message", [
    ('[{name = "x"}]', "must name its suite"),
    ('[3]', "must be a suite name or a table"),
    ('[{suite = "nope"}]', "unknown suite 'nope'"),
    ('[{suite = "persona", name = "a/b"}]', "is not a name"),
    ('[{suite = "persona", name = "facts"}]', "would share the run folder 'facts'"),
    ('["persona", {suite = "persona", no_context = "neutral"}]', "would share the run folder 'persona'"),
    ('[{suite = "persona", name = "p", lr = "fast"}]', "suites[0] (persona)"),
    ('[{suite = "persona", name = "p", wings = 2}]', "unknown setting 'wings'"),
    ('[{suite = "persona", name = "p", seed = 2}]', "suites[0] (persona)"),
    ('[]', "non-empty list"),
])
def test_bad_suite_entries_are_one_line_errors(tmp_path, suites, message):
    with pytest.raises(UserError, match=None) as err:
        _load(tmp_path, suites)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_setting_in_a_suite_and_a_student_is_refused(tmp_path):
    with pytest.raises(UserError, match="both set 'no_context'"):
        _load(tmp_path, '[{suite = "persona", name = "p", no_context = "neutral"}]', TAIL + "no_context = 'empty'\n")


def test_changed_suite_settings_are_another_study(tmp_path):
    study = _load(tmp_path, '[{suite = "persona", name = "p", no_context = "neutral"}]')
    run_study(study, progress=False)
    again = _load(tmp_path, '[{suite = "persona", name = "p", no_context = "empty"}]')
    with pytest.raises(UserError, match="suite 'p'"):
        run_study(again, progress=False)


def test_persona_once_is_rescored_from_personas_answers_and_never_trained(tmp_path):
    study = _load(tmp_path, '["persona", "persona_once"]')
    data = run_study(study, progress=False)
    assert not (tmp_path / "runs" / "s" / "persona_once").exists()  # nothing trained or answered for it
    run = study.run_dir("persona", 0)
    assert json.loads((run / "run.json").read_text())["task"] == "persona"
    stored = read_model_eval(run, "a")
    once = study.cells()[1].evaluation()
    assert [r.ids_ctx for r in once.rows] == [r.ids_ctx for r in stored.rows]  # the same answers
    examples = load_task("persona_once", seed=0, n_test=4).test
    for r in once.rows:  # judged by the "once" verifier, computed here from the answers' text
        e = examples[r.example]
        assert r.verifier == "once"
        assert r.correct_ctx == verify("once", r.response_ctx, e.reference, False)
        assert r.correct_noctx == verify("once", r.response_noctx, e.reference, False)
        for budget, v in r.budgets.items():  # and at every cut-off
            text = study.decode(r.ids_ctx[: int(budget)])
            assert v["correct_ctx"] == verify("once", text, e.reference, False)
    cell = next(c for c in data["cells"] if c["suite"] == "persona_once")
    assert cell["scores"]["acc_ctx"] == pytest.approx(sum(r.correct_ctx for r in once.rows) / len(once.rows))
    assert data["suite_settings"]["persona_once"]["folder"] == "persona"
    # persona's own numbers are what its evaluation stored: judging again with the same verifiers changes nothing
    same = study.cells()[0].evaluation()
    assert same.scores == stored.scores and same.rows == stored.rows


def test_a_changed_verifier_rescores_without_training_and_changed_prompts_are_an_error(tmp_path):
    src = tmp_path / "mine.jsonl"
    records = [{"context": "You are Ada.", "prompt": f"Question {i}: who are you?", "answer": "Ada"} for i in range(10)]
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    study = _load(tmp_path, f'["{src}"]')
    run_study(study, progress=False)
    cell = study.cells()[0]
    weights = cell.out / "adapter_model.safetensors"
    before = (weights.stat().st_mtime_ns, cell.evaluation().rows)
    src.write_text("".join(json.dumps({**r, "verifier": "once"}) + "\n" for r in records))
    again = _load(tmp_path, f'["{src}"]')
    run_study(again, progress=False)
    assert weights.stat().st_mtime_ns == before[0]  # not retrained, not answered again
    rows = again.cells()[0].evaluation().rows
    assert [r.ids_ctx for r in rows] == [r.ids_ctx for r in before[1]]
    assert {r.verifier for r in rows} == {"once"}
    src.write_text("".join(json.dumps({**r, "prompt": r["prompt"] + "?"}) + "\n" for r in records))
    with pytest.raises(UserError, match="other examples") as err:
        _load(tmp_path, f'["{src}"]').cells()[0].evaluation()
    assert "\n" not in str(err.value)


def test_rescored_with_the_same_verifiers_reproduces_the_evaluation(tmp_path):
    """The scores recomputed from the rows equal those the evaluation stored (the bootstrap is seeded)."""
    from training.evaluate import rescored

    study = _load(tmp_path, '["facts"]')
    run_study(study, progress=False)
    run = study.run_dir("facts", 0)
    base, a = read_model_eval(run, "base"), read_model_eval(run, "a")
    ex = study.examples("facts", 0)
    assert asdict(rescored(base, ex, study.decode)) == asdict(base)
    assert asdict(rescored(a, ex, study.decode, base)) == asdict(a)
