#!/usr/bin/env python
"""Time hadakit's CPU transforms against a numpy copy and the C peers on PyPI, float32, 64 MiB of rows.

For n = 2^10 … 2^15 (``--sizes``) and ``--mib`` MiB of float32 rows (default 64), every repetition runs each method
once, interleaved (so that a noisy neighbour hits all methods alike), and the table reports the minimum and median
wall time in µs and the ratios of the minimum to a numpy copy of the same bytes and to fht-cpu (in place):

  numpy copy         np.copyto(b, a): read 64 MiB + write 64 MiB into a preallocated array (the floor)
  numpy copy (new)   a.copy(): the same with a freshly allocated output
  fht-cpu            fht_cpu.fht(c, num_threads=T), in place (c is reset with np.copyto outside the timing)
  fht-cpu (new)      fht_cpu.fht(a, inplace=False): a copy plus the in-place transform
  ffht (row loop)    ffht.fht(row) for each row, in place (single thread)
  hadakit numba      cpu_fwht(x, …): new output tensor (from the buffer pool, the default)
  hadakit numba out= cpu_fwht(x, …, out=y): preallocated 64-byte-aligned output (what the in-place peers do)
  hadakit numba new  cpu_fwht with HADAKIT_CPU_POOL=0: a fresh output every call
  hadakit torch      kernels/torch_hadamard.py (Kronecker matmuls, the portable backend)

Peers that are not installed are skipped (``pip install fht-cpu``; ``pip install pybind11`` then
``pip install --no-build-isolation ffht-unofficial``). Both are benchmark-only: hadakit never imports them.

Writes JSON to ``--out`` (default ``benchmarks/results/cpu-peers-<cpu-model-slug>.json``).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from hadakit.devices import cpu_name

ROOT = Path(__file__).resolve().parent.parent


def _load_kernels():
    """hadakit.kernels.{cpu_fwht, torch_hadamard}; straight from the files if the package does not import."""
    try:
        from hadakit.kernels import cpu_fwht, torch_hadamard

        return cpu_fwht, torch_hadamard
    except Exception:
        mods = []
        for name in ("torch_hadamard", "cpu_fwht"):
            path = ROOT / "src" / "hadakit" / "kernels" / f"{name}.py"
            # the real module name: numba's on-disk cache records it
            spec = importlib.util.spec_from_file_location(f"hadakit.kernels.{name}", path)
            mod = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = mod
            spec.loader.exec_module(mod)
            mods.append(mod)
        return mods[1], mods[0]


def cpu_details() -> dict:
    info = {"model": cpu_name(), "logical_cpus": os.cpu_count()}
    try:
        txt = Path("/proc/cpuinfo").read_text()
        for key in ("cpu family", "model", "stepping", "cache size"):
            m = re.search(rf"^{key}\s*:\s*(.+)$", txt, re.M)
            if m:
                info[key.replace(" ", "_")] = m.group(1).strip()
    except OSError:
        pass
    return info


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "cpu"


def _optional(name: str):
    try:
        return importlib.import_module(name)
    except Exception:
        return None


def _aligned_empty(shape, dtype=np.float32) -> np.ndarray:
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + 64, dtype=np.uint8)
    off = (-raw.ctypes.data) % 64
    return raw[off:off + nbytes].view(dtype).reshape(shape)


def bench_size(n: int, mib: int, reps: int, threads: int, cf, th, fht_cpu, ffht, skip_slow: bool,
               clock=time.perf_counter) -> dict:
    rows = (mib << 20) // 4 // n
    rng = np.random.default_rng(n)
    a = rng.standard_normal((rows, n), dtype=np.float32)
    b = _aligned_empty((rows, n))
    c = _aligned_empty((rows, n))
    xt = torch.from_numpy(a)
    yt = torch.from_numpy(b)

    def numba_new() -> None:
        old = os.environ.get("HADAKIT_CPU_POOL")
        os.environ["HADAKIT_CPU_POOL"] = "0"
        try:
            cf.cpu_fwht(xt, None, None, n, 1.0, False)
        finally:
            if old is None:
                del os.environ["HADAKIT_CPU_POOL"]
            else:
                os.environ["HADAKIT_CPU_POOL"] = old

    # (name, setup outside the timing or None, timed call)
    methods = [
        ("numpy copy", None, lambda: np.copyto(b, a)),
        ("numpy copy (new)", None, lambda: a.copy()),
    ]
    if fht_cpu is not None:
        methods.append(("fht-cpu", lambda: np.copyto(c, a), lambda: fht_cpu.fht(c, num_threads=threads)))
        methods.append(("fht-cpu (new)", None, lambda: fht_cpu.fht(a, inplace=False, num_threads=threads)))
    if ffht is not None and not skip_slow:
        methods.append(("ffht (row loop)", lambda: np.copyto(c, a), lambda: [ffht.fht(r) for r in c]))
    if cf is not None and cf.numba_available():
        methods.append(("hadakit numba", None, lambda: cf.cpu_fwht(xt, None, None, n, 1.0, False)))
        methods.append(("hadakit numba out=", None, lambda: cf.cpu_fwht(xt, None, None, n, 1.0, False, out=yt)))
        methods.append(("hadakit numba new", None, numba_new))
    if not skip_slow:
        methods.append(("hadakit torch", None, lambda: th.torch_hadamard(xt, None, None, n, 1.0, False)))

    # warm up (compiles numba on first use; maps memory)
    for _, setup, fn in methods:
        if setup:
            setup()
        fn()
    times: dict[str, list[float]] = {name: [] for name, _, _ in methods}
    for _ in range(reps):
        for name, setup, fn in methods:
            if setup:
                setup()
            t0 = clock()
            out = fn()
            times[name].append((clock() - t0) * 1e6)
            del out
    res = {"n": n, "rows": rows, "bytes": rows * n * 4, "reps": reps, "threads": threads, "methods": {}}
    copy_min = min(times["numpy copy"])
    fht_min = min(times["fht-cpu"]) if "fht-cpu" in times else None
    for name, ts in times.items():
        entry = {"min_us": min(ts), "median_us": statistics.median(ts), "all_us": ts,
                 "x_copy": min(ts) / copy_min}
        if fht_min:
            entry["x_fht_cpu"] = min(ts) / fht_min
            entry["x_fht_cpu_median"] = statistics.median(ts) / statistics.median(times["fht-cpu"])
        res["methods"][name] = entry
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1 << k for k in range(10, 16)])
    ap.add_argument("--mib", type=int, default=64, help="MiB of float32 rows per transform (default 64)")
    ap.add_argument("--reps", type=int, default=9, help="interleaved repetitions (min and median reported)")
    ap.add_argument("--threads", type=int, default=None, help="threads for every method (default: torch's)")
    ap.add_argument("--skip-slow", action="store_true", help="skip the ffht row loop and the torch path")
    ap.add_argument("--clock", choices=["wall", "thread"], default="wall",
                    help="wall: perf_counter; thread: CPU time of this thread (only with --threads 1: it ignores "
                         "time spent descheduled by other processes, so it measures one core's efficiency)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.clock == "thread" and args.threads != 1:
        ap.error("--clock thread needs --threads 1 (other threads' CPU time would not be counted)")
    clock = time.thread_time if args.clock == "thread" else time.perf_counter

    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    cf, th = _load_kernels()
    fht_cpu = _optional("fht_cpu")
    ffht = _optional("ffht")
    model = cpu_name()
    suffix = "" if threads != 1 else ("-1thread-cputime" if args.clock == "thread" else "-1thread")
    out = args.out or ROOT / "benchmarks" / "results" / f"cpu-peers-{slug(model)}{suffix}.json"

    load0 = os.getloadavg() if hasattr(os, "getloadavg") else None
    results = []
    for n in args.sizes:
        r = bench_size(n, args.mib, args.reps, threads, cf, th, fht_cpu, ffht, args.skip_slow, clock)
        results.append(r)
        names = list(r["methods"])
        print(f"\nn = {n} ({r['rows']} rows, {r['bytes'] >> 20} MiB, {threads} threads, {args.reps} reps, "
              f"{args.clock} clock)")
        print(f"  {'method':<20}{'min µs':>10}{'median µs':>11}{'x copy':>8}{'x fht-cpu':>10}")
        for name in names:
            e = r["methods"][name]
            xf = f"{e['x_fht_cpu']:.2f}" if "x_fht_cpu" in e else "-"
            print(f"  {name:<20}{e['min_us']:>10.0f}{e['median_us']:>11.0f}{e['x_copy']:>8.2f}{xf:>10}")
        sys.stdout.flush()
    load1 = os.getloadavg() if hasattr(os, "getloadavg") else None

    summary = {}
    for r in results:
        m = r["methods"]
        summary[str(r["n"])] = {name: {"x_copy": round(e["x_copy"], 3),
                                       "x_fht_cpu": round(e["x_fht_cpu"], 3) if "x_fht_cpu" in e else None}
                                for name, e in m.items()}
    doc = {
        "cpu": cpu_details(),
        "threads": threads,
        "clock": args.clock,
        "mib": args.mib,
        "reps": args.reps,
        "loadavg_before": load0,
        "loadavg_after": load1,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "numba": getattr(_optional("numba"), "__version__", None),
            "fht_cpu": getattr(fht_cpu, "__version__", None) if fht_cpu else None,
            "ffht": "installed" if ffht else None,
        },
        "summary": summary,
        "results": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
