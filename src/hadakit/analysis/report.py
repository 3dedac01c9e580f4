"""Write an :class:`~hadakit.analysis.InspectReport` to disk: JSON, PNG plots and a self-contained HTML page.

:func:`write_report` produces, in one folder::

    inspect.json          everything: settings, summary, every layer's statistics (per-channel vectors and x / s
                          histograms for the plotted layers), the rotation comparison
    kurtosis.png          per-layer activation kurtosis before / after the rotation
    sqnr.png              per-layer activation (and weight) SQNR before / after
    channels.png          per-channel magnitude of the most outlier-heavy input, before / after
    channels_by_kind.png  the same (RMS) for the worst layer of each projection kind
    histogram.png         value histograms of the most outlier-heavy input with the format's grid
    rotations.png         (with comparisons) mean SQNR per kind under each rotation
    rotation_channels.png (with comparisons) per-channel RMS of the layer where the rotations differ most
    report.html           the page: summary, tables and the images (referenced relatively)
"""

from __future__ import annotations

import html
import json
import math
import re
import time
from pathlib import Path

from hadakit.analysis import plots
from hadakit.analysis.collect import InspectReport, LayerReport, _clean
from hadakit.analysis.stats import OUTLIER_RMS_FACTOR

__all__ = ["headline", "write_report"]


def _round(v, digits: int = 6):
    if isinstance(v, float):
        return float(f"{v:.{digits}g}")
    if isinstance(v, dict):
        return {k: _round(x, digits) for k, x in v.items()}
    if isinstance(v, list):
        return [_round(x, digits) for x in v]
    return v


def _dumps(data, expand_depth: int = 2) -> str:
    """JSON, floats to 6 significant digits, indented down to ``expand_depth`` levels (so every layer is a short
    block of lines) and compact below that."""
    placeholders: list[str] = []

    def pack(v, depth):
        if depth > expand_depth or (isinstance(v, list) and all(not isinstance(x, (dict, list)) for x in v)):
            placeholders.append(json.dumps(v, allow_nan=False, separators=(",", ":"), ensure_ascii=False))
            return f"\x00{len(placeholders) - 1}\x00"
        if isinstance(v, dict):
            return {k: pack(x, depth + 1) for k, x in v.items()}
        if isinstance(v, list):
            return [pack(x, depth + 1) for x in v]
        return v

    text = json.dumps(pack(_round(data), 0), indent=1, allow_nan=False, ensure_ascii=False)
    return re.sub(r'"\\u0000(\d+)\\u0000"', lambda m: placeholders[int(m.group(1))], text)


def _f(v, fmt="{:.1f}") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return fmt.format(v)


def _k(v) -> str:
    if v is None or not math.isfinite(v):
        return "–"
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}"


def format_text(describe: str | None) -> str:
    """``"int4: int4, per_row, scale=fp32/amax"`` -> ``"int4 (int4, per_row, scale=fp32/amax)"``."""
    if not describe:
        return ""
    name, sep, rest = describe.partition(": ")
    return f"{name} ({rest})" if sep else describe


def headline(report: InspectReport) -> str:
    """One paragraph of plain text: what the rotation does over the whole model."""
    s = report.summary()["all"]
    if not s:
        return "no layer received any input"
    text = (f"Over {s['layers']} linear layers and {report.tokens} tokens, the {report.rotation} rotation raises the "
            f"mean activation SQNR under {format_text(report.format_name)} from {s['act_sqnr_before_db']:.1f} dB to "
            f"{s['act_sqnr_after_db']:.1f} dB ({s['act_gain_db_mean']:+.1f} dB on average, "
            f"{s['act_gain_db_min']:+.1f} … {s['act_gain_db_max']:+.1f} dB; {s['layers_improved']} of "
            f"{s['layers']} layers improve). The median input kurtosis falls from {_k(s['act_kurtosis_before_median'])}"
            f" to {_k(s['act_kurtosis_after_median'])} (max {_k(s['act_kurtosis_before_max'])} → "
            f"{_k(s['act_kurtosis_after_max'])}; a Gaussian has 3), and the share of nonzero inputs that round to "
            f"zero from {s['zero_fraction_before_mean']:.0%} to {s['zero_fraction_after_mean']:.0%}.")
    if "weight_sqnr_before_db" in s:
        text += (f" Weight SQNR under {format_text(report.weight_format_name)}: {s['weight_sqnr_before_db']:.1f} → "
                 f"{s['weight_sqnr_after_db']:.1f} dB.")
    return text


# ------------------------------------------------------------------------------------------------------------------
# HTML
# ------------------------------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1180px;
color:#222;line-height:1.45;padding:0 12px}
h1{font-size:1.5em;margin-bottom:4px}h2{font-size:1.2em;margin-top:32px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
th,td{padding:3px 8px;border-bottom:1px solid #eee;text-align:right;white-space:nowrap}
th{background:#f4f4f4}td.l,th.l{text-align:left}
.before{color:#c0392b}.after{color:#2066b0}.muted{color:#777;font-size:13px}
img{max-width:100%;border:1px solid #eee;margin:6px 0}
.lead{background:#f7f9fc;border-left:4px solid #2066b0;padding:8px 12px}
code{background:#f4f4f4;padding:0 3px}
dl{font-size:14px}dt{font-weight:600;margin-top:6px}dd{margin-left:18px}
"""


def _row(cells, header=False) -> str:
    tag = "th" if header else "td"
    out = []
    for c in cells:
        cls = ""
        if isinstance(c, tuple):
            c, cls = c
        out.append(f"<{tag}{f' class={chr(34)}{cls}{chr(34)}' if cls else ''}>{c}</{tag}>")
    return "<tr>" + "".join(out) + "</tr>"


def _ba(b, a, fmt=_k) -> str:
    return f"<span class='before'>{fmt(b)}</span> → <span class='after'>{fmt(a)}</span>"


def _kind_table(report: InspectReport) -> str:
    by_kind = report.summary()["by_kind"]
    has_w = any(lay.weight for lay in report.layers)
    head = ["kind", "layers", "act SQNR dB", "gain dB", "median kurtosis", "max kurtosis", "median token kurt.",
            "zeros"] + (["weight SQNR dB"] if has_w else [])
    rows = [_row([(h, "l" if i == 0 else "") for i, h in enumerate(head)], header=True)]
    for kind, s in by_kind.items():
        if not s:
            continue
        cells = [(html.escape(kind), "l"), s["layers"],
                 _ba(s["act_sqnr_before_db"], s["act_sqnr_after_db"], lambda v: _f(v)),
                 _f(s["act_gain_db_mean"], "{:+.1f}"),
                 _ba(s["act_kurtosis_before_median"], s["act_kurtosis_after_median"]),
                 _ba(s["act_kurtosis_before_max"], s["act_kurtosis_after_max"]),
                 _ba(s["act_token_kurtosis_before_median"], s["act_token_kurtosis_after_median"]),
                 _ba(s["zero_fraction_before_mean"], s["zero_fraction_after_mean"], lambda v: _f(v, "{:.0%}"))]
        if has_w:
            cells.append(_ba(s.get("weight_sqnr_before_db"), s.get("weight_sqnr_after_db"), lambda v: _f(v)))
        rows.append(_row(cells))
    return "<table>" + "".join(rows) + "</table>"


def _layer_table(layers: list[LayerReport]) -> str:
    head = ["layer", "in", "kurtosis", "token kurt.", "max/med ch absmax", "top-1% energy", "outlier ch.",
            "act SQNR dB", "gain", "zeros", "W SQNR dB"]
    rows = [_row([(h, "l" if i == 0 else "") for i, h in enumerate(head)], header=True)]
    for lay in layers:
        b, a, w = lay.act_before, lay.act_after, lay.weight
        rows.append(_row([
            (html.escape(lay.name), "l"), lay.in_features, _ba(b["kurtosis"], a["kurtosis"]),
            _ba(b["token_kurtosis"], a["token_kurtosis"]),
            _ba(b["channel_absmax_ratio"], a["channel_absmax_ratio"]),
            _ba(b["top1_energy_share"], a["top1_energy_share"], lambda v: _f(v, "{:.1%}")),
            _ba(b["outlier_channels"], a["outlier_channels"], lambda v: str(v)),
            _ba(lay.sqnr_before_db, lay.sqnr_after_db, lambda v: _f(v)), _f(lay.gain_db, "{:+.1f}"),
            _ba(lay.zero_fraction_before, lay.zero_fraction_after, lambda v: _f(v, "{:.0%}")),
            _ba(w["sqnr_before_db"], w["sqnr_after_db"], lambda v: _f(v)) if w else "–",
        ]))
    return "<table>" + "".join(rows) + "</table>"


def _comparison_table(comparisons: dict[str, InspectReport]) -> str:
    first = next(iter(comparisons.values()))
    kinds = first.kinds()
    head = ["kind", "none"] + list(comparisons)
    rows = [_row([(h, "l" if i == 0 else "") for i, h in enumerate(head)], header=True)]
    for kind in kinds + ["all"]:
        get = (lambda r: r.summary()["all"]) if kind == "all" else (lambda r: r.summary()["by_kind"][kind])
        base = get(first)
        cells = [(html.escape(kind), "l"),
                 f"{_f(base['act_sqnr_before_db'])} dB <span class='muted'>(k {_k(base['act_kurtosis_before_median'])})"
                 f"</span>"]
        for r in comparisons.values():
            s = get(r)
            cells.append(f"{_f(s['act_sqnr_after_db'])} dB <span class='muted'>(k {_k(s['act_kurtosis_after_median'])})"
                         f"</span>")
        rows.append(_row(cells))
    return "<table>" + "".join(rows) + "</table>"


_DEFINITIONS = f"""
<dl>
<dt>kurtosis</dt><dd>Pearson kurtosis m4/m2² of all values of the layer's input over all tokens (3 for a Gaussian;
large = heavy tails / outliers).</dd>
<dt>token kurtosis</dt><dd>the kurtosis of each token's vector, averaged over tokens: what a per-token scale sees.</dd>
<dt>max/med ch absmax</dt><dd>largest per-channel absmax over the median per-channel absmax (channels = input
features; a channel's absmax is its max |x| over all tokens).</dd>
<dt>top-1% energy</dt><dd>share of Σx² held by the top 1% channels (≈ 1% when no channel stands out).</dd>
<dt>outlier ch.</dt><dd>channels whose RMS exceeds {OUTLIER_RMS_FACTOR:g}× the median channel RMS.</dd>
<dt>SQNR</dt><dd>10·log10(Σx² / Σ(x − x̂)²) pooled over all tokens, with x̂ = Q(x) before and x̂ = R⁻¹Q(Rx) after
the rotation, both in the original basis (equal to the rotated-basis SQNR, R being orthogonal).</dd>
<dt>zeros</dt><dd>share of nonzero inputs that quantize to 0.</dd>
<dt>W SQNR</dt><dd>the same for the layer's weight [out, in], rotated along its input dimension with the same R.</dd>
</dl>
<p class="muted">All statistics are streamed: per-batch sums (count, mean and central power sums merged exactly,
per-channel Σx² and max|x|, the per-token kurtosis sum, Σx² and Σ(x − x̂)²) — the activations are never stored.
The before/after statistics of each layer come from the same tokens.</p>
"""


def _html(report: InspectReport, images: dict[str, str], top_layers: list[LayerReport], by: str,
          comparisons: dict[str, InspectReport] | None, title: str, links) -> str:
    worst = report.most_outlier_heavy()
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             f"<p class='muted'>model <b>{html.escape(report.model)}</b> · activations "
             f"{html.escape(format_text(report.format_name))}"
             + (f" · weights {html.escape(format_text(report.weight_format_name))}" if report.weight_format_name
                else "")
             + f" · rotation <b>{html.escape(report.rotation)}</b> (seed {report.seed}) · {len(report.windows)} "
             f"window(s) of {report.windows[0] if report.windows else 0} tokens = {report.tokens} tokens · "
             f"{len(report.layers)} linear layers · {report.seconds:.0f} s · "
             f"{time.strftime('%Y-%m-%d')} · <a href='inspect.json'>inspect.json</a>"
             + "".join(f" · <a href='{html.escape(h)}'>{html.escape(t)}</a>" for t, h in links) + "</p>",
             f"<p class='lead'>{html.escape(headline(report))}</p>",
             "<h2>By projection kind</h2>", _kind_table(report),
             f"<h2>Worst layers (by {'activation SQNR before rotation' if by == 'sqnr' else by.replace('_', ' ')})"
             f"</h2>", _layer_table(top_layers)]
    captions = {
        "kurtosis": "Kurtosis of every linear's input, before (red) and after (blue) the rotation. Log scale.",
        "sqnr": "SQNR of quantizing every linear's input (top) and weight (bottom), before and after.",
        "channels": f"Per-channel magnitude of the most outlier-heavy input ({html.escape(worst.name)}) "
                    "before and after the rotation, same scale." if worst else "",
        "channels_by_kind": "Per-channel RMS of the most outlier-heavy input of each projection kind.",
        "histogram": "Values of the most outlier-heavy input. Top: raw values with the format's levels scaled by "
                     "the median group scale. Bottom: each value over its own group scale, with the levels at "
                     "their element values (a scale stretched by an outlier sends most values to the zero level).",
        "rotations": "Mean activation SQNR per projection kind under each rotation.",
        "rotation_channels": "Per-channel RMS of one input under each rotation (the layer whose SQNR differs most "
                             "between the full-size rotations).",
    }
    parts.append("<h2>Plots</h2>")
    for key in ("kurtosis", "sqnr", "channels", "channels_by_kind", "histogram"):
        if key in images:
            parts.append(f"<p>{captions[key]}</p><img src='{html.escape(images[key])}' alt='{key}'>")
    if comparisons:
        parts.append("<h2>Rotations compared</h2><p>Mean activation SQNR (dB) per projection kind, with the median "
                     "kurtosis after rotation in parentheses; the same tokens for every rotation.</p>")
        parts.append(_comparison_table(comparisons))
        for key in ("rotations", "rotation_channels"):
            if key in images:
                parts.append(f"<p>{captions[key]}</p><img src='{html.escape(images[key])}' alt='{key}'>")
    parts.append("<h2>Definitions</h2>" + _DEFINITIONS + "</body></html>")
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------------------------


def _most_different_layer(comparisons: dict[str, InspectReport]) -> str | None:
    """The layer whose activation SQNR differs most between the compared rotations — between the full-size ones
    (no ``block``) when there are at least two, since a block rotation trails them on outlier-heavy layers anyway."""
    reports = list(comparisons.values())
    full = [r for r in reports if "block" not in r.rotation]
    if len(full) >= 2:
        reports = full
    if len(reports) < 2:
        return None
    best, best_spread = None, -1.0
    for lay in reports[0].layers:
        if lay.act_before is None:
            continue
        vals = [r.layer(lay.name).sqnr_after_db for r in reports]
        vals = [v for v in vals if math.isfinite(v)]
        if len(vals) >= 2 and max(vals) - min(vals) > best_spread:
            best, best_spread = lay.name, max(vals) - min(vals)
    return best


def write_report(report: InspectReport, out_dir, *, top: int = 15, by: str = "kurtosis",
                 comparisons: dict[str, InspectReport] | None = None, title: str | None = None,
                 links=(), plots_enabled: bool = True) -> dict[str, Path]:
    """Write the JSON, the PNG plots and ``report.html`` into ``out_dir``; returns ``{name: path}``.

    ``comparisons``: rotation label → report of the same model, windows and format under that rotation (include
    ``report`` itself to show it beside the others); adds a comparison table and two plots. ``links``:
    ``(text, href)`` pairs shown in the page header (e.g. to a second run).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    images: dict[str, str] = {}
    top_layers = report.ranked(by)[:top]
    worst = report.most_outlier_heavy()
    live = [lay for lay in report.layers if lay.act_before is not None]
    # per-channel vectors for what the plots show: all four for the most outlier-heavy layer, RMS for the worst of
    # each kind (the JSON stays small)
    rms_layers = {lay.name for k in report.kinds() if (lay := report.most_outlier_heavy(k)) is not None}
    diff_layer = _most_different_layer(comparisons) if comparisons else None
    if plots_enabled and live:
        jobs = {
            "kurtosis": lambda p: plots.plot_kurtosis(report, p),
            "sqnr": lambda p: plots.plot_sqnr(report, p),
            "channels": lambda p: plots.plot_channels(worst, p, report.rotation),
            "channels_by_kind": lambda p: plots.plot_channels_by_kind(report, p),
            "histogram": lambda p: plots.plot_histograms(worst, p, report.levels, report.rotation,
                                                         report.format_label),
        }
        if comparisons:
            jobs["rotations"] = lambda p: plots.plot_rotation_comparison(comparisons, p)
            if diff_layer:
                jobs["rotation_channels"] = lambda p: plots.plot_rotation_channels(comparisons, diff_layer, p)
        for key, job in jobs.items():
            paths[key] = job(out / f"{key}.png")
            images[key] = paths[key].name
    data = report.to_dict(vectors_for=[worst.name] if worst else [], rms_for=sorted(rms_layers))
    data["headline"] = headline(report)
    if comparisons:
        data["comparisons"] = _clean({
            name: {"rotation": r.rotation, "summary": r.summary(),
                   "layers": {lay.name: {"sqnr_after_db": lay.sqnr_after_db,
                                         "kurtosis_after": lay.act_after["kurtosis"] if lay.act_after else None,
                                         "token_kurtosis_after": lay.act_after["token_kurtosis"]
                                         if lay.act_after else None,
                                         "weight_sqnr_after_db": lay.weight["sqnr_after_db"] if lay.weight else None}
                              for lay in r.layers}}
            for name, r in comparisons.items()})
        data["comparisons_most_different_layer"] = diff_layer
    paths["json"] = out / "inspect.json"
    paths["json"].write_text(_dumps(data) + "\n")
    model = Path(report.model).name if ("/" in report.model or "\\" in report.model) else report.model
    title = title or f"hadakit inspect: {model} · {report.format_label} · {report.rotation}"
    paths["html"] = out / "report.html"
    paths["html"].write_text(_html(report, images, top_layers, by, comparisons, title, links))
    return paths
