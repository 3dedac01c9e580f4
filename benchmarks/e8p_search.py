"""E8P12 nearest-point search speed: the torch reference scan vs the compiled (numba) scan, same run.

Measures vectors/s of ``E8P12Codebook.quantize`` with ``method='torch'`` (the vectorized reference: 256 absolute
points × 2 shifts as (N, 256) tensors) and ``method='numba'`` (one compiled loop; serial below
``PARALLEL_MIN_VECTORS``, parallel over chunks above), on N(0, 1) vectors at the unit-Gaussian scale, plus the
BlockLDLQ call pattern (one call per 8 columns with ``m`` = 640 / 2048 rows). Floor: a float64 copy of the same
input (``x.clone()``), timed in the same run; every figure is also given as its ratio to that floor. Checks that both
methods return the same codes. The machine is shared and was loaded far beyond its 2 cores: times are this
process's CPU seconds (min over repetitions); run with NUMBA_NUM_THREADS=1 so they equal one core's wall time.

    OMP_NUM_THREADS=1 python benchmarks/e8p_search.py --out docs/results/lattice
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from hadakit.devices import cpu_name




def best_time(fn, reps: int) -> float:
    """Min over ``reps`` of this process's CPU seconds (``time.process_time``): on a machine loaded far beyond its
    cores, wall time mostly measures the wait for a core. With one numba and one torch thread it is the time the
    work would take on an idle core."""
    best = float("inf")
    for _ in range(reps):
        t = time.process_time()
        fn()
        best = min(best, time.process_time() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/e8p_search")
    ap.add_argument("--n-torch", type=int, default=20_000)
    ap.add_argument("--n-numba", type=int, default=200_000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--gemma-shapes", default="",
                    help="bits (e.g. 2 or 2,4): also time quantize_weight_e8p on the 7 linear shapes of one Gemma 3 "
                         "270M decoder layer (synthetic Hessian; CPU time and wall time) and extrapolate to 18 layers")
    args = ap.parse_args()
    if args.gemma_shapes:
        return gemma_shapes(args)
    import numba

    from hadakit.formats.lattice import GAUSSIAN_SCALES, PARALLEL_MIN_VECTORS, E8P12Codebook

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cb = E8P12Codebook()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(max(args.n_torch, args.n_numba), 8, generator=g, dtype=torch.float64) / GAUSSIAN_SCALES[2][0]
    xt, xn = x[:args.n_torch].contiguous(), x[:args.n_numba].contiguous()
    cb.quantize(x[:100], method="numba")                        # compile (serial kernel)
    cb.quantize(x[:PARALLEL_MIN_VECTORS], method="numba")       # compile (parallel kernel)
    assert torch.equal(cb.quantize(xt, method="torch"), cb.quantize(xt, method="numba")), "codes differ"
    load0 = os.getloadavg()
    rows = []

    def add(name, n, fn, floor_x):
        t = best_time(fn, args.reps)
        tf = best_time(lambda: floor_x.clone(), 50)
        rows.append(dict(name=name, vectors=n, seconds=t, vectors_per_s=n / t, floor_copy_s=tf,
                         ratio_to_floor=t / tf))
        print(f"{name:40s} {n / t:12.0f} vec/s  ({t / tf:8.0f}× a copy of the input)", flush=True)

    add("torch reference (chunk 512)", args.n_torch, lambda: cb.quantize(xt, method="torch"), xt)
    add(f"numba, one call ({numba.get_num_threads()} thread(s) max)", args.n_numba,
        lambda: cb.quantize(xn, method="numba"), xn)
    for m in (640, 2048):
        blocks = [x[i * m:(i + 1) * m].contiguous() for i in range(min(40, args.n_numba // m))]
        nb = sum(b.shape[0] for b in blocks)
        cat = torch.cat(blocks)
        add(f"numba, BlockLDLQ pattern ({m} rows/call)", nb, lambda: [cb.quantize(b, method="numba") for b in blocks],
            cat)
        nbt = min(len(blocks), max(1, args.n_torch // m))
        add(f"torch, BlockLDLQ pattern ({m} rows/call)", nbt * m,
            lambda: [cb.quantize(b, method="torch") for b in blocks[:nbt]], torch.cat(blocks[:nbt]))
    speedup = rows[1]["vectors_per_s"] / rows[0]["vectors_per_s"]
    res = dict(device=cpu_name(), torch_threads=torch.get_num_threads(), numba_threads=numba.get_num_threads(),
               numba_threading_layer=numba.threading_layer(), load_avg_start=load0, load_avg_end=os.getloadavg(),
               rows=rows, speedup_numba_vs_torch=speedup,
               speedup_blockldlq_pattern={m: next(r for r in rows if r["name"].startswith("numba, BlockLDLQ")
                                                  and f"({m} " in r["name"])["vectors_per_s"]
                                          / next(r for r in rows if r["name"].startswith("torch, BlockLDLQ")
                                                 and f"({m} " in r["name"])["vectors_per_s"] for m in (640, 2048)})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "e8p_search-cpu.json").write_text(json.dumps(res, indent=1))
    lines = ["# E8P12 nearest search: torch reference vs compiled (numba) scan\n",
             f"Device: {res['device']}; torch threads {res['torch_threads']}, numba threads {res['numba_threads']} "
             f"({res['numba_threading_layer']}). **Shared, loaded machine**: load average {load0[0]:.1f} at the "
             f"start, {res['load_avg_end'][0]:.1f} at the end; times are this process's CPU seconds (time.process_time, "
             f"min over {args.reps} repetitions; min over 50 for the floor), since wall time mostly measured the wait "
             "for a core. Floor: a float64 copy of the same input, timed in the same run. Both methods give the same codes (checked).\n",
             "| path | vectors | vectors/s | × floor (copy of the input) |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['vectors']} | {r['vectors_per_s']:,.0f} | {r['ratio_to_floor']:,.0f}× |")
    lines.append(f"\nSpeed-up numba / torch: {speedup:.0f}× (one large call), "
                 + ", ".join(f"{v:.0f}× ({m} rows per call)" for m, v in res["speedup_blockldlq_pattern"].items())
                 + ".")
    (out / "e8p_search-cpu.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 3.2))
        ax.barh([r["name"] for r in rows], [r["vectors_per_s"] for r in rows],
                color=["C1" if r["name"].startswith("torch") else "C0" for r in rows])
        ax.set_xscale("log")
        ax.set_xlabel("8-vectors / s (log)")
        ax.set_title(f"E8P12 nearest search, {res['device'][:40]} (loaded)", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "e8p_search-cpu.png", dpi=110)
    except ImportError:
        print("matplotlib missing: no plot")
    print("\n".join(lines))


GEMMA_LAYER = {"q_proj": (1024, 640), "k_proj": (256, 640), "v_proj": (256, 640), "o_proj": (640, 1024),
               "gate_proj": (2048, 640), "up_proj": (2048, 640), "down_proj": (640, 2048)}


def gemma_shapes(args) -> None:
    """CPU seconds (``time.process_time``, this process only — the fair figure on a loaded machine) and wall seconds
    of ``quantize_weight_e8p`` per Gemma 3 270M linear shape; × 18 layers = the whole model's per-linear work
    (without capturing calibration inputs and replaying layers, which the sequential loop adds)."""
    from hadakit.quantization.ldlq import quantize_weight_e8p

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    quantize_weight_e8p(torch.randn(16, 64, dtype=torch.float64), torch.eye(64, dtype=torch.float64), 2)  # compile
    res = dict(device=cpu_name(), load_avg_start=os.getloadavg(), rows=[])
    for bits in (int(b) for b in args.gemma_shapes.split(",")):
        tot_cpu = tot_wall = 0.0
        for name, (m, n) in GEMMA_LAYER.items():
            W = torch.randn(m, n, generator=g, dtype=torch.float64) * 0.02
            X = torch.randn(2048, n, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, n, dtype=torch.float64)
            H = X.T @ X / X.shape[0]
            c0, w0 = time.process_time(), time.perf_counter()
            quantize_weight_e8p(W, H, bits, seed=1)
            c, w = time.process_time() - c0, time.perf_counter() - w0
            tot_cpu, tot_wall = tot_cpu + c, tot_wall + w
            res["rows"].append(dict(bits=bits, linear=name, shape=[m, n], cpu_s=c, wall_s=w))
            print(f"{bits} bits {name} {m}x{n}: cpu {c:.2f}s wall {w:.2f}s", flush=True)
        res[f"layer_cpu_s_{bits}"], res[f"layer_wall_s_{bits}"] = tot_cpu, tot_wall
        res[f"model18_cpu_min_{bits}"] = 18 * tot_cpu / 60
        print(f"{bits} bits: one layer cpu {tot_cpu:.1f}s (wall {tot_wall:.1f}s) -> 18 layers {18 * tot_cpu / 60:.1f} "
              f"CPU-min", flush=True)
    res["load_avg_end"] = os.getloadavg()
    (out / "e8p_gemma_shapes-cpu.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
