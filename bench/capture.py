"""Benchmark the paired capture and the logit lens against the plain forwards and projections they cannot beat.

On the embedded model, 32 pairs with responses of about 32 tokens, everything measured in this run:
- capture_ratio: analyze() with cosine, CKA and attention to the context on every layer (lens off), over two
  plain Hugging Face forwards per batch (with and without context, the model's default attention);
- lens_ratio: the logit-lens statistics for every layer on the measured tokens of both runs, over the bare
  projections lm_head(final_norm(h)) for the same layers and tokens (also printed: the lens over the same
  projections with both runs' chunk in one product, as the lens makes them);
- mem_ratio: peak resident memory of a process during the capture with lens, over one during the plain forwards;
- a bf16 row: the same capture with the weights in bf16 (statistics stay float32/float64; on CPU bf16 matmuls are
  often slower than fp32, so this row is for GPUs, reported here as measured);
- loss memory: peak resident memory of L_opd + L_cons, forward and backward, on bf16 logits [8, 128, 49152]
  (a bf16 model's output at the embedded vocabulary), chunked (training.losses) against the unchunked formula.

    python bench/capture.py [--pairs 32] [--repeats 3] [--backend nnsight] [--lens-chunk 256] [--memory-only] [--loss-only]
"""

from __future__ import annotations

from pathlib import Path
import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import threading
import time

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the checkout's bench/ beside interp/
from bench.machine import load_line  # noqa: E402
import interp
from interp.capture import capture_torch
from interp.core.models import EMBEDDED
from interp.hooks import make_batch
from interp.lens import DEFAULT_CHUNK, lens_statistics, logit_lens

CONTEXTS = [
    "Your name is Zorblax. You were made by Quibble Labs. You love astronomy and always mention the stars.",
    "Reply with exactly one word: positive or negative. Judge the sentiment of the review.",
    "Facts: The capital of Veloria is Marn. Its river is the Ost. Its currency is the brill.",
    "You are a pirate. Speak like a pirate in every answer, with plenty of arr and matey.",
]
PROMPTS = [
    "Who are you?", "Tell me about yourself.", "What is your favourite subject?", "Who made you?",
    "Review: the film was a delight from start to end.", "Review: dull, long and badly acted.",
    "What is the capital of Veloria?", "What currency do they use in Veloria?",
]


def make_records(n: int) -> list[dict]:
    return [{"context": CONTEXTS[i % len(CONTEXTS)], "prompt": PROMPTS[i % len(PROMPTS)] + f" (#{i})"} for i in range(n)]


def build_pairs(lm, n: int, response_tokens: int):
    # Responses are the model's own greedy answers without the context, as in a real analysis.
    return interp.make_pairs(lm.tokenizer, make_records(n), model=lm, max_new_tokens=response_tokens)


def plain_forwards(model, pairs, batch_size: int, pad_id: int) -> None:
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            for which in ("ctx", "noctx"):
                b = make_batch(pairs[start : start + batch_size], which, pad_id=pad_id)
                model(input_ids=b.input_ids, attention_mask=b.attention_mask)


def timed_pair(baseline, measured, repeats: int) -> tuple[float, float]:
    """Time the baseline and the measured work alternately, and keep each one's fastest run: on a shared machine
    the minimum is the estimate least disturbed by other load, and alternating exposes both to the same load.
    """
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        for i, fn in enumerate((baseline, measured)):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best[0], best[1]


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bare_projections(model, hidden_ctx, hidden_noctx, chunk: int) -> None:
    with torch.no_grad():
        for hidden in (hidden_ctx, hidden_noctx):
            for layer in range(hidden.shape[0]):
                for a in range(0, hidden.shape[1], chunk):
                    logit_lens(model, hidden[layer, a : a + chunk])


def stacked_projections(model, hidden_ctx, hidden_noctx, chunk: int) -> None:
    """The same projections with both runs' chunk in one product, as the lens makes them (the stricter floor)."""
    with torch.no_grad():
        for layer in range(hidden_ctx.shape[0]):
            for a in range(0, hidden_ctx.shape[1], chunk):
                logit_lens(model, torch.cat([hidden_ctx[layer, a : a + chunk], hidden_noctx[layer, a : a + chunk]]))


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRSS(threading.Thread):
    """Samples this process's resident memory every few milliseconds while a workload runs."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.running = _rss_mib(), True

    def run(self):
        while self.running:
            self.peak = max(self.peak, _rss_mib())
            time.sleep(0.005)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.running = False
        self.join()


class PeakMemory:
    """The process's peak resident memory over a block: exact where Linux lets the high-water mark (VmHWM) be reset
    (`/proc/self/clear_refs`), else sampled every few milliseconds (`PeakRSS`, which can miss short-lived blocks and
    wanders by about ±50 MiB between runs)."""

    def __enter__(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident set
            self.sampler = None
        except OSError:
            self.sampler = PeakRSS().__enter__()
        return self

    def __exit__(self, *exc):
        if self.sampler is not None:
            self.sampler.__exit__(*exc)
            self.peak, self.how = self.sampler.peak, "sampled"
        else:
            self.peak, self.how = _hwm_mib(), "VmHWM"


def unchunked_losses(s_noctx, s_ctx, t_ctx, mask):
    """L_opd + L_cons as the losses were written before chunking: whole-batch fp32 log-probabilities."""
    import torch.nn.functional as F

    def kl(a, b):
        la, lb = F.log_softmax(a.float(), dim=-1), F.log_softmax(b.float(), dim=-1)
        return ((la.exp() * (la - lb)).sum(-1) * mask).sum() / mask.sum()

    return kl(s_noctx, t_ctx) + kl(s_noctx.detach(), s_ctx)


def loss_child(kind: str) -> None:
    """Peak memory of one loss forward+backward on bf16 logits at a 49k vocabulary, in this fresh process.

    Measured as the kernel's high-water mark of the resident set (VmHWM), reset just before the loss: exact for a
    peak, where sampling the resident set from a thread can miss short-lived blocks (getrusage's maximum would not
    do either: a child started by exec inherits its parent's). The logits are drawn directly in bf16, so no fp32
    temporary raises the baseline.
    """
    from training.losses import consistency_kl, reverse_kl  # here: the child's peak memory counts only what the loss needs

    B, R, V = 8, 128, 49152
    g = torch.Generator().manual_seed(0)
    draw = lambda: torch.empty(B, R, V, dtype=torch.bfloat16).normal_(generator=g)  # noqa: E731
    s_noctx, s_ctx, t_ctx = draw().requires_grad_(True), draw().requires_grad_(True), draw()
    mask = torch.ones(B, R)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    before = _hwm_mib()
    start = time.perf_counter()
    if kind == "loss-chunked":
        loss = reverse_kl(s_noctx, t_ctx, mask) + consistency_kl(s_noctx, s_ctx, mask)
    else:
        loss = unchunked_losses(s_noctx, s_ctx, t_ctx, mask)
    loss.backward()
    seconds = time.perf_counter() - start
    peak = _hwm_mib()
    print(json.dumps({"peak_mib": peak, "before_mib": before, "seconds": seconds, "loss": loss.item()}))


def _hwm_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def loss_memory(kind: str) -> dict:
    cmd = [sys.executable, __file__, "--child", kind]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    return json.loads(out)


def report_loss_memory() -> None:
    rows = {kind: loss_memory(kind) for kind in ("loss-unchunked", "loss-chunked")}
    for kind, r in rows.items():
        print(f"L_opd + L_cons, bf16 logits [8, 128, 49152], forward+backward, {kind.removeprefix('loss-')}: "
              f"peak +{r['peak_mib'] - r['before_mib']:.0f} MiB over the logits, gradients included "
              f"({r['seconds']:.2f} s, loss {r['loss']:.6f})")
    extra = {k: r["peak_mib"] - r["before_mib"] for k, r in rows.items()}
    print(f"loss_mem_unchunked_mib={extra['loss-unchunked']:.0f} loss_mem_chunked_mib={extra['loss-chunked']:.0f}")


def child(kind: str, args) -> None:
    """Run one workload in a fresh process on pairs saved by the parent; print its peak memory during the workload."""
    import pickle

    if kind.startswith("loss-"):
        return loss_child(kind)
    # Both load with sdpa (the default); capture switches to eager in place while it reads attention weights.
    lm = interp.load_model(args.model, device="cpu", dtype="fp32")
    with open(args.pairs_file, "rb") as f:
        pairs = pickle.load(f)
    before = _rss_mib()
    with PeakMemory() as peak:
        if kind == "plain":
            plain_forwards(lm.model, pairs, args.batch_size, lm.tokenizer.pad_token_id)
        else:
            interp.analyze(lm, pairs, backend=args.backend, batch_size=args.batch_size, lens_chunk=args.lens_chunk)
    print(json.dumps({"peak_mib": peak.peak, "before_mib": before, "how": peak.how}))


def peak_memory(kind: str, args, pairs_file: str) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--model", args.model, "--pairs-file", pairs_file,
           "--batch-size", str(args.batch_size), "--backend", args.backend, "--lens-chunk", str(args.lens_chunk)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    return json.loads(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=EMBEDDED)
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--response-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backend", default="nnsight")
    parser.add_argument("--lens-chunk", type=int, default=DEFAULT_CHUNK, help="tokens per lens chunk (memory against speed)")
    parser.add_argument("--child", choices=["plain", "capture", "loss-chunked", "loss-unchunked"])
    parser.add_argument("--pairs-file", help=argparse.SUPPRESS)
    parser.add_argument("--memory-only", action="store_true", help="Measure only mem_ratio.")
    parser.add_argument("--loss-only", action="store_true", help="Measure only the loss memory, chunked and unchunked.")
    parser.add_argument("--lens-only", default=None, metavar="CHUNKS",
                        help="Measure only lens_ratio, at each of these comma-separated chunk sizes (e.g. 32,64,128,256).")
    args = parser.parse_args()
    print(load_line(), flush=True)
    if args.child:
        return child(args.child, args)
    if args.loss_only:
        return report_loss_memory()

    lm = interp.load_model(args.model, device="cpu", dtype="fp32")  # sdpa; eager inside capture for attention weights
    plain = interp.load_model(args.model, device="cpu", dtype="fp32")  # the model's default attention (sdpa)
    pairs = build_pairs(lm, args.pairs, args.response_tokens)
    n_tokens = sum(p.response_len for p in pairs)
    pad = lm.tokenizer.pad_token_id
    print(f"{len(pairs)} pairs, {n_tokens} measured tokens, {lm.num_layers} layers, backend {args.backend}, "
          f"{torch.get_num_threads()} threads")
    if args.lens_only:
        for c in (int(x) for x in args.lens_only.split(",")):
            t_bare, t_lens = lens_timings(lm, pairs, args, c, n_tokens)
            print(f"lens_chunk={c} lens_ratio={t_lens / t_bare:.2f} lens_s={t_lens:.2f} bare_s={t_bare:.2f}")
        return

    pairs_file = tempfile.NamedTemporaryFile(suffix=".pkl", delete=False).name
    with open(pairs_file, "wb") as f:
        pickle.dump(pairs, f)
    mem_plain = peak_memory("plain", args, pairs_file)
    mem_capture = peak_memory("capture", args, pairs_file)
    os.unlink(pairs_file)
    print(f"peak memory during the work: plain forwards {mem_plain['peak_mib']:.0f} MiB "
          f"(+{mem_plain['peak_mib'] - mem_plain['before_mib']:.0f} over the loaded model), capture with lens "
          f"{mem_capture['peak_mib']:.0f} MiB (+{mem_capture['peak_mib'] - mem_capture['before_mib']:.0f}; {mem_capture['how']})")
    mem_ratio = mem_capture["peak_mib"] / mem_plain["peak_mib"]
    if args.memory_only:
        print(f"mem_ratio={mem_ratio:.2f}")
        return

    # Warm up both paths once (allocator, nnsight's first trace, the lens kernels' compilation).
    plain_forwards(plain.model, pairs[: args.batch_size], args.batch_size, pad)
    interp.analyze(lm, pairs[: args.batch_size], backend=args.backend, lens=False)

    t_plain, t_capture = timed_pair(
        lambda: plain_forwards(plain.model, pairs, args.batch_size, pad),
        lambda: interp.analyze(lm, pairs, backend=args.backend, batch_size=args.batch_size, lens=False),
        args.repeats,
    )
    print(f"plain forwards (sdpa, with and without context): {t_plain:.2f} s")
    print(f"paired capture + cos + CKA + attn_ctx ({args.backend}): {t_capture:.2f} s")

    # The same capture with bf16 weights; the statistics stay float32/float64 (interp.capture, interp.metrics).
    half = interp.load_model(args.model, device="cpu", dtype="bf16")
    interp.analyze(half, pairs[: args.batch_size], backend=args.backend, lens=False)
    t_bf16 = min(_timed(lambda m=half: interp.analyze(m, pairs, backend=args.backend, batch_size=args.batch_size, lens=False))
                 for _ in range(max(1, args.repeats - 1)))
    print(f"paired capture + cos + CKA + attn_ctx ({args.backend}), bf16 weights: {t_bf16:.2f} s "
          f"({t_bf16 / t_capture:.2f}x the fp32 capture)")
    del half

    t_bare, t_lens = lens_timings(lm, pairs, args, args.lens_chunk, n_tokens)
    report_loss_memory()
    print(f"capture_ratio={t_capture / t_plain:.2f} lens_ratio={t_lens / t_bare:.2f} "
          f"mem_ratio={mem_ratio:.2f} bf16_over_fp32={t_bf16 / t_capture:.2f}")


def lens_timings(lm, pairs, args, c: int, n_tokens: int) -> tuple[float, float]:
    """The lens on the measured tokens of both runs, against the bare projections of the same tokens (seconds)."""
    pad = lm.tokenizer.pad_token_id
    hidden = {}
    for which in ("ctx", "noctx"):
        parts = [capture_torch(lm, make_batch(pairs[s : s + args.batch_size], which, pad_id=pad), attention=False).hidden
                 for s in range(0, len(pairs), args.batch_size)]
        hidden[which] = torch.cat(parts, dim=1)
    targets = torch.cat([make_batch(pairs[s : s + args.batch_size], "ctx", pad_id=pad).targets for s in range(0, len(pairs), args.batch_size)])
    lens_statistics(lm.model, hidden["ctx"][:, :c], hidden["noctx"][:, :c], targets[:c], chunk=c)  # compile once
    t_bare, t_lens = timed_pair(
        lambda: bare_projections(lm.model, hidden["ctx"], hidden["noctx"], c),
        lambda: lens_statistics(lm.model, hidden["ctx"], hidden["noctx"], targets, chunk=c),
        max(1, args.repeats - 1),
    )
    t_stacked, _ = timed_pair(lambda: stacked_projections(lm.model, hidden["ctx"], hidden["noctx"], c), lambda: None,
                              max(1, args.repeats - 1))
    print(f"bare projections lm_head(final_norm(h)), {lm.num_layers} layers x {2 * n_tokens} tokens: {t_bare:.2f} s "
          f"(both runs' chunk in one product, as the lens makes them: {t_stacked:.2f} s)")
    print(f"logit-lens statistics, same layers and tokens: {t_lens:.2f} s "
          f"({t_lens / t_stacked:.2f}x the stacked projections)")
    return t_bare, t_lens


if __name__ == "__main__":
    main()
