"""Analysis across processes (torchrun): which batches a process measures, and how per-process results are combined.

Batches of pairs are dealt round-robin (batch k to rank k mod world), so rank 0 always measures the first batch,
as a single process does. Sums (CKA statistics, attention masses) are all-reduced; per-token arrays travel as
objects and are put back in batch order, so every rank ends with the numbers one process would compute.
Gloo carries CPU tensors and NCCL GPU ones; tensors are moved to what the backend carries and back.
"""

from __future__ import annotations

import os

import torch

__all__ = ["all_gather_objects", "all_reduce_sum", "barrier", "broadcast", "init_from_env", "is_main", "world"]


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def world() -> tuple[int, int]:
    """(rank, number of processes); (0, 1) outside a process group."""
    dist = _dist()
    return (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)


def is_main() -> bool:
    return world()[0] == 0


def init_from_env() -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1): NCCL with one GPU per process, else gloo.

    Returns whether this process is part of a group of several. A no-op for a plain single process.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
    return True


def _carrier(t: torch.Tensor) -> torch.Tensor:
    dist = _dist()
    if dist.get_backend() == "nccl":
        return t if t.device.type == "cuda" else t.cuda()
    return t.cpu()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of `t` over all processes, on `t`'s device (returns `t` itself outside a group)."""
    if _dist() is None:
        return t
    carried = _carrier(t).clone()
    _dist().all_reduce(carried)
    return carried.to(t.device)


def broadcast(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank `src`'s `t` on every process (same shape and dtype everywhere), on `t`'s device."""
    if _dist() is None:
        return t
    carried = _carrier(t).clone()
    _dist().broadcast(carried, src)
    return carried.to(t.device)


def all_gather_objects(obj) -> list:
    """Every process's `obj` (picklable; keep tensors on the host), in rank order."""
    dist = _dist()
    if dist is None:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if _dist() is not None:
        _dist().barrier()
