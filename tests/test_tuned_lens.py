"""Tuned lens: identity at the last layer, lower held-out KL than the logit lens after brief training on the tiny
model, refused for another base model, one-line errors on bad input with nothing written, resumable training."""

from __future__ import annotations

import pytest
import torch

from interp import UserError, analyze, make_pairs
from interp.capture import capture_torch
from interp.hooks import make_batch
from interp.cli import main
from interp.lens import lens_statistics, logit_lens
from interp.core.adapters import base_identity
from interp import tuned_lens as tl

TINY = ["--model", "tiny-random-llama", "--device", "cpu"]
# Small enough to train in seconds on the tiny model, enough to move every layer's translator.
QUICK = tl.TuneSettings(steps=12, prompts=8, heldout_prompts=4, max_new_tokens=12, lr=3e-3)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty lens cache (the model cache, with the tokenizer, stays where it is)."""
    root = tmp_path / "lenses"
    monkeypatch.setattr(tl, "lens_root", lambda: root)
    return root


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lens") / "tiny"
    return tl.tune_lens(tiny, QUICK, folder=folder, progress=False)


def _random_lens(lm, identity=None, scale=0.05):
    lens = tl.TunedLens(lm.num_layers, lm.model.config.hidden_size, identity or base_identity(lm))
    with torch.no_grad():
        lens.weight.normal_(0, scale)
        lens.bias.normal_(0, scale)
    return lens


def _captured(lm, records):
    pairs = make_pairs(lm.tokenizer, records)
    ctx, noctx = make_batch(pairs, "ctx"), make_batch(pairs, "noctx")
    return pairs, ctx, capture_torch(lm, ctx), capture_torch(lm, noctx)


def test_last_layer_translator_is_the_identity(tiny, records):
    """Whatever the translators hold, the tuned lens equals the logit lens, exactly, at the last layer."""
    lens = _random_lens(tiny)
    _, batch, ctx, noctx = _captured(tiny, records)
    last = tiny.num_layers - 1
    assert torch.equal(lens.translate(ctx.hidden[last], last), ctx.hidden[last])
    assert torch.equal(tl.read_lens(tiny.model, ctx.hidden[last], last, lens), logit_lens(tiny.model, ctx.hidden[last]))
    assert not torch.equal(tl.read_lens(tiny.model, ctx.hidden[0], 0, lens), logit_lens(tiny.model, ctx.hidden[0]))
    tuned = lens_statistics(tiny.model, ctx.hidden, noctx.hidden, batch.targets, tuned=lens)
    plain = lens_statistics(tiny.model, ctx.hidden, noctx.hidden, batch.targets)
    for name in plain:
        assert torch.equal(tuned[name][last], plain[name][last]), name
    assert (tuned["lens_kl_final_ctx"][last] < 1e-5).all()


def test_brief_training_lowers_heldout_kl_at_every_layer(trained, tiny):
    logit, tuned = trained.heldout["logit"], trained.heldout["tuned"]
    assert len(logit) == len(tuned) == tiny.num_layers
    for layer in range(tiny.num_layers - 1):
        assert tuned[layer] < logit[layer], (layer, tuned[layer], logit[layer])
    assert tuned[-1] == pytest.approx(logit[-1], abs=1e-9) and logit[-1] < 1e-5
    again = tl.load_lens(trained.folder, tiny)  # safetensors + JSON round trip
    assert torch.equal(again.weight, trained.lens.weight) and again.identity == base_identity(tiny)
    assert again.meta["heldout"] == trained.heldout


def test_analyze_and_compare_record_the_lens(trained, tiny, records):
    pairs = make_pairs(tiny.tokenizer, records)
    plain = analyze(tiny, pairs, backend="torch")
    tuned = analyze(tiny, pairs, backend="torch", lens_type=trained.folder)
    assert plain.meta["lens"] == "logit" and plain.meta["lens_id"] is None
    assert tuned.meta["lens"] == "tuned" and tuned.meta["lens_id"]["fingerprint"] == base_identity(tiny)["fingerprint"]
    last = tiny.num_layers - 1
    assert tuned.layer_mean("lens_kl_noctx_ctx")[last] == plain.layer_mean("lens_kl_noctx_ctx")[last]
    assert tuned.layer_mean("lens_kl_final_ctx")[0] != plain.layer_mean("lens_kl_final_ctx")[0]
    from interp.causal.fourway import compare

    cmp = compare(tiny, pairs, student="base", backend="torch", lens_type=trained.lens)
    assert cmp.meta["lens"] == "tuned"
    assert cmp.pairs["removability"]["lens_kl"][last] == pytest.approx(plain.layer_mean("lens_kl_noctx_ctx")[last], rel=1e-5)


def test_lens_of_another_base_is_refused(tiny, tmp_path, records, capsys):
    other = _random_lens(tiny, identity={"model": "tiny-random-mistral", "fingerprint": "0123456789abcdef"})
    folder = tl.save_lens(other, tmp_path / "other")
    with pytest.raises(UserError, match="trained on base model 'tiny-random-mistral'"):
        tl.load_lens(folder, tiny)
    out = tmp_path / "art"
    assert main(["analyze", *TINY, "--context", "c", "--prompt", "p", "--response", "r", "--backend", "torch",
                 "--lens", str(folder), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "trained on base model 'tiny-random-mistral'" in err and len(err.splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("value, message", [
    ("tunned", "unknown lens 'tunned'; use logit or tuned"),
    ("tuned", "no tuned lens for model 'tiny-random-llama'"),
])
def test_bad_lens_is_one_line_and_writes_nothing(value, message, cache, tmp_path, capsys):
    out = tmp_path / "art"
    assert main(["analyze", *TINY, "--context", "c", "--prompt", "p", "--response", "r", "--lens", value, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    if value == "tuned":
        assert "python -m interp tune-lens --model tiny-random-llama" in err
    assert not out.exists() and not cache.exists()


def test_unknown_lens_in_the_python_api(tiny, records):
    with pytest.raises(UserError, match="unknown lens 'nope'"):
        analyze(tiny, make_pairs(tiny.tokenizer, records), backend="torch", lens_type="nope")


def test_tune_lens_command_and_bad_settings(cache, capsys):
    assert main(["tune-lens", *TINY, "--steps", "0"]) == 2
    assert "--steps must be a whole number of at least 1" in capsys.readouterr().err
    assert not cache.exists()
    assert main(["tune-lens", *TINY, "--steps", "2", "--prompts", "4", "--heldout-prompts", "2", "--max-new-tokens", "8"]) == 0
    text = capsys.readouterr().out
    assert "logit_kl" in text and "tuned_kl" in text
    assert len(list(cache.glob("tiny-random-llama-*/lens/lens.safetensors"))) == 1
    # The cache is found by the base's identity.
    assert main(["analyze", *TINY, "--context", "c", "--prompt", "p", "--response", "r", "--backend", "torch", "--lens", "tuned"]) == 0
    assert "tuned lens" in capsys.readouterr().out


class Killed(Exception):
    pass


def test_killed_training_resumes_where_it_stopped(tiny, tmp_path):
    settings = tl.TuneSettings(steps=5, prompts=6, heldout_prompts=2, tokens_per_step=16, max_new_tokens=8, lr=3e-3)
    whole = tl.tune_lens(tiny, settings, folder=tmp_path / "whole", progress=False, save_every=2)

    def kill_at_3(step, loss):
        if step == 3:
            raise Killed

    with pytest.raises(Killed):
        tl.tune_lens(tiny, settings, folder=tmp_path / "cut", progress=False, save_every=2, on_step=kill_at_3)
    assert not (tmp_path / "cut" / "lens").exists()  # nothing half-written: no finished lens yet
    resumed = tl.tune_lens(tiny, settings, folder=tmp_path / "cut", progress=False, save_every=2)
    assert resumed.resumed_from == 2
    torch.testing.assert_close(resumed.lens.weight, whole.lens.weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(resumed.lens.bias, whole.lens.bias, atol=1e-6, rtol=0)
    # Finished: asked again, it is returned as it is; other settings are refused in one line.
    assert tl.tune_lens(tiny, settings, folder=tmp_path / "cut", progress=False).resumed_from == 5
    with pytest.raises(UserError, match="other settings"):
        tl.tune_lens(tiny, tl.TuneSettings(**{**settings.__dict__, "lr": 1e-2}), folder=tmp_path / "cut", progress=False)
