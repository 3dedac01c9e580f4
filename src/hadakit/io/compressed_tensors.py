"""Export a packed hadakit checkpoint as a compressed-tensors model directory (what vLLM serves).

``export_compressed_tensors(CKPT, OUT)`` reads the files ``hadakit quantize ... --out CKPT`` wrote (``hadakit.json``,
``recipe.json``, ``model.safetensors``, ``config.json``, the tokenizer) and writes ``OUT`` with

* ``model.safetensors``: every quantized linear in the compressed-tensors layout of its scheme — the element codes
  and scales are hadakit's own, re-packed, never re-quantized — the online rotation matrices as transform weights
  (``<linear>.<group>_input.weight``), and every other tensor as the checkpoint stores it;
* ``config.json``: the checkpoint's config plus ``quantization_config`` (``quant_method: compressed-tensors``,
  ``config_groups`` of ``QuantizationScheme`` s, ``ignore``, ``format``, ``transform_config``);
* the tokenizer files, and ``hadakit_export.json`` (the marker: source, recipe, what was written and why).

Scheme mapping (weights ``[out, in]``, groups along ``in``; docs/export.md has the full table):

==========================  ========================  ==============================================================
hadakit weight / act        compressed-tensors format  QuantizationArgs
==========================  ========================  ==============================================================
int4 / int8, per row or g   ``pack-quantized``         int, symmetric, ``channel`` / ``group``, static
int8 per row + int8 act     ``int-quantized``          weights int8 ``channel``; inputs int8 ``token``, dynamic
nvfp4 (+ nvfp4 act)         ``nvfp4-pack-quantized``   float 4 ``tensor_group`` 16, E4M3 scales; inputs ``local``
mxfp4 (+ mxfp4 act)         ``mxfp4-pack-quantized``   float 4 ``group`` 32, E8M0 (uint8) scales; inputs dynamic
==========================  ========================  ==============================================================

Every exported weight is checked bit for bit: the tensors written are decoded with compressed-tensors' arithmetic
(float32) and compared with ``QuantizedTensor.dequantize``; a scale that compressed-tensors cannot hold exactly
raises :class:`ScaleNotRepresentableError`. What vLLM cannot run is refused with a named ``ValueError``
(:class:`UnsupportedCheckpointError`, :class:`UnsupportedSchemeError`), never written approximately; what only
vLLM refuses at load time (projections it fuses with different input rotations, tensor parallelism with online
transforms) is reported as a :class:`VLLMCompatibilityWarning` and in the marker file.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hadakit.outdir import OutputDirError, check_output_dir, write_dir_atomically

__all__ = [
    "EXPORT_MARKER",
    "CalibrationRequiredError",
    "ExportError",
    "ExportTargetError",
    "ScaleNotRepresentableError",
    "UnsupportedCheckpointError",
    "UnsupportedSchemeError",
    "VLLMCompatibilityWarning",
    "export_compressed_tensors",
    "load_exported_model",
]

#: The marker file every export holds; ``force=True`` only ever replaces a directory that has it.
EXPORT_MARKER = "hadakit_export.json"
MARKER_KIND = "hadakit compressed-tensors export"
EXPORT_VERSION = 1

_CKPT_META, _CKPT_RECIPE, _CKPT_WEIGHTS, _CONFIG = "hadakit.json", "recipe.json", "model.safetensors", "config.json"
_NOT_COPIED = {_CKPT_META, _CKPT_RECIPE, _CKPT_WEIGHTS, _CONFIG, EXPORT_MARKER}
# vLLM fuses these projections into one linear (its packed_modules_mapping for Llama, Gemma, Qwen, Mistral, ...):
# they must share their input transform, their quantization scheme and, for NVFP4, their global scales.
_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
_FP8_MAX, _FP4_MAX = 448.0, 6.0
NVFP4_CALIB_WINDOWS, NVFP4_CALIB_LEN = 4, 128


# --------------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------------


class ExportError(ValueError):
    """Base of every refusal of the exporter (a ``ValueError``: the input cannot be exported as asked)."""


class UnsupportedCheckpointError(ExportError):
    """The checkpoint uses a feature the export cannot represent for vLLM (KV quantization, ``fusevo``'s head-mix
    rotation, smoothing or learned transforms, a bias after an online rotation, unquantized weights)."""


class UnsupportedSchemeError(ExportError):
    """A weight or activation scheme (or combination) with no compressed-tensors/vLLM equivalent."""


class ScaleNotRepresentableError(ExportError):
    """A scale that compressed-tensors cannot store so that its decompression reproduces hadakit's weight exactly."""


class CalibrationRequiredError(ExportError):
    """NVFP4 activations need a static ``input_global_scale``: calibration tokens (or a tokenizer) are required."""


class ExportTargetError(ExportError, OutputDirError):
    """The output directory cannot be (re)placed: it exists and is not a previous hadakit export."""


class VLLMCompatibilityWarning(UserWarning):
    """The export is exact and loads with transformers + compressed-tensors, but vLLM will refuse (not misrun) it."""


# --------------------------------------------------------------------------------------------------------------
# Scheme mapping
# --------------------------------------------------------------------------------------------------------------


def _ct():
    try:
        import compressed_tensors
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("exporting to compressed-tensors needs the package compressed-tensors: "
                          "pip install 'hadakit[export]'") from None
    return compressed_tensors


def check_export_dir(out_dir: str | Path, *, force: bool = False) -> Path:
    """Raise before any work when ``out_dir`` cannot take an export (the rules of :mod:`hadakit.outdir`: ``force``
    only replaces a previous export) or compressed-tensors is not installed; return it as a ``Path``."""
    _ct()
    try:
        return check_output_dir(out_dir, force=force, marker=EXPORT_MARKER, is_ours=_is_export_marker, what="export")
    except OutputDirError as exc:
        raise ExportTargetError(str(exc)) from None


def _kind(scheme) -> str:
    """``int`` / ``nvfp4`` / ``mxfp4`` / ``other`` from the element and scale formats (ignoring scale rules)."""
    from hadakit.formats.elements import E8M0Format, FloatFormat, IntFormat

    el, sf = scheme.element, scheme.scale_format
    if isinstance(el, IntFormat) and not el.frac_bits and not scheme.tensor_scale and isinstance(sf, FloatFormat) \
            and sf.storage_dtype in (torch.float16, torch.bfloat16, torch.float32):
        return "int"
    if isinstance(el, FloatFormat) and el.name == "e2m1" and scheme.granularity == "group" and scheme.symmetric:
        if scheme.group_size == 16 and sf.name == "ue4m3" and scheme.tensor_scale:
            return "nvfp4"
        if scheme.group_size == 32 and isinstance(sf, E8M0Format) and not scheme.tensor_scale:
            return "mxfp4"
    return "other"


def _same_as_preset(scheme, preset: str) -> bool:
    """``scheme`` is the preset in every field but its name (so its dynamic rule is the preset's)."""
    from hadakit.formats import get_scheme

    return scheme.replace(name=None) == get_scheme(preset).replace(name=None)


@dataclass(frozen=True)
class _Mapping:
    format: str
    weights: dict
    input_activations: dict | None
    kind: str  # int / nvfp4 / mxfp4

    def key(self) -> str:
        return json.dumps([self.format, self.weights, self.input_activations], sort_keys=True, default=str)


def _map_schemes(name: str, wscheme, ascheme) -> _Mapping:
    """The compressed-tensors format and QuantizationArgs (as kwargs) of a linear's weight and activation schemes."""
    kind = _kind(wscheme)
    wdesc = wscheme.describe()
    adesc = ascheme.describe() if ascheme is not None else "none"
    if kind == "int":
        bits = wscheme.element.bits
        if bits not in (4, 8):
            raise UnsupportedSchemeError(
                f"{name}: weight scheme {wdesc!r} has {bits}-bit integers; vLLM's compressed-tensors kernels run "
                f"4- and 8-bit integer weights only (int4*, int8 presets)")
        if wscheme.granularity not in ("per_row", "group"):
            raise UnsupportedSchemeError(
                f"{name}: weight scheme {wdesc!r} is per tensor; export integer weights per channel (per_row) or "
                f"in groups")
        if not wscheme.symmetric:
            raise UnsupportedSchemeError(
                f"{name}: weight scheme {wdesc!r} is asymmetric; compressed-tensors {_ct().__version__}'s "
                f"transformers loader allocates unpacked zero points for pack-quantized weights and rejects the "
                f"packed ones its decompressor and vLLM read, so no layout loads in both: export symmetric "
                f"integer weights (int4_g128, int4, int8)")
        w = dict(num_bits=bits, type="int", symmetric=True, dynamic=False,
                 strategy="channel" if wscheme.granularity == "per_row" else "group",
                 group_size=wscheme.group_size if wscheme.granularity == "group" else None)
        if ascheme is None:
            return _Mapping("pack-quantized", w, None, kind)
        if _same_as_preset(ascheme, "int8"):
            if bits != 8 or wscheme.granularity != "per_row":
                raise UnsupportedSchemeError(
                    f"{name}: int8 per-token activations with weights {wdesc!r}; vLLM's W8A8 INT8 path takes "
                    f"symmetric int8 weights per channel (recipe w8a8)")
            a = dict(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
            return _Mapping("int-quantized", w, a, kind)
    elif kind == "nvfp4":
        w = dict(num_bits=4, type="float", symmetric=True, strategy="tensor_group", group_size=16, dynamic=False,
                 scale_dtype=torch.float8_e4m3fn, zp_dtype=torch.float8_e4m3fn)
        if ascheme is None:
            return _Mapping("nvfp4-pack-quantized", w, None, kind)
        if _same_as_preset(ascheme, "nvfp4"):
            a = dict(num_bits=4, type="float", symmetric=True, strategy="tensor_group", group_size=16,
                     dynamic="local", observer="static_minmax", scale_dtype=torch.float8_e4m3fn,
                     zp_dtype=torch.float8_e4m3fn)
            return _Mapping("nvfp4-pack-quantized", w, a, kind)
    elif kind == "mxfp4":
        w = dict(num_bits=4, type="float", symmetric=True, strategy="group", group_size=32, dynamic=False,
                 scale_dtype=torch.uint8, zp_dtype=torch.uint8)
        if ascheme is None:
            return _Mapping("mxfp4-pack-quantized", w, None, kind)
        if _same_as_preset(ascheme, "mxfp4"):
            a = dict(num_bits=4, type="float", symmetric=True, strategy="group", group_size=32, dynamic=True,
                     scale_dtype=torch.uint8, zp_dtype=torch.uint8)
            return _Mapping("mxfp4-pack-quantized", w, a, kind)
    else:
        raise UnsupportedSchemeError(
            f"{name}: weight scheme {wdesc!r} has no compressed-tensors format vLLM runs; exportable weights: "
            f"symmetric int4 or int8 per channel or in groups (fp16/bf16/fp32 scales), nvfp4, mxfp4")
    raise UnsupportedSchemeError(
        f"{name}: activation scheme {adesc!r} with weights {wdesc!r} has no compressed-tensors equivalent with the "
        f"same dynamic rule; exportable: int8 per token (preset int8, no clip) with int8 weights, nvfp4 with "
        f"nvfp4 weights, mxfp4 with mxfp4 weights, or no activation quantization")


# --------------------------------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------------------------------


def _signed_codes(qt) -> torch.Tensor:
    """The integer values of a symmetric INT tensor's codes (two's complement), int64 of ``qt.shape``."""
    bits = qt.scheme.element.bits
    c = qt.codes().to(torch.int64)
    return torch.where(c >= (1 << (bits - 1)), c - (1 << bits), c)


def _pack_int32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """compressed-tensors' ``pack-quantized`` layout of signed ``values`` [rows, cols] (4 or 8 bits): each value
    offset by ``2^(bits-1)``, ``32 / bits`` of them per int32 word, the first in the lowest bits; rows padded with
    zero bits to whole words."""
    per = 32 // bits
    u = values.to(torch.int64) + (1 << (bits - 1))
    rows, cols = u.shape
    words = -(-cols // per)
    u = torch.nn.functional.pad(u, (0, words * per - cols)).reshape(rows, words, per)
    w = (u << (torch.arange(per, dtype=torch.int64) * bits)).sum(-1)
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32).contiguous()


def _fp4_bytes(qt) -> torch.Tensor:
    """E2M1 codes two per byte, element ``2j`` in the low nibble (compressed-tensors' and hadakit's order)."""
    c = qt.codes().to(torch.uint8)
    return (c[:, 0::2] | (c[:, 1::2] << 4)).contiguous()


_E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def _fp4_values(qt) -> torch.Tensor:
    c = qt.codes().to(torch.int64)
    return _E2M1[c & 7] * torch.where((c & 8) > 0, -1.0, 1.0)


def _convert_linear(name: str, qt, mapping: _Mapping, model_dtype: torch.dtype | None) -> tuple[dict, dict]:
    """The compressed-tensors tensors of one linear's packed weight (local names) and facts for the marker.

    Each tensor set is decoded with compressed-tensors' arithmetic (float32) and compared with hadakit's
    dequantized weight; any difference raises ScaleNotRepresentableError."""
    ref = qt.dequantize(torch.float32)
    if not bool(torch.isfinite(ref).all()):
        raise ScaleNotRepresentableError(f"{name}: the packed weight decodes to NaN/Inf (a poisoned group); "
                                         f"compressed-tensors has no NaN scale code")
    out, _ = qt.shape
    sd = qt.scales
    info: dict = {}
    if mapping.kind == "int":
        bits = qt.scheme.element.bits
        scale = sd  # hadakit's own dtype (fp16 for int4_g128, fp32 per channel): stored exactly
        if model_dtype in (torch.float16, torch.bfloat16) and not torch.equal(scale.to(model_dtype).to(scale.dtype),
                                                                                scale):
            raise ScaleNotRepresentableError(
                f"{name}: its {scale.dtype} scales are not exact in the model dtype {model_dtype} that "
                f"compressed-tensors loads weight_scale into (config.json 'dtype'); save the checkpoint with a "
                f"float32 config or quantize with {str(model_dtype).replace('torch.', '')} scales")
        q = _signed_codes(qt)  # symmetric only (_map_schemes refuses asymmetric weights)
        if mapping.format == "int-quantized":
            t = {"weight": q.to(torch.int8).contiguous(), "weight_scale": scale.contiguous()}
        else:
            t = {"weight_packed": _pack_int32(q, bits), "weight_scale": scale.contiguous(),
                 "weight_shape": torch.tensor(list(qt.shape), dtype=torch.int64)}
        # compressed-tensors: dequantize(x_q, scale) in the scale's (model) dtype, groups along the last dim
        s32 = scale.to(torch.float32)
        G = s32.shape[-1]
        got = (q.to(torch.float32).reshape(out, G, -1) * s32[..., None]).reshape(qt.shape)
    elif mapping.kind == "nvfp4":
        st = qt.tensor_scale.to(torch.float32)
        g = (1.0 / st).to(torch.float32).reshape(1)  # compressed-tensors divides by its global scale
        t = {"weight_packed": _fp4_bytes(qt), "weight_scale": sd.view(torch.float8_e4m3fn).contiguous(),
             "weight_global_scale": g}
        v = _fp4_values(qt).reshape(out, -1, 16)
        got = (v * (t["weight_scale"].to(torch.float32) / g)[..., None]).reshape(qt.shape)
        exact = torch.equal(got, ref) and bool((1.0 / g).to(torch.float32) == st)
        if not exact:
            raise ScaleNotRepresentableError(
                f"{name}: NVFP4 tensor scale {float(st):.9g} has no float32 global scale g with "
                f"e4m3_scale / g == e4m3_scale · tensor_scale (compressed-tensors) and 1 / g == tensor_scale "
                f"(vLLM): only a power-of-two tensor scale is exact in both; re-quantize with a power-of-two "
                f"NVFP4 tensor scale (shared by q/k/v and by gate/up, which vLLM fuses)")
        info["tensor_scale"] = float(st)
    elif mapping.kind == "mxfp4":
        codes = sd.view(torch.uint8)
        if bool((codes == 255).any()):
            raise ScaleNotRepresentableError(f"{name}: an E8M0 scale is NaN (code 255); compressed-tensors "
                                             f"reads it as 2^128")
        t = {"weight_packed": _fp4_bytes(qt), "weight_scale": codes.contiguous()}
        s = torch.ldexp(torch.ones(codes.shape), codes.to(torch.int32) - 127)  # 2^(e - 127), exact in float32
        got = (_fp4_values(qt).reshape(out, -1, 32) * s[..., None]).reshape(qt.shape)
    else:  # pragma: no cover - _map_schemes refuses it
        raise AssertionError(mapping.kind)
    if not torch.equal(got, ref):
        raise ScaleNotRepresentableError(f"{name}: the exported tensors do not decode to hadakit's weight bit for "
                                         f"bit (scheme {qt.scheme.describe()!r})")
    return t, info


# --------------------------------------------------------------------------------------------------------------
# Online rotations -> transform_config
# --------------------------------------------------------------------------------------------------------------


def _rotation(meta: dict, signs: torch.Tensor | None):
    from hadakit.transforms import HadamardRotation

    rot = HadamardRotation(meta["n"], block_size=meta["block_size"], signs=meta["signs"], seed=meta["seed"],
                           fallback=meta["fallback"], fallback_seed=meta.get("fallback_seed", 0))
    if signs is not None:
        rot.signs.copy_(signs)
    return rot


def _transform_weight(rot) -> tuple[torch.Tensor, int | None, bool]:
    """``(W, head_dim, is_pm1)``: the compressed-tensors transform weight of an online rotation ``x -> x·Rᵀ``.

    compressed-tensors' and vLLM's Hadamard transforms compute ``x @ W / sqrt(b)`` per block of ``b = W.shape[0]``
    (all of ``n`` when ``head_dim`` is None), so ``W = sqrt(b) · Rᵀ`` (its diagonal block when ``R`` is block
    diagonal with identical blocks): ±1 for a Hadamard matrix, signs included; an orthogonal fallback (DCT) is
    stored as it is, scaled."""
    n = rot.n
    V = rot.matrix(torch.float64).t()  # x·Rᵀ = x @ V
    b, head_dim = n, None
    bs = rot.block_size
    if bs is not None and bs < n:
        blk = V[:bs, :bs]
        if torch.allclose(V, torch.block_diag(*[blk] * (n // bs)), rtol=0, atol=1e-12):
            b, head_dim, V = bs, bs, blk
    W = V * math.sqrt(b)
    pm1 = W.round()
    if bool(((W - pm1).abs() < 1e-9).all()) and bool((pm1.abs() == 1).all()):
        return pm1.to(torch.bfloat16).contiguous(), head_dim, True  # ±1 is exact in bf16: half the bytes of fp32
    return W.to(torch.float32).contiguous(), head_dim, False


@dataclass
class _TransformGroup:
    name: str
    weight: torch.Tensor
    head_dim: int | None
    pm1: bool
    targets: list[str] = field(default_factory=list)


def _fused_families(names) -> dict[tuple[str, str], list[str]]:
    """``{(parent, fused name): [shard names]}`` for the projections vLLM fuses (see ``_FUSED``)."""
    fam: dict[tuple[str, str], list[str]] = {}
    for n in names:
        parent, _, leaf = n.rpartition(".")
        for fused, shards in _FUSED.items():
            if leaf in shards:
                fam.setdefault((parent, fused), []).append(n)
    return {k: v for k, v in fam.items() if len(v) > 1}


# --------------------------------------------------------------------------------------------------------------
# NVFP4 activations: the static input global scale vLLM needs
# --------------------------------------------------------------------------------------------------------------


def _activation_amax(ckpt: Path, names: list[str], calib: torch.Tensor | None) -> tuple[dict[str, float], str]:
    """Largest |T(x)| (the transformed input the activation quantizer sees) of each linear in ``names`` over
    calibration tokens, running hadakit's own model; and a description of the tokens used."""
    from hadakit.io.checkpoint import load_quantized_model

    model, tok = load_quantized_model(ckpt)
    if calib is None:
        if tok is None:
            raise CalibrationRequiredError(
                "NVFP4 activations: vLLM quantizes them with a static input_global_scale, hadakit's tensor scale is "
                "dynamic; the checkpoint has no tokenizer to calibrate one on the built-in text: pass calib= "
                "(token ids [n, len])")
        from hadakit.io.texts import CALIBRATION_TEXT, calibration_windows

        calib = calibration_windows(tok, CALIBRATION_TEXT, n_windows=NVFP4_CALIB_WINDOWS, window=NVFP4_CALIB_LEN)
        desc = f"{NVFP4_CALIB_WINDOWS} windows x {NVFP4_CALIB_LEN} tokens of {CALIBRATION_TEXT!r} (seed 0)"
    else:
        calib = torch.as_tensor(calib, dtype=torch.long)
        if calib.dim() == 1:
            calib = calib[None]
        desc = f"calib= tokens {list(calib.shape)}"
    amax: dict[str, float] = {}
    mods = dict(model.named_modules())
    hooks = []
    for n in names:
        mod = mods[n]

        def hook(m, args, n=n):
            v = float(m.transform_input(args[0]).detach().abs().amax())
            amax[n] = max(amax.get(n, 0.0), v)

        hooks.append(mod.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for row in calib:
                model(input_ids=row[None])
    finally:
        for h in hooks:
            h.remove()
    missing = [n for n in names if n not in amax]
    if missing:
        raise CalibrationRequiredError(f"NVFP4 activations: calibration never reached {missing[:3]}")
    return amax, desc


def _global_scale_from_amax(amax: float) -> torch.Tensor:
    # compressed-tensors' generate_gparam / llm-compressor's static_minmax observer: FP8 max · FP4 max / amax
    a = torch.tensor(max(amax, torch.finfo(torch.float32).tiny), dtype=torch.float32)
    return (_FP8_MAX * _FP4_MAX / a).to(torch.float32).reshape(1)


# --------------------------------------------------------------------------------------------------------------
# The export
# --------------------------------------------------------------------------------------------------------------


def _is_export_marker(marker: Path) -> bool:
    try:
        return json.loads(marker.read_text()).get("kind") == MARKER_KIND
    except (OSError, ValueError, AttributeError):
        return False


def _check_target(ckpt: Path, out: Path, force: bool) -> None:
    """The output rules of :mod:`hadakit.outdir` (``force`` only replaces a previous export), and never inside
    the checkpoint itself."""
    if out.resolve() == ckpt.resolve() or ckpt.resolve() in out.resolve().parents:
        raise ExportTargetError(f"output directory {out} is (inside) the checkpoint {ckpt}; choose another one")
    check_export_dir(out, force=force)


def _check_recipe(recipe, ckpt: Path) -> None:
    if recipe.kv is not None:
        raise UnsupportedCheckpointError(
            f"{ckpt}: recipe {recipe.label()!r} quantizes the KV cache (hadakit: asymmetric integer per head and "
            f"token after a Hadamard on head_dim); vLLM's compressed-tensors KV cache is FP8 only, nothing below 8 "
            f"bits: re-quantize without KV quantization")
    if recipe.fuse_values:
        raise UnsupportedCheckpointError(
            f"{ckpt}: recipe {recipe.label()!r} uses fusevo: o_proj keeps only a head-mix rotation "
            f"(H_heads ⊗ I) online, which compressed-tensors' Hadamard transforms do not describe: re-quantize "
            f"without fusevo")
    if recipe.smooth is not None or recipe.learned:
        raise UnsupportedCheckpointError(
            f"{ckpt}: recipe {recipe.label()!r} has smoothing scales or a learned transform on the linears' inputs; "
            f"compressed-tensors/vLLM online transforms are Hadamard rotations only: re-quantize without "
            f"smooth=/learn=")


def export_compressed_tensors(checkpoint_dir: str | Path, out_dir: str | Path, *, force: bool = False,
                              calib: torch.Tensor | None = None) -> Path:
    """Write the hadakit checkpoint ``checkpoint_dir`` as a compressed-tensors model directory ``out_dir``.

    Quantized weights keep hadakit's codes and scales bit for bit (checked per linear); online rotations become a
    ``transform_config`` of QuIP-style ``input`` transforms, one group per distinct matrix, the matrices stored in
    ``model.safetensors``. ``out_dir`` is written atomically (a temporary sibling renamed into place); an existing
    ``out_dir`` is replaced only with ``force=True`` and only if it holds a previous export (its
    ``hadakit_export.json``). ``calib``: token ids ``[n, len]`` for NVFP4 activations' static input global scale
    (default: a few windows of the built-in calibration text, with the checkpoint's tokenizer).

    Raises :class:`UnsupportedCheckpointError`, :class:`UnsupportedSchemeError`,
    :class:`ScaleNotRepresentableError`, :class:`CalibrationRequiredError`, :class:`ExportTargetError` (all
    ``ValueError``) or ``FileExistsError``; returns ``Path(out_dir)``.
    """
    ct = _ct()
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    from compressed_tensors.transform import TransformArgs, TransformConfig, TransformScheme
    from safetensors.torch import load_file, save_file

    from hadakit.formats import QuantizedTensor, get_scheme
    from hadakit.quantization.recipes import QuantRecipe

    ckpt, out = Path(checkpoint_dir), Path(out_dir)
    if not ckpt.is_dir():
        raise FileNotFoundError(f"checkpoint directory {ckpt} does not exist")
    for f in (_CKPT_META, _CKPT_RECIPE, _CKPT_WEIGHTS, _CONFIG):
        if not (ckpt / f).is_file():
            raise UnsupportedCheckpointError(f"{ckpt} is not a hadakit checkpoint: {f} is missing (write one with "
                                             f"`hadakit quantize ... --out DIR`)")
    _check_target(ckpt, out, force)
    meta = json.loads((ckpt / _CKPT_META).read_text())
    recipe = QuantRecipe.load(ckpt / _CKPT_RECIPE)
    _check_recipe(recipe, ckpt)
    config = json.loads((ckpt / _CONFIG).read_text())
    config.pop("quantization_config", None)
    dtype_name = config.get("dtype") or config.get("torch_dtype")
    model_dtype = getattr(torch, dtype_name, None) if isinstance(dtype_name, str) else None
    linears: dict[str, dict] = meta["linears"]
    if not linears:
        raise UnsupportedCheckpointError(f"{ckpt}: no quantized linear; nothing to export")

    state = load_file(str(ckpt / _CKPT_WEIGHTS))
    tensors: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    mappings: dict[str, _Mapping] = {}
    facts: dict[str, dict] = {}
    rotations: dict[str, Any] = {}
    for name, lm in linears.items():
        if lm.get("smooth") or lm.get("transform"):
            raise UnsupportedCheckpointError(
                f"{name}: smoothing scales or a learned transform ride with its online rotation; compressed-tensors/"
                f"vLLM online transforms are Hadamard rotations only: re-quantize without smooth=/learn=")
        rmeta = lm.get("rotation")
        if rmeta is not None and rmeta.get("kind") == "head_mix":
            raise UnsupportedCheckpointError(
                f"{name}: its online rotation is fusevo's head mix (H_heads ⊗ I); re-quantize without fusevo")
        if not lm.get("packed"):
            raise UnsupportedCheckpointError(
                f"{name}: its weight is not quantized (recipe {recipe.label()!r}); the export writes quantized "
                f"linears only")
        prefix = f"{name}.qweight."
        qt = QuantizedTensor.from_state_dict(state, prefix)
        used.update(k for k in state if k.startswith(prefix))
        if len(qt.shape) != 2 or tuple(qt.shape) != (lm["out_features"], lm["in_features"]):
            raise UnsupportedCheckpointError(f"{name}: packed weight of shape {tuple(qt.shape)} is not "
                                             f"[out_features, in_features]")
        act = get_scheme(lm["act_scheme"]) if lm.get("act_scheme") is not None else None
        mapping = _map_schemes(name, qt.scheme, act)
        mappings[name] = mapping
        t, facts[name] = _convert_linear(name, qt, mapping, model_dtype)
        for k, v in t.items():
            tensors[f"{name}.{k}"] = v
        bias = state.get(f"{name}.bias")
        if bias is not None:
            used.add(f"{name}.bias")
            if rmeta is not None:
                raise UnsupportedCheckpointError(
                    f"{name}: a biased linear with an online rotation; vLLM's transformed linears take no bias "
                    f"(CompressedTensorsLinearTransformMethod asserts bias is None): re-quantize it without "
                    f"rotation (rotation 'none') or skip it")
            tensors[f"{name}.bias"] = bias.contiguous()
        if rmeta is not None:
            signs = state.get(f"{name}.rotation.signs")
            used.add(f"{name}.rotation.signs")
            rotations[name] = _rotation(rmeta, signs)

    # --- everything else, as the checkpoint stores it ------------------------------------------------------
    qprefixes = tuple(n + "." for n in linears)
    for k, v in state.items():
        if k in used or k.startswith(qprefixes):
            if k not in used:
                raise UnsupportedCheckpointError(f"{ckpt}: tensor {k} of a quantized linear is not exportable")
            continue
        tensors[k] = v.contiguous()
    tie = bool(config.get("tie_word_embeddings", config.get("text_config", {}).get("tie_word_embeddings", False)))
    for key, src in meta.get("tied", {}).items():
        if tie and key.endswith("lm_head.weight"):
            continue  # transformers ties it back from the config
        tensors[key] = state[src].clone()

    # --- which nn.Linear modules stay in full precision (the ignore list) ----------------------------------
    import transformers

    cls = getattr(transformers, meta.get("model_class", ""), None)
    if cls is None:
        raise UnsupportedCheckpointError(f"{ckpt}: model class {meta.get('model_class')} is not in this "
                                         f"transformers version")
    with torch.device("meta"):
        skeleton = cls._from_config(transformers.AutoConfig.from_pretrained(ckpt))
    linear_names = [n for n, m in skeleton.named_modules() if isinstance(m, torch.nn.Linear)]
    absent = sorted(set(linears) - set(linear_names))
    if absent:
        raise UnsupportedCheckpointError(f"{ckpt}: quantized modules {absent[:3]} are not nn.Linear layers of "
                                         f"{cls.__name__}")
    ignore = [n for n in linear_names if n not in linears]
    del skeleton

    # --- quantization config groups ------------------------------------------------------------------------
    by_key: dict[str, list[str]] = {}
    for n, m in mappings.items():
        by_key.setdefault(m.key(), []).append(n)
    groups = {}
    for i, names in enumerate(by_key.values()):
        m = mappings[names[0]]
        targets = ["Linear"] if len(by_key) == 1 else names
        groups[f"group_{i}"] = QuantizationScheme(
            targets=targets, weights=QuantizationArgs(**m.weights),
            input_activations=QuantizationArgs(**m.input_activations) if m.input_activations else None,
            format=m.format)
    formats = sorted({m.format for m in mappings.values()})
    qconfig = QuantizationConfig(config_groups=groups, format=formats[0] if len(formats) == 1 else "mixed-precision",
                                 quantization_status="compressed", ignore=ignore)

    notes: list[str] = []
    families = _fused_families(linears)
    for (parent, fused), shards in families.items():
        if len({mappings[s].key() for s in shards}) > 1:
            raise UnsupportedSchemeError(f"{parent}: {', '.join(shards)} are quantized with different schemes; vLLM "
                                         f"fuses them into {fused} with one scheme")

    # --- NVFP4: one global scale per fused family (vLLM takes their max without re-scaling the block scales) ---
    nv = [n for n, m in mappings.items() if m.kind == "nvfp4"]
    for (parent, fused), shards in families.items():
        if mappings[shards[0]].kind != "nvfp4":
            continue
        gs = {float(tensors[f"{s}.weight_global_scale"]) for s in shards}
        if len(gs) > 1:
            raise ScaleNotRepresentableError(
                f"{parent}: {', '.join(shards)} have different NVFP4 tensor scales; vLLM fuses them into {fused} and "
                f"uses the largest weight_global_scale for all without re-scaling their E4M3 block scales (wrong "
                f"weights): re-quantize them with one shared power-of-two tensor scale")
    calib_desc = None
    act_nv = [n for n in nv if mappings[n].input_activations is not None]
    if act_nv:
        amax, calib_desc = _activation_amax(ckpt, act_nv, calib)
        for (parent, fused), shards in families.items():  # the fused input is quantized once: one scale
            if all(s in amax for s in shards):
                top = max(amax[s] for s in shards)
                for s in shards:
                    amax[s] = top
        for n in act_nv:
            tensors[f"{n}.input_global_scale"] = _global_scale_from_amax(amax[n])
            facts[n]["input_amax"] = amax[n]

    # --- transforms -------------------------------------------------------------------------------------------
    tgroups: dict[tuple, _TransformGroup] = {}
    tmeta: dict[str, str] = {}
    for name, rot in rotations.items():
        W, head_dim, pm1 = _transform_weight(rot)
        key = (tuple(W.shape), head_dim, str(W.dtype), W.numpy().tobytes() if W.dtype != torch.bfloat16
               else W.view(torch.int16).numpy().tobytes())
        g = tgroups.get(key)
        if g is None:
            g = tgroups[key] = _TransformGroup(f"hadakit_r{len(tgroups)}", W, head_dim, pm1)
        g.targets.append(name)
        tmeta[name] = g.name
        tensors[f"{name}.{g.name}_input.weight"] = W.clone()
    tconfig = None
    if tgroups:
        tconfig = TransformConfig(config_groups={
            g.name: TransformScheme(type="random-hadamard", randomize=False, head_dim=g.head_dim,
                                    precision=torch.float32,
                                    apply=[TransformArgs(targets=list(g.targets), location="input")])
            for g in tgroups.values()})
        split = [f"{parent}.{{{','.join(s.rpartition('.')[2] for s in shards)}}}"
                 for (parent, fused), shards in families.items() if len({tmeta.get(s) for s in shards}) > 1]
        if split:
            notes.append(f"vLLM refuses this export at load ('Must have same input'): it fuses q/k/v and gate/up "
                         f"into one linear with one input transform, and {len(split)} such group(s) have different "
                         f"input rotations (e.g. {split[0]}). compressed-tensors + transformers run it exactly. "
                         f"For vLLM, re-quantize with one rotation per shared input (rotation 'hadamard' or "
                         f"'block-B', or random signs shared by the fused projections)")
        notes.append("online transforms: vLLM runs them with tensor parallelism 1 only (it raises "
                     "NotImplementedError for TP > 1)")

    qdict = qconfig.model_dump(exclude=["quant_method"])
    config["quantization_config"] = {
        "version": ct.__version__, "quant_method": "compressed-tensors", "sparsity_config": {},
        "transform_config": tconfig.model_dump() if tconfig is not None else {}, **qdict}
    # round-trip through the parsers transformers and vLLM use, so a config they reject is never written
    QuantizationConfig.model_validate({k: v for k, v in config["quantization_config"].items()
                                       if k not in ("version", "sparsity_config", "transform_config")})
    if tconfig is not None:
        TransformConfig.model_validate(config["quantization_config"]["transform_config"])
    config_text = json.dumps(config, indent=2, sort_keys=True, default=str) + "\n"

    from hadakit import __version__ as hk_version

    marker = dict(
        kind=MARKER_KIND, export_version=EXPORT_VERSION, hadakit_version=hk_version,
        compressed_tensors_version=ct.__version__, transformers_version=transformers.__version__,
        source=str(ckpt.resolve()), recipe=recipe.to_dict(), formats=formats,
        linears={n: dict(format=mappings[n].format, transform=tmeta.get(n), **facts[n]) for n in linears},
        transform_groups={g.name: dict(size=int(g.weight.shape[0]), head_dim=g.head_dim, pm1=g.pm1,
                                       targets=len(g.targets)) for g in tgroups.values()},
        nvfp4_input_calibration=calib_desc, vllm_notes=notes)

    # --- write atomically (hadakit.outdir: a temporary sibling renamed into place) ----------------------------
    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / _CONFIG).write_text(config_text)
        for f in ckpt.iterdir():
            if f.is_file() and f.name not in _NOT_COPIED:
                shutil.copy2(f, tmp / f.name)
        (tmp / EXPORT_MARKER).write_text(json.dumps(marker, indent=1, default=str) + "\n")

    _check_target(ckpt, out, force)
    try:
        write_dir_atomically(out, write, force=force, marker=EXPORT_MARKER, is_ours=_is_export_marker, what="export")
    except OutputDirError as exc:
        raise ExportTargetError(str(exc)) from None
    for note in notes:
        if "refuses" in note:
            warnings.warn(note, VLLMCompatibilityWarning, stacklevel=2)
    return out


# --------------------------------------------------------------------------------------------------------------
# Loading an export back (CPU, transformers + compressed-tensors)
# --------------------------------------------------------------------------------------------------------------


def load_exported_model(path: str | Path, *, dtype: torch.dtype = torch.float32, transforms: bool = True):
    """An export loaded with transformers + compressed-tensors, weights decompressed, and — since transformers
    ignores ``transform_config`` — the online transforms attached with compressed-tensors' own
    ``apply_transform_config``, their matrices read from the export. ``transforms=False`` leaves them off (the
    model is then wrong: the weights are in the rotated basis). Weights that compressed-tensors decompresses in
    bfloat16 (NVFP4, MXFP4) are widened to ``dtype``, which is exact."""
    _ct()
    import transformers
    from compressed_tensors.transform import TransformConfig, apply_transform_config
    from compressed_tensors.transform.factory.base import TransformBase
    from safetensors import safe_open

    root = Path(path)
    config = json.loads((root / _CONFIG).read_text())
    arch = (config.get("architectures") or ["AutoModelForCausalLM"])[0]
    cls = getattr(transformers, arch, transformers.AutoModelForCausalLM)
    model = cls.from_pretrained(root, dtype=dtype)
    model.eval()
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "compressor"):
        quantizer.compressor.decompress_model(model)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "quantization_scheme") and isinstance(getattr(m, "weight", None), torch.Tensor) \
                    and m.weight.dtype != dtype and m.weight.is_floating_point():
                m.weight.data = m.weight.data.to(dtype)
    tc = config.get("quantization_config", {}).get("transform_config") or None
    if transforms and tc:
        apply_transform_config(model, TransformConfig.model_validate(tc))
        with safe_open(str(root / "model.safetensors"), framework="pt") as f, torch.no_grad():
            keys = set(f.keys())
            for name, mod in model.named_modules():
                if isinstance(mod, TransformBase):
                    key = f"{name}.weight"
                    if key not in keys:
                        raise ValueError(f"{root}: transform weight {key} is missing from model.safetensors")
                    mod.weight.data = f.get_tensor(key).to(mod.weight.dtype)
    return model
