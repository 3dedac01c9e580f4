"""``hadakit bench``: time the transforms against a memcpy of the same bytes, measured in the same run.

A Hadamard transform reads and writes every element once, so its floor is a device copy of the same tensor (into
an existing tensor, so that allocation is not counted); every result is printed as a ratio to that floor. Results go to a JSON file named after the device.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

import hadakit
from hadakit.devices import device_name, resolve_device

POW2_SIZES = [1 << k for k in range(6, 16)]
M_SIZES = [384, 640, 10240, 12288, 14336, 20480, 28672]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


@dataclass
class BenchResult:
    op: str
    dtype: str
    n: int
    rows: int
    bytes: int
    us: float
    memcpy_us: float

    @property
    def ratio(self) -> float:
        return self.us / self.memcpy_us

    @property
    def gbps(self) -> float:  # bytes read + written per second
        return 2 * self.bytes / (self.us * 1e-6) / 1e9


def _timer(device: torch.device, fn: Callable[[], object], reps: int) -> float:
    """Median wall time of ``fn`` in microseconds (CUDA events on GPU), after one warm-up call."""
    fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
    else:
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e6)
    return statistics.median(times)


def _variants(n: int) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    signs = None

    def randomized(x):
        nonlocal signs
        if signs is None:
            signs = hadakit.random_signs(n, 0, device=x.device)
        return hadakit.hadamard_transform(x, signs=signs)

    def backward(x):
        # the vector-Jacobian product of the transform: the same kernel, transposed
        return hadakit.inverse_hadamard_transform(x)

    return {
        "hadamard": hadakit.hadamard_transform,
        "randomized": randomized,
        "block32": lambda x: hadakit.hadamard_transform(x, block_size=32),
        "backward": backward,
    }


OPS = ("hadamard", "randomized", "block32", "backward")


def resolve_settings(
    *,
    device: str | torch.device | None = None,
    mib: float | None = None,
    sizes: list[int] | None = None,
    dtypes: list[str] | None = None,
    ops: list[str] | None = None,
    reps: int | None = None,
) -> dict:
    """The benchmark's settings, defaults filled in, every one checked before anything runs.

    Raises ``ValueError`` naming the option (as the CLI spells it) and the fix: an unknown device or CUDA without a
    GPU, ``mib`` not a positive finite number, ``reps`` < 1, an unknown dtype or op, a size < 1 or one without a
    Hadamard matrix (the nearest supported sizes are named).
    """
    dev = resolve_device(device)
    if mib is None:
        mib = 256 if dev.type == "cuda" else 64
    elif not (isinstance(mib, (int, float)) and math.isfinite(mib) and mib > 0):
        raise ValueError(f"--mib must be a positive number of MiB per tensor, got {mib!r}")
    if reps is None:
        reps = 50 if dev.type == "cuda" else 5
    elif isinstance(reps, bool) or not isinstance(reps, int) or reps < 1:
        raise ValueError(f"--reps must be a whole number of timed repetitions >= 1, got {reps!r}")
    if dtypes is None:
        dtypes = ["fp32", "bf16", "fp16"] if dev.type == "cuda" else ["fp32"]
    dtypes = list(dtypes)
    bad = [d for d in dtypes if d not in DTYPES]
    if bad or not dtypes:
        raise ValueError(f"--dtypes: unknown dtype {', '.join(map(repr, bad)) or '(none given)'}; "
                         f"choose from {', '.join(DTYPES)}")
    ops = list(OPS[:1] if ops is None else ops)
    bad = [o for o in ops if o not in OPS]
    if bad or not ops:
        raise ValueError(f"--ops: unknown op {', '.join(map(repr, bad)) or '(none given)'}; "
                         f"choose from {', '.join(OPS)}")
    sizes = list(POW2_SIZES + M_SIZES if sizes is None else sizes)
    if not sizes:
        raise ValueError("--sizes: no transform size given; pass comma-separated sizes such as 1024,4096")
    for n in sizes:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"--sizes: transform sizes must be positive integers, got {n!r}")
    whole = [o for o in ops if o != "block32"]  # the ops that transform the full size n
    if whole:
        for n in sizes:
            if not hadakit.supported(n):
                near = " and ".join(str(s) for s in hadakit.nearest_supported(n) if s is not None)
                raise ValueError(f"--sizes: size {n} has no Hadamard matrix (n = m·2^k with a known order m); "
                                 f"nearest supported sizes: {near}")
    elif not any(n % 32 == 0 for n in sizes):
        raise ValueError(f"--ops block32 needs sizes divisible by 32, got {', '.join(map(str, sizes))}")
    return dict(device=dev, mib=float(mib), sizes=sizes, dtypes=dtypes, ops=ops, reps=reps)


def run_bench(
    *,
    device: str | torch.device | None = None,
    mib: float | None = None,
    sizes: list[int] | None = None,
    dtypes: list[str] | None = None,
    ops: list[str] | None = None,
    reps: int | None = None,
    progress: Callable[[BenchResult], None] | None = None,
) -> dict:
    """Run the benchmark and return ``{"device": ..., "results": [...]}`` (see module docstring).

    ``None`` means the default of each setting; bad settings raise ``ValueError`` before anything runs (see
    :func:`resolve_settings`)."""
    cfg = resolve_settings(device=device, mib=mib, sizes=sizes, dtypes=dtypes, ops=ops, reps=reps)
    dev, mib, sizes, dtypes, ops, reps = (cfg[k] for k in ("device", "mib", "sizes", "dtypes", "ops", "reps"))
    results = []
    for dname in dtypes:
        dtype = DTYPES[dname]
        elem = torch.empty((), dtype=dtype).element_size()
        for n in sizes:
            rows = max(1, int(mib * 2**20) // (n * elem))
            x = torch.randn(rows, n, device=dev, dtype=torch.float32).to(dtype)
            # The floor: a copy of the same bytes into an existing tensor. (On CPU a fresh torch.clone also pays
            # first-touch page faults for its new 64 MiB, several times the copy itself, which flatters any op.)
            dst = torch.empty_like(x)
            memcpy_us = _timer(dev, lambda x=x, dst=dst: dst.copy_(x), reps)
            variants = _variants(n)
            for op in ops:
                if op == "block32" and n % 32:
                    continue
                fn = variants[op]
                us = _timer(dev, lambda fn=fn, x=x: fn(x), reps)
                res = BenchResult(op, dname, n, rows, rows * n * elem, us, memcpy_us)
                results.append(res)
                if progress:
                    progress(res)
            del x, dst
    return {
        "device": device_name(dev),
        "device_type": dev.type,
        "torch": torch.__version__,
        "hadakit": hadakit.__version__,
        "backend": "triton" if dev.type == "cuda" else "torch (CPU)",
        "results": [dict(asdict(r), ratio=round(r.ratio, 4), gbps=round(r.gbps, 2)) for r in results],
    }


def format_row(r: BenchResult) -> str:
    return (f"{r.op:<11} {r.dtype:<5} {r.n:>6} {r.rows:>8} {r.us:>11.1f} {r.memcpy_us:>11.1f} "
            f"{r.ratio:>7.2f}x {r.gbps:>8.1f}")


HEADER = f"{'op':<11} {'dtype':<5} {'n':>6} {'rows':>8} {'us':>11} {'memcpy_us':>11} {'ratio':>8} {'GB/s':>8}"


def save_plot(report: dict, path: Path) -> Path | None:
    """Ratio-to-memcpy against size, one line per dtype and op (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(9, 4.5))
    series: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for r in report["results"]:
        series.setdefault((r["op"], r["dtype"]), []).append((r["n"], r["ratio"]))
    for (op, dt), pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{op} {dt}")
    ax.set_xscale("log", base=2)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xlabel("transform size n")
    ax.set_ylabel("time / memcpy time")
    ax.set_title(f"hadakit transform vs memcpy — {report['device']}")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
