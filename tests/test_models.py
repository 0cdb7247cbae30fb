"""Model loading: the embedded model's cache, the tiny model, LoRA adapters switched in place, clear errors."""

import json
import shutil

import pytest
import torch

from interp import UserError, load_model
from interp.core import models
from interp.core.adapters import base_identity, write_base_identity
from interp.core.runs import BASE_MODEL_FILE


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Two LoRA adapters with different random weights, saved by peft for the tiny model."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("adapters")
    for seed in (1, 2):
        base, _ = models.tiny_random_llama()
        torch.manual_seed(seed)
        peft = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        peft.save_pretrained(root / f"a{seed}")
    return root


def _logits(lm, ids):
    with torch.no_grad():
        return lm.model(input_ids=ids).logits


def test_tiny_model_is_seeded_and_shares_the_tokenizer(tiny, tokenizer):
    again = load_model("tiny-random-llama", device="cpu")
    for a, b in zip(tiny.model.parameters(), again.model.parameters()):
        assert torch.equal(a, b)
    assert tiny.model.config.vocab_size == len(tokenizer)
    assert tiny.num_layers == tiny.model.config.num_hidden_layers + 1
    assert tiny.model.config._attn_implementation == "sdpa"  # eager only inside capture, while it reads attention


def test_adapters_switch_in_place(adapters):
    lm = load_model("tiny-random-llama", device="cpu")
    ids = torch.tensor([[1, 50, 60, 70, 80]])
    base = _logits(lm, ids)
    lm.load_adapter(adapters / "a1", name="a1")
    one = _logits(lm, ids)
    lm.load_adapter(adapters / "a2", name="a2")
    two = _logits(lm, ids)
    assert not torch.allclose(base, one) and not torch.allclose(one, two)
    lm.set_adapter("a1")
    assert torch.allclose(_logits(lm, ids), one)
    lm.set_adapter(None)
    assert lm.active_adapter is None
    assert torch.allclose(_logits(lm, ids), base)
    with lm.use("a2"):
        assert torch.allclose(_logits(lm, ids), two)
    assert lm.active_adapter is None
    with pytest.raises(UserError, match="no adapter named 'zz'"):
        lm.set_adapter("zz")


def test_adapter_errors(adapters, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_model("tiny-random-llama", adapter=tmp_path / "missing", device="cpu")
    with pytest.raises(UserError, match="no adapter_config.json"):
        load_model("tiny-random-llama", adapter=tmp_path, device="cpu")
    other = tmp_path / "other"
    other.mkdir()
    config = json.loads((adapters / "a1" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "smollm2-135m-instruct"
    (other / "adapter_config.json").write_text(json.dumps(config))
    shutil.copy(adapters / "a1" / "adapter_model.safetensors", other)
    with pytest.raises(UserError, match="trained on base model 'smollm2-135m-instruct'.*--model smollm2"):
        load_model("tiny-random-llama", adapter=other, device="cpu")


def test_unknown_spec_is_one_line():
    with pytest.raises(UserError, match="unknown model spec 'no-such-model'"):
        load_model("no-such-model")
    with pytest.raises(UserError, match="empty"):
        load_model("")


@pytest.mark.embedded
def test_embedded_model_loads_from_cache_without_the_package(smol, monkeypatch):
    cached = models.embedded_model_dir()
    assert (cached / "model.safetensors").exists() and (cached / "config.json").exists()
    # With the GGUF package hidden, the cached conversion must still load: no second conversion.
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    again = load_model("smollm2-135m-instruct", device="cpu")
    assert again.model.config.num_hidden_layers == 30 and again.model.config.hidden_size == 576
    assert torch.equal(again.model.model.embed_tokens.weight, smol.model.model.embed_tokens.weight)


@pytest.mark.embedded
def test_embedded_model_conversion_in_a_fresh_cache(tmp_path, monkeypatch, smol):
    monkeypatch.setenv("CTXINT_CACHE", str(tmp_path))
    folder = models.embedded_model_dir()
    assert folder == tmp_path / models.EMBEDDED
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left behind
    fresh = load_model("smollm2-135m-instruct", device="cpu")
    ids = torch.tensor([[1, 504, 3060, 28]])
    assert torch.allclose(_logits(fresh, ids), _logits(smol, ids))
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    assert models.embedded_model_dir() == folder


def test_adapter_folder_with_a_dot_in_its_name(adapters, tmp_path):
    import shutil

    dotted = tmp_path / "reg_lam0.1"
    shutil.copytree(adapters / "a1", dotted)
    lm = load_model("tiny-random-llama", device="cpu")
    name = lm.load_adapter(dotted)
    assert name == "reg_lam0_1" and lm.active_adapter == "reg_lam0_1"


def test_adapters_carry_their_base_models_identity(adapters, tmp_path):
    import shutil

    lm = load_model("tiny-random-llama", device="cpu")
    folder = tmp_path / "a1"
    shutil.copytree(adapters / "a1", folder)
    identity = write_base_identity(folder, lm)
    assert identity == {"model": "tiny-random-llama", "fingerprint": identity["fingerprint"]} and len(identity["fingerprint"]) == 16
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-random-llama"
    assert json.loads((folder / BASE_MODEL_FILE).read_text()) == identity
    # The fingerprint does not depend on the dtype the model is loaded in.
    assert base_identity(load_model("tiny-random-llama", device="cpu", dtype=torch.bfloat16)) == identity
    lm.load_adapter(folder)
    # Another tiny Llama under the same name (other weights) refuses it, naming both.
    other_model, tokenizer = models.tiny_random_llama(seed=1)
    other = models.LoadedModel(model=other_model, tokenizer=tokenizer, spec="tiny-random-llama")
    with pytest.raises(UserError, match=r"trained on base model 'tiny-random-llama' \(weights [0-9a-f]{16}\), but the loaded model "
                                        r"is 'tiny-random-llama' \(weights [0-9a-f]{16}\); the same name with other weights"):
        other.load_adapter(folder)


def test_an_adapter_of_another_shape_says_what_does_not_fit(tmp_path):
    from peft import LoraConfig, get_peft_model

    narrow, _ = models.tiny_random_llama(hidden=32)
    get_peft_model(narrow, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "narrow")
    with pytest.raises(UserError) as info:
        load_model("tiny-random-llama", adapter=tmp_path / "narrow", device="cpu")
    message = str(info.value)
    assert "q_proj.lora_A" in message and "[2, 32] in the adapter but [2, 64] in the model" in message, message
    assert not message.rstrip().endswith(":") and "\n" not in message


@pytest.mark.parametrize("device,match", [("quantum", "unknown device 'quantum'"), ("cuda", "CUDA is not available"),
                                          ("cuda:3", "CUDA is not available"), (7, "must be a string")])
def test_devices_this_machine_lacks(device, match):
    if torch.cuda.is_available() and str(device).startswith("cuda"):
        pytest.skip("this machine has CUDA")
    with pytest.raises(UserError, match=match):
        models.check_device(device)
    assert models.check_device("cpu") == "cpu" and models.check_device(None) is None


def test_an_uncached_hub_id_fails_fast_offline(monkeypatch):
    import time

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=0: False)
    start = time.monotonic()
    with pytest.raises(UserError, match="'ctxint-test/never-published' is not in the local Hugging Face cache and the hub cannot be reached"):
        load_model("ctxint-test/never-published")
    assert time.monotonic() - start < 5
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=0: pytest.fail("HF_HUB_OFFLINE needs no network probe"))
    with pytest.raises(UserError, match="not in the local Hugging Face cache"):
        load_model("ctxint-test/never-published")


def test_adapter_names_one_per_folder(tmp_path):
    from interp.core.adapters import adapter_key, peft_name

    a, b = tmp_path / "run-a" / "unreg", tmp_path / "run.b" / "unreg"
    assert adapter_key(a) != adapter_key(b)  # two runs' students of the same name do not collide
    assert adapter_key(a) == adapter_key(tmp_path / "run-a" / ".." / "run-a" / "unreg")  # the folder, however named
    assert adapter_key(a).startswith("unreg-") and "." not in adapter_key(tmp_path / "v1.2")
    assert peft_name("reg.v2") == "reg_v2" and peft_name("reg_w01") == "reg_w01"


def test_the_known_library_warning_is_silenced_and_no_other(tiny):
    """peft's deprecated `is_gradient_checkpointing` question warns on every adapter load; quiet_known_warnings hides
    that one warning and leaves other FutureWarnings visible."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        models.quiet_known_warnings()
        assert tiny.model.is_gradient_checkpointing is False
        warnings.warn("something else is deprecated", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something else is deprecated"]
