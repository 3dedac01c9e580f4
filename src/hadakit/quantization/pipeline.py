"""Rotate and quantize a model: RTN or GPTQ weights, dynamic per-token activations, KV cache.

Architecture-agnostic: every ``nn.Linear`` (and GPT-2's ``Conv1D``) selected by the recipe's ``targets``/``ignore`` becomes a
``RotatedQuantLinear`` with an online rotation on its input; nothing assumes one family's norm layout. GPTQ
calibrates one decoder layer at a time: the inputs of the first layer are captured once, then each layer's linears
collect Hessians of their (rotated) inputs, are quantized, and the quantized layer's outputs become the next layer's
inputs — so only one layer's weights and activations need to be on the device at a time. With ``fptarget`` a second
stream carries the full-precision model's hidden states alongside, and each linear is fitted to its full-precision
outputs (see ``quantization.gptq.corrected_weight``).

Calibration windows run one at a time (batch 1), so they may differ in length: ``calib`` is a ``[n, L]`` token
tensor, optionally with an ``attention_mask`` (padded windows), or a list of 1-D token tensors. A padded window is
cut to its real tokens (left or right padding), so the model sees it exactly as if it had been given unpadded; a
window whose mask has holes runs with its mask and its masked positions' rows are dropped from every statistic
(Hessians, samples, ranges). Without a mask nothing changes: one full forward records the layers' keyword arguments
for all same-length windows, as before.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from hadakit.formats import QuantScheme, quantize
from hadakit.quantization.calibrate import (InputStats, LinearFit, LinearProblem, search_act_clip,
                                      search_smoothing, train_transform, transform_hessian)
from hadakit.quantization.gptq import corrected_weight, gptq_quantize
from hadakit.quantization.kv_cache import calibrate_kv_centers, install_kv_quantization
from hadakit.quantization.qlinear import RotatedQuantLinear, weight_map
from hadakit.quantization.quantizers import SchemeGroupQuantizer
from hadakit.quantization.recipes import QuantRecipe, get_recipe
from hadakit.quantization.stage_reuse import StageReuse
from hadakit.quantization.structure import (_is_linear, _set_module, find_decoder_layers,
                                            find_linears, linear_weight)
from hadakit.transforms import HadamardRotation, transform_plan
from hadakit.transforms.spec import layer_seed


KV_CENTER_WINDOWS = 8  # calibration windows the KV centers are averaged over


@dataclass
class QuantizationReport:
    recipe: QuantRecipe
    quantized: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    fallbacks: dict[str, str] = field(default_factory=dict)  # layer -> construction used instead of a Hadamard
    kv_modules: int = 0
    seconds: float = 0.0
    weight_bits: float = 0.0  # bits per quantized weight element, scales included
    peak_memory_mb: float = 0.0
    fits: dict[str, dict] = field(default_factory=dict)  # layer -> calibrated options and errors (see calibrate)
    # fusevo: o_proj -> the rotation left online (None: none), and the fusion's probe check or why it was refused
    online: dict[str, Any] = field(default_factory=dict)
    fusion: dict[str, Any] = field(default_factory=dict)
    stored_rounded: int = 0  # store=D: elements of unquantized parameters rounded to D
    reuse_off: str | None = None  # seq: why reusing finished submodules' outputs was turned off (see stage_reuse)
    # The calibration actually used (all zero / None when the recipe needed none): windows, their length (tokens of
    # the longest window as it ran: BOS included, padding cut off at the ends), real (unpadded) tokens over all
    # windows, windows that had padding, where they came from ("text" / "file" / "documents" / "tokens"; the
    # pipeline itself only sees "tokens"), and the file for "file".
    calib_windows: int = 0
    calib_len: int = 0
    calib_tokens: int = 0
    calib_padded: int = 0
    calib_source: str | None = None
    calib_path: str | None = None

    def calibration_info(self) -> dict[str, Any] | None:
        """The calibration that ran, JSON-ready (for a recipe.json), or None when the recipe used none."""
        if not self.calib_windows:
            return None
        return dict(source=self.calib_source, path=self.calib_path, n_windows=self.calib_windows,
                    window=self.calib_len, tokens=self.calib_tokens, padded=self.calib_padded)

    def summary(self) -> str:
        lines = [f"{self.recipe.label()}: {len(self.quantized)} linears quantized, {len(self.skipped)} kept in full "
                 f"precision ({', '.join(sorted(set(self.skipped)))[:200] or '-'})"]
        if self.fallbacks:
            lines.append(f"  no Hadamard for {len(self.fallbacks)} layer size(s); orthogonal fallback used: "
                         + "; ".join(f"{k}: {v}" for k, v in list(self.fallbacks.items())[:4]))
        if self.fusion:
            f = self.fusion
            lines.append(f"  value rotations fused into {f['pairs']} v_proj/o_proj pairs (probe error {f['probe_error']:.1e})"
                         if not f.get("refused") else f"  value rotations not fused: {f['refused']}")
        if self.stored_rounded:
            lines.append(f"  {self.stored_rounded:,} unquantized parameters rounded to {self.recipe.store_dtype}")
        if self.kv_modules:
            lines.append(f"  KV cache quantized in {self.kv_modules} attention modules")
        if self.reuse_off:
            lines.append(f"  seq recomputed every pass (reuse turned off at {self.reuse_off})")
        if self.calib_windows:
            lines.append(f"  calibrated on {self.calib_windows} windows of up to {self.calib_len} tokens "
                         f"({self.calib_tokens:,} real tokens; {self.calib_source or 'tokens'})")
        return "\n".join(lines)


def make_rotation(recipe: QuantRecipe, name: str, n: int, report: QuantizationReport | None = None
                  ) -> HadamardRotation | None:
    """The online rotation of linear ``name`` (input size ``n``); after ``fusevo``, what is left of it online."""
    if report is not None and name in report.online:
        return report.online[name]
    rot = recipe.rotation
    if rot.kind == "none":
        return None
    block = rot.block
    try:
        plan = transform_plan(n, block_size=block, fallback=rot.fallback)
    except ValueError as exc:
        raise ValueError(f"layer {name}: {exc}") from None
    if not plan.is_hadamard and report is not None:
        report.fallbacks[name] = plan.construction
    return HadamardRotation(n, block_size=block, signs=rot.signs, seed=layer_seed(rot.seed, name),
                            fallback=rot.fallback)


def _quantize_weight(w_rot: torch.Tensor, recipe: QuantRecipe, hessian: torch.Tensor | None):
    """Packed + dequantized rotated weight with the recipe's weight scheme and method."""
    scheme = recipe.weight_scheme()
    if recipe.method == "gptq" and hessian is not None:
        gq = SchemeGroupQuantizer(scheme, w_rot)
        gptq_quantize(w_rot, hessian, gq, recipe.gptq)
        packed = gq.packed()
    else:
        packed = quantize(w_rot.float(), scheme)
    return packed, packed.dequantize(w_rot.dtype)


_AUTO = object()  # "the recipe's rotation for this layer" (None means no rotation)


def _replace(model, name, mod, recipe, report, hessian=None, rotation=_AUTO, fit: LinearFit | None = None,
             cross: torch.Tensor | None = None) -> None:
    """Swap ``mod`` for a ``RotatedQuantLinear``; ``hessian`` is the raw input Hessian (transformed here), ``cross``
    its products with the full-precision model's inputs (``fptarget``: GPTQ then fits the full-precision outputs)."""
    w = linear_weight(mod).detach()
    if cross is not None and hessian is not None:
        w = corrected_weight(w, hessian, cross, damp=recipe.gptq.damp, strength=recipe.fp_target)
    if rotation is _AUTO:
        rotation = make_rotation(recipe, name, w.shape[1], report)
    fit = fit or LinearFit()
    w_t = weight_map(w, fit.smooth, rotation, fit.transform)
    if hessian is not None and (fit.smooth is not None or rotation is not None or fit.transform is not None):
        hessian = transform_hessian(hessian, fit.smooth, rotation, fit.transform)  # of the inputs T(x) = x·M
    packed, w_q = (None, w_t.clone()) if recipe.weight is None else _quantize_weight(w_t, recipe, hessian)
    bias = mod.bias.detach() if mod.bias is not None else None
    act = recipe.act_scheme()
    if act is not None and fit.act_clip is not None:
        act = act.replace(clip_ratio=fit.act_clip)
    new = RotatedQuantLinear(w.shape[1], w.shape[0], weight=w_q, bias=bias, packed=packed, rotation=rotation,
                             act_scheme=act, smooth=fit.smooth, transform=fit.transform)
    _set_module(model, name, new.to(w.device))
    report.quantized.append(name)


class _StopForward(Exception):
    pass


def _first_tensor(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class CalibrationWindows:
    """Calibration token windows as the pipeline runs them, one at a time (see :func:`prepare_calibration`).

    ``ids[j]`` is window ``j``, ``[1, L_j]``; ``masks[j]`` its attention mask ``[1, L_j]`` when it has holes (masked
    positions between real tokens), else None (padding at either end is cut off, so the window is all real tokens).
    ``tensor`` is the ``[n, L]`` tensor given when no window was padded (the pipeline's original input)."""

    ids: list[torch.Tensor]
    masks: list[torch.Tensor | None]
    padded: int = 0
    tensor: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def length(self) -> int:
        return max(int(t.shape[1]) for t in self.ids)

    @property
    def tokens(self) -> int:
        return sum(int(t.shape[1]) if m is None else int(m.sum()) for t, m in zip(self.ids, self.masks))

    def keeps(self) -> list[torch.Tensor | None] | None:
        """Per window, the positions whose rows enter the statistics (None: all); None when no window has holes."""
        if all(m is None for m in self.masks):
            return None
        return [None if m is None else m[0].bool() for m in self.masks]

    def kv_windows(self, k: int):
        """The first ``k`` windows for ``calibrate_kv_centers`` (which iterates rows): the tensor as before, else the
        windows' 1-D token rows (none of them may have holes: see :func:`prepare_calibration`)."""
        if self.tensor is not None:
            return self.tensor[:k]
        return [t[0] for t in self.ids[:k]]


def _is_int_tensor(t) -> bool:
    return isinstance(t, torch.Tensor) and not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool


def prepare_calibration(calib, attention_mask: torch.Tensor | None = None, *, vocab_size: int | None = None,
                        kv_windows: int = 0) -> CalibrationWindows:
    """Check calibration tokens and turn them into the windows the pipeline runs; raises before any work.

    ``calib``: an integer tensor ``[n, L]`` of token ids, or a list of 1-D integer tensors (windows that may differ
    in length). ``attention_mask`` (with a tensor ``calib`` only): ``[n, L]`` of 0/1 (bool, integer or float), 1 on
    real tokens; every row needs at least one. A row whose real tokens are contiguous (left or right padding) is cut
    to them; a row with holes keeps its (outer-trimmed) mask, passed to the model, and its masked rows are dropped
    from the statistics. ``vocab_size``: token ids must lie in ``[0, vocab_size)``. ``kv_windows``: that many
    leading windows calibrate the KV centers, which take no mask, so they may not have holes."""
    if isinstance(calib, (list, tuple)):
        if attention_mask is not None:
            raise ValueError("attention_mask goes with a [n, L] token tensor; a list of windows needs no mask "
                             "(each window is all real tokens)")
        if not calib:
            raise ValueError("calib is an empty list: pass at least one window of token ids")
        rows = []
        for j, t in enumerate(calib):
            if not _is_int_tensor(t):
                raise TypeError(f"calib[{j}] must be an integer tensor of token ids (torch.long), got "
                                f"{type(t).__name__ if not isinstance(t, torch.Tensor) else t.dtype}")
            if t.ndim != 1 or t.numel() == 0:
                raise ValueError(f"calib[{j}] must be a non-empty 1-D tensor of token ids (one window), got shape "
                                 f"{tuple(t.shape)}")
            rows.append(t.long()[None])
        windows = CalibrationWindows(rows, [None] * len(rows))
        _check_vocab(torch.cat([r[0] for r in rows]), vocab_size)
        return windows
    if not isinstance(calib, torch.Tensor):
        raise TypeError(f"calib must be a [n, L] tensor of token ids or a list of 1-D token tensors, got "
                        f"{type(calib).__name__}")
    if not _is_int_tensor(calib):
        raise TypeError(f"calib must hold integer token ids (torch.long), got dtype {calib.dtype}")
    if calib.ndim != 2 or calib.shape[0] == 0 or calib.shape[1] == 0:
        raise ValueError(f"calib must be a 2-D tensor [n_windows, window_len] of token ids, got shape "
                         f"{tuple(calib.shape)}" + ("; for one window use ids[None]" if calib.ndim == 1 else ""))
    _check_vocab(calib, vocab_size)
    calib = calib.long()
    if attention_mask is None:
        return CalibrationWindows([calib[j:j + 1] for j in range(calib.shape[0])], [None] * calib.shape[0],
                                  tensor=calib)
    mask = attention_mask
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(calib.shape):
        raise ValueError(f"attention_mask has shape {tuple(mask.shape)}, but the token windows have "
                         f"{tuple(calib.shape)}: they must match")
    if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (real token)")
    mask = mask.bool()
    empty = (~mask.any(1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"attention_mask rows {empty[:8]} have no real token (all 0): drop those windows")
    if bool(mask.all()):
        return CalibrationWindows([calib[j:j + 1] for j in range(calib.shape[0])], [None] * calib.shape[0],
                                  tensor=calib)
    ids, masks, padded = [], [], 0
    for j in range(calib.shape[0]):
        real = mask[j].nonzero().flatten()
        first, last = int(real[0]), int(real[-1]) + 1
        padded += int(real.numel() < calib.shape[1])
        ids.append(calib[j:j + 1, first:last].contiguous())
        if real.numel() == last - first:  # contiguous: cut to the real tokens, nothing left to mask
            masks.append(None)
        else:
            if j < kv_windows:
                raise ValueError(f"calibration window {j} has holes in its attention mask (padding between real "
                                 f"tokens); the KV centers (kvcenter) calibrate on the first {kv_windows} windows "
                                 f"without a mask: pad only at the start or end")
            masks.append(mask[j:j + 1, first:last].long().contiguous())
    return CalibrationWindows(ids, masks, padded=padded)


def _check_vocab(ids: torch.Tensor, vocab_size: int | None) -> None:
    if vocab_size is None or ids.numel() == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"calibration token id {lo if lo < 0 else hi} is outside the model's vocabulary "
                         f"[0, {vocab_size}): were the windows made with this model's tokenizer?")


def _vocab_size(model: nn.Module) -> int | None:
    get = getattr(model, "get_input_embeddings", None)
    try:
        emb = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        emb = None
    return int(emb.num_embeddings) if isinstance(emb, nn.Embedding) else None


_CACHE_KWARGS = ("past_key_values", "past_key_value")


def _layer_kwargs(layer: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The arguments a layer received besides its hidden states, by name. Some families pass the attention mask
    positionally (BERT's ``layer(hidden, mask, ...)``, GPT-2's ``block(hidden, cache, mask, ...)``): those
    arguments are named from the layer's signature; ``None`` ones are left out (the defaults)."""
    kw = {k: v for k, v in kwargs.items() if k not in _CACHE_KWARGS}
    extra = args[1:]
    if all(a is None for a in extra):
        return kw
    params = [p for p in inspect.signature(layer.forward).parameters.values()
              if p.kind in (p.POSITIONAL_OR_KEYWORD, p.POSITIONAL_ONLY)]
    if len(params) < len(args) or any(p.kind == p.POSITIONAL_ONLY for p in params[1:len(args)]):
        raise ValueError(f"{type(layer).__name__} receives {len(args)} positional arguments that its forward "
                         f"signature cannot name: hadakit cannot replay its layers one at a time")
    for p, a in zip(params[1:], extra):
        if a is not None and p.name not in _CACHE_KWARGS:
            kw[p.name] = a
    return kw


def _forward(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None):
    if mask is None:
        return model(ids, use_cache=False)
    return model(ids, attention_mask=mask, use_cache=False)


@torch.no_grad()
def capture_window_inputs(model: nn.Module, layers: nn.ModuleList, windows: CalibrationWindows
                          ) -> tuple[list[torch.Tensor], list[list[dict[str, Any]]]]:
    """Inputs of ``layers[0]`` for every window, and ``kwargs[i][j]``: the keyword arguments layer ``i`` receives
    in window ``j`` (masks, position embeddings).

    Without a mask these depend only on the sequence length, so one full forward per distinct length records them
    for every layer (the same dict objects serve all windows of that length); a window with holes in its mask gets
    its own forward, with its mask. The first layer's inputs are then captured per window by stopping the forward at
    layer 0.
    """
    keys = [("len", int(t.shape[1])) if m is None else ("window", j)
            for j, (t, m) in enumerate(zip(windows.ids, windows.masks))]
    recorded: dict[tuple, list[dict[str, Any]]] = {}
    for j, key in enumerate(keys):
        if key in recorded:
            continue
        per_layer: list[dict[str, Any]] = [{} for _ in layers]
        hooks = []
        last = len(layers) - 1
        for i, layer in enumerate(layers):
            def rec(mod, args, kwargs, i=i):
                per_layer[i] = _layer_kwargs(mod, args, kwargs)
                if i == last:  # every layer's arguments are known: the last layer, the head and logits would
                    raise _StopForward  # only cost time and memory (Gemma's logits: 537 MB per window)
            hooks.append(layer.register_forward_pre_hook(rec, with_kwargs=True))
        try:
            _forward(model, windows.ids[j], windows.masks[j])
        except _StopForward:
            pass
        finally:
            for h in hooks:
                h.remove()
        recorded[key] = per_layer

    inputs: list[torch.Tensor] = []

    def catch(mod, args, kwargs):
        inputs.append((args[0] if args else kwargs["hidden_states"]).detach())
        raise _StopForward

    h = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for j in range(len(windows)):
            try:
                _forward(model, windows.ids[j], windows.masks[j])
            except _StopForward:
                pass
    finally:
        h.remove()
    kwargs = [[recorded[key][i] for key in keys] for i in range(len(layers))]
    return inputs, kwargs


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, layers: nn.ModuleList, windows: torch.Tensor,
                         attention_mask: torch.Tensor | None = None
                         ) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Inputs of ``layers[0]`` for every window, and the keyword arguments each layer receives.

    Keyword arguments (masks, position embeddings) depend only on the sequence length here (same-length windows, no
    padding), so one full forward records them for every layer; the first layer's inputs are then captured per
    window by stopping the forward at layer 0. With ``attention_mask`` (see :func:`prepare_calibration`) padded
    windows are cut to their real tokens, and windows then differing in length or with holes in their mask have
    keyword arguments of their own: use :func:`capture_window_inputs`, which returns them per window.
    """
    inputs, kwargs = capture_window_inputs(model, layers, prepare_calibration(windows, attention_mask))
    if any(any(kw is not row[0] for kw in row) for row in kwargs):
        raise ValueError("these windows do not share their layers' keyword arguments (different lengths after "
                         "cutting padding, or holes in the mask): use capture_window_inputs")
    return inputs, [row[0] if row else {} for row in kwargs]


def _call_layer(layer, hidden, kwargs):
    kw = dict(kwargs)
    kw.pop("hidden_states", None)
    return _first_tensor(layer(hidden, **kw))


def _fit_linear(recipe: QuantRecipe, w: torch.Tensor, rotation, stats: InputStats, seed: int) -> LinearFit:
    """Calibrated options of one linear (weight ``w``) from its input statistics (see ``quantization/calibrate``)."""
    if not recipe.fits_options:
        return LinearFit()  # plain GPTQ: nothing to fit, and no error proxy to pay for
    w = w.detach().float()
    a_scheme: QuantScheme | None = recipe.act_scheme()
    problem = LinearProblem(stats.sample(), w, rotation, recipe.weight_scheme(), a_scheme)
    fit = LinearFit(error_before=problem.error())
    err = fit.error_before
    if recipe.smooth is not None:
        fit.smooth, fit.alpha, err = search_smoothing(
            problem, stats, fixed=None if recipe.smooth == "search" else float(recipe.smooth))
    if recipe.learned:
        with torch.enable_grad():
            fit.transform, _ = train_transform(problem, fit.smooth, recipe.learned, steps=recipe.learn_steps,
                                               seed=seed)
        err = problem.error(smooth=fit.smooth, transform=fit.transform)  # on the whole sample, not the training rows
    if recipe.act_clip == "search" and a_scheme is not None:
        fit.act_clip, err = search_act_clip(problem, fit.smooth, fit.transform)
    fit.error_after = err
    return fit


def _input_groups(layer: nn.Module, names: dict[str, nn.Module], x: torch.Tensor, kwargs) -> dict[str, str]:
    """``{linear: leader}``: linears that receive the very same input tensor (q/k/v, gate/up) share one leader, so
    their statistics — Hessian, samples, ranges, all of the *raw* input — are recorded once. Found by running the
    layer once and comparing the input objects, so nothing is assumed about the architecture."""
    seen: dict[int, str] = {}
    keep: list[torch.Tensor] = []  # holds the inputs so their ids are not reused during the forward
    leader: dict[str, str] = {}

    def hook(mod, args, n):
        keep.append(args[0])
        leader[n] = seen.setdefault(id(args[0]), n)

    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: hook(mod, args, n)) for n, m in names.items()]
    try:
        _call_layer(layer, x, kwargs)
    finally:
        for h in hooks:
            h.remove()
    return {n: leader.get(n, n) for n in names}


def _real_rows(x: torch.Tensor, keep: torch.Tensor, name: str) -> torch.Tensor:
    """The rows of ``x`` (one per token of the window) at the real positions ``keep``."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] != keep.numel():
        raise ValueError(f"{name} receives {rows.shape[0]} input rows in a window of {keep.numel()} tokens, so its "
                         f"padded rows cannot be told apart: give windows without holes in their attention mask "
                         f"(padding only at the start or end is cut off instead)")
    return rows[keep.to(rows.device)]


def _record_inputs(layer, names, leaders, inputs, kwargs, recipe, gptq: bool, per_window: int,
                   refs: dict[str, list[torch.Tensor]] | None = None, reuse: StageReuse | None = None,
                   keeps: list[torch.Tensor | None] | None = None, log_batches: bool = False
                   ) -> dict[str, InputStats]:
    """Input statistics of the linears ``leaders`` over every calibration input of ``layer``; the layer's forward
    ends once they have all been seen (what runs after the last of them is not needed). ``kwargs[j]``: the layer's
    keyword arguments in window ``j``. ``refs[n][j]``: the full-precision model's input of ``n`` in window ``j``,
    paired with the recorded one (``fptarget``, GPTQ only). ``reuse``: finished submodules' outputs from the layer's
    earlier passes (``seq``). ``keeps[j]``: the real positions of window ``j`` (None: all); only their rows are
    recorded. ``log_batches``: the Hessians keep their per-batch Gram products (data-parallel calibration adds
    them in the one-process order)."""
    stats = {n: InputStats(linear_weight(names[n]).shape[1], hessian=gptq, max_rows=recipe.calib_rows,
                           rows_per_window=per_window, device=inputs[0].device,
                           ranges=recipe.fits_options,  # plain GPTQ: the Hessian only
                           cross=refs is not None, log_batches=log_batches)
             for n in leaders}
    seen: set[str] = set()
    window = 0

    def record(n, x):
        ref = refs[n][window] if refs is not None else None
        keep = keeps[window] if keeps is not None else None
        if keep is not None:
            x = _real_rows(x, keep, n)
            ref = _real_rows(ref, keep, n) if ref is not None else None
        stats[n].add(x, ref)
        seen.add(n)
        if len(seen) == len(stats):
            raise _StopForward

    hooks = [names[n].register_forward_pre_hook(lambda mod, args, n=n: record(n, args[0])) for n in leaders]
    try:
        with reuse.run(len(inputs)) if reuse is not None else contextlib.nullcontext():
            for window, x in enumerate(inputs):
                seen.clear()
                if reuse is not None:
                    reuse.window = window
                try:
                    _call_layer(layer, x, kwargs[window])
                except _StopForward:
                    pass
    finally:
        for h in hooks:
            h.remove()
    return stats


def _layer_outputs(layer, inputs, kwargs, reuse: StageReuse | None) -> list[torch.Tensor]:
    """The (quantized) layer's outputs on every input (``kwargs[j]``: window ``j``'s): the next layer's inputs."""
    if reuse is None:
        return [_call_layer(layer, x, kw) for x, kw in zip(inputs, kwargs)]
    outputs = []
    with reuse.run(len(inputs), keep=False):
        for window, x in enumerate(inputs):
            reuse.window = window
            outputs.append(_call_layer(layer, x, kwargs[window]))
    return outputs


def _full_precision_pass(layer, names, leaders, inputs, kwargs) -> tuple[dict[str, list[torch.Tensor]], list]:
    """The inputs of the linears ``leaders`` in every window, and the layer's outputs, while ``layer`` is still in
    full precision and fed the full-precision model's hidden states (``fptarget``'s reference stream)."""
    refs: dict[str, list[torch.Tensor]] = {n: [] for n in leaders}
    hooks = [names[n].register_forward_pre_hook(lambda mod, args, n=n: refs[n].append(args[0].detach().clone()))
             for n in leaders]
    try:
        outputs = [_call_layer(layer, x, kw) for x, kw in zip(inputs, kwargs)]
    finally:
        for h in hooks:
            h.remove()
    return refs, outputs


_MALLOC_TRIM: list = []  # [glibc's malloc_trim, or None], looked up once


def release_free_memory() -> None:
    """Give the C heap's free pages back to the system (glibc ``malloc_trim(0)``; a no-op elsewhere). Tensors of a
    few MB come from the heap, and glibc keeps what they free for reuse: weights replaced layer by layer would stay
    in the resident memory (Gemma 3 270M: about 400 MB) although nothing uses them. Changes no value."""
    if not _MALLOC_TRIM:
        import ctypes
        import sys

        fn = None
        if sys.platform.startswith("linux"):
            try:
                fn = ctypes.CDLL(None).malloc_trim
                fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
            except (OSError, AttributeError):  # not glibc (musl, ...)
                fn = None
        _MALLOC_TRIM.append(fn)
    if _MALLOC_TRIM[0] is not None:
        _MALLOC_TRIM[0](0)


def _drop_dense(modules) -> None:
    """Turn the quantized linears among ``modules`` packed-only (``keep_dense=False``): their forward dequantizes the
    packed weight on each call, bit-identical in float32 to the dense weight it replaces."""
    for m in modules:
        if isinstance(m, RotatedQuantLinear) and m.packed is not None and not m.packed_only:
            m.to_packed_only()


@dataclass
class LayerwiseState:
    """What the layer-by-layer calibration carries from one decoder layer to the next (see :func:`calibrate_layer`):
    the current layer's ``inputs`` (one hidden-state tensor per window; the previous layer's quantized outputs),
    ``kwargs[i][j]`` (layer ``i``'s keyword arguments in window ``j``), the windows' real positions ``keeps``,
    the full-precision stream ``fp_inputs`` (``fptarget``), the rows per window a sample keeps, whether ``seq``
    still reuses finished submodules' outputs, the linears replaced so far (``done``), and ``reduce``: None, or a
    function called with each recording pass's ``{leader: InputStats}`` before they are used."""

    inputs: list[torch.Tensor] | None
    kwargs: list[list[dict[str, Any]]]
    keeps: list[torch.Tensor | None] | None
    gptq: bool
    fp_inputs: list[torch.Tensor] | None
    per_window: int
    reusing: bool
    n_layers: int
    done: set = field(default_factory=set)
    # Called with each pass's statistics before they are used (data-parallel calibration all-reduces them there).
    reduce: Callable[[dict[str, InputStats]], None] | None = None
    # The Hessians keep their per-batch Gram products for ``reduce`` (an ordered data-parallel reduction).
    log_batches: bool = False


def start_layerwise(recipe: QuantRecipe, inputs: list[torch.Tensor], kwargs: list[list[dict[str, Any]]],
                    windows: CalibrationWindows) -> LayerwiseState:
    """The state before layer 0, from the first layer's captured ``inputs`` and every layer's ``kwargs``."""
    gptq = recipe.method == "gptq" and recipe.weight is not None
    return LayerwiseState(inputs=inputs, kwargs=kwargs, keeps=windows.keeps(), gptq=gptq,
                          fp_inputs=list(inputs) if gptq and recipe.fp_target else None,  # full-precision stream
                          per_window=max(1, recipe.calib_rows // max(1, len(inputs))),
                          reusing=recipe.sequential,  # only seq runs a layer several times with its earlier parts final
                          n_layers=len(kwargs))


@torch.no_grad()
def calibrate_layer(model, i: int, layer: nn.Module, recipe: QuantRecipe, linears: dict[str, nn.Module],
                    state: LayerwiseState, report: QuantizationReport,
                    progress: Callable[[str], None] | None, keep_dense: bool = True) -> None:
    """Calibrate and quantize decoder layer ``i`` (``layer``, inside ``model``): record each linear's inputs, fit
    its options, quantize (GPTQ on the transformed weights and Hessian), then run the quantized layer to make the
    next layer's inputs (``state.inputs``; None after the last layer). The linears replaced are popped from
    ``linears`` and added to ``state.done``. The in-memory path (:func:`_calibrate_layerwise`) and the streamed one
    (``hadakit.io.streaming``) both call this, so they quantize bit for bit alike."""
    inputs, keeps, gptq, per_window = state.inputs, state.keeps, state.gptq, state.per_window
    kwargs_i = state.kwargs[i]
    reuse = StageReuse(layer, _is_linear) if state.reusing else None
    names = {n: m for n, m in linears.items() if any(m is mm for mm in layer.modules())}
    rotations = {n: make_rotation(recipe, n, linear_weight(m).shape[1], report) for n, m in names.items()}
    leader = _input_groups(layer, names, inputs[0], kwargs_i[0])
    leaders = list(dict.fromkeys(leader.values()))  # in execution order
    refs = None  # fp_inputs is set only for GPTQ, so refs too
    if state.fp_inputs is not None:  # before anything in this layer is quantized
        refs, state.fp_inputs = _full_precision_pass(layer, names, leaders, state.fp_inputs, kwargs_i)
    # One pass records every linear's inputs; true-sequential runs one pass per input group, after the groups
    # before it are quantized, and stops the layer as soon as the group's input is seen.
    for stage in ([[ld] for ld in leaders] if recipe.sequential else [leaders]):
        stats = _record_inputs(layer, names, stage, inputs, kwargs_i, recipe, gptq, per_window,
                               refs=refs, reuse=reuse, keeps=keeps, log_batches=state.log_batches)
        if state.reduce is not None:
            state.reduce(stats)
        release_free_memory()  # the forwards' temporaries, before the quantization's own
        for n, m in names.items():
            if leader[n] not in stage:
                continue
            st = stats[leader[n]]
            fit = _fit_linear(recipe, linear_weight(m), rotations[n], st,
                              seed=layer_seed(recipe.rotation.seed, n))
            if fit.smooth is not None or fit.act_clip is not None or fit.transform is not None:
                report.fits[n] = dict(alpha=fit.alpha, act_clip=fit.act_clip,
                                      transform=fit.transform.mode if fit.transform is not None else None,
                                      error_before=fit.error_before, error_after=fit.error_after)
            _replace(model, n, m, recipe, report, hessian=st.h, rotation=rotations[n], fit=fit, cross=st.cross)
            state.done.add(n)
            linears.pop(n, None)  # the original linear (and its weight) is no longer referenced from here
        st = stats = None  # free the Hessians, samples and full-precision inputs before the next stage
    names = m = None  # the replaced linears of this layer
    refs = None
    state.inputs = None  # this layer's inputs are dropped as soon as its outputs exist
    if i + 1 < state.n_layers:  # the quantized layer's outputs feed the next one
        state.inputs = _layer_outputs(layer, inputs, kwargs_i, reuse)
    inputs = None
    if not keep_dense:
        _drop_dense(layer.modules())
    release_free_memory()  # the replaced weights, Hessians and last layer's inputs
    if reuse is not None and reuse.disabled_reason:
        report.reuse_off = f"layer {i}: {reuse.disabled_reason}"
        state.reusing = False  # recompute everything from here on
    reuse = None
    if progress:
        progress(f"{'GPTQ' if gptq else 'calibration'} layer {i + 1}/{state.n_layers}")


@torch.no_grad()
def _calibrate_layerwise(model, recipe, linears, windows: CalibrationWindows, report,
                         progress: Callable[[str], None] | None, keep_dense: bool = True):
    """One decoder layer at a time (:func:`calibrate_layer`): record each linear's inputs, fit its options, quantize
    (GPTQ on the transformed weights and Hessian), then run the quantized layer to make the next layer's inputs. A
    linear is removed from ``linears`` once it is replaced, so the original weights are freed layer by layer;
    without ``keep_dense`` a finished layer's quantized linears are made packed-only."""
    layers = find_decoder_layers(model)
    inputs, kwargs = capture_window_inputs(model, layers, windows)
    state = start_layerwise(recipe, inputs, kwargs, windows)
    inputs = None
    for i, layer in enumerate(layers):
        calibrate_layer(model, i, layer, recipe, linears, state, report, progress, keep_dense=keep_dense)
    return state.done


_STORE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


ROUND_CHUNK = 1 << 22  # elements rounded at a time: the temporary is 8 MB in bf16, not a copy of the embedding


@torch.no_grad()
def round_unquantized_parameters(model: nn.Module, dtype: str, *, chunk: int | None = ROUND_CHUNK) -> int:
    """Round every floating parameter outside the quantized linears to ``dtype`` (``bf16``/``fp16``) in place,
    keeping its storage dtype, so a checkpoint can hold it in ``dtype`` losslessly; returns how many elements.
    ``chunk`` elements are rounded at a time (rounding is elementwise, so the result does not depend on it; ``None``:
    each parameter at once)."""
    target = _STORE_DTYPES[dtype]
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk must be a positive number of elements or None, got {chunk}")
    inside = {id(p) for m in model.modules() if isinstance(m, RotatedQuantLinear) for p in m.parameters()}
    n = 0
    for p in model.parameters():
        if id(p) not in inside and p.dtype in (torch.float32, torch.float64):  # wider than the 2-byte target
            if chunk is None or p.numel() <= chunk or not p.is_contiguous():
                p.copy_(p.to(target))
            else:
                flat = p.view(-1)
                for a in range(0, flat.numel(), chunk):
                    part = flat[a:a + chunk]
                    part.copy_(part.to(target))
            n += p.numel()
    return n


def quantize_model(model: nn.Module, recipe: QuantRecipe | str, *, calib: torch.Tensor | list | None = None,
                   attention_mask: torch.Tensor | None = None,
                   progress: Callable[[str], None] | None = None, keep_dense: bool = True) -> QuantizationReport:
    """Rotate and quantize ``model`` in place following ``recipe`` (a :class:`QuantRecipe` or a recipe string);
    ``calib`` ([n, len] token ids, optionally with an ``attention_mask`` for padded windows, or a list of 1-D token
    windows: see :func:`prepare_calibration`) feeds GPTQ and the calibrated options. ``hadakit.api.quantize``
    is the public entry point (text, files, documents).

    ``keep_dense``: each quantized linear keeps a dequantized float ``weight`` next to its packed one (the default,
    fastest forward). ``False`` makes each linear packed-only (``RotatedQuantLinear.to_packed_only``) as soon as its
    decoder layer is finished, so the model never holds both: the same packed weights and, in float32, the same
    logits bit for bit, with about a float32 copy of the quantized weights less memory (Gemma 3 270M: 400 MB); the
    forward then dequantizes on each call (``cache_weight()`` keeps a copy again)."""
    if isinstance(recipe, str):
        recipe = get_recipe(recipe)
    elif not isinstance(recipe, QuantRecipe):
        raise TypeError(f"recipe must be a QuantRecipe or a recipe string such as 'w4a4:random:gptq', got "
                        f"{type(recipe).__name__}")
    if recipe.vector_bits is not None:  # E8P lattice recipes (e8p2/e8p3/e8p4) have their own sequential loop
        from hadakit.quantization.quip import quantize_model_recipe

        return quantize_model_recipe(model, recipe, calib=calib, attention_mask=attention_mask, progress=progress,
                                     cache=keep_dense)
    t0 = time.perf_counter()
    if calib is None and attention_mask is not None:
        raise ValueError("attention_mask was given without calib: pass the token windows it masks")
    if recipe.linears_need_calibration and calib is None:
        raise ValueError(f"recipe {recipe.label()!r} needs calibration windows (calib=...): GPTQ and the "
                         f"calibrated options fit on them")
    if recipe.kv is not None and recipe.kv_center and calib is None:
        raise ValueError(f"recipe {recipe.label()!r} needs calibration windows (calib=...) for kvcenter")
    windows = None
    if calib is not None:  # checked even when unused, before anything changes
        windows = prepare_calibration(calib, attention_mask, vocab_size=_vocab_size(model),
                                      kv_windows=KV_CENTER_WINDOWS if recipe.kv is not None and recipe.kv_center
                                      else 0)
    report = QuantizationReport(recipe)
    if windows is not None and recipe.needs_calibration:
        report.calib_windows, report.calib_len = len(windows), windows.length
        report.calib_tokens, report.calib_padded, report.calib_source = windows.tokens, windows.padded, "tokens"
    model.eval()
    if recipe.quantizes_linears:
        if recipe.fuse_values:
            from hadakit.quantization.fusion import fuse_value_rotations

            fused = fuse_value_rotations(model, signs=recipe.rotation.signs,
                                         seed=recipe.rotation.seed)
            report.online = dict(fused.online)
            report.fusion = dict(pairs=len(fused.pairs), probe_error=fused.probe_error, refused=fused.refused)
        linears, report.skipped = find_linears(model, recipe)
        if not linears:
            raise ValueError(f"{type(model).__name__}: no linear layer to quantize (targets={list(recipe.targets)}, ignore={list(recipe.ignore)})")
        done: set[str] = set()
        if recipe.linears_need_calibration:  # pops the linears it replaces from `linears`
            done = _calibrate_layerwise(model, recipe, linears, windows, report, progress, keep_dense=keep_dense)
        for name in list(linears):  # RTN, and linears outside the layer stack
            mod = linears.pop(name)  # dropped here, so each original weight is freed once it is replaced
            if name not in done:
                _replace(model, name, mod, recipe, report)
                if not keep_dense:
                    _drop_dense([model.get_submodule(name)])
        mod = None
        qmods = [m for m in model.modules() if isinstance(m, RotatedQuantLinear) and m.packed is not None]
        if qmods:
            sizes = [m.in_features * m.out_features for m in qmods]  # = weight.numel(), without dequantizing
            bits = sum(m.packed.bits_per_element * k for m, k in zip(qmods, sizes))
            report.weight_bits = bits / sum(sizes)
        release_free_memory()
    if recipe.store_dtype is not None:
        report.stored_rounded = round_unquantized_parameters(model, recipe.store_dtype)
    if recipe.kv is not None:
        report.kv_modules = install_kv_quantization(model, recipe.kv, rotate=recipe.kv_rotation,
                                                    sink_tokens=recipe.kv_sink_tokens)
        if recipe.kv_center:
            calibrate_kv_centers(model, windows.kv_windows(KV_CENTER_WINDOWS))
    report.seconds = time.perf_counter() - t0
    return report
