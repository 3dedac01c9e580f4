"""INT4 training (Xi et al. 2023, recipe ``int4_xi``) vs bf16 vs naive per-tensor INT4 on the Shakespeare demo.

    OMP_NUM_THREADS=1 python benchmarks/training_int4.py --seeds 0,1,2 --steps 300 --out docs/results/training_int4

Runs :func:`hadakit.training.demo.run_demo` (the demo's model, data, step budget and seeding; ``--seed`` sets the
initialization and batch order, the SR / sampling stream is ``seed + 1``) once per seed with the recipes ``bf16``,
``int4_xi`` and ``int4_naive``, and writes ``int4_<device>.json`` (every run's curves and final validation loss,
per-recipe mean / std / min / max, gap to bf16 per seed), ``int4_<device>.md`` (the table) and ``int4_<device>.png``
(validation curves of every run, smoothed training curves of seed 0) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from hadakit.devices import device_name, resolve_device, slug
from hadakit.training.demo import _ema, run_demo
from hadakit.devices import cpu_name

RECIPES = ("bf16", "int4_xi", "int4_naive")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="docs/results/training_int4")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    dev = resolve_device("cpu")
    runs = {}
    t0 = time.perf_counter()
    for seed in seeds:
        print(f"=== seed {seed} ===", flush=True)
        res = run_demo(recipes, steps=args.steps, out=None, device="cpu", threads=args.threads, seed=seed,
                       log=lambda m: print(m, flush=True))
        runs[seed] = res
    total = time.perf_counter() - t0
    summary = {}
    for r in recipes:
        vals = [runs[s]["recipes"][r]["val_loss"] for s in seeds]
        gaps = [100.0 * (runs[s]["recipes"][r]["val_loss"] - runs[s]["recipes"]["bf16"]["val_loss"])
                / runs[s]["recipes"]["bf16"]["val_loss"] for s in seeds] if "bf16" in recipes else None
        summary[r] = {"val_loss": vals, "mean": statistics.fmean(vals),
                      "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "min": min(vals), "max": max(vals),
                      "gap_to_bf16_percent": gaps,
                      "mean_gap_to_bf16_percent": statistics.fmean(gaps) if gaps else None,
                      "seconds_per_step": statistics.fmean(runs[s]["recipes"][r]["seconds_per_step"] for s in seeds)}
    dname = device_name(dev)
    cpu = cpu_name()
    cfg = runs[seeds[0]]["config"]
    result = {"device": dname, "cpu_model": cpu, "torch": torch.__version__, "threads": args.threads,
              "seeds": seeds, "steps": args.steps, "config": {k: v for k, v in cfg.items() if k != "seed"},
              "command": "OMP_NUM_THREADS=1 python benchmarks/training_int4.py " + " ".join(argv or sys.argv[1:]),
              "total_seconds": total, "summary": summary,
              "recipes": {r: runs[seeds[0]]["recipes"][r]["recipe"] for r in recipes},
              "runs": {str(s): {r: {k: runs[s]["recipes"][r][k] for k in ("val_loss", "train_curve", "val_curve",
                                                                           "seconds_per_step")}
                                for r in recipes} for s in seeds},
              "note": "shared 2-core machine; s/step is emulation cost and noisy (other jobs running)"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"int4_{slug(dname)}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# INT4 training (Xi et al. 2023) on the Shakespeare char-GPT demo — {cpu}, {args.threads} thread(s)",
             "", f"Command: `{result['command']}` ({total / 60:.1f} min in all). Demo config: {cfg['n_layer']} "
             f"layers, d={cfg['d_model']}, {args.steps} steps of {cfg['batch']}x{cfg['context']} tokens, "
             f"validation on {cfg['val_play']} ({cfg['final_eval_windows']} windows). Seeds {seeds} (init + batch "
             f"order; SR / sampling stream seed+1).", "",
             "| recipe | final val loss per seed | mean ± std | gap to bf16 per seed | mean gap | s/step |",
             "|---|---|---:|---|---:|---:|"]
    for r in recipes:
        s = summary[r]
        per = ", ".join(f"{v:.4f}" for v in s["val_loss"])
        gaps = ", ".join(f"{g:+.2f}%" for g in s["gap_to_bf16_percent"]) if s["gap_to_bf16_percent"] else "—"
        mg = f"{s['mean_gap_to_bf16_percent']:+.2f}%" if s["mean_gap_to_bf16_percent"] is not None else "—"
        lines.append(f"| `{r}` | {per} | {s['mean']:.4f} ± {s['std']:.4f} | {gaps} | {mg} | "
                     f"{s['seconds_per_step']:.2f} |")
    lines += ["", "s/step: emulated (fake-quantized fp32) cost on a shared, loaded CPU; not a speed claim.", ""]
    (out / f"{stem}.md").write_text("\n".join(lines))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 5))
        colors = {r: f"C{i}" for i, r in enumerate(recipes)}
        for r in recipes:
            tc = runs[seeds[0]]["recipes"][r]["train_curve"]
            a1.plot(range(1, len(tc) + 1), _ema(tc), color=colors[r], label=f"{r} (seed {seeds[0]})", lw=1.2)
            for i, s in enumerate(seeds):
                vc = runs[s]["recipes"][r]["val_curve"]
                if vc:
                    st, v = zip(*vc)
                    a2.plot(st, v, marker="o", ms=3, color=colors[r], alpha=0.8, lw=1,
                            label=f"{r}: {summary[r]['mean']:.4f} ± {summary[r]['std']:.4f}" if i == 0 else None)
        a1.set(xlabel="step", ylabel="training loss (EMA 0.9)", title="training loss")
        a2.set(xlabel="step", ylabel=f"validation loss ({cfg['val_play']})",
               title=f"validation loss, seeds {seeds} (legend: final mean ± std)")
        for a in (a1, a2):
            a.grid(alpha=0.3)
            a.legend(fontsize=8)
        fig.suptitle(f"char-GPT on Shakespeare, {args.steps} steps — {cpu}, {args.threads} thread(s)", fontsize=10)
        fig.tight_layout()
        fig.savefig(out / f"{stem}.png", dpi=110)
        plt.close(fig)
    except ImportError:  # pragma: no cover
        pass
    print("\n".join(lines))
    print(f"wrote {out / stem}.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
