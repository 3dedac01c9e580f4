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

``cache_config`` (a :class:`~hadakit.quantization.kv_packed.KVCacheConfig`: KIVI per-channel keys, NSNQuant vector
codebooks, RotateKV channel order / block Hadamard / sinks, with its residual window and blocks): instead of a
per-token scheme, the keys and values are quantized exactly as :class:`~hadakit.quantization.kv_packed.PackedKVCache`
stores them, and each query attends the way it would in **token-by-token decoding** through that cache: a query at
position ``i`` sees the quantized keys/values of positions ``packed_range(i, config)`` and the full-precision ones
elsewhere (sinks, the residual window, itself). A full-sequence forward (perplexity) therefore equals decoding with
the real cache (tested to float rounding). Pre-RoPE configs need the real cache (this path sees keys after RoPE).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hadakit.formats import QuantScheme, fake_quantize, get_scheme
from hadakit.quantization.structure import head_dim as _head_dim
from hadakit.transforms import hadamard_transform, inverse_hadamard_transform, supported

ATTN_NAME = "hadakit_kv"


@dataclass(frozen=True)
class KVQuantizer:
    scheme: QuantScheme | None
    rotate: bool
    inner: str  # the attention implementation the model used before ("sdpa", "eager", ...)
    sink_tokens: int = 0  # leading positions kept in full precision
    cache: Any = None  # a kv_packed.KVCacheConfig: quantize as the packed cache does, attend as in decoding
    codebooks: Any = None  # its nsnquant codebooks {"key": ..., "value": ...} (None: the Gaussian ones)

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


def _decode_exact_attention(module, quant: KVQuantizer, query, key, value, attention_mask, scaling=None,
                            dropout=0.0, sliding_window=None, softcap=None, **kwargs):
    """Eager attention in which query ``i`` (absolute position ``key_len − q_len + i``) sees the packed cache's
    quantized keys/values at ``packed_range(position, config)`` and full precision elsewhere."""
    from hadakit.quantization.kv_packed import fake_quantize_kv

    cfg = quant.cache
    kq, vq = fake_quantize_kv(key, value, cfg, quant.codebooks, layer_idx=getattr(module, "layer_idx", 0) or 0)
    rep = query.shape[1] // key.shape[1]
    k, v, kq, vq = (t.repeat_interleave(rep, dim=1) if rep > 1 else t for t in (key, value, kq, vq))
    n_q, n_k = query.shape[-2], key.shape[-2]
    pos = torch.arange(n_k - n_q, n_k, device=query.device)
    j = torch.arange(n_k, device=query.device)
    s, g, r = cfg.sink_tokens, cfg.group_size, cfg.residual_length
    end = s + g * torch.clamp((pos - s - r) // g, min=0)  # packed_range(pos) = [min(s, pos), end) for pos >= s
    quantized = (j[None, :] >= min(s, n_k)) & (j[None, :] < end[:, None]) & (pos[:, None] >= s)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    scores = torch.where(quantized, query @ kq.transpose(-1, -2), query @ k.transpose(-1, -2)) * scaling
    softcap = softcap if softcap is not None else getattr(module, "attn_logit_softcapping", None)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        m = attention_mask[..., :n_k]
        scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m
    else:  # the model left masking to the attention: causal (and its sliding window)
        hidden = j[None, :] > pos[:, None]
        if sliding_window:
            hidden = hidden | (pos[:, None] - j[None, :] >= sliding_window)
        scores = scores.masked_fill(hidden, float("-inf"))
    p = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    out = (p * ~quantized) @ v + (p * quantized) @ vq
    return out.transpose(1, 2).contiguous(), p


def _kv_attention(module, query, key, value, attention_mask, **kwargs):
    quant: KVQuantizer | None = getattr(module, "_hadakit_kv", None)
    if quant is None:
        return _inner_attention(module, "sdpa")(module, query, key, value, attention_mask, **kwargs)
    if quant.cache is not None and getattr(module, "_hadakit_kv_record", None) is None:
        return _decode_exact_attention(module, quant, query, key, value, attention_mask, **kwargs)
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


def install_kv_quantization(model: nn.Module, scheme=None, *, rotate: bool = True, sink_tokens: int = 0,
                            cache_config=None, codebooks: dict[str, torch.Tensor] | None = None) -> int:
    """Quantize the KV cache of ``model`` with ``scheme`` (per head/token along head_dim); returns the number of
    attention modules covered. ``sink_tokens`` leading positions stay in full precision. Raises ValueError for a
    model whose attention hadakit cannot reach.

    ``cache_config``: a :class:`~hadakit.quantization.kv_packed.KVCacheConfig` (or its string form) instead of
    ``scheme``: keys and values are quantized as the packed cache stores them and attended as in token-by-token
    decoding through it (module docstring); ``scheme`` and ``rotate`` are then not used, ``sink_tokens`` must be 0
    (the config has its own), and ``codebooks`` are its nsnquant codebooks (default: the Gaussian ones)."""
    if cache_config is not None:
        from hadakit.quantization.kv_packed import KVCacheConfig, PackedKVLayer

        if isinstance(cache_config, str):
            cache_config = KVCacheConfig.from_string(cache_config)
        if not isinstance(cache_config, KVCacheConfig):
            raise TypeError(f"cache_config must be a KVCacheConfig or its string form, got "
                            f"{type(cache_config).__name__}")
        if cache_config.pre_rope:
            raise ValueError("cache_config has pre_rope=True: the attention interface only sees keys after RoPE; "
                             "evaluate pre-RoPE configs with PackedKVCache inside kv_packed.pre_rope_attention(model)")
        if sink_tokens:
            raise ValueError(f"sink_tokens={sink_tokens} with cache_config: set KVCacheConfig.sink_tokens instead")
        PackedKVLayer(cache_config, codebooks)  # validate the codebooks now
        scheme = None
    else:
        if codebooks is not None:
            raise ValueError("codebooks are for cache_config (nsnquant); a scheme does not use them")
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
        current = mod.config._attn_implementation
        inner = current if current != ATTN_NAME else getattr(mod, "_hadakit_kv").inner
        if cache_config is not None:
            cache_config.check_head_dim(head_dim)
            cache_config.order_for(getattr(mod, "layer_idx", 0) or 0)
            mod._hadakit_kv = KVQuantizer(None, False, inner or "sdpa", 0, cache_config, codebooks)
            continue
        if rotate and not supported(head_dim):
            raise ValueError(f"{name}: head_dim {head_dim} has no Hadamard matrix; use kv_rotation=False")
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
    if any(m._hadakit_kv.cache is not None for m in mods):
        raise ValueError("calibrate_kv_centers: the KV quantization uses a cache_config (KIVI/NSNQuant/RotateKV), "
                         "which has no centers; drop kvcenter")
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
