"""Quantization schemes: an element format + how scales are shared along the last dim + how they are computed.

A :class:`QuantScheme` is a frozen, JSON-round-trippable description; :func:`get_scheme` returns the named presets
(``"mxfp4"``, ``"nvfp4"``, ``"int4_g128"``, ...). The tensor is always grouped along its **last** dim:

* ``per_tensor`` — one scale for the whole tensor (scales shape ``()``);
* ``per_row``    — one scale per row of the last dim (per output channel for a weight ``[out, in]``, per token for an
  activation ``[tokens, features]``; scales shape ``(*leading, 1)``);
* ``group``      — one scale per ``group_size`` contiguous elements of the last dim (MX / NVFP4 blocks, GPTQ-style
  groups; scales shape ``(*leading, last // group_size)``). ``group_size`` must divide the last dim.

Scale rules (how a group's scale ``s`` comes from its values; ``elem_max`` = largest element magnitude, ``emax`` =
``floor(log2(elem_max))``):

* ``"amax"``    — ``s = clip · amax / elem_max`` rounded to nearest in the scale format (INT / FP8 / NVFP4);
* ``"floor"``   — OCP MX v1.0: ``s = 2^(floor(log2(clip · amax)) - emax)`` (may clip the top of the block);
* ``"ceil"``    — ``s = 2^ceil(log2(clip · amax / elem_max))``: the smallest power of two with no clipping;
* ``"absmean"`` — ``s = mean(|x|)`` (BitNet b1.58 ternary, binary).

``tensor_scale=True`` adds NVIDIA's second level: an fp32 per-tensor scale ``s_t = amax(x) / (elem_max ·
scale_max)`` and group scales ``amax_g / elem_max / s_t`` rounded into the scale format; a group's effective scale is
``decode(s_g) · s_t`` (float32 product).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

from .elements import (
    BinaryFormat,
    E8M0Format,
    FloatFormat,
    IntFormat,
    TernaryFormat,
    format_from_dict,
    format_to_ref,
    get_format,
)
from .rounding import ROUNDING_MODES

__all__ = [
    "DEFAULT_CLIP_GRID",
    "GRANULARITIES",
    "INT_RANGES",
    "SCALE_RULES",
    "QuantScheme",
    "get_scheme",
    "list_schemes",
]

GRANULARITIES = ("per_tensor", "per_row", "group")
# Symmetric INT grids. "restricted": codes in [-qmax, qmax], scale = amax / qmax. "full": the whole two's complement
# range [-qmax - 1, qmax] with scale = amax / (qmax + 1/2) — the definition of GPTQ's and llm-compressor's symmetric
# INT (``-amax`` lands on the extra code exactly, ``+amax`` rounds to ``qmax``): finer steps for the same bits.
INT_RANGES = ("restricted", "full")
SCALE_RULES = ("amax", "floor", "ceil", "absmean")
DEFAULT_CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)

_GRANULARITY_ALIASES = {
    "tensor": "per_tensor",
    "per_channel": "per_row",
    "per_token": "per_row",
    "channel": "per_row",
    "token": "per_row",
    "row": "per_row",
    "per_group": "group",
    "block": "group",
}


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class QuantScheme:
    """How to quantize a tensor: element format, scale granularity along the last dim, scale format and rule.

    Args:
        element: element format or its name (``"int4"``, ``"e2m1"``, ``"e4m3"``, ``"ternary"``, ...).
        granularity: ``"per_tensor"`` | ``"per_row"`` (aliases ``"per_channel"``, ``"per_token"``) | ``"group"``
            (``"group(128)"`` is shorthand for ``granularity="group", group_size=128``).
        group_size: elements per scale along the last dim (``granularity="group"`` only).
        scale_format: format the scales are stored in (``"fp32"``, ``"fp16"``, ``"bf16"``, ``"e8m0"``, ``"ue4m3"``,
            ``"ue5m3"``, ...).
        scale_rule: ``"amax"`` | ``"floor"`` | ``"ceil"`` | ``"absmean"`` (see the module docstring).
        symmetric: ``False`` = asymmetric INT (unsigned codes ``0 .. 2^b - 1`` and a uint8 zero point per group).
        clip_ratio: multiply the group statistic (amax, or min/max for asymmetric) by this factor in ``(0, 1]``.
        rounding: ``"nearest"`` (ties to even) or ``"stochastic"`` (elements only; scales always round to nearest).
        tensor_scale: add an fp32 per-tensor scale as a second level (NVFP4 rule; ``scale_rule="amax"`` only).
        clip_search: pick, per group (per tensor for ``per_tensor``), the ratio of ``clip_grid`` minimizing the
            reconstruction MSE (deterministic; ties go to the larger ratio).
        clip_grid: the candidate ratios for ``clip_search``.
        name: preset name (informational).
    """

    element: object = "int8"
    granularity: str = "per_tensor"
    group_size: int | None = None
    scale_format: object = "fp32"
    scale_rule: str = "amax"
    symmetric: bool = True
    int_range: str = "restricted"
    clip_ratio: float | None = None
    rounding: str = "nearest"
    tensor_scale: bool = False
    clip_search: bool = False
    clip_grid: tuple = field(default=DEFAULT_CLIP_GRID)
    name: str | None = None

    def __post_init__(self):
        def put(k, v):
            object.__setattr__(self, k, v)

        el = self.element
        el = format_from_dict(el) if isinstance(el, dict) else get_format(el)
        put("element", el)
        sf = self.scale_format
        sf = format_from_dict(sf) if isinstance(sf, dict) else get_format(sf)
        put("scale_format", sf)
        gran = _GRANULARITY_ALIASES.get(self.granularity, self.granularity)
        m = re.fullmatch(r"group\((\d+)\)", gran) if isinstance(gran, str) else None
        if m:  # "group(128)" == granularity="group", group_size=128
            g = int(m.group(1))
            if self.group_size not in (None, g):
                raise ValueError(f"granularity {self.granularity!r} contradicts group_size={self.group_size}")
            gran = "group"
            put("group_size", g)
        put("granularity", gran)
        put("clip_grid", tuple(float(r) for r in self.clip_grid))

        if not isinstance(el, (IntFormat, TernaryFormat, BinaryFormat, FloatFormat)) or el.bits > 8:
            raise ValueError(f"element format must be an INT / ternary / binary / <= 8-bit float format, got {el.name}")
        if isinstance(el, FloatFormat) and not el.signed:
            raise ValueError(f"element format {el.name} is unsigned; use a signed format for elements")
        if not isinstance(sf, (FloatFormat, E8M0Format)):
            raise ValueError(f"scale format must be a float or E8M0 format, got {sf.name}")
        if gran not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if gran == "group":
            if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size < 1:
                raise ValueError(f"granularity='group' needs a positive int group_size, got {self.group_size!r}")
        elif self.group_size is not None:
            raise ValueError(f"group_size is only used with granularity='group' (got {gran!r}, group_size="
                             f"{self.group_size}); drop group_size or set granularity='group'")
        if self.scale_rule not in SCALE_RULES:
            raise ValueError(f"scale_rule must be one of {SCALE_RULES}, got {self.scale_rule!r}")
        if self.rounding not in ROUNDING_MODES:
            raise ValueError(f"rounding must be one of {ROUNDING_MODES}, got {self.rounding!r}")
        if self.clip_ratio is not None and not (0.0 < float(self.clip_ratio) <= 1.0):
            raise ValueError(f"clip_ratio must be in (0, 1], got {self.clip_ratio}")
        if self.int_range not in INT_RANGES:
            raise ValueError(f"int_range must be one of {INT_RANGES}, got {self.int_range!r}")
        if self.int_range == "full" and not (isinstance(el, IntFormat) and self.symmetric
                                             and self.scale_rule == "amax"):
            raise ValueError("int_range='full' applies to symmetric INT elements with scale_rule='amax'")
        if not self.symmetric:
            if not isinstance(el, IntFormat) or el.frac_bits:
                raise ValueError(f"asymmetric quantization needs a plain INT element format, got {el.name}")
            if self.scale_rule != "amax":
                raise ValueError("asymmetric quantization uses scale_rule='amax' (scale = (max - min) / (2^b - 1))")
        if self.scale_rule == "absmean" and (self.clip_ratio is not None or self.clip_search):
            raise ValueError("clip_ratio / clip_search apply to amax-based rules, not scale_rule='absmean'")
        if self.tensor_scale:
            if self.scale_rule != "amax" or not self.symmetric:
                raise ValueError("tensor_scale (two-level NVFP4-style scaling) needs scale_rule='amax', symmetric")
            if gran == "per_tensor":
                raise ValueError("tensor_scale is a second level over per-row / group scales, not per_tensor")
        if self.clip_search:
            if self.clip_ratio is not None:
                raise ValueError("use either clip_ratio (fixed) or clip_search (grid search), not both")
            if not self.clip_grid or not all(0.0 < r <= 1.0 for r in self.clip_grid):
                raise ValueError(f"clip_grid must be a non-empty sequence of ratios in (0, 1], got {self.clip_grid}")
        if self.clip_ratio is not None:
            put("clip_ratio", float(self.clip_ratio))

    # --- layout --------------------------------------------------------------------------------------------------
    def layout(self, shape) -> tuple[tuple[int, int, int], tuple[int, ...]]:
        """``((R, G, g), scales_shape)`` for a tensor of ``shape``: it is viewed as ``R`` rows x ``G`` groups x ``g``.

        Raises ValueError (naming the valid group sizes) when ``group_size`` does not divide the last dim.
        """
        shape = tuple(int(s) for s in shape)
        numel = math.prod(shape)
        last = shape[-1] if shape else 1
        lead = math.prod(shape[:-1]) if shape else 1
        if self.granularity == "per_tensor":
            return (1, 1, numel), ()
        if self.granularity == "per_row":
            return (lead, 1, last), shape[:-1] + (1,)
        g = self.group_size
        if last % g:
            valid = ", ".join(str(d) for d in _divisors(last))
            raise ValueError(
                f"group size {g} does not divide the last dimension ({last}) of a tensor of shape {shape}; "
                f"valid group sizes for {last}: {valid} (or pad the last dimension to a multiple of {g})")
        return (lead, last // g, g), shape[:-1] + (last // g,)

    def bits_per_element(self, shape) -> float:
        """Exact storage cost in bits per element of a tensor of ``shape`` quantized with this scheme.

        Packed payload (``ceil(numel · bits / 8)`` bytes) + stored scales + uint8 zero points + fp32 tensor scale.
        """
        (r, gcount, _), sshape = self.layout(shape)
        numel = math.prod(tuple(shape))
        if numel == 0:
            return 0.0
        nscales = math.prod(sshape)
        bits = 8 * ((numel * self.element.bits + 7) // 8)
        bits += nscales * 8 * self.scale_format.storage_dtype.itemsize
        if not self.symmetric:
            bits += nscales * 8
        if self.tensor_scale:
            bits += 32
        return bits / numel

    # --- serialization -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["element"] = format_to_ref(self.element)
        d["scale_format"] = format_to_ref(self.scale_format)
        d["clip_grid"] = list(self.clip_grid)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "QuantScheme":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown QuantScheme fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)

    def replace(self, **changes) -> "QuantScheme":
        """A copy with ``changes`` applied (``name`` is dropped unless given, since the preset no longer applies)."""
        changes.setdefault("name", None)
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        """One-line human-readable summary."""
        gran = f"group({self.group_size})" if self.granularity == "group" else self.granularity
        parts = [self.element.name, gran, f"scale={self.scale_format.name}/{self.scale_rule}"]
        if self.tensor_scale:
            parts.append("x fp32 tensor scale")
        if not self.symmetric:
            parts.append("asymmetric")
        if self.int_range == "full":
            parts.append("full range")
        if self.clip_ratio is not None:
            parts.append(f"clip={self.clip_ratio}")
        if self.clip_search:
            parts.append("clip_search")
        if self.rounding != "nearest":
            parts.append(self.rounding)
        return (f"{self.name}: " if self.name else "") + ", ".join(parts)


# ------------------------------------------------------------------------------------------------------------------
# Presets
# ------------------------------------------------------------------------------------------------------------------


def _build_presets() -> dict[str, QuantScheme]:
    S = QuantScheme

    def grp(el, g, scale="fp16", **kw):
        return dict(element=el, granularity="group", group_size=g, scale_format=scale, **kw)

    def mx(el):
        return grp(el, 32, "e8m0", scale_rule="floor")

    specs = {
        # Integer, per row (per output channel / per token), fp32 scales; symmetric presets use the full two's
        # complement range, as GPTQ and llm-compressor define symmetric INT (so W4A16 / W4A4 rows compare 1:1).
        "int8": dict(element="int8", granularity="per_row", scale_format="fp32", int_range="full"),
        "int4": dict(element="int4", granularity="per_row", scale_format="fp32", int_range="full"),
        "int4_restricted": dict(element="int4", granularity="per_row", scale_format="fp32"),
        # Integer, grouped (GPTQ / AWQ style), fp16 scales.
        "int4_g128": grp("int4", 128, int_range="full"),
        "int4_g32": grp("int4", 32, int_range="full"),
        "int4_g128_asym": grp("int4", 128, symmetric=False),
        "int3_g128": grp("int3", 128, int_range="full"),
        "int2_g64": grp("int2", 64, int_range="full"),
        # BitNet-style, one absmean scale per tensor.
        "ternary": dict(element="ternary", granularity="per_tensor", scale_format="fp32", scale_rule="absmean"),
        "binary": dict(element="binary", granularity="per_tensor", scale_format="fp32", scale_rule="absmean"),
        # FP8 with an fp32 amax scale (per tensor, or per row as in per-channel / per-token FP8 serving).
        "fp8_e4m3": dict(element="e4m3", granularity="per_tensor", scale_format="fp32"),
        "fp8_e4m3_row": dict(element="e4m3", granularity="per_row", scale_format="fp32"),
        "fp8_e5m2": dict(element="e5m2", granularity="per_tensor", scale_format="fp32"),
        # OCP Microscaling v1.0: blocks of 32, E8M0 shared scale, floor rule.
        "mxfp8": mx("e4m3"),
        "mxfp8_e5m2": mx("e5m2"),
        "mxfp6": mx("e2m3"),
        "mxfp6_e3m2": mx("e3m2"),
        "mxfp4": mx("e2m1"),
        "mxint8": mx("int8_frac6"),
        # NVIDIA two-level: blocks of 16, UE4M3 block scale x fp32 tensor scale.
        "nvfp4": grp("e2m1", 16, "ue4m3", tensor_scale=True),
        "nvint4": grp("int4", 16, "ue4m3", tensor_scale=True),
        # FP4 blocks of 16 with a single-level UE5M3 scale (range 2^-17 .. 114688 needs no tensor scale).
        "fp4_g16_ue5m3": grp("e2m1", 16, "ue5m3"),
    }
    return {name: S(name=name, **kw) for name, kw in specs.items()}


_PRESETS = _build_presets()


def list_schemes() -> list[str]:
    """Names of the preset schemes."""
    return list(_PRESETS)


def get_scheme(name, /, **overrides) -> QuantScheme:
    """The preset ``name`` (or a QuantScheme / its dict, passed through), optionally with fields overridden.

    ``get_scheme("mxfp4", scale_rule="ceil")`` is MXFP4 with the round-up scale rule (its ``name`` becomes ``None``
    unless you pass one, since it is no longer the preset).
    """
    if isinstance(name, QuantScheme):
        scheme = name
    elif isinstance(name, dict):
        scheme = QuantScheme.from_dict(name)
    elif isinstance(name, str):
        key = name.lower()
        if key not in _PRESETS:
            raise ValueError(f"unknown scheme {name!r}; presets: {', '.join(_PRESETS)}")
        scheme = _PRESETS[key]
    else:
        raise TypeError(f"expected a preset name, QuantScheme or dict, got {type(name).__name__}")
    return scheme.replace(**overrides) if overrides else scheme
