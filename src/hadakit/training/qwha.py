"""QWHA adapters: quantization-aware Walsh–Hadamard adaptation of a frozen (quantized) linear.

After Jeon, Lee, Kang, Kim & Kim, "QWHA: Quantization-Aware Walsh-Hadamard Adaptation for Parameter-Efficient
Fine-Tuning on Large Language Models" (2025, arXiv 2509.17428). Written from the paper's description; no code of
the authors was used.

The adapter adds ``ΔW = F · H⁻¹`` to a frozen base linear ``y = x·W_qᵀ + b``, with ``H`` the orthonormal
Walsh–Hadamard matrix along the input dimension (``hadakit.transforms``: ``H = hadamard_matrix(n) / sqrt(n)``,
any ``n = m·2^k`` with a known order-``m`` matrix, e.g. 640 = 20·32, 2048) and ``F`` [out, in] sparse: a fixed
budget of trainable coefficients ``values`` at positions ``(rows, cols)`` (registered buffers). Since
``H⁻¹ = Hᵀ``,

    y = base(x) + x · H · Fᵀ = base(x) + (inverse_hadamard_transform(x)) · Fᵀ

so the adapter costs one fast transform of the input and a sparse product, and ``ΔW`` is never formed densely
(``forward_mode="sparse"``); ``"dense"`` scatters ``F`` into a dense matrix and uses one matmul (cheaper when the
budget is a large share of ``out·in``; ``benchmarks/qwha_gemma.py`` measures both).

Initialisation (:func:`qwha_init`), from the quantization error ``E = W − W_q`` in the transformed domain
``Ẽ = E · H`` (so ``E = Ẽ · H⁻¹`` exactly):

1. **allocation** (the paper's AdaAlloc: the budget split over output channels by their error magnitude):
   row ``i`` gets ``r_i ∝ ‖Ẽ_i‖_p ^ (1/temperature)``, rounded by largest remainders so that ``Σ r_i`` equals the
   budget exactly, at least ``min_per_row`` per row (keeps ``ΔW`` full rank when the budget allows) and at most
   ``in`` (the excess is handed on to the other rows); ``allocation="uniform"`` gives every row the same share.
2. **selection**: in row ``i`` the ``r_i`` coefficients of largest ``|Ẽ_ij|``.
3. **values**: without calibration statistics, ``F_S = Ẽ_S`` — for an orthonormal ``H`` this is the exact
   least-squares fit of ``E`` on the chosen support, and selection by magnitude makes the support optimal per row
   (``‖E − ΔW‖_F² = ‖Ẽ‖_F² − Σ_S Ẽ²``). With an input second-moment matrix ``C = E[xᵀx]`` (``cov``), the values
   are refined to minimise the layer's output error ``(e_i − ΔW_i) C (e_i − ΔW_i)ᵀ`` row by row on the same
   support (the paper's value refinement toward the layer output): ``(C̃_SS + λ I) f = (C̃ Ẽ_iᵀ)_S`` with
   ``C̃ = Hᵀ C H`` and ``λ = refine_damp · mean(diag C̃)``.

``init="zero"`` keeps the same allocation / positions but zero values (``ΔW = 0`` at the start).

This package never imports ``hadakit.quantization``: the base is any module with ``y = x·Wᵀ (+ b)`` semantics
(``nn.Linear``, a packed ``RotatedQuantLinear`` without activation quantization, ...). Its dense effective weight,
needed for the initialisation and for :meth:`QWHALinear.merged_weight`, is given by the caller or read off the
module by :func:`effective_weight` (``base(I) − base(0)``, checked to be affine).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from hadakit.selection import check_patterns, selected
from hadakit.transforms import hadamard_transform, inverse_hadamard_transform
from hadakit.transforms.matrices import base_order

__all__ = [
    "ALLOCATIONS",
    "FORWARD_MODES",
    "INITS",
    "QWHAConfig",
    "QWHALinear",
    "QWHAReport",
    "add_qwha",
    "allocate_budget",
    "effective_weight",
    "merge_qwha",
    "qwha_init",
    "qwha_layers",
]

log = logging.getLogger(__name__)

ALLOCATIONS = ("adaptive", "uniform")
INITS = ("error", "zero")
FORWARD_MODES = ("sparse", "dense", "auto")
#: ``forward_mode="auto"`` uses the dense product when the budget is at least this share of ``out·in``
#: (measured on the CPU in benchmarks/qwha_gemma.py: see docs/results/qwha).
AUTO_DENSE_SHARE = 0.1


def _check_num(name: str, value: Any, lo: float, *, integer: bool = False, open_lo: bool = False,
               hi: float | None = None) -> None:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or (not integer and not math.isfinite(value)):
        raise TypeError(f"QWHAConfig.{name} must be {'an int' if integer else 'a finite number'}, got {value!r}")
    if value < lo or (open_lo and value == lo) or (hi is not None and value > hi):
        bound = f"{'>' if open_lo else '>='} {lo}" + (f" and <= {hi}" if hi is not None else "")
        raise ValueError(f"QWHAConfig.{name} must be {bound}, got {value!r}")


@dataclass(frozen=True)
class QWHAConfig:
    """How QWHA adapters are placed, sized and initialised (frozen; validated on construction).

    Args:
        rank_equivalent: budget per layer as the parameter count of a rank-``r`` LoRA on that layer,
            ``r·(in + out)`` (the default budget rule; set ``budget`` instead for a fixed count).
        budget: a fixed number of trainable coefficients per layer (overrides ``rank_equivalent``).
        allocation: ``"adaptive"`` (AdaAlloc: per-row budget by error magnitude) or ``"uniform"``.
        norm_p: the ``p`` of the row norm ``‖Ẽ_i‖_p`` that drives the adaptive allocation.
        temperature: the share of row ``i`` is ``∝ ‖Ẽ_i‖_p ^ (1/temperature)`` (small: concentrate, large: even).
        min_per_row: coefficients every row gets at least (when the budget allows ``out·min_per_row``).
        init: ``"error"`` (values from the quantization error) or ``"zero"``.
        refine_damp: damping of the value refinement's normal equations (share of the mean diagonal).
        forward_mode: ``"sparse"`` (gather / index-add, ``ΔW`` never formed), ``"dense"`` (scatter ``F``, one
            matmul) or ``"auto"`` (dense when the budget is at least ``AUTO_DENSE_SHARE`` of ``out·in``).
        targets / ignore: which linears :func:`add_qwha` wraps (``hadakit.selection`` patterns; empty targets:
            every linear-like module the caller offers).
    """

    rank_equivalent: int = 8
    budget: int | None = None
    allocation: str = "adaptive"
    norm_p: float = 2.0
    temperature: float = 1.0
    min_per_row: int = 1
    init: str = "error"
    refine_damp: float = 0.01
    forward_mode: str = "auto"
    targets: tuple[str, ...] = ()
    ignore: tuple[str, ...] = field(default=("lm_head", "embed"))

    def __post_init__(self) -> None:
        _check_num("rank_equivalent", self.rank_equivalent, 1, integer=True)
        if self.budget is not None:
            _check_num("budget", self.budget, 1, integer=True)
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"QWHAConfig.allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        _check_num("norm_p", self.norm_p, 0.0, open_lo=True)
        _check_num("temperature", self.temperature, 0.0, open_lo=True)
        _check_num("min_per_row", self.min_per_row, 0, integer=True)
        if self.init not in INITS:
            raise ValueError(f"QWHAConfig.init must be one of {INITS}, got {self.init!r}")
        _check_num("refine_damp", self.refine_damp, 0.0)
        if self.forward_mode not in FORWARD_MODES:
            raise ValueError(f"QWHAConfig.forward_mode must be one of {FORWARD_MODES}, got {self.forward_mode!r}")
        object.__setattr__(self, "targets", check_patterns(self.targets, "QWHAConfig.targets"))
        object.__setattr__(self, "ignore", check_patterns(self.ignore, "QWHAConfig.ignore"))

    def layer_budget(self, in_features: int, out_features: int) -> int:
        """The number of trainable coefficients of a layer of this shape (at most ``in·out``)."""
        b = self.budget if self.budget is not None else self.rank_equivalent * (in_features + out_features)
        return min(b, in_features * out_features)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        d = asdict(self)
        d["targets"], d["ignore"] = list(self.targets), list(self.ignore)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QWHAConfig":
        """The inverse of :meth:`to_dict`."""
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown QWHAConfig fields {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        d = dict(data)
        for k in ("targets", "ignore"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


def _check_in_features(n: int) -> None:
    if base_order(n) is None:
        raise ValueError(f"QWHA needs a Walsh–Hadamard matrix of order in_features={n} (sizes m·2^k with a known "
                         "order-m matrix, e.g. 640, 768, 2048); pad the layer or leave it out via ignore")


def allocate_budget(scores: torch.Tensor, budget: int, capacity: int, *, min_per_row: int = 0) -> torch.Tensor:
    """Split ``budget`` integer slots over rows in proportion to ``scores`` (≥ 0), each row in ``[lo, capacity]``
    with ``lo = min_per_row`` when ``budget ≥ rows·min_per_row`` (else 0); the result sums to ``budget`` exactly.

    Largest-remainder rounding; rows over ``capacity`` are clipped and their excess re-split over the others
    (water-filling). All-zero scores split evenly.
    """
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D (one per row), got shape {tuple(scores.shape)}")
    rows = scores.numel()
    if not 0 <= budget <= rows * capacity:
        raise ValueError(f"budget {budget} does not fit {rows} rows of capacity {capacity}: use 0..{rows * capacity}")
    s = scores.detach().to(torch.float64).clamp_min(0)
    if not torch.isfinite(s).all():
        raise ValueError("scores must be finite")
    lo = min_per_row if budget >= rows * min_per_row else 0
    lo = min(lo, capacity)
    out = torch.full((rows,), lo, dtype=torch.long)
    left = budget - rows * lo
    active = torch.ones(rows, dtype=torch.bool)
    while left > 0:
        room = capacity - out
        active &= room > 0
        w = torch.where(active, s, torch.zeros_like(s))
        if float(w.sum()) <= 0:
            w = active.to(torch.float64)
        share = w / w.sum() * left
        base = torch.minimum(share.floor().long(), room)
        rem = left - int(base.sum())
        frac = torch.where(active & (base < room), share - share.floor(), torch.full_like(share, -1.0))
        if rem > 0:
            k = min(rem, int((frac >= 0).sum()))
            idx = torch.topk(frac, k).indices
            base[idx] += 1
        out += base
        left = budget - int(out.sum())
    return out


def _transformed(E: torch.Tensor) -> torch.Tensor:
    """``Ẽ = E · H`` (rows of ``E`` through ``H``; ``H`` orthonormal, ``hadamard_transform(x) = x·Hᵀ``)."""
    return inverse_hadamard_transform(E, dim=-1, normalize=True)


def qwha_init(weight: torch.Tensor, quantized: torch.Tensor, budget: int, config: QWHAConfig | None = None, *,
              cov: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(rows, cols, values)`` of the QWHA adapter of one layer: see the module docstring.

    Args:
        weight: the full-precision weight ``W`` [out, in].
        quantized: the quantized base's dense effective weight ``W_q`` [out, in].
        budget: number of coefficients (``config.layer_budget(in, out)`` for the configured rule).
        config: allocation / init settings (default ``QWHAConfig()``).
        cov: optional input second-moment matrix ``E[xᵀx]`` [in, in] of this layer (calibration activations):
            turns on the value refinement toward the output error.

    Returns:
        ``rows``, ``cols`` (int64, sorted by row then column) and ``values`` (float32), each of length ``budget``.
    """
    config = config or QWHAConfig()
    if weight.dim() != 2 or weight.shape != quantized.shape:
        raise ValueError(f"weight and quantized must be 2-D of one shape, got {tuple(weight.shape)} and "
                         f"{tuple(quantized.shape)}")
    out_f, in_f = weight.shape
    _check_in_features(in_f)
    if cov is not None and cov.shape != (in_f, in_f):
        raise ValueError(f"cov must be [in, in] = [{in_f}, {in_f}], got {tuple(cov.shape)}")
    E = weight.detach().to(torch.float64) - quantized.detach().to(torch.float64)
    Et = _transformed(E)
    if config.allocation == "adaptive":
        scores = Et.abs().pow(config.norm_p).sum(1).pow(1.0 / config.norm_p).pow(1.0 / config.temperature)
    else:
        scores = torch.ones(out_f, dtype=torch.float64)
    per_row = allocate_budget(scores, budget, in_f, min_per_row=config.min_per_row)
    order = Et.abs().argsort(dim=1, descending=True)
    keep = torch.arange(in_f).expand(out_f, in_f) < per_row[:, None]
    rows = torch.arange(out_f)[:, None].expand(out_f, in_f)[keep]
    cols = order[keep]
    # sort by (row, col)
    key = rows * in_f + cols
    key, perm = key.sort()
    rows, cols = rows[perm].contiguous(), cols[perm].contiguous()
    if config.init == "zero":
        return rows, cols, torch.zeros(rows.numel(), dtype=torch.float32)
    values = Et[rows, cols].clone()
    if cov is not None:
        values = _refine(Et, rows, cols, per_row, cov.detach().to(torch.float64), config.refine_damp, values)
    return rows, cols, values.float()


def _refine(Et: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, per_row: torch.Tensor, cov: torch.Tensor,
            damp: float, values: torch.Tensor) -> torch.Tensor:
    # C̃ = Hᵀ C H  (C̃_ab = h_aᵀ C h_b with h_a the a-th column of H)
    Ct = _transformed(_transformed(cov).T.contiguous()).T
    Ct = 0.5 * (Ct + Ct.T)
    lam = damp * float(Ct.diagonal().mean()) if Ct.numel() else 0.0
    rhs_all = Et @ Ct  # row i: (C̃ Ẽ_iᵀ)ᵀ
    out = values.clone()
    starts = torch.zeros(per_row.numel() + 1, dtype=torch.long)
    starts[1:] = per_row.cumsum(0)
    for k in sorted(set(per_row.tolist()) - {0}):
        idx = (per_row == k).nonzero().flatten()  # rows with k coefficients: one batched k×k solve
        pos = starts[idx][:, None] + torch.arange(k)  # [rows_k, k] positions into cols / values
        S = cols[pos]
        A = Ct[S[:, :, None], S[:, None, :]] + lam * torch.eye(k, dtype=Ct.dtype)
        rhs = rhs_all[idx[:, None], S]
        out[pos] = torch.linalg.solve(A, rhs.unsqueeze(-1)).squeeze(-1)
    return out


def effective_weight(base: nn.Module, in_features: int, *, dtype: torch.dtype = torch.float32,
                     check: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(W, b)`` of a linear-like module read off its outputs: ``Wᵀ = base(I) − base(0)``, ``b = base(0)``.

    With ``check`` the module is probed on a random input and must be affine to 1e-4 (relative), else a
    ``ValueError``: a base with activation quantization is not linear, so ``ΔW`` cannot be merged into it exactly.
    """
    p = next(iter(base.parameters()), None)
    if p is None:
        p = next(iter(base.buffers()), None)
    device = p.device if p is not None else torch.device("cpu")
    with torch.no_grad():
        zero = torch.zeros(1, in_features, device=device, dtype=dtype)
        b0 = base(zero).to(torch.float64)
        eye = torch.eye(in_features, device=device, dtype=dtype)
        W = (base(eye).to(torch.float64) - b0).T.contiguous()
        b = b0[0]
        if check:
            g = torch.Generator(device="cpu").manual_seed(0)
            x = torch.randn(4, in_features, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
            ref = x.to(torch.float64) @ W.T + b
            got = base(x).to(torch.float64)
            err = float((got - ref).norm() / ref.norm().clamp_min(1e-30))
            if err > 1e-4:
                raise ValueError(f"the base module is not linear (relative deviation {err:.2e} from x·Wᵀ + b): "
                                 "QWHA needs a base without activation quantization, or pass its weight yourself")
    bias = None if float(b.abs().max()) == 0.0 else b.to(dtype)
    return W.to(dtype), bias


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta": local, restored on exit
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


class _SparseProduct(torch.autograd.Function):
    """``y = xt · Fᵀ`` with ``F`` given by CSR-ordered positions (rows sorted, then cols) and ``values``.

    Forward ``(F · xtᵀ)ᵀ`` and the input gradient ``(Fᵀ · gyᵀ)ᵀ`` are sparse × dense products; the gradient of
    the values is ``gyᵀ · xt`` sampled at the positions (``torch.sparse.sampled_addmm``). Only ``xt`` is saved.
    """

    @staticmethod
    def forward(ctx, xt: torch.Tensor, values: torch.Tensor, crow: torch.Tensor, cols: torch.Tensor,
                crow_t: torch.Tensor, rows_t: torch.Tensor, perm_t: torch.Tensor, out_features: int) -> torch.Tensor:
        ctx.save_for_backward(xt, values, crow, cols, crow_t, rows_t, perm_t)
        ctx.out_features = out_features
        F = _csr(crow, cols, values.to(xt.dtype), (out_features, xt.shape[1]))
        return torch.sparse.mm(F, xt.T.contiguous()).T

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        xt, values, crow, cols, crow_t, rows_t, perm_t = ctx.saved_tensors
        gx = gv = None
        gy = gy.contiguous()
        if ctx.needs_input_grad[0]:
            Ft = _csr(crow_t, rows_t, values.to(xt.dtype)[perm_t], (xt.shape[1], ctx.out_features))
            gx = torch.sparse.mm(Ft, gy.T.contiguous()).T
        if ctx.needs_input_grad[1]:
            pattern = _csr(crow, cols, torch.zeros(values.shape, dtype=xt.dtype, device=xt.device),
                           (ctx.out_features, xt.shape[1]))
            gv = torch.sparse.sampled_addmm(pattern, gy.T.contiguous(), xt.contiguous(), beta=0.0).values()
            gv = gv.to(values.dtype)
        return gx, gv, None, None, None, None, None, None


class QWHALinear(nn.Module):
    """A frozen linear-like ``base`` plus the QWHA adapter ``ΔW = F·H⁻¹`` (see the module docstring).

    Registered state: ``base.*`` (the base module's own, frozen), ``rows`` / ``cols`` (int64 buffers, the positions
    of ``F``'s coefficients) and ``values`` (the trainable coefficients, a Parameter). ``state_dict`` /
    ``load_state_dict`` round-trip everything; a module built with zero values of the right length loads any
    adapter of that budget (the buffers carry the positions). Positions are stored sorted by (row, column), the
    values permuted with them; state_dicts loaded into the module must keep that order (``state_dict`` does).
    """

    def __init__(self, base: nn.Module, in_features: int, out_features: int, rows: torch.Tensor,
                 cols: torch.Tensor, values: torch.Tensor | None = None, *, forward_mode: str = "auto"):
        super().__init__()
        if not isinstance(base, nn.Module):
            raise TypeError(f"base must be an nn.Module (a linear-like layer), got {type(base).__name__}")
        _check_in_features(in_features)
        if forward_mode not in FORWARD_MODES:
            raise ValueError(f"forward_mode must be one of {FORWARD_MODES}, got {forward_mode!r}")
        rows, cols = torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)
        if rows.dim() != 1 or rows.shape != cols.shape:
            raise ValueError(f"rows and cols must be 1-D of one length, got {tuple(rows.shape)} and "
                             f"{tuple(cols.shape)}")
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= out_features or int(cols.min()) < 0
                             or int(cols.max()) >= in_features):
            raise ValueError(f"positions out of range: rows must be in [0, {out_features}), cols in [0, {in_features})")
        if rows.numel() != torch.unique(rows * in_features + cols).numel():
            raise ValueError("positions (rows, cols) must be distinct")
        if values is None:
            values = torch.zeros(rows.numel())
        if values.shape != rows.shape:
            raise ValueError(f"values must have one entry per position ({rows.numel()}), got {tuple(values.shape)}")
        order = torch.argsort(rows * in_features + cols)  # CSR order: by row, then column
        rows, cols, values = rows[order], cols[order], values.detach()[order]
        self.in_features, self.out_features = in_features, out_features
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.register_buffer("rows", rows.clone())
        self.register_buffer("cols", cols.clone())
        self.values = nn.Parameter(values.detach().float().clone())
        share = rows.numel() / (in_features * out_features)
        self.forward_mode = forward_mode if forward_mode != "auto" else (
            "dense" if share >= AUTO_DENSE_SHARE else "sparse")

    @property
    def budget(self) -> int:
        """Number of trainable coefficients."""
        return self.values.numel()

    def coefficients(self) -> torch.Tensor:
        """``F`` as a dense [out, in] tensor (differentiable in ``values``)."""
        F = self.values.new_zeros(self.out_features, self.in_features)
        return F.index_put((self.rows, self.cols), self.values)

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``ΔW = F·H⁻¹`` [out, in] (dense; for merging and checks, not used by the forward)."""
        return hadamard_transform(self.coefficients().to(dtype), dim=-1, normalize=True)

    def _layout(self) -> tuple[torch.Tensor, ...]:
        """CSR row pointers of ``F`` and of ``Fᵀ`` (with the permutation of ``values`` into ``Fᵀ``'s order)."""
        key = (self.rows.data_ptr(), self.cols.data_ptr(), self.rows._version, self.cols._version)
        cached = self.__dict__.get("_layout_cache")
        if cached is not None and cached[0] == key:
            return cached[1]
        o, i = self.out_features, self.in_features
        crow = torch.zeros(o + 1, dtype=torch.long, device=self.rows.device)
        crow[1:] = torch.bincount(self.rows, minlength=o).cumsum(0)
        perm_t = torch.argsort(self.cols * o + self.rows)
        crow_t = torch.zeros(i + 1, dtype=torch.long, device=self.rows.device)
        crow_t[1:] = torch.bincount(self.cols, minlength=i).cumsum(0)
        layout = (crow, self.cols, crow_t, self.rows[perm_t].contiguous(), perm_t)
        self.__dict__["_layout_cache"] = (key, layout)
        return layout

    def adapter(self, x: torch.Tensor) -> torch.Tensor:
        """``x·ΔWᵀ`` without forming ``ΔW``: ``(x·H)·Fᵀ``."""
        shape = x.shape
        xt = inverse_hadamard_transform(x.reshape(-1, self.in_features), dim=-1, normalize=True)
        if self.forward_mode == "dense":
            y = xt @ self.coefficients().to(xt.dtype).T
        else:
            y = _SparseProduct.apply(xt, self.values, *self._layout(), self.out_features)
        return y.reshape(*shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, the layer expects {self.in_features}")
        return self.base(x) + self.adapter(x).to(x.dtype)

    def merged_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """``W_q + ΔW`` in float32: ``base_weight`` (the base's dense effective weight) or read off the base by
        :func:`effective_weight`."""
        if base_weight is None:
            base_weight, _ = effective_weight(self.base, self.in_features)
        if base_weight.shape != (self.out_features, self.in_features):
            raise ValueError(f"base_weight must be [{self.out_features}, {self.in_features}], got "
                             f"{tuple(base_weight.shape)}")
        return (base_weight.detach().to(torch.float64) + self.delta_weight(torch.float64)).float()

    @torch.no_grad()
    def merge(self) -> nn.Module:
        """Fold ``ΔW`` into the base and return it: exact (float arithmetic) for a plain ``nn.Linear`` base.

        Any other base (a packed INT4 weight, say) cannot hold ``W_q + ΔW`` without re-quantizing it, which is not
        exact: that raises a ``TypeError``; use :meth:`to_linear` for a float ``nn.Linear`` with the merged weight.
        """
        if type(self.base) is not nn.Linear:
            raise TypeError(f"merge() folds ΔW exactly only into a float nn.Linear base, not "
                            f"{type(self.base).__name__} (re-quantizing would not be exact); use to_linear() for a "
                            "float nn.Linear holding W_q + ΔW")
        w = self.base.weight
        w.copy_((w.to(torch.float64) + self.delta_weight(torch.float64)).to(w.dtype))
        return self.base

    @torch.no_grad()
    def to_linear(self, base_weight: torch.Tensor | None = None) -> nn.Linear:
        """A float32 ``nn.Linear`` with weight ``W_q + ΔW`` and the base's bias (read off it if not given)."""
        if base_weight is None:
            base_weight, bias = effective_weight(self.base, self.in_features)
        else:
            _, bias = effective_weight(self.base, self.in_features, check=False)
        lin = nn.Linear(self.in_features, self.out_features, bias=bias is not None)
        lin.weight.copy_(self.merged_weight(base_weight))
        if bias is not None:
            lin.bias.copy_(bias)
        return lin

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, budget={self.budget} "
                f"({100 * self.budget / (self.in_features * self.out_features):.2f}% of out·in), "
                f"forward={self.forward_mode}")


@dataclass
class QWHAReport:
    """What :func:`add_qwha` did: ``layers`` rows of (name, in, out, budget, init error ratio)."""

    layers: list[dict[str, Any]] = field(default_factory=list)

    @property
    def trainable(self) -> int:
        """Total trainable coefficients."""
        return sum(r["budget"] for r in self.layers)


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def add_qwha(model: nn.Module, config: QWHAConfig, *, full_weights: dict[str, torch.Tensor],
             base_weights: dict[str, torch.Tensor] | None = None, covariances: dict[str, torch.Tensor] | None = None,
             is_linear: Callable[[nn.Module], bool] | None = None,
             progress: Callable[[str], None] | None = None) -> QWHAReport:
    """Wrap the selected linear-like modules of ``model`` in :class:`QWHALinear` (in place) and freeze the rest.

    Args:
        model: the (quantized) model.
        config: budget, allocation, init, targets / ignore.
        full_weights: module name → the full-precision weight ``W`` (the init fits ``W − W_q``); only modules
            named here are candidates, then ``config.targets`` / ``config.ignore`` select among them.
        base_weights: module name → the base's dense effective weight ``W_q`` (default: read off the module by
            :func:`effective_weight`).
        covariances: module name → input second moment ``E[xᵀx]`` for the value refinement (optional).
        is_linear: optional extra predicate on the module.
        progress: optional callback receiving one line per wrapped layer.
    """
    if not isinstance(config, QWHAConfig):
        raise TypeError(f"config must be a QWHAConfig, got {type(config).__name__}")
    for p in model.parameters():
        p.requires_grad_(False)
    report = QWHAReport()
    names = [n for n, m in model.named_modules() if n in full_weights
             and selected(n, type(m).__name__, config.targets, config.ignore) and (is_linear is None or is_linear(m))]
    missing = set(full_weights) - {n for n, _ in model.named_modules()}
    if missing:
        raise ValueError(f"full_weights names modules the model does not have: {sorted(missing)[:5]}")
    for name in names:
        mod = model.get_submodule(name)
        W = full_weights[name]
        out_f, in_f = W.shape
        Wq = base_weights[name] if base_weights is not None and name in base_weights else \
            effective_weight(mod, in_f)[0]
        budget = config.layer_budget(in_f, out_f)
        cov = covariances.get(name) if covariances else None
        rows, cols, values = qwha_init(W, Wq, budget, config, cov=cov)
        layer = QWHALinear(mod, in_f, out_f, rows, cols, values, forward_mode=config.forward_mode)
        _set_module(model, name, layer)
        E = W.double() - Wq.double()
        res = E - layer.delta_weight(torch.float64).detach()
        row = dict(name=name, in_features=in_f, out_features=out_f, budget=budget,
                   weight_error_ratio=float(res.norm() / E.norm().clamp_min(1e-30)), forward=layer.forward_mode)
        report.layers.append(row)
        if progress is not None:
            progress(f"qwha {name}: budget {budget}, ‖E−ΔW‖/‖E‖ = {row['weight_error_ratio']:.3f}")
    log.info("QWHA: %d layers, %d trainable coefficients", len(report.layers), report.trainable)
    return report


def merge_qwha(model: nn.Module) -> int:
    """Replace every :class:`QWHALinear` whose base is a float ``nn.Linear`` by that linear with ``ΔW`` folded in;
    returns how many were merged (others are left as they are)."""
    n = 0
    for name, mod in list(model.named_modules()):
        if isinstance(mod, QWHALinear) and type(mod.base) is nn.Linear:
            _set_module(model, name, mod.merge())
            n += 1
    return n


def qwha_layers(model: nn.Module) -> Iterable[tuple[str, QWHALinear]]:
    """``(name, layer)`` of every QWHA layer in ``model``."""
    return ((n, m) for n, m in model.named_modules() if isinstance(m, QWHALinear))


