"""Functional Hadamard transforms: full, inverse, randomized (H·D), block-diagonal and two-block structured.

All of them are one or two calls of the ``hadakit::hadamard`` op (``transforms/ops.py``), so they share its
backends, autograd and ``torch.compile`` support.

Conventions: with ``H = hadamard_matrix(n)`` (or the block matrix of a fallback plan), the unnormalized transform is
``y = x @ Hᵀ`` along ``dim``; ``normalize=True`` (default) divides by ``sqrt(n)`` so the map is orthogonal and
``inverse_hadamard_transform`` is its transpose. With block_size ``b`` the transform is block-diagonal: every
contiguous block of ``b`` elements along ``dim`` is transformed on its own (``n`` above is then ``b``).
"""

from __future__ import annotations

import math
import operator

import torch

from hadakit.transforms import ops
from hadakit.transforms.plan import TransformPlan, plan_transform

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_input(x: torch.Tensor, dim: int, what: str) -> int:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{what}: needs a floating-point tensor (float16, bfloat16, float32 or float64); got {x.dtype}. "
            f"Convert first, e.g. x.float()."
        )
    if x.dim() == 0:
        raise ValueError(f"{what}: needs a tensor with at least one dimension; got a 0-d tensor")
    if not -x.dim() <= dim < x.dim():
        raise IndexError(
            f"{what}: dim {dim} is out of range for a tensor with {x.dim()} dimensions "
            f"(valid: {-x.dim()} … {x.dim() - 1})"
        )
    return dim % x.dim()


def _resolve_block(n: int, block_size: int | None, what: str) -> int:
    if block_size is None:
        return n
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"{what}: block_size must be a positive integer, got {block_size!r}")
    if n % block_size:
        raise ValueError(
            f"{what}: block_size {block_size} does not divide the transformed size {n}; "
            f"use a divisor of {n} such as {math.gcd(n, block_size)}"
        )
    return block_size


def _prepare_signs(signs: torch.Tensor | None, n: int, x: torch.Tensor, what: str) -> torch.Tensor | None:
    if signs is None:
        return None
    if not isinstance(signs, torch.Tensor) or signs.dim() != 1 or signs.shape[0] != n:
        shape = tuple(signs.shape) if isinstance(signs, torch.Tensor) else type(signs).__name__
        raise ValueError(f"{what}: signs must be a 1-d tensor of length {n} (the transformed size); got {shape}")
    # Value check only where it is free: not on GPU tensors (a sync) and not while torch.compile traces.
    if signs.device.type == "cpu" and not torch.compiler.is_compiling() and not bool((signs.abs() == 1).all()):
        raise ValueError(f"{what}: signs must be ±1 (use hadakit.random_signs to draw them)")
    # float64 signs stay float64 for float64 inputs, so that their gradient is float64-accurate.
    dt = torch.float64 if x.dtype == torch.float64 and signs.dtype == torch.float64 else torch.float32
    return signs.to(device=x.device, dtype=dt)


def transform_plan(n: int, *, block_size: int | None = None, fallback: str | None = None,
                   fallback_seed: int = 0) -> TransformPlan:
    """Which construction a transform of size ``n`` (block ``block_size``) uses; raises if there is none.

    >>> transform_plan(640).construction
    'paley1(q=19) ⊗ sylvester(32)'
    """
    return plan_transform(_resolve_block(n, block_size, "transform_plan"), fallback, fallback_seed)


@torch.compiler.assume_constant_result
def _plan_scalars(b: int, fallback: str | None, fallback_seed: int) -> tuple[str, int, int]:
    # A pure function of its arguments: torch.compile records the result instead of tracing the constructions.
    # Its arguments must be Python constants under torch.compile: ``_apply`` specializes the transformed size.
    plan = plan_transform(b, fallback, fallback_seed)
    return plan.kind, plan.base_order, plan.seed


def _apply(x, dim, normalize, block_size, signs, fallback, fallback_seed, inverse, what):
    d = _check_input(x, dim, what)
    # The transformed size picks the plan (base matrix, scale), so torch.compile specializes it: operator.index of
    # a symbolic size guards on its value and gives a Python int (one graph per size; the other dims stay dynamic,
    # e.g. under dynamic=True). In eager mode it is an int already and this costs nothing.
    n = operator.index(x.shape[d])
    # Size checks first, so that an empty tensor is refused exactly like a non-empty one.
    b = _resolve_block(n, block_size, what)
    s = _prepare_signs(signs, n, x, what)
    if n == 0:  # a size-0 transform is the empty map: there is no plan to look up
        return x.clone()
    kind, order, seed = _plan_scalars(b, fallback, fallback_seed)
    if inverse:
        scale = 1.0 / math.sqrt(b) if normalize else 1.0 / b
    else:
        scale = 1.0 / math.sqrt(b) if normalize else 1.0
    xt = x.movedim(d, -1)
    y = ops.hadamard(xt, s, b, kind, order, seed, scale, inverse)
    return y.movedim(-1, d)


def hadamard_transform(
    x: torch.Tensor,
    dim: int = -1,
    *,
    normalize: bool = True,
    block_size: int | None = None,
    signs: torch.Tensor | None = None,
    fallback: str | None = None,
    fallback_seed: int = 0,
) -> torch.Tensor:
    """Walsh–Hadamard transform of ``x`` along ``dim`` (``y = H·D·x`` per block; ``D = diag(signs)`` if given).

    Sizes ``n = m·2^k`` with a known order-``m`` Hadamard matrix (all powers of two; 12, 20, 28, …; see
    ``docs/hadamard_orders.md``) are exact. Other sizes raise a ValueError naming the nearest supported sizes,
    unless ``fallback='dct'`` or ``'random'`` opts into an exactly orthogonal ``Q_o ⊗ H_{2^k}``.

    Args:
        x: float16/bfloat16/float32/float64 tensor of any shape; arithmetic is float32 (float64 for float64).
        dim: the dimension to transform.
        normalize: divide by ``sqrt(n)`` (orthogonal); ``False`` gives the ±1 transform.
        block_size: transform each contiguous block of this size on its own (block-diagonal transform).
        signs: optional ±1 vector of length ``x.shape[dim]`` applied before the transform (randomized Hadamard).
        fallback: ``None``, ``'dct'`` or ``'random'``; only used for sizes without a Hadamard matrix.
        fallback_seed: seed of the ``'random'`` fallback.

    Example:
        >>> import torch, hadakit
        >>> x = torch.randn(4, 640)
        >>> y = hadakit.hadamard_transform(x)                      # 640 = 20·32, exact and orthogonal
        >>> torch.allclose(hadakit.inverse_hadamard_transform(y), x, atol=1e-5)
        True
    """
    return _apply(x, dim, normalize, block_size, signs, fallback, fallback_seed, False, "hadamard_transform")


def inverse_hadamard_transform(
    x: torch.Tensor,
    dim: int = -1,
    *,
    normalize: bool = True,
    block_size: int | None = None,
    signs: torch.Tensor | None = None,
    fallback: str | None = None,
    fallback_seed: int = 0,
) -> torch.Tensor:
    """Inverse of ``hadamard_transform`` with the same arguments (``x = D·Hᵀ·y / n``, or ``/sqrt(n)`` normalized)."""
    return _apply(x, dim, normalize, block_size, signs, fallback, fallback_seed, True, "inverse_hadamard_transform")


def random_signs(
    n: int,
    seed: int | None = None,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """A vector of ``n`` random ±1 signs, reproducible from ``seed`` (same values on every device) or drawn from
    ``generator`` (a CPU ``torch.Generator``; each call advances it, giving new signs per call/step)."""
    if seed is not None and generator is not None:
        raise ValueError("random_signs: pass seed or generator, not both")
    if generator is None:
        generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
    bits = torch.randint(0, 2, (n,), generator=generator, dtype=torch.int8)
    return (1 - 2 * bits).to(dtype=dtype, device=device)


def randomized_hadamard_transform(
    x: torch.Tensor,
    dim: int = -1,
    *,
    seed: int = 0,
    normalize: bool = True,
    block_size: int | None = None,
    inverse: bool = False,
) -> torch.Tensor:
    """``H·D·x`` with ``D`` the seeded random signs ``random_signs(x.shape[dim], seed)``; ``inverse=True`` applies
    ``D·Hᵀ`` (the inverse for the same seed). Signs are fused into the transform's load, not a separate pass."""
    d = _check_input(x, dim, "randomized_hadamard_transform")
    signs = random_signs(x.shape[d], seed, device=x.device)
    fn = inverse_hadamard_transform if inverse else hadamard_transform
    return fn(x, dim, normalize=normalize, block_size=block_size, signs=signs)


def block_hadamard_transform(x: torch.Tensor, block_size: int, dim: int = -1, *, normalize: bool = True,
                             signs: torch.Tensor | None = None) -> torch.Tensor:
    """Block-diagonal transform: every contiguous block of ``block_size`` elements along ``dim`` on its own
    (e.g. 16 for NVFP4, 32 for MX groups). Same as ``hadamard_transform(x, dim, block_size=block_size)``."""
    return hadamard_transform(x, dim, normalize=normalize, block_size=block_size, signs=signs)


def structured_rotation(
    x: torch.Tensor,
    signs1: torch.Tensor,
    signs2: torch.Tensor,
    dim: int = -1,
    *,
    block_size: int | None = None,
    inverse: bool = False,
) -> torch.Tensor:
    """Two-block structured rotation ``H·D2·H·D1·x`` (normalized, orthogonal); ``inverse=True`` applies its
    transpose ``D1·Hᵀ·D2·Hᵀ``. Two random-sign Hadamard blocks mix far more evenly than one."""
    if inverse:
        y = inverse_hadamard_transform(x, dim, block_size=block_size, signs=signs2)
        return inverse_hadamard_transform(y, dim, block_size=block_size, signs=signs1)
    y = hadamard_transform(x, dim, block_size=block_size, signs=signs1)
    return hadamard_transform(y, dim, block_size=block_size, signs=signs2)
