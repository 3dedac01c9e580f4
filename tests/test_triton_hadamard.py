"""The Triton kernel of the ``hadamard`` primitive against float64 dense products.

Without a GPU the kernel runs under Triton's interpreter on CPU tensors (TRITON_INTERPRET=1 must be set before the
kernel module is imported; tests/conftest.py does it too). Row counts stay tiny so the interpreter stays fast.
"""

from __future__ import annotations

import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from hadakit.kernels import triton_hadamard as th  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LOW_PRECISION = (torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------- references


def sylvester(n: int) -> torch.Tensor:
    """H_n in float64, H[i, j] = (-1)^popcount(i & j)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def times_sylvester(v: torch.Tensor, n: int) -> torch.Tensor:
    """``v @ H_n`` along the last dim without forming H_n: H_n = H_a ⊗ H_c with a, c <= 256 (exact in float64)."""
    if n <= 256:
        return v @ sylvester(n)
    a = n // 256
    w = (v.reshape(-1, a, 256) @ sylvester(256)).transpose(1, 2) @ sylvester(a)
    return w.transpose(1, 2).reshape(v.shape)


def paley12() -> torch.Tensor:
    """Hadamard matrix of order 12 (Paley I, q = 11): H = I + [[0, 1ᵀ], [-1, Q]], Q the Jacobsthal matrix."""
    q = 11
    residues = {(i * i) % q for i in range(1, q)}
    chi = [0] + [1 if a in residues else -1 for a in range(1, q)]
    jac = torch.tensor([[chi[(j - i) % q] for j in range(q)] for i in range(q)], dtype=torch.float64)
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = jac
    h = torch.eye(q + 1, dtype=torch.float64) + s
    assert torch.equal(h @ h.T, 12 * torch.eye(12, dtype=torch.float64))
    return h


def reference(x, base, signs, block, scale, transpose):
    """float64 ``scale·M·D x`` (forward) or ``scale·D·Mᵀ x`` per block, M = kron(base, H) block-diagonal over the
    last dim (a dense product for blocks up to 4096; beyond, the same map factored as base @ V @ H per block)."""
    n = x.shape[-1]
    m = 1 if base is None else base.shape[0]
    xd = x.detach().cpu().double().reshape(-1, n)
    d = torch.ones(n, dtype=torch.float64) if signs is None else signs.detach().cpu().double()
    bd = None if base is None else base.detach().cpu().double()
    if block <= 4096:
        h = sylvester(block // m)
        mat = h if bd is None else torch.kron(bd, h)
        mat = torch.block_diag(*([mat] * (n // block)))
        y = (xd @ mat) * d if transpose else (xd * d) @ mat.T
    else:
        v = xd if transpose else xd * d
        v = times_sylvester(v.reshape(-1, m, block // m), block // m)
        if bd is not None:
            v = (bd.T if transpose else bd) @ v
        v = v.reshape(-1, n)
        y = v * d if transpose else v
    return (scale * y).reshape(x.shape)


def assert_matches(y, x, y_ref):
    """fp32: within 2e-6 of max|y_ref|. fp16/bf16: within one ulp of the float64 result rounded once to the dtype
    (the fp32 arithmetic may land on the other side of a rounding boundary), plus 1e-6·max|y_ref| for elements far
    below the magnitude; and at least 99% of the elements equal to that rounded result."""
    assert y.dtype == x.dtype and y.shape == x.shape and y.is_contiguous()
    y = y.detach().cpu().double()
    top = y_ref.abs().max().item()
    if x.dtype == torch.float32:
        err = (y - y_ref).abs().max().item()
        assert err <= 2e-6 * top, f"max error {err:.3e} vs max |y| {top:.3e}"
        return
    rounded = y_ref.to(x.dtype).double()
    ulp = torch.finfo(x.dtype).eps * torch.exp2(torch.floor(torch.log2(y_ref.abs().clamp_min(1e-30))))
    excess = (y - rounded).abs() - (ulp + 1e-6 * top)
    assert excess.max().item() <= 0, f"{(excess > 0).sum().item()} elements more than one ulp off"
    # Rounded to nearest, not truncated: only near-ties may differ.
    assert (y != rounded).double().mean().item() <= 0.01


def random_signs(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (n,), generator=g) * 2 - 1).float().to(DEVICE)


def run_case(shape, base, block, *, signs=True, transpose=False, dtype=torch.float32, scale=0.75, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g).to(dtype).to(DEVICE)
    s = random_signs(shape[-1], seed + 1) if signs else None
    y = th.triton_hadamard(x, base, s, block, scale, transpose)
    assert_matches(y, x, reference(x, base, s, block, scale, transpose))


def random_base(m: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, m, generator=g).to(DEVICE)


# ----------------------------------------------------------------------------------------------------- tests


def test_available():
    assert th.triton_available()
    assert set(th.SUPPORTED_DTYPES) == {torch.float32, torch.float16, torch.bfloat16}


@pytest.mark.parametrize("b", [1, 2, 4, 8, 16, 32, 64, 256, 1024])
@pytest.mark.parametrize("transpose", [False, True])
def test_power_of_two(b, transpose):
    run_case((3, b), None, b, transpose=transpose)


@pytest.mark.parametrize("b", [4096, 32768])
def test_power_of_two_large_one_row(b):
    run_case((1, b), None, b)


@pytest.mark.parametrize("b", [2, 32, 128])
@pytest.mark.parametrize("transpose", [False, True])
def test_power_of_two_block_diagonal(b, transpose):
    # Four blocks per row: the signs differ from block to block (the non-shared signs path).
    run_case((5, 4 * b), None, b, transpose=transpose)


@pytest.mark.parametrize("m,p", [(12, 1), (12, 4), (20, 2), (28, 8), (36, 2), (40, 1), (40, 16), (172, 2)])
@pytest.mark.parametrize("transpose", [False, True])
def test_base_times_power_of_two(m, p, transpose):
    run_case((3, m * p), random_base(m, seed=m), m * p, transpose=transpose)


@pytest.mark.parametrize("m,p", [(12, 8), (20, 1), (172, 1)])
@pytest.mark.parametrize("transpose", [False, True])
def test_base_block_diagonal(m, p, transpose):
    run_case((2, 4 * m * p), random_base(m, seed=m), m * p, transpose=transpose)


@pytest.mark.parametrize("m,p", [(1, 32), (2, 8), (3, 64), (6, 4), (5, 1)])
def test_small_orders_fold_into_the_base(m, p):
    # m < 16: the launcher folds Sylvester factors into the base (base ⊗ H_2^a) before padding to 16.
    run_case((3, 2 * m * p), random_base(m, seed=m), m * p, transpose=m % 2 == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("base_m,p", [(None, 64), (None, 1024), (12, 16), (20, 4)])
@pytest.mark.parametrize("transpose", [False, True])
def test_dtypes(dtype, base_m, p, transpose):
    base = None if base_m is None else random_base(base_m, seed=3)
    block = p if base_m is None else base_m * p
    run_case((3, 2 * block), base, block, transpose=transpose, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fma_dot_path(monkeypatch, dtype):
    # The base dot with input_precision="ieee" instead of the exact bf16 pieces on tensor cores.
    monkeypatch.setattr(th, "_DOT_SPLIT", False)
    run_case((3, 2 * 20 * 4), random_base(20), 20 * 4, dtype=dtype)
    run_case((3, 12 * 8), random_base(12), 12 * 8, transpose=True, dtype=dtype)


def test_no_signs_and_unit_scale():
    run_case((4, 256), None, 64, signs=False, scale=1.0)
    run_case((4, 2 * 12 * 4), random_base(12), 48, signs=False, scale=1.0, transpose=True)


@pytest.mark.parametrize("base_m,p", [(None, 64), (12, 4)])
def test_leading_dims(base_m, p):
    base = None if base_m is None else random_base(base_m)
    block = p if base_m is None else base_m * p
    run_case((2, 3, 2 * block), base, block)


@pytest.mark.parametrize("rows", [1, 3, 17, 33])
def test_row_counts_not_a_multiple_of_the_tile(rows):
    run_case((rows, 64), None, 16)
    run_case((rows, 48), random_base(12), 12)


def test_large_blocks_in_row_chunks():
    # 40·1024: the dot and butterflies go in chunks of 16 of the 40 rows of each block's (40, 1024) view.
    run_case((1, 40 * 1024), random_base(40), 40 * 1024, transpose=True)


def test_two_pass_path_for_huge_blocks():
    # 12·4096: even 16 rows of the (12, 4096) view exceed one program's registers; two passes through fp32.
    run_case((1, 12 * 4096), random_base(12), 12 * 4096, transpose=True)
    run_case((1, 12 * 4096), random_base(12), 12 * 4096, dtype=torch.bfloat16)


def test_empty_input():
    x = torch.empty(0, 3, 64, device=DEVICE, dtype=torch.bfloat16)
    y = th.triton_hadamard(x, None, random_signs(64), 64, 0.5, False)
    assert y.shape == x.shape and y.dtype == x.dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_then_transpose_is_identity(dtype):
    h12 = paley12().float().to(DEVICE)
    block, n = 12 * 16, 2 * 12 * 16
    x = torch.randn(5, n).to(dtype).to(DEVICE)
    s = random_signs(n)
    scale = 1 / math.sqrt(block)
    y = th.triton_hadamard(x, h12, s, block, scale, False)
    back = th.triton_hadamard(y, h12, s, block, scale, True)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(back.double(), x.double(), rtol=tol, atol=tol)
    # Orthogonal: the norm is kept.
    torch.testing.assert_close(y.double().norm(), x.double().norm(), rtol=tol, atol=0)


def test_power_of_two_roundtrip():
    x = torch.randn(3, 2048, device=DEVICE)
    s = random_signs(2048)
    y = th.triton_hadamard(x, None, s, 512, 1 / math.sqrt(512), False)
    torch.testing.assert_close(th.triton_hadamard(y, None, s, 512, 1 / math.sqrt(512), True), x, rtol=1e-5, atol=1e-5)


def test_bad_arguments():
    x = torch.randn(2, 48, device=DEVICE)
    with pytest.raises(ValueError, match="divisor"):
        th.triton_hadamard(x, None, None, 32, 1.0, False)
    with pytest.raises(ValueError, match="power of two"):
        th.triton_hadamard(x, None, None, 48, 1.0, False)
    with pytest.raises(ValueError, match="signs"):
        th.triton_hadamard(x, None, torch.ones(7, device=DEVICE), 16, 1.0, False)
    with pytest.raises(TypeError):
        th.triton_hadamard(x.double(), None, None, 16, 1.0, False)
