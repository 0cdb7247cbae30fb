"""On the real embedded SmolLM2: the teacher is strong on a suite, and one real training step runs."""

import json

import pytest

from training.evaluate import answer
from training.tasks import load_task
from training.trainer import TrainConfig, train

pytestmark = pytest.mark.embedded


def test_persona_teacher_uses_the_context(smol):
    task = load_task("persona")
    rows = answer(smol, task.test[:6], "system", "base", max_new_tokens=16, batch_size=6)
    assert sum(r.correct_ctx for r in rows) >= 4  # with the card it says its new name
    assert sum(r.correct_noctx for r in rows) == 0  # without it, never
    assert all(r.response_cf is not None for r in rows)  # and it was asked with the counterfactual card too


def test_one_step_on_the_embedded_model(tmp_path):
    cfg = TrainConfig(task="format", out=str(tmp_path / "run" / "reg"), steps=1, batch_size=2, max_new_tokens=6,
                      lam=1.0, checkpoint_every=0)
    result = train(cfg, progress=False)
    line = json.loads((result.out / "metrics.jsonl").read_text())
    assert line["L_opd"] > 0 and line["L_cons"] == pytest.approx(line["L_opd"], rel=1e-4)  # adapter still zero at step 1
    assert json.loads((tmp_path / "run" / "run.json").read_text())["placement"] == "user"
