"""quantize / fake_quantize against independent per-block references (numpy + ml_dtypes), and the edge-case policy."""

import math

import ml_dtypes
import numpy as np
import pytest
import torch

from hadakit.formats import QuantScheme, fake_quantize, get_scheme, list_schemes, quantize


pytestmark = pytest.mark.usefixtures("single_thread")

# Independent constants, straight from the OCP MX v1.0 / OFP8 tables (not read from hadakit).
ML = {"e2m1": ml_dtypes.float4_e2m1fn, "e4m3": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2,
      "e2m3": ml_dtypes.float6_e2m3fn, "e3m2": ml_dtypes.float6_e3m2fn}
EMAX = {"e2m1": 2, "e4m3": 8, "e5m2": 15, "e2m3": 2, "e3m2": 4, "int8": 0}
MAXV = {"e2m1": 6.0, "e4m3": 448.0, "e5m2": 57344.0, "e2m3": 7.5, "e3m2": 28.0, "int8": 127 / 64}
MX_SCHEMES = {"mxfp4": "e2m1", "mxfp8": "e4m3", "mxfp8_e5m2": "e5m2", "mxfp6": "e2m3", "mxfp6_e3m2": "e3m2",
              "mxint8": "int8"}


def _bits32(t) -> np.ndarray:
    a = t.numpy() if isinstance(t, torch.Tensor) else t
    return a.astype(np.float32).view(np.uint32)


def _assert_bitwise(a, b):
    a = a.numpy() if isinstance(a, torch.Tensor) else a
    b = b.numpy() if isinstance(b, torch.Tensor) else b
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    m = ~np.isnan(a)
    bad = np.nonzero(_bits32(a[m]) != _bits32(b[m]))[0]
    assert bad.size == 0, f"{bad.size} mismatches; first: {a[m][bad[:4]]} vs {b[m][bad[:4]]}"


def _mx_test_data(seed=0, rows=6, blocks=8, block=32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, blocks * block)).astype(np.float32)
    # very different magnitudes per block, so the shared exponents span a wide range
    k = rng.integers(-30, 30, (rows, blocks))
    x = (x.reshape(rows, blocks, block) * np.exp2(k)[..., None]).astype(np.float32).reshape(rows, -1)
    x[0, :block] = 0.0  # all-zero block
    x[0, block:2 * block] = 0.0
    x[0, block + 3] = -0.0
    x[1, :block] *= 0
    x[1, :block] += np.float32(2.0 ** -140) * rng.integers(-3, 4, block)  # float32 subnormals
    x[1, block:2 * block] = rng.standard_normal(block).astype(np.float32) * np.float32(1e37)  # huge
    x[2, :block] = np.linspace(-7.9, 7.9, block, dtype=np.float32)  # amax mantissa above E2M1's 1.5
    x[2, block:2 * block] = 4.0  # amax an exact power of two
    x[3, 5] = np.float32(3.0 * 2.0 ** 20)
    return x


def _mx_reference(x: np.ndarray, elem: str, rule: str = "floor", block: int = 32):
    """Straightforward per-block loop: OCP MX shared exponent, then element rounding by ml_dtypes."""
    rows, cols = x.shape
    out = np.zeros_like(x)
    scodes = np.zeros((rows, cols // block), dtype=np.int64)
    ecodes = np.zeros_like(x, dtype=np.int64)
    for r in range(rows):
        for b in range(cols // block):
            blk = x[r, b * block:(b + 1) * block]
            amax = float(np.abs(blk).max())
            if amax == 0:
                e = -127
            elif rule == "floor":
                e = (math.frexp(amax)[1] - 1) - EMAX[elem]
            else:  # smallest power of two with amax / 2^e <= elem max
                e = math.frexp(amax)[1] - 1 - EMAX[elem] - 1
                while MAXV[elem] * 2.0 ** e < amax:
                    e += 1
            e = max(-127, min(127, e))
            X = np.float32(2.0 ** e)
            scaled = np.clip(blk / X, -MAXV[elem], MAXV[elem])
            if elem == "int8":
                q = np.clip(np.round(scaled * 64), -127, 127) + 0.0  # integer codes: no -0
                vals = (q / 64).astype(np.float32)
                codes = q.astype(np.int64) & 0xFF
            else:
                qq = scaled.astype(ML[elem])
                vals = qq.astype(np.float32)
                codes = qq.view(np.uint8).astype(np.int64)
            out[r, b * block:(b + 1) * block] = vals * X
            ecodes[r, b * block:(b + 1) * block] = codes
            scodes[r, b] = e + 127
    return out, scodes, ecodes


@pytest.mark.parametrize("name", list(MX_SCHEMES))
@pytest.mark.parametrize("rule", ["floor", "ceil"])
def test_mx_matches_reference(name, rule):
    x = _mx_test_data()
    elem = MX_SCHEMES[name]
    scheme = get_scheme(name) if rule == "floor" else get_scheme(name, scale_rule="ceil")
    ref, scodes, ecodes = _mx_reference(x, elem, rule)
    xt = torch.from_numpy(x)
    qt = quantize(xt, scheme)
    assert qt.scales.dtype == torch.float8_e8m0fnu
    np.testing.assert_array_equal(qt.scales.view(torch.uint8).numpy().astype(np.int64), scodes)
    np.testing.assert_array_equal(qt.codes().numpy().astype(np.int64), ecodes)
    _assert_bitwise(qt.dequantize(), ref)
    _assert_bitwise(fake_quantize(xt, scheme), ref)


def test_power_of_two_rules_with_other_scale_formats():
    x = torch.from_numpy(_mx_test_data()[2:])  # magnitudes within bf16 / fp32 range
    for rule in ("floor", "ceil"):
        ref = quantize(x, get_scheme("mxfp4", scale_rule=rule))
        for sf in ("bf16", "fp32"):
            other = quantize(x, get_scheme("mxfp4", scale_rule=rule, scale_format=sf))
            assert torch.equal(other.scale_values(), ref.scale_values())
            assert torch.equal(other.dequantize(), ref.dequantize())


def test_floor_rule_clips_and_ceil_rule_does_not():
    x = torch.zeros(1, 32)
    x[0, 0] = 7.9
    x[0, 1] = 1.0
    floor = fake_quantize(x, "mxfp4")
    ceil = fake_quantize(x, get_scheme("mxfp4", scale_rule="ceil"))
    assert floor[0, 0] == 6.0  # shared exponent floor(log2 7.9) - 2 = 0: 7.9 saturates to 6
    assert ceil[0, 0] == 8.0  # scale 2: 7.9 / 2 = 3.95 -> 4
    assert floor[0, 1] == 1.0 and ceil[0, 1] == 1.0


def _nv_reference(x: np.ndarray, elem: str, block=16):
    """NVIDIA two-level rule in float32: s_t = amax / (elem_max · 448); block scale = E4M3(amax_b / elem_max / s_t)."""
    emax_val = np.float32(6.0 if elem == "e2m1" else 7.0)
    amax_t = np.float32(np.abs(x).max())
    ts = np.float32(amax_t / np.float32(emax_val * 448))
    if ts == 0:
        ts = np.float32(1.0)
    out = np.zeros_like(x)
    scodes = []
    for r in range(x.shape[0]):
        row = []
        for b in range(x.shape[1] // block):
            blk = x[r, b * block:(b + 1) * block]
            raw = np.float32(np.float32(np.abs(blk).max() / emax_val) / ts)
            sq = np.array([raw]).astype(ml_dtypes.float8_e4m3fn)
            row.append(int(sq.view(np.uint8)[0]))
            s_eff = np.float32(sq.astype(np.float32)[0] * ts)
            if s_eff == 0:
                vals = np.zeros_like(blk)
            elif elem == "e2m1":
                vals = (blk / s_eff).astype(ml_dtypes.float4_e2m1fn).astype(np.float32)
            else:
                vals = (np.clip(np.round(blk / s_eff), -7, 7) + 0.0).astype(np.float32)
            out[r, b * block:(b + 1) * block] = vals * s_eff
        scodes.append(row)
    return out, np.array(scodes), ts


@pytest.mark.parametrize("name,elem", [("nvfp4", "e2m1"), ("nvint4", "int4")])
def test_nvidia_two_level_matches_reference(name, elem):
    rng = np.random.default_rng(1)
    x = (rng.standard_t(3, (8, 128)) * np.exp2(rng.integers(-12, 12, (8, 1)))).astype(np.float32)
    x[0, :16] = 0.0
    x[3, 16:32] *= 1e-6  # blocks far below the tensor amax: small E4M3 block scales (subnormal / flushed)
    ref, scodes, ts = _nv_reference(x, elem)
    xt = torch.from_numpy(x)
    qt = quantize(xt, name)
    assert qt.tensor_scale.dtype == torch.float32 and qt.tensor_scale.dim() == 0
    assert qt.tensor_scale.item() == ts
    assert qt.scales.dtype == torch.float8_e4m3fn
    np.testing.assert_array_equal(qt.scales.view(torch.uint8).numpy(), scodes)
    _assert_bitwise(qt.dequantize(), ref)
    _assert_bitwise(fake_quantize(xt, name), ref)
    # the block holding the tensor amax uses a block scale at (or next to) E4M3's max, 448
    assert qt.scale_values().max().item() in (416.0, 448.0)


@pytest.mark.parametrize("int_range,divisor,lo", [("full", 7.5, -8), ("restricted", 7.0, -7)])
def test_int_group_matches_reference(int_range, divisor, lo):
    # "full" is GPTQ's / llm-compressor's symmetric INT4: scale amax / 7.5, codes -8 .. 7
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 256)).astype(np.float32)
    x[1, :128] = 0.0
    x[2, 5] = -np.abs(x[2]).max() * 2  # a negative amax lands exactly on -8 in the full range
    out = np.zeros_like(x)
    for r in range(4):
        for b in range(2):
            blk = x[r, b * 128:(b + 1) * 128]
            s = np.float32(np.float16(np.float32(np.abs(blk).max() / np.float32(divisor))))
            out[r, b * 128:(b + 1) * 128] = 0 if s == 0 else (np.clip(np.round(blk / s), lo, 7) + 0.0) * s
    scheme = get_scheme("int4_g128", int_range=int_range)
    _assert_bitwise(fake_quantize(torch.from_numpy(x), scheme), out)
    qt = quantize(torch.from_numpy(x), scheme)
    assert qt.scales.dtype == torch.float16 and qt.scales.shape == (4, 2)
    torch.testing.assert_close(qt.dequantize(), torch.from_numpy(out), rtol=0, atol=0)


def test_int_asymmetric_matches_reference():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((3, 256)) + 1.5).astype(np.float32)
    x[2] = np.abs(x[2])  # all positive row: zero point 0
    out = np.zeros_like(x)
    zps = np.zeros((3, 2), dtype=np.int64)
    for r in range(3):
        for b in range(2):
            blk = x[r, b * 128:(b + 1) * 128]
            lo, hi = min(blk.min(), np.float32(0)), max(blk.max(), np.float32(0))
            s = np.float32(np.float16(np.float32((hi - lo) / np.float32(15))))
            zp = np.clip(np.round(-lo / s), 0, 15)
            q = np.clip(np.round(blk / s) + zp, 0, 15)
            out[r, b * 128:(b + 1) * 128] = (q - zp) * s
            zps[r, b] = zp
    xt = torch.from_numpy(x)
    qt = quantize(xt, "int4_g128_asym")
    np.testing.assert_array_equal(qt.zero_points.numpy().astype(np.int64), zps)
    _assert_bitwise(qt.dequantize(), out)
    _assert_bitwise(fake_quantize(xt, "int4_g128_asym"), out)


def test_ternary_and_binary_bitnet_rule():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((16, 64)).astype(np.float32)
    wt = torch.from_numpy(w)
    for name in ["ternary", "binary"]:
        qt = quantize(wt, name)
        s = qt.scale_values().item()
        assert s == pytest.approx(float(np.abs(w.astype(np.float64)).mean()), rel=1e-6)
        if name == "ternary":
            levels = np.clip(np.round(w / np.float32(s)), -1, 1) + 0.0
        else:
            levels = np.where(w >= 0, 1.0, -1.0)
        _assert_bitwise(qt.dequantize(), (levels * np.float32(s)).astype(np.float32))
        assert qt.bits_per_element == pytest.approx({"ternary": 2, "binary": 1}[name] + 32 / w.size)


def test_mxint8_fixed_point_and_fp8_per_tensor_saturation_edge():
    x = torch.tensor([[448.0 * 3, -448.0 * 3, 1.0, -2.0]])
    qt = quantize(x, "fp8_e4m3")
    # scale = amax / 448 = 3 exactly: the amax elements land on the E4M3 max code, ±448
    assert qt.scale_values().item() == 3.0
    assert qt.codes()[0, :2].tolist() == [0x7E, 0xFE]
    assert qt.dequantize()[0, :2].tolist() == [1344.0, -1344.0]
    # a clip ratio saturates the top of the range at ±max · scale
    y = fake_quantize(x, get_scheme("fp8_e4m3", clip_ratio=0.5))
    assert y[0, :2].tolist() == [672.0, -672.0]


# ---------------------------------------------------------------------------------------------------------------
# fake_quantize == quantize().dequantize(), dtypes, shapes
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list_schemes())
def test_fake_quantize_bit_identical_to_dequantize(name):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 128, generator=g) * torch.logspace(-3, 3, 6)[:, None]
    x[2, :32] = 0.0
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        xd = x.to(dtype)
        for scheme in (get_scheme(name), get_scheme(name, rounding="stochastic")):
            f = fake_quantize(xd, scheme, generator=9)
            q = quantize(xd, scheme, generator=9)
            d = q.dequantize(dtype)
            assert f.dtype == dtype and d.dtype == dtype and q.dtype == dtype
            ibits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[f.element_size()]
            assert torch.equal(f.view(ibits), d.view(ibits)), (name, dtype, scheme.rounding)


def test_float64_inputs_are_quantized_in_float64():
    # 2.5 + 1e-12 rounds to 3 in E2M1 when seen in float64, to 2 when first rounded to float32
    x = torch.zeros(1, 32, dtype=torch.float64)
    x[0, 0] = 4.0  # block amax 4 -> shared exponent 0 -> scale 1
    x[0, 1] = 2.5 + 1e-12
    assert fake_quantize(x, "mxfp4")[0, 1].item() == 3.0
    assert fake_quantize(x.float(), "mxfp4")[0, 1].item() == 2.0


def test_shapes_1d_3d_0d_and_empty():
    x3 = torch.randn(2, 3, 64)
    qt = quantize(x3, "mxfp4")
    assert qt.scales.shape == (2, 3, 2) and qt.dequantize().shape == x3.shape
    assert torch.equal(qt.dequantize(), fake_quantize(x3.reshape(6, 64), "mxfp4").reshape(2, 3, 64))
    x1 = torch.randn(48)
    assert quantize(x1, "int8").scales.shape == (1,)
    assert quantize(x1, "nvfp4").scales.shape == (3,)
    x0 = torch.tensor(3.0)
    q0 = quantize(x0, "fp8_e4m3")
    assert q0.shape == () and q0.dequantize().item() == 3.0
    e = torch.zeros(0, 64)
    qe = quantize(e, "mxfp4")
    assert qe.payload.numel() == 0 and qe.scales.shape == (0, 2) and qe.dequantize().shape == (0, 64)
    assert fake_quantize(torch.zeros(0), "fp8_e4m3").shape == (0,)


@pytest.mark.parametrize("bad", [torch.zeros(4, 32, dtype=torch.int32), torch.zeros(4, 32, dtype=torch.bool),
                                 torch.zeros(4, 32, dtype=torch.uint8)])
def test_integer_inputs_raise_typeerror(bad):
    with pytest.raises(TypeError, match=r"float32, float16, bfloat16 or float64.*x\.float\(\)"):
        quantize(bad, "mxfp4")
    with pytest.raises(TypeError, match="x.float"):
        fake_quantize(bad, "mxfp4")


def test_float8_input_raises_typeerror():
    with pytest.raises(TypeError, match="already quantized"):
        quantize(torch.zeros(4, 32).to(torch.float8_e4m3fn), "mxfp4")


def test_group_not_dividing_raises_valueerror():
    with pytest.raises(ValueError, match=r"group size 32 does not divide the last dimension \(48\).*1, 2, 3, 4, 6, 8, "
                                         r"12, 16, 24, 48"):
        quantize(torch.randn(2, 48), "mxfp4")


# ---------------------------------------------------------------------------------------------------------------
# Zero blocks, non-finite inputs
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list_schemes())
def test_all_zero_groups_and_tensors(name):
    x = torch.randn(4, 128)
    x[1] = 0.0
    for inp in (x, torch.zeros(4, 128)):
        qt = quantize(inp, name)
        s = qt.scale_values()
        assert torch.isfinite(s).all()
        y = qt.dequantize()
        assert torch.isfinite(y).all()
        if name != "binary" or inp.abs().max() == 0:  # binary has no zero level: a zero row inside a
            assert (y[1] == 0).all()                   # per-tensor-scaled tensor decodes to ±scale
        if qt.tensor_scale is not None:
            assert torch.isfinite(qt.tensor_scale) and qt.tensor_scale > 0
    z = quantize(torch.zeros(4, 128), name)
    if name != "binary":  # binary has no zero level: ±1 · (scale 0)
        el = z.scheme.element
        zero_code = 0 if z.zero_points is None else z.zero_points.reshape(-1)[0].item()
        assert (z.codes() == zero_code).all(), el


def test_nonfinite_raises_with_counts():
    x = torch.randn(4, 64)
    x[0, 3] = math.nan
    x[2, 40] = math.inf
    x[3, 0] = math.nan
    with pytest.raises(ValueError, match=r"3 non-finite value\(s\) \(2 NaN, 1 ±Inf\) out of 256.*allow_nonfinite=True"):
        quantize(x, "mxfp4")
    with pytest.raises(ValueError, match="non-finite"):
        fake_quantize(x, "int8")


@pytest.mark.parametrize("name,nan_code", [("mxfp4", 0xFF), ("nvfp4", 0x7F), ("int4_g32", None), ("fp8_e4m3", None),
                                           ("ternary", None), ("int4_g128_asym", None)])
def test_allow_nonfinite_poisons_only_its_group(name, nan_code):
    scheme = get_scheme(name)
    x = torch.randn(4, 128)
    x[0, 3] = math.nan
    x[2, 100] = -math.inf
    y = fake_quantize(x, scheme, allow_nonfinite=True)
    qt = quantize(x, scheme, allow_nonfinite=True)
    d = qt.dequantize()
    _assert_bitwise(y, d)
    (R, G, g), _ = scheme.layout(x.shape)
    bad = torch.zeros(R, G, dtype=torch.bool)
    bad.view(-1)[torch.nonzero(~torch.isfinite(x.reshape(R, G, g)).all(-1).reshape(-1))] = True
    nan_groups = torch.isnan(y.reshape(R, G, g)).all(-1)
    assert torch.equal(nan_groups, bad)
    assert not torch.isnan(y.reshape(R, G, g)[~bad]).any()
    # the finite groups are quantized exactly as if the bad values were zeros
    clean = fake_quantize(torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0), scheme)
    assert torch.equal(y.reshape(R, G, g)[~bad], clean.reshape(R, G, g)[~bad])
    if nan_code is not None:
        sc = qt.scales.view(torch.uint8).reshape(R, G)
        assert (sc[bad] == nan_code).all()


def test_inf_block_in_mx_gets_nan_scale_per_spec():
    x = torch.randn(1, 64)
    x[0, 40] = math.inf
    qt = quantize(x, "mxfp8", allow_nonfinite=True)
    codes = qt.scales.view(torch.uint8)
    assert codes[0, 1].item() == 0xFF and codes[0, 0].item() != 0xFF
    assert torch.isnan(qt.dequantize()[0, 32:]).all() and torch.isfinite(qt.dequantize()[0, :32]).all()


# ---------------------------------------------------------------------------------------------------------------
# Clip ratio and clip search
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["int3_g128", "mxfp4", "nvfp4", "int8", "int4_g128_asym"])
def test_clip_search_never_worse_and_deterministic(name):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(8, 256, generator=g) ** 3  # heavy tails
    base = get_scheme(name)
    search = get_scheme(name, clip_search=True)
    (R, G, gs), _ = base.layout(x.shape)
    e0 = ((fake_quantize(x, base) - x) ** 2).reshape(R, G, gs).sum(-1)
    e1 = ((fake_quantize(x, search) - x) ** 2).reshape(R, G, gs).sum(-1)
    assert (e1 <= e0).all()
    if name in ("int3_g128", "nvfp4", "int4_g128_asym"):
        assert e1.sum() < e0.sum()  # heavy tails, few levels: clipping helps somewhere
    assert torch.equal(fake_quantize(x, search), fake_quantize(x, search))
    _assert_bitwise(quantize(x, search).dequantize(), fake_quantize(x, search))


def test_clip_search_on_per_tensor_picks_one_ratio():
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1)) ** 3
    s = QuantScheme("int4", "per_tensor", clip_search=True, clip_grid=(1.0, 0.5, 0.25))
    y = fake_quantize(x, s)
    candidates = [fake_quantize(x, QuantScheme("int4", "per_tensor", clip_ratio=r)) for r in (1.0, 0.5, 0.25)]
    errs = [float(((c - x) ** 2).sum()) for c in candidates]
    assert torch.equal(y, candidates[int(np.argmin(errs))])


# ---------------------------------------------------------------------------------------------------------------
# CUDA (runs where a GPU is present)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list_schemes())
def test_cuda_matches_cpu_bitwise(name):
    x = torch.randn(16, 256, generator=torch.Generator().manual_seed(8)) * 10
    x[3, :64] = 0
    cpu = quantize(x, name)
    gpu = quantize(x.cuda(), name)
    assert torch.equal(gpu.payload.cpu(), cpu.payload)
    assert torch.equal(gpu.scales.cpu().reshape(-1).view(torch.uint8), cpu.scales.reshape(-1).view(torch.uint8))
    _assert_bitwise(gpu.dequantize().cpu(), cpu.dequantize())
    _assert_bitwise(fake_quantize(x.cuda(), name).cpu(), cpu.dequantize())
    assert torch.equal(gpu.to("cpu").dequantize(), cpu.dequantize())
    sr = get_scheme(name, rounding="stochastic")
    a = fake_quantize(x.cuda(), sr, generator=3)
    assert torch.equal(a, fake_quantize(x.cuda(), sr, generator=3))
    assert torch.equal(a, quantize(x.cuda(), sr, generator=3).dequantize())


@pytest.mark.parametrize("name", ["int4_g128", "int4_g128_asym", "nvfp4", "mxfp4", "int8", "fp8_e4m3"])
@pytest.mark.parametrize("clip_search", [False, True])
def test_scales_then_elements_equals_fake_quantize(name, clip_search):
    from hadakit.formats import compute_scales, quantize_with_scales

    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 256, generator=g) ** 3  # heavy tails: clipping matters
    scheme = get_scheme(name, clip_search=True) if clip_search else get_scheme(name)
    codes, values = quantize_with_scales(x, scheme, compute_scales(x, scheme))
    assert torch.equal(values.to(x.dtype), fake_quantize(x, scheme))
    assert torch.equal(codes.reshape(-1), quantize(x, scheme).codes().reshape(-1).to(codes.dtype))
