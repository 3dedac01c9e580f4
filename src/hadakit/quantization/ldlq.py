"""Incoherence processing (two-sided randomized Hadamard) and BlockLDLQ with E8P / RVQ vector codebooks.

Written from QuIP (Chee et al. 2023, LDLQ) and QuIP# (Tseng et al. 2024, arXiv 2402.04396); no code taken from them.

Conventions: a linear layer computes ``y = W x`` with ``W`` of shape ``(m, n) = (out, in)`` and the proxy Hessian is
``H = E[x xᵀ]`` (``n × n``); the proxy loss of an approximation ``Ŵ`` is ``tr((W − Ŵ) H (W − Ŵ)ᵀ)``.

* **Incoherence**: ``U = H_m·D_out``, ``V = H_n·D_in`` (normalized Hadamard, random ±1 diagonal ``D``). Then
  ``W̃ = U W Vᵀ``, ``H̃ = V H Vᵀ`` (so ``W̃ (V x) = U W x`` and the proxy loss is invariant), and the inverse is
  ``W = Uᵀ W̃ V``.
* **BlockLDLQ**: with the column blocks of ``b`` inputs, factor ``H = (I + A) D (I + A)ᵀ`` with ``A`` strictly
  block-*upper* triangular and ``D`` block diagonal (``b × b`` blocks). We get it from one Cholesky factorisation of
  the index-reversed matrix (``P H P = C Cᵀ`` ⇒ block LDLᵀ ``L = C·blockdiag(C)⁻¹``, ``D_k = C_kk C_kkᵀ``, and
  ``I + A = P L P``). Blocks are then rounded in order with the feedback
  ``Ŵ_k = Q(W_k − Σ_{j<k} (Ŵ_j − W_j) A_jk)``, which makes the loss ``Σ_k tr(η_k D_k η_kᵀ)`` with ``η_k`` the
  rounding error of block ``k``. For ``b = 1`` this is exactly GPTQ without lazy batching.
* **Damping** as GPTQ: ``H + damp · mean(diag H) · I`` before factoring.

Scale (what :func:`quantize_weight_e8p` does): one scale per matrix after incoherence, ``σ = RMS(W̃)`` times the
unit-Gaussian stage scales of :data:`hadakit.formats.lattice.GAUSSIAN_SCALES`, optionally refined by a search over
multipliers of ``σ`` on the proxy loss (``scale_multipliers``), like the paper's global scale search.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import torch

from hadakit.formats.lattice import GAUSSIAN_SCALES, RVQCodebook, bits_per_weight, pack_e8p_codes, unpack_e8p_codes
from hadakit.transforms import hadamard_transform, inverse_hadamard_transform, random_signs, supported

__all__ = [
    "BlockQuantizer",
    "Incoherence",
    "LDLQResult",
    "ScalarGroupQuantizer",
    "E8PQuantizer",
    "block_ldl",
    "block_ldlq",
    "dequantize_e8p_state",
    "incoherence_process",
    "nearest_round",
    "proxy_loss",
    "quantize_weight_e8p",
]


class BlockQuantizer(Protocol):
    """Rounds the columns ``[start, start + b)`` of a weight matrix: ``q(x[m, b], start) -> (x̂[m, b], codes)``."""

    def __call__(self, x: torch.Tensor, start: int) -> tuple[torch.Tensor, list[torch.Tensor] | None]: ...


# ---------------------------------------------------------------------- checks
def _check_w(W, what: str, need8: bool) -> None:
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"{what}: W must be a torch.Tensor, got {type(W).__name__}")
    if W.ndim != 2:
        raise ValueError(f"{what}: W must be 2-D (out_features, in_features), got shape {tuple(W.shape)}")
    if not W.is_floating_point():
        raise TypeError(f"{what}: W must be floating, got {W.dtype}")
    if need8 and W.shape[1] % 8:
        raise ValueError(f"{what}: in_features ({W.shape[1]}) must be a multiple of 8 for 8-dim vector codes; "
                         "pad the input dimension")
    if not torch.isfinite(W).all():
        raise ValueError(f"{what}: W has NaN/Inf")


def _check_h(H, n: int, what: str) -> None:
    if not isinstance(H, torch.Tensor):
        raise TypeError(f"{what}: H must be a torch.Tensor, got {type(H).__name__}")
    if H.ndim != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"{what}: H must be a square (in, in) matrix, got shape {tuple(H.shape)}")
    if H.shape[0] != n:
        raise ValueError(f"{what}: H is {H.shape[0]}×{H.shape[0]} but W has {n} in_features; pass H = XᵀX/N of "
                         "this layer's inputs")
    if not torch.isfinite(H).all():
        raise ValueError(f"{what}: H has NaN/Inf")
    Hd = H.to(torch.float64)
    scale = float(Hd.diagonal().abs().max()) or 1.0
    if float((Hd - Hd.T).abs().max()) > 1e-4 * scale:
        raise ValueError(f"{what}: H is not symmetric; symmetrize it ((H + Hᵀ)/2) or check how it was built")
    if float(Hd.diagonal().min()) < 0:
        raise ValueError(f"{what}: H has a negative diagonal entry, so it is not PSD; H must be XᵀX/N")


def proxy_loss(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """``tr((W − Ŵ) H (W − Ŵ)ᵀ)`` in float64."""
    E = (W.to(torch.float64) - W_hat.to(torch.float64))
    return float(((E @ H.to(torch.float64)) * E).sum())


# ---------------------------------------------------------------------- incoherence
@dataclass(frozen=True)
class Incoherence:
    """The two-sided randomized Hadamard transform ``W̃ = (H_m D_out) W (H_n D_in)ᵀ``, ``H̃ = V H Vᵀ``.

    ``signs_out`` (length m) and ``signs_in`` (length n) are ±1 float vectors.
    """

    signs_out: torch.Tensor
    signs_in: torch.Tensor

    @staticmethod
    def from_seed(m: int, n: int, seed: int) -> "Incoherence":
        """Signs drawn from one ``torch.Generator`` seeded with ``seed`` (out signs first)."""
        for what, k in (("out_features", m), ("in_features", n)):
            if not supported(k):
                raise ValueError(f"Incoherence: {what} = {k} has no Hadamard transform; use sizes m·2^k with a "
                                 "known order-m Hadamard matrix (see hadakit.transforms.nearest_supported)")
        g = torch.Generator().manual_seed(int(seed))
        return Incoherence(random_signs(m, generator=g, dtype=torch.float64),
                           random_signs(n, generator=g, dtype=torch.float64))

    def _s(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return v.to(dtype=x.dtype, device=x.device)

    def weight(self, W: torch.Tensor) -> torch.Tensor:
        """``U W Vᵀ``."""
        Y = hadamard_transform(W, 0, signs=self._s(self.signs_out, W))
        return hadamard_transform(Y, 1, signs=self._s(self.signs_in, W))

    def weight_inverse(self, Wt: torch.Tensor) -> torch.Tensor:
        """``Uᵀ W̃ V`` (inverse of :meth:`weight`)."""
        Y = inverse_hadamard_transform(Wt, 0, signs=self._s(self.signs_out, Wt))
        return inverse_hadamard_transform(Y, 1, signs=self._s(self.signs_in, Wt))

    def hessian(self, H: torch.Tensor) -> torch.Tensor:
        """``V H Vᵀ``."""
        s = self._s(self.signs_in, H)
        return hadamard_transform(hadamard_transform(H, 0, signs=s), 1, signs=s)


def incoherence_process(W: torch.Tensor, H: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor, Incoherence]:
    """``(W̃, H̃, transform)`` for the seeded two-sided randomized Hadamard transform.

    Example:
        >>> import torch
        >>> W, X = torch.randn(64, 40, dtype=torch.float64), torch.randn(500, 40, dtype=torch.float64)
        >>> H = X.T @ X / 500
        >>> Wt, Ht, inc = incoherence_process(W, H, seed=0)
        >>> torch.allclose(inc.weight_inverse(Wt), W)
        True
    """
    _check_w(W, "incoherence_process", False)
    _check_h(H, W.shape[1], "incoherence_process")
    inc = Incoherence.from_seed(W.shape[0], W.shape[1], seed)
    return inc.weight(W), inc.hessian(H), inc


# ---------------------------------------------------------------------- block LDL
def block_ldl(H: torch.Tensor, block_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, D)`` with ``H = (I + A) D (I + A)ᵀ``, ``A`` strictly block-upper triangular, ``D`` block diagonal.

    Computed in float64 from one Cholesky factor of the index-reversed ``H`` (see the module docstring). Raises a
    ValueError if ``H`` is not positive definite (increase the damping).
    """
    n = H.shape[0]
    if n % block_size:
        raise ValueError(f"block_ldl: size {n} is not a multiple of block_size {block_size}")
    Hr = H.to(torch.float64).flip(0, 1)
    C, info = torch.linalg.cholesky_ex(Hr)
    if int(info) != 0:
        raise ValueError("block_ldl: H is not positive definite (Cholesky failed); increase damp or collect more "
                         "calibration samples")
    nb = n // block_size
    Cb = C.view(nb, block_size, nb, block_size)
    diag = torch.stack([Cb[k, :, k, :] for k in range(nb)])                     # (nb, b, b) lower-triangular
    Dblk = diag @ diag.transpose(1, 2)
    # L = C · blockdiag(C_kk)^{-1}: solve X C_kk = C[:, k-block] for every column block
    Cc = C.view(n, nb, block_size).permute(1, 0, 2)                              # (nb, n, b)
    Lc = torch.linalg.solve_triangular(diag, Cc, upper=False, left=False)
    L = Lc.permute(1, 0, 2).reshape(n, n)
    D = torch.block_diag(*Dblk)
    I = torch.eye(n, dtype=torch.float64, device=H.device)
    blk = torch.arange(n, device=H.device) // block_size
    A = (L.flip(0, 1) - I) * (blk[:, None] < blk[None, :])          # exact zeros off the strict upper blocks
    return A, D.flip(0, 1)


def _damped(H: torch.Tensor, damp: float) -> torch.Tensor:
    if not (isinstance(damp, (int, float)) and math.isfinite(damp) and damp >= 0):
        raise ValueError(f"damp must be a finite float ≥ 0 (relative to mean(diag H)), got {damp!r}")
    Hd = H.to(torch.float64).clone()
    mean_diag = float(Hd.diagonal().mean())
    if mean_diag <= 0:
        raise ValueError("H has a zero/negative mean diagonal; the layer saw no inputs")
    Hd.diagonal().add_(damp * mean_diag)
    return Hd


@dataclass
class LDLQResult:
    """Output of :func:`block_ldlq`: the rounded matrix, per-stage codes (``(m, n/b)`` each, or empty)."""

    W_hat: torch.Tensor
    codes: list[torch.Tensor] = field(default_factory=list)


def block_ldlq(W: torch.Tensor, H: torch.Tensor, quantizer: BlockQuantizer, *, block_size: int = 8,
               damp: float = 0.01, lazy_block: int = 128) -> LDLQResult:
    """BlockLDLQ rounding of ``W`` (m × n) under the proxy Hessian ``H`` (n × n) with error feedback.

    ``quantizer(x[m, block_size], start)`` returns ``(x̂, codes)``; codes (a list of tensors, one per stage, each
    ``(m, c)``) are concatenated along dim 1. Arithmetic in float64; ``W_hat`` has ``W``'s dtype.
    ``block_size=1`` with a scalar quantizer is GPTQ (no lazy batching).

    ``lazy_block`` (a multiple of ``block_size``; rounded up to one): GPTQ's lazy batch updates — the feedback
    ``Σ_{j<k} (Ŵ_j − W_j) A_jk`` from earlier *super-blocks* of ``lazy_block`` columns is added to all later columns
    once per super-block (one matrix product), within a super-block block by block. The same sums, grouped
    differently: results agree with ``lazy_block = block_size`` (the plain loop) to float64 rounding, and the work
    becomes a few large products instead of ``n / block_size`` thin ones.

    Example:
        >>> import torch
        >>> W = torch.randn(16, 32, dtype=torch.float64); X = torch.randn(200, 32, dtype=torch.float64)
        >>> res = block_ldlq(W, X.T @ X / 200, E8PQuantizer(2, scale=0.9))
        >>> res.W_hat.shape, res.codes[0].shape
        (torch.Size([16, 32]), torch.Size([16, 4]))
    """
    _check_w(W, "block_ldlq", False)
    _check_h(H, W.shape[1], "block_ldlq")
    if not isinstance(block_size, int) or block_size < 1 or W.shape[1] % block_size:
        raise ValueError(f"block_ldlq: block_size ({block_size!r}) must be a positive int dividing in_features "
                         f"({W.shape[1]})")
    if isinstance(lazy_block, bool) or not isinstance(lazy_block, int) or lazy_block < 1:
        raise ValueError(f"block_ldlq: lazy_block must be a positive int, got {lazy_block!r}")
    lazy = max(block_size, -(-lazy_block // block_size) * block_size)
    A, _ = block_ldl(_damped(H, damp), block_size)
    W64 = W.to(torch.float64)
    m, n = W64.shape
    T = W64.clone()                                    # targets: W minus the feedback of finished super-blocks
    Delta = torch.zeros_like(W64)                      # Ŵ − W for the blocks done so far
    Wq = torch.empty_like(W64)
    codes: list[list[torch.Tensor]] = []
    for s0 in range(0, n, lazy):
        s1 = min(n, s0 + lazy)
        for k in range(s0, s1, block_size):
            sl = slice(k, k + block_size)
            target = T[:, sl]
            if k > s0:
                target = target - Delta[:, s0:k] @ A[s0:k, sl]
            q, c = quantizer(target, k)
            q = q.to(torch.float64)
            Wq[:, sl] = q
            Delta[:, sl] = q - W64[:, sl]
            if c is not None:
                if not codes:
                    codes = [[] for _ in c]
                for lst, ci in zip(codes, c):
                    lst.append(ci)
        if s1 < n:
            T[:, s1:] -= Delta[:, s0:s1] @ A[s0:s1, s1:]
    return LDLQResult(Wq.to(W.dtype), [torch.cat(l, 1) for l in codes])


def nearest_round(W: torch.Tensor, quantizer: BlockQuantizer, *, block_size: int = 8) -> LDLQResult:
    """Plain nearest rounding, block by block, with no error feedback (the baseline BlockLDLQ improves on)."""
    _check_w(W, "nearest_round", False)
    W64 = W.to(torch.float64)
    outs, codes = [], []
    for k in range(0, W.shape[1], block_size):
        q, c = quantizer(W64[:, k:k + block_size], k)
        outs.append(q.to(torch.float64))
        if c is not None:
            codes.append(c)
    cat = [torch.cat([c[i] for c in codes], 1) for i in range(len(codes[0]))] if codes else []
    return LDLQResult(torch.cat(outs, 1).to(W.dtype), cat)


# ---------------------------------------------------------------------- quantizers
class E8PQuantizer:
    """Block quantizer for BlockLDLQ: 8 columns at a time onto ``scale·(E8P12 [+ second stage])``.

    ``scale`` is the matrix scale ``σ`` (the RMS of the incoherent weights); the stage scales are
    ``σ·stage_scales`` (default :data:`GAUSSIAN_SCALES[bits]`).
    """

    def __init__(self, bits: int, scale: float, stage_scales: tuple[float, ...] | None = None) -> None:
        self.rvq = RVQCodebook(bits)
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"E8PQuantizer: scale must be a positive finite float, got {scale!r}")
        base = GAUSSIAN_SCALES[bits] if stage_scales is None else tuple(stage_scales)
        # rounded to float32, the stored precision, so the state decodes to the same matrix bit for bit
        self.scales = tuple(float(torch.tensor(float(scale) * s, dtype=torch.float32))
                            for s in self.rvq._scales(base))

    def __call__(self, x: torch.Tensor, start: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if x.shape[1] != 8:
            raise ValueError(f"E8PQuantizer: blocks must be 8 columns wide, got {x.shape[1]}; use block_size=8")
        v = x.to(torch.float32)
        codes = self.rvq.quantize(v, self.scales)
        return self.rvq.decode(codes, self.scales, dtype=torch.float64), [c.unsqueeze(1) for c in codes]


class ScalarGroupQuantizer:
    """Asymmetric INT-``bits`` quantizer with one (scale, zero) per row and group of ``group_size`` inputs.

    Scales are *static*: computed up front from the matrix given to the constructor (min/max with the clip ratio in
    ``clip_grid`` that minimises each group's MSE), like GPTQ's ``static_groups``. Works with any ``block_size``
    dividing ``group_size`` in :func:`block_ldlq`.
    """

    def __init__(self, W: torch.Tensor, bits: int, group_size: int,
                 clip_grid: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6)) -> None:
        _check_w(W, "ScalarGroupQuantizer", False)
        if not isinstance(bits, int) or not 1 <= bits <= 8:
            raise ValueError(f"ScalarGroupQuantizer: bits must be an int in 1..8, got {bits!r}")
        if not isinstance(group_size, int) or group_size < 1 or W.shape[1] % group_size:
            raise ValueError(f"ScalarGroupQuantizer: group_size ({group_size!r}) must divide in_features "
                             f"({W.shape[1]})")
        self.bits, self.group_size, self.qmax = bits, group_size, (1 << bits) - 1
        m, n = W.shape
        G = W.to(torch.float64).reshape(m, n // group_size, group_size)
        lo, hi = G.amin(-1), G.amax(-1)
        best_err = torch.full_like(lo, math.inf)
        best_s, best_z = torch.ones_like(lo), torch.zeros_like(lo)
        for r in clip_grid:
            s = ((hi - lo) * r / self.qmax).clamp_min(1e-12)
            z = torch.round(-lo * r / s)
            q = (torch.clamp(torch.round(G / s[..., None]) + z[..., None], 0, self.qmax) - z[..., None]) * s[..., None]
            err = ((q - G) ** 2).sum(-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
        self.scale, self.zero = best_s, best_z                   # (m, n/g)

    def __call__(self, x: torch.Tensor, start: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        gi = torch.arange(start, start + x.shape[1], device=x.device) // self.group_size
        s, z = self.scale[:, gi], self.zero[:, gi]
        code = torch.clamp(torch.round(x.to(torch.float64) / s) + z, 0, self.qmax)
        return (code - z) * s, [code.to(torch.uint8)]

    def bits_per_weight(self, scale_bits: int = 16) -> float:
        """``bits + (scale_bits + bits) / group_size`` (a scale and a ``bits``-wide zero point per group)."""
        return self.bits + (scale_bits + self.bits) / self.group_size


# ---------------------------------------------------------------------- top level
def _pack_signs(s: torch.Tensor) -> torch.Tensor:
    from hadakit.formats.packing import pack_codes
    return pack_codes((s < 0).to(torch.uint8), 1)


def _unpack_signs(p: torch.Tensor, n: int) -> torch.Tensor:
    from hadakit.formats.packing import unpack_codes
    return 1.0 - 2.0 * unpack_codes(p, 1, n).to(torch.float64)


def quantize_weight_e8p(W: torch.Tensor, H: torch.Tensor, bits: int = 2, *, seed: int = 0, damp: float = 0.01,
                        incoherence: bool = True, ldlq: bool = True,
                        scale_multipliers: tuple[float, ...] = (1.0,),
                        ) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, float]]:
    """Quantize a linear weight to E8P12 (2 bits) or RVQ (3/4 bits) with incoherence processing and BlockLDLQ.

    Steps: two-sided randomized Hadamard (seeded), one scale per matrix ``σ·m`` with ``σ = RMS(W̃)`` and ``m`` the
    best of ``scale_multipliers`` on the proxy loss (each one runs BlockLDLQ once), BlockLDLQ (8-wide) on ``H̃``,
    inverse transform.

    Returns ``(state, W_hat, stats)``: ``state`` holds plain tensors — ``codes`` (int16, ``(m, n/8)``; 2-bit stage),
    ``codes2`` (4 bits: int16; 3 bits: uint8), ``scales`` (float32, one per stage), ``signs_in`` / ``signs_out``
    (bit-packed uint8), ``bits`` and ``shape`` (int64); :func:`dequantize_e8p_state` rebuilds ``W_hat`` from it
    exactly. ``W_hat`` is in the original space (``W``'s dtype). ``stats``: ``proxy_rel`` (=
    ``tr(ΔHΔᵀ)/tr(WHWᵀ)``), ``mse_rel``, ``bits_per_weight``, ``scale``, ``multiplier``.

    Example:
        >>> import torch
        >>> W = torch.randn(64, 128); X = torch.randn(1000, 128)
        >>> state, W_hat, stats = quantize_weight_e8p(W, X.T @ X / 1000, bits=2, seed=0)
        >>> state["codes"].dtype, tuple(state["codes"].shape), 0 < stats["proxy_rel"] < 0.2
        (torch.int16, (64, 16), True)
    """
    _check_w(W, "quantize_weight_e8p", True)
    _check_h(H, W.shape[1], "quantize_weight_e8p")
    if bits not in (2, 3, 4):
        raise ValueError(f"quantize_weight_e8p: bits must be 2, 3 or 4, got {bits!r}")
    if not scale_multipliers or not all(isinstance(v, (int, float)) and v > 0 for v in scale_multipliers):
        raise ValueError(f"quantize_weight_e8p: scale_multipliers must be positive numbers, got {scale_multipliers!r}")
    m, n = W.shape
    W64, H64 = W.to(torch.float64), H.to(torch.float64)
    if incoherence:
        inc = Incoherence.from_seed(m, n, seed)
        Wt, Ht = inc.weight(W64), inc.hessian(H64)
        if not (torch.isfinite(Wt).all() and torch.isfinite(Ht).all()):
            raise ValueError(f"quantize_weight_e8p: the randomized Hadamard transform of the {m}×{n} weight / "
                             "Hessian gave NaN/Inf (check hadakit.transforms for these sizes)")
    else:
        inc = Incoherence(torch.ones(m, dtype=torch.float64), torch.ones(n, dtype=torch.float64))
        Wt, Ht = W64, H64
    sigma = float(Wt.pow(2).mean().sqrt())
    if sigma == 0:
        raise ValueError("quantize_weight_e8p: W is all zeros")
    best = None
    for mult in scale_multipliers:
        qz = E8PQuantizer(bits, sigma * float(mult))
        res = block_ldlq(Wt, Ht, qz, damp=damp) if ldlq else nearest_round(Wt, qz)
        loss = proxy_loss(Wt, res.W_hat, Ht)
        if best is None or loss < best[0]:
            best = (loss, float(mult), qz, res)
    loss, mult, qz, res = best
    state: dict[str, torch.Tensor] = {
        "codes": pack_e8p_codes(res.codes[0]),
        "scales": torch.tensor(qz.scales, dtype=torch.float32),
        "signs_out": _pack_signs(inc.signs_out),
        "signs_in": _pack_signs(inc.signs_in),
        "bits": torch.tensor(bits, dtype=torch.int64),
        "shape": torch.tensor([m, n], dtype=torch.int64),
    }
    if bits == 4:
        state["codes2"] = pack_e8p_codes(res.codes[1])
    elif bits == 3:
        state["codes2"] = res.codes[1].to(torch.uint8)
    W_hat = dequantize_e8p_state(state, dtype=torch.float64)
    ref = float(((W64 @ H64) * W64).sum())
    stats = {
        "proxy_rel": proxy_loss(W64, W_hat, H64) / ref if ref > 0 else math.nan,
        "mse_rel": float(((W_hat - W64) ** 2).sum() / (W64 ** 2).sum()),
        "bits_per_weight": bits_per_weight((m, n), bits),
        "scale": sigma * mult,
        "multiplier": mult,
    }
    return state, W_hat.to(W.dtype), stats


def dequantize_e8p_state(state: dict[str, torch.Tensor], *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rebuild the original-space weight from :func:`quantize_weight_e8p`'s state (decode, scale, inverse RHT)."""
    for k in ("codes", "scales", "signs_out", "signs_in", "bits", "shape"):
        if k not in state:
            raise ValueError(f"dequantize_e8p_state: state lacks {k!r}; pass the dict from quantize_weight_e8p")
    bits = int(state["bits"])
    m, n = (int(v) for v in state["shape"])
    rvq = RVQCodebook(bits)
    codes = [unpack_e8p_codes(state["codes"])]
    if bits == 4:
        codes.append(unpack_e8p_codes(state["codes2"]))
    elif bits == 3:
        codes.append(state["codes2"].to(torch.int32))
    scales = tuple(float(s) for s in state["scales"])
    # decode in float32 exactly as the quantizer did (the stored result equals W_hat bit for bit)
    Wt = rvq.decode(codes, scales, dtype=torch.float64).reshape(m, n)
    inc = Incoherence(_unpack_signs(state["signs_out"], m), _unpack_signs(state["signs_in"], n))
    return inc.weight_inverse(Wt.to(dtype) if dtype == torch.float64 else Wt).to(dtype)
