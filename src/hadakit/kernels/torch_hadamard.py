"""Portable backend of the ``hadamard`` primitive, in plain PyTorch (any device, float64 included).

The power-of-two factor ``H_{2^k}`` is applied as a Kronecker product of at most three dense Sylvester factors of
size <= 128 (``H_{2^k} = H_a ⊗ H_b ⊗ H_c``), each a batched matrix product. That is 2·(a+b+c) flops per element
instead of a butterfly's log2(n) passes over memory, and it runs on vendor BLAS: on a 2-core CPU it is 3-5x a memcpy
where a vectorized butterfly in PyTorch is ~100x. The base factor (``m × m``) is one more batched product.

Semantics are those of ``docs/ARCHITECTURE.md``:
forward ``y = scale · (base ⊗ H) · (D v)``, transpose ``y = scale · D · (base ⊗ H)ᵀ v`` per block ``v``.
"""

from __future__ import annotations

import functools

import torch

# Largest dense Sylvester factor. 128 keeps each factor's product cheap (2·128 flops/element) and its matrix in L1/L2.
_MAX_FACTOR_LOG2 = 7


@functools.lru_cache(maxsize=64)
def _sylvester_cached(k: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    idx = torch.arange(1 << k)
    # H[i, j] = (-1)^popcount(i & j)
    bits = idx[:, None] & idx[None, :]
    parity = torch.zeros_like(bits)
    while bool(bits.any()):
        parity ^= bits & 1
        bits = bits >> 1
    return (1 - 2 * parity).to(dtype=dtype, device=device)


def sylvester(k: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """Sylvester's Hadamard matrix of order ``2**k`` (entries ±1). The returned tensor is shared: do not modify it."""
    return _sylvester_cached(k, dtype, str(torch.device(device)))


def _factor_split(k: int) -> list[int]:
    """Split ``k`` into at most three near-equal parts of at most ``_MAX_FACTOR_LOG2`` each (k <= 21)."""
    if k == 0:
        return []
    parts = -(-k // _MAX_FACTOR_LOG2)
    base, extra = divmod(k, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def _apply_pow2(v: torch.Tensor, k: int) -> torch.Tensor:
    """Multiply the last axis of ``v`` (length ``2**k``, contiguous) by the symmetric ``H_{2^k}``."""
    if k == 0:
        return v
    shape = v.shape
    p = shape[-1]
    inner = p
    for kf in _factor_split(k):
        f = 1 << kf
        inner //= f
        h = sylvester(kf, v.dtype, v.device)
        if inner == 1:
            v = (v.reshape(-1, f) @ h).reshape(shape)
        else:
            # Contract the middle axis of (outer, f, inner) with h (symmetric, so h @ v needs no transpose).
            v = torch.matmul(h, v.reshape(-1, f, inner)).reshape(shape)
    return v


def torch_hadamard(
    x: torch.Tensor,
    base: torch.Tensor | None,
    signs: torch.Tensor | None,
    block: int,
    scale: float,
    transpose: bool,
) -> torch.Tensor:
    """Reference/portable implementation of the ``hadamard`` primitive (see module docstring)."""
    n = x.shape[-1]
    m = 1 if base is None else base.shape[0]
    p = block // m
    k = p.bit_length() - 1
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    v = x.reshape(-1, n).to(compute)
    if signs is not None and not transpose:
        v = v * signs.to(compute)
    v = v.reshape(-1, m, p)
    v = _apply_pow2(v.contiguous(), k)
    if base is not None:
        b = base.to(compute)
        v = torch.matmul(b.t() if transpose else b, v)
    v = v.reshape(-1, n)
    if scale != 1.0:
        v = v * scale
    if signs is not None and transpose:
        v = v * signs.to(compute)
    out = v.to(x.dtype).reshape(x.shape)
    # Size-1 identity transforms would hand back x itself; the op contract returns a new tensor.
    return out.clone() if out.data_ptr() == x.data_ptr() else out
