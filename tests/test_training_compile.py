"""hadakit.training under torch.compile (CPU, backend="aot_eager", fullgraph=True: no graph breaks)."""

import copy

import pytest
import torch
from torch import nn

from hadakit.training import convert

torch.set_num_threads(1)


def _model(recipe):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 64))
    convert(model, recipe, verbose=False)
    return model


@pytest.mark.parametrize("recipe", ["int8_hadamard", "bitnet_v2", "fp8"])
def test_compiled_deterministic_recipe_matches_eager(recipe):
    """Recipes with nearest rounding and no random signs: compiled forward and gradients equal eager ones."""
    torch._dynamo.reset()
    eager = _model(recipe)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 20, 64)  # 40 tokens: the token dim of the weight gradient is padded
    y_e, y_c = eager(x), compiled(x)
    torch.testing.assert_close(y_c, y_e, rtol=1e-6, atol=1e-6)
    y_e.square().mean().backward()
    y_c.square().mean().backward()
    for pe, pc in zip(eager.parameters(), compiled_model.parameters()):
        torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("recipe", ["mxfp4", "nvfp4"])
def test_compiled_stochastic_recipes_run_fullgraph(recipe):
    """SR + random Hadamard signs (new per step / fixed) trace without graph breaks; the forward (nearest rounding)
    equals eager's. The backward draws from torch's global RNG like eager, but the compiled graph may order the
    draws differently, so a seeded compiled step is not bit-identical to a seeded eager step (same distribution)."""
    torch._dynamo.reset()
    eager = _model(recipe)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)
    x = torch.randn(8, 32, 64)
    y_e, y_c = eager(x), compiled(x)
    torch.testing.assert_close(y_c, y_e, rtol=1e-6, atol=1e-6)
    y_c.square().mean().backward()
    for p in compiled_model.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_compiled_sr_gradients_are_unbiased():
    """mxfp4_bwd compiled: the mean of many stochastic weight / input gradients is the exact gradient."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    ref = nn.Linear(64, 32)
    model = nn.Sequential(copy.deepcopy(ref))
    convert(model, "mxfp4_bwd", verbose=False)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x, g = torch.randn(48, 64), torch.randn(48, 32)
    xr = x.clone().requires_grad_()
    (ref(xr) * g).sum().backward()
    dws, dxs = [], []
    for _ in range(150):
        xq = x.clone().requires_grad_()
        model[0].weight.grad = None
        (compiled(xq) * g).sum().backward()
        dws.append(model[0].weight.grad.double())
        dxs.append(xq.grad.double())
    for samples, exact in ((torch.stack(dws), ref.weight.grad), (torch.stack(dxs), xr.grad)):
        sem = samples.std(0) / len(samples) ** 0.5
        z = ((samples.mean(0) - exact.double()).abs() / (sem + 1e-12)).max().item()
        assert z < 6.0, z
