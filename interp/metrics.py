"""Similarity of paired hidden states: per-token cosine and linear CKA (biased and debiased), also accumulated over batches."""

from __future__ import annotations

import numpy as np
import torch

from interp.core.distributed import all_reduce_sum

__all__ = ["CKAAccumulator", "cosine_mean", "cosine_per_token", "linear_cka"]


def _f64_device(device: torch.device) -> torch.device:
    """Where float64 work on `device`'s data happens: on the device itself, except MPS (no float64) -> host."""
    return torch.device("cpu") if device.type == "mps" else device


def _f64(x) -> torch.Tensor:
    """A detached float64 copy of a torch tensor (on its own device, so a GPU run never waits on the host) or of an
    array-like (bfloat16 has no numpy dtype, so go through torch)."""
    if isinstance(x, torch.Tensor):
        return x.detach().to(device=_f64_device(x.device), dtype=torch.float64)
    return torch.as_tensor(np.asarray(x, dtype=np.float64))


def _matrix(x, name: str) -> torch.Tensor:
    t = _f64(x)
    if t.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [tokens, features] matrix, got shape {tuple(t.shape)}")
    return t


def _pair(x, y, debiased: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Both matrices as float64, with the same number of rows and enough rows for the estimator."""
    x, y = _matrix(x, "x"), _matrix(y, "y")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y need the same number of rows (tokens): x has shape {tuple(x.shape)}, y {tuple(y.shape)}")
    _check_n(x.shape[0], debiased)
    return x, y


def _check_n(n: int, debiased: bool) -> None:
    if debiased and n < 4:
        raise ValueError(f"debiased CKA needs at least 4 tokens (the U-statistic divides by n(n-3)), got {n}")
    if n < 1:
        raise ValueError("CKA needs at least one token, got 0")


def _centre(x: torch.Tensor) -> torch.Tensor:
    # Subtract the first row before the mean: a constant column then becomes exactly 0 (the mean of n equal floats
    # need not equal them), so a constant matrix gives 0/0 = nan instead of noise; it also tames large offsets.
    x = x - x[:1]
    return x - x.mean(dim=0, keepdim=True)


def cosine_per_token(x, y) -> torch.Tensor:
    """Cosine of row i of x with row i of y, as a float64 tensor [n].

    Convention for zero rows (which would otherwise give 0/0 = nan): a zero row against a non-zero row has cosine 0
    (no shared direction), two zero rows have cosine 1 (identical states). Values are clipped to [-1, 1] against rounding.
    """
    x, y = _matrix(x, "x"), _matrix(y, "y")
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape [n, d], got {tuple(x.shape)} and {tuple(y.shape)}")
    nx, ny = x.norm(dim=1), y.norm(dim=1)
    # Normalise each row first (the product of two tiny norms could underflow where the unit vectors are fine);
    # the clamped norm turns a zero row into the zero vector, so its cosine with anything comes out 0.
    cos = ((x / nx.clamp_min(1e-300)[:, None]) * (y / ny.clamp_min(1e-300)[:, None])).sum(dim=1).clamp(-1.0, 1.0)
    return torch.where((nx == 0) & (ny == 0), torch.ones_like(cos), cos)


def cosine_mean(x, y) -> float:
    """Mean over tokens of `cosine_per_token(x, y)`."""
    return float(cosine_per_token(x, y).mean())


def _cka_from_stats(cxy, cxx, cyy, ab, aa, bb, sa, sb, *, n, debiased: bool):
    """CKA from the centred statistics (works elementwise, so on one layer or a vector of layers).

    cxy, cxx, cyy: squared Frobenius norms of Xc^T Yc, Xc^T Xc, Yc^T Yc; a_i, b_i: squared norms of centred rows;
    ab = sum a_i b_i, aa = sum a_i^2, bb = sum b_i^2, sa = sum a_i, sb = sum b_i. The debiased form is Kornblith's
    `_debiased_dot_product_similarity_helper` (the U-statistic HSIC times n(n-3), a factor that cancels in the ratio).
    A zero denominator (a constant matrix) gives nan; so may a debiased self-similarity that rounds below zero.
    """
    if debiased:
        def hsic(dot, rows, s1, s2):
            return dot - n / (n - 2.0) * rows + s1 * s2 / ((n - 1.0) * (n - 2.0))

        cxy, cxx, cyy = hsic(cxy, ab, sa, sb), hsic(cxx, aa, sa, sa), hsic(cyy, bb, sb, sb)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.asarray(cxy, dtype=np.float64) / (np.sqrt(np.asarray(cxx, np.float64)) * np.sqrt(np.asarray(cyy, np.float64)))


def linear_cka(x, y, debiased: bool = False) -> float:
    """Linear CKA (Kornblith et al. 2019) between x [n, d1] and y [n, d2], in float64 on column-centred features.

    Biased: ||Xc^T Yc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F). Debiased: the unbiased HSIC estimator (Song et al. 2012),
    needs n >= 4 and may be slightly negative. A constant x or y (no variance) returns nan.
    """
    x, y = _pair(x, y, debiased)
    xc, yc = _centre(x), _centre(y)
    a, b = (xc * xc).sum(dim=1), (yc * yc).sum(dim=1)
    stats = [(xc.T @ yc).square().sum(), (xc.T @ xc).square().sum(), (yc.T @ yc).square().sum(),
             a @ b, a @ a, b @ b, a.sum(), b.sum()]
    return float(_cka_from_stats(*(float(s) for s in stats), n=float(x.shape[0]), debiased=debiased))


class CKAAccumulator:
    """Sufficient statistics for linear CKA of many layers over batches of tokens, without keeping the tokens.

    `update(x, y)` takes [num_layers, n_batch, d] (any float dtype; accumulated in float64 on the device of the first
    batch, the host only for MPS); `result(debiased)` equals `linear_cka` on all batches concatenated, one value per
    layer. Across processes: `set_shift` with the same rows everywhere, update, then `all_reduce()` before `result`.
    """

    def __init__(self, num_layers: int, d: int):
        self.num_layers, self.d, self._n = int(num_layers), int(d), 0
        self._s: dict[str, torch.Tensor] | None = None
        self._shift: tuple[torch.Tensor, torch.Tensor] | None = None
        self._iu: torch.Tensor | None = None

    @property
    def n(self) -> int:
        """Number of tokens accumulated so far."""
        return self._n

    @property
    def shift(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The rows subtracted before accumulating ([num_layers, 1, d] each): the first batch's first token."""
        return self._shift

    def set_shift(self, x0: torch.Tensor, y0: torch.Tensor) -> None:
        """Fix the shift before the first update: processes that will add their sums together must share it."""
        if self._n:
            raise ValueError("the shift must be set before any update")
        dev = _f64_device(x0.device)
        self._shift = (x0.detach().to(dev, torch.float64).clone(), y0.detach().to(dev, torch.float64).clone())
        self._zero(dev)

    def _zero(self, dev) -> None:
        L, d = self.num_layers, self.d
        # x xᵀ and y yᵀ are symmetric: only their upper triangles are kept, packed row by row ([L, d(d+1)/2]).
        packed = d * (d + 1) // 2
        self._s = {k: torch.zeros(L, packed, dtype=torch.float64, device=dev) for k in ("xx", "yy")}
        self._s["xy"] = torch.zeros(L, d, d, dtype=torch.float64, device=dev)
        self._s |= {k: torch.zeros(L, d, dtype=torch.float64, device=dev) for k in ("x", "y", "px", "qy", "py", "qx")}
        self._s |= {k: torch.zeros(L, dtype=torch.float64, device=dev) for k in ("p", "q", "pq", "pp", "qq")}

    def _upper(self, dev) -> torch.Tensor:
        """Flat indices of a [d, d] matrix's upper triangle (diagonal included), in the packed order."""
        if self._iu is None or self._iu.device != dev:
            r, c = torch.triu_indices(self.d, self.d, device=dev)
            self._iu = r * self.d + c
        return self._iu

    def _unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """The full symmetric [d, d] matrix from one layer's packed upper triangle."""
        full = torch.zeros(self.d * self.d, dtype=packed.dtype, device=packed.device)
        full[self._upper(packed.device)] = packed
        full = full.view(self.d, self.d)
        return full + full.triu(1).mT

    def all_reduce(self) -> None:
        """Add up the statistics of every process (torch.distributed; a no-op in a single process). The shift must
        be the same on every process (`set_shift`); a process that saw no tokens contributes zeros."""
        if self._s is None:
            raise ValueError("set_shift first: a process with no tokens still adds its (zero) statistics")
        self._s = {k: all_reduce_sum(v) for k, v in self._s.items()}
        dev = next(iter(self._s.values())).device
        self._n = int(all_reduce_sum(torch.tensor([self._n], dtype=torch.float64, device=dev)).item())

    def update(self, x, y) -> None:
        x = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x, dtype=np.float64))
        y = y if isinstance(y, torch.Tensor) else torch.as_tensor(np.asarray(y, dtype=np.float64))
        if x.ndim != 3 or x.shape[0] != self.num_layers or x.shape[2] != self.d or x.shape != y.shape:
            raise ValueError(f"x and y must both have shape ({self.num_layers}, n_batch, {self.d}), got {tuple(x.shape)} and {tuple(y.shape)}")
        if x.shape[1] == 0:
            return
        dev = _f64_device(x.device)  # sums stay on the model's device in float64; MPS has no float64
        if self._shift is None:
            # Statistics of raw sums lose precision when the mean is large against the spread (LLM hidden states
            # have huge outlier dimensions); CKA is translation invariant, so accumulate x - x_first instead.
            self.set_shift(x[:, :1], y[:, :1])
        assert self._shift is not None and self._s is not None  # set by set_shift
        s, upper = self._s, self._upper(dev)
        # One layer at a time: the float64 copies of a batch are then [n_batch, d], not [L, n_batch, d].
        for layer in range(self.num_layers):
            xl = x[layer].detach().to(dev, torch.float64) - self._shift[0][layer].to(dev)
            yl = y[layer].detach().to(dev, torch.float64) - self._shift[1][layer].to(dev)
            p, q = (xl * xl).sum(-1), (yl * yl).sum(-1)  # raw (uncentred) squared row norms [n]
            s["xx"][layer] += (xl.mT @ xl).view(-1)[upper]
            s["yy"][layer] += (yl.mT @ yl).view(-1)[upper]
            s["xy"][layer].addmm_(xl.mT, yl)
            s["x"][layer] += xl.sum(0); s["y"][layer] += yl.sum(0)  # noqa: E702
            s["px"][layer] += p @ xl; s["qy"][layer] += q @ yl  # noqa: E702
            s["py"][layer] += p @ yl; s["qx"][layer] += q @ xl  # noqa: E702
            s["p"][layer] += p.sum(); s["q"][layer] += q.sum(); s["pq"][layer] += p @ q  # noqa: E702
            s["pp"][layer] += p @ p; s["qq"][layer] += q @ q  # noqa: E702
        self._n += x.shape[1]

    def result(self, debiased: bool = False) -> np.ndarray:
        """CKA per layer [num_layers] over every token seen (nan for a layer whose states are constant)."""
        _check_n(self._n, debiased)
        # Combined where the sums live, one layer at a time (a [d, d] float64 matrix is 134 MB at d=4096); only
        # [L] numbers reach the host.
        s, n = self._s, float(self._n)
        assert s is not None  # _check_n passed, so an update (and set_shift) ran

        def cross(m, sx, sy):  # ||centred cross-product||_F^2 from raw sums: C = M - sx sy^T / n
            return (m - sx[:, None] * sy[None, :] / n).square().sum()

        def row_products(spq, sp_v, sq_u, sp, sq, m, su, sv, mu, mv):
            # sum_i a_i b_i with a_i = ||u_i - mu||^2 = p_i - 2 u_i.mu + |mu|^2 and b_i = q_i - 2 v_i.mv + |mv|^2,
            # expanded term by term; sp_v = sum p_i v_i, sq_u = sum q_i u_i, m = sum u_i v_i^T.
            mu2, mv2 = mu @ mu, mv @ mv
            return (spq - 2 * (mv @ sp_v) - 2 * (mu @ sq_u) + mv2 * sp + mu2 * sq + 4 * (mu @ m @ mv)
                    - 2 * mv2 * (mu @ su) - 2 * mu2 * (mv @ sv) + n * mu2 * mv2)

        layers = []
        for k in range(self.num_layers):
            g = {name: v[k] for name, v in s.items()}
            xx, yy = self._unpack(g["xx"]), self._unpack(g["yy"])
            mx, my = g["x"] / n, g["y"] / n
            sa, sb = g["p"] - n * (mx @ mx), g["q"] - n * (my @ my)
            ab = row_products(g["pq"], g["py"], g["qx"], g["p"], g["q"], g["xy"], g["x"], g["y"], mx, my)
            aa = row_products(g["pp"], g["px"], g["px"], g["p"], g["p"], xx, g["x"], g["x"], mx, mx)
            bb = row_products(g["qq"], g["qy"], g["qy"], g["q"], g["q"], yy, g["y"], g["y"], my, my)
            layers.append(torch.stack([cross(g["xy"], g["x"], g["y"]), cross(xx, g["x"], g["x"]), cross(yy, g["y"], g["y"]),
                                       ab, aa, bb, sa, sb]))
        stats = torch.stack(layers, dim=1)  # [8, L]
        return _cka_from_stats(*stats.cpu().numpy(), n=n, debiased=debiased)
