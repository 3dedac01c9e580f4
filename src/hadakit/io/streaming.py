"""Layer-streamed quantization: quantize a sharded safetensors model directory one decoder layer at a time from disk.

:func:`stream_quantize` never holds the whole model. It builds the model's skeleton with every parameter on the meta
device (accelerate's ``init_empty_weights``; buffers such as the rotary frequencies are real), loads the parts outside
the decoder stack (embedding, final norm, LM head) from the shards, captures the first layer's inputs for every
calibration window, and then, for each decoder layer in turn:

1. loads that layer's weights from the shards (``safetensors.safe_open``, one tensor at a time) onto ``device``;
2. calibrates and quantizes it with exactly the in-memory code (:func:`hadakit.quantization.pipeline.calibrate_layer`,
   which ``quantize_model`` calls too), or replaces its linears by RTN;
3. writes its checkpoint tensors (packed weights, biases, signs, norms) to a part file in the output's temporary
   directory;
4. moves the layer back to the meta device, so its memory is freed.

The quantized layer's outputs (the next layer's inputs) stay in memory. At the end the part files are concatenated,
tensor by tensor, into the checkpoint's ``model.safetensors`` — the format of
:func:`hadakit.io.checkpoint.save_quantized_model`, which :func:`hadakit.load` reads — and the temporary directory is
renamed into place (:mod:`hadakit.outdir`). The checkpoint is bit-identical to ``quantize_model`` on the model loaded
in float32 followed by ``save_quantized_model`` (``tests/test_streaming.py``).

Memory budget (:func:`estimate_stream_memory`): the non-layer parameters (float32), one decoder layer in float32
about three times over (the original weights, the dequantized copy and the packed codes while it is replaced), the
calibration activations twice (a layer's inputs and outputs: ``windows × tokens × hidden × 4`` bytes each; a second
stream with ``fptarget``), and one input group's float64 Hessian (``in_features² × 8`` bytes) with GPTQ.

Supported: RTN and GPTQ, any rotation, ``seq``, ``fptarget`` and the calibrated options (smooth, aclip, learned
transforms), ``store=bf16``/``fp16``. Refused with :class:`StreamingUnsupported`: KV-cache quantization (``kv``,
``kvcenter``) and ``fusevo`` (both act across the whole model after quantization).
"""

from __future__ import annotations

import json
import logging
import struct
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from hadakit.io.checkpoint import (_META, _RECIPE, _WEIGHTS, FORMAT_VERSION, _is_checkpoint_meta, _prepare_config,
                                   _sha256, check_checkpoint_dir, checkpoint_tensors)
from hadakit.outdir import write_dir_atomically
from hadakit.quantization.pipeline import (CalibrationWindows, QuantizationReport, _replace, calibrate_layer,
                                           capture_window_inputs, prepare_calibration, release_free_memory,
                                           round_unquantized_parameters, start_layerwise)
from hadakit.quantization.calibrate import BatchLogHessian
from hadakit.quantization.gptq import HessianAccumulator
from hadakit.quantization.qlinear import RotatedQuantLinear
from hadakit.quantization.recipes import QuantRecipe, get_recipe
from hadakit.quantization.structure import find_decoder_layers, find_linears

__all__ = ["StreamingUnsupported", "ShardReader", "all_reduce_stats", "estimate_stream_memory", "hessian_batches",
           "ordered_reduce_stats", "split_windows", "stream_quantize"]

log = logging.getLogger(__name__)


def _reduces_hessians(recipe: QuantRecipe) -> bool:
    """Whether calibrating ``recipe`` records Hessians (GPTQ), whose one-process batches fix the rank split."""
    return recipe.method == "gptq" and recipe.weight is not None


class StreamingUnsupported(ValueError):
    """A recipe option that layer-streamed quantization does not support (quantize the model in memory instead)."""


def check_streamable(recipe: QuantRecipe) -> None:
    """Raise :class:`StreamingUnsupported` naming the option when ``recipe`` cannot be streamed."""
    if recipe.kv is not None:
        raise StreamingUnsupported(f"recipe {recipe.label()!r} quantizes the KV cache (kv/kvcenter), which is installed "
                                   f"on the whole model after its linears: streaming does not support it; drop the kv "
                                   f"option or quantize in memory (hadakit quantize without --stream)")
    if recipe.fuse_values:
        raise StreamingUnsupported(f"recipe {recipe.label()!r} uses fusevo, which rewrites v_proj/o_proj pairs of the "
                                   f"whole model before quantization: streaming does not support it; drop fusevo or "
                                   f"quantize in memory (hadakit quantize without --stream)")


class ShardReader:
    """Lazy reader of a Hugging Face safetensors directory (``model.safetensors`` or shards with
    ``model.safetensors.index.json``): :meth:`get` reads one tensor, opening each shard once (memory-mapped, so
    nothing but the tensors asked for is read)."""

    def __init__(self, model_dir: str | Path):
        self.root = Path(model_dir)
        index = self.root / "model.safetensors.index.json"
        single = self.root / "model.safetensors"
        if index.is_file():
            try:
                self.weight_map: dict[str, str] = dict(json.loads(index.read_text())["weight_map"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{index} is not a readable safetensors index ({exc}): copy the model again") from None
        elif single.is_file():
            from safetensors import safe_open

            with safe_open(str(single), framework="pt") as f:
                self.weight_map = {k: single.name for k in f.keys()}
        else:
            raise ValueError(f"{self.root} has neither model.safetensors nor model.safetensors.index.json: "
                             f"streaming reads safetensors model directories only (convert the model with "
                             f"save_pretrained(..., safe_serialization=True))")
        self._open: dict[str, Any] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str) -> torch.Tensor:
        """Tensor ``name`` as stored (its file dtype), read from its shard."""
        from safetensors import safe_open

        fname = self.weight_map[name]
        handle = self._open.get(fname)
        if handle is None:
            path = self.root / fname
            if not path.is_file():
                raise ValueError(f"{path} (named in the index for {name}) is missing: copy the model again")
            handle = self._open[fname] = safe_open(str(path), framework="pt")
        return handle.get_tensor(name)

    def close(self) -> None:
        """Drop the open shards (unmapping them); :meth:`get` reopens one when needed."""
        self._open.clear()


def _build_skeleton(model_dir: Path, dtype: torch.dtype):
    """The model with every parameter on the meta device (buffers real), in ``dtype``; and its config."""
    from accelerate import init_empty_weights

    from hadakit.io.loading import _model_class, load_config

    config = load_config(model_dir)
    cls = _model_class(model_dir, config)
    with init_empty_weights(include_buffers=False):
        model = cls.from_config(config, dtype=dtype) if hasattr(cls, "from_config") else cls._from_config(
            config, dtype=dtype)
    model.eval()
    if getattr(model.config, "use_cache", None) is not None:
        model.config.use_cache = False
    return model, config


def _load_module(module: nn.Module, prefix: str, reader: ShardReader, device: torch.device, dtype: torch.dtype,
                 *, missing_ok: bool = False) -> list[str]:
    """Fill every meta parameter (and stored buffer) of ``module`` from the shards (keys ``prefix + name``), cast to
    ``dtype`` like ``from_pretrained(dtype=...)`` does, on ``device``. Returns the keys the shards lack."""
    missing = []
    for mname, mod in module.named_modules():
        for pname, p in list(mod._parameters.items()):
            if p is None or not p.is_meta:
                continue
            key = f"{prefix}{mname + '.' if mname else ''}{pname}"
            if key not in reader:
                missing.append(key)
                continue
            t = reader.get(key)
            t = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(f"{reader.root}: {key} has shape {tuple(t.shape)} in the shards, the config says "
                                 f"{tuple(p.shape)}: the config does not belong to these weights")
            mod._parameters[pname] = nn.Parameter(t, requires_grad=p.requires_grad)
        for bname, b in list(mod._buffers.items()):
            key = f"{prefix}{mname + '.' if mname else ''}{bname}"
            if b is not None and key in reader:
                t = reader.get(key)
                mod._buffers[bname] = t.to(device=device, dtype=b.dtype if b.is_floating_point() else t.dtype)
            elif b is not None and b.device != device and not b.is_meta:
                mod._buffers[bname] = b.to(device)
    if missing and not missing_ok:
        raise ValueError(f"{reader.root}: the shards lack {missing[:5]} ({len(missing)} tensors): the checkpoint is "
                         f"incomplete")
    return missing


def _module_name(model: nn.Module, target: nn.Module) -> str:
    for name, mod in model.named_modules():
        if mod is target:
            return name
    raise ValueError("the decoder stack is not a submodule of the model")


@contextmanager
def _detached(model: nn.Module, name: str) -> Iterator[None]:
    """``model.<name>`` replaced by an empty ``ModuleList`` for the duration (the non-layer parts alone)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    saved = getattr(parent, child)
    setattr(parent, child, nn.ModuleList())
    try:
        yield
    finally:
        setattr(parent, child, saved)


@contextmanager
def _passthrough_layers(layers: nn.ModuleList) -> Iterator[None]:
    """Every layer returns its hidden states unchanged (its weights are on the meta device): the forward hooks of
    :func:`capture_window_inputs` still see each layer's real keyword arguments (masks, position embeddings)."""
    import functools

    for layer in layers:
        orig = layer.forward

        @functools.wraps(orig)
        def forward(*args, _orig=orig, **kwargs):
            return args[0] if args else kwargs["hidden_states"]

        layer.forward = forward
    try:
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)


def _write_part(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path))


def _read_header(path: Path) -> tuple[int, dict]:
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return 8 + n, header


_ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
             "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def _concatenate_safetensors(parts: list[Path], out: Path, chunk: int = 1 << 24) -> None:
    """One safetensors file holding every tensor of ``parts`` (byte copies, a chunk at a time: no tensor is loaded).
    Tensors are laid out like ``safetensors.torch.save_file`` does (wider dtypes first, then by name), so every one
    is aligned to its element size."""
    entries = []
    for part in parts:
        base, header = _read_header(part)
        for name, info in header.items():
            entries.append((name, info, part, base))
    names = [e[0] for e in entries]
    if len(set(names)) != len(names):
        raise ValueError("two layers wrote the same checkpoint key: the model's module names are not unique")
    entries.sort(key=lambda e: (-_ITEMSIZE.get(e[1]["dtype"], 1), e[0]))
    header, offset = {}, 0
    for name, info, _, _ in entries:
        a, b = info["data_offsets"]
        header[name] = dict(dtype=info["dtype"], shape=info["shape"], data_offsets=[offset, offset + b - a])
        offset += b - a
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    handles: dict[Path, Any] = {}
    try:
        with out.open("wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for _, info, part, base in entries:
                src = handles.get(part)
                if src is None:
                    src = handles[part] = part.open("rb")
                a, b = info["data_offsets"]
                src.seek(base + a)
                left = b - a
                while left:
                    buf = src.read(min(chunk, left))
                    if not buf:
                        raise ValueError(f"{part} is truncated")
                    f.write(buf)
                    left -= len(buf)
    finally:
        for h in handles.values():
            h.close()


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def all_reduce_stats(stats: dict) -> None:
    """Sum the calibration statistics of every rank into each rank's ``stats`` (``{leader: InputStats}``), in place:
    each Hessian (and ``fptarget``'s cross products) weighted by its rank's row count (``Σ count·H / Σ count``), the
    row counts summed, ``max|x|`` maxed and ``Σ|x|`` summed. Needs an initialized ``torch.distributed`` group."""
    import torch.distributed as dist

    for st in stats.values():
        acc = st._hessian
        if acc is not None:
            acc._flush()
            local = acc.count
            total = torch.tensor([float(local)], dtype=torch.float64, device=acc._h.device)
            dist.all_reduce(total)
            for name in ("_h", "_c"):
                t = getattr(acc, name)
                if t is not None:
                    t.mul_(float(local))
                    dist.all_reduce(t)
                    t.div_(total)
            acc.count = int(total.item())
        count = torch.tensor([float(st.count)], dtype=torch.float64, device=st.amax.device)
        dist.all_reduce(count)
        st.count = int(count.item())
        dist.all_reduce(st.amax, op=dist.ReduceOp.MAX)
        dist.all_reduce(st.asum)


def hessian_batches(rows: list[int], flush_rows: int | None = None) -> list[tuple[int, int]]:
    """The one-process Hessian batches of windows with ``rows[j]`` recorded rows each, as ``[start, end)`` window
    ranges: :class:`~hadakit.quantization.gptq.HessianAccumulator` takes one Gram product whenever
    ``flush_rows`` (default: its own) rows are pending, after the window that reaches it, and one of the rest."""
    flush = HessianAccumulator.flush_rows if flush_rows is None else flush_rows
    out, start, pending = [], 0, 0
    for j, r in enumerate(rows):
        pending += r
        if pending >= flush:
            out.append((start, j + 1))
            start, pending = j + 1, 0
    if start < len(rows):
        out.append((start, len(rows)))
    return out


def split_windows(rows: list[int], world: int) -> list[tuple[int, int]] | None:
    """Contiguous window ranges ``[a, b)`` of each of ``world`` ranks that start and end at one-process Hessian batch
    boundaries (:func:`hessian_batches`), balanced by rows; None when there are fewer batches than ranks."""
    batches = hessian_batches(rows)
    if len(batches) < world:
        return None
    ends = [b for _, b in batches]
    cum = [sum(rows[:b]) for b in ends]
    total = sum(rows)
    cuts, last = [0], 0
    for r in range(1, world):
        # the batch boundary closest to r/world of the rows, leaving at least one batch to each rank
        lo, hi = last + 1, len(ends) - (world - r)
        k = min(range(lo, hi + 1), key=lambda k: abs(cum[k - 1] - r * total / world))
        cuts.append(ends[k - 1])
        last = k
    cuts.append(len(rows))
    return list(zip(cuts, cuts[1:]))


def ordered_reduce_stats(stats: dict) -> None:
    """Reduce the calibration statistics of every rank, in place, so each Hessian is bit for bit the one-process one:
    each rank's Hessians are :class:`~hadakit.quantization.calibrate.BatchLogHessian` with the per-batch Gram
    products of its windows (ranks own contiguous runs of the one-process batches, :func:`split_windows`); rank 0
    adds its batches to zero sums with the one-process float64 updates and sends the sums and row count to rank 1,
    which adds its own and passes them on, and so on; the last rank broadcasts the result. Row counts are summed,
    ``max|x|`` maxed and ``Σ|x|`` summed (those two are not ordered; the calibrated options that use them are refused
    with more than one rank). Needs an initialized ``torch.distributed`` group."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    for st in stats.values():
        acc = st._hessian
        if acc is not None:
            if not isinstance(acc, BatchLogHessian):
                raise TypeError("ordered_reduce_stats needs BatchLogHessian accumulators (LayerwiseState.log_batches)")
            h = torch.zeros_like(acc._h)
            c = torch.zeros_like(acc._c) if acc._c is not None else None
            count = torch.zeros(1, dtype=torch.float64, device=h.device)
            if rank > 0:
                for t in (h, c, count):
                    if t is not None:
                        dist.recv(t, src=rank - 1)
            count[0] = acc.replay(h, c, int(count.item()))
            if rank + 1 < world:
                for t in (h, c, count):
                    if t is not None:
                        dist.send(t, dst=rank + 1)
            for t in (h, c, count):
                if t is not None:
                    dist.broadcast(t, src=world - 1)
            acc._h, acc._c, acc.count = h, c, int(count.item())
        count = torch.tensor([float(st.count)], dtype=torch.float64, device=st.amax.device)
        dist.all_reduce(count)
        st.count = int(count.item())
        dist.all_reduce(st.amax, op=dist.ReduceOp.MAX)
        dist.all_reduce(st.asum)


class _Done(nn.Module):
    """Stands in the decoder stack for a layer that was quantized, written and freed."""


def _layer_bytes(layer: nn.Module) -> int:
    return sum(p.numel() * 4 for p in layer.parameters())


def estimate_stream_memory(model_dir: str | Path, recipe: QuantRecipe | str, n_windows: int, window_len: int
                           ) -> dict[str, int]:
    """The memory budget of :func:`stream_quantize` in bytes, by part (see the module docstring), without loading
    any weight: ``non_layer`` (embedding, norm, head in float32), ``layer`` (one decoder layer three times over),
    ``activations`` (a layer's inputs and outputs for every window; twice that with ``fptarget``), ``hessian`` (the
    largest input group's float64 Hessian, GPTQ only) and ``total``."""
    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    model, config = _build_skeleton(Path(model_dir), torch.float32)
    layers = find_decoder_layers(model)
    in_layers = {id(p) for p in layers.parameters()}
    non_layer = sum(p.numel() * 4 for p in {id(p): p for p in model.parameters()}.values() if id(p) not in in_layers)
    layer = 3 * max(_layer_bytes(lay) for lay in layers)
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    calibrating = recipe.linears_need_calibration
    acts = 2 * n_windows * window_len * hidden * 4 * (2 if recipe.fp_target else 1) if calibrating else 0
    widest = max((m.in_features for m in layers.modules() if isinstance(m, nn.Linear)), default=0)
    hessian = widest * widest * 8 * (2 if recipe.fp_target else 1) if calibrating and recipe.method == "gptq" else 0
    out = dict(non_layer=non_layer, layer=layer, activations=acts, hessian=hessian)
    out["total"] = sum(out.values())
    return out


@torch.no_grad()
def stream_quantize(model_dir: str | Path, recipe: QuantRecipe | str, out_dir: str | Path, *,
                    calib: torch.Tensor | list | CalibrationWindows | None = None,
                    attention_mask: torch.Tensor | None = None, tokenizer: Any = None,
                    device: str | torch.device = "cpu", force: bool = False, max_memory: int | None = None,
                    extra: dict | None = None, progress: Callable[[str], None] | None = None,
                    calib_source: str | None = "tokens", calib_path: str | None = None,
                    distributed: bool | None = None, ordered_reduction: bool = True) -> QuantizationReport:
    """Quantize the safetensors model directory ``model_dir`` layer by layer from disk and write the checkpoint to
    ``out_dir`` (see the module docstring); returns the :class:`QuantizationReport`.

    ``calib``: token windows as :func:`~hadakit.quantization.pipeline.quantize_model` takes them (``[n, L]`` ids with
    an optional ``attention_mask``, or a list of 1-D windows); required by GPTQ and the calibrated options.
    ``device``: where each layer (and the embedding, head and calibration activations) is computed; a layer is
    moved there when loaded and its checkpoint tensors back to the CPU when written. ``max_memory``: bytes; raise
    before any work when :func:`estimate_stream_memory` exceeds it. ``tokenizer``: saved with the checkpoint
    (None: the model directory's own tokenizer files, if any). ``extra``: more keys for ``hadakit.json``.
    ``calib_source`` / ``calib_path``: where the windows came from, for the report and ``hadakit.json``.

    ``distributed`` (None: when a ``torch.distributed`` process group is initialized, e.g. under ``torchrun``):
    data-parallel calibration. Every rank calls this with the same arguments; rank ``r`` of ``W`` runs the
    contiguous block ``[r·n/W, (r+1)·n/W)`` of the ``n`` windows, its statistics are all-reduced before each fit
    (:func:`all_reduce_stats`), every rank computes the same quantized layer and then its own windows' outputs
    (the next layer's inputs), and rank 0 alone writes the checkpoint. Not with calibrated options (smooth, aclip,
    learned transforms: their row samples are not reduced). With GPTQ and ``ordered_reduction`` (the default) the
    ranks own contiguous runs of the one-process Hessian batches instead (:func:`split_windows`), keep each batch's
    Gram product, and :func:`ordered_reduce_stats` adds them in the one-process order, so the checkpoint is bit for
    bit the one-process one (``tests/test_distributed.py``); that costs one ``n×n`` float32 matrix per 4096 rows of
    the rank's windows per recorded input (``docs/scaling.md``). ``ordered_reduction=False``, or fewer batches than
    ranks: the even split and the all-reduce of per-rank Hessians, equal to the one-process ones to float rounding.

    The public entry points are :func:`hadakit.api.quantize_streamed` and ``hadakit quantize --stream``.
    """
    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    if not isinstance(recipe, QuantRecipe):
        raise TypeError(f"recipe must be a QuantRecipe or a recipe string, got {type(recipe).__name__}")
    check_streamable(recipe)
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a model directory (no config.json)")
    device = torch.device(device)
    if recipe.linears_need_calibration and calib is None:
        raise ValueError(f"recipe {recipe.label()!r} needs calibration windows (calib=...): GPTQ and the calibrated "
                         f"options fit on them")
    check_checkpoint_dir(out_dir, force=force)
    t0 = time.perf_counter()
    reader = ShardReader(model_dir)
    model, config = _build_skeleton(model_dir, torch.float32)
    windows = None
    if calib is not None and recipe.linears_need_calibration:
        windows = calib if isinstance(calib, CalibrationWindows) else prepare_calibration(
            calib, attention_mask, vocab_size=getattr(config, "vocab_size", None))
    if max_memory is not None:
        need = estimate_stream_memory(model_dir, recipe, len(windows) if windows else 0,
                                      windows.length if windows else 0)
        if need["total"] > max_memory:
            raise ValueError(f"streaming {model_dir} with {recipe.label()!r} needs about {need['total'] / 2**20:,.0f} "
                             f"MiB ({', '.join(f'{k} {v / 2**20:,.0f}' for k, v in need.items() if k != 'total')} "
                             f"MiB), over max_memory {max_memory / 2**20:,.0f} MiB: use fewer or shorter calibration "
                             f"windows, or raise max_memory")
    dist = _dist() if distributed is None or distributed else None
    if distributed and dist is None:
        raise ValueError("distributed=True needs an initialized torch.distributed process group "
                         "(torch.distributed.init_process_group, or run under torchrun)")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist is not None else (0, 1)
    if world > 1 and recipe.fits_options:
        raise StreamingUnsupported(f"recipe {recipe.label()!r} fits calibrated options (smooth/aclip/learn) on row "
                                   f"samples, which data-parallel calibration does not gather: run it in one "
                                   f"process, or drop those options")
    if world > 1 and windows is not None and len(windows) < world:
        raise ValueError(f"{len(windows)} calibration windows cannot be split across {world} ranks: give at least "
                         f"one window per rank")
    layers = find_decoder_layers(model)
    stack = _module_name(model, layers)
    with _detached(model, stack):  # embedding, final norm, head, rotary buffers
        missing = _load_module(model, "", reader, device, torch.float32, missing_ok=True)
        if missing:
            model.tie_weights()
            still = [k for k in missing if model.get_parameter(k).is_meta]
            if still:
                raise ValueError(f"{model_dir}: the shards lack {still[:5]}: the checkpoint is incomplete")
    linears, skipped = find_linears(model, recipe)
    if not linears:
        raise ValueError(f"{type(model).__name__}: no linear layer to quantize (targets={list(recipe.targets)}, "
                         f"ignore={list(recipe.ignore)})")
    report = QuantizationReport(recipe, skipped=skipped)
    state = None
    if windows is not None:
        report.calib_windows, report.calib_len = len(windows), windows.length
        report.calib_tokens, report.calib_padded = windows.tokens, windows.padded
        report.calib_source, report.calib_path = calib_source, calib_path
        split = None
        if world > 1 and ordered_reduction and _reduces_hessians(recipe):
            keeps = windows.keeps() or [None] * len(windows)
            rows = [int(k.sum()) if k is not None else int(t.shape[-1]) for k, t in zip(keeps, windows.ids)]
            split = split_windows(rows, world)
            if split is None:
                log.warning("%d calibration rows make fewer one-process Hessian batches (every %d rows) than %d "
                            "ranks: the windows are split evenly and the Hessians all-reduced, equal to the "
                            "one-process ones to float rounding, not bit for bit", sum(rows),
                            HessianAccumulator.flush_rows, world)
        a, b = split[rank] if split is not None else (rank * len(windows) // world, (rank + 1) * len(windows) // world)
        windows = CalibrationWindows([t.to(device) for t in windows.ids[a:b]],
                                     [m.to(device) if m is not None else None for m in windows.masks[a:b]],
                                     padded=windows.padded,
                                     tensor=windows.tensor[a:b].to(device) if windows.tensor is not None else None)
        with _passthrough_layers(layers):
            inputs, kwargs = capture_window_inputs(model, layers, windows)
        state = start_layerwise(recipe, inputs, kwargs, windows)
        if world > 1:
            state.reduce = ordered_reduce_stats if split is not None else all_reduce_stats
            state.log_batches = split is not None
        inputs = kwargs = None
    recipe_bytes = recipe.to_json().encode("utf-8")
    bits = [0.0, 0]
    meta_linears: dict[str, dict] = {}

    def account(module: nn.Module) -> None:
        for m in module.modules():
            if isinstance(m, RotatedQuantLinear) and m.packed is not None:
                k = m.in_features * m.out_features
                bits[0] += m.packed.bits_per_element * k
                bits[1] += k

    def write(tmp: Path | None) -> None:  # None: a rank other than 0, which computes but writes nothing
        parts_dir = tmp / ".parts" if tmp is not None else None
        if parts_dir is not None:
            parts_dir.mkdir()
        parts = []
        for i, layer in enumerate(layers):
            prefix = f"{stack}.{i}."
            _load_module(layer, prefix, reader, device, torch.float32)
            if state is not None:
                calibrate_layer(model, i, layer, recipe, linears, state, report, progress, keep_dense=True)
            for name in [n for n, m in linears.items() if any(m is mm for mm in layer.modules())]:
                _replace(model, name, linears.pop(name), recipe, report)  # RTN (and what calibration left)
            if recipe.store_dtype is not None:
                report.stored_rounded += round_unquantized_parameters(layer, recipe.store_dtype)
            account(layer)
            if parts_dir is not None:
                tensors, lin, _ = checkpoint_tensors(layer)
                meta_linears.update({prefix + k: v for k, v in lin.items()})
                part = parts_dir / f"layer-{i:05d}.safetensors"
                _write_part(part, {prefix + k: v for k, v in tensors.items()})
                parts.append(part)
                tensors = None
            layer.to("meta")  # back to the meta device; the placeholder drops the last reference to anything else
            layers[i] = _Done()
            layer = None
            reader.close()  # unmaps the shards: their pages read for this layer leave the resident memory
            release_free_memory()
            if progress and state is None:
                progress(f"layer {i + 1}/{len(layers)} quantized and written")
        with _detached(model, stack):  # what lies outside the decoder stack (the LM head when targeted)
            for name in list(linears):
                _replace(model, name, linears.pop(name), recipe, report)
            if recipe.store_dtype is not None:
                report.stored_rounded += round_unquantized_parameters(model, recipe.store_dtype)
            account(model)
            if parts_dir is None:
                return
            tensors, lin, tied = checkpoint_tensors(model)
        meta_linears.update(lin)
        part = parts_dir / "rest.safetensors"
        _write_part(part, tensors)
        parts.append(part)
        tensors = None
        _concatenate_safetensors(parts, tmp / _WEIGHTS)
        for p in parts:
            p.unlink()
        parts_dir.rmdir()
        _prepare_config(model).save_pretrained(tmp)
        tok = tokenizer
        if tok is None:
            from hadakit.io.loading import load_tokenizer, tokenizer_files

            tok = load_tokenizer(model_dir) if tokenizer_files(model_dir) else None
        if tok is not None:
            tok.save_pretrained(tmp)
        (tmp / _RECIPE).write_bytes(recipe_bytes)
        meta = dict(format_version=FORMAT_VERSION, model_class=type(model).__name__, linears=meta_linears,
                    tied=tied, recipe_sha256=_sha256(recipe_bytes),
                    **{"calibration": report.calibration_info(), "streamed": True, **(extra or {})})
        (tmp / _META).write_text(json.dumps(meta, indent=1) + "\n")

    try:
        if rank == 0:
            write_dir_atomically(out_dir, write, force=force, marker=_META, is_ours=_is_checkpoint_meta,
                                 what="checkpoint")
        else:
            write(None)
    finally:
        reader.close()
    if dist is not None:
        dist.barrier()  # the checkpoint is in place when any rank returns
    report.weight_bits = bits[0] / bits[1] if bits[1] else 0.0
    report.seconds = time.perf_counter() - t0
    return report
