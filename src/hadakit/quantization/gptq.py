"""GPTQ (Frantar et al., 2022): quantize a weight column by column, spreading each column's rounding error over the
columns not yet quantized through the inverse Hessian of the layer inputs, ``H = 2·XᵀX``.

Format-agnostic: the element grid and the group scales come from a ``GroupQuantizer`` (see ``quantization/quantizers``),
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
    # Columns quantized between two lazy updates of the remaining ones. The result is the same for any size up to
    # float rounding; 32 measured fastest on a CPU (the per-column update of the block's rest is a smaller
    # rank-1 product): 0.32 s against 0.51 s with 128 for a 2048 × 640 weight.
    block_size: int = 32
    act_order: bool = False     # visit columns by decreasing Hessian diagonal
    # Rounds of "least-squares group scales for the chosen codes, then GPTQ again with those scales fixed"
    # (quantizers that can refit their scales; others ignore it).
    refit: int = 0

    def to_dict(self) -> dict:
        return {"damp": self.damp, "block_size": self.block_size, "act_order": self.act_order, "refit": self.refit}


def symmetric_gram(x: torch.Tensor) -> torch.Tensor:
    """``xᵀx`` from its upper block triangle only (``k(k+1)/2`` of ``k²`` column blocks), mirrored: a GEMM does not
    know the product is symmetric. Measured on a 2-core CPU, 4096 rows: 138 ms against 209 ms at 2048 columns,
    35 against 79 ms at 1024. The result is exactly symmetric."""
    n = x.shape[1]
    k = 1 if n < 512 else 2 if n < 1024 else 4
    if k == 1:
        return x.t() @ x
    cuts = [n * i // k for i in range(k + 1)]
    h = torch.empty(n, n, dtype=x.dtype, device=x.device)
    for a, b in zip(cuts, cuts[1:]):
        row = x[:, a:b].t() @ x[:, a:]  # block row from the diagonal block on
        h[a:b, a:] = row
        h[b:, a:b] = row[:, b - a:].t()
    return h


class HessianAccumulator:
    """Running ``H = 2/N · Σ xᵀx`` over calibration activations of one linear layer; with ``cross=True`` also
    ``C = 2/N · Σ rᵀx`` for paired reference rows ``r`` (the full-precision model's inputs at the same tokens, for
    fitting to the full-precision outputs: see ``corrected_weight``).

    Each batch's Gram matrix is a float32 product (2.7× faster than float64 on a CPU, and what GPU pipelines use);
    the running sums are kept in float64 so thousands of batches add without drift.
    """

    flush_rows = 4096  # rows gathered before one Gram product: fewer, larger products and float64 updates

    def __init__(self, n: int, device: torch.device | str = "cpu", cross: bool = False):
        self._h = torch.zeros(n, n, dtype=torch.float64, device=device)
        self._c = torch.zeros(n, n, dtype=torch.float64, device=device) if cross else None
        self._pending: list[torch.Tensor] = []
        self._pending_ref: list[torch.Tensor] = []
        self._pending_rows = 0
        self.count = 0

    def add(self, x: torch.Tensor, ref: torch.Tensor | None = None) -> None:
        if (ref is None) != (self._c is None):
            raise ValueError("HessianAccumulator.add: pass reference rows exactly when built with cross=True")
        # a copy: the caller's activations may be reused or changed in place before the next flush
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float32, copy=True)
        if ref is not None:
            ref = ref.detach().reshape(-1, ref.shape[-1]).to(torch.float32, copy=True)
            if ref.shape != x.shape:
                raise ValueError(f"HessianAccumulator.add: reference rows {tuple(ref.shape)} do not pair with the "
                                 f"inputs {tuple(x.shape)}")
            self._pending_ref.append(ref)
        self._pending.append(x)
        self._pending_rows += x.shape[0]
        if self._pending_rows >= self.flush_rows:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        x = torch.cat(self._pending) if len(self._pending) > 1 else self._pending[0]
        new = self.count + x.shape[0]
        self._h.mul_(self.count / new).add_(symmetric_gram(x), alpha=2.0 / new)
        if self._c is not None:
            r = torch.cat(self._pending_ref) if len(self._pending_ref) > 1 else self._pending_ref[0]
            self._c.mul_(self.count / new).add_(r.t() @ x, alpha=2.0 / new)
        self._pending, self._pending_ref, self._pending_rows = [], [], 0
        self.count = new

    @property
    def h(self) -> torch.Tensor:
        self._flush()
        return self._h

    @property
    def c(self) -> torch.Tensor | None:
        self._flush()
        return self._c


def corrected_weight(w: torch.Tensor, h: torch.Tensor, c: torch.Tensor, damp: float = 0.01, strength: float = 1.0
                     ) -> torch.Tensor:
    """The weight that best maps the quantized model's inputs ``x̃`` to the full-precision outputs ``W·r``, held
    near ``W``: ``argmin ‖W·r − W*·x̃‖² + λ‖W* − W‖² = W + W·(C − H)·(H + λI)⁻¹`` with ``H = Σx̃x̃ᵀ``, ``C = Σrx̃ᵀ``
    (GPTAQ's "asymmetric calibration", in closed form).

    For ``λ → 0``, ``‖W·r − Ŵ·x̃‖² = ‖(W* − Ŵ)·x̃‖² + const``: GPTQ on ``W*`` with ``H`` then minimizes the error
    against the full-precision model rather than against the layer's own weights on already-perturbed inputs, so
    the drift of the layers before is compensated too. ``λ`` is ``damp`` times the mean of ``H``'s diagonal (GPTQ's
    relative damping); pulling toward ``W`` (not toward 0, as a plain ridge would) leaves directions the calibration
    barely excites alone, and gives ``W* = W`` exactly when the two streams agree. ``strength`` scales the
    correction: the ``n²`` entries of ``C − H`` are estimated from the calibration tokens, and on few tokens the full
    correction fits their noise (GPTAQ scales it the same way; 0.5 is the recipes' default)."""
    w64, h64 = w.detach().to(torch.float64), h.to(torch.float64)
    n = h64.shape[0]
    lam = damp * torch.diagonal(h64).mean()
    a = h64.clone()
    a.diagonal().add_(lam)
    # All in float64: a float32 product here (a ~1e-6 relative change of the correction) moved Gemma's W4A16
    # perplexity (86 windows, S = 1) from 52.50 to 52.85, as GPTQ's rounding decisions amplify any perturbation.
    rhs = w64 @ (c.to(torch.float64) - h64)  # [out, in]
    lower, info = torch.linalg.cholesky_ex(a)
    if int(info) != 0:
        raise ValueError(f"fptarget: the damped input Hessian is not positive definite (leading minor {int(info)} "
                         f"of {n}); the calibration inputs hold non-finite or degenerate values — check them, or "
                         f"raise GPTQConfig.damp")
    delta = torch.cholesky_solve(rhs.t(), lower).t()  # A symmetric: (A⁻¹·rhsᵀ)ᵀ = rhs·A⁻¹
    return (w64 + strength * delta).to(w.dtype)


def upper_cholesky_of_inverse(h: torch.Tensor) -> torch.Tensor:
    """The upper-triangular ``U`` with ``UᵀU = H⁻¹`` for a symmetric positive definite ``H``.

    One Cholesky factorization and one triangular inverse instead of the usual three factorizations
    (``cholesky(cholesky_inverse(cholesky(H)), upper=True)``): with ``J`` the reversal permutation and
    ``J·H·J = L·Lᵀ``, ``U = J·L⁻¹·J`` is upper triangular with a positive diagonal and ``UᵀU = J·L⁻ᵀL⁻¹·J = H⁻¹``,
    so it is that factor (the Cholesky factor is unique). About half the float64 work of the three-step form.
    """
    n = h.shape[0]
    lower, info = torch.linalg.cholesky_ex(torch.flip(h, (0, 1)))
    if int(info) != 0:
        raise ValueError(f"GPTQ: the (damped) input Hessian is not positive definite (leading minor {int(info)} of "
                         f"{n}); the calibration inputs hold non-finite or degenerate values — check them, or "
                         f"raise GPTQConfig.damp")
    eye = torch.eye(n, dtype=h.dtype, device=h.device)
    return torch.flip(torch.linalg.solve_triangular(lower, eye, upper=False), (0, 1))


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
    inv = torch.argsort(perm) if cfg.act_order else None  # None: the identity order, nothing to undo

    damp = cfg.damp * torch.diagonal(h).mean()
    h.diagonal().add_(damp)
    # Upper Cholesky factor of H⁻¹: row i holds the update weights for column i's error (GPTQ's trick). The
    # factorization runs in float64; the column loop in float32, like the reference implementation.
    hp = h[perm][:, perm] if cfg.act_order else h  # without act_order the order is the identity: no copies
    hinv = upper_cholesky_of_inverse(hp).float()
    wp = w[:, perm].float() if cfg.act_order else w.float()

    order = perm.tolist()
    # The factorizations above use every thread; only the column loop runs on one.
    with _one_cpu_thread(w.device):
        q = _columns(wp, hinv, quantizer, order, g, cfg.block_size, static)
    q = q[:, inv] if inv is not None else q
    refit = getattr(quantizer, "refit_scales", None)
    for _ in range(cfg.refit if refit is not None else 0):
        # Least-squares group scales for the codes just chosen (never raising the damped Hessian-weighted error),
        # then GPTQ's greedy codes again under those scales.
        scales = refit(w, h)
        if scales is None:
            break
        with _one_cpu_thread(w.device):
            q = _columns(wp, hinv, quantizer, order, g, cfg.block_size, scales)
        q = q[:, inv] if inv is not None else q
    return q


def _columns(w: torch.Tensor, hinv: torch.Tensor, quantizer: GroupQuantizer, order: list[int], g: int,
             block_size: int, static: list | None) -> torch.Tensor:
    """One GPTQ pass over the (permuted) columns of ``w``; ``static`` fixes every group's parameters up front."""
    w = w.clone()
    n = w.shape[1]
    q = torch.zeros_like(w)
    params = None
    diag = torch.diagonal(hinv).tolist()  # Python ints and floats: the loop runs once per column
    for b0 in range(0, n, block_size):
        b1 = min(b0 + block_size, n)
        wb = w[:, b0:b1].clone()
        err = torch.zeros_like(wb)
        for j in range(b1 - b0):
            col = b0 + j
            orig = order[col]
            if static is not None:
                params = static[orig // g]
            elif col % g == 0:
                # Dynamic groups: fit on the error-updated weights of the group about to be quantized.
                upd = torch.cat([wb[:, j:], w[:, b1:]], dim=1)[:, :g]
                params = quantizer.fit(upd.float())
            qc = quantizer.quantize_column(wb[:, j], params, orig)
            q[:, col] = qc
            e = (wb[:, j] - qc) / diag[col]
            wb[:, j:].addr_(e, hinv[col, col:b1], alpha=-1.0)  # spread the error over the block's later columns
            err[:, j] = e
        w[:, b1:].addmm_(err, hinv[b0:b1, b1:], alpha=-1.0)
    return q
