"""Goethals–Seidel sequences from algebraic constructions (Golay pairs, base sequences, T-sequences, Williamson
matrices), written as hadakit data files.  Deterministic; every result is checked in exact integers.

Constructions (all from the literature; implemented here from the definitions):

* **Golay pairs** ``(A, B)`` of length ``g`` (aperiodic autocorrelations sum to 0): length 1 ``([1], [1])``,
  length 10 (the first pair in lexicographic order, found by exhaustive search), doubling ``(A|B, A|-B)`` and
  Turyn's product ``E = P⊗A + Q⊗B, F = P⊗rev(B) - Q⊗rev(A)`` with ``P, Q = (C±D)/2`` for a pair ``(C, D)``.
* **Base sequences** ``BS(m, n)`` = four ±1 sequences of lengths ``m, m, n, n`` with aperiodic autocorrelations
  summing to 0: from Golay pairs ``(A, B)``, ``(C, D)`` of lengths ``m, n``; and ``([A, 1], [A, -1], B, B)``,
  a ``BS(g+1, g)`` from one Golay pair of length ``g``.
* **T-sequences** of length ``m + n``: ``T1 = [(A+B)/2, 0_n]``, ``T2 = [(A-B)/2, 0_n]``, ``T3 = [0_m, (C+D)/2]``,
  ``T4 = [0_m, (C-D)/2]`` (disjoint supports, aperiodic autocorrelations summing to 0).
* **GS sequences** from T-sequences of length ``u``: ``a, b, c, d = T1 ± T2 ± T3 ± T4`` (sign patterns of a 4×4
  Hadamard matrix): their periodic autocorrelations sum to 4·(those of the T's) = 0, so order ``4u``.
* **Williamson × T (Cooper–Wallis / Turyn)**: Williamson matrices (symmetric circulant ±1 ``A, B, C, D`` of order
  ``w`` with ``A²+B²+C²+D² = 4wI``, found here by a seeded tabu search (w = 7, 9) or a deterministic
  meet-in-the-middle over all symmetric sequences (w = 19, 23)) and T-sequences of
  length ``u`` with ``gcd(u, w) = 1`` give, through the quaternion array, four sequences on ``Z_u × Z_w ≅ Z_uw``
  (CRT) with zero summed PAF: order ``4uw``.

Usage::

    OMP_NUM_THREADS=1 python tools/hadamard_algebraic.py            # writes every file below into data/
    python tools/hadamard_algebraic.py --only 260 --out-dir /tmp
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
from pathlib import Path

import numpy as np

from hadamard_gs_search import DATA, normalize, summed_paf, write_gs_file


def aperiodic(x: np.ndarray) -> np.ndarray:
    n = len(x)
    return np.array([int(np.dot(x[: n - s], x[s:])) for s in range(1, n)], dtype=np.int64)


def check_golay(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    assert len(a) == len(b) and not (aperiodic(a) + aperiodic(b)).any(), "not a Golay pair"
    return a, b


def golay10() -> tuple[np.ndarray, np.ndarray]:
    """The first Golay pair of length 10 in lexicographic order (+1 before -1), by exhaustive search."""
    n = 10
    xs = np.array(list(itertools.product([1, -1], repeat=n)), dtype=np.int64)
    acf = np.stack([(xs[:, : n - s] * xs[:, s:]).sum(1) for s in range(1, n)], 1)
    index = {}
    for i, row in enumerate(acf):
        index.setdefault(tuple(row), i)
    for i, row in enumerate(acf):
        j = index.get(tuple(-row))
        if j is not None:
            return check_golay(xs[i], xs[j])
    raise AssertionError("no Golay pair of length 10")


# Golay's kernel pair of length 26 (M. J. E. Golay, "Complementary series", IRE Trans. Inform. Theory 7, 1961; the
# only primitive binary length besides 2 and 10, unique up to equivalence).  Typed in from the literature and
# checked by check_golay() below (and again, through the Hadamard matrices built on it, on every load in hadakit).
GOLAY26 = ("-+--++-++++-------++---+-+", "-+--++-++++-+-++++--+++-+-")


def golay26() -> tuple[np.ndarray, np.ndarray]:
    """Golay's pair of length 26 (literature data, verified here)."""
    a, b = (np.array([1 if ch == "+" else -1 for ch in s], dtype=np.int64) for s in GOLAY26)
    return check_golay(a, b)


def golay(g: int) -> tuple[np.ndarray, np.ndarray]:
    """A Golay pair of length g = 2^a 10^b 26^c (doubling and Turyn's product of two pairs)."""
    if g == 1:
        return np.array([1]), np.array([1])
    if g == 10:
        return golay10()
    if g == 26:
        return golay26()
    for kernel in (10, 26):
        if g % kernel == 0 and g // kernel > 1 and (g // kernel) % kernel == 0:
            (a, b), (c, d) = golay(kernel), golay(g // kernel)
            p, q = (c + d) // 2, (c - d) // 2
            return check_golay(np.kron(p, a) + np.kron(q, b), np.kron(p, b[::-1]) - np.kron(q, a[::-1]))
    if g % 2 == 0:
        a, b = golay(g // 2)
        return check_golay(np.r_[a, b], np.r_[a, -b])
    raise ValueError(f"no Golay pair of length {g} here")


def t_sequences(a, b, c, d) -> np.ndarray:
    """T-sequences (4, m+n) from base sequences of lengths m, m, n, n."""
    m, n = len(a), len(c)
    t = np.zeros((4, m + n), dtype=np.int64)
    t[0, :m], t[1, :m] = (a + b) // 2, (a - b) // 2
    t[2, m:], t[3, m:] = (c + d) // 2, (c - d) // 2
    assert (np.abs(t).sum(0) == 1).all() and not sum(aperiodic(x) for x in t).any(), "not T-sequences"
    return t


# Turyn-type sequences TT(n): X, Y, Z, W of lengths n, n, n, n-1 with N_X + N_Y + 2 N_Z + 2 N_W = 0 at every nonzero
# shift.  TT(36) is the quadruple of H. Kharaghani and B. Tayfeh-Rezaie, "A Hadamard matrix of order 428",
# J. Combin. Des. 13 (2005) 435-440 (as listed by C. Koukouvinos, www.math.ntua.gr/people/ckoukouv/designs/hadamard/
# seq36t.txt), typed in here and checked by turyn_type_to_t().  Other entries: found by tools/hadamard_tt_search.py
# (command line and time in the comment of each).
TURYN_TYPE = {
    # tools/hadamard_tt_search.py --kind tt --n 20 --seed 2 --restart-after 100000 --tenure 2 10 --chunk 1000000:
    # found in 113.1 s (7998562 steps; seed 1 with --restart-after 20000 --tenure 3 12 had stalled at cost 4 for 190 s).
    20: ("+---+++++--++++-++++", "++--+--+--++-+++--++", "++-------+-+--+-+++-", "++--+----++-+-+-+--"),
    36: ("+++----++-+-+-----++++-++-++++----+-",
         "+-+++++--+-+--+--++--++++-++++---++-",
         "+-+++++-+--++++-+++-++--+++-+--+---+",
         "+++-+-----++--+-+++--+-+-+++-++++-+"),
}
# Base sequences BS(m, n) found by tools/hadamard_tt_search.py --kind bs (m, n) -> (A, B, C, D).
BASE_SEQUENCES: dict[tuple[int, int], tuple[str, str, str, str]] = {
    # tools/hadamard_tt_search.py --kind bs --n 15 --seed 1 --restart-after 20000 --tenure 3 12 --chunk 200000:
    # found in 33.4 s (3651444 steps).
    (16, 15): ("+-+-+---+--+----", "++-+----+---++++", "-++-+---++--+-+", "++----+--++----"),
}
# Williamson matrices (symmetric circulant first rows) of orders 49 and 61 from the literature: S. London,
# "Constructing new Turyn type sequences, T-sequences and Hadamard matrices", PhD thesis, University of Illinois at
# Chicago, 2013 (as tabulated in SageMath's hadamard_matrix module); checked by williamson_check() before use.
WILLIAMSON_LIT = {
    49: ("++++-++-+---++-+++---++-++-++---+++-++---+-++-+++", "++++-++-+---++-+++---++-++-++---+++-++---+-++-+++",
         "+----+-++++--+-+++-+-+++--+++-+-+++-+--++++-+----", "+++++-+----++-+---+-+---++---+-+---+-++----+-++++"),
    61: ("++--+--++--+-+-++++--+-----+------+-----+--++++-+-+--++--+--+",
         "++--+--++--+-+-++++--+-----+------+-----+--++++-+-+--++--+--+",
         "+---+-+-++++---++--+-++-+---++++++---+-++-+--++---++++-+-+---",
         "++++-+-+----+++--++-+--+-+++------+++-+--+-++--+++----+-+-+++"),
}


def williamson_check(w: int) -> np.ndarray:
    """The literature Williamson sequences of order w, checked: symmetric, ±1, summed PAF (4w, 0, ..., 0)."""
    seqs = np.stack([signs(v) for v in WILLIAMSON_LIT[w]])
    assert seqs.shape == (4, w) and all((x[1:] == x[1:][::-1]).all() for x in seqs), f"W({w}) not symmetric"
    t = summed_paf(seqs)
    assert t[0] == 4 * w and not t[1:].any(), f"W({w}) are not Williamson sequences"
    return seqs


def signs(text: str) -> np.ndarray:
    return np.array([1 if ch == "+" else -1 for ch in text], dtype=np.int64)


def turyn_type_to_t(n: int) -> np.ndarray:
    """T-sequences of length 3n - 1 from TT(n): base sequences (Z;W), (Z;-W), X, Y of lengths 2n-1, 2n-1, n, n."""
    x, y, z, w = (signs(v) for v in TURYN_TYPE[n])
    assert (len(x), len(y), len(z), len(w)) == (n, n, n, n - 1), f"TT({n}): wrong lengths"
    assert not (aperiodic(x) + aperiodic(y) + 2 * aperiodic(z) + 2 * np.r_[aperiodic(w), 0]).any(), \
        f"TT({n}) is not Turyn-type"
    return t_sequences(np.r_[z, w], np.r_[z, -w], x, y)


def base_to_t(m: int, n: int) -> np.ndarray:
    return t_sequences(*(signs(v) for v in BASE_SEQUENCES[(m, n)]))


# Williamson matrices of order 3 (symmetric circulants, first rows a, b, c, d): a = [1, 1, 1], b = c = d = [1, -1, -1].
WILLIAMSON3 = np.array([[1, 1, 1], [1, -1, -1], [1, -1, -1], [1, -1, -1]], dtype=np.int64)


def gs_from_t(t: np.ndarray) -> np.ndarray:
    signs = np.array([[1, 1, 1, 1], [1, 1, -1, -1], [1, -1, 1, -1], [1, -1, -1, 1]])
    return signs @ t


def williamson(w: int, seed: int, budget_s: float = 600.0) -> np.ndarray:
    """Symmetric ±1 sequences (4, w) with zero summed PAF (Williamson matrices), by seeded tabu search."""
    rng = np.random.default_rng(seed)
    half = (w + 1) // 2
    mirror = np.array([min(i, w - i) for i in range(w)])  # position -> free variable

    def seqs(v):
        return v[:, mirror]

    def cost(v):
        tt = summed_paf(seqs(v))
        return int((tt[1:half] ** 2).sum())

    start = time.monotonic()
    while time.monotonic() - start < budget_s:
        v = rng.choice([-1, 1], size=(4, half))
        c, tabu = cost(v), {}
        for step in range(4000):
            if c == 0:
                return seqs(v)
            moves = []
            for j in range(4):
                for i in range(half):
                    v[j, i] *= -1
                    moves.append((cost(v), rng.random(), j, i))
                    v[j, i] *= -1
            moves.sort()
            for cnew, _, j, i in moves:
                if tabu.get((j, i), -1) < step or cnew < c:
                    break
            v[j, i] *= -1
            c = cnew
            tabu[(j, i)] = step + int(rng.integers(2, 6))
    raise SystemExit(f"no Williamson matrices of order {w} within {budget_s} s")


def williamson_mitm(w: int) -> np.ndarray:
    """Williamson sequences (4, w) by meet-in-the-middle over all symmetric sequences (deterministic):
    for each split 4w = a²+b²+c²+d² (odd row sums), match PAF(A)+PAF(B) against -(PAF(C)+PAF(D))."""
    half=(w+1)//2
    mirror=np.array([min(i,w-i) for i in range(w)])
    free=np.array(list(itertools.product([1,-1],repeat=half)),dtype=np.int64)
    seqs=free[:,mirror]
    h=w//2
    paf=np.stack([(seqs*np.roll(seqs,-s,axis=1)).sum(1) for s in range(1,h+1)],1)
    rs=seqs.sum(1)
    # decompositions 4w = a^2+b^2+c^2+d^2, a<=b<=c<=d odd positive
    odd=range(1,int((4*w)**.5)+1,2)
    for a,b,c,d in itertools.combinations_with_replacement(odd,4):
        if a*a+b*b+c*c+d*d!=4*w: continue
        S=[np.flatnonzero(np.abs(rs)==v) for v in (a,b,c,d)]
        # fix sign: rowsum positive
        S=[s[rs[s]>0] for s in S]
        left=(paf[S[0]][:,None,:]+paf[S[1]][None,:,:]).reshape(-1,h)
        right=-(paf[S[2]][:,None,:]+paf[S[3]][None,:,:]).reshape(-1,h)
        keys={row.tobytes():i for i,row in enumerate(right)}
        for i,row in enumerate(left):
            j=keys.get(row.tobytes())
            if j is not None:
                i0,i1=divmod(i,len(S[1])); j0,j1=divmod(j,len(S[3]))
                out=np.stack([seqs[S[0][i0]],seqs[S[1][i1]],seqs[S[2][j0]],seqs[S[3][j1]]])
                t=summed_paf(out); assert t[0]==4*w and not t[1:].any()
                return out
    raise SystemExit(f"no Williamson matrices of order {w} found")

def base_sequences_mitm(m: int, n: int) -> tuple[np.ndarray, ...]:
    """Base sequences BS(m, n) (lengths m, m, n, n; aperiodic autocorrelations summing to 0), the first found by a
    deterministic meet-in-the-middle: all pairs (A, B) of length m against all pairs (C, D) of length n."""

    def pairs(k):
        xs = np.array(list(itertools.product([1, -1], repeat=k)), dtype=np.int64)
        acf = np.stack([(xs[:, : k - s] * xs[:, s:]).sum(1) for s in range(1, m)], 1) if k > 1 else \
            np.zeros((len(xs), m - 1), dtype=np.int64)
        if k < m:
            acf[:, k - 1:] = 0
        return xs, acf

    xa, fa = pairs(m)
    xc, fc = pairs(n)
    right = {}
    sums_c = (fc[:, None, :] + fc[None, :, :]).reshape(-1, m - 1)
    for idx, row in enumerate(sums_c):
        right.setdefault(row.tobytes(), idx)
    for i in range(len(xa)):
        rows = -(fa[i][None, :] + fa)
        for j, row in enumerate(rows):
            k = right.get(row.tobytes())
            if k is not None:
                c, d = divmod(k, len(xc))
                return xa[i], xa[j], xc[c], xc[d]
    raise SystemExit(f"no base sequences BS({m}, {n})")


def williamson_times_t(wseq: np.ndarray, t: np.ndarray) -> np.ndarray:
    """GS sequences of length u·w from Williamson sequences (4, w) and T-sequences (4, u), gcd(u, w) = 1."""
    w, u = wseq.shape[1], t.shape[1]
    assert math.gcd(u, w) == 1
    a, b, c, d = wseq
    # Quaternion array rows: Y_i = sum_k T_k ⊗ (sign * W_perm).
    rows = [[(1, a), (1, b), (1, c), (1, d)], [(-1, b), (1, a), (1, d), (-1, c)],
            [(-1, c), (-1, d), (1, a), (1, b)], [(-1, d), (1, c), (-1, b), (1, a)]]
    k = np.arange(u * w)
    out = np.zeros((4, u * w), dtype=np.int64)
    for i, row in enumerate(rows):
        for tk, (s, wk) in zip(t, row):
            out[i] += s * tk[k % u] * wk[k % w]
    return out


def build(order: int, seed: int) -> tuple[np.ndarray, str]:
    """GS sequences for one order, and a line describing how."""
    if order == 260:
        a, b = golay(32)
        return gs_from_t(t_sequences(np.r_[a, 1], np.r_[a, -1], b, b)), \
            "T-sequences of length 65 from base sequences BS(33, 32) built on a Golay pair of length 32"
    if order == 324:
        a, b = golay(40)
        return gs_from_t(t_sequences(np.r_[a, 1], np.r_[a, -1], b, b)), \
            "T-sequences of length 81 from base sequences BS(41, 40) built on a Golay pair of length 40"
    if order == 404:
        a, b = golay(100)
        return gs_from_t(t_sequences(a, b, np.array([1]), np.array([1]))), \
            "T-sequences of length 101 from Golay pairs of lengths 100 and 1"
    turyn = {236: 20, 356: 30, 428: 36}  # order 4(3n - 1) from TT(n)
    if order in turyn and turyn[order] in TURYN_TYPE:
        n = turyn[order]
        src = "Kharaghani and Tayfeh-Rezaie 2005" if n == 36 else "tools/hadamard_tt_search.py"
        return gs_from_t(turyn_type_to_t(n)), \
            (f"T-sequences of length {3 * n - 1} from base sequences BS({2 * n - 1}, {n}) = ((Z;W), (Z;-W), X, Y) "
             f"of Turyn-type sequences TT({n}) ({src})")
    # Williamson(3) x T-sequences of length u (3 does not divide u): order 12u.
    w3 = {372: ("bs", (16, 15)), 852: ("tt", 24), 996: ("tt", 28)}
    if order in w3:
        kind, key = w3[order]
        have = key in (BASE_SEQUENCES if kind == "bs" else TURYN_TYPE)
        if have:
            t = base_to_t(*key) if kind == "bs" else turyn_type_to_t(key)
            u = t.shape[1]
            what = f"BS{key}" if kind == "bs" else f"TT({key})"
            return williamson_times_t(WILLIAMSON3, t), \
                (f"Williamson matrices of order 3 x T-sequences of length {u} (from {what}, "
                 f"tools/hadamard_tt_search.py), Cooper-Wallis quaternion array, Z_{u} x Z_3 = Z_{3 * u}")
    # Williamson(5) (meet-in-the-middle) x T-sequences of length 47 from BS(24, 23): order 940 = 4·5·47.
    if order == 940 and (24, 23) in BASE_SEQUENCES:
        t = base_to_t(24, 23)
        return williamson_times_t(williamson_mitm(5), t), \
            ("Williamson matrices of order 5 (meet-in-the-middle) x T-sequences of length 47 (from BS(24, 23), "
             "tools/hadamard_tt_search.py), Cooper-Wallis quaternion array, Z_47 x Z_5 = Z_235")
    # Literature Williamson matrices x T-sequences from a Golay pair of length u - 1 and Golay(1): order 4uw.
    lit = {732: (61, 3), 980: (49, 5)}
    if order in lit:
        w, u = lit[order]
        a, b = golay(u - 1)
        t = t_sequences(a, b, np.array([1]), np.array([1]))
        return williamson_times_t(williamson_check(w), t), \
            (f"Williamson matrices of order {w} (London 2013) x T-sequences of length {u} (Golay {u - 1} + 1), "
             f"Cooper-Wallis quaternion array, Z_{u} x Z_{w} = Z_{u * w}")
    products = {476: (7, 17), 612: (9, 17), 836: (19, 11), 1012: (23, 11), 532: (19, 7), 988: (19, 13),
                756: (27, 7)}
    if order in products:
        w, u = products[order]
        if u in (7, 13):  # T-sequences from base sequences BS((u+1)/2, (u-1)/2) found by meet-in-the-middle
            t = t_sequences(*base_sequences_mitm((u + 1) // 2, (u - 1) // 2))
            tsrc = f"BS({(u + 1) // 2}, {(u - 1) // 2}) by meet-in-the-middle"
        else:  # T-sequences of length 1 + g from Golay pairs of lengths g and 1
            a, b = golay(u - 1)
            t = t_sequences(a, b, np.array([1]), np.array([1]))
            tsrc = f"Golay {u - 1} + 1"
        start = time.monotonic()
        ws = williamson(w, seed) if w < 19 else williamson_mitm(w)
        method = f"seeded tabu search, seed {seed}" if w < 19 else "meet-in-the-middle"
        return williamson_times_t(ws, t), (f"Williamson matrices of order {w} ({method}, "
                                           f"{time.monotonic() - start:.1f} s) x T-sequences of length {u} "
                                           f"({tsrc}), Cooper-Wallis quaternion array, Z_{u} x Z_{w} = Z_{u * w}")
    raise ValueError(f"no algebraic recipe for order {order} in this tool")


ORDERS = (260, 324, 404, 476, 612, 836, 1012, 532, 988, 756, 428, 236, 372, 732, 980)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", type=int, nargs="*", default=None)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out-dir", type=Path, default=DATA)
    args = parser.parse_args()
    for order in args.only or ORDERS:
        start = time.monotonic()
        seqs, how = build(order, args.seed)
        tt = summed_paf(seqs)
        assert tt[0] == order and not tt[1:].any(), f"order {order}: construction failed its PAF check"
        took = time.monotonic() - start
        write_gs_file(normalize(seqs.astype(np.int8)), args.out_dir / f"goethals_seidel_{order}.txt",
                      f"Built by: python tools/hadamard_algebraic.py --only {order} --seed {args.seed} ({took:.1f} s)\n{how}")
        print(f"order {order}: {how}; {took:.1f} s", flush=True)


if __name__ == "__main__":
    main()
