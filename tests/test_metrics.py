"""Tests for interp.metrics: cosine and linear CKA against float64 numpy references written here."""

import numpy as np
import pytest
import torch

from interp.metrics import CKAAccumulator, _centre, _pair, cosine_mean, cosine_per_token, linear_cka


def _hsic_gram(k: torch.Tensor, l: torch.Tensor, debiased: bool) -> torch.Tensor:
    n = k.shape[0]
    if not debiased:
        h = torch.eye(n, dtype=k.dtype, device=k.device) - 1.0 / n
        return ((h @ k @ h) * (h @ l @ h)).sum()
    # U-statistic HSIC on Gram matrices with zeroed diagonals (Song et al. 2012), times n(n-3) which cancels.
    k, l = k - torch.diag(torch.diag(k)), l - torch.diag(torch.diag(l))
    k1, l1 = k.sum(dim=1), l.sum(dim=1)
    return (k * l).sum() + k1.sum() * l1.sum() / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (k1 @ l1)


def linear_cka_gram(x, y, debiased: bool = False) -> float:
    """An independent oracle for `linear_cka`: HSIC on the n x n Gram matrices of the centred features."""
    x, y = _pair(x, y, debiased)
    xc, yc = _centre(x), _centre(y)
    k, l = xc @ xc.T, yc @ yc.T
    num, kk, ll = _hsic_gram(k, l, debiased), _hsic_gram(k, k, debiased), _hsic_gram(l, l, debiased)
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.float64(float(num)) / (np.sqrt(np.float64(float(kk))) * np.sqrt(np.float64(float(ll)))))


def _data(n=40, d1=12, d2=9, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d1))
    # y shares structure with x plus noise, so CKA sits well inside (0, 1).
    y = x @ rng.standard_normal((d1, d2)) + 0.8 * rng.standard_normal((n, d2))
    return x, y


def _ref_biased(x, y):
    x, y = x - x.mean(0), y - y.mean(0)
    return np.linalg.norm(x.T @ y) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def _ref_hsic_u(k, l):
    """U-statistic HSIC of Song et al. 2012 with zero-diagonal Gram matrices, including the 1/(n(n-3)) factor."""
    n = k.shape[0]
    k, l = k - np.diag(np.diag(k)), l - np.diag(np.diag(l))
    one = np.ones(n)
    return (np.trace(k @ l) + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
            - 2.0 / (n - 2) * (one @ k @ l @ one)) / (n * (n - 3))


def _ref_debiased(x, y):
    x, y = x - x.mean(0), y - y.mean(0)
    k, l = x @ x.T, y @ y.T
    return _ref_hsic_u(k, l) / np.sqrt(_ref_hsic_u(k, k) * _ref_hsic_u(l, l))


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_self_is_one(debiased):
    x, _ = _data()
    assert linear_cka(x, x, debiased=debiased) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka_gram(x, x, debiased=debiased) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_invariances(debiased):
    x, y = _data()
    base = linear_cka(x, y, debiased=debiased)
    assert 0.2 < base < 0.95
    q, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((y.shape[1], y.shape[1])))
    assert linear_cka(x, y @ q, debiased=debiased) == pytest.approx(base, abs=1e-12)
    assert linear_cka(x * 37.5, y, debiased=debiased) == pytest.approx(base, abs=1e-12)
    assert linear_cka(x, y + 5.0, debiased=debiased) == pytest.approx(base, abs=1e-12)  # columns are centred


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_not_invariant_to_general_linear_map(debiased):
    x, y = _data()
    rng = np.random.default_rng(2)
    q1, _ = np.linalg.qr(rng.standard_normal((9, 9)))
    q2, _ = np.linalg.qr(rng.standard_normal((9, 9)))
    a = q1 @ np.diag(np.logspace(0, 3, 9)) @ q2  # invertible, condition number 1000
    base, moved = linear_cka(x, y, debiased=debiased), linear_cka(x, y @ a, debiased=debiased)
    assert abs(moved - base) > 0.05


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("shape", [(40, 12, 9), (6, 30, 20), (200, 5, 7)])
def test_gram_and_feature_forms_agree_with_reference(debiased, shape):
    x, y = _data(*shape, seed=sum(shape))
    ref = _ref_debiased(x, y) if debiased else _ref_biased(x, y)
    assert linear_cka(x, y, debiased=debiased) == pytest.approx(ref, abs=1e-12)
    assert linear_cka_gram(x, y, debiased=debiased) == pytest.approx(ref, abs=1e-12)


def test_debiased_differs_from_biased_and_can_be_negative():
    x, y = _data()
    assert abs(linear_cka(x, y, debiased=True) - linear_cka(x, y)) > 1e-3
    rng = np.random.default_rng(3)
    vals = [linear_cka(rng.standard_normal((10, 4)), rng.standard_normal((10, 4)), debiased=True) for _ in range(20)]
    assert min(vals) < 0  # independent data: the unbiased estimator scatters around 0
    assert min(linear_cka(rng.standard_normal((10, 4)), rng.standard_normal((10, 4))) for _ in range(20)) > 0


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize(
    "dtype,tol",
    [(torch.float32, 1e-5), (torch.float16, 3e-3), (torch.bfloat16, 2e-2), (np.float32, 1e-5), (np.float16, 3e-3)],
)
def test_cka_low_precision_inputs(dtype, tol, debiased):
    x, y = _data(n=64)
    if isinstance(dtype, torch.dtype):
        xl, yl = torch.from_numpy(x).to(dtype), torch.from_numpy(y).to(dtype)
    else:
        xl, yl = x.astype(dtype), y.astype(dtype)
    got = linear_cka(xl, yl, debiased=debiased)
    assert isinstance(got, float)
    assert got == pytest.approx(linear_cka(x, y, debiased=debiased), abs=tol)


@pytest.mark.parametrize("debiased", [False, True])
def test_accumulator_matches_all_at_once(debiased):
    rng = np.random.default_rng(4)
    layers, d, sizes = 3, 7, [5, 1, 13, 2, 9]
    # A large per-layer offset (like LLM outlier dimensions) checks the numerics of the expanded sums.
    offset = np.array([0.0, 50.0, -300.0])[:, None, None] * rng.standard_normal((1, 1, d))
    xs = [rng.standard_normal((layers, m, d)) + offset for m in sizes]
    ys = [0.5 * xb + rng.standard_normal((layers, m, d)) for xb, m in zip(xs, sizes)]
    acc = CKAAccumulator(layers, d)
    for xb, yb in zip(xs, ys):
        acc.update(torch.from_numpy(xb), torch.from_numpy(yb))
    assert acc.n == sum(sizes)
    got = acc.result(debiased=debiased)
    assert got.shape == (layers,)
    x, y = np.concatenate(xs, 1), np.concatenate(ys, 1)
    for l in range(layers):
        ref = _ref_debiased(x[l], y[l]) if debiased else _ref_biased(x[l], y[l])
        assert got[l] == pytest.approx(ref, abs=1e-10)
        assert got[l] == pytest.approx(linear_cka(x[l], y[l], debiased=debiased), abs=1e-10)


def test_accumulator_float32_and_constant_layer():
    x = torch.randn(2, 30, 6, generator=torch.Generator().manual_seed(0))
    y = x + 0.3 * torch.randn(2, 30, 6, generator=torch.Generator().manual_seed(1))
    x[1] = 2.5  # a constant layer has no variance: CKA is undefined
    acc = CKAAccumulator(2, 6)
    acc.update(x[:, :11], y[:, :11])
    acc.update(x[:, 11:], y[:, 11:])
    for debiased in (False, True):
        got = acc.result(debiased=debiased)
        assert got[0] == pytest.approx(linear_cka(x[0], y[0], debiased=debiased), abs=1e-10)
        assert np.isnan(got[1])


def test_constant_matrix_gives_nan():
    x, y = _data()
    c = np.full_like(x, 0.1)
    for debiased in (False, True):
        assert np.isnan(linear_cka(c, y, debiased=debiased))
        assert np.isnan(linear_cka_gram(c, y, debiased=debiased))


def test_errors():
    x, y = _data()
    with pytest.raises(ValueError, match=r"\(40, 12\).*\(39, 9\)"):
        linear_cka(x, y[:-1])
    with pytest.raises(ValueError, match="rows"):
        linear_cka_gram(x, y[:-1])
    with pytest.raises(ValueError, match="at least 4"):
        linear_cka(x[:3], y[:3], debiased=True)
    assert np.isfinite(linear_cka(x[:3], y[:3]))  # the biased form has no such limit
    with pytest.raises(ValueError, match="2-D"):
        linear_cka(x[:, 0], y[:, 0])
    with pytest.raises(ValueError, match="2-D"):
        cosine_per_token(x[0], x[0])
    with pytest.raises(ValueError, match="same shape"):
        cosine_per_token(x, x[:-1])
    acc = CKAAccumulator(2, 12)
    with pytest.raises(ValueError, match=r"\(2, n_batch, 12\)"):
        acc.update(torch.zeros(2, 5, 12), torch.zeros(2, 4, 12))
    with pytest.raises(ValueError, match=r"\(2, n_batch, 12\)"):
        acc.update(torch.zeros(3, 5, 12), torch.zeros(3, 5, 12))
    with pytest.raises(ValueError, match=r"\(2, n_batch, 12\)"):
        acc.update(torch.zeros(5, 12), torch.zeros(5, 12))
    acc.update(torch.randn(2, 3, 12), torch.randn(2, 3, 12))
    with pytest.raises(ValueError, match="at least 4"):
        acc.result(debiased=True)
    with pytest.raises(ValueError, match="at least one"):
        CKAAccumulator(2, 12).result()


def test_cosine_per_token_against_formula():
    x, _ = _data(n=20, d1=8)
    y = np.random.default_rng(6).standard_normal((20, 8))
    ref = np.einsum("ij,ij->i", x, y) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
    got = cosine_per_token(torch.from_numpy(x).float(), y)
    assert got.dtype == torch.float64 and got.shape == (20,)
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-6)
    np.testing.assert_allclose(cosine_per_token(x, y).numpy(), ref, atol=1e-14)
    assert cosine_mean(x, y) == pytest.approx(ref.mean(), abs=1e-14)


def test_cosine_zero_rows_and_positive_multiple():
    x = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [3.0, -1.0, 0.5]])
    y = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [6.0, -2.0, 1.0]])
    got = cosine_per_token(x, y).numpy()
    assert not np.isnan(got).any()
    np.testing.assert_array_equal(got[:3], [1.0, 0.0, 0.0])
    assert got[3] == pytest.approx(1.0, abs=1e-15)
    z = np.random.default_rng(7).standard_normal((50, 16)) * 1e3
    np.testing.assert_allclose(cosine_per_token(z, 0.001 * z).numpy(), 1.0, atol=1e-14)
    np.testing.assert_allclose(cosine_per_token(z, -z).numpy(), -1.0, atol=1e-14)
    assert cosine_mean(torch.from_numpy(z).bfloat16(), z) == pytest.approx(1.0, abs=1e-3)
