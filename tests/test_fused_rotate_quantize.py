"""rotate_quantize / dequantize_rotate, and the fused Triton kernel against the unfused path, bit for bit.

Without a GPU the kernel runs under Triton's interpreter (conftest sets TRITON_INTERPRET=1) on CPU tensors, forced
with HADAKIT_BACKEND=triton; the unfused reference then also uses the hadamard primitive's Triton kernel, so both
sides sum the butterflies in the same order. One interpreter quirk: its fp32 -> bf16 cast truncates (a GPU rounds to
nearest even), so for bf16 inputs the reference rotation is computed in fp32 and rounded by torch:
``hadamard_transform(x.float()).to(bf16)``, which is what ``hadamard_transform(x)`` returns on a GPU.
On a CUDA machine the GPU tests compare against ``quantize(hadamard_transform(x), scheme)`` directly.
"""

import math

import numpy as np
import pytest
import torch

from hadakit import hadamard_transform, inverse_hadamard_transform
from hadakit.formats import compute_scales, get_scheme, quantize, quantize_with_scales
from hadakit.formats.fused import _recipe, dequantize_rotate, rotate_quantize, rotated_amax
from hadakit.formats.packing import pack_codes
from hadakit.formats.quantize import GroupScales, _tensor_scale
from hadakit.kernels import triton_rotate_quantize as K
from hadakit.kernels.torch_hadamard import torch_hadamard

HAVE_KERNEL = K.triton_available()
needs_kernel = pytest.mark.skipif(not HAVE_KERNEL, reason="needs Triton (CUDA or TRITON_INTERPRET=1)")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (preset, rotation block) pairs the kernel covers: block == group, block > group, block < group, MX / NV / INT.
COVERED = [
    ("mxfp4", 32), ("mxfp4", 16), ("nvfp4", 16), ("nvfp4", 32), ("int4_g32", 32), ("int4_g128", 128),
    ("int4_g128", 16), ("mxfp8", 32), ("mxfp8_e5m2", 64), ("mxint8", 32), ("nvint4", 16), ("fp4_g16_ue5m3", 16),
]


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def triton_backend(monkeypatch):
    """Force the kernel (HADAKIT_BACKEND=triton); yields a list that records every fused-kernel launch."""
    if not HAVE_KERNEL:
        pytest.skip("needs Triton (CUDA or TRITON_INTERPRET=1)")
    monkeypatch.setenv("HADAKIT_BACKEND", "triton")
    calls = []
    real = K.rotate_quantize

    def spy(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(K, "rotate_quantize", spy)
    return calls


def _raw_scales(qt):
    s = qt.scales
    return s.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[s.element_size()])


def _assert_same(a, b):
    assert a.shape == b.shape and a.scheme == b.scheme
    np.testing.assert_array_equal(a.payload.cpu().numpy(), b.payload.cpu().numpy(), err_msg="payload differs")
    np.testing.assert_array_equal(_raw_scales(a).cpu().numpy(), _raw_scales(b).cpu().numpy(), err_msg="scales differ")
    assert (a.tensor_scale is None) == (b.tensor_scale is None)
    if a.tensor_scale is not None:
        assert a.tensor_scale.view(torch.int32).item() == b.tensor_scale.view(torch.int32).item()


def _reference(x, scheme, block_size=None, signs=None, **kw):
    """quantize(hadamard_transform(x)), with the bf16 rounding done by torch (see the module docstring)."""
    if x.dtype == torch.bfloat16 and not x.is_cuda:
        y = hadamard_transform(x.float(), block_size=block_size, signs=signs).to(x.dtype)
    else:
        y = hadamard_transform(x, block_size=block_size, signs=signs)
    return quantize(y, scheme, **kw)


# ---------------------------------------------------------------------------------------------------------------
# Test data: rotated values chosen to hit the edge cases, mapped back through the (exact) inverse rotation.
# ---------------------------------------------------------------------------------------------------------------


def _edge_rotated(scheme, n=256, rows=8, seed=0) -> torch.Tensor:
    """Rotated-domain values (rows, n) with: ties of the element grid (at scale 1), saturation, values rounding to
    negative zero, an all-zero group, float32 subnormals, huge and tiny groups (scale overflow / underflow), random
    magnitudes. All dyadic with few bits, so that the normalized H_16 (scale 1/4) maps them to exactly
    representable inputs and back."""
    scheme = get_scheme(scheme)
    g = scheme.group_size
    rng = np.random.default_rng(seed)
    two_level = scheme.tensor_scale
    y = (rng.integers(-64, 65, (rows, n)) / 16.0).astype(np.float32)  # multiples of 1/16 in [-4, 4]
    k = rng.integers(-12, 7 if two_level else 12, (rows, n // g)).astype(np.float32)
    y = (y.reshape(rows, n // g, g) * np.exp2(k)[..., None]).reshape(rows, n)
    el = scheme.element
    top = float(el.max)  # the group amax that makes the scale exactly 1 (below: elem_max, or qmax + 1/2)
    if scheme.int_range == "full":
        top += 0.5 * 2.0 ** -el.frac_bits
    if el.kind == "float":
        grid = np.unique([0.0] + [v for v in el.decode_table() if np.isfinite(v) and v > 0])
        ties = ((grid[:-1] + grid[1:]) / 2)[-12:]
    else:
        ties = np.arange(0.5, el.qmax, 1.0) * 2.0 ** -el.frac_bits
    ties = ties[: g - 2]
    # row 0, group 0: amax exactly elem_max (scale 1, and for two-level schemes tensor scale 1 below), grid ties
    y[0, :g] = 0
    y[0, : ties.size] = ties
    y[0, g - 1] = -top
    y[0, g - 2] = -ties[0] / 4  # rounds to zero: negative zero for float elements
    if 2 * g <= n:
        y[0, g: 2 * g] = 0.0  # all-zero group
    if 3 * g <= n:
        y[0, 2 * g: 3 * g] = np.float32(2.0 ** -140) * rng.integers(-3, 4, g)  # fp32 subnormals
    if 4 * g <= n:
        y[0, 3 * g: 4 * g] = np.arange(-g // 2, g // 2) / (g / 2) * 1.25 * top  # beyond elem_max: saturation
    y[1, :g] = -ties.max()
    y[1, 0] = top * 1.125  # amax mantissa above the element's: the MX floor rule clips it
    if two_level:
        y[2, :g] = rng.integers(-64, 65, g) / 16.0
        y[2, 0] = top * 448  # the tensor amax: tensor scale exactly 1
    else:
        y[2, :g] = rng.integers(-64, 65, g) / 16.0 * np.float32(2.0 ** 100)  # huge
    y[3, :g] = rng.integers(-64, 65, g) / 16.0 * np.float32(2.0 ** -100)  # tiny: scales underflow
    return torch.from_numpy(y)


def _edge_input(scheme, block, dtype, n=256, rows=8, seed=0):
    y = _edge_rotated(scheme, n, rows, seed)
    # H_16 (blocks of 16: scale 1/4, exact) maps the dyadic values to exact inputs; other blocks rotate them anyway.
    x = inverse_hadamard_transform(y, block_size=16)
    return x.to(dtype)


def _random_input(dtype, shape=(8, 256), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-6, 6, shape[:-1] + (1,), generator=g).float())
    x[0, 5] = -0.0
    x[1, :32] = 0.0
    return x.to(dtype)


# ---------------------------------------------------------------------------------------------------------------
# The default (CPU) path: transform then quantize, for every preset.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["mxfp4", "nvfp4", "int4_g128", "int4_g128_asym", "mxfp6", "ternary", "int8"])
def test_cpu_path_is_transform_then_quantize(monkeypatch, scheme):
    monkeypatch.setenv("HADAKIT_BACKEND", "torch")
    x = _random_input(torch.float32, (4, 256))
    s = torch.where(torch.rand(256, generator=torch.Generator().manual_seed(1)) < 0.5, -1.0, 1.0)
    for bs in (None, 128):
        _assert_same(rotate_quantize(x, scheme, block_size=bs, signs=s),
                     quantize(hadamard_transform(x, block_size=bs, signs=s), scheme))


def test_stochastic_rounding_uses_generator(monkeypatch):
    monkeypatch.setenv("HADAKIT_BACKEND", "torch")
    x = _random_input(torch.float32, (4, 128))
    s = get_scheme("int4_g32", rounding="stochastic")
    _assert_same(rotate_quantize(x, s, block_size=32, generator=5),
                 quantize(hadamard_transform(x, block_size=32), s, generator=5))


def test_dequantize_rotate_round_trip(monkeypatch):
    monkeypatch.setenv("HADAKIT_BACKEND", "torch")
    x = _random_input(torch.float32, (4, 256))
    s = torch.where(torch.rand(256, generator=torch.Generator().manual_seed(2)) < 0.5, -1.0, 1.0)
    for scheme, bs, err in (("mxfp8", 32, 0.05), ("int4_g128", None, 0.2)):
        qt = rotate_quantize(x, scheme, block_size=bs, signs=s)
        xh = dequantize_rotate(qt, block_size=bs, signs=s)
        assert xh.dtype == torch.float32
        torch.testing.assert_close(xh, inverse_hadamard_transform(qt.dequantize(), block_size=bs, signs=s))
        assert (xh - x).norm() / x.norm() < err
        assert dequantize_rotate(qt, block_size=bs, signs=s, dtype=torch.bfloat16).dtype == torch.bfloat16
        assert dequantize_rotate(qt, block_size=bs, signs=s, dtype=torch.float64).dtype == torch.float64


def test_argument_errors():
    x = torch.randn(4, 96)
    with pytest.raises(ValueError, match="block_size"):
        rotate_quantize(x, "mxfp4", block_size=40)
    with pytest.raises(ValueError, match="group size"):
        rotate_quantize(torch.randn(4, 48), "mxfp4")
    with pytest.raises(ValueError, match="signs"):
        rotate_quantize(x, "mxfp4", signs=torch.ones(95))
    with pytest.raises(ValueError, match="two-level"):
        rotate_quantize(x, "mxfp4", amax=1.0)
    with pytest.raises(TypeError):
        rotate_quantize(x.to(torch.int32), "mxfp4")


# ---------------------------------------------------------------------------------------------------------------
# The kernel (interpreter on CPU, or CUDA): bit-identical to the unfused path.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme,block", COVERED)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_kernel_matches_unfused_random(triton_backend, scheme, block, dtype):
    x = _random_input(dtype)
    _assert_same(rotate_quantize(x, scheme, block_size=block), _reference(x, scheme, block))
    assert len(triton_backend) == 1  # the kernel ran (no silent fallback)


@pytest.mark.parametrize("scheme,block", COVERED)
def test_kernel_matches_unfused_edge_cases(triton_backend, scheme, block):
    for dtype in (torch.float32, torch.bfloat16):
        x = _edge_input(scheme, block, dtype)
        _assert_same(rotate_quantize(x, scheme, block_size=block), _reference(x, scheme, block))
    assert len(triton_backend) == 2


@pytest.mark.parametrize("scheme", ["mxfp4", "int4_g32", "nvfp4", "mxfp8", "nvint4"])
def test_kernel_edge_cases_hit_the_grid(triton_backend, scheme):
    """With blocks of 16 the rotated values are exactly the designed ones: ties, saturation, -0 are really tested."""
    y = _edge_rotated(scheme)
    x = inverse_hadamard_transform(y, block_size=16)
    assert torch.equal(hadamard_transform(x, block_size=16), y)  # exact round trip
    qt = rotate_quantize(x, scheme, block_size=16)
    _assert_same(qt, quantize(y, scheme))
    assert len(triton_backend) == 1
    s0 = float(qt.scale_values().reshape(-1)[0]) * (float(qt.tensor_scale) if qt.tensor_scale is not None else 1.0)
    assert s0 == 1.0  # group 0 at scale 1: its grid ties are exact ties
    codes = qt.codes()
    if qt.scheme.element.kind == "float" or qt.scheme.int_range == "full":
        assert bool((codes == 1 << (qt.scheme.element.bits - 1)).any())  # negative zero / the extra code -2^(b-1)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_kernel_signs_full_rows_and_leading_dims(triton_backend, dtype):
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(3, 5, 256, generator=g) * 4).to(dtype)
    s = torch.where(torch.rand(256, generator=g) < 0.5, -1.0, 1.0)
    for scheme, bs in (("mxfp4", 32), ("nvfp4", 64), ("int4_g128", None), ("int4_g32", 256)):
        _assert_same(rotate_quantize(x, scheme, block_size=bs, signs=s), _reference(x, scheme, bs, s))


def test_kernel_tiles_masks_and_periodic_signs(triton_backend):
    """Several programs and a partial last one (small tiles), signs indexed modulo the row (N > segment), and the
    kernel's own rotated values equal to the transform's, bit for bit."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(37, 192, generator=g)
    s = torch.where(torch.rand(192, generator=g) < 0.5, -1.0, 1.0)
    for scheme, block in (("int4_g32", 64), ("mxfp4", 16)):
        sch = get_scheme(scheme)
        pay, sc, bad, rot = K.rotate_quantize(x, _recipe(sch), block, sch.group_size, s, 1 / math.sqrt(block), None,
                                              store_rotated=True, tile=512, num_warps=2)
        ref = _reference(x, sch, block, s)
        assert int(bad.sum()) == 0
        assert torch.equal(pay, ref.payload)
        assert torch.equal(sc, _raw_scales(ref).reshape(-1))
        assert torch.equal(rot, hadamard_transform(x, block_size=block, signs=s))


@pytest.mark.parametrize("scheme,block", [("mxfp4", 32), ("int4_g128", 128), ("nvfp4", 16), ("nvint4", 32)])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_kernel_own_rotation_contract(triton_backend, scheme, block, dtype):
    """Independent of the transform kernel: the fused kernel's rotated values are the transform to fp32 rounding
    (portable torch backend as the judge), and its codes / scales are quantize() of exactly those values."""
    sch = get_scheme(scheme)
    x = _random_input(dtype, seed=7)
    st = None
    if sch.tensor_scale:
        partials, _ = K.rotated_amax(x, block, sch.group_size, None, 1 / math.sqrt(block))
        st = _tensor_scale(partials, sch)
    pay, sc, bad, rot = K.rotate_quantize(x, _recipe(sch), block, sch.group_size, None, 1 / math.sqrt(block), st,
                                          store_rotated=True)
    portable = torch_hadamard(x.float(), None, None, block, 1 / math.sqrt(block), False)
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(rot, portable, rtol=tol, atol=tol * float(portable.abs().max()))
    assert torch.equal(rot, rot.to(dtype).float())  # rounded to the input dtype
    ref = quantize(rot, sch)
    assert torch.equal(pay, ref.payload)
    assert torch.equal(sc, _raw_scales(ref).reshape(-1))
    if st is not None:
        assert torch.equal(st, ref.tensor_scale)


@pytest.mark.parametrize("scheme", ["int4_g32", "int4_g128", "nvfp4", "nvint4", "fp4_g16_ue5m3"])
def test_kernel_cuda_division_mode(triton_backend, scheme):
    """RECIP_DIV (what the kernel does for CUDA tensors): amax / elem_max as PyTorch CUDA computes it, a multiply by
    the fp32 reciprocal. Checked under the interpreter against the formats layer fed with that one change."""
    sch = get_scheme(scheme)
    el, sf = sch.element, sch.scale_format
    div = _recipe(sch).amax_div  # el.max, or qmax + 1/2 for full-range INT
    x = _random_input(torch.float32, seed=11)
    y = hadamard_transform(x, block_size=16)
    R, G, gsz = sch.layout(y.shape)[0]
    yg = y.reshape(R, G, gsz)
    st = _tensor_scale(yg.abs(), sch) if sch.tensor_scale else None
    raw = yg.abs().amax(-1) * np.float32(1.0 / div)
    if st is not None:
        raw = raw / st
    _, sc = sf.cast(raw)
    s_eff = sf.decode(sc, torch.float32) * (st if st is not None else 1.0)
    codes, _ = quantize_with_scales(y, sch, GroupScales(sc, s_eff, None, st))
    pay, sck, bad, _ = K.rotate_quantize(x, _recipe(sch), 16, sch.group_size, None, 0.25, st, recip_div=True)
    assert torch.equal(pay, pack_codes(codes, el.bits))
    assert torch.equal(sck.to(torch.int64) & ((1 << (8 * sck.element_size())) - 1), sc.reshape(-1))
    # and the reciprocal really differs from the division somewhere in this data (else the test proves nothing)
    assert bool((yg.abs().amax(-1) / div != yg.abs().amax(-1) * np.float32(1.0 / div)).any())


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_kernel_nvfp4_given_amax(triton_backend, dtype):
    sch = get_scheme("nvfp4")
    x = _random_input(dtype, seed=5)
    for amax in (None, 0.3):  # 0.3: far below the true amax -> block scales and elements saturate
        true = rotated_amax(x, block_size=16)
        a = true if amax is None else torch.tensor(amax)
        qt = rotate_quantize(x, sch, block_size=16, amax=a)
        if dtype == torch.bfloat16:
            y = hadamard_transform(x.float(), block_size=16).to(dtype)
        else:
            y = hadamard_transform(x, block_size=16)
        st = _tensor_scale(a.reshape(1).float(), sch)
        gs = compute_scales(y, sch, tensor_scale=st)
        codes, _ = quantize_with_scales(y, sch, gs)
        assert torch.equal(qt.payload, pack_codes(codes, 4))
        assert torch.equal(qt.scales.view(torch.uint8).reshape(-1), gs.scale_codes.to(torch.uint8).reshape(-1))
        if amax is None:  # the true amax reproduces the two-pass default
            _assert_same(qt, rotate_quantize(x, sch, block_size=16))
        else:
            assert bool((qt.scales.view(torch.uint8) == 0x7E).any())  # saturated at 448


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_rotated_amax(triton_backend, dtype):
    x = _random_input(dtype, seed=9)
    for bs in (16, 128, None):
        ref = (hadamard_transform(x.float(), block_size=bs).to(dtype) if dtype == torch.bfloat16
               else hadamard_transform(x, block_size=bs)).abs().amax().float()
        assert torch.equal(rotated_amax(x, block_size=bs), ref)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy (the interpreter) warns about the NaN / Inf it computes
def test_kernel_nonfinite_policy(triton_backend):
    x = _random_input(torch.float32, (4, 128))
    x[1, 7] = float("nan")
    x[2, 70] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        rotate_quantize(x, "mxfp4", block_size=32)
    for scheme in ("mxfp4", "nvfp4", "int4_g32"):
        _assert_same(rotate_quantize(x, scheme, block_size=32, allow_nonfinite=True),
                     _reference(x, scheme, 32, allow_nonfinite=True))
    # finite fp16 input whose rotation overflows fp16: caught after the rounding, like the unfused path
    h = torch.zeros(2, 32, dtype=torch.float16)
    h[0, :8] = 60000.0
    with pytest.raises(ValueError, match="non-finite"):
        rotate_quantize(h, "mxfp4", block_size=32)
    with pytest.raises(ValueError, match="non-finite"):
        _reference(h, "mxfp4", 32)


@pytest.mark.parametrize("scheme,n,block", [("int4_g128_asym", 256, 128), ("mxfp6", 256, 32), ("ternary", 64, 64),
                                            ("int4", 64, 64), ("mxfp4", 96, 12), ("int2_g64", 128, 64)])
def test_uncovered_schemes_fall_back(triton_backend, scheme, n, block):
    x = _random_input(torch.float32, (4, n))
    _assert_same(rotate_quantize(x, scheme, block_size=block), _reference(x, scheme, block))
    assert not triton_backend


def test_recipe_coverage():
    from hadakit.formats.fused import _recipe

    for name in ("mxfp4", "mxfp8", "mxfp8_e5m2", "mxint8", "nvfp4", "nvint4", "fp4_g16_ue5m3", "int4_g32",
                 "int4_g128"):
        assert _recipe(get_scheme(name)) is not None, name
    for name in ("int4_g128_asym", "mxfp6", "mxfp6_e3m2", "int3_g128", "int2_g64", "ternary", "binary", "int8",
                 "fp8_e4m3"):
        assert _recipe(get_scheme(name)) is None, name
    assert _recipe(get_scheme("int4_g32", scale_format="bf16")) is None
    assert _recipe(get_scheme("int4_g32", rounding="stochastic")) is None
    assert _recipe(get_scheme("mxfp4", scale_rule="ceil")) is not None
    assert _recipe(get_scheme("int4_g32", scale_format="fp32")) is not None
    full, restricted = _recipe(get_scheme("int4_g32")), _recipe(get_scheme("int4_g32", int_range="restricted"))
    assert (full.el_qmin, full.amax_div) == (-8, 7.5) and (restricted.el_qmin, restricted.amax_div) == (-7, 7.0)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # 1 / (subnormal fp32 scale) overflows: the div_rn path
@pytest.mark.parametrize("scheme,override", [("mxfp4", dict(scale_rule="ceil")), ("mxfp8", dict(scale_rule="ceil")),
                                             ("int4_g32", dict(scale_format="fp32")),
                                             ("int4_g32", dict(clip_ratio=0.9)), ("mxfp4", dict(clip_ratio=0.8)),
                                             ("int8", dict(granularity="group", group_size=64)),
                                             ("int4_g32", dict(int_range="restricted")),
                                             ("int4_g128", dict(scale_format="ue4m3"))])
def test_kernel_scheme_variants(triton_backend, scheme, override):
    sch = get_scheme(scheme, **override)
    y = _edge_rotated(sch, seed=1)
    x = inverse_hadamard_transform(y, block_size=16)
    _assert_same(rotate_quantize(x, sch, block_size=16), quantize(y, sch))  # exactly the designed edge values
    for dtype in (torch.float32, torch.bfloat16):
        x = _random_input(dtype, seed=2)
        _assert_same(rotate_quantize(x, sch, block_size=32), _reference(x, sch, 32))
    assert len(triton_backend) == 3


def test_kernel_extreme_exponents(triton_backend):
    """Block amax >= 2^127 with MXINT8 (emax 0): shared exponent 127, elements divided by 2^127 (the kernel
    multiplies by the subnormal 2^-127); and blocks of fp32 subnormals (exponent -127) for MXFP4."""
    x = torch.zeros(2, 64)
    x[0, :2] = 1.21e38  # rotated by H_2: 1.71e38 >= 2^127
    x[0, 2:32] = torch.linspace(-3e30, 3e30, 30)
    x[0, 32:34] = torch.tensor([1.0e-30, -2.0e-38])
    x[1, :32] = torch.arange(-16, 16) * 2.0 ** -140
    for scheme in ("mxint8", "mxfp4", "mxfp8"):
        _assert_same(rotate_quantize(x, scheme, block_size=2), _reference(x, scheme, 2))
    assert quantize(hadamard_transform(x, block_size=2), "mxint8").scales.view(torch.uint8)[0, 0] == 254


def test_module_docstring_example():
    import doctest

    import hadakit.formats.fused as fused

    result = doctest.testmod(fused, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_markstein_division_is_correctly_rounded():
    """The kernel's per-element division: q = y·RN(1/s), then two corrections q += RN(y - q·s)·r with exact FMA
    remainders, equals IEEE y / s (numpy float32 division) on scale-like divisors: fp16 and E4M3 x fp32 scales,
    exact ties y = (k + 1/2)·s, bf16-rounded dividends. (Exact FMA emulated in 80-bit long double; the product of
    two floats is exact there and the sums here are within its 64 bits.)"""
    rng = np.random.default_rng(0)
    ld = np.longdouble

    def fma(a, b, c):
        return (a.astype(ld) * b.astype(ld) + c.astype(ld)).astype(np.float32)

    n = 200_000
    amax = np.exp2(rng.uniform(-20, 18, n)).astype(np.float32)
    fp16 = (amax / np.float32(7)).astype(np.float16).astype(np.float32)
    e4m3 = (np.exp2(rng.integers(-9, 9, n)) * (1 + rng.integers(0, 8, n) / 8)).astype(np.float32) * np.float32(0.37)
    for s in (fp16, e4m3):
        for y in ((rng.uniform(-1, 1, n) * amax).astype(np.float32),
                  ((rng.uniform(-1, 1, n) * amax).astype(np.float32).view(np.uint32) & 0xFFFF0000).view(np.float32),
                  (s * (rng.integers(-8, 8, n) + np.float32(0.5))).astype(np.float32)):
            r = np.float32(1) / s
            q = y * r
            q = fma(fma(q, -s, y), r, q)
            q = fma(fma(q, -s, y), r, q)
            np.testing.assert_array_equal(q.view(np.uint32), (y / s).view(np.uint32))


# ---------------------------------------------------------------------------------------------------------------
# On a GPU: the real contract, fused vs quantize(hadamard_transform(x)) on CUDA.
# ---------------------------------------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("scheme,block", COVERED + [("mxfp4", None), ("int4_g128", 4096), ("nvfp4", 256)])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_cuda_bit_identical(monkeypatch, scheme, block, dtype):
    monkeypatch.delenv("HADAKIT_BACKEND", raising=False)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(96, 4096, generator=g, device="cuda") * 3).to(dtype)
    s = torch.where(torch.rand(4096, generator=g, device="cuda") < 0.5, -1.0, 1.0)
    for signs in (None, s):
        _assert_same(rotate_quantize(x, scheme, block_size=block, signs=signs),
                     quantize(hadamard_transform(x, block_size=block, signs=signs), scheme))
    if dtype != torch.float16 and block is not None and block <= 256:  # (the edge data overflows fp16)
        e = _edge_input(scheme, block, dtype).cuda()
        _assert_same(rotate_quantize(e, scheme, block_size=block),
                     quantize(hadamard_transform(e, block_size=block), scheme))


@needs_cuda
def test_cuda_nvfp4_amax_pass_and_given_amax(monkeypatch):
    monkeypatch.delenv("HADAKIT_BACKEND", raising=False)
    x = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16)
    a = rotated_amax(x, block_size=16)
    assert torch.equal(a, hadamard_transform(x, block_size=16).abs().amax().float())
    _assert_same(rotate_quantize(x, "nvfp4", block_size=16, amax=a), rotate_quantize(x, "nvfp4", block_size=16))
