"""Calibrated options of a quantized linear, fitted on that layer's own calibration inputs.

Each option is chosen by the squared error of the layer's *quantized* output against its full-precision output on a
sample of calibration tokens, ``‖Q_a(T(x))·Q_w(W·T⁻ᵀ)ᵀ − x·Wᵀ‖²`` (RTN weights as the proxy; GPTQ runs afterwards on
the transformed weights with the transformed Hessian ``Mᵀ·H·M``, where ``T(x) = x·M``):

* **smoothing** (SmoothQuant / SmoothRot, AWQ for weight-only recipes): per-channel scales ``s`` with ``x/s``
  online and ``W·diag(s)`` offline, before the rotation. With quantized activations ``s_j = max|x_j|^α /
  max|W_:j|^(1−α)`` (SmoothQuant); with full-precision activations ``s_j = mean|x_j|^α`` (AWQ). ``α`` is searched
  on a grid per layer, and ``s = 1`` is always a candidate, so the search never makes the calibration error worse.
* **activation clipping**: one clip ratio per layer for the dynamic activation scales, from a grid.
* **learned transform** (SpinQuant-style orthogonal, or FlatQuant-style affine): a Kronecker ``P = A ⊗ B`` after the
  rotation, trained with the quantizers in the loop (straight-through estimator) by Adam on the sample, starting
  from the identity (so from the plain rotation), keeping the best iterate by calibration loss.

All searches are deterministic (fixed sample, fixed grids, seeded initialization).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hadakit.formats import QuantScheme, fake_quantize
from hadakit.quantization.gptq import HessianAccumulator, symmetric_gram
from hadakit.quantization.qlinear import input_map, weight_map
from hadakit.transforms.kronecker import KroneckerTransform, kron_apply

SMOOTH_ALPHAS = (0.0, 0.2, 0.35, 0.5, 0.65, 0.8)
ACT_CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6)


class BatchLogHessian(HessianAccumulator):
    """A :class:`HessianAccumulator` that keeps each batch's float32 Gram product (``batches``: ``(rows, xᵀx,
    rᵀx or None)``, in order) instead of adding it to the running float64 sums, so that data-parallel calibration
    can add the batches of every rank in the one-process order (:meth:`replay`) and get the one-process Hessian bit
    for bit. The batches are those of the plain accumulator (a flush every ``flush_rows`` rows, at window ends), so a
    rank whose windows start at a one-process batch boundary makes exactly the one-process batches of its windows.
    Memory: one ``n×n`` float32 matrix per batch (two with cross products) until the replay."""

    def __init__(self, n: int, device: torch.device | str = "cpu", cross: bool = False):
        super().__init__(n, device=device, cross=cross)
        self.batches: list[tuple[int, torch.Tensor, torch.Tensor | None]] = []

    def _flush(self) -> None:
        if not self._pending:
            return
        x = torch.cat(self._pending) if len(self._pending) > 1 else self._pending[0]
        c = None
        if self._c is not None:
            r = torch.cat(self._pending_ref) if len(self._pending_ref) > 1 else self._pending_ref[0]
            c = r.t() @ x
        self.batches.append((x.shape[0], symmetric_gram(x), c))
        self._pending, self._pending_ref, self._pending_rows = [], [], 0

    def replay(self, h: torch.Tensor, c: torch.Tensor | None, count: int) -> int:
        """Add this accumulator's batches, in order, to the running sums ``h`` / ``c`` of ``count`` rows (in place,
        with exactly the float64 updates of :class:`HessianAccumulator`); returns the new row count and drops the
        batches. ``h`` and ``c`` become this accumulator's sums."""
        self._flush()
        for rows, g, gc in self.batches:
            new = count + rows
            h.mul_(count / new).add_(g, alpha=2.0 / new)
            if c is not None:
                c.mul_(count / new).add_(gc, alpha=2.0 / new)
            count = new
        self.batches = []
        self._h, self._c, self.count = h, c, count
        return count


class InputStats:
    """What the calibration pass records about one linear's inputs: the raw Hessian ``2/N·Σxᵀx`` (float64, for
    GPTQ), per-channel max and mean of ``|x|``, and an evenly strided sample of at most ``max_rows`` token rows.
    ``log_batches``: keep the Hessian's per-batch Gram products for an ordered data-parallel reduction
    (:class:`BatchLogHessian`) instead of summing them."""

    def __init__(self, n: int, *, hessian: bool, max_rows: int, rows_per_window: int, device, ranges: bool = True,
                 cross: bool = False, log_batches: bool = False):
        self.n, self.ranges = n, ranges  # ranges=False: the Hessian only (no sample, max or mean)
        # cross: also the products with the full-precision model's inputs (``fptarget``)
        acc = BatchLogHessian if log_batches else HessianAccumulator
        self._hessian = acc(n, device=device, cross=cross) if hessian else None
        self.count = 0
        self.amax = torch.zeros(n, device=device)
        self.asum = torch.zeros(n, dtype=torch.float64, device=device)
        self.max_rows, self.rows_per_window = max_rows, rows_per_window
        self.samples: list[torch.Tensor] = []
        self._kept = 0

    def add(self, x: torch.Tensor, ref: torch.Tensor | None = None) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if self._hessian is not None:
            self._hessian.add(x, ref)
        self.count += x.shape[0]
        if not self.ranges:
            return
        ax = x.abs()
        self.amax = torch.maximum(self.amax, ax.amax(0))
        self.asum += ax.sum(0, dtype=torch.float64)
        if self._kept < self.max_rows:
            step = max(1, x.shape[0] // self.rows_per_window)
            rows = x[step // 2::step][: min(self.rows_per_window, self.max_rows - self._kept)]
            self.samples.append(rows.clone())
            self._kept += rows.shape[0]

    @property
    def h(self) -> torch.Tensor | None:
        return self._hessian.h if self._hessian is not None else None

    @property
    def cross(self) -> torch.Tensor | None:
        return self._hessian.c if self._hessian is not None else None

    @property
    def amean(self) -> torch.Tensor:
        return (self.asum / max(self.count, 1)).float()

    def sample(self) -> torch.Tensor:
        return torch.cat(self.samples) if self.samples else torch.zeros(0, self.n)


@dataclass
class LinearFit:
    """The fitted input map of one linear and what the fit measured (relative output errors on the sample)."""

    smooth: torch.Tensor | None = None
    alpha: float | None = None
    act_clip: float | None = None
    transform: KroneckerTransform | None = None
    error_before: float = float("nan")  # with the plain rotation, no clipping
    error_after: float = float("nan")


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float(((y - ref) ** 2).sum() / (ref ** 2).sum().clamp_min(1e-30))


class LinearProblem:
    """One linear's quantized-output error as a function of its input map (see the module docstring)."""

    def __init__(self, x: torch.Tensor, w: torch.Tensor, rotation, w_scheme: QuantScheme | None,
                 a_scheme: QuantScheme | None):
        self.x, self.w = x.float(), w.float()
        # The searches use RTN without the per-group clip search as the weight proxy: the clip search costs ~10
        # quantizations per call, and GPTQ (with the clip search, if asked for) replaces these weights anyway.
        self.w_scheme = w_scheme.replace(clip_search=False) if w_scheme is not None else None
        self.rotation, self.a_scheme = rotation, a_scheme
        self.ref = self.x @ self.w.t()
        self._wq_cache: tuple | None = None  # (smooth, transform, quantized weight) of the last call

    @torch.no_grad()
    def error(self, smooth=None, act_clip=None, transform: KroneckerTransform | None = None) -> float:
        x = input_map(self.x, smooth, self.rotation, transform)
        cached = self._wq_cache
        if cached is not None and cached[0] is smooth and cached[1] is transform:
            w = cached[2]  # the activation clip search varies only the activation side
        else:
            w = weight_map(self.w, smooth, self.rotation, transform)
            if self.w_scheme is not None:
                w = fake_quantize(w, self.w_scheme)
            self._wq_cache = (smooth, transform, w)
        if self.a_scheme is not None:
            x = fake_quantize(x, self.a_scheme if act_clip is None else self.a_scheme.replace(clip_ratio=act_clip))
        return _rel_err(x @ w.t(), self.ref)


def smoothing_scales(stats: InputStats, w: torch.Tensor, alpha: float, act_quantized: bool) -> torch.Tensor:
    """Per-input-channel scales for migration strength ``alpha``, normalized to geometric mean 1."""
    eps = 1e-5
    if act_quantized:
        s = stats.amax.clamp_min(eps) ** alpha / w.float().abs().amax(0).clamp_min(eps) ** (1 - alpha)
    else:
        s = stats.amean.clamp_min(eps) ** alpha
    s = s / s.log().mean().exp()
    return s.clamp(1e-4, 1e4)


def search_smoothing(problem: LinearProblem, stats: InputStats, alphas=SMOOTH_ALPHAS, fixed: float | None = None
                     ) -> tuple[torch.Tensor | None, float | None, float]:
    """Best ``(scales, alpha, error)``; ``(None, None, e)`` when no scaling beats ``s = 1``."""
    act_q = problem.a_scheme is not None
    if fixed is not None:
        s = smoothing_scales(stats, problem.w, fixed, act_q)
        return s, fixed, problem.error(smooth=s)
    best = (None, None, problem.error())
    for a in alphas:
        s = smoothing_scales(stats, problem.w, a, act_q)
        e = problem.error(smooth=s)
        if e < best[2]:
            best = (s, a, e)
    return best


def search_act_clip(problem: LinearProblem, smooth, transform, grid=ACT_CLIP_GRID) -> tuple[float, float]:
    best = (1.0, problem.error(smooth=smooth, transform=transform))
    for r in grid[1:]:
        e = problem.error(smooth=smooth, act_clip=r, transform=transform)
        if e < best[1]:
            best = (r, e)
    return best


def _ste(t: torch.Tensor, scheme: QuantScheme | None) -> torch.Tensor:
    if scheme is None:
        return t
    with torch.no_grad():
        q = fake_quantize(t.detach(), scheme)
    return t + (q - t).detach()


def train_transform(problem: LinearProblem, smooth, mode: str, *, steps: int = 40, lr: float = 2e-3,
                    seed: int = 0, max_rows: int = 512) -> tuple[KroneckerTransform, float]:
    """Learn a Kronecker transform after ``smooth`` and the rotation (module docstring); returns it frozen with its
    calibration error on the training rows. The best iterate (including the identity start) is kept.

    Each step costs three ``rows × in × out`` matmuls, so training uses an evenly strided subset of at most
    ``max_rows`` of the sample (512: ~0.1 s per step for a 640 × 2048 layer on one CPU core)."""
    stride = max(1, problem.x.shape[0] // max_rows)
    ref = problem.ref[::stride][:max_rows]
    with torch.no_grad():  # the fixed part of the map; only the Kronecker factors are trained
        x = input_map(problem.x[::stride][:max_rows], smooth, problem.rotation, None)
        w = weight_map(problem.w, smooth, problem.rotation, None)
    norm = (ref ** 2).sum().clamp_min(1e-30)
    torch.manual_seed(seed)
    t = KroneckerTransform(x.shape[1], mode)
    opt = torch.optim.Adam(t.parameters(), lr=lr)
    best_state, best_loss = {k: v.detach().clone() for k, v in t.state_dict().items()}, float("inf")
    for _ in range(steps + 1):
        a, b = t.factors()
        if mode == "orthogonal":
            ai, bi = a, b
        else:
            ai, bi = torch.linalg.inv(a).t(), torch.linalg.inv(b).t()
        xq = _ste(kron_apply(x, a, b), problem.a_scheme)
        wq = _ste(kron_apply(w, ai, bi), problem.w_scheme)
        loss = ((xq @ wq.t() - ref) ** 2).sum() / norm
        lv = float(loss.detach())
        if lv < best_loss:
            best_loss = lv
            best_state = {k: v.detach().clone() for k, v in t.state_dict().items()}
        opt.zero_grad()
        loss.backward()
        opt.step()
    t.load_state_dict(best_state)
    t.freeze()
    return t, best_loss


def transform_hessian(h: torch.Tensor, smooth, rotation, transform) -> torch.Tensor:
    """``Mᵀ·H·M`` for the input map ``T(x) = x·M`` without forming ``M``: ``T`` applied to the rows of the symmetric
    ``H`` gives ``H·M``; applied again to its transpose, ``Mᵀ·H·M`` (fast transforms, float64)."""
    h = h.to(torch.float64)
    out = input_map(input_map(h, smooth, rotation, transform).t().contiguous(), smooth, rotation, transform)
    return 0.5 * (out + out.t())  # exact symmetry for the Cholesky factorization
