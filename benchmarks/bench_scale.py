"""Peak RSS and wall time of quantizing synthetic models in memory vs layer-streamed from disk (hadakit.io.streaming).

Every run is a child process; its peak resident memory is its own ``VmHWM`` (``/proc/self/status``; ``ru_maxrss``
would start at the launching process's peak, which survives exec). The floor of each model is a child that only
imports the stack and reads every tensor of the shards into float32 (the least any quantizer must do); every wall
time is given with its ratio to that floor. ``import`` is a child that only imports the stack (the runtime's own
resident memory). The in-memory path runs only for models whose float32 copy fits ``--in-memory-up-to``; the
streamed path runs with ``--max-memory``. GPTQ (and a second RTN run, for the depth checks) is measured on a model of
the same width with only ``--gptq-layers`` layers (time and memory per layer do not depend on the depth) and its
full-depth time is extrapolated, labelled as such. Random weights: memory and time only, never accuracy.

Results are rewritten after every size and merged with the rows of sizes not rerun (``--merge``). Each streamed
child writes a per-layer trace (elapsed time, VmRSS, VmHWM) to a log next to its model in ``--tmp``; a run that did
not finish (out of time, or killed) is added from that trace with ``--partial-trace`` as a row labelled partial,
its full-depth time extrapolated from its per-layer time.

    OMP_NUM_THREADS=1 python benchmarks/bench_scale.py --sizes 300MB 1.5GB 6GB 12GB --out benchmarks/results/scale
    python benchmarks/bench_scale.py --sizes 12GB --partial-trace TMP/full-stream-w4a16_g128_none_rtn.log \
        --floor-s 639 --import-rss-mb 368 --merge --out benchmarks/results/scale
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
    mode, model_dir, out, recipe, n_windows, window, max_memory = sys.argv[1:8]
    import torch
    from pathlib import Path
    t0 = time.perf_counter()
    calib = torch.randint(0, 1000, (int(n_windows), int(window)), generator=torch.Generator().manual_seed(0))
    if mode == "import":
        import hadakit.io.streaming, hadakit.io.loading, hadakit.quantization.pipeline
    elif mode == "floor":
        from hadakit.io.streaming import ShardReader
        r = ShardReader(model_dir)
        n = 0
        for k in list(r.weight_map):
            n += r.get(k).float().numel()
            r.close()
    elif mode == "stream":
        from hadakit.io.streaming import stream_quantize
        from hadakit.quantization.recipes import get_recipe
        rec = get_recipe(recipe)
        def trace(msg):  # one line per layer on stderr (the run's log): elapsed time, resident memory now and peak
            rss = [l for l in open("/proc/self/status") if l.startswith("VmRSS:")][0].split()[1]
            print(json.dumps(dict(t=round(time.perf_counter() - t0, 1), msg=msg, rss_mb=int(rss) // 1024,
                                  hwm_mb=round(hwm_mb()))), file=sys.stderr, flush=True)
        stream_quantize(model_dir, rec, out, calib=calib if rec.linears_need_calibration else None,
                        max_memory=int(max_memory) if int(max_memory) > 0 else None, progress=trace)
    else:
        from hadakit.io.checkpoint import save_quantized_model
        from hadakit.io.loading import load_model
        from hadakit.quantization.pipeline import quantize_model
        from hadakit.quantization.recipes import get_recipe
        model, tok = load_model(Path(model_dir), materialize=True)
        rec = get_recipe(recipe)
        quantize_model(model, rec, calib=calib if rec.linears_need_calibration else None, keep_dense=False)
        save_quantized_model(model, tok, rec, out)
    print(json.dumps(dict(wall_s=time.perf_counter() - t0, peak_rss_mb=hwm_mb())))
""")


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def _child(mode: str, model_dir: Path, out: Path, recipe: str, n_windows: int, window: int,
           max_memory: int = 0, threads: int = 1) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    log = out.parent / f"{model_dir.name}-{mode}-{recipe.replace(':', '_')}.log"  # the child's stderr (its trace)
    with open(log, "w") as err:
        res = subprocess.run([sys.executable, "-c", _CHILD, mode, str(model_dir), str(out), recipe, str(n_windows),
                              str(window), str(max_memory)], stdout=subprocess.PIPE, stderr=err, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if res.returncode != 0:
        raise RuntimeError(f"{mode} {recipe} failed (exit {res.returncode}; a negative one is a signal, -9 e.g. "
                           f"the OOM killer):\n{log.read_text()[-3000:]}")
    r = json.loads(res.stdout.strip().splitlines()[-1])
    r["bytes_written"] = _dir_bytes(out)
    shutil.rmtree(out, ignore_errors=True)
    return r


def _goal(model_dir: Path, recipe: str, n_windows: int, window: int) -> dict:
    """The issue's goal in MB: 3 x the largest layer in fp32 + the non-layer parameters + one layer's calibration
    activations (hadakit.io.streaming.estimate_stream_memory's parts; the GPTQ Hessian is listed on its own)."""
    from hadakit.io.streaming import estimate_stream_memory

    e = estimate_stream_memory(model_dir, recipe, n_windows, window)
    return dict(goal_mb=(e["layer"] + e["non_layer"] + e["activations"]) / 2**20, hessian_mb=e["hessian"] / 2**20,
                estimate_mb=e["total"] / 2**20)


def _reused(path: Path, dims):
    """The synthetic model at ``path`` if it exists with ``dims`` (bf16, llama), else None."""
    from hadakit.io.synthetic import SYNTHETIC_MARKER, SyntheticModel

    try:
        d = json.loads((path / SYNTHETIC_MARKER).read_text())
    except (OSError, ValueError):
        return None
    if d.get("arch") != "llama" or d.get("dtype") != "bfloat16" or d.get("dims") != asdict(dims):
        return None
    return SyntheticModel(path=path, arch="llama", dims=dims, dtype="bfloat16", seed=d["seed"],
                          tie_embeddings=d["tie_embeddings"], parameter_count=d["parameter_count"],
                          tensor_bytes=d["tensor_bytes"], bytes_written=0, shard_count=d["shard_count"],
                          tokenizer=d["tokenizer"])


def partial_row(size: str, trace: Path, floor_s: float, import_rss_mb: float, windows: int, window: int) -> dict:
    """A row from the per-layer trace of a streamed RTN run that did not finish (killed, or out of time): the layers
    it completed, its peak RSS so far (VmHWM), its time so far, and the full-depth time extrapolated from its
    per-layer time; labelled ``partial``. ``floor_s``: the floor's time for the ratio (measured separately)."""
    from hadakit.io.synthetic import SyntheticDims, choose_dims

    dims = choose_dims("llama", size)
    events = [json.loads(line) for line in trace.read_text().splitlines() if line.startswith("{")]
    done = [e for e in events if "quantized and written" in e["msg"]]
    if not done:
        raise ValueError(f"{trace}: no layer finished yet")
    k = [int(e["msg"].split()[1].split("/")[0]) for e in done]  # "layer K/N quantized and written"
    # per-layer time between the first and last layer traced (the first layer also loads the embedding and head)
    per_layer = (done[-1]["t"] - done[0]["t"]) / max(1, k[-1] - k[0])
    bf16 = sum(f.stat().st_size for f in trace.parent.glob("full/*.safetensors")) or None
    from hadakit.io.synthetic import parameter_count

    bf16_gb = (bf16 or parameter_count("llama", dims, False) * 2) / 1e9
    parts = sum(f.stat().st_size for f in trace.parent.glob(".o.tmp-*/.parts/*.safetensors")) or None  # None: gone
    row = dict(size=size, dims=asdict(dims), bf16_gb=bf16_gb, layers=dims.layers, floor_s=floor_s,
               floor_rss_mb=float("nan"), import_rss_mb=import_rss_mb, recipe="w4a16_g128:none:rtn", mode="stream",
               measured_layers=k[-1], wall_s=done[-1]["t"], peak_rss_mb=max(e["hwm_mb"] for e in events),
               bytes_written=parts, ratio_to_floor=float("nan"), extrapolated=True, partial=True,
               per_layer_s=per_layer, per_layer_rss_mb=[e["rss_mb"] for e in done],
               per_layer_hwm_mb=[e["hwm_mb"] for e in done], per_layer_t=[e["t"] for e in done],
               full_depth_wall_s_extrapolated=done[-1]["t"] + per_layer * (dims.layers - k[-1]))
    if floor_s > 0:
        row["ratio_to_floor"] = row["full_depth_wall_s_extrapolated"] / floor_s
    if trace.parent.joinpath("full", "config.json").is_file():
        row.update(_goal(trace.parent / "full", "w4a16_g128:none:rtn", windows, window))
    else:  # the model was deleted: the same parts from the dims (untied llama, RTN: no activations, no Hessian)
        per_layer = parameter_count("llama", SyntheticDims(**{**asdict(dims), "layers": 2}), False) - \
            parameter_count("llama", SyntheticDims(**{**asdict(dims), "layers": 1}), False)
        non_layer = parameter_count("llama", dims, False) - dims.layers * per_layer
        goal = (3 * per_layer + non_layer) * 4 / 2**20
        row.update(goal_mb=goal, hessian_mb=0.0, estimate_mb=goal)
    return row


def _gb(size: str) -> float:
    from hadakit.io.synthetic import parse_size

    return parse_size(size) / 1e9


def _render(out_dir: Path, meta: dict, rows: list[dict], gptq_layers: int) -> list[str]:
    (out_dir / "scale.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
    lines = ["| model (bf16) | layers | recipe | mode | layers run | peak RSS MB | goal MB | runtime MB | goal met | "
             "wall s | x floor | full-depth s | MB written |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ext = f"{r['full_depth_wall_s_extrapolated']:.0f} (extrapolated)" if "full_depth_wall_s_extrapolated" in r \
            else f"{r['wall_s']:.0f}"
        if r.get("partial"):
            ext += f" (partial: {r['measured_layers']} of {r['layers']} layers done)"
        goal = r["goal_mb"] + (r["hessian_mb"] if "gptq" in r["recipe"] else 0)
        met = "yes" if r["peak_rss_mb"] <= goal + r["import_rss_mb"] else "no"
        lines.append(f"| {r['bf16_gb']:.2f} GB | {r['layers']} | {r['recipe']} | {r['mode']} | "
                     f"{r['measured_layers']} | {r['peak_rss_mb']:.0f} | {goal:.0f} | {r['import_rss_mb']:.0f} | {met} "
                     f"| {r['wall_s']:.1f} | {r['ratio_to_floor']:.1f} | {ext} | "
                     f"{'n/a' if r['bytes_written'] is None else format(r['bytes_written'] / 1e6, '.0f')} |")
    floors = {r["size"]: (r["floor_s"], r["floor_rss_mb"]) for r in rows
              if r["measured_layers"] == r["layers"] and not r.get("partial")}
    lines += ["", "Floor (read every tensor into float32, one at a time): " + "; ".join(
        f"{k}: {s:.1f} s, {m:.0f} MB" for k, (s, m) in floors.items()), "",
        "goal MB: the issue's bound, 3 x the largest decoder layer in fp32 + embedding/norm/head in fp32 + one layer's "
        "calibration activations (inputs and outputs), plus the float64 Hessian of the widest input for GPTQ; "
        "runtime MB: the resident memory of a child that only imports torch/transformers/hadakit; goal met: peak RSS "
        "<= goal + runtime.", "",
        f"CPU: {meta['cpu']} ({meta['cores']} cores, OMP_NUM_THREADS={meta['omp_num_threads']} in every child); "
        f"{meta['note']}."]
    (out_dir / "scale.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for recipe, marker in (("rtn", "o"), ("gptq", "s")):
            for mode, color in (("memory", "tab:red"), ("stream", "tab:blue")):
                pts = sorted((r["bf16_gb"], r["peak_rss_mb"]) for r in rows if r["recipe"].endswith(recipe)
                             and r["mode"] == mode and r["measured_layers"] == (r["layers"] if recipe == "rtn"
                                                                                  else gptq_layers))
                if pts:
                    ax.plot(*zip(*pts), marker=marker, color=color, label=f"{recipe} {mode}"
                            + (f" ({gptq_layers} layers)" if recipe == "gptq" else ""))
        part = [(r["bf16_gb"], r["peak_rss_mb"]) for r in rows if r.get("partial")]
        if part:
            ax.plot(*zip(*part), "o", mfc="none", color="tab:blue", label="rtn stream, partial run (killed)")
        pts = sorted({(r["bf16_gb"], r["goal_mb"] + r["import_rss_mb"]) for r in rows})
        ax.plot(*zip(*pts), ls="--", color="gray", label="goal (RTN) + runtime")
        ax.set_xlabel("synthetic llama model size (GB, bf16)")
        ax.set_ylabel("peak RSS (MB)")
        ax.set_title(f"hadakit quantize: in memory vs streamed ({meta['cpu']})", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "scale.png", dpi=120)
        plt.close(fig)
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
    return lines


def main(argv: list[str] | None = None) -> int:
    from hadakit.io.synthetic import SyntheticDims, choose_dims, parse_size, write_synthetic_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["300MB", "1.5GB"])
    p.add_argument("--gptq-layers", type=int, default=2)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--window-len", type=int, default=128)
    p.add_argument("--max-memory", default="6GB", help="--max-memory of every streamed run (default 6GB)")
    p.add_argument("--in-memory-up-to", default="2GB",
                   help="run the in-memory path only for models of at most this many bf16 bytes (default 2GB: its "
                        "float32 copy and the quantized copy must fit the shared machine)")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the quantizing children (default 1)")
    p.add_argument("--reuse", action="store_true", help="keep a synthetic model already in --tmp with the same dims")
    p.add_argument("--partial-trace", default=None, help="instead of running: add the row of an unfinished streamed "
                   "RTN run of --sizes SIZE from its trace log (in --tmp, next to its model) and re-render")
    p.add_argument("--floor-s", type=float, default=0.0, help="with --partial-trace: the floor's time for the ratio")
    p.add_argument("--import-rss-mb", type=float, default=0.0, help="with --partial-trace: the runtime's RSS")
    p.add_argument("--merge", action="store_true", help="keep the rows of sizes not rerun from OUT/scale.json")
    p.add_argument("--out", default="benchmarks/results/scale")
    p.add_argument("--tmp", default=None, help="where the synthetic models are written (default: a temp dir)")
    args = p.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.tmp or tempfile.mkdtemp(prefix="hadakit-scale-"))
    tmp.mkdir(parents=True, exist_ok=True)
    max_memory = parse_size(args.max_memory, "--max-memory")
    memory_limit = parse_size(args.in_memory_up_to, "--in-memory-up-to")
    rows: list[dict] = []
    if args.merge and (out_dir / "scale.json").is_file():
        rows = [r for r in json.loads((out_dir / "scale.json").read_text())["rows"]
                if r["size"] not in args.sizes and "goal_mb" in r]
    rtn, gptq = "w4a16_g128:none:rtn", "w4a16_g128:none:gptq"
    meta = dict(cpu=cpu_name(), cores=os.cpu_count(), omp_num_threads=args.threads,
                python=platform.python_version(), calib=f"{args.windows} windows x {args.window_len} tokens",
                max_memory=args.max_memory,
                note="shared 2-core machine loaded by other engineers' jobs: timings are noisy; random synthetic "
                     "weights (memory/time only)",
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    if args.partial_trace:
        (size,) = args.sizes
        rows = [r for r in rows if r["size"] != size] + [partial_row(size, Path(args.partial_trace), args.floor_s,
                                                                    args.import_rss_mb, args.windows,
                                                                    args.window_len)]
        rows.sort(key=lambda x: x["bf16_gb"])
        print("\n".join(_render(out_dir, meta, rows, args.gptq_layers)))
        return 0
    imp = _child("import", tmp, tmp / "o", rtn, 1, 1)
    try:
        for size in args.sizes:
            dims = choose_dims("llama", size)
            t = time.perf_counter()
            full = _reused(tmp / "full", dims) if args.reuse else None
            full = full or write_synthetic_model(tmp / "full", arch="llama", size=dims, shard_size="2GB", force=True)
            write_s = time.perf_counter() - t
            print(f"{size}: {dims} ({full.tensor_bytes / 1e9:.2f} GB bf16, written in {write_s:.0f} s)",
                  file=sys.stderr, flush=True)
            floor = _child("floor", full.path, tmp / "o", rtn, 1, 1, threads=args.threads)
            base = dict(size=size, dims=asdict(dims), bf16_gb=full.tensor_bytes / 1e9, layers=dims.layers,
                        floor_s=floor["wall_s"], floor_rss_mb=floor["peak_rss_mb"], import_rss_mb=imp["peak_rss_mb"],
                        synthetic_write_s=write_s, **_goal(full.path, rtn, args.windows, args.window_len))
            modes = ("memory", "stream") if full.tensor_bytes <= memory_limit else ("stream",)
            new = []
            for mode in modes:
                r = _child(mode, full.path, tmp / "o", rtn, args.windows, args.window_len, max_memory,
                           args.threads)
                new.append(dict(base, recipe=rtn, mode=mode, measured_layers=dims.layers, **r,
                                ratio_to_floor=r["wall_s"] / floor["wall_s"], extrapolated=False))
                print(json.dumps(new[-1]), file=sys.stderr, flush=True)
            shutil.rmtree(full.path)
            few = SyntheticDims(**{**asdict(dims), "layers": args.gptq_layers})
            part = write_synthetic_model(tmp / "few", arch="llama", size=few, shard_size="2GB", force=True)
            pfloor = _child("floor", part.path, tmp / "o", rtn, 1, 1, threads=args.threads)
            pbase = dict(base, floor_s=pfloor["wall_s"], floor_rss_mb=pfloor["peak_rss_mb"],
                         **_goal(part.path, gptq, args.windows, args.window_len))
            r = _child("stream", part.path, tmp / "o", rtn, args.windows, args.window_len, max_memory, args.threads)
            new.append(dict(pbase, recipe=rtn, mode="stream", measured_layers=args.gptq_layers, **r,
                            ratio_to_floor=r["wall_s"] / pfloor["wall_s"], extrapolated=False))
            for mode in ("memory", "stream") if part.tensor_bytes <= memory_limit else ("stream",):
                r = _child(mode, part.path, tmp / "o", gptq, args.windows, args.window_len,
                           max_memory if mode == "stream" else 0, args.threads)
                per_layer = (r["wall_s"] - pfloor["wall_s"]) / args.gptq_layers
                est = floor["wall_s"] + per_layer * dims.layers
                new.append(dict(pbase, recipe=gptq, mode=mode, measured_layers=args.gptq_layers, **r,
                                ratio_to_floor=r["wall_s"] / pfloor["wall_s"], extrapolated=False,
                                full_depth_wall_s_extrapolated=est))
                print(json.dumps(new[-1]), file=sys.stderr, flush=True)
            shutil.rmtree(part.path)
            rows = [x for x in rows if x["size"] != size] + new
            rows.sort(key=lambda x: x["bf16_gb"])
            lines = _render(out_dir, meta, rows, args.gptq_layers)
    finally:
        if args.tmp is None:
            shutil.rmtree(tmp, ignore_errors=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
