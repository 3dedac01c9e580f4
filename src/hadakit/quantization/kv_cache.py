"""KV-cache quantization for any Hugging Face model that dispatches attention through ``AttentionInterface``.

hadakit registers one attention function that fake-quantizes the keys (after RoPE: the tensors the cache stores)
and the values, per head and token along ``head_dim``, optionally after a normalized Hadamard on ``head_dim``
(``q·kᵀ = (q·H)(k·H)ᵀ``, so rotating the keys and rotating back after quantization is exact before rounding), then
calls the attention the model was using (its own eager function, or SDPA). Keys and values are quantized where they
enter attention, so a cache holds quantized values and a full-sequence evaluation sees exactly what decoding would.

Options beyond the per-head Hadamard (RotateKV / KVQuant ideas): any scheme of the formats layer (asymmetric groups
of 32 or 64 along ``head_dim`` hold a 2- or 3-bit cache together far better than one scale per head), and
``sink_tokens``: the first positions of the sequence — the attention sinks (BOS and the tokens right after it, which
draw most of the attention mass and carry the largest keys) — stay in full precision, as a cache would keep them.

``centers`` (:func:`calibrate_kv_centers`): keys and values are quantized around a per-head, per-channel center
calibrated offline, ``x̂ = Q(x − μ) + μ``. Keys carry a large common offset (on Gemma 3 270M the mean key is as long
as the typical deviation from it, up to 2.3× longer), which per-token scales otherwise spend their few levels on;
the center costs one stored vector per layer (in a kernel: the constant ``q·μ`` added to every logit of a query).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn

from hadakit.formats import QuantScheme, fake_quantize, get_scheme
from hadakit.quantization.structure import head_dim as _head_dim
from hadakit.transforms import hadamard_transform, inverse_hadamard_transform, supported

ATTN_NAME = "hadakit_kv"


@dataclass(frozen=True)
class KVQuantizer:
    scheme: QuantScheme
    rotate: bool
    inner: str  # the attention implementation the model used before ("sdpa", "eager", ...)
    sink_tokens: int = 0  # leading positions kept in full precision

    def _quantize(self, t: torch.Tensor, center: torch.Tensor | None) -> torch.Tensor:
        if center is not None:
            center = center.to(t.dtype)[:, None, :]  # [kv_heads, 1, head_dim]
            t = t - center
        q = fake_quantize(t, self.scheme) if not self.rotate else \
            inverse_hadamard_transform(fake_quantize(hadamard_transform(t), self.scheme))
        return q + center if center is not None else q

    def __call__(self, t: torch.Tensor, center: torch.Tensor | None = None) -> torch.Tensor:
        # t: [batch, kv_heads, seq, head_dim]; in a full-sequence forward and in a full (not sliding) cache the
        # sinks are the first positions of the tensor.
        k = min(self.sink_tokens, t.shape[-2])
        if k == 0:
            return self._quantize(t, center)
        return torch.cat([t[..., :k, :], self._quantize(t[..., k:, :], center)], dim=-2)


def _inner_attention(module: nn.Module, name: str):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if name == "eager" or name not in ALL_ATTENTION_FUNCTIONS:
        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if eager is None:
            raise ValueError(f"{type(module).__name__}: cannot find its eager attention function to wrap")
        return eager
    return ALL_ATTENTION_FUNCTIONS[name]


K_CENTER, V_CENTER = "hadakit_k_center", "hadakit_v_center"  # buffer names on the attention modules


def _kv_attention(module, query, key, value, attention_mask, **kwargs):
    quant: KVQuantizer | None = getattr(module, "_hadakit_kv", None)
    if quant is None:
        return _inner_attention(module, "sdpa")(module, query, key, value, attention_mask, **kwargs)
    record = getattr(module, "_hadakit_kv_record", None)
    if record is not None:  # calibration pass: accumulate sums of the full-precision keys and values
        skip = max(1, quant.sink_tokens)
        record.append((key[..., skip:, :].double().sum((0, 2)), value[..., skip:, :].double().sum((0, 2)),
                       key.shape[0] * max(0, key.shape[-2] - skip)))
        return _inner_attention(module, quant.inner)(module, query, key, value, attention_mask, **kwargs)
    key = quant(key, getattr(module, K_CENTER, None))
    value = quant(value, getattr(module, V_CENTER, None))
    return _inner_attention(module, quant.inner)(module, query, key, value, attention_mask, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, _kv_attention)


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules that call the attention interface: attention classes with a head size and a config that names the
    attention implementation."""
    found = []
    for name, mod in model.named_modules():
        cfg = getattr(mod, "config", None)
        if "Attention" in type(mod).__name__ and _head_dim(mod) is not None and cfg is not None \
                and hasattr(cfg, "_attn_implementation"):
            found.append((name, mod))
    return found


def install_kv_quantization(model: nn.Module, scheme, *, rotate: bool = True, sink_tokens: int = 0) -> int:
    """Quantize the KV cache of ``model`` with ``scheme`` (per head/token along head_dim); returns the number of
    attention modules covered. ``sink_tokens`` leading positions stay in full precision. Raises ValueError for a
    model whose attention hadakit cannot reach."""
    scheme = get_scheme(scheme)
    if sink_tokens < 0:
        raise ValueError(f"sink_tokens must be >= 0, got {sink_tokens}")
    mods = attention_modules(model)
    if not mods:
        raise ValueError(
            f"{type(model).__name__}: found no attention module using transformers' AttentionInterface; KV-cache "
            f"quantization supports models whose attention modules have a head size and dispatch through "
            f"config._attn_implementation (Llama, Qwen, Gemma, Mistral, BERT in transformers >= 5, …)")
    _register()
    for name, mod in mods:
        head_dim = _head_dim(mod)
        if rotate and not supported(head_dim):
            raise ValueError(f"{name}: head_dim {head_dim} has no Hadamard matrix; use kv_rotation=False")
        current = mod.config._attn_implementation
        inner = current if current != ATTN_NAME else getattr(mod, "_hadakit_kv").inner
        if scheme.granularity == "group" and head_dim % scheme.group_size:
            raise ValueError(f"{name}: KV group size {scheme.group_size} does not divide head_dim {head_dim}")
        mod._hadakit_kv = KVQuantizer(scheme, rotate, inner or "sdpa", sink_tokens)
    for cfg in {id(m.config): m.config for _, m in mods}.values():
        cfg._attn_implementation = ATTN_NAME
    return len(mods)


@torch.no_grad()
def calibrate_kv_centers(model: nn.Module, windows: torch.Tensor) -> int:
    """Set each quantized attention module's key and value centers (buffers ``hadakit_k_center`` /
    ``hadakit_v_center``, ``[kv_heads, head_dim]``) to the mean full-precision key and value of ``windows``
    (positions after the sinks, BOS never counted); returns the number of modules calibrated. Run it after the
    linears are quantized, so the centers are those of the keys the quantized model produces."""
    mods = [m for _, m in attention_modules(model) if getattr(m, "_hadakit_kv", None) is not None]
    if not mods:
        raise ValueError("calibrate_kv_centers: install_kv_quantization first")
    for m in mods:
        m._hadakit_kv_record = []
    body = getattr(model, "base_model", model)  # skip the LM head: only the attention inputs matter here
    try:
        for row in windows:
            body(input_ids=row[None].to(next(model.parameters()).device), use_cache=False)
    finally:
        records = {id(m): m.__dict__.pop("_hadakit_kv_record") for m in mods}
    for m in mods:
        rec = records[id(m)]
        n = sum(r[2] for r in rec)
        if n == 0:
            raise ValueError("calibrate_kv_centers: the windows are too short to hold a token after the sinks")
        for name, i in ((K_CENTER, 0), (V_CENTER, 1)):
            center = (sum(r[i] for r in rec) / n).float()
            if name in m._buffers:
                m._buffers[name] = center
            else:
                m.register_buffer(name, center)
    return len(mods)
