"""Hardening of the transforms and of QuantizedTensor loading: torch.compile with changing / dynamic shapes and
per-call signs, empty tensors with bad sizes, gradients of the signs, corrupt checkpoint metadata.

Compile tests use backend="aot_eager" (Dynamo's full-graph capture, AOTAutograd and the ops' fake kernels, without
inductor's C++ build, ~20 s per graph on a 2-core CPU); graph breaks are Dynamo's, the same for every backend. One
test marked slow runs the default backend (inductor), which is what the README's promise is about.
"""

import json
import math

import pytest
import torch

import hadakit
from hadakit.formats import QuantizedTensor, load_quantized, quantize, save_quantized

pytestmark = pytest.mark.usefixtures("single_thread")


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --- 9. torch.compile(fullgraph=True) with new shapes, dynamic=True and per-call signs -------------------------------

def _transforms(x, signs):
    return (hadakit.hadamard_transform(x) + hadakit.hadamard_transform(x, block_size=32, signs=signs)
            + hadakit.inverse_hadamard_transform(x, signs=signs))


@pytest.mark.parametrize("dynamic", [None, True])
def test_compiled_transform_changing_shapes_matches_eager(dynamic):
    """New batch shapes (and a new rank), and dynamic=True, compile without graph breaks and equal eager."""
    torch._dynamo.reset()
    signs = hadakit.random_signs(640, 1)
    compiled = torch.compile(_transforms, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    for shape in [(4, 640), (6, 640), (2, 3, 640), (1, 640)]:
        x = torch.randn(*shape, generator=_gen(len(shape)))
        torch.testing.assert_close(compiled(x, signs), _transforms(x, signs), rtol=1e-5, atol=1e-5)
    # A second transform size is a second plan (its own graph), also without breaks.
    s96 = hadakit.random_signs(96, 2)
    x = torch.randn(5, 96, generator=_gen(3))
    torch.testing.assert_close(compiled(x, s96), _transforms(x, s96), rtol=1e-5, atol=1e-5)


def test_compiled_dynamic_keeps_leading_dims_dynamic():
    """The transformed size is specialized (it picks the plan), the leading dims stay symbolic: new batch sizes of
    the same size reuse one graph."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lambda x: hadakit.hadamard_transform(x), fullgraph=True, backend=counter, dynamic=True)
    for rows in (3, 5, 9):
        x = torch.randn(rows, 640, generator=_gen(rows))
        torch.testing.assert_close(compiled(x), hadakit.hadamard_transform(x), rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1
    # The documented limit: a new transformed size is a new graph (its plan is a compile-time constant).
    x = torch.randn(4, 96, generator=_gen(0))
    torch.testing.assert_close(compiled(x), hadakit.hadamard_transform(x), rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 2


def test_compiled_transform_gradient_with_dynamic_shapes():
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: hadakit.inverse_hadamard_transform(x), fullgraph=True, backend="aot_eager",
                             dynamic=True)
    for rows in (3, 7):
        x = torch.randn(rows, 640, generator=_gen(rows), requires_grad=True)
        w = torch.randn(rows, 640, generator=_gen(rows + 1))
        (g_c,) = torch.autograd.grad((compiled(x) * w).sum(), x)
        (g_e,) = torch.autograd.grad((hadakit.inverse_hadamard_transform(x) * w).sum(), x)
        torch.testing.assert_close(g_c, g_e, rtol=1e-5, atol=1e-5)


def test_compiled_per_call_rotation_draws_fresh_orthogonal_signs():
    """HadamardRotation(signs="per_call") under fullgraph=True: a new draw per training call, the same draws as an
    eager twin (reproducible from seed and step), norm preserved, and inverse() undoes the last call."""
    torch._dynamo.reset()
    rot = hadakit.HadamardRotation(640, signs="per_call", seed=5, block_size=128)
    twin = hadakit.HadamardRotation(640, signs="per_call", seed=5, block_size=128)
    compiled = torch.compile(rot, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 640, generator=_gen(7))
    outs = []
    for step in (1, 2, 3):
        y = compiled(x)
        assert int(rot.step) == step
        torch.testing.assert_close(y, twin(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rot.inverse(y), x, rtol=1e-5, atol=1e-5)
        outs.append(y)
    # Negative control: the draws really differ from call to call.
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[1], outs[2])
    assert not torch.equal(rot.signs, hadakit.random_signs(640, 5))
    # Eval mode: no new draw.
    rot.eval()
    y_eval = compiled(x)
    assert int(rot.step) == 3
    torch.testing.assert_close(y_eval, outs[-1], rtol=1e-5, atol=1e-5)


def test_compiled_per_call_head_mix_rotation_runs_fullgraph():
    torch._dynamo.reset()
    mix = hadakit.transforms.HeadMixRotation(4, 32, signs="per_call", seed=1)
    compiled = torch.compile(mix, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 128, generator=_gen(1))
    a, b = compiled(x), compiled(x)
    assert not torch.allclose(a, b)
    torch.testing.assert_close(b.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_default_backend_fullgraph_dynamic_and_per_call():
    """The README's promise with the default backend (inductor): dynamic shapes and per-call signs, no breaks."""
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: hadakit.hadamard_transform(x, block_size=32), fullgraph=True, dynamic=True)
    for shape in [(4, 640), (2, 3, 640)]:
        x = torch.randn(*shape, generator=_gen(0))
        torch.testing.assert_close(compiled(x), hadakit.hadamard_transform(x, block_size=32), rtol=1e-5, atol=1e-5)
    rot = hadakit.HadamardRotation(64, signs="per_call", seed=2)
    twin = hadakit.HadamardRotation(64, signs="per_call", seed=2)
    crot = torch.compile(rot, fullgraph=True)
    x = torch.randn(2, 64, generator=_gen(1))
    y1, y2 = crot(x), crot(x)
    torch.testing.assert_close(y1, twin(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y2, twin(x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y1, y2)


# --- 14a. empty tensors get the same size checks ---------------------------------------------------------------------

def _message(fn, *args, **kwargs):
    with pytest.raises(ValueError) as info:
        fn(*args, **kwargs)
    return str(info.value)


@pytest.mark.parametrize("fn", [hadakit.hadamard_transform, hadakit.inverse_hadamard_transform])
def test_empty_tensor_with_unsupported_size_raises_like_nonempty(fn):
    expected = _message(fn, torch.zeros(1, 16256))
    assert _message(fn, torch.empty(0, 16256)) == expected
    assert "16256" in expected and "fallback" in expected
    # Negative controls: supported sizes and the explicit fallback still take empty tensors.
    assert fn(torch.empty(0, 16256), fallback="dct").shape == (0, 16256)
    assert fn(torch.empty(0, 640)).shape == (0, 640)


def test_empty_tensor_with_block_size_not_dividing_raises_like_nonempty():
    expected = _message(hadakit.hadamard_transform, torch.zeros(2, 96), block_size=40)
    assert _message(hadakit.hadamard_transform, torch.empty(0, 96), block_size=40) == expected
    assert "does not divide" in expected
    assert _message(hadakit.block_hadamard_transform, torch.empty(3, 0, 96), 40) == expected
    # Bad signs on an empty tensor are refused too.
    with pytest.raises(ValueError, match="length 96"):
        hadakit.hadamard_transform(torch.empty(0, 96), signs=torch.ones(95))
    assert hadakit.hadamard_transform(torch.empty(0, 96), block_size=32).shape == (0, 96)


# --- 14b. gradients of the signs ------------------------------------------------------------------------------------

def _dense_block(n, block):
    h = hadakit.hadamard_matrix(block, dtype=torch.float64) / math.sqrt(block)
    return torch.block_diag(*([h] * (n // block)))


@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("block", [24, 12])
def test_signs_gradient_matches_float64_dense_reference(inverse, block):
    n = 24
    x = torch.randn(2, 3, n, dtype=torch.float64, generator=_gen(0), requires_grad=True)
    w = torch.randn(2, 3, n, dtype=torch.float64, generator=_gen(1))
    signs = hadakit.random_signs(n, 3, dtype=torch.float64).requires_grad_()
    fn = hadakit.inverse_hadamard_transform if inverse else hadakit.hadamard_transform
    y = fn(x, block_size=block, signs=signs)
    gx, gs = torch.autograd.grad((y * w).sum(), (x, signs))

    m = _dense_block(n, block)
    xr, sr = x.detach().clone().requires_grad_(), signs.detach().clone().requires_grad_()
    yr = (xr @ m) * sr if inverse else (xr * sr) @ m.t()
    gx_ref, gs_ref = torch.autograd.grad((yr * w).sum(), (xr, sr))
    torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gs, gs_ref, rtol=1e-12, atol=1e-12)
    assert gs.abs().sum() > 0  # negative control: a real, non-zero gradient


def test_signs_gradient_along_other_dim_and_float32_signs():
    """float32 signs on a bfloat16 input along dim 0: the gradient arrives, in the signs' dtype."""
    x = torch.randn(40, 3, generator=_gen(2)).to(torch.bfloat16)
    signs = hadakit.random_signs(40, 4).requires_grad_()
    hadakit.hadamard_transform(x, dim=0, signs=signs).float().pow(2).sum().backward()
    assert signs.grad is not None and signs.grad.dtype == torch.float32 and signs.grad.shape == (40,)
    m = hadakit.hadamard_matrix(40, dtype=torch.float64) / math.sqrt(40)
    s = signs.detach().double().requires_grad_()
    ((m @ (x.double() * s[:, None])) ** 2).sum().backward()
    torch.testing.assert_close(signs.grad.double(), s.grad, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("transpose", [False, True])
def test_hadamard_op_gradcheck_signs_and_input(transpose):
    """The ``hadakit::hadamard`` op's backward against finite differences (float64; signs off ±1 are fine for the
    op itself, the ±1 check is in hadamard_transform)."""
    x = torch.randn(3, 40, dtype=torch.float64, generator=_gen(5), requires_grad=True)
    signs = hadakit.random_signs(40, 6, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, s: torch.ops.hadakit.hadamard(a, s, 20, "hadamard", 20, 0, 1 / math.sqrt(20), transpose),
        (x, signs))


def test_signs_without_grad_still_give_none_and_compile_carries_signs_grad():
    x = torch.randn(3, 64, generator=_gen(0), requires_grad=True)
    signs = hadakit.random_signs(64, 1)
    hadakit.hadamard_transform(x, signs=signs).sum().backward()
    assert signs.grad is None and x.grad is not None
    # Compiled: the same signs gradient as eager.
    torch._dynamo.reset()
    s_c = hadakit.random_signs(64, 1).requires_grad_()
    s_e = hadakit.random_signs(64, 1).requires_grad_()
    fn = torch.compile(lambda a, s: hadakit.hadamard_transform(a, signs=s, block_size=16), fullgraph=True,
                       backend="aot_eager")
    w = torch.randn(3, 64, generator=_gen(9))
    (fn(x, s_c) * w).sum().backward()
    (hadakit.hadamard_transform(x, signs=s_e, block_size=16) * w).sum().backward()
    assert s_c.grad is not None and s_e.grad is not None
    torch.testing.assert_close(s_c.grad, s_e.grad, rtol=1e-5, atol=1e-5)


# --- 14c. corrupt qmeta in a QuantizedTensor state dict ---------------------------------------------------------------

def _qt(dtype=torch.float32):
    return quantize(torch.randn(4, 64, generator=_gen(0)).to(dtype), "int4_g32")


def _with_meta(sd, key, raw: bytes):
    sd = dict(sd)
    sd[key] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    return sd


@pytest.mark.parametrize("raw", [
    b"\xff\xfe\x00garbage",            # not UTF-8
    b"{not json",                      # UTF-8, not JSON
    json.dumps([1, 2, 3]).encode(),    # JSON, not an object
    json.dumps("text").encode(),
])
def test_corrupt_qmeta_is_a_named_value_error(raw):
    sd = _with_meta(_qt().state_dict("layer.weight."), "layer.weight.qmeta", raw)
    with pytest.raises(ValueError, match=r"'layer\.weight\.qmeta'.*corrupt"):
        QuantizedTensor.from_state_dict(sd, "layer.weight.")


@pytest.mark.parametrize("dtype_name", ["Tensor", "nn", "int8", "float8_e4m3fn", "no_such_dtype"])
def test_qmeta_dtype_outside_the_allowed_set_is_refused(dtype_name):
    sd = _qt().state_dict("w.")
    meta = json.loads(bytes(sd["w.qmeta"].numpy().tobytes()).decode())
    meta["dtype"] = dtype_name
    sd = _with_meta(sd, "w.qmeta", json.dumps(meta).encode())
    with pytest.raises(ValueError, match=r"'w\.qmeta'.*dtype.*" + dtype_name):
        QuantizedTensor.from_state_dict(sd, "w.")


def test_qmeta_missing_field_is_a_named_value_error():
    sd = _qt().state_dict()
    meta = json.loads(bytes(sd["qmeta"].numpy().tobytes()).decode())
    del meta["shape"]
    with pytest.raises(ValueError, match=r"'qmeta'.*corrupt.*shape"):
        QuantizedTensor.from_state_dict(_with_meta(sd, "qmeta", json.dumps(meta).encode()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_qmeta_allowed_dtypes_round_trip(dtype, tmp_path):
    """Negative control: every dtype quantize() writes loads back, from a state dict and from a file."""
    qt = _qt(dtype)
    back = QuantizedTensor.from_state_dict(qt.state_dict("p."), "p.")
    assert back.dtype == dtype and torch.equal(back.payload, qt.payload)
    save_quantized(tmp_path / "q.safetensors", {"p": qt})
    assert load_quantized(tmp_path / "q.safetensors")["p"].dtype == dtype


def test_load_quantized_file_with_corrupt_qmeta_names_the_key(tmp_path):
    from safetensors.torch import save_file

    sd = _with_meta(_qt().state_dict("enc.w."), "enc.w.qmeta", b"[]")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=r"'enc\.w\.qmeta'.*corrupt"):
        load_quantized(tmp_path / "bad.safetensors")
