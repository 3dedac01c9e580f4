"""Exact rounding primitives shared by every format.

Everything here is vectorized torch that runs unchanged on CPU and CUDA tensors, and is *exact*: the only
floating-point operations applied to data are multiplications/divisions by powers of two (exact unless they under- or
overflow, which the callers rule out), ``floor`` / ``round`` and comparisons.

Rounding modes
--------------
``"nearest"``
    round-to-nearest, ties-to-even (IEEE 754 ``roundTiesToEven``). ``torch.round`` implements exactly this on every
    backend (``nearbyint`` under the default rounding mode).
``"stochastic"``
    unbiased stochastic rounding. For a value ``t`` expressed in units of the target ULP,
    ``SR(t) = floor(t) + [u < t - floor(t)]`` with ``u ~ U[0, 1)`` drawn by ``torch.rand`` (24 random bits per
    element). This is the same distribution as "add uniform noise in units of the ULP, then truncate"
    (``floor(t + u)``), but it never adds two floats, so there is no hidden rounding of ``t + u``: the result is
    ``floor(t) + 1`` with probability exactly ``ceil(frac · 2^24) / 2^24`` — unbiased whenever the fractional part
    has at most 24 significant bits, which holds for every float32 input scaled into the range of a <= 8-bit format.
    The noise is drawn with ``torch.rand(shape, generator=...)`` in float32, once per quantized element, in row-major
    order, so a seeded ``torch.Generator`` (or an int seed) makes the result reproducible.
"""

from __future__ import annotations

import torch

__all__ = [
    "ROUNDING_MODES",
    "floor_log2",
    "pow2",
    "resolve_generator",
    "round_integer",
    "uniform_noise",
]

ROUNDING_MODES = ("nearest", "stochastic")


def pow2(k: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``2.0 ** k`` for an integer tensor ``k``, built from the bit pattern (exact, subnormals included).

    ``torch.exp2`` / ``torch.ldexp`` are accurate on the usual backends but are not *specified* to be exact, so the
    power of two is assembled directly: biased exponent for normal results, a single mantissa bit for subnormal ones.
    ``k`` must lie in the representable range of ``dtype`` (float32: [-149, 127], float64: [-1074, 1023]).
    """
    k = k.to(torch.int64)
    if dtype == torch.float32:
        mbits, bias, ibits = 23, 127, torch.int32
    elif dtype == torch.float64:
        mbits, bias, ibits = 52, 1023, torch.int64
    else:
        raise TypeError(f"pow2 builds float32 or float64 values, got {dtype}")
    emin = 1 - bias
    normal = (k + bias) << mbits
    # Subnormal: 2^k = 2^(emin - mbits) * 2^(k - emin + mbits), i.e. one mantissa bit. Clamp the shift so the unused
    # branch of the where() never shifts by a negative amount.
    sub = torch.ones_like(k) << (k - emin + mbits).clamp(0, mbits - 1)
    bits = torch.where(k >= emin, normal, sub)
    return bits.to(ibits).view(dtype)


def floor_log2(a: torch.Tensor) -> torch.Tensor:
    """``floor(log2(a))`` as int64 for finite ``a > 0`` (exact: read from ``frexp``, subnormals included).

    For ``a == 0`` the result is meaningless (callers mask it out).
    """
    # frexp: a = m * 2^e with m in [0.5, 1)  =>  floor(log2 a) = e - 1.
    return torch.frexp(a).exponent.to(torch.int64) - 1


def resolve_generator(generator, device: torch.device) -> torch.Generator | None:
    """Turn ``generator`` (a ``torch.Generator``, an int seed or ``None``) into a generator for ``device``.

    An int seed creates a fresh generator on ``device`` seeded with it (reproducible on every call); ``None`` means
    torch's global RNG (not reproducible unless the caller seeds it).
    """
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, bool) or not isinstance(generator, int):
        raise TypeError(f"generator must be a torch.Generator, an int seed or None, got {type(generator).__name__}")
    g = torch.Generator(device=device)
    g.manual_seed(generator)
    return g


def uniform_noise(shape, device, generator: torch.Generator | None) -> torch.Tensor:
    """``U[0, 1)`` float32 noise of ``shape`` (the stochastic-rounding draw; one number per element)."""
    return torch.rand(shape, generator=generator, device=device, dtype=torch.float32)


def round_integer(t: torch.Tensor, rounding: str, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Round ``t`` to an integer (returned in ``t``'s float dtype) with the given mode.

    ``"nearest"``: ties to even. ``"stochastic"``: ``floor(t) + [noise < frac(t)]``, unbiased (see module docstring).
    """
    if rounding == "nearest":
        return torch.round(t)
    if rounding == "stochastic":
        if noise is None:
            raise ValueError("stochastic rounding needs a noise tensor (uniform_noise)")
        fl = torch.floor(t)
        # t - floor(t) is exact in floating point (same binade or smaller), so the comparison is exact.
        return fl + (noise.to(t.dtype) < (t - fl)).to(t.dtype)
    raise ValueError(f"unknown rounding {rounding!r}; use one of {ROUNDING_MODES}")
