"""Search for a Hadamard matrix of order 172 = 4·43 (Goethals–Seidel type) and write it as a data file.

Order 172 is the base order of LLaMA-2's MLP width 11008 = 172·64, and none of the algebraic families in
``hadakit.transforms.matrices`` (Sylvester, Paley I/II, Kronecker products) reaches it.  The Goethals–Seidel
array turns four ±1 sequences ``a, b, c, d`` of length ``n`` into a Hadamard matrix of order ``4n`` provided
their periodic autocorrelations (PAF) sum to zero at every nonzero shift::

    sum over x in (a, b, c, d) of PAF_x(s) = 0   for s = 1 .. n-1,     PAF_x(s) = sum_i x[i] x[(i+s) mod n]

This script finds such a quadruple for ``n = 43`` by tabu search on many independent chains at once,
vectorized with numpy.  State: 4·43 signs.  Cost: ``sum_{s=1}^{21} T(s)^2`` with ``T`` the summed PAF
(``T(s) = T(n-s)``, so half the shifts suffice).  Every step, each chain scores all 172 single-sign flips in
closed form and takes the best one that is not tabu (or that beats the chain's best cost so far); chains
that stop improving are restarted at random.  Flipping ``x[i]`` changes ``T(s)`` by
``-2 x[i] (x[i+s] + x[i-s])``, so with ``T(0) := 0`` and ``⊛`` the circular convolution the cost changes by

    Δ(i) = -4 x[i] (x ⊛ T)[i] + 4 (x ⊛ x)[2i] + 4 (n - 1) - 4

The convolutions use real DFT matrices (43 is prime, a slow length for numpy's FFT); the values are integers
recovered by rounding, so the run depends only on the arguments.  With the defaults it finds a solution
in a few seconds on one CPU core.

Usage (from the repository root)::

    OPENBLAS_NUM_THREADS=1 python tools/search_order_172.py       # writes src/hadakit/transforms/data/...
    python tools/search_order_172.py --seed 3 --budget 600 --out /tmp/gs172.txt
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

N = 43
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src/hadakit/transforms/data/goethals_seidel_172.txt"


def summed_paf(seqs: np.ndarray) -> np.ndarray:
    """Exact summed PAF ``T[..., s]`` (s = 0 .. n-1) of integer sequences of shape ``(..., 4, n)``."""
    n = seqs.shape[-1]
    return np.stack([(seqs * np.roll(seqs, -s, axis=-1)).sum(axis=(-2, -1)) for s in range(n)], axis=-1)


def search(seed: int, chains: int, budget_s: float, tenure: tuple[int, int], restart_after: int) -> np.ndarray | None:
    """Tabu search; returns a ``(4, N)`` int8 array of ±1 with zero summed PAF, or None when out of time."""
    n, half = N, N // 2
    rng = np.random.default_rng(seed)
    rows = np.arange(chains)
    ang = 2 * np.pi * np.outer(np.arange(n), np.arange(n)) / n
    cos, sin = np.cos(ang), np.sin(ang)
    two_i = (2 * np.arange(n)) % n
    shifts = np.arange(n)

    def random_states(count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = rng.choice(np.array([-1.0, 1.0]), size=(count, 4, n))
        t = summed_paf(x)
        t[:, 0] = 0
        return x, t, (t[:, 1 : half + 1] ** 2).sum(1)

    x, t, cost = random_states(chains)
    best = cost.copy()
    last_improved = np.zeros(chains, dtype=np.int64)
    tabu_until = np.zeros((chains, 4 * n), dtype=np.int64)
    start, step = time.monotonic(), 0
    while time.monotonic() - start < budget_s:
        step += 1
        # DFT of every sequence (real and minus-imaginary parts) and of T (real: T is symmetric).
        flat = x.reshape(chains * 4, n)
        re, im = flat @ cos, flat @ sin
        t_hat = np.repeat(t @ cos, 4, axis=0)
        x_conv_t = ((re * t_hat) @ cos + (im * t_hat) @ sin).reshape(chains, 4, n) / n
        x_conv_x = ((re * re - im * im) @ cos + (2 * re * im) @ sin).reshape(chains, 4, n)[:, :, two_i] / n
        delta = np.rint(-4 * x * x_conv_t + 4 * x_conv_x + 4 * (n - 1) - 4).reshape(chains, 4 * n)

        allowed = (tabu_until <= step) | (cost[:, None] + delta < best[:, None])
        # Random tie-breaking: cost changes are multiples of 16, the noise is < 1.
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
    return None


def write_data_file(seqs: np.ndarray, path: Path, how: str) -> None:
    """Write the four sequences (one line of ``+``/``-`` each) with a header saying what they are."""
    sums = [int(s.sum()) for s in seqs]
    header = f"""\
# Goethals-Seidel sequences for a Hadamard matrix of order 172 = 4*43 (hadakit).
# Four +-1 sequences a, b, c, d of length 43 (one per line, '+' = +1, '-' = -1) whose periodic
# autocorrelations sum to zero at every nonzero shift; row sums {sums} ({' + '.join(f'{s}^2' for s in sums)} = 172).
# With A, B, C, D the circulant matrices whose first rows are a, b, c, d and R the 43x43 back-diagonal
# permutation, the Goethals-Seidel array
#     [[ A,     BR,    CR,    DR  ],
#      [-BR,    A,     D^T R, -C^T R],
#      [-CR,   -D^T R, A,     B^T R],
#      [-DR,    C^T R, -B^T R, A   ]]
# is a Hadamard matrix of order 172.
# {how}
# Verified: the summed PAF is zero at shifts 1..42 (exact integers); hadakit rebuilds the array on load and
# checks H @ H^T == 172 I exactly, raising if this file is corrupt.
"""
    body = "\n".join("".join("+" if v > 0 else "-" for v in s) for s in seqs)
    path.write_text(header + body + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--chains", type=int, default=256)
    parser.add_argument("--budget", type=float, default=1200.0, help="search time limit in seconds")
    parser.add_argument("--tenure", type=int, nargs=2, default=(5, 20), help="tabu tenure range (steps)")
    parser.add_argument("--restart-after", type=int, default=2000,
                        help="restart a chain after this many steps without improvement")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    start = time.monotonic()
    seqs = search(args.seed, args.chains, args.budget, tuple(args.tenure), args.restart_after)
    if seqs is None:
        raise SystemExit(f"no solution within {args.budget:.0f} s; try another --seed or a larger --budget")
    # Negating a sequence keeps its PAF, and the condition is symmetric in the four: normalize the signs and order.
    seqs = seqs * np.where(seqs.sum(1) < 0, -1, 1).astype(np.int8)[:, None]
    seqs = seqs[np.argsort(seqs.sum(1), kind="stable")]
    t = summed_paf(seqs.astype(np.int64))
    assert t[0] == 4 * N and not t[1:].any(), "search returned a non-solution"
    how = (f"Found by: python tools/search_order_172.py --seed {args.seed} --chains {args.chains} "
           f"--tenure {args.tenure[0]} {args.tenure[1]} --restart-after {args.restart_after}\n"
           "# (sequences then negated to nonnegative row sums and sorted by row sum; both keep the PAF condition).")
    write_data_file(seqs, args.out, how)
    print(f"found in {time.monotonic() - start:.1f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
