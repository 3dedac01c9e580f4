"""hadakit.formats — INT / FP / MX / NVFP4 element and scale formats, exact to the bit, and real packed storage.

    >>> import torch
    >>> from hadakit.formats import quantize, fake_quantize, get_scheme
    >>> x = torch.randn(4, 256)
    >>> qt = quantize(x, "mxfp4")                 # E2M1 elements, blocks of 32 along the last dim, E8M0 scales
    >>> qt.bits_per_element                       # 4 + 8/32
    4.25
    >>> qt.scales.shape, qt.scales.dtype
    (torch.Size([4, 8]), torch.float8_e8m0fnu)
    >>> y = qt.dequantize()
    >>> torch.equal(y, fake_quantize(x, "mxfp4"))  # simulation == real storage, bit for bit
    True
    >>> nv = quantize(x, "nvfp4")                 # UE4M3 block scales x fp32 tensor scale
    >>> s = get_scheme("int4_g128", rounding="stochastic")
    >>> a = fake_quantize(x, s, generator=0); torch.equal(a, fake_quantize(x, s, generator=0))
    True

See docs/formats.md for the formats, the scale rules, the rounding / saturation / non-finite policy and the storage
layout.
"""

from .elements import (
    BinaryFormat,
    E8M0Format,
    FloatFormat,
    IntFormat,
    TernaryFormat,
    get_format,
    list_formats,
)
from .fused import dequantize_rotate, rotate_quantize, rotated_amax
from .lattice import E8OneBitCodebook, E8P12Codebook, RVQCodebook, pack_e8p_codes, unpack_e8p_codes
from .lattice import bits_per_weight as e8p_bits_per_weight
from .packing import pack_codes, packed_nbytes, unpack_codes
from .quantize import GroupScales, compute_scales, dequantize, fake_quantize, quantize, quantize_with_scales
from .rounding import ROUNDING_MODES
from .schemes import DEFAULT_CLIP_GRID, GRANULARITIES, SCALE_RULES, QuantScheme, get_scheme, list_schemes
from .tensor import QuantizedTensor, load_quantized, save_quantized

__all__ = [
    "BinaryFormat",
    "DEFAULT_CLIP_GRID",
    "E8OneBitCodebook",
    "E8P12Codebook",
    "E8M0Format",
    "FloatFormat",
    "GroupScales",
    "GRANULARITIES",
    "IntFormat",
    "QuantScheme",
    "QuantizedTensor",
    "RVQCodebook",
    "ROUNDING_MODES",
    "SCALE_RULES",
    "TernaryFormat",
    "compute_scales",
    "dequantize",
    "dequantize_rotate",
    "e8p_bits_per_weight",
    "fake_quantize",
    "get_format",
    "get_scheme",
    "list_formats",
    "list_schemes",
    "load_quantized",
    "pack_codes",
    "pack_e8p_codes",
    "packed_nbytes",
    "quantize",
    "quantize_with_scales",
    "rotate_quantize",
    "rotated_amax",
    "save_quantized",
    "unpack_codes",
    "unpack_e8p_codes",
]
