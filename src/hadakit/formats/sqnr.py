"""SQNR of every preset scheme on Gaussian and Student-t data, with and without a Hadamard rotation.

``python -m hadakit.formats.sqnr`` prints the Markdown table that docs/formats.md shows.

SQNR (dB) = ``10 · log10(sum x² / sum (x - x̂)²)``, pooled over the whole ``rows x n`` matrix. With rotation, each row
is rotated by the normalized Sylvester Hadamard matrix ``H / sqrt(n)`` (orthogonal), quantized, and rotated back, and
the error is measured in the original domain. The dense matrix is built locally (this module must not depend on the
transforms layer); ``H[i, j] = (-1)^popcount(i & j)``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .quantize import fake_quantize
from .schemes import get_scheme, list_schemes

__all__ = ["default_entries", "format_markdown", "sqnr_db", "sqnr_table", "sylvester_hadamard"]

_DISTS = ("gaussian", "student_t3")


def sylvester_hadamard(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normalized Sylvester Hadamard matrix of order ``n`` (a power of two).

    ``H[i, j] = (-1)^popcount(i & j) / sqrt(n)``; symmetric and orthogonal.
    """
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester Hadamard matrices exist for powers of two, got n={n}")
    # Sylvester doubling H_2k = [[H_k, H_k], [H_k, -H_k]]: the new top bit of i and j flips the sign iff both are
    # set, which is exactly (-1)^popcount(i & j).
    h = np.ones((1, 1), dtype=np.float32)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return (torch.from_numpy(h).to(torch.float64) / math.sqrt(n)).to(dtype)


def sqnr_db(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """``10 · log10(||x||² / ||x - x̂||²)`` in float64 (``inf`` for an exact reconstruction)."""
    x, x_hat = x.double(), x_hat.double()
    err = float(((x - x_hat) ** 2).sum())
    sig = float((x ** 2).sum())
    return math.inf if err == 0 else 10.0 * math.log10(sig / err)


def default_entries() -> list[tuple[str, object]]:
    """Every preset, plus the MX presets with the round-up ("ceil") scale rule and int3_g128 with clip search."""
    entries = [(name, get_scheme(name)) for name in list_schemes()]
    for name in ("mxfp4", "mxfp6", "mxfp8"):
        entries.append((f"{name} (ceil)", get_scheme(name, scale_rule="ceil")))
    entries.append(("int3_g128 (clip search)", get_scheme("int3_g128", clip_search=True)))
    return entries


def sqnr_table(n: int = 4096, rows: int = 256, seed: int = 0, schemes=None) -> list[dict]:
    """SQNR (dB) of each scheme on ``rows x n`` Gaussian and Student-t (ν = 3) matrices, without / with rotation.

    ``schemes``: preset names, ``(label, QuantScheme)`` pairs, or ``None`` for :func:`default_entries`. Returns one
    dict per scheme: ``scheme`` (label), ``bits`` (bits per element on this shape), ``gaussian``, ``gaussian_had``,
    ``student_t3``, ``student_t3_had``. Deterministic for a given ``seed`` (stochastic-rounding schemes are seeded
    with it too).
    """
    rng = np.random.default_rng(seed)
    data = {
        "gaussian": torch.from_numpy(rng.standard_normal((rows, n)).astype(np.float32)),
        "student_t3": torch.from_numpy(rng.standard_t(3, (rows, n)).astype(np.float32)),
    }
    h = sylvester_hadamard(n)
    rotated = {k: v @ h for k, v in data.items()}  # H is symmetric: rows @ H^T == rows @ H
    entries = default_entries() if schemes is None else [
        (e, get_scheme(e)) if isinstance(e, str) else (e[0], get_scheme(e[1])) for e in schemes]
    out = []
    for label, scheme in entries:
        row = {"scheme": label, "bits": scheme.bits_per_element((rows, n))}
        for dist in _DISTS:
            x = data[dist]
            row[dist] = sqnr_db(x, fake_quantize(x, scheme, generator=seed))
            back = fake_quantize(rotated[dist], scheme, generator=seed) @ h
            row[dist + "_had"] = sqnr_db(x, back)
        out.append(row)
    return out


def format_markdown(table: list[dict]) -> str:
    """The table as GitHub Markdown."""
    lines = [
        "| scheme | bits/elem | Gaussian | Gaussian + H | Student-t ν=3 | Student-t ν=3 + H |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in table:
        label = r["scheme"].split(" ", 1)
        name = f"`{label[0]}`" + (f" {label[1]}" if len(label) > 1 else "")
        lines.append(f"| {name} | {r['bits']:.4g} | {r['gaussian']:.2f} | {r['gaussian_had']:.2f} | "
                     f"{r['student_t3']:.2f} | {r['student_t3_had']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    print(format_markdown(sqnr_table()))
