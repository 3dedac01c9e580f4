"""GPTQ (Frantar et al., 2022): quantize a weight column by column, spreading each column's rounding error over the
columns not yet quantized through the inverse Hessian of the layer inputs, ``H = 2·XᵀX``.

Format-agnostic: the element grid and the group scales come from a ``GroupQuantizer`` (see ``models/quantizers``),
so the same routine serves INT, MXFP4 and NVFP4 weights. Groups run along the input dimension; with ``act_order``
the columns are visited by decreasing Hessian diagonal while the group scales stay those of the contiguous groups of
the original order (computed up front: "static groups"), so the packed layout is unchanged.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Protocol

import torch


class GroupQuantizer(Protocol):
    """Quantizes one weight matrix ``[out, in]`` in groups of ``group_size`` along ``in``."""

    group_size: int

    def fit(self, w: torch.Tensor) -> object:
        """Scale parameters of one group ``w[:, g0:g0+group_size]`` (returned object is opaque)."""

    def quantize_column(self, col: torch.Tensor, params: object, column: int) -> torch.Tensor:
        """Quantize-dequantize column ``column`` (original order) ``[out]`` with its group's ``params``."""


@dataclass(frozen=True)
class GPTQConfig:
    damp: float = 0.01          # relative damping added to the Hessian diagonal (fraction of its mean)
    block_size: int = 128       # columns updated together (lazy batch updates)
    act_order: bool = False     # visit columns by decreasing Hessian diagonal

    def to_dict(self) -> dict:
        return {"damp": self.damp, "block_size": self.block_size, "act_order": self.act_order}


class HessianAccumulator:
    """Running ``H = 2/N · Σ xᵀx`` over calibration activations of one linear layer (float64 for stability)."""

    def __init__(self, n: int, device: torch.device | str = "cpu"):
        self.h = torch.zeros(n, n, dtype=torch.float64, device=device)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(torch.float64)
        new = self.count + x.shape[0]
        self.h.mul_(self.count / new).addmm_(x.t(), x, alpha=2.0 / new)
        self.count = new


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    # The column loop is thousands of tiny ops: on the CPU, intra-op threads only add synchronization, and when the
    # cores are shared the loop runs ~20x slower with 2 threads than with 1 (measured: 10 s vs 0.4 s on 2048×640).
    if device.type != "cpu":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, quantizer: GroupQuantizer, cfg: GPTQConfig = GPTQConfig()
                  ) -> torch.Tensor:
    """Return the GPTQ quantize-dequantized copy of ``w`` ``[out, in]`` given the input Hessian ``h`` ``[in, in]``."""
    with _one_cpu_thread(w.device):
        return _gptq(w, h, quantizer, cfg)


def _gptq(w: torch.Tensor, h: torch.Tensor, quantizer: GroupQuantizer, cfg: GPTQConfig) -> torch.Tensor:
    w = w.detach().to(torch.float64).clone()
    n = w.shape[1]
    g = quantizer.group_size
    if n % g:
        raise ValueError(f"GPTQ: group size {g} does not divide the input size {n}")
    h = h.to(torch.float64).clone()
    dead = torch.diagonal(h) == 0  # inputs that never fire: any value works, keep the weight out of the solve
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    # Static group parameters (from the original weights, in the original order) when columns are permuted.
    static = [quantizer.fit(w[:, s:s + g].float()) for s in range(0, n, g)] if cfg.act_order else None
    perm = torch.argsort(torch.diagonal(h), descending=True) if cfg.act_order else torch.arange(n)
    w = w[:, perm]
    h = h[perm][:, perm]

    damp = cfg.damp * torch.diagonal(h).mean()
    h += damp * torch.eye(n, dtype=h.dtype, device=h.device)
    # Upper Cholesky factor of H⁻¹: row i holds the update weights for column i's error (GPTQ's trick). The
    # factorization runs in float64; the column loop in float32, like the reference implementation.
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    w = w.float()

    q = torch.zeros_like(w)
    params = None
    for b0 in range(0, n, cfg.block_size):
        b1 = min(b0 + cfg.block_size, n)
        wb = w[:, b0:b1].clone()
        err = torch.zeros_like(wb)
        for j in range(b1 - b0):
            col = b0 + j
            orig = int(perm[col])
            if static is not None:
                params = static[orig // g]
            elif col % g == 0:
                # Dynamic groups: fit on the error-updated weights of the group about to be quantized.
                upd = torch.cat([wb[:, j:], w[:, b1:]], dim=1)[:, :g]
                params = quantizer.fit(upd.float())
            qc = quantizer.quantize_column(wb[:, j], params, orig)
            q[:, col] = qc
            e = (wb[:, j] - qc) / hinv[col, col]
            wb[:, j:] -= e[:, None] * hinv[col, col:b1][None, :]
            err[:, j] = e
        w[:, b1:] -= err @ hinv[b0:b1, b1:]
    inv = torch.argsort(perm)
    return q[:, inv]
