"""HadamardConv2d (hadakit.training.hadamard_conv): exact invertibility of the transform part, agreement with a dense
float64 reference, gradients to scale / threshold / mix (gradcheck), MAC counting, shapes and errors."""

import math

import pytest
import torch

from hadakit.training import HadamardConv2d
from hadakit.training.hadamard_conv import iwht2, soft_threshold, wht2


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def _reference(layer: HadamardConv2d, x: torch.Tensor) -> torch.Tensor:
    """The layer's map with dense Sylvester matrices and explicit loops (power-of-two sizes)."""
    hp, wp = layer.padded_size
    Hh, Hw = _sylvester(hp), _sylvester(wp)
    xp = torch.zeros(x.shape[0], layer.channels, hp, wp, dtype=torch.float64)
    xp[:, :, :layer.height, :layer.width] = x
    X = Hh @ xp @ Hw.t()
    total = 0
    for p in range(layer.paths):
        Z = X * layer.scale[p]
        if layer.mix is not None:
            Z = torch.einsum("nchw,oc->nohw", Z, layer.mix[p])
        t = layer.threshold[p].abs()
        total = total + torch.sign(Z) * torch.clamp(Z.abs() - t, min=0)
    y = (Hh.t() @ total @ Hw)[:, :, :layer.height, :layer.width]
    if layer.bias is not None:
        y = y + layer.bias[:, None, None]
    return y


@pytest.mark.parametrize("hw", [(8, 8), (4, 16), (6, 10), (1, 8)])
@pytest.mark.parametrize("mix", [True, False])
def test_identity_scaling_and_zero_threshold_is_the_identity(hw, mix):
    h, w = hw
    layer = HadamardConv2d(3, h, w, mix_channels=mix, mix_init="identity" if mix else "default",
                           dtype=torch.float64)
    x = torch.randn(5, 3, h, w, dtype=torch.float64)
    y = layer(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, x, rtol=0, atol=1e-12)
    # negative controls: a threshold or a scale other than 1 changes the map
    with torch.no_grad():
        layer.threshold.fill_(0.1)
    assert not torch.allclose(layer(x), x, atol=1e-6)
    with torch.no_grad():
        layer.threshold.zero_()
        layer.scale.mul_(0.5)
    assert not torch.allclose(layer(x), x, atol=1e-6)


def test_transform_is_orthonormal_and_exactly_invertible():
    x = torch.randn(2, 3, 8, 16, dtype=torch.float64)
    X = wht2(x)
    torch.testing.assert_close(X, _sylvester(8) @ x @ _sylvester(16).t(), rtol=0, atol=1e-12)
    torch.testing.assert_close(iwht2(X), x, rtol=0, atol=1e-12)
    torch.testing.assert_close(X.norm(), x.norm(), rtol=1e-14, atol=0)


@pytest.mark.parametrize("paths, out, bias, pad", [(1, 4, False, False), (2, 5, True, False), (2, 3, False, True)])
def test_matches_dense_reference(paths, out, bias, pad):
    torch.manual_seed(0)
    h, w = (6, 7) if pad else (8, 4)
    layer = HadamardConv2d(3, h, w, out_channels=out, paths=paths, threshold_init=0.05, bias=bias,
                           dtype=torch.float64)
    with torch.no_grad():
        layer.scale.uniform_(-2, 2)
        layer.threshold.uniform_(-0.3, 0.3)  # the layer uses |T|
        if bias:
            layer.bias.normal_()
    x = torch.randn(4, 3, h, w, dtype=torch.float64)
    y = layer(x)
    assert y.shape == (4, out, h, w)
    torch.testing.assert_close(y, _reference(layer, x), rtol=1e-12, atol=1e-12)
    assert layer.padded_size == ((8, 8) if pad else (8, 4))


def test_gradcheck_scale_threshold_mix_input():
    torch.manual_seed(1)
    layer = HadamardConv2d(2, 4, 4, out_channels=3, paths=2, bias=True, dtype=torch.float64)
    thr = torch.rand(2, 3, 4, 4, dtype=torch.float64) * 0.2 + 0.05
    scale = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    mix = torch.randn(2, 3, 2, dtype=torch.float64)
    bias = torch.randn(3, dtype=torch.float64)
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    # keep every pre-threshold value away from the kink |z| = T, where soft thresholding is not differentiable
    with torch.no_grad():
        Z = torch.einsum("npchw,poc->npohw", wht2(x).unsqueeze(1) * scale, mix)
        assert ((Z.abs() - thr).abs() > 1e-4).all()

    def f(x, scale, thr, mix, bias):
        params = {"scale": scale, "threshold": thr, "mix": mix, "bias": bias}
        return torch.func.functional_call(layer, params, (x,))

    args = tuple(t.clone().requires_grad_() for t in (x, scale, thr, mix, bias))
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-6)
    # the threshold and scale really receive gradient
    y = f(*args)
    y.square().sum().backward()
    assert args[1].grad.abs().sum() > 0 and args[2].grad.abs().sum() > 0


def test_soft_threshold():
    z = torch.tensor([-2.0, -0.5, 0.0, 0.3, 1.5])
    torch.testing.assert_close(soft_threshold(z, torch.tensor(0.5)), torch.tensor([-1.5, 0.0, 0.0, 0.0, 1.0]))


def test_macs_counting():
    layer = HadamardConv2d(16, 8, 8, out_channels=32)
    m = layer.macs()
    assert m["macs"] == 16 * 64 + 16 * 32 * 64  # scaling + 1x1 mix
    assert m["additions"] == (16 + 32) * 64 * 6  # 2 fast transforms, log2 8 + log2 8 stages of 64 additions
    assert m["thresholds"] == 32 * 64
    conv3x3 = 9 * 16 * 32 * 64
    assert m["macs"] < conv3x3 / 8
    assert HadamardConv2d(4, 8, 8, mix_channels=False).macs()["macs"] == 4 * 64


def test_shapes_and_errors():
    layer = HadamardConv2d(3, 8, 8, out_channels=5)
    with pytest.raises(ValueError, match=r"\[N, 3, 8, 8\]"):
        layer(torch.randn(2, 3, 8, 7))
    with pytest.raises(ValueError, match=r"\[N, 3, 8, 8\]"):
        layer(torch.randn(3, 8, 8))
    with pytest.raises(ValueError, match="mix_channels=True"):
        HadamardConv2d(3, 8, 8, out_channels=4, mix_channels=False)
    with pytest.raises(ValueError, match="identity"):
        HadamardConv2d(3, 8, 8, out_channels=4, mix_init="identity")
    with pytest.raises(ValueError, match="height"):
        HadamardConv2d(3, 0, 8)
    with pytest.raises(ValueError, match="threshold_init"):
        HadamardConv2d(3, 8, 8, threshold_init=-1.0)
    with pytest.raises(ValueError, match="out_channels"):
        HadamardConv2d(3, 8, 8, out_channels=0)
    assert HadamardConv2d(2, 7, 12).padded_size == (8, 12)  # 12 has a Hadamard matrix; 7 pads to 8
    assert "padded to (8, 12)" in repr(HadamardConv2d(2, 7, 12))
    assert sorted(n for n, _ in layer.named_parameters()) == ["mix", "scale", "threshold"]
