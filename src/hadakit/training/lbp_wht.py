"""Low-rank backpropagation with the Walsh–Hadamard transform (LBP-WHT).

Yang, Chiang, Li, Marculescu & Marculescu, "Efficient Low-rank Backpropagation for Vision Transformer Adaptation"
(NeurIPS 2023, arXiv 2309.15275). For a linear layer ``y = x·Wᵀ + b`` applied to ``T`` tokens (``x`` [..., T, in],
``dy`` [..., T, out]) the backward products are run in a rank-``r`` space spanned by ``r`` Walsh–Hadamard basis
vectors along the token dimension (``P`` [T, r], orthonormal columns):

* ``x̃ = Pᵀ·x`` [r, in] (computed in the forward and saved instead of ``x``), ``d̃y = Pᵀ·dy`` [r, out];
* weight gradient ``dW = d̃yᵀ·x̃ = dyᵀ·P·Pᵀ·x`` (a GEMM over ``r`` rows instead of ``T``);
* input gradient (``project="both"``, as in the paper) ``dx = P·(d̃y·W) = P·Pᵀ·dy·W``; with ``project="weight"``
  it stays exact, ``dx = dy·W``;
* bias gradient: exact (``Σ_t dy``); the forward is exactly ``nn.Linear``'s (the same ``F.linear`` call).

Basis selection (:attr:`LbpWhtConfig.selection`): ``"low_pass"`` (the paper's low-pass rule, here for a 1-D token
axis: the ``r`` Walsh functions of lowest sequency, i.e. fewest sign changes along the tokens) or ``"natural"`` (the
first ``r`` rows of the Hadamard matrix in its construction order; an ablation). Token counts that are not a
supported Hadamard order: ``padding="pow2"`` (default) zero-pads the token axis to the next power of two ``N``,
which equals using the first ``T`` rows of the order-``N`` basis (no padded tensor is built); ``padding="exact"``
uses the Hadamard matrix of order ``T`` itself when one exists (``m·2^k`` sizes, see
:func:`hadakit.transforms.supported`) and raises otherwise. With the full basis (``r = N``) both give the exact
gradients.

The rank is fixed per layer call from ``rank`` (an int: basis vectors; a float in (0, 1]: a fraction of ``N``,
rounded up). :func:`lbp_wht_flops` counts the multiply-adds (as 2 FLOPs each) of every product, projections
included (as dense ``P`` GEMMs; a fast WHT would need fewer).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from hadakit.transforms import hadamard_matrix, nearest_supported, supported

__all__ = ["LbpWhtConfig", "LbpWhtLinear", "lbp_wht_basis", "lbp_wht_flops", "lbp_wht_linear", "sequency"]

SELECTIONS = ("low_pass", "natural")
PROJECTS = ("both", "weight")
PADDINGS = ("pow2", "exact")


@dataclass(frozen=True)
class LbpWhtConfig:
    """How an LBP-WHT layer projects its backward pass.

    Args:
        rank: number of WHT basis vectors ``r`` (an int >= 1, capped at the padded token count ``N``) or a
            fraction of ``N`` (a float in (0, 1], ``r = ceil(rank·N)``).
        selection: ``"low_pass"`` (lowest sequency, the paper's low-pass rule) or ``"natural"`` (first rows in the
            Hadamard matrix's construction order; an ablation).
        project: ``"both"`` (the paper: weight and input gradients in the low-rank space) or ``"weight"`` (only the
            weight gradient; the input gradient exact).
        padding: ``"pow2"`` (token axis zero-padded to the next power of two) or ``"exact"`` (the order-``T``
            Hadamard matrix; ``T`` must be ``m·2^k`` with a known order ``m``).
    """

    rank: int | float = 0.25
    selection: str = "low_pass"
    project: str = "both"
    padding: str = "pow2"

    def __post_init__(self):
        r = self.rank
        if isinstance(r, bool) or not isinstance(r, (int, float)):
            raise TypeError(f"LbpWhtConfig.rank must be an int (basis vectors) or a float in (0, 1] (a fraction of "
                            f"the padded token count), got {r!r}")
        if isinstance(r, int) and r < 1:
            raise ValueError(f"LbpWhtConfig.rank: an int rank is a number of basis vectors and must be >= 1, got {r}")
        if isinstance(r, float) and not (0.0 < r <= 1.0):
            raise ValueError(f"LbpWhtConfig.rank: a float rank is a fraction of the token count and must be in "
                             f"(0, 1], got {r}; pass an int for a number of basis vectors")
        for name, allowed in (("selection", SELECTIONS), ("project", PROJECTS), ("padding", PADDINGS)):
            v = getattr(self, name)
            if v not in allowed:
                raise ValueError(f"LbpWhtConfig.{name} must be one of {allowed}, got {v!r}")

    def padded_tokens(self, tokens: int) -> int:
        """``N``: the order of the Hadamard basis used for ``tokens`` tokens."""
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
            raise ValueError(f"token count must be a positive int, got {tokens!r}")
        if self.padding == "pow2":
            return 1 << (tokens - 1).bit_length()
        if not supported(tokens):
            below, above = nearest_supported(tokens)
            raise ValueError(f"LbpWhtConfig(padding='exact'): no Hadamard matrix of order {tokens} (nearest: {below}, "
                             f"{above}); use padding='pow2' or pad the sequence to a supported length")
        return tokens

    def resolved_rank(self, tokens: int) -> int:
        """``r`` for ``tokens`` tokens."""
        n = self.padded_tokens(tokens)
        if isinstance(self.rank, float):
            return max(1, min(n, math.ceil(self.rank * n - 1e-9)))
        return min(self.rank, n)

    def to_dict(self) -> dict:
        return {"rank": self.rank, "selection": self.selection, "project": self.project, "padding": self.padding}


def sequency(h: torch.Tensor) -> torch.Tensor:
    """Number of sign changes along each row of a ±1 matrix (the sequency of a Walsh function)."""
    if h.dim() != 2:
        raise ValueError(f"sequency expects a 2-D ±1 matrix, got shape {tuple(h.shape)}")
    return (h[:, 1:] != h[:, :-1]).sum(dim=1)


@functools.lru_cache(maxsize=64)
def _basis64(n: int, r: int, selection: str) -> torch.Tensor:
    h = hadamard_matrix(n, dtype=torch.float64)
    if selection == "low_pass":
        order = torch.argsort(sequency(h), stable=True)
    else:
        order = torch.arange(n)
    return (h[order[:r]] / math.sqrt(n)).t().contiguous()  # [n, r], orthonormal columns


def lbp_wht_basis(tokens: int, config: LbpWhtConfig, *, dtype: torch.dtype = torch.float32,
                  device=None) -> torch.Tensor:
    """The projection ``P`` [tokens, r]: ``r`` selected orthonormal WHT basis vectors of order ``N``, restricted to
    the first ``tokens`` rows (zero padding of the token axis). ``P·Pᵀ = I`` when ``r = N``."""
    if not isinstance(config, LbpWhtConfig):
        raise TypeError(f"config must be an LbpWhtConfig, got {type(config).__name__}")
    n = config.padded_tokens(tokens)
    r = config.resolved_rank(tokens)
    return _basis64(n, r, config.selection)[:tokens].to(dtype=dtype, device=device, copy=True)  # never the cache


class _LbpWhtFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, basis, project_input: bool):
        y = F.linear(x, weight, bias)
        pt = basis.t()
        ctx.save_for_backward(pt @ x if ctx.needs_input_grad[1] else None, weight, basis)
        ctx.project_input = project_input
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        xp, weight, basis = ctx.saved_tensors
        pt = basis.t()
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dyp = pt @ dy if (need_w or (need_x and ctx.project_input)) else None  # [..., r, out]
        dx = dw = db = None
        if need_x:
            dx = basis @ (dyp @ weight) if ctx.project_input else dy @ weight
        if need_w:
            dw = dyp.reshape(-1, dyp.shape[-1]).t() @ xp.reshape(-1, xp.shape[-1])
        if ctx.has_bias and need_b:
            db = dy.reshape(-1, dy.shape[-1]).sum(0)
        return dx, dw, db, None, None


def lbp_wht_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   config: LbpWhtConfig) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` whose backward runs in the rank-``r`` WHT token space (see the module
    docstring). ``x`` is ``[..., T, in]``: the token axis is dim -2 (for a 2-D input, the rows)."""
    if not isinstance(config, LbpWhtConfig):
        raise TypeError(f"config must be an LbpWhtConfig, got {type(config).__name__}")
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError(f"lbp_wht_linear: x must be a tensor [..., tokens, features] (2-D or more), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                             or (bias is not None and bias.requires_grad))
    if not needs_grad:
        return F.linear(x, weight, bias)
    basis = lbp_wht_basis(x.shape[-2], config, dtype=x.dtype, device=x.device)
    return _LbpWhtFunction.apply(x, weight, bias, basis, config.project == "both")


def lbp_wht_flops(tokens: int, in_features: int, out_features: int, config: LbpWhtConfig | None = None, *,
                  sequences: int = 1, bias: bool = True) -> dict[str, int]:
    """FLOPs (2 per multiply-add) of one linear layer per training step on ``sequences`` × ``tokens`` tokens.

    Returns ``forward``, ``grad_input``, ``grad_weight``, ``projection`` (``Pᵀx``, ``Pᵀdy`` and, with
    ``project="both"``, ``P·(d̃y·W)``, each as a dense GEMM with ``P``), ``backward`` (their backward sum, including
    the bias gradient) and ``rank``. ``config=None`` gives dense backpropagation (``projection = 0``).
    """
    for name, v in (("tokens", tokens), ("in_features", in_features), ("out_features", out_features),
                    ("sequences", sequences)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"lbp_wht_flops: {name} must be a positive int, got {v!r}")
    b, t, i, o = sequences, tokens, in_features, out_features
    fwd = 2 * b * t * i * o
    bias_grad = b * t * o if bias else 0
    if config is None:
        gi, gw, proj, r = 2 * b * t * o * i, 2 * b * t * o * i, 0, t
    else:
        r = config.resolved_rank(t)
        gw = 2 * b * r * o * i
        proj = 2 * b * t * r * (i + o)  # P^T x (saved in the forward), P^T dy
        if config.project == "both":
            gi = 2 * b * r * o * i
            proj += 2 * b * t * r * i  # P · (dy~ W)
        else:
            gi = 2 * b * t * o * i
    return {"forward": fwd, "grad_input": gi, "grad_weight": gw, "projection": proj, "bias_grad": bias_grad,
            "backward": gi + gw + proj + bias_grad, "rank": r}


class LbpWhtLinear(nn.Linear):
    """``nn.Linear`` trained with LBP-WHT: same forward, backward projected onto ``config.rank`` WHT basis vectors
    along the token axis (dim -2 of the input).

    Same parameters and ``state_dict`` keys as ``nn.Linear``; :meth:`from_linear` shares a linear's
    ``nn.Parameter`` objects (no copy). In eval mode or without gradients the forward is plain ``F.linear``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 config: LbpWhtConfig | None = None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        config = LbpWhtConfig() if config is None else config
        if not isinstance(config, LbpWhtConfig):
            raise TypeError(f"LbpWhtLinear: config must be an LbpWhtConfig, got {type(config).__name__}")
        self.config = config

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: LbpWhtConfig | None = None) -> "LbpWhtLinear":
        """An LbpWhtLinear sharing ``linear``'s weight and bias (the same Parameter objects)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"LbpWhtLinear.from_linear expects an nn.Linear, got {type(linear).__name__}")
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta",
                    dtype=linear.weight.dtype, config=config)
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer.train(linear.training)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lbp_wht_linear(x, self.weight, self.bias, self.config)

    def extra_repr(self) -> str:
        c = self.config
        return (f"{super().extra_repr()}, rank={c.rank}, selection={c.selection}, project={c.project}, "
                f"padding={c.padding}")
