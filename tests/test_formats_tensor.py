"""QuantizedTensor: storage dtypes, exact sizes, save / load and state-dict round trips (bit-exact)."""

import json

import pytest
import torch

from hadakit.formats import (
    QuantizedTensor,
    dequantize,
    get_scheme,
    list_schemes,
    load_quantized,
    quantize,
    save_quantized,
)


pytestmark = pytest.mark.usefixtures("single_thread")


def _x(shape=(8, 128), seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 4


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _same_qt(a: QuantizedTensor, b: QuantizedTensor):
    assert a.shape == b.shape and a.scheme == b.scheme and a.dtype == b.dtype
    assert _same_bits(a.payload, b.payload)
    assert _same_bits(a.scales, b.scales)
    for x, y in ((a.zero_points, b.zero_points), (a.tensor_scale, b.tensor_scale)):
        assert (x is None) == (y is None)
        if x is not None:
            assert _same_bits(x, y)
    da, db = a.dequantize(), b.dequantize()
    assert torch.equal(da.view(torch.int32), db.view(torch.int32))


@pytest.mark.parametrize("name,scale_dtype", [
    ("mxfp4", torch.float8_e8m0fnu), ("nvfp4", torch.float8_e4m3fn), ("int4_g128", torch.float16),
    ("int8", torch.float32), ("fp4_g16_ue5m3", torch.uint8), ("fp8_e4m3", torch.float32),
])
def test_storage_dtypes_and_shapes(name, scale_dtype):
    x = _x((2, 4, 128))
    qt = quantize(x, name)
    assert qt.payload.dtype == torch.uint8 and qt.payload.dim() == 1
    assert qt.scales.dtype == scale_dtype
    s = get_scheme(name)
    expect = {"group": (2, 4, 128 // (s.group_size or 1)), "per_row": (2, 4, 1), "per_tensor": ()}[s.granularity]
    assert tuple(qt.scales.shape) == expect
    assert qt.codes().shape == x.shape
    assert "QuantizedTensor(shape=(2, 4, 128)" in repr(qt)


def test_bits_per_element_and_nbytes():
    x = _x((64, 256))
    n = x.numel()
    cases = {"mxfp4": 4.25, "nvfp4": 4 + 8 / 16 + 32 / n, "int4_g128": 4 + 16 / 128, "mxfp6": 6.25,
             "int3_g128": 3 + 16 / 128, "int2_g64": 2 + 16 / 64, "ternary": 2 + 32 / n, "binary": 1 + 32 / n,
             "int4_g128_asym": 4 + 16 / 128 + 8 / 128, "mxfp8": 8.25}
    for name, bits in cases.items():
        qt = quantize(x, name)
        assert qt.bits_per_element == pytest.approx(bits, rel=0, abs=1e-12), name
        assert qt.nbytes * 8 == round(bits * n), name


def test_native_payload_views():
    x = _x()
    qt = quantize(x, "fp8_e4m3")
    nat = qt.native_payload()
    assert nat.dtype == torch.float8_e4m3fn and nat.shape == x.shape
    # the stored float8 values times the scale are the dequantized values
    assert torch.equal(nat.float() * qt.scale_values(), qt.dequantize())
    assert quantize(x, "mxfp8").native_payload().dtype == torch.float8_e4m3fn
    assert quantize(x, "mxfp4").native_payload() is None


@pytest.mark.parametrize("name", list_schemes())
def test_save_load_roundtrip_bit_exact(name, tmp_path):
    x = _x((4, 3, 128)).to(torch.bfloat16)
    x[0, 0] = 0
    qt = quantize(x, name)
    path = tmp_path / f"{name}.safetensors"
    qt.save(path, metadata={"note": "test"})
    back = QuantizedTensor.load(path)
    _same_qt(qt, back)
    assert back.dtype == torch.bfloat16
    assert torch.equal(dequantize(back, torch.bfloat16).view(torch.int16),
                       qt.dequantize(torch.bfloat16).view(torch.int16))


def test_safetensors_header_metadata(tmp_path):
    from safetensors import safe_open

    qt = quantize(_x(), "nvfp4")
    path = tmp_path / "t.safetensors"
    qt.save(path, metadata={"model": "demo"})
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["model"] == "demo"
    assert "nvfp4" in json.loads(meta["hadakit.quantized"])[""]
    assert keys == {"payload", "scales", "tensor_scale", "qmeta"}


def test_state_dict_prefix_and_many_tensors_in_one_file(tmp_path):
    w1 = quantize(_x((16, 64), 1), "mxfp4")
    w2 = quantize(_x((16, 128), 2), "int4_g128_asym")
    w3 = quantize(_x((16, 64), 3), "nvfp4")
    bias = torch.randn(16)
    sd = w1.state_dict("layers.0.weight.")
    assert set(sd) == {"layers.0.weight." + k for k in ("payload", "scales", "qmeta")}
    _same_qt(QuantizedTensor.from_state_dict(sd, "layers.0.weight."), w1)
    # torch.save of a state dict works too (plain tensors only)
    buf = tmp_path / "sd.pt"
    torch.save(sd, buf)
    _same_qt(QuantizedTensor.from_state_dict(torch.load(buf), "layers.0.weight."), w1)

    path = tmp_path / "model.safetensors"
    save_quantized(path, {"layers.0.weight": w1, "layers.1.weight": w2, "layers.2.weight": w3, "layers.0.bias": bias})
    loaded = load_quantized(path)
    assert set(loaded) == {"layers.0.weight", "layers.1.weight", "layers.2.weight", "layers.0.bias"}
    _same_qt(loaded["layers.0.weight"], w1)
    _same_qt(loaded["layers.1.weight"], w2)
    _same_qt(loaded["layers.2.weight"], w3)
    assert torch.equal(loaded["layers.0.bias"], bias)
    with pytest.raises(KeyError, match="missing 'nope.qmeta'"):
        QuantizedTensor.from_state_dict(sd, "nope.")


def test_constructor_validates_layout():
    qt = quantize(_x(), "mxfp4")
    with pytest.raises(ValueError, match="payload must be a 1-D uint8 tensor of 512 bytes"):
        QuantizedTensor(qt.payload[:-1], qt.scales, qt.shape, qt.scheme)
    with pytest.raises(ValueError, match="scales must be"):
        QuantizedTensor(qt.payload, qt.scales.view(torch.uint8), qt.shape, qt.scheme)
    with pytest.raises(ValueError, match="tensor_scale"):
        QuantizedTensor(qt.payload, qt.scales, qt.shape, qt.scheme, tensor_scale=torch.tensor(1.0))
    nv = quantize(_x(), "nvfp4")
    with pytest.raises(ValueError, match="tensor_scale"):
        QuantizedTensor(nv.payload, nv.scales, nv.shape, nv.scheme)


def test_to_device_copy():
    qt = quantize(_x(), "nvfp4")
    c = qt.to("cpu")
    _same_qt(qt, c)
    assert c.device.type == "cpu"
    if torch.cuda.is_available():
        g = qt.to("cuda")
        assert g.device.type == "cuda" and g.scales.is_cuda and g.tensor_scale.is_cuda
        assert torch.equal(g.dequantize().cpu(), qt.dequantize())
        _same_qt(g.cpu(), qt)
