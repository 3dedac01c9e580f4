"""The SQNR table script: runs small, is deterministic, and shows the expected orderings."""

import math

import numpy as np
import pytest
import torch

from hadakit.formats import get_scheme, list_schemes
from hadakit.formats.sqnr import default_entries, format_markdown, sqnr_db, sqnr_table, sylvester_hadamard


pytestmark = pytest.mark.usefixtures("single_thread")


def test_sylvester_matches_popcount_definition_and_is_orthogonal():
    n = 64
    h = sylvester_hadamard(n, torch.float64)
    i = np.arange(n)
    ref = np.array([[(-1) ** bin(a & b).count("1") for b in i] for a in i]) / math.sqrt(n)
    np.testing.assert_array_equal(h.numpy(), ref)
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12)


def test_sqnr_db():
    x = torch.tensor([3.0, 4.0])
    assert sqnr_db(x, x) == math.inf
    assert sqnr_db(x, torch.tensor([3.0, 3.0])) == 10 * math.log10(25.0)


def test_small_table():
    ceil = get_scheme("mxfp4", scale_rule="ceil")
    entries = ["int8", "int4", "int4_g32", "mxfp4", "nvfp4", "ternary", ("mxfp4 (ceil)", ceil)]
    t1 = sqnr_table(n=256, rows=8, seed=0, schemes=entries)
    t2 = sqnr_table(n=256, rows=8, seed=0, schemes=entries)
    assert t1 == t2
    r = {row["scheme"]: row for row in t1}
    assert set(r) == {"int8", "int4", "int4_g32", "mxfp4", "nvfp4", "ternary", "mxfp4 (ceil)"}
    for row in t1:
        for k in ("gaussian", "gaussian_had", "student_t3", "student_t3_had"):
            assert math.isfinite(row[k]) and row[k] > 0
    assert r["int8"]["gaussian"] > r["int4"]["gaussian"] + 15
    assert r["int4_g32"]["gaussian"] > r["int4"]["gaussian"]
    # the rotation removes the heavy tails that per-row INT4 suffers from
    assert r["int4"]["student_t3_had"] > r["int4"]["student_t3"] + 3
    assert r["mxfp4"]["bits"] == 4.25
    md = format_markdown(t1)
    assert md.count("\n") == len(t1) + 1 and "| `mxfp4` (ceil) | 4.25 |" in md


def test_default_entries_cover_every_preset():
    labels = [label for label, _ in default_entries()]
    assert all(name in labels for name in list_schemes())
