"""E8P12 codebook, 1-bit E8 stage, RVQ and packing (hadakit.formats.lattice)."""

import math

import pytest
import torch

from hadakit.formats.lattice import (
    GAUSSIAN_SCALES,
    E8OneBitCodebook,
    E8P12Codebook,
    RVQCodebook,
    bits_per_weight,
    e8p_abs_points,
    pack_e8p_codes,
    unpack_e8p_codes,
)


@pytest.fixture(scope="module")
def cb():
    return E8P12Codebook()


@pytest.fixture(scope="module")
def gauss():
    return torch.randn(40_000, 8, generator=torch.Generator().manual_seed(1))


def _in_e8_times4(q: torch.Tensor) -> torch.Tensor:
    """q = 4·v (integers): v ∈ E8 iff all v_i ∈ Z or all in Z+½ (q_i all ≡ 0 or all ≡ 2 mod 4) and Σv even."""
    all_int = (q % 4 == 0).all(-1)
    all_half = (q % 4 == 2).all(-1)
    return (all_int | all_half) & (q.sum(-1) % 8 == 0)


def test_abs_points_counts():
    a = e8p_abs_points(torch.float64)
    n2 = (a ** 2).sum(-1)
    assert a.shape == (256, 8) and torch.unique(a, dim=0).shape[0] == 256
    assert int((n2 <= 10).sum()) == 227 and int((n2 == 12).sum()) == 29
    assert ((2 * a) % 2 == 1).all()                                   # positive half-integers


def test_codebook_distinct_and_in_shifted_e8(cb):
    P = cb.points(torch.float64)
    assert P.shape == (65536, 8)
    assert torch.unique(P, dim=0).shape[0] == 65536
    q = 4 * P - 1                                                      # 4(p − ¼·1)
    assert torch.equal(q, q.round())
    assert _in_e8_times4(q.long()).all()
    # negative control: the unshifted points are not in E8, and the membership test rejects a broken point
    assert not _in_e8_times4((4 * P).long()).any()
    bad = q.long().clone()
    bad[0, 0] += 4                                                     # changes Σv by 1 → odd
    assert not _in_e8_times4(bad[:1]).any()


def test_decode_methods_agree(cb):
    c = torch.arange(65536, dtype=torch.int32)
    ref = cb.decode(c, method="abs")
    assert torch.equal(ref, cb.decode(c))
    assert torch.equal(ref, cb.decode(c, method="full"))
    assert torch.equal(ref, cb.decode(pack_e8p_codes(c), method="numba"))
    p = pack_e8p_codes(c)
    assert torch.equal(cb.decode_numba(p), ref)
    assert torch.equal(cb.decode_numba(p, 0.25), 0.25 * ref)
    assert torch.allclose(cb.decode_numba(p, 0.0123), 0.0123 * ref, rtol=1e-6, atol=1e-9)
    buf = torch.empty(256, 256, 8)
    assert cb.decode_numba(p.view(256, 256), out=buf) is buf and torch.equal(buf.view(-1, 8), ref)
    with pytest.raises(TypeError, match="int16"):
        cb.decode_numba(c)
    with pytest.raises(ValueError, match="out must be"):
        cb.decode_numba(p, out=torch.empty(3, 8))


@pytest.mark.parametrize("scale", [0.3, 1.0, 2.5])
def test_fast_search_equals_bruteforce(cb, scale):
    x = scale * torch.randn(1500, 8, generator=torch.Generator().manual_seed(int(scale * 10)), dtype=torch.float64)
    assert torch.equal(cb.quantize(x), cb.nearest_bruteforce(x))


def test_ties_are_nearest_and_deterministic(cb):
    P = cb.points(torch.float64)
    g = torch.Generator().manual_seed(3)
    i = torch.randint(0, 65536, (300,), generator=g)
    j = torch.randint(0, 65536, (300,), generator=g)
    x = torch.cat([
        torch.zeros(1, 8, dtype=torch.float64),
        torch.full((1, 8), 0.25, dtype=torch.float64),
        (P[i] + P[j]) / 2,                                             # midpoints: often equidistant
        P[i],                                                          # exact codewords
        torch.round(4 * torch.randn(300, 8, generator=g, dtype=torch.float64)) / 4,   # ¼-grid: many ties
    ])
    fast = cb.quantize(x)
    d_fast = ((x - P[fast.long()]) ** 2).sum(-1)
    bf = cb.nearest_bruteforce(x)
    d_bf = ((x - P[bf.long()]) ** 2).sum(-1)
    assert torch.allclose(d_fast, d_bf, rtol=0, atol=1e-12)
    assert torch.equal(fast[302:602], i.int())                         # a codeword maps to itself
    assert torch.equal(fast, cb.quantize(x, chunk_size=7))             # independent of batching
    assert torch.equal(fast[5:], cb.quantize(x[5:]))
    assert torch.equal(fast, cb.quantize(x))


def _lloyd_max_4(x: torch.Tensor, iters: int = 60) -> float:
    v = x.reshape(-1).double()
    c = torch.tensor([-1.5, -0.5, 0.5, 1.5], dtype=torch.float64)
    for _ in range(iters):
        idx = (v[:, None] - c[None]).abs().argmin(1)
        c = torch.stack([v[idx == k].mean() for k in range(4)])
    idx = (v[:, None] - c[None]).abs().argmin(1)
    return float(((v - c[idx]) ** 2).mean())


def _e8p_mse(cb, x, s):
    return float(((x - s * cb.decode(cb.quantize(x / s))) ** 2).mean())


def test_gaussian_mse_between_bound_and_scalar(cb, gauss):
    mses = {s: _e8p_mse(cb, gauss, s) for s in (0.91, 0.94, GAUSSIAN_SCALES[2][0], 1.00, 1.03)}
    best = min(mses.values())
    lm = _lloyd_max_4(gauss)
    assert abs(lm - 0.1175) < 0.003                                   # the negative control is the known quantizer
    assert 0.0625 < best < lm
    assert best < 0.095                                                # E8P's ~0.091, clearly below scalar
    assert mses[GAUSSIAN_SCALES[2][0]] <= best * 1.003                 # the stored scale is (near) optimal


def test_one_bit_codebook_in_e8():
    P = E8OneBitCodebook().points(torch.float64)
    assert P.shape == (256, 8) and torch.unique(P, dim=0).shape[0] == 256
    assert _in_e8_times4((4 * P).long()).all()
    n2 = (P ** 2).sum(-1)
    assert int((n2 == 2).sum()) == 240 and int((n2 == 4).sum()) == 16


def test_rvq_mse_decreases_with_bits(gauss):
    x = gauss[:20_000]
    mse = {}
    for b in (2, 3, 4):
        rvq = RVQCodebook(b)
        codes = rvq.quantize(x)
        assert len(codes) == (1 if b == 2 else 2)
        mse[b] = float(((x - rvq.decode(codes)) ** 2).mean())
    assert mse[2] > mse[3] > mse[4]
    assert mse[3] < 0.0345 and mse[4] < 0.0095                        # below Lloyd-Max 8 / 16 levels
    assert mse[3] > 2 ** -6 and mse[4] > 2 ** -8                      # above the rate–distortion bound


def test_pack_unpack_bit_exact(cb):
    c = torch.arange(65536, dtype=torch.int32).reshape(256, 256)
    p = pack_e8p_codes(c)
    assert p.dtype == torch.int16 and p.shape == c.shape
    assert torch.equal(unpack_e8p_codes(p), c)
    assert torch.equal(cb.decode(p), cb.decode(c))                    # int16 codes decode as their uint16 pattern
    x = torch.randn(64, 8, dtype=torch.float64)
    assert torch.equal(unpack_e8p_codes(pack_e8p_codes(cb.quantize(x))), cb.quantize(x))


def test_bits_per_weight():
    assert bits_per_weight((2048, 640), 2) == (2048 * 640 * 2 + 32 + 2048 + 640) / (2048 * 640)
    assert bits_per_weight((64, 64), 3, sign_bits=False) == 3 + 64 / 4096
    assert math.isclose(bits_per_weight((64, 64), 4), 4 + (64 + 128) / 4096)


def test_bad_input(cb):
    with pytest.raises(ValueError, match="last dimension must be 8"):
        cb.quantize(torch.randn(4, 7))
    with pytest.raises(TypeError, match="floating"):
        cb.quantize(torch.ones(4, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="NaN"):
        cb.quantize(torch.full((1, 8), float("nan")))
    with pytest.raises(ValueError, match=r"\[0, 65536\)"):
        cb.decode(torch.tensor([65536]))
    with pytest.raises(ValueError, match="'abs', 'full' or 'numba'"):
        cb.decode(torch.tensor([1]), method="fast")
    with pytest.raises(TypeError, match="int16"):
        unpack_e8p_codes(torch.tensor([1], dtype=torch.int32))
    with pytest.raises(ValueError, match="bits must be 2, 3 or 4"):
        RVQCodebook(5)
    with pytest.raises(ValueError, match="stage scales"):
        RVQCodebook(4).quantize(torch.randn(2, 8), (1.0,))
    with pytest.raises(ValueError, match="multiple of 8"):
        bits_per_weight((4, 12), 2)


def test_docstring_examples():
    import doctest
    import importlib

    mod = importlib.import_module("hadakit.formats.lattice")
    res = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert res.attempted > 0 and res.failed == 0


# ---------------------------------------------------------------------- compiled nearest search
def _tie_inputs(cb, seed: int) -> torch.Tensor:
    P = cb.points(torch.float64)
    g = torch.Generator().manual_seed(seed)
    i = torch.randint(0, 65536, (400,), generator=g)
    j = torch.randint(0, 65536, (400,), generator=g)
    return torch.cat([
        torch.zeros(1, 8, dtype=torch.float64),
        torch.full((2, 8), 0.25, dtype=torch.float64) * torch.tensor([[1.0], [-1.0]], dtype=torch.float64),
        (P[i] + P[j]) / 2,                                             # midpoints: exact float ties
        P[i],                                                          # codewords
        torch.round(8 * torch.randn(400, 8, generator=g, dtype=torch.float64)) / 8,   # ⅛-grid: many ties
    ])


@pytest.mark.parametrize("scale", [0.3, 1.0, 2.5])
def test_numba_search_equals_torch_reference_and_bruteforce(cb, scale):
    g = torch.Generator().manual_seed(100 + int(10 * scale))
    x = scale * torch.randn(2000, 8, generator=g, dtype=torch.float64)
    fast = cb.quantize(x, method="numba")
    assert fast.dtype == torch.int32 and fast.shape == (2000,)
    assert torch.equal(fast, cb.quantize(x, method="torch"))
    assert torch.equal(fast, cb.nearest_bruteforce(x))
    # negative control: a codebook search with the wrong shift sign does not match
    assert not torch.equal(cb.quantize(x + 0.5, method="numba"), fast)


def test_numba_search_ties_resolve_like_the_reference(cb):
    """Dyadic inputs make every distance exact in float64, so ties are real ties: the compiled scan must break
    them exactly as the torch reference (lowest shift, lowest abs index, lowest coordinate for the parity fix)."""
    x = _tie_inputs(cb, 5)
    fast, ref = cb.quantize(x, method="numba"), cb.quantize(x, method="torch")
    assert torch.equal(fast, ref)
    P = cb.points(torch.float64)
    d_fast = ((x - P[fast.long()]) ** 2).sum(-1)
    d_bf = ((x - P[cb.nearest_bruteforce(x).long()]) ** 2).sum(-1)
    assert torch.equal(d_fast, d_bf)                                   # always a nearest point
    words = slice(403, 803)                                            # the P[i] rows of _tie_inputs
    assert torch.equal(P[fast[words].long()], x[words])                # codewords map to themselves


def test_numba_parallel_kernel_equals_serial(cb):
    from hadakit.formats import lattice

    n = lattice.PARALLEL_MIN_VECTORS + 37
    x = torch.randn(n, 8, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    par = cb.quantize(x, method="numba")                                # one call: the parallel kernel
    ser = torch.cat([cb.quantize(x[i:i + 4000], method="numba") for i in range(0, n, 4000)])   # serial calls
    assert torch.equal(par, ser)
    assert torch.equal(par[:3000], cb.quantize(x[:3000], method="torch"))


def test_numba_search_float32_and_shapes(cb):
    x = torch.randn(3, 50, 8, generator=torch.Generator().manual_seed(2))
    c = cb.quantize(x)                                                  # auto: numba on CPU
    assert c.shape == (3, 50)
    P = cb.points(torch.float64)
    x64 = x.double().reshape(-1, 8)
    d = ((x64 - P[c.reshape(-1).long()]) ** 2).sum(-1)
    d_bf = ((x64 - P[cb.nearest_bruteforce(x64).long()]) ** 2).sum(-1)
    assert torch.allclose(d, d_bf, rtol=0, atol=1e-12)                  # nearest (float64 arithmetic inside)
    assert cb.quantize(torch.empty(0, 8), method="numba").shape == (0,)
    with pytest.raises(ValueError, match="method"):
        cb.quantize(x, method="fast")
    with pytest.raises(ValueError, match="NaN"):
        cb.quantize(torch.full((2, 8), float("nan")), method="numba")
