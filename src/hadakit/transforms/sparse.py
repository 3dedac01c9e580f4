"""Sparse Walsh–Hadamard transform from few samples: SPRIGHT (Li, Bradley, Pawar, Ramchandran, arXiv 1508.06336).

``sparse_wht(signal_fn, n, k)`` finds the ``k`` largest coefficients of the ``N = 2**n``-point WHT of a signal that
is only reachable through ``signal_fn(indices) -> values``, querying it at ``O(k·log N)`` indices instead of ``N``.

Conventions
-----------
* ``n`` is the exponent: the signal has ``N = 2**n`` samples, indexed ``0 … N-1``.
* The transform is hadakit's **unnormalized** Sylvester WHT, ``X[k] = Σ_m x[m]·(-1)^popcount(k & m)``, i.e.
  ``hadakit.transforms.hadamard_transform(x, normalize=False)``. Its inverse is ``x = H·X / N``.
* ``signal_fn`` receives a 1-d ``numpy.ndarray`` of dtype ``int64`` and must return one real value per index
  (a 1-d float/int numpy array or a CPU torch tensor of the same length).
* ``noise`` is the standard deviation ``σ`` of additive white noise on each time-domain sample, in the units of
  ``signal_fn``'s output (0 for exact samples). It sets the detection thresholds; it is not estimated.

Algorithm (written from the paper)
----------------------------------
Hashing by subsampling: group ``c`` (of ``groups``, default 3) picks ``b`` index bits ``pos_c`` (random; disjoint
across groups when ``n ≥ groups·b``, else wrapping around so that together they cover all bits), i.e. a subsampling
matrix ``M_c ∈ F2^{n×b}`` made of ``b`` columns of the
identity. For a delay ``d ∈ F2^n`` it reads ``u[l] = x[M_c·l ⊕ d]``, ``l ∈ F2^b``, and takes the ``B = 2**b``-point
WHT. Then ``Y[j] = (N/B)·Σ_l u[l]·(-1)^<j,l> = Σ_{k: M_cᵀk = j} X[k]·(-1)^<k,d>`` (+ noise of variance
``N²σ²/B``): bin ``j`` holds the aliased sum of the coefficients whose bits at ``pos_c`` spell ``j``, each with the
sign pattern ``(-1)^<k,d>``.

Delays: ``offsets`` random offsets ``r_q`` per group, and for each the delays ``r_q`` and ``r_q ⊕ e_i`` for every bit
``i`` not in ``pos_c`` (the bits in ``pos_c`` of a coefficient in bin ``j`` are ``j`` itself). In a singleton bin
``Y[r ⊕ e_i] = (-1)^{k_i}·Y[r]``, so bit ``k_i`` is the sign of ``Σ_q Y[r_q ⊕ e_i]·Y[r_q]`` (a vote over the random
offsets, robust to noise). Bin tests, with ``ν²`` the per-entry noise variance and threshold ``T = (1+γ)·ν²``
(plus a relative floor of ``(rtol·scale)²`` for exact samples):

* zero-ton: mean energy of the bin's delay vector ``≤ T``;
* singleton: the index ``k̂`` from the sign votes, the value ``α̂ = mean_d Y[d]·(-1)^<k̂,d>``, and the residual
  ``mean_d (Y[d] - α̂·(-1)^<k̂,d>)² ≤ T``;
* multi-ton: everything else.

Peeling: every round classifies all bins, subtracts each newly found singleton ``(k̂, α̂)`` from its bin in every
group, and repeats until no singleton is left. Decoding has *converged* when every bin is then a zero-ton (the
found coefficients explain all samples to within the noise) and at most ``k`` coefficients were needed; otherwise
the result says ``converged=False``: the signal is not ``k``-sparse at this noise level (or peeling got stuck).

Dense fallback: when the sparse design would query at least ``N`` samples (small ``N``, large ``k``), or with
``method="dense"``, all ``N`` samples are read and transformed with ``hadamard_transform``; the result is the dense
top-``k``, and ``converged`` says whether the other ``N-k`` coefficients hold no more energy than noise.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

__all__ = ["SparseWHTResult", "sparse_wht"]

_log = logging.getLogger(__name__)

_MAX_N_LOG2 = 62  # indices are int64
_MAX_DENSE_LOG2 = 30  # the dense fallback holds N float64 values
_METHODS = ("auto", "sparse", "dense")


@dataclasses.dataclass(frozen=True)
class SparseWHTResult:
    """Result of :func:`sparse_wht`.

    Attributes:
        indices: int64 indices of the recovered coefficients, sorted by decreasing ``|value|`` (at most ``k``).
        values: float64 coefficient values in the unnormalized convention (``hadamard_transform(normalize=False)``).
        samples: number of indices passed to ``signal_fn`` (counted with multiplicity).
        iterations: number of peeling rounds (0 for the dense path).
        converged: whether the recovered coefficients explain every sample to within the noise threshold with at
            most ``k`` coefficients. ``False`` means: do not trust the result as the signal's sparse transform.
        n: the exponent, ``N = 2**n``.
        method: ``"sparse"`` (SPRIGHT peeling) or ``"dense"`` (full transform).
        found: number of coefficients peeling found before truncation to ``k`` (``k`` or fewer on success).
    """

    indices: np.ndarray
    values: np.ndarray
    samples: int
    iterations: int
    converged: bool
    n: int
    method: str
    found: int

    @property
    def sample_fraction(self) -> float:
        """``samples / N``."""
        return self.samples / float(2**self.n)


# ----------------------------------------------------------------------------------------------------------------
# validation helpers


def _check_int(value: Any, name: str, lo: int, hi: int | None, hint: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"sparse_wht: {name} must be an integer, got {value!r} ({type(value).__name__}){hint}"
        )
    v = int(value)
    if v < lo or (hi is not None and v > hi):
        rng = f"{lo} … {hi}" if hi is not None else f"≥ {lo}"
        raise ValueError(f"sparse_wht: {name}={v} is out of range (valid: {rng}){hint}")
    return v


def _check_n(n: Any) -> int:
    hint = " (n is the exponent: N = 2**n samples, e.g. n=22 for N=4194304)"
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        if isinstance(n, float) and n.is_integer():
            hint += f"; pass n={int(n)}"
        raise TypeError(f"sparse_wht: n must be an integer, got {n!r} ({type(n).__name__}){hint}")
    v = int(n)
    if v > _MAX_N_LOG2:
        extra = ""
        if v > 0 and v & (v - 1) == 0:
            extra = f"; did you pass N instead of log2(N)? Use n={v.bit_length() - 1}"
        raise ValueError(f"sparse_wht: n={v} is too large (indices are int64, so n ≤ {_MAX_N_LOG2}){hint}{extra}")
    if v < 1:
        raise ValueError(f"sparse_wht: n={v} is out of range (valid: 1 … {_MAX_N_LOG2}){hint}")
    return v


def _query(signal_fn: Callable[[np.ndarray], Any], idx: np.ndarray) -> np.ndarray:
    """Calls ``signal_fn`` on a 1-d int64 array and checks what comes back; returns float64 values."""
    out = signal_fn(idx)
    if isinstance(out, torch.Tensor):
        if out.is_complex():
            raise TypeError(
                f"sparse_wht: signal_fn returned a complex tensor ({out.dtype}); it must return real values"
            )
        out = out.detach().cpu().numpy()
    arr = np.asarray(out)
    if arr.shape != idx.shape:
        raise ValueError(
            f"sparse_wht: signal_fn returned shape {arr.shape} for {idx.shape[0]} indices; it must return one "
            f"value per index, a 1-d array of shape {idx.shape}"
        )
    if arr.dtype == np.bool_ or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(
            f"sparse_wht: signal_fn returned dtype {arr.dtype}; it must return real numbers (a float or integer "
            f"numpy array or torch tensor), e.g. x[idx].astype(np.float64)"
        )
    arr = arr.astype(np.float64, copy=False)
    if not np.isfinite(arr).all():
        raise ValueError("sparse_wht: signal_fn returned NaN or infinite values; the samples must be finite")
    return arr


# ----------------------------------------------------------------------------------------------------------------
# small WHT and bit helpers


def _sylvester(b: int) -> np.ndarray:
    """The ±1 Sylvester matrix of order 2**b, float64."""
    h = np.ones((1, 1))
    for _ in range(b):
        h = np.block([[h, h], [h, -h]])
    return h


def _fwht_last(a: np.ndarray) -> np.ndarray:
    """Unnormalized Sylvester WHT along the last axis (a power of two), float64, out of place.

    Up to 2**16 points it is two small matrix products, ``H_{2^b1} · X · H_{2^b2}`` on the last axis viewed as
    ``(2^b1, 2^b2)`` (Sylvester's ``H_{2^b} = H_{2^b1} ⊗ H_{2^b2}`` in row-major order); above, radix-2 passes.
    """
    m = a.shape[-1]
    b = m.bit_length() - 1
    if b <= 16:
        b1 = b // 2
        x = np.asarray(a, dtype=np.float64).reshape(-1, 1 << b1, 1 << (b - b1))
        return (_sylvester(b1) @ x @ _sylvester(b - b1)).reshape(a.shape)
    src = np.array(a, dtype=np.float64, order="C")  # a private copy
    dst = np.empty_like(src)
    rows = src.size // m
    h = 1
    while h < m:
        v = src.reshape(rows, m // (2 * h), 2, h)
        w = dst.reshape(rows, m // (2 * h), 2, h)
        np.add(v[:, :, 0], v[:, :, 1], out=w[:, :, 0])
        np.subtract(v[:, :, 0], v[:, :, 1], out=w[:, :, 1])
        src, dst = dst, src
        h *= 2
    return src


def _parity_sign(a: np.ndarray) -> np.ndarray:
    """``(-1)^popcount(a)`` as float64 (a: int64 array)."""
    return 1.0 - 2.0 * (np.bitwise_count(a) & 1).astype(np.float64)


# ----------------------------------------------------------------------------------------------------------------
# design


@dataclasses.dataclass(frozen=True)
class _Design:
    n: int
    b: int
    positions: np.ndarray  # (C, b) int64: the bits each group hashes on
    free: np.ndarray  # (C, n-b) int64: the other bits, found from the delays
    base: np.ndarray  # (C, B) int64: M_c·l for l = 0 … B-1
    delays: np.ndarray  # (C, P1, D) int64, D = 1 + n - b: r_q, r_q ⊕ e_free[0], …

    @property
    def samples(self) -> int:
        return int(self.delays.size * self.base.shape[1])


def _make_design(n: int, b: int, groups: int, offsets: int, rng: np.random.Generator) -> _Design:
    bins = 1 << b
    # A random permutation of the bits, cut into consecutive runs of b: disjoint hashes when groups·b ≤ n; otherwise
    # the runs wrap around, so the groups together still cover every bit (two different indices then never share
    # their bin in every group, which would stall peeling).
    perm = rng.permutation(n)
    positions = np.sort(perm[(np.arange(groups)[:, None] * b + np.arange(b)[None, :]) % n], axis=1).astype(np.int64)
    free = np.stack([np.setdiff1d(np.arange(n, dtype=np.int64), p) for p in positions]).reshape(groups, n - b)
    lbits = (np.arange(bins, dtype=np.int64)[:, None] >> np.arange(b, dtype=np.int64)) & 1  # (B, b)
    base = (lbits[None, :, :] << positions[:, None, :]).sum(axis=2)  # (C, B)
    r = rng.integers(0, 1 << n, size=(groups, offsets), dtype=np.int64)
    unit = np.concatenate([np.zeros((groups, 1), np.int64), np.left_shift(1, free)], axis=1)  # (C, D)
    delays = r[:, :, None] ^ unit[:, None, :]  # (C, P1, D)
    return _Design(n, b, positions, free, base, delays)


def _bins_of(design: _Design, ks: np.ndarray) -> np.ndarray:
    """(C, m) bin index of each coefficient index in every group."""
    bits = (ks[None, None, :] >> design.positions[:, :, None]) & 1  # (C, b, m)
    return (bits << np.arange(design.b, dtype=np.int64)[None, :, None]).sum(axis=1)


# ----------------------------------------------------------------------------------------------------------------
# decoders


def _decode_sparse(signal_fn, design: _Design, k: int, noise: float, gamma: float, rtol: float,
                   max_iterations: int) -> SparseWHTResult:
    n, b = design.n, design.b
    groups, offsets, d_count = design.delays.shape
    bins = 1 << b
    idx = (design.base[:, None, None, :] ^ design.delays[:, :, :, None]).reshape(-1)  # (C·P1·D·B,)
    vals = _query(signal_fn, idx)
    # Y[c, q, p, j] = Σ_{k in bin j of group c} X[k]·(-1)^<k, delay[c, q, p]>
    y = _fwht_last(vals.reshape(groups, offsets, d_count, bins)) * (2.0 ** (n - b))

    # Bin-major layout: yb[c, j] is bin j's (P1, D) delay vector; only the bins still holding energy are decoded.
    yb = np.ascontiguousarray(y.transpose(0, 3, 1, 2))  # (C, B, P1, D)
    energy = np.mean(yb * yb, axis=(2, 3))  # (C, B)
    scale2 = float(energy.max()) if energy.size else 0.0
    nu2 = (2.0 ** (2 * n - b)) * noise * noise  # per-entry noise variance of Y: N²σ²/B
    thr = (1.0 + gamma) * (nu2 + (rtol * rtol) * scale2)
    if scale2 == 0.0:
        thr = 0.0

    found: dict[int, float] = {}
    rounds = 0
    all_zero = False
    while True:
        active = energy > thr
        if not active.any():
            all_zero = True
            break
        if rounds >= max_iterations:
            _log.debug("sparse_wht: stopped at the iteration limit %d", max_iterations)
            break
        ca, ja = np.nonzero(active)
        ya = yb[ca, ja]  # (m, P1, D)
        # Bit votes over the random offsets: sign of Σ_q Y[r_q ⊕ e_i]·Y[r_q].
        votes = np.einsum("mqp,mq->mp", ya[:, :, 1:], ya[:, :, 0])  # (m, n-b)
        khat = design.base[ca, ja] + ((votes < 0).astype(np.int64) << design.free[ca]).sum(axis=1)  # (m,)
        signs = _parity_sign(khat[:, None, None] & design.delays[ca])  # (m, P1, D)
        alpha = np.mean(ya * signs, axis=(1, 2))  # (m,)
        resid = np.mean((ya - alpha[:, None, None] * signs) ** 2, axis=(1, 2))  # direct: no cancellation
        single = resid <= thr
        if not single.any():
            break
        ks, first = np.unique(khat[single], return_index=True)
        al = alpha[single][first]
        rounds += 1
        for kk, aa in zip(ks.tolist(), al.tolist()):
            found[kk] = found.get(kk, 0.0) + aa
        # Peel: subtract α̂·(-1)^<k̂, d> from the coefficient's bin in every group.
        jb = _bins_of(design, ks)  # (C, m)
        for c in range(groups):
            sc = _parity_sign(ks[:, None, None] & design.delays[c][None, :, :]) * al[:, None, None]  # (m, P1, D)
            touched = np.unique(jb[c])
            if touched.size == jb[c].size:
                yb[c, jb[c]] -= sc
            else:  # two new coefficients share a bin of this group
                np.add.at(yb[c], jb[c], -sc)
            energy[c, touched] = np.mean(yb[c, touched] ** 2, axis=(1, 2))
        if len(found) > 4 * groups * bins:  # far more coefficients than the design can hold: not sparse
            break

    ind = np.fromiter(found.keys(), dtype=np.int64, count=len(found))
    val = np.fromiter(found.values(), dtype=np.float64, count=len(found))
    keep = val != 0.0
    ind, val = ind[keep], val[keep]
    order = np.lexsort((ind, -np.abs(val)))
    ind, val = ind[order], val[order]
    n_found = int(ind.size)
    converged = all_zero and n_found <= k
    _log.debug("sparse_wht: %d samples, %d rounds, %d found, converged=%s", idx.size, rounds, n_found, converged)
    return SparseWHTResult(ind[:k].copy(), val[:k].copy(), int(idx.size), rounds, bool(converged), n, "sparse",
                           n_found)


def _decode_dense(signal_fn, n: int, k: int, noise: float, gamma: float, rtol: float) -> SparseWHTResult:
    if n > _MAX_DENSE_LOG2:
        raise ValueError(
            f"sparse_wht: the dense path needs all N = 2**{n} samples in memory; it supports n ≤ {_MAX_DENSE_LOG2}. "
            f"Use method='sparse' with a smaller k or more bins"
        )
    from hadakit.transforms.functional import hadamard_transform

    big = 1 << n
    idx = np.arange(big, dtype=np.int64)
    vals = _query(signal_fn, idx)
    spec = hadamard_transform(torch.from_numpy(vals), normalize=False).numpy()
    mag = np.abs(spec)
    top = np.argpartition(-mag, k - 1)[:k] if k < big else np.arange(big)
    order = np.lexsort((top, -mag[top]))
    top = top[order].astype(np.int64)
    total = float(np.dot(spec, spec))
    others = spec.copy()
    others[top] = 0.0
    rest = float(np.dot(others, others))  # directly, not total - top: no cancellation
    # Each unnormalized coefficient carries noise of variance N·σ².
    thr = (1.0 + gamma) * ((big - k) * big * noise * noise + (rtol * rtol) * total)
    converged = rest <= thr
    return SparseWHTResult(top, spec[top].astype(np.float64), big, 0, bool(converged), n, "dense", int(top.size))


# ----------------------------------------------------------------------------------------------------------------
# public entry point


def sparse_wht(
    signal_fn: Callable[[np.ndarray], Any],
    n: int,
    k: int,
    *,
    noise: float = 0.0,
    seed: int | None = 0,
    generator: np.random.Generator | None = None,
    groups: int = 3,
    bins_log2: int | None = None,
    offsets: int | None = None,
    gamma: float = 1.0,
    rtol: float = 1e-9,
    method: str = "auto",
    max_iterations: int | None = None,
) -> SparseWHTResult:
    """The ``k`` largest coefficients of the ``2**n``-point (unnormalized) WHT of a ``k``-sparse signal, by SPRIGHT.

    The signal is read only through ``signal_fn`` at ``groups·offsets·(1+n-b)·2**b`` indices
    (``b = bins_log2``), i.e. ``O(k log N)``; see the module docstring for the algorithm and conventions.

    Args:
        signal_fn: called once with a 1-d ``int64`` numpy array of indices in ``[0, 2**n)``; returns the signal's
            values there (1-d real numpy array or CPU torch tensor of the same length).
        n: the exponent: the signal has ``N = 2**n`` samples (1 ≤ n ≤ 62; the dense path needs n ≤ 30).
        k: the sparsity to recover (1 ≤ k ≤ 2**n); at most ``k`` coefficients are returned.
        noise: standard deviation of the additive noise on each sample (0: exact samples).
        seed: seed of the random design (hash bits and offsets); the result is a pure function of the inputs.
        generator: a ``numpy.random.Generator`` to draw the design from instead of ``seed`` (it advances).
        groups: number of hash groups ``C`` (each coefficient lands in one bin of every group).
        bins_log2: ``b``, bins per group ``2**b``; default ``ceil(log2 k)`` (at least 1), i.e. ``2**b ≥ k``.
        offsets: random offsets per group (the sign votes); default 1 for exact samples, else ``max(3, ceil(log2 n))``.
        gamma: noise threshold margin: a bin is empty when its mean energy is at most ``(1+gamma)·ν²``.
        rtol: relative floor of the thresholds (the rounding level of exact samples).
        method: ``"auto"`` (sparse unless it would need ≥ N samples), ``"sparse"`` or ``"dense"``.
        max_iterations: cap on peeling rounds (default ``4·groups·2**b``).

    Returns:
        A :class:`SparseWHTResult`; check ``converged`` before trusting it.

    Example:
        >>> import torch, hadakit
        >>> n = 16
        >>> X = torch.zeros(2 ** n, dtype=torch.float64)
        >>> X[[3, 40000, 777]] = torch.tensor([5.0, -2.0, 1.5], dtype=torch.float64)
        >>> x = hadakit.inverse_hadamard_transform(X, normalize=False).numpy()  # time domain, x = H·X / N
        >>> r = sparse_wht(lambda m: x[m], n, 3)
        >>> r.converged, r.indices.tolist(), r.values.round(9).tolist(), r.samples, r.samples < 2 ** n // 100
        (True, [3, 40000, 777], [5.0, -2.0, 1.5], 180, True)
    """
    if not callable(signal_fn):
        raise TypeError(f"sparse_wht: signal_fn must be callable (indices -> values), got {type(signal_fn).__name__}")
    n = _check_n(n)
    big = 1 << n
    k = _check_int(k, "k", 1, big, f" (k is the number of coefficients to recover; N = 2**{n} = {big})")
    if isinstance(noise, bool) or not isinstance(noise, numbers.Real) or not math.isfinite(noise) or noise < 0:
        raise ValueError(f"sparse_wht: noise must be a finite standard deviation ≥ 0, got {noise!r}")
    noise = float(noise)
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real) or not (gamma > 0 and math.isfinite(gamma)):
        raise ValueError(f"sparse_wht: gamma must be a finite number > 0 (e.g. 1.0), got {gamma!r}")
    if isinstance(rtol, bool) or not isinstance(rtol, numbers.Real) or not (0 <= rtol < 1):
        raise ValueError(f"sparse_wht: rtol must be in [0, 1), e.g. 1e-9, got {rtol!r}")
    if method not in _METHODS:
        raise ValueError(f"sparse_wht: method must be one of {_METHODS}, got {method!r}")
    groups = _check_int(groups, "groups", 1, 16)
    if seed is not None and generator is not None:
        raise ValueError("sparse_wht: pass seed or generator, not both (seed=None to use the generator)")
    if generator is not None and not isinstance(generator, np.random.Generator):
        raise TypeError(
            f"sparse_wht: generator must be a numpy.random.Generator (np.random.default_rng(seed)), "
            f"got {type(generator).__name__}"
        )
    if seed is None and generator is None:
        raise ValueError("sparse_wht: pass a seed (int) or a generator; the design is random and must be seeded")
    if bins_log2 is None:
        b = max(1, math.ceil(math.log2(k)))
    else:
        b = _check_int(bins_log2, "bins_log2", 1, n, f" (bins per group are 2**bins_log2; N = 2**{n})")
    if offsets is None:
        offsets = 1 if noise == 0 else max(3, math.ceil(math.log2(max(n, 2))))
    offsets = _check_int(offsets, "offsets", 1, 1 << 12)
    if max_iterations is None:
        max_iterations = 4 * groups * (1 << min(b, n))
    max_iterations = _check_int(max_iterations, "max_iterations", 1, None)
    if seed is not None:
        seed = _check_int(seed, "seed", 0, None)

    sparse_samples = groups * offsets * (1 + max(n - b, 0)) * (1 << min(b, n))
    if method == "sparse" and (b >= n or sparse_samples >= big):
        raise ValueError(
            f"sparse_wht: k={k} is too large for n={n}: the sparse design ({groups} groups × 2**{b} bins × "
            f"{offsets}·{1 + max(n - b, 0)} delays = {sparse_samples} samples) needs at least N = {big} samples. "
            f"Use method='auto' or 'dense' (the full transform), or a larger n / smaller k"
        )
    if method == "dense" or (method == "auto" and (b >= n or sparse_samples >= big)):
        _log.debug("sparse_wht: dense path (sparse design would take %d ≥ N = %d samples)", sparse_samples, big)
        return _decode_dense(signal_fn, n, k, noise, float(gamma), float(rtol))
    rng = generator if generator is not None else np.random.default_rng(seed)
    design = _make_design(n, b, groups, offsets, rng)
    return _decode_sparse(signal_fn, design, k, noise, float(gamma), float(rtol), max_iterations)
