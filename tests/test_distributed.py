"""analyze-run under torchrun (two gloo processes on CPU) gives the numbers of one process, and rank 0 writes."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from interp.analysis import analyze_run
from interp.divergence import array_fields
from interp.divergence import load_divergence

ROOT = Path(__file__).resolve().parents[1]
RECORDS = [
    ("Your name is Zorblax. You were made by Quibble Labs.", "Who are you?", "I am Zorblax, made by Quibble Labs."),
    ("Reply with exactly one word: positive or negative.", "The film was a delight.", "positive"),
    ("The capital of Veloria is Marn. Its river is the Ost.", "What is the capital of Veloria?", "Marn, on the Ost."),
    ("You are a pirate. Speak like one.", "How is the weather?", "Arr, fair winds today, matey."),
    ("Your name is Nova.", "What is your name?", "My name is Nova."),
]


def make_run(folder: Path) -> Path:
    """A run folder in the run format (interp.core.runs): run.json, a student adapter, the evaluation's rows with ids."""
    from peft import LoraConfig, get_peft_model

    from interp.core import runs
    from interp.core.models import load_model

    folder.mkdir(parents=True)
    runs.write_run(folder, runs.RunInfo(task="persona", model="tiny-random-llama", seed=0, placement="system",
                                        n_test=5, students=["student"]))
    lm = load_model("tiny-random-llama", device="cpu")
    torch.manual_seed(0)
    peft = get_peft_model(lm.model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    peft.save_pretrained(folder / "student")

    def row(model, i, c, p, r):
        ids = lm.tokenizer(r, add_special_tokens=False)["input_ids"]
        return runs.ExampleRow(model=model, example=i, context=c, prompt=p, reference="", verifier="contains",
                               response_noctx=r, response_ctx=r, ids_noctx=ids, ids_ctx=ids, correct_noctx=False,
                               correct_ctx=False, degenerate_noctx=False, degenerate_ctx=False, truncated_noctx=False,
                               truncated_ctx=False)

    # base: 5 examples, 3 batches of 2 (rank 0 gets two, rank 1 one); student: one batch, so rank 1 measures nothing
    # and only joins the reductions
    rows = [row("base", i, c, p, r) for i, (c, p, r) in enumerate(RECORDS)] + [row("student", 0, *RECORDS[0])]
    runs.write_examples(folder, rows)
    return folder


def test_two_processes_equal_one(tmp_path):
    one, two = make_run(tmp_path / "one"), tmp_path / "two"
    import shutil

    shutil.copytree(one, two)
    analyze_run(one, backend="torch", batch_size=2, device="cpu", progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "interp", "analyze-run", str(two), "--backend", "torch", "--batch-size", "2", "--device", "cpu"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("base:") == 1  # rank 0 alone prints
    for name in ("base", "student"):
        a, b = load_divergence(one / "layers" / name), load_divergence(two / "layers" / name)
        for field in array_fields():
            x, y = getattr(a, field), getattr(b, field)
            assert x.shape == y.shape, field
            if np.issubdtype(x.dtype, np.floating):
                np.testing.assert_allclose(y, x, atol=1e-6, rtol=0, err_msg=field)
            else:
                np.testing.assert_array_equal(y, x, err_msg=field)
        assert len(a.attn_ctx_tokens) == len(b.attn_ctx_tokens)
        for x, y in zip(a.attn_ctx_tokens, b.attn_ctx_tokens):
            np.testing.assert_allclose(y, x, atol=1e-6, rtol=0)
        assert a.examples == b.examples and a.meta["n_tokens"] == b.meta["n_tokens"]
