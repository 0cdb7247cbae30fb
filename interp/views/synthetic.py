"""A made-up run folder with the layout `python -m training` writes (no adapters, plausible numbers): to try the app,
the report and the notebooks without training, and the fixture their tests and bench/app.py share."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from interp.core import runs
from interp.core.store import atomic_write_json
from interp.divergence import LayerDivergence, save_divergence

__all__ = ["synthetic_divergence", "write_synthetic_run"]

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
    lens: dict[str, np.ndarray] = {}
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
        atomic_write_json(folder / s / runs.TRAIN_CONFIG_FILE, {"lam": float(s_i), "steps": 5, "lr": 2e-4, "lora_r": 16})
        for t in range(5):
            runs.append_metrics(folder / s, {"step": t, "loss": 2.0 / (t + 1), "L_opd": 1.5 / (t + 1), "L_cons": 0.1 * s_i,
                                             "lam": float(s_i)})
    if with_eval:
        table = {m: {"acc_noctx": round(0.1 * i, 3), "acc_ctx": round(0.8 - 0.1 * i, 3), "harm": 0.25 * (i % 2),
                     "help": 0.5, "len_ratio": 1.0 + 0.1 * i, "ctx_drop": round(0.1 * i, 3), "n": n_examples}
                 for i, m in enumerate(models)}
        atomic_write_json(folder / runs.EVAL_FILE, {"task": "facts", "model": "tiny-random-llama", "split": "test",
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
