"""The ``hadakit::hadamard`` custom op: one primitive behind every transform, with autograd and a fake kernel.

Registering through ``torch.library.custom_op`` (with ``register_fake``) lets ``torch.compile(fullgraph=True)``
trace models that call it without a graph break, and ``register_autograd`` gives it a backward that is the same op
with ``transpose`` flipped (the transform is linear, so its vector-Jacobian product is the transposed transform).
Signs that require grad get their gradient too (one more transposed transform in the backward, only then).

Backend choice, per call: the Triton kernel for CUDA tensors of float32/float16/bfloat16 when Triton is installed;
the numba SIMD kernel (``kernels/cpu_fwht.py``) for CPU tensors of at least ``_NUMBA_MIN_NUMEL`` elements when numba
is installed (``hadakit[cpu]``); else the portable PyTorch backend. ``HADAKIT_BACKEND=torch|numba|triton`` forces one
(``triton`` on CPU tensors needs ``TRITON_INTERPRET=1``; that is how CI tests the kernel without a GPU).
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch

from hadakit.kernels.torch_hadamard import torch_hadamard
from hadakit.transforms.plan import base_matrix

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Limits of the Triton kernel (see kernels/triton_hadamard.py); larger blocks take the portable path.
_TRITON_MAX_BASE = 256
_TRITON_MAX_POW2 = 1 << 15


# Below a few thousand elements the torch path's lower call overhead wins (measured: benchmarks/NOTES.md).
_NUMBA_MIN_NUMEL = 4096


@functools.lru_cache(maxsize=1)
def _numba():
    try:
        from hadakit.kernels import cpu_fwht as mod
    except Exception:  # numba missing or broken: the portable path still works
        return None
    return mod if mod.numba_available() else None


def _use_numba(x: torch.Tensor) -> bool:
    forced = os.environ.get("HADAKIT_BACKEND", "auto").lower()
    if forced == "numba":
        if _numba() is None:
            raise RuntimeError("HADAKIT_BACKEND=numba but numba is not usable here (install hadakit[cpu])")
        return x.device.type == "cpu"
    return forced == "auto" and x.device.type == "cpu" and x.numel() >= _NUMBA_MIN_NUMEL and _numba() is not None


@functools.lru_cache(maxsize=1)
def _triton():
    try:
        from hadakit.kernels import triton_hadamard as mod
    except Exception:  # triton missing or broken: the portable path still works
        return None
    return mod if mod.triton_available() else None


def _use_triton(x: torch.Tensor, base: Optional[torch.Tensor], block: int) -> bool:
    forced = os.environ.get("HADAKIT_BACKEND", "auto").lower()
    if forced in ("torch", "numba"):
        return False
    m = 1 if base is None else base.shape[0]
    fits = x.dtype in _TRITON_DTYPES and m <= _TRITON_MAX_BASE and block // m <= _TRITON_MAX_POW2
    if forced == "triton":
        if not fits:
            raise ValueError(
                f"HADAKIT_BACKEND=triton: the Triton kernel supports float32/float16/bfloat16, base order <= "
                f"{_TRITON_MAX_BASE} and power-of-two factor <= {_TRITON_MAX_POW2}; got dtype {x.dtype}, "
                f"block {block} = {m}·{block // m}. Unset HADAKIT_BACKEND to use the portable path."
            )
        if _triton() is None:
            raise RuntimeError("HADAKIT_BACKEND=triton but Triton is not usable here (install hadakit[triton]; "
                               "on a machine without a GPU also set TRITON_INTERPRET=1).")
        return True
    return x.is_cuda and fits and _triton() is not None


@torch.library.custom_op("hadakit::hadamard", mutates_args=())
def hadamard(
    x: torch.Tensor,
    signs: Optional[torch.Tensor],
    block: int,
    base_kind: str,
    base_order: int,
    base_seed: int,
    scale: float,
    transpose: bool,
) -> torch.Tensor:
    """Blockwise ``scale·(base ⊗ H)·D`` (or its transpose) along the last dim; see docs/ARCHITECTURE.md.

    The base matrix is named by ``(base_kind, base_order, base_seed)`` (a ``TransformPlan``) and looked up here,
    inside the op, so that ``torch.compile`` sees only scalars and never traces the matrix constructions.
    """
    if x.numel() == 0:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    x = x.contiguous()
    base = base_matrix(base_kind, base_order, base_seed, x.device, x.dtype)
    if _use_triton(x, base, block):
        return _triton().triton_hadamard(x, base, signs, block, scale, transpose)
    if _use_numba(x):
        return _numba().cpu_fwht(x, base, signs, block, scale, transpose)
    return torch_hadamard(x, base, signs, block, scale, transpose)


@hadamard.register_fake
def _hadamard_fake(x, signs, block, base_kind, base_order, base_seed, scale, transpose):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    x, signs = inputs[0], inputs[1]
    ctx.args = inputs[1:-1]  # signs, block, base_kind, base_order, base_seed, scale
    ctx.transpose = inputs[-1]
    # The signs' gradient needs x; it is kept only when signs require grad (rare: learned / straight-through signs).
    ctx.signs_grad = signs is not None and signs.requires_grad
    if ctx.signs_grad:
        ctx.save_for_backward(x)


def _signs_grad(ctx, grad):
    """d/d signs. Forward ``y = scale·M·(s ⊙ v)``: ``x ⊙ (scale·Mᵀ g)``; transpose ``y = s ⊙ (scale·Mᵀ v)``:
    ``g ⊙ (scale·Mᵀ x)``; summed over the leading dims. One unsigned transposed transform, exact for any ``s``."""
    (x,) = ctx.saved_tensors
    signs, rest = ctx.args[0], ctx.args[1:]
    n = x.shape[-1]
    if ctx.transpose:
        u, other = hadamard(x, None, *rest, True), grad
    else:
        u, other = hadamard(grad, None, *rest, True), x
    cd = torch.float64 if signs.dtype == torch.float64 else torch.float32
    return (u.to(cd) * other.to(cd)).reshape(-1, n).sum(0).to(signs.dtype)


def _backward(ctx, grad):
    g = hadamard(grad, *ctx.args, not ctx.transpose) if ctx.needs_input_grad[0] else None
    gs = _signs_grad(ctx, grad) if ctx.signs_grad and ctx.needs_input_grad[1] else None
    return (g, gs) + (None,) * 6


hadamard.register_autograd(_backward, setup_context=_setup_context)
