"""E8P12 lattice codebook (QuIP#, Tseng et al. 2024, arXiv 2402.04396), residual VQ at 3/4 bits, code packing.

Construction (written from the paper's description; no code was taken from QuIP#):

* ``E8 = D8 ∪ (D8 + ½·1)`` with ``D8 = {x ∈ Z^8 : Σx even}``. The codebook lives in the shifted lattice
  ``E8 + ¼·1 = (D̂8 − ¼·1) ∪ (D̂8 + ¼·1)`` with ``D̂8 = D8 + ½·1 = {x ∈ (Z + ½)^8 : Σx even}``.
* **Absolute points**: 256 vectors ``s ∈ {½, 3/2, 5/2, …}^8`` — the 227 positive half-integer vectors with
  ``‖s‖² ≤ 10`` plus 29 of norm² 12 (the paper's count; which 29 is not pinned down there — we take the first 29,
  in lexicographic order of the doubled vector, of the orbit "five entries 3/2, three entries ½", the norm-12 orbit
  without a 5/2; :func:`e8p_abs_points` documents it and the tests check counts and membership).
* **Signs**: a sign pattern ``σ`` makes ``σ⊙s ∈ D̂8`` iff the number of negative entries has the parity of ``Σs``
  (flipping entry ``i`` changes the sum by ``2s_i``, an odd integer), so each absolute point has 128 sign patterns:
  7 free sign bits, the 8th implied.
* **Shift**: ±¼ on every coordinate (1 bit).

A 16-bit code is ``abs_index | sign_bits_0..6 << 8 | shift_bit << 15`` (shift bit 0 → −¼, 1 → +¼), so the codebook
has exactly ``256 · 128 · 2 = 65,536`` distinct points of ``E8 + ¼·1``.

Nearest point (the paper's trick): for a target ``x`` and each shift ``t``, put ``y = x − t``; for absolute point
``s`` the best signs are ``sign(y)`` (distance ``‖y‖² + ‖s‖² − 2 s·|y|``); if that pattern has the wrong parity, the
cheapest fix flips the coordinate minimising ``s_i |y_i|``, adding ``4 min_i s_i|y_i|``. So a search scans 2 × 256
absolute points instead of 65,536 points. Ties resolve deterministically: the lowest (shift, abs index) in the order
``shift −¼ first, then abs index ascending``, and for the parity fix the lowest coordinate index; ``y_i = 0`` counts
as positive. The result always has the brute-force minimum distance (tests check), but among several equidistant
points the pick may differ from :meth:`E8P12Codebook.nearest_bruteforce` (which takes the lowest code).

Residual VQ (paper §4.3, "RVQ"): ``x ≈ s1·c1 + s2·c2`` — 4 bits: two E8P12 stages; 3 bits: E8P12 then a 1-bit-per-
weight stage from :class:`E8OneBitCodebook` (256 points of E8: the 240 roots and the 16 vectors ±2e_i). Stage scales
for unit-variance Gaussian input come from a grid search on N(0, I8) samples (``GAUSSIAN_SCALES``; the script that
re-derives them is :func:`search_gaussian_scales`); a weight matrix of RMS ``σ`` uses ``σ·scale``.

Storage: 2-bit codes are one int16 per 8 weights (bit pattern of the uint16 code; ``pack_e8p_codes`` /
``unpack_e8p_codes``), the 1-bit stage one uint8 per 8 weights. Plain torch tensors, so they register as buffers.
"""

from __future__ import annotations

import itertools
import math
from functools import lru_cache

import numpy as np
import torch

__all__ = [
    "E8OneBitCodebook",
    "E8P12Codebook",
    "GAUSSIAN_SCALES",
    "RVQCodebook",
    "bits_per_weight",
    "e8p_abs_points",
    "pack_e8p_codes",
    "search_gaussian_scales",
    "unpack_e8p_codes",
]

_SHIFT = 0.25


@lru_cache(maxsize=1)
def _abs_points_doubled() -> tuple[tuple[int, ...], ...]:
    """The 256 absolute points times 2 (odd positive integers), in codebook order."""
    le10 = []
    norm12 = []
    for v in itertools.product((1, 3, 5), repeat=8):
        n = sum(a * a for a in v)  # = 4·‖s‖²
        if n <= 40:
            le10.append(v)
        elif n == 48 and 5 not in v:
            norm12.append(v)
    le10.sort(key=lambda v: (sum(a * a for a in v), v))
    norm12.sort()
    pts = le10 + norm12[:29]
    assert len(le10) == 227 and len(pts) == 256
    return tuple(pts)


def e8p_abs_points(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The 256 "absolute" E8P source points, shape ``(256, 8)``, entries in {½, 3/2, 5/2}.

    Order: the 227 points of norm² ≤ 10 sorted by (norm², lexicographic), then 29 points of norm² 12 (five 3/2 and
    three ½, lexicographic). Index 0 is ``½·1``.
    """
    return torch.tensor(_abs_points_doubled(), dtype=torch.float64).div(2).to(dtype)


def _popcount7(v: torch.Tensor) -> torch.Tensor:
    c = torch.zeros_like(v)
    for i in range(7):
        c = c + ((v >> i) & 1)
    return c


def _check_last8(x: torch.Tensor, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor, got {type(x).__name__}")
    if x.ndim == 0 or x.shape[-1] != 8:
        raise ValueError(f"{what}: the last dimension must be 8 (one E8 vector), got shape {tuple(x.shape)}; "
                         "reshape to (..., 8)")
    if not x.is_floating_point():
        raise TypeError(f"{what}: expected a floating tensor, got {x.dtype}")


def _check_codes(codes: torch.Tensor, what: str, hi: int) -> torch.Tensor:
    if not isinstance(codes, torch.Tensor):
        raise TypeError(f"{what}: codes must be a torch.Tensor, got {type(codes).__name__}")
    if codes.is_floating_point() or codes.dtype == torch.bool:
        raise TypeError(f"{what}: codes must be an integer tensor, got {codes.dtype}")
    c = codes.to(torch.int64)
    if hi == 1 << 16 and codes.dtype == torch.int16:
        c = c & 0xFFFF
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= hi):
        raise ValueError(f"{what}: codes must lie in [0, {hi}), got [{int(c.min())}, {int(c.max())}]")
    return c


class E8P12Codebook:
    """The 2^16-point E8P12 codebook (2 bits per weight, 8 weights per 16-bit code), unit scale.

    Example:
        >>> import torch
        >>> cb = E8P12Codebook()
        >>> x = torch.randn(1000, 8) * GAUSSIAN_SCALES[2][0] ** -1     # unit-variance weights, scaled to the book
        >>> codes = cb.quantize(x)                                    # int32 in [0, 65536)
        >>> codes.shape, codes.dtype
        (torch.Size([1000]), torch.int32)
        >>> y = cb.decode(codes)                                      # nearest E8P12 points, shape (1000, 8)
        >>> bool(((4 * y.double() - 1) % 2 == 0).all())                # 4·y − 1 is even: y ∈ ¼ + ½Z
        True
    """

    size = 1 << 16
    dim = 8

    def __init__(self) -> None:
        self._abs64 = e8p_abs_points(torch.float64)                                       # (256, 8)
        self._abs_norm64 = (self._abs64 ** 2).sum(-1)                                     # (256,)
        doubled = torch.tensor(_abs_points_doubled(), dtype=torch.int64)
        # parity of Σs (= Σ doubled / 2): number of negative signs must have this parity
        self._abs_parity = ((doubled.sum(-1) // 2) % 2).to(torch.int64)                   # (256,)
        sb = torch.arange(128, dtype=torch.int64)
        self._par7 = _popcount7(sb) % 2                                                   # (128,)
        bits = (torch.arange(256, dtype=torch.int64)[:, None] >> torch.arange(8)) & 1
        self._sign_table64 = (1 - 2 * bits).to(torch.float64)                             # (256, 8)
        self._tables: dict[tuple[torch.dtype, torch.device], dict[str, torch.Tensor]] = {}

    # ------------------------------------------------------------------ tables
    def _t(self, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
        key = (dtype, torch.device(device))
        t = self._tables.get(key)
        if t is None:
            t = {
                "abs": self._abs64.to(dtype=dtype, device=device),
                "abs_norm": self._abs_norm64.to(dtype=dtype, device=device),
                "abs_parity": self._abs_parity.to(device),
                "par7": self._par7.to(device),
                "sign": self._sign_table64.to(dtype=dtype, device=device),
                "shift": torch.tensor([-_SHIFT, _SHIFT], dtype=dtype, device=device),
            }
            self._tables[key] = t
        return t

    def abs_points(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The 256 absolute source points (see :func:`e8p_abs_points`)."""
        return self._abs64.to(dtype)

    def points(self, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> torch.Tensor:
        """All 65,536 points, row ``c`` = ``decode(c)``, shape ``(65536, 8)``."""
        return self.decode(torch.arange(self.size, dtype=torch.int32, device=device), dtype=dtype, method="abs")

    # ------------------------------------------------------------------ decode
    def decode(self, codes: torch.Tensor, *, dtype: torch.dtype = torch.float32, method: str = "full") -> torch.Tensor:
        """Points for integer ``codes`` (any shape; int16 codes are read as their uint16 bit pattern).

        ``method='full'`` (default): one gather from the cached 65,536×8 table (2 MiB in float32);
        ``method='abs'``: 256×8 absolute table + a 256×8 sign table + the ±¼ shift, three small gathers — slower
        in torch on CPU (per-row gather overhead dominates, ``docs/results/lattice``), but the layout a compiled
        kernel wants: ``method='numba'`` / :meth:`decode_numba` is that loop compiled (float32, CPU, int16 codes),
        the fastest CPU path. All give identical values. Returns shape ``codes.shape + (8,)``.
        """
        if method == "numba":
            return self.decode_numba(codes)
        c = _check_codes(codes, "E8P12Codebook.decode", self.size)
        if method == "full":
            return _full_table(self, dtype, c.device).index_select(0, c.reshape(-1)).reshape(c.shape + (8,))
        if method != "abs":
            raise ValueError(f"E8P12Codebook.decode: method must be 'abs', 'full' or 'numba', got {method!r}")
        t = self._t(dtype, c.device)
        idx = c & 0xFF
        sb = (c >> 8) & 0x7F
        sign_byte = sb | ((t["par7"][sb] ^ t["abs_parity"][idx]) << 7)
        return t["abs"][idx] * t["sign"][sign_byte] + t["shift"][c >> 15].unsqueeze(-1)

    def decode_numba(self, codes: torch.Tensor, scale: float = 1.0, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """CPU float32 decode of int16 codes with a compiled loop (numba): ``scale · point`` per code.

        Reads the 256×8 absolute table and the 256×8 sign table (16 KiB, L1-resident) per code — the
        fast path for dequantizing packed weights on CPU (see ``docs/results/lattice``). Bit-identical to
        :meth:`decode` for ``scale = 1`` (and powers of two), else within float32 rounding of ``scale · decode``.
        Needs numba (already used by hadakit's CPU kernels). ``out``: an optional contiguous float32 CPU tensor
        of shape ``codes.shape + (8,)`` to decode into (avoids the fresh allocation's page faults).
        """
        if not isinstance(codes, torch.Tensor) or codes.dtype != torch.int16 or codes.device.type != "cpu":
            raise TypeError("E8P12Codebook.decode_numba: codes must be a CPU int16 tensor (pack_e8p_codes)")
        t = self._t(torch.float32, torch.device("cpu"))
        if "par_i8" not in t:
            t["par_i8"] = (t["abs_parity"] * 128).to(torch.int32).contiguous()
            t["par7_i8"] = (t["par7"] * 128).to(torch.int32).contiguous()
        flat = codes.contiguous().reshape(-1)
        shape = codes.shape + (8,)
        if out is None:
            out = torch.empty(shape, dtype=torch.float32)
        elif (not isinstance(out, torch.Tensor) or out.dtype != torch.float32 or out.device.type != "cpu"
              or tuple(out.shape) != tuple(shape) or not out.is_contiguous()):
            raise ValueError(f"E8P12Codebook.decode_numba: out must be a contiguous CPU float32 tensor of shape "
                             f"{tuple(shape)}")
        _numba_decode()(flat.numpy(), t["abs"].contiguous().numpy(), t["sign"].contiguous().numpy(),
                        t["par7_i8"].numpy(), t["par_i8"].numpy(), float(scale), out.view(-1, 8).numpy())
        return out

    # ------------------------------------------------------------------ quantize
    def quantize(self, x: torch.Tensor, *, chunk_size: int = 512, method: str = "auto") -> torch.Tensor:
        """Nearest-point codes (int32, shape ``x.shape[:-1]``) of ``x[..., 8]`` at unit scale.

        Scans only the 256 absolute points per shift (see the module docstring).

        ``method``: ``'numba'`` — a compiled loop (parallel over vectors, float64 arithmetic for any input dtype, no
        temporaries beyond a 256-entry distance row per thread), the CPU fast path; ``'torch'`` — the vectorized
        reference, ``chunk_size`` vectors at a time (memory ≈ ``chunk_size · 256 · 8`` elements), arithmetic in
        ``x``'s dtype (float64 for float64 input, else float32); ``'auto'`` (default) — numba for CPU input when
        numba imports, else torch. Both follow the same tie rule (module docstring), so on float64 input they give
        the same codes (the tests check bit-equality, also on inputs with exact ties); on float32 input they can
        differ where two distances agree to float32 rounding (the numba path then picks the truly nearer point).
        """
        _check_last8(x, "E8P12Codebook.quantize")
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"E8P12Codebook.quantize: chunk_size must be a positive int, got {chunk_size!r}")
        if method not in ("auto", "numba", "torch"):
            raise ValueError(f"E8P12Codebook.quantize: method must be 'auto', 'numba' or 'torch', got {method!r}")
        if method == "auto":
            method = "numba" if x.device.type == "cpu" and _have_numba() else "torch"
        if method == "numba" and x.device.type != "cpu":
            raise ValueError("E8P12Codebook.quantize: method='numba' needs a CPU tensor; use method='torch'")
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        lead = x.shape[:-1]
        if method == "numba":
            flat = x.detach().reshape(-1, 8).to(torch.float64).contiguous()
        else:
            flat = x.reshape(-1, 8).to(dtype)
        if not torch.isfinite(flat).all():
            raise ValueError("E8P12Codebook.quantize: input has NaN/Inf; clean the weights first")
        out = torch.empty(flat.shape[0], dtype=torch.int32, device=x.device)
        if method == "numba":
            t = self._t(torch.float64, torch.device("cpu"))
            if "absT_np" not in t:
                t["absT_np"] = t["abs"].T.contiguous()
                t["apar_i32"] = t["abs_parity"].to(torch.int32).contiguous()
            if flat.shape[0]:
                _numba_nearest(flat.numpy(), t["absT_np"].numpy(), t["abs_norm"].contiguous().numpy(),
                                 t["apar_i32"].numpy(), out.numpy())
            return out.reshape(lead)
        t = self._t(dtype, x.device)
        for i in range(0, flat.shape[0], chunk_size):
            out[i:i + chunk_size] = self._quantize_chunk(flat[i:i + chunk_size], t)
        return out.reshape(lead)

    def _quantize_chunk(self, x: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:
        A = t["abs"]                                                   # (256, 8)
        AT = A.T.contiguous()                                          # (8, 256)
        parf = t["abs_parity"].to(x.dtype)                             # (256,)
        best_d = best_code = None
        for shift_bit in (0, 1):
            y = x - t["shift"][shift_bit]
            a = y.abs()
            neg = (y < 0).to(torch.int64)                              # (N, 8)
            ypar = (neg.sum(-1) % 2).to(x.dtype)                       # (N,)
            mism = (ypar[:, None] - parf[None, :]).abs()               # (N, 256): 1 if the parity must be fixed
            # cheapest sign fix per abs point: min_i s_i |y_i|, as 8 running minima over (N, 256) outer products
            fix = a[:, 0:1] * AT[0:1]
            for i in range(1, 8):
                torch.minimum(fix, a[:, i:i + 1] * AT[i:i + 1], out=fix)
            d = torch.addmm(t["abs_norm"][None, :] + (y * y).sum(-1, keepdim=True), a, AT, alpha=-2.0)
            d.addcmul_(fix, mism, value=4.0)
            dmin, j = d.min(-1)                                        # first minimal abs index
            m = mism.gather(1, j[:, None]).squeeze(1).to(torch.int64)
            fi = (a * A[j]).argmin(-1)                                 # first minimal coordinate
            negf = neg ^ (torch.nn.functional.one_hot(fi, 8) * m[:, None])
            sbits = (negf[:, :7] << torch.arange(7, device=x.device)).sum(-1)
            code = j | (sbits << 8) | (shift_bit << 15)
            if best_d is None:
                best_d, best_code = dmin, code
            else:
                take = dmin < best_d
                best_d = torch.where(take, dmin, best_d)
                best_code = torch.where(take, code, best_code)
        return best_code.to(torch.int32)

    def nearest_bruteforce(self, x: torch.Tensor, *, chunk_size: int = 256) -> torch.Tensor:
        """Reference nearest search over all 65,536 points in float64 (lowest code among equidistant points).

        For tests only: O(65,536) per vector.
        """
        _check_last8(x, "E8P12Codebook.nearest_bruteforce")
        P = self.points(torch.float64, x.device)
        pn = (P * P).sum(-1)
        flat = x.reshape(-1, 8).to(torch.float64)
        out = torch.empty(flat.shape[0], dtype=torch.int32, device=x.device)
        for i in range(0, flat.shape[0], chunk_size):
            xi = flat[i:i + chunk_size]
            # ‖x − p‖² − ‖x‖²; the lowest code wins exact ties (argmin returns the first minimum)
            d = torch.addmm(pn[None, :], xi, P.T, alpha=-2.0)
            out[i:i + chunk_size] = d.argmin(-1).to(torch.int32)
        return out.reshape(x.shape[:-1])


_HAVE_NUMBA: list[bool] = []


def _have_numba() -> bool:
    if not _HAVE_NUMBA:
        try:
            __import__("numba")
            _HAVE_NUMBA.append(True)
        except ImportError:
            _HAVE_NUMBA.append(False)
    return _HAVE_NUMBA[0]


#: Below this many vectors the serial kernel is used: a parallel region's start-up costs more than it saves on a
#: loaded machine (measured: 640 vectors take 5 ms serial vs 16–25 ms with 2 threads under load 12).
PARALLEL_MIN_VECTORS = 16384


@lru_cache(maxsize=2)
def _numba_nearest_kernel(parallel: bool):
    import numba

    def kernel(x, absT, abs_norm, abs_par, out):  # pragma: no cover - compiled
        n = x.shape[0]
        per = 64
        nchunks = (n + per - 1) // per
        for c in numba.prange(nchunks):
            a = np.empty(8)
            neg = np.empty(8, dtype=np.int64)
            dot = np.empty(256)
            fix = np.empty(256)
            for v in range(c * per, min(n, (c + 1) * per)):
                best_d = np.inf
                best_code = 0
                for sh in range(2):
                    t = -0.25 if sh == 0 else 0.25
                    yy = 0.0
                    npar = 0
                    for i in range(8):
                        y = x[v, i] - t
                        yy += y * y
                        if y < 0:
                            neg[i] = 1
                            npar += 1
                            a[i] = -y
                        else:
                            neg[i] = 0
                            a[i] = y
                    npar &= 1
                    for j in range(256):
                        dot[j] = a[0] * absT[0, j]
                        fix[j] = dot[j]
                    for i in range(1, 8):
                        ai = a[i]
                        for j in range(256):
                            p = ai * absT[i, j]
                            dot[j] += p
                            if p < fix[j]:
                                fix[j] = p
                    dmin = np.inf
                    jmin = 0
                    for j in range(256):
                        d = (abs_norm[j] + yy) - 2.0 * dot[j]
                        if npar != abs_par[j]:
                            d += 4.0 * fix[j]
                        if d < dmin:
                            dmin = d
                            jmin = j
                    if dmin < best_d:
                        best_d = dmin
                        flip = -1
                        if npar != abs_par[jmin]:
                            pmin = np.inf
                            for i in range(8):
                                p = a[i] * absT[i, jmin]
                                if p < pmin:
                                    pmin = p
                                    flip = i
                        sbits = 0
                        for i in range(7):
                            b = neg[i]
                            if i == flip:
                                b ^= 1
                            sbits |= b << i
                        best_code = jmin | (sbits << 8) | (sh << 15)
                out[v] = best_code
    return numba.njit(parallel=parallel, fastmath=False, boundscheck=False, nogil=True, cache=False)(kernel)


def _numba_nearest(x, absT, abs_norm, abs_par, out) -> None:
    """The compiled 2 × 256 absolute-point scan (see :meth:`E8P12Codebook.quantize`): parallel over chunks of 64
    vectors (numba's thread count) for large inputs, serial below :data:`PARALLEL_MIN_VECTORS`."""
    _numba_nearest_kernel(x.shape[0] >= PARALLEL_MIN_VECTORS)(x, absT, abs_norm, abs_par, out)


@lru_cache(maxsize=1)
def _numba_decode():
    import numba

    @numba.njit(fastmath=True, boundscheck=False, nogil=True, cache=False)
    def kernel(codes, abs_t, sign_t, par7, apar, scale, out):  # pragma: no cover - compiled
        for i in range(codes.shape[0]):
            c = np.int32(codes[i]) & 0xFFFF
            idx = c & 0xFF
            sb = (c >> 8) & 0x7F
            sbyte = sb | (par7[sb] ^ apar[idx])
            sh = (0.25 if (c >> 15) else -0.25) * scale
            for j in range(8):
                out[i, j] = abs_t[idx, j] * sign_t[sbyte, j] * scale + sh
    return kernel


@lru_cache(maxsize=8)
def _full_table_cached(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    cb = _default_e8p()
    return cb.decode(torch.arange(1 << 16, dtype=torch.int32, device=device), dtype=dtype, method="abs").contiguous()


def _full_table(cb: E8P12Codebook, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return _full_table_cached(dtype, torch.device(device))


@lru_cache(maxsize=1)
def _default_e8p() -> E8P12Codebook:
    return E8P12Codebook()


class E8OneBitCodebook:
    """256 points of E8 (1 bit per weight, 8 weights per uint8 code): the 240 roots (norm² 2) and ±2e_i (norm² 4).

    Order: the 112 integer roots ``±e_i ± e_j`` (lexicographic), the 128 half-integer roots ``(±½)^8`` with an
    even number of minus signs (by bit pattern), then ``+2e_0, −2e_0, …``. Used as the second RVQ stage at 3 bits.
    """

    size = 256
    dim = 8

    def __init__(self) -> None:
        pts = []
        for i in range(8):
            for j in range(i + 1, 8):
                for si in (1, -1):
                    for sj in (1, -1):
                        v = [0.0] * 8
                        v[i], v[j] = float(si), float(sj)
                        pts.append(v)
        for b in range(256):
            if bin(b).count("1") % 2 == 0:
                pts.append([-0.5 if (b >> k) & 1 else 0.5 for k in range(8)])
        for i in range(8):
            for s in (2.0, -2.0):
                v = [0.0] * 8
                v[i] = s
                pts.append(v)
        self._p64 = torch.tensor(pts, dtype=torch.float64)
        assert self._p64.shape == (256, 8)

    def points(self, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> torch.Tensor:
        """All 256 points, shape ``(256, 8)``."""
        return self._p64.to(dtype=dtype, device=device)

    def quantize(self, x: torch.Tensor, *, chunk_size: int = 8192) -> torch.Tensor:
        """Nearest-point codes (int32, lowest code on ties) of ``x[..., 8]``."""
        _check_last8(x, "E8OneBitCodebook.quantize")
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        P = self.points(dtype, x.device)
        pn = (P * P).sum(-1)
        flat = x.reshape(-1, 8).to(dtype)
        out = torch.empty(flat.shape[0], dtype=torch.int32, device=x.device)
        for i in range(0, flat.shape[0], chunk_size):
            xi = flat[i:i + chunk_size]
            out[i:i + chunk_size] = (pn[None, :] - 2 * xi @ P.T).argmin(-1).to(torch.int32)
        return out.reshape(x.shape[:-1])

    def decode(self, codes: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Points for integer ``codes`` in [0, 256); shape ``codes.shape + (8,)``."""
        c = _check_codes(codes, "E8OneBitCodebook.decode", self.size)
        return self.points(dtype, c.device)[c]


# Unit-variance Gaussian scales (stage scale multipliers: the stored value x ≈ σ·Σ scale_k·c_k for weights of RMS σ)
# from search_gaussian_scales: 2 bits, n=100_000, grid 0.94…1.01 step 0.01 (MSE 0.0911/dim); 3 and 4 bits, n=30_000,
# 2-D grids (s1 0.90…1.14 step 0.03, s2 step 0.02 / 0.01; optima interior): MSE 0.0296 (3 bits) / 0.0084 (4 bits).
GAUSSIAN_SCALES: dict[int, tuple[float, ...]] = {
    2: (0.97,),
    3: (1.02, 0.49),
    4: (1.11, 0.29),
}


class RVQCodebook:
    """Residual VQ: 2 bits → E8P12; 3 bits → E8P12 + 1-bit E8 stage; 4 bits → E8P12 + E8P12.

    ``quantize(x, scales)`` returns one code tensor per stage; stage k quantizes ``(x − Σ_{j<k} s_j c_j) / s_k``.
    ``scales`` defaults to ``GAUSSIAN_SCALES[bits]`` (for unit-RMS input).

    Example:
        >>> import torch
        >>> rvq = RVQCodebook(4)
        >>> x = torch.randn(512, 8)
        >>> codes = rvq.quantize(x)
        >>> y = rvq.decode(codes)
        >>> bool(((x - y) ** 2).mean() < 0.03)
        True
    """

    def __init__(self, bits: int) -> None:
        if bits not in (2, 3, 4):
            raise ValueError(f"RVQCodebook: bits must be 2, 3 or 4, got {bits!r}")
        self.bits = bits
        e8p = _default_e8p()
        self.stages: tuple = {2: (e8p,), 3: (e8p, E8OneBitCodebook()), 4: (e8p, e8p)}[bits]

    def _scales(self, scales) -> tuple[float, ...]:
        s = GAUSSIAN_SCALES[self.bits] if scales is None else tuple(float(v) for v in scales)
        if len(s) != len(self.stages) or not all(math.isfinite(v) and v > 0 for v in s):
            raise ValueError(f"RVQCodebook({self.bits}): need {len(self.stages)} positive finite stage scales, "
                             f"got {s!r}")
        return s

    def quantize(self, x: torch.Tensor, scales=None) -> list[torch.Tensor]:
        """Codes per stage (int32, shape ``x.shape[:-1]`` each)."""
        _check_last8(x, "RVQCodebook.quantize")
        s = self._scales(scales)
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        r = x.to(dtype)
        codes = []
        for cb, sk in zip(self.stages, s):
            c = cb.quantize(r / sk)
            codes.append(c)
            r = r - sk * cb.decode(c, dtype=dtype)
        return codes

    def decode(self, codes, scales=None, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``Σ_k s_k · stage_k.decode(codes[k])``."""
        s = self._scales(scales)
        if len(codes) != len(self.stages):
            raise ValueError(f"RVQCodebook({self.bits}).decode: expected {len(self.stages)} code tensors, "
                             f"got {len(codes)}")
        out = None
        for cb, sk, c in zip(self.stages, s, codes):
            y = sk * cb.decode(c, dtype=dtype)
            out = y if out is None else out + y
        return out


def search_gaussian_scales(bits: int, *, n: int = 200_000, seed: int = 0,
                           grid1=None, grid2=None) -> tuple[tuple[float, ...], float]:
    """Grid search of the stage scales minimising MSE per dimension on ``n`` N(0, I8) vectors.

    Returns ``(scales, mse)``. Used to derive :data:`GAUSSIAN_SCALES` (see ``benchmarks/e8p_layer.py``).
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    rvq = RVQCodebook(bits)
    grid1 = [round(0.9 + 0.01 * i, 2) for i in range(26)] if grid1 is None else list(grid1)
    best = (None, math.inf)
    if bits == 2:
        for s1 in grid1:
            y = rvq.decode(rvq.quantize(x, (s1,)), (s1,))
            mse = float(((x - y) ** 2).mean())
            if mse < best[1]:
                best = ((s1,), mse)
        return best
    grid2 = [round(0.15 + 0.01 * i, 2) for i in range(30)] if grid2 is None else list(grid2)
    for s1 in grid1:
        for s2 in grid2:
            y = rvq.decode(rvq.quantize(x, (s1, s2)), (s1, s2))
            mse = float(((x - y) ** 2).mean())
            if mse < best[1]:
                best = ((s1, s2), mse)
    return best


# ---------------------------------------------------------------------- packing
def pack_e8p_codes(codes: torch.Tensor) -> torch.Tensor:
    """16-bit codes (int32/int64 in [0, 65536)) → int16 tensor with the same bit pattern (same shape).

    int16 rather than uint16 because int16 has full torch operator and serialization support.
    """
    c = _check_codes(codes, "pack_e8p_codes", 1 << 16)
    return torch.where(c >= 1 << 15, c - (1 << 16), c).to(torch.int16)


def unpack_e8p_codes(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_e8p_codes`: int16 → int32 codes in [0, 65536)."""
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.int16:
        raise TypeError(f"unpack_e8p_codes: expected an int16 tensor, got "
                        f"{getattr(packed, 'dtype', type(packed).__name__)}")
    return packed.to(torch.int32) & 0xFFFF


def bits_per_weight(shape: tuple[int, int], bits: int, *, scale_bits: int = 32, n_scales: int = 1,
                    sign_bits: bool = True) -> float:
    """Exact stored bits per weight of an E8P/RVQ-quantized ``(out, in)`` matrix.

    Counts the codes (``bits`` per weight: 16 bits per 8 weights per 2-bit stage, 8 bits per 8 weights for the
    1-bit stage), ``n_scales`` scales of ``scale_bits`` each per RVQ stage, and — with ``sign_bits`` — the
    incoherence sign vectors at 1 bit per in/out feature (they are stored bit-packed).

    Example:
        >>> round(bits_per_weight((2048, 640), 2), 6)   # 2 + (32 + 2048 + 640) / (2048·640)
        2.002075
    """
    if (not isinstance(shape, (tuple, list, torch.Size)) or len(shape) != 2
            or not all(isinstance(v, int) and v > 0 for v in shape)):
        raise ValueError(f"bits_per_weight: shape must be (out_features, in_features) positive ints, got {shape!r}")
    if bits not in (2, 3, 4):
        raise ValueError(f"bits_per_weight: bits must be 2, 3 or 4, got {bits!r}")
    m, n = shape
    if n % 8:
        raise ValueError(f"bits_per_weight: in_features must be a multiple of 8, got {n}")
    stages = 1 if bits == 2 else 2
    total = m * n * bits + stages * n_scales * scale_bits + ((m + n) if sign_bits else 0)
    return total / (m * n)
