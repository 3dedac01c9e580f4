"""Export of hadakit checkpoints to compressed-tensors (hadakit.io), checked against compressed-tensors' own code.

Tiny Llama-shaped models (seeded random weights; hidden 640 = 20·32, 384 = 12·32 and 256 = 2^8, so Paley and
Sylvester Hadamards both occur) are quantized and saved by hadakit, exported, and loaded back with transformers +
compressed-tensors on the CPU: weights decompressed by compressed-tensors' decompressors must equal hadakit's
dequantized weights bit for bit, the online transforms are attached from the saved ``transform_config`` with
compressed-tensors' ``apply_transform_config``, and the logits are compared with ``hadakit.load``'s. The measured
numbers are printed (``pytest -s``) and recorded in docs/export.md.
"""

from __future__ import annotations

import copy
import json
import math
import re
import warnings

import pytest
import torch

pytest.importorskip("compressed_tensors")
transformers = pytest.importorskip("transformers")

import hadakit  # noqa: E402
from hadakit.formats import QuantizedTensor, fake_quantize  # noqa: E402
from hadakit.formats.packing import pack_codes  # noqa: E402
from hadakit.formats.quantize import compute_scales, quantize_with_scales  # noqa: E402
from hadakit.io import (  # noqa: E402
    EXPORT_MARKER,
    ExportTargetError,
    ScaleNotRepresentableError,
    UnsupportedCheckpointError,
    UnsupportedSchemeError,
    VLLMCompatibilityWarning,
    export_compressed_tensors,
    load_exported_model,
)
from hadakit.io.checkpoint import save_quantized_model  # noqa: E402
from hadakit.quantization.pipeline import quantize_model  # noqa: E402
from hadakit.quantization.qlinear import RotatedQuantLinear  # noqa: E402
from hadakit.quantization.recipes import get_recipe  # noqa: E402

VOCAB = 512
SHAPES = {  # hidden, intermediate, heads, kv heads, head_dim
    640: (640, 1536, 5, 1, 128),
    384: (384, 768, 6, 2, 64),
    256: (256, 512, 4, 2, 64),
}


def _llama(hidden: int, layers: int = 1, *, bias: bool = False, seed: int = 0):
    h, inter, heads, kv, hd = SHAPES[hidden]
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
                                   num_attention_heads=heads, num_key_value_heads=kv, head_dim=hd,
                                   max_position_embeddings=64, tie_word_embeddings=False, attention_bias=bias)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def _checkpoint(tmp, spec, hidden, layers=1, *, bias=False, recipe=None, edit=None, name="ckpt"):
    """Quantize a fresh tiny Llama with ``spec`` and save it to ``tmp/name``; ``edit(model, fp_model)`` may change
    the quantized model (and return a new recipe) before saving."""
    recipe = recipe or get_recipe(spec)
    model = _llama(hidden, layers, bias=bias)
    fp = copy.deepcopy(model)
    quantize_model(model, recipe)
    if edit is not None:
        recipe = edit(model, fp) or recipe
    return save_quantized_model(model, None, recipe, tmp / name)


def _ids(seed=1, n=2, length=24):
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def _agreement(ref, got):
    rel = float((ref - got).abs().max() / ref.abs().max())
    argmax = float((ref.argmax(-1) == got.argmax(-1)).float().mean())
    return rel, argmax


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _qlinears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, RotatedQuantLinear)}


def _export(ckpt, out, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", VLLMCompatibilityWarning)
        return export_compressed_tensors(ckpt, out, **kw)


def _state(out):
    from safetensors.torch import load_file

    return load_file(str(out / "model.safetensors"))


def _decompress(out, name, fmt):
    """compressed-tensors' own decompressor on one linear's exported tensors."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    config = QuantizationConfig.model_validate({k: v for k, v in qc.items()
                                                 if k not in ("version", "sparsity_config", "transform_config")})
    (scheme,) = config.config_groups.values()
    prefix = name + "."
    local = {k[len(prefix):]: v for k, v in _state(out).items() if k.startswith(prefix) and "_input." not in k}
    return BaseCompressor.get_value_from_registry(fmt).decompress(local, scheme)["weight"]


# ----------------------------------------------------------------------------------------------------------------
# W4A16: INT4 g128 (fp16 scales), random Hadamard rotations on 640 = 20·32, 1536 = 12·128
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def w4a16(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("w4a16")
    ckpt = _checkpoint(tmp, "w4a16_g128:random:rtn", 640, layers=2)
    with pytest.warns(VLLMCompatibilityWarning, match=re.escape("vLLM refuses this export at load")):
        out = export_compressed_tensors(ckpt, tmp / "export")
    return ckpt, out, hadakit.load(ckpt), load_exported_model(out)


def test_w4a16_config_is_compressed_tensors_and_transformers_ignores_the_transforms(w4a16):
    from compressed_tensors.transform import TransformConfig
    from safetensors import safe_open

    ckpt, out, hk, ct_model = w4a16
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["quantization_status"] == "compressed" and qc["ignore"] == ["lm_head"]
    (group,) = qc["config_groups"].values()
    assert group["targets"] == ["Linear"] and group["format"] == "pack-quantized"
    assert {k: group["weights"][k] for k in ("num_bits", "type", "symmetric", "strategy", "group_size", "dynamic")} \
        == dict(num_bits=4, type="int", symmetric=True, strategy="group", group_size=128, dynamic=False)
    assert group["input_activations"] is None
    # transformers' CompressedTensorsConfig drops transform_config: its compressor never sees it
    assert ct_model.hf_quantizer.compressor.transform_config is None
    tc = TransformConfig.model_validate(qc["transform_config"])
    qlin = _qlinears(hk)
    # random signs are drawn per linear, so every linear has its own matrix: one group each
    assert len(tc.config_groups) == len(qlin) == 14
    marker = json.loads((out / EXPORT_MARKER).read_text())
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        for gname, scheme in tc.config_groups.items():
            assert scheme.type == "random-hadamard" and scheme.head_dim is None and not scheme.randomize
            ((args,),) = [scheme.apply]
            assert args.location == "input" and not args.inverse
            (name,) = args.targets
            w = f.get_tensor(f"{name}.{gname}_input.weight")
            n = qlin[name].in_features
            assert w.dtype == torch.bfloat16 and w.shape == (n, n) and bool((w.abs() == 1).all())
            # x @ W / sqrt(n) is hadakit's x·Rᵀ
            R = qlin[name].rotation.matrix(torch.float64)
            assert torch.equal(w.double(), (R.t() * math.sqrt(n)).round())
            assert marker["linears"][name]["transform"] == gname
    assert marker["kind"] == "hadakit compressed-tensors export" and marker["recipe"]["name"] == "w4a16_g128"
    assert any("Must have same input" in note for note in marker["vllm_notes"])


def test_w4a16_weights_decompress_bit_identical(w4a16):
    ckpt, out, hk, ct_model = w4a16
    mods = dict(ct_model.named_modules())
    for name, mod in _qlinears(hk).items():
        assert mods[name].weight.dtype == torch.float32
        assert torch.equal(mods[name].weight, mod.weight), name  # the rotated basis, as hadakit stores it
    name = "model.layers.1.mlp.down_proj"
    got = _decompress(out, name, "pack-quantized")  # the decompressor alone, fp16 scales -> fp16 arithmetic
    assert torch.equal(got.float(), mods[name].weight.to(torch.float16).float())


def test_w4a16_logits_match_hadakit_and_not_without_transforms(w4a16):
    ckpt, out, hk, ct_model = w4a16
    ids = _ids()
    ref = _logits(hk, ids)
    rel, argmax = _agreement(ref, _logits(ct_model, ids))
    bare_rel, bare_argmax = _agreement(ref, _logits(load_exported_model(out, transforms=False), ids))
    print(f"\nW4A16 g128 (640, random): rel {rel:.2e} argmax {argmax:.3f}; without transforms: rel {bare_rel:.3f} "
          f"argmax {bare_argmax:.3f}")
    assert argmax == 1.0 and rel <= 1e-3
    assert bare_rel > 0.3 and bare_argmax < 0.5  # negative control: the transforms are what makes it right


def test_w4a16_per_channel_plain_hadamard_shares_transforms_vllm_can_fuse(tmp_path):
    ckpt = _checkpoint(tmp_path, "w4a16:hadamard:rtn", 256)
    with warnings.catch_warnings():
        warnings.simplefilter("error", VLLMCompatibilityWarning)  # q/k/v and gate/up share their input transform
        out = export_compressed_tensors(ckpt, tmp_path / "export")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    (group,) = qc["config_groups"].values()
    assert group["weights"]["strategy"] == "channel" and group["weights"].get("group_size") is None
    groups = qc["transform_config"]["config_groups"]
    sizes = sorted(len(g["apply"][0]["targets"]) for g in groups.values())
    assert sizes == [1, 6]  # one 256 Sylvester matrix for q/k/v/o/gate/up, one 512 for down_proj
    hk, ct_model = hadakit.load(ckpt), load_exported_model(out)
    mods = dict(ct_model.named_modules())
    assert all(torch.equal(mods[n].weight, m.weight) for n, m in _qlinears(hk).items())
    rel, argmax = _agreement(_logits(hk, _ids()), _logits(ct_model, _ids()))
    print(f"\nW4A16 per channel (256, hadamard): rel {rel:.2e} argmax {argmax:.3f}")
    assert argmax == 1.0 and rel <= 1e-3


# ----------------------------------------------------------------------------------------------------------------
# W8A8: INT8 per channel, INT8 per-token dynamic activations (compressed-tensors fake-quantizes them in forward)
# ----------------------------------------------------------------------------------------------------------------


def test_w8a8_int8_rule_weights_and_logits(tmp_path):
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    ckpt = _checkpoint(tmp_path, "w8a8:random:rtn", 384)
    out = _export(ckpt, tmp_path / "export")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    (group,) = qc["config_groups"].values()
    assert qc["format"] == "int-quantized"
    assert {k: group["input_activations"][k] for k in ("num_bits", "type", "symmetric", "strategy", "dynamic")} \
        == dict(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
    assert _state(out)["model.layers.0.self_attn.q_proj.weight"].dtype == torch.int8
    hk, ct_model = hadakit.load(ckpt), load_exported_model(out)
    mods = dict(ct_model.named_modules())
    qlin = _qlinears(hk)
    assert all(torch.equal(mods[n].weight, m.weight) for n, m in qlin.items())

    # 1. the activation quantizer: compressed-tensors' dynamic per-token INT8 (scale amax/127.5, round half to even,
    #    clamp to [-128, 127]) is hadakit's int8 rule bit for bit, on the same input
    x = torch.randn(2, 24, 384, generator=torch.Generator().manual_seed(0)) * 3
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"):
        h, c = qlin[name], mods[name]
        xi = x if h.in_features == 384 else \
            torch.randn(2, 24, h.in_features, generator=torch.Generator().manual_seed(1)) * 3
        xr = h.transform_input(xi)
        assert torch.equal(forward_quantize(c, xr, "input", c.quantization_scheme.input_activations),
                           fake_quantize(xr, h.act_scheme))
        # 2. the transforms: compressed-tensors' dense x @ W / sqrt(n) is hadakit's FWHT up to float32 rounding
        (tmod,) = [m for k, m in c.named_children() if k.endswith("_input")]
        assert float((tmod(xi) - xr).abs().max() / xr.abs().max()) < 1e-6

    # 3. end to end: with hadakit's rotation computed by compressed-tensors' transform module, the logits agree;
    #    with hadakit's own FWHT the float32 rounding of the rotation flips a few INT8 codes at rounding
    #    boundaries, which this random model amplifies (hadakit against itself with 1e-7 relative noise on the
    #    rotated activations moves just as much)
    ids = _ids()
    ref = _logits(hk, ids)
    got = _logits(ct_model, ids)
    rel_raw, argmax_raw = _agreement(ref, got)
    for name, h in qlin.items():
        tmod = [m for k, m in mods[name].named_children() if k.endswith("_input")][0]
        h.transform_input = lambda x, tmod=tmod: tmod(x)  # a plain function: shadows the method on the instance
    rel, argmax = _agreement(_logits(hk, ids), got)
    for h in qlin.values():
        del h.transform_input
    torch.manual_seed(0)
    for h in qlin.values():
        h.transform_input = (lambda x, h=h: (lambda y: y * (1 + 1e-7 * torch.randn_like(y)))(
            RotatedQuantLinear.transform_input(h, x)))
    rel_self, _ = _agreement(ref, _logits(hk, ids))
    print(f"\nW8A8 (384, random): same rotation arithmetic rel {rel:.2e} argmax {argmax:.3f}; hadakit FWHT vs "
          f"compressed-tensors GEMM rel {rel_raw:.2e} argmax {argmax_raw:.3f}; hadakit vs itself with 1e-7 noise "
          f"rel {rel_self:.2e}")
    assert argmax == 1.0 and rel <= 1e-3
    assert argmax_raw >= 0.9 and rel_raw <= 10 * max(rel_self, 1e-3)


# ----------------------------------------------------------------------------------------------------------------
# NVFP4 and MXFP4
# ----------------------------------------------------------------------------------------------------------------


def _shared_pow2_tensor_scales(model, fp):
    """Re-quantize every NVFP4 weight with one power-of-two tensor scale per input group (q/k/v, gate/up share
    one), the layout vLLM can serve exactly: what hadakit's quantizer would have to produce."""
    fpm = dict(fp.named_modules())
    groups: dict[str, list[str]] = {}
    for name in _qlinears(model):
        parent, _, leaf = name.rpartition(".")
        key = parent + (".qkv" if leaf in ("q_proj", "k_proj", "v_proj") else
                        ".gate_up" if leaf in ("gate_proj", "up_proj") else "." + leaf)
        groups.setdefault(key, []).append(name)
    mods = dict(model.named_modules())
    for names in groups.values():
        rot = {n: (mods[n].rotation(fpm[n].weight.detach()) if mods[n].rotation is not None
                   else fpm[n].weight.detach()) for n in names}
        scheme = mods[names[0]].packed.scheme
        amax = max(float(w.abs().max()) for w in rot.values())
        st = torch.tensor(2.0 ** math.ceil(math.log2(amax / (6 * 448))), dtype=torch.float32)
        for n in names:
            gs = compute_scales(rot[n], scheme, tensor_scale=st)
            codes, _ = quantize_with_scales(rot[n], scheme, gs)
            _, sshape = scheme.layout(rot[n].shape)
            qt = QuantizedTensor(pack_codes(codes, 4), scheme.scale_format.codes_to_storage(gs.scale_codes)
                                 .reshape(sshape), rot[n].shape, scheme, tensor_scale=st.clone())
            mods[n].packed = qt
            mods[n].weight.data = qt.dequantize(torch.float32)


def _weights_only(model, recipe):
    for m in _qlinears(model).values():
        m.act_scheme = None
    return recipe.__class__.from_dict({**recipe.to_dict(), "act": None})


def _check_fp4_logits(hk, ct_model, act, label):
    """Weights only: the logits agree. With FP4 activations the two dynamic rules differ (NVFP4: vLLM's static
    input_global_scale against hadakit's per-call tensor scale; MXFP4: compressed-tensors rounds a block's
    power-of-two scale up when the block maximum's mantissa is >= 1.75, OCP's rule floors it), so the logits move
    by about what FP4 activation quantization itself moves them, and no more."""
    ids = _ids()
    ref = _logits(hk, ids)
    rel, argmax = _agreement(ref, _logits(ct_model, ids))
    if not act:
        print(f"\n{label} W4A16: rel {rel:.2e} argmax {argmax:.3f}")
        assert argmax == 1.0 and rel <= 1e-3
        return
    for m in _qlinears(hk).values():
        m.act_scheme = None
    noise_rel, noise_argmax = _agreement(_logits(hk, ids), ref)
    print(f"\n{label} W4A4: rel {rel:.2e} argmax {argmax:.3f}; hadakit's own FP4 activation noise (W4A4 vs W4A16) "
          f"rel {noise_rel:.2e} argmax {noise_argmax:.3f}")
    assert rel <= 1.5 * noise_rel and argmax >= noise_argmax - 0.2


def test_nvfp4_refuses_non_power_of_two_tensor_scales(tmp_path):
    ckpt = _checkpoint(tmp_path, "nvfp4_w:hadamard:rtn", 256)
    with pytest.raises(ScaleNotRepresentableError, match=r"model\.layers\.0\.self_attn\.\w_proj: NVFP4 tensor "
                       r"scale [0-9.e+-]+ has no float32 global scale g with e4m3_scale / g == e4m3_scale · "
                       r"tensor_scale \(compressed-tensors\) and 1 / g == tensor_scale \(vLLM\): only a "
                       r"power-of-two tensor scale is exact in both; re-quantize"):
        export_compressed_tensors(ckpt, tmp_path / "export")
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize("act", [False, True], ids=["nvfp4_w", "nvfp4"])
def test_nvfp4_weights_decompress_bit_identical(tmp_path, act):
    recipe = get_recipe("nvfp4:hadamard:rtn")

    def edit(model, fp):
        _shared_pow2_tensor_scales(model, fp)
        return None if act else _weights_only(model, recipe)

    ckpt = _checkpoint(tmp_path, None, 256, recipe=recipe, edit=edit)
    out = export_compressed_tensors(ckpt, tmp_path / "export", calib=_ids(seed=5, n=2, length=16))
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    (group,) = qc["config_groups"].values()
    assert qc["format"] == "nvfp4-pack-quantized" and group["weights"]["strategy"] == "tensor_group"
    state = _state(out)
    hk = hadakit.load(ckpt)
    for name, mod in _qlinears(hk).items():
        w = _decompress(out, name, "nvfp4-pack-quantized")  # compressed-tensors decompresses NVFP4 to bf16
        assert w.dtype == torch.bfloat16 and torch.equal(w.float(), mod.weight), name
        assert state[f"{name}.weight_global_scale"] == 1 / mod.packed.tensor_scale
        assert (f"{name}.input_global_scale" in state) == act
    _check_fp4_logits(hk, load_exported_model(out), act, "NVFP4 (256, hadamard)")


@pytest.mark.parametrize("act", [False, True], ids=["mxfp4_w", "mxfp4"])
def test_mxfp4_weights_decompress_bit_identical(tmp_path, act):
    recipe = get_recipe("mxfp4:random:rtn")
    ckpt = _checkpoint(tmp_path, None, 256, recipe=recipe,
                       edit=None if act else (lambda model, fp: _weights_only(model, recipe)))
    out = _export(ckpt, tmp_path / "export")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    (group,) = qc["config_groups"].values()
    assert qc["format"] == "mxfp4-pack-quantized" and group["weights"]["group_size"] == 32
    assert (group["input_activations"] is not None) == act
    hk = hadakit.load(ckpt)
    for name, mod in _qlinears(hk).items():
        w = _decompress(out, name, "mxfp4-pack-quantized")
        assert w.dtype == torch.bfloat16 and torch.equal(w.float(), mod.weight), name
    _check_fp4_logits(hk, load_exported_model(out), act, "MXFP4 (256, random)")


# ----------------------------------------------------------------------------------------------------------------
# Refusals and the output directory
# ----------------------------------------------------------------------------------------------------------------


def test_refuses_kv_cache_quantization(tmp_path):
    ckpt = _checkpoint(tmp_path, "w4a4kv4:hadamard:rtn", 256)
    msg = (f"{ckpt}: recipe 'w4a4kv4 hadamard rtn' quantizes the KV cache (hadakit: asymmetric integer per head "
           f"and token after a Hadamard on head_dim); vLLM's compressed-tensors KV cache is FP8 only, nothing below "
           f"8 bits: re-quantize without KV quantization")
    with pytest.raises(UnsupportedCheckpointError, match=f"^{re.escape(msg)}$"):
        export_compressed_tensors(ckpt, tmp_path / "export")


def test_refuses_fusevo(tmp_path):
    ckpt = _checkpoint(tmp_path, "w4a16_g128:random:rtn:fusevo", 256)
    msg = (f"{ckpt}: recipe 'w4a16_g128 random rtn +fusevo' uses fusevo: o_proj keeps only a head-mix rotation "
           f"(H_heads ⊗ I) online, which compressed-tensors' Hadamard transforms do not describe: re-quantize "
           f"without fusevo")
    with pytest.raises(UnsupportedCheckpointError, match=f"^{re.escape(msg)}$"):
        export_compressed_tensors(ckpt, tmp_path / "export")


def test_refuses_a_biased_linear_with_a_rotation(tmp_path):
    ckpt = _checkpoint(tmp_path, "w4a16_g128:hadamard:rtn", 256, bias=True)
    msg = ("model.layers.0.self_attn.q_proj: a biased linear with an online rotation; vLLM's transformed linears "
           "take no bias (CompressedTensorsLinearTransformMethod asserts bias is None): re-quantize it without "
           "rotation (rotation 'none') or skip it")
    with pytest.raises(UnsupportedCheckpointError, match=f"^{re.escape(msg)}$"):
        export_compressed_tensors(ckpt, tmp_path / "export")
    # without a rotation the bias is exported as it is
    ckpt2 = _checkpoint(tmp_path, "w4a16_g128:none:rtn", 256, bias=True, name="ckpt_none")
    out = export_compressed_tensors(ckpt2, tmp_path / "export2")
    hk, ct_model = hadakit.load(ckpt2), load_exported_model(out)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["transform_config"] == {}
    rel, argmax = _agreement(_logits(hk, _ids()), _logits(ct_model, _ids()))
    assert argmax == 1.0 and rel <= 1e-5


def test_refuses_activation_schemes_without_an_equivalent(tmp_path):
    ckpt = _checkpoint(tmp_path, "w4a4:hadamard:rtn", 256)
    with pytest.raises(UnsupportedSchemeError, match=r"^model\.layers\.0\.self_attn\.q_proj: activation scheme "
                       r"'int4: int4, per_row, scale=fp32/amax, full range' with weights 'int4_g128: int4, "
                       r"group\(128\), scale=fp16/amax, full range' has no compressed-tensors equivalent"):
        export_compressed_tensors(ckpt, tmp_path / "export")


def test_refuses_asymmetric_weights(tmp_path):
    import compressed_tensors

    ckpt = _checkpoint(tmp_path, None, 256, recipe=get_recipe("w4a16_g128:hadamard:rtn", weight="int4_g128_asym"))
    msg = (f"model.layers.0.self_attn.q_proj: weight scheme 'int4_g128_asym: int4, group(128), scale=fp16/amax, "
           f"asymmetric' is asymmetric; compressed-tensors {compressed_tensors.__version__}'s transformers loader "
           f"allocates unpacked zero points for pack-quantized weights and rejects the packed ones its decompressor "
           f"and vLLM read, so no layout loads in both: export symmetric integer weights (int4_g128, int4, int8)")
    with pytest.raises(UnsupportedSchemeError, match=f"^{re.escape(msg)}$"):
        export_compressed_tensors(ckpt, tmp_path / "export")


def test_output_directory_rules(tmp_path):
    ckpt = _checkpoint(tmp_path, "w4a16_g128:hadamard:rtn", 256)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    msg = (f"refusing to replace {foreign}: it is not a hadakit export (it has no {EXPORT_MARKER} written by "
           f"hadakit), and --force only replaces a previous hadakit export; remove it yourself or name a new "
           f"directory")
    with pytest.raises(ExportTargetError, match=f"^{re.escape(msg)}$"):
        export_compressed_tensors(ckpt, foreign, force=True)
    assert (foreign / "notes.txt").read_text() == "keep me"
    (foreign / EXPORT_MARKER).write_text('{"kind": "something else"}')
    with pytest.raises(ExportTargetError, match=f"^{re.escape(msg)}$"):
        export_compressed_tensors(ckpt, foreign, force=True)
    with pytest.raises(ExportTargetError, match="is \\(inside\\) the checkpoint"):
        export_compressed_tensors(ckpt, ckpt / "export")

    out = export_compressed_tensors(ckpt, tmp_path / "export")
    with pytest.raises(FileExistsError, match=re.escape(f"output directory {out} already exists; pass force=True "
                                                        f"(--force) to replace a previous export")):
        export_compressed_tensors(ckpt, out)
    (out / "stale.txt").write_text("from the previous export")
    assert export_compressed_tensors(ckpt, out, force=True) == out  # a previous export: replaced as a whole
    assert not (out / "stale.txt").exists() and (out / EXPORT_MARKER).is_file()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # no temporary directories left behind


# ----------------------------------------------------------------------------------------------------------------
# The real model
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.model
def test_gemma3_w4a16_export_matches_hadakit(tmp_path):
    from hadakit.io.loading import load_model
    from hadakit.io.texts import make_windows, read_text

    model, tok = load_model(None)
    recipe = get_recipe("w4a16_g128:random:rtn")
    quantize_model(model, recipe)
    ckpt = save_quantized_model(model, tok, recipe, tmp_path / "ckpt")
    del model
    out = _export(ckpt, tmp_path / "export")
    ids = make_windows(tok, read_text("macbeth"), window=32, n_windows=1)
    hk = hadakit.load(ckpt)
    ref = _logits(hk, ids)
    del hk
    rel, argmax = _agreement(ref, _logits(load_exported_model(out), ids))
    bare_rel, bare_argmax = _agreement(ref, _logits(load_exported_model(out, transforms=False), ids))
    print(f"\nGemma 3 270M W4A16 g128 random: rel {rel:.2e} argmax {argmax:.3f}; without transforms rel "
          f"{bare_rel:.3f} argmax {bare_argmax:.3f}")
    assert argmax == 1.0 and rel <= 1e-3
    assert bare_rel > 0.3 and bare_argmax < 0.5
