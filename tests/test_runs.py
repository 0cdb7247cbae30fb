"""Run folders: discovery, reading, damage per run. Also the synthetic run the app, report and bench tests use."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from interp import runs
from interp.divergence import LayerDivergence
from interp.errors import UserError
from interp.store import atomic_write_json, save_divergence

WORDS = ["The", " capital", " of", " Veloria", " is", " Marn", ",", " on", " the", " river", " Ost", "."]
CONTEXTS = ["The capital of Veloria is Marn. Its river is the Ost.", "Your name is Zorblax.", "Reply with one word."]
PROMPTS = ["What is the capital of Veloria?", "Who are you?", "Is this film good?"]


def synthetic_divergence(num_blocks: int = 3, num_heads: int = 4, n_examples: int = 3, tokens: int = 6,
                         seed: int = 0, model: str = "tiny-random-llama", adapter: str | None = None) -> LayerDivergence:
    """A LayerDivergence with the shapes interp.analyze returns and plausible values (similarity falling with depth)."""
    rng = np.random.default_rng(seed)
    L = num_blocks + 1
    lengths = [tokens + (i % 3) for i in range(n_examples)]
    n = sum(lengths)
    depth = np.linspace(0, 1, L)[:, None]
    cos_tok = np.clip(1 - depth * rng.uniform(0.05, 0.4, (1, n)), -1, 1)
    cos_tok[0] = 1.0  # the embedding layer cannot see the context
    probs = lambda: rng.uniform(0, 1, (L, n)).astype(np.float32)  # noqa: E731
    lens = {}
    for side in ("ctx", "noctx"):
        lens[f"lens_top1_{side}"] = rng.integers(0, 49152, (L, n)).astype(np.int64)
        lens[f"lens_top1_prob_{side}"] = probs()
        lens[f"lens_target_prob_{side}"] = probs() * 0.5
        lens[f"lens_target_rank_{side}"] = rng.integers(0, 1000, (L, n)).astype(np.int64)
        lens[f"lens_entropy_{side}"] = (probs() * 8).astype(np.float32)
        lens[f"lens_kl_final_{side}"] = (probs() * (1 - depth)).astype(np.float32)
    token_example = np.concatenate([np.full(k, i) for i, k in enumerate(lengths)]).astype(np.int64)
    examples, attn_tokens = [], []
    for i, k in enumerate(lengths):
        ctx_tokens = [f" c{j}" for j in range(4 + i)]
        words = [WORDS[(i + j) % len(WORDS)] for j in range(k + 1)]
        examples.append({"context": CONTEXTS[i % 3] + ("" if i < 3 else f" ({i})"), "prompt": PROMPTS[i % 3] + ("" if i < 3 else f" #{i}"),
                         "response": "".join(words[1:]), "ctx_tokens": ctx_tokens, "tokens": words[:-1], "target_tokens": words[1:]})
        w = rng.uniform(0, 1, (num_blocks, num_heads, len(ctx_tokens))).astype(np.float32)
        mass = rng.uniform(0.02, 0.6, (num_blocks, num_heads, 1)).astype(np.float32)
        attn_tokens.append(w / w.sum(-1, keepdims=True) * mass)
    attn_ctx = np.stack([a.sum(-1) for a in attn_tokens]).mean(0)
    return LayerDivergence(
        cos=cos_tok.mean(1), cka=np.clip(1 - depth[:, 0] * 0.5 * rng.uniform(0.5, 1), 0, 1),
        cka_debiased=np.clip(1 - depth[:, 0] * 0.6 * rng.uniform(0.5, 1), -0.1, 1), cos_per_token=cos_tok,
        attn_ctx=attn_ctx, attn_sink=rng.uniform(0.2, 0.8, (num_blocks, num_heads)),
        attn_sink_noctx=rng.uniform(0.2, 0.8, (num_blocks, num_heads)),
        lens_kl_noctx_ctx=(probs() * depth).astype(np.float32), token_example=token_example,
        token_id=rng.integers(0, 49152, n).astype(np.int64), target_id=rng.integers(0, 49152, n).astype(np.int64),
        attn_ctx_tokens=attn_tokens, examples=examples,
        meta={"model": model, "adapter": adapter, "backend": "synthetic", "placement": "system", "scope": "response",
              "num_layers": L, "num_heads": num_heads},
        **lens,
    )


def write_synthetic_run(folder: Path, n_examples: int = 3, num_blocks: int = 3, num_heads: int = 4, tokens: int = 6,
                        students=("unreg", "reg"), with_layers: bool = True, with_eval: bool = True) -> Path:
    """A run folder with the layout `python -m training` writes (without adapters): run.json, eval.json,
    eval_examples.csv, metrics.jsonl per student, layers/<model>/ per model."""
    folder.mkdir(parents=True, exist_ok=True)
    runs.write_run(folder, runs.RunInfo(task="facts", model="tiny-random-llama", seed=0, placement="system",
                                        n_test=n_examples, students=list(students)))
    models = ["base", "teacher", *students]
    rng = np.random.default_rng(1)
    for s_i, s in enumerate(students):
        (folder / s).mkdir(exist_ok=True)
        atomic_write_json(folder / s / "train_config.json", {"lam": float(s_i), "steps": 5, "lr": 2e-4, "lora_r": 16})
        lines = [json.dumps({"step": t, "loss": 2.0 / (t + 1), "L_opd": 1.5 / (t + 1), "L_cons": 0.1 * s_i, "lam": float(s_i)})
                 for t in range(5)]
        (folder / s / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if with_eval:
        table = {m: {"acc_noctx": round(0.1 * i, 3), "acc_ctx": round(0.8 - 0.1 * i, 3), "harm": 0.25 * (i % 2),
                     "help": 0.5, "len_ratio": 1.0 + 0.1 * i, "ctx_drop": round(0.1 * i, 3), "n": n_examples}
                 for i, m in enumerate(models)}
        atomic_write_json(folder / "eval.json", {"task": "facts", "model": "tiny-random-llama", "split": "test",
                                                 "n": n_examples, "models": table})
        rows = []
        for m in models:
            for i in range(n_examples):
                cn, cc = bool(rng.integers(0, 2)), bool(rng.integers(0, 2))
                if m == "unreg" and i == 0:
                    cn, cc = True, False  # at least one flipped example
                ctx = CONTEXTS[i % 3] + ("" if i < 3 else f" ({i})")
                prompt = PROMPTS[i % 3] + ("" if i < 3 else f" #{i}")
                rows.append(runs.ExampleRow(
                    model=m, example=i, context=ctx, prompt=prompt, reference="Marn", verifier="contains",
                    response_noctx="Marn.", response_ctx="It is Marn.", ids_noctx=[1, 2, 3], ids_ctx=[1, 2, 3, 4, 5],
                    correct_noctx=cn, correct_ctx=cc, degenerate_noctx=False, degenerate_ctx=False,
                    truncated_noctx=False, truncated_ctx=False))
        runs.write_examples(folder, rows)
    if with_layers:
        for j, m in enumerate(["base", *students]):
            save_divergence(synthetic_divergence(num_blocks, num_heads, n_examples, tokens, seed=j,
                                                 adapter=None if m == "base" else m), folder / "layers" / m)
    return folder


@pytest.fixture
def run_dir(tmp_path):
    return write_synthetic_run(tmp_path / "runs" / "facts")


def test_list_runs_reads_a_run(run_dir):
    (found,) = runs.list_runs(run_dir.parent)
    assert found.name == "facts" and found.task == "facts" and found.error is None
    assert found.students == ["unreg", "reg"]
    assert found.layer_models == ["base", "unreg", "reg"]
    assert found.has_eval and found.has_examples


def test_list_runs_empty_and_missing_root(tmp_path):
    assert runs.list_runs(tmp_path) == []
    assert runs.list_runs(tmp_path / "nowhere") == []


def test_eval_rows_in_model_order(run_dir):
    rows = runs.eval_rows(runs.load_eval(run_dir))
    assert [r["model"] for r in rows] == ["base", "teacher", "unreg", "reg"]
    assert set(runs.EVAL_METRICS) <= set(rows[0])


def test_examples_table_marks_flipped(run_dir):
    rows = runs.load_examples(run_dir)
    assert isinstance(rows[0]["correct_noctx"], bool)
    table = runs.example_table(rows)
    assert len(table) == 3
    assert table[0]["flipped_any"] and "unreg" in table[0]["flipped_models"]
    assert table[0]["unreg:noctx"] is True and table[0]["unreg:ctx"] is False


def test_example_responses(run_dir):
    answers = runs.example_responses(runs.load_examples(run_dir), "0")
    assert [a["model"] for a in answers] == ["base", "teacher", "unreg", "reg"]
    assert answers[2]["correct_noctx"] and not answers[2]["correct_ctx"]


def test_layers_roundtrip_and_example_match(run_dir):
    div = runs.load_layers(run_dir, "unreg")
    assert div.num_layers == 4 and div.attn_ctx.shape == (3, 4)
    ex = div.examples[1]
    assert runs.match_example(div, ex["context"], ex["prompt"]) == 1
    assert runs.match_example(div, "other", "other", example="2") == 2
    assert runs.match_example(div, "other", "other", example=99) is None


def test_folders_being_written_are_not_models(run_dir):
    import shutil

    shutil.copytree(run_dir / "layers" / "reg", run_dir / "layers" / ".reg.tmp-abc")
    assert runs.layer_models(run_dir) == ["base", "unreg", "reg"]


def test_metrics_and_settings(run_dir):
    metrics = runs.load_all_metrics(run_dir)
    assert set(metrics) == {"unreg", "reg"} and len(metrics["reg"]) == 5
    # A half-written last line (training still running) is skipped, not an error.
    with (run_dir / "reg" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "lo')
    assert len(runs.load_metrics(run_dir, "reg")) == 5
    settings = runs.run_settings(run_dir)
    assert settings["run"]["task"] == "facts" and settings["students"]["reg"]["lam"] == 1.0


def test_run_still_training_shows_what_there_is(tmp_path):
    folder = write_synthetic_run(tmp_path / "r", with_layers=False, with_eval=False)
    (found,) = runs.list_runs(tmp_path)
    assert found.error is None and not found.has_eval and found.layer_models == []
    assert runs.load_eval(folder) is None and runs.load_examples(folder) is None


def test_damaged_run_is_an_error_for_that_run_only(tmp_path):
    write_synthetic_run(tmp_path / "good", with_layers=False)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "run.json").write_text("{not json")
    found = {r.name: r for r in runs.list_runs(tmp_path)}
    assert found["good"].error is None
    assert "damaged" in found["bad"].error and "run.json" in found["bad"].error


def test_damaged_files_raise_user_errors(run_dir):
    (run_dir / "eval.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="eval.json"):
        runs.load_eval(run_dir)
    (run_dir / "eval_examples.jsonl").write_text('{"model": "base"}\n')
    with pytest.raises(UserError, match="eval_examples.jsonl, line 1 is damaged"):
        runs.load_examples(run_dir)
    (run_dir / "eval_examples.jsonl").write_text("not json\n")
    with pytest.raises(UserError, match="line 1: not valid JSON"):
        runs.load_examples(run_dir)
    (run_dir / "layers" / "reg" / "arrays.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="damaged"):
        runs.load_layers(run_dir, "reg")
