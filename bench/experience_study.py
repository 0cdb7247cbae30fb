"""The experience study's answer to OPCD's research questions, from its committed results (no model is run).

    python bench/experience_study.py            # studies/experience.toml, results/experience

The comparisons were fixed before the study's results (the study file's comments name them):
- RQ1, accuracy without the context: each student's `acc_noctx` against the base's `acc_noctx`, and against the
  teacher's `acc_ctx` (how much of the in-context accuracy is internalized);
- RQ2, accuracy with the context: each student's `acc_ctx` against the teacher's (the base with the experience);
- the regularizer: each `*_reg` student against its twin, with and without the context; on- against off-policy.
Every seed answers the same 40 test prompts (the suite file fixes the split), so seeds and prompts are crossed: the
95% interval is the toolkit's crossed bootstrap (`stats.seed_mean(..., shared=True)`: seeds drawn, then one set of
prompts for every drawn seed) and p the exact sign-flip test with one sign per prompt on the sums over seeds
(`seed_level.sign_flip_per_example`), as `training.study.seed_level.compare` computes the study's own tables; Holm over
this family.

Then a descriptive reading of the answers (chosen after reading seed 0's answers, so not a test): how often an answer
copies the junk sentence of the experience's first worked example, how often it goes on to write questions of its
own, and the verifier's rule (the last number is the sum) applied to the answer before any such question.
"""

from __future__ import annotations

import argparse
import re
import tempfile
from collections import Counter

import numpy as np

from training import stats
from training.study.results import _rows
from training.study.seed_level import column, sign_flip_per_example
from training.study.study_file import load_study

RESAMPLES = 20_000
JUNK = "finite constructible"  # from the experience's first worked example (studies/experience/arith/experience.txt)


def prompt_level(xa: list[np.ndarray], xb: list[np.ndarray]) -> tuple[float, float, float, float]:
    """a − b over seeds that share their prompts: the mean over seeds of each seed's mean difference, its crossed
    bootstrap interval, and the exact sign-flip p with one sign per prompt on the sums over seeds (a prompt
    undefined in a seed adds nothing there)."""
    m = stats.seed_mean([x - y for x, y in zip(xa, xb)], shared=True, samples=RESAMPLES)
    p = sign_flip_per_example(xa, xb)
    lo, hi = m.ci if m.ci is not None else (float("nan"), float("nan"))
    return float(m.value if m.value is not None else float("nan")), float(lo), float(hi), float(p)


def rate(per_seed: dict, key: str, full: int) -> str:
    m = stats.seed_mean([column(per_seed[s], key, full, full) for s in sorted(per_seed)], shared=True, samples=RESAMPLES)
    lo, hi = m.ci if m.ci is not None else (float("nan"), float("nan"))
    return f"{m.value:.2f} [{lo:.2f}, {hi:.2f}]"


def reading(rows: list, suite_sum) -> Counter:
    c: Counter = Counter()
    for r in rows:
        s = suite_sum(r.prompt)
        for side in ("noctx", "ctx"):
            answer = getattr(r, f"response_{side}")
            first = re.split(r"\n\s*Question:", answer)[0]  # the answer before any question it writes itself
            numbers = re.findall(r"\d+", first)
            c[f"n_{side}"] += 1
            c[f"junk_{side}"] += JUNK in answer
            c[f"goes_on_{side}"] += first != answer
            c[f"first_{side}"] += bool(numbers) and numbers[-1] == s
    return c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--study", default="studies/experience.toml")
    ap.add_argument("--results-dir", default="results")
    args = ap.parse_args()
    study = load_study(args.study, runs_dir=tempfile.mkdtemp(), results_dir=args.results_dir)
    students, base, _ = _rows(study)
    full = study.eval.max_new_tokens
    suite = study.suites[0]
    b = base[suite]
    names = [s.name for s in study.students if (suite, s.name) in students]
    tests = []
    for n in names:
        tests.append((f"RQ1  {n} acc_noctx vs base acc_noctx", students[(suite, n)], "correct_noctx", b, "correct_noctx"))
    for n in names:
        tests.append((f"RQ1  {n} acc_noctx vs teacher acc_ctx", students[(suite, n)], "correct_noctx", b, "correct_ctx"))
    for n in names:
        tests.append((f"RQ2  {n} acc_ctx vs teacher acc_ctx", students[(suite, n)], "correct_ctx", b, "correct_ctx"))
    tests.append(("teacher acc_ctx vs base acc_noctx", b, "correct_ctx", b, "correct_noctx"))
    for x, y in (("opcd_reg", "opcd"), ("offpolicy_reg", "offpolicy"), ("opcd", "offpolicy")):
        for key in ("correct_noctx", "correct_ctx"):
            if (suite, x) in students and (suite, y) in students:
                tests.append((f"{x} vs {y} {key}", students[(suite, x)], key, students[(suite, y)], key))
    out = []
    for label, a, ka, bb, kb in tests:
        seeds = sorted(set(a) & set(bb))
        for s in seeds:
            if [r.prompt for r in a[s]] != [r.prompt for r in bb[s]]:
                raise SystemExit(f"{label}: seed {s}'s rows are not on the same prompts")
        xa = [column(a[s], ka, full, full) for s in seeds]
        xb = [column(bb[s], kb, full, full) for s in seeds]
        out.append((label, seeds, np.mean([np.nanmean(x) for x in xa]), np.mean([np.nanmean(x) for x in xb]),
                    *prompt_level(xa, xb)))
    adjusted = stats.holm([o[-1] for o in out])
    print(f"{'comparison':<48} seeds    a     b     a − b [95% crossed]        p       Holm ({len(out)})")
    for (label, seeds, ma, mb, d, lo, hi, p), ph in zip(out, adjusted):
        print(f"{label:<48} {','.join(map(str, seeds)):<6} {ma:.3f} {mb:.3f} {d:+.3f} [{lo:+.3f}, {hi:+.3f}]      "
              f"{p:.4f}  {ph:.3f}")
    print("\nrates, mean over seeds [95% crossed bootstrap, seeds and prompts]:")
    print(f"{'base':<14} without {rate(b, 'correct_noctx', full)}  with (teacher) {rate(b, 'correct_ctx', full)}")
    for n in names:
        st = students[(suite, n)]
        print(f"{n:<14} without {rate(st, 'correct_noctx', full)}  with {rate(st, 'correct_ctx', full)}  "
              f"loops with {rate(st, 'degenerate_ctx', full)}  seeds {sorted(st)}")

    def suite_sum(prompt: str) -> str:
        return str(sum(int(x) for x in re.findall(r"\d+", prompt)))

    print("\nreading the answers (share of (seed, prompt) answers): junk = copies the junk sentence; goes on = writes "
          "a question of its own; first = the verifier's rule on the answer before that question")
    for n, per_seed in [("base", b)] + [(n, students[(suite, n)]) for n in names]:
        c = reading([r for s in sorted(per_seed) for r in per_seed[s]], suite_sum)
        print(f"{n:<14} " + "  ".join(f"{side}: junk {c[f'junk_{side}'] / c[f'n_{side}']:.2f} goes on "
                                      f"{c[f'goes_on_{side}'] / c[f'n_{side}']:.2f} first {c[f'first_{side}'] / c[f'n_{side}']:.2f}"
                                      for side in ("noctx", "ctx")))


if __name__ == "__main__":
    main()
