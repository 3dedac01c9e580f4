"""The ``hadakit`` command line: one sub-command per job."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _int_list(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r} (no number in it)")
    return values


def _cmd_bench(args: argparse.Namespace) -> int:
    from hadakit.cli import bench
    from hadakit.devices import slug

    def names(text):  # "fp32, bf16" -> ["fp32", "bf16"]; "" / "," -> [] (refused by the checks)
        return None if text is None else [t.strip() for t in text.split(",") if t.strip()]

    settings = dict(device=args.device, mib=args.mib, sizes=args.sizes, dtypes=names(args.dtypes),
                    ops=names(args.ops), reps=args.reps)
    bench.resolve_settings(**settings)  # every setting checked before anything runs or is printed
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {args.out} is a file, not a folder: pass a folder for the JSON and PNG")

    print(bench.HEADER, flush=True)

    def show(res):
        print(bench.format_row(res), flush=True)

    report = bench.run_bench(**settings, progress=show)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = slug(report["device"])
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    plot = bench.save_plot(report, out_dir / f"{stem}.png")
    print(f"\ndevice: {report['device']}\nwrote {json_path}" + (f" and {plot}" if plot else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hadakit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("bench", help="time the transforms against a memcpy of the same bytes")
    b.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    b.add_argument("--mib", type=float, default=None, help="tensor size in MiB (default 256 on GPU, 64 on CPU)")
    b.add_argument("--sizes", type=_int_list, default=None, help="comma-separated transform sizes")
    b.add_argument("--dtypes", default=None, help="comma-separated: fp32,bf16,fp16,fp64 (default: fp32,bf16,fp16 on GPU, fp32 on CPU)")
    b.add_argument("--ops", default=None, help="comma-separated: hadamard,randomized,block32,backward")
    b.add_argument("--reps", type=int, default=None, help="timed repetitions per point (median is reported)")
    b.add_argument("--out", default="hadakit-bench", help="output folder for the JSON and PNG")
    b.set_defaults(func=_cmd_bench)

    from hadakit.cli import quantize as q

    qp = sub.add_parser("quantize", help="rotate and quantize a model; --compare prints a perplexity table")
    q.add_arguments(qp)
    qp.set_defaults(func=q.run_quantize)

    e = sub.add_parser("eval", help="evaluate a saved hadakit checkpoint (reproduces its saved perplexity)")
    e.add_argument("checkpoint", help="directory written by `hadakit quantize --out`")
    e.add_argument("--text", default=None, help="evaluate on another text (default: the saved run's windows)")
    e.add_argument("--device", default=None)
    e.set_defaults(func=q.run_eval)

    from hadakit.cli import export as ex

    xp = sub.add_parser("export", help="write a hadakit checkpoint in a format serving engines read "
                                       "(compressed-tensors, for vLLM)")
    ex.add_arguments(xp)
    xp.set_defaults(func=ex.run_export)

    from hadakit.cli import inspect as insp

    ip = sub.add_parser("inspect", help=insp.DESCRIPTION)
    insp.add_arguments(ip)
    ip.set_defaults(func=insp.run_inspect)

    from hadakit.training import demo

    t = sub.add_parser("train-demo", help="train a small GPT on Shakespeare with each low-precision recipe")
    demo.add_arguments(t)
    t.set_defaults(func=lambda a: (demo.run_from_args(a), 0)[1])
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
            PermissionError, ImportError) as exc:
        print(f"hadakit {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
