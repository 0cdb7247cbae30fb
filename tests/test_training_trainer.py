"""The loop on the tiny model: two students and an evaluation, resume equals uninterrupted, bad input, NaN stop."""

import json

import pytest
import torch
from safetensors.torch import load_file

from interp.core.errors import UserError
from interp.core.runs import EVAL_METRICS, read_examples
from training.evaluate import EvalSettings, evaluate_run
from training.rollout import both_sides, collate, response_logits, rollout
from training.data_order import batch_indices
from training.trainer import TrainConfig, TrainingError, checkpoints, train

TINY = dict(model="tiny-random-llama", task="persona", steps=2, batch_size=2, max_new_tokens=4, n_test=3, checkpoint_every=0, lr=1e-2)


def cfg(tmp_path, name="unreg", **kw):
    return TrainConfig(out=str(tmp_path / "run" / name), **{**TINY, **kw})


def test_rollout_positions_pick_the_logits_that_predict_response_tokens(tiny):
    from interp.core.pairs import render_prompt_pair
    from training.tasks import load_task

    task = load_task("persona")
    examples = task.train[:3]
    pps = [render_prompt_pair(tiny.tokenizer, e.context, e.prompt, "system") for e in examples]
    pairs = rollout(tiny, examples, pps, "system", max_new_tokens=3, temperature=1.0, seed=0)
    batch = collate(pairs, tiny.tokenizer.pad_token_id)
    with torch.no_grad():
        got = response_logits(tiny.model, batch.ctx)
        joint = response_logits(tiny.model, both_sides(batch.noctx, batch.ctx, tiny.tokenizer.pad_token_id))
        for b, pair in enumerate(pairs):
            full = tiny.model(input_ids=torch.tensor([pair.ctx_ids])).logits[0]
            pos = list(pair.measured("response", "ctx"))
            assert torch.allclose(got[b, : pair.response_len], full[pos], atol=1e-4)
            noctx = tiny.model(input_ids=torch.tensor([pair.noctx_ids])).logits[0][list(pair.measured("response", "noctx"))]
            assert torch.allclose(joint[b, : pair.response_len], noctx, atol=1e-4)
            assert torch.allclose(joint[len(pairs) + b, : pair.response_len], full[pos], atol=1e-4)


def test_batch_order_is_a_function_of_seed_and_step():
    first = [batch_indices(s, 10, 4, seed=1) for s in range(5)]
    assert first == [batch_indices(s, 10, 4, seed=1) for s in range(5)]
    assert sorted(first[0] + first[1] + first[2][:2]) == list(range(10))  # one epoch sees every example once
    # two processes split one global batch between them
    assert batch_indices(0, 10, 2, 1, rank=0, world=2) + batch_indices(0, 10, 2, 1, rank=1, world=2) == batch_indices(0, 10, 4, 1)


def test_pair_of_students_and_evaluation(tmp_path):
    train(cfg(tmp_path, "unreg"), progress=False)
    train(cfg(tmp_path, "reg", lam=1.0), progress=False)
    run = tmp_path / "run"
    assert json.loads((run / "run.json").read_text())["students"] == ["unreg", "reg"]
    for name in ("unreg", "reg"):
        folder = run / name
        assert (folder / "adapter_config.json").exists() and (folder / "adapter_model.safetensors").exists()
        lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
        assert [x["step"] for x in lines] == [1, 2]
        assert json.loads((folder / "train_config.json").read_text())["lam"] == (1.0 if name == "reg" else 0.0)
    reg_lines = [json.loads(x) for x in (run / "reg" / "metrics.jsonl").read_text().splitlines()]
    unreg_lines = [json.loads(x) for x in (run / "unreg" / "metrics.jsonl").read_text().splitlines()]
    # same seed and data order: the first step (adapter still zero) sees the same rollouts and the same L_opd,
    # and with the adapter at zero the anchor is the same no-context output, so L_cons equals L_opd there
    assert reg_lines[0]["L_opd"] == pytest.approx(unreg_lines[0]["L_opd"], rel=1e-5)
    assert reg_lines[0]["L_cons"] == pytest.approx(reg_lines[0]["L_opd"], rel=1e-5)
    assert unreg_lines[0]["L_cons"] is None

    result = evaluate_run(run, settings=EvalSettings(max_new_tokens=4), layers=False)
    report = json.loads((run / "eval.json").read_text())
    assert report == json.loads(json.dumps(result.report))
    assert report["split"] == "test" and report["n"] == 3
    assert list(report["models"]) == ["base", "teacher", "unreg", "reg"]
    for name, m in report["models"].items():
        assert set(m) == {*EVAL_METRICS, "n"}
        assert set(report["intervals"][name]) == set(EVAL_METRICS)
    assert report["models"]["teacher"]["acc_noctx"] == report["models"]["base"]["acc_noctx"]
    assert report["models"]["teacher"]["ctx_drop"] == 0 and report["models"]["base"]["drift"] == 0
    assert report["models"]["unreg"]["drift"] > 0  # trained at lr 1e-2: the student moved away from the base
    assert report["paired"]["reg"]["vs"] == "unreg"
    # the rows keep the generated ids; the CSV is the same rows for people
    rows = read_examples(run)
    assert len(rows) == 3 * 3 and {r.model for r in rows} == {"base", "unreg", "reg"}
    assert all(len(r.ids_noctx) <= 4 and r.truncated_noctx == (len(r.ids_noctx) == 4) for r in rows)
    assert all(r.follow_cf is not None and r.response_cf is not None for r in rows)  # persona has a counterfactual card
    lines = (run / "eval_examples.csv").read_text().splitlines()
    assert lines[0].startswith("model,example,context,prompt,reference,verifier,response_noctx,response_ctx")
    assert len(lines) == 1 + 3 * 3
    assert "unreg" in result.table and "acc_noctx" in result.table
    # a second evaluation with the same settings reuses every model's cached evaluation
    before = {p.name: p.stat().st_mtime_ns for p in (run / "eval").glob("*.json")}
    evaluate_run(run, settings=EvalSettings(max_new_tokens=4), layers=False)
    assert before == {p.name: p.stat().st_mtime_ns for p in (run / "eval").glob("*.json")}


def _row(a, c, len_a=1, len_c=1, degenerate_ctx=False, follow=None):
    from interp.core.runs import ExampleRow

    return ExampleRow(model="m", example=0, context="c", prompt="p", reference="r", verifier="contains", response_noctx="",
                      response_ctx="", ids_noctx=[1] * len_a, ids_ctx=[1] * len_c, correct_noctx=a, correct_ctx=c,
                      degenerate_noctx=False, degenerate_ctx=degenerate_ctx, truncated_noctx=False, truncated_ctx=False,
                      cf_context="x" if follow is not None else None, follow_cf=follow)


def test_score_definitions():
    from training.evaluate import score

    rows = [_row(True, False, 1, 2, True, True), _row(True, True, 1, 2, False, False), _row(False, True, 2, 1, False, True),
            _row(False, False, 2, 4, False, False)]
    s, ci = score(rows, teacher_ctx=[True, True, True, True])
    assert (s["acc_noctx"], s["acc_ctx"], s["harm"], s["help"]) == (0.5, 0.5, 0.5, 0.5)
    assert s["len_ratio"] == pytest.approx(9 / 6) and s["ctx_drop"] == 0.5 and s["n"] == 4
    assert s["degenerate_ctx"] == 0.25 and s["follow_cf"] == 0.5 and s["drift"] is None
    for k in ("acc_noctx", "acc_ctx", "degenerate_ctx", "follow_cf"):
        lo, hi = ci[k]
        assert 0 <= lo <= s[k] <= hi <= 1
    none_right, _ = score([_row(False, True)])
    assert none_right["harm"] is None and none_right["help"] == 1.0 and none_right["follow_cf"] is None


def _adapter(folder):
    return load_file(str(folder / "adapter_model.safetensors"))


def test_resume_ends_where_an_uninterrupted_run_does(tmp_path, monkeypatch):
    whole = cfg(tmp_path, "whole", lam=1.0, anchor="ema", checkpoint_every=1, steps=3)
    train(whole, progress=False)

    # the same run, killed during step 3 (after the checkpoint of step 2), then resumed
    killed = cfg(tmp_path, "killed", lam=1.0, anchor="ema", checkpoint_every=1, steps=3)
    import training.step as step

    real, calls = step.reverse_kl, []

    def dies_at_step_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(step, "reverse_kl", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train(killed, progress=False)
    monkeypatch.setattr(step, "reverse_kl", real)
    assert [p.name for p in checkpoints(tmp_path / "run" / "killed")] == ["step-000002"]
    assert not (tmp_path / "run" / "killed" / "adapter_model.safetensors").exists()
    train(killed, resume=True, progress=False)

    a, b = _adapter(tmp_path / "run" / "whole"), _adapter(tmp_path / "run" / "killed")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    lines = (tmp_path / "run" / "killed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3]


def test_resume_with_other_settings_is_refused(tmp_path):
    c = cfg(tmp_path, "s", steps=1, checkpoint_every=1)
    train(c, progress=False)
    with pytest.raises(UserError, match="is already at step 1; pass --steps above 1"):
        train(c, resume=True, progress=False)
    # extending a finished run, with another loss chunk size (memory, not maths: it may change on resume)
    train(cfg(tmp_path, "s", steps=2, checkpoint_every=1, chunk=3), resume=True, progress=False)
    assert [p.name for p in checkpoints(tmp_path / "run" / "s")] == ["step-000002"]
    unsaved = cfg(tmp_path, "u", steps=1, checkpoint_every=0)
    train(unsaved, progress=False)
    with pytest.raises(UserError, match="has no checkpoint to resume"):
        train(unsaved, resume=True, progress=False)
    c2 = cfg(tmp_path, "s", steps=2, checkpoint_every=1, lam=0.5)
    with pytest.raises(UserError, match="trained with lam=0.0 but this command says lam=0.5"):
        train(c2, resume=True, progress=False)
    with pytest.raises(UserError, match="nothing to resume"):
        train(cfg(tmp_path, "absent"), resume=True, progress=False)


def test_existing_folder_needs_overwrite(tmp_path):
    c = cfg(tmp_path, "x", steps=1)
    train(c, progress=False)
    with pytest.raises(UserError, match="already exists; pass --overwrite"):
        train(c, progress=False)
    train(c, overwrite=True, progress=False)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(lam=-1.0), "--lam must be ≥ 0"),
        (dict(lr=float("inf")), "--lr must be a finite number"),
        (dict(guided_share=1.5), "--guided-share must be in"),
        (dict(teacher_model="tiny-random-llama", teacher="live"), "cannot be combined with --teacher live"),
        (dict(steps=0), "--steps must be at least 1"),
        (dict(batch_size=500), "does not fit the .* training examples"),
        (dict(task="nope"), "unknown task 'nope'"),
        (dict(teacher="oracle"), "unknown teacher"),
        (dict(anchor="x"), "unknown anchor"),
        (dict(placement="middle"), "unknown placement"),
        (dict(target_modules="nothing_here"), "--target-modules 'nothing_here' does not fit"),
    ],
)
def test_bad_settings(tmp_path, change, match):
    with pytest.raises(UserError, match=match):
        train(cfg(tmp_path, **change), progress=False)


@pytest.mark.parametrize("name", ["reg_lam0.1", "base", "teacher"])
def test_student_names_that_cannot_be_adapters(tmp_path, name):
    with pytest.raises(UserError, match=f"the student folder name '{name}' cannot be used"):
        train(cfg(tmp_path, name), progress=False)
    assert not (tmp_path / "run").exists()


def test_nan_loss_stops_with_the_checkpoint_intact(tmp_path, monkeypatch):
    import training.step as step

    real, calls = step.reverse_kl, []

    def nan_at_step_2(*args, **kwargs):
        calls.append(1)
        value = real(*args, **kwargs)
        return value * float("nan") if len(calls) == 2 else value

    monkeypatch.setattr(step, "reverse_kl", nan_at_step_2)
    c = cfg(tmp_path, "n", steps=3, checkpoint_every=1)
    with pytest.raises(TrainingError, match=r"loss became nan at step 2; the last good checkpoint is .*step-000001"):
        train(c, progress=False)
    state = json.loads((checkpoints(tmp_path / "run" / "n")[-1] / "state.json").read_text())
    assert state["step"] == 1
    weights = load_file(str(checkpoints(tmp_path / "run" / "n")[-1] / "adapter.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_adapter_from_another_base_model(tmp_path):
    train(cfg(tmp_path, "unreg", steps=1), progress=False)
    folder = tmp_path / "run" / "unreg"
    # The adapter records its base model: the spec in adapter_config.json, the spec and a fingerprint in base_model.json.
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-random-llama"
    identity = json.loads((folder / "base_model.json").read_text())
    assert identity["model"] == "tiny-random-llama" and len(identity["fingerprint"]) == 16
    (folder / "base_model.json").write_text(json.dumps({"model": "HuggingFaceTB/SmolLM2-360M-Instruct", "fingerprint": "0123456789abcdef"}))
    with pytest.raises(UserError, match=r"trained on base model 'HuggingFaceTB/SmolLM2-360M-Instruct' \(weights 0123456789abcdef\), "
                                        r"but the loaded model is 'tiny-random-llama' \(weights [0-9a-f]{16}\)"):
        evaluate_run(tmp_path / "run", settings=EvalSettings(max_new_tokens=2), layers=False)


def test_eval_of_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(UserError, match="not a run folder"):
        evaluate_run(tmp_path, layers=False)


def test_batch_that_does_not_fit_in_memory(tmp_path, monkeypatch):
    import training.step as step

    def no_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 GB")

    monkeypatch.setattr(step, "response_logits", no_memory)
    with pytest.raises(UserError, match="does not fit in memory.*lower --batch-size"):
        train(cfg(tmp_path, steps=1), progress=False)


def test_live_teacher_without_regularizer_matches_base_teacher_at_the_first_step(tmp_path):
    # peft starts LoRA with B = 0, so before the first update the live student is the base model: both teachers
    # score the same rollout identically, and the first step's L_opd must agree.
    first = {}
    for teacher in ("base", "live"):
        train(cfg(tmp_path, f"t_{teacher}", steps=1, teacher=teacher, lam=0.0), progress=False)
        rows = (tmp_path / "run" / f"t_{teacher}" / "metrics.jsonl").read_text().splitlines()
        first[teacher] = json.loads(rows[0])["L_opd"]
    assert first["live"] == pytest.approx(first["base"], rel=1e-5, abs=1e-7)
    assert first["base"] > 0
