"""QuIP#-style whole-model quantization: E8P12 (2 bits) / RVQ (3, 4 bits) + BlockLDLQ + two-sided RHT.

Written from QuIP# (Tseng et al. 2024, arXiv 2402.04396); no code taken from it. The per-matrix step is
:func:`hadakit.quantization.ldlq.quantize_weight_e8p`; this module adds

* :class:`E8PLinear` — a linear whose state is the packed codes, the scales and the packed incoherence signs
  (registered buffers, so ``.to()``, ``state_dict()`` and ``load_state_dict()`` see them);
* :func:`quantize_model_e8p` — layer-by-layer calibration as GPTQ does it: each decoder layer's linears get their
  Hessian ``E[x xᵀ]`` (float64) from the inputs the *already quantized* earlier layers produce, are quantized and
  replaced, and the quantized layer then produces the next layer's inputs;
* :func:`quantize_model_sequential` — the same loop with any per-linear quantizer (the benchmark's scalar
  INT-b + GPTQ + RHT baselines use it, so they see the same kind of Hessians).

Forward of :class:`E8PLinear` (choice documented): the *weight form* ``y = x Ŵᵀ + b`` with ``Ŵ`` decoded by
:func:`~hadakit.quantization.ldlq.dequantize_e8p_state` (table decode, scale, inverse two-sided RHT). It is exact —
``Ŵ`` is the very matrix the quantizer's proxy loss was computed on — and on CPU the decode is a one-off
``O(mn log)`` cost per forward (E8P stages decoded by numba's compiled table loop when numba is importable,
bit-identical to the torch table decode, which is the fallback and the path on other devices) (or zero with :meth:`E8PLinear.cache_weight`), after which the matmul runs at
dense speed. The online form (rotate ``x``, multiply by the transformed weight, un-rotate) saves the
``m·n`` dense copy but adds two Hadamard transforms of the activations to every forward and is only equal up to
float rounding, so it is not used here.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from hadakit.formats.lattice import _have_numba
from hadakit.formats.lattice import bits_per_weight as _e8p_bits_per_weight
from hadakit.quantization.ldlq import _pack_signs, dequantize_e8p_state, quantize_weight_e8p

__all__ = ["E8PLinear", "QuipReport", "quantize_model_e8p", "quantize_model_recipe", "quantize_model_sequential"]

log = logging.getLogger(__name__)

_STATE_KEYS = ("codes", "scales", "signs_out", "signs_in", "bits", "shape")


def _check_bits(bits, what: str) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in (2, 3, 4):
        raise ValueError(f"{what}: bits must be 2 (E8P12), 3 or 4 (RVQ), got {bits!r}")
    return bits


class E8PLinear(nn.Module):
    """A linear layer stored as E8P12 / RVQ codes with two-sided RHT incoherence (see the module docstring).

    Buffers: ``codes`` (int16 ``[out, in/8]``), ``codes2`` (second RVQ stage: int16 for 4 bits, uint8 for 3 bits,
    empty for 2 bits), ``scales`` (float32, one per stage), ``signs_out`` / ``signs_in`` (bit-packed uint8) and
    ``bias`` (or None). ``E8PLinear(in, out, bits)`` builds a placeholder module (zero codes, unit scales) of the right shapes to
    ``load_state_dict`` into; :meth:`from_state` builds one from :func:`quantize_weight_e8p`'s state.

    Example:
        >>> import torch
        >>> from hadakit.quantization.ldlq import quantize_weight_e8p
        >>> W = torch.randn(32, 64); X = torch.randn(300, 64)
        >>> state, W_hat, _ = quantize_weight_e8p(W, X.T @ X / 300, bits=2)
        >>> lin = E8PLinear.from_state(state)
        >>> torch.allclose(lin(X[:4]), X[:4] @ W_hat.T, atol=1e-5)
        True
    """

    def __init__(self, in_features: int, out_features: int, bits: int = 2, *, bias: bool = False,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        _check_bits(bits, "E8PLinear")
        for what, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"E8PLinear: {what} must be a positive int, got {v!r}")
        if in_features % 8:
            raise ValueError(f"E8PLinear: in_features ({in_features}) must be a multiple of 8 (E8 blocks)")
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        m, n = out_features, in_features
        self.register_buffer("codes", torch.zeros(m, n // 8, dtype=torch.int16))
        c2 = {2: torch.zeros(0, dtype=torch.int16), 3: torch.zeros(m, n // 8, dtype=torch.uint8),
              4: torch.zeros(m, n // 8, dtype=torch.int16)}[bits]
        self.register_buffer("codes2", c2)
        self.register_buffer("scales", torch.ones(1 if bits == 2 else 2, dtype=torch.float32))  # valid placeholder
        self.register_buffer("signs_out", torch.zeros_like(_pack_signs(torch.ones(m))))
        self.register_buffer("signs_in", torch.zeros_like(_pack_signs(torch.ones(n))))
        if bias:
            self.register_buffer("bias", torch.zeros(m, dtype=dtype))
        else:
            self.bias = None
        self._cached: torch.Tensor | None = None

    # ------------------------------------------------------------------ state
    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], bias: torch.Tensor | None = None) -> "E8PLinear":
        """The module for :func:`quantize_weight_e8p`'s ``state`` (and an optional bias ``[out]``)."""
        if not isinstance(state, dict):
            raise TypeError(f"E8PLinear.from_state: state must be the dict from quantize_weight_e8p, got "
                            f"{type(state).__name__}")
        for k in _STATE_KEYS:
            if k not in state:
                raise ValueError(f"E8PLinear.from_state: state lacks {k!r}; pass the dict from quantize_weight_e8p")
        bits = int(state["bits"])
        m, n = (int(v) for v in state["shape"])
        if bias is not None and tuple(bias.shape) != (m,):
            raise ValueError(f"E8PLinear.from_state: bias must have shape ({m},), got {tuple(bias.shape)}")
        mod = cls(n, m, bits, bias=bias is not None,
                  dtype=bias.dtype if bias is not None else torch.float32)
        with torch.no_grad():
            for k in ("codes", "scales", "signs_out", "signs_in"):
                src = state[k]
                if tuple(src.shape) != tuple(getattr(mod, k).shape):
                    raise ValueError(f"E8PLinear.from_state: state[{k!r}] has shape {tuple(src.shape)}, expected "
                                     f"{tuple(getattr(mod, k).shape)} for a {m}×{n} {bits}-bit matrix")
                getattr(mod, k).copy_(src)
            if bits != 2:
                if "codes2" not in state:
                    raise ValueError("E8PLinear.from_state: a 3/4-bit state needs 'codes2'")
                mod.codes2.copy_(state["codes2"])
            if bias is not None:
                mod.bias.copy_(bias.detach())
        return mod

    def to_state(self) -> dict[str, torch.Tensor]:
        """The plain-tensor state (as :func:`quantize_weight_e8p` returns it; CPU copies)."""
        st = {k: getattr(self, k).detach().cpu().clone() for k in ("codes", "signs_out", "signs_in")}
        st["scales"] = self.scales.detach().cpu().to(torch.float32)
        st["bits"] = torch.tensor(self.bits, dtype=torch.int64)
        st["shape"] = torch.tensor([self.out_features, self.in_features], dtype=torch.int64)
        if self.bits != 2:
            st["codes2"] = self.codes2.detach().cpu().clone()
        return st

    def _load_from_state_dict(self, *args, **kwargs):
        self._cached = None
        return super()._load_from_state_dict(*args, **kwargs)

    # ------------------------------------------------------------------ weight
    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``Ŵ`` (``[out, in]``) in the original space, on the buffers' device; float64 arithmetic for a float64
        ``dtype``, else float32 then cast (default dtype: the bias's, else float32)."""
        if dtype is None:
            dtype = self.bias.dtype if self.bias is not None else torch.float32
        work = torch.float64 if dtype == torch.float64 else torch.float32
        if self.codes.device.type == "cpu" and _have_numba():
            W = self._dequantize_numba(work)
        else:
            W = dequantize_e8p_state(self.to_state(), dtype=work)
        return W.to(device=self.codes.device, dtype=dtype)

    def _dequantize_numba(self, work: torch.dtype) -> torch.Tensor:
        """:func:`dequantize_e8p_state` with the E8P stages decoded by the compiled table loop (bit-identical:
        ``decode_numba`` at scale 1 equals the table decode and E8P points are exact in float32)."""
        from hadakit.formats.lattice import RVQCodebook, _default_e8p
        from hadakit.quantization.ldlq import Incoherence, _unpack_signs

        m, n = self.out_features, self.in_features
        cb = _default_e8p()
        sc = [float(v) for v in self.scales.detach().cpu()]
        Wt = sc[0] * cb.decode_numba(self.codes.detach().contiguous()).to(torch.float64)
        if self.bits == 4:
            Wt = Wt + sc[1] * cb.decode_numba(self.codes2.detach().contiguous()).to(torch.float64)
        elif self.bits == 3:
            Wt = Wt + sc[1] * RVQCodebook(3).stages[1].decode(self.codes2.detach().to(torch.int32),
                                                              dtype=torch.float64)
        Wt = Wt.reshape(m, n)
        inc = Incoherence(_unpack_signs(self.signs_out.cpu(), m), _unpack_signs(self.signs_in.cpu(), n))
        return inc.weight_inverse(Wt.to(work) if work == torch.float64 else Wt).to(work)

    def cache_weight(self, dtype: torch.dtype | None = None) -> "E8PLinear":
        """Keep one dequantized copy of ``Ŵ`` for later forwards (dropped by :meth:`clear_cache`,
        ``load_state_dict`` or when the input's dtype/device differs). Returns ``self``."""
        self._cached = self.dequantized_weight(dtype)
        return self

    def clear_cache(self) -> None:
        """Drop the cached dequantized weight."""
        self._cached = None

    def _apply(self, fn, recurse: bool = True):
        self._cached = None
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"E8PLinear: input's last dim is {x.shape[-1]}, expected {self.in_features}")
        W = self._cached
        if W is None or W.dtype != x.dtype or W.device != x.device:
            W = self.dequantized_weight(x.dtype).to(x.device)
        b = None if self.bias is None else self.bias.to(dtype=x.dtype, device=x.device)
        return nn.functional.linear(x, W, b)

    def bits_per_weight(self) -> float:
        """Stored bits per weight: codes, the float32 scales and the packed sign vectors (bias not counted)."""
        return _e8p_bits_per_weight((self.out_features, self.in_features), self.bits)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"bias={self.bias is not None}")


# ---------------------------------------------------------------------- model loop
@dataclass
class QuipReport:
    """What :func:`quantize_model_e8p` / :func:`quantize_model_sequential` did.

    ``layers``: one dict per quantized linear (name, shape, bits_per_weight, proxy_rel, seconds, …);
    ``bits_per_weight``: over all quantized weights, scales and signs counted; ``seconds``: wall time of the whole
    call (capture, Hessians, quantization, layer replays); ``skipped``: linears left as they were.
    """

    method: str
    bits_per_weight: float = math.nan
    seconds: float = 0.0
    n_weights: int = 0
    layers: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(method=self.method, bits_per_weight=self.bits_per_weight, seconds=self.seconds,
                    n_weights=self.n_weights, layers=self.layers, skipped=self.skipped)


LinearQuantizer = Callable[[str, nn.Linear, torch.Tensor], "tuple[nn.Module, dict[str, Any]]"]


def _as_windows(calib_windows, vocab_size):
    from hadakit.quantization.pipeline import CalibrationWindows, prepare_calibration
    if isinstance(calib_windows, CalibrationWindows):
        return calib_windows
    return prepare_calibration(calib_windows, vocab_size=vocab_size)


def _set_child(root: nn.Module, qualified: str, new: nn.Module) -> None:
    parent_name, _, child = qualified.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


@torch.no_grad()
def quantize_model_sequential(model: nn.Module, calib_windows, quantize_linear: LinearQuantizer, *,
                              method: str = "custom", targets=(), ignore=("lm_head", "embed"),
                              progress: Callable[[str], None] | None = None) -> QuipReport:
    """Replace the selected ``nn.Linear`` s of every decoder layer by ``quantize_linear(name, linear, H)``, layer by
    layer, with ``H = E[x xᵀ]`` (float64, ``[in, in]``) of the linear's inputs *in the partly quantized model*.

    ``quantize_linear`` returns ``(new_module, stats)``; ``stats`` should hold ``bits_per_weight`` (per weight of
    that linear). ``calib_windows``: a ``[n, L]`` token tensor, a list of 1-D windows or a
    :class:`~hadakit.quantization.pipeline.CalibrationWindows`. ``targets`` / ``ignore``: name patterns
    (:mod:`hadakit.selection`). Linears outside the decoder layers are never touched. ``progress`` gets one line
    per quantized linear. The model is modified in place; returns a :class:`QuipReport`.
    """
    from hadakit.quantization.pipeline import _call_layer, capture_window_inputs, find_decoder_layers
    from hadakit.selection import selected

    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_model_sequential: model must be an nn.Module, got {type(model).__name__}")
    if not callable(quantize_linear):
        raise TypeError("quantize_model_sequential: quantize_linear must be callable (name, linear, H)")
    t0 = time.perf_counter()
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    windows = _as_windows(calib_windows, vocab)
    layers = find_decoder_layers(model)
    names = {id(m): n for n, m in model.named_modules()}
    report = QuipReport(method)
    chosen: list[list[tuple[str, nn.Linear]]] = []
    for layer in layers:
        row = []
        for _, mod in layer.named_modules():
            if not isinstance(mod, nn.Linear):
                continue
            name = names[id(mod)]
            if selected(name, type(mod).__name__, tuple(targets), tuple(ignore)):
                row.append((name, mod))
            else:
                report.skipped.append(name)
        chosen.append(row)
    if not any(chosen):
        raise ValueError("quantize_model_sequential: no nn.Linear in the decoder layers is selected; check "
                         f"targets={tuple(targets)!r} / ignore={tuple(ignore)!r}")
    inputs, kwargs = capture_window_inputs(model, layers, windows)
    total_bits = 0.0
    for i, (layer, row) in enumerate(zip(layers, chosen)):
        if row:
            sums = {name: None for name, _ in row}
            counts = {name: 0 for name, _ in row}
            hooks = []
            for name, mod in row:
                def hook(m, args, out, name=name):
                    x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
                    s = x.T @ x
                    sums[name] = s if sums[name] is None else sums[name] + s
                    counts[name] += x.shape[0]
                hooks.append(mod.register_forward_hook(hook))
            try:
                for x, kw in zip(inputs, kwargs[i]):
                    _call_layer(layer, x, kw)
            finally:
                for h in hooks:
                    h.remove()
            for name, mod in row:
                if sums[name] is None:
                    raise ValueError(f"quantize_model_sequential: {name} saw no inputs during calibration")
                H = sums[name] / counts[name]
                t1 = time.perf_counter()
                new, stats = quantize_linear(name, mod, H)
                dt = time.perf_counter() - t1
                _set_child(model, name, new)
                nw = mod.weight.numel()
                bpw = float(stats.get("bits_per_weight", math.nan))
                total_bits += bpw * nw
                report.n_weights += nw
                entry = dict(name=name, shape=list(mod.weight.shape), seconds=dt,
                             **{k: (float(v) if isinstance(v, (int, float)) else v) for k, v in stats.items()})
                report.layers.append(entry)
                msg = (f"[{method}] layer {i + 1}/{len(layers)} {name} {tuple(mod.weight.shape)}: "
                       f"proxy_rel={entry.get('proxy_rel', math.nan):.4g} {dt:.1f}s")
                log.info(msg)
                if progress is not None:
                    progress(msg)
        inputs = [_call_layer(layer, x, kw) for x, kw in zip(inputs, kwargs[i])]
    report.bits_per_weight = total_bits / report.n_weights
    report.seconds = time.perf_counter() - t0
    return report


def quantize_model_e8p(model: nn.Module, bits: int, calib_windows, *, seed: int = 0, damp: float = 0.01,
                       targets=(), ignore=("lm_head", "embed"), scale_multipliers: tuple[float, ...] = (1.0,),
                       cache: bool = True, progress: Callable[[str], None] | None = None) -> QuipReport:
    """Quantize every selected decoder-layer ``nn.Linear`` to E8P12 (``bits=2``) or RVQ (3/4) with two-sided RHT
    and BlockLDLQ, sequentially (GPTQ's order: each layer calibrated on the quantized earlier layers' outputs).

    Each linear is replaced by an :class:`E8PLinear`; its RHT seed is ``seed + k`` for the ``k``-th quantized
    linear, so the result is deterministic for a given ``seed``. ``damp``: Hessian damping relative to
    ``mean(diag H)``; ``scale_multipliers``: the per-matrix scale search of :func:`quantize_weight_e8p`.
    ``cache``: keep each module's dequantized weight (fast evaluation; costs a dense copy). Returns a
    :class:`QuipReport` (bits/weight with scales and signs counted, wall time, per-linear proxy loss).

    Example:
        >>> report = quantize_model_e8p(model, 2, calib_tokens)       # doctest: +SKIP
        >>> round(report.bits_per_weight, 3)                          # doctest: +SKIP
        2.002
    """
    _check_bits(bits, "quantize_model_e8p")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"quantize_model_e8p: seed must be an int, got {seed!r}")
    counter = {"k": 0}

    def q(name: str, mod: nn.Linear, H: torch.Tensor):
        W = mod.weight.detach().to(torch.float64).cpu()
        if W.shape[1] % 8:
            raise ValueError(f"quantize_model_e8p: {name} has in_features {W.shape[1]}, not a multiple of 8; "
                             "ignore it (ignore=...)")
        state, _, stats = quantize_weight_e8p(W, H.cpu(), bits, seed=seed + counter["k"], damp=damp,
                                              scale_multipliers=scale_multipliers)
        counter["k"] += 1
        bias = None if mod.bias is None else mod.bias.detach()
        new = E8PLinear.from_state(state, bias).to(mod.weight.device)
        if cache:
            new.cache_weight(mod.weight.dtype)
        return new, stats

    return quantize_model_sequential(model, calib_windows, q, method="e8p2" if bits == 2 else f"rvq{bits}",
                                     targets=targets, ignore=ignore, progress=progress)


# ---------------------------------------------------------------------- recipe entry point
def _identity_hessian_quantizer(bits: int, seed: int, incoherence: bool, ldlq: bool,
                                scale_multipliers: tuple[float, ...], damp: float):
    counter = {"k": 0}

    def q(name: str, mod: nn.Linear, H: torch.Tensor | None):
        W = mod.weight.detach().to(torch.float64).cpu()
        if W.shape[1] % 8:
            raise ValueError(f"e8p recipe: {name} has in_features {W.shape[1]}, not a multiple of 8; leave it out "
                             "(recipe ignore=...)")
        if H is None:
            H = torch.eye(W.shape[1], dtype=torch.float64)
        state, _, stats = quantize_weight_e8p(W, H.cpu(), bits, seed=seed + counter["k"], damp=damp,
                                              incoherence=incoherence, ldlq=ldlq,
                                              scale_multipliers=scale_multipliers)
        counter["k"] += 1
        bias = None if mod.bias is None else mod.bias.detach()
        return E8PLinear.from_state(state, bias).to(mod.weight.device), stats

    return q


@torch.no_grad()
def quantize_model_recipe(model: nn.Module, recipe, *, calib=None, attention_mask: torch.Tensor | None = None,
                          progress: Callable[[str], None] | None = None, cache: bool = False):
    """Run an E8P lattice recipe (``e8p2`` / ``e8p3`` / ``e8p4``, :mod:`hadakit.quantization.recipes`) on ``model``
    in place; returns a :class:`hadakit.quantization.pipeline.QuantizationReport`.

    What the recipe selects: ``vector_bits`` (2: E8P12, 3/4: RVQ); rotation ``random`` = two-sided RHT incoherence
    (seed ``rotation.seed``, one seed per linear: ``seed + k`` for the ``k``-th), ``none`` = none; method ``gptq`` =
    BlockLDLQ on Hessians from ``calib`` collected layer by layer on the partly quantized model
    (:func:`quantize_model_sequential`), ``rtn`` = nearest codeword of each 8-vector (no calibration needed: the
    per-matrix scale is then chosen on the plain weight MSE); ``vector_scale_search`` = scale multipliers
    :data:`~hadakit.quantization.recipes.VECTOR_SCALE_SEARCH`; ``gptq.damp``; ``targets`` / ``ignore`` (only the
    decoder layers' linears are quantized). Calibration windows are prepared as the pipeline does it (padding at
    either end of a window is cut off); padding *between* real tokens of a window is not masked out of the Hessians. Each selected linear becomes an :class:`E8PLinear`.
    ``cache``: keep each module's dequantized weight (faster forwards, a dense copy per linear).

    ``hadakit.quantize(model, "e8p2", calibration)`` reaches this through ``quantization.pipeline.quantize_model``
    (see the module docstring of :mod:`hadakit.quantization.recipes`).
    """
    from hadakit.quantization.pipeline import QuantizationReport, _vocab_size, prepare_calibration
    from hadakit.quantization.recipes import VECTOR_SCALE_SEARCH, QuantRecipe, get_recipe

    if isinstance(recipe, str):
        recipe = get_recipe(recipe)
    if not isinstance(recipe, QuantRecipe):
        raise TypeError(f"quantize_model_recipe: recipe must be a QuantRecipe or a recipe string such as 'e8p2', "
                        f"got {type(recipe).__name__}")
    if recipe.vector_bits is None:
        raise ValueError(f"quantize_model_recipe: recipe {recipe.label()!r} is not an E8P lattice recipe (e8p2 / "
                         f"e8p3 / e8p4); use hadakit.quantization.pipeline.quantize_model")
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_model_recipe: model must be an nn.Module, got {type(model).__name__}")
    ldlq = recipe.method == "gptq"
    if ldlq and calib is None:
        raise ValueError(f"recipe {recipe.label()!r} needs calibration windows (calib=...): BlockLDLQ fits on their "
                         f"Hessians; or use method rtn ({recipe.name}:{recipe.rotation.label()}:rtn)")
    if calib is None and attention_mask is not None:
        raise ValueError("attention_mask was given without calib: pass the token windows it masks")
    t0 = time.perf_counter()
    model.eval()
    windows = None
    if calib is not None:
        windows = prepare_calibration(calib, attention_mask, vocab_size=_vocab_size(model))
    mults = VECTOR_SCALE_SEARCH if recipe.vector_scale_search else (1.0,)
    qfun = _identity_hessian_quantizer(recipe.vector_bits, int(recipe.rotation.seed), recipe.rotation.kind != "none",
                                       ldlq, mults, float(recipe.gptq.damp))
    method = recipe.label()
    report = QuantizationReport(recipe)

    def wrapped(name, mod, H):
        new, stats = qfun(name, mod, H)
        if cache:
            new.cache_weight(mod.weight.dtype)
        return new, stats

    if windows is not None:
        if recipe.needs_calibration:
            report.calib_windows, report.calib_len = len(windows), windows.length
            report.calib_tokens, report.calib_padded = windows.tokens, windows.padded
            report.calib_source = "tokens"
        rep = quantize_model_sequential(model, windows, wrapped, method=method, targets=recipe.targets,
                                        ignore=recipe.ignore, progress=progress)
    else:
        rep = _quantize_without_calibration(model, wrapped, method, recipe.targets, recipe.ignore, progress)
    report.quantized = [l["name"] for l in rep.layers]
    report.skipped = list(rep.skipped)
    report.weight_bits = rep.bits_per_weight
    report.fits = {l["name"]: {k: v for k, v in l.items() if k != "name"} for l in rep.layers}
    report.seconds = time.perf_counter() - t0
    return report


def _quantize_without_calibration(model, quantize_linear, method, targets, ignore, progress) -> QuipReport:
    from hadakit.quantization.pipeline import find_decoder_layers
    from hadakit.selection import selected

    t0 = time.perf_counter()
    names = {id(m): n for n, m in model.named_modules()}
    report = QuipReport(method)
    total = 0.0
    for layer in find_decoder_layers(model):
        for _, mod in list(layer.named_modules()):
            if not isinstance(mod, nn.Linear):
                continue
            name = names[id(mod)]
            if not selected(name, type(mod).__name__, tuple(targets), tuple(ignore)):
                report.skipped.append(name)
                continue
            t1 = time.perf_counter()
            new, stats = quantize_linear(name, mod, None)
            _set_child(model, name, new)
            nw = mod.weight.numel()
            total += float(stats["bits_per_weight"]) * nw
            report.n_weights += nw
            report.layers.append(dict(name=name, shape=list(mod.weight.shape), seconds=time.perf_counter() - t1,
                                      **{k: float(v) for k, v in stats.items()}))
            if progress is not None:
                progress(f"[{method}] {name}: {time.perf_counter() - t1:.1f}s")
    if not report.n_weights:
        raise ValueError(f"e8p recipe: no nn.Linear in the decoder layers is selected; check targets={targets!r} / "
                         f"ignore={ignore!r}")
    report.bits_per_weight = total / report.n_weights
    report.seconds = time.perf_counter() - t0
    return report
