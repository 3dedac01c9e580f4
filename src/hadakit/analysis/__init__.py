"""hadakit.analysis — what a rotation does to a tensor or a model: outlier statistics and quantization error.

    >>> import torch
    >>> from hadakit.analysis import outlier_stats, rotation_gain
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(512, 640, generator=g); x[:, 11] *= 40        # activations with one outlier channel
    >>> s = outlier_stats(x)
    >>> s["outlier_channels"], s["kurtosis"] > 50
    (1, True)
    >>> r = rotation_gain(x, "int4", "random")                        # INT4 per token, before / after H·D
    >>> r["gain_db"] > 10, r["after"]["outlier_channels"]
    (True, 0)

Over a model, :func:`inspect_model` streams the same statistics for every linear layer's input without storing the
activations, and :func:`write_report` turns the result into a JSON file, PNG plots and an HTML page (the CLI is
``hadakit inspect``). See ``hadakit.analysis.stats`` for the exact definition of every statistic.
"""

from hadakit.analysis.collect import InspectReport, LayerReport, find_linear_layers, inspect_model
from hadakit.analysis.report import headline, write_report
from hadakit.analysis.stats import (
    ROTATION_NAMES,
    StreamingStats,
    format_levels,
    layer_seed,
    make_rotation,
    outlier_stats,
    parse_rotation,
    resolve_scheme,
    rotation_gain,
    sqnr_db,
)

__all__ = [
    "InspectReport",
    "LayerReport",
    "ROTATION_NAMES",
    "StreamingStats",
    "find_linear_layers",
    "format_levels",
    "headline",
    "inspect_model",
    "layer_seed",
    "make_rotation",
    "outlier_stats",
    "parse_rotation",
    "resolve_scheme",
    "rotation_gain",
    "sqnr_db",
    "write_report",
]
