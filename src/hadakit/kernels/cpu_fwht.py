"""CPU fast path of the ``hadamard`` primitive: a numba-compiled, SIMD fast Walsh-Hadamard transform.

Semantics are exactly those of ``docs/ARCHITECTURE.md`` (and of the portable backend
``kernels/torch_hadamard.py``): per block ``v`` of ``block = m·2^k`` elements, forward
``y = scale · (base ⊗ H_{2^k}) · (D v)``, transpose ``y = scale · D · (base ⊗ H_{2^k})ᵀ v``.
float32 inputs are computed in float32, float64 in float64 (other float dtypes in float32, cast back).

Why it is fast
--------------
At ``n = 2^10 … 2^15`` a row is 4-128 KiB, so the whole butterfly of one row can run in L1/L2 while the batch
streams through DRAM once: read ``x`` once, write ``y`` once, which is the traffic of a copy. Everything in
between must be cheap enough to hide under that stream (about 1 ns per 16 floats on one core here):

* **Hand-emitted vectors.** Numba's loop vectorizer gives up on butterflies (several runtime-strided streams of
  one array need more alias checks than LLVM allows), so the butterflies are ``@intrinsic`` functions that emit
  LLVM IR directly on ``<W x float>`` vectors, ``W`` = one native register (16 float32 / 8 float64 with AVX-512,
  half that with AVX2). A radix-``R`` step loads ``R`` vectors ``h`` apart, does all ``log2 R`` butterfly levels in
  registers (``R`` ≤ 16 with 32 vector registers, ≤ 8 with 16) and stores them back: ``log2 R`` levels per pass
  over L1 instead of one.
* **In-register low levels.** The strides 1, 2, …, W/2 (inside one register) are done with a lane shuffle
  (``v[i ^ s]``) and one fused ``v·(±1) + shuffled`` per level (exact). They are fused into the first pass together
  with the multiplier (``scale·D``, or ``scale`` alone; ``D·scale`` after the last pass for the transpose), so the
  first pass reads ``x`` straight from memory and performs ``log2 W + log2 R`` levels: 7-8 of the 10-15 levels
  before anything is written.
* **Cache blocking.** Levels are grouped depth-first: all levels whose butterflies stay inside a chunk of ``C``
  elements (16 KiB) run chunk by chunk while the chunk is in L1; only the remaining ≤ 3-4 levels of a long row
  sweep the whole row (from L2), in one radix-8/16 pass that also applies the transpose multiplier.
* **No read-for-ownership on the output.** For large outputs (beyond the last-level cache) the passes run in a
  per-thread scratch row that stays in L1/L2, and the last pass writes the output with non-temporal (streaming)
  stores: DRAM sees 1 read + 1 write per element, the floor, instead of the 2 reads + 1 write of ordinary stores
  into a cold output. Small outputs are written with ordinary stores so that they stay in cache for the consumer.
* **Rows in parallel.** ``prange`` over ``torch.get_num_threads()`` numba threads (one for inputs under 32 Ki
  elements); each takes tasks of ~1 MiB of rows from a shared atomic counter (an LLVM ``atomicrmw``), so a thread
  descheduled by a busy machine holds back one task, not half the batch. Per-row bookkeeping is integer shifts on
  raw addresses (no divisions, no array objects): ~10 ns per row.
* **Prefetch.** The first pass of each row issues a software prefetch for the same place one row ahead, so the
  next row's DRAM reads overlap with this row's in-cache passes.
* **Output memory.** A fresh 64 MiB ``torch.empty`` on Linux costs page faults on 4 KiB pages, several times the
  transform itself. Outputs of ≥ 1 MiB come from a small pool of reusable 64-byte-aligned numpy buffers
  (hugepage-advised by numpy; a buffer returns to the pool when the tensor using it dies). Tensors from the pool
  cannot be ``resize_``-d; ``HADAKIT_CPU_POOL=0`` turns the pool off, ``clear_buffer_pool()`` empties it.

The dense ``m × m`` base factor (``m > 1``) is applied per block in the same kernel: the ``m`` sub-rows are
transformed into a per-thread scratch block, then combined with ``m`` contiguous multiply-adds per output row.

Rounding: every butterfly is an exact IEEE add or subtract (multiplication by ±1 is exact) in a different but
valid order, and ``scale`` is applied to the input in the forward direction; results match the torch backend to
within normal float rounding (≈1e-6 relative to the row norm in float32).

Compilation: one specialization per dtype (float32, float64; all sizes, flags and the pass plan are runtime
values), compiled on first use and cached on disk (``cache=True``): ~10-15 s of CPU per dtype the first time on
this 2-core machine, well under 1 s to load afterwards. The vector width and maximal radix are
read from the host CPU (AVX-512: 16 float32 per register and radix 16; AVX2: 8 and radix 8).
"""

from __future__ import annotations

import functools
import math
import os
import threading
import weakref

import numpy as np
import torch

try:  # numba is optional: the dispatcher falls back to the torch backend without it
    import numba
    from llvmlite import ir
    from numba import njit
    from numba.core import cgutils, types
    from numba.extending import intrinsic

    _NUMBA_ERROR: Exception | None = None
except Exception as exc:  # pragma: no cover - exercised only where numba is missing or broken
    numba = None
    _NUMBA_ERROR = exc

__all__ = ["numba_available", "cpu_fwht", "clear_buffer_pool"]


def numba_available() -> bool:
    """True when numba (and llvmlite) import, so :func:`cpu_fwht` can run."""
    return numba is not None


# --------------------------------------------------------------------------------------------------------------------
# Vector geometry of this host
# --------------------------------------------------------------------------------------------------------------------


def _host_vector() -> tuple[int, int, bool]:
    """(bytes per native vector register, log2 of the largest radix that fits the register file, has FMA)."""
    try:
        import llvmlite.binding as llb

        feats = llb.get_host_cpu_features()
        fma = bool(feats.get("fma", False))
        if feats.get("avx512f", False):
            return 64, 4, fma  # 32 zmm registers: radix-16 keeps 16 vectors + temporaries in registers
        if feats.get("avx", False):
            return 32, 3, fma  # 16 ymm registers
        return 16, 3, fma
    except Exception:  # pragma: no cover
        return 16, 3, False


_VEC_BYTES, _MAX_RADIX_LOG2, _HAS_FMA = _host_vector() if numba is not None else (16, 3, False)
# Elements per chunk for the depth-first (L1-resident) passes.
_CHUNK_BYTES = 16 * 1024
# Outputs larger than this use streaming stores (they would not stay in the last-level cache anyway).
_NT_MIN_BYTES = 8 * 1024 * 1024
# Below this many elements one thread does the whole transform (a parallel launch costs more than it saves).
_PARALLEL_MIN_ELEMENTS = 1 << 15


# --------------------------------------------------------------------------------------------------------------------
# LLVM-level butterfly kernels
# --------------------------------------------------------------------------------------------------------------------

if numba is not None:

    def _vec_width(dtype) -> int:
        return _VEC_BYTES // (8 if dtype == types.float64 else 4)

    def _make_bfly(radix: int, first: bool):
        """An intrinsic ``bfly(src, soff, dst, doff, h, mult, moff, scal, mode, pf)``.

        ``src``, ``dst``, ``mult`` are addresses (int64) of element arrays of the dtype of ``scal``; raw addresses
        keep the per-row code free of array objects (and of their reference counting).
        Loads ``radix`` vectors of ``W`` elements at element offsets ``soff + k·h`` of ``src``; if ``mode & 1``
        multiplies them by ``mult[moff + k·h …]``; (first pass only) prefetches ``pf`` elements ahead and does the
        in-register levels; does the ``log2 radix`` butterfly levels across the vectors; if ``mode & 2`` multiplies by
        ``mult[moff + k·h …]``; stores to ``dst`` at ``doff + k·h`` (``mode & 4``: non-temporal, 64-byte-aligned).
        ``scal`` only carries the dtype (float32 or float64).
        """

        @intrinsic
        def bfly(typingctx, src, soff, dst, doff, h, mult, moff, scal, mode, pf):
            sig = types.void(src, soff, dst, doff, h, mult, moff, scal, mode, pf)
            if not isinstance(scal, types.Float):
                return None
            dt = scal
            w = _vec_width(dt)
            is64 = dt == types.float64
            esize = 8 if is64 else 4

            def codegen(context, builder, signature, args):
                a_src, a_soff, a_dst, a_doff, a_h, a_mult, a_moff, a_scal, a_mode, a_pf = args
                fty = ir.DoubleType() if is64 else ir.FloatType()
                vty = ir.VectorType(fty, w)
                i64 = ir.IntType(64)
                i32 = ir.IntType(32)
                fptr = fty.as_pointer()
                sp = builder.inttoptr(context.cast(builder, a_src, signature.args[0], types.int64), fptr)
                dp = builder.inttoptr(context.cast(builder, a_dst, signature.args[2], types.int64), fptr)
                mp = builder.inttoptr(context.cast(builder, a_mult, signature.args[5], types.int64), fptr)
                mode_v = context.cast(builder, a_mode, signature.args[8], types.int64)
                soff_v = context.cast(builder, a_soff, signature.args[1], types.int64)
                doff_v = context.cast(builder, a_doff, signature.args[3], types.int64)
                moff_v = context.cast(builder, a_moff, signature.args[6], types.int64)
                h_v = context.cast(builder, a_h, signature.args[4], types.int64)
                pf_v = context.cast(builder, a_pf, signature.args[9], types.int64)

                offs = [ir.Constant(i64, 0)]
                for k in range(1, radix):
                    offs.append(builder.mul(h_v, ir.Constant(i64, k)))

                def vptr(base, off, k):
                    p = builder.gep(base, [builder.add(off, offs[k])])
                    return builder.bitcast(p, vty.as_pointer())

                undef = ir.Constant(vty, ir.Undefined)

                def body(pre: bool, post: bool, nt: bool):
                    vs = [builder.load(vptr(sp, soff_v, k), align=esize) for k in range(radix)]
                    if first:
                        # software prefetch of the input ``pf`` elements ahead (the next row): its DRAM latency
                        # overlaps with the in-cache passes of this row. One prefetch per cache line.
                        i8p = ir.IntType(8).as_pointer()
                        pfn = cgutils.get_or_insert_function(
                            builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), "llvm.prefetch.p0")
                        base = builder.add(soff_v, pf_v)
                        step = max(1, 64 // (w * esize))
                        for k in range(0, radix, step):
                            pp = builder.bitcast(builder.gep(sp, [builder.add(base, offs[k])]), i8p)
                            builder.call(pfn, [pp, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
                    if pre:
                        vs = [builder.fmul(v, builder.load(vptr(mp, moff_v, k), align=esize))
                              for k, v in enumerate(vs)]
                    if first:  # levels inside a register: r[i] = v[i ^ s] + (±1)·v[i], exact
                        s = 1
                        while s < w:
                            perm = ir.Constant(ir.VectorType(i32, w), [i ^ s for i in range(w)])
                            sgn = ir.Constant(vty, [(-1.0 if i & s else 1.0) for i in range(w)])
                            if _HAS_FMA:
                                fma = cgutils.get_or_insert_function(
                                    builder.module, ir.FunctionType(vty, [vty, vty, vty]),
                                    f"llvm.fma.v{w}{'f64' if is64 else 'f32'}")
                                vs = [builder.call(fma, [v, sgn, builder.shuffle_vector(v, undef, perm)]) for v in vs]
                            else:
                                vs = [builder.fadd(builder.shuffle_vector(v, undef, perm), builder.fmul(v, sgn))
                                      for v in vs]
                            s *= 2
                    s = 1
                    while s < radix:  # levels across registers
                        for k in range(radix):
                            if k & s == 0:
                                a, b = vs[k], vs[k + s]
                                vs[k], vs[k + s] = builder.fadd(a, b), builder.fsub(a, b)
                        s *= 2
                    if post:
                        vs = [builder.fmul(v, builder.load(vptr(mp, moff_v, k), align=esize))
                              for k, v in enumerate(vs)]
                    for k, v in enumerate(vs):
                        st = builder.store(v, vptr(dp, doff_v, k), align=(_VEC_BYTES if nt else esize))
                        if nt:
                            st.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(i32, 1)]))

                # mode bits: 1 pre-multiply by mult (first pass only), 2 post-multiply by mult, 4 streaming stores.
                # Only the combinations the driver produces are emitted (pre and post never together).
                if first:
                    modes = [0, 1, 2, 4, 5, 6]
                else:
                    modes = [0, 2, 4, 6]
                end = builder.append_basic_block("bfly.end")
                blocks = [builder.append_basic_block(f"bfly.m{mode}") for mode in modes]
                sw = builder.switch(mode_v, blocks[0])
                for mode, blk in zip(modes, blocks):
                    sw.add_case(ir.Constant(i64, mode), blk)
                for mode, blk in zip(modes, blocks):
                    builder.position_at_end(blk)
                    body(bool(mode & 1), bool(mode & 2), bool(mode & 4))
                    builder.branch(end)
                builder.position_at_end(end)
                return context.get_dummy_value()

            return sig, codegen

        return bfly

    _bf1f = _make_bfly(1, True)
    _bf2f = _make_bfly(2, True)
    _bf4f = _make_bfly(4, True)
    _bf8f = _make_bfly(8, True)
    _bf16f = _make_bfly(16, True)
    _bf2 = _make_bfly(2, False)
    _bf4 = _make_bfly(4, False)
    _bf8 = _make_bfly(8, False)
    _bf16 = _make_bfly(16, False)

    @intrinsic
    def _fetch_add(typingctx, addr):
        """Atomically add 1 to the int64 at address ``addr``; returns the old value (a lock-free task counter)."""
        sig = types.int64(addr)

        def codegen(context, builder, signature, args):
            i64 = ir.IntType(64)
            ptr = builder.inttoptr(context.cast(builder, args[0], signature.args[0], types.int64), i64.as_pointer())
            return builder.atomic_rmw("add", ptr, ir.Constant(i64, 1), "monotonic")

        return sig, codegen

    @intrinsic
    def _fence(typingctx):
        """A full memory fence (mfence on x86): streaming stores are weakly ordered; this makes a task's output
        visible to whichever thread reads it after the parallel region."""
        sig = types.void()

        def codegen(context, builder, signature, args):
            builder.fence("seq_cst")
            return context.get_dummy_value()

        return sig, codegen

    @njit(cache=True, nogil=True, inline="always")
    def _run_pass(first, r, src, soff, dst, doff, lo, hi, lh, lw, mult, moff, scal, mode, pf):
        """One radix-2^r pass at stride ``h = 2^lh`` over the flat range [lo, hi) of a row (offsets relative to
        the row). Loop counts are shifts, not divisions: this runs for every pass of every row."""
        h = 1 << lh
        lspan = lh + r
        ngroups = (hi - lo) >> lspan
        if first:
            # h == w: the r-group of vectors is contiguous
            if r == 0:
                for t in range(ngroups):
                    i = lo + (t << lspan)
                    _bf1f(src, soff + i, dst, doff + i, h, mult, moff + i, scal, mode, pf)
            elif r == 1:
                for t in range(ngroups):
                    i = lo + (t << lspan)
                    _bf2f(src, soff + i, dst, doff + i, h, mult, moff + i, scal, mode, pf)
            elif r == 2:
                for t in range(ngroups):
                    i = lo + (t << lspan)
                    _bf4f(src, soff + i, dst, doff + i, h, mult, moff + i, scal, mode, pf)
            elif r == 3:
                for t in range(ngroups):
                    i = lo + (t << lspan)
                    _bf8f(src, soff + i, dst, doff + i, h, mult, moff + i, scal, mode, pf)
            else:
                for t in range(ngroups):
                    i = lo + (t << lspan)
                    _bf16f(src, soff + i, dst, doff + i, h, mult, moff + i, scal, mode, pf)
        else:
            nj = h >> lw
            if r == 1:
                for t in range(ngroups):
                    for u in range(nj):
                        j = lo + (t << lspan) + (u << lw)
                        _bf2(src, soff + j, dst, doff + j, h, mult, moff + j, scal, mode, pf)
            elif r == 2:
                for t in range(ngroups):
                    for u in range(nj):
                        j = lo + (t << lspan) + (u << lw)
                        _bf4(src, soff + j, dst, doff + j, h, mult, moff + j, scal, mode, pf)
            elif r == 3:
                for t in range(ngroups):
                    for u in range(nj):
                        j = lo + (t << lspan) + (u << lw)
                        _bf8(src, soff + j, dst, doff + j, h, mult, moff + j, scal, mode, pf)
            else:
                for t in range(ngroups):
                    for u in range(nj):
                        j = lo + (t << lspan) + (u << lw)
                        _bf16(src, soff + j, dst, doff + j, h, mult, moff + j, scal, mode, pf)

    @njit(cache=True, nogil=True, inline="always")
    def _row_simd(src, soff, dst, doff, wrk, woff, p, lw, plan, ncp, lc, mult, moff, scal, pre, post, nt, pf):
        """FWHT of one length-p row (p >= w) from src[soff:] to dst[doff:], intermediates in wrk[woff:].

        Passes 0 … ncp-1 stay inside chunks of ``2^lc`` elements and run chunk by chunk (depth first, in L1);
        the others sweep the whole row. Pass 0 reads ``src``, the last writes ``dst``.
        """
        npass = plan.shape[0]
        csize = 1 << lc
        nchunks = p >> lc
        for c in range(nchunks + npass - ncp):
            if c < nchunks:
                q0 = 0
                q1 = ncp
                lo = c << lc
                hi = lo + csize
            else:
                q0 = ncp + c - nchunks
                q1 = q0 + 1
                lo = 0
                hi = p
            for q in range(q0, q1):
                first = q == 0
                last = q == npass - 1
                mode = 0
                if first and pre:
                    mode |= 1
                if last:
                    if post:
                        mode |= 2
                    if nt:
                        mode |= 4
                ib = wrk
                io = woff
                if first:
                    ib = src
                    io = soff
                ob = wrk
                oo = woff
                if last:
                    ob = dst
                    oo = doff
                _run_pass(first, plan[q, 0], ib, io, ob, oo, lo, hi, plan[q, 1], lw, mult, moff, scal, mode, pf)

    @njit(cache=True, nogil=True, inline="always")
    def _row_scalar(src, soff, dst, doff, p, mult, moff, scal, pre, post):
        """Plain FWHT of one short row (p < vector width)."""
        for j in range(p):
            v = src[soff + j] * scal
            if pre:
                v = v * mult[moff + j]
            dst[doff + j] = v
        h = 1
        while h < p:
            for i in range(0, p, 2 * h):
                for j in range(i, i + h):
                    a = dst[doff + j]
                    b = dst[doff + j + h]
                    dst[doff + j] = a + b
                    dst[doff + j + h] = a - b
            h *= 2
        if post:
            for j in range(p):
                dst[doff + j] = dst[doff + j] * mult[moff + j]

    @njit(cache=True, nogil=True)
    def _fwht_rows(x, out, mult, base, wrk, plan, ncp, csize, p, m, w, pre, post, nt, scal, mscal, pf, counter, per):
        """Transform block-rows of ``x`` (rows = blocks of m·p elements) into ``out``, ``per`` rows at a time, the
        task index taken from ``counter[0]`` (atomically; several threads may run this on the same arrays).

        mult: (nsb, m·p) multiplier pattern, block-row r uses row r % nsb (pre: before H; post: after H and base).
        base: (m, m) matrix applied to the m sub-rows of each block (unused when m == 1).
        wrk: this thread's scratch, m·p elements (used when nt or m > 1).
        """
        b = m * p
        nsb = mult.shape[0]
        rows = x.shape[0]
        zero = rows - rows  # non-literal constant: one specialization of the helpers
        xf = x.reshape(x.size)
        of = out.reshape(out.size)
        mf = mult.reshape(mult.size)
        single = m == 1
        rpost = post and single
        rnt = nt and single
        xa = np.int64(x.ctypes.data)
        oa = np.int64(out.ctypes.data)
        wa = np.int64(wrk.ctypes.data)
        ma = np.int64(mult.ctypes.data)
        lw = 0
        while (1 << lw) < w:
            lw += 1
        lc = 0
        while (1 << lc) < csize:
            lc += 1
        ca = np.int64(counter.ctypes.data)
        while True:
            # take the next task of ``per`` block-rows (threads share the counter: dynamic load balance)
            r0 = _fetch_add(ca) * per
            if r0 >= rows:
                if nt:
                    _fence()
                break
            r1 = min(rows, r0 + per)
            for r in range(r0, r1):
                moff = 0
                if nsb > 1:
                    moff = (r % nsb) * b
                if p < w:
                    for i in range(m):
                        if single:
                            _row_scalar(xf, r * b, of, r * b, p, mf, moff, scal, pre, post)
                        else:
                            _row_scalar(xf, r * b + i * p, wrk, i * p, p, mf, moff + i * p, scal, pre, post and single)
                else:
                    for i in range(m):
                        # addresses only below this point; one call site, so the inlined row code exists once
                        so = r * b + i * p
                        if single:
                            da = oa
                            do = so
                            if nt:
                                wk = wa
                                wo = zero
                            else:
                                wk = oa
                                wo = so
                        else:
                            da = wa
                            do = i * p
                            wk = wa
                            wo = do
                        _row_simd(xa, so, da, do, wk, wo, p, lw, plan, ncp, lc, ma, moff + i * p, scal, pre, rpost,
                                  rnt, pf)
                if not single:
                    for i in range(m):
                        o = of[r * b + i * p:r * b + (i + 1) * p]
                        c = base[i, 0]
                        s = wrk[0:p]
                        for l in range(p):
                            o[l] = c * s[l]
                        for j in range(1, m):
                            c = base[i, j]
                            s = wrk[j * p:(j + 1) * p]
                            for l in range(p):
                                o[l] += c * s[l]
                        if post:
                            mm = mf[moff + i * p:moff + (i + 1) * p]
                            for l in range(p):
                                o[l] = o[l] * mm[l]
                        elif mscal != 1.0:
                            for l in range(p):
                                o[l] = o[l] * mscal


if numba is not None:

    @njit(parallel=True, cache=True, nogil=True)
    def _fwht_par(x, out, mult, base, wrk2, plan, ncp, csize, p, m, w, pre, post, nt, scal, mscal, pf, counter, per):
        """``_fwht_rows`` on ``wrk2.shape[0]`` numba threads, each with its scratch row of ``wrk2``."""
        for t in numba.prange(wrk2.shape[0]):
            _fwht_rows(x, out, mult, base, wrk2[t], plan, ncp, csize, p, m, w, pre, post, nt, scal, mscal, pf,
                       counter, per)


# --------------------------------------------------------------------------------------------------------------------
# Output buffers
# --------------------------------------------------------------------------------------------------------------------

_POOL_MIN_BYTES = 1 << 20
_POOL_MAX_CACHED_BYTES = 512 << 20
_POOL_GRAIN = 2 << 20  # round sizes to hugepages so that nearby sizes share buffers


class _BufferPool:
    """Reusable 64-byte-aligned byte buffers for large outputs; a buffer comes back when its tensor dies."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: dict[int, list[np.ndarray]] = {}
        self._cached = 0

    def tensor(self, shape: tuple[int, ...], dtype: np.dtype) -> torch.Tensor:
        nbytes = int(np.prod(shape)) * dtype.itemsize
        size = -(-nbytes // _POOL_GRAIN) * _POOL_GRAIN
        buf = None
        with self._lock:
            lst = self._free.get(size)
            if lst:
                buf = lst.pop()
                self._cached -= size
        if buf is None:
            buf = np.empty(size + 64, dtype=np.uint8)
        off = (-buf.ctypes.data) % 64
        view = buf[off:off + nbytes].view(dtype).reshape(shape)
        weakref.finalize(view, self._release, buf, size)
        return torch.from_numpy(view)

    def _release(self, buf: np.ndarray, size: int) -> None:
        with self._lock:
            if self._cached + size <= _POOL_MAX_CACHED_BYTES:
                self._free.setdefault(size, []).append(buf)
                self._cached += size

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
            self._cached = 0


_POOL = _BufferPool()


def clear_buffer_pool() -> None:
    """Drop the cached output buffers (memory of tensors still alive is not affected)."""
    _POOL.clear()


def _new_output(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    npdt = np.dtype(torch.empty(0, dtype=dtype).numpy().dtype)
    nbytes = int(np.prod(shape)) * npdt.itemsize
    if nbytes < _POOL_MIN_BYTES:
        return torch.empty(shape, dtype=dtype)
    if os.environ.get("HADAKIT_CPU_POOL", "1") != "0":
        return _POOL.tensor(tuple(shape), npdt)
    # no pool: still a numpy allocation (numpy advises huge pages for large buffers; torch.empty's 4 KiB pages
    # cost ~10x more in page faults here), 64-byte aligned for the streaming stores
    raw = np.empty(nbytes + 64, dtype=np.uint8)
    off = (-raw.ctypes.data) % 64
    return torch.from_numpy(raw[off:off + nbytes].view(npdt).reshape(shape))


# --------------------------------------------------------------------------------------------------------------------
# Plans and the public entry point
# --------------------------------------------------------------------------------------------------------------------


def _split(levels: int, parts: int) -> list[int]:
    q, rem = divmod(levels, parts)
    return [q + (1 if i < rem else 0) for i in range(parts)]


@functools.lru_cache(maxsize=256)
def _plan(k: int, wlog: int, esize: int) -> tuple[np.ndarray, int, int]:
    """Passes (log2 radix, log2 stride) for a row of 2^k elements: chunk-local passes first, then whole-row passes.
    The returned array is shared (read-only)."""
    clog = max(wlog, min(k, int(math.log2(_CHUNK_BYTES // esize))))
    rmax = _MAX_RADIX_LOG2
    local = clog - wlog  # levels across registers inside a chunk (the in-register ones are free in pass 0)
    glob = k - clog
    nl = max(1, -(-local // rmax))
    radices = _split(local, nl)
    if glob:
        radices += _split(glob, -(-glob // rmax))
    plan = np.empty((len(radices), 2), dtype=np.int64)  # (log2 radix, log2 stride)
    lh = wlog
    for i, r in enumerate(radices):
        plan[i] = (r, lh)
        lh += r
    plan.flags.writeable = False
    return plan, nl, 1 << clog


def _threads(elements: int, rows: int) -> int:
    if elements < _PARALLEL_MIN_ELEMENTS:
        return 1
    return max(1, min(torch.get_num_threads(), rows))


_TLS = threading.local()
# Rows are handed out in tasks of about this many bytes (several per thread: a descheduled thread holds back little).
_TASK_BYTES = 1 << 20


def _scratch(elements: int, dtype) -> np.ndarray:
    """This thread's scratch vector (kept between calls so that it stays mapped and cached)."""
    key = np.dtype(dtype).char
    buf = getattr(_TLS, key, None)
    if buf is None or buf.size < elements:
        buf = np.empty(max(elements, 1), dtype=dtype)
        setattr(_TLS, key, buf)
    return buf


def _launch(args: tuple, rows: int, block: int, esize: int, nthreads: int, need_wrk: bool, np_dt) -> None:
    """Run ``_fwht_rows`` on this thread, or on ``nthreads`` numba threads taking tasks from an atomic counter."""
    wrk_elems = block if need_wrk else 1
    per = max(1, min(-(-rows // nthreads), _TASK_BYTES // (block * esize)))
    ntasks = -(-rows // per)
    counter = np.zeros(1, dtype=np.int64)
    nthreads = min(nthreads, ntasks, numba.config.NUMBA_NUM_THREADS)
    if nthreads == 1:
        _fwht_rows(*args[:4], _scratch(wrk_elems, np_dt), *args[4:], counter, per)
        return
    wrk2 = np.empty((nthreads, wrk_elems), dtype=np_dt)
    prev = numba.get_num_threads()
    numba.set_num_threads(nthreads)
    try:
        _fwht_par(*args[:4], wrk2, *args[4:], counter, per)
    finally:
        numba.set_num_threads(prev)


def cpu_fwht(
    x: torch.Tensor,
    base: torch.Tensor | None,
    signs: torch.Tensor | None,
    block: int,
    scale: float,
    transpose: bool,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The ``hadamard`` primitive on CPU tensors (see the module docstring and docs/ARCHITECTURE.md).

    ``out`` (optional): a contiguous CPU tensor of the shape and dtype of ``x`` to write into; it may be ``x`` itself
    (in-place). Without it a new tensor is returned.
    """
    if numba is None:
        raise RuntimeError(f"cpu_fwht needs numba (pip install numba): {_NUMBA_ERROR}")
    if x.device.type != "cpu":
        raise ValueError(f"cpu_fwht takes CPU tensors, got a tensor on {x.device}; use the torch or Triton backend.")
    if not x.dtype.is_floating_point:
        raise TypeError(f"cpu_fwht takes floating-point tensors, got {x.dtype}.")
    n = x.shape[-1] if x.dim() else 1
    m = 1 if base is None else int(base.shape[0])
    if block <= 0 or n % block or block % m:
        raise ValueError(f"block {block} must divide the last dim {n} and be a multiple of the base order {m}.")
    p = block // m
    k = p.bit_length() - 1
    if p != 1 << k:
        raise ValueError(f"block {block} = {m}·{p}: the factor {p} must be a power of two.")
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    np_dt = np.float64 if compute == torch.float64 else np.float32

    if out is not None:
        if out.shape != x.shape or out.dtype != x.dtype or not out.is_contiguous() or out.device.type != "cpu":
            raise ValueError("out must be a contiguous CPU tensor of the shape and dtype of x.")
    if x.numel() == 0:
        return out if out is not None else torch.empty(x.shape, dtype=x.dtype)

    xc = x.detach()
    if xc.dtype != compute:
        xc = xc.to(compute)
    xc = xc.contiguous()
    rows = xc.numel() // block
    x2 = xc.numpy().reshape(rows, block)

    if out is not None and out.dtype == compute:
        y = out
    else:
        y = _new_output(tuple(x.shape), compute)
    y2 = y.detach().numpy().reshape(rows, block)

    # multiplier (scale folded in) and where it applies
    pre = post = False
    scal = 1.0
    mscal = 1.0
    if signs is not None:
        if signs.numel() != n:
            raise ValueError(f"signs has {signs.numel()} entries; it needs one per element of the last dim ({n}).")
        sg = signs.detach().to(device="cpu", dtype=compute).reshape(-1, block)
        mult = (sg * scale).numpy() if scale != 1.0 else sg.contiguous().numpy()
        mult = np.ascontiguousarray(mult)
        if transpose:
            post = True
        else:
            pre = True
    elif transpose and m > 1:
        mult = np.ones((1, 1), dtype=np_dt)
        mscal = float(scale)  # applied by the base-mixing step, after H and the base
    elif scale != 1.0:
        mult = np.full((1, block), scale, dtype=np_dt)  # the transform is linear: scale the input
        pre = True
    else:
        mult = np.ones((1, 1), dtype=np_dt)
    bmat = np.ones((1, 1), dtype=np_dt)
    if base is not None:
        bt = base.detach().to(device="cpu", dtype=compute)
        bmat = np.ascontiguousarray((bt.t() if transpose else bt).numpy())

    esize = np.dtype(np_dt).itemsize
    wlog = int(math.log2(_VEC_BYTES // esize))
    w = 1 << wlog
    if p >= w:
        plan, ncp, csize = _plan(k, wlog, esize)
    else:
        plan, ncp, csize = _plan(0, 0, esize)[0], 1, p  # unused by the scalar path; same array type

    total_bytes = rows * block * esize
    nt = (
        m == 1
        and p >= w
        and total_bytes >= _NT_MIN_BYTES
        and y2.ctypes.data % _VEC_BYTES == 0
        and not np.may_share_memory(x2, y2)
    )
    # prefetch distance (elements): the next row, for inputs that come from DRAM
    pf = block if total_bytes >= _NT_MIN_BYTES else 0
    nthreads = _threads(rows * block, rows)
    _launch((x2, y2, mult, bmat, plan, ncp, csize, p, m, w, pre, post, nt, np_dt(scal), np_dt(mscal), pf),
            rows, block, esize, nthreads, nt or m > 1, np_dt)

    if y.dtype != x.dtype:
        y = y.to(x.dtype)
        if out is not None:
            out.copy_(y)
            return out
    return y
