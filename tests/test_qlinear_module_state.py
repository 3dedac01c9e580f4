"""RotatedQuantLinear keeps its packed weight inside torch's module system (issue 18, item 3).

The packed codes / scales are registered buffers under ``qweight.*`` (the keys ``QuantizedTensor.state_dict`` uses),
so ``state_dict`` / ``load_state_dict`` / ``.to`` carry them; a dtype cast of the module never casts them; the
packed-only mode (``weight=None``) holds no dense weight and gives the dense mode's outputs bit for bit in float32.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hadakit.formats import QuantizedTensor, fake_quantize, get_scheme, quantize
from hadakit.quantization.qlinear import PackedWeight, RotatedQuantLinear
from hadakit.transforms import HadamardRotation

SCHEMES = ["int4_g128", "int8", "nvfp4", "mxfp4", "int4_g128_asym"]
IN, OUT = 256, 48


def _weight(seed, out=OUT, inp=IN):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=g) * (1 + 4 * torch.rand(out, 1, generator=g))


def _bytes(t):
    """The raw bytes of a tensor (torch.equal has no float8 kernels)."""
    return t.detach().reshape(-1).view(torch.uint8)


def _x(seed=100, n=7, inp=IN):
    return torch.randn(n, inp, generator=torch.Generator().manual_seed(seed)) * 3


def _build(scheme, *, seed=0, dense, act=True, bias=True, **kw):
    """A quantized linear as the pipeline builds it (dense) or as a packed-only loader would."""
    qt = quantize(_weight(seed), scheme)
    b = torch.randn(OUT, generator=torch.Generator().manual_seed(seed + 1)) if bias else None
    rot = HadamardRotation(IN, signs="fixed", seed=3)
    smooth = torch.rand(IN, generator=torch.Generator().manual_seed(seed + 2)) + 0.5
    return RotatedQuantLinear(IN, OUT, weight=qt.dequantize(torch.float32) if dense else None, bias=b, packed=qt,
                              rotation=rot, act_scheme=get_scheme("int8") if act else None, smooth=smooth, **kw), qt


@pytest.mark.parametrize("scheme", SCHEMES)
def test_state_dict_holds_the_packed_buffers_under_the_checkpoint_keys(scheme):
    for dense in (True, False):
        mod, qt = _build(scheme, dense=dense)
        sd = mod.state_dict()
        expected = qt.state_dict("qweight.")  # what the checkpoint writes under <linear>.qweight.
        assert {k for k in sd if k.startswith("qweight.")} == set(expected)
        for k, v in expected.items():
            assert sd[k].dtype == v.dtype and sd[k].shape == v.shape and torch.equal(_bytes(sd[k]), _bytes(v)), k
        assert ("weight" in sd) == dense
        assert {k for k, _ in mod.named_buffers()} >= {k for k in expected if not k.endswith("qmeta")}
        back = QuantizedTensor.from_state_dict(sd, "qweight.")
        assert back.scheme == qt.scheme and torch.equal(back.dequantize(), qt.dequantize())
        # the `packed` property is a view of the current buffers
        assert mod.packed.payload is mod.qweight.payload and mod.packed.scheme == qt.scheme


@pytest.mark.parametrize("dense", [True, False])
@pytest.mark.parametrize("scheme", ["int4_g128", "nvfp4", "int4_g128_asym"])
def test_load_state_dict_into_a_fresh_module_reproduces_the_outputs(scheme, dense):
    src, _ = _build(scheme, seed=0, dense=dense)
    fresh, _ = _build(scheme, seed=10, dense=dense)  # other weights, bias, smoothing
    x = _x()
    ref = src(x)
    assert not torch.equal(fresh(x), ref)
    fresh.cache_weight()  # a cached copy must not survive the load
    fresh(x)
    result = fresh.load_state_dict(src.state_dict())  # strict
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(fresh(x), ref)
    assert torch.equal(fresh.qweight.payload, src.qweight.payload)


def test_load_state_dict_refuses_another_scheme_or_a_cast_buffer():
    mod, _ = _build("int4_g128", dense=False)
    other, _ = _build("int8", dense=False)
    with pytest.raises(RuntimeError, match="int8"):
        mod.load_state_dict(other.state_dict())
    sd = mod.state_dict()
    before = mod.qweight.scales.clone()
    sd["qweight.scales"] = sd["qweight.scales"].float() * 2  # a float32 tensor torch would silently convert
    del sd["qweight.qmeta"]
    with pytest.raises(RuntimeError, match="would corrupt"):
        mod.load_state_dict(sd)
    assert torch.equal(mod.qweight.scales, before)
    sd = mod.state_dict()
    sd["qweight.qmeta"] = torch.tensor([1, 2, 3], dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="qmeta"):
        mod.load_state_dict(sd)


@pytest.mark.parametrize("scheme", ["int4_g128", "nvfp4", "mxfp4", "int8"])
def test_a_dtype_cast_of_the_module_keeps_the_packed_format(scheme):
    mod, qt = _build(scheme, dense=False)
    dense, _ = _build(scheme, dense=True)
    dtypes = {k: v.dtype for k, v in qt._tensors().items()}
    x = _x()
    for cast in (lambda m: m.to(torch.float64), lambda m: m.half(), lambda m: m.float(), lambda m: m.double()):
        cast(mod)
        cast(dense)
        for k, dt in dtypes.items():
            buf = getattr(mod.qweight, k)
            assert buf.dtype == dt, (k, buf.dtype)
            assert torch.equal(_bytes(buf), _bytes(getattr(qt, k))), k
            assert getattr(dense.qweight, k).dtype == dt
        assert torch.equal(mod.packed.dequantize(torch.float32), qt.dequantize(torch.float32))
    # after .double() the floating state is float64; packed-only dequantizes into the input's dtype
    assert mod.bias.dtype == torch.float64 and mod.smooth.dtype == torch.float64
    x64 = x.double()
    y = mod(x64)
    assert y.dtype == torch.float64
    h = F.linear(fake_quantize(mod.transform_input(x64), mod.act_scheme), qt.dequantize(torch.float64), mod.bias)
    assert torch.equal(y, h)


def test_meta_device_moves_carry_the_buffers_and_to_empty_then_load_restores():
    src, qt = _build("nvfp4", dense=False)
    x = _x()
    ref = src(x)
    mod, _ = _build("nvfp4", seed=5, dense=False)
    mod.to(torch.device("meta"))
    assert all(b.device.type == "meta" for b in mod.qweight.buffers())
    assert {k: v.dtype for k, v in mod.qweight.named_buffers()} == {k: v.dtype for k, v in qt._tensors().items()}
    assert mod.packed.device.type == "meta"
    assert mod.state_dict()["qweight.qmeta"].device.type == "cpu"  # the metadata stays readable
    mod.to(device="meta", dtype=torch.float64)  # cast + move from meta: dtypes still kept
    assert mod.qweight.scales.dtype == torch.float8_e4m3fn and mod.qweight.tensor_scale.dtype == torch.float32
    mod.to(torch.float32)
    mod.to_empty(device="cpu")
    assert mod.qweight.payload.device.type == "cpu"
    mod.load_state_dict(src.state_dict())
    assert torch.equal(mod(x), ref)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_packed_only_forward_equals_the_dense_forward_bit_for_bit(scheme):
    dense, qt = _build(scheme, dense=True)
    packed, _ = _build(scheme, dense=False)
    assert not dense.packed_only and packed.packed_only
    assert "weight" not in dict(packed.named_parameters())
    x = _x()
    ref = dense(x)
    assert torch.equal(packed(x), ref)
    assert torch.equal(packed(x.unsqueeze(0)), dense(x.unsqueeze(0)))
    # `weight` still reads in packed-only mode, as the same dequantized tensor
    assert torch.equal(packed.weight, dense.weight) and packed.weight.dtype == torch.float32
    # a dense module switched to packed-only keeps its outputs
    assert torch.equal(dense.to_packed_only()(x), ref) and dense.packed_only


def test_packed_only_without_activation_quant_and_compute_dtype():
    dense, qt = _build("int4_g128", dense=True, act=False)
    packed, _ = _build("int4_g128", dense=False, act=False, compute_dtype=torch.float64)
    x = _x()
    y = packed(x)
    assert y.dtype == torch.float32  # output in the input's dtype, matmul in float64
    assert packed.weight.dtype == torch.float64
    assert torch.allclose(y, dense(x), rtol=1e-5, atol=1e-4) and not torch.equal(packed(x), y * 0)
    f32, _ = _build("int4_g128", dense=False, act=False)
    assert torch.equal(f32(x), dense(x))


@pytest.mark.parametrize("scheme", ["int4_g128", "mxfp4"])
def test_cache_on_and_off_gives_identical_outputs_and_a_corrupted_code_changes_them(scheme):
    mod, qt = _build(scheme, dense=False)
    x = _x()
    base_bytes = mod.state_nbytes()
    plain = mod(x)
    assert not mod.qweight.cached
    w = mod.cache_weight()
    assert mod.qweight.cached and torch.equal(w, qt.dequantize(torch.float32))
    assert mod.state_nbytes() == base_bytes + OUT * IN * 4
    assert torch.equal(mod(x), plain)
    assert mod.dequantized_weight() is w  # served from the cache
    mod.release_weight()
    assert not mod.qweight.cached and mod.state_nbytes() == base_bytes
    assert torch.equal(mod(x), plain)
    built, _ = _build(scheme, dense=False, cache_dequantized=True)
    assert built.qweight.cached and torch.equal(built(x), plain)
    # negative control: flip one code byte in the buffer (cached and uncached)
    for m in (mod, built):
        m.qweight.payload[5] ^= 0x77
        out = m(x)
        assert not torch.equal(out, plain)
        ref = F.linear(fake_quantize(m.transform_input(x), m.act_scheme), m.packed.dequantize(torch.float32), m.bias)
        assert torch.equal(out, ref)


def test_a_packed_only_4bit_module_holds_a_fraction_of_the_fp32_weight():
    w = _weight(0, 640, 2048)
    qt = quantize(w, "int4_g128")
    fp32 = w.numel() * 4
    mod = RotatedQuantLinear(2048, 640, weight=None, bias=None, packed=qt,
                             rotation=HadamardRotation(2048, signs="fixed", seed=1))
    dense = RotatedQuantLinear(2048, 640, weight=qt.dequantize(), bias=None, packed=qt,
                               rotation=HadamardRotation(2048, signs="fixed", seed=1))
    assert mod.packed_nbytes() == qt.nbytes < 0.2 * fp32
    assert mod.state_nbytes() < 0.2 * fp32  # everything it holds, rotation signs included
    assert dense.state_nbytes() > fp32
    x = _x(1, 3, 2048)
    assert torch.equal(mod(x), dense(x))


def test_constructor_stays_backward_compatible_and_checks_its_arguments():
    qt = quantize(_weight(0), "int4_g128")
    w = qt.dequantize()
    old = RotatedQuantLinear(IN, OUT, weight=w, bias=None)  # unquantized weight, no packed
    assert old.packed is None and old.packed_nbytes() == 0 and isinstance(old.weight, torch.nn.Parameter)
    assert "qweight.payload" not in old.state_dict()
    old.packed = qt  # the setter registers the buffers
    assert "qweight.payload" in old.state_dict() and isinstance(old.qweight, PackedWeight)
    assert "int4" in repr(old)
    old.packed = None
    assert old.packed is None and "qweight.payload" not in old.state_dict()
    with pytest.raises(ValueError, match="needs a weight"):
        RotatedQuantLinear(IN, OUT, weight=None, bias=None)
    with pytest.raises(ValueError, match="shape"):
        RotatedQuantLinear(OUT, IN, weight=None, bias=None, packed=qt)
    po = RotatedQuantLinear(IN, OUT, weight=None, bias=None, packed=qt)
    with pytest.raises(ValueError, match="cannot drop"):
        po.packed = None
    assert "packed-only" in repr(po)
