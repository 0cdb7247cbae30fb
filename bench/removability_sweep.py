"""The calibrated removability study's settings on a common set of seeds, from its committed results (no model is run).

    python bench/removability_sweep.py                       # seeds 0-2, every suite
    python bench/removability_sweep.py --seeds 0 --suite persona_luna

The study's own tables (results/removability_calibrated/summary.md) take each setting over all of its seeds: the
main students over 5, the other λ values over 3, the anchors over 1. To read a λ sweep, every row must rest on the
same seeds; this prints each setting's measures (`seed_level.measure_setting`, the study tables' own function) and
its comparisons with `unreg` (`seed_level.compare`, no multiplicity correction) on the seeds given.
"""

from __future__ import annotations

import argparse
import tempfile

from training.study.results import _rows
from training.study.seed_level import compare, measure_setting
from training.study.study_file import load_study


def _value(m: dict | None, signed: bool = False) -> str:
    if not m or m.get("value") is None:
        return "–"
    fmt = "{:+.2f}" if signed else "{:.2f}"
    ci = m.get("ci")
    return fmt.format(m["value"]) + (f" [{fmt.format(ci[0])}, {fmt.format(ci[1])}]" if ci else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--study", default="studies/removability_calibrated.toml")
    ap.add_argument("--results-dir", default="results")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds every row is read on")
    ap.add_argument("--suite", action="append", help="a suite (repeatable); default: every suite")
    args = ap.parse_args()
    seeds = {int(s) for s in args.seeds.split(",")}
    study = load_study(args.study, runs_dir=tempfile.mkdtemp(), results_dir=args.results_dir)
    students, base, _ = _rows(study)
    full = study.eval.max_new_tokens
    for suite in args.suite or study.suites:
        print(f"\n{suite}, seeds {sorted(seeds)} (a row on fewer of them says which):")
        on: dict = {}
        for s in study.students:
            rows = {k: v for k, v in students.get((suite, s.name), {}).items() if k in seeds}
            if not rows:
                continue
            on[s.name] = rows
            m = measure_setting(rows, {k: base[suite][k] for k in rows}, full, full)
            h = m.get("harm") or {}
            print(f"  {s.name:<12} seeds {','.join(map(str, sorted(rows))):<6} acc_noctx {_value(m.get('acc_noctx'))}  "
                  f"acc_ctx {_value(m.get('acc_ctx'))}  harm {_value(h)} ({h.get('k')}/{h.get('n')})  card effect loops "
                  f"{_value((m.get('card_effect') or {}).get('loops'), True)}  no-card loops − base's "
                  f"{_value((m.get('health') or {}).get('loops'), True)}  follow_cf clean {_value(m.get('follow_cf_clean'))}  "
                  f"stubborn_cf {_value(m.get('stubborn_cf'))}")
        if "unreg" not in on:
            continue
        for name, rows in on.items():
            if name == "unreg" or set(rows) != set(on["unreg"]):
                continue
            for key in ("correct_ctx", "degenerate_ctx", "correct_noctx"):
                c = compare(rows, on["unreg"], key, full, full, higher_is_better=key != "degenerate_ctx")
                print(f"    {name} vs unreg {key:<15} only {name}: {c['a_only']:>3}  only unreg: {c['b_only']:>3}  "
                      f"p = {c['p']:.3f}  seeds ahead / behind / tied {c['a_better_seeds']} / {c['b_better_seeds']} / "
                      f"{c['tied_seeds']}")


if __name__ == "__main__":
    main()
