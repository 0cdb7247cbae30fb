"""Generation cost: our rollout and our evaluation pass against HF `generate` on the bare base model, one process.

The same prompts and token counts for all (every answer forced to `--new-tokens` with `min_new_tokens`), the
student a LoRA adapter of the trainer's shape (r=16 on all linear layers, B drawn away from zero):
- bare: `model.generate` on the base model, the rollout's prompts, sampled at temperature 1 like the rollout;
- rollout: `training.rollout.sample` as the trainer calls it (student with its adapter, temperature 1);
- eval: the evaluation's generation (`training.evaluate.answer`'s call: the three context kinds in one batched
  pass) with the adapter; bare_eval is HF `generate` on the base model over the same prompts and batches.
Also the old paths for the record: the adapter unmerged, and the evaluation as three passes of 16.
Then at natural lengths (no forced tokens: rows stop at their stop token, as in training and evaluation), our
decoding loop, where a finished row leaves the batch, against the same call decoding with HF `generate`
(`engine="hf"`): the evaluation's greedy answers (the same tokens in both; checked) and sampled rollouts (the same
draws until the first row stops; the tokens each produced are printed beside the times).
Minimum of `--repeats` runs each. Last line: `rollout_over_bare=<x> eval_over_bare=<y> bare_ms_per_token=<z>
natural_eval_loop_over_hf=<u> natural_rollout_loop_over_hf=<v>`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the checkout's bench/ beside interp/
from bench.machine import load_line  # noqa: E402
from interp.core.generate import generate, left_pad, stop_ids
from interp.core.models import EMBEDDED, LoadedModel, load_model
from interp.core.pairs import render_prompt_pair
from training.tasks import load_task


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=EMBEDDED)
    ap.add_argument("--rows", type=int, default=8, help="rollouts per step (the trainer's batch size)")
    ap.add_argument("--eval-examples", type=int, default=8, help="test examples of the evaluation pass (×3 context kinds)")
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--old", action="store_true", help="also time the old paths (unmerged adapter, three evaluation passes)")
    args = ap.parse_args()
    print(load_line(), flush=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    from peft import LoraConfig, get_peft_model

    base = load_model(args.model, device="cpu")
    tok = base.tokenizer
    task = load_task("persona_luna", seed=0, n_test=max(args.rows, args.eval_examples))
    examples = task.test
    pps = [render_prompt_pair(tok, e.context, e.prompt, "system", no_context="neutral") for e in examples]
    rollout_prompts = [p.noctx_ids for p in pps[: args.rows]]
    ev = examples[: args.eval_examples]
    eval_prompts = ([p.noctx_ids for p in pps[: args.eval_examples]] + [p.ctx_ids for p in pps[: args.eval_examples]]
                    + [render_prompt_pair(tok, e.cf_context, e.prompt, "system", no_context="neutral").ctx_ids for e in ev if e.cf_context])
    N = args.new_tokens
    stops = stop_ids(base.model, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else stops[0]

    def hf_bare(prompts, batch, sample=False):
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        decoding = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0) if sample else dict(do_sample=False)
        torch.manual_seed(1)
        with torch.no_grad():
            for s in range(0, len(order), batch):
                ids, mask = left_pad([prompts[i] for i in order[s : s + batch]], pad, "cpu")
                base.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=N, min_new_tokens=N, pad_token_id=pad,
                                    eos_token_id=stops, **decoding)

    t_bare = best(lambda: hf_bare(rollout_prompts, args.rows, sample=True), args.repeats)
    t_bare_eval = best(lambda: hf_bare(eval_prompts, 48), args.repeats)
    print(f"bare HF generate: {len(rollout_prompts)} rows × {N} tokens {t_bare:.2f} s; evaluation prompts "
          f"({len(eval_prompts)} in batches of 48) {t_bare_eval:.2f} s", flush=True)

    peft_model = get_peft_model(base.model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    torch.manual_seed(0)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.02)
    student = LoadedModel(model=peft_model, tokenizer=tok, spec=args.model)

    def rollout(merge=True):  # training.rollout.sample's call, forced to N tokens
        generate(student, rollout_prompts, max_new_tokens=N, temperature=1.0, batch_size=args.rows, seed=1, keep_stop=True,
                 merge=merge, min_new_tokens=N)

    def evaluation(merge=True, batch=48, passes=1):  # training.evaluate.answer's call, forced to N tokens
        per = len(eval_prompts) // passes if passes > 1 else len(eval_prompts)
        for s in range(0, len(eval_prompts), per):
            generate(student, eval_prompts[s : s + per], max_new_tokens=N, batch_size=batch, merge=merge, min_new_tokens=N)

    t_roll = best(rollout, args.repeats)
    t_eval = best(evaluation, args.repeats)
    print(f"rollout (adapter merged for the call) {t_roll:.2f} s = {t_roll / t_bare:.2f}× bare", flush=True)
    print(f"evaluation pass (three kinds in one batched pass, merged) {t_eval:.2f} s = {t_eval / t_bare_eval:.2f}× bare", flush=True)
    if args.old:
        t_roll_old = best(lambda: rollout(merge=False), args.repeats)
        t_eval_old = best(lambda: evaluation(merge=False, batch=16, passes=3), args.repeats)
        print(f"old rollout (adapter unmerged) {t_roll_old:.2f} s = {t_roll_old / t_bare:.2f}× bare", flush=True)
        print(f"old evaluation (unmerged, three passes of 16) {t_eval_old:.2f} s = {t_eval_old / t_bare_eval:.2f}× bare; "
              f"new over old {t_eval / t_eval_old:.2f}", flush=True)
    # Natural lengths: our loop (finished rows leave the batch) against the same call decoded by HF generate.
    answers = {}

    def natural_eval(engine):
        answers[engine] = generate(student, eval_prompts, max_new_tokens=N, batch_size=48, engine=engine)

    def natural_rollout(engine, seed):
        got = generate(student, rollout_prompts, max_new_tokens=N, temperature=1.0, batch_size=args.rows, seed=seed,
                       keep_stop=True, engine=engine)
        answers[f"{engine}-{seed}"] = got

    t_ev_hf, t_ev_loop = best(lambda: natural_eval("hf"), args.repeats), best(lambda: natural_eval("loop"), args.repeats)
    assert answers["hf"] == answers["loop"], "greedy answers differ between our loop and HF generate"
    tokens = sum(map(len, answers["loop"]))
    print(f"natural lengths, evaluation ({len(eval_prompts)} greedy answers, {tokens} tokens, the same in both): "
          f"HF generate {t_ev_hf:.2f} s, our loop {t_ev_loop:.2f} s = {t_ev_loop / t_ev_hf:.2f}×", flush=True)
    t_ro = {e: 0.0 for e in ("hf", "loop")}
    for seed in range(1, args.repeats + 2):  # several seeds, summed: the draws part ways once a row stops
        for e in t_ro:
            t0 = time.perf_counter()
            natural_rollout(e, seed)
            t_ro[e] += time.perf_counter() - t0
    tok = {e: sum(len(a) for k, v in answers.items() if k.startswith(f"{e}-") for a in v) for e in t_ro}
    print(f"natural lengths, rollouts ({args.repeats + 1} seeds × {len(rollout_prompts)} rows, sampled): HF generate "
          f"{t_ro['hf']:.2f} s ({tok['hf']} tokens), our loop {t_ro['loop']:.2f} s ({tok['loop']} tokens) = "
          f"{t_ro['loop'] / t_ro['hf']:.2f}×; per token {t_ro['loop'] / tok['loop'] / (t_ro['hf'] / tok['hf']):.2f}×", flush=True)
    per_token = t_bare / (len(rollout_prompts) * N) * 1000
    print(f"rollout_over_bare={t_roll / t_bare:.2f} eval_over_bare={t_eval / t_bare_eval:.2f} bare_ms_per_token={per_token:.1f} "
          f"natural_eval_loop_over_hf={t_ev_loop / t_ev_hf:.2f} natural_rollout_loop_over_hf={t_ro['loop'] / t_ro['hf']:.2f}")


if __name__ == "__main__":
    main()
