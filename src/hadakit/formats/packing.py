"""Bit packing of 1..8-bit codes into a uint8 payload.

Layout (one rule for every width): the codes, in row-major order of the tensor, form an **LSB-first bit stream** —
code ``i`` occupies stream bits ``[i·b, (i+1)·b)``, and stream bit ``k`` is bit ``k % 8`` of byte ``k // 8``. So

* 4-bit: byte ``j`` = ``code[2j] | code[2j+1] << 4`` (low nibble first, like ``torch.float4_e2m1fn_x2``);
* 2-bit: byte ``j`` = ``c[4j] | c[4j+1] << 2 | c[4j+2] << 4 | c[4j+3] << 6``;
* 1-bit: 8 codes per byte, first code in bit 0;
* 6-bit: 4 codes in 3 bytes (24-bit little-endian word ``c0 | c1 << 6 | c2 << 12 | c3 << 18``);
* 3-bit: 8 codes in 3 bytes (``c0 | c1 << 3 | ... | c7 << 21``), likewise 5- and 7-bit;
* 8-bit: one byte per code.

The payload is 1-D with ``ceil(n · b / 8)`` bytes; trailing pad bits are zero. When the last dim times ``b`` is a
multiple of 8, the payload is exactly the row-wise packing and can be viewed as ``(*leading, last · b // 8)``.
"""

from __future__ import annotations

import torch

__all__ = ["pack_codes", "packed_nbytes", "unpack_codes"]


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes needed for ``count`` codes of ``bits`` bits: ``ceil(count · bits / 8)``."""
    return (count * bits + 7) // 8


def _check_bits(bits: int):
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"codes must be 1..8 bits wide, got {bits!r}")


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes (any shape, values in ``[0, 2^bits)``) into a 1-D uint8 payload (row-major order)."""
    _check_bits(bits)
    flat = codes.reshape(-1)
    n = flat.numel()
    if bits == 8:
        return flat.to(torch.uint8)
    # Eight b-bit codes are exactly b bytes: build one 64-bit word per group of eight (bits are disjoint, so a sum is
    # an OR), then split the word into its b low bytes.
    pad = (-n) % 8
    c = flat.to(torch.int64) & ((1 << bits) - 1)
    if pad:
        c = torch.cat([c, c.new_zeros(pad)])
    shifts = torch.arange(8, device=c.device, dtype=torch.int64) * bits
    words = (c.view(-1, 8) << shifts).sum(dim=1)
    byte_shifts = torch.arange(bits, device=c.device, dtype=torch.int64) * 8
    out = ((words[:, None] >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)
    return out[: packed_nbytes(n, bits)].contiguous()


def unpack_codes(payload: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the first ``count`` codes of the payload, as a 1-D uint8 tensor."""
    _check_bits(bits)
    if payload.dtype != torch.uint8:
        raise TypeError(f"payload must be uint8, got {payload.dtype}")
    p = payload.reshape(-1)
    need = packed_nbytes(count, bits)
    if p.numel() < need:
        raise ValueError(f"payload has {p.numel()} bytes, {count} codes of {bits} bits need {need}")
    if bits == 8:
        return p[:count].clone()
    p = p[:need].to(torch.int64)
    pad = (-need) % bits
    if pad:
        p = torch.cat([p, p.new_zeros(pad)])
    byte_shifts = torch.arange(bits, device=p.device, dtype=torch.int64) * 8
    words = (p.view(-1, bits) << byte_shifts).sum(dim=1)
    shifts = torch.arange(8, device=p.device, dtype=torch.int64) * bits
    codes = (words[:, None] >> shifts) & ((1 << bits) - 1)
    return codes.reshape(-1)[:count].to(torch.uint8)
