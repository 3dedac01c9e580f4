"""Incoherence processing, block LDL, BlockLDLQ and the E8P weight quantizer (hadakit.quantization.ldlq)."""

import pytest
import torch

from hadakit.quantization.ldlq import (
    E8PQuantizer,
    ScalarGroupQuantizer,
    block_ldl,
    block_ldlq,
    dequantize_e8p_state,
    incoherence_process,
    nearest_round,
    proxy_loss,
    quantize_weight_e8p,
)
from hadakit.transforms import hadamard_transform

F64 = torch.float64


def _correlated(n: int, seed: int, samples: int = 3000):
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(n, dtype=F64) + 0.3 * torch.randn(n, n, generator=g, dtype=F64)
    X = torch.randn(samples, n, generator=g, dtype=F64) @ mix
    X[:, : n // 8] *= 4.0                                             # a few high-energy inputs
    return X.T @ X / samples


@pytest.mark.parametrize("m,n", [(40, 48), (64, 640)])
def test_incoherence_exact_float64(m, n):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(m, n, generator=g, dtype=F64)
    H = _correlated(n, 1, samples=800)
    Wt, Ht, inc = incoherence_process(W, H, seed=5)
    assert torch.allclose(inc.weight_inverse(Wt), W, atol=1e-12, rtol=0)
    t0, t1 = ((W @ H) * W).sum(), ((Wt @ Ht) * Wt).sum()
    assert abs(float(t1 - t0)) < 1e-10 * float(t0)
    # incoherence actually mixes: a one-hot weight becomes flat (negative control on the identity)
    E = torch.zeros(m, n, dtype=F64)
    E[0, 0] = 1.0
    Et, _, _ = incoherence_process(E, torch.eye(n, dtype=F64), seed=5)
    assert torch.allclose(Et.abs(), torch.full_like(Et, (m * n) ** -0.5))
    assert not torch.equal(Wt, W)


def test_transformed_layer_equivalence():
    g = torch.Generator().manual_seed(2)
    W = torch.randn(24, 40, generator=g, dtype=F64)
    X = torch.randn(100, 40, generator=g, dtype=F64)
    Wt, Ht, inc = incoherence_process(W, X.T @ X / 100, seed=1)
    V = inc.hessian(torch.eye(40, dtype=F64))                          # V I Vᵀ = I (orthogonal)
    assert torch.allclose(V, torch.eye(40, dtype=F64), atol=1e-12)
    # rows of X·Vᵀ are V x; W̃ (V x) = U (W x) for every calibration input
    XVt = hadamard_transform(X, 1, signs=inc.signs_in)
    YUt = hadamard_transform(X @ W.T, 1, signs=inc.signs_out)
    assert torch.allclose(XVt @ Wt.T, YUt, atol=1e-10)
    assert torch.allclose(Ht, XVt.T @ XVt / 100, atol=1e-10)
    assert torch.allclose(((W @ (X.T @ X / 100)) * W).sum(), ((Wt @ Ht) * Wt).sum())


def test_block_ldl_structure():
    H = _correlated(64, 3)
    A, D = block_ldl(H, 8)
    I = torch.eye(64, dtype=F64)
    assert torch.allclose((I + A) @ D @ (I + A).T, H, atol=1e-10)
    for i in range(0, 64, 8):
        assert torch.all(A[i:, i:i + 8] == 0)                         # strictly block-upper
    assert A[:8, 8:].abs().max() > 0.01                                # and not trivially zero
    mask = torch.block_diag(*[torch.ones(8, 8, dtype=F64)] * 8)
    assert torch.all(D[mask == 0] == 0)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_ldlq_beats_nearest_rounding(bits):
    wins = []
    for seed in range(5):
        g = torch.Generator().manual_seed(100 + seed)
        W = torch.randn(32, 128, generator=g, dtype=F64)
        H = _correlated(128, seed)
        q = E8PQuantizer(bits, scale=1.0)
        l_ldlq = proxy_loss(W, block_ldlq(W, H, q, damp=0.0).W_hat, H)
        l_near = proxy_loss(W, nearest_round(W, q).W_hat, H)
        assert l_ldlq <= l_near
        wins.append(l_ldlq / l_near)
    assert max(wins) < 0.9                                            # clearly lower, not by accident


def _reference_gptq(W, H, quant, damp):
    """Straightforward GPTQ: column by column with the upper Cholesky factor of the damped inverse Hessian."""
    W = W.clone()
    Hd = H.clone()
    Hd.diagonal().add_(damp * float(H.diagonal().mean()))
    U = torch.linalg.cholesky(torch.linalg.inv(Hd), upper=True)
    Q = torch.empty_like(W)
    for i in range(W.shape[1]):
        q, _ = quant(W[:, i:i + 1], i)
        Q[:, i:i + 1] = q
        err = (W[:, i] - q[:, 0]) / U[i, i]
        W[:, i:] -= err[:, None] * U[i, i:][None, :]
    return Q


@pytest.mark.parametrize("bits,group", [(2, 16), (4, 32)])
def test_block1_equals_reference_gptq(bits, group):
    g = torch.Generator().manual_seed(7)
    W = torch.randn(20, 64, generator=g, dtype=F64)
    H = _correlated(64, 9)
    quant = ScalarGroupQuantizer(W, bits, group)
    ref = _reference_gptq(W, H, quant, 0.01)
    got = block_ldlq(W, H, quant, block_size=1, damp=0.01).W_hat
    assert torch.allclose(got, ref, atol=1e-9, rtol=0)
    rtn = nearest_round(W, quant, block_size=1).W_hat                  # negative control: no feedback differs
    assert not torch.allclose(rtn, ref, atol=1e-6)
    assert proxy_loss(W, got, H) < proxy_loss(W, rtn, H)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_quantize_weight_state_roundtrip(bits):
    g = torch.Generator().manual_seed(11)
    W = torch.randn(48, 64, generator=g)
    H = _correlated(64, 4).float()
    state, W_hat, stats = quantize_weight_e8p(W, H, bits, seed=3, scale_multipliers=(0.9, 1.0))
    assert state["codes"].dtype == torch.int16 and state["codes"].shape == (48, 8)
    if bits > 2:
        assert state["codes2"].dtype == (torch.int16 if bits == 4 else torch.uint8)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert torch.equal(dequantize_e8p_state(state), W_hat)
    assert stats["proxy_rel"] < {2: 0.15, 3: 0.05, 4: 0.015}[bits]
    _, W_hat2, _ = quantize_weight_e8p(W, H, bits, seed=3, scale_multipliers=(0.9, 1.0))
    assert torch.equal(W_hat, W_hat2)                                 # reproducible from the seed
    _, _, st_plain = quantize_weight_e8p(W, H, bits, seed=3, ldlq=False)
    assert stats["proxy_rel"] < st_plain["proxy_rel"]


def test_bad_input():
    W = torch.randn(8, 16)
    H = torch.eye(16)
    with pytest.raises(ValueError, match="multiple of 8"):
        quantize_weight_e8p(torch.randn(8, 12), torch.eye(12))
    with pytest.raises(ValueError, match="square"):
        quantize_weight_e8p(W, torch.eye(16)[:8])
    with pytest.raises(ValueError, match="in_features"):
        quantize_weight_e8p(W, torch.eye(24))
    with pytest.raises(ValueError, match="symmetric"):
        quantize_weight_e8p(W, H + torch.triu(torch.ones(16, 16), 1))
    with pytest.raises(ValueError, match="not PSD"):
        quantize_weight_e8p(W, -torch.eye(16))
    with pytest.raises(ValueError, match="positive definite"):
        v = torch.ones(16, 1, dtype=F64)
        block_ldlq(W.double(), v @ v.T, E8PQuantizer(2, 1.0), damp=0.0)          # rank 1: PSD but singular
    with pytest.raises(ValueError, match="2-D"):
        quantize_weight_e8p(torch.randn(16), H)
    with pytest.raises(ValueError, match="bits"):
        quantize_weight_e8p(W, H, bits=5)
    with pytest.raises(ValueError, match="damp"):
        block_ldlq(W, H, E8PQuantizer(2, 1.0), damp=-1.0)
    with pytest.raises(ValueError, match="block_size"):
        block_ldlq(W, H, E8PQuantizer(2, 1.0), block_size=5)
    with pytest.raises(ValueError, match="8 columns"):
        block_ldlq(W, H, E8PQuantizer(2, 1.0), block_size=4)
    with pytest.raises(ValueError, match="Hadamard"):
        quantize_weight_e8p(torch.randn(7, 16), H)


def test_docstring_examples():
    import doctest
    import importlib

    mod = importlib.import_module("hadakit.quantization.ldlq")
    res = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert res.attempted > 0 and res.failed == 0
