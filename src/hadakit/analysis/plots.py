"""PNG plots of an :class:`~hadakit.analysis.InspectReport` (matplotlib, Agg backend; imported lazily).

Every function writes one PNG and returns its path. Colours: before the rotation red, after blue.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import torch

from hadakit.analysis.collect import InspectReport, LayerReport

__all__ = ["plot_channels", "plot_channels_by_kind", "plot_histograms", "plot_kurtosis", "plot_rotation_channels",
           "plot_rotation_comparison", "plot_sqnr"]

BEFORE, AFTER = "#c0392b", "#2066b0"
_MARKERS = "osD^v<>pP*hX"
_DPI = 80


def _plt():
    try:
        import matplotlib
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("the inspect plots need matplotlib: pip install 'hadakit[plots]'") from error
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    """Save as PNG with a 256-colour palette (plots have few colours; a third of the RGBA size)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, bbox_inches="tight", facecolor="white")
    _plt().close(fig)
    try:
        from PIL import Image

        buf.seek(0)
        with Image.open(buf) as img:
            img.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    except Exception:  # pragma: no cover - Pillow missing or too old: keep matplotlib's PNG
        path.write_bytes(buf.getvalue())
    return path


def _short(name: str) -> str:
    for prefix in ("model.language_model.layers.", "model.layers.", "model.", "encoder.layer.", "transformer.h."):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def _pos(v) -> float:
    return v if isinstance(v, (int, float)) and math.isfinite(v) and v > 0 else math.nan


def _block_ticks(ax, layers: list[LayerReport]) -> None:
    ticks, labels, last = [], [], object()
    for i, lay in enumerate(layers):
        if lay.block != last:
            last = lay.block
            if lay.block is not None:
                ticks.append(i)
                labels.append(str(lay.block))
    if ticks:
        step = max(1, len(ticks) // 20)
        ax.set_xticks(ticks[::step])
        ax.set_xticklabels(labels[::step], fontsize=8)
        if ax.get_subplotspec().is_last_row():
            ax.set_xlabel("block (layers in module order)")
        for t in ticks:
            ax.axvline(t - 0.5, color="0.9", lw=0.6, zorder=0)
    else:
        ax.set_xlabel("layer (module order)")


def _per_layer(ax, report: InspectReport, get_before, get_after, *, log: bool, ylabel: str, ref=None,
               rotation: str = "") -> None:
    layers = [lay for lay in report.layers if lay.act_before is not None]
    kinds = report.kinds()
    for k, kind in enumerate(kinds):
        idx = [i for i, lay in enumerate(layers) if lay.kind == kind]
        m = _MARKERS[k % len(_MARKERS)]
        ax.scatter(idx, [get_before(layers[i]) for i in idx], marker=m, s=16, color=BEFORE, alpha=0.8,
                   label=f"{kind}", linewidths=0)
        ax.scatter(idx, [get_after(layers[i]) for i in idx], marker=m, s=16, color=AFTER, alpha=0.8, linewidths=0)
    ax.plot(range(len(layers)), [get_before(lay) for lay in layers], color=BEFORE, lw=0.5, alpha=0.4)
    ax.plot(range(len(layers)), [get_after(lay) for lay in layers], color=AFTER, lw=0.5, alpha=0.4)
    if ref is not None:
        ax.axhline(ref, color="0.4", ls=":", lw=1)
    if log:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    _block_ticks(ax, layers)
    ax.grid(axis="y", alpha=0.3)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=BEFORE, marker="o", ls="", label="before rotation"),
               Line2D([], [], color=AFTER, marker="o", ls="", label=f"after ({rotation})")]
    handles += [Line2D([], [], color="0.3", marker=_MARKERS[k % len(_MARKERS)], ls="", label=kind)
                for k, kind in enumerate(kinds)]
    ax.legend(handles=handles, fontsize=7, ncol=len(handles), loc="lower left", bbox_to_anchor=(0, 1.0),
              frameon=False, handletextpad=0.2, columnspacing=0.9)


def plot_kurtosis(report: InspectReport, path) -> Path:
    """Per-layer activation kurtosis (flattened, and mean per token) before / after the rotation, log scale."""
    plt = _plt()
    fig, axes = plt.subplots(2, 1, figsize=(11, 6.5), sharex=True)
    _per_layer(axes[0], report, lambda lay: _pos(lay.act_before["kurtosis"]),
               lambda lay: _pos(lay.act_after["kurtosis"]), log=True, ylabel="kurtosis (all values)", ref=3,
               rotation=report.rotation)
    _per_layer(axes[1], report, lambda lay: _pos(lay.act_before["token_kurtosis"]),
               lambda lay: _pos(lay.act_after["token_kurtosis"]), log=True, ylabel="mean per-token kurtosis", ref=3,
               rotation=report.rotation)
    axes[1].get_legend().remove()
    fig.suptitle(f"Input activations of every linear: kurtosis before / after {report.rotation} "
                 f"(dotted: 3 = Gaussian)", fontsize=10)
    return _save(fig, path)


def plot_sqnr(report: InspectReport, path) -> Path:
    """Per-layer SQNR (dB) of the activations and the weights, without / with the rotation."""
    plt = _plt()
    has_w = any(lay.weight for lay in report.layers)
    fig, axes = plt.subplots(2 if has_w else 1, 1, figsize=(11, 6.5 if has_w else 3.4), sharex=True, squeeze=False)
    axes = axes[:, 0]
    _per_layer(axes[0], report, lambda lay: lay.sqnr_before_db, lambda lay: lay.sqnr_after_db, log=False,
               ylabel="activation SQNR (dB)", rotation=report.rotation)
    fig.suptitle(f"SQNR of {report.format_label} on each linear's input (top) and weight (bottom), "
                 f"before / after {report.rotation}", fontsize=10)
    if has_w:
        _per_layer(axes[1], report,
                   lambda lay: lay.weight["sqnr_before_db"] if lay.weight else math.nan,
                   lambda lay: lay.weight["sqnr_after_db"] if lay.weight else math.nan, log=False,
                   ylabel="weight SQNR (dB)", rotation=report.rotation)
        axes[1].get_legend().remove()
    return _save(fig, path)


def plot_channels(layer: LayerReport, path, rotation: str = "rotation") -> Path:
    """Per-channel absmax (and RMS) of one layer's input before and after the rotation, same log scale."""
    plt = _plt()
    fig, axes = plt.subplots(2, 1, figsize=(11, 5.5), sharex=True, sharey=True)
    for ax, (label, amax, rms, stats, color) in zip(axes, (
            ("before rotation", layer.channel_absmax_before, layer.channel_rms_before, layer.act_before, BEFORE),
            (f"after {rotation}", layer.channel_absmax_after, layer.channel_rms_after, layer.act_after, AFTER))):
        x = range(len(amax))
        ax.plot(x, amax.clamp_min(1e-12).tolist(), color=color, lw=0.7, label="absmax over tokens")
        ax.plot(x, rms.clamp_min(1e-12).tolist(), color="0.35", lw=0.6, alpha=0.8, label="RMS over tokens")
        ax.axhline(float(amax.median()), color=color, ls="--", lw=0.8, label="median absmax")
        ax.set_yscale("log")
        ax.set_ylabel("|x|")
        ax.set_title(f"{label}: max/median channel absmax {stats['channel_absmax_ratio']:.1f}, "
                     f"top-1% channels hold {stats['top1_energy_share']:.1%} of the energy, "
                     f"kurtosis {stats['kurtosis']:.1f}", fontsize=9)
        ax.legend(fontsize=7, loc="upper right")
        ax.grid(alpha=0.25)
    axes[1].set_xlabel("channel (input feature)")
    fig.suptitle(f"{layer.name}: per-channel magnitude of the input ({layer.tokens} tokens)", fontsize=10)
    return _save(fig, path)


def plot_channels_by_kind(report: InspectReport, path) -> Path:
    """For each projection kind, the per-channel RMS of its most outlier-heavy layer, before and after."""
    plt = _plt()
    kinds = report.kinds()
    cols = min(4, len(kinds))
    rows = math.ceil(len(kinds) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.5 * rows), squeeze=False)
    for ax in axes.flat[len(kinds):]:
        ax.axis("off")
    for ax, kind in zip(axes.flat, kinds):
        lay = report.most_outlier_heavy(kind)
        if lay is None:
            ax.axis("off")
            continue
        x = range(lay.in_features)
        ax.plot(x, lay.channel_rms_before.clamp_min(1e-12).tolist(), color=BEFORE, lw=0.6, label="before")
        ax.plot(x, lay.channel_rms_after.clamp_min(1e-12).tolist(), color=AFTER, lw=0.6, label=report.rotation)
        ax.set_yscale("log")
        from matplotlib.ticker import NullFormatter

        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_title(f"{_short(lay.name)}\nkurtosis {lay.act_before['kurtosis']:.0f} → "
                     f"{lay.act_after['kurtosis']:.1f}", fontsize=8)
        ax.tick_params(labelsize=7)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("Per-channel RMS of the most outlier-heavy input of each kind (x: channel)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_histograms(layer: LayerReport, path, levels, rotation: str = "rotation", format_name: str = "") -> Path:
    """Value histograms of one layer's input before / after the rotation with the format's grid overlaid.

    Top row: raw values (a uniform sample), with the element levels scaled by the median group scale as vertical
    lines. Bottom row: every value divided by its own group scale (exact, all values), where the levels sit at
    their element values.
    """
    plt = _plt()
    levels = [float(v) for v in levels]
    fig, axes = plt.subplots(2, 2, figsize=(11, 6.5))
    for col, (label, sample, ghist, stats, zf, after, color) in enumerate((
            ("before rotation", layer.sample_before, layer.grid_hist_before, layer.act_before,
             layer.zero_fraction_before, False, BEFORE),
            (f"after {rotation}", layer.sample_after, layer.grid_hist_after, layer.act_after,
             layer.zero_fraction_after, True, AFTER))):
        ax = axes[0, col]
        s = layer.typical_scale(after)
        vals = sample.float()
        lim = float(vals.abs().max()) if vals.numel() else 1.0
        if math.isfinite(s):
            lim = max(lim, s * max(abs(v) for v in levels))
        ax.hist(vals.tolist(), bins=200, range=(-lim, lim), color=color, alpha=0.75, log=True)
        if math.isfinite(s):
            for v in levels:
                ax.axvline(v * s, color="0.25", lw=0.5, alpha=0.6)
        ax.set_title(f"{label}: values (sample of {vals.numel()}); grid × median group scale {s:.3g}", fontsize=8.5)
        ax.set_xlabel("x")
        ax = axes[1, col]
        lim_u = layer.grid_limit
        edges = torch.linspace(-lim_u, lim_u, len(ghist) + 1)
        centers = ((edges[1:] + edges[:-1]) / 2).tolist()
        ax.bar(centers, ghist.clamp_min(0).tolist(), width=float(edges[1] - edges[0]), color=color, alpha=0.75,
               log=True)
        for v in levels:
            ax.axvline(v, color="0.25", lw=0.5, alpha=0.6)
        ax.set_xlim(-lim_u, lim_u)
        ax.set_title(f"x / (its group scale), all {int(ghist.sum())} values; {zf:.0%} of nonzeros round to 0",
                     fontsize=8.5)
        ax.set_xlabel("x / s  (vertical lines: the format's levels)")
    fig.suptitle(f"{layer.name}: input value histograms, {format_name}", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_rotation_comparison(reports: dict[str, InspectReport], path) -> Path:
    """Mean activation SQNR per projection kind for several rotations (the first is usually ``none``)."""
    plt = _plt()
    names = list(reports)
    kinds = next(iter(reports.values())).kinds()
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(kinds) + 2), 3.6))
    width = 0.8 / (len(names) + 1)
    colors = plt.get_cmap("tab10")
    base = next(iter(reports.values()))
    before = [base.summary()["by_kind"][k]["act_sqnr_before_db"] for k in kinds]
    ax.bar([i - 0.4 + width / 2 for i in range(len(kinds))], before, width, color="0.6", label="none")
    for j, name in enumerate(names):
        vals = [reports[name].summary()["by_kind"][k]["act_sqnr_after_db"] for k in kinds]
        ax.bar([i - 0.4 + width * (j + 1.5) for i in range(len(kinds))], vals, width, color=colors(j), label=name)
    ax.set_xticks(range(len(kinds)))
    ax.set_xticklabels(kinds, fontsize=8)
    ax.set_ylabel("mean activation SQNR (dB)")
    ax.set_title(f"Rotations compared: {base.format_label}", fontsize=10, pad=22)
    ax.legend(fontsize=7, ncol=len(names) + 1, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_rotation_channels(reports: dict[str, InspectReport], layer_name: str, path) -> Path:
    """Per-channel RMS of one layer's input after each rotation (and before)."""
    plt = _plt()
    fig, axes = plt.subplots(len(reports) + 1, 1, figsize=(11, 1.7 * (len(reports) + 1)), sharex=True, sharey=True)
    first = next(iter(reports.values())).layer(layer_name)
    rows = [("before rotation", first.channel_rms_before, first.act_before, None)]
    rows += [(f"after {name}", r.layer(layer_name).channel_rms_after, r.layer(layer_name).act_after,
              r.layer(layer_name)) for name, r in reports.items()]
    colors = _plt().get_cmap("tab10")
    for j, (ax, (label, rms, stats, lay)) in enumerate(zip(axes, rows)):
        ax.plot(range(len(rms)), rms.clamp_min(1e-12).tolist(), color=BEFORE if lay is None else colors(j - 1),
                lw=0.6)
        ax.set_yscale("log")
        extra = f", SQNR {lay.sqnr_after_db:.1f} dB" if lay is not None else f", SQNR {first.sqnr_before_db:.1f} dB"
        ax.set_title(f"{label}: kurtosis {stats['kurtosis']:.1f}, max/median channel RMS "
                     f"{stats['channel_rms_ratio']:.1f}{extra}", fontsize=8.5)
        ax.tick_params(labelsize=7)
    axes[-1].set_xlabel("channel")
    fig.suptitle(f"{layer_name}: per-channel RMS of the input under each rotation", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
