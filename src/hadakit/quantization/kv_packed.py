"""A real, packed, quantized KV cache for transformers (KIVI-style, with Hadamard and NSNQuant options).

Storage per layer and per batch row (keys and values alike):

* ``sink_tokens`` leading tokens in full precision (the attention sinks);
* a **packed part**: blocks of ``group_size`` (G) tokens, integer codes bit-packed into uint8 with
  :func:`hadakit.formats.pack_codes`, plus their scales / zero points (fp16 or bf16) — or, for NSNQuant, vector
  codebook indices plus per-token norms and a per-block channel mean;
* a **residual window** of the most recent tokens in full precision (the input dtype).

Flush rule (KIVI): after every update, while the window holds ``residual_length + group_size`` tokens or more, its
oldest G tokens are quantized and appended to the packed part. So after ``L`` tokens the packed part is exactly
positions ``[S, S + G·k)`` with ``k = max(0, (L − S − R) // G)`` (:func:`packed_range`), the ``R`` most recent tokens are
always in full precision, and the window never holds more than ``R + G − 1`` tokens.

Read rule (attend, then store — as KIVI and transformers' ``QuantizedLayer``): :meth:`PackedKVLayer.update` returns
the *stored* past (sinks, dequantized packed part, window) followed by the new tokens in full precision, then stores
the new tokens and flushes. A query therefore sees every earlier chunk as the cache held it before the query's chunk
arrived, and its own chunk in full precision. In token-by-token decoding that is exactly what a served model sees.
A single forward over a whole window (prefill) sees everything in full precision and only fills the cache.

Methods:

* ``kivi``: asymmetric min/max integer quantization. Keys per channel, grouped along the G tokens of a block (KIVI),
  or per token (groups of ``token_group_size`` along head_dim); values per token. ``rotation="hadamard"`` applies a
  normalized Hadamard (optionally with seeded random signs) along head_dim before quantizing and undoes it after.
* ``nsnquant`` (Son, Choi, Yoo, arXiv 2505.18231): per token ``u = √d·x/‖x‖``; per block of G tokens and channel
  ``μ = mean(u)``; ``w = √d·(u − μ)/‖u − μ‖``; ``z = H·w`` (normalized Hadamard, optional signs), whose entries are
  close to N(0, 1); ``z`` is cut into ``vq_dim``-dimensional vectors, each replaced by the index of its nearest entry
  of one shared codebook of ``2^(bits·vq_dim)`` vectors fitted by k-means on Gaussian samples only
  (:func:`gaussian_codebook`; :func:`fit_codebook` also takes calibration data). Stored: the indices
  (``bits·vq_dim`` bits each), the two norms per token (fp16) and ``μ`` per block (fp16). What is built here differs
  from the paper where stated: the channel mean is taken per block of G tokens (each flushed block carries its own
  mean), and ``vq_dim`` is a free choice (8 → 2^8 codes at 1 bit, 2^16 at 2 bits; 4 → 2^8 codes at 2 bits).

* RotateKV options (Su et al., arXiv 2501.16383), for either method: ``channel_order`` — an outlier-aware
  permutation of the key channels per layer, fitted on calibration keys by :func:`fit_channel_order`, applied before
  the (block, ``rotation_block``) Hadamard and undone after it; ``pre_rope`` — keys are stored *before* RoPE and
  RoPE is applied to the dequantized keys (the model runs inside :func:`pre_rope_attention`, which hands the cache
  pre-RoPE keys and the rotary tables); ``sink_tokens`` — leading tokens in full precision. RotateKV's grouped-head
  rotation mixes the channels of a group of KV heads; with one KV head (Gemma 3 270M) it is the per-head Hadamard.

:func:`fake_quantize_kv` applies the same quantization to whole tensors (no packing), as the cache holds them after
all their tokens, and :func:`packed_range` says which positions that quantized.

Example:
    >>> import torch
    >>> cfg = KVCacheConfig(key_bits=2, value_bits=2, group_size=32, residual_length=32)
    >>> layer = PackedKVLayer(cfg)
    >>> k = torch.randn(1, 2, 100, 64); v = torch.randn(1, 2, 100, 64)
    >>> _ = layer.update(k, v)
    >>> packed_range(100, cfg)
    (0, 64)
    >>> kq, vq = layer.stored()
    >>> fk, fv = fake_quantize_kv(k, v, cfg)
    >>> torch.allclose(kq, fk) and torch.allclose(vq, fv)
    True
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import BaseQuantizedLayer, Cache, get_layer_types_and_kwargs

from hadakit.formats import pack_codes, unpack_codes
from hadakit.transforms import hadamard_transform, inverse_hadamard_transform, supported

__all__ = [
    "KVCacheConfig",
    "PackedKVCache",
    "PackedKVLayer",
    "apply_rope",
    "fake_quantize_kv",
    "fit_channel_order",
    "fit_codebook",
    "gaussian_codebook",
    "packed_range",
    "pre_rope_attention",
]

METHODS = ("kivi", "nsnquant")
KEY_GROUPINGS = ("channel", "token")
ROTATIONS = ("none", "hadamard")
SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class KVCacheConfig:
    """How :class:`PackedKVCache` stores keys and values.

    Args:
        method: ``"kivi"`` (integer codes, scales and zero points) or ``"nsnquant"`` (vector quantization).
        key_bits, value_bits: bits per value; kivi: 1..8, or 16 for "not quantized" (the flushed tokens stay in the
            input dtype); nsnquant: 1..4 with ``bits · vq_dim <= 16``.
        key_grouping: kivi keys ``"channel"`` (one scale/zero per channel per block of ``group_size`` tokens, KIVI)
            or ``"token"`` (per token, groups of ``token_group_size`` along head_dim).
        group_size: G, tokens per packed block (the unit of flushing; the key group of per-channel keys).
        token_group_size: group along head_dim for per-token quantization (values; keys with ``"token"``);
            0 = the whole head_dim.
        residual_length: R, recent tokens always kept in full precision.
        sink_tokens: leading tokens kept in full precision.
        rotation: ``"none"`` or ``"hadamard"`` (along head_dim); ``None`` → ``"none"`` for kivi, ``"hadamard"``
            for nsnquant (which requires it).
        random_signs: multiply by seeded random ±1 signs before the Hadamard.
        seed: seed of the signs (and of the default Gaussian codebook).
        vq_dim: nsnquant vector length (must divide head_dim).
        scale_dtype: ``"float16"`` or ``"bfloat16"`` for scales, zero points, norms and means.
        rotation_block: size of the Hadamard blocks along head_dim (block-diagonal transform); 0 = head_dim.
        channel_order: RotateKV's outlier-aware channel reordering of the **keys**, applied before the rotation and
            undone after it: ``()`` (none), one permutation of ``range(head_dim)`` for every layer, or one per
            decoder layer (``new[..., i] = old[..., order[i]]``); fit one with :func:`fit_channel_order`.
        pre_rope: store keys *before* RoPE and apply RoPE after dequantization (RotateKV). The model must run
            inside :func:`pre_rope_attention`, which hands the cache its pre-RoPE keys and the rotary tables.

    The string form ``str(cfg)`` is ``"key=value,..."`` and :meth:`from_string` reads it back.

    Example:
        >>> cfg = KVCacheConfig(key_bits=2, value_bits=2, group_size=64, residual_length=128)
        >>> KVCacheConfig.from_string(str(cfg)) == cfg
        True
        >>> KVCacheConfig.from_dict(cfg.to_dict()) == cfg
        True
    """

    method: str = "kivi"
    key_bits: int = 2
    value_bits: int = 2
    key_grouping: str = "channel"
    group_size: int = 32
    token_group_size: int = 0
    residual_length: int = 128
    sink_tokens: int = 0
    rotation: str | None = None
    random_signs: bool = False
    seed: int = 0
    vq_dim: int = 8
    scale_dtype: str = "float16"
    rotation_block: int = 0
    channel_order: tuple[tuple[int, ...], ...] = ()
    pre_rope: bool = False

    def __post_init__(self):
        def _int(name, lo, hi=None):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise TypeError(f"KVCacheConfig.{name} must be an int, got {v!r} ({type(v).__name__})")
            if v < lo or (hi is not None and v > hi):
                rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
                raise ValueError(f"KVCacheConfig.{name} must be {rng}, got {v}")

        if self.method not in METHODS:
            raise ValueError(f"KVCacheConfig.method must be one of {METHODS}, got {self.method!r}")
        for name in ("key_bits", "value_bits"):
            _int(name, 1, 16)
        _int("group_size", 1)
        _int("token_group_size", 0)
        _int("residual_length", 0)
        _int("sink_tokens", 0)
        _int("seed", 0)
        _int("vq_dim", 1)
        if self.key_grouping not in KEY_GROUPINGS:
            raise ValueError(f"KVCacheConfig.key_grouping must be one of {KEY_GROUPINGS}, got {self.key_grouping!r}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"KVCacheConfig.scale_dtype must be one of {tuple(SCALE_DTYPES)}, "
                             f"got {self.scale_dtype!r}")
        for name in ("random_signs", "pre_rope"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"KVCacheConfig.{name} must be a bool, got {getattr(self, name)!r}")
        _int("rotation_block", 0)
        object.__setattr__(self, "channel_order", _check_orders(self.channel_order))
        rotation = self.rotation
        if rotation is None:
            rotation = "hadamard" if self.method == "nsnquant" else "none"
            object.__setattr__(self, "rotation", rotation)
        if rotation not in ROTATIONS:
            raise ValueError(f"KVCacheConfig.rotation must be one of {ROTATIONS} (or None for the method's "
                             f"default), got {rotation!r}")
        if self.method == "kivi":
            for name in ("key_bits", "value_bits"):
                b = getattr(self, name)
                if not (1 <= b <= 8 or b == 16):
                    raise ValueError(f"KVCacheConfig.{name}={b}: kivi stores 1..8-bit codes, or 16 for 'not "
                                     f"quantized'; pick one of those")
        else:
            if rotation != "hadamard":
                raise ValueError("KVCacheConfig: nsnquant needs rotation='hadamard' (its Gaussianizing step); "
                                 "leave rotation=None or set it to 'hadamard'")
            for name in ("key_bits", "value_bits"):
                b = getattr(self, name)
                if b > 4 or b * self.vq_dim > 16:
                    raise ValueError(f"KVCacheConfig.{name}={b} with vq_dim={self.vq_dim}: an nsnquant codebook "
                                     f"has 2^(bits·vq_dim) entries, at most 2^16; use bits <= 4 and a smaller "
                                     f"vq_dim (e.g. bits 2 with vq_dim 8 or 4)")

    # --- serialization -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (JSON-serializable)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KVCacheConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise a ValueError naming them and the known ones."""
        if not isinstance(d, dict):
            raise TypeError(f"KVCacheConfig.from_dict needs a dict, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"KVCacheConfig: unknown field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**d)

    def __str__(self) -> str:
        d = self.to_dict()
        d["channel_order"] = "|".join(".".join(map(str, o)) for o in self.channel_order)
        return ",".join(f"{k}={v}" for k, v in d.items())

    @classmethod
    def from_string(cls, s: str) -> KVCacheConfig:
        """Parse ``"key=value,..."`` (the form ``str(cfg)`` writes; omitted fields take their defaults). ``;`` is
        accepted as a separator too (for embedding in strings that use commas themselves)."""
        if not isinstance(s, str):
            raise TypeError(f"KVCacheConfig.from_string needs a str, got {type(s).__name__}")
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        out: dict[str, Any] = {}
        for part in filter(None, (p.strip() for p in s.replace(";", ",").split(","))):
            if "=" not in part:
                raise ValueError(f"KVCacheConfig.from_string: {part!r} is not 'key=value'; write e.g. "
                                 f"'method=kivi,key_bits=2'")
            k, v = (x.strip() for x in part.split("=", 1))
            if k not in types:
                raise ValueError(f"KVCacheConfig.from_string: unknown field {k!r}; known fields are {sorted(types)}")
            t = str(types[k])
            if k == "channel_order":
                try:
                    out[k] = tuple(tuple(int(i) for i in o.split(".")) for o in v.split("|")) if v else ()
                except ValueError:
                    raise ValueError(f"KVCacheConfig.from_string: channel_order must be permutations written "
                                     f"'3.0.1.2|...' (layers separated by '|'), got {v[:40]!r}") from None
            elif k == "rotation" and v == "None":
                out[k] = None
            elif t == "int":
                try:
                    out[k] = int(v)
                except ValueError:
                    raise ValueError(f"KVCacheConfig.from_string: {k}={v!r} must be an integer") from None
            elif t == "bool":
                if v not in ("True", "False", "true", "false", "1", "0"):
                    raise ValueError(f"KVCacheConfig.from_string: {k}={v!r} must be True or False")
                out[k] = v in ("True", "true", "1")
            else:
                out[k] = v
        return cls(**out)

    # --- derived -------------------------------------------------------------------------------------------------
    def order_for(self, layer_idx: int) -> tuple[int, ...] | None:
        """The key channel order of decoder layer ``layer_idx`` (None when there is none)."""
        if not self.channel_order:
            return None
        if len(self.channel_order) == 1:
            return self.channel_order[0]
        if not 0 <= layer_idx < len(self.channel_order):
            raise ValueError(f"KVCacheConfig.channel_order holds {len(self.channel_order)} layers, layer {layer_idx} "
                             f"was asked for; fit one order per decoder layer (or a single shared one)")
        return self.channel_order[layer_idx]

    def quantizes(self, kind: str) -> bool:
        """Whether ``kind`` ("key"/"value") is quantized (kivi bits 16 means stored as is)."""
        return (self.key_bits if kind == "key" else self.value_bits) != 16

    def check_head_dim(self, head_dim: int) -> None:
        """Raise a ValueError if this config cannot quantize heads of ``head_dim``."""
        g = self.token_group_size or head_dim
        if head_dim % g:
            raise ValueError(f"KVCacheConfig.token_group_size={self.token_group_size} does not divide head_dim "
                             f"{head_dim}; use a divisor of it or 0 (the whole head)")
        if self.rotation == "hadamard" and not supported(head_dim):
            raise ValueError(f"head_dim {head_dim} has no Hadamard matrix; use rotation='none'")
        rb = self.rotation_block
        if rb and (head_dim % rb or (self.rotation == "hadamard" and not supported(rb))):
            raise ValueError(f"KVCacheConfig.rotation_block={rb} must divide head_dim {head_dim} and have a Hadamard "
                             f"matrix; use a power of two dividing it, or 0 (the whole head)")
        for i, order in enumerate(self.channel_order):
            if len(order) != head_dim:
                raise ValueError(f"KVCacheConfig.channel_order[{i}] has {len(order)} entries, head_dim is {head_dim}; "
                                 f"fit it on keys of this model (fit_channel_order)")
        if self.method == "nsnquant" and head_dim % self.vq_dim:
            raise ValueError(f"KVCacheConfig.vq_dim={self.vq_dim} does not divide head_dim {head_dim}; pick a "
                             f"divisor such as 8 or 4")
        for b in (self.key_bits, self.value_bits):
            if b != 16 and (head_dim * b) % 8:
                raise ValueError(f"head_dim {head_dim} × {b} bits is not a whole number of bytes per token; use "
                                 f"a head_dim that is a multiple of 8")


def _check_orders(orders) -> tuple[tuple[int, ...], ...]:
    if orders is None:
        return ()
    if not isinstance(orders, (tuple, list)):
        raise TypeError(f"KVCacheConfig.channel_order must be a tuple of permutations, got {type(orders).__name__}")
    if orders and all(isinstance(i, int) and not isinstance(i, bool) for i in orders):
        orders = (orders,)  # a single permutation shared by all layers
    out = []
    for i, o in enumerate(orders):
        if not isinstance(o, (tuple, list)) or not all(isinstance(j, int) and not isinstance(j, bool) for j in o):
            raise TypeError(f"KVCacheConfig.channel_order[{i}] must be a sequence of ints")
        if sorted(o) != list(range(len(o))):
            raise ValueError(f"KVCacheConfig.channel_order[{i}] is not a permutation of range({len(o)}); fit one "
                             f"with fit_channel_order(...)")
        out.append(tuple(o))
    if len({len(o) for o in out}) > 1:
        raise ValueError("KVCacheConfig.channel_order: permutations of different lengths; all layers share head_dim")
    return tuple(out)


def packed_range(length: int, config: KVCacheConfig) -> tuple[int, int]:
    """Positions ``[start, end)`` held in the packed (quantized) part once ``length`` tokens have been stored.

    >>> packed_range(300, KVCacheConfig(group_size=32, residual_length=128, sink_tokens=4))
    (4, 164)
    """
    s, g, r = config.sink_tokens, config.group_size, config.residual_length
    k = max(0, (length - s - r) // g)
    return min(s, length), min(s, length) + g * k


# --- rotation ------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _signs_cpu(head_dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (head_dim,), generator=g).to(torch.float32) * 2 - 1


def _signs(config: KVCacheConfig, head_dim: int, device) -> torch.Tensor | None:
    return _signs_cpu(head_dim, config.seed).to(device) if config.random_signs else None


def _rotate(x: torch.Tensor, config: KVCacheConfig, order: torch.Tensor | None = None) -> torch.Tensor:
    """Reorder channels (``order``, keys only), then the (block) Hadamard with optional signs."""
    if order is not None:
        x = x[..., order.to(x.device)]
    if config.rotation == "none":
        return x
    return hadamard_transform(x, signs=_signs(config, x.shape[-1], x.device), block_size=config.rotation_block or None)


def _unrotate(x: torch.Tensor, config: KVCacheConfig, order: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of :func:`_rotate`."""
    if config.rotation != "none":
        x = inverse_hadamard_transform(x, signs=_signs(config, x.shape[-1], x.device),
                                       block_size=config.rotation_block or None)
    if order is not None:
        x = x[..., torch.argsort(order).to(x.device)]
    return x


def fit_channel_order(keys: torch.Tensor, blocks: int) -> tuple[int, ...]:
    """RotateKV's outlier-aware channel order from calibration keys ``[..., head_dim]`` (any leading shape).

    Channels are ranked by their mean squared value (outlier channels carry the most energy) and dealt to the
    ``blocks`` contiguous blocks of ``head_dim // blocks`` channels in a snake order (block 0, 1, …, B−1, B−1, …, 0,
    0, …), so every block — a Hadamard block of ``rotation_block = head_dim // blocks`` and the per-token
    quantization group of the same size — receives an equal share of the outliers and nearly equal energy. Returns
    the permutation ``order`` with ``reordered[..., i] = keys[..., order[i]]``. With ``blocks=1`` it is the ranking
    itself (a full-head Hadamard mixes every channel anyway, so the order then only relabels inputs).
    """
    if not torch.is_tensor(keys) or not keys.is_floating_point() or keys.dim() < 1:
        raise TypeError("fit_channel_order: keys must be a float tensor [..., head_dim]")
    d = keys.shape[-1]
    if not isinstance(blocks, int) or blocks < 1 or d % blocks:
        raise ValueError(f"fit_channel_order: blocks={blocks!r} must be a positive int dividing head_dim {d}")
    energy = keys.detach().reshape(-1, d).double().pow(2).mean(0)
    if not torch.isfinite(energy).all():
        raise ValueError("fit_channel_order: keys contain NaN or inf")
    ranked = torch.argsort(energy, descending=True, stable=True).tolist()
    per = d // blocks
    slots: list[list[int]] = [[] for _ in range(blocks)]
    for r, ch in enumerate(ranked):
        lap, pos = divmod(r, blocks)
        slots[pos if lap % 2 == 0 else blocks - 1 - pos].append(ch)
    assert all(len(sl) == per for sl in slots)
    return tuple(ch for sl in slots for ch in sl)


# --- codebooks -----------------------------------------------------------------------------------------------------
def _nearest(x: torch.Tensor, codebook: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
    """Index of the nearest codebook row for each row of ``x`` ([N, dim] float32) — int64 [N]."""
    c2 = (codebook * codebook).sum(1)
    out = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    for i in range(0, x.shape[0], chunk):
        xb = x[i:i + chunk]
        out[i:i + chunk] = (c2 - 2 * xb @ codebook.T).argmin(1)
    return out


def fit_codebook(samples: torch.Tensor, bits: int, dim: int, seed: int = 0, *, iters: int = 25) -> torch.Tensor:
    """k-means codebook of ``2^(bits·dim)`` vectors of ``dim`` values, fitted on ``samples``.

    ``samples``: any float tensor whose element count is a multiple of ``dim`` (read as rows of ``dim`` values, e.g.
    Gaussian draws or Hadamard-rotated normalized keys from calibration text); at least as many rows as codes.
    Initialization picks distinct random rows (``torch.Generator`` seeded with ``seed``), then ``iters`` Lloyd
    iterations; an emptied cluster is re-seeded from a random row. Deterministic for a given seed and input.
    Returns float32 ``[2^(bits·dim), dim]``.

    Example:
        >>> x = torch.randn(4096, 2, generator=torch.Generator().manual_seed(0))
        >>> cb = fit_codebook(x, bits=2, dim=2, seed=0)
        >>> cb.shape
        torch.Size([16, 2])
        >>> torch.equal(cb, fit_codebook(x, bits=2, dim=2, seed=0))
        True
    """
    if not isinstance(bits, int) or not isinstance(dim, int) or bits < 1 or dim < 1 or bits * dim > 16:
        raise ValueError(f"fit_codebook: need ints bits >= 1, dim >= 1 with bits·dim <= 16, got bits={bits!r}, "
                         f"dim={dim!r}")
    if not torch.is_tensor(samples) or not samples.is_floating_point():
        raise TypeError("fit_codebook: samples must be a float tensor")
    if samples.numel() % dim:
        raise ValueError(f"fit_codebook: {samples.numel()} sample values are not rows of dim={dim}")
    x = samples.detach().reshape(-1, dim).to(torch.float32)
    k = 1 << (bits * dim)
    if x.shape[0] < k:
        raise ValueError(f"fit_codebook: {x.shape[0]} rows for {k} codes; give at least as many rows as codes "
                         f"(ideally 50+ per code)")
    if not torch.isfinite(x).all():
        raise ValueError("fit_codebook: samples contain NaN or inf")
    g = torch.Generator(device="cpu").manual_seed(seed)
    cb = x[torch.randperm(x.shape[0], generator=g)[:k].to(x.device)].clone()
    for _ in range(iters):
        idx = _nearest(x, cb)
        sums = torch.zeros_like(cb).index_add_(0, idx, x)
        counts = torch.bincount(idx, minlength=k).to(x.dtype)
        empty = counts == 0
        cb = torch.where(empty[:, None], cb, sums / counts.clamp_min(1)[:, None])
        n_empty = int(empty.sum())
        if n_empty:
            cb[empty] = x[torch.randint(0, x.shape[0], (n_empty,), generator=g).to(x.device)]
    return cb


@functools.lru_cache(maxsize=16)
def _gaussian_codebook_cached(bits: int, dim: int, seed: int, samples_per_code: int, iters: int) -> torch.Tensor:
    k = 1 << (bits * dim)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(k * samples_per_code, dim, generator=g)
    return fit_codebook(x, bits, dim, seed, iters=iters)


def gaussian_codebook(bits: int, dim: int, seed: int = 0, *, samples_per_code: int = 64,
                      iters: int = 25) -> torch.Tensor:
    """The calibration-free NSNQuant codebook: :func:`fit_codebook` on ``2^(bits·dim) · samples_per_code`` draws of
    N(0, I_dim) from a generator seeded with ``seed`` (memoized; a fresh copy is returned)."""
    return _gaussian_codebook_cached(bits, dim, seed, samples_per_code, iters).clone()


# --- block quantizers ----------------------------------------------------------------------------------------------
# A block tensor is [B, n, H, G, D]: n blocks of G tokens. Each quantizer returns a dict of fields, each with the
# block axis at dim 1 ("codes" unpacked, integer), and the matching dequantizer inverts it.

def _minmax_quant(x: torch.Tensor, bits: int, dim: int, sdt: torch.dtype) -> dict[str, torch.Tensor]:
    lo = x.amin(dim, keepdim=True)
    hi = x.amax(dim, keepdim=True)
    qmax = (1 << bits) - 1
    scale = ((hi - lo) / qmax).clamp_min(1e-5).to(sdt)
    zero = lo.to(sdt)
    codes = torch.round((x - zero.float()) / scale.float()).clamp_(0, qmax).to(torch.uint8)
    return {"codes": codes, "scale": scale, "zero": zero}


def _minmax_dequant(f: dict[str, torch.Tensor]) -> torch.Tensor:
    return f["codes"].float() * f["scale"].float() + f["zero"].float()


def _kivi_quant(x: torch.Tensor, bits: int, per_channel: bool, config: KVCacheConfig,
                order: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    sdt = SCALE_DTYPES[config.scale_dtype]
    x = _rotate(x.float(), config, order)
    if per_channel:
        return _minmax_quant(x, bits, -2, sdt)  # reduce over the G tokens of the block
    d = x.shape[-1]
    gs = config.token_group_size or d
    f = _minmax_quant(x.reshape(*x.shape[:-1], d // gs, gs), bits, -1, sdt)
    f["codes"] = f["codes"].reshape(x.shape)
    return f


def _kivi_dequant(f: dict[str, torch.Tensor], per_channel: bool, config: KVCacheConfig,
                  order: torch.Tensor | None = None) -> torch.Tensor:
    if per_channel:
        y = _minmax_dequant(f)
    else:
        c = f["codes"]
        gs = c.shape[-1] // f["scale"].shape[-2]
        y = _minmax_dequant({"codes": c.reshape(*c.shape[:-1], -1, gs), "scale": f["scale"],
                             "zero": f["zero"]}).reshape(c.shape)
    return _unrotate(y, config, order)


def _nsn_quant(x: torch.Tensor, codebook: torch.Tensor, config: KVCacheConfig,
               order: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    sdt = SCALE_DTYPES[config.scale_dtype]
    x = x.float()
    d = x.shape[-1]
    rd = math.sqrt(d)
    n1 = x.norm(dim=-1, keepdim=True).to(sdt)
    u = x * (rd / n1.float().clamp_min(1e-30))
    mu = u.mean(dim=-2, keepdim=True).to(sdt)  # per block (G tokens) and channel
    v = u - mu.float()
    n2 = v.norm(dim=-1, keepdim=True).to(sdt)
    w = v * (rd / n2.float().clamp_min(1e-30))
    z = _rotate(w, config, order)
    vd = codebook.shape[1]
    idx = _nearest(z.reshape(-1, vd), codebook.to(z.device))
    return {"codes": idx.reshape(*z.shape[:-1], d // vd), "norm1": n1, "norm2": n2, "mean": mu}


def _nsn_dequant(f: dict[str, torch.Tensor], codebook: torch.Tensor, config: KVCacheConfig,
                 order: torch.Tensor | None = None) -> torch.Tensor:
    idx = f["codes"]
    cb = codebook.to(idx.device)
    z = cb[idx.reshape(-1).long()].reshape(*idx.shape[:-1], idx.shape[-1] * cb.shape[1])
    w = _unrotate(z, config, order)
    rd = math.sqrt(z.shape[-1])
    return (f["norm1"].float() / rd) * (f["mean"].float() + (f["norm2"].float() / rd) * w)


class _Quantizer:
    """The quantizer of one kind ("key"/"value") for one config (and codebook)."""

    def __init__(self, config: KVCacheConfig, kind: str, codebook: torch.Tensor | None = None, layer_idx: int = 0):
        self.config = config
        self.kind = kind
        order = config.order_for(layer_idx) if kind == "key" else None
        self.order = None if order is None else torch.tensor(order, dtype=torch.long)
        self.bits = config.key_bits if kind == "key" else config.value_bits
        self.enabled = config.quantizes(kind)
        self.per_channel = kind == "key" and config.key_grouping == "channel"
        self.codebook = None
        self.code_bits = self.bits
        if config.method == "nsnquant":
            self.codebook = codebook if codebook is not None else gaussian_codebook(self.bits, config.vq_dim,
                                                                                     config.seed)
            want = (1 << (self.bits * config.vq_dim), config.vq_dim)
            if tuple(self.codebook.shape) != want:
                raise ValueError(f"nsnquant {kind} codebook has shape {tuple(self.codebook.shape)}, {self.bits}-bit "
                                 f"vq_dim={config.vq_dim} needs {want}; fit one with fit_codebook(samples, "
                                 f"{self.bits}, {config.vq_dim})")
            self.codebook = self.codebook.detach().float()
            self.code_bits = self.bits * config.vq_dim

    def quant(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self.enabled:
            return {"raw": x}
        if self.codebook is not None:
            return _nsn_quant(x, self.codebook, self.config, self.order)
        return _kivi_quant(x, self.bits, self.per_channel, self.config, self.order)

    def dequant(self, f: dict[str, torch.Tensor]) -> torch.Tensor:
        if not self.enabled:
            return f["raw"]
        if self.codebook is not None:
            return _nsn_dequant(f, self.codebook, self.config, self.order)
        return _kivi_dequant(f, self.per_channel, self.config, self.order)

    # packing of the codes field: [B, n, ...] integer codes <-> uint8 [B, n, row_bytes]
    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        b, n = codes.shape[:2]
        w = self.code_bits
        if w <= 8:
            payload = pack_codes(codes, w)
        else:  # a w-bit LSB-first stream, written as w one-bit codes per index
            shifts = torch.arange(w, device=codes.device, dtype=torch.int64)
            payload = pack_codes((codes.to(torch.int64)[..., None] >> shifts) & 1, 1)
        return payload.view(b, n, -1)

    def unpack(self, payload: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        count = math.prod(shape)
        w = self.code_bits
        if w <= 8:
            return unpack_codes(payload, w, count).view(shape)
        bits = unpack_codes(payload, 1, count * w).view(count, w).to(torch.int64)
        shifts = torch.arange(w, device=payload.device, dtype=torch.int64)
        return (bits << shifts).sum(1).view(shape)


def _to_blocks(x: torch.Tensor, g: int) -> torch.Tensor:
    """[B, H, n·G, D] -> [B, n, H, G, D]."""
    b, h, t, d = x.shape
    return x.reshape(b, h, t // g, g, d).permute(0, 2, 1, 3, 4)


def _from_blocks(x: torch.Tensor) -> torch.Tensor:
    """[B, n, H, G, D] -> [B, H, n·G, D]."""
    b, n, h, g, d = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b, h, n * g, d)


def _check_kv(keys: torch.Tensor, values: torch.Tensor, where: str) -> None:
    for name, t in (("keys", keys), ("values", values)):
        if not torch.is_tensor(t) or t.dim() != 4 or not t.is_floating_point():
            raise ValueError(f"{where}: {name} must be a float tensor [batch, kv_heads, seq, head_dim], got "
                             f"{getattr(t, 'shape', type(t))}")
    if keys.shape[:3] != values.shape[:3]:
        raise ValueError(f"{where}: keys {tuple(keys.shape)} and values {tuple(values.shape)} differ in batch, "
                         f"heads or length")


def fake_quantize_kv(keys: torch.Tensor, values: torch.Tensor, config: KVCacheConfig,
                     codebooks: dict[str, torch.Tensor] | None = None, layer_idx: int = 0
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values ``[batch, kv_heads, seq, head_dim]`` as :class:`PackedKVCache` holds them once all ``seq``
    tokens are stored: sinks and the residual window unchanged, positions :func:`packed_range` quantized and
    dequantized (same blocks, grouping, rotation, scale rounding and codebooks as the cache; nothing is packed).

    ``codebooks``: nsnquant codebooks ``{"key": ..., "value": ...}`` (default: :func:`gaussian_codebook`).
    ``layer_idx``: the decoder layer (picks its key ``channel_order``). With ``config.pre_rope`` pass the keys
    *before* RoPE (the cache stores those; RoPE is applied to what comes out).

    What a *query* sees also depends on when it ran (see the module docstring): a query whose chunk starts at
    position ``a`` sees ``fake_quantize_kv`` outputs at positions ``packed_range(a, config)`` and the full-precision
    tensors elsewhere.
    """
    _check_kv(keys, values, "fake_quantize_kv")
    config.check_head_dim(keys.shape[-1])
    config.check_head_dim(values.shape[-1])
    codebooks = codebooks or {}
    start, end = packed_range(keys.shape[-2], config)
    out = []
    for kind, x in (("key", keys), ("value", values)):
        q = _Quantizer(config, kind, codebooks.get(kind), layer_idx)
        if end == start or not q.enabled:
            out.append(x)
            continue
        blocks = _to_blocks(x[..., start:end, :], config.group_size)
        y = _from_blocks(q.dequant(q.quant(blocks))).to(x.dtype)
        out.append(torch.cat([x[..., :start, :], y, x[..., end:, :]], dim=-2))
    return out[0], out[1]


class PackedKVLayer(BaseQuantizedLayer):
    """One layer of :class:`PackedKVCache`: sinks, packed blocks and a full-precision window (see the module
    docstring for the flush and read rules). Built on transformers' ``BaseQuantizedLayer``: ``keys``/``values`` hold
    the residual window, ``cumulative_length`` the number of tokens stored."""

    is_sliding = False
    is_compileable = False

    def __init__(self, config: KVCacheConfig, codebooks: dict[str, torch.Tensor] | None = None, layer_idx: int = 0):
        super().__init__()
        if not isinstance(config, KVCacheConfig):
            raise TypeError(f"PackedKVLayer needs a KVCacheConfig, got {type(config).__name__}")
        self.config = config
        self.layer_idx = layer_idx
        codebooks = codebooks or {}
        self._q = {kind: _Quantizer(config, kind, codebooks.get(kind), layer_idx) for kind in ("key", "value")}
        self._reset_storage()

    def _reset_storage(self) -> None:
        self.rope_cos = self.rope_sin = None  # pre_rope: the rotary tables of every stored position [B, T, D]
        self.sink_keys = self.sink_values = None
        self.packed: dict[str, dict[str, torch.Tensor] | None] = {"key": None, "value": None}
        self.n_blocks = 0
        self._shape: tuple[int, int, int] | None = None  # (batch, heads, head_dim)

    # transformers' abstract hooks: quantize / dequantize one [B, n, H, G, D] stack of blocks, packed.
    def _quantize(self, tensor: torch.Tensor, kind: str = "key") -> dict[str, torch.Tensor]:
        q = self._q[kind]
        f = q.quant(tensor)
        if "codes" in f:
            f["codes"] = q.pack(f["codes"])
        return f

    def _dequantize(self, fields: dict[str, torch.Tensor], kind: str = "key") -> torch.Tensor:
        q = self._q[kind]
        if "codes" in fields:
            b, h, d = self._shape
            n, g = self.n_blocks, self.config.group_size
            per = d // self.config.vq_dim if q.codebook is not None else d
            fields = dict(fields, codes=q.unpack(fields["codes"], (b, n, h, g, per)))
        return _from_blocks(q.dequant(fields))

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.config.check_head_dim(key_states.shape[-1])
        self.config.check_head_dim(value_states.shape[-1])
        if key_states.shape[-1] != value_states.shape[-1]:
            raise ValueError(f"PackedKVLayer: key head_dim {key_states.shape[-1]} != value head_dim "
                             f"{value_states.shape[-1]}; this cache stores equal head sizes")
        self._shape = (key_states.shape[0], key_states.shape[1], key_states.shape[-1])
        self.sink_keys = self.keys = key_states[..., :0, :]
        self.sink_values = self.values = value_states[..., :0, :]

    def stored(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored keys and values, dequantized: ``[batch, kv_heads, stored tokens, head_dim]``."""
        if not self.is_initialized:
            raise ValueError("PackedKVLayer.stored: the layer holds nothing yet; call update first")
        out = []
        for kind, sink, window in (("key", self.sink_keys, self.keys), ("value", self.sink_values, self.values)):
            parts = [sink]
            if self.n_blocks:
                parts.append(self._dequantize(self.packed[kind], kind).to(window.dtype))
            parts.append(window)
            out.append(torch.cat(parts, dim=-2))
        return out[0], out[1]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the stored past followed by the new states (full precision), then store the new states."""
        if self.config.pre_rope:
            raise ValueError("PackedKVLayer.update: this cache stores keys before RoPE (pre_rope=True) but was "
                             "given post-RoPE keys; run the model inside `with pre_rope_attention(model):`")
        return self._update(key_states, value_states)

    def update_pre_rope(self, key_states: torch.Tensor, value_states: torch.Tensor, cos: torch.Tensor,
                        sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-RoPE update: ``key_states`` are keys *before* RoPE and ``cos``/``sin`` ``[batch, seq, head_dim]``
        their rotary tables (as the model computed them). Returns the stored past and the new states as in
        :meth:`update`, with RoPE applied to all keys after dequantization (the tables of past positions are kept
        in full precision: a kernel recomputes them from the position, so :meth:`nbytes` does not count them)."""
        if not self.config.pre_rope:
            raise ValueError("PackedKVLayer.update_pre_rope: the config has pre_rope=False; use update()")
        for name, t in (("cos", cos), ("sin", sin)):
            if not torch.is_tensor(t) or t.dim() != 3 or t.shape[1] != key_states.shape[-2] \
                    or t.shape[-1] != key_states.shape[-1]:
                raise ValueError(f"PackedKVLayer.update_pre_rope: {name} must be [batch, seq, head_dim] matching "
                                 f"keys {tuple(key_states.shape)}, got {getattr(t, 'shape', type(t))}")
        k, v = self._update(key_states, value_states)
        self.rope_cos = cos if self.rope_cos is None else torch.cat([self.rope_cos, cos], dim=1)
        self.rope_sin = sin if self.rope_sin is None else torch.cat([self.rope_sin, sin], dim=1)
        return apply_rope(k, self.rope_cos, self.rope_sin), v

    def _update(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _check_kv(key_states, value_states, "PackedKVLayer.update")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        elif (key_states.shape[0], key_states.shape[1], key_states.shape[-1]) != self._shape:
            raise ValueError(f"PackedKVLayer.update: states {tuple(key_states.shape)} do not match the cache's "
                             f"(batch, heads, head_dim) = {self._shape}")
        past_k, past_v = self.stored()
        out_k = torch.cat([past_k, key_states], dim=-2)
        out_v = torch.cat([past_v, value_states], dim=-2)
        self._append(key_states, value_states)
        return out_k, out_v

    def _append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        cfg = self.config
        n = k.shape[-2]
        self.cumulative_length += n
        take = min(cfg.sink_tokens - self.sink_keys.shape[-2], n)
        if take > 0:
            self.sink_keys = torch.cat([self.sink_keys, k[..., :take, :]], dim=-2)
            self.sink_values = torch.cat([self.sink_values, v[..., :take, :]], dim=-2)
            k, v = k[..., take:, :], v[..., take:, :]
        self.keys = torch.cat([self.keys, k], dim=-2) if self.keys.numel() else k
        self.values = torch.cat([self.values, v], dim=-2) if self.values.numel() else v
        g, r = cfg.group_size, cfg.residual_length
        nflush = max(0, (self.keys.shape[-2] - r) // g)
        if nflush == 0:
            return
        cut = nflush * g
        for kind, x in (("key", self.keys[..., :cut, :]), ("value", self.values[..., :cut, :])):
            f = self._quantize(_to_blocks(x, g), kind)
            old = self.packed[kind]
            self.packed[kind] = f if old is None else {name: torch.cat([old[name], t], dim=1) for name, t in f.items()}
        self.n_blocks += nflush
        self.keys = self.keys[..., cut:, :].contiguous()
        self.values = self.values[..., cut:, :].contiguous()

    # --- accounting ----------------------------------------------------------------------------------------------
    def nbytes(self) -> dict[str, int]:
        """Bytes stored, by part: ``codes`` (packed uint8), ``scales``, ``zeros``, ``norms``, ``means``, ``raw``
        (flushed tokens kept unquantized at 16 bits), ``window`` (residual + sinks, full precision), ``total``."""
        out = dict.fromkeys(("codes", "scales", "zeros", "norms", "means", "raw", "window"), 0)
        names = {"codes": "codes", "scale": "scales", "zero": "zeros", "norm1": "norms", "norm2": "norms",
                 "mean": "means", "raw": "raw"}
        for f in self.packed.values():
            for name, t in (f or {}).items():
                out[names[name]] += t.numel() * t.element_size()
        if self.is_initialized:
            for t in (self.sink_keys, self.sink_values, self.keys, self.values):
                out["window"] += t.numel() * t.element_size()
        out["total"] = sum(out.values())
        return out

    def bytes_per_token(self) -> float:
        """Total stored bytes divided by the tokens stored (0.0 when empty)."""
        return self.nbytes()["total"] / self.cumulative_length if self.cumulative_length else 0.0

    # --- batch operations ----------------------------------------------------------------------------------------
    def _map_batch(self, fn) -> None:
        if not self.is_initialized:
            return
        b0 = self.sink_keys.shape[0]
        self.sink_keys, self.sink_values = fn(self.sink_keys), fn(self.sink_values)
        self.keys, self.values = fn(self.keys), fn(self.values)
        if self.rope_cos is not None and self.rope_cos.shape[0] == b0 and b0 > 1:  # batch-1 tables broadcast
            self.rope_cos, self.rope_sin = fn(self.rope_cos), fn(self.rope_sin)
        for kind, f in self.packed.items():
            if f is not None:
                self.packed[kind] = {name: fn(t) for name, t in f.items()}
        b = self.sink_keys.shape[0]
        self._shape = (b, *self._shape[1:])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the batch rows (beam search): codes are packed per batch row, so rows move whole."""
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("PackedKVLayer cannot be cropped (quantized blocks cannot be un-quantized); use "
                                  "generation without assisted decoding")

    def reset(self) -> None:
        super().reset()
        self._reset_storage()


class PackedKVCache(Cache):
    """A transformers ``Cache`` of :class:`PackedKVLayer` (one per decoder layer), for ``model(...,
    past_key_values=cache)`` and ``model.generate(..., past_key_values=cache)``.

    With ``model_config`` the layers are created up front (sliding-window layers of hybrid models store every token
    too, as full layers; the model's sliding mask still limits what they attend to); without it they are created
    lazily. ``codebooks``: nsnquant codebooks ``{"key": tensor, "value": tensor}`` (default Gaussian ones).

    Example:
        >>> import torch, transformers
        >>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
        ...                                num_attention_heads=1, num_key_value_heads=1)
        >>> model = transformers.LlamaForCausalLM(cfg).eval()
        >>> cache = PackedKVCache(KVCacheConfig(key_bits=2, value_bits=2, residual_length=8, group_size=8), cfg)
        >>> out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=20, do_sample=False,
        ...                      cache=cache, pad_token_id=0)
        >>> cache.get_seq_length(), cache.nbytes()["total"] > 0
        (22, True)
    """

    def __init__(self, config: KVCacheConfig, model_config=None, codebooks: dict[str, torch.Tensor] | None = None):
        if not isinstance(config, KVCacheConfig):
            raise TypeError(f"PackedKVCache needs a KVCacheConfig, got {type(config).__name__}; build one with "
                            f"KVCacheConfig(...) or KVCacheConfig.from_string(...)")
        self.config = config
        self.codebooks = codebooks
        make = functools.partial(PackedKVLayer, config, codebooks)
        make()  # validate the codebooks now rather than at the first forward
        if model_config is not None:
            layer_types, _ = get_layer_types_and_kwargs(model_config.get_text_config(decoder=True))
            bad = set(layer_types) - {"full_attention", "sliding_attention"}
            if bad:
                raise ValueError(f"PackedKVCache supports full and sliding attention layers, this model has "
                                 f"{sorted(bad)}")
            if len(config.channel_order) > 1 and len(config.channel_order) != len(layer_types):
                raise ValueError(f"KVCacheConfig.channel_order holds {len(config.channel_order)} layers, the model "
                                 f"has {len(layer_types)}; fit one order per layer (or one shared order)")
            super().__init__(layers=[make(layer_idx=i) for i in range(len(layer_types))])
        else:
            if len(config.channel_order) > 1:
                raise ValueError("PackedKVCache: per-layer channel_order needs model_config (to build each layer "
                                 "with its own order); pass the model's config")
            super().__init__(layer_class_to_replicate=make)

    def update_pre_rope(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
                        cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`PackedKVLayer.update_pre_rope` of layer ``layer_idx`` (what :func:`pre_rope_attention` calls)."""
        if self.layer_class_to_replicate is not None:
            while len(self.layers) <= layer_idx:
                self.layers.append(self.layer_class_to_replicate())
        return self.layers[layer_idx].update_pre_rope(key_states, value_states, cos, sin)

    def nbytes(self, layer_idx: int | None = None) -> dict[str, int]:
        """Stored bytes by part (see :meth:`PackedKVLayer.nbytes`) of one layer, or summed over all layers."""
        layers = self.layers if layer_idx is None else [self.layers[layer_idx]]
        out: dict[str, int] = {}
        for layer in layers:
            for k, v in layer.nbytes().items():
                out[k] = out.get(k, 0) + v
        return out

    def bytes_per_token(self, layer_idx: int | None = None) -> float:
        """Stored bytes per token, of one layer or of all layers together."""
        n = self.get_seq_length(0 if layer_idx is None else layer_idx)
        return self.nbytes(layer_idx)["total"] / n if n else 0.0


# --- pre-RoPE keys (RotateKV) ---------------------------------------------------------------------------------------
def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in the Llama/Gemma "rotate half" convention: ``x·cos + rotate_half(x)·sin`` with ``x``
    ``[batch, heads, seq, head_dim]`` and ``cos``/``sin`` ``[batch, seq, head_dim]`` (the same float operations, in
    the same order, as transformers' ``apply_rotary_pos_emb``, so results are bit-identical)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    h = x.shape[-1] // 2
    rotated = torch.cat((-x[..., h:], x[..., :h]), dim=-1)
    return (x * cos) + (rotated * sin)


def _pre_rope_forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None,
                      cache=None, past_key_values=None, **kwargs):
    """The attention forward of Llama-family modules (q/k/v/o projections, optional q_norm/k_norm, RoPE from
    ``position_embeddings``), with the keys handed to a pre-RoPE :class:`PackedKVCache` before RoPE; otherwise the
    class's own forward."""
    cache = cache if cache is not None else past_key_values
    if not (isinstance(cache, PackedKVCache) and cache.config.pre_rope):
        return type(self).forward(self, hidden_states, position_embeddings=position_embeddings,
                                  attention_mask=attention_mask, cache=cache, **kwargs)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    mod = sys.modules[type(self).__module__]
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    q = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    k = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    if getattr(self, "q_norm", None) is not None:
        q = self.q_norm(q)
    if getattr(self, "k_norm", None) is not None:
        k = self.k_norm(k)
    cos, sin = position_embeddings
    q, _ = mod.apply_rotary_pos_emb(q, k, cos, sin)
    k, v = cache.update_pre_rope(k, v, self.layer_idx, cos, sin)
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, mod.eager_attention_forward)
    extra = {"sliding_window": self.sliding_window} if hasattr(self, "sliding_window") else {}
    out, weights = attention(self, q, k, v, attention_mask, dropout=self.attention_dropout if self.training else 0.0,
                             scaling=self.scaling, **extra, **kwargs)
    return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


def _rope_attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    found = []
    for m in model.modules():
        ns = sys.modules.get(type(m).__module__)
        if all(hasattr(m, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "layer_idx", "scaling")) \
                and hasattr(ns, "apply_rotary_pos_emb") and hasattr(ns, "eager_attention_forward"):
            found.append(m)
    return found


@contextlib.contextmanager
def pre_rope_attention(model: torch.nn.Module) -> Iterator[int]:
    """Within this context the attention modules of ``model`` (Llama-family: Llama, Gemma 3, Qwen, Mistral, …, whose
    forward projects q/k/v, optionally normalizes them, applies ``apply_rotary_pos_emb`` and updates the cache) hand
    a pre-RoPE :class:`PackedKVCache` (``KVCacheConfig(pre_rope=True)``) their keys **before** RoPE, and attend
    to the keys the cache returns (dequantized, then rotated). With any other cache, or none, they run their own
    forward unchanged. Yields the number of modules covered.

    The wrapper is an instance attribute ``forward`` on each module, removed (or the previous one restored) on
    exit; no class, registry or global state is touched.

    Example:
        >>> import torch, transformers
        >>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
        ...                                num_attention_heads=1, num_key_value_heads=1)
        >>> model = transformers.LlamaForCausalLM(cfg).eval()
        >>> cache = PackedKVCache(KVCacheConfig(residual_length=8, group_size=8, pre_rope=True), cfg)
        >>> with pre_rope_attention(model) as n:
        ...     _ = model(torch.tensor([[1, 2, 3] * 10]), cache=cache)
        >>> n, cache.layers[0].n_blocks
        (1, 2)
    """
    mods = _rope_attention_modules(model)
    if not mods:
        raise ValueError(f"pre_rope_attention: {type(model).__name__} has no Llama-family attention module (q/k/v/o "
                         f"projections and a module-level apply_rotary_pos_emb); pre-RoPE keys are not supported")
    saved = []
    try:
        for m in mods:
            saved.append((m, m.__dict__.get("forward", None)))
            m.forward = types.MethodType(_pre_rope_forward, m)
        yield len(mods)
    finally:
        for m, old in saved:
            if old is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = old
