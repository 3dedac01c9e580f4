"""``HadamardConv2d``: a convolution-replacing layer that filters in the 2D Walsh–Hadamard domain.

The layer is the classical part of the HT-perceptron layer of Pan, Zhu, Atici & Cetin, "A Hybrid Quantum-Classical
Approach based on the Hadamard Transform for the Convolutional Layer" (ICML 2023, arXiv 2305.17510), which builds
on the WHT + thresholding layers of Pan, Badawi & Cetin ("Fast Walsh-Hadamard Transform and Smooth-Thresholding
Based Binary Layers in Deep Neural Networks", CVPR Workshops 2021, arXiv 2104.07085). By the Hadamard convolution
theorem, a dyadic convolution is an element-wise product in the Hadamard domain; the layer learns that product
(plus a channel mix and a denoising nonlinearity) instead of a 3×3 kernel. What this module computes, for an input
``x`` [N, C, H, W]:

1. zero-pad ``H``, ``W`` at the bottom / right to the smallest sizes ``H' >= H``, ``W' >= W`` with a Hadamard
   matrix (:func:`hadakit.transforms.nearest_supported`; all powers of two and e.g. 12, 20, 24, ...);
2. ``X = WHT₂(x)``: the orthonormal Walsh–Hadamard transform (:func:`hadakit.transforms.hadamard_transform`) along
   the last dim, then along the one before (Sylvester / natural order, ``H·x·Hᵀ`` per channel);
3. for each of ``paths`` paths ``p`` (the paper's multi-path layer; default 1):
   ``Z_p = S_{T_p}(M_p(X ⊙ V_p))`` with ``V_p`` [C, H', W'] a learned scale per channel and per Hadamard
   coefficient, ``M_p`` a learned 1×1 channel mix (``C -> out_channels``, no bias; ``mix_channels=False`` skips it,
   which needs ``out_channels == channels``) and ``S_T(z) = sign(z)·max(|z| - T, 0)`` the soft threshold with a
   learned non-negative threshold ``T_p`` [out_channels, H', W'] (stored as its absolute value);
4. ``y = WHT₂⁻¹(Σ_p Z_p)``, cropped back to [N, out_channels, H, W], plus an optional bias per output channel.

Initialization: ``V = 1``, ``T = threshold_init`` (default 0), channel mix as ``nn.Conv2d``'s 1×1 default (or the
identity, ``mix_init="identity"``). With ``V = 1``, ``T = 0`` and an identity mix the layer is exactly the identity
(the transform is orthonormal).

Differences from a 3×3 conv: the filter is location-specific (one coefficient per Hadamard basis image, not a
shift-invariant kernel), it needs the spatial size at construction (``height``, ``width``: the scale and threshold
are per coefficient), and it reaches the whole (padded) image, not a 3×3 neighbourhood.

Cost (per image; see :meth:`HadamardConv2d.macs`): ``paths·(C + C·out_channels)·H'·W'`` multiply-accumulates (the
scaling and the 1×1 mix), ``paths`` soft thresholds, and ``(C + out_channels)·H'·W'·(log2 H' + log2 W')``
additions for the two fast transforms (power-of-two sizes; the normalization can be folded into ``V``). A 3×3
conv costs ``9·C·out_channels·H·W`` MACs.

    >>> import torch
    >>> layer = HadamardConv2d(4, 8, 8)
    >>> layer(torch.randn(2, 4, 8, 8)).shape
    torch.Size([2, 4, 8, 8])
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hadakit.transforms import hadamard_transform, inverse_hadamard_transform, nearest_supported, supported

__all__ = ["HadamardConv2d", "soft_threshold", "wht2", "iwht2"]


def _padded(n: int) -> int:
    return n if supported(n) else nearest_supported(n)[1]


def wht2(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal 2D Walsh–Hadamard transform over the last two dims (sizes must have a Hadamard matrix)."""
    return hadamard_transform(hadamard_transform(x, -1), -2)


def iwht2(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`wht2`."""
    return inverse_hadamard_transform(inverse_hadamard_transform(x, -2), -1)


def soft_threshold(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``sign(z)·max(|z| - t, 0)`` for ``t >= 0`` (broadcast)."""
    return torch.sign(z) * F.relu(z.abs() - t)


class HadamardConv2d(nn.Module):
    """2D-WHT-domain layer replacing a 3×3 convolution (Pan et al. 2023's HT-perceptron, classical part).

    ``y = WHT₂⁻¹( Σ_p S_{|T_p|}( M_p( WHT₂(pad(x)) ⊙ V_p ) ) )`` cropped to the input size (+ bias); see the module
    docstring for every step.

    Args:
        channels: input channels ``C``.
        height, width: the spatial size of the input (fixed: the scales and thresholds are per coefficient).
            Sizes without a Hadamard matrix are zero-padded to the next supported size (``padded_size``).
        out_channels: output channels (default ``channels``).
        paths: number of parallel scaling / mix / threshold paths, summed before the inverse transform.
        mix_channels: learn the 1×1 channel mix ``M_p`` (needed when ``out_channels != channels``).
        mix_init: ``"default"`` (``nn.Conv2d`` 1×1 init) or ``"identity"`` (needs ``out_channels == channels``).
        threshold_init: initial threshold (>= 0).
        bias: learn a bias per output channel (added after the inverse transform).

    Raises ValueError for non-positive sizes, a mix that cannot be skipped, or an input of the wrong shape.

    >>> import torch
    >>> layer = HadamardConv2d(1, 8, 8, out_channels=16)
    >>> layer(torch.randn(3, 1, 8, 8)).shape
    torch.Size([3, 16, 8, 8])
    """

    def __init__(self, channels: int, height: int, width: int, out_channels: int | None = None, *,
                 paths: int = 1, mix_channels: bool = True, mix_init: str = "default", threshold_init: float = 0.0,
                 bias: bool = False, device=None, dtype=None):
        super().__init__()
        for name, v in (("channels", channels), ("height", height), ("width", width), ("paths", paths)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"HadamardConv2d: {name} must be an int >= 1, got {v!r}")
        out_channels = channels if out_channels is None else out_channels
        if isinstance(out_channels, bool) or not isinstance(out_channels, int) or out_channels < 1:
            raise ValueError(f"HadamardConv2d: out_channels must be an int >= 1 (or None), got {out_channels!r}")
        if not isinstance(mix_channels, bool):
            raise TypeError(f"HadamardConv2d: mix_channels must be True or False, got {mix_channels!r}")
        if not mix_channels and out_channels != channels:
            raise ValueError(f"HadamardConv2d: out_channels={out_channels} != channels={channels} needs the channel "
                             f"mix; set mix_channels=True")
        if mix_init not in ("default", "identity"):
            raise ValueError(f"HadamardConv2d: mix_init must be 'default' or 'identity', got {mix_init!r}")
        if mix_init == "identity" and out_channels != channels:
            raise ValueError("HadamardConv2d: mix_init='identity' needs out_channels == channels")
        if isinstance(threshold_init, bool) or not isinstance(threshold_init, (int, float)) or threshold_init < 0 \
                or not math.isfinite(threshold_init):
            raise ValueError(f"HadamardConv2d: threshold_init must be a finite number >= 0, got {threshold_init!r}")
        self.channels, self.out_channels, self.height, self.width = channels, out_channels, height, width
        self.paths, self.mix_channels = paths, mix_channels
        self.padded_size = (_padded(height), _padded(width))
        hp, wp = self.padded_size
        fk = dict(device=device, dtype=dtype)
        self.scale = nn.Parameter(torch.ones(paths, channels, hp, wp, **fk))
        self.threshold = nn.Parameter(torch.full((paths, out_channels, hp, wp), float(threshold_init), **fk))
        if mix_channels:
            w = torch.empty(paths, out_channels, channels, **fk)
            if mix_init == "identity":
                w.copy_(torch.eye(channels, **fk).expand(paths, -1, -1))
            else:
                for p in range(paths):  # nn.Conv2d's default init of a 1x1 kernel
                    nn.init.kaiming_uniform_(w[p], a=math.sqrt(5))
            self.mix = nn.Parameter(w)
        else:
            self.register_parameter("mix", None)
        self.bias = nn.Parameter(torch.zeros(out_channels, **fk)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != (self.channels, self.height,
                                                                                      self.width):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"HadamardConv2d: expected input [N, {self.channels}, {self.height}, {self.width}], got "
                             f"{shape}; build the layer with the input's channels, height and width")
        hp, wp = self.padded_size
        if (hp, wp) != (self.height, self.width):
            x = F.pad(x, (0, wp - self.width, 0, hp - self.height))
        X = wht2(x)  # [N, C, H', W']
        Z = X.unsqueeze(1) * self.scale  # [N, P, C, H', W']
        if self.mix is not None:
            Z = torch.einsum("npchw,poc->npohw", Z, self.mix)
        Z = soft_threshold(Z, self.threshold.abs()).sum(1)  # [N, out, H', W']
        y = iwht2(Z)[..., :self.height, :self.width]
        if self.bias is not None:
            y = y + self.bias[:, None, None]
        return y

    def macs(self) -> dict:
        """Per-image cost: ``macs`` (scaling + 1×1 mix multiply-accumulates), ``additions`` (fast 2D WHT and its
        inverse, counted as additions: ``H'W'(log2 H' + log2 W')`` per channel for power-of-two sizes, else the
        dense count ``H'W'(H' + W')``), ``thresholds`` (soft-threshold evaluations, compare + subtract)."""
        hp, wp = self.padded_size
        hw = hp * wp
        per = hw * (math.log2(hp) + math.log2(wp)) if (hp & (hp - 1)) == 0 and (wp & (wp - 1)) == 0 \
            else hw * (hp + wp)
        mac = self.paths * self.channels * hw
        if self.mix is not None:
            mac += self.paths * self.channels * self.out_channels * hw
        return {"macs": int(mac), "additions": int((self.channels + self.out_channels) * per
                                                   + (self.paths - 1) * self.out_channels * hw),
                "thresholds": int(self.paths * self.out_channels * hw)}

    def extra_repr(self) -> str:
        pad = "" if self.padded_size == (self.height, self.width) else f", padded to {self.padded_size}"
        return (f"{self.channels} -> {self.out_channels}, {self.height}x{self.width}{pad}, paths={self.paths}, "
                f"mix_channels={self.mix_channels}, bias={self.bias is not None}")
