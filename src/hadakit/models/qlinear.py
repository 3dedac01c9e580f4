"""``RotatedQuantLinear``: the drop-in replacement of an ``nn.Linear`` in a quantized model.

``y = Q_a(x·Rᵀ) · Ŵᵀ + b`` with ``Ŵ = Q_w(W·Rᵀ)`` and ``R`` the layer's online rotation (a normalized Hadamard,
optionally with random signs or block-diagonal). Since ``Rᵀ·R = I`` the product is exact before quantization;
rotating spreads outliers over all channels so both quantizers see flatter distributions.

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
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(weight.detach(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.packed = packed
        self.rotation = rotation
        self.act_scheme = act_scheme

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rotation is not None:
            x = self.rotation(x)
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
        return ", ".join(parts)
