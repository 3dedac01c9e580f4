"""``hadakit inspect``: what a rotation does to a model's activations and weights — a table, JSON, plots, HTML.

    hadakit inspect [MODEL] [--text lear] [--format int4] [--rotation random] [--windows 2 --window-len 256]
                    [--compare hadamard,block-128] [--out hadakit-inspect]

Until the sub-command is registered, ``python -m hadakit.cli.inspect ...`` runs the same thing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

_SORTS = ("kurtosis", "token_kurtosis", "channel_absmax_ratio", "sqnr")
#: The sub-command's one-line description (for ``sub.add_parser("inspect", help=DESCRIPTION)``).
DESCRIPTION = ("outlier statistics and quantization error of every linear layer before / after a rotation: "
               "table, JSON, plots, HTML")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="local Hugging Face model directory or .gguf file (default: the built-in Gemma 3 270M)")
    p.add_argument("--text", default="lear",
                   help="text to run: a built-in play name or a text file (default: lear, the calibration play)")
    p.add_argument("--format", default="int4",
                   help="activation format, a hadakit.formats preset (default: int4 = INT4 per token; e.g. mxfp4, "
                        "nvfp4, int8, int4_g128)")
    p.add_argument("--weight-format", default=None, help="weight format (default: the same as --format)")
    p.add_argument("--rotation", default="random",
                   help="none, hadamard, random (H·D, seeded per layer), block-<b>, random-block-<b> "
                        "(default: random)")
    p.add_argument("--compare", default=None,
                   help="comma-separated further rotations to compare with --rotation on the same tokens, "
                        "e.g. hadamard,block-128 (each is another pass)")
    p.add_argument("--windows", type=int, default=2, help="number of token windows (default 2)")
    p.add_argument("--window-len", type=int, default=256, help="tokens per window, BOS added (default 256)")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward pass (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random rotations (default 0)")
    p.add_argument("--ignore", "--skip", dest="ignore", default="lm_head,embed",
                   help="comma-separated layer-name patterns to leave out (default: lm_head,embed; the rule of "
                        "recipe targets/ignore: substring, glob, re:REGEX or a class name)")
    p.add_argument("--targets", "--include", dest="targets", default=None,
                   help="comma-separated layer-name patterns: only the layers that match one")
    p.add_argument("--no-weights", action="store_true", help="skip the weight statistics")
    p.add_argument("--no-plots", action="store_true", help="write the JSON and HTML without PNG plots")
    p.add_argument("--top", type=int, default=15, help="rows in the table of worst layers (default 15)")
    p.add_argument("--sort", default="kurtosis", choices=_SORTS,
                   help="rank layers by activation kurtosis (default) or by SQNR before rotation")
    p.add_argument("--out", default="hadakit-inspect", help="output folder (default: hadakit-inspect)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")


def _log(msg: str) -> None:
    print(f"  … {msg}", file=sys.stderr, flush=True)


def _split(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def run_inspect(args: argparse.Namespace) -> int:
    from hadakit.analysis import inspect_model, parse_rotation, resolve_scheme
    from hadakit.analysis.report import headline, write_report

    # Everything that can be checked without the model first, so a typo fails in a second, not after the load.
    resolve_scheme(args.format)
    if args.weight_format is not None:
        resolve_scheme(args.weight_format)
    # "none" is always the baseline column of a comparison, so it is not another pass
    extra = [r for r in _split(args.compare) if r.lower() not in (args.rotation.lower(), "none")]
    rotations = [args.rotation] + list(dict.fromkeys(extra))
    for r in rotations:
        parse_rotation(r)
    for label, value in (("--windows", args.windows), ("--window-len", args.window_len),
                         ("--batch-size", args.batch_size)):
        if value < 1:
            raise ValueError(f"{label} must be a positive integer, got {value}")

    from hadakit.io.loading import load_model
    from hadakit.io.texts import make_windows, read_text

    try:
        text = read_text(args.text)
    except IsADirectoryError as error:
        raise ValueError(str(error)) from None
    from hadakit.devices import resolve_device

    device = resolve_device(args.device)
    t0 = time.perf_counter()
    _log(f"loading {args.model or 'the built-in Gemma 3 270M (GGUF)'}")
    model, tokenizer = load_model(args.model, device=device)
    if tokenizer is None:
        raise ValueError(f"no tokenizer files in {args.model}: inspect needs a tokenizer to turn --text into tokens")
    model_name = str(args.model or "gemma-3-270m (Q4_K_M GGUF, dequantized to fp32)")
    _log(f"loaded in {time.perf_counter() - t0:.0f} s")
    add_bos = getattr(tokenizer, "bos_token_id", None) is not None
    windows = make_windows(tokenizer, text, window=args.window_len, n_windows=args.windows, add_bos=add_bos)
    _log(f"{windows.shape[0]} window(s) of {windows.shape[1]} tokens from {args.text!r}")

    common = dict(format=args.format, weight_format=args.weight_format, weights=not args.no_weights,
                  seed=args.seed, ignore=_split(args.ignore), targets=_split(args.targets),
                  batch_size=args.batch_size, progress=_log, model_name=model_name)
    reports = {}
    for rot in rotations:
        _log(f"rotation {rot}")
        reports[rot] = inspect_model(model, windows, rotation=rot, **common)
    report = reports[rotations[0]]

    print(report.table(args.top, by=args.sort))
    print()
    print(headline(report))
    out = Path(args.out)
    paths = write_report(report, out, top=args.top, by=args.sort,
                         comparisons={r.rotation: r for r in reports.values()} if len(reports) > 1 else None,
                         plots_enabled=not args.no_plots)
    print(f"\nwrote {paths['html']} (+ {len(paths) - 1} files in {out}) in {time.perf_counter() - t0:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hadakit inspect", description=DESCRIPTION)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_inspect(args)
    except (ValueError, FileNotFoundError, TypeError) as exc:
        print(f"hadakit inspect: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
