"""The NDIF path: refusals where NDIF cannot run what is named, and an artifact that names what was run remotely."""

import numpy as np
import pytest
import torch

from interp import UserError, analyze, make_pairs
from interp.core.models import EMBEDDED, LoadedModel, load_model
from interp.core.remote import RemoteTarget, remote_target


@pytest.fixture
def student(tmp_path):
    """A tiny model with a (non-identity) LoRA adapter loaded from a local folder."""
    from peft import LoraConfig, get_peft_model

    base = load_model("tiny-random-llama", device="cpu")
    torch.manual_seed(0)
    peft = get_peft_model(base.model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    peft.save_pretrained(tmp_path / "student")
    lm = load_model("tiny-random-llama", device="cpu")
    lm.load_adapter(tmp_path / "student")
    return lm


def _one_line(err):
    assert "\n" not in str(err.value)
    return str(err.value)


def test_refusals(student, tmp_path, records):
    pairs = make_pairs(student.tokenizer, records[:1])
    with pytest.raises(UserError) as err:  # a tiny random model exists only here
        analyze(student, pairs, backend="nnsight", remote=True)
    assert "NDIF cannot run it" in _one_line(err)
    embedded = LoadedModel(model=student.model, tokenizer=student.tokenizer, spec=EMBEDDED)
    with pytest.raises(UserError) as err:
        remote_target(embedded)
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in _one_line(err)
    folder = LoadedModel(model=student.model, tokenizer=student.tokenizer, spec=str(tmp_path))
    with pytest.raises(UserError) as err:
        remote_target(folder)
    assert "local folder" in _one_line(err)
    # A hub model with an adapter from a local folder: NDIF would run the base model, so refuse.
    student.spec = "org/tiny-base"
    with pytest.raises(UserError) as err:
        analyze(student, pairs, backend="nnsight", remote=True)
    assert "local folder" in _one_line(err) and "push it to the hub" in _one_line(err)
    with pytest.raises(UserError, match="needs the nnsight backend"):
        analyze(student, pairs, backend="torch", remote=True)
    with student.use(None):  # the base model alone is fine
        assert remote_target(student) == RemoteTarget("org/tiny-base", None)


def test_loading_keeps_the_real_name(tmp_path):
    """`_name_or_path` is what transformers recorded for a folder or hub id, not overwritten by the toolkit."""
    lm = load_model("tiny-random-qwen2", device="cpu")
    assert lm.model.config._name_or_path == "tiny-random-qwen2"
    lm.model.save_pretrained(tmp_path / "m")
    lm.tokenizer.save_pretrained(tmp_path / "m")
    again = load_model(str(tmp_path / "m"), device="cpu")
    assert again.model.config._name_or_path == str(tmp_path / "m")


def test_artifact_names_what_ran_remotely(student, records, monkeypatch):
    """With the adapter known by hub id, the remote model is built from the base id with peft=<adapter id>; the
    artifact records those ids, and the numbers are those of the adapted model (a stand-in runs NDIF's part here)."""
    import interp.core.remote as remote
    from nnsight.modeling.transformers import TransformersModel

    pairs = make_pairs(student.tokenizer, records)
    local = analyze(student, pairs, backend="nnsight")
    name = student.active_adapter
    student.spec = "org/tiny-base"
    student.hub_adapters[name] = "org/tiny-lora"
    built = []

    class StandIn:
        """What NDIF would run: the named base with the named adapter (here: the local adapted model)."""

        def __init__(self, repo_id, tokenizer=None, peft=None, **kwargs):
            built.append((repo_id, peft, kwargs.get("attn_implementation")))
            # NDIF switches its model to the implementation the request carries (nnsight sends it).
            student.model.set_attn_implementation(kwargs["attn_implementation"])
            self._inner = TransformersModel(student.model, tokenizer=tokenizer)

        def trace(self, *args, remote=False, **kwargs):
            assert remote is True
            return self._inner.trace(*args, **kwargs)

        def __getattr__(self, attr):
            return getattr(self._inner, attr)

        def __getitem__(self, i):
            return self._inner[i]

    monkeypatch.setattr(remote, "_model_class", lambda: StandIn)
    try:
        div = analyze(student, pairs, backend="nnsight", remote=True)
    finally:
        student.model.set_attn_implementation("sdpa")
    assert built == [("org/tiny-base", "org/tiny-lora", "eager")]
    assert div.meta["model"] == "org/tiny-base" and div.meta["adapter_path"] == "org/tiny-lora"
    assert div.meta["adapter"] == name and div.meta["remote"] == "ndif"
    np.testing.assert_allclose(div.cka, local.cka, atol=1e-6)
    np.testing.assert_allclose(div.attn_ctx, local.attn_ctx, atol=1e-6)
