"""LBP-WHT (hadakit.training.lbp_wht): exact properties of the projected backward, the layer, convert() and FLOPs."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from hadakit.training import (
    LbpWhtConfig,
    LbpWhtLinear,
    LbpWhtRecipe,
    QuantLinear,
    TrainingRecipe,
    convert,
    get_training_recipe,
    lbp_wht_flops,
    lbp_wht_linear,
)
from hadakit.training.lbp_wht import lbp_wht_basis, sequency


def walsh_reference(n: int, r: int) -> np.ndarray:
    """Independent float64 reference: Sylvester matrix by numpy Kronecker products, rows sorted by sign changes
    (Walsh / sequency order, unique for powers of two), first r rows, normalized; returned as [n, r]."""
    h = np.array([[1.0]])
    while h.shape[0] < n:
        h = np.kron(h, np.array([[1.0, 1.0], [1.0, -1.0]]))
    changes = (np.diff(h, axis=1) != 0).sum(1)
    assert sorted(changes) == list(range(n))
    return (h[np.argsort(changes)[:r]] / np.sqrt(n)).T


def _grads(fn, x, w, b, dy):
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    b = b.clone().requires_grad_(True)
    y = fn(x, w, b)
    y.backward(dy)
    return y.detach(), x.grad, w.grad, b.grad


def _data(shape_x, out, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape_x, generator=g, dtype=dtype)
    w = torch.randn(out, shape_x[-1], generator=g, dtype=dtype)
    b = torch.randn(out, generator=g, dtype=dtype)
    dy = torch.randn(*shape_x[:-1], out, generator=g, dtype=dtype)
    return x, w, b, dy


def _dense(x, w, b):
    return torch.nn.functional.linear(x, w, b)


@pytest.mark.parametrize("tokens,padding", [(16, "pow2"), (11, "pow2"), (12, "exact"), (20, "exact")])
@pytest.mark.parametrize("project", ["both", "weight"])
def test_full_basis_equals_dense_autograd(tokens, padding, project):
    cfg = LbpWhtConfig(rank=1.0, padding=padding, project=project)
    x, w, b, dy = _data((3, tokens, 24), 10)
    ref = _grads(_dense, x, w, b, dy)
    got = _grads(lambda x, w, b: lbp_wht_linear(x, w, b, cfg), x, w, b, dy)
    for a, e in zip(got, ref):
        assert (a - e).abs().max().item() < 1e-12


@pytest.mark.parametrize("tokens,rank", [(16, 4), (32, 5), (13, 3)])
def test_projected_gradients_equal_float64_reference(tokens, rank):
    x, w, b, dy = _data((2, tokens, 20), 12, seed=1)
    n = 1 << (tokens - 1).bit_length()
    p = torch.from_numpy(walsh_reference(n, rank)[:tokens])  # zero padding == first T rows
    pp = p @ p.T
    dw_ref = sum(x[i].T @ pp @ dy[i] for i in range(2)).T  # (X^T P P^T dY)^T  ->  [out, in]
    dx_ref = pp @ dy @ w
    _, dx, dw, db = _grads(lambda x, w, b: lbp_wht_linear(x, w, b, LbpWhtConfig(rank=rank)), x, w, b, dy)
    assert (dw - dw_ref).abs().max().item() < 1e-12
    assert (dx - dx_ref).abs().max().item() < 1e-12
    assert (db - dy.sum((0, 1))).abs().max().item() < 1e-12  # bias gradient exact
    # project="weight": the same weight gradient, exact input gradient
    _, dx2, dw2, _ = _grads(lambda x, w, b: lbp_wht_linear(x, w, b, LbpWhtConfig(rank=rank, project="weight")),
                            x, w, b, dy)
    assert (dw2 - dw_ref).abs().max().item() < 1e-12
    assert (dx2 - dy @ w).abs().max().item() < 1e-12


def test_negative_control_low_rank_differs():
    x, w, b, dy = _data((2, 16, 20), 12, seed=2)
    ref = _grads(_dense, x, w, b, dy)
    got = _grads(lambda x, w, b: lbp_wht_linear(x, w, b, LbpWhtConfig(rank=8)), x, w, b, dy)
    assert torch.equal(got[0], ref[0])  # forward exact
    assert (got[1] - ref[1]).abs().max().item() > 1e-2  # dx projected
    assert (got[2] - ref[2]).abs().max().item() > 1e-2  # dW projected
    # natural order picks another basis: another (still low-rank) gradient
    nat = _grads(lambda x, w, b: lbp_wht_linear(x, w, b, LbpWhtConfig(rank=8, selection="natural")), x, w, b, dy)
    assert (nat[2] - got[2]).abs().max().item() > 1e-2


def test_low_pass_gradient_is_closer_on_smooth_signals():
    """On token-smooth activations and gradients the low-pass basis keeps more of dW than the natural order."""
    t = torch.linspace(0, 1, 32, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    x = torch.stack([torch.sin(2 * np.pi * f * t + ph) for f, ph in torch.rand(24, 2, generator=g, dtype=torch.float64)], -1)
    dy = torch.stack([torch.cos(2 * np.pi * f * t + ph) for f, ph in torch.rand(8, 2, generator=g, dtype=torch.float64)], -1)
    w = torch.randn(8, 24, generator=g, dtype=torch.float64)
    b = torch.zeros(8, dtype=torch.float64)
    ref = _grads(_dense, x, w, b, dy)[2]
    err = {s: (_grads(lambda x, w, b: lbp_wht_linear(x, w, b, LbpWhtConfig(rank=6, selection=s)), x, w, b, dy)[2]
               - ref).norm().item() for s in ("low_pass", "natural")}
    assert err["low_pass"] < 0.5 * err["natural"]


def test_basis_properties():
    cfg = LbpWhtConfig(rank=8)
    p = lbp_wht_basis(32, cfg, dtype=torch.float64)
    assert p.shape == (32, 8)
    assert torch.allclose(p.T @ p, torch.eye(8, dtype=torch.float64), atol=1e-14)
    assert torch.allclose(p[:, 0], torch.full((32,), 32 ** -0.5, dtype=torch.float64))  # DC first
    assert sequency(torch.sign(p.T)).tolist() == list(range(8))
    assert np.allclose(p.numpy(), walsh_reference(32, 8))
    assert cfg.resolved_rank(11) == 8 and cfg.padded_tokens(11) == 16 and cfg.resolved_rank(4) == 4  # capped at N
    assert LbpWhtConfig(rank=0.25).resolved_rank(11) == 4
    assert LbpWhtConfig(rank=0.25, padding="exact").resolved_rank(12) == 3


def test_forward_bit_identical_to_nn_linear_and_module_shares_weights():
    g = torch.Generator().manual_seed(4)
    lin = nn.Linear(48, 40)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(40, 48, generator=g))
    x = torch.randn(5, 16, 48, generator=g)
    layer = LbpWhtLinear.from_linear(lin, LbpWhtConfig(rank=4))
    assert layer.weight is lin.weight and layer.bias is lin.bias
    assert torch.equal(layer(x), lin(x))
    assert torch.equal(layer(x.requires_grad_(True)), lin(x))
    with torch.no_grad():
        assert torch.equal(layer(x), lin(x))
    assert set(layer.state_dict()) == {"weight", "bias"}


def test_config_validation():
    for bad, err in [(0, ValueError), (1.5, ValueError), (0.0, ValueError), (True, TypeError), ("8", TypeError)]:
        with pytest.raises(err, match="rank"):
            LbpWhtConfig(rank=bad)
    with pytest.raises(ValueError, match="selection"):
        LbpWhtConfig(selection="energy")
    with pytest.raises(ValueError, match="project"):
        LbpWhtConfig(project="input")
    with pytest.raises(ValueError, match="padding='pow2'"):
        LbpWhtConfig(padding="exact").padded_tokens(11)
    with pytest.raises(ValueError, match="tokens, features"):
        lbp_wht_linear(torch.randn(8, requires_grad=True), torch.randn(3, 8), None, LbpWhtConfig())
    with pytest.raises(TypeError, match="LbpWhtConfig"):
        lbp_wht_linear(torch.randn(4, 8), torch.randn(3, 8), None, {"rank": 2})


def test_recipe_round_trip_and_names():
    r = get_training_recipe("lbp_wht")
    assert isinstance(r, LbpWhtRecipe) and r.config == LbpWhtConfig()
    r8 = get_training_recipe("lbp_wht:8")
    assert r8.config.rank == 8 and r8.name == "lbp_wht:8"
    assert get_training_recipe(r8.name) == r8
    assert get_training_recipe("lbp_wht:0.5").config.rank == 0.5
    custom = LbpWhtRecipe(rank=6, selection="natural", project="weight", padding="exact", name="x")
    back = TrainingRecipe.from_dict(json.loads(json.dumps(custom.to_dict())))
    assert back == custom and isinstance(back, LbpWhtRecipe)
    assert get_training_recipe("lbp_wht", rank=3).config.rank == 3
    with pytest.raises(ValueError, match="lbp_wht:8"):
        get_training_recipe("lbp_wht:abc")
    with pytest.raises(ValueError, match="do not pass"):
        LbpWhtRecipe(forward={"a": {"scheme": "int8"}})
    assert "LBP-WHT" in custom.describe()


def test_convert_swaps_targets_and_respects_ignore():
    torch.manual_seed(0)  # module init only; the test's own process
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 4))
    w0 = model[0].weight
    report = convert(model, "lbp_wht:4", ignore=["4"], verbose=False)
    assert [n for n, *_ in report.swapped] == ["0", "2"]
    assert isinstance(model[0], LbpWhtLinear) and model[0].weight is w0
    assert type(model[4]) is nn.Linear
    assert model[0].config.rank == 4
    again = convert(model, "lbp_wht:4", verbose=False)
    assert ("0", "already LbpWhtLinear") in again.skipped
    m2 = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 4))
    convert(m2, "lbp_wht", targets=["1"], verbose=False)
    assert type(m2[0]) is nn.Linear and isinstance(m2[1], LbpWhtLinear)


def test_quantlinear_with_lbp_recipe_runs_lbp_backward():
    x, w, b, dy = _data((2, 16, 8), 6, seed=5, dtype=torch.float32)
    q = QuantLinear(8, 6, recipe="lbp_wht:4")
    with torch.no_grad():
        q.weight.copy_(w)
        q.bias.copy_(b)
    q(x).backward(dy)
    _, _, dw, _ = _grads(lambda x, w, b: lbp_wht_linear(x, w, b, LbpWhtConfig(rank=4)), x, w, b, dy)
    assert torch.allclose(q.weight.grad, dw, atol=1e-5)
    _, _, dw_dense, _ = _grads(_dense, x, w, b, dy)
    assert not torch.allclose(q.weight.grad, dw_dense, atol=1e-3)


def test_flop_count():
    t, i, o, bsz = 32, 384, 1536, 4
    dense = lbp_wht_flops(t, i, o, None, sequences=bsz)
    assert dense["forward"] == dense["grad_input"] == dense["grad_weight"] == 2 * bsz * t * i * o
    assert dense["backward"] == 4 * bsz * t * i * o + bsz * t * o
    f = lbp_wht_flops(t, i, o, LbpWhtConfig(rank=8), sequences=bsz)
    r = 8
    assert f["grad_weight"] == f["grad_input"] == 2 * bsz * r * i * o
    assert f["projection"] == 2 * bsz * t * r * (2 * i + o)
    assert f["backward"] / dense["backward"] < 0.5
    w = lbp_wht_flops(t, i, o, LbpWhtConfig(rank=8, project="weight"), sequences=bsz)
    assert w["grad_input"] == dense["grad_input"] and w["backward"] / dense["backward"] > 0.5
    with pytest.raises(ValueError, match="tokens"):
        lbp_wht_flops(0, i, o)
