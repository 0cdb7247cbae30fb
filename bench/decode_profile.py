"""Where a decode step of the bare model goes on CPU, and what is worth taking (one process, one thread by default,
as each job of a `--jobs 2` study runs).

Timed, each the minimum of `--repeats` runs, every answer forced to `--new-tokens` tokens:
- `generate`: HF `generate` on the bare base model, `--rows` rows, greedy (ms per decode step);
- forward loop: the same steps as a plain loop of `model(next_token, cache=cache)`, with no logits
  processors or stopping criteria: what `generate`'s own machinery adds;
- matmul floor: every `nn.Linear` of the model applied to a `[rows, in]` input once per step, with no attention,
  norms, activations or Python between them: the step's weight reads and arithmetic, the floor of any decoder;
- rows: the step at 1, 2, 4 and `--rows` rows: what finished rows leaving the batch could save;
- the operator profile of one `generate` (torch.profiler, self CPU time by operator group; the profiler's own
  overhead inflates the small operators, so read shares, not seconds);
- with `--compile`, the same `generate` with a static cache and `torch.compile` on the forward (compilation timed
  apart; the first call pays it).

Last line: `step_ms=<x> forward_loop_ms=<y> matmul_floor_ms=<z> rows1_over_rows<n>=<r>`.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the checkout's bench/ beside interp/
from bench.machine import load_line  # noqa: E402
from interp.core.generate import left_pad, stop_ids  # noqa: E402
from interp.core.models import EMBEDDED, load_model  # noqa: E402
from interp.core.pairs import render_prompt_pair  # noqa: E402
from training.tasks import load_task  # noqa: E402

GROUPS = {
    "matmul (linear layers, lm_head)": ("aten::addmm", "aten::mm", "aten::linear", "aten::matmul", "aten::bmm"),
    "attention": ("scaled_dot_product", "flash_attention", "aten::_efficient_attention", "aten::softmax"),
    "KV cache (cat, copy)": ("aten::cat", "aten::copy_", "aten::index_copy", "aten::slice_scatter"),
}


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def group_of(name: str) -> str:
    for group, keys in GROUPS.items():
        if any(k in name for k in keys):
            return group
    return "other operators (norms, activations, rotary, sampling, indexing)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=EMBEDDED)
    ap.add_argument("--rows", type=int, default=8, help="rows decoded together (the trainer's batch size)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a --jobs 2 study gives each job one)")
    ap.add_argument("--compile", action="store_true", help="also time a static cache with torch.compile")
    args = ap.parse_args()
    print(load_line(), flush=True)
    torch.set_num_threads(args.threads)
    lm = load_model(args.model, device="cpu")
    model, tok = lm.model.eval(), lm.tokenizer
    task = load_task("persona_luna", seed=0, n_test=args.rows)
    prompts = [render_prompt_pair(tok, e.context, e.prompt, "system", no_context="neutral").noctx_ids for e in task.test]
    stops = stop_ids(model, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else stops[0]
    N = args.new_tokens

    def hf(rows: int, m=model) -> None:
        ids, mask = left_pad(prompts[:rows], pad, "cpu")
        with torch.no_grad():
            m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=N, min_new_tokens=N, do_sample=False,
                       pad_token_id=pad, eos_token_id=stops)

    def forward_loop(rows: int) -> None:
        from transformers import DynamicCache

        ids, mask = left_pad(prompts[:rows], pad, "cpu")
        cache = DynamicCache()
        with torch.no_grad():
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, logits_to_keep=1)
            for _ in range(N - 1):
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
                pos = pos[:, -1:] + 1
                out = model(input_ids=nxt, attention_mask=mask, position_ids=pos, cache=cache, logits_to_keep=1)

    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    head = model.get_output_embeddings()
    if head is not None and all(head is not m for m in linears):
        linears.append(head)

    def matmul_floor(rows: int) -> None:
        xs = [torch.randn(rows, m.in_features) for m in linears]
        with torch.no_grad():
            for _ in range(N):
                for m, x in zip(linears, xs):
                    F.linear(x, m.weight)

    weights_mb = sum(m.weight.numel() * m.weight.element_size() for m in linears) / 2**20
    hf(args.rows)  # warm-up (allocator, kernels)
    t_gen = best(lambda: hf(args.rows), args.repeats)
    t_loop = best(lambda: forward_loop(args.rows), args.repeats)
    t_floor = best(lambda: matmul_floor(args.rows), args.repeats)
    step, loop_step, floor_step = (t * 1000 / N for t in (t_gen, t_loop, t_floor))
    print(f"{args.rows} rows × {N} tokens, {args.threads} thread(s), {weights_mb:.0f} MiB of linear weights read per step")
    print(f"  HF generate        {step:7.1f} ms per step")
    print(f"  forward loop       {loop_step:7.1f} ms per step ({loop_step / step:.2f} of generate)")
    print(f"  matmul floor       {floor_step:7.1f} ms per step ({floor_step / step:.2f} of generate; "
          f"{weights_mb / 1024 / (floor_step / 1000):.1f} GiB/s of weights)")

    row_steps = {}
    for rows in sorted({1, 2, 4, args.rows}):
        row_steps[rows] = best(lambda r=rows: hf(r), args.repeats) * 1000 / N
    print("  step by rows       " + ", ".join(f"{r}: {ms:.1f} ms" for r, ms in row_steps.items()), flush=True)

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        hf(args.rows)
        wall = time.perf_counter() - t0
    shares: dict[str, float] = defaultdict(float)
    for ev in prof.key_averages():
        shares[group_of(ev.key)] += ev.self_cpu_time_total / 1e6
    ops = sum(shares.values())
    print(f"operator profile of one generate ({wall:.2f} s under the profiler):")
    for group, s in sorted(shares.items(), key=lambda kv: -kv[1]):
        print(f"  {group:<62} {s / wall:6.1%}")
    print(f"  {'outside any operator (Python, generate, module calls)':<62} {max(wall - ops, 0.0) / wall:6.1%}")

    if args.compile:
        model.generation_config.cache_implementation = "static"
        compiled = torch.compile(model.forward)
        model.forward = compiled
        t0 = time.perf_counter()
        hf(args.rows)
        first = time.perf_counter() - t0
        t_comp = best(lambda: hf(args.rows), args.repeats)
        print(f"  static cache + torch.compile: first call {first:.1f} s (compiling), then {t_comp * 1000 / N:.1f} ms per "
              f"step ({t_comp / t_gen:.2f} of generate)", flush=True)

    print(f"step_ms={step:.1f} forward_loop_ms={loop_step:.1f} matmul_floor_ms={floor_step:.1f} "
          f"rows1_over_rows{args.rows}={row_steps[1] / row_steps[args.rows]:.2f}")


if __name__ == "__main__":
    main()
