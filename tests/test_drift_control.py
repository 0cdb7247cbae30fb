"""The drift control: each adapted matrix changed by exactly as much as the trained adapter changed it (the
Frobenius norm of s·B·A, computed here by hand), in other directions; its folder loads like any adapter."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from interp.core.models import load_model
from training.drift_control import random_like, write_random_like


def _adapter(folder, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = {}
    for m, (i, o) in {"q_proj": (16, 16), "down_proj": (32, 16)}.items():
        w[f"base_model.model.model.layers.0.self_attn.{m}.lora_A.weight"] = torch.randn(4, i, generator=g)
        w[f"base_model.model.model.layers.0.self_attn.{m}.lora_B.weight"] = torch.randn(o, 4, generator=g) * 0.01
    folder.mkdir()
    save_file(w, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "peft_type": "LORA"}))
    return w


def test_each_update_keeps_its_size_and_loses_its_direction(tmp_path):
    w = _adapter(tmp_path / "a")
    c = random_like(w, seed=1)
    assert c.keys() == w.keys()
    for ka in (k for k in w if "lora_A" in k):
        kb = ka.replace("lora_A", "lora_B")
        trained, control = w[kb] @ w[ka], c[kb] @ c[ka]
        assert torch.sqrt((control ** 2).sum()) == pytest.approx(float(torch.sqrt((trained ** 2).sum())), rel=1e-5)
        cos = float((trained * control).sum() / (trained.norm() * control.norm()))
        assert abs(cos) < 0.5  # random directions, not the trained one
    assert torch.equal(random_like(w, seed=1)[ka], c[ka])  # the seed fixes it


def test_the_control_folder_loads_as_an_adapter_and_bad_input_is_one_line(tmp_path):
    lm = load_model("tiny-random-llama")
    from training.config import TrainConfig
    from training.step import lora_model

    peft_model = lora_model(lm, TrainConfig(model="tiny-random-llama", lora_r=4))
    for p in peft_model.parameters():  # a trained-looking adapter: B away from zero
        if p.requires_grad:
            p.data.normal_(0, 0.02)
    peft_model.save_pretrained(str(tmp_path / "student"))
    n = write_random_like(tmp_path / "student", tmp_path / "control", seed=0)
    assert n == len([k for k in load_file(str(tmp_path / "student" / "adapter_model.safetensors")) if "lora_A" in k])
    fresh = load_model("tiny-random-llama")
    assert fresh.load_adapter(tmp_path / "control") == "control"
    run = lambda *a: subprocess.run([sys.executable, "-m", "training", "random-adapter", *a], capture_output=True, text=True)  # noqa: E731
    for args, says in ((["--like", str(tmp_path / "student"), "--out", str(tmp_path / "control")], "already exists"),
                       (["--like", str(tmp_path), "--out", str(tmp_path / "c2")], "is not an adapter folder"),
                       (["--like", str(tmp_path / "student"), "--out", str(tmp_path / "no" / "c3")], "does not exist")):
        p = run(*args)
        assert p.returncode == 2 and says in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not (tmp_path / "c2").exists() and not (tmp_path / "no").exists()
