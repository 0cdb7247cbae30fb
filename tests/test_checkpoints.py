"""Checkpoints without pickle: exact round trip, planted pickles never run, damaged files are one line, exploded
weights are never saved, and a run killed at any of several moments resumes to the uninterrupted result."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from interp.core.errors import UserError
from training import checkpoints as ck
from training.trainer import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
TINY = dict(model="tiny-random-llama", task="persona", batch_size=2, max_new_tokens=4, n_test=3, lr=1e-2)


def cfg(tmp_path, name="s", **kw):
    return TrainConfig(out=str(tmp_path / "run" / name), **{**TINY, **kw})


class WritesAFile:
    """Unpickling this object creates `path`: what a malicious state.pt would do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _plant(folder: Path, marker: Path) -> None:
    (folder / ck.LEGACY_STATE).write_bytes(pickle.dumps({"step": 1, "x": WritesAFile(marker)}))


def _model_and_optimizer(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 3))
    for _ in range(2):
        model(torch.randn(5, 4)).pow(2).sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return model, optimizer, scheduler


def test_round_trip_restores_everything_exactly(tmp_path):
    import random

    model, optimizer, scheduler = _model_and_optimizer()
    ema = {n: p.detach().clone() * 0.5 for n, p in model.named_parameters()}
    random.seed(7)
    torch.manual_seed(7)
    saved_rng = ck.rng_state()
    path = ck.save_checkpoint(tmp_path, 12, model, optimizer, scheduler, ema, [saved_rng])
    assert sorted(p.name for p in path.iterdir()) == sorted([ck.TENSORS_FILE, ck.STATE_FILE, ck.WEIGHTS_FILE])
    expected_next = (random.random(), torch.rand(3))

    other, optimizer2, scheduler2 = _model_and_optimizer(seed=1)
    random.seed(0)
    step, ema2 = ck.load_checkpoint(path, other, optimizer2, scheduler2)
    assert step == 12
    for (n, a), (_, b) in zip(model.named_parameters(), other.named_parameters()):
        assert torch.equal(a, b) and torch.equal(ema[n], ema2[n])
    s1, s2 = optimizer.state_dict(), optimizer2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for k in s1["state"]:
        for name, value in s1["state"][k].items():
            assert torch.equal(value, s2["state"][k][name]) if torch.is_tensor(value) else value == s2["state"][k][name]
    assert scheduler.state_dict() == scheduler2.state_dict()
    assert (random.random(), torch.rand(3))[0] == expected_next[0]
    # the RNG went back to the saved state: the same draws follow
    ck.set_rng_state(saved_rng)
    assert random.random() == expected_next[0] and torch.equal(torch.rand(3), expected_next[1])
    # no pickle anywhere: the state is plain JSON
    state = json.loads((path / ck.STATE_FILE).read_text())
    assert state["step"] == 12 and state["format"] == ck.FORMAT


def test_a_planted_pickle_never_runs(tmp_path):
    marker = tmp_path / "code-ran"
    first = cfg(tmp_path, steps=1, checkpoint_every=1)
    train(first, progress=False)
    folder = ck.list_checkpoints(tmp_path / "run" / "s")[-1]
    _plant(folder, marker)
    # Beside the real state, the planted file is ignored and the run resumes.
    train(cfg(tmp_path, steps=2, checkpoint_every=1), resume=True, progress=False)
    assert not marker.exists()
    # A checkpoint that holds only a pickle is refused, and the pickle is not opened either.
    folder = ck.list_checkpoints(tmp_path / "run" / "s")[-1]
    _plant(folder, marker)
    for name in (ck.STATE_FILE, ck.TENSORS_FILE):
        (folder / name).unlink()
    with pytest.raises(UserError, match="not loaded because unpickling a file can run code"):
        train(cfg(tmp_path, steps=3, checkpoint_every=1), resume=True, progress=False)
    assert not marker.exists()
    # the planted object does write the file when unpickled: the test can fail
    pickle.loads((folder / ck.LEGACY_STATE).read_bytes())
    assert marker.exists()


@pytest.mark.parametrize("damage", ["truncate_weights", "truncate_state", "garbage_json", "edited_rng", "wrong_shape", "bad_step"])
def test_damaged_checkpoints_are_one_line(tmp_path, damage):
    model, optimizer, scheduler = _model_and_optimizer()
    path = ck.save_checkpoint(tmp_path, 3, model, optimizer, scheduler, None, [ck.rng_state()])
    if damage.startswith("truncate"):
        file = path / (ck.WEIGHTS_FILE if damage == "truncate_weights" else ck.TENSORS_FILE)
        file.write_bytes(file.read_bytes()[:40])
    elif damage == "garbage_json":
        (path / ck.STATE_FILE).write_bytes(b"\x00\x01")
    else:
        state = json.loads((path / ck.STATE_FILE).read_text())
        if damage == "edited_rng":
            state["rng"] = [{"python": [3, [1, 2], None], "torch": "AAAA"}]
        elif damage == "bad_step":
            state["step"] = "3; rm -rf /"
        else:
            state["optimizer"]["state"]["__items__"][0][1]["exp_avg"]["__tensor__"] = "optimizer.state.1.exp_avg"
        (path / ck.STATE_FILE).write_text(json.dumps(state))
    with pytest.raises(UserError) as info:
        ck.load_checkpoint(path, *_model_and_optimizer(seed=2))
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_exploded_or_non_finite_weights_are_refused(tmp_path):
    good = [torch.ones(3), torch.full((2, 2), 9e3)]
    ck.assert_finite_params(good, tmp_path, 1)
    with pytest.raises(ck.TrainingError, match=r"exploded \(largest \|w\| = 2e\+04, limit 1e\+04\) after the update of step 4; no checkpoint"):
        ck.assert_finite_params([torch.ones(2), torch.tensor([-2e4])], tmp_path, 4)
    model, optimizer, scheduler = _model_and_optimizer()
    ck.save_checkpoint(tmp_path, 3, model, optimizer, scheduler, None, [ck.rng_state()])
    with pytest.raises(ck.TrainingError, match=r"non-finite after the update of step 5; the last good checkpoint is .*step-000003"):
        ck.assert_finite_params({"a": torch.tensor([1.0, float("nan")])}, tmp_path, 5)


@pytest.mark.parametrize("at_step", [1, 2])
def test_an_exploding_update_stops_before_it_is_checkpointed(tmp_path, monkeypatch, at_step):
    # An update that blows the LoRA weights up (what --lr 1e30 did before validation capped the rate) must stop the
    # run in one line before the weights are checkpointed or sampled from, naming the last good checkpoint.
    real, calls = torch.optim.AdamW.step, []

    def blows_up(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == at_step:
            with torch.no_grad():
                for group in self.param_groups:
                    for p in group["params"]:
                        p.add_(2.5e29)
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", blows_up)
    with pytest.raises(ck.TrainingError) as info:
        train(cfg(tmp_path, steps=3, checkpoint_every=1), progress=False)
    message = str(info.value)
    assert f"the weights became exploded (largest |w| = 2.5e+29, limit 1e+04) after the update of step {at_step}" in message
    out = tmp_path / "run" / "s"
    if at_step == 1:
        assert "no checkpoint was written yet" in message and not ck.list_checkpoints(out)
    else:
        assert message.endswith("the last good checkpoint is " + str(out / "checkpoints" / "step-000001") + "; lower --lr and resume or rerun")
        assert [p.name for p in ck.list_checkpoints(out)] == ["step-000001"]
        weights = load_file(str(ck.list_checkpoints(out)[0] / ck.WEIGHTS_FILE))
        assert all(w.abs().max() < 1e4 for w in weights.values())
    assert not (out / "adapter_model.safetensors").exists()


def test_leftovers_of_killed_writes_are_removed(tmp_path):
    folder = tmp_path / ck.CHECKPOINTS_DIR
    for name in (".step-000002.tmp-abc", ".step-000001.old-x", "step-000001"):
        (folder / name).mkdir(parents=True)
    (folder / ".step-000002.lock").write_text("123\n")
    (tmp_path / ".adapter.tmp").mkdir()
    (tmp_path / ".metrics.jsonl.k2j3h4").write_text("{")
    (tmp_path / "metrics.jsonl").write_text("")
    removed = ck.clean_leftovers(tmp_path)
    assert len(removed) == 5
    assert sorted(p.name for p in folder.iterdir()) == ["step-000001"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [ck.CHECKPOINTS_DIR, "metrics.jsonl"]


def test_truncate_metrics_tolerates_a_half_written_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n{"step": 3, "lo')
    ck.truncate_metrics(path, 2)
    assert path.read_text() == '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n'
    ck.truncate_metrics(path, 1)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1]


# --- killed for real -------------------------------------------------------------------------------------------------------


def _train(out: Path, *extra, kill: str | None = None, steps: int = 4):
    cmd = [sys.executable, "-m", "training", "train", "--model", "tiny-random-llama", "--task", "persona", "--steps", str(steps),
           "--batch-size", "2", "--max-new-tokens", "4", "--n-test", "3", "--lr", "1e-2", "--checkpoint-every", "1",
           "--out", str(out), *extra]
    env = {k: v for k, v in ENV.items() if k != ck.KILL_ENV}
    if kill:
        env[ck.KILL_ENV] = kill
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _dot_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*"))


def test_killed_at_several_moments_resumes_to_the_uninterrupted_result(tmp_path):
    from training.evaluate import evaluate_run

    whole = tmp_path / "a" / "run" / "s"
    result = _train(whole)
    assert result.returncode == 0, result.stderr[-2000:]

    out = tmp_path / "b" / "run" / "s"
    # 1. killed while writing the checkpoint of step 2: the half-written folder stays behind, step 1 is the last
    result = _train(out, kill="during_checkpoint:2")
    assert result.returncode == 137, result.stderr[-2000:]
    assert [p.name for p in ck.list_checkpoints(out)] == ["step-000001"]
    assert any(p.name.startswith(".step-000002.tmp-") for p in (out / ck.CHECKPOINTS_DIR).iterdir())
    # 2. resumed, then killed right after the checkpoint of step 3; the leftovers of (1) are gone
    result = _train(out, "--resume", kill="after_checkpoint:3")
    assert result.returncode == 137, result.stderr[-2000:]
    assert [p.name for p in ck.list_checkpoints(out)] == ["step-000003"] and not _dot_files(out)
    # a writer killed mid-line leaves half a metrics line: resuming must not trip over it
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "loss": 0.12')
    # 3. resumed, then killed after the last checkpoint but before the adapter is written
    result = _train(out, "--resume", kill="before_adapter")
    assert result.returncode == 137, result.stderr[-2000:]
    assert [p.name for p in ck.list_checkpoints(out)] == ["step-000004"]
    assert not (out / "adapter_model.safetensors").exists()
    # the evaluation names the unfinished student instead of leaving it out
    with pytest.raises(UserError, match=r"student 's' of .* has no adapter yet \(training unfinished\).*--resume"):
        evaluate_run(out.parent, layers=False)
    # 4. resuming at the last step only writes the adapter
    result = _train(out, "--resume")
    assert result.returncode == 0, result.stderr[-2000:]

    a, b = load_file(str(whole / "adapter_model.safetensors")), load_file(str(out / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # difference 0
    ca, cb = ck.list_checkpoints(whole)[-1], ck.list_checkpoints(out)[-1]
    for name in (ck.WEIGHTS_FILE, ck.TENSORS_FILE):
        x, y = load_file(str(ca / name)), load_file(str(cb / name))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    rows = lambda p: [json.loads(x) for x in (p / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    keys = ("step", "loss", "L_opd", "grad_norm", "lr", "response_len")
    assert [{k: r[k] for k in keys} for r in rows(whole)] == [{k: r[k] for k in keys} for r in rows(out)]
    assert [r["step"] for r in rows(out)] == [1, 2, 3, 4]
    assert not _dot_files(tmp_path / "b")  # no temporary folder, lock or half-written file anywhere
    # finished now: a further resume at the same step is refused as before
    result = _train(out, "--resume")
    assert result.returncode == 2 and "is already at step 4" in result.stderr
