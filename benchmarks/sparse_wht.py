"""Acceptance benchmark of hadakit.transforms.sparse_wht (SPRIGHT), hadakit issue #22 item 3.

Run (one thread, as every benchmark on the shared machine):

    OMP_NUM_THREADS=1 python benchmarks/sparse_wht.py --out docs/results/sparse_wht

Signal model (the paper's): X_o has K nonzeros at uniformly random positions, each ±rho (rho = 1, random signs,
fixed magnitude), in the orthonormal convention; the time-domain signal is x = H·X_o/sqrt(N) + w with white Gaussian
w of variance sigma². SNR = ||H·X_o/sqrt(N)||² / (N·sigma²) = K·rho²/(N·sigma²), so sigma² = K·rho²/(N·SNR).
sparse_wht returns the unnormalized transform X = H·x = sqrt(N)·X_o (+ noise); the support is what is checked.

What is timed, per trial, on the same machine in the same process:
  * synthesis (NOT timed against anything): the full dense x (inverse WHT of X_o + noise), once per trial, as the
    ground truth; signal_fn(idx) = x[idx] indexes into it (a numpy gather, included in the SPRIGHT time).
  * SPRIGHT: the wall time of one sparse_wht(signal_fn, 22, K, noise=sigma, seed=trial) call: design, the
    signal_fn gather, the small WHTs, peeling.
  * dense floor: hadakit.transforms.hadamard_transform(normalize=False) of the same x as a float32 and a float64
    torch vector of 2^22 (conversion excluded), right after the SPRIGHT call; and a memory floor, one float32
    copy of 2^22 (np.copyto into a preallocated array).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from hadakit.transforms import hadamard_transform, inverse_hadamard_transform, sparse_wht
from hadakit.devices import cpu_name




def synthesize(n: int, k: int, snr_db: float, seed: int):
    rng = np.random.default_rng(10_000 + seed)
    big = 1 << n
    supp = rng.choice(big, size=k, replace=False)
    xo = np.zeros(big)
    xo[supp] = rng.choice([-1.0, 1.0], size=k)  # rho = 1
    clean = inverse_hadamard_transform(torch.from_numpy(xo)).numpy()  # orthonormal: H·X_o / sqrt(N)
    sigma = float(np.sqrt(k / (big * 10 ** (snr_db / 10))))
    x = clean + sigma * rng.standard_normal(big)
    return x, np.sort(supp), sigma


def trial(n: int, k: int, snr_db: float, seed: int, x32: torch.Tensor, x64: torch.Tensor, buf: np.ndarray):
    x, supp, sigma = synthesize(n, k, snr_db, seed)
    x32.copy_(torch.from_numpy(x))
    x64.copy_(torch.from_numpy(x))
    src = x32.numpy()

    def signal_fn(idx):
        return x[idx]

    t0 = time.perf_counter()
    r = sparse_wht(signal_fn, n, k, noise=sigma, seed=seed)
    t_sparse = time.perf_counter() - t0
    t0 = time.perf_counter()
    hadamard_transform(x32, normalize=False)
    t_d32 = time.perf_counter() - t0
    t0 = time.perf_counter()
    hadamard_transform(x64, normalize=False)
    t_d64 = time.perf_counter() - t0
    t0 = time.perf_counter()
    np.copyto(buf, src)
    t_copy = time.perf_counter() - t0
    exact = bool(r.converged and np.array_equal(np.sort(r.indices), supp))
    return dict(seed=seed, exact_support=exact, converged=r.converged, found=r.found, samples=r.samples,
                iterations=r.iterations, t_sparse_s=t_sparse, t_dense32_s=t_d32, t_dense64_s=t_d64, t_copy32_s=t_copy)


def summarize(rows, big):
    t = {key: np.array([r[key] for r in rows]) for key in ("t_sparse_s", "t_dense32_s", "t_dense64_s", "t_copy32_s")}
    med = {key: float(np.median(v)) for key, v in t.items()}
    mn = {key: float(np.min(v)) for key, v in t.items()}
    return dict(
        trials=len(rows),
        exact_support=int(sum(r["exact_support"] for r in rows)),
        converged=int(sum(r["converged"] for r in rows)),
        samples=int(rows[0]["samples"]),
        sample_fraction=rows[0]["samples"] / big,
        median_s=med,
        min_s=mn,
        ratio_sparse_over_dense32_median=med["t_sparse_s"] / med["t_dense32_s"],
        ratio_sparse_over_dense64_median=med["t_sparse_s"] / med["t_dense64_s"],
        ratio_sparse_over_copy32_median=med["t_sparse_s"] / med["t_copy32_s"],
        ratio_sparse_over_dense32_per_trial_median=float(np.median(t["t_sparse_s"] / t["t_dense32_s"])),
        per_trial_faster_than_dense32=int(np.sum(t["t_sparse_s"] < t["t_dense32_s"])),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/results/sparse_wht")
    ap.add_argument("--n", type=int, default=22)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--snr-db", type=float, default=10.0)
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--curve-ks", default="10,25,50,100,200")
    ap.add_argument("--curve-trials", type=int, default=20)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n, big = args.n, 1 << args.n

    x32 = torch.empty(big, dtype=torch.float32)
    x64 = torch.empty(big, dtype=torch.float64)
    buf = np.empty(big, dtype=np.float32)
    # Warm-up: the dense kernels compile on first use (numba); sparse_wht's numpy path has nothing to compile.
    hadamard_transform(x32.normal_(), normalize=False)
    hadamard_transform(x64.normal_(), normalize=False)
    trial(n, 5, args.snr_db, 999_999, x32, x64, buf)

    load0 = os.getloadavg()
    rows = [trial(n, args.k, args.snr_db, s, x32, x64, buf) for s in range(args.trials)]
    acc = summarize(rows, big)
    print(f"K={args.k}: exact {acc['exact_support']}/{acc['trials']}, samples {acc['samples']} "
          f"({100 * acc['sample_fraction']:.3f} % of N), "
          f"sparse/dense32 = {acc['ratio_sparse_over_dense32_median']:.3f}")

    curve = []
    for k in [int(v) for v in args.curve_ks.split(",")]:
        rs = [trial(n, k, args.snr_db, 1000 * k + s, x32, x64, buf) for s in range(args.curve_trials)]
        sm = summarize(rs, big)
        sm["k"] = k
        curve.append(sm)
        print(f"curve K={k}: exact {sm['exact_support']}/{sm['trials']}, samples {sm['samples']}, "
              f"sparse {1e3 * sm['median_s']['t_sparse_s']:.2f} ms, "
              f"dense32 {1e3 * sm['median_s']['t_dense32_s']:.2f} ms")
    load1 = os.getloadavg()

    meta = dict(
        device=cpu_name(), cpus=os.cpu_count(), torch_threads=torch.get_num_threads(),
        omp_num_threads=os.environ.get("OMP_NUM_THREADS"), loadavg_before=load0, loadavg_after=load1,
        torch=torch.__version__, numpy=np.__version__, python=platform.python_version(),
        n=n, N=big, snr_db=args.snr_db,
        signal="K random positions, X_o = ±1 (random signs, fixed magnitude rho=1), orthonormal; "
               "x = H X_o / sqrt(N) + w, w ~ N(0, sigma^2), SNR = K rho^2 / (N sigma^2)",
        timed="sparse: one sparse_wht call incl. signal_fn = x[idx] gathers; dense: hadamard_transform(normalize=False)"
              " of the same x, float32 and float64, 2^n vector; copy: np.copyto of 2^n float32",
    )
    result = dict(meta=meta, acceptance=dict(k=args.k, **acc, rows=rows), curve=curve)
    (out / "sparse_wht.json").write_text(json.dumps(result, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [c["k"] for c in curve]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot(ks, [100 * c["sample_fraction"] for c in curve], "o-")
    ax[0].axhline(3.0, color="r", ls="--", label="3 % budget")
    ax[0].set_xscale("log")
    ax[0].set_xlabel("K")
    ax[0].set_ylabel("samples queried (% of N)")
    ax[0].set_title(f"samples, N = 2^{n}, SNR {args.snr_db:g} dB")
    ax[0].legend()
    ax[1].plot(ks, [1e3 * c["median_s"]["t_sparse_s"] for c in curve], "o-", label="sparse_wht (median)")
    ax[1].plot(ks, [1e3 * c["median_s"]["t_dense32_s"] for c in curve], "s--", label="dense FWHT float32 (median)")
    ax[1].plot(ks, [1e3 * c["median_s"]["t_dense64_s"] for c in curve], "^--", label="dense FWHT float64 (median)")
    ax[1].set_xscale("log")
    ax[1].set_yscale("log")
    ax[1].set_xlabel("K")
    ax[1].set_ylabel("wall time (ms)")
    ax[1].set_title("wall time, one thread")
    ax[1].legend(fontsize=8)
    for a, c in zip([ax[1]] * len(curve), curve):
        a.annotate(f"{c['exact_support']}/{c['trials']}", (c["k"], 1e3 * c["median_s"]["t_sparse_s"]),
                   textcoords="offset points", xytext=(0, 6), fontsize=7, ha="center")
    fig.tight_layout()
    fig.savefig(out / "sparse_wht_vs_k.png", dpi=120)

    md = [
        "# sparse_wht (SPRIGHT) acceptance benchmark",
        "",
        f"Command: `OMP_NUM_THREADS=1 python benchmarks/sparse_wht.py --out {args.out}`. "
        f"Device: {meta['device']} ({meta['cpus']} cores, shared with other jobs: load average "
        f"{load0[0]:.1f} before, {load1[0]:.1f} after; timings are noisy, medians are quoted), torch threads "
        f"{meta['torch_threads']}.",
        "",
        f"Signal: N = 2^{n}, {meta['signal']}. SNR = {args.snr_db:g} dB.",
        f"Timed: {meta['timed']}. The one-off synthesis of the dense ground-truth x is not timed.",
        "",
        f"## Acceptance: K = {args.k}, {acc['trials']} seeded trials",
        "",
        "| criterion | target | measured |",
        "|---|---|---|",
        f"| exact support recovery (and converged) | ≥ 95 / 100 | {acc['exact_support']} / {acc['trials']} |",
        f"| samples queried | < 3 % of N | {acc['samples']} = {100 * acc['sample_fraction']:.3f} % |",
        f"| wall time vs dense FWHT float32 (median) | < 1 | {1e3 * acc['median_s']['t_sparse_s']:.2f} ms / "
        f"{1e3 * acc['median_s']['t_dense32_s']:.2f} ms = **{acc['ratio_sparse_over_dense32_median']:.3f}** |",
        f"| wall time vs dense FWHT float64 (median) | < 1 | {1e3 * acc['median_s']['t_sparse_s']:.2f} ms / "
        f"{1e3 * acc['median_s']['t_dense64_s']:.2f} ms = {acc['ratio_sparse_over_dense64_median']:.3f} |",
        f"| trials faster than dense float32 (same trial) | | "
        f"{acc['per_trial_faster_than_dense32']} / {acc['trials']} |",
        f"| memory floor: float32 copy of 2^{n} (median) | | {1e3 * acc['median_s']['t_copy32_s']:.2f} ms "
        f"(sparse / copy = {acc['ratio_sparse_over_copy32_median']:.3f}) |",
        "",
        "Min times: " + ", ".join(f"{key} {1e3 * v:.2f} ms" for key, v in acc["min_s"].items()) + ".",
        "",
        f"## Against K (N = 2^{n}, {args.curve_trials} trials each): `sparse_wht_vs_k.png`",
        "",
        "| K | exact | samples | % of N | sparse ms | dense f32 ms | dense f64 ms | sparse / dense f32 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in curve:
        md.append(f"| {c['k']} | {c['exact_support']}/{c['trials']} | {c['samples']} | "
                  f"{100 * c['sample_fraction']:.3f} | {1e3 * c['median_s']['t_sparse_s']:.2f} | "
                  f"{1e3 * c['median_s']['t_dense32_s']:.2f} | {1e3 * c['median_s']['t_dense64_s']:.2f} | "
                  f"{c['ratio_sparse_over_dense32_median']:.3f} |")
    md += [
        "",
        "Design (defaults of `sparse_wht`): 3 hash groups, 2^ceil(log2 K) bins each, "
        "max(3, ceil(log2 n)) = 5 random offsets per group with the n - b unit-vector delays each; "
        "noise threshold (1 + gamma)·ν², gamma = 1, ν² = N²σ²/B the per-entry noise of a bin.",
        "",
        "## Notes",
        "",
        "* The machine is shared (2 cores, load average well above 2 during the run), so absolute times are "
        "inflated and noisy; the dense FWHT and sparse_wht are timed back to back in every trial, and the ratios "
        "are the figures to read. The min times are the least-disturbed ones.",
        "* `samples` counts the indices passed to `signal_fn` with multiplicity (the design's "
        "groups × offsets × (1 + n - b) × 2^b); a few may coincide.",
        "* The per-bin SNR is B·SNR/K with B = 2^ceil(log2 K) bins: 16 (12 dB) for K = 10, 12.8 (11 dB) for "
        "K = 25, 50, 100, 200.",
        "* Peeling stalls when two coefficients share their bin in every group (probability ≈ C(K,2)/B^3 with "
        "disjoint hash bits: ≈ 1.1 % at K = 10, 0.5 % at K = 50). It is the expected failure mode; such a run "
        "returns converged=False. (A pilot run with other seeds hit it once in 20 trials at K = 10.)",
    ]
    (out / "sparse_wht.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
