"""INT4 training of Xi, Li, Chen & Zhu, "Training Transformers with 4-bit Integers" (NeurIPS 2023, arXiv 2306.11987).

A linear layer ``y = x·Wᵀ + b`` (``x`` [T, in] after flattening the leading dims into ``T`` tokens) is trained with
every product on INT4 operands. Written from the paper's description; the estimators below are what this module
computes, exactly:

**Forward: Hadamard quantizer (HQ).** With ``H`` the block-diagonal normalized Hadamard matrix (blocks of
``block_size`` along ``in_features``, which is zero-padded to a multiple of the block) ::

    x̂ = Q(x·H)     per-token INT4      (rows of x)
    Ŵ = Q(W·H)     per-channel INT4    (rows of W)
    y = x̂·Ŵᵀ + b   (= x·Wᵀ before quantization, since H·Hᵀ = I)

``Q`` is :mod:`hadakit.formats` INT4 with the symmetric range ``[-7, 7]`` and an fp32 amax scale per row
(``"int4_restricted"``). The Hadamard transform spreads a channel outlier over its block, so the per-token amax,
and with it the rounding step, shrinks. (The paper learns the scale with LSQ; this module uses the amax rule.)

**Backward.** The gradients are taken with the quantizers as straight-through, i.e. with respect to the forward's
INT4 operands: ``dx = (dy·Ŵ)·Hᵀ`` and ``dW = (dyᵀ·x̂)·Hᵀ``. ``dy`` is quantized as follows.

*Bit splitting (BS).* ``dy = hi + lo + e`` with ``hi = Q_nearest(dy)`` (per-token INT4, step ``s = amax / 7``) and
``lo = Q_SR(dy - hi)`` (per-token INT4 of the residual, stochastic rounding; the residual is at most ``s / 2``,
so its step is at most ``s / 14``). ``E[hi + lo] = dy``: an unbiased ~8-bit representation stored as two INT4
matrices, i.e. ``2T`` INT4 rows ``[hi; lo]``.

*Leverage-score sampling (LSS), weight gradient.* ``dyᵀ·x̂ = Σ_{i<2T} g_iᵀ·x̂_{i mod T}`` over the split rows
``g = [hi; lo]``. Row ``i`` is kept with probability ``p_i = min(1, c·‖g_i‖·‖x̂_i‖)``, with ``c`` chosen so that
``Σ p_i = keep_fraction · 2T`` (water-filling; rows with ``p_i = 1`` are always kept), and a kept row is scaled by
``1 / p_i``. The estimator ``Σ (m_i / p_i)·g_iᵀ·x̂_i`` (``m_i ~ Bernoulli(p_i)``) is unbiased, and with
``keep_fraction = 0.5`` it multiplies ``T`` INT4 rows on average: the cost of one INT4 GEMM. The scores are the
paper's leverage scores for the row-sampled product (norm of the row of each factor); since the high parts are
~14× larger than the low parts, the low parts are the ones mostly dropped. ``1 / p_i`` only rescales a row's
scale, so the kept rows stay INT4.

*Input gradient.* ``dx = (hi + lo)·Ŵ·Hᵀ`` (two INT4 GEMMs on the same ``Ŵ``), or, with ``lss_grad_input``, the
split rows sampled the same way with ``p_i ∝ ‖g_i‖`` (the other factor, ``Ŵ``, is shared by every row).

Emulated: each operand is quantize-dequantized and the products run in float32 (float64 for float64 inputs).
Randomness (stochastic rounding, sampling) comes from ``generator`` if given, else from torch's global RNG (the
convention of the other recipes, so ``torch.manual_seed`` makes a run reproducible).

Not done: the paper's LSQ step sizes, its CUDA INT4 kernels, and a real INT4 GEMM: on INT4 hardware, the per-token
scales of ``dy`` and ``x̂`` lie along the reduction dim of the weight-gradient product and would have to be applied
before the integer accumulation (the paper's kernels handle this; emulation is exact in value either way).

    >>> import torch
    >>> from hadakit.training import QuantLinear
    >>> layer = QuantLinear(64, 32, recipe="int4_xi")
    >>> y = layer(torch.randn(16, 64)); y.sum().backward()
    >>> layer.weight.grad.shape
    torch.Size([32, 64])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hadakit.formats import fake_quantize, get_scheme
from hadakit.transforms import hadamard_transform, inverse_hadamard_transform

from .recipe import INT4_ROW, Int4XiRecipe, get_training_recipe

__all__ = [
    "bit_split",
    "hadamard_quantize",
    "int4_input_gradient",
    "int4_weight_gradient",
    "int4_xi_linear",
    "leverage_probabilities",
    "sr_int4",
]

_INT4 = get_scheme(INT4_ROW)
_INT4_SR = _INT4.replace(rounding="stochastic", name=_INT4.name)


def _cd(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def sr_int4(t: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-row (last dim) INT4 ``[-7, 7]`` quantize-dequantize with stochastic rounding (unbiased: nothing clips).

    The plain stochastic-rounding INT4 gradient quantizer, the baseline bit splitting improves on.
    """
    return fake_quantize(t, _INT4_SR, generator=generator)


def bit_split(g: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Bit splitting: ``(hi, lo)``, two per-row INT4 tensors with ``E[hi + lo] = g``.

    ``hi`` is ``g`` rounded to nearest (step ``amax / 7`` per row of the last dim), ``lo`` the residual ``g - hi``
    quantized with its own per-row INT4 scale and stochastic rounding.

    >>> import torch
    >>> g = torch.randn(4, 16)
    >>> hi, lo = bit_split(g, torch.Generator().manual_seed(0))
    >>> bool(((hi + lo - g).abs() <= (g - hi).abs().amax(-1, keepdim=True) / 7 + 1e-6).all())
    True
    """
    if not isinstance(g, torch.Tensor) or not g.is_floating_point() or g.dim() < 1:
        raise TypeError("bit_split: g must be a floating-point tensor with at least one dim (rows along the last)")
    hi = fake_quantize(g, _INT4)
    lo = fake_quantize(g - hi, _INT4_SR, generator=generator)
    return hi, lo


def leverage_probabilities(scores: torch.Tensor, budget: float) -> torch.Tensor:
    """Sampling probabilities ``p = min(1, c·scores)`` along the last dim with ``Σ p = budget`` (water-filling).

    ``scores`` are non-negative; rows with a zero score get ``p = 0`` (they contribute nothing). The scores are
    divided by their maximum first, so a score below ~1e-308 of the largest (a float64 subnormal ratio) counts as
    zero. When at most ``budget`` scores are positive, every positive one gets ``p = 1`` (no sampling).

    >>> import torch
    >>> p = leverage_probabilities(torch.tensor([8.0, 1.0, 1.0, 0.0]), 2.0)
    >>> [round(v, 4) for v in p.tolist()]
    [1.0, 0.5, 0.5, 0.0]
    """
    if not isinstance(scores, torch.Tensor) or scores.dim() < 1:
        raise TypeError("leverage_probabilities: scores must be a tensor with at least one dim")
    n = scores.shape[-1]
    if isinstance(budget, bool) or not (0 < float(budget) <= n):
        raise ValueError(f"leverage_probabilities: budget must be in (0, {n}] (the number of rows to keep on "
                         f"average), got {budget!r}")
    if bool((scores < 0).any()) or not bool(torch.isfinite(scores).all()):
        raise ValueError("leverage_probabilities: scores must be finite and >= 0")
    s = scores.to(torch.float64)
    s = s / s.amax(-1, keepdim=True).clamp(min=torch.finfo(torch.float64).tiny)  # scale-free; subnormals are fine
    srt, _ = s.sort(dim=-1, descending=True)
    tail = srt.flip(-1).cumsum(-1).flip(-1)  # tail[j] = Σ_{i >= j} srt[i]
    j = torch.arange(n, dtype=torch.float64, device=s.device)
    c = (float(budget) - j) / tail  # the scale if the j largest are saturated (p = 1)
    valid = (c * srt <= 1.0 + 1e-12) & (tail > 0)
    # the smallest valid j; when fewer than budget scores are positive, no j is valid: keep every positive row
    has = valid.any(-1, keepdim=True)
    first = torch.where(valid, j, torch.full_like(j, float(n))).amin(-1, keepdim=True).long().clamp(max=n - 1)
    cstar = torch.gather(c, -1, first)
    # at most ``budget`` positive scores: every one is kept, exactly (cstar·s can round to just below 1 there)
    few = (s > 0).sum(-1, keepdim=True) <= float(budget)
    p = torch.where(has & ~few, (cstar * s).clamp(max=1.0), (s > 0).to(s.dtype))
    return p.to(scores.dtype if scores.is_floating_point() else torch.float32)


def _sample_rows(rows: torch.Tensor, scores: torch.Tensor, budget: float,
                 generator: torch.Generator | None) -> torch.Tensor:
    """``rows · m / p`` per row (``m ~ Bernoulli(p)``, ``p`` from the scores): unbiased row sampling."""
    p = leverage_probabilities(scores, budget)
    u = torch.rand(p.shape, generator=generator, device=p.device, dtype=p.dtype)
    w = torch.where(u < p, 1.0 / p.clamp(min=torch.finfo(p.dtype).tiny), torch.zeros_like(p))
    return rows * w.unsqueeze(-1).to(rows.dtype)


def int4_weight_gradient(dy: torch.Tensor, xq: torch.Tensor, keep_fraction: float = 0.5, lss: bool = True,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """The BS (+ LSS) estimator of ``dyᵀ·xq``: ``dy`` [..., T, out], ``xq`` [..., T, in] -> [..., out, in].

    ``xq`` is the forward's (INT4) activation operand. Unbiased: ``E[result] = dyᵀ·xq``. With ``lss=False``, only
    bit splitting (two INT4 GEMMs over ``T`` tokens).
    """
    hi, lo = bit_split(dy, generator)
    if lss:
        xn = xq.norm(dim=-1)
        g = torch.cat([hi, lo], dim=-2)  # [..., 2T, out]
        scores = g.norm(dim=-1) * torch.cat([xn, xn], dim=-1)
        g = _sample_rows(g, scores, keep_fraction * g.shape[-2], generator)
        t = dy.shape[-2]
        gsum = g[..., :t, :] + g[..., t:, :]  # both halves multiply the same x rows: one product
    else:
        gsum = hi + lo
    return gsum.transpose(-1, -2) @ xq


def int4_input_gradient(dy: torch.Tensor, wq: torch.Tensor, keep_fraction: float = 0.5, lss: bool = False,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """The BS (+ optional LSS, ``p ∝ ‖g_i‖``) estimator of ``dy·wq``: ``dy`` [..., T, out], ``wq`` [out, in]."""
    hi, lo = bit_split(dy, generator)
    if lss:
        g = torch.cat([hi, lo], dim=-2)
        g = _sample_rows(g, g.norm(dim=-1), keep_fraction * g.shape[-2], generator)
        t = dy.shape[-2]
        return g[..., :t, :] @ wq + g[..., t:, :] @ wq
    return hi @ wq + lo @ wq


def hadamard_quantize(t: torch.Tensor, block_size: int = 32, rotate: bool = True) -> torch.Tensor:
    """HQ: ``Q(t·H)`` per row, ``t`` [..., k] zero-padded to a multiple of ``block_size`` (returned padded, in the
    rotated domain). ``rotate=False`` quantizes ``t`` (padded) without the transform, for comparison.

    ``Q(x·H)·Q(W·H)ᵀ`` approximates ``x·Wᵀ``; the error is lower than ``Q(x)·Q(W)ᵀ``'s when rows have outliers.
    """
    k = t.shape[-1]
    n = -(-k // block_size) * block_size
    if n != k:
        t = F.pad(t, (0, n - k))
    if rotate:
        t = hadamard_transform(t, -1, block_size=block_size)
    return fake_quantize(t, _INT4)


class _Int4XiFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, recipe: Int4XiRecipe, generator):
        cd = _cd(x)
        k = x.shape[-1]
        xq = hadamard_quantize(x.reshape(-1, k).to(cd), recipe.block_size)
        wq = hadamard_quantize(weight.to(cd), recipe.block_size)
        y = xq @ wq.t()
        if bias is not None:
            y = y + bias.to(cd)
        ctx.save_for_backward(xq, wq)
        ctx.recipe, ctx.generator, ctx.k = recipe, generator, k
        ctx.x_shape, ctx.x_dtype, ctx.w_dtype = x.shape, x.dtype, weight.dtype
        ctx.b_dtype = bias.dtype if bias is not None else None
        return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        xq, wq = ctx.saved_tensors
        r, gen, k = ctx.recipe, ctx.generator, ctx.k
        dy = dy.reshape(-1, dy.shape[-1]).to(xq.dtype)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            d = int4_input_gradient(dy, wq, r.keep_fraction, r.lss_grad_input, gen)
            d = inverse_hadamard_transform(d, -1, block_size=r.block_size)[:, :k]
            dx = d.to(ctx.x_dtype).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            d = int4_weight_gradient(dy, xq, r.keep_fraction, r.lss_grad_weight, gen)
            dw = inverse_hadamard_transform(d, -1, block_size=r.block_size)[:, :k].to(ctx.w_dtype)
        if ctx.needs_input_grad[2]:
            db = dy.sum(0).to(ctx.b_dtype)
        return dx, dw, db, None, None


def int4_xi_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   recipe: Int4XiRecipe | str = "int4_xi", generator: torch.Generator | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` trained as Xi et al.: HQ forward, bit-split / leverage-sampled INT4 backward.

    ``x`` [..., in], ``weight`` [out, in], ``bias`` [out] or None; ``recipe`` an :class:`Int4XiRecipe` or its
    name; ``generator`` the source of the backward's random draws (default: torch's global RNG).

    >>> import torch
    >>> w = torch.randn(8, 32, requires_grad=True)
    >>> y = int4_xi_linear(torch.randn(5, 32), w)
    >>> y.sum().backward(); tuple(w.grad.shape)
    (8, 32)
    """
    if not isinstance(recipe, Int4XiRecipe):
        recipe = get_training_recipe(recipe)
        if not isinstance(recipe, Int4XiRecipe):
            raise ValueError(f"int4_xi_linear: recipe {recipe.name!r} is not an Int4XiRecipe; use quant_linear for "
                             f"product recipes")
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[-1] != weight.shape[-1]:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"int4_xi_linear: x of shape {shape} does not fit weight {tuple(weight.shape)}: the last "
                         f"dim of x must be in_features = {weight.shape[-1]}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"int4_xi_linear: generator must be a torch.Generator or None, got {type(generator).__name__}")
    return _Int4XiFunction.apply(x, weight, bias, recipe, generator)
