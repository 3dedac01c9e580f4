"""hadakit.training: recipes, QuantLinear, the quantized products, stochastic rounding, convert, errors."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hadakit
from hadakit.formats import compute_scales, fake_quantize, get_scheme, quantize_with_scales
from hadakit.training import (
    OperandConfig,
    ProductConfig,
    QuantLinear,
    TrainingRecipe,
    convert,
    fake_quantize_operand,
    get_training_recipe,
    list_training_recipes,
    lowp_matmul,
    quant_linear,
    quantized_product,
)
from hadakit.training.functional import _padded_length_cached, _real_kind

torch.set_num_threads(1)

BRIEF_RECIPES = ["bf16", "mxfp4", "mxfp4_no_rht_sr", "nvfp4", "int8_hadamard", "bitnet_b158", "bitnet_v2"]


def _pair(seed=0, shape=(3, 10, 96), out=80, bias=True):
    torch.manual_seed(seed)
    ref = nn.Linear(shape[-1], out, bias=bias)
    x = torch.randn(*shape) * torch.linspace(0.2, 3.0, shape[-1])  # uneven channels
    return ref, x


# ----------------------------------------------------------------------------------------------------------------
# Recipes
# ----------------------------------------------------------------------------------------------------------------


def test_named_recipes_exist_and_round_trip():
    names = list_training_recipes()
    for n in BRIEF_RECIPES + ["mxfp4_bwd", "fp8"]:
        assert n in names
    for n in names:
        r = get_training_recipe(n)
        assert r.name == n
        assert TrainingRecipe.from_dict(r.to_dict()) == r
        import json

        assert TrainingRecipe.from_dict(json.loads(json.dumps(r.to_dict()))) == r
        assert n in r.describe()


def test_recipe_definitions():
    assert get_training_recipe("bf16").plain
    mx = get_training_recipe("mxfp4")
    assert mx.forward.a.scheme.name == "mxfp4" and mx.forward.rotation is None
    for p in (mx.grad_input, mx.grad_weight):
        assert p.rotation == 64 and p.signs == "per_step"
        assert p.a.stochastic_rounding and p.b.stochastic_rounding and p.a.headroom == 0.75
    assert get_training_recipe("mxfp4_bwd").forward.plain
    abl = get_training_recipe("mxfp4_no_rht_sr")
    for p in abl.products.values():
        assert p.rotation is None and not p.a.stochastic_rounding and p.a.scheme.name == "mxfp4"
    nv = get_training_recipe("nvfp4")
    assert nv.forward.b.scale_2d and nv.grad_input.b.scale_2d and not nv.forward.a.scale_2d
    assert nv.grad_weight.rotation == 16 and nv.grad_weight.signs == "fixed"
    assert nv.grad_input.a.stochastic_rounding and nv.grad_weight.a.stochastic_rounding
    assert not nv.forward.a.stochastic_rounding and not nv.grad_weight.b.stochastic_rounding
    assert nv.forward.a.scheme.tensor_scale
    for p in get_training_recipe("int8_hadamard").products.values():
        assert p.rotation == "full" and p.a.scheme.name == "int8" and p.b.scheme.name == "int8"
    b1 = get_training_recipe("bitnet_b158")
    assert b1.forward.b.scheme.name == "ternary" and b1.forward.a.scheme.name == "int8"
    assert b1.grad_input.b.reuse_forward and b1.grad_weight.b.reuse_forward and b1.grad_input.a.scheme is None
    b2 = get_training_recipe("bitnet_v2")
    assert b2.forward.rotation == "full" and b2.forward.a.scheme.name == "int4"


def test_get_training_recipe_changes():
    r = get_training_recipe("int8_hadamard", backend="emulate")
    assert r.backend == "emulate" and r.name == "int8_hadamard"
    r2 = get_training_recipe("mxfp4", forward=ProductConfig())
    assert r2.name is None and r2.forward.plain
    assert get_training_recipe(r2) is r2
    assert get_training_recipe(r.to_dict()) == r


@pytest.mark.parametrize("bad, err, match", [
    (lambda: get_training_recipe("mxfp5"), ValueError, "unknown training recipe 'mxfp5'.*mxfp4"),
    (lambda: get_training_recipe(3), TypeError, "recipe must be"),
    (lambda: OperandConfig("mxfp5"), ValueError, "unknown scheme"),
    (lambda: OperandConfig(None, stochastic_rounding=True), ValueError, "need a scheme"),
    (lambda: OperandConfig("mxfp4", headroom=1.5), ValueError, "headroom"),
    (lambda: OperandConfig("int8", scale_2d=True), ValueError, "group scheme"),
    (lambda: OperandConfig("mxfp4", reuse_forward=True), ValueError, "takes no scheme"),
    (lambda: OperandConfig("mxfp4", stochastic_rounding=1), TypeError, "True or False"),
    (lambda: ProductConfig(rotation=50), ValueError, "nearest supported block sizes: 48, 52"),
    (lambda: ProductConfig(rotation="hadamrd"), ValueError, "'full' or a block size"),
    (lambda: ProductConfig(signs="fixed"), ValueError, "rotation is None"),
    (lambda: ProductConfig(rotation=32, signs="random"), ValueError, "signs must be one of"),
    (lambda: ProductConfig(a=3), TypeError, "ProductConfig.a"),
    (lambda: TrainingRecipe(backend="cuda"), ValueError, "backend must be one of"),
    (lambda: TrainingRecipe(forward=ProductConfig(OperandConfig("nvfp4", scale_2d=True))), ValueError,
     "scale_2d is for the weight"),
    (lambda: TrainingRecipe(forward=ProductConfig(b=OperandConfig(reuse_forward=True))), ValueError,
     "reuse_forward is for"),
    (lambda: TrainingRecipe.from_dict({"forwards": {}}), ValueError, "unknown TrainingRecipe fields"),
    (lambda: OperandConfig.from_dict({"scheme": "int8", "sr": True}), ValueError, "unknown OperandConfig fields"),
    (lambda: QuantLinear(8, 8, recipe="nope"), ValueError, "unknown training recipe"),
    (lambda: quant_linear(torch.randn(4, 7), torch.randn(5, 8), None, "mxfp4"), ValueError, "in_features = 8"),
])
def test_bad_recipes_and_args_raise_clear_errors(bad, err, match):
    with pytest.raises(err, match=match):
        bad()


# ----------------------------------------------------------------------------------------------------------------
# QuantLinear vs nn.Linear
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(40, 96), (3, 10, 96)])
@pytest.mark.parametrize("bias", [True, False])
def test_bf16_recipe_is_nn_linear(shape, bias):
    ref, x = _pair(shape=shape, bias=bias)
    q = QuantLinear.from_linear(copy.deepcopy(ref), "bf16")
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn(*shape[:-1], 80)
    y1, y2 = ref(x1), q(x2)
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()
    assert torch.equal(y1, y2)
    assert torch.equal(x1.grad, x2.grad)
    assert torch.equal(ref.weight.grad, q.weight.grad)
    if bias:
        assert torch.equal(ref.bias.grad, q.bias.grad)


def test_unquantized_function_path_matches_nn_linear():
    """The autograd Function itself, on a recipe with a plain product set (via reuse-free unrotated products)."""
    from hadakit.training.functional import _QuantLinearFunction

    ref, x = _pair(shape=(40, 96))
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    w = ref.weight.detach().clone().requires_grad_()
    b = ref.bias.detach().clone().requires_grad_()
    g = torch.randn(40, 80)
    (ref(x1) * g).sum().backward()
    y = _QuantLinearFunction.apply(x2, w, b, get_training_recipe("bf16"))
    (y * g).sum().backward()
    assert torch.equal(x1.grad, x2.grad) and torch.equal(ref.weight.grad, w.grad) and torch.equal(ref.bias.grad, b.grad)


@pytest.mark.parametrize("rotation, signs", [("full", "none"), ("full", "per_step"), (16, "fixed"), (32, "per_step")])
def test_rotation_without_formats_leaves_products_unchanged(rotation, signs):
    p = ProductConfig(rotation=rotation, signs=signs, seed=3)
    recipe = TrainingRecipe(p, p, p)
    ref, x = _pair(shape=(5, 9, 72))  # 45 tokens, 72 features: every inner dim needs padding for blocks 16 / 32
    q = QuantLinear(72, 80, recipe=recipe)
    q.load_state_dict(ref.state_dict())
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn(5, 9, 80)
    y1, y2 = ref(x1), q(x2)
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()
    torch.testing.assert_close(y2, y1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q.bias.grad, ref.bias.grad)


@pytest.mark.parametrize("name", [n for n in list_training_recipes() if n != "bf16"])
def test_every_recipe_trains_a_layer(name):
    ref, x = _pair(shape=(2, 24, 96))
    q = QuantLinear(96, 80, recipe=name)
    q.load_state_dict(ref.state_dict())
    x = x.requires_grad_()
    y = q(x)
    assert y.shape == (2, 24, 80) and y.dtype == torch.float32
    y.square().mean().backward()
    yr = ref(x.detach())
    rel = ((y - yr).norm() / yr.norm()).item()
    assert 0 <= rel < 0.6  # quantized, but the same function
    assert torch.isfinite(x.grad).all() and torch.isfinite(q.weight.grad).all()
    assert q.weight.grad.shape == q.weight.shape and q.bias.grad.shape == q.bias.shape


def test_bf16_params_and_inputs():
    torch.manual_seed(0)
    q = QuantLinear(64, 48, recipe="nvfp4", dtype=torch.bfloat16)
    x = torch.randn(40, 64, dtype=torch.bfloat16, requires_grad=True)
    y = q(x)
    y.float().square().sum().backward()
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16
    assert q.weight.grad.dtype == torch.bfloat16 and q.bias.grad.dtype == torch.bfloat16


def test_state_dict_compatible_with_nn_linear():
    ref = nn.Linear(32, 16)
    q = QuantLinear(32, 16, recipe="mxfp4")
    assert list(q.state_dict()) == list(ref.state_dict()) == ["weight", "bias"]
    q.load_state_dict(ref.state_dict())
    assert torch.equal(q.weight, ref.weight)
    ref2 = nn.Linear(32, 16)
    ref2.load_state_dict(q.state_dict())
    assert torch.equal(ref2.bias, q.bias)
    assert isinstance(q, nn.Linear)
    assert list(QuantLinear(32, 16, bias=False).state_dict()) == ["weight"]
    shared = QuantLinear.from_linear(ref, "nvfp4")
    assert shared.weight is ref.weight and shared.bias is ref.bias
    assert "recipe=nvfp4" in repr(shared)
    clone = copy.deepcopy(shared)
    assert clone.recipe == shared.recipe and clone.weight is not ref.weight


# ----------------------------------------------------------------------------------------------------------------
# The products
# ----------------------------------------------------------------------------------------------------------------


def _dequantized_operand(t, op):
    """The dequantized operand built from hadakit.formats directly (independent of the training fast path)."""
    scheme = op.effective_scheme
    if scheme is None:
        return t
    if op.scale_2d:
        tile = scheme.group_size
        r, c = t.shape
        rp, cp = -(-r // tile) * tile, -(-c // tile) * tile
        tp = F.pad(t, (0, cp - c, 0, rp - r))
        tiles = tp.reshape(rp // tile, tile, cp // tile, tile).transpose(1, 2).reshape(rp // tile, cp // tile, -1)
        q = fake_quantize(tiles, scheme.replace(group_size=tile * tile))
        return q.reshape(rp // tile, cp // tile, tile, tile).transpose(1, 2).reshape(rp, cp)[:r, :c]
    if op.headroom != 1.0:
        return quantize_with_scales(t * op.headroom, scheme, compute_scales(t, scheme))[1].reshape(t.shape)
    return fake_quantize(t, scheme)


CASES = [(n, p) for n in list_training_recipes() for p in ("forward", "grad_input", "grad_weight")
         if not getattr(get_training_recipe(n), p).plain and not getattr(get_training_recipe(n), p).b.reuse_forward]


@pytest.mark.parametrize("name, product", CASES)
def test_emulated_product_is_the_exact_product_of_the_dequantized_operands(name, product):
    prod = getattr(get_training_recipe(name), product)
    torch.manual_seed(0)
    a = torch.randn(24, 72) * torch.logspace(-1, 1, 72)
    b = torch.randn(40, 72)
    torch.manual_seed(7)
    out, _ = quantized_product(a, b, prod, backend="emulate")
    # Rebuild the operands the product saw: pad, rotate with the same signs, quantize with hadakit.formats.
    torch.manual_seed(7)
    n = _padded_length_cached(72, prod.multiple, prod.rotation == "full")
    A, B = F.pad(a, (0, n - 72)), F.pad(b, (0, n - 72))
    if prod.rotation is not None:
        signs = None
        if prod.signs == "fixed":
            signs = hadakit.random_signs(n, prod.seed)
        elif prod.signs == "per_step":
            signs = (1 - 2 * torch.randint(0, 2, (n,))).float()
        block = n if prod.rotation == "full" else prod.rotation
        A = hadakit.hadamard_transform(A, block_size=block, signs=signs)
        B = hadakit.hadamard_transform(B, block_size=block, signs=signs)
    Aq, Bq = _dequantized_operand(A, prod.a), _dequantized_operand(B, prod.b)
    h = prod.a.headroom * prod.b.headroom
    exact = (Aq.double() @ Bq.double().T) / h
    # float32 accumulation error bound: n · 2^-24 · Σ|a_i b_i| (+ the division by the headroom)
    bound = (n + 2) * 2.0 ** -24 * (Aq.double().abs() @ Bq.double().abs().T) / h + 1e-30
    assert ((out.double() - exact).abs() <= bound).all()
    # and the operands really are quantized: the product differs from the unquantized one
    assert not torch.allclose(out, a @ b.T, rtol=1e-4, atol=1e-4)


def test_padding_to_the_group_size_is_exact():
    prod = ProductConfig("mxfp4", "mxfp4")
    torch.manual_seed(0)
    a, b = torch.randn(8, 50), torch.randn(6, 50)
    out, _ = quantized_product(a, b, prod)
    ref = fake_quantize(F.pad(a, (0, 14)), "mxfp4") @ fake_quantize(F.pad(b, (0, 14)), "mxfp4").T
    assert torch.equal(out, ref)
    assert _padded_length_cached(50, 32, False) == 64
    n = _padded_length_cached(70, 1, True)  # the next size >= 70 with a Hadamard matrix
    assert n >= 70 and hadakit.supported(n) and not any(hadakit.supported(m) for m in range(70, n))
    assert _padded_length_cached(70, 16, True) % 16 == 0


def test_scale_2d_quantizes_w_and_wt_identically():
    torch.manual_seed(0)
    w = torch.randn(72, 40)  # neither dim a multiple of 16: tiles are zero-padded
    s = get_scheme("nvfp4")
    q = fake_quantize_operand(w, s, tile=16)
    qt = fake_quantize_operand(w.t().contiguous(), s, tile=16)
    assert torch.equal(q, qt.t())
    assert not torch.equal(q[:, :32], fake_quantize_operand(w[:, :32].contiguous(), s))  # 1-D groups differ
    assert ((q - w).norm() / w.norm()) < 0.2


@pytest.mark.parametrize("scheme", ["mxfp4", "nvfp4", "fp8_e4m3", "fp8_e5m2", "mxfp8", "mxfp6", "fp4_g16_ue5m3",
                                    "int8", "int4", "ternary"])
def test_fast_operand_quantizer_is_bit_identical_to_formats(scheme):
    torch.manual_seed(0)
    x = torch.randn(48, 256) * torch.logspace(-3, 3, 256)
    x[0, :32] = 0
    x[1, :32] = 1e-30
    x[2, 7] = 1e5
    s = get_scheme(scheme)
    assert torch.equal(fake_quantize_operand(x, s), fake_quantize(x, s))
    sr = s.replace(rounding="stochastic")
    torch.manual_seed(3)
    a = fake_quantize_operand(x, sr)
    torch.manual_seed(3)
    assert torch.equal(a, fake_quantize(x, sr))
    hq = quantize_with_scales(0.75 * x, s, compute_scales(x, s))[1].reshape(x.shape)
    assert torch.equal(fake_quantize_operand(x, s, headroom=0.75), hq)


def test_nonfinite_values_poison_their_group_instead_of_raising():
    x = torch.randn(4, 64)
    x[1, 3] = float("nan")
    q = fake_quantize_operand(x, get_scheme("mxfp4"), headroom=0.75)
    assert torch.isnan(q[1, :32]).all() and torch.isfinite(q[1, 32:]).all() and torch.isfinite(q[0]).all()


def test_headroom_prevents_clipping():
    """With the OCP floor rule MXFP4 clips block maxima above 6·s; 3/4 headroom never clips (SR stays unbiased)."""
    x = torch.full((1, 32), 0.1)
    x[0, 0] = 7.9  # floor scale 2^(2-2) = 1: 7.9 -> 6 under plain MXFP4
    s = get_scheme("mxfp4")
    assert fake_quantize(x, s)[0, 0] == 6.0
    q = fake_quantize_operand(x, s, headroom=0.75) / 0.75
    assert abs(q[0, 0].item() - 7.9) < 0.75  # 0.75·7.9 = 5.925 -> 6, i.e. 8 after the headroom is removed


# ----------------------------------------------------------------------------------------------------------------
# Stochastic rounding: unbiased
# ----------------------------------------------------------------------------------------------------------------


def _zmax(samples, exact):
    n = samples.shape[0]
    mean = samples.double().mean(0)
    sem = samples.double().std(0) / math.sqrt(n)
    return ((mean - exact).abs() / (sem + 1e-12)).max().item(), sem


def test_stochastic_rounding_products_are_unbiased():
    torch.manual_seed(0)
    a = torch.randn(8, 64) * torch.logspace(-1, 1, 64)
    b = torch.randn(12, 64)
    exact = a.double() @ b.double().T
    sr = OperandConfig("mxfp4", stochastic_rounding=True, headroom=0.75)
    prod = ProductConfig(sr, sr, rotation=32, signs="per_step")
    torch.manual_seed(1)
    n = 400
    outs = torch.stack([quantized_product(a, b, prod)[0] for _ in range(n)])
    z, sem = _zmax(outs, exact)
    assert z < 6.0, f"SR product biased: max z = {z:.2f}"
    # Power check: nearest rounding (deterministic, biased) sits far outside the same bound.
    near = quantized_product(a, b, ProductConfig("mxfp4", "mxfp4"))[0].double()
    assert ((near - exact).abs() / (sem + 1e-12)).max() > 10


def test_layer_gradients_are_unbiased_with_sr_recipe():
    """mxfp4_bwd: both backward products quantize both operands with SR (independent noise): E[grad] = exact."""
    torch.manual_seed(0)
    ref = nn.Linear(64, 32)
    x = torch.randn(48, 64)
    g = torch.randn(48, 32)
    q = QuantLinear.from_linear(copy.deepcopy(ref), "mxfp4_bwd")
    xr = x.clone().requires_grad_()
    (ref(xr) * g).sum().backward()
    dxs, dws = [], []
    torch.manual_seed(1)
    for _ in range(250):
        xq = x.clone().requires_grad_()
        q.weight.grad = None
        (q(xq) * g).sum().backward()
        dxs.append(xq.grad)
        dws.append(q.weight.grad)
    zx, _ = _zmax(torch.stack(dxs), xr.grad.double())
    zw, _ = _zmax(torch.stack(dws), ref.weight.grad.double())
    assert zx < 6.0 and zw < 6.0, (zx, zw)


# ----------------------------------------------------------------------------------------------------------------
# Real low-precision GEMMs vs emulation
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sa, sb, kind", [("int8", "int8", "int8"), ("int8_t", "int8_t", "int8"),
                                          ("fp8_e4m3", "fp8_e4m3", "fp8"), ("fp8_e5m2", "fp8_e4m3", "fp8")])
def test_real_gemm_agrees_with_emulation_on_the_quantized_operands(sa, sb, kind):
    """torch._int_mm / torch._scaled_mm on the stored codes = the product of the dequantized operands (CPU builds
    of torch implement both ops, so this runs without a GPU)."""
    def sch(n):
        return get_scheme("int8", granularity="per_tensor") if n == "int8_t" else get_scheme(n)
    torch.manual_seed(0)
    a, b = torch.randn(32, 64) * 3, torch.randn(48, 64)
    try:
        real = lowp_matmul(a, b, sch(sa), sch(sb), kind)
    except (RuntimeError, NotImplementedError) as exc:  # pragma: no cover - torch build without the CPU kernel
        pytest.skip(f"{kind} GEMM not available on CPU in this torch build: {exc}")
    emu = fake_quantize(a, sch(sa)).double() @ fake_quantize(b, sch(sb)).double().T
    torch.testing.assert_close(real.double(), emu, rtol=1e-5, atol=1e-5 * emu.abs().max().item())


def test_backend_selection():
    cuda = torch.device("cuda")
    fp8 = get_training_recipe("fp8").forward
    i8 = get_training_recipe("int8_hadamard").forward
    assert _real_kind(fp8, 64, 64, 64, cuda, "auto") == "fp8"
    assert _real_kind(fp8, 64, 64, 64, cuda, "emulate") is None
    assert _real_kind(fp8, 64, 64, 64, torch.device("cpu"), "auto") is None  # CPU always emulates
    assert _real_kind(fp8, 64, 64, 72, cuda, "auto") is None  # K not a multiple of 16
    assert _real_kind(get_training_recipe("fp8").grad_input, 64, 64, 64, cuda, "auto") == "fp8"  # e5m2 x e4m3
    assert _real_kind(i8, 64, 64, 64, cuda, "auto") == "int8"
    assert _real_kind(i8, 8, 64, 64, cuda, "auto") is None  # _int_mm needs more than 16 rows
    assert _real_kind(get_training_recipe("mxfp4").forward, 64, 64, 64, cuda, "auto") is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["fp8", "int8_hadamard"])
def test_real_cuda_path_agrees_with_emulation(name):
    torch.manual_seed(0)
    ref = nn.Linear(128, 64).cuda()
    x = torch.randn(4, 32, 128, device="cuda")
    g = torch.randn(4, 32, 64, device="cuda")
    res = []
    for backend in ("auto", "emulate"):
        q = QuantLinear.from_linear(copy.deepcopy(ref), get_training_recipe(name, backend=backend))
        xx = x.clone().requires_grad_()
        y = q(xx)
        (y * g).sum().backward()
        res.append((y, xx.grad, q.weight.grad))
    for r, e in zip(*res):
        torch.testing.assert_close(r, e, rtol=1e-4, atol=1e-4 * e.abs().max().item())


# ----------------------------------------------------------------------------------------------------------------
# convert
# ----------------------------------------------------------------------------------------------------------------


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.lm_head = nn.Linear(32, 10, bias=False)
        self.lm_head.weight = self.emb.weight  # tied

    def forward(self, idx):
        h = self.emb(idx)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.lm_head(h + self.mlp(h))


def test_convert_swaps_and_reports(capsys):
    torch.manual_seed(0)
    model = _Tiny()
    idx = torch.randint(0, 10, (2, 16))
    before = model(idx)
    report = convert(model, "nvfp4", skip=["lm_head"])
    printed = capsys.readouterr().out
    assert [r[0] for r in report.swapped] == ["mlp.0", "mlp.2"]
    assert report.swapped[0] == ("mlp.0", 32, 64, True)
    skipped = dict(report.skipped)
    assert "subclass" in skipped["attn.out_proj"] and "ignore pattern 'lm_head'" in skipped["lm_head"]
    assert "swapped  mlp.0" in printed and "skipped  lm_head" in printed
    assert isinstance(model.mlp[0], QuantLinear) and type(model.lm_head) is nn.Linear
    assert model.lm_head.weight is model.emb.weight
    after = model(idx)
    assert after.shape == before.shape and not torch.equal(after, before)
    after.sum().backward()
    assert model.mlp[0].weight.grad is not None
    again = convert(model, "mxfp4", verbose=False)
    assert [r[0] for r in again.swapped] == ["lm_head"] and "already QuantLinear" in dict(again.skipped)["mlp.0"]
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.weight is model.emb.weight  # still tied
    d = report.to_dict()
    assert d["recipe"] == "nvfp4" and d["swapped"][1]["in_features"] == 64


def test_convert_skip_globs_and_errors(capsys):
    model = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)))
    rep = convert(model, "int8_hadamard", skip=["1.*", "nomatch"], verbose=True)
    assert [r[0] for r in rep.swapped] == ["0"] and len(rep.skipped) == 2
    assert "matched no nn.Linear" in capsys.readouterr().out
    with pytest.raises(TypeError, match="from_linear"):
        convert(nn.Linear(4, 4), "mxfp4")
    with pytest.raises(TypeError, match="ignore must be"):
        convert(model, "mxfp4", skip=[3])
    with pytest.raises(TypeError, match="not both"):
        convert(model, "mxfp4", ["0"], skip=["1.*"])
    with pytest.raises(ValueError, match="unknown training recipe"):
        convert(model, "fp3")


def test_convert_targets_share_the_recipe_rule():
    """convert selects with the rule of quantization recipes and inspect (hadakit.selection)."""
    from hadakit.analysis import find_linear_layers

    def fresh():
        return nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)))

    for targets, ignore, want in [(["re:1\\."], [], ["1.0", "1.1"]), (["Linear"], ["1.1"], ["0", "1.0"]),
                                  ([], ["re:1"], ["0"]), (["nothing"], [], [])]:
        rep = convert(fresh(), "int8_hadamard", ignore, targets=targets, verbose=False)
        assert [r[0] for r in rep.swapped] == want
        assert sorted(find_linear_layers(fresh(), targets=targets, ignore=ignore)) == want


@pytest.mark.parametrize("name", ["hadakit.training", "hadakit.training.layers"])
def test_docstring_examples(name):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
