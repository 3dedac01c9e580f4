"""Element and scale formats as frozen dataclasses, with exact casts.

Four families of *element* formats (what one quantized number is) and the float family doubles as *scale* formats
(what a block / row / tensor scale is stored in):

* :class:`IntFormat` — ``intB``: signed two's-complement codes, symmetric range ``±(2^(B-1) - 1)`` (the most
  negative code is never produced, so the grid is symmetric about 0); with an asymmetric scheme the same ``B`` bits
  hold unsigned codes ``0 .. 2^B - 1`` and a zero point. ``frac_bits`` gives a fixed-point grid (MXINT8's element is
  ``int8_frac6``: ``code · 2^-6``, max 127/64).
* :class:`TernaryFormat` — ``{-1, 0, +1}`` (BitNet b1.58), stored as 2-bit two's complement.
* :class:`BinaryFormat` — ``{-1, +1}``, stored as 1 bit (1 = +1).
* :class:`FloatFormat` — any ``(ebits, mbits, bias)`` minifloat with subnormals and one of three conventions for the
  top exponent (``nan_style``): ``"ieee"`` (all-ones exponent = Inf / NaN; E5M2, fp16, bf16, fp32), ``"fn"`` (only
  all-ones exponent *and* mantissa is NaN, no Inf; E4M3, UE4M3, UE5M3) and ``"none"`` (every code is finite; the
  OCP MX FP6/FP4 element formats).
* :class:`E8M0Format` — the MX shared scale: ``2^(code - 127)`` for codes 0..254, 0xFF = NaN, no zero, no sign.

Every format converts float32/float64 tensors exactly: :meth:`FloatFormat.cast` rounds to the nearest representable
value (ties to even) and returns both the value and its integer code; :meth:`decode` maps codes back to values through
a 2^bits-entry table (or a bit view for the 16/32-bit formats).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar, Union

import torch

from .rounding import floor_log2, pow2, round_integer

__all__ = [
    "BinaryFormat",
    "E8M0Format",
    "ElementFormat",
    "FloatFormat",
    "IntFormat",
    "ScaleFormat",
    "TernaryFormat",
    "format_from_dict",
    "format_to_ref",
    "get_format",
    "list_formats",
]

_NAN_STYLES = ("ieee", "fn", "none")

# Decode tables are built once per (format, device, dtype).
_TABLE_CACHE: dict = {}


def _table(fmt, device, dtype) -> torch.Tensor:
    key = (fmt, str(device), dtype)
    t = _TABLE_CACHE.get(key)
    if t is None:
        t = torch.tensor(fmt.decode_table(), dtype=torch.float64).to(device=device, dtype=dtype)
        _TABLE_CACHE[key] = t
    return t


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _wrap_signed(codes: torch.Tensor, nbits: int, int_dtype: torch.dtype) -> torch.Tensor:
    """Unsigned ``nbits`` codes (int64) -> the same bits as a signed integer tensor (two's complement)."""
    return torch.where(codes >= (1 << (nbits - 1)), codes - (1 << nbits), codes).to(int_dtype)


# ------------------------------------------------------------------------------------------------------------------
# Integer-like element formats
# ------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IntFormat:
    """``bits``-bit integer element, value ``code · 2^-frac_bits``.

    Symmetric schemes use the signed range ``[-qmax, qmax]`` with ``qmax = 2^(bits-1) - 1``; asymmetric schemes use
    the unsigned range ``[0, 2^bits - 1]`` together with a per-group zero point.
    """

    name: str
    bits: int
    frac_bits: int = 0

    kind: ClassVar[str] = "int"

    def __post_init__(self):
        if not (2 <= self.bits <= 8):
            raise ValueError(f"IntFormat supports 2..8 bits, got {self.bits}")
        if self.frac_bits < 0:
            raise ValueError(f"frac_bits must be >= 0, got {self.frac_bits}")

    @property
    def qmax(self) -> int:
        """Largest symmetric code: ``2^(bits-1) - 1``."""
        return (1 << (self.bits - 1)) - 1

    @property
    def umax(self) -> int:
        """Largest unsigned (asymmetric) code: ``2^bits - 1``."""
        return (1 << self.bits) - 1

    @property
    def max(self) -> float:
        """Largest magnitude of the symmetric grid, in element units."""
        return self.qmax * 2.0 ** -self.frac_bits

    @property
    def emax(self) -> int:
        """``floor(log2(max))`` — the element's emax in the OCP MX shared-exponent rule (INT8 1.6 -> 0)."""
        return math.frexp(self.max)[1] - 1

    def decode(self, codes: torch.Tensor, dtype: torch.dtype = torch.float32, signed: bool = True) -> torch.Tensor:
        """Stored ``bits``-bit codes -> values (two's complement when ``signed``, else unsigned)."""
        c = codes.to(torch.int64)
        if signed:
            c = c - ((c >> (self.bits - 1)) & 1) * (1 << self.bits)
        v = c.to(dtype)
        if self.frac_bits:
            v = v * 2.0 ** -self.frac_bits
        return v

    def encode(self, q: torch.Tensor, signed: bool = True) -> torch.Tensor:
        """Integer levels (any dtype holding integers) -> stored ``bits``-bit codes (int64)."""
        q = q.to(torch.int64)
        return q & self.umax if signed else q

    def to_dict(self) -> dict:
        return {"kind": self.kind, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class TernaryFormat:
    """``{-1, 0, +1}``, stored as 2-bit two's complement (``-1 -> 0b11``, ``0 -> 0b00``, ``+1 -> 0b01``)."""

    name: str = "ternary"

    kind: ClassVar[str] = "ternary"
    bits: ClassVar[int] = 2
    max: ClassVar[float] = 1.0
    emax: ClassVar[int] = 0

    def decode(self, codes: torch.Tensor, dtype: torch.dtype = torch.float32, signed: bool = True) -> torch.Tensor:
        c = codes.to(torch.int64)
        return (c - ((c >> 1) & 1) * 4).to(dtype)

    def encode(self, q: torch.Tensor, signed: bool = True) -> torch.Tensor:
        return q.to(torch.int64) & 3

    def to_dict(self) -> dict:
        return {"kind": self.kind, "name": self.name}


@dataclass(frozen=True)
class BinaryFormat:
    """``{-1, +1}``, stored as 1 bit (``1 -> +1``, ``0 -> -1``)."""

    name: str = "binary"

    kind: ClassVar[str] = "binary"
    bits: ClassVar[int] = 1
    max: ClassVar[float] = 1.0
    emax: ClassVar[int] = 0

    def decode(self, codes: torch.Tensor, dtype: torch.dtype = torch.float32, signed: bool = True) -> torch.Tensor:
        return (codes.to(torch.int64) * 2 - 1).to(dtype)

    def encode(self, q: torch.Tensor, signed: bool = True) -> torch.Tensor:
        return (q > 0).to(torch.int64)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "name": self.name}


# ------------------------------------------------------------------------------------------------------------------
# Floating-point formats
# ------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FloatFormat:
    """A binary floating-point format ``[sign] · exponent(ebits) · mantissa(mbits)`` with subnormals.

    ``value = (-1)^s · 2^(E - bias) · (1 + M / 2^mbits)`` for ``E > 0``, ``(-1)^s · 2^(1 - bias) · M / 2^mbits``
    for ``E == 0``. ``nan_style`` decides what the all-ones exponent means:

    * ``"ieee"`` — Inf (mantissa 0) and NaN (mantissa != 0), like IEEE 754 (E5M2, fp16, bf16, fp32);
    * ``"fn"``   — finite, except all-ones exponent + all-ones mantissa = NaN; no Inf (E4M3 "fn", UE4M3, UE5M3);
    * ``"none"`` — all codes finite, no Inf, no NaN (OCP MX FP6 E2M3 / E3M2 and FP4 E2M1).

    ``signed=False`` drops the sign bit (UE4M3 / UE5M3 scale formats; negative inputs become NaN).
    """

    name: str
    ebits: int
    mbits: int
    bias: int
    nan_style: str = "ieee"
    signed: bool = True

    kind: ClassVar[str] = "float"

    def __post_init__(self):
        if self.nan_style not in _NAN_STYLES:
            raise ValueError(f"nan_style must be one of {_NAN_STYLES}, got {self.nan_style!r}")
        if self.ebits < 1 or self.mbits < 0:
            raise ValueError(f"need ebits >= 1 and mbits >= 0, got ebits={self.ebits}, mbits={self.mbits}")
        if self.nan_style == "fn" and self.mbits < 1:
            raise ValueError("nan_style='fn' needs at least one mantissa bit")
        # Casts run in float32: the smallest subnormal and the max must be float32-representable.
        if 1 - self.bias - self.mbits < -149 or self.max_exp > 127:
            raise ValueError(f"format {self.name} exceeds the float32 range; casts run in float32")

    # --- derived constants ---------------------------------------------------------------------------------------
    @property
    def bits(self) -> int:
        return int(self.signed) + self.ebits + self.mbits

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal number: ``1 - bias``."""
        return 1 - self.bias

    @property
    def _top_field(self) -> int:
        """Largest exponent field holding finite values."""
        return (1 << self.ebits) - (2 if self.nan_style == "ieee" else 1)

    @property
    def emax(self) -> int:
        """Exponent of the largest finite value (``floor(log2(max))``; E4M3: 8, E5M2: 15, E2M1: 2, ...)."""
        return self._top_field - self.bias

    @property
    def max(self) -> float:
        """Largest finite value (E4M3: 448, E5M2: 57344, E2M3: 7.5, E3M2: 28, E2M1: 6, UE5M3: 114688)."""
        top_mant = (1 << self.mbits) - (2 if self.nan_style == "fn" else 1)
        return (1.0 + top_mant / (1 << self.mbits)) * 2.0 ** self.emax

    @property
    def min_normal(self) -> float:
        return 2.0 ** self.emin

    @property
    def min_subnormal(self) -> float:
        return 2.0 ** (self.emin - self.mbits)

    @property
    def min_exp(self) -> int:
        """Smallest power of two representable (``emin - mbits``, the smallest subnormal)."""
        return self.emin - self.mbits

    @property
    def max_exp(self) -> int:
        """Largest power of two representable (``emax``)."""
        return self.emax

    @property
    def has_inf(self) -> bool:
        return self.nan_style == "ieee"

    @property
    def has_nan(self) -> bool:
        return self.nan_style != "none"

    @property
    def nan_code(self) -> int | None:
        """Positive NaN code: quiet NaN (top mantissa bit) for "ieee", all ones for "fn", None for "none"."""
        exp_all = ((1 << self.ebits) - 1) << self.mbits
        if self.nan_style == "ieee":
            return exp_all | (1 << (self.mbits - 1))
        if self.nan_style == "fn":
            return exp_all | ((1 << self.mbits) - 1)
        return None

    @property
    def inf_code(self) -> int | None:
        return ((1 << self.ebits) - 1) << self.mbits if self.has_inf else None

    @cached_property
    def storage_dtype(self) -> torch.dtype:
        """torch dtype holding one code when the format is stored unpacked (scales): native where torch has one."""
        key = (self.ebits, self.mbits, self.bias, self.nan_style)
        native = {
            (4, 3, 7, "fn"): "float8_e4m3fn",  # UE4M3 codes (< 0x80) are the same bytes as positive E4M3
            (5, 2, 15, "ieee"): "float8_e5m2",
            (5, 10, 15, "ieee"): "float16",
            (8, 7, 127, "ieee"): "bfloat16",
            (8, 23, 127, "ieee"): "float32",
        }.get(key)
        if native is not None and hasattr(torch, native):
            dt = getattr(torch, native)
            if dt.itemsize * 8 == self.bits or (not self.signed and self.bits < 8 and dt.itemsize == 1):
                return dt
        if self.bits <= 8:
            return torch.uint8
        raise ValueError(f"no storage dtype for {self.bits}-bit format {self.name}")

    # --- decode --------------------------------------------------------------------------------------------------
    def decode_table(self) -> list[float]:
        """Value of every code ``0 .. 2^bits - 1`` (Python floats; ``-0.0`` and NaN / Inf included)."""
        if self.bits > 16:
            raise ValueError(f"no decode table for the {self.bits}-bit format {self.name}")
        m, e = self.mbits, self.ebits
        out = []
        for c in range(1 << self.bits):
            s = (c >> (e + m)) & 1 if self.signed else 0
            ef = (c >> m) & ((1 << e) - 1)
            mf = c & ((1 << m) - 1)
            if ef == (1 << e) - 1 and self.nan_style == "ieee":
                v = math.inf if mf == 0 else math.nan
            elif ef == (1 << e) - 1 and self.nan_style == "fn" and mf == (1 << m) - 1:
                v = math.nan
            elif ef == 0:
                v = mf * 2.0 ** (self.emin - m)
            else:
                v = (1.0 + mf / (1 << m)) * 2.0 ** (ef - self.bias)
            out.append(-v if s else v)
        return out

    def decode(self, codes: torch.Tensor, dtype: torch.dtype = torch.float32, signed: bool = True) -> torch.Tensor:
        """Integer codes -> values (exact). ``signed`` is accepted for interface symmetry and ignored."""
        codes = codes.to(torch.int64)
        if self.bits <= 8:
            return _table(self, codes.device, dtype)[codes]
        sd = self.storage_dtype
        ibits = {2: torch.int16, 4: torch.int32}[sd.itemsize]
        return _wrap_signed(codes, self.bits, ibits).view(sd).to(dtype)

    # --- round / encode ------------------------------------------------------------------------------------------
    def round(self, x: torch.Tensor, rounding: str = "nearest", noise: torch.Tensor | None = None,
              saturate: bool = True) -> torch.Tensor:
        """Round float32/float64 ``x`` onto this format's grid; returns values in ``x``'s dtype.

        ``saturate=True`` (the library's policy): finite values beyond ``max`` -> ``±max``; ``±Inf`` -> ``±Inf`` if the
        format has Inf, else ``±max``. ``saturate=False`` (IEEE-style overflow, what ml_dtypes does): values that round
        beyond ``max`` become ``±Inf`` if the format has Inf, else NaN if it has NaN, else ``±max``. NaN stays NaN
        (:meth:`encode` rejects it for formats without NaN). Unsigned formats map negative values (not -0) to NaN.
        """
        a = x.abs()
        isinf = torch.isinf(a)
        if saturate:
            # max is on the grid and rounding is monotone, so clamp-then-round == round-then-saturate
            a = torch.clamp(a, max=self.max)
        else:
            a = torch.where(isinf, torch.zeros_like(a), a)
        # Quantum (ULP) of the binade holding |x|; below the normal range the subnormal quantum 2^(emin - mbits).
        e = floor_log2(a).clamp(min=self.emin)
        q = pow2(e - self.mbits, a.dtype)
        y = round_integer(a / q, rounding, noise) * q  # a / q and r * q are exact (powers of two, no overflow)
        inf_val = math.inf if self.has_inf else (self.max if saturate else (math.nan if self.has_nan else self.max))
        if not saturate:
            over = math.inf if self.has_inf else (math.nan if self.has_nan else self.max)
            y = torch.where(y > self.max, torch.full_like(y, over), y)
        y = torch.where(isinf, torch.full_like(y, inf_val), y)
        if self.signed:
            return torch.copysign(y, x)
        neg = x < 0
        return torch.where(neg, torch.full_like(y, math.nan), y)

    def fast_round_ok(self, dtype: torch.dtype) -> bool:
        """Whether :meth:`round_finite` applies: float32 data, a signed format whose quantum is a normal float32."""
        return dtype == torch.float32 and self.signed and self.emin - self.mbits > -126 and self.max < 2.0 ** 127

    def round_finite(self, t: torch.Tensor, rounding: str = "nearest", noise: torch.Tensor | None = None
                     ) -> torch.Tensor:
        """:meth:`round` with ``saturate=True`` for *finite* float32 ``t`` (see :meth:`fast_round_ok`), in ~10 passes
        instead of ~30: the quantum of each binade is read from the float32 exponent bits. Same values (tested)."""
        a = t.abs().clamp_(max=self.max)
        # Biased float32 exponent of a = floor(log2 a) + 127 for normal a (0 for zero / subnormal a, which the clamp
        # to the format's smallest normal exponent covers); minus mbits: the exponent of the quantum of a's binade.
        k = a.view(torch.int32).bitwise_right_shift(23).clamp_(min=self.emin + 127).sub_(self.mbits)
        q = k.bitwise_left_shift_(23).view(torch.float32)  # that quantum, 2^(e - mbits), from its bit pattern
        a.div_(q)  # exact: division by a power of two
        if rounding == "nearest":
            a.round_()  # ties to even
        else:
            fl = a.floor()
            a = fl.add_(noise < a.sub_(fl))  # floor + [u < frac], unbiased (round_integer's rule)
        return a.mul_(q).copysign_(t)

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        """Values already on the grid (output of :meth:`round`) -> int64 codes (bit patterns)."""
        a = values.abs()
        nan = torch.isnan(a)
        inf = torch.isinf(a)
        if not self.has_nan and bool(nan.any()):
            raise ValueError(f"format {self.name} has no NaN encoding; got {int(nan.sum())} NaN value(s)")
        if not self.has_inf and bool(inf.any()):
            raise ValueError(f"format {self.name} has no Inf encoding; got {int(inf.sum())} infinite value(s)")
        a0 = torch.where(nan | inf, torch.zeros_like(a), a)
        e = floor_log2(a0)
        normal = a0 >= self.min_normal
        ec = torch.where(normal, e, torch.full_like(e, self.emin))
        mant = (a0 / pow2(ec - self.mbits, a0.dtype)).to(torch.int64)  # exact integer
        exp_field = torch.where(normal, e + self.bias, torch.zeros_like(e))
        mant_field = torch.where(normal, mant - (1 << self.mbits), mant)
        code = (exp_field << self.mbits) | mant_field
        if self.has_inf:
            code = torch.where(inf, torch.full_like(code, self.inf_code), code)
        if self.has_nan:
            code = torch.where(nan, torch.full_like(code, self.nan_code), code)
        if self.signed:
            code = code | (torch.signbit(values).to(torch.int64) << (self.bits - 1))
        return code

    def cast(self, x: torch.Tensor, rounding: str = "nearest", noise: torch.Tensor | None = None,
             saturate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact cast of ``x`` (float16/bfloat16/float32/float64) -> ``(values, codes)``.

        ``values`` are float32 (float64 for float64 input) and exactly representable in this format; ``codes`` are
        int64 bit patterns. Round-to-nearest-even by default; see :meth:`round` for the overflow policy.
        """
        x = x.to(_compute_dtype(x.dtype))
        v = self.round(x, rounding, noise, saturate)
        return v, self.encode(v)

    # --- storage -------------------------------------------------------------------------------------------------
    def codes_to_storage(self, codes: torch.Tensor) -> torch.Tensor:
        """int64 codes -> a tensor of :attr:`storage_dtype` holding exactly those bits."""
        sd = self.storage_dtype
        if sd.itemsize == 1:
            return codes.to(torch.uint8).view(sd)
        ibits = {2: torch.int16, 4: torch.int32}[sd.itemsize]
        return _wrap_signed(codes, self.bits, ibits).view(sd)

    def storage_to_codes(self, stored: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`codes_to_storage`: stored tensor -> int64 codes."""
        n = stored.element_size()
        ibits = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[n]
        return stored.view(ibits).to(torch.int64) & ((1 << (8 * n)) - 1)

    def to_dict(self) -> dict:
        return {"kind": self.kind, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class E8M0Format:
    """OCP MX shared scale: unsigned, 8 exponent bits, no mantissa; ``2^(code - 127)``, code 0xFF = NaN.

    No zero, no sign, no Inf. Rounding an arbitrary positive value goes to the nearest power of two with ties
    (``1.5 · 2^k``) rounded *up*, matching ``torch`` and ``ml_dtypes`` (with no mantissa bit, "ties to even" has no
    meaning). Saturating: values below ``2^-127`` (including 0) -> ``2^-127``, above ``2^127`` (and +Inf) ->
    ``2^127``; NaN and negative values -> NaN.
    """

    name: str = "e8m0"

    kind: ClassVar[str] = "e8m0"
    bits: ClassVar[int] = 8
    bias: ClassVar[int] = 127
    signed: ClassVar[bool] = False
    has_nan: ClassVar[bool] = True
    has_inf: ClassVar[bool] = False
    nan_code: ClassVar[int] = 0xFF
    min_exp: ClassVar[int] = -127
    max_exp: ClassVar[int] = 127
    emax: ClassVar[int] = 127
    max: ClassVar[float] = 2.0 ** 127

    @property
    def storage_dtype(self) -> torch.dtype:
        return getattr(torch, "float8_e8m0fnu", torch.uint8)

    def decode_table(self) -> list[float]:
        return [2.0 ** (c - 127) for c in range(255)] + [math.nan]

    def decode(self, codes: torch.Tensor, dtype: torch.dtype = torch.float32, signed: bool = True) -> torch.Tensor:
        return _table(self, codes.device, dtype)[codes.to(torch.int64)]

    def round(self, x: torch.Tensor, rounding: str = "nearest", noise: torch.Tensor | None = None,
              saturate: bool = True) -> torch.Tensor:
        if rounding != "nearest":
            raise ValueError("E8M0 supports only rounding='nearest' (scales are always rounded to nearest)")
        pos = (x > 0) & torch.isfinite(x)
        a = torch.where(pos, x, torch.ones_like(x))
        e = floor_log2(a)
        # a / 2^e in [1, 2) exactly; round up from 1.5 on (ties up, see class docstring).
        e = e + (a >= 1.5 * pow2(e, a.dtype)).to(e.dtype)
        e = torch.where(x == 0, torch.full_like(e, -127), e)
        over = (e > 127) | (x == math.inf)
        e = e.clamp(-127, 127)
        y = pow2(e, x.dtype)
        y = torch.where(pos | (x == 0), y, torch.full_like(y, math.nan))  # NaN, negatives -> NaN
        if saturate:
            y = torch.where(x == math.inf, torch.full_like(y, 2.0 ** 127), y)
        else:
            y = torch.where(over, torch.full_like(y, math.nan), y)
        return y

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        ok = (values > 0) & torch.isfinite(values)
        a = torch.where(ok, values, torch.ones_like(values))
        return torch.where(ok, floor_log2(a) + 127, torch.full_like(a, 0xFF, dtype=torch.int64))

    def cast(self, x: torch.Tensor, rounding: str = "nearest", noise: torch.Tensor | None = None,
             saturate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(_compute_dtype(x.dtype))
        v = self.round(x, rounding, noise, saturate)
        return v, self.encode(v)

    def codes_to_storage(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.to(torch.uint8).view(self.storage_dtype)

    def storage_to_codes(self, stored: torch.Tensor) -> torch.Tensor:
        return stored.view(torch.uint8).to(torch.int64)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "name": self.name}


ElementFormat = Union[IntFormat, TernaryFormat, BinaryFormat, FloatFormat]
ScaleFormat = Union[FloatFormat, E8M0Format]

# ------------------------------------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------------------------------------

_FORMATS: dict[str, object] = {}


def _register(fmt):
    _FORMATS[fmt.name] = fmt
    return fmt


for _b in range(2, 9):
    _register(IntFormat(f"int{_b}", _b))
_register(IntFormat("int8_frac6", 8, frac_bits=6))  # MXINT8 element: two's complement 1.6 fixed point, max 127/64
_register(TernaryFormat())
_register(BinaryFormat())
_register(FloatFormat("e4m3", 4, 3, 7, "fn"))  # OCP OFP8 E4M3 (= float8_e4m3fn): max 448, NaN = S.1111.111
_register(FloatFormat("e5m2", 5, 2, 15, "ieee"))  # OCP OFP8 E5M2: max 57344, Inf and NaN
_register(FloatFormat("e2m3", 2, 3, 1, "none"))  # OCP MX FP6: max 7.5
_register(FloatFormat("e3m2", 3, 2, 3, "none"))  # OCP MX FP6: max 28
_register(FloatFormat("e2m1", 2, 1, 1, "none"))  # OCP MX FP4: ±{0, .5, 1, 1.5, 2, 3, 4, 6}
_register(FloatFormat("ue4m3", 4, 3, 7, "fn", signed=False))  # NVFP4 block scale: positive E4M3, max 448
_register(FloatFormat("ue5m3", 5, 3, 15, "fn", signed=False))  # hadakit: 2^-17 .. 114688, NaN = 0xFF
_register(E8M0Format())
_register(FloatFormat("fp16", 5, 10, 15, "ieee"))
_register(FloatFormat("bf16", 8, 7, 127, "ieee"))
_register(FloatFormat("fp32", 8, 23, 127, "ieee"))

_ALIASES = {
    "fp8_e4m3": "e4m3", "float8_e4m3fn": "e4m3", "e4m3fn": "e4m3",
    "fp8_e5m2": "e5m2", "float8_e5m2": "e5m2",
    "fp6_e2m3": "e2m3", "float6_e2m3fn": "e2m3",
    "fp6_e3m2": "e3m2", "float6_e3m2fn": "e3m2",
    "fp4": "e2m1", "fp4_e2m1": "e2m1", "float4_e2m1fn": "e2m1",
    "ue8m0": "e8m0", "float8_e8m0fnu": "e8m0",
    "float16": "fp16", "half": "fp16", "bfloat16": "bf16", "float32": "fp32", "float": "fp32",
}


def get_format(name):
    """The format registered under ``name`` (or an alias such as ``"float8_e4m3fn"``); formats pass through."""
    if not isinstance(name, str):
        if isinstance(name, (IntFormat, TernaryFormat, BinaryFormat, FloatFormat, E8M0Format)):
            return name
        raise TypeError(f"expected a format name or format object, got {type(name).__name__}")
    key = name.lower()
    key = _ALIASES.get(key, key)
    if key not in _FORMATS:
        raise ValueError(f"unknown format {name!r}; known formats: {', '.join(list_formats())}")
    return _FORMATS[key]


def list_formats() -> list[str]:
    """Names of the registered formats."""
    return list(_FORMATS)


def format_to_ref(fmt):
    """JSON reference to ``fmt``: its name if it is the registered format of that name, else its full dict."""
    if _FORMATS.get(fmt.name) == fmt:
        return fmt.name
    return fmt.to_dict()


def format_from_dict(d):
    """Inverse of :func:`format_to_ref` / ``fmt.to_dict()`` (a name string or a dict)."""
    if isinstance(d, str):
        return get_format(d)
    d = dict(d)
    kind = d.pop("kind", None)
    cls = {"int": IntFormat, "ternary": TernaryFormat, "binary": BinaryFormat, "float": FloatFormat,
           "e8m0": E8M0Format}.get(kind)
    if cls is None:
        raise ValueError(f"unknown format kind {kind!r} in {d}")
    return cls(**d)
