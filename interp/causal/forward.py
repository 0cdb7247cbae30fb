"""The causal tools' forward passes: read and write module activations on the measured positions, through nnsight
(default) or plain PyTorch hooks; both give the same numbers. The capture backends of interp.capture only read
hidden states; both build on interp.hooks (the batch, the model's one nnsight wrapper, module envoys)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from interp.core.errors import UserError
from interp.core.archs import decoder_layers, embeddings
from interp.hooks import Batch, envoy, model_inputs, nnsight_model
from interp.lens import logit_lens

from interp.causal.sites import attention_out_proj, block_attention, block_mlp

BACKENDS = ("nnsight", "torch")
# Order of the parts inside one decoder block, as the forward pass computes them; nnsight needs requests in this order.
_PART_ORDER = {"embed": 0, "head_in": 1, "attn": 2, "mlp": 3, "block": 4}


@dataclass(frozen=True)
class Op:
    """Read or write one module's activation at the batch's measured positions.

    `part`: embed | block (the residual stream after a block) | attn (attention output) | mlp | head_in (the input of
    the attention's output projection, the heads side by side); `cols` limits a write to a slice of the features
    (one head)."""

    layer: int
    part: str
    value: torch.Tensor | None = None  # None: read
    cols: tuple[int, int] | None = None

    @property
    def key(self) -> tuple[int, int, int]:
        # Writes before reads on the same module, so a read sees the patched value.
        return (self.layer, _PART_ORDER[self.part], 0 if self.value is not None else 1)


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise UserError(f"unknown backend '{backend}'; use one of {', '.join(BACKENDS)}")


def _module(model, op: Op) -> torch.nn.Module:
    if op.part == "embed":
        return embeddings(model)
    block = decoder_layers(model)[op.layer - 1]
    return {"block": block, "attn": block_attention(block), "mlp": block_mlp(block), "head_in": attention_out_proj(block)}[op.part]


def last_layer_op(model) -> Op:
    """Reading the last block's output on the measured positions gives the logits there (through the lens, which is
    exact at the last layer), without asking the model for a [B, T, vocab] tensor."""
    return Op(len(decoder_layers(model)), "block")


@torch.no_grad()
def run_ops(lm, batch: Batch, ops: list[Op], backend: str = "nnsight", remote: bool = False) -> list[torch.Tensor | None]:
    """One forward of `lm` (its active adapter) on `batch` applying `ops` in forward order; returns, in the order
    given, the values read ([n, features], float32 on the CPU) and None for writes."""
    check_backend(backend)
    order = sorted(range(len(ops)), key=lambda i: ops[i].key)
    run = _run_nnsight if backend == "nnsight" else _run_torch
    got = run(lm, batch, [ops[i] for i in order], remote)
    out: list = [None] * len(ops)
    for i, value in zip(order, got):
        out[i] = None if value is None else value.detach().float().cpu()
    return out


def _write(t: torch.Tensor, rows, positions, op: Op) -> torch.Tensor:
    t = t.clone()
    assert op.value is not None  # only write ops reach here
    value = op.value.to(t.device, t.dtype)
    if op.cols is None:
        t[rows, positions] = value
    else:
        t[rows, positions, op.cols[0] : op.cols[1]] = value
    return t


def _run_torch(lm, batch: Batch, ops: list[Op], remote: bool) -> list:
    if remote:
        raise UserError("remote execution needs the nnsight backend")
    model, device = lm.model, lm.device
    rows, positions = batch.rows.to(device), batch.positions.to(device)
    got: list = [None] * len(ops)
    handles = []

    def out_hook(i, op):
        def hook(module, args, output):
            first = output[0] if isinstance(output, (tuple, list)) else output
            if op.value is None:
                got[i] = first[rows, positions]
                return None
            new = _write(first, rows, positions, op)
            return (new, *output[1:]) if isinstance(output, (tuple, list)) else new
        return hook

    def in_hook(i, op):
        def hook(module, args):
            if op.value is None:
                got[i] = args[0][rows, positions]
                return None
            return (_write(args[0], rows, positions, op), *args[1:])
        return hook

    try:
        for i, op in enumerate(ops):
            module = _module(model, op)
            if op.part == "head_in":
                handles.append(module.register_forward_pre_hook(in_hook(i, op)))
            else:
                handles.append(module.register_forward_hook(out_hook(i, op)))
        model(**model_inputs(batch, device), logits_to_keep=1, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return got


def _run_nnsight(lm, batch: Batch, ops: list[Op], remote: bool) -> list:
    model, device = lm.model, lm.device
    root = nnsight_model(lm)
    rows, positions = batch.rows.to(device), batch.positions.to(device)
    envoys = [envoy(root, model, _module(model, op)) for op in ops]
    got: list = [None] * len(ops)
    with root.trace(**model_inputs(batch, device), logits_to_keep=1, use_cache=False, **({"remote": True} if remote else {})):
        for i, (op, env) in enumerate(zip(ops, envoys)):
            if op.part == "head_in":
                tensor = env.input
            elif op.part == "attn":
                tensor = env.output[0]
            else:
                tensor = env.output
            if op.value is None:
                got[i] = tensor[rows, positions].save()
            elif op.cols is None:
                tensor[rows, positions] = op.value.to(device)
            else:
                tensor[rows, positions, op.cols[0] : op.cols[1]] = op.value.to(device)
    return got


def log_probs(lm, last_hidden: torch.Tensor) -> torch.Tensor:
    """Log-probabilities [n, vocab] from the last block's output on the measured positions (float32, CPU)."""
    return torch.log_softmax(logit_lens(lm.model, last_hidden), dim=-1).cpu()


def kl_rows(logp: torch.Tensor, logq: torch.Tensor, p: torch.Tensor | None = None) -> torch.Tensor:
    """KL(p || q) per row (float64 out), clamped at 0 against rounding. Pass `p = logp.exp()` when one source is
    compared with many runs. The terms stay in float32: equal rows give exactly 0, and a [tokens, vocabulary]
    copy in float64 per patched layer would cost more than the forward pass it measures."""
    p = logp.exp() if p is None else p
    return (p * (logp - logq)).sum(-1).clamp_min(0.0).double()
