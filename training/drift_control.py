"""A control for "what breaks generation": an adapter as large as a trained one, pointing in random directions.

For every adapted matrix, the trained update ΔW = s·B·A (s = lora_alpha / r) is replaced by s·B'·A', with A' and
B' Gaussian of the same shapes (rank r), B' scaled so that ‖B'A'‖_F = ‖BA‖_F. So the control changes each matrix by
exactly as much as training did, in directions that carry nothing the teacher taught. If the control's greedy
answers loop as often as the student's, the loops come from the size of the update (drift), not from what it
learned; if they stay at the base's rate, from its direction (docs/measures.md#drift-control).

    python -m training random-adapter --like runs/x/unreg --out runs/x/unreg_random --seed 0
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from interp.core.errors import UserError
from interp.core.runs import ADAPTER_CONFIG, ADAPTER_WEIGHTS, BASE_MODEL_FILE
from interp.core.adapters import check_safetensors
from interp.core.store import read_json


def _pairs(weights: dict[str, torch.Tensor]) -> list[tuple[str, str]]:
    """(lora_A key, lora_B key) of every adapted matrix."""
    out = []
    for key in sorted(weights):
        if ".lora_A." in key:
            b = key.replace(".lora_A.", ".lora_B.")
            if b not in weights:
                raise UserError(f"the adapter has {key} without its lora_B; it is damaged")
            out.append((key, b))
    if not out:
        raise UserError("the adapter has no LoRA matrices (lora_A / lora_B)")
    return out


def random_like(weights: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Random LoRA weights with each matrix's ‖B'A'‖_F equal to the trained ‖BA‖_F (A' keeps ‖A‖_F)."""
    gen = torch.Generator().manual_seed(seed)
    out = dict(weights)
    for ka, kb in _pairs(weights):
        a, b = weights[ka].float(), weights[kb].float()
        target = torch.linalg.matrix_norm(b @ a)
        a2 = torch.randn(a.shape, generator=gen)
        a2 = a2 * (torch.linalg.matrix_norm(a) / torch.linalg.matrix_norm(a2))
        b2 = torch.randn(b.shape, generator=gen)
        b2 = b2 * (target / torch.linalg.matrix_norm(b2 @ a2))
        out[ka], out[kb] = a2.to(weights[ka].dtype).contiguous(), b2.to(weights[kb].dtype).contiguous()
    return out


def write_random_like(like: Path, out: Path, seed: int) -> int:
    """Write the control of the adapter folder `like` to the new folder `out` (its config and base-model record
    copied); returns how many matrices it replaced. `out` must not exist; nothing is left half-written."""
    from safetensors.torch import load_file, save_file

    weights_file = like / ADAPTER_WEIGHTS
    if not weights_file.is_file() or not (like / ADAPTER_CONFIG).is_file():
        raise UserError(f"{like} is not an adapter folder ({ADAPTER_WEIGHTS} and {ADAPTER_CONFIG}); name a trained student's folder")
    if out.exists() or out.is_symlink():
        raise UserError(f"{out} already exists; name a new folder")
    if not out.parent.is_dir():
        raise UserError(f"{out.parent} does not exist; create it first")
    check_safetensors(weights_file, "adapter weights")
    read_json(like / ADAPTER_CONFIG, expect=dict)
    weights = load_file(str(weights_file))
    control = random_like(weights, seed)
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file(control, str(tmp / ADAPTER_WEIGHTS))
        for name in (ADAPTER_CONFIG, BASE_MODEL_FILE):
            if (like / name).is_file():
                shutil.copyfile(like / name, tmp / name)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return len(_pairs(weights))
