"""Exact ±1 Hadamard matrices: which orders hadakit can build, and how.

A Hadamard matrix of order ``n`` has entries ±1 and satisfies ``H @ H.T == n * I``.  hadakit builds them from

* **Sylvester** doubling: ``H_1 = [1]``, ``H_2n = [[H, H], [H, -H]]``, so ``H_{2^k}[i, j] = (-1)^popcount(i & j)``;
* **Paley I**: order ``q + 1`` for a prime power ``q ≡ 3 (mod 4)``;
* **Paley II**: order ``2(q + 1)`` for a prime power ``q ≡ 1 (mod 4)``;
* **data files** in ``data/``: four Goethals–Seidel sequences of length ``t`` each, giving order ``4t``: 172
  (found by ``tools/search_order_172.py``), and the orders of issue #22: 92, 116, 156, 188 (seeded tabu search,
  ``tools/hadamard_gs_search.py``), 260, 324, 404 (T-sequences from Golay pairs) and 476, 532, 612, 756, 836, 988,
  1012 (Williamson matrices × T-sequences), written by ``tools/hadamard_algebraic.py`` (round 1); 236, 428
  (T-sequences from Turyn-type sequences TT(20), TT(36)), 372 (Williamson(3) × T-sequences from base sequences
  BS(16, 15)), 732, 980 (Williamson(61), Williamson(49) × T-sequences), round 2, see ``tools/hadamard_tt_search.py``;
* **Miyamoto's construction** (round 2, in code): order ``4q`` for a prime power ``q ≡ 1 (mod 4)`` from a
  Hadamard matrix of order ``q - 1`` (292, 356, 436, 452, 596, 772, 932, 964 up to 1024);
* **Kronecker products** ``H_a ⊗ H_b`` of constructible orders.

**New base orders never replace an existing construction.**  The orders constructible before issue #22 (the
*legacy* orders: 201 of them up to 1024) keep exactly their old matrix and old ``base_order``: they are resolved
first with the legacy rules alone (Sylvester, Paley I/II, the 172 data file, Kronecker products of legacy
orders).  Only an order that the legacy rules cannot reach is resolved with the new data files (and Kronecker
products that may use them).  The rounds of issue #22 are further tiers of the same kind (:func:`_tier`): an order
is resolved by the first round whose rules reach it, so round 2 changes nothing round 1 built (35344 = 188 · 188
stays a Kronecker product although round 2 builds 8836 = 4 · 47² by Miyamoto).
So ``base_order(368)`` stays 368 (Paley I, q = 367) although 368 = 92·4 and 92 is now constructible, and
``base_order`` is "the smallest constructible m" among the orders of the first tier that reaches ``n``.  tests/data/hadamard_hashes.json pins the legacy matrices.

Every constructible ``n`` is written ``n = m · 2^k`` with ``m = base_order(n)`` the smallest constructible order
that leaves a power of two (subject to the legacy rule above), and

    hadamard_matrix(n) == kron(hadamard_matrix(m), sylvester(2^k))          (exactly)

The transform kernels rely on this: they apply ``H_m`` as a small dense matmul and ``H_{2^k}`` as a fast
Walsh–Hadamard butterfly (see docs/ARCHITECTURE.md).  A base order ``m > 1`` is built by its *canonical*
construction, chosen in this order: Paley I, Paley II, data file, Miyamoto, Kronecker product of two constructible
orders that are not powers of two (powers of two are the Sylvester factor's job; the first order that needs such a
product is 1904 = 28 · 68).
docs/hadamard_orders.md lists which orders up to 1024 are covered.

Paley needs the quadratic character of GF(q) for prime powers ``q = p^k`` (9, 25, 27, 49, 81, 121, 125, ...):
:class:`GaloisField` implements GF(p^k) as polynomials over GF(p) modulo a primitive polynomial found by search.
"""

from __future__ import annotations

import functools
import math
import numbers
import operator
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "GaloisField",
    "HadamardDataError",
    "base_order",
    "construction",
    "covered_orders",
    "hadamard_matrix",
    "is_constructible",
    "uncovered_orders",
]

_DATA_DIR = Path(__file__).with_name("data")
# Base orders read from data files: order -> (file name, description).  See tools/search_order_172.py.
# _LEGACY_DATA are the data files that existed before issue #22; their orders resolve with the legacy rules.
_LEGACY_DATA = {172: ("goethals_seidel_172.txt", "goethals-seidel(43) [data file]")}
# Orders added for issue #22, in rounds (tiers); an order is resolved by the first tier whose rules reach it, so a
# later round never changes what an earlier one built (see _tier).  Round 1: tools/hadamard_gs_search.py,
# tools/hadamard_algebraic.py.
_ROUND1_DATA = {
    92: ("goethals_seidel_92.txt", "goethals-seidel(23) [data file: tabu search]"),
    116: ("goethals_seidel_116.txt", "goethals-seidel(29) [data file: tabu search]"),
    156: ("goethals_seidel_156.txt", "goethals-seidel(39) [data file: tabu search]"),
    188: ("goethals_seidel_188.txt", "goethals-seidel(47) [data file: tabu search]"),
    260: ("goethals_seidel_260.txt", "goethals-seidel(65) [data file: T-sequences from base sequences BS(33, 32) on Golay(32)]"),
    324: ("goethals_seidel_324.txt", "goethals-seidel(81) [data file: T-sequences from base sequences BS(41, 40) on Golay(40)]"),
    404: ("goethals_seidel_404.txt", "goethals-seidel(101) [data file: T-sequences from Golay(100) and Golay(1)]"),
    476: ("goethals_seidel_476.txt", "goethals-seidel(119) [data file: Williamson(7) × T-sequences(17)]"),
    612: ("goethals_seidel_612.txt", "goethals-seidel(153) [data file: Williamson(9) × T-sequences(17)]"),
    532: ("goethals_seidel_532.txt", "goethals-seidel(133) [data file: Williamson(19) × T-sequences(7)]"),
    756: ("goethals_seidel_756.txt", "goethals-seidel(189) [data file: Williamson(27) × T-sequences(7)]"),
    836: ("goethals_seidel_836.txt", "goethals-seidel(209) [data file: Williamson(19) × T-sequences(11)]"),
    988: ("goethals_seidel_988.txt", "goethals-seidel(247) [data file: Williamson(19) × T-sequences(13)]"),
    1012: ("goethals_seidel_1012.txt", "goethals-seidel(253) [data file: Williamson(23) × T-sequences(11)]"),
}
# Round 2: data from tools/hadamard_algebraic.py on Turyn-type / base sequences (literature data or
# tools/hadamard_tt_search.py)
# and, in code, Miyamoto's construction (_miyamoto).
_ROUND2_DATA = {
    236: ("goethals_seidel_236.txt",
          "goethals-seidel(59) [data file: T-sequences from Turyn-type TT(20), tabu search]"),
    372: ("goethals_seidel_372.txt",
          "goethals-seidel(93) [data file: Williamson(3) × T-sequences(31) from base sequences BS(16, 15), "
          "tabu search]"),
    428: ("goethals_seidel_428.txt", "goethals-seidel(107) [data file: T-sequences from Turyn-type TT(36)]"),
    732: ("goethals_seidel_732.txt", "goethals-seidel(183) [data file: Williamson(61) × T-sequences(3)]"),
    980: ("goethals_seidel_980.txt", "goethals-seidel(245) [data file: Williamson(49) × T-sequences(5)]"),
}
# Tier t >= 1: (data files new in tier t, whether Miyamoto's construction is a rule of tier t).  Tier 0 = legacy.
_TIERS = ({}, (_ROUND1_DATA, False), (_ROUND2_DATA, True))
_NEW_DATA = {**_ROUND1_DATA, **_ROUND2_DATA}

_DATA_FILES = {**_LEGACY_DATA, **_NEW_DATA}


class HadamardDataError(RuntimeError):
    """A Hadamard data file in ``hadakit/transforms/data`` is malformed or does not give a Hadamard matrix.

    The message names the file.  Reinstall hadakit (or restore the file from the repository) to fix it.
    """

# Paley matrices are filled in row blocks of about this many entries, to bound temporaries for large q.
_BLOCK_ENTRIES = 1 << 22


# --------------------------------------------------------------------------------------------------------------
# Number theory and finite fields
# --------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _prime_power(q: int) -> tuple[int, int] | None:
    """``(p, k)`` with ``q == p**k`` for a prime ``p`` and ``k >= 1``, or None."""
    if q < 2:
        return None
    p = next((f for f in range(2, math.isqrt(q) + 1) if q % f == 0), q)  # smallest prime factor
    k = 0
    while q % p == 0:
        q //= p
        k += 1
    return (p, k) if q == 1 else None


@functools.lru_cache(maxsize=None)
def _primitive_polynomial(p: int, k: int) -> tuple[tuple[int, ...], np.ndarray]:
    """The first monic degree-``k`` polynomial ``f`` over GF(p) (ordered by the integer ``sum f_j p^j``) for
    which ``x`` generates the multiplicative group of GF(p)[x]/(f); and the powers of ``x``.

    Returns ``(coeffs, exp)``: ``coeffs = (f_0, ..., f_{k-1})`` with ``f = x^k + sum f_j x^j``, and
    ``exp[j]`` = the encoding (see :class:`GaloisField`) of ``x^j`` for ``j = 0 .. q-2``.  Such an ``f`` is
    irreducible: if ``x`` has multiplicative order ``q - 1`` the quotient ring has ``q - 1`` units, i.e. it is
    a field.  (For ``k == 1`` this is the search for a primitive root ``-f_0`` mod ``p``.)
    """
    q = p**k
    for code in range(1, q):
        coeffs = tuple((code // p**j) % p for j in range(k))
        if coeffs[0] == 0:  # x would divide f: x is not a unit
            continue
        exp = np.empty(q - 1, dtype=np.int64)
        power = [1] + [0] * (k - 1)  # coefficients of x^j, low degree first
        for j in range(q - 1):
            exp[j] = sum(c * p**i for i, c in enumerate(power))
            if j > 0 and exp[j] == 1:
                break  # x has order j < q - 1
            carry = power[-1]  # multiply by x, then reduce x^k = -sum f_i x^i
            power = [(lo - carry * f) % p for lo, f in zip([0] + power[:-1], coeffs)]
        else:
            exp.setflags(write=False)  # shared by every GaloisField(q)
            return coeffs, exp
    raise AssertionError(f"no primitive polynomial of degree {k} over GF({p})")  # impossible: one always exists


class GaloisField:
    """The finite field GF(q), ``q = p^k``, on integer-encoded elements.

    The element ``c_0 + c_1 x + ... + c_{k-1} x^{k-1}`` of GF(p)[x]/(f) is encoded as the integer
    ``sum c_j p^j`` in ``0 .. q-1`` (so 0 and 1 are the field's 0 and 1, and for ``k == 1`` the encoding is
    the residue itself).  ``f`` is a primitive polynomial, so ``x`` generates the multiplicative group:
    multiplication goes through log/exp tables and the quadratic character is the parity of the log.
    All operations take ints or integer numpy arrays (broadcasting) and return numpy arrays.
    """

    def __init__(self, q: int):
        pk = _prime_power(q)
        if pk is None:
            raise ValueError(f"GaloisField: q={q} is not a prime power")
        self.p, self.k = pk
        self.q = q
        self.modulus, self._exp = _primitive_polynomial(self.p, self.k)
        self._log = np.full(q, -1, dtype=np.int64)
        self._log[self._exp] = np.arange(q - 1)
        self._place = self.p ** np.arange(self.k)  # p^j, the weight of digit j

    def __repr__(self) -> str:
        return f"GaloisField({self.q})"

    def _digitwise(self, a, b, sign: int) -> np.ndarray:
        """Coefficient-wise ``a + sign * b`` mod p (addition in GF(p)[x])."""
        a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
        out = np.zeros(np.broadcast_shapes(a.shape, b.shape), dtype=np.int64)
        for place in self._place:
            out += ((a // place + sign * (b // place)) % self.p) * place
        return out

    def add(self, a, b) -> np.ndarray:
        return self._digitwise(a, b, 1)

    def sub(self, a, b) -> np.ndarray:
        return self._digitwise(a, b, -1)

    def neg(self, a) -> np.ndarray:
        return self._digitwise(0, a, -1)

    def mul(self, a, b) -> np.ndarray:
        a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
        product = self._exp[(self._log[a] + self._log[b]) % (self.q - 1)]
        return np.where((a == 0) | (b == 0), 0, product)

    def inv(self, a) -> np.ndarray:
        a = np.asarray(a, dtype=np.int64)
        if (a == 0).any():
            raise ZeroDivisionError("GaloisField.inv: 0 has no inverse")
        return self._exp[(-self._log[a]) % (self.q - 1)]

    def quadratic_character(self, a) -> np.ndarray:
        """``χ(a)``: 0 for 0, +1 for a nonzero square, -1 otherwise (int8)."""
        log = self._log[np.asarray(a, dtype=np.int64)]
        return np.where(log < 0, 0, 1 - 2 * (log % 2)).astype(np.int8)


@functools.lru_cache(maxsize=16)
def _field(q: int) -> GaloisField:
    return GaloisField(q)


# --------------------------------------------------------------------------------------------------------------
# Which orders are constructible
# --------------------------------------------------------------------------------------------------------------


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@functools.lru_cache(maxsize=None)
def _tier(n: int) -> int | None:
    """The first tier (0 = legacy rules, 1, 2 = the rounds of issue #22) whose rules construct order ``n``, or None.

    Each tier's rules include those of the tiers before it, so ``n`` is constructible in every tier from this one on;
    ``n`` is built by the rules of this tier (and its factors by theirs), so adding a tier changes no earlier order.
    """
    for t in range(len(_TIERS)):
        if _chain_base(n, t) is not None:
            return t
    return None


@functools.lru_cache(maxsize=None)
def _chain_base(n: int, t: int) -> int | None:
    """The smallest ``m`` with ``n = m · 2^k`` that is a base order under the rules of tiers ``<= t``, or None."""
    if t == 0:
        return _legacy_base_order(n)
    m = n // (n & -n)
    while m <= n:
        if _base_recipe(m, t) is not None:
            return m
        m *= 2
    return None


@functools.lru_cache(maxsize=None)
def _base_recipe(m: int, t: int) -> tuple | None:
    """The construction of ``m`` as a base order under the rules of tiers ``<= t`` (None if it is not one).

    An ``m`` already constructible in an earlier tier keeps that tier's recipe (None when it is not a base order
    there: it is then reached by doubling a smaller base).  Otherwise the rules new in tier ``t``: its data files,
    Miyamoto's construction (tier 2 on), then a Kronecker product of two orders constructible in tiers ``<= t``.
    """
    if t == 0:
        return _legacy_recipe(m)
    earlier = next((u for u in range(t) if _chain_base(m, u) is not None), None)
    if earlier is not None:
        return _base_recipe(m, earlier)
    data, miyamoto = _TIERS[t]
    if m in data:
        return ("data", m)
    q = m // 4
    if miyamoto and m % 8 == 4 and q % 4 == 1 and _prime_power(q) and _chain_base(q - 1, t) is not None:
        return ("miyamoto", q)
    for a in range(12, math.isqrt(m) + 1, 4):
        b, rest = divmod(m, a)
        if rest == 0 and b % 4 == 0 and not _is_power_of_two(a) and not _is_power_of_two(b):
            if _chain_base(a, t) is not None and _chain_base(b, t) is not None:
                return ("kron", a, b)
    return None


def _recipe(m: int) -> tuple | None:
    """The canonical construction of order ``m`` as a base order (without a Sylvester factor on top), or None.

    ``("sylvester", m)`` for powers of two, ``("paley1", q)``, ``("paley2", q)``, ``("data", m)``,
    ``("miyamoto", q)`` or ``("kron", a, b)``.  Only cheap arithmetic: no matrix is built.  Resolved by the first
    tier that reaches ``m`` (see :func:`_tier`): a new order never replaces an existing construction.
    """
    t = _tier(m)
    return None if t is None else _base_recipe(m, t)


@functools.lru_cache(maxsize=None)
def _legacy_base_order(n: int) -> int | None:
    """``base_order`` as it was before issue #22 (legacy rules only)."""
    m = n // (n & -n)
    while m <= n:
        if _legacy_recipe(m) is not None:
            return m
        m *= 2
    return None


@functools.lru_cache(maxsize=None)
def _legacy_recipe(m: int) -> tuple | None:
    """The construction of ``m`` by the rules that existed before issue #22 (unchanged, so legacy matrices are)."""
    if _is_power_of_two(m):
        return ("sylvester", m)
    if m % 4:
        return None
    if (m - 1) % 4 == 3 and _prime_power(m - 1):
        return ("paley1", m - 1)
    if (m // 2 - 1) % 4 == 1 and _prime_power(m // 2 - 1):
        return ("paley2", m // 2 - 1)
    if m in _LEGACY_DATA:
        return ("data", m)
    # Both factors are multiples of 4 (Hadamard orders > 2) and not powers of two; smallest factor first.
    for a in range(12, math.isqrt(m) + 1, 4):
        b, rest = divmod(m, a)
        if rest == 0 and b % 4 == 0 and not _is_power_of_two(a) and not _is_power_of_two(b):
            if _legacy_base_order(a) is not None and _legacy_base_order(b) is not None:
                return ("kron", a, b)
    return None


def _integer(n, name: str) -> int:
    """``n`` as a Python int; ValueError (naming the nearest constructible orders) when it is not an integer."""
    if not isinstance(n, bool):
        try:
            return operator.index(n)
        except TypeError:
            pass
    nearby = ""
    if isinstance(n, numbers.Real) and not isinstance(n, bool) and math.isfinite(n):
        nearby = "; " + _nearest_text(math.floor(n), math.ceil(n))
    raise ValueError(f"{name}: the order n must be an int, got n={n!r} ({type(n).__name__}){nearby}")


def base_order(n: int) -> int | None:
    """The smallest constructible order ``m`` with ``n = m · 2^k`` (``k >= 0``), or None if there is none.

    ``base_order(1024) == 1``, ``base_order(768) == 12``, ``base_order(40) == 20``, ``base_order(11008) == 172``.
    ``hadamard_matrix(n)`` is ``kron(hadamard_matrix(m), sylvester(n // m))``.  Cheap for any ``n`` (no matrix
    is built); None for ``n < 1``.
    """
    n = _integer(n, "base_order")
    if n < 1:
        return None
    t = _tier(n)  # orders constructible before a round of issue #22 keep their base order
    return None if t is None else _chain_base(n, t)


def is_constructible(n: int) -> bool:
    """Whether :func:`hadamard_matrix` can build order ``n``."""
    return base_order(n) is not None


def covered_orders(limit: int = 1024) -> list[int]:
    """All constructible orders ``<= limit``, ascending (1, 2 and multiples of 4)."""
    limit = _integer(limit, "covered_orders")
    return [n for n in [1, 2, *range(4, limit + 1, 4)] if n <= limit and is_constructible(n)]


def uncovered_orders(limit: int = 1024) -> list[int]:
    """The multiples of 4 ``<= limit`` that hadakit cannot construct, ascending."""
    limit = _integer(limit, "uncovered_orders")
    return [n for n in range(4, limit + 1, 4) if not is_constructible(n)]


def _nearest_text(below_from: int, above_from: int) -> str:
    """'nearest constructible orders: B below, A above' for the nearest ones <= below_from and >= above_from."""
    below = next((m for m in range(below_from, 0, -1) if is_constructible(m)), None)
    above = next(m for m in range(max(above_from, 1), 2 * max(above_from, 1) + 1) if is_constructible(m))
    if below is None:
        return f"nearest constructible order: {above} (above)"
    return f"nearest constructible orders: {below} below, {above} above"


def _order(n, name: str) -> int:
    """Validate ``n`` as a constructible order; ValueError naming the problem and the nearest orders otherwise."""
    n = _integer(n, name)
    if is_constructible(n):
        return n
    if n < 1:
        why = "must be positive"
    elif n % 4:
        why = "is not a Hadamard order (Hadamard matrices exist only for n = 1, 2 and multiples of 4)"
    else:
        why = ("is a multiple of 4 that no supported construction reaches "
               "(Sylvester, Paley I/II, Miyamoto, Kronecker products, stored data; see docs/hadamard_orders.md)")
    raise ValueError(f"{name}: n={n} {why}; {_nearest_text(n - 1, n + 1)}. "
                     "Use a nearby order, or an orthogonal fallback for this size.")


def construction(n: int) -> str:
    """Human-readable construction of ``hadamard_matrix(n)``, e.g. ``"paley1(q=11) ⊗ sylvester(64)"``."""
    n = _order(n, "construction")
    m = base_order(n)
    if m == 1:
        return f"sylvester({n})"
    return _describe_base(m) + (f" ⊗ sylvester({n // m})" if n > m else "")


def _describe_base(m: int) -> str:
    kind, *args = _recipe(m)
    if kind == "paley1":
        return f"paley1(q={args[0]})"
    if kind == "paley2":
        return f"paley2(q={args[0]})"
    if kind == "data":
        return _DATA_FILES[m][1]
    if kind == "miyamoto":
        return f"miyamoto(q={args[0]}; H({args[0] - 1}) = {construction(args[0] - 1)})"
    factors = [construction(f) for f in args]  # kron of two orders
    return " ⊗ ".join(f"({f})" if "⊗" in f else f for f in factors)


# --------------------------------------------------------------------------------------------------------------
# Building the matrices (int8 numpy, cached, read-only)
# --------------------------------------------------------------------------------------------------------------


def _sylvester(n: int) -> np.ndarray:
    h = np.ones((1, 1), dtype=np.int8)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def _jacobsthal(q: int) -> np.ndarray:
    """``Q[i, j] = χ(a_i - a_j)`` over GF(q) (elements in their integer encoding), int8, filled in row blocks."""
    field = _field(q)
    elements = np.arange(q)
    out = np.empty((q, q), dtype=np.int8)
    rows = max(1, _BLOCK_ENTRIES // q)
    for start in range(0, q, rows):
        block = elements[start : start + rows, None]
        out[start : start + rows] = field.quadratic_character(field.sub(block, elements[None, :]))
    return out


def _paley1(q: int) -> np.ndarray:
    """Order q + 1, q ≡ 3 mod 4: ``H = I + S`` with the skew conference matrix ``S = [[0, 1ᵀ], [-1, Q]]``."""
    h = np.ones((q + 1, q + 1), dtype=np.int8)
    h[1:, 0] = -1
    h[1:, 1:] = _jacobsthal(q) + np.eye(q, dtype=np.int8)
    return h


def _paley2(q: int) -> np.ndarray:
    """Order 2(q + 1), q ≡ 1 mod 4: the symmetric conference matrix ``S = [[0, 1ᵀ], [1, Q]]`` expanded as
    ``S ⊗ [[1, 1], [1, -1]] + I ⊗ [[1, -1], [-1, -1]]`` (each 0 of S becomes a ±1 block)."""
    s = np.zeros((q + 1, q + 1), dtype=np.int8)
    s[0, 1:] = 1
    s[1:, 0] = 1
    s[1:, 1:] = _jacobsthal(q)
    one = np.array([[1, 1], [1, -1]], dtype=np.int8)
    zero = np.array([[1, -1], [-1, -1]], dtype=np.int8)
    return np.kron(s, one) + np.kron(np.eye(q + 1, dtype=np.int8), zero)


def _goethals_seidel(a: np.ndarray, b: np.ndarray, c: np.ndarray, d: np.ndarray) -> np.ndarray:
    """The Goethals–Seidel array of the circulants with first rows a, b, c, d (order 4·len(a))."""
    n = len(a)
    index = (np.arange(n)[None, :] - np.arange(n)[:, None]) % n  # circulant: X[i, j] = x[(j - i) mod n]
    A, B, C, D = (np.asarray(x, dtype=np.int8)[index] for x in (a, b, c, d))

    def r(x: np.ndarray) -> np.ndarray:  # x @ R with R the back-diagonal permutation: reverse the columns
        return x[:, ::-1]

    return np.block([
        [A, r(B), r(C), r(D)],
        [-r(B), A, r(D.T), -r(C.T)],
        [-r(C), -r(D.T), A, r(B.T)],
        [-r(D), r(C.T), -r(B.T), A],
    ])


def _from_data_file(m: int, path: Path | str | None = None) -> np.ndarray:
    """The Goethals–Seidel matrix of order ``m`` from its data file (or from ``path``, e.g. a copy to test).

    Verified in integers on every load (the caller caches the result): four lines of ``m // 4`` signs, the summed
    periodic autocorrelation of the four sequences is ``(m, 0, ..., 0)`` in int64, and ``H Hᵀ == m I`` exactly.  Raises :class:`HadamardDataError` naming the file otherwise.
    """
    path = Path(path) if path is not None else _DATA_DIR / _DATA_FILES[m][0]
    try:
        text = path.read_text()
    except OSError as err:
        raise HadamardDataError(f"corrupt Hadamard data file {path}: cannot read it ({err})") from err
    lines = [s.strip() for s in text.splitlines() if s.strip() and not s.lstrip().startswith("#")]
    if len(lines) != 4 or any(len(s) != m // 4 or set(s) - {"+", "-"} for s in lines):
        raise HadamardDataError(
            f"corrupt Hadamard data file {path}: expected 4 lines of {m // 4} '+'/'-' characters")
    seqs = np.array([[1 if ch == "+" else -1 for ch in s] for s in lines], dtype=np.int64)
    t = m // 4
    paf = np.array([(seqs * np.roll(seqs, -s, axis=1)).sum() for s in range(t)], dtype=np.int64)
    h = _goethals_seidel(*seqs)
    # H Hᵀ in BLAS float64 is exact here (±1 entries, every partial sum an integer of magnitude <= m < 2^53) and is
    # compared as int64; numpy's int64 matmul would take about a second at m ~ 1000.
    hh = np.rint(h.astype(np.float64) @ h.T.astype(np.float64)).astype(np.int64)
    if paf[0] != m or paf[1:].any() or not np.array_equal(hh, m * np.eye(m, dtype=np.int64)):
        raise HadamardDataError(
            f"corrupt Hadamard data file {path}: the matrix it gives is not Hadamard (H Hᵀ != {m} I)")
    return h


# Miyamoto's array: block (i, j) of H is [[s_ij, r_ij·1ᵀ], [r_ij·1, s_ij·T_ij]] with s = I + S and r = S - I for
# the skew ±1 matrix S below (so s and r differ on the diagonal only).
_MIYAMOTO_SKEW = np.array([[0, 1, 1, 1], [-1, 0, 1, -1], [-1, -1, 0, 1], [-1, 1, -1, 0]], dtype=np.int8)


def _miyamoto(q: int) -> np.ndarray:
    """Order 4q for a prime power q ≡ 1 mod 4 from a Hadamard matrix K of order q - 1 (M. Miyamoto, "A construction
    of Hadamard matrices", J. Combin. Theory Ser. A 57 (1991) 86-108).

    With Q the (symmetric) Jacobsthal matrix of GF(q), m = (q-1)/2 and the nonzero field elements split into
    P = {x : χ(x) = 1} and N = {x : χ(x) = -1} (the first row of Q), let C1 = -Q[P, P], C2 = Q[P, N], C4 = Q[N, N]
    and K = [[K1, K2], [-K3, K4]] in m×m blocks.  The 4m×4m matrices, in 4×4 arrays of m×m blocks,

        U = [[C1, C2, 0, 0], [C2ᵀ, C4, 0, 0], [0, 0, C1, C2], [0, 0, C2ᵀ, C4]],
        V = [[I, 0, K1, K2], [0, I, K3, K4], [K1ᵀ, K3ᵀ, I, 0], [K2ᵀ, K4ᵀ, 0, I]],

    have disjoint supports; for each of their m×m blocks U_ij, V_ij the ±1 matrix T_ij = [[U_ij + V_ij, U_ij - V_ij],
    [U_ij - V_ij, U_ij + V_ij]] has order 2m = q - 1, and H is the 4×4 array of bordered blocks
    [[s_ij, r_ij 1ᵀ], [r_ij 1, s_ij T_ij]] of order q each (s, r: the sign tables above ``_MIYAMOTO_SKEW``).
    Verified in integers (H Hᵀ = 4q I) here; raises AssertionError otherwise (a bug, never bad input).
    """
    m = (q - 1) // 2
    field = _field(q)
    chi_row = field.quadratic_character(field.sub(0, np.arange(q)))  # χ(0 - x) = first row of Q
    pos = np.flatnonzero(chi_row == 1)
    neg = np.flatnonzero(chi_row == -1)
    order = np.concatenate([pos, neg])
    jac = _jacobsthal(q).astype(np.int64)[np.ix_(order, order)]
    c1, c2, c4 = -jac[:m, :m], jac[:m, m:], jac[m:, m:]
    k = _hadamard_int8(q - 1).astype(np.int64)
    k1, k2, k3, k4 = k[:m, :m], k[:m, m:], -k[m:, :m], k[m:, m:]
    zero, eye = np.zeros((m, m), dtype=np.int64), np.eye(m, dtype=np.int64)
    u = [[c1, c2, zero, zero], [c2.T, c4, zero, zero], [zero, zero, c1, c2], [zero, zero, c2.T, c4]]
    v = [[eye, zero, k1, k2], [zero, eye, k3, k4], [k1.T, k3.T, eye, zero], [k2.T, k4.T, zero, eye]]
    s = np.eye(4, dtype=np.int64) + _MIYAMOTO_SKEW
    r = _MIYAMOTO_SKEW - np.eye(4, dtype=np.int64)
    size = 2 * m + 1  # = q
    h = np.empty((4 * q, 4 * q), dtype=np.int64)
    for i in range(4):
        for j in range(4):
            plus, minus = u[i][j] + v[i][j], u[i][j] - v[i][j]
            t = np.block([[plus, minus], [minus, plus]])
            block = h[i * size:(i + 1) * size, j * size:(j + 1) * size]
            block[0, 0] = s[i, j]
            block[0, 1:] = r[i, j]
            block[1:, 0] = r[i, j]
            block[1:, 1:] = s[i, j] * t
    hh = np.rint(h.astype(np.float64) @ h.T.astype(np.float64)).astype(np.int64)
    if not (np.abs(h) == 1).all() or not np.array_equal(hh, 4 * q * np.eye(4 * q, dtype=np.int64)):
        raise AssertionError(f"Miyamoto construction for q={q} did not give a Hadamard matrix")  # a bug
    return h.astype(np.int8)


@functools.lru_cache(maxsize=32)
def _hadamard_int8(n: int) -> np.ndarray:
    """The Hadamard matrix of constructible order ``n`` as a read-only int8 array (cached; never mutate)."""
    m = base_order(n)
    if m == 1:
        h = _sylvester(n)
    elif m < n:
        h = np.kron(_hadamard_int8(m), _sylvester(n // m))
    else:
        kind, *args = _recipe(m)
        if kind == "paley1":
            h = _paley1(args[0])
        elif kind == "paley2":
            h = _paley2(args[0])
        elif kind == "data":
            h = _from_data_file(m)
        elif kind == "miyamoto":
            h = _miyamoto(args[0])
        else:  # kron of two base orders
            h = np.kron(_hadamard_int8(args[0]), _hadamard_int8(args[1]))
    h.setflags(write=False)
    return h


def hadamard_matrix(n: int, *, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The exact ±1 Hadamard matrix of order ``n`` (``H @ H.T == n * I``), unnormalized.

    ``n`` must be constructible (:func:`is_constructible`): 1, 2, or a multiple of 4 reached by Sylvester,
    Paley I/II, Kronecker products or a stored data file; otherwise ValueError names the nearest constructible
    orders.  With ``m = base_order(n)``, the result equals ``kron(hadamard_matrix(m), sylvester(n // m))``.
    The construction is cached; each call returns a new tensor, safe to modify in place.
    """
    return torch.tensor(_hadamard_int8(_order(n, "hadamard_matrix")), dtype=dtype, device=device)
