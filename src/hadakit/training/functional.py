"""The quantized linear layer as a function: ``quant_linear(x, weight, bias, recipe)``.

One custom :class:`torch.autograd.Function` runs the three products of a linear layer (see
:mod:`hadakit.training.recipe`) each as ``a · bᵀ`` with operands laid out ``[rows, inner]``:

1. zero-pad the inner dim of both operands to a common length ``L`` (a multiple of every group / tile size and of
   the rotation block; for a ``"full"`` rotation also a size with a Hadamard matrix). Zeros change neither the
   product nor an amax-type scale, so padding is exact;
2. rotate both operands along the inner dim with the same ``R = H·D`` (``hadakit.hadamard_transform``), which
   leaves ``a·bᵀ`` unchanged up to float32 rounding;
3. quantize each operand with its scheme (``hadakit.formats``; groups along the inner dim, optional 16×16 weight
   tiles, stochastic rounding, headroom);
4. multiply: on CUDA, where both operands are FP8 (per-tensor scales) or INT8 (per-tensor / per-row scales) and
   ``backend="auto"``, with the real low-precision GEMM (``torch._scaled_mm`` / ``torch._int_mm``) on the stored
   codes; everywhere else emulated: the exact product of the dequantized operands in float32.

Master weights stay in their own dtype; only the products see quantized values. Quantization and the real GEMMs are
``torch.library`` custom ops (``hadakit_training::quantize_operand``, ``::lowp_mm``, ``::fixed_signs``) so that
``torch.compile`` traces the layer with ``fullgraph=True``.
"""

from __future__ import annotations

import functools
import json

import torch
import torch.nn.functional as F

from hadakit.formats import (
    QuantScheme,
    compute_scales,
    fake_quantize,
    quantize,
    quantize_with_scales,
)
from hadakit.formats.elements import FloatFormat, IntFormat
from hadakit.formats.rounding import uniform_noise
from hadakit.transforms import hadamard_transform, inverse_hadamard_transform, random_signs, supported

from .recipe import Int4XiRecipe, OperandConfig, ProductConfig, TrainingRecipe, get_training_recipe

__all__ = ["quant_linear", "quantized_product"]


# ------------------------------------------------------------------------------------------------------------------
# Custom ops (opaque to torch.compile)
# ------------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=512)
def _parse_spec(spec: str) -> tuple[QuantScheme, int, float]:
    d = json.loads(spec)
    return QuantScheme.from_dict(d["scheme"]), int(d["tile"]), float(d["headroom"])


def _fast_ok(x: torch.Tensor, scheme: QuantScheme) -> bool:
    el = scheme.element
    return (isinstance(el, FloatFormat) and el.fast_round_ok(x.dtype) and scheme.symmetric
            and not scheme.clip_search)


def _fq(x: torch.Tensor, scheme: QuantScheme, headroom: float) -> torch.Tensor:
    """``fake_quantize(headroom · x, scheme)`` with the scales of ``x`` itself (headroom 1: plain fake_quantize).

    Float element formats take a short path (the scales from ``hadakit.formats.compute_scales``, the elements
    rounded in ~10 passes instead of ~30), bit-identical to ``hadakit.formats.fake_quantize`` with the same noise
    (tested); everything else, and inputs with NaN / Inf, go through ``hadakit.formats``.
    """
    if headroom == 1.0 and not _fast_ok(x, scheme):
        # allow_nonfinite: a NaN / Inf poisons its group (as it would poison an unquantized product) instead of
        # raising in the middle of a backward pass.
        return fake_quantize(x, scheme, allow_nonfinite=True)
    try:
        scales = compute_scales(x, scheme)  # raises on NaN / Inf (its one finiteness check)
    except ValueError:
        if bool(torch.isfinite(x).all()):
            raise
        return fake_quantize(x * headroom, scheme, allow_nonfinite=True)
    if not _fast_ok(x, scheme):
        _, deq = quantize_with_scales(x * headroom, scheme, scales)  # the scales of x on headroom·x: no clipping
        return deq.reshape(x.shape).to(x.dtype)
    (R, G, g), _ = scheme.layout(x.shape)
    s = scales.s_eff  # (R, G), float32: decoded stored scale (x tensor scale)
    # A zero scale (all-zero or underflowed group) is never divided by: x / inf = 0 encodes its elements as 0.
    s_div = torch.where(s > 0, s, torch.full_like(s, float("inf")))
    xg = x.reshape(R, G, g)
    t = (xg * headroom if headroom != 1.0 else xg) / s_div[..., None]
    noise = None
    if scheme.rounding == "stochastic":
        noise = uniform_noise(x.shape, x.device, None).reshape(R, G, g)  # the formats layer's draw
    v = scheme.element.round_finite(t, scheme.rounding, noise)
    return v.mul_(s[..., None]).reshape(x.shape)


def fake_quantize_operand(x: torch.Tensor, scheme: QuantScheme, tile: int = 0, headroom: float = 1.0) -> torch.Tensor:
    """Quantize-dequantize a 2-D operand ``x`` [rows, inner] (groups along ``inner``).

    ``tile > 0``: one scale per ``tile × tile`` square (rows and inner zero-padded to multiples of ``tile``, then
    cropped); the scheme's ``group_size`` becomes ``tile²`` over each flattened tile. ``headroom != 1``: returns the
    quantized ``headroom · x`` with the scales of ``x`` (the caller divides the product by the headroom).
    """
    if not tile:
        return _fq(x, scheme, headroom)
    rows, inner = x.shape
    rp, ip = -(-rows // tile) * tile, -(-inner // tile) * tile
    xp = F.pad(x, (0, ip - inner, 0, rp - rows)) if (rp, ip) != (rows, inner) else x
    t = xp.reshape(rp // tile, tile, ip // tile, tile).transpose(1, 2).reshape(rp // tile, ip // tile, tile * tile)
    q = _fq(t, scheme.replace(group_size=tile * tile, name=scheme.name), headroom)
    q = q.reshape(rp // tile, ip // tile, tile, tile).transpose(1, 2).reshape(rp, ip)
    return q[:rows, :inner]


# Tagged nondeterministic_seeded: with stochastic rounding the op draws from torch's RNG, so compilers must neither
# merge two identical calls (CSE) nor treat it as pure.
@torch.library.custom_op("hadakit_training::quantize_operand", mutates_args=(),
                         tags=(torch.Tag.nondeterministic_seeded,))
def _quantize_operand_op(x: torch.Tensor, spec: str) -> torch.Tensor:
    scheme, tile, headroom = _parse_spec(spec)
    return fake_quantize_operand(x, scheme, tile, headroom).contiguous()


@_quantize_operand_op.register_fake
def _(x, spec):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _scale_values(qt) -> torch.Tensor:
    s = qt.scale_values(torch.float32)
    return s * qt.tensor_scale if qt.tensor_scale is not None else s


def lowp_matmul(a: torch.Tensor, b: torch.Tensor, scheme_a: QuantScheme, scheme_b: QuantScheme,
                kind: str) -> torch.Tensor:
    """``Q(a) · Q(b)ᵀ`` (float32 [M, N]) with a real low-precision GEMM on the stored codes.

    ``kind="fp8"``: E4M3/E5M2 per-tensor operands, ``torch._scaled_mm`` (float32 output, exact per-tensor scales);
    ``kind="int8"``: symmetric INT8 per-tensor / per-row operands, ``torch._int_mm`` (exact int32 accumulation),
    then ``· s_a · s_bᵀ`` in float32. Works wherever torch implements the op (CUDA; recent CPU builds too, which is
    how the tests check it against emulation without a GPU).
    """
    # allow_nonfinite: a NaN / Inf poisons its group (NaN scale code), as in the emulated path.
    qa, qb = quantize(a, scheme_a, allow_nonfinite=True), quantize(b, scheme_b, allow_nonfinite=True)
    sa, sb = _scale_values(qa), _scale_values(qb)
    if kind == "fp8":
        a8, b8 = qa.native_payload(), qb.native_payload()
        return torch._scaled_mm(a8, b8.t(), sa.reshape(()), sb.reshape(()), out_dtype=torch.float32)
    if kind == "int8":
        a8 = qa.payload.view(torch.int8).reshape(a.shape)
        b8 = qb.payload.view(torch.int8).reshape(b.shape)
        acc = torch._int_mm(a8, b8.t())
        sa = sa.reshape(-1, 1) if sa.dim() else sa
        sb = sb.reshape(1, -1) if sb.dim() else sb
        return acc.to(torch.float32) * sa * sb
    raise ValueError(f"unknown low-precision GEMM kind {kind!r} (fp8 or int8)")


@torch.library.custom_op("hadakit_training::lowp_mm", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def _lowp_mm_op(a: torch.Tensor, b: torch.Tensor, spec_a: str, spec_b: str, kind: str) -> torch.Tensor:
    return lowp_matmul(a, b, _parse_spec(spec_a)[0], _parse_spec(spec_b)[0], kind)


@_lowp_mm_op.register_fake
def _(a, b, spec_a, spec_b, kind):
    return a.new_empty((a.shape[0], b.shape[0]), dtype=torch.float32)


@functools.lru_cache(maxsize=64)
def _fixed_signs_cached(n: int, seed: int, device: str) -> torch.Tensor:
    return random_signs(n, seed, device=device)


@torch.library.custom_op("hadakit_training::fixed_signs", mutates_args=())
def _fixed_signs_op(like: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    return _fixed_signs_cached(n, seed, str(like.device)).clone()


@_fixed_signs_op.register_fake
def _(like, n, seed):
    return like.new_empty((n,), dtype=torch.float32)


# ------------------------------------------------------------------------------------------------------------------
# One product
# ------------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1024)
def _padded_length_cached(k: int, multiple: int, full: bool) -> int:
    n = -(-k // multiple) * multiple
    if full:
        while not supported(n):
            n += multiple
    return n


@torch.compiler.assume_constant_result
def _padded_length(k: int, multiple: int, full: bool) -> int:
    return _padded_length_cached(k, multiple, full)


def _signs(prod: ProductConfig, n: int, like: torch.Tensor) -> torch.Tensor | None:
    if prod.signs == "none":
        return None
    if prod.signs == "fixed":
        return _fixed_signs_op(like, n, prod.seed)
    # per_step: fresh signs from torch's global RNG every time the product runs (seed torch for reproducibility).
    return (1 - 2 * torch.randint(0, 2, (n,), device=like.device)).to(torch.float32)


def _rotation_block(prod: ProductConfig, n: int) -> int:
    return n if prod.rotation == "full" else prod.rotation


def _real_kind(prod: ProductConfig, m: int, n: int, k: int, device: torch.device, backend: str) -> str | None:
    """Which real low-precision GEMM can compute this product, or None (emulate)."""
    if backend != "auto" or device.type != "cuda":
        return None
    ops = (prod.a, prod.b)
    if any(op.scheme is None or op.scale_2d or op.headroom != 1.0 for op in ops):
        return None
    schemes = [op.effective_scheme for op in ops]
    if any(s.tensor_scale or not s.symmetric or s.scale_format.name != "fp32" for s in schemes):
        return None
    els = [s.element for s in schemes]
    if all(isinstance(e, FloatFormat) and e.name in ("e4m3", "e5m2") for e in els):
        if els[0].name == els[1].name == "e5m2":
            return None  # no E5M2 x E5M2 GEMM
        if all(s.granularity == "per_tensor" for s in schemes) and m % 16 == 0 and n % 16 == 0 and k % 16 == 0:
            return "fp8"
        return None
    if all(isinstance(e, IntFormat) and e.bits == 8 and not e.frac_bits for e in els):
        if all(s.granularity in ("per_tensor", "per_row") for s in schemes) and m > 16 and k % 8 == 0 and n % 8 == 0:
            return "int8"
    return None


def _quant(t: torch.Tensor, op: OperandConfig) -> torch.Tensor:
    return t if op.scheme is None else _quantize_operand_op(t, op.spec)


def quantized_product(a: torch.Tensor, b: torch.Tensor, prod: ProductConfig, backend: str = "auto",
                      keep: bool = False):
    """``a · bᵀ`` for 2-D ``a`` [M, K], ``b`` [N, K] as configured by ``prod``; returns ``(out, kept)``.

    ``out`` is float32 (float64 for float64 inputs), or the input dtype when ``prod.plain``. With ``keep=True``,
    ``kept`` is ``(a_q, b_q)``: each operand as the product saw it, rotated back and cropped to ``[rows, K]`` (the
    forward's quantized operands, reused by straight-through backward products); otherwise ``None``.
    """
    if prod.plain:
        return a.mm(b.t()), ((a, b) if keep else None)
    cd = torch.float64 if a.dtype == torch.float64 else torch.float32
    A, B = a.to(cd), b.to(cd)
    k = A.shape[1]
    n = _padded_length(k, prod.multiple, prod.rotation == "full")
    if n != k:
        A, B = F.pad(A, (0, n - k)), F.pad(B, (0, n - k))
    signs = None
    if prod.rotation is not None:
        signs = _signs(prod, n, A)
        block = _rotation_block(prod, n)
        A = hadamard_transform(A, -1, block_size=block, signs=signs)
        B = hadamard_transform(B, -1, block_size=block, signs=signs)
    kind = None if keep else _real_kind(prod, A.shape[0], B.shape[0], n, A.device, backend)
    if kind is not None:
        out = _lowp_mm_op(A, B, prod.a.spec, prod.b.spec, kind)
        Aq = Bq = None
    else:
        Aq, Bq = _quant(A, prod.a), _quant(B, prod.b)
        out = Aq.mm(Bq.t())
    h = prod.a.headroom * prod.b.headroom
    if h != 1.0:
        out = out / h
    if not keep:
        return out, None
    kept = []
    for q, op in ((Aq, prod.a), (Bq, prod.b)):
        if prod.rotation is not None:
            q = inverse_hadamard_transform(q, -1, block_size=_rotation_block(prod, n), signs=signs)
        if op.headroom != 1.0:
            q = q / op.headroom
        kept.append(q[:, :k])
    return out, tuple(kept)


# ------------------------------------------------------------------------------------------------------------------
# The layer function
# ------------------------------------------------------------------------------------------------------------------


class _QuantLinearFunction(torch.autograd.Function):
    """``y = x·Wᵀ + b`` (``x`` [..., in]; leading dims are tokens) with the three products as the recipe says."""

    @staticmethod
    def forward(ctx, x, weight, bias, recipe: TrainingRecipe):
        fwd = recipe.forward
        reuse_w = recipe.grad_input.b.reuse_forward
        reuse_x = recipe.grad_weight.b.reuse_forward
        x2d = x.reshape(-1, x.shape[-1])
        if fwd.plain and not (reuse_w or reuse_x):
            y = F.linear(x, weight, bias)
            x_saved, w_saved = x2d, weight
        else:
            out, kept = quantized_product(x2d, weight, fwd, recipe.backend, keep=reuse_w or reuse_x)
            y = out.to(x.dtype)
            if bias is not None:
                y = y + bias.to(y.dtype)
            # A fresh tensor, not a view of the 2-D result (FSDP2 warns about modules returning views).
            y = torch.ops.aten._unsafe_view(y.contiguous(), (*x.shape[:-1], weight.shape[0]))
            x_saved = kept[0] if reuse_x else x2d
            w_saved = kept[1] if reuse_w else weight
        ctx.save_for_backward(x_saved, w_saved)
        ctx.recipe = recipe
        ctx.has_bias = bias is not None
        ctx.x_shape = x.shape
        ctx.x_dtype, ctx.w_dtype = x.dtype, weight.dtype
        ctx.b_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        recipe = ctx.recipe
        dy = dy.reshape(-1, dy.shape[-1])
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            gi = recipe.grad_input
            dx = dy.mm(w) if gi.plain else quantized_product(dy, w.t(), gi, recipe.backend)[0]
            dx = dx.to(ctx.x_dtype).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            gw = recipe.grad_weight
            # nn.Linear's autograd computes (xᵀ·dy)ᵀ; the same expression keeps the unquantized case bit-identical.
            dw = x.t().mm(dy).t() if gw.plain else quantized_product(dy.t(), x.t(), gw, recipe.backend)[0]
            dw = dw.to(ctx.w_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.sum(0).to(ctx.b_dtype)
        return dx, dw, db, None


def quant_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 recipe: TrainingRecipe | str = "bf16") -> torch.Tensor:
    """``F.linear(x, weight, bias)`` with the forward and both backward products computed as ``recipe`` says.

    ``x`` [..., in] (leading dims are flattened into tokens), ``weight`` [out, in], ``bias`` [out] or None. A recipe
    without quantization or rotation (``bf16``) is ``F.linear`` itself.
    """
    if not isinstance(recipe, TrainingRecipe):
        recipe = get_training_recipe(recipe)
    if isinstance(recipe, Int4XiRecipe):  # bit splitting and leverage-score sampling: its own autograd function
        from .int4 import int4_xi_linear

        return int4_xi_linear(x, weight, bias, recipe)
    if x.dim() == 0 or x.shape[-1] != weight.shape[-1]:
        raise ValueError(f"quant_linear: x of shape {tuple(x.shape)} does not fit weight {tuple(weight.shape)}: "
                         f"the last dim of x must be in_features = {weight.shape[-1]}")
    if recipe.plain:
        return F.linear(x, weight, bias)
    return _QuantLinearFunction.apply(x, weight, bias, recipe)
