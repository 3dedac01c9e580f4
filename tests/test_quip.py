"""E8PLinear and quantize_model_e8p (hadakit.quantization.quip)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import tiny_llama
from hadakit.quantization.ldlq import dequantize_e8p_state, quantize_weight_e8p
from hadakit.quantization.quip import E8PLinear, quantize_model_e8p, quantize_model_sequential

VOCAB = 256


def _hessian(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(400, n, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2.0, n, dtype=torch.float64)
    return X, X.T @ X / X.shape[0]


@pytest.fixture(scope="module", params=[2, 3, 4])
def quantized(request):
    bits = request.param
    g = torch.Generator().manual_seed(bits)
    W = torch.randn(24, 64, generator=g, dtype=torch.float64)
    X, H = _hessian(64, bits)
    state, W_hat, stats = quantize_weight_e8p(W, H, bits, seed=3)
    return bits, state, W_hat, X


def test_forward_is_x_times_dequantized_weight(quantized):
    bits, state, W_hat, X = quantized
    bias = torch.linspace(-1, 1, 24)
    lin = E8PLinear.from_state(state, bias)
    x = X[:5].to(torch.float32)
    W32 = dequantize_e8p_state(state, dtype=torch.float32)
    torch.testing.assert_close(lin(x), x @ W32.T + bias, rtol=1e-5, atol=1e-5)
    lin64 = copy.deepcopy(lin).to(torch.float64)
    W64 = dequantize_e8p_state(state, dtype=torch.float64)
    torch.testing.assert_close(W64, W_hat, rtol=0, atol=1e-12)            # the quantizer's own Ŵ
    torch.testing.assert_close(lin64(X[:5]), X[:5] @ W64.T + bias.double(), rtol=1e-12, atol=1e-12)
    # cached weight: the same numbers
    torch.testing.assert_close(lin64.cache_weight()(X[:5]), lin64.clear_cache() or lin64(X[:5]), rtol=0, atol=0)
    # negative control: another seed's signs change the output
    other, _, _ = quantize_weight_e8p(W_hat, _hessian(64, bits)[1], bits, seed=4)
    assert not torch.allclose(E8PLinear.from_state(other, bias)(x), lin(x), atol=1e-3)


def test_state_dict_round_trip_and_to_state(quantized):
    bits, state, _, X = quantized
    lin = E8PLinear.from_state(state, torch.ones(24))
    fresh = E8PLinear(64, 24, bits, bias=True)
    x = X[:3].float()
    assert not torch.allclose(fresh(x), lin(x))                           # control: zero state differs
    fresh.load_state_dict(lin.state_dict())
    assert torch.equal(fresh(x), lin(x))
    assert set(lin.state_dict()) == {"codes", "codes2", "scales", "signs_out", "signs_in", "bias"}
    back = lin.to_state()
    for k in ("codes", "scales", "signs_out", "signs_in", "bits", "shape") + (("codes2",) if bits > 2 else ()):
        assert torch.equal(back[k], state[k]), k
    assert abs(lin.bits_per_weight() - (bits + (32 * (1 if bits == 2 else 2) + 24 + 64) / (24 * 64))) < 1e-12


def test_to_moves_buffers(quantized):
    bits, state, _, X = quantized
    lin = E8PLinear.from_state(state, torch.zeros(24))
    lin.cache_weight()
    lin64 = lin.to(torch.float64)
    assert lin64.bias.dtype == torch.float64 and lin64.scales.dtype == torch.float64
    assert lin64.codes.dtype == torch.int16 and lin64._cached is None
    assert lin64(X[:2]).dtype == torch.float64
    meta = copy.deepcopy(lin).to("meta")
    assert all(b.device.type == "meta" for b in meta.buffers())


def test_bad_input():
    with pytest.raises(ValueError, match="bits"):
        E8PLinear(64, 8, bits=5)
    with pytest.raises(ValueError, match="multiple of 8"):
        E8PLinear(12, 8)
    with pytest.raises(ValueError, match="in_features"):
        E8PLinear(0, 8)
    with pytest.raises(ValueError, match="last dim"):
        E8PLinear(64, 8)(torch.zeros(2, 32))
    with pytest.raises(ValueError, match="lacks 'codes'"):
        E8PLinear.from_state({"scales": torch.ones(1)})
    with pytest.raises(TypeError):
        E8PLinear.from_state([1, 2])
    m = tiny_llama(vocab=VOCAB)
    calib = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="bits"):
        quantize_model_e8p(m, 1, calib)
    with pytest.raises(ValueError, match="no nn.Linear"):
        quantize_model_e8p(m, 2, calib, targets=["nothing_here"])
    with pytest.raises(ValueError):
        quantize_model_e8p(m, 2, torch.randint(VOCAB, 2 * VOCAB, (2, 16)))    # token ids out of range
    assert all(not isinstance(mod, E8PLinear) for mod in m.modules())     # errors before any change


@pytest.fixture(scope="module")
def tiny_quantized():
    fp = tiny_llama(vocab=VOCAB)
    g = torch.Generator().manual_seed(1)
    calib = torch.randint(0, VOCAB, (3, 48), generator=g)
    q = copy.deepcopy(fp)
    rep = quantize_model_e8p(q, 2, calib, seed=0)
    return fp, q, rep, calib


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean() / b.pow(2).mean())


def test_quantize_model_e8p_tiny(tiny_quantized):
    fp, q, rep, _ = tiny_quantized
    names = [n for n, mod in q.named_modules() if isinstance(mod, E8PLinear)]
    assert len(names) == 7 and "lm_head" not in " ".join(names)
    assert isinstance(q.lm_head, nn.Linear) and not isinstance(q.lm_head, E8PLinear)
    assert len(rep.layers) == 7 and 2.0 < rep.bits_per_weight < 2.05 and rep.seconds > 0
    x = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref, out = fp(x).logits, q(x).logits
        # negative control: the same modules with random codes
        ctl = copy.deepcopy(q)
        g = torch.Generator().manual_seed(0)
        for mod in ctl.modules():
            if isinstance(mod, E8PLinear):
                mod.codes.copy_(torch.randint(-2 ** 15, 2 ** 15, mod.codes.shape, generator=g, dtype=torch.int32)
                                .to(torch.int16))
                mod.clear_cache()
        bad = ctl(x).logits
    assert torch.isfinite(out).all()
    err, err_ctl = _rel(out, ref), _rel(bad, ref)
    assert 0 < err < 0.5 * err_ctl, (err, err_ctl)


def test_ldlq_beats_nearest_rounding_in_the_model_loop(tiny_quantized):
    # negative control: the same loop with nearest rounding (no error feedback) has a higher proxy loss
    fp, _, rep, calib = tiny_quantized
    nofb = copy.deepcopy(fp)

    def rtn(name, mod, H):
        state, _, stats = quantize_weight_e8p(mod.weight.detach().double(), H, 2, seed=0, ldlq=False)
        return E8PLinear.from_state(state), stats

    rep2 = quantize_model_sequential(nofb, calib, rtn, targets=["mlp.*"])
    ldlq = {l["name"]: l["proxy_rel"] for l in rep.layers}
    worse = [l["proxy_rel"] > ldlq[l["name"]] for l in rep2.layers]
    assert len(worse) == 3 and sum(worse) >= 2, (rep2.layers, ldlq)


def test_deterministic_and_seeded(tiny_quantized):
    fp, q, _, calib = tiny_quantized
    a, b, c = (copy.deepcopy(fp) for _ in range(3))
    quantize_model_e8p(a, 2, calib, seed=0, targets=["k_proj"])
    quantize_model_e8p(b, 2, calib, seed=0, targets=["k_proj"])
    quantize_model_e8p(c, 2, calib, seed=5, targets=["k_proj"])
    ka, kb, kc = (m.model.layers[0].self_attn.k_proj for m in (a, b, c))
    assert torch.equal(ka.codes, kb.codes) and torch.equal(ka.signs_in, kb.signs_in)
    assert not torch.equal(ka.signs_in, kc.signs_in)


def test_docstring_examples():
    import doctest

    import hadakit.quantization.quip as quip

    res = doctest.testmod(quip, optionflags=doctest.ELLIPSIS)
    assert res.attempted > 0 and res.failed == 0


def test_numba_decode_path_is_bit_identical(quantized, monkeypatch):
    pytest.importorskip("numba")
    import hadakit.quantization.quip as quip

    bits, state, _, _ = quantized
    lin = E8PLinear.from_state(state)
    for dt in (torch.float32, torch.float64):
        fast = lin.dequantized_weight(dt)
        monkeypatch.setattr(quip, "_numba_available", lambda: False)
        slow = lin.dequantized_weight(dt)
        monkeypatch.undo()
        assert torch.equal(fast, slow) and torch.equal(slow, dequantize_e8p_state(state, dtype=dt))
