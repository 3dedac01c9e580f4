"""Orders added for issue #22: every covered order up to 1024 is exact, legacy matrices and those of each round of
issue #22 are unchanged (hash fixture), all multiples of 4 up to 256 are covered, Miyamoto's construction is exact
(and its check catches a bad input), corrupt data files are rejected, and the docs agree."""

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from hadakit.transforms import matrices
from hadakit.transforms.matrices import (
    HadamardDataError,
    base_order,
    construction,
    covered_orders,
    hadamard_matrix,
    uncovered_orders,
)

ROOT = Path(__file__).resolve().parents[1]
_FIXTURE_FILE = json.loads((ROOT / "tests/data/hadamard_hashes.json").read_text())
FIXTURE = _FIXTURE_FILE["orders"]  # legacy: constructible before issue #22
ADDED = _FIXTURE_FILE["added"]  # pinned when added, by round of issue #22
COVERED = covered_orders(1024)
NEW_BASES = sorted(matrices._NEW_DATA)


def _sylvester(n: int) -> np.ndarray:
    i = np.arange(n)
    bits = np.bitwise_and(i[:, None], i[None, :])
    parity = np.zeros_like(bits)
    while bits.any():
        parity ^= bits & 1
        bits >>= 1
    return (1 - 2 * parity).astype(np.int8)


@pytest.mark.parametrize("n", COVERED)
def test_every_covered_order_is_hadamard(n):
    h = hadamard_matrix(n, dtype=torch.int8).numpy()
    assert h.shape == (n, n) and np.all(np.abs(h) == 1)
    m = base_order(n)
    hm = hadamard_matrix(m, dtype=torch.int8).numpy().astype(np.int64)
    # The kernels' identity, exactly.
    assert np.array_equal(h, np.kron(hm, _sylvester(n // m)).astype(np.int8))
    if n == m or n <= 256:  # every base order and every order <= 256 directly in int64
        h64 = h.astype(np.int64)
        assert np.array_equal(h64 @ h64.T, n * np.eye(n, dtype=np.int64))
    else:  # H = H_m ⊗ S: exact in int64 for the base; the Sylvester factor is checked by its own row
        assert np.array_equal(hm @ hm.T, m * np.eye(m, dtype=np.int64))
        s = _sylvester(n // m).astype(np.int64)
        assert np.array_equal(s @ s.T, (n // m) * np.eye(n // m, dtype=np.int64))


def test_legacy_orders_unchanged_up_to_1024():
    """Every order constructible before issue #22 keeps its base order (all 703 in the fixture: every one up to
    4096 and the large model widths) and, up to 1024, its matrix bytes (the rest: the slow test below)."""
    changed = []
    for key, entry in FIXTURE.items():
        n = int(key)
        assert base_order(n) == entry["base_order"], n
        if n <= 1024:
            digest = hashlib.sha256(hadamard_matrix(n, dtype=torch.int8).numpy().tobytes()).hexdigest()
            if digest != entry["sha256"]:
                changed.append(n)
    matrices._hadamard_int8.cache_clear()
    assert not changed
    assert len(FIXTURE) > 700 and all(str(n) in FIXTURE for n in (368, 464, 312, 688, 1904, 28672))


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("HADAKIT_SLOW_TESTS"), reason="about 4 min of matrix hashing: set "
                    "HADAKIT_SLOW_TESTS=1 (the orders above 1024 are built as kron(base, Sylvester), whose base "
                    "orders the fast test checks against the fixture)")
def test_legacy_large_orders_unchanged():
    for key, entry in FIXTURE.items():
        n = int(key)
        if n > 1024:
            digest = hashlib.sha256(matrices._hadamard_int8(n).tobytes()).hexdigest()
            matrices._hadamard_int8.cache_clear()
            assert digest == entry["sha256"], n


def test_added_orders_unchanged_up_to_1024():
    """Orders added by the rounds of issue #22 keep the matrix and base order they had when added (all up to 4096
    by base order, up to 1024 by matrix bytes); every covered order up to 4096 is pinned in one section or the other."""
    changed = []
    for key, entry in ADDED.items():
        n = int(key)
        assert base_order(n) == entry["base_order"], n
        if n <= 1024:
            digest = hashlib.sha256(hadamard_matrix(n, dtype=torch.int8).numpy().tobytes()).hexdigest()
            if digest != entry["sha256"]:
                changed.append(n)
    matrices._hadamard_int8.cache_clear()
    assert not changed
    assert not set(ADDED) & set(FIXTURE)
    assert set(map(str, covered_orders(4096))) <= set(ADDED) | set(FIXTURE)
    rounds = {entry["added_in"].split(" (")[0] for entry in ADDED.values()}
    assert rounds == {"issue 22, round 1", "issue 22, round 2"}
    assert ADDED["92"]["added_in"].startswith("issue 22, round 1") and ADDED["236"]["added_in"] == "issue 22, round 2"


def test_round_two_keeps_round_one_constructions():
    # 35344 = 188 · 188 (round 1, a Kronecker product of two data files) must not become Miyamoto's 8836 = 4 · 47²
    # times 4, although round 2 can build 8836: an order is resolved by the first round that reaches it.
    assert base_order(35344) == 35344 and construction(35344).count("goethals-seidel(47)") == 2
    assert base_order(8836) == 8836 and construction(8836).startswith("miyamoto(q=2209")
    assert matrices._tier(35344) == 1 and matrices._tier(8836) == 2 and matrices._tier(368) == 0


@pytest.mark.parametrize("q", [5, 13, 17, 29, 37, 41, 73, 89])
def test_miyamoto_is_hadamard(q):
    h = matrices._miyamoto(q).astype(np.int64)
    assert h.shape == (4 * q, 4 * q) and np.all(np.abs(h) == 1)
    assert np.array_equal(h @ h.T, 4 * q * np.eye(4 * q, dtype=np.int64))


def test_miyamoto_check_rejects_a_bad_input(monkeypatch):
    # Negative control: with a ±1 "Hadamard matrix of order q - 1" that is not one, the in-code check must fire.
    good = matrices._hadamard_int8(12)
    bad = good.copy()
    bad[0, 0] = -bad[0, 0]
    monkeypatch.setattr(matrices, "_hadamard_int8", lambda n: bad if n == 12 else good)
    with pytest.raises(AssertionError, match="q=13"):
        matrices._miyamoto(13)


def test_miyamoto_orders_meet_its_hypotheses():
    found = []
    for n in COVERED:
        m = base_order(n)
        recipe = matrices._recipe(m)
        if recipe[0] == "miyamoto":
            q = recipe[1]
            assert m == 4 * q and q % 4 == 1 and matrices._prime_power(q) and base_order(q - 1) is not None
            found.append(m)
    # 4q for q = 73, 89, 109, 113, 149, 193, 233, 241 (the smaller 4q with q ≡ 1 mod 4 a prime power are Paley's or
    # earlier data files: those keep their construction).
    assert sorted(set(found)) == [292, 356, 436, 452, 596, 772, 932, 964]
    assert construction(584) == construction(292) + " ⊗ sylvester(2)"


def test_new_orders_do_not_replace_old_constructions():
    assert base_order(368) == 368 and construction(368) == "paley1(q=367)"  # not 92 ⊗ sylvester(4)
    assert base_order(464) == 464 and base_order(312) == 312
    assert base_order(184) == 92 and base_order(232) == 116 and base_order(520) == 260 and base_order(376) == 188
    legacy = {int(k) for k in FIXTURE}
    assert len([n for n in COVERED if n not in legacy]) == len(COVERED) - 201  # 201 covered before issue #22
    for n in COVERED:
        if n not in legacy:  # a new order: its base must be new too
            assert base_order(n) not in legacy


def test_all_multiples_of_4_up_to_256_are_covered():
    assert set(COVERED) >= set(range(4, 257, 4))
    assert {92, 116, 156, 184, 188, 232, 236} <= set(COVERED)


def test_uncovered_orders_up_to_1024():
    # Pinned so that a change in coverage is deliberate (and docs/hadamard_orders.md is regenerated with it).
    assert uncovered_orders(1024) == [268, 412, 508, 536, 604, 652, 668, 716, 764, 852, 876, 892, 940, 956, 996, 1004,
                                      1016]


def test_corrupt_data_file_raises_named_error(tmp_path):
    good = (matrices._DATA_DIR / "goethals_seidel_92.txt").read_text().splitlines()
    assert matrices._from_data_file(92, matrices._DATA_DIR / "goethals_seidel_92.txt").shape == (92, 92)
    lines = list(good)
    i = next(j for j, s in enumerate(lines) if not s.startswith("#"))
    lines[i] = ("-" if lines[i][0] == "+" else "+") + lines[i][1:]  # one sign flipped: not Hadamard any more
    bad = tmp_path / "tampered_92.txt"
    bad.write_text("\n".join(lines))
    with pytest.raises(HadamardDataError, match="tampered_92.txt.*not Hadamard"):
        matrices._from_data_file(92, bad)
    bad.write_text("\n".join(good[:-1]))  # a sequence missing
    with pytest.raises(HadamardDataError, match="tampered_92.txt"):
        matrices._from_data_file(92, bad)
    with pytest.raises(HadamardDataError, match="missing.txt"):
        matrices._from_data_file(92, tmp_path / "missing.txt")


def test_data_folder_is_small():
    assert sum(p.stat().st_size for p in matrices._DATA_DIR.iterdir()) <= 2_000_000


def test_count_matches_docs():
    doc = (ROOT / "docs/hadamard_orders.md").read_text()
    found = re.search(r"\*\*(\d+) are covered and (\d+) are not\*\*", doc)
    assert found, "docs/hadamard_orders.md lost its count line; regenerate with tools/hadamard_orders_doc.py"
    assert int(found.group(1)) == len([n for n in COVERED if n % 4 == 0])
    assert int(found.group(2)) == len(uncovered_orders(1024))
    listed = re.search(r"\*\*Not covered \((\d+)\):\*\* ([0-9, ]+)\.", doc)
    assert [int(v) for v in listed.group(2).split(",")] == uncovered_orders(1024)
