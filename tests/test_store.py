"""Artifacts: exact round trip, atomic writes, and one-line errors for other schema versions or damaged files."""

import json

import numpy as np
import pytest

from interp import UserError, analyze, make_pairs
from interp import divergence
from interp.core import store
from interp.divergence import array_fields


@pytest.fixture(scope="module")
def div(tiny):
    records = [{"context": "Your name is Zorblax.", "prompt": "Who are you?", "response": "I am Zorblax."},
               {"context": "Answer in one word.", "prompt": "Sky colour?", "response": "Blue, mostly, on clear days."}]
    return analyze(tiny, make_pairs(tiny.tokenizer, records), backend="torch")


def test_round_trip_is_exact(div, tmp_path):
    divergence.save_divergence(div, tmp_path / "d")
    back = divergence.load_divergence(tmp_path / "d")
    for name in array_fields():
        a, b = getattr(div, name), getattr(back, name)
        assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True), name
    assert len(back.attn_ctx_tokens) == 2
    for a, b in zip(div.attn_ctx_tokens, back.attn_ctx_tokens):
        assert np.array_equal(a, b)
    assert back.examples == div.examples and back.meta == div.meta
    table = back.per_layer_table()
    assert table["cos"] == div.cos.tolist() and len(table["lens_kl_noctx_ctx"]) == div.num_layers


def test_existing_folder_needs_overwrite(div, tmp_path):
    divergence.save_divergence(div, tmp_path / "d")
    with pytest.raises(UserError, match="already exists"):
        divergence.save_divergence(div, tmp_path / "d")
    divergence.save_divergence(div, tmp_path / "d", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_failed_write_leaves_nothing(div, tmp_path, monkeypatch):
    import safetensors.numpy

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", boom)
    with pytest.raises(OSError):
        divergence.save_divergence(div, tmp_path / "d")
    assert list(tmp_path.iterdir()) == []


def test_other_schema_version_is_named(div, tmp_path):
    folder = divergence.save_divergence(div, tmp_path / "d")
    meta = json.loads((folder / divergence.META_FILE).read_text())
    meta["schema_version"] = 99
    (folder / divergence.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"divergence\.json has schema version 99"):
        divergence.load_divergence(folder)


def test_damaged_files_are_named(div, tmp_path):
    folder = divergence.save_divergence(div, tmp_path / "d")
    (folder / divergence.ARRAYS_FILE).write_bytes(b"\x00garbage")
    with pytest.raises(UserError, match=r"arrays\.safetensors is damaged"):
        divergence.load_divergence(folder)
    (folder / divergence.META_FILE).write_text("{not json")
    with pytest.raises(UserError, match=r"divergence\.json is damaged"):
        divergence.load_divergence(folder)
    with pytest.raises(UserError, match="not a folder"):
        divergence.load_divergence(tmp_path / "nowhere")


def test_atomic_write_text_replaces_whole_file(tmp_path):
    path = tmp_path / "x.json"
    store.atomic_write_json(path, {"a": np.float32(1.5), "b": np.arange(3)})
    assert json.loads(path.read_text()) == {"a": 1.5, "b": [0, 1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
