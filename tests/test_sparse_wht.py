"""sparse_wht (SPRIGHT): exact and noisy recovery against hadakit's dense WHT, the dense fallback, errors, and
negative controls (signals that are not k-sparse must come back as not converged)."""

import dataclasses
import doctest

import numpy as np
import pytest
import torch

import hadakit.transforms.sparse as sparse_mod
from hadakit.transforms import hadamard_transform, inverse_hadamard_transform, sparse_wht


def _sparse_signal(n, k, seed, noise_snr_db=None):
    """(x, X, support, sigma): X has k random-sign coefficients with magnitudes in [1, 4) (unnormalized WHT),
    x = H·X / N (+ white noise at the paper's SNR = ||x_clean||² / (N·σ²) when noise_snr_db is given)."""
    rng = np.random.default_rng(seed)
    big = 1 << n
    supp = rng.choice(big, size=k, replace=False)
    X = np.zeros(big)
    X[supp] = rng.choice([-1.0, 1.0], size=k) * rng.uniform(1.0, 4.0, size=k) * big
    x = inverse_hadamard_transform(torch.from_numpy(X), normalize=False).numpy()
    sigma = 0.0
    if noise_snr_db is not None:
        sigma = float(np.sqrt(np.dot(x, x) / (big * 10 ** (noise_snr_db / 10))))
        x = x + sigma * rng.standard_normal(big)
    return x, X, np.sort(supp), sigma


def _dense(x):
    return hadamard_transform(torch.from_numpy(x), normalize=False).numpy()


def test_small_fwht_matches_hadakit():
    rng = np.random.default_rng(0)
    for b in list(range(0, 10)) + [17]:  # matrix-product path up to 2**16, radix-2 passes above
        a = rng.standard_normal((3, 1 << b))
        ref = hadamard_transform(torch.from_numpy(a), normalize=False).numpy()
        np.testing.assert_allclose(sparse_mod._fwht_last(a), ref, rtol=0, atol=1e-12)


def test_convention_is_unnormalized_hadakit():
    # The reference X itself: the dense transform of the synthesized signal returns X (so the tests' X is hadakit's).
    x, X, _, _ = _sparse_signal(10, 3, 0)
    np.testing.assert_allclose(_dense(x), X, rtol=0, atol=1e-9 * np.abs(X).max())


CASES = [(n, k) for n in (10, 11, 12, 13, 14) for k in (1, 2, 5, 11, 20)] + [(12, k) for k in range(3, 20, 2)]


@pytest.mark.parametrize("n,k", CASES)
def test_noiseless_exact_recovery(n, k):
    x, X, supp, _ = _sparse_signal(n, k, seed=100 * n + k)
    r = sparse_wht(lambda m: x[m], n, k, seed=k)
    assert r.method == "sparse"  # not the dense fallback
    assert r.converged and r.found == k
    assert r.samples < (1 << n)
    ref = _dense(x)  # the dense reference of the same signal
    assert np.array_equal(np.sort(r.indices), supp)
    np.testing.assert_allclose(r.values, ref[r.indices], rtol=1e-9, atol=0)
    np.testing.assert_allclose(r.values, X[r.indices], rtol=1e-9, atol=0)
    assert np.all(np.diff(np.abs(r.values)) <= 0)  # sorted by magnitude


def test_samples_formula_and_queries():
    n, k = 14, 10
    x, _, _, _ = _sparse_signal(n, k, 1)
    seen = []

    def f(m):
        assert isinstance(m, np.ndarray) and m.dtype == np.int64 and m.ndim == 1
        assert m.min() >= 0 and m.max() < (1 << n)
        seen.append(m.copy())
        return torch.from_numpy(x[m])  # a torch tensor is accepted too

    r = sparse_wht(f, n, k, seed=3, offsets=2)
    b = 4  # ceil(log2 10)
    assert r.samples == 3 * 2 * (1 + n - b) * (1 << b) == sum(len(s) for s in seen)
    assert r.converged


def test_deterministic_and_no_global_rng():
    n, k = 12, 8
    x, _, _, _ = _sparse_signal(n, k, 2, noise_snr_db=15)
    np_state = np.random.get_state()[1].copy()
    torch_state = torch.get_rng_state().clone()
    calls = []
    fn = lambda m: (calls.append(m.copy()), x[m])[1]  # noqa: E731
    r1 = sparse_wht(fn, n, k, noise=0.01, seed=7)
    r2 = sparse_wht(fn, n, k, noise=0.01, seed=7)
    r3 = sparse_wht(fn, n, k, noise=0.01, seed=None, generator=np.random.default_rng(7))
    assert np.array_equal(calls[0], calls[1]) and np.array_equal(calls[0], calls[2])
    for r in (r2, r3):
        assert np.array_equal(r.indices, r1.indices) and np.array_equal(r.values, r1.values)
    sparse_wht(fn, n, k, noise=0.01, seed=8)
    assert not np.array_equal(calls[0], calls[3])  # the seed does change the design
    assert np.array_equal(np.random.get_state()[1], np_state)
    assert torch.equal(torch.get_rng_state(), torch_state)


def test_result_is_frozen():
    x, _, _, _ = _sparse_signal(10, 2, 3)
    r = sparse_wht(lambda m: x[m], 10, 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.converged = False


@pytest.mark.parametrize("seed", range(6))
def test_noisy_recovery(seed):
    n, k, snr_db = 14, 10, 10.0
    x, X, supp, sigma = _sparse_signal(n, k, 500 + seed, noise_snr_db=snr_db)
    r = sparse_wht(lambda m: x[m], n, k, noise=sigma, seed=seed)
    assert r.method == "sparse" and r.converged
    assert np.array_equal(np.sort(r.indices), supp)
    # Each value is a mean over the bin's P delays: error std N·σ/sqrt(B·P); allow 6 std.
    big, bins = 1 << n, 16
    p = r.samples // (3 * bins)
    assert np.max(np.abs(r.values - X[r.indices])) < 6 * big * sigma / np.sqrt(bins * p)


def test_noisy_signal_with_noise_not_declared_is_not_converged():
    n, k = 14, 10
    x, _, _, sigma = _sparse_signal(n, k, 7, noise_snr_db=10.0)
    r = sparse_wht(lambda m: x[m], n, k, noise=0.0, seed=0)
    assert not r.converged


def test_dense_gaussian_is_not_converged():
    n, k = 14, 10
    x = np.random.default_rng(0).standard_normal(1 << n)
    for noise in (0.0, 1e-3):
        r = sparse_wht(lambda m: x[m], n, k, noise=noise, seed=0)
        assert r.method == "sparse" and not r.converged
    r = sparse_wht(lambda m: x[m], n, k, method="dense")
    assert not r.converged


def test_more_coefficients_than_k_is_not_converged():
    n = 14
    x, _, _, _ = _sparse_signal(n, 60, 11)
    r = sparse_wht(lambda m: x[m], n, 5, seed=0)
    assert not r.converged
    assert len(r.indices) <= 5


def test_dense_fallback_matches_dense_top_k():
    n, k = 10, 12
    x = np.random.default_rng(4).standard_normal(1 << n)  # any signal: the dense path is the exact top-k
    ref = _dense(x)
    r = sparse_wht(lambda m: x[m], n, k, method="dense")
    top = np.argsort(-np.abs(ref), kind="stable")[:k]
    assert r.method == "dense" and r.samples == 1 << n and r.iterations == 0
    assert np.array_equal(r.indices, top)
    np.testing.assert_allclose(r.values, ref[top], rtol=1e-12, atol=0)


def test_auto_falls_back_to_dense_when_sparse_costs_more():
    n, k = 10, 200  # 3 groups x 256 bins x 3 delays > 1024 samples
    x, X, supp, _ = _sparse_signal(n, k, 5)
    r = sparse_wht(lambda m: x[m], n, k)
    assert r.method == "dense" and r.converged
    assert np.array_equal(np.sort(r.indices), supp)
    np.testing.assert_allclose(r.values, X[r.indices], rtol=1e-9)
    with pytest.raises(ValueError, match="too large for n"):
        sparse_wht(lambda m: x[m], n, k, method="sparse")


def test_sparse_and_dense_agree_on_sparse_signal():
    n, k = 13, 15
    x, _, _, _ = _sparse_signal(n, k, 9)
    rs = sparse_wht(lambda m: x[m], n, k, seed=1)
    rd = sparse_wht(lambda m: x[m], n, k, method="dense")
    assert rs.converged and rd.converged
    assert np.array_equal(rs.indices, rd.indices)
    np.testing.assert_allclose(rs.values, rd.values, rtol=1e-9)


def _ok(m):
    return np.zeros(m.shape)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(n=10, k=0), ValueError, "k=0"),
        (dict(n=10, k=-3), ValueError, "k=-3"),
        (dict(n=10, k=1025), ValueError, "k=1025"),
        (dict(n=10, k=2.0), TypeError, "k must be an integer"),
        (dict(n=10.0, k=2), TypeError, "pass n=10"),
        (dict(n="10", k=2), TypeError, "n must be an integer"),
        (dict(n=0, k=1), ValueError, "n=0"),
        (dict(n=4194304, k=2), ValueError, "Use n=22"),
        (dict(n=63, k=2), ValueError, "too large"),
        (dict(n=10, k=2, noise=-1.0), ValueError, "noise"),
        (dict(n=10, k=2, method="fast"), ValueError, "method"),
        (dict(n=10, k=2, generator=np.random.default_rng(0)), ValueError, "not both"),
        (dict(n=10, k=2, seed=None), ValueError, "seed"),
        (dict(n=10, k=2, seed=None, generator=0), TypeError, "numpy.random.Generator"),
        (dict(n=10, k=2, offsets=0), ValueError, "offsets"),
        (dict(n=10, k=2, gamma=0), ValueError, "gamma"),
        (dict(n=31, k=2, method="dense"), ValueError, "dense path"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        sparse_wht(_ok, **kwargs)


@pytest.mark.parametrize(
    "fn,exc,match",
    [
        (lambda m: np.zeros(len(m) - 1), ValueError, "shape"),
        (lambda m: np.zeros((len(m), 1)), ValueError, "shape"),
        (lambda m: 0.0, ValueError, "shape"),
        (lambda m: np.zeros(len(m), dtype=np.complex128), TypeError, "dtype"),
        (lambda m: torch.zeros(len(m), dtype=torch.complex64), TypeError, "complex"),
        (lambda m: np.zeros(len(m), dtype=bool), TypeError, "dtype"),
        (lambda m: np.array(["a"] * len(m)), TypeError, "dtype"),
        (lambda m: np.full(len(m), np.nan), ValueError, "NaN"),
    ],
)
def test_bad_signal_fn_output(fn, exc, match):
    with pytest.raises(exc, match=match):
        sparse_wht(fn, 12, 3)
    with pytest.raises(exc, match=match):
        sparse_wht(fn, 6, 3, method="dense")


def test_not_callable():
    with pytest.raises(TypeError, match="callable"):
        sparse_wht(np.zeros(1024), 10, 3)


def test_integer_valued_signal_accepted():
    n = 11
    X = np.zeros(1 << n)
    X[[5, 700, 1999, 1024]] = np.array([3.0, -2.0, 5.0, 1.0]) * (1 << n)
    x = inverse_hadamard_transform(torch.from_numpy(X), normalize=False).numpy()
    xi = np.round(x).astype(np.int64)  # x = H·X / N is integer here
    assert np.array_equal(xi, x)
    r = sparse_wht(lambda m: xi[m], n, 4, seed=0)
    assert r.converged and r.indices.tolist() == [1999, 5, 700, 1024]
    np.testing.assert_allclose(r.values, X[r.indices], rtol=1e-12)


def test_docstring_example():
    result = doctest.testmod(sparse_mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
