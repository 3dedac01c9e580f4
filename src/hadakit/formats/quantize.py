"""quantize / fake_quantize / dequantize.

One core routine (:func:`_core`) computes, for a tensor and a :class:`~hadakit.formats.schemes.QuantScheme`, the
scale codes, the element codes and the dequantized values. :func:`quantize` packs its codes into a
:class:`~hadakit.formats.tensor.QuantizedTensor`; :func:`fake_quantize` returns its dequantized values directly. The
dequantized value of an element is defined as the float product ``v · s`` (computed in float32, float64 for float64
data) of the element value ``v`` (``code - zero_point`` for asymmetric INT) and the group's effective scale ``s``
(the decoded stored scale, times the fp32 tensor scale for two-level schemes); ``QuantizedTensor.dequantize`` evaluates
the same expression from the stored bits, so the two paths agree bit for bit.

Non-finite inputs: refused by default (ValueError with the counts). With ``allow_nonfinite=True`` each group holding a
NaN or ±Inf gets the scale format's NaN code, so the whole group decodes to NaN (the OCP MX rule for NaN, applied to
every format); scales of the other groups, and the NVFP4 tensor scale, are computed from the finite values only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .elements import BinaryFormat, FloatFormat, IntFormat, TernaryFormat
from .rounding import floor_log2, pow2, resolve_generator, round_integer, uniform_noise
from .schemes import QuantScheme, get_scheme

__all__ = ["GroupScales", "compute_scales", "dequantize", "fake_quantize", "quantize", "quantize_with_scales"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_input(x, fn: str):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}() expects a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        hint = " (it looks already quantized: dequantize it first)" if x.dtype.is_floating_point else ""
        raise TypeError(
            f"{fn}() quantizes float32, float16, bfloat16 or float64 tensors, got {x.dtype}{hint}; "
            f"pass x.float() (or x.to(torch.bfloat16), ...)")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class _Result:
    dequant: torch.Tensor  # (R, G, g) in the compute dtype
    codes: torch.Tensor | None  # (R, G, g) int64 stored element codes
    scale_codes: torch.Tensor  # (R, G) int64
    zero_points: torch.Tensor | None  # (R, G) int64
    tensor_scale: torch.Tensor | None  # 0-d float32


def _reduce(t: torch.Tensor, op: str) -> torch.Tensor:
    """``amax`` / ``amin`` / ``mean`` over the last dim, 0 for empty groups (empty tensors quantize too)."""
    if t.shape[-1] == 0:
        return t.new_zeros(t.shape[:-1])
    return getattr(t, op)(dim=-1)


def _pow2_exponent(stat: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Exponent ``k`` of the power-of-two scale of the "floor" / "ceil" rules (int64, clamped to the scale format).

    floor (OCP MX v1.0): ``k = floor(log2(amax)) - emax_elem``.
    ceil: the smallest ``k`` with ``amax <= elem_max · 2^k`` (no clipping). With ``amax = m · 2^k0``, ``m`` in
    ``[1, 2)``, and ``elem_max = M · 2^emax``, ``M`` in ``[1, 2)``: ``k = k0 - emax + [m > M]`` — exact, no log2.
    An all-zero group gets the smallest representable exponent (a finite scale; its elements are all 0).
    """
    el, sf = scheme.element, scheme.scale_format
    pos = stat > 0
    a = torch.where(pos, stat, torch.ones_like(stat))
    k0 = floor_log2(a)
    k = k0 - el.emax
    if scheme.scale_rule == "ceil":
        m = a / pow2(k0, a.dtype)  # exact mantissa in [1, 2)
        k = k + (m > el.max / 2.0 ** el.emax).to(k.dtype)
    k = torch.where(pos, k, torch.full_like(k, sf.min_exp))
    return k.clamp(sf.min_exp, sf.max_exp)


@dataclass
class GroupScales:
    """The scale half of a quantization: per-group stored scale codes and what the elements are divided by.

    ``scale_codes`` (R, G) int64 codes in the scheme's scale format; ``s_eff`` (R, G) the effective scale (decoded
    scale x tensor scale) in the compute dtype; ``zero_points`` (R, G) float zero points (asymmetric INT) or None;
    ``tensor_scale`` the 0-d float32 second level (two-level schemes) or None.
    """

    scale_codes: torch.Tensor
    s_eff: torch.Tensor
    zero_points: torch.Tensor | None
    tensor_scale: torch.Tensor | None


def _tensor_scale(absx: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """NVIDIA's fp32 second level: ``s_t = amax / (elem_max · scale_max)`` (1 for an all-zero tensor)."""
    el, sf = scheme.element, scheme.scale_format
    amax_t = absx.amax() if absx.numel() else absx.new_zeros(())
    st = (amax_t / (el.max * sf.max)).to(torch.float32).clamp(max=torch.finfo(torch.float32).max)
    return torch.where(st > 0, st, torch.ones_like(st))  # all-zero tensor: any finite positive scale works


def _group_scales(xg: torch.Tensor, scheme: QuantScheme, clip, st, poisoned) -> GroupScales:
    """Level-1 scales of ``xg`` (R, G, g) (finite values), given the tensor scale ``st`` (or None)."""
    el, sf = scheme.element, scheme.scale_format
    cd = xg.dtype
    absx = xg.abs()
    st_cd = st.to(cd) if st is not None else None
    lo = None
    rule = scheme.scale_rule
    if not scheme.symmetric:
        lo = _reduce(xg, "amin").clamp(max=0)  # the range always contains 0, so 0 is exact
        hi = _reduce(xg, "amax").clamp(min=0)
        if clip is not None:
            lo, hi = lo * clip, hi * clip
        _, sc = sf.cast((hi - lo) / el.umax)
    elif rule == "absmean":
        raw = _reduce(absx, "mean")
        _, sc = sf.cast(raw / st_cd if st_cd is not None else raw)
    else:
        stat = _reduce(absx, "amax")
        if clip is not None:
            stat = stat * clip
        if rule == "amax":
            raw = stat / (el.max + 0.5 * 2.0 ** -el.frac_bits if scheme.int_range == "full" else el.max)
            if st_cd is not None:
                raw = raw / st_cd
            _, sc = sf.cast(raw)  # round to nearest in the scale format, saturating at its max
        else:
            sc = sf.encode(pow2(_pow2_exponent(stat, scheme), cd))
    if poisoned is not None:
        sc = torch.where(poisoned, torch.full_like(sc, sf.nan_code), sc)
    s = sf.decode(sc, cd)  # the stored scale, exactly as dequantize() will see it
    s_eff = s * st_cd if st_cd is not None else s
    zp = None
    if not scheme.symmetric:
        dead = ~(s_eff > 0)
        s_div = torch.where(dead, torch.ones_like(s_eff), s_eff)
        zp = torch.round(-lo / s_div).clamp(0, el.umax)
        zp = torch.where(dead, torch.zeros_like(zp), zp)
    return GroupScales(sc, s_eff, zp, st)


def _elements(xg: torch.Tensor, scheme: QuantScheme, gs: GroupScales, mode: str, noise, need_codes: bool):
    """Element codes and dequantized values of ``xg`` (R, G, g) with the group scales ``gs`` ((R, G) each)."""
    el = scheme.element
    s_eff, zp = gs.s_eff, gs.zero_points
    # A zero scale (all-zero group, or a scale that underflowed) or a NaN one (poisoned group) is never divided by:
    # its elements are encoded as 0.
    dead = ~(s_eff > 0)
    s_div = torch.where(dead, torch.ones_like(s_eff), s_eff)
    t = torch.where(dead[..., None], torch.zeros_like(xg), xg / s_div[..., None])
    codes = None
    if isinstance(el, IntFormat):
        if el.frac_bits:
            t = t * 2.0 ** el.frac_bits  # fixed point: integer levels of the scaled grid
        r = round_integer(t, mode, noise)
        if scheme.symmetric:
            r = r.clamp(-el.qmax - (scheme.int_range == "full"), el.qmax)
            v = r + 0.0  # -0.0 -> +0.0, as decoding an integer code gives
            if need_codes:
                codes = el.encode(r, signed=True)
        else:
            r = (r + zp[..., None]).clamp(0, el.umax)
            v = r - zp[..., None]
            if need_codes:
                codes = r.to(torch.int64)
        if el.frac_bits:
            v = v * 2.0 ** -el.frac_bits
    elif isinstance(el, TernaryFormat):
        r = round_integer(t, mode, noise).clamp(-1, 1)
        v = r + 0.0
        if need_codes:
            codes = el.encode(r)
    elif isinstance(el, BinaryFormat):
        if mode == "nearest":
            up = t >= 0
        else:
            # P(+1) = (1 + t) / 2 on [-1, 1]: +1 iff 2u - 1 < t (2u - 1 is exact for 24-bit u), unbiased.
            up = (noise.to(xg.dtype) * 2 - 1) < t
        v = torch.where(up, torch.ones_like(t), -torch.ones_like(t))
        if need_codes:
            codes = up.to(torch.int64)
    elif isinstance(el, FloatFormat):
        # t is finite here (non-finite inputs were zeroed, dead groups too): the short path applies to float32
        fast = el.fast_round_ok(t.dtype)
        v = el.round_finite(t, mode, noise) if fast else el.round(t, mode, noise, saturate=True)
        if need_codes:
            codes = el.encode(v)
    else:  # pragma: no cover - QuantScheme validates the element format
        raise TypeError(f"unsupported element format {el!r}")
    return v * s_eff[..., None], codes


def _core(x: torch.Tensor, scheme: QuantScheme, generator, allow_nonfinite: bool, clip=None,
          rounding: str | None = None, need_codes: bool = True) -> _Result:
    (R, G, g), _ = scheme.layout(x.shape)
    cd = _compute_dtype(x.dtype)
    sf = scheme.scale_format
    xg = x.detach().to(cd).reshape(R, G, g)

    # --- non-finite policy ------------------------------------------------------------------------------------
    poisoned = None
    finite = torch.isfinite(xg)
    if not bool(finite.all()):
        n_nan, n_inf = int(torch.isnan(xg).sum()), int(torch.isinf(xg).sum())
        if not allow_nonfinite:
            raise ValueError(
                f"input has {n_nan + n_inf} non-finite value(s) ({n_nan} NaN, {n_inf} ±Inf) out of {x.numel()}; "
                f"clean it (e.g. torch.nan_to_num) or pass allow_nonfinite=True, which makes every group holding "
                f"one decode to NaN")
        if not sf.has_nan:
            raise ValueError(f"allow_nonfinite=True needs a scale format with a NaN code; {sf.name} has none")
        poisoned = ~finite.all(dim=-1)
        xg = torch.where(finite, xg, torch.zeros_like(xg))

    st = _tensor_scale(xg.abs(), scheme) if scheme.tensor_scale else None
    gs = _group_scales(xg, scheme, clip, st, poisoned)

    mode = rounding or scheme.rounding
    noise = uniform_noise(x.shape, x.device, generator).reshape(R, G, g) if mode == "stochastic" else None
    dequant, codes = _elements(xg, scheme, gs, mode, noise, need_codes)
    zp = gs.zero_points.to(torch.int64) if gs.zero_points is not None else None
    return _Result(dequant, codes, gs.scale_codes, zp, st)


def compute_scales(x: torch.Tensor, scheme, *, tensor_scale: torch.Tensor | None = None) -> GroupScales:
    """The group scales ``quantize`` would use for ``x`` (finite values; nearest rounding of the scales).

    ``tensor_scale`` fixes the second level of a two-level scheme (e.g. NVFP4's, computed once for a whole weight
    while GPTQ fits scales group by group); by default it is computed from ``x``. With ``scheme.clip_search`` each
    group gets the ratio of ``scheme.clip_grid`` that minimizes its squared reconstruction error under that tensor
    scale (ties keep the larger ratio), as ``quantize`` does.
    """
    _check_input(x, "compute_scales")
    scheme = get_scheme(scheme)
    (R, G, g), _ = scheme.layout(x.shape)
    xg = x.detach().to(_compute_dtype(x.dtype)).reshape(R, G, g)
    if not bool(torch.isfinite(xg).all()):
        raise ValueError("compute_scales: input has non-finite values")
    st = None
    if scheme.tensor_scale:
        st = tensor_scale.to(torch.float32) if tensor_scale is not None else _tensor_scale(xg.abs(), scheme)
    if not scheme.clip_search:
        return _group_scales(xg, scheme, scheme.clip_ratio, st, None)
    best = best_err = None
    for ratio in scheme.clip_grid:
        gs = _group_scales(xg, scheme, ratio, st, None)
        deq, _ = _elements(xg, scheme, gs, "nearest", None, False)
        err = ((deq - xg) ** 2).sum(dim=-1)
        if best is None:
            best, best_err = gs, err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = GroupScales(
            torch.where(better, gs.scale_codes, best.scale_codes), torch.where(better, gs.s_eff, best.s_eff),
            None if gs.zero_points is None else torch.where(better, gs.zero_points, best.zero_points), st)
    return best


def quantize_with_scales(x: torch.Tensor, scheme, scales: GroupScales, *, generator=None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Element codes (int64) and dequantized values (compute dtype) of ``x`` with given group ``scales``.

    ``x`` must have the layout the scales were computed for (``scheme.layout(x.shape)`` gives ``(R, G, g)`` with
    ``scales.s_eff`` of shape ``(R, G)``); a single column ``[out, 1]`` of a per-row layout is the GPTQ use.
    """
    scheme = get_scheme(scheme)
    (R, G, g), _ = scheme.layout(x.shape)
    xg = x.detach().to(_compute_dtype(x.dtype)).reshape(R, G, g)
    noise = None
    if scheme.rounding == "stochastic":
        noise = uniform_noise(x.shape, x.device, resolve_generator(generator, x.device)).reshape(R, G, g)
    dequant, codes = _elements(xg, scheme, scales, scheme.rounding, noise, True)
    return codes.reshape(x.shape), dequant.reshape(x.shape)


def _search_clip(x: torch.Tensor, scheme: QuantScheme, allow_nonfinite: bool) -> torch.Tensor:
    """Per-group clip ratio from ``scheme.clip_grid`` minimizing the squared reconstruction error.

    Deterministic: nearest rounding during the search, strict improvement needed, so ties keep the earlier (larger)
    ratio. Returns an ``(R, G)`` tensor.
    """
    (R, G, g), _ = scheme.layout(x.shape)
    cd = _compute_dtype(x.dtype)
    xg = x.detach().to(cd).reshape(R, G, g)
    xg = torch.where(torch.isfinite(xg), xg, torch.zeros_like(xg))
    best_err = best = None
    for ratio in scheme.clip_grid:
        res = _core(x, scheme, None, allow_nonfinite, clip=ratio, rounding="nearest", need_codes=False)
        err = ((res.dequant - xg) ** 2).sum(dim=-1).nan_to_num(nan=0.0)
        if best is None:
            best_err, best = err, torch.full_like(err, ratio)
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, torch.full_like(best, ratio), best)
    return best


def _run(x, scheme, generator, allow_nonfinite, need_codes) -> _Result:
    gen = resolve_generator(generator, x.device) if scheme.rounding == "stochastic" else None
    clip = scheme.clip_ratio
    if scheme.clip_search:
        clip = _search_clip(x, scheme, allow_nonfinite)
    return _core(x, scheme, gen, allow_nonfinite, clip=clip, need_codes=need_codes)


def quantize(x: torch.Tensor, scheme, *, generator=None, allow_nonfinite: bool = False):
    """Quantize ``x`` with ``scheme`` (a :class:`QuantScheme` or a preset name) into a :class:`QuantizedTensor`.

    Args:
        x: float32 / float16 / bfloat16 / float64 tensor, any shape, CPU or CUDA. Groups run along the last dim.
        scheme: QuantScheme or preset name (``"mxfp4"``, ``"nvfp4"``, ``"int4_g128"``, ...).
        generator: for ``rounding="stochastic"``: a ``torch.Generator`` on ``x.device`` or an int seed (fresh
            generator seeded with it: same seed, same result). ``None`` uses torch's global RNG.
        allow_nonfinite: see the module docstring (default: NaN / ±Inf raise ValueError).
    """
    from .packing import pack_codes
    from .tensor import QuantizedTensor

    _check_input(x, "quantize")
    scheme = get_scheme(scheme)
    _, sshape = scheme.layout(x.shape)
    res = _run(x, scheme, generator, allow_nonfinite, need_codes=True)
    sf = scheme.scale_format
    payload = pack_codes(res.codes, scheme.element.bits)
    scales = sf.codes_to_storage(res.scale_codes).reshape(sshape).contiguous()
    zps = res.zero_points.to(torch.uint8).reshape(sshape).contiguous() if res.zero_points is not None else None
    return QuantizedTensor(payload, scales, x.shape, scheme, zero_points=zps, tensor_scale=res.tensor_scale,
                           dtype=x.dtype)


def fake_quantize(x: torch.Tensor, scheme, *, generator=None, allow_nonfinite: bool = False) -> torch.Tensor:
    """Quantize-dequantize ``x`` with ``scheme`` and return the result in ``x.dtype`` (no packing; simulation).

    Bit-identical to ``quantize(x, scheme, generator=...).dequantize(x.dtype)`` for the same generator state. The
    result carries no gradient (wrap it in a straight-through estimator, ``x + (fq - x).detach()``, to train).
    """
    _check_input(x, "fake_quantize")
    scheme = get_scheme(scheme)
    res = _run(x, scheme, generator, allow_nonfinite, need_codes=False)
    return res.dequant.reshape(x.shape).to(x.dtype)


def dequantize(qt, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``qt.dequantize(dtype)``."""
    return qt.dequantize(dtype)
