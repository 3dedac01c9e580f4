"""Seeded search for Goethals–Seidel sequences of any length ``t``: a Hadamard matrix of order ``4t``.

Generalizes ``tools/search_order_172.py`` (same tabu search, same closed-form flip scores) from ``t = 43`` to any
``t``.  Four ±1 sequences ``a, b, c, d`` of length ``t`` whose periodic autocorrelations (PAF) sum to zero at
every nonzero shift give, through the Goethals–Seidel array, a Hadamard matrix of order ``4t``.  The run is
deterministic given ``--seed`` (and the other arguments); it prints its progress and the time it took, checks
the result in exact integers and writes a data file in the format of ``goethals_seidel_172.txt``.

Usage (from the repository root)::

    OMP_NUM_THREADS=1 python tools/hadamard_gs_search.py --t 23 --seed 1
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[1] / "src/hadakit/transforms/data"


def summed_paf(seqs: np.ndarray) -> np.ndarray:
    """Exact summed PAF ``T[..., s]`` (s = 0 .. n-1) of integer sequences of shape ``(..., 4, n)``."""
    n = seqs.shape[-1]
    return np.stack([(seqs * np.roll(seqs, -s, axis=-1)).sum(axis=(-2, -1)) for s in range(n)], axis=-1)


def search(n: int, seed: int, chains: int, budget_s: float, tenure: tuple[int, int], restart_after: int,
           report_every: float = 30.0) -> np.ndarray | None:
    """Tabu search; a ``(4, n)`` int8 array of ±1 with zero summed PAF, or None when out of time."""
    half = n // 2
    rng = np.random.default_rng(seed)
    rows = np.arange(chains)
    ang = 2 * np.pi * np.outer(np.arange(n), np.arange(n)) / n
    cos, sin = np.cos(ang), np.sin(ang)
    two_i = (2 * np.arange(n)) % n
    shifts = np.arange(n)
    weight = np.ones(half)
    if n % 2 == 0:
        weight[-1] = 0.5  # shift n/2 is its own mirror

    def random_states(count: int):
        x = rng.choice(np.array([-1.0, 1.0]), size=(count, 4, n))
        t = summed_paf(x)
        t[:, 0] = 0
        return x, t, (t[:, 1 : half + 1] ** 2 * weight).sum(1)

    if n % 2 == 0:
        raise ValueError("this search handles odd t only (even t = 2·odd follows by other constructions)")
    x, t, cost = random_states(chains)
    best = cost.copy()
    last_improved = np.zeros(chains, dtype=np.int64)
    tabu_until = np.zeros((chains, 4 * n), dtype=np.int64)
    start, step, last_report = time.monotonic(), 0, time.monotonic()
    while time.monotonic() - start < budget_s:
        step += 1
        flat = x.reshape(chains * 4, n)
        re, im = flat @ cos, flat @ sin
        t_hat = np.repeat(t @ cos, 4, axis=0)
        x_conv_t = ((re * t_hat) @ cos + (im * t_hat) @ sin).reshape(chains, 4, n) / n
        x_conv_x = ((re * re - im * im) @ cos + (2 * re * im) @ sin).reshape(chains, 4, n)[:, :, two_i] / n
        delta = np.rint(-4 * x * x_conv_t + 4 * x_conv_x + 4 * (n - 1) - 4).reshape(chains, 4 * n)

        allowed = (tabu_until <= step) | (cost[:, None] + delta < best[:, None])
        move = (np.where(allowed, delta, np.inf) + rng.random(delta.shape)).argmin(1)
        seq, pos = move // n, move % n
        row = x[rows, seq]
        sign = row[rows, pos]
        d_t = -2 * sign[:, None] * (row[rows[:, None], (pos[:, None] + shifts) % n]
                                    + row[rows[:, None], (pos[:, None] - shifts) % n])
        d_t[:, 0] = 0
        t += d_t
        x[rows, seq, pos] *= -1
        cost += delta[rows, move]
        tabu_until[rows, move] = step + rng.integers(tenure[0], tenure[1] + 1, chains)

        if (cost == 0).any():
            return x[int(np.flatnonzero(cost == 0)[0])].astype(np.int8)
        improved = cost < best
        best[improved], last_improved[improved] = cost[improved], step
        stale = step - last_improved > restart_after
        if stale.any():
            x[stale], t[stale], cost[stale] = random_states(int(stale.sum()))
            best[stale], last_improved[stale], tabu_until[stale] = cost[stale], step, 0
        if time.monotonic() - last_report > report_every:
            last_report = time.monotonic()
            print(f"  t={n}: step {step}, {last_report - start:.0f} s, lowest cost now {cost.min():.0f}", flush=True)
    return None


def normalize(seqs: np.ndarray) -> np.ndarray:
    """Negate to nonnegative row sums and sort by row sum (both keep the PAF condition)."""
    seqs = seqs * np.where(seqs.sum(1) < 0, -1, 1).astype(np.int8)[:, None]
    return seqs[np.argsort(seqs.sum(1), kind="stable")]


def write_gs_file(seqs: np.ndarray, path: Path, how: str) -> None:
    """Write four GS sequences, one line of ``+``/``-`` each, after checking the PAF condition exactly."""
    seqs = np.asarray(seqs, dtype=np.int64)
    n = seqs.shape[1]
    t = summed_paf(seqs)
    if seqs.shape[0] != 4 or set(np.unique(seqs)) - {-1, 1} or t[0] != 4 * n or t[1:].any():
        raise AssertionError("not Goethals-Seidel sequences")
    sums = [int(s.sum()) for s in seqs]
    header = (f"# Goethals-Seidel sequences for a Hadamard matrix of order {4 * n} = 4*{n} (hadakit).\n"
              f"# Four +-1 sequences of length {n} (one per line, '+' = +1) whose periodic autocorrelations sum to\n"
              f"# zero at every nonzero shift; row sums {sums}. Plugged into the Goethals-Seidel array\n"
              f"# (see goethals_seidel_172.txt and hadakit.transforms.matrices) they give H with H H^T = {4 * n} I.\n"
              + "".join(f"# {line}\n" for line in how.splitlines()))
    body = "\n".join("".join("+" if v > 0 else "-" for v in s) for s in seqs)
    path.write_text(header + body + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--t", type=int, required=True, help="sequence length (odd); the order is 4t")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--chains", type=int, default=128)
    parser.add_argument("--budget", type=float, default=1200.0, help="search time limit in seconds")
    parser.add_argument("--tenure", type=int, nargs=2, default=(5, 20))
    parser.add_argument("--restart-after", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or DATA / f"goethals_seidel_{4 * args.t}.txt"
    start = time.monotonic()
    seqs = search(args.t, args.seed, args.chains, args.budget, tuple(args.tenure), args.restart_after)
    took = time.monotonic() - start
    if seqs is None:
        raise SystemExit(f"t={args.t}: no solution within {args.budget:.0f} s; try another --seed or a larger --budget")
    how = (f"Found by: python tools/hadamard_gs_search.py --t {args.t} --seed {args.seed} --chains {args.chains} "
           f"--tenure {args.tenure[0]} {args.tenure[1]} --restart-after {args.restart_after}\n"
           f"(tabu search; took {took:.1f} s on one shared CPU core; then normalized: nonnegative sorted row sums).")
    write_gs_file(normalize(seqs), out, how)
    print(f"t={args.t}: found in {took:.1f} s; wrote {out}", flush=True)


if __name__ == "__main__":
    main()
