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
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn

from hadakit.formats import QuantScheme, fake_quantize, get_scheme
from hadakit.transforms import hadamard_transform, inverse_hadamard_transform, supported

ATTN_NAME = "hadakit_kv"


@dataclass(frozen=True)
class KVQuantizer:
    scheme: QuantScheme
    rotate: bool
    inner: str  # the attention implementation the model used before ("sdpa", "eager", ...)
    sink_tokens: int = 0  # leading positions kept in full precision

    def _quantize(self, t: torch.Tensor) -> torch.Tensor:
        if not self.rotate:
            return fake_quantize(t, self.scheme)
        return inverse_hadamard_transform(fake_quantize(hadamard_transform(t), self.scheme))

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        # t: [batch, kv_heads, seq, head_dim]; the cache is always read from position 0, so the sinks are the first
        # positions of the tensor both in a full-sequence forward and at every decoding step.
        k = min(self.sink_tokens, t.shape[-2])
        if k == 0:
            return self._quantize(t)
        return torch.cat([t[..., :k, :], self._quantize(t[..., k:, :])], dim=-2)


def _inner_attention(module: nn.Module, name: str):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if name == "eager" or name not in ALL_ATTENTION_FUNCTIONS:
        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if eager is None:
            raise ValueError(f"{type(module).__name__}: cannot find its eager attention function to wrap")
        return eager
    return ALL_ATTENTION_FUNCTIONS[name]


def _kv_attention(module, query, key, value, attention_mask, **kwargs):
    quant: KVQuantizer | None = getattr(module, "_hadakit_kv", None)
    if quant is None:
        return _inner_attention(module, "sdpa")(module, query, key, value, attention_mask, **kwargs)
    return _inner_attention(module, quant.inner)(module, query, quant(key), quant(value), attention_mask, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, _kv_attention)


def _head_dim(mod: nn.Module) -> int | None:
    for attr in ("head_dim", "attention_head_size"):  # Llama/Gemma/Qwen/...; BERT
        if isinstance(getattr(mod, attr, None), int):
            return getattr(mod, attr)
    return None


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
