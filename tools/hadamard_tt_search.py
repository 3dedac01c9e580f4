"""Seeded tabu search for aperiodic complementary sequences: Turyn-type sequences TT(n) and base sequences BS(m, n).

* **Turyn-type sequences** ``TT(n)``: ±1 sequences ``X, Y, Z, W`` of lengths ``n, n, n, n-1`` with
  ``N_X + N_Y + 2 N_Z + 2 N_W = 0`` at every nonzero shift (``N`` = nonperiodic autocorrelation).  Then
  ``(Z;W), (Z;-W), X, Y`` are base sequences ``BS(2n-1, n)`` and give T-sequences of length ``3n - 1``, hence
  (Goethals–Seidel) a Hadamard matrix of order ``4(3n-1)``: TT(20) gives 236, TT(30) gives 356, TT(36) gives 428.
* **Base sequences** ``BS(m, n)``: ±1 sequences of lengths ``m, m, n, n`` with ``N_A + N_B + N_C + N_D = 0``:
  T-sequences of length ``m + n`` (e.g. BS(16, 15) gives T-sequences of length 31).

This is a different cost from ``tools/hadamard_gs_search.py`` (which works on the periodic autocorrelation of four
length-t sequences directly): here the unknowns are ~3t/4 (TT) or t (BS) signs with an aperiodic, weighted cost
``sum_s (sum_i w_i N_i(s))^2``.  Moves are single sign flips scored in closed form (numba), tabu tenure drawn at
random, restart after a number of steps without improving the best cost of the run.  Deterministic for a given
``--seed`` (numba's own generator, seeded inside the compiled function; numpy's global state is not touched).
It prints progress and how long it ran either way; on success it checks the result in exact integers and writes
``/tmp`` (or ``--out``) a text file with the four sequences, which ``tools/hadamard_algebraic.py`` reads.

Usage::

    OMP_NUM_THREADS=1 python tools/hadamard_tt_search.py --kind tt --n 20 --seed 1 --budget 900 --out /tmp/tt20.txt
    OMP_NUM_THREADS=1 python tools/hadamard_tt_search.py --kind bs --m 16 --n 15 --seed 1 --budget 300
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numba
import numpy as np


@numba.njit(cache=False)
def _tabu(lengths, weights, seed, max_steps, restart_after, ten_lo, ten_hi):
    np.random.seed(seed)
    k = lengths.shape[0]
    offs = np.zeros(k + 1, dtype=np.int64)
    for i in range(k):
        offs[i + 1] = offs[i] + lengths[i]
    total = offs[k]
    lmax = lengths.max()
    x = np.empty(total, dtype=np.int64)
    c = np.zeros(lmax, dtype=np.int64)
    tabu = np.zeros(total, dtype=np.int64)
    best_overall = -1
    step = 0
    restarts = 0
    while step < max_steps:
        restarts += 1
        for p in range(total):
            x[p] = 1 if np.random.random() < 0.5 else -1
        c[:] = 0
        for i in range(k):
            o, L = offs[i], lengths[i]
            for s in range(1, L):
                acc = 0
                for j in range(L - s):
                    acc += x[o + j] * x[o + j + s]
                c[s] += weights[i] * acc
        cost = 0
        for s in range(1, lmax):
            cost += c[s] * c[s]
        best = cost
        since = 0
        tabu[:] = 0
        while since < restart_after and step < max_steps:
            step += 1
            since += 1
            if cost == 0:
                return x, step, restarts, 0
            best_move = -1
            best_delta = 1 << 62
            nties = 0
            for i in range(k):
                o, L, w = offs[i], lengths[i], weights[i]
                for j in range(L):
                    xj = x[o + j]
                    delta = 0
                    for s in range(1, L):
                        nb = 0
                        if j + s < L:
                            nb += x[o + j + s]
                        if j - s >= 0:
                            nb += x[o + j - s]
                        d = -2 * w * xj * nb
                        delta += 2 * c[s] * d + d * d
                    p = o + j
                    if tabu[p] > step and cost + delta >= best:
                        continue
                    if delta < best_delta:
                        best_delta = delta
                        best_move = p
                        nties = 1
                    elif delta == best_delta:
                        nties += 1
                        if np.random.random() * nties < 1.0:
                            best_move = p
            if best_move < 0:
                continue
            # apply the flip
            i = 0
            while offs[i + 1] <= best_move:
                i += 1
            o, L, w = offs[i], lengths[i], weights[i]
            j = best_move - o
            xj = x[best_move]
            for s in range(1, L):
                nb = 0
                if j + s < L:
                    nb += x[o + j + s]
                if j - s >= 0:
                    nb += x[o + j - s]
                c[s] += -2 * w * xj * nb
            x[best_move] = -xj
            cost += best_delta
            tabu[best_move] = step + ten_lo + int(np.random.random() * (ten_hi - ten_lo + 1))
            if cost < best:
                best = cost
                since = 0
            if best_overall < 0 or cost < best_overall:
                best_overall = cost
    return x, step, restarts, best_overall


def aperiodic(x: np.ndarray, length: int) -> np.ndarray:
    """Nonperiodic autocorrelation ``N_x(s)`` for ``s = 1 .. length-1`` (zero beyond ``len(x)``), int64."""
    out = np.zeros(length - 1, dtype=np.int64)
    for s in range(1, min(len(x), length)):
        out[s - 1] = int(np.dot(x[: len(x) - s], x[s:]))
    return out


def check(seqs: list[np.ndarray], weights: list[int]) -> bool:
    lmax = max(len(s) for s in seqs)
    return not sum(w * aperiodic(s, lmax) for s, w in zip(seqs, weights)).any()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", choices=("tt", "bs"), required=True)
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--m", type=int, default=None, help="bs only: length of the first two sequences")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--budget", type=float, default=600.0, help="seconds")
    parser.add_argument("--restart-after", type=int, default=20000)
    parser.add_argument("--tenure", type=int, nargs=2, default=(3, 12))
    parser.add_argument("--chunk", type=int, default=200000, help="steps per compiled call (progress granularity)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.kind == "tt":
        lengths, weights = [args.n, args.n, args.n, args.n - 1], [1, 1, 2, 2]
        what = f"TT({args.n})"
    else:
        m = args.m if args.m is not None else args.n + 1
        lengths, weights = [m, m, args.n, args.n], [1, 1, 1, 1]
        what = f"BS({m}, {args.n})"
    lens, wts = np.array(lengths, dtype=np.int64), np.array(weights, dtype=np.int64)
    start = time.monotonic()
    chunk, total_steps, best = 0, 0, None
    while time.monotonic() - start < args.budget:
        x, steps, restarts, cost = _tabu(lens, wts, args.seed * 1_000_003 + chunk, args.chunk, args.restart_after,
                                         args.tenure[0], args.tenure[1])
        chunk += 1
        total_steps += steps
        best = cost if best is None else min(best, cost)
        if cost == 0:
            offs = np.cumsum([0, *lengths])
            seqs = [x[offs[i]:offs[i + 1]].copy() for i in range(4)]
            assert check(seqs, weights), "internal error: search returned a non-solution"
            took = time.monotonic() - start
            text = "\n".join("".join("+" if v > 0 else "-" for v in s) for s in seqs)
            header = (f"# {what} found by: python tools/hadamard_tt_search.py --kind {args.kind} --n {args.n}"
                      + (f" --m {lengths[0]}" if args.kind == "bs" else "")
                      + f" --seed {args.seed} --restart-after {args.restart_after} --tenure {args.tenure[0]} "
                      f"{args.tenure[1]} --chunk {args.chunk}; {took:.1f} s, {total_steps} steps, chunk {chunk - 1}\n")
            if args.out is not None:
                args.out.write_text(header + text + "\n")
            print(header + text, flush=True)
            return
        print(f"{what}: {time.monotonic() - start:.0f} s, {total_steps} steps, best cost so far {best}", flush=True)
    print(f"{what}: no solution in {time.monotonic() - start:.1f} s ({total_steps} steps, lowest cost {best})")


if __name__ == "__main__":
    main()
