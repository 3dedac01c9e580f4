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
def test_compiled_stochastic_recipe_runs_fullgraph(recipe):
    """SR + random Hadamard signs (per step / fixed) trace without graph breaks, and with the same seed of torch's
    global RNG (the source of the SR noise and per-step signs) the compiled step draws the same numbers as eager."""
    torch._dynamo.reset()
    eager = _model(recipe)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)
    x = torch.randn(4, 16, 64)
    torch.manual_seed(5)
    y_e = eager(x)
    y_e.square().mean().backward()
    torch.manual_seed(5)
    y_c = compiled(x)
    y_c.square().mean().backward()
    torch.testing.assert_close(y_c, y_e, rtol=1e-6, atol=1e-6)
    for pe, pc in zip(eager.parameters(), compiled_model.parameters()):
        assert torch.isfinite(pc.grad).all()
        torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-5, atol=1e-7)
