"""Does an experience help the model it came from? Build an `examples` experience of a suite (attempts on training
prompts only, without context), then answer the suite's test prompts greedily without context and with the experience
in the system turn; print counts, Wilson 95% intervals and the paired McNemar test, and save per-example verdicts.

    python bench/experience_gain.py arith --temperature 1.0 --prompts 16 --out /tmp/exp-arith

One process, one thread (about 4 minutes of CPU for the embedded model on arith with 16 prompts × 4 samples).
"""

import argparse
import json

import torch

from interp.core.generate import generate
from interp.core.models import EMBEDDED, load_model
from interp.core.pairs import render_prompt_pair
from training import stats
from training.experience import ExperienceSettings, build, write
from training.tasks import load_task


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("task")
    ap.add_argument("--model", default=EMBEDDED)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--n-test", type=int, default=40)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    lm = load_model(args.model, device="cpu")
    s = ExperienceSettings(task=args.task, kind="examples", model=args.model, seed=0, n_test=args.n_test, prompts=args.prompts,
                           samples=args.samples, temperature=args.temperature, max_new_tokens=args.max_new_tokens)
    exp = build(s, lm=lm, progress=True)
    write(exp, args.out, overwrite=True)
    test = load_task(args.task, seed=0, n_test=args.n_test).test
    tok = lm.tokenizer
    pps = [render_prompt_pair(tok, exp.context, e.prompt, "system") for e in test]
    answers = {}
    for which in ("noctx", "experience"):
        ids = [p.noctx_ids if which == "noctx" else p.ctx_ids for p in pps]
        answers[which] = [str(tok.decode(x, skip_special_tokens=True)) for x in generate(lm, ids, max_new_tokens=args.max_new_tokens, batch_size=20)]
    ok = {w: [e.check(a) for e, a in zip(test, answers[w])] for w in answers}
    n = len(test)
    report = {"task": args.task, "model": args.model, "attempts": len(exp.traces), "verified": exp.verified, "n": n,
              **{f"acc_{w}": {"k": sum(ok[w]), "n": n, "wilson95": stats.wilson(sum(ok[w]), n)} for w in ok},
              "paired": stats.paired(ok["experience"], ok["noctx"]),
              "examples": [{"prompt": e.prompt, **{w: answers[w][i] for w in answers}, **{f"ok_{w}": ok[w][i] for w in ok}}
                           for i, e in enumerate(test)]}
    with open(f"{args.out}.measure.json", "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps({k: v for k, v in report.items() if k != "examples"}, indent=1))


if __name__ == "__main__":
    main()
