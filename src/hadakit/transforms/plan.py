"""How a transform of a given size is built: which base matrix ``m × m`` goes with ``H_{2^k}``.

A size ``n = m · 2^k`` whose ``m`` has a Hadamard matrix (``matrices.base_order``) uses it. Other sizes are refused
with an error naming the nearest supported sizes, unless the caller opts into an explicit orthogonal fallback
``Q_o ⊗ H_{2^k}`` (``o`` the odd part of ``n``; ``Q_o`` the orthonormal DCT-II matrix or a seeded random orthogonal
matrix). Never zero padding: padding to a power of two and truncating is not an orthogonal map.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from hadakit.transforms import matrices

FALLBACKS = ("dct", "random")
# A dense fallback base beyond this order would cost more than the transform is worth (and memory: o² floats).
_MAX_FALLBACK_ORDER = 8192


@dataclass(frozen=True)
class TransformPlan:
    """The construction of one transform block: ``size = base_order · 2^k``."""

    size: int
    base_order: int
    kind: str  # "hadamard", "dct" or "random"
    seed: int
    construction: str

    @property
    def is_hadamard(self) -> bool:
        return self.kind == "hadamard"

    def base(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        """The ``m × m`` base (a ±1 Hadamard matrix, or ``sqrt(m)·Q_m``), ``None`` when ``m == 1``.

        float64 for float64 inputs (a fallback ``Q`` rounded to float32 would cap their accuracy), else float32."""
        return base_matrix(self.kind, self.base_order, self.seed, device, dtype)


def _odd_part(n: int) -> tuple[int, int]:
    k = (n & -n).bit_length() - 1
    return n >> k, k


def _dct_matrix(m: int) -> torch.Tensor:
    """Orthonormal DCT-II matrix of order m, in float64."""
    i = torch.arange(m, dtype=torch.float64)
    c = torch.cos(math.pi * (2 * i[None, :] + 1) * i[:, None] / (2 * m)) * math.sqrt(2.0 / m)
    c[0] /= math.sqrt(2.0)
    return c


def _random_orthogonal(m: int, seed: int) -> torch.Tensor:
    """Seeded Haar-random orthogonal matrix of order m (QR of a Gaussian with the sign fix), float64."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, m, generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    return q * torch.sign(torch.diagonal(r))[None, :]


def base_matrix(kind: str, m: int, seed: int, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """The cached base of a plan (see ``TransformPlan.base``); shared, so callers must not modify it."""
    if m == 1:
        return None
    dt = torch.float64 if dtype == torch.float64 else torch.float32
    return _base_cached(m, kind, seed, str(torch.device(device)), dt)


@functools.lru_cache(maxsize=128)
def _base_cached(m: int, kind: str, seed: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    if kind == "hadamard":
        b = matrices.hadamard_matrix(m, dtype=torch.float64)
    elif kind == "dct":
        b = _dct_matrix(m) * math.sqrt(m)
    else:
        b = _random_orthogonal(m, seed) * math.sqrt(m)
    return b.to(device=device, dtype=dtype)


def supported(n: int) -> bool:
    """Whether size ``n`` has an exact Hadamard transform (``n = m · 2^k`` with a known order-``m`` matrix)."""
    return n >= 1 and matrices.base_order(n) is not None


def nearest_supported(n: int, limit: int = 1 << 16) -> tuple[int | None, int | None]:
    """The closest supported sizes below and above ``n`` (``None`` when none within ``limit``)."""
    below = next((c for c in range(n - 1, max(n - limit, 0), -1) if supported(c)), None)
    above = next((c for c in range(n + 1, n + limit) if supported(c)), None)
    return below, above


def largest_supported_divisor(n: int) -> int:
    """The largest block size dividing ``n`` that has an exact Hadamard transform (at least 1)."""
    divisors = set()
    for d in range(1, math.isqrt(n) + 1):
        if n % d == 0:
            divisors.update((d, n // d))
    return max(d for d in divisors if supported(d))


def unsupported_size_message(n: int, what: str = "hadamard_transform") -> str:
    odd, k = _odd_part(n)
    below, above = nearest_supported(n)
    near = ", ".join(str(s) for s in (below, above) if s is not None)
    return (
        f"{what}: no Hadamard matrix of size {n} = {odd}·2^{k} is known to hadakit (no construction reaches an "
        f"order {odd}·2^j). Nearest supported sizes: {near}. Options: pass fallback='dct' or fallback='random' for "
        f"the exactly orthogonal Q_{odd} ⊗ H_{1 << k} rotation, or a block_size that divides {n} "
        f"(largest supported: {largest_supported_divisor(n)})."
    )


@functools.lru_cache(maxsize=1024)
def plan_transform(n: int, fallback: str | None = None, fallback_seed: int = 0) -> TransformPlan:
    """The plan for a transform block of size ``n``; see the module docstring for the rules."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"transform size must be a positive integer, got {n!r}")
    if fallback is not None and fallback not in FALLBACKS:
        raise ValueError(f"fallback must be None, 'dct' or 'random'; got {fallback!r}")
    m = matrices.base_order(n)
    if m is not None:
        return TransformPlan(n, m, "hadamard", 0, matrices.construction(n))
    if fallback is None:
        raise ValueError(unsupported_size_message(n))
    odd, k = _odd_part(n)
    if odd > _MAX_FALLBACK_ORDER:
        raise ValueError(
            f"size {n} = {odd}·2^{k}: the orthogonal fallback needs a dense {odd}×{odd} matrix, above the limit of "
            f"{_MAX_FALLBACK_ORDER}; use a block_size that divides {n} (largest supported: "
            f"{largest_supported_divisor(n)})."
        )
    q = "DCT-II" if fallback == "dct" else f"random orthogonal (seed {fallback_seed})"
    return TransformPlan(n, odd, fallback, fallback_seed if fallback == "random" else 0,
                         f"fallback: {q} Q_{odd} ⊗ sylvester({1 << k})")
