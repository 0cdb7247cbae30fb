"""Time one training step (rollout included) of ours against TRL's SDFTTrainer on the same job; print the ratios.

Same model, batch, rollout length, LoRA r=16 on all linear layers, top-k support, base model as teacher with the
context, temperature 1. Each trainer runs one warm-up step and then `--steps` timed ones; medians are compared.
The last line is `step_vs_trl=<ours/TRL> reg_overhead=<ours λ>0 / ours λ=0>`.
"""

from __future__ import annotations

import sys
import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the checkout's bench/ beside interp/
from bench.machine import load_line  # noqa: E402
from interp.core.models import EMBEDDED, load_model
from interp.core.runs import METRICS_FILE
from interp.core.store import read_jsonl
from training.tasks import load_task
from training.trainer import TrainConfig, train


def ours(args, lam: float, root: Path) -> list[float]:
    cfg = TrainConfig(
        task=args.task, model=args.model, out=str(root / f"ours-lam{lam:g}" / "student"), steps=1 + args.steps,
        batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, top_k=args.top_k, lam=lam,
        placement="user", checkpoint_every=0, lora_r=16, lora_alpha=32,
    )
    result = train(cfg, progress=False)
    lines = read_jsonl(result.out / METRICS_FILE)[1:]
    print(f"ours lam={lam:g}: rollout {statistics.mean(x['rollout_s'] for x in lines):.2f} s of "
          f"{statistics.mean(x['step_s'] for x in lines):.2f} s per step, mean response "
          f"{statistics.mean(x['response_len'] for x in lines):.1f} tokens", flush=True)
    return [x["step_s"] for x in lines]


def trl(args, root: Path) -> list[float]:
    return trl_step_times(args, root, task=args.task)


def trl_step_times(args, root: Path, task: str, placement_user: bool = False) -> list[float]:
    """TRL's SDFTTrainer on the same job: seconds per step after the first. Its teacher prompt is
    "{prompt}\n\n{privileged_context}" in the user turn; `placement_user` puts the context first, as ours does."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer

    lm = load_model(args.model, attn_implementation="sdpa")
    suite = load_task(task)
    data = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": e.prompt}], "privileged_context": e.context} for e in suite.train]
    )

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.t0, self.lengths = [], 0.0, []

        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.t0)

        def on_log(self, args, state, control, logs=None, **k):
            if logs and "completions/mean_length" in logs:
                self.lengths.append((logs["completions/mean_length"], logs.get("completions/max_length", float("nan"))))

    timer = Timer()
    config = SDFTConfig(
        output_dir=str(root / "trl"), per_device_train_batch_size=args.batch_size, num_generations=1,
        max_completion_length=args.max_new_tokens, max_steps=1 + args.steps, learning_rate=2e-4,
        temperature=1.0, top_k=0, distillation_mode="topk_logits", distillation_topk=args.top_k, distillation_alpha=1.0,
        teacher_model_kind="base", logging_steps=1,
        **({"teacher_prompt_template": "{privileged_context}\n\n{prompt}"} if placement_user else {}), report_to=[], save_strategy="no", use_cpu=not torch.cuda.is_available(),
        bf16=False, seed=0, disable_tqdm=True,
    )
    trainer = SDFTTrainer(
        model=lm.model, args=config, train_dataset=data, processing_class=lm.tokenizer, callbacks=[timer],
        peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    trainer.train()
    if timer.lengths[1:]:
        print(f"trl: mean completion {statistics.mean(m for m, _ in timer.lengths[1:]):.1f} tokens, longest "
              f"{statistics.mean(x for _, x in timer.lengths[1:]):.1f} (the decoding steps of its batch)", flush=True)
    return timer.times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=EMBEDDED)
    parser.add_argument("--task", default="persona")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=100, help="TRL's default top-k support")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per trainer, after one warm-up step")
    args = parser.parse_args()
    print(load_line(), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # TRL first and ours last would favour neither: the machine's load is what it is; medians damp the noise.
        t_trl = trl(args, root)
        t_ours = ours(args, 0.0, root)
        t_reg = ours(args, 1.0, root)
    med = {name: statistics.median(t) for name, t in (("ours_lam0", t_ours), ("ours_lam1", t_reg), ("trl_sdft", t_trl))}
    print(f"model={args.model} batch={args.batch_size} new_tokens={args.max_new_tokens} top_k={args.top_k} lora_r=16 threads={torch.get_num_threads()}")
    for name, value in med.items():
        print(f"{name}_step_s={value:.2f}")
    print(f"step_vs_trl={med['ours_lam0'] / med['trl_sdft']:.2f} reg_overhead={med['ours_lam1'] / med['ours_lam0']:.2f}")


if __name__ == "__main__":
    main()
