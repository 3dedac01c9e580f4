"""Transforms against float64 dense products, exact identities, autograd, compile, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hadakit
from hadakit.transforms.plan import plan_transform

POW2 = [1 << k for k in range(0, 12)]
# m·2^k sizes for every base order the issue names (172 only if a matrix was found).
M_SIZES = [12, 24, 12 * 32, 20, 20 * 32, 28, 28 * 4, 36, 40, 44, 52, 60, 76, 108, 108 * 2]
if hadakit.supported(172):
    M_SIZES.append(172 * 4)


def dense(n: int) -> torch.Tensor:
    return hadakit.hadamard_matrix(n, dtype=torch.float64)


def block_diag(mat: torch.Tensor, reps: int) -> torch.Tensor:
    return torch.block_diag(*([mat] * reps))


@pytest.mark.parametrize("n", POW2 + M_SIZES)
def test_matches_dense_float64(n):
    x = torch.randn(5, n, dtype=torch.float64)
    h = dense(n)
    y = hadakit.hadamard_transform(x, normalize=False)
    torch.testing.assert_close(y, x @ h.T, rtol=1e-12, atol=1e-10 * math.sqrt(n))
    torch.testing.assert_close(hadakit.hadamard_transform(x), x @ h.T / math.sqrt(n), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k", [12, 13, 14, 15])
def test_large_powers_of_two_by_recursion(k):
    # H_{2n} x = [H_n x0 + H_n x1, H_n x0 - H_n x1] (Sylvester), with H_n checked densely above.
    n = 1 << k
    x = torch.randn(2, n, dtype=torch.float64)
    half = hadakit.hadamard_transform(x.view(2, 2, n // 2), normalize=False)
    expect = torch.cat([half[:, 0] + half[:, 1], half[:, 0] - half[:, 1]], dim=-1)
    torch.testing.assert_close(hadakit.hadamard_transform(x, normalize=False), expect, rtol=1e-12, atol=1e-9)


def test_float32_cpu_large_size_error_is_small():
    x = torch.randn(4, 1 << 15)
    y = hadakit.hadamard_transform(x)
    back = hadakit.inverse_hadamard_transform(y)
    assert (back - x).abs().max() < 1e-5
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=0)


@pytest.mark.parametrize("n", [1, 2, 64, 1024] + M_SIZES)
def test_identities(n):
    x = torch.randn(3, n, dtype=torch.float64)
    # transform of the identity is Hᵀ (y = x @ Hᵀ); H·Hᵀ = nI
    eye = torch.eye(n, dtype=torch.float64)
    torch.testing.assert_close(hadakit.hadamard_transform(eye, normalize=False), dense(n).T)
    y = hadakit.hadamard_transform(x)
    torch.testing.assert_close(hadakit.inverse_hadamard_transform(y), x)
    yu = hadakit.hadamard_transform(x, normalize=False)
    torch.testing.assert_close(hadakit.inverse_hadamard_transform(yu, normalize=False), x)
    if n & (n - 1) == 0:  # Sylvester matrices are symmetric: the normalized transform is an involution
        torch.testing.assert_close(hadakit.hadamard_transform(y), x)


@pytest.mark.parametrize("n,b", [(256, 16), (640, 32), (640, 128), (1024, 1024), (96, 12), (120, 20)])
def test_block_and_signs_match_dense(n, b):
    x = torch.randn(4, n, dtype=torch.float64)
    s = hadakit.random_signs(n, seed=3, dtype=torch.float64)
    mat = block_diag(dense(b), n // b) / math.sqrt(b)
    y = hadakit.hadamard_transform(x, block_size=b, signs=s)
    torch.testing.assert_close(y, (x * s) @ mat.T)
    torch.testing.assert_close(hadakit.block_hadamard_transform(x, b, signs=s), y)
    torch.testing.assert_close(hadakit.inverse_hadamard_transform(y, block_size=b, signs=s), x)


def test_randomized_and_structured_rotation():
    n = 640
    x = torch.randn(6, n, dtype=torch.float64)
    y = hadakit.randomized_hadamard_transform(x, seed=7)
    s = hadakit.random_signs(n, seed=7, dtype=torch.float64)
    torch.testing.assert_close(y, (x * s) @ dense(n).T / math.sqrt(n))
    torch.testing.assert_close(hadakit.randomized_hadamard_transform(y, seed=7, inverse=True), x)
    s1, s2 = hadakit.random_signs(n, 1), hadakit.random_signs(n, 2)
    z = hadakit.structured_rotation(x, s1, s2)
    h = dense(n) / math.sqrt(n)
    r = h @ torch.diag(s2.double()) @ h @ torch.diag(s1.double())
    torch.testing.assert_close(z, x @ r.T)
    torch.testing.assert_close(hadakit.structured_rotation(z, s1, s2, inverse=True), x)


def test_random_signs_reproducible_and_generator_advances():
    assert torch.equal(hadakit.random_signs(100, 5), hadakit.random_signs(100, 5))
    assert not torch.equal(hadakit.random_signs(100, 5), hadakit.random_signs(100, 6))
    g = torch.Generator().manual_seed(0)
    a, b = hadakit.random_signs(100, generator=g), hadakit.random_signs(100, generator=g)
    assert not torch.equal(a, b)
    assert set(a.unique().tolist()) == {-1.0, 1.0}


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_dim_argument_and_noncontiguous(dim):
    x = torch.randn(64, 32, 12, dtype=torch.float64).transpose(0, 2)  # non-contiguous (12, 32, 64)
    n = x.shape[dim]
    y = hadakit.hadamard_transform(x, dim)
    ref = torch.movedim(torch.movedim(x, dim, -1) @ dense(n).T / math.sqrt(n), -1, dim)
    torch.testing.assert_close(y, ref)


def test_broadcast_input():
    row = torch.randn(1, 128)
    x = row.expand(16, 128)  # stride 0 along rows
    torch.testing.assert_close(hadakit.hadamard_transform(x), hadakit.hadamard_transform(row).expand(16, 128))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n", [128, 640, 4096])
def test_low_precision_error_relative_to_torch(dtype, n):
    x = torch.randn(64, n, dtype=torch.float64)
    ref = x @ dense(n).T / math.sqrt(n)
    xl = x.to(dtype)
    ours = hadakit.hadamard_transform(xl)
    assert ours.dtype == dtype
    # PyTorch's own product in this dtype, of the same (already rounded) input.
    theirs = (xl @ (dense(n).T / math.sqrt(n)).to(dtype)).double()
    ref_l = xl.double() @ dense(n).T / math.sqrt(n)
    err_ours = (ours.double() - ref_l).abs().max()
    err_torch = (theirs - ref_l).abs().max()
    assert err_ours <= 2 * err_torch + 1e-12, (err_ours, err_torch)
    # and the rounding of the input itself is all that separates us from the float64 answer
    assert (ours.double() - ref).abs().max() <= (xl.double() - x).abs().max() * math.sqrt(n) + err_torch


def test_gradcheck():
    for n, kw in [(16, {}), (24, {}), (40, {"signs": hadakit.random_signs(40, 1, dtype=torch.float64)}),
                  (64, {"block_size": 16}), (96, {"normalize": False})]:
        x = torch.randn(3, n, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda t: hadakit.hadamard_transform(t, **kw), (x,))
        assert torch.autograd.gradcheck(lambda t: hadakit.inverse_hadamard_transform(t, **kw), (x,))
        assert torch.autograd.gradgradcheck(lambda t: hadakit.hadamard_transform(t, **kw), (x,))


def test_backward_is_transposed_transform():
    x = torch.randn(4, 20, requires_grad=True, dtype=torch.float64)
    g = torch.randn(4, 20, dtype=torch.float64)
    hadakit.hadamard_transform(x).backward(g)
    torch.testing.assert_close(x.grad, hadakit.inverse_hadamard_transform(g))


def test_nan_inf_propagate_like_ieee():
    x = torch.zeros(2, 8)
    x[0, 3] = float("nan")
    x[1, 0] = float("inf")
    y = hadakit.hadamard_transform(x, normalize=False)
    assert torch.isnan(y[0]).all()
    assert torch.isinf(y[1]).all()
    assert torch.equal(torch.sign(y[1]), torch.sign(dense(8)[:, 0]).float())


def test_empty_and_tiny():
    assert hadakit.hadamard_transform(torch.empty(0, 16)).shape == (0, 16)
    assert hadakit.hadamard_transform(torch.empty(3, 0)).shape == (3, 0)
    x = torch.randn(5, 1)
    torch.testing.assert_close(hadakit.hadamard_transform(x), x)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.uint8, torch.complex64])
def test_rejects_non_float(dtype):
    with pytest.raises(TypeError, match="floating-point"):
        hadakit.hadamard_transform(torch.zeros(2, 8, dtype=dtype))


def test_bad_arguments():
    with pytest.raises(IndexError, match="out of range"):
        hadakit.hadamard_transform(torch.zeros(2, 8), dim=2)
    with pytest.raises(ValueError, match="0-d"):
        hadakit.hadamard_transform(torch.tensor(1.0))
    with pytest.raises(ValueError, match="does not divide"):
        hadakit.hadamard_transform(torch.zeros(2, 8), block_size=3)
    with pytest.raises(ValueError, match="length 8"):
        hadakit.hadamard_transform(torch.zeros(2, 8), signs=torch.ones(4))
    with pytest.raises(ValueError, match="±1"):
        hadakit.hadamard_transform(torch.zeros(2, 8), signs=torch.full((8,), 2.0))
    with pytest.raises(TypeError, match="torch.Tensor"):
        hadakit.hadamard_transform([1.0, 2.0])


def test_unsupported_size_names_nearest_and_fallback_is_orthogonal():
    n = 16256  # 127·128: no Hadamard matrix of order 508·2^j is constructible
    assert not hadakit.supported(n)
    with pytest.raises(ValueError) as err:
        hadakit.hadamard_transform(torch.zeros(1, n))
    msg = str(err.value)
    below, above = hadakit.nearest_supported(n)
    assert str(below) in msg and str(above) in msg and "fallback" in msg and "127" in msg
    assert below < n < above and hadakit.supported(below) and hadakit.supported(above)
    for fb in ("dct", "random"):
        plan = hadakit.transform_plan(n, fallback=fb)
        assert plan.kind == fb and plan.base_order == 127 and "fallback" in plan.construction
        x = torch.randn(3, n, dtype=torch.float64)
        y = hadakit.hadamard_transform(x, fallback=fb)
        torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
        torch.testing.assert_close(hadakit.inverse_hadamard_transform(y, fallback=fb), x)
    # the fallback on a small odd size, checked densely: Q is orthogonal
    eye = torch.eye(3 * 8, dtype=torch.float64)
    q = hadakit.hadamard_transform(eye, fallback="random", fallback_seed=4)
    torch.testing.assert_close(q @ q.T, eye)
    # a supported size ignores the fallback
    assert hadakit.transform_plan(640, fallback="dct").kind == "hadamard"


def test_plan_names_construction():
    assert plan_transform(1024).construction.startswith("sylvester")
    assert plan_transform(640).base_order == 20
    assert plan_transform(384).base_order == 12


def test_module_state_dict_roundtrip_and_per_call_signs():
    rot = hadakit.HadamardRotation(640, signs="fixed", seed=11)
    other = hadakit.HadamardRotation(640, signs="fixed", seed=12)
    x = torch.randn(2, 640)
    assert not torch.equal(rot(x), other(x))
    other.load_state_dict(rot.state_dict())
    assert torch.equal(rot(x), other(x))
    torch.testing.assert_close(rot.inverse(rot(x)), x, atol=1e-5, rtol=0)
    r = rot.matrix()
    torch.testing.assert_close(r @ r.T, torch.eye(640, dtype=torch.float64))
    torch.testing.assert_close(rot(x).double(), x.double() @ r.T, atol=1e-5, rtol=0)

    step = hadakit.HadamardRotation(64, signs="per_call", seed=0).train()
    first = step(torch.eye(64)).clone()
    second = step(torch.eye(64)).clone()
    assert not torch.equal(first, second)
    replay = hadakit.HadamardRotation(64, signs="per_call", seed=0).train()
    assert torch.equal(replay(torch.eye(64)), first)
    step.eval()
    assert torch.equal(step(torch.eye(64)), second)  # no resampling in eval mode
    assert "construction" in repr(hadakit.HadamardRotation(40))

    s = hadakit.StructuredRotation(96, seed=2, block_size=32)
    s2 = hadakit.StructuredRotation(96, seed=3, block_size=32)
    s2.load_state_dict(s.state_dict())
    y = torch.randn(3, 96)
    assert torch.equal(s(y), s2(y))
    torch.testing.assert_close(s.inverse(s(y)), y, atol=1e-5, rtol=0)


def test_torch_compile_fullgraph_matches_eager():
    rot = hadakit.HadamardRotation(640, signs="fixed", seed=0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(640, 640)
            self.rot = rot

        def forward(self, x):
            return self.lin(self.rot(x)) + hadakit.hadamard_transform(x, block_size=32)

    net = Net()
    x = torch.randn(4, 640, requires_grad=True)
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    y_c = compiled(x)
    y_e = net(x)
    torch.testing.assert_close(y_c, y_e)
    (g_c,) = torch.autograd.grad(y_c.sum(), x)
    (g_e,) = torch.autograd.grad(y_e.sum(), x)
    torch.testing.assert_close(g_c, g_e)
    explanation = torch._dynamo.explain(net)(x)
    assert explanation.graph_break_count == 0


@settings(max_examples=40, deadline=None)
@given(
    lead=st.lists(st.integers(1, 4), min_size=0, max_size=3),
    m=st.sampled_from([1, 12, 20, 28]),
    k=st.integers(0, 7),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_orthogonal_and_invertible(lead, m, k, dtype, seed):
    n = m << k
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, n, generator=g, dtype=dtype)
    s = hadakit.random_signs(n, generator=g)
    y = hadakit.hadamard_transform(x, signs=s)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=tol, atol=tol)
    torch.testing.assert_close(hadakit.inverse_hadamard_transform(y, signs=s), x, rtol=tol, atol=tol)
    # linearity
    z = torch.randn(*lead, n, generator=g, dtype=dtype)
    torch.testing.assert_close(hadakit.hadamard_transform(2 * x - z, signs=s),
                               2 * y - hadakit.hadamard_transform(z, signs=s), rtol=tol, atol=tol * 10)


@pytest.mark.parametrize("backend", ["triton", "numba"])
def test_forced_backends_match_portable_path_with_autograd(backend, monkeypatch):
    # Under TRITON_INTERPRET=1 (conftest, no GPU) the Triton kernel runs on CPU tensors through the same op.
    pytest.importorskip("triton" if backend == "triton" else "numba")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 640, generator=g)
    s = hadakit.random_signs(640, seed=2)
    results = {}
    for name in (backend, "torch"):
        monkeypatch.setenv("HADAKIT_BACKEND", name)
        xi = x.clone().requires_grad_(True)
        y = hadakit.hadamard_transform(xi, signs=s, block_size=320)
        y.backward(torch.ones_like(y))
        results[name] = (y.detach(), xi.grad)
    torch.testing.assert_close(results[backend][0], results["torch"][0], atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(results[backend][1], results["torch"][1], atol=2e-6, rtol=1e-5)
