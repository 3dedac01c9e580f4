#!/usr/bin/env python
"""Time the fused rotate-and-quantize kernel against transform-then-quantize and a bf16 copy, on a CUDA GPU.

For each case (scheme, rotation block) on a ~256 MiB bf16 tensor (``--mib``, rows of ``--cols``), every repetition
runs each method once, interleaved, timed with CUDA events; the table reports the median and minimum in µs, the
effective bandwidth (bytes the method must move / time) and the ratio of the median to the median of the copy:

  copy (clone)        x.clone(): read + write 2 B/element, the floor every streaming op is measured against
  fused               hadakit.formats.fused.rotate_quantize(x, scheme, block_size=b): one kernel (NVFP4: two)
  fused (amax=)       NVFP4 only: with the rotated amax given (delayed scaling): one kernel
  unfused             quantize(hadamard_transform(x, block_size=b), scheme): the transform kernel + the formats layer

Goal on an H100: fused <= 0.75x the copy (the traffic floor for bf16 -> 4-bit is about 0.63x). Before timing, each
case checks that fused and unfused agree bit for bit on the benchmark tensor (``exact`` in the JSON).

``--sweep`` also times the quantize kernel alone over warp counts and segment rows per thread (to tune ``_tile``
in ``kernels/triton_rotate_quantize.py``). ``--signs`` adds random ±1 signs (randomized Hadamard) to every case.
Without CUDA the script says so and writes a JSON stub: the kernel is GPU-only (CPU tensors take the
transform-then-quantize path). ``--smoke`` runs the whole script on the CPU under Triton's interpreter on a tiny
tensor (checks the script and the exactness, says nothing about speed).

Writes JSON to ``--out`` (default ``benchmarks/results/fused-<gpu-slug>.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

CASES = [  # (label, scheme, rotation block)
    ("MXFP4 b32", "mxfp4", 32),
    ("NVFP4 b16", "nvfp4", 16),
    ("INT4 g32 b32", "int4_g32", 32),
    ("INT4 g128 b128", "int4_g128", 128),
]


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _time(fns: dict, reps: int, warmup: int) -> dict:
    """Interleaved timing, CUDA events on a GPU (wall clock in --smoke): {name: [ms, ...]}."""
    cuda = torch.cuda.is_available()
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    if cuda:
        torch.cuda.synchronize()
    out = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            if cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                out[name].append(a.elapsed_time(b))
            else:
                t0 = time.perf_counter()
                fn()
                out[name].append((time.perf_counter() - t0) * 1e3)
    return out


def _same(a, b) -> bool:
    def raw(s):
        return s.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[s.element_size()])

    ok = torch.equal(a.payload, b.payload) and torch.equal(raw(a.scales), raw(b.scales))
    if a.tensor_scale is not None:
        ok = ok and torch.equal(a.tensor_scale, b.tensor_scale)
    return bool(ok)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=float, default=256, help="size of the bf16 input in MiB (default 256)")
    ap.add_argument("--cols", type=int, default=4096, help="last dim (default 4096)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-unfused", action="store_true", help="skip the (slow, memory-hungry) unfused path")
    ap.add_argument("--sweep", action="store_true", help="also sweep the kernel's tile size and warp count")
    ap.add_argument("--signs", action="store_true", help="random ±1 signs fused into the load, every case")
    ap.add_argument("--smoke", action="store_true", help="CPU + Triton interpreter, tiny tensor: checks the script")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.smoke:  # before triton / hadakit are imported
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ["HADAKIT_BACKEND"] = "triton"
        args.mib, args.cols, args.reps, args.warmup = 64 / 2 ** 10, 256, 2, 1

    info = {"torch": torch.__version__, "python": platform.python_version(), "mib": args.mib, "cols": args.cols}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None

    if not torch.cuda.is_available() and not args.smoke:
        msg = ("CUDA is not available: the fused rotate-quantize kernel is GPU-only (CPU tensors run "
               "transform-then-quantize), so there is nothing to time here. Run this on a GPU.")
        print(msg)
        out = args.out or ROOT / "benchmarks" / "results" / "fused-cpu-only.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({**info, "device": "cpu", "skipped": msg}, indent=2) + "\n")
        print(f"wrote {out}")
        return 0

    from hadakit import hadamard_transform
    from hadakit.formats import get_scheme, quantize
    from hadakit.formats.fused import _recipe, rotate_quantize, rotated_amax
    from hadakit.formats.quantize import _tensor_scale
    from hadakit.kernels import triton_rotate_quantize as K

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (smoke test, Triton interpreter)"
    info["device"] = name
    rows = int(args.mib * 2 ** 20) // (2 * args.cols)
    numel = rows * args.cols
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(rows, args.cols, generator=g, device=dev).to(torch.bfloat16)
    signs = None
    if args.signs:
        signs = torch.where(torch.rand(args.cols, generator=g, device=dev) < 0.5, -1.0, 1.0)
    info["signs"] = bool(args.signs)
    print(f"{name}: x = bf16 {rows} x {args.cols} ({numel * 2 / 2 ** 20:.0f} MiB); torch {torch.__version__}, "
          f"triton {info['triton']}; {args.reps} reps, median (min) µs")

    results = []
    for label, scheme_name, block in CASES:
        scheme = get_scheme(scheme_name)
        el_bytes = scheme.element.bits / 8
        sc_bytes = scheme.scale_format.storage_dtype.itemsize / scheme.group_size
        traffic = {"copy (clone)": 4.0, "fused": 2 + el_bytes + sc_bytes, "unfused": 2 + el_bytes + sc_bytes}
        fns = {"copy (clone)": lambda: x.clone(),
               "fused": lambda: rotate_quantize(x, scheme, block_size=block, signs=signs)}
        if scheme.tensor_scale:
            traffic["fused"] += 2  # the amax pass reads x again
            amax = rotated_amax(x, block_size=block, signs=signs)
            fns["fused (amax=)"] = lambda: rotate_quantize(x, scheme, block_size=block, signs=signs, amax=amax)
            traffic["fused (amax=)"] = 2 + el_bytes + sc_bytes
        exact = None
        if not args.no_unfused:
            fns["unfused"] = lambda: quantize(hadamard_transform(x, block_size=block, signs=signs), scheme)
            # (the interpreter truncates fp32 -> bf16 casts, so --smoke rounds the fp32 transform with torch)
            y = (hadamard_transform(x, block_size=block, signs=signs) if dev.type == "cuda"
                 else hadamard_transform(x.float(), block_size=block, signs=signs).to(x.dtype))
            exact = _same(rotate_quantize(x, scheme, block_size=block, signs=signs), quantize(y, scheme))
            del y
        times = _time(fns, args.reps, args.warmup)
        copy_med = statistics.median(times["copy (clone)"])
        print(f"\n{label}  ({scheme.describe()}; bit-identical to unfused: {exact})")
        case = {"label": label, "scheme": scheme_name, "block": block, "exact": exact, "methods": {}}
        for m, ts in times.items():
            med, mn = statistics.median(ts), min(ts)
            gbs = traffic[m] * numel / (med * 1e-3) / 1e9
            ratio = med / copy_med
            goal = "  (goal <= 0.75x)" if m.startswith("fused") else ""
            print(f"  {m:<15} {med * 1e3:>10.1f} ({mn * 1e3:>9.1f}) µs  {gbs:>7.0f} GB/s eff.  "
                  f"{ratio:>6.2f}x copy{goal}")
            case["methods"][m] = {"median_us": med * 1e3, "min_us": mn * 1e3, "ratio_to_copy": ratio,
                                  "bytes_per_element": traffic[m], "effective_GBps": gbs}
        if args.sweep and not args.smoke:
            recipe = _recipe(scheme)
            s_t = None
            if scheme.tensor_scale:
                partials, _ = K.rotated_amax(x, block, scheme.group_size, signs, 1 / math.sqrt(block))
                s_t = _tensor_scale(partials, scheme)
            sweep = {}
            w = max(block, scheme.group_size)
            run = max(K._RUN, w if w <= K._MAX_RUN else K._RUN)  # values per thread at one segment row per thread
            for warps in (2, 4, 8):
                for per_thread in (1, 2):  # segment rows per thread
                    tile = warps * 32 * run * per_thread
                    fn = (lambda t=tile, nw=warps: K.rotate_quantize(x, recipe, block, scheme.group_size, signs,
                                                                       1 / math.sqrt(block), s_t, tile=t,
                                                                       num_warps=nw))
                    try:
                        ts = _time({"k": fn}, max(5, args.reps // 2), 2)["k"]
                    except Exception as exc:  # e.g. out of registers / shared memory for a config
                        sweep[f"{tile}/{warps}"] = repr(exc)[:200]
                        continue
                    sweep[f"{tile}/{warps}"] = statistics.median(ts) / copy_med
            ok = {k: v for k, v in sweep.items() if isinstance(v, float)}
            best = min(ok, key=ok.get) if ok else None
            print(f"  sweep (tile/warps -> x copy, quantize kernel only): best {best} "
                  f"{ok.get(best, float('nan')):.3f}; " + ", ".join(f"{k}: {v:.2f}" for k, v in ok.items()))
            case["sweep_ratio_to_copy"] = sweep
        results.append(case)

    out = args.out or ROOT / "benchmarks" / "results" / f"fused-{slug(name.split(' (')[0])}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**info, "rows": rows, "reps": args.reps, "cases": results}, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
