"""Fused block-Hadamard rotation + group quantization in one Triton kernel (``formats/fused.py`` is the caller).

What one program does
---------------------
``x`` (any shape, last dim ``N``) is read as a flat sequence of *segments* of ``W = max(B, G)`` values, ``B`` the
rotation block and ``G`` the quantization group (powers of two, so one divides the other; ``W`` divides ``N``).
A program owns ``ROWS`` whole segments and keeps them in registers from the load to the stores:

1. load ``x`` (fp32 / fp16 / bf16) once, in 16-byte vectors; the ±1 signs (``signs[(flat index) % N]``) arrive as
   sign-bit masks of x's width and are one XOR (x·(-1) is exactly a sign flip);
2. block Hadamard on every ``B``-block in fp32: ``log2 B`` constant-geometry (Pease) butterfly stages, then
   ``· scale``. The stages process the index bits from the lowest to the highest, the summation order of the
   ``hadamard`` primitive's Triton kernel (``kernels/triton_hadamard.py``), so the fp32 results are the same bits;
3. round the rotated values to the input dtype, as ``hadamard_transform`` returns them (RNE; on a GPU the hardware
   conversion, under the interpreter integer arithmetic, because the interpreter truncates fp32 -> bf16 casts);
4. per group of ``G``: amax (NaN-propagating: a non-finite group amax flags NaN / Inf inputs and fp16 / bf16
   overflow), the scale (E8M0 floor / ceil rule, or the ``amax`` rule rounded into a minifloat / fp16 / fp32 scale
   format, optionally over a per-tensor fp32 second level), the element codes;
5. write the packed codes (two 4-bit codes per byte, low nibble first, or one 8-bit code per byte) and the scale
   codes once, plus one int32 flag per program (non-finite values seen; the caller then reruns the unfused path).

Layout: the loads are shaped (NCH, ROWS, Q, VEC) so that Triton gives the threads to rows and keeps a run of
``NCH · VEC`` consecutive values of a row in one thread. Segments of up to 128 values live whole in one thread
(32 / W segments per thread below 32), so the butterflies, the group reduction, the scale and the codes never leave
its registers: no shuffles, no shared memory. Longer segments (W >= 256, e.g. a full-row rotation of 4096) use runs
of 32, and the last butterfly stages and the group amax then cross threads (Triton inserts the exchanges).
Offline sm_90 builds (Triton 3.7, bf16 input, no signs) come to about 25 SASS instructions per element for MXFP4,
INT4 g32 and INT4 g128, ~37 for NVFP4 (+ ~12 for its amax pass); no spills (INT4 g128: 168 registers).

Memory traffic per element: ``itemsize(x)`` read + ``bits/8`` written + the scales (1 or 2 bytes per group); for
bf16 -> 4-bit with groups of 32: 2 + 0.5 + 1/32 B, 0.63x a bf16 copy (2 + 2 B).

Arithmetic, to the bit
----------------------
The kernel replays ``hadakit.formats`` (``_group_scales`` / ``_elements``) in fp32, op for op:

* floor(log2) of a positive fp32 is read from its exponent field (a subnormal reads as -127; every use clamps it);
  powers of two are assembled from bit patterns;
* rounding to a float grid (elements and scales): with ``q`` the quantum of the value's binade, one fp32 add of
  ``1.5 · 2^23 · q`` rounds to the nearest multiple of q, ties to even, and leaves that multiple in the low bits of
  the sum (``_round_grid``); INT elements clamp, then add ``1.5 · 2^23`` (the two's complement code is the low bits);
  no ``rint``, nothing a fast-math rewrite could change;
* a division by a power of two ``2^k`` (MX) is the equally correctly rounded multiplication by ``2^-k``; other
  divisions are correctly rounded: ``amax / elem_max``, ``/ tensor scale`` and one reciprocal per group by
  ``tl.div_rn`` (IEEE; Triton's ``/`` on fp32 is the approximate ``div.full.f32``), the per-element ``x / s`` by
  ``x · RN(1/s)`` plus two Newton–Markstein FMA corrections (correctly rounded when nothing under- or overflows;
  programs whose scales fall outside [2^-80, 2^80] or quotients reach 2^100 use ``div_rn`` element by element);
* ``amax / elem_max`` with ``elem_max`` a Python float: PyTorch's CUDA ``div`` by a CPU scalar multiplies by the
  fp32 reciprocal, its CPU ``div`` divides. ``RECIP_DIV`` selects the matching form (the caller sets it for CUDA
  tensors), so the kernel agrees with ``quantize`` on the same device.

Under ``TRITON_INTERPRET=1`` (set before this module is imported) the kernel runs on CPU tensors; that is how the
tests check it bit for bit without a GPU. There the FMAs are emulated in fp64 (the interpreter's ``tl.fma`` rounds
twice) and bf16 rounding is integer arithmetic; on a GPU they are ``fma.rn.f32`` and ``cvt.rn.bf16.f32``. This
module knows the numbers of a format (bits, mantissa bits, emin, max), never the format objects:
``formats/fused.py`` translates a ``QuantScheme`` into a :class:`Recipe`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hadakit.kernels.triton_hadamard import _interpreting

try:
    import triton
    import triton.language as tl
except ImportError:  # the caller falls back to transform-then-quantize
    triton = None
    tl = None

if triton is not None:
    # The transform kernel's own butterfly: the fused rotation sums in exactly the same order, so its rotated
    # values are bit-identical to hadamard_transform's on the same device.
    from hadakit.kernels.triton_hadamard import _fwht_rows  # noqa: F401  (called inside the jit kernel)

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_SEGMENT = 8192  # largest W = max(block, group) one program keeps in registers
_RUN = 32  # values per thread (at least)
_MAX_RUN = 128  # segments up to this length live in one thread


def triton_available() -> bool:
    """True when Triton imports and can run here: a CUDA GPU, or the interpreter (``TRITON_INTERPRET=1``)."""
    return triton is not None and (torch.cuda.is_available() or _interpreting())


@dataclass(frozen=True)
class Recipe:
    """The numbers of a quantization scheme the kernel implements (built by ``formats/fused.py``).

    Element: ``el_kind`` "int" (symmetric, codes ``el_qmin .. el_qmax``, fixed point ``el_frac`` bits) or "float"
    (sign + exponent + ``el_mbits`` mantissa bits, smallest normal exponent ``el_emin``, saturating at ``el_max``);
    ``el_bits`` 4 or 8; ``el_emax`` = floor(log2(el_max)) (the MX rule's emax), ``el_ceil_m`` = el_max / 2^el_emax.
    Scale: ``sc_rule`` "floor" / "ceil" (E8M0 power of two, exponent clamped to [sc_min_exp, sc_max_exp]) or "amax"
    (``amax / amax_div`` [/ tensor scale] rounded to nearest into a float format with ``sc_mbits`` mantissa bits,
    smallest normal exponent ``sc_emin``, saturating at ``sc_max``; ``sc_identity`` for fp32); ``sc_bytes`` the
    storage width of one scale code. ``tensor_scale``: a per-tensor fp32 second level. ``clip``: the fixed clip
    ratio or None.
    """

    el_kind: str
    el_bits: int
    el_max: float
    el_emax: int
    el_ceil_m: float
    el_qmax: int = 0
    el_qmin: int = 0
    el_frac: int = 0
    amax_div: float = 1.0
    el_mbits: int = 0
    el_emin: int = 0
    sc_rule: str = "floor"
    sc_identity: bool = False
    sc_mbits: int = 0
    sc_emin: int = 0
    sc_max: float = 0.0
    sc_min_exp: int = -127
    sc_max_exp: int = 127
    sc_bytes: int = 1
    tensor_scale: bool = False
    clip: float | None = None


if triton is not None:

    @triton.jit
    def _bits(a):
        return a.to(tl.int32, bitcast=True)

    @triton.jit
    def _pow2(k):
        """``2^k`` (fp32) for int32 ``k`` in [-126, 127], from its bit pattern."""
        return ((k + 127) << 23).to(tl.float32, bitcast=True)

    @triton.jit
    def _round_grid(a, MBITS: tl.constexpr, EMIN: tl.constexpr):
        """Round ``a >= 0`` (fp32, at most the format's max) to nearest, ties to even, on the grid of a float format
        with MBITS mantissa bits and smallest normal exponent EMIN. Returns ``(code, n, e)``: the magnitude code
        (exponent and mantissa fields), and the value as ``n · 2^(e - MBITS)``.

        One fp32 add does the rounding: with ``q = 2^(e - MBITS)`` the quantum of a's binade
        (``e = max(floor(log2 a), EMIN)``), ``S = a + 1.5·2^23·q`` lies in [2^23·q, 2^24·q), where fp32's spacing is
        exactly q, so the add rounds a to the nearest multiple of q with ties to even (the constant is an even
        multiple of q), and that multiple n = round(a / q) is the low bits of S. code = n + ((e - EMIN) << MBITS),
        binade carry included.
        """
        e = tl.maximum((_bits(a) >> 23) - 127, EMIN)
        c_bits = ((e + (150 - MBITS)) << 23) | 0x400000
        sb = _bits(a + c_bits.to(tl.float32, bitcast=True))
        n = sb - c_bits
        return n + ((e - EMIN) << MBITS), n, e

    @triton.jit
    def _round_bf16(y):
        """fp32 -> nearest bf16 (ties to even), returned as fp32 (finite inputs; Inf stays Inf). Integer arithmetic:
        Triton's interpreter truncates fp32 -> bf16 casts; a GPU uses the native conversion instead."""
        u = y.to(tl.uint32, bitcast=True)
        u = (u + (0x7FFF + ((u >> 16) & 1))) & 0xFFFF0000
        return u.to(tl.float32, bitcast=True)

    @triton.jit
    def _max_nan(a, b):
        return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)

    @triton.jit
    def _or(a, b):
        return a | b

    @triton.jit
    def _fma(a, b, c, NATIVE: tl.constexpr):
        """fp32 fused multiply-add (one rounding). The interpreter's ``tl.fma`` rounds twice, so there it is
        emulated in fp64 (exact product; the sums this kernel forms are exact or off by far less than an fp32 ulp)."""
        if NATIVE:
            return tl.fma(a, b, c)
        else:
            return (a.to(tl.float64) * b.to(tl.float64) + c.to(tl.float64)).to(tl.float32)

    @triton.jit
    def _div(y, ns, r, NATIVE: tl.constexpr):
        """``y / s`` correctly rounded, given ``ns = -s`` and ``r = RN(1/s)``: ``q = y·r`` and two Newton–Markstein
        corrections ``q += (y - q·s)·r`` (each remainder exact by FMA). ``y·r`` is within 1.5 ulp of ``y/s``, the
        first correction brings it within 1 ulp, and Markstein's theorem makes the second the correctly rounded
        quotient. Valid without underflow / overflow of the intermediates; the caller checks the ranges (else
        ``div_rn``). With ``r = 0`` the result is ±0."""
        q = y * r
        q = _fma(_fma(q, ns, y, NATIVE), r, q, NATIVE)
        return _fma(_fma(q, ns, y, NATIVE), r, q, NATIVE)

    @triton.jit
    def _tile_offsets(ROWS: tl.constexpr, W: tl.constexpr, NCH: tl.constexpr, Q: tl.constexpr, VEC: tl.constexpr):
        """Offsets (NCH, ROWS, Q, VEC) of a (ROWS, W) tile, W = Q · NCH · VEC: element (r, q·NCH·VEC + j·VEC + v);
        also the column offsets (NCH, 1, Q, VEC) and the row index (1, ROWS, 1, 1).
        Loads in this shape are VEC-wide vectors whose contiguous run NCH · VEC stays in one thread (Triton gives the
        threads to the ROWS / Q axes), so that one thread owns NCH · VEC consecutive values of a row."""
        j = tl.arange(0, NCH)[:, None, None, None]
        r = tl.arange(0, ROWS)[None, :, None, None]
        q = tl.arange(0, Q)[None, None, :, None]
        v = tl.arange(0, VEC)[None, None, None, :]
        col = q * (NCH * VEC) + j * VEC + v  # (NCH, 1, Q, VEC)
        return r * W + col, col, r

    @triton.jit
    def _to_rows(t, ROWS: tl.constexpr, W: tl.constexpr):
        """(NCH, ROWS, Q, VEC) -> (ROWS, W) (row-major inside a row)."""
        return tl.reshape(tl.permute(t, (1, 2, 0, 3)), (ROWS, W))

    @triton.jit
    def _rotate_quantize_kernel(
        x_ptr, s_ptr, pay_ptr, sc_ptr, st_ptr, amax_ptr, bad_ptr, rot_ptr,
        n_segs, segs_per_row, rot_scale, clip, amax_div_f, amax_inv_f,
        ROWS: tl.constexpr, W: tl.constexpr, B: tl.constexpr, LOG_B: tl.constexpr, LOG_IN: tl.constexpr,
        G: tl.constexpr, NCH: tl.constexpr, Q: tl.constexpr, VEC: tl.constexpr,
        SIGNS: tl.constexpr, SIGNS_SHARED: tl.constexpr,
        ROUND_TO: tl.constexpr,  # 0: keep fp32, 1: round to fp16, 2: round to bf16
        NATIVE_CVT: tl.constexpr,  # bf16 rounding by the hardware conversion (GPU) or integer arithmetic
        AMAX_ONLY: tl.constexpr, STORE_ROT: tl.constexpr,
        EL_INT: tl.constexpr, EL_BITS: tl.constexpr, EL_QMIN: tl.constexpr, EL_QMAX: tl.constexpr,
        EL_FRAC: tl.constexpr,
        EL_MBITS: tl.constexpr, EL_EMIN: tl.constexpr, EL_MAX: tl.constexpr, EL_EMAX: tl.constexpr,
        EL_CEIL_M: tl.constexpr,
        SC_RULE: tl.constexpr,  # 0: amax, 1: floor, 2: ceil
        SC_IDENTITY: tl.constexpr, SC_MBITS: tl.constexpr, SC_EMIN: tl.constexpr, SC_MAX: tl.constexpr,
        SC_MIN_EXP: tl.constexpr, SC_MAX_EXP: tl.constexpr,
        TENSOR_SCALE: tl.constexpr, CLIP: tl.constexpr, RECIP_DIV: tl.constexpr,
    ):
        TILE: tl.constexpr = ROWS * W
        NG: tl.constexpr = TILE // G
        FLT_MAX: tl.constexpr = 3.4028234663852886e38
        pid = tl.program_id(0)
        seg0 = pid * ROWS  # int32: segments < 2^31; element offsets go through an int64 base pointer
        base = seg0.to(tl.int64) * W
        offs, col4, r4 = _tile_offsets(ROWS, W, NCH, Q, VEC)
        m4 = (seg0 + r4) < n_segs
        xr = tl.load(x_ptr + base + offs, mask=m4, other=0.0, eviction_policy="evict_first")
        if SIGNS:
            # The signs come as sign-bit masks of x's width (0 or 0x8000 / 0x80000000): x·(±1) is exactly a flip
            # of x's sign bit, one XOR (on two 16-bit values at a time), and half the registers of fp32 signs.
            if SIGNS_SHARED:
                m = tl.load(s_ptr + col4, eviction_policy="evict_last")
            else:
                rr = seg0 + tl.arange(0, ROWS)
                col0 = tl.multiple_of((rr % segs_per_row) * W, W)[None, :, None, None]  # segment's first column
                m = tl.load(s_ptr + (col0 + col4), mask=m4, other=0, eviction_policy="evict_last")
            xr = (xr.to(m.dtype, bitcast=True) ^ m).to(xr.dtype, bitcast=True)
        x = _to_rows(xr, ROWS, W).to(tl.float32)

        # --- rotation (fp32), then the input dtype's rounding, as hadamard_transform returns it ----------------
        y = tl.reshape(_fwht_rows(tl.reshape(x, (TILE // B, B)), TILE // B, B, LOG_B, LOG_IN), (ROWS, W)) * rot_scale
        if ROUND_TO == 1:
            y = y.to(tl.float16).to(tl.float32)
        elif ROUND_TO == 2:
            if NATIVE_CVT:
                y = y.to(tl.bfloat16).to(tl.float32)
            else:
                y = _round_bf16(y)
        if STORE_ROT:
            tl.store(rot_ptr + base + offs, tl.permute(tl.reshape(y, (ROWS, Q, NCH, VEC)), (2, 0, 1, 3)), mask=m4)

        yg = tl.reshape(y, (NG, G))
        # Group amax with NaN propagation: a NaN / Inf input spreads to its whole rotation block, and an fp16 / bf16
        # overflow is an Inf, so a non-finite group amax flags every non-finite rotated value.
        amax = tl.reduce(tl.abs(yg), 1, _max_nan)  # (NG,)
        bad = (~(amax <= FLT_MAX)).to(tl.int32)
        if AMAX_ONLY:
            tl.store(bad_ptr + pid, tl.reduce(bad, 0, _or))
            tl.store(amax_ptr + pid, tl.reduce(amax, 0, _max_nan))
        else:
            stat = amax
            if CLIP:
                stat = stat * clip
            if SC_RULE != 0:
                # E8M0 power of two: k = floor(log2 amax) - emax (+1 if the ceil rule needs it), clamped.
                fld = _bits(stat) >> 23
                k = fld - 127 - EL_EMAX
                if SC_RULE == 2:
                    m = ((_bits(stat) & 0x7FFFFF) | 0x3F800000).to(tl.float32, bitcast=True)
                    k = k + (m > EL_CEIL_M).to(tl.int32)
                k = tl.where(fld == 0, SC_MIN_EXP, k)  # zero (and subnormal) amax: the smallest exponent
                k = tl.minimum(tl.maximum(k, SC_MIN_EXP), SC_MAX_EXP)
                scode = k + 127
                # x / 2^k == x * 2^-k (both correctly rounded); 2^-127 is built as 2^-126 / 2.
                inv = _pow2(tl.maximum(-k, -126)) * tl.where(-k < -126, 0.5, 1.0)
                t = yg * inv[:, None]
                live = -1
                tl.store(bad_ptr + pid, tl.reduce(bad, 0, _or))
            else:
                if RECIP_DIV:
                    raw = stat * amax_inv_f
                else:
                    raw = tl.div_rn(stat, amax_div_f)
                if TENSOR_SCALE:
                    st = tl.load(st_ptr)
                    raw = tl.div_rn(raw, st)
                if SC_IDENTITY:
                    sv = raw
                    scode = _bits(raw)
                else:
                    scode, sn, se = _round_grid(tl.minimum(raw, SC_MAX), SC_MBITS, SC_EMIN)
                    sv = sn.to(tl.float32) * _pow2(se - SC_MBITS)
                if TENSOR_SCALE:
                    s_eff = sv * st
                else:
                    s_eff = sv
                dead = ~(s_eff > 0)  # zero / underflowed scale: the group's elements are 0
                s_d = tl.where(dead, 1.0, s_eff)
                r = tl.where(dead, 0.0, tl.div_rn(1.0, s_d))  # one exact reciprocal per group (0: dead group)
                # The Markstein division needs no under- / overflow: scales in [2^-80, 2^80], quotients < 2^100.
                # Other programs (absurdly scaled data) divide with div_rn, element by element.
                unsafe = (~dead) & ((s_eff < 8.271806125530277e-25) | (s_eff > 1.2089258196146292e24)
                                    | (amax * r > 1.2676506002282294e30))
                flags = tl.reduce(bad | (unsafe.to(tl.int32) << 1), 0, _or)
                tl.store(bad_ptr + pid, flags & 1)
                if (flags & 2) == 0:
                    t = _div(yg, (0.0 - s_d)[:, None], r[:, None], NATIVE_CVT)  # dead groups: ±0
                else:
                    t = tl.where(dead[:, None], 0.0, tl.div_rn(yg, s_d[:, None]))
                live = tl.where(dead, 0, -1)[:, None]  # code mask: a dead group's codes are 0 (no -0)

            # --- element codes ---------------------------------------------------------------------------------
            if EL_INT:
                if EL_FRAC > 0:
                    t = t * (1 << EL_FRAC)
                # clamp-then-round == round-then-clamp (integer bounds); the magic add rounds half to even and
                # leaves the two's complement integer in the low bits
                tc = tl.minimum(tl.maximum(t, EL_QMIN), EL_QMAX)
                code = _bits(tc + 12582912.0) & ((1 << EL_BITS) - 1)
            else:
                mag, _n, _e = _round_grid(tl.minimum(tl.abs(t), EL_MAX), EL_MBITS, EL_EMIN)  # saturating
                # the sign of t (also of -0.0 and of values rounding to 0, as in the formats layer)
                code = (mag | ((_bits(t) >> (32 - EL_BITS)) & (1 << (EL_BITS - 1)))) & live

            # --- stores: whole rows of packed codes, one scale per group ---------------------------------------
            if EL_BITS == 4:
                lo, hi = tl.split(tl.reshape(code, (TILE // 2, 2)))
                byte = tl.reshape((lo & 15) | ((hi & 15) << 4), (ROWS, Q, NCH * VEC // 2))
                rb = tl.arange(0, ROWS)[:, None, None]
                ob = rb * (W // 2) + (tl.arange(0, Q)[None, :, None] * (NCH * VEC // 2)
                                      + tl.arange(0, NCH * VEC // 2)[None, None, :])
                tl.store(pay_ptr + base // 2 + ob, byte.to(tl.uint8), mask=(seg0 + rb) < n_segs)
            else:
                byte = tl.reshape(code, (ROWS, Q, NCH * VEC))
                rb = tl.arange(0, ROWS)[:, None, None]
                ob = rb * W + (tl.arange(0, Q)[None, :, None] * (NCH * VEC) + tl.arange(0, NCH * VEC)[None, None, :])
                tl.store(pay_ptr + base + ob, byte.to(tl.uint8), mask=(seg0 + rb) < n_segs)
            jg = tl.arange(0, NG)
            tl.store(sc_ptr + seg0.to(tl.int64) * (W // G) + jg, scode.to(sc_ptr.dtype.element_ty),
                     mask=(seg0 + jg // (W // G)) < n_segs)


def _inner_log(k: int) -> int:
    """Butterfly split H_{2^(k-i)} ⊗ H_{2^i} for 2^7..2^13 (data movement only; the sums are unchanged)."""
    return max(2, k - 6) if 7 <= k <= 13 else 0


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def covers(block: int, group: int, n_cols: int, dtype: torch.dtype) -> bool:
    """Whether the kernel handles rotation block ``block`` with groups of ``group`` on rows of ``n_cols``."""
    w = max(block, group)
    return (dtype in SUPPORTED_DTYPES and _is_pow2(block) and _is_pow2(group) and 2 <= w <= MAX_SEGMENT
            and n_cols % w == 0)


def _tile(w: int, itemsize: int, n_segs: int, tile: int | None, num_warps: int | None):
    """(ROWS, NCH, Q, VEC, num_warps) for segments of ``w`` values.

    One thread owns a whole segment when w <= 128 (then rotation, amax, scale and codes never leave its registers;
    segments of fewer than 32 values are packed 32 / w to a thread), else runs of 32 consecutive values (the last
    butterfly stages and the group amax then cross threads). VEC-wide vector loads (VEC · itemsize = 16 bytes),
    4 warps, so a program holds 128 · max(32, run) values unless ``tile`` / ``num_warps`` say otherwise.
    """
    run = w if w <= _MAX_RUN else _RUN
    warps = num_warps or 4
    vals = max(w, tile or warps * 32 * max(run, _RUN))
    rows = vals // w
    if n_segs < rows:  # small problems: no wider than needed
        rows = max(1, 1 << (max(n_segs, 1) - 1).bit_length())
        warps = max(1, min(warps, rows * w // max(run, _RUN) // 32))
    vec = min(run, 16 // itemsize)
    return rows, run // vec, w // run, vec, warps


def _launch(x, recipe, block, group, signs, rot_scale, st, *, amax_only, store_rot, recip_div, tile, num_warps):
    n = x.shape[-1]
    w = max(block, group)
    n_segs = x.numel() // w
    rows, nch, q, vec, warps = _tile(w, x.element_size(), n_segs, tile, num_warps)
    grid = (triton.cdiv(n_segs, rows),)
    dev = x.device
    bad = torch.empty(grid[0], dtype=torch.int32, device=dev)
    amax = torch.empty(grid[0] if amax_only else 1, dtype=torch.float32, device=dev)
    rot = torch.empty(x.shape if store_rot else (1,), dtype=torch.float32, device=dev)
    if amax_only:
        pay = torch.empty(1, dtype=torch.uint8, device=dev)
        sc = torch.empty(1, dtype=torch.uint8, device=dev)
    else:
        pay = torch.empty(x.numel() * recipe.el_bits // 8, dtype=torch.uint8, device=dev)
        sdt = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[recipe.sc_bytes]
        sc = torch.empty(x.numel() // group, dtype=sdt, device=dev)
    if signs is not None:  # sign-bit masks of x's width (see the kernel)
        ib = x.element_size() * 8
        it = {16: torch.int16, 32: torch.int32}[ib]
        s_arg = torch.where(signs < 0, -(1 << (ib - 1)), 0).to(it)
    else:
        s_arg = x
    st_arg = st if st is not None else amax
    round_to = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[x.dtype]
    el_int = recipe.el_kind == "int"
    _rotate_quantize_kernel[grid](
        x, s_arg, pay, sc, st_arg, amax, bad, rot,
        # amax / amax_div: the divisor, and the fp32 reciprocal PyTorch's CUDA div by a Python float multiplies by
        n_segs, n // w, float(rot_scale), float(recipe.clip or 1.0), float(recipe.amax_div),
        float(1.0 / recipe.amax_div),
        ROWS=rows, W=w, B=block, LOG_B=block.bit_length() - 1, LOG_IN=_inner_log(block.bit_length() - 1), G=group,
        NCH=nch, Q=q, VEC=vec,
        SIGNS=signs is not None, SIGNS_SHARED=signs is not None and n == w,
        ROUND_TO=round_to, NATIVE_CVT=not _interpreting(), AMAX_ONLY=amax_only, STORE_ROT=store_rot,
        EL_INT=el_int, EL_BITS=recipe.el_bits, EL_QMIN=recipe.el_qmin, EL_QMAX=recipe.el_qmax, EL_FRAC=recipe.el_frac,
        EL_MBITS=recipe.el_mbits, EL_EMIN=recipe.el_emin, EL_MAX=float(recipe.el_max), EL_EMAX=recipe.el_emax,
        EL_CEIL_M=float(recipe.el_ceil_m),
        SC_RULE={"amax": 0, "floor": 1, "ceil": 2}[recipe.sc_rule],
        SC_IDENTITY=recipe.sc_identity, SC_MBITS=recipe.sc_mbits, SC_EMIN=recipe.sc_emin,
        SC_MAX=float(recipe.sc_max), SC_MIN_EXP=recipe.sc_min_exp, SC_MAX_EXP=recipe.sc_max_exp,
        TENSOR_SCALE=recipe.tensor_scale, CLIP=recipe.clip is not None, RECIP_DIV=recip_div,
        num_warps=warps,
    )
    return pay, sc, amax, bad, (rot if store_rot else None)


def _prep(x, block, group, signs):
    if triton is None:
        raise RuntimeError("the fused rotate-quantize kernel needs Triton (pip install hadakit[triton]).")
    if x.device.type != "cuda" and not _interpreting():
        raise RuntimeError("the fused rotate-quantize kernel needs CUDA tensors (or TRITON_INTERPRET=1 for CPU).")
    n = x.shape[-1]
    if not covers(block, group, n, x.dtype):
        raise ValueError(f"rotate-quantize kernel: block {block} / group {group} on rows of {n} ({x.dtype}) is not "
                         f"covered (powers of two, max(block, group) <= {MAX_SEGMENT} dividing the row)")
    x = x.contiguous()
    if signs is not None:
        signs = signs.to(device=x.device, dtype=torch.float32).contiguous()
    return x, signs


def rotated_amax(x: torch.Tensor, block: int, group: int, signs: torch.Tensor | None, rot_scale: float, *,
                 tile: int | None = None, num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """First pass of the two-level schemes: per-program amax of the rotated values (fp32, rounded to x's dtype)
    and per-program counts of non-finite rotated values. Reads ``x`` once, writes nothing else."""
    x, signs = _prep(x, block, group, signs)
    dummy = Recipe("int", 8, 1.0, 0, 1.0)  # (not used: AMAX_ONLY stops after the amax)
    _, _, amax, bad, _ = _launch(x, dummy, block, group, signs, rot_scale, None, amax_only=True, store_rot=False,
                                 recip_div=False, tile=tile, num_warps=num_warps)
    return amax, bad


def rotate_quantize(x: torch.Tensor, recipe: Recipe, block: int, group: int, signs: torch.Tensor | None,
                    rot_scale: float, tensor_scale: torch.Tensor | None = None, *, recip_div: bool | None = None,
                    store_rotated: bool = False, tile: int | None = None, num_warps: int | None = None):
    """Rotate blocks of ``block`` along the last dim of ``x`` (``rot_scale · H · diag(signs)``), round to x's dtype,
    quantize groups of ``group`` with ``recipe``.

    Returns ``(payload, scale_codes, bad, rotated)``: the packed codes (uint8, row-major, LSB-first), the scale codes
    (uint8 / int16 / int32 holding the storage bits, one per group, row-major), per-program counts of non-finite
    rotated values (the result is meaningless where any is non-zero), and the rotated fp32 values when
    ``store_rotated`` (a testing aid; an extra write) else None. ``tensor_scale``: 0-d fp32 tensor on x's device
    (two-level recipes). ``recip_div``: divide ``amax`` by ``el_max`` as PyTorch's CUDA kernels do (multiply by the
    fp32 reciprocal); default: ``x.is_cuda``.
    """
    x, signs = _prep(x, block, group, signs)
    if recipe.tensor_scale and tensor_scale is None:
        raise ValueError("a two-level recipe needs tensor_scale (see rotated_amax)")
    if recip_div is None:
        recip_div = x.is_cuda
    st = tensor_scale.to(device=x.device, dtype=torch.float32).reshape(()) if recipe.tensor_scale else None
    pay, sc, _, bad, rot = _launch(x, recipe, block, group, signs, rot_scale, st, amax_only=False,
                                   store_rot=store_rotated, recip_div=recip_div, tile=tile, num_warps=num_warps)
    return pay, sc, bad, rot
