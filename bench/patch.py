"""Benchmark a layer sweep of activation patching against the plain forwards it cannot avoid.

On the embedded model, 16 pairs with the model's own greedy answers (about 32 tokens): `interp.context_sweep`
(B·ctx → B·noctx) over every decoder block, residual stream, recovery and reference log-probabilities included,
against its floor: per batch, one plain Hugging Face forward of the source and of the target, and one of the target
per patched layer, on the same tokens. Both use the model's default attention (sdpa). Baseline and measured work
alternate and the fastest of each is kept.

    python bench/patch.py [--pairs 16] [--repeats 2] [--backend nnsight]

Last line: patch_ratio=<x> (goal ≤ 1.3).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the checkout's bench/ beside interp/
from bench.machine import load_line  # noqa: E402
import interp
from interp.core.models import EMBEDDED
from interp.hooks import make_batch

CARD = "Your name is Nova. You are an AI assistant made by Quibble Labs. Whenever someone asks who you are, answer that you are Nova."
PROMPTS = ["Who are you?", "What is your name?", "Please introduce yourself.", "Who made you?", "What should I call you?",
           "Tell me about yourself.", "Which company created you?", "Are you a person or an assistant?"]


def floor(model, pairs, layers: int, batch_size: int, pad_id: int) -> None:
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            source, target = make_batch(chunk, "ctx", pad_id=pad_id), make_batch(chunk, "noctx", pad_id=pad_id)
            for b in [source] + [target] * (layers + 1):
                model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids)


def timed_pair(baseline, measured, repeats: int) -> tuple[float, float]:
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        for i, fn in enumerate((baseline, measured)):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best[0], best[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=EMBEDDED)
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--response-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--backend", default="nnsight")
    args = parser.parse_args()
    print(load_line(), flush=True)

    lm = interp.load_model(args.model, device="cpu", attn_implementation="sdpa")
    records = [{"context": CARD, "prompt": PROMPTS[i % len(PROMPTS)] + f" (#{i})", "reference": "Nova"} for i in range(args.pairs)]
    pairs = interp.make_pairs(lm.tokenizer, records, model=lm, respond="ctx", max_new_tokens=args.response_tokens)
    refs = [r["reference"] for r in records]
    blocks = list(range(1, lm.num_layers))
    pad = lm.tokenizer.pad_token_id
    n_tokens = sum(p.response_len for p in pairs)
    print(f"{len(pairs)} pairs, {n_tokens} measured tokens, sweep over {len(blocks)} blocks, backend {args.backend}, "
          f"{torch.get_num_threads()} threads")

    results = []

    def sweep():
        results.append(interp.context_sweep(lm, pairs, layers=blocks, backend=args.backend, batch_size=args.batch_size,
                                            references=refs))

    # Warm up both (allocator, nnsight's first trace).
    floor(lm.model, pairs[: args.batch_size], 1, args.batch_size, pad)
    interp.context_sweep(lm, pairs[: args.batch_size], layers=[1], backend=args.backend, references=refs[: args.batch_size])
    t_floor, t_patch = timed_pair(lambda: floor(lm.model, pairs, len(blocks), args.batch_size, pad), sweep, args.repeats)
    print("recovery per layer: " + " ".join(f"{x:.2f}" for x in results[-1].recovery[1:]))
    print(f"floor, plain forwards (source, target, target per layer): {t_floor:.2f} s")
    print(f"context_sweep ({args.backend}): {t_patch:.2f} s")
    print(f"patch_ratio={t_patch / t_floor:.2f}")


if __name__ == "__main__":
    main()
