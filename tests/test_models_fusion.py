"""Offline fusion of o_proj's per-head rotation into v_proj (``fusevo``): exact, checked, saved, refused when wrong."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hadakit.io.loading import load_model
from hadakit.io.texts import make_windows, read_text
from hadakit.io.checkpoint import load_quantized_model, save_quantized_model
from hadakit.quantization.fusion import find_value_output_pairs, fuse_value_rotations
from hadakit.quantization.pipeline import quantize_model
from hadakit.quantization.recipes import get_recipe
from hadakit.transforms.rotations import HeadMixRotation


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_head_mix_rotation_is_orthogonal_and_kronecker():
    mix = HeadMixRotation(4, 8, signs="fixed", seed=3)
    m = mix.matrix()
    torch.testing.assert_close(m @ m.T, torch.eye(32, dtype=m.dtype), atol=1e-12, rtol=0)
    # channel c of head h mixes only with channel c of the other heads
    assert torch.count_nonzero(m.reshape(4, 8, 4, 8).abs().sum((0, 2)) * (1 - torch.eye(8))) == 0
    x = torch.randn(5, 32, dtype=torch.float64)
    torch.testing.assert_close(mix(x), x @ m.T)
    torch.testing.assert_close(mix.inverse(mix(x)), x)


@pytest.mark.model
def test_fusion_is_exact_on_an_encoder_and_checkpoints_reload(minilm, tmp_path):
    model, tok, enc = minilm
    pairs = find_value_output_pairs(model)
    assert len(pairs) == 6 and pairs[0].v_name.endswith("self.value") and pairs[0].heads == 12
    m = copy.deepcopy(model)
    with torch.no_grad():
        ref = model(**enc).last_hidden_state
    res = fuse_value_rotations(m, seed=1)
    assert res.refused is None and res.probe_error < 1e-5
    v0, v1 = model.get_submodule(pairs[0].v_name), m.get_submodule(pairs[0].v_name)
    assert not torch.allclose(v0.weight, v1.weight) and not torch.allclose(v0.bias, v1.bias)
    with torch.no_grad():
        assert _rel(m(**enc).last_hidden_state, ref) < 1e-5
    # quantized with the fused recipe: o_proj keeps only the mix across heads online; the checkpoint reloads it
    q = copy.deepcopy(model)
    recipe = get_recipe("w4a4:random:rtn:fusevo")
    report = quantize_model(q, recipe)
    assert report.fusion["pairs"] == 6 and "fused" in report.summary()
    dense = q.get_submodule(pairs[0].o_name)
    assert isinstance(dense.rotation, HeadMixRotation)
    with torch.no_grad():
        out = q(**enc).last_hidden_state
    save_quantized_model(q, tok, recipe, tmp_path / "ckpt")
    back, _ = load_quantized_model(tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(back(**enc).last_hidden_state, out)
    assert isinstance(back.get_submodule(pairs[0].o_name).rotation, HeadMixRotation)


@pytest.mark.model
def test_fusion_is_exact_on_gemma_with_grouped_query_attention():
    # Gemma 3: 4 query heads share one KV head, so one head_dim rotation serves all four; with the rotations alone
    # (nothing quantized) the logits must not move.
    model, tok = load_model()
    ids = make_windows(tok, read_text("macbeth"), window=40, n_windows=1)
    with torch.no_grad():
        ref = model(ids).logits
    m = copy.deepcopy(model)
    report = quantize_model(m, get_recipe("fp", rotation=get_recipe("w4a4:random").rotation, fuse_values=True))
    assert report.fusion["pairs"] == 18 and report.fusion["refused"] is None
    o = m.get_submodule("model.layers.0.self_attn.o_proj")
    assert isinstance(o.rotation, HeadMixRotation) and (o.rotation.heads, o.rotation.head_dim) == (4, 256)
    with torch.no_grad():
        assert _rel(m(ids).logits, ref) < 1e-4


class _ScaledValueAttention(nn.Module):
    """A toy attention whose values pass through a weighted norm: rotating them per head is *not* exact."""

    def __init__(self, d=16, heads=2, head_dim=8):
        super().__init__()
        self.head_dim, self.heads = head_dim, heads
        self.v_proj, self.o_proj = nn.Linear(d, heads * head_dim), nn.Linear(heads * head_dim, d)
        self.v_weight = nn.Parameter(torch.linspace(0.5, 2.0, head_dim))

    def forward(self, x):
        v = self.v_proj(x).unflatten(-1, (self.heads, self.head_dim)) * self.v_weight
        att = torch.softmax(torch.ones(x.shape[1], x.shape[1]).tril().log(), -1)  # causal mean of the values
        return self.o_proj(torch.einsum("ts,bshd->bthd", att, v).flatten(-2))


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.attn = _ScaledValueAttention()

    def forward(self, input_ids):
        return (self.attn(self.embed(input_ids)),)


def test_fusion_refuses_and_restores_when_values_are_not_combined_linearly():
    torch.manual_seed(0)
    toy = _Toy()
    before = {k: v.clone() for k, v in toy.state_dict().items()}
    res = fuse_value_rotations(toy, seed=0)
    assert res.refused is not None and "stay online" in res.refused and res.probe_error > 1e-3
    assert res.online == {} and res.pairs == []
    assert all(torch.equal(before[k], v) for k, v in toy.state_dict().items())  # restored bit for bit


def test_fusevo_needs_a_full_rotation():
    with pytest.raises(ValueError, match="fusevo"):
        get_recipe("w4a4:block-128:rtn:fusevo")
    with pytest.raises(ValueError, match="fusevo"):
        get_recipe("w4a4:none:rtn:fusevo")
