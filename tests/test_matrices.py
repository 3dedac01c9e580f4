"""Tests for hadakit.transforms.matrices: exact Hadamard matrices, their orders, and GF(p^k) arithmetic."""

import itertools

import numpy as np
import pytest
import torch

from hadakit.transforms import matrices
from hadakit.transforms.matrices import (
    GaloisField,
    base_order,
    construction,
    covered_orders,
    hadamard_matrix,
    is_constructible,
    uncovered_orders,
)

COVERED = covered_orders(1024)
BASES = [n for n in COVERED if n > 1 and base_order(n) == n]
# Every order up to 256, every base order up to 512 (each one a distinct Paley / data-file build), every other
# base order above 512 plus the two there over GF(p^2) (580: q = 17^2, 724: q = 19^2), and a sample of
# Kronecker-with-Sylvester orders (a full sweep up to 1024 takes about a minute on a loaded CPU).  float32 matmuls are exact here: every partial
# sum is an integer of magnitude <= n < 2^24.
CHECKED = sorted(
    {n for n in COVERED if n <= 256}
    | {n for n in BASES if n <= 512}
    | set([n for n in BASES if n > 512][::2])
    | {580, 724, 320, 344, 512, 688, 768, 880, 1024}
)


def _sylvester_popcount(n: int) -> np.ndarray:
    i = np.arange(n)
    parity = np.vectorize(lambda v: bin(v).count("1") % 2)(i[:, None] & i[None, :])
    return (1 - 2 * parity).astype(np.int8)


@pytest.mark.parametrize("n", CHECKED)
def test_hadamard_property_exact(n):
    h = hadamard_matrix(n)
    assert h.shape == (n, n) and h.dtype == torch.float32
    assert torch.all(h.abs() == 1)
    assert torch.equal(h @ h.T, n * torch.eye(n))


def test_required_orders_are_covered():
    for n in [1, 2, 4, 12, 20, 28, 36, 40, 44, 52, 60, 76, 108, 172, 11008]:
        assert is_constructible(n), n
    assert set(COVERED) == {1, 2} | {n for n in range(4, 1025, 4) if n not in uncovered_orders(1024)}
    assert 268 in uncovered_orders(1024) and 412 in uncovered_orders(1024) and 236 not in uncovered_orders(1024)
    assert all(n % 4 == 0 for n in uncovered_orders(1024))


@pytest.mark.parametrize("n", [1, 2, 4, 8, 64, 256])
def test_sylvester_matches_popcount_formula(n):
    assert np.array_equal(hadamard_matrix(n, dtype=torch.int8).numpy(), _sylvester_popcount(n))


@pytest.mark.parametrize("m,k", [(12, 1), (12, 6), (20, 2), (28, 3), (36, 1), (52, 2), (172, 1), (108, 2)])
def test_kronecker_convention(m, k):
    assert base_order(m * 2**k) == m
    expected = np.kron(hadamard_matrix(m, dtype=torch.int8).numpy(), _sylvester_popcount(2**k))
    assert np.array_equal(hadamard_matrix(m * 2**k, dtype=torch.int8).numpy(), expected)


def test_base_order_values():
    assert base_order(1024) == 1
    assert base_order(1) == 1 and base_order(2) == 1 and base_order(4) == 1
    assert base_order(12 * 64) == 12
    assert base_order(40) == 20
    assert base_order(20) == 20
    assert base_order(11008) == 172
    assert base_order(16256) is None  # 127·128: none of 508, 1016, ..., 16256 is constructible
    assert base_order(13696) == 428  # 107·128: 428 (issue #22, round 2) ⊗ sylvester(32)
    assert base_order(6) is None and base_order(116) == 116 and base_order(268) is None
    assert base_order(0) is None and base_order(-4) is None
    assert base_order(2**20) == 1 and base_order(12 * 2**18) == 12


def test_base_order_is_smallest():
    for n in range(4, 2049, 4):
        m = base_order(n)
        if m is None:
            assert not is_constructible(n)
            continue
        k = n // m
        assert n % m == 0 and k & (k - 1) == 0
        # No smaller candidate m / 2^j is constructible -- except a base order added in a later tier, which never
        # replaces the construction an order had before (docs/hadamard_orders.md): 368 stays Paley's though 92
        # exists now.
        j = 1
        while m % 2**j == 0:
            assert not is_constructible(m >> j) or matrices._tier(m >> j) > matrices._tier(n), (n, m, m >> j)
            j += 1


def test_construction_strings():
    assert construction(1) == "sylvester(1)"
    assert construction(1024) == "sylvester(1024)"
    assert construction(12) == "paley1(q=11)"
    assert construction(12 * 64) == "paley1(q=11) ⊗ sylvester(64)"
    assert construction(28) == "paley1(q=27)"
    assert construction(36) == "paley2(q=17)"
    assert construction(52) == "paley2(q=25)"
    assert construction(40) == "paley1(q=19) ⊗ sylvester(2)"
    assert construction(172) == "goethals-seidel(43) [data file]"
    assert construction(11008) == "goethals-seidel(43) [data file] ⊗ sylvester(64)"


def test_kronecker_of_two_base_orders():
    # 1904 = 28·68 is the smallest order that needs a product of two non-power-of-two orders.
    assert all(matrices._recipe(m)[0] != "kron" for m in BASES)
    assert base_order(1904) == 1904 and base_order(1904 * 4) == 1904
    assert construction(1904) == "paley1(q=27) ⊗ paley1(q=67)"
    h = hadamard_matrix(1904, dtype=torch.int8)
    assert torch.equal(h, torch.kron(hadamard_matrix(28, dtype=torch.int8), hadamard_matrix(68, dtype=torch.int8)))
    hf = h.float()  # float32 sums of ±1 up to 1904 are exact
    assert torch.equal(hf @ hf.T, 1904 * torch.eye(1904))


@pytest.mark.parametrize(
    "bad,expected",
    [
        (412, "nearest constructible orders: 408 below, 416 above"),
        (6, "nearest constructible orders: 4 below, 8 above"),
        (3, "nearest constructible orders: 2 below, 4 above"),
        (268, "nearest constructible orders: 264 below, 272 above"),
        (0, "nearest constructible order: 1"),
        (-8, "nearest constructible order: 1"),
        (16256, "16256"),
        (12.5, "nearest constructible orders: 12 below, 16 above"),
        ("12", "must be an int"),
        (True, "must be an int"),
    ],
)
def test_bad_orders_raise_with_nearby_orders(bad, expected):
    with pytest.raises(ValueError) as err:
        hadamard_matrix(bad)
    assert expected in str(err.value)
    assert f"n={bad!r}" in str(err.value) or f"n={bad}" in str(err.value)
    with pytest.raises(ValueError):
        construction(bad)


def test_numpy_integer_orders_accepted():
    assert hadamard_matrix(np.int64(12)).shape == (12, 12)
    assert base_order(np.int32(40)) == 20


def test_dtype_and_device():
    h = hadamard_matrix(12, dtype=torch.bfloat16, device="cpu")
    assert h.dtype == torch.bfloat16 and h.device.type == "cpu"
    assert torch.equal(h.float(), hadamard_matrix(12))


def test_cache_not_corrupted_by_in_place_edits():
    for dtype in (torch.float32, torch.int8):
        h = hadamard_matrix(20, dtype=dtype)
        reference = h.clone()
        h.mul_(0)
        h[0, 0] = 7
        assert torch.equal(hadamard_matrix(20, dtype=dtype), reference)
    with pytest.raises(ValueError):  # the cached numpy array is read-only
        matrices._hadamard_int8(20)[0, 0] = 0


def test_corrupt_data_file_raises(tmp_path, monkeypatch):
    good = (matrices._DATA_DIR / "goethals_seidel_172.txt").read_text().splitlines()
    lines = list(good)
    i = next(j for j, s in enumerate(lines) if not s.startswith("#"))
    lines[i] = ("-" if lines[i][0] == "+" else "+") + lines[i][1:]  # flip one sign: no longer Hadamard
    (tmp_path / "goethals_seidel_172.txt").write_text("\n".join(lines))
    monkeypatch.setattr(matrices, "_DATA_DIR", tmp_path)
    with pytest.raises(RuntimeError, match="not Hadamard"):
        matrices._from_data_file(172)
    (tmp_path / "goethals_seidel_172.txt").write_text("\n".join(good[:-1]))  # a sequence missing
    with pytest.raises(RuntimeError, match="corrupt"):
        matrices._from_data_file(172)


@pytest.mark.parametrize("q", [9, 25, 27, 7, 49])
def test_galois_field_is_a_field(q):
    gf = GaloisField(q)
    p, k = gf.p, gf.k
    a = np.arange(q)
    # The modulus is irreducible (degree 2 or 3: irreducible iff no root in GF(p)).
    coeffs = list(gf.modulus) + [1]
    if 2 <= k <= 3:
        assert all(sum(c * r**j for j, c in enumerate(coeffs)) % p for r in range(p))
    # Additive group: identity, inverses, commutativity.
    assert np.array_equal(gf.add(a, 0), a)
    assert np.all(gf.add(a, gf.neg(a)) == 0)
    assert np.array_equal(gf.add(a[:, None], a[None, :]), gf.add(a[None, :], a[:, None]))
    assert np.array_equal(gf.sub(gf.add(a[:, None], a[None, :]), a[None, :]), np.broadcast_to(a[:, None], (q, q)))
    # Multiplicative group: identity, every nonzero element has an inverse, no zero divisors.
    nz = a[1:]
    assert np.array_equal(gf.mul(a, 1), a)
    assert np.all(gf.mul(nz, gf.inv(nz)) == 1)
    assert np.all(gf.mul(nz[:, None], nz[None, :]) != 0)
    with pytest.raises(ZeroDivisionError):
        gf.inv(0)
    # Distributivity and associativity over all triples (ties the log tables to the additive structure).
    x, y, z = a[:, None, None], a[None, :, None], a[None, None, :]
    assert np.array_equal(gf.mul(x, gf.add(y, z)), gf.add(gf.mul(x, y), gf.mul(x, z)))
    assert np.array_equal(gf.mul(gf.mul(x, y), z), gf.mul(x, gf.mul(y, z)))
    # Characteristic p: p·1 = 0.
    acc = 0
    for _ in range(p):
        acc = gf.add(acc, 1)
    assert acc == 0
    # Quadratic character: multiplicative, +1 exactly on the (q-1)/2 nonzero squares, χ(0) = 0.
    chi = gf.quadratic_character(a)
    assert chi[0] == 0
    assert np.array_equal(gf.quadratic_character(gf.mul(a[:, None], a[None, :])), chi[:, None] * chi[None, :])
    squares = set(gf.mul(nz, nz).tolist())
    assert len(squares) == (q - 1) // 2
    assert {int(v) for v in nz if chi[v] == 1} == squares
    # χ(-1) = (-1)^((q-1)/2): the fact that makes Paley I skew and Paley II symmetric.
    assert gf.quadratic_character(gf.neg(1)) == (1 if q % 4 == 1 else -1)


def test_galois_field_rejects_non_prime_powers():
    for q in (1, 6, 12, 15):
        with pytest.raises(ValueError, match="not a prime power"):
            GaloisField(q)


def test_prime_power_detection():
    expected = {2, 3, 4, 5, 7, 8, 9, 11, 13, 16, 17, 19, 23, 25, 27, 29, 31, 32, 37, 41, 43, 47, 49}
    assert {q for q in range(1, 50) if matrices._prime_power(q)} == expected
    assert matrices._prime_power(3**5) == (3, 5) and matrices._prime_power(7**3) == (7, 3)
    assert all(matrices._prime_power(p**k) == (p, k) for p, k in itertools.product([2, 3, 5, 13], [1, 2, 3]))
