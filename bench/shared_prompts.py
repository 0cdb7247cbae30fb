"""Coverage of the study's seed-level intervals when seeds share prompts (no model is run: simulated verdicts).

    python bench/shared_prompts.py                 # the removability suites' design: a pool of 160, 5 seeds × 40
    python bench/shared_prompts.py --pool 90       # facts' pool

A suite drawn per seed from a finite pool shares prompts between seeds (the removability suites: 57 of the 121
prompts their 5 test splits cover are in two or more of them). Simulated as: a pool of prompts drawn from a
population (each prompt its own chance of a right answer, Beta(a, b): prompts differ far more than seeds do), each
seed's test split `n` prompts of the pool without replacement, each seed a small shift of every prompt's log-odds,
each answer a Bernoulli draw. The quantity the interval is for is the population's mean. Printed: how often the 95%
interval holds it, and its mean width, for the nested bootstrap (seeds, then each seed's examples: a prompt in two
seeds counts as two independent examples) and the crossed one over the union of the seeds' prompts
(`stats.seed_mean(shared=True)` on each seed's answers laid over the union in first-appearance order, NaN where the
seed lacks a prompt: the layout `training.study.seed_level.align` gives judged rows; seeds, then one draw of the
prompts for all).
"""

from __future__ import annotations

import argparse

import numpy as np

from training import stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pool", type=int, default=160, help="prompts in the suite")
    ap.add_argument("--n", type=int, default=40, help="test prompts per seed")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--beta", type=float, nargs=2, default=(1.0, 1.0), help="a, b of the prompts' Beta(a, b) chances")
    ap.add_argument("--seed-sd", type=float, default=0.2, help="sd of a seed's shift of every prompt's log-odds")
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--samples", type=int, default=1000, help="bootstrap resamples per interval")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    a, b = args.beta
    truth_rng = np.random.default_rng(1)
    # the population mean of the per-seed rate: E over prompts and seed shifts of sigmoid(logit(p) + shift)
    p = truth_rng.beta(a, b, 400_000).clip(1e-6, 1 - 1e-6)
    shift = truth_rng.normal(0, args.seed_sd, 400_000)
    truth = float(np.mean(1 / (1 + np.exp(-(np.log(p / (1 - p)) + shift)))))
    hits = {"nested": 0, "crossed": 0}
    widths: dict[str, list[float]] = {"nested": [], "crossed": []}
    union_sizes = []
    for rep in range(args.reps):
        pool = rng.beta(a, b, args.pool).clip(1e-6, 1 - 1e-6)
        logit = np.log(pool / (1 - pool))
        splits = [rng.choice(args.pool, args.n, replace=False) for _ in range(args.seeds)]
        values = []
        for idx in splits:
            chance = 1 / (1 + np.exp(-(logit[idx] + rng.normal(0, args.seed_sd))))
            values.append((rng.random(args.n) < chance).astype(float))
        union = list(dict.fromkeys(int(i) for idx in splits for i in idx))
        union_sizes.append(len(union))
        pos = {q: k for k, q in enumerate(union)}
        laid = []
        for idx, v in zip(splits, values):
            row = np.full(len(union), np.nan)
            row[[pos[int(i)] for i in idx]] = v
            laid.append(row)
        for name, m in (("nested", stats.seed_mean(values, samples=args.samples, seed=rep)),
                        ("crossed", stats.seed_mean(laid, samples=args.samples, seed=rep, shared=True))):
            lo, hi = m.ci
            hits[name] += lo <= truth <= hi
            widths[name].append(hi - lo)
    print(f"pool {args.pool}, {args.seeds} seeds × {args.n} prompts (union {np.mean(union_sizes):.0f} on average), "
          f"Beta{tuple(args.beta)}, seed sd {args.seed_sd} (log-odds), {args.reps} studies, population mean {truth:.3f}")
    for name in ("nested", "crossed"):
        print(f"  {name:<8} 95% interval holds it in {hits[name] / args.reps:.3f} of studies; mean width "
              f"{np.mean(widths[name]):.3f}")


if __name__ == "__main__":
    main()
