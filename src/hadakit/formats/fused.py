"""Fused rotate-and-quantize: ``quantize(hadamard_transform(x, ...), scheme)`` in one pass over ``x``.

    >>> import torch
    >>> from hadakit.formats.fused import rotate_quantize, dequantize_rotate
    >>> x = torch.randn(4, 256)
    >>> qt = rotate_quantize(x, "mxfp4", block_size=32)         # H_32 on every block of 32, then MXFP4
    >>> qt.scales.shape
    torch.Size([4, 8])
    >>> x_hat = dequantize_rotate(qt, block_size=32)            # dequantize, then the inverse rotation
    >>> bool(((x_hat - x).norm() / x.norm()) < 0.2)
    True

Exactness contract
------------------
``rotate_quantize(x, scheme, block_size=b, signs=s)`` returns a :class:`QuantizedTensor` **bit-identical** (payload,
scale bits, tensor scale) to ``quantize(hadamard_transform(x, block_size=b, signs=s), scheme)`` computed on the same
device, whichever path runs:

* **CPU tensors** (and anything the kernel does not cover): that expression itself — the transform, then the
  quantizer. Identical by construction.
* **CUDA tensors** (or ``HADAKIT_BACKEND=triton`` under ``TRITON_INTERPRET=1``): one Triton kernel
  (``kernels/triton_rotate_quantize.py``). On a GPU the unfused transform is the ``hadamard`` primitive's Triton
  kernel, whose butterflies sum in a fixed order (index bits from the lowest up, fp32, then ``· 1/sqrt(b)``); the
  fused kernel sums in the same order, so its rotated fp32 values are the same bits. They are then rounded to
  ``x.dtype`` (RNE), exactly as ``hadamard_transform`` returns them, and quantized by a replay of
  ``formats.quantize`` in fp32, op for op: correctly rounded divisions (``div_rn``, or a reciprocal with two
  Newton–Markstein FMA corrections, which is correctly rounded), PyTorch CUDA's reciprocal multiply for
  ``amax / elem_max`` (a Python-float divisor), round-half-even onto the element and scale grids, the same
  saturation, all-zero-group, negative-zero and full-range-INT rules.

  The contract rests on the transform kernel keeping that summation order (a different order would change the last
  bit of some rotated values, hence some codes). What does not depend on any other kernel, and is tested on its own:
  the fused kernel's rotated values equal the transform to fp32 rounding, and its codes and scales are bit-identical
  to ``quantize`` applied to *those* rotated values. Checked under the interpreter, and on a GPU by the CUDA tests
  in ``tests/test_fused_rotate_quantize.py`` (not yet run on a GPU when this was written).

Covered by the kernel (else transform-then-quantize, same result): ``granularity="group"``, symmetric,
``rounding="nearest"``, no ``clip_search`` (a fixed ``clip_ratio`` is fine); 4- or 8-bit INT elements (``int4``,
``int8``, ``int8_frac6``; restricted or full range) or 4- / 8-bit float elements (``e2m1``, ``e4m3``, ``e5m2``);
scales E8M0 with the ``floor`` / ``ceil`` rules, or the ``amax`` rule into fp32 / fp16 / UE4M3 / UE5M3 / E4M3-style
formats, optionally with the fp32 tensor scale. Presets: ``mxfp4``, ``mxfp8``, ``mxfp8_e5m2``, ``mxint8``,
``nvfp4``, ``nvint4``, ``fp4_g16_ue5m3``, ``int4_g32``, ``int4_g128``. The rotation block ``b`` and the group ``g``
must be powers of two with ``max(b, g) <= 8192`` (either may be the larger: rotation 128 with ``int4_g128``, 32
with ``nvfp4``, or 16 with ``int4_g128``); input float32 / float16 / bfloat16. Not covered: FP6 and 2- / 3-bit
elements, ternary / binary, asymmetric INT, per-row / per-tensor scales, bf16 scales, stochastic rounding, clip
search, non-power-of-two blocks, float64 inputs.

Two-level schemes (NVFP4, NVINT4): the tensor scale needs the amax of the *rotated* tensor (``|Hx|`` amax is not
``|x|`` amax). By default the kernel path runs twice: a first pass reads ``x``, rotates and reduces the amax
(nothing written but one float per program), the tensor scale is computed from it on the device
(``_tensor_scale``, the formats rule), and the second pass quantizes. Traffic for bf16 -> NVFP4: 2 + 2 read +
0.5625 written = 4.56 B/element (1.14x a bf16 copy). Pass ``amax=`` (e.g. the previous step's, delayed scaling, or
:func:`rotated_amax`) to skip the first pass: 2.56 B/element (0.64x a copy); the result is then the quantization with
that tensor scale, i.e. ``quantize_with_scales(y, scheme, compute_scales(y, scheme, tensor_scale=s_t))`` with
``s_t = amax / (elem_max · 448)`` (values beyond the implied range saturate).

Non-finite rotated values (NaN / ±Inf in ``x``, or fp16 / bf16 overflow of the rotation) are flagged by the kernel;
the call then reruns the unfused path, which raises the usual ValueError or, with ``allow_nonfinite=True``,
poisons the groups, exactly as ``quantize`` does. Reading the flags synchronizes the CUDA stream once per call, as
``quantize``'s own check does.
"""

from __future__ import annotations

import math
import os

import torch

from hadakit.transforms.functional import (
    _prepare_signs,
    _resolve_block,
    hadamard_transform,
    inverse_hadamard_transform,
)

from .elements import E8M0Format, FloatFormat, IntFormat
from .packing import pack_codes
from .quantize import _check_input, _tensor_scale, compute_scales, quantize, quantize_with_scales
from .schemes import QuantScheme, get_scheme
from .tensor import QuantizedTensor

__all__ = ["dequantize_rotate", "rotate_quantize", "rotated_amax"]


def _kernels():
    try:
        from hadakit.kernels import triton_rotate_quantize as mod
    except Exception:  # pragma: no cover - broken Triton install: the unfused path still works
        return None
    return mod if mod.triton_available() else None


def _recipe(scheme: QuantScheme):
    """The kernel's numeric description of ``scheme``, or None when the kernel does not cover it."""
    from hadakit.kernels.triton_rotate_quantize import Recipe

    if (scheme.granularity != "group" or not scheme.symmetric or scheme.rounding != "nearest"
            or scheme.clip_search):
        return None
    el, sf = scheme.element, scheme.scale_format
    full = getattr(scheme, "int_range", "restricted") == "full"
    if isinstance(el, IntFormat) and el.bits in (4, 8):
        # int_range="full": codes down to -qmax - 1 and amax divided by qmax + 1/2 (in element units)
        kw = dict(el_kind="int", el_qmax=el.qmax, el_qmin=-el.qmax - int(full), el_frac=el.frac_bits,
                  amax_div=float(el.max + 0.5 * 2.0 ** -el.frac_bits if full else el.max))
    elif isinstance(el, FloatFormat) and el.signed and el.bits in (4, 8):
        kw = dict(el_kind="float", el_mbits=el.mbits, el_emin=el.emin, amax_div=float(el.max))
    else:
        return None
    kw.update(el_bits=el.bits, el_max=float(el.max), el_emax=int(el.emax), el_ceil_m=float(el.max / 2.0 ** el.emax))
    rule = scheme.scale_rule
    if rule in ("floor", "ceil"):
        if not isinstance(sf, E8M0Format):
            return None
        kw.update(sc_rule=rule, sc_min_exp=sf.min_exp, sc_max_exp=sf.max_exp, sc_bytes=1)
    elif rule == "amax":
        if not isinstance(sf, FloatFormat):
            return None
        if (sf.ebits, sf.mbits, sf.bias, sf.nan_style) == (8, 23, 127, "ieee"):
            kw.update(sc_identity=True, sc_bytes=4)
        elif sf.mbits <= 20 and sf.emin - sf.mbits >= -126 and sf.storage_dtype.itemsize in (1, 2):
            kw.update(sc_mbits=sf.mbits, sc_emin=sf.emin, sc_max=float(sf.max), sc_bytes=sf.storage_dtype.itemsize)
        else:
            return None  # bf16 scales (quantum below fp32's normal range), ...
        kw.update(sc_rule="amax")
    else:
        return None
    kw.update(tensor_scale=scheme.tensor_scale, clip=scheme.clip_ratio)
    return Recipe(**kw)


def _kernel_for(x: torch.Tensor, scheme: QuantScheme, block: int):
    """(kernel module, recipe) when the fused kernel runs for this call, else None (see the module docstring)."""
    forced = os.environ.get("HADAKIT_BACKEND", "auto").lower()
    if forced == "torch" or x.numel() == 0 or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return None
    if forced != "triton" and not x.is_cuda:
        return None
    mod = _kernels()
    if mod is None:
        if forced == "triton":
            raise RuntimeError("HADAKIT_BACKEND=triton but Triton is not usable here (install hadakit[triton]; on a "
                               "machine without a GPU also set TRITON_INTERPRET=1).")
        return None
    try:
        recipe = _recipe(scheme)
    except Exception:  # pragma: no cover - defensive: an exotic format the recipe cannot describe
        recipe = None
    if recipe is None or not mod.covers(block, scheme.group_size, x.shape[-1], x.dtype):
        return None
    return mod, recipe


def _tensor_scale_from(amax, scheme: QuantScheme, device) -> torch.Tensor:
    a = torch.as_tensor(amax, dtype=torch.float32, device=device).detach().reshape(-1).abs()
    return _tensor_scale(a, scheme)


def _unfused(x, scheme, block, signs, generator, amax, allow_nonfinite) -> QuantizedTensor:
    y = hadamard_transform(x, block_size=block, signs=signs)
    if amax is None:
        return quantize(y, scheme, generator=generator, allow_nonfinite=allow_nonfinite)
    # Two-level scheme with a given rotated amax: the formats layer's own pieces with that tensor scale.
    if scheme.clip_search:
        raise ValueError("rotate_quantize: amax= cannot be combined with clip_search")
    st = _tensor_scale_from(amax, scheme, y.device)
    gs = compute_scales(y, scheme, tensor_scale=st)
    codes, _ = quantize_with_scales(y, scheme, gs, generator=generator)
    _, sshape = scheme.layout(y.shape)
    sf = scheme.scale_format
    return QuantizedTensor(pack_codes(codes, scheme.element.bits), sf.codes_to_storage(gs.scale_codes).reshape(sshape),
                           y.shape, scheme, tensor_scale=gs.tensor_scale, dtype=y.dtype)


def _block_of(x: torch.Tensor, block_size, what: str) -> int:
    if x.dim() == 0:
        raise ValueError(f"{what}: needs a tensor with at least one dimension; got a 0-d tensor")
    return _resolve_block(x.shape[-1], block_size, what)


def rotate_quantize(x: torch.Tensor, scheme, *, block_size: int | None = None, signs: torch.Tensor | None = None,
                    generator=None, amax=None, allow_nonfinite: bool = False) -> QuantizedTensor:
    """Rotate the last dim of ``x`` by the normalized Hadamard transform and quantize it with ``scheme``.

    Equals ``quantize(hadamard_transform(x, block_size=block_size, signs=signs), scheme)`` bit for bit on the same
    device (see the module docstring for the contract, the covered schemes and the memory traffic). CUDA tensors run
    one fused Triton kernel when it covers the call (``HADAKIT_BACKEND=triton`` forces it under
    ``TRITON_INTERPRET=1``; ``HADAKIT_BACKEND=torch`` disables it); everything else runs transform-then-quantize.

    Args:
        x: float32 / float16 / bfloat16 (float64: unfused path) tensor, any shape; rotated and grouped along the last
            dim.
        scheme: QuantScheme or preset name (``"mxfp4"``, ``"nvfp4"``, ``"int4_g128"``, ...).
        block_size: rotation block (block-diagonal transform); ``None`` rotates whole rows.
        signs: optional ±1 vector of length ``x.shape[-1]`` applied before the transform (randomized Hadamard),
            fused into the load.
        generator: for stochastic rounding (unfused path), as in :func:`hadakit.formats.quantize`.
        amax: two-level schemes only (NVFP4 / NVINT4): the amax of the rotated tensor (a float or a tensor),
            e.g. from the previous step. Saves the kernel's amax pass; the tensor scale is derived from it.
        allow_nonfinite: as in :func:`hadakit.formats.quantize`.
    """
    _check_input(x, "rotate_quantize")
    scheme = get_scheme(scheme)
    b = _block_of(x, block_size, "rotate_quantize")
    scheme.layout(x.shape)  # validates the group size against the last dim
    if amax is not None and not scheme.tensor_scale:
        raise ValueError(f"rotate_quantize: amax= is for two-level schemes (tensor_scale=True); "
                         f"{scheme.describe()!r} has no tensor scale")
    found = _kernel_for(x, scheme, b)
    if found is None:
        return _unfused(x, scheme, b, signs, generator, amax, allow_nonfinite)
    mod, recipe = found
    s = _prepare_signs(signs, x.shape[-1], x, "rotate_quantize")
    rot_scale = 1.0 / math.sqrt(b)  # the value hadamard_transform passes to the primitive
    g = scheme.group_size
    st = None
    if scheme.tensor_scale:
        if amax is None:
            partials, _ = mod.rotated_amax(x, b, g, s, rot_scale)
            st = _tensor_scale(partials, scheme)
        else:
            st = _tensor_scale_from(amax, scheme, x.device)
    payload, sc, bad, _ = mod.rotate_quantize(x, recipe, b, g, s, rot_scale, st)
    if bool(bad.any()):  # NaN / Inf after the rotation: the unfused path applies the non-finite policy
        return _unfused(x, scheme, b, signs, generator, amax, allow_nonfinite)
    _, sshape = scheme.layout(x.shape)
    scales = sc.view(scheme.scale_format.storage_dtype).reshape(sshape)
    return QuantizedTensor(payload, scales, x.shape, scheme, tensor_scale=st, dtype=x.dtype)


def rotated_amax(x: torch.Tensor, *, block_size: int | None = None, signs: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """``hadamard_transform(x, block_size=..., signs=...).abs().amax()`` as a 0-d float32 tensor.

    On CUDA (kernel-covered sizes) it reads ``x`` once and writes nothing but one float per program: the first
    pass of :func:`rotate_quantize` for NVFP4, exposed for delayed-scaling schemes (pass the result as ``amax=``).
    Non-finite rotated values give a NaN / Inf amax.
    """
    _check_input(x, "rotated_amax")
    b = _block_of(x, block_size, "rotated_amax")
    mod = _kernels() if x.numel() else None
    forced = os.environ.get("HADAKIT_BACKEND", "auto").lower()
    use = (mod is not None and forced != "torch" and (x.is_cuda or forced == "triton")
           and mod.covers(b, b, x.shape[-1], x.dtype))
    if not use:
        y = hadamard_transform(x, block_size=b, signs=signs)
        a = y.detach().abs().amax() if y.numel() else y.new_zeros(())
        return a.to(torch.float32)
    s = _prepare_signs(signs, x.shape[-1], x, "rotated_amax")
    partials, bad = mod.rotated_amax(x, b, b, s, 1.0 / math.sqrt(b))
    a = partials.amax()
    return torch.where(bad.sum() > 0, torch.full_like(a, float("nan")), a)


def dequantize_rotate(qt: QuantizedTensor, *, block_size: int | None = None, signs: torch.Tensor | None = None,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`rotate_quantize`: ``qt.dequantize()`` then the inverse rotation, returned in ``dtype``.

    Computed in float32 (float64 for ``dtype=torch.float64``): ``inverse_hadamard_transform(qt.dequantize(cd),
    block_size=block_size, signs=signs).to(dtype)``. Pass the ``block_size`` and ``signs`` used to quantize.
    """
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    y = qt.dequantize(cd)
    return inverse_hadamard_transform(y, block_size=block_size, signs=signs).to(dtype)
