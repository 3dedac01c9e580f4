"""The numba CPU kernel (kernels/cpu_fwht.py) against the portable torch backend (kernels/torch_hadamard.py)."""

from __future__ import annotations

import gc
import os

import pytest
import torch

pytest.importorskip("numba")

from hadakit.kernels import cpu_fwht as cf  # noqa: E402
from hadakit.kernels.torch_hadamard import torch_hadamard  # noqa: E402

pytestmark = pytest.mark.skipif(not cf.numba_available(), reason="numba is not usable here")


def _signs(n: int, gen: torch.Generator) -> torch.Tensor:
    return (torch.randint(0, 2, (n,), generator=gen) * 2 - 1).to(torch.float32)


def _check(x, base, signs, block, scale, transpose, rtol=None):
    """cpu_fwht equals torch_hadamard to float rounding, relative to each row's norm."""
    y = cf.cpu_fwht(x, base, signs, block, scale, transpose)
    ref = torch_hadamard(x, base, signs, block, scale, transpose)
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    assert y.is_contiguous()
    if x.numel() == 0:
        return y
    if rtol is None:
        rtol = 1e-12 if x.dtype == torch.float64 else 2e-6
    n = x.shape[-1]
    err = (y.double() - ref.double()).reshape(-1, n).abs().amax(dim=1)
    norm = ref.double().reshape(-1, n).norm(dim=1).clamp_min(1e-30)
    assert (err / norm).max().item() <= rtol, (err / norm).max().item()
    return y


@pytest.mark.parametrize("k", range(0, 16))
def test_pow2_sizes_match_torch(k):
    n = 1 << k
    gen = torch.Generator().manual_seed(k)
    rows = max(1, min(9, (1 << 17) // n))  # odd row counts: the task split has a remainder
    x = torch.randn(rows, n, generator=gen)
    _check(x, None, None, n, 1.0, False)
    _check(x, None, None, n, n**-0.5, True)
    s = _signs(n, gen)
    _check(x, None, s, n, n**-0.5, False)
    _check(x, None, s, n, 0.25, True)


@pytest.mark.parametrize("m", [12, 20, 28])
@pytest.mark.parametrize("p", [1, 2, 8, 16, 64, 512])
def test_dense_base_factor(m, p):
    gen = torch.Generator().manual_seed(m * 1000 + p)
    base = torch.randn(m, m, generator=gen)  # a general dense matrix, not only a Hadamard one
    b = m * p
    x = torch.randn(3, 2 * b, generator=gen)
    s = _signs(2 * b, gen)
    for transpose in (False, True):
        _check(x, base, None, b, 1.0, transpose, rtol=1e-5)
        _check(x, base, s, b, 0.5, transpose, rtol=1e-5)
        _check(x.double(), base, s, b, 0.5, transpose)


def test_dense_base_factor_long_rows():
    """m > 1 with a power-of-two factor longer than a cache chunk (whole-row passes)."""
    gen = torch.Generator().manual_seed(1)
    m, p = 12, 8192
    base = torch.randn(m, m, generator=gen)
    x = torch.randn(1, m * p, generator=gen)
    s = _signs(m * p, gen)
    _check(x, base, s, m * p, 0.01, False, rtol=1e-5)
    _check(x, base, None, m * p, 0.01, True, rtol=1e-5)


@pytest.mark.parametrize("block", [1, 4, 16, 256, 4096])
def test_block_diagonal(block):
    gen = torch.Generator().manual_seed(block)
    n = 8192
    x = torch.randn(5, n, generator=gen)
    s = _signs(n, gen)
    for transpose in (False, True):
        _check(x, None, None, block, 1.0, transpose)
        _check(x, None, s, block, block**-0.5, transpose)


@pytest.mark.parametrize("k", [0, 3, 4, 5, 10, 15])
def test_float64(k):
    n = 1 << k
    gen = torch.Generator().manual_seed(100 + k)
    x = torch.randn(3, n, generator=gen, dtype=torch.float64)
    s = _signs(n, gen)
    for transpose in (False, True):
        y = _check(x, None, s, n, n**-0.5, transpose)
        assert y.dtype == torch.float64
    # orthonormal: the norm is preserved to float64 rounding
    y = cf.cpu_fwht(x, None, s, n, n**-0.5, False)
    torch.testing.assert_close(y.norm(dim=1), x.norm(dim=1), rtol=1e-12, atol=0)


def test_leading_shapes_and_noncontiguous():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 4, 256, generator=gen)
    _check(x, None, None, 256, 1 / 16, False)
    xt = torch.randn(256, 6, generator=gen).t()  # not contiguous
    assert not xt.is_contiguous()
    _check(xt, None, _signs(256, gen), 64, 1.0, True)
    _check(torch.randn(512, generator=gen), None, None, 512, 1.0, False)  # 1-D


def test_empty_input():
    for shape in [(0, 64), (3, 0, 64)]:
        x = torch.empty(shape)
        y = cf.cpu_fwht(x, None, None, 64, 1.0, False)
        assert y.shape == x.shape and y.dtype == x.dtype


def test_involution_and_transpose_pair():
    gen = torch.Generator().manual_seed(3)
    n = 4096
    x = torch.randn(4, n, generator=gen)
    s = _signs(n, gen)
    y = cf.cpu_fwht(x, None, s, n, n**-0.5, False)
    back = cf.cpu_fwht(y, None, s, n, n**-0.5, True)
    torch.testing.assert_close(back, x, rtol=0, atol=2e-5)


def test_out_argument_and_in_place():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 1024, generator=gen)
    ref = torch_hadamard(x, None, None, 1024, 1 / 32, False)
    out = torch.empty_like(x)
    y = cf.cpu_fwht(x, None, None, 1024, 1 / 32, False, out=out)
    assert y is out
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    z = x.clone()
    cf.cpu_fwht(z, None, None, 1024, 1 / 32, False, out=z)  # in place
    torch.testing.assert_close(z, ref, rtol=0, atol=1e-5)
    with pytest.raises(ValueError):
        cf.cpu_fwht(x, None, None, 1024, 1.0, False, out=torch.empty(6, 512))


def test_half_precision_inputs_keep_their_dtype():
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(4, 128, generator=gen).to(torch.bfloat16)
    y = cf.cpu_fwht(x, None, None, 128, 128**-0.5, False)
    ref = torch_hadamard(x, None, None, 128, 128**-0.5, False)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref.float(), rtol=0.02, atol=0.02)


def test_large_parallel_streaming_path():
    """> 8 MiB: several threads, the streaming-store path and the pooled output buffers."""
    gen = torch.Generator().manual_seed(11)
    n = 2048
    x = torch.randn(1200, n, generator=gen)  # 9.4 MiB
    s = _signs(n, gen)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(max(2, old))
        y1 = _check(x, None, s, n, n**-0.5, False)
        y2 = _check(x, None, None, n, 1.0, True)
        assert y1.data_ptr() != y2.data_ptr()  # both alive: distinct buffers
        ref1 = y1.clone()
        ptr = y2.data_ptr()
        del y2
        gc.collect()
        y3 = cf.cpu_fwht(x, None, s, n, n**-0.5, False)  # may reuse y2's buffer, must not touch y1
        torch.testing.assert_close(y3, ref1, rtol=0, atol=0)
        torch.testing.assert_close(y1, ref1, rtol=0, atol=0)
        if os.environ.get("HADAKIT_CPU_POOL", "1") != "0":
            assert y3.data_ptr() == ptr  # the pool handed y2's buffer back out
    finally:
        torch.set_num_threads(old)


def test_bad_arguments():
    x = torch.randn(2, 96)
    with pytest.raises(ValueError):
        cf.cpu_fwht(x, None, None, 64, 1.0, False)  # 64 does not divide 96
    with pytest.raises(ValueError):
        cf.cpu_fwht(x, None, None, 96, 1.0, False)  # 96 is not m·2^k with m = 1
    with pytest.raises(TypeError):
        cf.cpu_fwht(torch.ones(2, 4, dtype=torch.int32), None, None, 4, 1.0, False)
    with pytest.raises(ValueError):
        cf.cpu_fwht(x, None, torch.ones(32), 32, 1.0, False)  # signs must cover the whole last dim


# --- the ±1 base stage (grouped signed sums, fused with H_{2^k}) -------------------------------------------------


def _pm1(m: int, gen: torch.Generator) -> torch.Tensor:
    """A random ±1 matrix (not a Hadamard matrix): the grouped program must be right for any ±1 base."""
    return (torch.randint(0, 2, (m, m), generator=gen) * 2 - 1).to(torch.float32)


def _hadamard_base(m: int, dtype=torch.float32) -> torch.Tensor:
    from hadakit.transforms.plan import base_matrix

    return base_matrix("hadamard", m, 0, "cpu", dtype)


def _dense_ref(x, base, signs, block, scale, transpose):
    """float64 reference: y = scale·(base ⊗ H)·D·v per block (transpose: scale·D·(base ⊗ H)ᵀ·v), computed as
    base·V·H on the m × p view V of each block (H = Sylvester's H_p, symmetric) so that no kron is formed."""
    m = base.shape[0]
    p = block // m
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < p:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    bm = base.double().t() if transpose else base.double()
    d = torch.ones(x.shape[-1], dtype=torch.float64) if signs is None else signs.double()
    v = x.double().reshape(-1, x.shape[-1])
    if not transpose:
        v = v * d
    y = (bm @ v.reshape(-1, m, p) @ h).reshape(v.shape) * scale
    if transpose:
        y = y * d
    return y.reshape(x.shape)


@pytest.mark.parametrize("m", [4, 12, 28])
@pytest.mark.parametrize("p", [8, 16, 32, 128, 256, 1024])
def test_pm1_base_paths_match_dense_float64_reference(m, p):
    """Every ±1 path (one-pass fused for short sub-rows, two-pass tiles for long ones) against float64 dense."""
    gen = torch.Generator().manual_seed(31 * m + p)
    b = m * p
    base = _pm1(m, gen) if m != 12 else _hadamard_base(12)
    x = torch.randn(3, 2 * b, generator=gen)
    s = _signs(2 * b, gen)
    for dt, tol in ((torch.float32, 2e-6), (torch.float64, 1e-12)):
        xd = x.to(dt)
        for signs in (None, s):
            for transpose in (False, True):
                for scale in (1.0, b**-0.5):
                    y = cf.cpu_fwht(xd, base.to(dt), signs, b, scale, transpose)
                    ref = _dense_ref(xd, base, signs, b, scale, transpose)
                    err = (y.double() - ref).reshape(-1, b).abs().amax(dim=1)
                    assert (err / ref.reshape(-1, b).norm(dim=1)).max().item() <= tol, (dt, signs is None, transpose)


def test_base_program_grouped_form_and_negative_controls():
    """The grouped program reproduces the base exactly; non-±1 or m % 4 != 0 bases fall back to the dense form."""
    gen = torch.Generator().manual_seed(2)
    w = 16
    for m in (4, 12, 20, 28):
        b = _pm1(m, gen).numpy().astype("float64")
        tabi, tabs, grouped = cf._base_program(b, 0.5, w, 1040)
        assert grouped and tabi.shape == (m, m // 4)
        # rebuild the matrix from the program: pattern c of group g has signs (+, ±, ±, ±) from the bits of c
        rebuilt = torch.zeros(m, m, dtype=torch.float64)
        for i in range(m):
            for g in range(m // 4):
                code = int(tabi[i, g]) // w - 8 * g
                assert 0 <= code < 8
                sg = [1.0] + [(-1.0 if code >> t & 1 else 1.0) for t in range(3)]
                rebuilt[i, 4 * g:4 * g + 4] = torch.tensor(sg, dtype=torch.float64) * float(tabs[i, g])
        torch.testing.assert_close(rebuilt, torch.from_numpy(b) * 0.5, rtol=0, atol=0)
    b = _pm1(12, gen).numpy().astype("float64")
    b[3, 5] = 0.5  # not ±1
    assert not cf._base_program(b, 1.0, w, 64)[2]
    assert not cf._base_program(_pm1(6, gen).numpy(), 1.0, w, 64)[2]  # m % 4 != 0


def test_pm1_base_dense_path_still_used_for_general_bases():
    """A non-±1 base of order 12 at p >= w takes the dense base stage; it must still match (negative control for
    the ±1 detection: a ±1-only kernel would be wrong here)."""
    gen = torch.Generator().manual_seed(4)
    base = _hadamard_base(12).clone()
    base[0, 0] = 0.75
    x = torch.randn(2, 12 * 64, generator=gen)
    y = cf.cpu_fwht(x, base, None, 12 * 64, 1.0, False)
    ref = _dense_ref(x, base, None, 12 * 64, 1.0, False)
    assert (y.double() - ref).abs().max().item() < 1e-4 * ref.abs().max().item()
    y_wrong = cf.cpu_fwht(x, _hadamard_base(12), None, 12 * 64, 1.0, False)
    assert (y_wrong.double() - ref).abs().max().item() > 1e-2  # the control differs


@pytest.mark.parametrize("n", [384, 14336])
def test_pm1_base_large_parallel_streaming_and_in_place(n):
    """> 8 MiB: two threads, streaming stores from the base stage, the prefetch of the next block-row; the
    in-place form (out = x) of both the one-pass and the two-pass path; float64 too."""
    gen = torch.Generator().manual_seed(n)
    m = 12 if n == 384 else 28
    base = _hadamard_base(m)
    rows = (9 << 20) // (4 * n) + 1
    x = torch.randn(rows, n, generator=gen)
    s = _signs(n, gen)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for signs, transpose in ((s, False), (None, True)):
            y = cf.cpu_fwht(x, base, signs, n, n**-0.5, transpose)
            ref = _dense_ref(x[:64], base, signs, n, n**-0.5, transpose)  # rows are independent: check a slice
            assert (y[:64].double() - ref).abs().max().item() < 2e-6 * ref.norm(dim=1).max().item()
            y2 = torch_hadamard(x, base, signs, n, n**-0.5, transpose)
            torch.testing.assert_close(y, y2, rtol=0, atol=2e-5)
        z = x.clone()
        cf.cpu_fwht(z, base, s, n, n**-0.5, False, out=z)
        torch.testing.assert_close(z, cf.cpu_fwht(x, base, s, n, n**-0.5, False), rtol=0, atol=0)
        xd = x[: rows // 2].double()
        yd = cf.cpu_fwht(xd, base.double(), s, n, n**-0.5, False)
        torch.testing.assert_close(yd.norm(dim=1), xd.norm(dim=1), rtol=1e-12, atol=0)  # orthonormal
        refd = _dense_ref(xd[:16], base, s, n, n**-0.5, False)
        assert (yd[:16] - refd).abs().max().item() < 1e-12 * refd.norm(dim=1).max().item()
    finally:
        torch.set_num_threads(old)
