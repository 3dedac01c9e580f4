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
        monkeypatch.setattr(quip, "_have_numba", lambda: False)
        slow = lin.dequantized_weight(dt)
        monkeypatch.undo()
        assert torch.equal(fast, slow) and torch.equal(slow, dequantize_e8p_state(state, dtype=dt))


# ---------------------------------------------------------------------- recipe entry point and checkpoints
def _buffers(model) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": getattr(m, k) for n, m in model.named_modules() if isinstance(m, E8PLinear)
            for k in ("codes", "codes2", "scales", "signs_out", "signs_in")}


def test_recipe_entry_point_equals_quantize_model_e8p(tiny_quantized):
    from hadakit.quantization.quip import quantize_model_recipe

    fp, q, _, calib = tiny_quantized
    m = copy.deepcopy(fp)
    rep = quantize_model_recipe(m, "e8p2", calib=calib)                 # e8p2 = e8p2:random:gptq, seed 0, damp 0.01
    a, b = _buffers(m), _buffers(q)
    assert a.keys() == b.keys() and len(a) == 35
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(rep.quantized) == 7 and 2.0 < rep.weight_bits < 2.05 and rep.calib_windows == 3
    assert rep.recipe.spec() == "e8p2:random:gptq"
    # negative control: another rotation seed gives other codes
    m2 = copy.deepcopy(fp)
    from hadakit.quantization.recipes import get_recipe
    import dataclasses
    r = get_recipe("e8p2")
    quantize_model_recipe(m2, dataclasses.replace(r, rotation=dataclasses.replace(r.rotation, seed=5)), calib=calib)
    assert not all(torch.equal(_buffers(m2)[k], a[k]) for k in a)


def test_recipe_rtn_needs_no_calibration_and_errors():
    from hadakit.quantization.quip import quantize_model_recipe

    m = tiny_llama(vocab=VOCAB)
    rep = quantize_model_recipe(m, "e8p3:none:rtn")
    assert len(rep.quantized) == 7 and rep.calib_windows == 0 and 3.0 < rep.weight_bits < 3.05
    assert all(float(m.get_submodule(n).signs_in.sum()) == 0 for n in rep.quantized)   # no incoherence: all +1
    with pytest.raises(ValueError, match="needs calibration"):
        quantize_model_recipe(tiny_llama(vocab=VOCAB), "e8p2")
    with pytest.raises(ValueError, match="not an E8P"):
        quantize_model_recipe(tiny_llama(vocab=VOCAB), "w4a16")
    with pytest.raises(TypeError):
        quantize_model_recipe(tiny_llama(vocab=VOCAB), 3)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_checkpoint_round_trip_bit_exact(bits, tmp_path):
    import hadakit
    from hadakit.quantization.quip import quantize_model_recipe

    fp = tiny_llama(vocab=VOCAB)
    calib = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(bits))
    m = copy.deepcopy(fp)
    rep = quantize_model_recipe(m, f"e8p{bits}", calib=calib)
    m.hadakit_recipe = rep.recipe                                        # what hadakit.quantize sets
    out = hadakit.save(m, tmp_path / "ck")
    back = hadakit.load(out)
    a, b = _buffers(m), _buffers(back)
    assert a.keys() == b.keys() and len(a) == 35
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    x = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        ref, got, fpl = m(x).logits, back(x).logits, fp(x).logits
    assert torch.equal(ref, got)
    assert not torch.allclose(got, fpl, atol=1e-4)                       # control: the E8P layers are in use
    with torch.no_grad():
        cached = hadakit.load(out, cache_weights=True)(x).logits
    assert torch.equal(cached, ref)
    # a recipe.json claiming other bits is refused (its hash check is bypassed by rewriting hadakit.json's hash)
    import hashlib
    import json
    meta = json.loads((out / "hadakit.json").read_text())
    rj = json.loads((out / "recipe.json").read_text())
    rj["name"], rj["vector_bits"] = ("e8p3", 3) if bits != 3 else ("e8p2", 2)
    data = (json.dumps(rj, indent=1) + "\n").encode()
    (out / "recipe.json").write_bytes(data)
    meta["recipe_sha256"] = hashlib.sha256(data).hexdigest()
    (out / "hadakit.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="vector_bits"):
        hadakit.load(out)


def test_hadakit_quantize_routes_e8p_recipes():
    """``hadakit.quantize(model, "e8p2", calibration)`` runs the E8P loop (quantization/pipeline.quantize_model
    routes recipes with ``vector_bits``): the same buffers as calling the lattice entry point directly."""
    import hadakit

    fp = tiny_llama(vocab=VOCAB)
    calib = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(3))
    m = copy.deepcopy(fp)
    hadakit.quantize(m, "e8p2", calib)
    m2 = copy.deepcopy(fp)
    from hadakit.quantization.quip import quantize_model_recipe
    quantize_model_recipe(m2, "e8p2", calib=calib)
    a, b = _buffers(m), _buffers(m2)
    assert len(a) == 35 and all(torch.equal(a[k], b[k]) for k in a)
