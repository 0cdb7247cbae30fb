"""One training step with a long shared context: ours at λ=0 and λ=1 against TRL's SDFTTrainer, at three lengths.

The persona suite's card is padded with a fact sheet to about 64, 256 and 1,024 tokens and put in the user turn
(`--placement user`), batch 8, 32 new tokens, top-k 100, LoRA r=16 on all linear layers, the base model as teacher.
Every trainer runs one warm-up step and `--steps` timed ones; medians are compared, all in this one process.
λ=1 runs twice: with the exact gradient and with the context's keys and values held fixed (`cons_prefix = "fixed"`).
The last line is `step_vs_trl_1024=<x> ours_1024_over_64=<y> reg_overhead_1024=<z> reg_overhead_fixed_prefix_1024=<w>`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_step import trl_step_times  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the checkout's bench/ beside interp/
from bench.machine import load_line  # noqa: E402
from interp.core.models import EMBEDDED, load_tokenizer  # noqa: E402
from interp.core.runs import METRICS_FILE  # noqa: E402
from interp.core.store import read_jsonl  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.tasks import FACTS_CARD, load_task  # noqa: E402
from training.trainer import train  # noqa: E402

LENGTHS = (64, 256, 1024)


def padded_suite(tokens: int, folder: Path, model: str) -> Path:
    """The persona suite as a JSONL file whose context is the card followed by fact sheets, cut to `tokens` tokens."""
    tok = load_tokenizer(model)
    task = load_task("persona")
    card = task.train[0].context
    filler = " ".join([FACTS_CARD] * (1 + tokens // 40))
    ids = tok(card + " " + filler, add_special_tokens=False)["input_ids"][:tokens]
    context = tok.decode(ids)
    path = folder / f"persona-{tokens}.jsonl"
    with path.open("w") as f:
        for e in task.train + task.test:
            f.write(json.dumps({"context": context, "prompt": e.prompt, "answer": e.reference}) + "\n")
    return path


def ours(args, suite: Path, lam: float, root: Path, cons_prefix: str = "exact") -> list[float]:
    cfg = TrainConfig(task=str(suite), model=args.model, out=str(root / f"ours-{suite.stem}-lam{lam:g}-{cons_prefix}" / "student"),
                      steps=1 + args.steps, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                      top_k=args.top_k, lam=lam, placement="user", checkpoint_every=0, cons_prefix=cons_prefix)
    result = train(cfg, progress=False)
    lines = read_jsonl(result.out / METRICS_FILE)
    return [x["step_s"] for x in lines[1:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=EMBEDDED)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    args = parser.parse_args()
    print(load_line(), flush=True)
    lengths = [int(x) for x in args.lengths.split(",")]
    med = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for n in lengths:
            suite = padded_suite(n, root, args.model)
            med[("trl", n)] = statistics.median(trl_step_times(args, root / f"trl-{n}", task=str(suite), placement_user=True))
            med[("lam0", n)] = statistics.median(ours(args, suite, 0.0, root))
            med[("lam1", n)] = statistics.median(ours(args, suite, 1.0, root))
            med[("fixed", n)] = statistics.median(ours(args, suite, 1.0, root, "fixed"))
            print(f"context={n} ours_lam0_s={med[('lam0', n)]:.2f} ours_lam1_s={med[('lam1', n)]:.2f} "
                  f"ours_lam1_fixed_prefix_s={med[('fixed', n)]:.2f} trl_sdft_s={med[('trl', n)]:.2f}", flush=True)
    hi, lo = max(lengths), min(lengths)
    print(f"model={args.model} batch={args.batch_size} new_tokens={args.max_new_tokens} top_k={args.top_k} threads={torch.get_num_threads()}")
    print(f"step_vs_trl_{hi}={med[('lam0', hi)] / med[('trl', hi)]:.2f} ours_{hi}_over_{lo}={med[('lam0', hi)] / med[('lam0', lo)]:.2f} "
          f"reg_overhead_{hi}={med[('lam1', hi)] / med[('lam0', hi)]:.2f} "
          f"reg_overhead_fixed_prefix_{hi}={med[('fixed', hi)] / med[('lam0', hi)]:.2f}")


if __name__ == "__main__":
    main()
