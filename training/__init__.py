"""On-policy context distillation with LoRA: train students that internalize a context, then test whether they stay stable when it returns."""

from training.evaluate import EvalResult, evaluate_run
from training.losses import consistency_kl, lam_at, reverse_kl
from training.tasks import SUITES, Example, Task, load_task
from training.trainer import TrainConfig, TrainResult, train

__all__ = [
    "EvalResult", "Example", "SUITES", "Task", "TrainConfig", "TrainResult",
    "consistency_kl", "evaluate_run", "lam_at", "load_task", "reverse_kl", "train",
]
