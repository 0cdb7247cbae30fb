"""The command line: one-line errors, `tasks`, `pair` + `eval` on the tiny model, and a two-process run."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from training.__main__ import app

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--model", "tiny-random-llama", "--steps", "1", "--batch-size", "2", "--max-new-tokens", "3", "--n-test", "2"]


def _cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "training", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    "args,message",
    [
        (["train", "--lam", "-1", "--out", "runs-never/x/reg"], "error: --lam must be ≥ 0"),
        (["pair", "--task", "nope", "--out", "runs-never/x"], "error: unknown task 'nope'; use one of persona, format, facts, persona_luna"),
    ],
)
def test_bad_input_is_one_line(args, message):
    result = _cli(*args)
    assert result.returncode == 2
    assert result.stderr.strip().startswith(message)
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (ROOT / "runs-never").exists()


def test_tasks_lists_the_suites():
    result = CliRunner().invoke(app, ["tasks"])
    assert result.exit_code == 0, result.output
    for name in ("persona", "format", "facts"):
        assert f"{name}:" in result.output
    assert "reference:" in result.output


def test_pair_then_eval(tmp_path):
    run = tmp_path / "smoke"
    result = CliRunner().invoke(app, ["pair", "--task", "facts", *SMALL, "--eval-new-tokens", "3", "--no-layers", "--out", str(run)])
    assert result.exit_code == 0, result.output
    assert "unreg" in result.output and "acc_noctx" in result.output
    run_json = json.loads((run / "run.json").read_text())
    assert run_json["task"] == "facts" and run_json["students"] == ["unreg", "reg"]
    assert json.loads((run / "reg" / "train_config.json").read_text())["lam"] == 1.0
    (run / "eval.json").unlink()
    result = CliRunner().invoke(app, ["eval", str(run), "--n", "1", "--max-new-tokens", "2", "--no-layers"])
    assert result.exit_code == 0, result.output
    assert json.loads((run / "eval.json").read_text())["n"] == 1


def test_two_processes(tmp_path):
    # `accelerate launch --cpu` starts a single process; torchrun starts two, and Accelerator joins them over gloo.
    out = tmp_path / "ddp" / "reg"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "training", "train", *SMALL,
           "--steps", "2", "--checkpoint-every", "1", "--lam", "1", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2] and lines[0]["processes"] == 2
    # each process rolled out its own 2 examples: the logged token count is the mean over processes
    assert (out / "adapter_model.safetensors").exists()
    state = json.loads((next((out / "checkpoints").iterdir()) / "state.json").read_text())
    assert state["step"] == 2 and len(state["rng"]) == 2  # the last step, one RNG state per process
    # both processes hold the same adapter: each one's sha256, recorded in the checkpoint, is that of the saved weights
    from safetensors.torch import load_file

    weights = load_file(str(next((out / "checkpoints").iterdir()) / "adapter.safetensors"))
    h = hashlib.sha256()
    for name, t in sorted(weights.items()):
        h.update(name.encode())
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    assert state["adapter_sha256"] == [h.hexdigest()] * 2


def test_processes_with_different_adapters_stop_the_run(tmp_path, monkeypatch):
    import accelerate.utils

    from training.trainer import TrainingError, _agreeing_adapters

    class TwoProcesses:
        num_processes = 2

    model = torch.nn.Linear(2, 2)  # its trainable weights stand for the adapter
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda xs: xs + ["0" * 64])
    with pytest.raises(TrainingError, match="after step 3 the 2 processes hold different adapters"):
        _agreeing_adapters(TwoProcesses(), model, tmp_path, 3)
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda xs: xs * 2)
    assert len(set(_agreeing_adapters(TwoProcesses(), model, tmp_path, 3))) == 1
