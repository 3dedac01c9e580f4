"""QuantScheme: presets, JSON round trip, validation messages, exact bits-per-element arithmetic."""

import json

import pytest
import torch

from hadakit.formats import QuantScheme, get_format, get_scheme, list_schemes


pytestmark = pytest.mark.usefixtures("single_thread")

REQUIRED = ["int8", "int4", "int4_g128", "int4_g32", "int2_g64", "int3_g128", "ternary", "binary", "fp8_e4m3",
            "fp8_e5m2", "mxfp8", "mxfp8_e5m2", "mxfp6", "mxfp6_e3m2", "mxfp4", "mxint8", "nvfp4", "nvint4"]


def test_required_presets_exist():
    names = list_schemes()
    for n in REQUIRED:
        assert n in names
        assert get_scheme(n).name == n


@pytest.mark.parametrize("name,element,gran,g,scale,rule,ts", [
    ("mxfp4", "e2m1", "group", 32, "e8m0", "floor", False),
    ("mxfp8", "e4m3", "group", 32, "e8m0", "floor", False),
    ("mxfp8_e5m2", "e5m2", "group", 32, "e8m0", "floor", False),
    ("mxfp6", "e2m3", "group", 32, "e8m0", "floor", False),
    ("mxfp6_e3m2", "e3m2", "group", 32, "e8m0", "floor", False),
    ("mxint8", "int8_frac6", "group", 32, "e8m0", "floor", False),
    ("nvfp4", "e2m1", "group", 16, "ue4m3", "amax", True),
    ("nvint4", "int4", "group", 16, "ue4m3", "amax", True),
    ("int4_g128", "int4", "group", 128, "fp16", "amax", False),
    ("int8", "int8", "per_row", None, "fp32", "amax", False),
    ("ternary", "ternary", "per_tensor", None, "fp32", "absmean", False),
    ("fp8_e4m3", "e4m3", "per_tensor", None, "fp32", "amax", False),
])
def test_preset_definitions(name, element, gran, g, scale, rule, ts):
    s = get_scheme(name)
    assert s.element is get_format(element)
    got = (s.granularity, s.group_size, s.scale_format.name, s.scale_rule, s.tensor_scale)
    assert got == (gran, g, scale, rule, ts)


@pytest.mark.parametrize("name", list_schemes())
def test_to_dict_from_dict_json_roundtrip(name):
    s = get_scheme(name)
    d = json.loads(json.dumps(s.to_dict()))
    assert QuantScheme.from_dict(d) == s
    assert get_scheme(d) == s


def test_custom_formats_roundtrip():
    from hadakit.formats import FloatFormat

    s = QuantScheme(FloatFormat("e3m3", 3, 3, 3, "none"), "group", 8, scale_format="bf16")
    d = json.loads(json.dumps(s.to_dict()))
    assert isinstance(d["element"], dict)
    assert QuantScheme.from_dict(d) == s


def test_overrides_and_aliases():
    s = get_scheme("mxfp4", scale_rule="ceil")
    assert s.scale_rule == "ceil" and s.name is None
    assert get_scheme("mxfp4", scale_rule="ceil", name="mxfp4_ceil").name == "mxfp4_ceil"
    assert QuantScheme("int8", "per_channel").granularity == "per_row"
    assert QuantScheme("int8", "per_token").granularity == "per_row"
    assert QuantScheme("int4", "group(128)", scale_format="fp16", int_range="full") == get_scheme("int4_g128").replace()
    with pytest.raises(ValueError, match="int_range"):
        QuantScheme("e2m1", "group(32)", int_range="full")
    with pytest.raises(ValueError, match="contradicts"):
        QuantScheme("int4", "group(128)", 64)
    assert "group(32)" in get_scheme("mxfp4").describe()


@pytest.mark.parametrize("kwargs,match", [
    (dict(element="int4", granularity="group"), "positive int group_size"),
    (dict(element="int4", granularity="per_row", group_size=32), "only used with granularity='group'"),
    (dict(element="int4", granularity="diagonal"), "granularity must be one of"),
    (dict(element="e2m1", symmetric=False), "asymmetric quantization needs a plain INT"),
    (dict(element="int4", granularity="group", group_size=16, scale_format="ue4m3", tensor_scale=True,
          scale_rule="floor"), "tensor_scale"),
    (dict(element="int4", tensor_scale=True), "not per_tensor"),
    (dict(element="int4", scale_rule="median"), "scale_rule must be one of"),
    (dict(element="int4", rounding="up"), "rounding must be one of"),
    (dict(element="int4", clip_ratio=1.5), r"clip_ratio must be in \(0, 1\]"),
    (dict(element="int4", clip_ratio=0.9, clip_search=True), "either clip_ratio"),
    (dict(element="ternary", scale_rule="absmean", clip_ratio=0.9), "absmean"),
    (dict(element="fp16"), "element format must be"),
    (dict(element="ue4m3"), "unsigned"),
    (dict(element="int4", scale_format="int8"), "scale format must be"),
    (dict(element="e9m9"), "unknown format"),
])
def test_validation_messages(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantScheme(**kwargs)


def test_unknown_names():
    with pytest.raises(ValueError, match="unknown scheme 'mxfp3'; presets: int8"):
        get_scheme("mxfp3")
    with pytest.raises(ValueError, match=r"unknown QuantScheme fields \['blocks'\]"):
        QuantScheme.from_dict({"element": "int4", "blocks": 3})
    with pytest.raises(TypeError):
        get_scheme(3)


def test_group_must_divide_last_dim_message():
    s = get_scheme("int4_g128")
    with pytest.raises(ValueError) as e:
        s.layout((4, 200))
    msg = str(e.value)
    assert "group size 128 does not divide the last dimension (200)" in msg
    assert "valid group sizes for 200: 1, 2, 4, 5, 8, 10, 20, 25, 40, 50, 100, 200" in msg


def test_layout_shapes():
    assert get_scheme("mxfp4").layout((3, 5, 64)) == ((15, 2, 32), (3, 5, 2))
    assert get_scheme("int8").layout((3, 5, 64)) == ((15, 1, 64), (3, 5, 1))
    assert get_scheme("fp8_e4m3").layout((3, 5, 64)) == ((1, 1, 960), ())
    assert get_scheme("int8").layout((7,)) == ((1, 1, 7), (1,))
    assert get_scheme("fp8_e4m3").layout(()) == ((1, 1, 1), ())


@pytest.mark.parametrize("name,shape,bits", [
    ("mxfp4", (64, 256), 4 + 8 / 32),
    ("mxfp8", (64, 256), 8 + 8 / 32),
    ("mxfp6", (64, 256), 6 + 8 / 32),
    ("mxint8", (64, 256), 8 + 8 / 32),
    ("nvfp4", (64, 256), 4 + 8 / 16 + 32 / (64 * 256)),
    ("nvint4", (64, 256), 4 + 8 / 16 + 32 / (64 * 256)),
    ("int4_g128", (64, 256), 4 + 16 / 128),
    ("int4_g32", (64, 256), 4 + 16 / 32),
    ("int4_g128_asym", (64, 256), 4 + 16 / 128 + 8 / 128),
    ("int3_g128", (64, 256), 3 + 16 / 128),
    ("int2_g64", (64, 256), 2 + 16 / 64),
    ("int8", (64, 256), 8 + 32 / 256),
    ("ternary", (64, 256), 2 + 32 / (64 * 256)),
    ("binary", (64, 256), 1 + 32 / (64 * 256)),
    ("fp8_e4m3", (64, 256), 8 + 32 / (64 * 256)),
    ("fp4_g16_ue5m3", (64, 256), 4 + 8 / 16),
    ("int3_g128", (1, 128 * 3), (8 * 144 + 3 * 16) / 384),
    ("ternary", (5,), (8 * 2 + 32) / 5),  # 5 two-bit codes pad to 2 bytes
])
def test_bits_per_element_exact(name, shape, bits):
    s = get_scheme(name)
    assert s.bits_per_element(shape) == pytest.approx(bits, rel=0, abs=1e-12)
    from hadakit.formats import quantize

    assert quantize(torch.randn(shape), s).bits_per_element == pytest.approx(bits, rel=0, abs=1e-12)
