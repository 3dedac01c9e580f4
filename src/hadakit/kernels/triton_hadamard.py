"""Triton backend of the ``hadamard`` primitive (docs/ARCHITECTURE.md).

Contract: the last dim of ``x`` is cut into blocks of ``b = m · 2^k``; each block ``v``, viewed row-major as ``V``
(m, 2^k), becomes ``scale · vec(base @ (D V) @ H)`` (forward) or ``scale · D · vec(baseᵀ @ V @ H)`` (transpose),
``H`` Sylvester's ``H_{2^k}`` (symmetric), ``D`` the signs of the block's positions. fp32 arithmetic throughout.

Algorithm
---------
``x`` is viewed as ``(R, b)``, one block per row. A program owns a tile of ``ROWS`` whole blocks and keeps it in
registers from load to store: one read of ``x`` (signs multiplied in at the load), one write of ``y`` (scale, and
the signs of the transpose, at the store).

* ``H_{2^k}``: butterflies. A constant-geometry (Pease) stage views each row as (2^k/2, 2) pairs, ``tl.split``s them
  into ``a, b`` and writes ``a + b`` to the first half, ``a - b`` to the second (``tl.join`` + ``tl.permute`` +
  ``tl.reshape``); k stages give exactly ``v @ H``. Butterflies rather than ``tl.dot`` against ±1 tiles: k exact
  fp32 adds per element, where an fp32 dot is tf32 (inexact) or 2^k CUDA-core FMAs per element. Triton's linear
  layouts make reshape/split/join/permute register renamings; data crosses threads only when a stage needs an
  index bit that is not in registers, and the compiler then exchanges through shared memory. For 2^7..2^13 the
  stages run as ``H_{2^(k-i)} ⊗ H_{2^i}`` (inner factor along the contiguous axis, then the outer one on the
  transposed view; ``_inner_log``), which sm_90 builds show needs 2-3 such exchanges instead of 4-7.
* ``base`` (m > 1): ``base @ V`` for all blocks of the tile is a dot of ``A`` (ROWS·2^k, m) -- the tile read
  straight from memory with the m axis last, in K-chunks of 16 -- against ``W = baseᵀ`` (``base`` for the transpose),
  zero-padded to a power of two ≥ 16 (masked loads: padding costs registers and MACs, never memory). Orders above 64
  loop over chunks of 64 output rows, re-reading the block from L1/L2. ``base ⊗ H = (base ⊗ I)(I ⊗ H)``: the dot
  comes first, fed by the loads, and the butterflies run on its result. The dot is fp32-exact either way:
  by default on the tensor cores with exact bf16 pieces (``_dot_fp32``: W in 3 pieces, A in 1/2/3 for
  bf16/fp16/fp32 inputs, every product exact, fp32 accumulation), or with ``_DOT_SPLIT = False`` as an
  input_precision="ieee" dot (CUDA-core FMAs; never tf32), which sm_90 builds show costs 1.6-3x the shared-memory
  traffic and m FMAs per element. An order m < 16 would waste most of the padded tile, so the launcher first folds
  Sylvester factors into the base: ``base ⊗ H_{2^k} = (base ⊗ H_{2^a}) ⊗ H_{2^(k-a)}`` with m·2^a ≤ 16.

Tiling: ``ROWS`` whole blocks per program, ~8192 fp32 values per tile (one block per program from 2^13 up, at most
32768 values), one warp per 1024 values: ~32 values (5 index bits) and 55-130 registers per thread. With a base,
output rows go in chunks of at most 16384 values (sm_90 builds then spill only for fp32 blocks of 2^14 and more).
Small problems get smaller tiles (down to ~2048 values) so that the grid still gives every SM two programs.

Memory traffic: ``numel · (in + out itemsize)`` bytes of HBM -- a copy: 4 B/element for 16-bit inputs, 8 for fp32.
The signs (N fp32) and the base (m² fp32) are re-read by every tile from L1/L2. On top, shared memory carries
~16-24 B/element for the butterflies (plus ~25-40 for the base dot), against ~9x the HBM bandwidth. Every block of
up to 2^15 elements fits one program. Bigger ones (the op allows m·2^k up to 256·2^15) take two passes through an
fp32 workspace, the base factor on column slabs and then the butterflies: ~3x a copy's traffic.

Under ``TRITON_INTERPRET=1`` (set before this module is imported) the kernels run on CPU tensors; that is how the
tests check them without a GPU. Two interpreter gaps are bridged there (``EMULATE``): its bf16 ``tl.dot`` multiplies
raw bits, and its fp32 -> bf16 cast truncates.
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the portable torch backend covers machines without Triton
    triton = None
    tl = None

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

MAX_POW2 = 1 << 15  # largest power-of-two factor 2^k
_TILE = 8192  # fp32 values per program in the common case
_MAX_TILE = 32768  # largest tile one program keeps in registers (one block, 32 warps)
_MIN_TILE = 2048  # small problems shrink tiles down to this to spread over the SMs
_KC = 16  # K-chunk of the base dot (tl.dot needs K >= 16)
_MAX_IC = 64  # larger orders loop over chunks of 64 output rows (re-reading the block from L1/L2)
_TILE_CHUNKED = 16384  # base path: output-row chunks shrink (down to 16 rows) to stay within this many values
# The base dot on tensor cores with exact bf16 pieces (see _dot_fp32) rather than as an "ieee" fp32 dot, whose FMAs
# read their operands from shared memory for every k (~40 B/element on sm_90) and cost m FMAs per element.
_DOT_SPLIT = True
_DOT_PIECES = {torch.bfloat16: 1, torch.float16: 2, torch.float32: 3}  # bf16 pieces that hold one input exactly


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")


def triton_available() -> bool:
    """True when Triton imports and can run here: a CUDA GPU, or the interpreter (``TRITON_INTERPRET=1``)."""
    return triton is not None and (torch.cuda.is_available() or _interpreting())


if triton is not None:

    @triton.jit
    def _fwht_pease(x, T: tl.constexpr, N: tl.constexpr, LOG_N: tl.constexpr):
        """``x`` (T, N) fp32 -> ``x @ H_N`` (Sylvester order) by LOG_N constant-geometry butterfly stages."""
        for _ in tl.static_range(LOG_N):
            a, b = tl.split(tl.reshape(x, (T, N // 2, 2)))
            x = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 2, 1)), (T, N))
        return x

    @triton.jit
    def _fwht_rows(x, T: tl.constexpr, N: tl.constexpr, LOG_N: tl.constexpr, LOG_IN: tl.constexpr):
        """``x @ H_N`` for ``x`` (T, N). LOG_IN > 0: as H_{N/NI} ⊗ H_{NI} (NI = 2^LOG_IN), the inner factor on the
        contiguous axis, then the outer one on the transposed view; else one run of Pease stages."""
        if LOG_IN > 0:
            NI: tl.constexpr = 1 << LOG_IN
            NO: tl.constexpr = N // NI
            x = _fwht_pease(tl.reshape(x, (T * NO, NI)), T * NO, NI, LOG_IN)
            x = tl.reshape(tl.permute(tl.reshape(x, (T, NO, NI)), (0, 2, 1)), (T * NI, NO))
            x = _fwht_pease(x, T * NI, NO, LOG_N - LOG_IN)
            x = tl.reshape(tl.permute(tl.reshape(x, (T, NI, NO)), (0, 2, 1)), (T, N))
        else:
            x = _fwht_pease(x, T, N, LOG_N)
        return x

    @triton.jit
    def _to_out(y, OUT: tl.constexpr, EMULATE: tl.constexpr):
        """fp32 -> the output dtype, rounding to nearest even. The interpreter's fp32 -> bf16 cast truncates, so
        there the rounding is done on the bits first (NaNs kept) to give what the GPU gives."""
        if EMULATE and OUT == tl.bfloat16:
            bits = y.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            y = tl.where(y != y, y, bits.to(tl.float32, bitcast=True))
        return y.to(OUT)

    @triton.jit
    def _pow2_kernel(
        x_ptr, y_ptr, s_ptr, n_rows, signs_period, scale,
        ROWS: tl.constexpr, N: tl.constexpr, LOG_N: tl.constexpr, LOG_IN: tl.constexpr,
        SIGNS: tl.constexpr,  # 0: none, 1: at the load (forward), 2: at the store (transpose)
        SIGNS_SHARED: tl.constexpr,  # every row uses signs[0:N] (signs_period == 1)
        EMULATE: tl.constexpr,  # running under the interpreter
    ):
        """Rows of length N = 2^LOG_N: ``y = scale · (x ⊙ s) @ H`` or ``scale · (x @ H) ⊙ s``."""
        start = tl.program_id(0).to(tl.int64) * ROWS
        r = tl.arange(0, ROWS)
        c = tl.arange(0, N)
        row_ok = (start + r) < n_rows
        mask = row_ok[:, None]
        offs = r[:, None] * N + c[None, :]  # 32-bit within the tile; the 64-bit part goes into the base pointers
        x = tl.load(x_ptr + start * N + offs, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
        if SIGNS != 0:
            if SIGNS_SHARED:
                s = tl.load(s_ptr + c, eviction_policy="evict_last")[None, :]
            else:
                s_row = ((start + r) % signs_period) * N
                s = tl.load(s_ptr + (s_row[:, None] + c[None, :]), mask=mask, other=0.0,
                            eviction_policy="evict_last")
            if SIGNS == 1:
                x = x * s
        y = _fwht_rows(x, ROWS, N, LOG_N, LOG_IN) * scale
        if SIGNS == 2:
            y = y * s
        tl.store(y_ptr + start * N + offs, _to_out(y, y_ptr.dtype.element_ty, EMULATE), mask=mask)

    @triton.jit
    def _split_bf16(v):
        """fp32 ``v`` -> ``(hi, lo)``: ``hi`` = bf16(v) and the fp32 remainder ``v - hi`` (exact)."""
        hi = v.to(tl.bfloat16)
        return hi, v - hi.to(tl.float32)

    @triton.jit
    def _mma(a, b, acc, EMULATE: tl.constexpr):
        """acc + a @ b for bf16 operands: exact products, fp32 accumulation (tensor cores). The interpreter's bf16
        dot is broken (it multiplies the raw bits), so there the same products are formed in fp32."""
        if EMULATE:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        return tl.dot(a, b, acc, out_dtype=tl.float32)

    @triton.jit
    def _dot_fp32(a, w, acc, MODE: tl.constexpr, EMULATE: tl.constexpr):
        """``acc + a @ w`` at fp32 accuracy for fp32 ``a``, ``w``.

        MODE 0: input_precision="ieee" (CUDA-core FMAs). MODE 1/2/3: tensor cores on exact bf16 pieces. ``w`` is
        split into three bf16 pieces (8 + 8 + 8 significant bits: exactly w); ``a`` into MODE pieces (1 suffices for
        bf16 inputs, 2 for fp16, 3 for fp32). Every bf16 x bf16 product is exact in fp32; the pairs of pieces whose
        weight is below 2^-24 relative are left out, so the result is as accurate as an fp32 dot.
        """
        if MODE == 0:
            return tl.dot(a, w, acc, input_precision="ieee")
        w0, wr = _split_bf16(w)
        w1, wr = _split_bf16(wr)
        w2 = wr.to(tl.bfloat16)
        a0, ar = _split_bf16(a)
        if MODE > 1:
            a1, ar = _split_bf16(ar)
            if MODE > 2:
                acc = _mma(ar.to(tl.bfloat16), w0, acc, EMULATE)
            acc = _mma(a1, w1, acc, EMULATE)
            acc = _mma(a1, w0, acc, EMULATE)
        acc = _mma(a0, w2, acc, EMULATE)
        acc = _mma(a0, w1, acc, EMULATE)
        return _mma(a0, w0, acc, EMULATE)

    @triton.jit
    def _base_chunk(
        acc, k0, x_blk, s_blk, s_row, w_ptr, r, j, i, row_ok,
        M: tl.constexpr, N2: tl.constexpr, ROWS: tl.constexpr, NC: tl.constexpr, KC: tl.constexpr,
        SIGNS: tl.constexpr, SIGNS_SHARED: tl.constexpr, TRANSPOSE: tl.constexpr,
        DOT_MODE: tl.constexpr, EMULATE: tl.constexpr,
    ):
        """acc += A @ W for the K-chunk [k0, k0 + KC) of the base's contraction index l."""
        B: tl.constexpr = M * N2
        l = k0 + tl.arange(0, KC)
        # A[(r, j), l] = V_r[l, j]: (ROWS, NC, KC), contiguous along j.
        a_offs = r[:, None, None] * B + l[None, None, :] * N2 + j[None, :, None]
        a_mask = row_ok[:, None, None] & (l < M)[None, None, :]
        a = tl.load(x_blk + a_offs, mask=a_mask, other=0.0).to(tl.float32)
        if SIGNS == 1:
            s_offs = l[None, None, :] * N2 + j[None, :, None]
            if SIGNS_SHARED:
                s = tl.load(s_blk + s_offs, mask=(l < M)[None, None, :], other=0.0, eviction_policy="evict_last")
            else:
                s = tl.load(s_blk + (s_row[:, None, None] + s_offs), mask=a_mask, other=0.0,
                            eviction_policy="evict_last")
            a = a * s
        # W[l, i] = base[i, l] (y = base @ V) or base[l, i] (y = baseᵀ @ V); zero outside M × M.
        if TRANSPOSE:
            w_offs = l[:, None] * M + i[None, :]
        else:
            w_offs = i[None, :] * M + l[:, None]
        w = tl.load(w_ptr + w_offs, mask=(l < M)[:, None] & (i < M)[None, :], other=0.0)
        return _dot_fp32(tl.reshape(a, (ROWS * NC, KC)), w, acc, DOT_MODE, EMULATE)

    @triton.jit
    def _base_rows(
        i0, x_blk, y_blk, s_blk, s_row, w_ptr, r, j, row_ok, scale,
        M: tl.constexpr, IC: tl.constexpr, KC: tl.constexpr,
        N2: tl.constexpr, ROWS: tl.constexpr, NC: tl.constexpr, LOG_NC: tl.constexpr, LOG_IN: tl.constexpr,
        SIGNS: tl.constexpr, SIGNS_SHARED: tl.constexpr, TRANSPOSE: tl.constexpr,
        DOT_MODE: tl.constexpr, EMULATE: tl.constexpr, UNROLL: tl.constexpr,
    ):
        """Output rows [i0, i0 + IC) of the tile's (M, NC) views: the dot over all of l, butterflies, store."""
        B: tl.constexpr = M * N2
        i = i0 + tl.arange(0, IC)
        acc = tl.zeros((ROWS * NC, IC), dtype=tl.float32)
        if UNROLL:  # few chunks: unrolled, so that every load is issued up front
            for k0 in tl.static_range(0, M, KC):
                acc = _base_chunk(acc, k0, x_blk, s_blk, s_row, w_ptr, r, j, i, row_ok, M, N2, ROWS, NC, KC,
                                  SIGNS, SIGNS_SHARED, TRANSPOSE, DOT_MODE, EMULATE)
        else:  # large orders: a loop keeps the code (and the compile time) small
            for k0 in tl.range(0, M, KC):
                acc = _base_chunk(acc, k0, x_blk, s_blk, s_row, w_ptr, r, j, i, row_ok, M, N2, ROWS, NC, KC,
                                  SIGNS, SIGNS_SHARED, TRANSPOSE, DOT_MODE, EMULATE)

        y = tl.reshape(tl.permute(tl.reshape(acc, (ROWS, NC, IC)), (0, 2, 1)), (ROWS * IC, NC))
        y = tl.reshape(_fwht_rows(y, ROWS * IC, NC, LOG_NC, LOG_IN), (ROWS, IC, NC)) * scale
        o_offs = r[:, None, None] * B + i[None, :, None] * N2 + j[None, None, :]
        o_mask = row_ok[:, None, None] & (i < M)[None, :, None]
        if SIGNS == 2:
            s_offs = i[None, :, None] * N2 + j[None, None, :]
            if SIGNS_SHARED:
                s = tl.load(s_blk + s_offs, mask=(i < M)[None, :, None], other=0.0, eviction_policy="evict_last")
            else:
                s = tl.load(s_blk + (s_row[:, None, None] + s_offs), mask=o_mask, other=0.0,
                            eviction_policy="evict_last")
            y = y * s
        tl.store(y_blk + o_offs, _to_out(y, y_blk.dtype.element_ty, EMULATE), mask=o_mask)

    @triton.jit
    def _base_kernel(
        x_ptr, y_ptr, s_ptr, w_ptr, n_rows, signs_period, scale,
        M: tl.constexpr, IC: tl.constexpr, KC: tl.constexpr,
        ROWS: tl.constexpr, N2: tl.constexpr, NC: tl.constexpr, LOG_NC: tl.constexpr, LOG_IN: tl.constexpr,
        SIGNS: tl.constexpr, SIGNS_SHARED: tl.constexpr, TRANSPOSE: tl.constexpr,
        DOT_MODE: tl.constexpr, EMULATE: tl.constexpr,
    ):
        """Blocks of M·N2 viewed as (M, N2). Program (p, q) takes blocks [p·ROWS, (p+1)·ROWS) and columns
        [q·NC, (q+1)·NC) of their (M, N2) view: ``base @ V`` (``baseᵀ @ V`` if TRANSPOSE) on those columns, as a dot
        in K-chunks loaded straight from memory (bounded registers for any M), then LOG_NC butterfly stages along
        the columns (LOG_NC = log2(N2) when NC == N2, the fused path; 0 for the first pass of the two-pass path).
        Output rows go in chunks of IC (registers hold ROWS·NC·IC values); each chunk re-reads the tile (L1/L2).
        """
        B: tl.constexpr = M * N2
        start = tl.program_id(0).to(tl.int64) * ROWS
        c0 = tl.program_id(1) * NC
        r = tl.arange(0, ROWS)
        j = tl.arange(0, NC)
        row_ok = (start + r) < n_rows
        x_blk = x_ptr + start * B + c0
        y_blk = y_ptr + start * B + c0
        s_blk = s_ptr + c0
        s_row = ((start + r) % signs_period) * B  # first sign of each block (used only if not SIGNS_SHARED)
        if M <= 64:
            for i0 in tl.static_range(0, M, IC):
                _base_rows(i0, x_blk, y_blk, s_blk, s_row, w_ptr, r, j, row_ok, scale, M, IC, KC, N2, ROWS, NC,
                           LOG_NC, LOG_IN, SIGNS, SIGNS_SHARED, TRANSPOSE, DOT_MODE, EMULATE, True)
        else:
            for i0 in tl.range(0, M, IC):
                _base_rows(i0, x_blk, y_blk, s_blk, s_row, w_ptr, r, j, row_ok, scale, M, IC, KC, N2, ROWS, NC,
                           LOG_NC, LOG_IN, SIGNS, SIGNS_SHARED, TRANSPOSE, DOT_MODE, EMULATE, False)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@functools.lru_cache(maxsize=16)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # the interpreter: any plausible value (only the tile size depends on it)


def _tile_config(padded_block: int, n_rows: int, min_rows: int, device: torch.device) -> tuple[int, int]:
    """(ROWS, num_warps) for tiles of ROWS blocks of ``padded_block`` fp32 values each.

    ~_TILE values per program (whole blocks, at least one), fewer when the problem is small so that the grid
    still gives every SM about two programs (but no fewer than ~_MIN_TILE values per program); one warp per 1024
    values (~32 per thread), 1 to 32 warps.
    """
    rows_max = max(1, _TILE // padded_block)
    spread = _next_pow2(triton.cdiv(n_rows, 2 * _num_sms(device)))
    rows = min(rows_max, max(spread, _MIN_TILE // padded_block, 1))
    rows = max(rows, min_rows)
    warps = min(32, max(1, rows * padded_block // 1024))
    return rows, warps


def _inner_log(k: int) -> int:
    """Split of the butterflies into H_{2^(k-i)} ⊗ H_{2^i} for 2^7..2^13 (i = log2 of the inner factor; 0 = none).
    Chosen from sm_90 builds (Triton 3.7): the outer factor of 64 makes the compiler keep 5-6 index bits in
    registers between exchanges, i.e. 2 (16-bit inputs) or 3 (fp32) shared-memory round trips instead of 4-7."""
    return max(2, k - 6) if 7 <= k <= 13 else 0


@functools.lru_cache(maxsize=8)
def _sylvester_small(a: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    for _ in range(a):
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _check(x, base, signs, block) -> tuple[int, int]:
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"triton_hadamard supports {', '.join(map(str, SUPPORTED_DTYPES))}; got {x.dtype}. "
                        f"Use the portable torch backend for other dtypes.")
    n = x.shape[-1] if x.dim() else 1
    if block <= 0 or n % block:
        raise ValueError(f"block {block} must be a positive divisor of the last dim {n}.")
    m = 1 if base is None else int(base.shape[0])
    if base is not None and (base.dim() != 2 or tuple(base.shape) != (m, m)):
        raise ValueError(f"base must be a square matrix; got shape {tuple(base.shape)}.")
    if block % m:
        raise ValueError(f"block {block} is not a multiple of the base order {m}.")
    n2 = block // m
    if n2 & (n2 - 1) or n2 > MAX_POW2:
        raise ValueError(f"block {block} = {m}·{n2}: the second factor must be a power of two <= {MAX_POW2}.")
    if signs is not None and signs.numel() != n:
        raise ValueError(f"signs must have one entry per element of the last dim ({n}); got {signs.numel()}.")
    if x.device.type != "cuda" and not _interpreting():
        raise RuntimeError("triton_hadamard needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors).")
    return m, n2


def triton_hadamard(
    x: torch.Tensor,
    base: torch.Tensor | None,
    signs: torch.Tensor | None,
    block: int,
    scale: float,
    transpose: bool,
) -> torch.Tensor:
    """The ``hadamard`` primitive on the GPU: blockwise ``scale·(base ⊗ H)·D`` (or its transpose) along the last
    dim of ``x``; see the module docstring and docs/ARCHITECTURE.md. Returns a new contiguous tensor of x's dtype."""
    if triton is None:
        raise RuntimeError("triton_hadamard needs Triton (pip install hadakit[triton]).")
    m, n2 = _check(x, base, signs, block)
    x = x.contiguous()
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    if x.numel() == 0:
        return y
    n = x.shape[-1]
    scale = float(scale)
    n_rows = x.numel() // block
    period = n // block  # blocks per row of x: the signs repeat with this period (in blocks)
    signs_mode = 0 if signs is None else (2 if transpose else 1)
    if signs is not None:
        signs = signs.to(device=x.device, dtype=torch.float32).contiguous()
    s_arg = signs if signs is not None else x  # never read when signs_mode == 0

    if base is None:
        rows, warps = _tile_config(n2, n_rows, 1, x.device)
        _pow2_kernel[(triton.cdiv(n_rows, rows),)](
            x, y, s_arg, n_rows, period, scale,
            ROWS=rows, N=n2, LOG_N=n2.bit_length() - 1, LOG_IN=_inner_log(n2.bit_length() - 1),
            SIGNS=signs_mode, SIGNS_SHARED=period == 1, EMULATE=_interpreting(), num_warps=warps,
        )
        return y

    w = base.to(device=x.device, dtype=torch.float32).contiguous()
    # Small orders: fold Sylvester factors into the base, (base ⊗ H_{2^a}) ⊗ H_{2^(k-a)}, so that the order padded
    # to the dot's minimum of 16 wastes little of the tile.
    a = 0
    while _next_pow2(m << a) < 16 and (n2 >> a) > 1:
        a += 1
    if a:
        w = torch.kron(w, _sylvester_small(a).to(w.device))
        m, n2 = m << a, n2 >> a
    # Output rows of the (m, 2^k) view per dot and butterfly pass. Big blocks take several chunks of at most
    # _TILE_CHUNKED values rather than one of 32768 (which spills registers in the base path).
    ic = min(_MAX_IC, max(16, _next_pow2(m)))
    while ic > 16 and ic * n2 > _TILE_CHUNKED:
        ic //= 2
    log_n2 = n2.bit_length() - 1
    common = dict(M=m, IC=ic, KC=_KC, N2=n2, SIGNS_SHARED=period == 1, TRANSPOSE=transpose,
                  DOT_MODE=_DOT_PIECES[x.dtype] if _DOT_SPLIT else 0, EMULATE=_interpreting())

    if ic * n2 <= _MAX_TILE:  # fused: one read, one write
        rows, warps = _tile_config(ic * n2, n_rows, max(1, 16 // n2), x.device)
        _base_kernel[(triton.cdiv(n_rows, rows), 1)](
            x, y, s_arg, w, n_rows, period, scale,
            ROWS=rows, NC=n2, LOG_NC=log_n2, LOG_IN=_inner_log(log_n2), SIGNS=signs_mode, num_warps=warps, **common,
        )
        return y

    # Two passes through fp32: the base factor on column slabs (IC × NC tiles), then the butterflies on rows of
    # 2^k (the signs go in the first pass forward, in the second transposed; they commute with neither factor).
    work = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    nc = min(n2, max(16, _TILE // ic))
    _base_kernel[(n_rows, n2 // nc)](
        x, work, s_arg, w, n_rows, period, 1.0,
        ROWS=1, NC=nc, LOG_NC=0, LOG_IN=0, SIGNS=1 if signs_mode == 1 else 0,
        num_warps=min(32, max(1, ic * nc // 1024)), **common,
    )
    rows2 = x.numel() // n2
    rows, warps = _tile_config(n2, rows2, 1, x.device)
    _pow2_kernel[(triton.cdiv(rows2, rows),)](
        work, y, s_arg, rows2, n // n2, scale,
        ROWS=rows, N=n2, LOG_N=log_n2, LOG_IN=_inner_log(log_n2),
        SIGNS=2 if signs_mode == 2 else 0, SIGNS_SHARED=n == n2, EMULATE=_interpreting(), num_warps=warps,
    )
    return y
