"""``hadakit export``: a hadakit checkpoint in a format that serving engines read."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

FORMATS = ("compressed-tensors",)


def add_format_argument(p: argparse.ArgumentParser, *, default: str | None) -> None:
    p.add_argument("--format", default=default, choices=FORMATS,
                   help="compressed-tensors: the format vLLM serves (W4A16, W8A8, NVFP4, MXFP4; online rotations "
                        "as its transform_config); see docs/export.md")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="directory written by `hadakit quantize --out` (or hadakit.save)")
    p.add_argument("out", help="new directory for the export (replaced with --force only if it is a previous export)")
    add_format_argument(p, default="compressed-tensors")
    p.add_argument("--force", action="store_true", help="replace a previous export at OUT")


def run_export(args: argparse.Namespace) -> int:
    import hadakit
    from hadakit.io.compressed_tensors import VLLMCompatibilityWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", VLLMCompatibilityWarning)
        out = hadakit.export(args.checkpoint, args.out, format=args.format, force=args.force)
    for w in caught:
        if issubclass(w.category, VLLMCompatibilityWarning):
            print(f"warning: {w.message}")
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    size = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file())
    print(f"exported {args.checkpoint} to {out} ({args.format}, {size / 1e6:.1f} MB)")
    return 0
