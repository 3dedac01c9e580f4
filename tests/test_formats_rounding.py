"""Rounding: exact power-of-two helpers, ties-to-even, unbiased and reproducible stochastic rounding."""

import math

import numpy as np
import pytest
import torch

from hadakit.formats import fake_quantize, get_format, get_scheme, quantize
from hadakit.formats.rounding import floor_log2, pow2, resolve_generator, round_integer, uniform_noise


pytestmark = pytest.mark.usefixtures("single_thread")


def test_pow2_exact_over_the_float32_range():
    k = torch.arange(-149, 128)
    v = pow2(k, torch.float32)
    assert [float(a) for a in v] == [math.ldexp(1.0, int(i)) for i in k]
    k64 = torch.arange(-1074, 1024, 7)
    v64 = pow2(k64, torch.float64)
    assert [float(a) for a in v64] == [math.ldexp(1.0, int(i)) for i in k64]


def test_floor_log2_exact_including_subnormals():
    rng = np.random.default_rng(0)
    bits = rng.integers(1, 0x7F800000, 50_000, dtype=np.uint32)  # every positive finite float32, subnormals too
    x = bits.view(np.float32)
    got = floor_log2(torch.from_numpy(x.copy())).numpy()
    ref = np.array([math.frexp(float(a))[1] - 1 for a in x])
    np.testing.assert_array_equal(got, ref)


def test_round_integer_ties_to_even():
    t = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 2.4999998, 2.5000002])
    assert round_integer(t, "nearest").tolist() == [0.0, 2.0, 2.0, -0.0, -2.0, -2.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="unknown rounding"):
        round_integer(t, "up")


def test_int_quantize_ties_to_even():
    # amax 127 -> int8 per-tensor scale exactly 1.0, so x / s hits the ties exactly
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, 126.5, -126.5]])
    y = fake_quantize(x, get_scheme("int8").replace(granularity="per_tensor", int_range="restricted"))
    assert y.tolist() == [[127.0, 0.0, 2.0, 2.0, 0.0, -2.0, 126.0, -126.0]]


def _bernoulli_bound(x, lo, hi, n, sigmas=6.0):
    """Tolerance for the mean of n stochastic roundings of x onto {lo, hi}: sigmas · sqrt((x-lo)(hi-x) / n)."""
    return sigmas * np.sqrt(np.maximum((x - lo) * (hi - x), 0.0) / n) + 1e-12


@pytest.mark.parametrize("name", ["e2m1", "e4m3", "e3m2"])
def test_float_stochastic_rounding_is_unbiased(name):
    fmt = get_format(name)
    table = np.array(fmt.decode_table(), dtype=np.float64)
    grid = np.unique(table[np.isfinite(table)])
    rng = np.random.default_rng(1)
    # fixed values strictly inside the range (both neighbours representable), including subnormal ones
    x = np.sort(rng.uniform(-fmt.max, fmt.max, 24)).astype(np.float32)
    x = np.concatenate([x, np.float32([fmt.min_subnormal * 0.3, -fmt.min_subnormal * 0.7, 0.0])])
    n = 20_000
    xt = torch.from_numpy(x).repeat(n, 1)
    g = torch.Generator().manual_seed(123)
    v = fmt.round(xt, "stochastic", uniform_noise(xt.shape, "cpu", g))
    vv = v.numpy().astype(np.float64)
    # every result is one of the two neighbours
    idx = np.searchsorted(grid, x.astype(np.float64), side="right")
    lo, hi = grid[np.maximum(idx - 1, 0)], grid[np.minimum(idx, len(grid) - 1)]
    assert np.all((vv == lo) | (vv == hi))
    mean = vv.mean(axis=0)
    assert np.all(np.abs(mean - x) <= _bernoulli_bound(x.astype(np.float64), lo, hi, n))


def test_int_stochastic_rounding_is_unbiased_through_quantize():
    # per-row int4 with an fp32 scale: every row has the same amax (7.0) so the scale is exactly 1.0
    vals = torch.tensor([7.0, 0.3, -2.7, 5.5, -6.9, 0.01, -0.49, 3.999])
    n = 20_000
    x = vals.repeat(n, 1)
    s = get_scheme("int4_restricted", rounding="stochastic")
    y = fake_quantize(x, s, generator=7)
    assert set(torch.unique(y).tolist()) <= set(float(i) for i in range(-7, 8))
    mean = y.double().mean(0).numpy()
    v = vals.double().numpy()
    lo, hi = np.floor(v), np.ceil(v)
    assert np.all(np.abs(mean - v) <= _bernoulli_bound(v, lo, hi, n))
    # nearest rounding of the same data is biased for 0.3, 3.999, ... : the test above is not vacuous
    y_n = fake_quantize(x, get_scheme("int4_restricted")).double().mean(0).numpy()
    assert np.abs(y_n - v).max() > 0.2


def test_ternary_and_binary_stochastic_rounding_unbiased():
    n = 20_000
    # absmean = (0.1 + 0.3 + 0.2 + 3.0) / 4 = 0.9: the first three values lie inside [-0.9, 0.9]
    vals = torch.tensor([0.1, -0.3, 0.2, 3.0])
    x = vals.repeat(n, 1)
    for name, levels in [("ternary", [-1, 0, 1]), ("binary", [-1, 1])]:
        y = fake_quantize(x, get_scheme(name, rounding="stochastic"), generator=3).double()
        s = 0.9
        assert set((torch.unique(y) / s).round().tolist()) <= set(float(lv) for lv in levels)
        mean = y.mean(0).numpy()[:3]
        v = vals.double().numpy()[:3]
        lo = np.where(name == "binary", -s, np.where(v < 0, -s, 0.0))
        hi = np.where(name == "binary", s, np.where(v < 0, 0.0, s))
        assert np.all(np.abs(mean - v) <= _bernoulli_bound(v, lo, hi, n)), name


@pytest.mark.parametrize("name", ["mxfp4", "nvfp4", "int4_g32", "fp8_e4m3", "ternary", "int4_g128_asym"])
def test_stochastic_rounding_reproducible(name):
    x = torch.randn(8, 128, generator=torch.Generator().manual_seed(0))
    s = get_scheme(name, rounding="stochastic")
    a = fake_quantize(x, s, generator=11)
    b = fake_quantize(x, s, generator=11)
    c = fake_quantize(x, s, generator=12)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # a Generator in the same state gives the same draw; quantize() consumes the same noise as fake_quantize()
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    q = quantize(x, s, generator=g1).dequantize()
    f = fake_quantize(x, s, generator=g2)
    assert torch.equal(q.view(torch.int32), f.view(torch.int32))
    # the generator advances: a second call differs
    assert not torch.equal(fake_quantize(x, s, generator=g1), f)


def test_nearest_ignores_generator():
    x = torch.randn(4, 64)
    assert torch.equal(fake_quantize(x, "mxfp4", generator=1), fake_quantize(x, "mxfp4"))


def test_resolve_generator():
    assert resolve_generator(None, torch.device("cpu")) is None
    g = torch.Generator()
    assert resolve_generator(g, torch.device("cpu")) is g
    assert isinstance(resolve_generator(3, torch.device("cpu")), torch.Generator)
    with pytest.raises(TypeError, match="int seed"):
        resolve_generator(1.5, torch.device("cpu"))


@pytest.mark.parametrize("name", ["e4m3", "e5m2", "e2m3", "e3m2", "e2m1"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_round_finite_equals_round(name, rounding):
    fmt = get_format(name)
    assert fmt.fast_round_ok(torch.float32)
    table = torch.tensor(fmt.decode_table(), dtype=torch.float32)
    table = table[torch.isfinite(table)]
    mids = (table[1:] + table[:-1]) / 2  # exact ties between neighbours
    g = torch.Generator().manual_seed(3)
    rand = torch.randn(20_000, generator=g) * fmt.max / 3
    x = torch.cat([table, mids, -mids, rand, rand * 1e-3, torch.tensor([0.0, -0.0, fmt.max * 4, -fmt.max * 9])])
    noise = torch.rand(x.shape, generator=g) if rounding == "stochastic" else None
    slow = fmt.round(x.clone(), rounding, noise, saturate=True)
    fast = fmt.round_finite(x.clone(), rounding, noise)
    assert torch.equal(fast.view(torch.int32), slow.view(torch.int32))  # bit for bit, signed zeros included
