"""RotateKV options of the packed KV cache: outlier-aware channel order before a (block) Hadamard, keys quantized
before RoPE (RoPE applied after dequantization, through ``pre_rope_attention``), sinks in full precision."""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import pytest
import torch
import transformers
from transformers import AttentionInterface, DynamicCache

sys.path.insert(0, os.path.dirname(__file__))

from hadakit.quantization.kv_packed import (  # noqa: E402
    KVCacheConfig,
    PackedKVCache,
    PackedKVLayer,
    _rotate,
    _unrotate,
    apply_rope,
    fake_quantize_kv,
    fit_channel_order,
    packed_range,
    pre_rope_attention,
)

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPT = torch.tensor([[11, 23, 5, 7, 91]])
NEW = 30


def _perm(d: int, seed: int) -> tuple[int, ...]:
    return tuple(torch.randperm(d, generator=torch.Generator().manual_seed(seed)).tolist())


def _rot_cfg(head_dim: int, layers: int = 1, **kw) -> KVCacheConfig:
    base = dict(key_bits=2, value_bits=2, key_grouping="token", token_group_size=head_dim // 2, group_size=4,
                residual_length=4, sink_tokens=1, rotation="hadamard", random_signs=True, rotation_block=head_dim // 2,
                channel_order=tuple(_perm(head_dim, i) for i in range(layers)), pre_rope=True)
    base.update(kw)
    return KVCacheConfig(**base)


def _llama(seed: int = 0):
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                                   attn_implementation="eager")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return transformers.LlamaForCausalLM(cfg).eval()


def _gemma(seed: int = 0):
    cfg = transformers.Gemma3TextConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                        num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=8,
                                        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                                        attn_implementation="eager")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = transformers.Gemma3ForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = None  # generate all NEW tokens (token 1 is Gemma's default EOS)
    return model


@pytest.fixture(scope="module")
def models():
    return {"llama": _llama(), "gemma3": _gemma()}


def _generate(model, cache):
    out = model.generate(PROMPT, max_new_tokens=NEW, do_sample=False, cache=cache, pad_token_id=0,
                         output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits, dim=1)[0]


def _head_dim(model) -> int:
    return model.config.head_dim


# --- channel order ------------------------------------------------------------------------------------------------
def test_channel_order_is_an_invertible_permutation():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 40, 64, generator=g, dtype=torch.float64) * torch.linspace(0.1, 5, 64, dtype=torch.float64)
    for rb in (0, 16, 32):
        cfg = KVCacheConfig(rotation="hadamard", random_signs=True, rotation_block=rb, channel_order=(_perm(64, 1),))
        order = torch.tensor(cfg.order_for(0))
        y = _rotate(x, cfg, order)
        torch.testing.assert_close(_unrotate(y, cfg, order), x, atol=1e-12, rtol=0)
        # orthogonal: the norm of every row is kept; and the order really moved channels (negative control)
        torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), atol=1e-10, rtol=0)
        assert (y - _rotate(x, cfg)).abs().max() > 1e-3
    plain = KVCacheConfig(channel_order=(_perm(64, 1),))  # rotation none: a pure permutation
    order = torch.tensor(plain.order_for(0))
    assert torch.equal(_rotate(x, plain, order), x[..., list(plain.order_for(0))])
    assert torch.equal(_unrotate(_rotate(x, plain, order), plain, order), x)


@pytest.mark.parametrize("blocks", [1, 2, 4, 8])
def test_fit_channel_order_balances_outliers_across_blocks(blocks):
    d = 64
    g = torch.Generator().manual_seed(1)
    scale = torch.ones(d)
    scale[:8] = torch.tensor([40.0, 30, 25, 20, 15, 12, 10, 8])  # outlier channels, all in the first block
    keys = torch.randn(500, d, generator=g) * scale
    order = fit_channel_order(keys, blocks)
    assert sorted(order) == list(range(d))
    energy = keys.pow(2).mean(0)
    per = energy[list(order)].reshape(blocks, -1).sum(1)
    ident = energy.reshape(blocks, -1).sum(1)
    top = set(torch.argsort(energy, descending=True)[:blocks].tolist())
    assert all(len(top & set(order[b * (d // blocks):(b + 1) * (d // blocks)])) == 1 for b in range(blocks))
    if blocks > 1:  # far better balanced than the natural order, which holds every outlier in block 0
        assert ident.max() / ident.min() > 10
        assert per.max() / per.min() * 4 < ident.max() / ident.min()


def test_channel_order_lowers_block_quantization_error():
    """The point of the reordering: with block Hadamards and per-token groups of the block size, spreading the
    outlier channels over the blocks reduces 2-bit error against the natural order."""
    d = 64
    g = torch.Generator().manual_seed(2)
    scale = torch.ones(d)
    scale[:4] = 25.0
    k = (torch.randn(1, 1, 256, d, generator=g) * scale)
    v = torch.randn(1, 1, 256, d, generator=g)
    base = dict(key_bits=2, value_bits=2, key_grouping="token", token_group_size=16, group_size=16,
                residual_length=0, rotation="hadamard", rotation_block=16)
    fitted = KVCacheConfig(**base, channel_order=(fit_channel_order(k, 4),))
    natural = KVCacheConfig(**base)
    err_fit = (fake_quantize_kv(k, v, fitted)[0] - k).pow(2).mean()
    err_nat = (fake_quantize_kv(k, v, natural)[0] - k).pow(2).mean()
    assert err_fit < 0.8 * err_nat


# --- the stored state equals the fake-quant path -------------------------------------------------------------------
@pytest.mark.parametrize("chunks", [(60,), (1,) * 20 + (40,), (13, 29, 3, 15)])
@pytest.mark.parametrize("method", ["kivi", "nsnquant"])
def test_stored_state_equals_fake_quantize_with_order(chunks, method):
    d = 64
    extra = {} if method == "kivi" else dict(method="nsnquant", vq_dim=4, key_grouping="channel")
    cfg = _rot_cfg(d, layers=3, pre_rope=False, **extra)
    g = torch.Generator().manual_seed(0)
    k = torch.randn(2, 2, 60, d, generator=g) * torch.linspace(0.2, 4, d)
    v = torch.randn(2, 2, 60, d, generator=g)
    layer = PackedKVLayer(cfg, layer_idx=2)
    a = 0
    for n in chunks:
        layer.update(k[..., a:a + n, :], v[..., a:a + n, :])
        a += n
    sk, sv = layer.stored()
    fk, fv = fake_quantize_kv(k, v, cfg, layer_idx=2)
    torch.testing.assert_close(sk, fk, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(sv, fv, atol=1e-6, rtol=1e-6)
    other, _ = fake_quantize_kv(k, v, cfg, layer_idx=0)  # another layer's order gives other keys
    assert (other - sk).abs().max() > 1e-3
    start, end = packed_range(60, cfg)
    assert torch.equal(sk[..., :start, :], k[..., :start, :]) and torch.equal(sk[..., end:, :], k[..., end:, :])


def test_pre_rope_layer_returns_rope_of_dequantized_keys():
    """update_pre_rope returns RoPE(stored pre-RoPE keys) with transformers' own apply_rotary_pos_emb."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    d = 32
    cfg = _rot_cfg(d)
    g = torch.Generator().manual_seed(3)
    k = torch.randn(1, 1, 40, d, generator=g) * torch.linspace(0.2, 4, d)
    v = torch.randn(1, 1, 40, d, generator=g)
    ang = torch.arange(40.0)[:, None] * (0.7 ** torch.arange(d // 2.0))[None]
    cos = torch.cat([ang.cos(), ang.cos()], -1)[None]
    sin = torch.cat([ang.sin(), ang.sin()], -1)[None]
    layer = PackedKVLayer(cfg)
    layer.update_pre_rope(k[..., :30, :], v[..., :30, :], cos[:, :30], sin[:, :30])
    out_k, out_v = layer.update_pre_rope(k[..., 30:, :], v[..., 30:, :], cos[:, 30:], sin[:, 30:])
    fk, fv = fake_quantize_kv(k[..., :30, :], v[..., :30, :], cfg)
    want = torch.cat([fk, k[..., 30:, :]], dim=-2)
    ref, _ = apply_rotary_pos_emb(want, want, cos, sin)
    assert torch.equal(out_k, ref)
    assert torch.equal(out_v, torch.cat([fv, v[..., 30:, :]], dim=-2))
    assert torch.equal(apply_rope(want, cos, sin), ref)


# --- the model path: pre-RoPE at 16 bits is the plain cache bit for bit -----------------------------------------
@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_pre_rope_16_bits_equals_plain_cache(models, name):
    model = models[name]
    d = _head_dim(model)
    plain = KVCacheConfig(key_bits=16, value_bits=16, group_size=4, residual_length=0, sink_tokens=1)
    seq_p, log_p = _generate(model, PackedKVCache(plain, model.config))
    cache = PackedKVCache(dataclasses.replace(plain, pre_rope=True), model.config)
    with pre_rope_attention(model) as n:
        seq_r, log_r = _generate(model, cache)
    assert n == model.config.num_hidden_layers
    assert seq_p.shape[1] == PROMPT.shape[1] + NEW
    assert torch.equal(seq_p, seq_r) and torch.equal(log_p, log_r)
    assert cache.layers[0].n_blocks > 0 and cache.layers[0].rope_cos.shape[1] == cache.get_seq_length()
    if name == "llama":  # and DynamicCache (Gemma's sliding DynamicCache evicts: equal only to rounding)
        seq_d, log_d = _generate(model, DynamicCache(config=model.config))
        assert torch.equal(seq_d, seq_r) and torch.equal(log_d, log_r)
    # negative control: storing post-RoPE keys as if they were pre-RoPE (RoPE applied twice) is far away
    two_bit = PackedKVCache(_rot_cfg(d, layers=1), model.config)
    with pre_rope_attention(model):
        _, log_q = _generate(model, two_bit)
    assert log_q.shape == log_p.shape and (log_q - log_p).abs().max() > 1e-3
    assert "forward" not in model.model.layers[0].self_attn.__dict__  # the wrapper is gone


_REF: dict = {}


def _reference_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Eager attention in which query i sees RoPE(fake_quantize_kv(pre-RoPE keys)) at packed_range(start(i))."""
    cfg, starts = _REF["config"], _REF["starts"]
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    k_pre = _REF["k_pre"][module.layer_idx]
    cos, sin = _REF["rope"][module.layer_idx]
    kq_pre, vq = fake_quantize_kv(k_pre, value, cfg, layer_idx=module.layer_idx)
    kq, _ = apply_rotary_pos_emb(kq_pre, kq_pre, cos, sin)
    rep = module.num_key_value_groups
    k, v, kq, vq = (t.repeat_interleave(rep, dim=1) for t in (key, value, kq, vq))
    n = query.shape[-2]
    j = torch.arange(n)
    quantized = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        a, b = packed_range(int(starts[i]), cfg)
        quantized[i] = (j >= a) & (j < b)
    scores = torch.where(quantized, query @ kq.transpose(-1, -2), query @ k.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        m = attention_mask[..., :n, :n]
        scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m
    else:  # no mask handed to a custom attention: causal, and the sliding window (i - j < W) where there is one
        hidden = j[None, :] > j[:, None]
        if kwargs.get("sliding_window"):
            hidden = hidden | (j[:, None] - j[None, :] >= kwargs["sliding_window"])
        scores = scores.masked_fill(hidden, float("-inf"))
    p = torch.softmax(scores, dim=-1)
    out = (p * ~quantized) @ v + (p * quantized) @ vq
    return out.transpose(1, 2).contiguous(), p


@pytest.fixture
def reference_attention():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = "hadakit_test_rotatekv_reference"
    AttentionInterface.register(name, _reference_attention)
    yield name
    ALL_ATTENTION_FUNCTIONS._global_mapping.pop(name, None)  # restore the registry


def _reference_logits(model, seq, cfg, starts, attn_name):
    """Full-sequence forward with the reference attention; pre-RoPE keys and the rotary tables are captured with
    hooks on each attention module (k_norm output for Gemma, k_proj output for Llama)."""
    _REF.update(config=cfg, starts=starts, k_pre={}, rope={})
    hooks = []
    for layer in model.model.layers:
        attn = layer.self_attn

        def pre(mod, args, kwargs):
            _REF["rope"][mod.layer_idx] = kwargs["position_embeddings"]

        hooks.append(attn.register_forward_pre_hook(pre, with_kwargs=True))
        if getattr(attn, "k_norm", None) is not None:
            hooks.append(attn.k_norm.register_forward_hook(
                lambda m, a, out, i=attn.layer_idx: _REF["k_pre"].__setitem__(i, out)))
        else:
            hooks.append(attn.k_proj.register_forward_hook(
                lambda m, a, out, i=attn.layer_idx, hd=attn.head_dim: _REF["k_pre"].__setitem__(
                    i, out.view(*out.shape[:-1], -1, hd).transpose(1, 2))))
    old = model.config._attn_implementation
    model.set_attn_implementation(attn_name)
    try:
        with torch.no_grad():
            return model(seq, use_cache=False).logits[0]
    finally:
        model.set_attn_implementation(old)
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_pre_rope_generate_matches_fake_quant_reference(models, name, reference_attention):
    model = models[name]
    d = _head_dim(model)
    cfg = _rot_cfg(d, layers=model.config.num_hidden_layers)
    cache = PackedKVCache(cfg, model.config)
    with pre_rope_attention(model):
        seq, logits = _generate(model, cache)
    p = PROMPT.shape[1]
    total = seq.shape[1] - 1
    pos = torch.arange(total)
    starts = torch.where(pos < p, torch.zeros_like(pos), pos)
    ref = _reference_logits(model, seq[:, :-1], cfg, starts, reference_attention)[p - 1:]
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
    # negative control: quantizing the post-RoPE keys instead is a different computation
    post = PackedKVCache(dataclasses.replace(cfg, pre_rope=False), model.config)
    with torch.no_grad():
        out = [model(seq[:, :p], cache=post).logits[0, -1:]]
        for t in range(p, total):
            out.append(model(seq[:, t:t + 1], cache=post).logits[0])
    assert (torch.cat(out) - logits).abs().max() > 1e-3


def test_pre_rope_attention_restores_modules_and_passes_other_caches(models):
    model = models["llama"]
    attn = model.model.layers[1].self_attn
    seq_d, log_d = _generate(model, DynamicCache(config=model.config))
    with pre_rope_attention(model):
        assert "forward" in attn.__dict__
        seq_i, log_i = _generate(model, DynamicCache(config=model.config))  # not a pre-RoPE cache: unchanged
    assert torch.equal(seq_d, seq_i) and torch.equal(log_d, log_i)
    assert "forward" not in attn.__dict__
    with pytest.raises(RuntimeError, match="boom"):
        with pre_rope_attention(model):
            raise RuntimeError("boom")
    assert "forward" not in attn.__dict__
    with pytest.raises(ValueError, match="Llama-family"):
        with pre_rope_attention(torch.nn.Linear(2, 2)):
            pass


# --- config --------------------------------------------------------------------------------------------------------
def test_config_with_order_round_trips():
    cfg = _rot_cfg(32, layers=3)
    assert KVCacheConfig.from_string(str(cfg)) == cfg
    assert KVCacheConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert KVCacheConfig.from_string(str(cfg).replace(",", ";")) == cfg
    single = KVCacheConfig(channel_order=list(_perm(8, 0)))  # one flat permutation is shared by all layers
    assert single.channel_order == (_perm(8, 0),) and single.order_for(5) == _perm(8, 0)
    assert KVCacheConfig().order_for(0) is None


@pytest.mark.parametrize("kwargs, match", [
    (dict(channel_order=((0, 0, 1),)), "not a permutation"),
    (dict(channel_order=((0, 1), (1, 0, 2))), "different lengths"),
    (dict(channel_order="0.1"), "tuple of permutations"),
    (dict(pre_rope="yes"), "pre_rope must be a bool"),
    (dict(rotation_block=-1), "rotation_block"),
])
def test_bad_rotatekv_config_raises(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        KVCacheConfig(**kwargs)


def test_bad_rotatekv_use_raises(models):
    k = torch.randn(1, 1, 8, 32)
    with pytest.raises(ValueError, match="rotation_block"):
        PackedKVLayer(KVCacheConfig(rotation="hadamard", rotation_block=12)).update(k, k)
    with pytest.raises(ValueError, match="head_dim is 32"):
        PackedKVLayer(KVCacheConfig(channel_order=(_perm(16, 0),))).update(k, k)
    with pytest.raises(ValueError, match="pre_rope_attention"):
        PackedKVLayer(KVCacheConfig(pre_rope=True)).update(k, k)
    with pytest.raises(ValueError, match="pre_rope=False"):
        PackedKVLayer(KVCacheConfig()).update_pre_rope(k, k, k[0], k[0])
    with pytest.raises(ValueError, match="model has 2"):
        PackedKVCache(_rot_cfg(64, layers=3), models["llama"].config)
    with pytest.raises(ValueError, match="needs model_config"):
        PackedKVCache(_rot_cfg(64, layers=3))
    with pytest.raises(ValueError, match="fit_channel_order: blocks"):
        fit_channel_order(k, 3)


# --- the pipeline's fake-quant KV with a KVCacheConfig ----------------------------------------------------------
@pytest.mark.parametrize("name", ["llama", "gemma3"])
@pytest.mark.parametrize("kind", ["kivi", "rotatekv_post_rope", "nsn"])
def test_pipeline_kv_with_cache_config_equals_decoding_through_the_cache(models, name, kind):
    """install_kv_quantization(cache_config=...) in one full-sequence forward gives the logits of token-by-token
    decoding through PackedKVCache (generate), for KIVI, RotateKV (post-RoPE: order + block Hadamard + sink) and
    NSNQuant; uninstalling restores the model."""
    from hadakit.quantization.kv_cache import ATTN_NAME, install_kv_quantization

    model = models[name]
    d = _head_dim(model)
    cfg = {"kivi": KVCacheConfig(key_bits=2, value_bits=2, group_size=4, residual_length=4, sink_tokens=1),
           "rotatekv_post_rope": _rot_cfg(d, layers=model.config.num_hidden_layers, pre_rope=False),
           "nsn": KVCacheConfig(method="nsnquant", key_bits=2, value_bits=2, vq_dim=4, group_size=4,
                                residual_length=2)}[kind]
    seq, logits = _generate(model, PackedKVCache(cfg, model.config))
    p = PROMPT.shape[1]
    saved = model.config._attn_implementation
    try:
        assert install_kv_quantization(model, "int4", cache_config=str(cfg)) == model.config.num_hidden_layers
        assert model.config._attn_implementation == ATTN_NAME
        with torch.no_grad():
            got = model(seq[:, :-1], use_cache=False).logits[0, p - 1:]
    finally:
        for layer in model.model.layers:
            layer.self_attn.__dict__.pop("_hadakit_kv", None)
        model.set_attn_implementation(saved)
    # the generate() prompt is one chunk (prefill, all full precision); afterwards one token per step. The single
    # forward treats every position as a decoding step, so compare from the first position a quantized block could
    # have reached in both: positions >= p see the same stored past in both computations.
    torch.testing.assert_close(got[1:], logits[1:], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        fp = model(seq[:, :-1], use_cache=False).logits[0, p - 1:]
    assert (fp - got).abs().max() > 1e-3  # negative control: the quantization mattered


def test_pipeline_kv_cache_config_errors(models):
    from hadakit.quantization.kv_cache import install_kv_quantization

    model = models["llama"]
    with pytest.raises(ValueError, match="pre_rope"):
        install_kv_quantization(model, cache_config=_rot_cfg(64, layers=2))
    with pytest.raises(ValueError, match="KVCacheConfig.sink_tokens"):
        install_kv_quantization(model, cache_config=KVCacheConfig(), sink_tokens=1)
    with pytest.raises(TypeError, match="cache_config must be"):
        install_kv_quantization(model, cache_config=3)
    assert all("_hadakit_kv" not in layer.self_attn.__dict__ for layer in model.model.layers)
