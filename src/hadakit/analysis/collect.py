"""Streaming collection of outlier and quantization statistics over every linear layer of a model.

:func:`inspect_model` registers a forward pre-hook on every ``nn.Linear`` (and GPT-2 ``Conv1D``), runs the model
on token windows, and at each call reduces the layer's input ``x`` (``[tokens, n]``, float32) on the spot:

* original basis: a :class:`~hadakit.analysis.stats.StreamingStats` batch (count, mean, central power sums
  ``M2, M3, M4`` merged exactly across batches; per-channel ``Σ x²`` and ``max |x|``; the sum and count of the
  per-token kurtoses), the SQNR numerator ``Σ x²`` and denominator ``Σ (x - Q(x))²``, how many nonzero values
  quantize to 0, a histogram of ``x / s`` (``s`` = the value's group scale, so the format's levels sit at fixed
  positions), a uniform random sample of values and of group scales (for the raw-value histogram);
* rotated basis ``x_r = R·x``: the same statistics of ``x_r`` and the error ``Σ (x - R⁻¹·Q(R·x))²``, measured in
  the original basis.

Only these sums, maxima, counts, fixed-size histograms and bounded samples survive the call, so memory does not grow
with the number of tokens; the activations themselves are never stored. Every sum is additive over tokens, so the
pooled result is exactly what one pass over all tokens at once gives — for schemes with per-token or per-group
scales (``int4``, ``mxfp4``, ``nvfp4``'s block scales, ...). A per-tensor scale (and NVFP4's tensor scale) is taken
per forward call, i.e. per batch of windows: dynamic quantization of that batch.

Layers that receive the very same input tensor (``q_proj``/``k_proj``/``v_proj``, ``gate_proj``/``up_proj``)
share the original-basis reduction; each layer still gets its own rotation. The weights are analysed once per
layer with :func:`~hadakit.analysis.stats.rotation_gain` and the same rotation (``y = Q(x·Rᵀ)·Q(W·Rᵀ)ᵀ`` rotates
the weight along its input dimension too).

With ``rotation="random"`` every layer gets ``H·D`` with signs seeded by
:func:`~hadakit.analysis.stats.layer_seed` ``(seed, layer name)``: the same rotations ``hadakit quantize`` uses.
"""

from __future__ import annotations

import math
import sys
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from hadakit.selection import check_patterns, selected
from hadakit.analysis.stats import (
    StreamingStats,
    _construction,
    format_levels,
    layer_seed,
    make_rotation,
    parse_rotation,
    resolve_scheme,
    rotation_gain,
    rotation_label,
    sqnr_db,
)
from hadakit.formats import QuantScheme, compute_scales, fake_quantize, quantize_with_scales

__all__ = ["InspectReport", "LayerReport", "find_linear_layers", "inspect_model", "layer_kinds"]

#: Bins of the ``x / s`` histogram over ``[-grid_limit, grid_limit]``.
GRID_BINS = 241
_SAMPLE = 8192  # values sampled per layer, basis and batch for the raw-value histogram (4x that kept in all)
_SCALE_SAMPLE = 2048  # group scales likewise (their median is the "typical scale" of the grid overlay)


def _is_conv1d(mod: nn.Module) -> bool:
    return type(mod).__name__ == "Conv1D" and hasattr(mod, "nf")


def find_linear_layers(model: nn.Module, *, targets: Iterable[str] = (),
                       ignore: Iterable[str] = ("lm_head", "embed")) -> dict[str, nn.Module]:
    """Every ``nn.Linear`` / GPT-2 ``Conv1D`` by name, in module order, selected by ``targets`` (empty: all) and
    ``ignore`` with the rule of :mod:`hadakit.selection` — the same rule as a quantization recipe's."""
    targets = check_patterns(targets, "targets")
    ignore = check_patterns(ignore, "ignore")
    return {name: mod for name, mod in model.named_modules()
            if (isinstance(mod, nn.Linear) or _is_conv1d(mod)) and selected(name, type(mod).__name__, targets, ignore)}


def _weight(mod: nn.Module) -> torch.Tensor:
    return (mod.weight.t() if _is_conv1d(mod) else mod.weight).detach()


def _grid_limit(scheme: QuantScheme) -> float:
    el = scheme.element
    top = float(el.max)
    if getattr(scheme, "int_range", "restricted") == "full":
        top += 2.0 ** -getattr(el, "frac_bits", 0)  # the extra negative code
    if not scheme.symmetric:
        top = float(el.umax)
    # the MX floor rule lets |x / s| reach just under 2^(emax + 1) before saturation
    return max(top, 2.0 ** (int(getattr(el, "emax", 0)) + 1)) if scheme.scale_rule == "floor" else top


def layer_kinds(names: Iterable[str]) -> dict[str, str]:
    """A short kind per layer name: the part after the block index (``self_attn.o_proj``), shortened to its last
    component (``o_proj``) when that is unambiguous among all the names (BERT's ``attention.output.dense`` and
    ``output.dense`` keep their prefixes)."""
    names = list(names)
    full = {}
    for name in names:
        parts = name.split(".")
        idx = [i for i, p in enumerate(parts) if p.isdigit()]
        full[name] = ".".join(parts[idx[-1] + 1:]) if idx and idx[-1] + 1 < len(parts) else name
    last_to_full: dict[str, set] = {}
    for f in full.values():
        last_to_full.setdefault(f.rsplit(".", 1)[-1], set()).add(f)
    return {n: (f.rsplit(".", 1)[-1] if len(last_to_full[f.rsplit(".", 1)[-1]]) == 1 else f)
            for n, f in full.items()}


def _layer_index(name: str) -> int | None:
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None


# ------------------------------------------------------------------------------------------------------------------
# Per-batch reductions
# ------------------------------------------------------------------------------------------------------------------


@dataclass
class _BasisBatch:
    """What one batch leaves behind in one basis (original or rotated)."""

    stats: StreamingStats
    q: torch.Tensor | None  # the quantized batch (dropped once the errors are computed)
    zeros: int
    nonzeros: int
    hist: torch.Tensor
    sample: torch.Tensor
    numel: int
    scales: torch.Tensor
    n_scales: int


def _reduce_basis(x: torch.Tensor, scheme: QuantScheme, gen: torch.Generator, limit: float) -> _BasisBatch:
    (R, G, g), _ = scheme.layout(x.shape)
    if scheme.rounding != "nearest":  # stochastic rounding: seeded, as in rotation_gain
        q = fake_quantize(x, scheme, generator=0)
        s_eff = compute_scales(x, scheme).s_eff
    else:  # one scale computation for both the quantization and the x / s histogram
        scales = compute_scales(x, scheme)
        _, q = quantize_with_scales(x, scheme, scales)
        s_eff = scales.s_eff
    q = q.reshape(x.shape).to(x.dtype)
    s = s_eff.to(x.dtype).reshape(R, G, 1)
    units = torch.where(s > 0, x.reshape(R, G, g) / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(s))
    hist = torch.histc(units.clamp(-limit, limit).float(), bins=GRID_BINS, min=-limit, max=limit).double().cpu()
    nz = x != 0
    flat = x.reshape(-1)
    idx = torch.randint(0, flat.numel(), (min(_SAMPLE, flat.numel()),), generator=gen).to(flat.device)
    sflat = s_eff.reshape(-1)
    sidx = torch.randint(0, sflat.numel(), (min(_SCALE_SAMPLE, sflat.numel()),), generator=gen).to(flat.device)
    return _BasisBatch(StreamingStats.of(x), q, int((nz & (q == 0)).sum()), int(nz.sum()), hist,
                       flat[idx].float().cpu(), flat.numel(), sflat[sidx].float().cpu(), sflat.numel())


class _Sample:
    """A bounded uniform sample of a stream of batches: each batch offers a uniform sample of itself and its size;
    the merged sample keeps ``k`` values, drawn from the old sample and the new one in proportion to the numbers
    of values they stand for (so the memory stays ``k`` values however many batches come)."""

    def __init__(self, k: int, gen: torch.Generator):
        self.k, self.gen = k, gen
        self.values = torch.zeros(0)
        self.seen = 0

    def add(self, values: torch.Tensor, count: int) -> None:
        if count <= 0 or values.numel() == 0:
            return
        total = self.seen + count
        take_old = min(self.values.numel(), round(self.k * self.seen / total))
        take_new = min(values.numel(), self.k - take_old)
        old = self.values[torch.randperm(self.values.numel(), generator=self.gen)[:take_old]]
        new = values[torch.randperm(values.numel(), generator=self.gen)[:take_new]]
        self.values = torch.cat([old, new])
        self.seen = total


class _LayerAccumulator:
    def __init__(self, name: str, mod: nn.Module, rotation, scheme: QuantScheme, seed: int):
        w = _weight(mod)
        self.name, self.module = name, mod
        self.out_features, self.n = int(w.shape[0]), int(w.shape[1])
        lseed = layer_seed(seed, name)
        self.rot = make_rotation(rotation, self.n, seed=lseed)
        self.scheme = scheme
        self.limit = _grid_limit(scheme)
        self.gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        self.before = StreamingStats(self.n)
        self.after = StreamingStats(self.n) if self.rot is not None else None
        self.signal = self.err_before = self.err_after = 0.0
        self.zeros = [0, 0]
        self.nonzeros = [0, 0]
        self.hist = [torch.zeros(GRID_BINS, dtype=torch.float64), torch.zeros(GRID_BINS, dtype=torch.float64)]
        self.samples = [_Sample(4 * _SAMPLE, self.gen), _Sample(4 * _SAMPLE, self.gen)]
        self.scale_samples = [_Sample(4 * _SCALE_SAMPLE, self.gen), _Sample(4 * _SCALE_SAMPLE, self.gen)]
        self.calls = 0
        self.nonfinite = 0
        self.weight: dict[str, Any] | None = None

    def _add_basis(self, i: int, b: _BasisBatch, stats: StreamingStats) -> None:
        stats.merge(b.stats)
        self.zeros[i] += b.zeros
        self.nonzeros[i] += b.nonzeros
        self.hist[i] += b.hist
        self.samples[i].add(b.sample, b.numel)
        self.scale_samples[i].add(b.scales, b.n_scales)

    def observe(self, x: torch.Tensor, shared: dict) -> None:
        """Reduce one call's input. ``shared`` caches the original-basis reduction per input tensor."""
        self.calls += 1
        key = (id(x), x._version)
        cached = shared.get("key") == key and shared.get("x") is x
        if cached:
            xf, base, signal, err_before, bad = shared["value"]
        else:
            xf = x.detach().reshape(-1, self.n).float()
            finite = torch.isfinite(xf)
            bad = int((~finite).sum())
            if bad:
                xf = torch.where(finite, xf, torch.zeros_like(xf))
            base = _reduce_basis(xf, self.scheme, self.gen, self.limit)
            signal = float((xf.double() ** 2).sum())
            err_before = float(((xf - base.q).double() ** 2).sum())
            base.q = None
            shared.update(key=key, x=x, value=(xf, base, signal, err_before, bad))
        self.nonfinite += bad
        self.signal += signal
        self.err_before += err_before
        self._add_basis(0, base, self.before)
        if self.rot is None:
            self.err_after += err_before
            return
        xr = self.rot(xf)
        rb = _reduce_basis(xr, self.scheme, self.gen, self.limit)
        self.err_after += float(((xf - self.rot.inverse(rb.q)).double() ** 2).sum())
        rb.q = None
        self._add_basis(1, rb, self.after)

    def finish(self, kind: str | None = None) -> "LayerReport":
        before = self.before.result() if self.before.count else None
        after = (self.after.result() if self.after is not None and self.after.count else before)
        has_rot = self.rot is not None
        zf = [self.zeros[i] / self.nonzeros[i] if self.nonzeros[i] else math.nan for i in (0, 1)]
        return LayerReport(
            name=self.name, kind=kind or self.name.rsplit(".", 1)[-1], block=_layer_index(self.name),
            in_features=self.n, out_features=self.out_features, calls=self.calls,
            tokens=self.before.rows, construction=_construction(self.rot), act_before=before, act_after=after,
            sqnr_before_db=sqnr_db(self.signal, self.err_before), sqnr_after_db=sqnr_db(self.signal, self.err_after),
            zero_fraction_before=zf[0], zero_fraction_after=zf[1] if has_rot else zf[0], nonfinite=self.nonfinite,
            weight=self.weight,
            channel_absmax_before=self.before.ch_absmax.float(), channel_rms_before=self.before.channel_rms().float(),
            channel_absmax_after=(self.after if has_rot else self.before).ch_absmax.float(),
            channel_rms_after=(self.after if has_rot else self.before).channel_rms().float(),
            grid_hist_before=self.hist[0].clone(), grid_hist_after=(self.hist[1] if has_rot else self.hist[0]).clone(),
            grid_limit=self.limit,
            sample_before=self.samples[0].values,
            sample_after=self.samples[1 if has_rot else 0].values,
            scale_sample_before=self.scale_samples[0].values,
            scale_sample_after=self.scale_samples[1 if has_rot else 0].values,
        )


# ------------------------------------------------------------------------------------------------------------------
# Reports
# ------------------------------------------------------------------------------------------------------------------

_VECTOR_FIELDS = ("channel_absmax_before", "channel_rms_before", "channel_absmax_after", "channel_rms_after")


def _clean(v):
    if isinstance(v, float):
        return v if math.isfinite(v) else (None if math.isnan(v) else ("inf" if v > 0 else "-inf"))
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def _round_list(t: torch.Tensor, digits: int = 4) -> list:
    return [float(f"{float(v):.{digits}g}") for v in t.tolist()]


@dataclass
class LayerReport:
    """The statistics of one linear layer (activations pooled over all tokens, and its weight).

    ``act_before`` / ``act_after``: :func:`~hadakit.analysis.outlier_stats` keys of the input in the original basis
    and after the rotation. ``sqnr_*_db``: activation SQNR without / with the rotation (original basis).
    ``zero_fraction_*``: share of nonzero inputs that quantize to 0. ``weight``: :func:`rotation_gain` of the weight
    (or None). The tensors (per-channel vectors, ``x / s`` histograms, value and scale samples) feed the plots.
    """

    name: str
    kind: str
    block: int | None
    in_features: int
    out_features: int
    calls: int
    tokens: int
    construction: str
    act_before: dict | None
    act_after: dict | None
    sqnr_before_db: float
    sqnr_after_db: float
    zero_fraction_before: float
    zero_fraction_after: float
    nonfinite: int = 0
    weight: dict | None = None
    channel_absmax_before: torch.Tensor | None = field(default=None, repr=False)
    channel_rms_before: torch.Tensor | None = field(default=None, repr=False)
    channel_absmax_after: torch.Tensor | None = field(default=None, repr=False)
    channel_rms_after: torch.Tensor | None = field(default=None, repr=False)
    grid_hist_before: torch.Tensor | None = field(default=None, repr=False)
    grid_hist_after: torch.Tensor | None = field(default=None, repr=False)
    grid_limit: float = 0.0
    sample_before: torch.Tensor | None = field(default=None, repr=False)
    sample_after: torch.Tensor | None = field(default=None, repr=False)
    scale_sample_before: torch.Tensor | None = field(default=None, repr=False)
    scale_sample_after: torch.Tensor | None = field(default=None, repr=False)

    @property
    def gain_db(self) -> float:
        return self.sqnr_after_db - self.sqnr_before_db

    def typical_scale(self, after: bool = False) -> float:
        """Median group scale seen by the quantizer (from the sample), the scale of the grid overlay."""
        s = self.scale_sample_after if after else self.scale_sample_before
        if s is None or s.numel() == 0:
            return math.nan
        s = s[s > 0]
        return float(s.median()) if s.numel() else math.nan

    def to_dict(self, vectors: bool = False, rms: bool = False) -> dict:
        """JSON-ready statistics; ``vectors`` adds the per-channel absmax / RMS vectors and the ``x / s``
        histograms, ``rms`` only the per-channel RMS before / after (4 significant digits)."""
        d = {k: getattr(self, k) for k in ("name", "kind", "block", "in_features", "out_features", "calls",
                                            "tokens", "construction", "sqnr_before_db", "sqnr_after_db")}
        d["gain_db"] = self.gain_db
        d.update(zero_fraction_before=self.zero_fraction_before, zero_fraction_after=self.zero_fraction_after,
                 nonfinite=self.nonfinite, typical_scale_before=self.typical_scale(False),
                 typical_scale_after=self.typical_scale(True), act_before=self.act_before,
                 act_after=self.act_after, weight=self.weight)
        if rms and not vectors:
            for k in ("channel_rms_before", "channel_rms_after"):
                v = getattr(self, k)
                d[k] = _round_list(v) if v is not None else None
        if vectors:
            for k in _VECTOR_FIELDS:
                v = getattr(self, k)
                d[k] = _round_list(v) if v is not None else None
            d["grid_limit"] = self.grid_limit
            for k in ("grid_hist_before", "grid_hist_after"):
                v = getattr(self, k)
                d[k] = [int(c) for c in v.tolist()] if v is not None else None
        return _clean(d)


@dataclass
class InspectReport:
    """The result of :func:`inspect_model`: one :class:`LayerReport` per linear, plus how it was measured."""

    format: dict
    format_name: str
    weight_format: dict | None
    weight_format_name: str | None
    rotation: str
    seed: int
    windows: list[int]
    tokens: int
    seconds: float
    layers: list[LayerReport]
    model: str = ""
    levels: list[float] = field(default_factory=list)

    @property
    def format_label(self) -> str:
        """Short name of the activation format: the preset name, else its description."""
        return self.format.get("name") or self.format_name

    # --- selection ----------------------------------------------------------------------------------------------
    def layer(self, name: str) -> LayerReport:
        for lay in self.layers:
            if lay.name == name:
                return lay
        raise KeyError(f"no layer {name!r} in the report")

    def ranked(self, by: str = "kurtosis") -> list[LayerReport]:
        """Layers worst first: ``by="kurtosis"`` (activation kurtosis before rotation, descending),
        ``"token_kurtosis"``, ``"channel_absmax_ratio"`` or ``"sqnr"`` (activation SQNR before rotation,
        ascending)."""
        live = [lay for lay in self.layers if lay.act_before is not None]
        if by == "sqnr":
            return sorted(live, key=lambda lay: lay.sqnr_before_db)
        keys = ("kurtosis", "token_kurtosis", "channel_absmax_ratio", "top1_energy_share")
        if by not in keys:
            raise ValueError(f"unknown ranking {by!r}; valid: sqnr, {', '.join(keys)}")
        return sorted(live, key=lambda lay: -_finite(lay.act_before[by]))

    def most_outlier_heavy(self, kind: str | None = None) -> LayerReport | None:
        """The layer whose input has the largest kurtosis before rotation (optionally of one projection kind)."""
        ranked = [lay for lay in self.ranked("kurtosis") if kind is None or lay.kind == kind]
        return ranked[0] if ranked else None

    def kinds(self) -> list[str]:
        seen: list[str] = []
        for lay in self.layers:
            if lay.kind not in seen:
                seen.append(lay.kind)
        return seen

    # --- summaries ----------------------------------------------------------------------------------------------
    def summary(self) -> dict:
        """Headline numbers: mean activation / weight SQNR before and after, gains, per projection kind."""
        live = [lay for lay in self.layers if lay.act_before is not None]

        def agg(layers):
            if not layers:
                return {}
            gains = [lay.gain_db for lay in layers]
            out = {
                "layers": len(layers),
                "act_sqnr_before_db": _mean([lay.sqnr_before_db for lay in layers]),
                "act_sqnr_after_db": _mean([lay.sqnr_after_db for lay in layers]),
                "act_gain_db_mean": _mean(gains),
                "act_gain_db_min": min(gains),
                "act_gain_db_max": max(gains),
                "layers_improved": sum(g > 0 for g in gains),
                "act_kurtosis_before_median": _median([lay.act_before["kurtosis"] for lay in layers]),
                "act_kurtosis_after_median": _median([lay.act_after["kurtosis"] for lay in layers]),
                "act_kurtosis_before_max": max(_finite(lay.act_before["kurtosis"]) for lay in layers),
                "act_kurtosis_after_max": max(_finite(lay.act_after["kurtosis"]) for lay in layers),
                "act_token_kurtosis_before_median": _median([lay.act_before["token_kurtosis"] for lay in layers]),
                "act_token_kurtosis_after_median": _median([lay.act_after["token_kurtosis"] for lay in layers]),
                "zero_fraction_before_mean": _mean([lay.zero_fraction_before for lay in layers]),
                "zero_fraction_after_mean": _mean([lay.zero_fraction_after for lay in layers]),
            }
            ws = [lay.weight for lay in layers if lay.weight]
            if ws:
                out["weight_sqnr_before_db"] = _mean([w["sqnr_before_db"] for w in ws])
                out["weight_sqnr_after_db"] = _mean([w["sqnr_after_db"] for w in ws])
            return out

        worst = self.most_outlier_heavy()
        return _clean({
            "all": agg(live),
            "by_kind": {k: agg([lay for lay in live if lay.kind == k]) for k in self.kinds()},
            "most_outlier_heavy": worst.name if worst else None,
        })

    def table(self, top: int | None = 15, by: str = "kurtosis") -> str:
        """A fixed-width text table of the ``top`` worst layers (all with ``None``)."""
        rows = self.ranked(by)[: top if top else None]
        head = (f"{'layer':<34} {'in':>5}  {'kurtosis':>17}  {'tok-kurt':>13}  {'max/med ch':>15}  "
                f"{'top1% energy':>12}  {'act SQNR dB':>17}  {'W SQNR dB':>11}")
        lines = [head, "-" * len(head)]
        for lay in rows:
            b, a = lay.act_before, lay.act_after
            w = lay.weight
            wtxt = f"{w['sqnr_before_db']:5.1f}→{w['sqnr_after_db']:<5.1f}" if w else "-"
            lines.append(
                f"{_short(lay.name, 34):<34} {lay.in_features:>5}  {_num(b['kurtosis']):>7} → {_num(a['kurtosis']):<7}"
                f"  {_num(b['token_kurtosis']):>5} → {_num(a['token_kurtosis']):<5}"
                f"  {_num(b['channel_absmax_ratio']):>6} → {_num(a['channel_absmax_ratio']):<6}"
                f"  {b['top1_energy_share']:>5.1%}→{a['top1_energy_share']:<5.1%}"
                f"  {lay.sqnr_before_db:5.1f} → {lay.sqnr_after_db:5.1f} {lay.gain_db:+5.1f}  {wtxt:>11}")
        return "\n".join(lines)

    def to_dict(self, vectors_for: Iterable[str] = (), rms_for: Iterable[str] = ()) -> dict:
        """Everything as JSON-ready data; per-channel vectors and ``x / s`` histograms only for ``vectors_for``,
        per-channel RMS only for ``rms_for``."""
        keep, keep_rms = set(vectors_for), set(rms_for)
        return _clean({
            "model": self.model, "format": self.format, "format_name": self.format_name,
            "weight_format": self.weight_format, "weight_format_name": self.weight_format_name,
            "rotation": self.rotation, "seed": self.seed, "windows": self.windows, "tokens": self.tokens,
            "seconds": self.seconds, "levels": self.levels, "summary": self.summary(),
            "layers": [lay.to_dict(vectors=lay.name in keep, rms=lay.name in keep_rms) for lay in self.layers],
        })


def _finite(v) -> float:
    return v if isinstance(v, (int, float)) and math.isfinite(v) else -math.inf


def _mean(vals) -> float:
    vals = [v for v in vals if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else math.nan


def _median(vals) -> float:
    vals = sorted(v for v in vals if isinstance(v, (int, float)) and math.isfinite(v))
    if not vals:
        return math.nan
    k = len(vals)
    return vals[k // 2] if k % 2 else (vals[k // 2 - 1] + vals[k // 2]) / 2


def _num(v) -> str:
    if v is None or not math.isfinite(v):
        return "-"
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}"


def _short(name: str, width: int) -> str:
    for prefix in ("model.language_model.", "model.layers.", "model.", "encoder.layer.", "transformer.h."):
        if name.startswith(prefix) and len(name) > width:
            name = name[len(prefix):]
    return name if len(name) <= width else "…" + name[-(width - 1):]


# ------------------------------------------------------------------------------------------------------------------
# The collection
# ------------------------------------------------------------------------------------------------------------------


def _progress_fn(progress) -> Callable[[str], None]:
    if callable(progress):
        return progress
    if progress:
        return lambda msg: print(f"  … {msg}", file=sys.stderr, flush=True)
    return lambda msg: None


def _batches(windows, batch_size: int):
    if isinstance(windows, torch.Tensor):
        if windows.dim() == 1:
            windows = windows[None]
        if windows.dim() != 2 or windows.shape[0] == 0 or windows.shape[1] == 0:
            raise ValueError(f"windows must be a non-empty [n_windows, length] tensor of token ids, "
                             f"got shape {tuple(windows.shape)}")
        return list(windows.split(batch_size))
    out = [w if w.dim() == 2 else w[None] for w in windows]
    if not out:
        raise ValueError("windows is empty: pass at least one window of token ids")
    return out


def inspect_model(model: nn.Module, windows, *, format: str | QuantScheme = "int4", rotation="random",
                  weight_format: str | QuantScheme | None = None, weights: bool = True, seed: int = 0,
                  targets: Iterable[str] = (), ignore: Iterable[str] = ("lm_head", "embed"),
                  batch_size: int = 1, progress=True, model_name: str = "") -> InspectReport:
    """Outlier statistics and rotation gains of every linear layer's input (and weight), streamed over ``windows``.

    Args:
        model: any module whose linears are ``nn.Linear`` or GPT-2 ``Conv1D``; called as ``model(input_ids=...)``
            (its ``base_model`` when every analysed linear lives there, so no LM-head logits are computed).
        windows: token ids, ``[n_windows, length]`` (e.g. :func:`hadakit.io.texts.make_windows`) or an iterable of
            such tensors; run ``batch_size`` windows per forward.
        format: the activation scheme (preset name or ``QuantScheme``); ``"int4"`` is INT4 per token.
        rotation: ``"none"``, ``"hadamard"``, ``"random"``, ``"block-32"``, ``"random-block-128"``, … (see
            :func:`~hadakit.analysis.stats.make_rotation`); ``random`` uses a different seed per layer.
        weight_format: the scheme for the weights (default: ``format``); ``weights=False`` skips them.
        targets / ignore: which linears to analyse, by the rule of :mod:`hadakit.selection` (the rule a
            quantization recipe's ``targets`` / ``ignore`` use): targets empty means all.
        progress: ``True`` prints progress on stderr; a callable receives the messages.

    Returns an :class:`InspectReport`. The model is left unchanged (the hooks are removed).
    """
    say = _progress_fn(progress)
    scheme = resolve_scheme(format)
    wscheme = resolve_scheme(weight_format) if weight_format is not None else scheme
    if isinstance(rotation, str):
        parse_rotation(rotation)  # validate the name before any work (raises with the valid names)
    layers = find_linear_layers(model, targets=targets, ignore=ignore)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no nn.Linear / Conv1D layers to inspect "
                         f"(targets={list(targets)}, ignore={list(ignore)})")
    batches = _batches(windows, max(1, int(batch_size)))
    t0 = time.perf_counter()
    accs = {name: _LayerAccumulator(name, mod, rotation, scheme, seed) for name, mod in layers.items()}

    if weights:
        say(f"weights: {len(accs)} layers, {wscheme.describe()}, rotation {rotation_label(rotation)}")
        with torch.no_grad():
            for i, acc in enumerate(accs.values()):
                acc.weight = rotation_gain(_weight(acc.module).float(), wscheme, acc.rot if acc.rot is not None
                                           else "none")
                if (i + 1) % 25 == 0:
                    say(f"weights: {i + 1}/{len(accs)} ({time.perf_counter() - t0:.0f} s)")

    shared: dict = {}
    handles = []

    def hook_for(acc):
        def hook(mod, args, kwargs):
            x = args[0] if args else kwargs.get("input", kwargs.get("x"))
            if isinstance(x, torch.Tensor) and x.is_floating_point():
                acc.observe(x, shared)
        return hook

    for acc in accs.values():
        handles.append(acc.module.register_forward_pre_hook(hook_for(acc), with_kwargs=True))

    base = getattr(model, "base_model", None)
    runner = model
    if isinstance(base, nn.Module) and base is not model:
        inside = {id(m) for m in base.modules()}
        if all(id(mod) in inside for mod in layers.values()):
            runner = base
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    tokens = 0
    try:
        with torch.no_grad():
            for i, batch in enumerate(batches):
                tb = time.perf_counter()
                runner(input_ids=batch.to(device))
                shared.clear()
                tokens += batch.numel()
                say(f"window batch {i + 1}/{len(batches)}: {batch.numel()} tokens in "
                    f"{time.perf_counter() - tb:.1f} s")
    finally:
        for h in handles:
            h.remove()
        shared.clear()

    kinds = layer_kinds(accs)
    return InspectReport(
        format=scheme.to_dict(), format_name=scheme.describe(),
        weight_format=wscheme.to_dict() if weights else None,
        weight_format_name=wscheme.describe() if weights else None,
        rotation=rotation_label(rotation), seed=seed, windows=[int(b.shape[1]) for b in batches for _ in b],
        tokens=tokens, seconds=time.perf_counter() - t0, layers=[acc.finish(kinds[name]) for name, acc in accs.items()],
        model=model_name or type(model).__name__, levels=[float(v) for v in format_levels(scheme)],
    )
