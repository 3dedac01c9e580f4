"""``RotatedQuantLinear``: the drop-in replacement of an ``nn.Linear`` in a quantized model.

``y = Q_a(x·Rᵀ) · Ŵᵀ + b`` with ``Ŵ = Q_w(W·Rᵀ)`` and ``R`` the layer's online rotation (a normalized Hadamard,
optionally with random signs or block-diagonal). Since ``Rᵀ·R = I`` the product is exact before quantization;
rotating spreads outliers over all channels so both quantizers see flatter distributions.

Two calibrated stages can come with the rotation (``models/calibrate``): per-channel smoothing scales ``s`` before it
(``x/s`` online, ``W·diag(s)`` offline: SmoothQuant's migration of outliers from activations into weights, exact
for any architecture because the division rides along with the rotation), and a learned Kronecker transform ``P``
after it (``x·P`` online, ``W·P⁻ᵀ`` offline; orthogonal or affine). The whole input map is
``T(x) = ((x/s)·Rᵀ)·P`` and the stored weight is ``Q_w(W·T⁻ᵀ)``.

The weight is kept dequantized (``weight``, what the forward uses) and packed (``packed``, a ``QuantizedTensor``,
what a checkpoint stores); the dequantized copy is computed from the packed one, so a reloaded model gives the same
logits bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hadakit.formats import QuantizedTensor, QuantScheme, fake_quantize
from hadakit.transforms import HadamardRotation
from hadakit.transforms.kronecker import KroneckerTransform


def input_map(x: torch.Tensor, smooth: torch.Tensor | None, rotation, transform: KroneckerTransform | None
              ) -> torch.Tensor:
    """``T(x) = ((x/s)·Rᵀ)·P``: smoothing, rotation and learned transform, each optional."""
    if smooth is not None:
        x = x / smooth.to(x.dtype)
    if rotation is not None:
        x = rotation(x)
    if transform is not None:
        x = transform(x)
    return x


def weight_map(w: torch.Tensor, smooth: torch.Tensor | None, rotation, transform: KroneckerTransform | None
               ) -> torch.Tensor:
    """``W·T⁻ᵀ = ((W·diag(s))·Rᵀ)·P⁻ᵀ`` for a weight ``[out, in]``, so that ``T(x)·(W·T⁻ᵀ)ᵀ = x·Wᵀ``."""
    if smooth is not None:
        w = w * smooth.to(w.dtype)
    if rotation is not None:
        w = rotation(w)
    if transform is not None:
        w = transform.weight_side(w)
    return w


class RotatedQuantLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        packed: QuantizedTensor | None = None,
        rotation: HadamardRotation | None = None,
        act_scheme: QuantScheme | None = None,
        smooth: torch.Tensor | None = None,
        transform: KroneckerTransform | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(weight.detach(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.packed = packed
        self.rotation = rotation
        self.act_scheme = act_scheme
        if smooth is not None and smooth.shape != (in_features,):
            raise ValueError(f"smooth scales must have shape ({in_features},), got {tuple(smooth.shape)}")
        self.register_buffer("smooth", None if smooth is None else smooth.detach().float().clone())
        self.transform = transform

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        """``T(x)``: smoothing, rotation and learned transform, before the activation quantizer."""
        return input_map(x, self.smooth, self.rotation, self.transform)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.transform_input(x)
        if self.act_scheme is not None:
            x = fake_quantize(x, self.act_scheme)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        parts = [f"in={self.in_features}, out={self.out_features}"]
        if self.packed is not None:
            parts.append(f"weight={self.packed.scheme.describe()}")
        if self.act_scheme is not None:
            parts.append(f"act={self.act_scheme.describe()}")
        if self.rotation is not None:
            parts.append(f"rotation={self.rotation.construction} signs={self.rotation.sign_mode}")
        if self.smooth is not None:
            parts.append("smooth")
        if self.transform is not None:
            parts.append(f"transform={self.transform.mode} {self.transform.split[0]}x{self.transform.split[1]}")
        return ", ".join(parts)
