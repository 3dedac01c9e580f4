"""INT4 training of Xi et al. 2023 (hadakit.training.int4, recipe int4_xi): unbiased gradient estimators, their
variance against plain stochastic-rounding INT4, the Hadamard quantizer's forward error, and the layer wiring."""

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

import hadakit
from hadakit.formats import fake_quantize
from hadakit.training import Int4XiRecipe, QuantLinear, TrainingRecipe, convert, get_training_recipe
from hadakit.training.int4 import (
    bit_split,
    hadamard_quantize,
    int4_input_gradient,
    int4_weight_gradient,
    int4_xi_linear,
    leverage_probabilities,
    sr_int4,
)

T, OUT, IN = 32, 16, 16
DRAWS, CHUNK = 10_000, 2_000
TOL = 0.01  # relative Frobenius error of the mean over DRAWS draws


def _problem(seed=0):
    """A gradient with the structural sparsity the paper describes (few tokens carry most of the norm) and the
    forward's INT4 activation operand, float64."""
    g = torch.Generator().manual_seed(seed)
    row_scale = torch.exp(2.0 * torch.randn(T, 1, generator=g, dtype=torch.float64))
    dy = torch.randn(T, OUT, generator=g, dtype=torch.float64) * row_scale
    x = torch.randn(T, IN, generator=g, dtype=torch.float64)
    xq = hadamard_quantize(x, block_size=16)
    w = torch.randn(OUT, IN, generator=g, dtype=torch.float64)
    wq = hadamard_quantize(w, block_size=16)
    return dy, xq, wq


def _draws(fn, dy, seed=1):
    """Mean and mean squared Frobenius error over DRAWS draws of fn(dy_batch, generator) (batched)."""
    gen = torch.Generator().manual_seed(seed)
    total, sq = 0.0, []
    for _ in range(DRAWS // CHUNK):
        est = fn(dy.expand(CHUNK, *dy.shape), gen)
        total = total + est.sum(0)
        sq.append(est)
    est = torch.cat(sq)
    return total / DRAWS, est


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _check_unbiased(mean, est, exact):
    err = _rel(mean, exact)
    # Statistical soundness: the standard error of the mean is well below the tolerance, so a pass is not luck
    # and a real bias of >= 1 % would show.
    se = math.sqrt(((est - exact) ** 2).sum((-2, -1)).mean().item() / DRAWS) / exact.norm().item()
    assert se < TOL / 3, f"standard error {se:.4f} too large for the test to resolve 1 %"
    assert err < TOL, f"mean of {DRAWS} draws is {100 * err:.2f} % off the exact gradient"
    return err, se


@pytest.mark.parametrize("keep", [0.5, 0.25])
def test_weight_gradient_bs_lss_is_unbiased(keep):
    dy, xq, _ = _problem()
    exact = dy.t() @ xq
    mean, est = _draws(lambda d, g: int4_weight_gradient(d, xq, keep, True, g), dy)
    _check_unbiased(mean, est, exact)


def test_weight_gradient_bs_only_is_unbiased():
    dy, xq, _ = _problem(3)
    exact = dy.t() @ xq
    mean, est = _draws(lambda d, g: int4_weight_gradient(d, xq, 0.5, False, g), dy)
    _check_unbiased(mean, est, exact)


@pytest.mark.parametrize("lss", [False, True])
def test_input_gradient_is_unbiased(lss):
    dy, _, wq = _problem(4)
    exact = dy @ wq
    mean, est = _draws(lambda d, g: int4_input_gradient(d, wq, 0.5, lss, g), dy)
    _check_unbiased(mean, est, exact)


def test_lower_variance_than_plain_stochastic_rounding_int4():
    dy, xq, _ = _problem()
    exact = dy.t() @ xq
    m_x, e_x = _draws(lambda d, g: int4_weight_gradient(d, xq, 0.5, True, g), dy)
    m_s, e_s = _draws(lambda d, g: sr_int4(d, g).transpose(-1, -2) @ xq, dy)
    _check_unbiased(m_s, e_s, exact)  # the baseline is unbiased too: a fair comparison
    var_x = ((e_x - exact) ** 2).sum((-2, -1)).mean().item()
    var_s = ((e_s - exact) ** 2).sum((-2, -1)).mean().item()
    assert var_x < 0.5 * var_s, f"BS+LSS variance {var_x:.3g} not clearly below SR-INT4's {var_s:.3g}"


def test_negative_controls_are_biased_beyond_the_tolerance():
    dy, xq, _ = _problem()
    exact = dy.t() @ xq
    # deterministic round-to-nearest INT4 of dy (per token): no draws, the error is the bias
    rtn = fake_quantize(dy, "int4_restricted").t() @ xq
    assert _rel(rtn, exact) > 3 * TOL
    # sampling without the 1/p rescale, at keep_fraction 0.25 (so high parts are dropped too; at 0.5 on this sparse
    # gradient mostly low parts are, and the missing rescale costs only ~0.4 %): the unbiasedness test would catch it

    def no_rescale(d, g):
        hi, lo = bit_split(d, g)
        rows = torch.cat([hi, lo], -2)
        xn = xq.norm(dim=-1)
        p = leverage_probabilities(rows.norm(dim=-1) * torch.cat([xn, xn]), T / 2)
        keep = (torch.rand(p.shape, generator=g, dtype=p.dtype) < p).to(rows.dtype)
        rows = rows * keep.unsqueeze(-1)
        return (rows[..., :T, :] + rows[..., T:, :]).transpose(-1, -2) @ xq

    mean, _ = _draws(no_rescale, dy)
    assert _rel(mean, exact) > 1.5 * TOL  # ~2 %; the standard error at 10^4 draws is < 0.33 %


def test_bit_split_parts_are_int4_and_close():
    g = torch.randn(12, 40, dtype=torch.float64) * torch.logspace(-3, 2, 12, dtype=torch.float64)[:, None]
    hi, lo = bit_split(g, torch.Generator().manual_seed(0))
    for part in (hi, lo):
        s = part.abs().amax(-1, keepdim=True) / 7
        codes = part / torch.where(s > 0, s, torch.ones_like(s))
        assert (codes.abs() <= 7 + 1e-9).all() and torch.allclose(codes, codes.round(), atol=1e-9)
    s_hi = g.abs().amax(-1, keepdim=True) / 7
    assert ((g - hi).abs() <= s_hi / 2 * (1 + 1e-9)).all()  # nearest rounding, nothing clipped
    # the split keeps ~8 bits: error at most one low step (<= s_hi / 14)
    assert ((hi + lo - g).abs() <= s_hi / 14 * (1 + 1e-9)).all()
    assert (fake_quantize(g, "int4_restricted") - g).norm() > 4 * (hi + lo - g).norm()


@settings(max_examples=40, deadline=None)
@example(scores=[25.0, 1e-30], frac=1.0)  # the saturated rows' cstar·s rounded to just below 1
@given(st.lists(st.one_of(st.just(0.0), st.floats(1e-30, 1e3)), min_size=2, max_size=24),  # no subnormals
       st.floats(0.05, 1.0))
def test_leverage_probabilities_water_filling(scores, frac):
    s = torch.tensor(scores, dtype=torch.float64)
    nz = int((s > 0).sum())
    budget = max(frac * len(scores), 1e-3)
    p = leverage_probabilities(s, budget)
    assert ((p >= 0) & (p <= 1)).all() and (p[s == 0] == 0).all()
    if nz <= budget:
        assert torch.equal(p, (s > 0).double())
    else:
        assert abs(p.sum().item() - budget) < 1e-6 * max(1.0, budget)
        un = (p < 1) & (s > 0)
        if un.sum() > 1:  # unsaturated probabilities are proportional to the scores
            r = p[un] / s[un]
            assert torch.allclose(r, r[0].expand_as(r), rtol=1e-9)
        if (p == 1).any() and un.any():  # saturated rows have the larger scores
            assert s[p == 1].min() >= s[un].max() * (1 - 1e-9)


def test_leverage_probabilities_bad_input():
    with pytest.raises(ValueError, match="budget"):
        leverage_probabilities(torch.ones(4), 5)
    with pytest.raises(ValueError, match=">= 0"):
        leverage_probabilities(torch.tensor([1.0, -1.0]), 1)
    with pytest.raises(TypeError):
        bit_split(torch.ones(3, dtype=torch.int64))


def test_hadamard_quantizer_forward_error_lower_on_outliers():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 128, generator=g, dtype=torch.float64)
    x[:, [5, 77, 100]] *= 40.0  # outlier channels, as in transformer activations
    w = torch.randn(64, 128, generator=g, dtype=torch.float64)
    exact = x @ w.t()
    wh = hadakit.hadamard_transform(w, block_size=32)
    # the activation operand's share of the error: INT4 x only (W exact), with and without the Hadamard transform
    err_xh = _rel(hadamard_quantize(x, 32) @ wh.t(), exact)
    err_xn = _rel(hadamard_quantize(x, 32, rotate=False) @ w.t(), exact)
    assert err_xh < 0.6 * err_xn, (err_xh, err_xn)
    # the full HQ product (x and W INT4)
    err_h = _rel(hadamard_quantize(x, 32) @ hadamard_quantize(w, 32).t(), exact)
    err_n = _rel(hadamard_quantize(x, 32, rotate=False) @ hadamard_quantize(w, 32, rotate=False).t(), exact)
    assert err_h < 0.75 * err_n, (err_h, err_n)
    # control: without outliers the two are comparable (the gain comes from the outliers)
    x0 = torch.randn(256, 128, generator=g, dtype=torch.float64)
    e_h0 = _rel(hadamard_quantize(x0, 32) @ wh.t(), x0 @ w.t())
    e_n0 = _rel(hadamard_quantize(x0, 32, rotate=False) @ w.t(), x0 @ w.t())
    assert 0.7 < e_h0 / e_n0 < 1.4 and err_xn > 1.3 * e_n0


def test_layer_wiring_matches_the_estimators():
    torch.manual_seed(0)
    x = torch.randn(3, 10, 40, dtype=torch.float64, requires_grad=True)  # in=40: padded to 64 for block 32
    w = torch.randn(24, 40, dtype=torch.float64, requires_grad=True)
    b = torch.randn(24, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(3, 10, 24, dtype=torch.float64)
    recipe = get_training_recipe("int4_xi")
    y = int4_xi_linear(x, w, b, recipe, generator=torch.Generator().manual_seed(5))
    y.backward(dy)
    x2 = x.detach().reshape(-1, 40)
    xq, wq = hadamard_quantize(x2, 32), hadamard_quantize(w.detach(), 32)
    assert xq.shape == (30, 64)
    torch.testing.assert_close(y.detach(), (xq @ wq.t() + b.detach()).reshape(3, 10, 24))
    g = torch.Generator().manual_seed(5)  # same draw order as the backward: input gradient, then weight gradient
    d2 = dy.reshape(-1, 24)
    gx = hadakit.inverse_hadamard_transform(int4_input_gradient(d2, wq, 0.5, False, g), block_size=32)[:, :40]
    gw = hadakit.inverse_hadamard_transform(int4_weight_gradient(d2, xq, 0.5, True, g), block_size=32)[:, :40]
    torch.testing.assert_close(x.grad, gx.reshape(3, 10, 40))
    torch.testing.assert_close(w.grad, gw)
    torch.testing.assert_close(b.grad, d2.sum(0))
    # and the STE gradient it estimates is close to the float one (INT4 operands, not a different function)
    assert _rel(w.grad, d2.t() @ x2) < 0.5


def test_convert_and_train_with_int4_xi():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 8))
    report = convert(model, "int4-xi", verbose=False)
    assert [r[0] for r in report.swapped] == ["0", "2"]
    assert isinstance(model[0], QuantLinear) and isinstance(model[0].recipe, Int4XiRecipe)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, target = torch.randn(64, 32), torch.randn(64, 8)
    losses = []
    for _ in range(30):
        loss = (model(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0] and all(math.isfinite(v) for v in losses)


def test_bf16_layer():
    q = QuantLinear(64, 48, recipe="int4_xi", dtype=torch.bfloat16)
    x = torch.randn(40, 64, dtype=torch.bfloat16, requires_grad=True)
    y = q(x)
    y.float().square().sum().backward()
    assert y.dtype == x.grad.dtype == q.weight.grad.dtype == torch.bfloat16


def test_recipe_config_roundtrip_and_errors():
    r = get_training_recipe("int4_xi")
    assert r.name == "int4_xi" and "int4_naive" in hadakit.list_training_recipes()
    assert TrainingRecipe.from_dict(r.to_dict()) == r
    r2 = Int4XiRecipe(block_size=64, keep_fraction=1.0, lss_grad_input=True)
    assert TrainingRecipe.from_dict(r2.to_dict()) == r2 and r2.forward.rotation == 64
    assert get_training_recipe("int4_xi", backend="emulate").name == "int4_xi"
    with pytest.raises(ValueError, match="Hadamard"):
        Int4XiRecipe(block_size=7)
    with pytest.raises(ValueError, match="keep_fraction"):
        Int4XiRecipe(keep_fraction=0.0)
    with pytest.raises(ValueError, match="derived"):
        Int4XiRecipe(forward=get_training_recipe("mxfp4").forward)
    with pytest.raises(TypeError):
        Int4XiRecipe(lss_grad_weight=1)
    with pytest.raises(ValueError, match="in_features"):
        int4_xi_linear(torch.randn(4, 8), torch.randn(3, 9))
    with pytest.raises(ValueError, match="not an Int4XiRecipe"):
        int4_xi_linear(torch.randn(4, 8), torch.randn(3, 8), recipe="mxfp4")
