"""Bit packing: the documented LSB-first layout, bit-exact round trips for every width and through QuantizedTensor."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hadakit.formats import get_scheme, list_schemes, pack_codes, packed_nbytes, quantize, unpack_codes


pytestmark = pytest.mark.usefixtures("single_thread")

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)


def _reference_pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Independent reference: expand each code to its bits LSB-first, concatenate, np.packbits(bitorder='little')."""
    if codes.size == 0:
        return np.zeros(0, dtype=np.uint8)
    stream = ((codes[:, None].astype(np.int64) >> np.arange(bits)) & 1).astype(np.uint8).reshape(-1)
    return np.packbits(stream, bitorder="little")


@pytest.mark.parametrize("bits,codes,expected", [
    (4, [1, 2], [0x21]),
    (4, [0xF, 0x0, 0x3], [0x0F, 0x03]),
    (2, [1, 2, 3, 0], [0b00111001]),
    (1, [1, 0, 0, 0, 0, 0, 0, 1, 1], [0x81, 0x01]),
    (6, [1, 2, 3, 4], [0x81, 0x30, 0x10]),  # word 1 | 2<<6 | 3<<12 | 4<<18 = 0x103081
    (3, list(range(8)), [0x88, 0xC6, 0xFA]),  # sum(i << 3i) = 0xFAC688
    (8, [0, 255, 7], [0, 255, 7]),
])
def test_documented_layout(bits, codes, expected):
    got = pack_codes(torch.tensor(codes), bits)
    assert got.dtype == torch.uint8
    assert got.tolist() == expected
    assert unpack_codes(got, bits, len(codes)).tolist() == codes


@SETTINGS
@given(bits=st.integers(1, 8), data=st.data())
def test_pack_roundtrip_and_reference(bits, data):
    n = data.draw(st.integers(0, 200))
    codes = data.draw(st.lists(st.integers(0, (1 << bits) - 1), min_size=n, max_size=n))
    c = torch.tensor(codes, dtype=torch.int64)
    p = pack_codes(c, bits)
    assert p.numel() == packed_nbytes(n, bits) == (n * bits + 7) // 8
    np.testing.assert_array_equal(p.numpy(), _reference_pack(np.array(codes, dtype=np.int64), bits))
    assert unpack_codes(p, bits, n).tolist() == codes


def test_unpack_errors():
    with pytest.raises(ValueError, match="need"):
        unpack_codes(torch.zeros(1, dtype=torch.uint8), 4, 3)
    with pytest.raises(TypeError, match="uint8"):
        unpack_codes(torch.zeros(1, dtype=torch.int32), 4, 1)
    with pytest.raises(ValueError, match="1..8 bits"):
        pack_codes(torch.zeros(3), 9)


@st.composite
def _shape_for(draw, scheme):
    lead = draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))
    unit = scheme.group_size if scheme.granularity == "group" else 1
    last = unit * draw(st.integers(1, 3)) + (0 if scheme.granularity == "group" else draw(st.integers(0, 5)))
    return tuple(lead) + (last,)


@SETTINGS
@given(name=st.sampled_from(list_schemes()), data=st.data())
def test_quantized_tensor_codes_roundtrip_over_shapes(name, data):
    """quantize() packs the codes it computed; unpacking gives them back, row-major, for every preset and shape."""
    scheme = get_scheme(name)
    shape = data.draw(_shape_for(scheme))
    seed = data.draw(st.integers(0, 2 ** 31 - 1))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3
    qt = quantize(x, scheme)
    codes = qt.codes()
    assert codes.shape == x.shape and codes.dtype == torch.uint8
    assert int(codes.max()) < (1 << scheme.element.bits)
    # repacking the unpacked codes reproduces the payload bit for bit
    assert torch.equal(pack_codes(codes, scheme.element.bits), qt.payload)
    # row-major: with per-row / per-group scales, the codes of a row are those of the row quantized alone
    if scheme.granularity != "per_tensor" and not scheme.tensor_scale and x.dim() >= 2:
        r = data.draw(st.integers(0, x.shape[0] - 1))
        assert torch.equal(quantize(x[r], scheme).codes(), codes[r])
    # the payload of row-multiple-of-8-bit rows is the row-wise packing
    last_bits = x.shape[-1] * scheme.element.bits
    if last_bits % 8 == 0 and x.dim() >= 2:
        rows = x.reshape(-1, x.shape[-1])
        per_row = codes.reshape(-1, x.shape[-1])
        row_payloads = [pack_codes(per_row[r], scheme.element.bits) for r in range(rows.shape[0])]
        assert torch.equal(torch.cat(row_payloads), qt.payload)
