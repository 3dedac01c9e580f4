"""Peak RSS and wall time of quantizing synthetic models in memory vs layer-streamed from disk (hadakit.io.streaming).

Every run is a child process; its peak resident memory is its own ``VmHWM`` (``/proc/self/status``; ``ru_maxrss`` would start at the launching
process's peak). The floor
of each model is a child that only imports the stack and reads every tensor of the shards into float32 (the least
any quantizer must do); every wall time is given with its ratio to that floor. GPTQ is measured on a model of the
same width with only ``--gptq-layers`` layers (GPTQ's time and memory per layer do not depend on the depth) and its
full-depth time is extrapolated, labelled as such. Random weights: memory and time only, never accuracy.

    OMP_NUM_THREADS=1 python benchmarks/bench_scale.py --sizes 300MB 1.5GB --out benchmarks/results/scale
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import asdict
from pathlib import Path

from hadakit.devices import cpu_name

_CHILD = textwrap.dedent("""
    import json, sys, time

    def hwm_mb():  # the child's own peak (VmHWM): ru_maxrss would start at the launcher's peak, which survives exec
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    mode, model_dir, out, recipe, n_windows, window = sys.argv[1:7]
    import torch
    from pathlib import Path
    t0 = time.perf_counter()
    calib = torch.randint(0, 1000, (int(n_windows), int(window)), generator=torch.Generator().manual_seed(0))
    if mode == "floor":
        from hadakit.io.streaming import ShardReader
        r = ShardReader(model_dir)
        n = 0
        for k in list(r.weight_map):
            n += r.get(k).float().numel()
            r.close()
    elif mode == "stream":
        from hadakit.io.streaming import stream_quantize
        stream_quantize(model_dir, recipe, out, calib=calib)
    else:
        from hadakit.io.checkpoint import save_quantized_model
        from hadakit.io.loading import load_model
        from hadakit.quantization.pipeline import quantize_model
        from hadakit.quantization.recipes import get_recipe
        model, tok = load_model(Path(model_dir), materialize=True)
        rec = get_recipe(recipe)
        quantize_model(model, rec, calib=calib if rec.linears_need_calibration else None, keep_dense=False)
        save_quantized_model(model, tok, rec, out)
    print(json.dumps(dict(wall_s=time.perf_counter() - t0,
                          peak_rss_mb=hwm_mb())))
""")


def _child(mode: str, model_dir: Path, out: Path, recipe: str, n_windows: int, window: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    res = subprocess.run([sys.executable, "-c", _CHILD, mode, str(model_dir), str(out), recipe, str(n_windows),
                          str(window)], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if res.returncode != 0:
        raise RuntimeError(f"{mode} {recipe} failed:\n{res.stderr[-3000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(res.stdout.strip().splitlines()[-1])




def main(argv: list[str] | None = None) -> int:
    from hadakit.io.synthetic import SyntheticDims, choose_dims, write_synthetic_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["300MB", "1.5GB"])
    p.add_argument("--gptq-layers", type=int, default=2)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--window-len", type=int, default=128)
    p.add_argument("--out", default="benchmarks/results/scale")
    p.add_argument("--tmp", default=None, help="where the synthetic models are written (default: a temp dir)")
    args = p.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.tmp or tempfile.mkdtemp(prefix="hadakit-scale-"))
    rows = []
    rtn, gptq = "w4a16_g128:none:rtn", "w4a16_g128:none:gptq"
    try:
        for size in args.sizes:
            dims = choose_dims("llama", size)
            full = write_synthetic_model(tmp / "full", arch="llama", size=dims, shard_size="500MB", force=True)
            print(f"{size}: {dims} ({full.tensor_bytes / 1e9:.2f} GB bf16)", file=sys.stderr, flush=True)
            floor = _child("floor", full.path, tmp / "o", rtn, 1, 1)
            base = dict(size=size, dims=asdict(dims), bf16_gb=full.tensor_bytes / 1e9, layers=dims.layers,
                        floor_s=floor["wall_s"], floor_rss_mb=floor["peak_rss_mb"])
            for mode in ("memory", "stream"):
                r = _child(mode, full.path, tmp / "o", rtn, args.windows, args.window_len)
                rows.append(dict(base, recipe=rtn, mode=mode, measured_layers=dims.layers, **r,
                                 ratio_to_floor=r["wall_s"] / floor["wall_s"], extrapolated=False))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            shutil.rmtree(full.path)
            few = SyntheticDims(**{**asdict(dims), "layers": args.gptq_layers})
            part = write_synthetic_model(tmp / "few", arch="llama", size=few, shard_size="500MB", force=True)
            pfloor = _child("floor", part.path, tmp / "o", rtn, 1, 1)
            for mode in ("memory", "stream"):
                r = _child(mode, part.path, tmp / "o", gptq, args.windows, args.window_len)
                per_layer = (r["wall_s"] - pfloor["wall_s"]) / args.gptq_layers
                est = floor["wall_s"] + per_layer * dims.layers
                rows.append(dict(base, recipe=gptq, mode=mode, measured_layers=args.gptq_layers, **r,
                                 ratio_to_floor=r["wall_s"] / pfloor["wall_s"], extrapolated=False,
                                 full_depth_wall_s_extrapolated=est))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            shutil.rmtree(part.path)
    finally:
        if args.tmp is None:
            shutil.rmtree(tmp, ignore_errors=True)
    meta = dict(cpu=cpu_name(), cores=os.cpu_count(), omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
                python=platform.python_version(), calib=f"{args.windows} windows x {args.window_len} tokens",
                note="shared 2-core machine: timings are noisy; random synthetic weights (memory/time only)",
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    (out_dir / "scale.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
    lines = ["| model (bf16) | layers | recipe | mode | layers run | peak RSS MB | wall s | x floor | full-depth s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ext = f"{r['full_depth_wall_s_extrapolated']:.0f} (extrapolated)" if "full_depth_wall_s_extrapolated" in r \
            else f"{r['wall_s']:.0f}"
        lines.append(f"| {r['bf16_gb']:.2f} GB | {r['layers']} | {r['recipe']} | {r['mode']} | "
                     f"{r['measured_layers']} | {r['peak_rss_mb']:.0f} | {r['wall_s']:.1f} | "
                     f"{r['ratio_to_floor']:.1f} | {ext} |")
    floors = {r["size"]: (r["floor_s"], r["floor_rss_mb"]) for r in rows}
    lines += ["", "Floor (read every tensor into float32, one at a time): " + "; ".join(
        f"{k}: {s:.1f} s, {m:.0f} MB" for k, (s, m) in floors.items()), "",
        f"CPU: {meta['cpu']} ({meta['cores']} cores, OMP_NUM_THREADS={meta['omp_num_threads']}); {meta['note']}."]
    (out_dir / "scale.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for recipe, marker in ((rtn, "o"), (gptq, "s")):
            for mode, color in (("memory", "tab:red"), ("stream", "tab:blue")):
                pts = [(r["bf16_gb"], r["peak_rss_mb"]) for r in rows if r["recipe"] == recipe and r["mode"] == mode]
                if pts:
                    ax.plot(*zip(*pts), marker=marker, color=color, label=f"{recipe.split(':')[2]} {mode}"
                            + (f" ({args.gptq_layers} layers)" if recipe == gptq else ""))
        ax.set_xlabel("synthetic llama model size (GB, bf16)")
        ax.set_ylabel("peak RSS (MB)")
        ax.set_title(f"hadakit quantize: in memory vs streamed ({meta['cpu']})", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "scale.png", dpi=120)
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
