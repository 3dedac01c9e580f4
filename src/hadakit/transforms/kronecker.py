"""Learned Kronecker-structured transforms ``P = A ⊗ B`` for the input of a linear layer.

``x ↦ x·P`` with ``n = n1·n2`` costs ``n·(n1 + n2)`` multiply-adds per row (a reshape to ``[n1, n2]`` and two
small matmuls, ``Aᵀ·X·B``) instead of ``n²`` for a dense matrix, so it can run online at every forward, as in
FlatQuant. The weight side gets ``W·P⁻ᵀ = W·(A⁻ᵀ ⊗ B⁻ᵀ)``, so ``(x·P)(W·P⁻ᵀ)ᵀ = x·Wᵀ`` exactly before quantization.

Two parametrizations:

* ``"orthogonal"`` (SpinQuant-style): each factor is the Cayley transform ``(I − S)(I + S)⁻¹`` of a skew-symmetric
  ``S`` — always exactly orthogonal, so ``P⁻ᵀ = P``; starts at the identity (on top of a Hadamard, it starts at that
  Hadamard).
* ``"affine"`` (FlatQuant-style): each factor is a free invertible matrix, started at the identity; the weight side
  uses the exact inverse (``torch.linalg.inv`` in float64).

``freeze()`` turns the parameters into plain buffers (what a checkpoint stores and a quantized model runs).
"""

from __future__ import annotations

import math

import torch
from torch import nn

MODES = ("orthogonal", "affine")


def kronecker_split(n: int) -> tuple[int, int]:
    """The factor sizes ``(n1, n2)``, ``n1 ≤ n2``, ``n1·n2 = n``, closest to ``√n`` (640 → 20·32, 2048 → 32·64)."""
    if n < 1:
        raise ValueError(f"kronecker_split: size must be positive, got {n}")
    n1 = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return n1, n // n1


def _cayley(g: torch.Tensor) -> torch.Tensor:
    s = 0.5 * (g - g.t())
    eye = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    return torch.linalg.solve(eye + s, eye - s)  # (I+S)⁻¹(I−S) = (I−S)(I+S)⁻¹: they commute


def kron_apply(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``x @ (a ⊗ b)`` along the last dim without forming the ``n × n`` matrix."""
    n1, n2 = a.shape[0], b.shape[0]
    shape = x.shape
    xm = x.reshape(-1, n1, n2)
    y = torch.matmul(torch.matmul(a.t().to(x.dtype), xm), b.to(x.dtype))
    return y.reshape(shape)


class KroneckerTransform(nn.Module):
    """A learnable ``P = A ⊗ B`` on the last dimension (see the module docstring).

    Example:
        >>> import torch
        >>> from hadakit.transforms.kronecker import KroneckerTransform
        >>> t = KroneckerTransform(640, mode="affine")
        >>> with torch.no_grad():
        ...     t.a.add_(0.1 * torch.randn(20, 20))
        >>> x, w = torch.randn(4, 640), torch.randn(8, 640)
        >>> torch.allclose(t(x) @ t.weight_side(w).t(), x @ w.t(), atol=1e-3)
        True
    """

    def __init__(self, n: int, mode: str = "orthogonal", *, split: tuple[int, int] | None = None):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"KroneckerTransform mode must be one of {MODES}, got {mode!r}")
        n1, n2 = split or kronecker_split(n)
        if n1 * n2 != n:
            raise ValueError(f"KroneckerTransform: split {n1}·{n2} != {n}")
        self.n, self.mode, self.split = n, mode, (n1, n2)
        self.frozen = False
        if mode == "orthogonal":  # skew generators; zero = identity
            self.a = nn.Parameter(torch.zeros(n1, n1))
            self.b = nn.Parameter(torch.zeros(n2, n2))
        else:
            self.a = nn.Parameter(torch.eye(n1))
            self.b = nn.Parameter(torch.eye(n2))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` as matrices (differentiable while training)."""
        if self.frozen or self.mode == "affine":
            return self.a, self.b
        return _cayley(self.a), _cayley(self.b)

    def inverse_transpose_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.factors()
        if self.mode == "orthogonal":
            return a, b
        inv = [torch.linalg.inv(f.double()).t().to(f.dtype) for f in (a, b)]
        return inv[0], inv[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.factors()
        return kron_apply(x, a, b)

    def weight_side(self, w: torch.Tensor) -> torch.Tensor:
        """``W·P⁻ᵀ`` for a weight ``[out, n]``."""
        a, b = self.inverse_transpose_factors()
        return kron_apply(w, a, b)

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The dense ``n × n`` matrix ``P`` (``forward(x) = x @ P``)."""
        a, b = self.factors()
        return torch.kron(a.detach().to(dtype), b.detach().to(dtype))

    @torch.no_grad()
    def freeze(self) -> "KroneckerTransform":
        """Replace the parameters by the factor matrices themselves, as buffers (no gradients, saved as-is)."""
        a, b = (f.detach().clone() for f in self.factors())
        del self.a, self.b
        self.register_buffer("a", a.contiguous())
        self.register_buffer("b", b.contiguous())
        self.frozen = True
        return self

    @classmethod
    def from_factors(cls, a: torch.Tensor, b: torch.Tensor, mode: str) -> "KroneckerTransform":
        """A frozen transform with the given factors (what a checkpoint loads)."""
        t = cls(a.shape[0] * b.shape[0], mode, split=(a.shape[0], b.shape[0]))
        del t.a, t.b
        t.register_buffer("a", a.float().contiguous())
        t.register_buffer("b", b.float().contiguous())
        t.frozen = True
        return t

    def extra_repr(self) -> str:
        return f"n={self.n}, mode={self.mode!r}, split={self.split[0]}x{self.split[1]}, frozen={self.frozen}"
