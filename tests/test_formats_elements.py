"""Element / scale formats: decode tables and casts, bit-exact against ml_dtypes and torch's own float8 dtypes."""

import math

import ml_dtypes
import numpy as np
import pytest
import torch

from hadakit.formats import E8M0Format, FloatFormat, IntFormat, get_format, list_formats
from hadakit.formats.elements import format_from_dict, format_to_ref


pytestmark = pytest.mark.usefixtures("single_thread")

# (our format, ml_dtypes dtype)
ML_PAIRS = [
    ("e4m3", ml_dtypes.float8_e4m3fn),
    ("e5m2", ml_dtypes.float8_e5m2),
    ("e2m3", ml_dtypes.float6_e2m3fn),
    ("e3m2", ml_dtypes.float6_e3m2fn),
    ("e2m1", ml_dtypes.float4_e2m1fn),
    ("e8m0", ml_dtypes.float8_e8m0fnu),
]
TORCH_PAIRS = [
    ("e4m3", torch.float8_e4m3fn),
    ("e5m2", torch.float8_e5m2),
    ("e8m0", torch.float8_e8m0fnu),
]


def _bits(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float32).view(np.uint32)


def _same_float32(ours: torch.Tensor, ref: np.ndarray):
    """Bitwise float32 equality, except that any NaN matches any NaN."""
    ours = ours.to(torch.float32).numpy()
    ref = ref.astype(np.float32)
    nan_o, nan_r = np.isnan(ours), np.isnan(ref)
    np.testing.assert_array_equal(nan_o, nan_r)
    bad = np.nonzero((_bits(ours) != _bits(ref)) & ~nan_o)[0]
    assert bad.size == 0, f"{bad.size} mismatches, e.g. ours={ours[bad[:5]]} ref={ref[bad[:5]]}"


# ---------------------------------------------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,mx,emax", [
    ("e4m3", 448.0, 8), ("e5m2", 57344.0, 15), ("e2m3", 7.5, 2), ("e3m2", 28.0, 4), ("e2m1", 6.0, 2),
    ("ue4m3", 448.0, 8), ("ue5m3", 114688.0, 16), ("int8", 127.0, 6), ("int4", 7.0, 2), ("int2", 1.0, 0),
    ("int8_frac6", 127 / 64, 0), ("ternary", 1.0, 0), ("binary", 1.0, 0),
])
def test_format_constants(name, mx, emax):
    fmt = get_format(name)
    assert fmt.max == mx
    assert fmt.emax == emax


def test_format_constants_against_ml_dtypes():
    for name, dt in ML_PAIRS:
        fmt = get_format(name)
        fi = ml_dtypes.finfo(dt)
        assert fmt.max == float(fi.max), name
        if name != "e8m0":
            assert fmt.min_subnormal == float(fi.smallest_subnormal), name
            assert fmt.min_normal == float(fi.smallest_normal), name
            assert fmt.bits == fi.bits, name


def test_ue5m3_definition():
    f = get_format("ue5m3")
    assert (f.ebits, f.mbits, f.bias, f.signed, f.bits) == (5, 3, 15, False, 8)
    assert f.min_subnormal == 2.0 ** -17 and f.min_normal == 2.0 ** -14
    t = f.decode(torch.tensor([0, 1, 8, 0x78, 0xFE, 0xFF]))
    assert t[:5].tolist() == [0.0, 2.0 ** -17, 2.0 ** -14, 1.0, 114688.0]
    assert math.isnan(t[5])
    assert f.storage_dtype == torch.uint8


def test_ue4m3_is_positive_e4m3():
    ue, e = get_format("ue4m3"), get_format("e4m3")
    codes = torch.arange(128)
    a, b = ue.decode(codes), e.decode(codes)
    assert torch.equal(a[:127], b[:127]) and math.isnan(a[127]) and math.isnan(b[127])
    assert ue.storage_dtype == torch.float8_e4m3fn
    # negative inputs have no code: NaN
    v, c = ue.cast(torch.tensor([-1.0, 1.0, 0.0, -0.0]))
    assert math.isnan(v[0]) and c.tolist() == [0x7F, 0x38, 0, 0]


def test_registry_and_aliases():
    assert get_format("float8_e4m3fn") is get_format("e4m3")
    assert get_format("FP4") is get_format("e2m1")
    assert get_format("bfloat16").name == "bf16"
    with pytest.raises(ValueError, match="unknown format 'e9m9'.*known formats"):
        get_format("e9m9")
    for name in list_formats():
        fmt = get_format(name)
        assert format_from_dict(format_to_ref(fmt)) == fmt
        assert format_from_dict(fmt.to_dict()) == fmt
    custom = FloatFormat("e3m3", 3, 3, 3, "none")
    assert format_to_ref(custom) == custom.to_dict()
    assert format_from_dict(custom.to_dict()) == custom


def test_invalid_formats():
    with pytest.raises(ValueError, match="nan_style"):
        FloatFormat("x", 4, 3, 7, "weird")
    with pytest.raises(ValueError, match="float32 range"):
        FloatFormat("x", 8, 23, 1)
    with pytest.raises(ValueError, match="2..8 bits"):
        IntFormat("int9", 9)


# ---------------------------------------------------------------------------------------------------------------
# Decode tables: every representable code
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,dt", ML_PAIRS, ids=[p[0] for p in ML_PAIRS])
def test_decode_table_matches_ml_dtypes(name, dt):
    fmt = get_format(name)
    codes = np.arange(1 << fmt.bits, dtype=np.uint8)
    ref = codes.view(dt).astype(np.float32)
    _same_float32(fmt.decode(torch.from_numpy(codes.astype(np.int64))), ref)


@pytest.mark.parametrize("name,dt", TORCH_PAIRS, ids=[p[0] for p in TORCH_PAIRS])
def test_decode_table_matches_torch(name, dt):
    fmt = get_format(name)
    codes = torch.arange(256, dtype=torch.int64)
    ref = codes.to(torch.uint8).view(dt).to(torch.float32)
    _same_float32(fmt.decode(codes), ref.numpy())


@pytest.mark.parametrize("name", ["fp16", "bf16", "fp32"])
def test_decode_wide_formats(name):
    fmt = get_format(name)
    g = torch.Generator().manual_seed(0)
    if fmt.bits == 16:
        codes = torch.arange(1 << 16, dtype=torch.int64)
        ref = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(fmt.storage_dtype).float()
    else:
        raw = torch.randint(-(2 ** 31), 2 ** 31 - 1, (100_000,), generator=g, dtype=torch.int64)
        codes = raw & 0xFFFFFFFF
        ref = raw.to(torch.int32).view(torch.float32)
    _same_float32(fmt.decode(codes), ref.numpy())


@pytest.mark.parametrize("name", ["e4m3", "e5m2", "e2m3", "e3m2", "e2m1", "ue4m3", "ue5m3", "e8m0", "fp16", "bf16"])
def test_encode_decode_roundtrip_every_code(name):
    """Every non-NaN code decodes to a value that casts back to the same code (-0 included)."""
    fmt = get_format(name)
    codes = torch.arange(1 << fmt.bits, dtype=torch.int64)
    vals = fmt.decode(codes)
    keep = ~torch.isnan(vals)
    v, c = fmt.cast(vals[keep])
    assert torch.equal(c, codes[keep])
    assert torch.equal(v.view(torch.int32), vals[keep].view(torch.int32))
    if fmt.has_nan:
        nan_v, nan_c = fmt.cast(torch.tensor([math.nan]))
        assert math.isnan(fmt.decode(nan_c)[0])


def test_int_ternary_binary_codes():
    i4 = get_format("int4")
    levels = torch.arange(-7, 8)
    codes = i4.encode(levels)
    assert codes.min() >= 0 and codes.max() <= 15
    assert torch.equal(i4.decode(codes), levels.float())
    assert torch.equal(i4.decode(torch.arange(16), signed=False), torch.arange(16).float())
    t = get_format("ternary")
    assert t.encode(torch.tensor([-1, 0, 1])).tolist() == [3, 0, 1]
    assert t.decode(torch.tensor([3, 0, 1])).tolist() == [-1.0, 0.0, 1.0]
    b = get_format("binary")
    assert b.encode(torch.tensor([-1, 1])).tolist() == [0, 1]
    assert b.decode(torch.tensor([0, 1])).tolist() == [-1.0, 1.0]
    q = get_format("int8_frac6")
    assert q.decode(q.encode(torch.tensor([-127, 64, 127]))).tolist() == [-127 / 64, 1.0, 127 / 64]


# ---------------------------------------------------------------------------------------------------------------
# Casts of random float32 data
# ---------------------------------------------------------------------------------------------------------------


def _probe_values(fmt, n=20_000, seed=0) -> np.ndarray:
    """float32 probes: every representable value, the midpoints (ties) between neighbours and one float32 ULP
    either side of them, log-uniform magnitudes across (and beyond) the range, subnormals, values around max,
    huge values, zeros of both signs."""
    rng = np.random.default_rng(seed)
    table = np.array(fmt.decode_table(), dtype=np.float64)
    pos = np.unique(table[np.isfinite(table) & (table >= 0)])
    mids = ((pos[1:] + pos[:-1]) / 2).astype(np.float32)  # exact in float32 (one more mantissa bit)
    near = np.concatenate([mids, np.nextafter(mids, np.float32(np.inf)), np.nextafter(mids, np.float32(0))])
    top = pos[-1]
    ulp_top = pos[-1] - pos[-2]
    half = ulp_top / 2
    around_max = np.array([top, top + half, top + half * (1 - 2 ** -20), top + half * (1 + 2 ** -20),
                           top + ulp_top, top * 2, top * 1e6, 3.4e38, 1e-45, 0.0], dtype=np.float32)
    lo = np.log2(fmt.min_subnormal if fmt.kind == "float" else 2.0 ** -127) - 3
    hi = np.log2(fmt.max) + 3
    mags = np.exp2(rng.uniform(lo, hi, n)).astype(np.float32)
    rand_bits = rng.integers(0, 2 ** 32, n, dtype=np.uint64).astype(np.uint32).view(np.float32)
    rand_bits = rand_bits[np.isfinite(rand_bits)]
    vals = np.concatenate([pos.astype(np.float32), near, around_max, mags, rand_bits])
    return np.concatenate([vals, -vals]).astype(np.float32)


@pytest.mark.parametrize("name,dt", ML_PAIRS[:5], ids=[p[0] for p in ML_PAIRS[:5]])
def test_cast_matches_ml_dtypes_everywhere_non_saturating(name, dt):
    """saturate=False reproduces ml_dtypes' IEEE-style overflow (E4M3fn -> NaN, E5M2 -> Inf, FP6/FP4 -> max)."""
    fmt = get_format(name)
    x = _probe_values(fmt)
    ref_codes = x.astype(dt).view(np.uint8)
    ref_vals = x.astype(dt).astype(np.float32)
    v, c = fmt.cast(torch.from_numpy(x), saturate=False)
    _same_float32(v, ref_vals)
    finite = np.isfinite(ref_vals) | np.isinf(ref_vals)
    np.testing.assert_array_equal(c.numpy()[finite], ref_codes[finite].astype(np.int64))


@pytest.mark.parametrize("name,dt", ML_PAIRS[:5], ids=[p[0] for p in ML_PAIRS[:5]])
def test_cast_saturating_agrees_in_range_and_clamps_beyond(name, dt):
    fmt = get_format(name)
    x = _probe_values(fmt, seed=1)
    v, c = fmt.cast(torch.from_numpy(x))  # library policy: saturate
    ref = x.astype(dt).astype(np.float32)
    in_range = np.abs(x) <= fmt.max  # no overflow possible: the two agree bit for bit
    _same_float32(v[torch.from_numpy(in_range)], ref[in_range])
    beyond = ~in_range  # saturate (the reference overflows to NaN / Inf for E4M3 / E5M2)
    assert beyond.sum() > 10
    np.testing.assert_array_equal(v.numpy()[beyond], np.sign(x[beyond]) * fmt.max)


@pytest.mark.parametrize("name,dt", [("e4m3", torch.float8_e4m3fn), ("e5m2", torch.float8_e5m2)])
def test_cast_matches_torch_float8(name, dt):
    fmt = get_format(name)
    x = torch.from_numpy(_probe_values(fmt, seed=2))
    ref = x.to(dt)
    ref_v = ref.to(torch.float32)
    v, c = fmt.cast(x)
    in_range = ref_v.abs() <= fmt.max
    _same_float32(v[in_range], ref_v[in_range].numpy())
    assert torch.equal(c[in_range], ref.view(torch.uint8).to(torch.int64)[in_range])
    # torch's E5M2 overflows to Inf like IEEE: our non-saturating cast agrees everywhere
    if name == "e5m2":
        v2, c2 = fmt.cast(x, saturate=False)
        _same_float32(v2, ref_v.numpy())


def test_cast_matches_torch_on_nonfinite_and_signed_zero():
    x = torch.tensor([math.inf, -math.inf, math.nan, -0.0, 0.0, 1e-30, -1e-30])
    e4 = get_format("e4m3")
    v, c = e4.cast(x)
    # our saturating policy: fn formats map ±Inf to ±max (torch 2.13 does the same for float8_e4m3fn)
    assert v[:2].tolist() == [448.0, -448.0]
    assert math.isnan(v[2]) and c[2] == 0x7F
    assert c[3:].tolist() == [0x80, 0x00, 0x00, 0x80]
    e5 = get_format("e5m2")
    v, c = e5.cast(x)
    assert v[:2].tolist() == [math.inf, -math.inf] and c[:2].tolist() == [0x7C, 0xFC]
    assert math.isnan(v[2])


@pytest.mark.parametrize("name,dt", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_cast_matches_torch_half_formats(name, dt):
    fmt = get_format(name)
    rng = np.random.default_rng(3)
    bits = rng.integers(0, 2 ** 32, 200_000, dtype=np.uint64).astype(np.uint32)
    x = torch.from_numpy(bits.view(np.float32).copy())
    mids = fmt.decode(torch.arange(0, 1 << 16, 7)).double()
    mids = ((mids[1:] + mids[:-1]) / 2).float()
    x = torch.cat([x, mids[torch.isfinite(mids)]])
    x = x[~torch.isnan(x)]
    v, c = fmt.cast(x, saturate=False)
    ref = x.to(dt)
    _same_float32(v, ref.float().numpy())
    assert torch.equal(c, ref.view(torch.int16).to(torch.int64) & 0xFFFF)


def test_fp32_cast_is_identity():
    fmt = get_format("fp32")
    x = torch.tensor([1.0, -3.5e38, 1e-45, -0.0, 123.456])
    v, c = fmt.cast(x)
    assert torch.equal(v.view(torch.int32), x.view(torch.int32))
    assert torch.equal(c, x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF)


def test_float64_input_rounds_once():
    """float64 inputs are rounded directly (no double rounding through float32)."""
    fmt = get_format("e2m1")
    # 2.5 + tiny: nearest is 3 in E2M1; rounding through float32 would lose the tiny part and tie to 2.
    x = torch.tensor([2.5 + 1e-12, 2.5, 2.5 - 1e-12], dtype=torch.float64)
    v, _ = fmt.cast(x)
    assert v.dtype == torch.float64
    assert v.tolist() == [3.0, 2.0, 2.0]


def test_ties_to_even_examples():
    e2m1 = get_format("e2m1")
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -5.0])
    v, _ = e2m1.cast(x)
    assert v.tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -0.0, -4.0]
    e4 = get_format("e4m3")
    v, _ = e4.cast(torch.tensor([464.0, 2.0 ** -10, 3 * 2.0 ** -10]))  # 464 = tie between 448 and (NaN slot) 480
    assert v.tolist() == [448.0, 0.0, 2.0 ** -8]


def test_saturation_policy_table():
    x = torch.tensor([1e9, -1e9, math.inf, -math.inf])
    for name in ["e4m3", "e2m3", "e3m2", "e2m1", "ue5m3"]:
        fmt = get_format(name)
        v, _ = fmt.cast(x.abs()[[0, 2]] if not fmt.signed else x)
        expect = [fmt.max] * 2 if not fmt.signed else [fmt.max, -fmt.max, fmt.max, -fmt.max]
        assert v.tolist() == expect, name
    v, _ = get_format("e5m2").cast(x)
    assert v.tolist() == [57344.0, -57344.0, math.inf, -math.inf]
    # non-saturating: IEEE-like overflow
    v, _ = get_format("e4m3").cast(x, saturate=False)
    assert torch.isnan(v).all()
    v, _ = get_format("e5m2").cast(x, saturate=False)
    assert v.tolist() == [math.inf, -math.inf, math.inf, -math.inf]
    v, _ = get_format("e2m1").cast(x, saturate=False)
    assert v.tolist() == [6.0, -6.0, 6.0, -6.0]


def test_nan_in_format_without_nan_raises():
    fmt = get_format("e2m1")
    with pytest.raises(ValueError, match="no NaN encoding"):
        fmt.cast(torch.tensor([1.0, math.nan]))


# ---------------------------------------------------------------------------------------------------------------
# E8M0
# ---------------------------------------------------------------------------------------------------------------


def test_e8m0_cast_matches_ml_dtypes_and_torch():
    fmt = E8M0Format()
    rng = np.random.default_rng(4)
    # float32-normal inputs: below 2^-126 both libraries round every input in (2^-127, 2^-126) up to 2^-126
    # (their bit-level rounding of float32 subnormals); we round to the nearest power of two there (next test).
    x = np.exp2(rng.uniform(-126.0, 127.4, 50_000)).astype(np.float32)
    ties = (np.exp2(np.arange(-126, 127, dtype=np.float64)) * 1.5).astype(np.float32)
    x = np.concatenate([x, ties, np.nextafter(ties, np.float32(0)), np.nextafter(ties, np.float32(np.inf)),
                        np.exp2(np.arange(-127, 128, dtype=np.float64)).astype(np.float32)])
    v, c = fmt.cast(torch.from_numpy(x))
    ref = x.astype(ml_dtypes.float8_e8m0fnu)
    np.testing.assert_array_equal(c.numpy(), ref.view(np.uint8).astype(np.int64))
    _same_float32(v, ref.astype(np.float32))
    tref = torch.from_numpy(x).to(torch.float8_e8m0fnu).view(torch.uint8).to(torch.int64)
    assert torch.equal(c, tref)


def test_e8m0_edges():
    fmt = E8M0Format()
    sub = torch.tensor([1.07, 1.49, 1.5, 1.9]) * 2.0 ** -127  # float32 subnormals: nearest power of two, ties up
    assert fmt.cast(sub)[1].tolist() == [0, 0, 1, 1]
    v, c = fmt.cast(torch.tensor([0.0, 1e-45, 3.0, math.inf, 3e38, -1.0, math.nan]))
    assert c.tolist() == [0, 0, 129, 254, 254, 255, 255]
    v, c = fmt.cast(torch.tensor([math.inf, 3e38]), saturate=False)
    assert c.tolist() == [255, 255]
    assert fmt.storage_dtype == torch.float8_e8m0fnu
    assert fmt.decode(torch.tensor([0, 127, 254])).tolist() == [2.0 ** -127, 1.0, 2.0 ** 127]
