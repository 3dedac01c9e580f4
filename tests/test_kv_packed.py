"""The packed, quantized KV cache (hadakit.quantization.kv_packed).

The reference for the cache's logits is an independent full-sequence computation: one forward over the whole
generated sequence whose attention sees, for each query, the keys/values of ``fake_quantize_kv`` (no packing) at the
positions the cache had quantized *when that query ran* and the full-precision ones elsewhere — the cache's read
rule (stored past, then the query's own chunk in full precision; see the module docstring).
"""

import math
import os
import sys

import pytest
import torch
import transformers
from transformers import AttentionInterface, DynamicCache

sys.path.insert(0, os.path.dirname(__file__))
from conftest import tiny_llama  # noqa: E402

from hadakit.quantization.kv_packed import (  # noqa: E402
    KVCacheConfig,
    PackedKVCache,
    PackedKVLayer,
    fake_quantize_kv,
    fit_codebook,
    gaussian_codebook,
    packed_range,
)

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPT = torch.tensor([[101, 2023, 2003, 1037, 3231]])
NEW = 40

CONFIGS = {
    "kivi_channel": KVCacheConfig(key_bits=2, value_bits=2, group_size=8, residual_length=8, sink_tokens=2),
    "kivi_token_hadamard": KVCacheConfig(key_bits=3, value_bits=2, key_grouping="token", token_group_size=32,
                                         group_size=4, residual_length=0, rotation="hadamard", random_signs=True,
                                         seed=3),
    "nsn_2bit": KVCacheConfig(method="nsnquant", key_bits=2, value_bits=2, vq_dim=4, group_size=8,
                              residual_length=4, sink_tokens=1),
    "nsn_1bit": KVCacheConfig(method="nsnquant", key_bits=1, value_bits=1, vq_dim=8, group_size=8,
                              residual_length=0),
}


def _two_layer_llama(seed: int = 0):
    cfg = transformers.LlamaConfig(vocab_size=30522, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                                   tie_word_embeddings=False, attn_implementation="eager")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def models():
    one = tiny_llama()
    one.set_attn_implementation("eager")
    return {"1layer": one, "2layer": _two_layer_llama()}


def _generate(model, cache):
    out = model.generate(PROMPT, max_new_tokens=NEW, do_sample=False, cache=cache, pad_token_id=0,
                         output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits, dim=1)[0]  # [steps, vocab]


_REF = {}  # the reference attention's state: config, codebooks, chunk starts


def _reference_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Eager attention in which query i sees fake_quantize_kv keys/values at packed_range(start(i)) only."""
    cfg, starts = _REF["config"], _REF["starts"]
    kq, vq = fake_quantize_kv(key, value, cfg, _REF.get("codebooks"))
    rep = module.num_key_value_groups
    k, v, kq, vq = (t.repeat_interleave(rep, dim=1) for t in (key, value, kq, vq))
    n = query.shape[-2]
    j = torch.arange(n)
    quantized = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        a, b = packed_range(int(starts[i]), cfg)
        quantized[i] = (j >= a) & (j < b)
    scores = torch.where(quantized, query @ kq.transpose(-1, -2), query @ k.transpose(-1, -2)) * scaling
    causal = j[None, :] <= j[:, None]
    p = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
    out = (p * ~quantized) @ v + (p * quantized) @ vq
    return out.transpose(1, 2).contiguous(), p


AttentionInterface.register("kv_packed_reference", _reference_attention)


def _reference_logits(model, seq, cfg, starts, codebooks=None):
    _REF.update(config=cfg, starts=starts, codebooks=codebooks)
    model.set_attn_implementation("kv_packed_reference")
    try:
        with torch.no_grad():
            return model(seq, use_cache=False).logits[0]
    finally:
        model.set_attn_implementation("eager")


def _decode_starts(total: int, prompt: int) -> torch.Tensor:
    """Chunk start of each position in generate(): the prompt is one chunk, then one token per step."""
    pos = torch.arange(total)
    return torch.where(pos < prompt, torch.zeros_like(pos), pos)


# --- (a) generate() logits equal the fake-quant reference ---------------------------------------------------------
@pytest.mark.parametrize("model_name", ["1layer", "2layer"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_generate_matches_fake_quant_reference(models, model_name, name):
    model, cfg = models[model_name], CONFIGS[name]
    cache = PackedKVCache(cfg, model.config)
    seq, logits = _generate(model, cache)
    assert seq.shape[1] == PROMPT.shape[1] + NEW
    assert cache.get_seq_length() == seq.shape[1] - 1  # the last token is never fed back
    p = PROMPT.shape[1]
    ref = _reference_logits(model, seq[:, :-1], cfg, _decode_starts(seq.shape[1] - 1, p))[p - 1:]
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
    # the quantization mattered: full-precision logits are far away
    with torch.no_grad():
        fp = model(seq[:, :-1], use_cache=False).logits[0, p - 1:]
    assert (fp - logits).abs().max() > 1e-3
    # negative control on timing: quantizing as of the final state for every query is a different computation
    wrong = _reference_logits(model, seq[:, :-1], cfg, torch.full((seq.shape[1] - 1,), seq.shape[1] - 1))[p - 1:]
    assert (wrong - logits).abs().max() > 1e-3


def test_chunked_forward_matches_reference(models):
    """Feeding a sequence through the cache in chunks of 7 (prefill + chunks) equals the reference with those
    chunk starts."""
    model, cfg = models["2layer"], CONFIGS["kivi_channel"]
    seq = torch.randint(0, 30522, (1, 45), generator=torch.Generator().manual_seed(1))
    cache = PackedKVCache(cfg, model.config)
    outs = []
    with torch.no_grad():
        for a in range(0, seq.shape[1], 7):
            outs.append(model(seq[:, a:a + 7], cache=cache, use_cache=True).logits[0])
    starts = (torch.arange(seq.shape[1]) // 7) * 7
    torch.testing.assert_close(torch.cat(outs), _reference_logits(model, seq, cfg, starts), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("chunks", [(100,), (1,) * 30 + (70,), (13, 29, 3, 55)])
def test_stored_state_equals_fake_quantize(name, chunks):
    """Whatever the chunking, the cache holds fake_quantize_kv of everything it was given (packing is lossless)."""
    cfg = CONFIGS[name]
    g = torch.Generator().manual_seed(0)
    k = torch.randn(2, 3, 100, 64, generator=g) * torch.linspace(0.2, 4, 64)
    v = torch.randn(2, 3, 100, 64, generator=g)
    layer = PackedKVLayer(cfg)
    a = 0
    for n in chunks:
        layer.update(k[..., a:a + n, :], v[..., a:a + n, :])
        a += n
    fk, fv = fake_quantize_kv(k, v, cfg)
    sk, sv = layer.stored()
    torch.testing.assert_close(sk, fk, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(sv, fv, atol=1e-6, rtol=1e-6)
    start, end = packed_range(100, cfg)
    assert end > start and layer.packed["key"]["codes"].dtype == torch.uint8
    assert torch.equal(sk[..., :start, :], k[..., :start, :]) and torch.equal(sk[..., end:, :], k[..., end:, :])
    assert (sk[..., start:end, :] - k[..., start:end, :]).abs().max() > 1e-2  # really quantized
    assert 100 - end >= cfg.residual_length and 100 - end < cfg.residual_length + cfg.group_size


# --- (b) equality with DynamicCache -------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [KVCacheConfig(key_bits=16, value_bits=16, group_size=4, residual_length=0,
                                               sink_tokens=1),
                                 KVCacheConfig(key_bits=2, value_bits=2, group_size=8,
                                               residual_length=PROMPT.shape[1] + NEW)],
                         ids=["bits16", "window_covers_all"])
def test_equals_dynamic_cache(models, cfg):
    model = models["2layer"]
    seq_d, logits_d = _generate(model, DynamicCache(config=model.config))
    cache = PackedKVCache(cfg, model.config)
    seq_p, logits_p = _generate(model, cache)
    assert torch.equal(seq_d, seq_p) and torch.equal(logits_d, logits_p)
    if cfg.key_bits == 16:
        assert cache.layers[0].n_blocks > 0  # the flush path ran, storing unquantized blocks
    else:
        assert cache.layers[0].n_blocks == 0


def test_two_bit_no_window_differs_from_dynamic_cache(models):
    model = models["2layer"]
    _, logits_d = _generate(model, DynamicCache(config=model.config))
    cfg = KVCacheConfig(key_bits=2, value_bits=16, group_size=4, residual_length=0)
    _, logits_p = _generate(model, PackedKVCache(cfg, model.config))
    assert (logits_d - logits_p).abs().max() > 1e-3  # far above the 1e-5 of the exact checks


# --- (c) byte accounting ------------------------------------------------------------------------------------------
def _analytic_bytes(cfg: KVCacheConfig, b: int, h: int, d: int, length: int, elt: int) -> int:
    start, end = packed_range(length, cfg)
    n = (end - start) // cfg.group_size
    g = cfg.group_size
    total = (length - (end - start)) * b * h * d * elt * 2  # sinks + window, keys and values
    for kind, bits in (("key", cfg.key_bits), ("value", cfg.value_bits)):
        if bits == 16:
            total += n * b * h * g * d * elt
            continue
        total += n * b * math.ceil(h * g * d * bits / 8)  # codes
        if cfg.method == "nsnquant":
            total += n * b * h * (2 * g + d) * 2  # two fp16 norms per token, one fp16 mean per channel per block
        elif kind == "key" and cfg.key_grouping == "channel":
            total += n * b * h * d * 2 * 2  # fp16 scale + zero per channel per block
        else:
            groups = d // (cfg.token_group_size or d)
            total += n * b * h * g * groups * 2 * 2  # fp16 scale + zero per token group
    return total


@pytest.mark.parametrize("name", list(CONFIGS) + ["bits16"])
@pytest.mark.parametrize("length", [3, 37, 200])
def test_nbytes_matches_formula(name, length):
    cfg = CONFIGS.get(name) or KVCacheConfig(key_bits=16, value_bits=4, group_size=16, residual_length=8)
    k = torch.randn(2, 3, length, 64)
    layer = PackedKVLayer(cfg)
    layer.update(k, torch.randn_like(k))
    nb = layer.nbytes()
    assert nb["total"] == _analytic_bytes(cfg, 2, 3, 64, length, 4)
    assert nb["total"] == sum(v for key, v in nb.items() if key != "total")
    assert layer.bytes_per_token() == nb["total"] / length


def test_two_bit_cache_is_small_at_2048_tokens():
    cfg = KVCacheConfig(key_bits=2, value_bits=2, group_size=128, residual_length=0)
    k = torch.randn(1, 2, 2048, 64).to(torch.bfloat16)
    cache = PackedKVCache(cfg)
    for layer_idx in range(2):
        cache.update(k, k.flip(-1), layer_idx)
    bf16 = 2 * 2 * 2048 * 2 * 64 * 2  # layers x (K, V) x tokens x heads x head_dim x 2 bytes
    ratio = cache.nbytes()["total"] / bf16
    assert cache.nbytes()["total"] == 2 * _analytic_bytes(cfg, 1, 2, 64, 2048, 2)
    assert ratio <= 0.16, ratio  # measured 0.1484: 2 bits + fp16 scale/zero per 128 tokens (K) / per 64 values (V)
    assert cache.bytes_per_token() == cache.nbytes()["total"] / 2048


# --- (d) NSNQuant codebooks ---------------------------------------------------------------------------------------
def test_codebook_fit_is_deterministic():
    a = gaussian_codebook(2, 4, seed=5)
    assert torch.equal(a, gaussian_codebook(2, 4, seed=5))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(256 * 64, 4, generator=g)
    assert torch.equal(a, fit_codebook(x, 2, 4, seed=5))  # the Gaussian codebook is fit_codebook on seeded draws
    assert not torch.equal(a, gaussian_codebook(2, 4, seed=6))
    assert a.shape == (256, 4)


def _mse(codebook, x):
    from hadakit.quantization.kv_packed import _nearest

    return ((codebook[_nearest(x, codebook)] - x) ** 2).mean().item()


@pytest.mark.parametrize("bits,dim,scalar_opt", [(2, 4, 0.1175), (1, 8, 1 - 2 / math.pi)])
def test_vector_codebook_beats_scalar_quantizer_on_gaussian(bits, dim, scalar_opt):
    cb = gaussian_codebook(bits, dim)
    x = torch.randn(50000, dim, generator=torch.Generator().manual_seed(123))  # held-out draws
    vq = _mse(cb, x.reshape(-1, dim))
    # the best scalar quantizer of that width (Lloyd-Max), fitted the same way, and its known optimum
    scalar = _mse(fit_codebook(torch.randn(20000, 1, generator=torch.Generator().manual_seed(9)), bits, 1),
                  x.reshape(-1, 1))
    assert abs(scalar - scalar_opt) < 0.01
    assert vq < scalar - 0.005, (vq, scalar)


def test_nsn_transform_feeds_the_codebook_gaussian_inputs():
    """After normalize-shift-normalize and the Hadamard, the coordinates of skewed, offset keys are ~N(0, 1)."""
    from hadakit.quantization.kv_packed import _rotate

    cfg = CONFIGS["nsn_2bit"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, 512, 64, generator=g) * torch.linspace(0.1, 5, 64) + 3.0
    u = x / x.norm(dim=-1, keepdim=True) * 8
    v = u - u.mean(-2, keepdim=True)
    z = _rotate(v / v.norm(dim=-1, keepdim=True) * 8, cfg)
    assert abs(z.mean().item()) < 0.05 and abs(z.std().item() - 1) < 0.05
    assert abs((x - x.mean()).div(x.std()).pow(4).mean().item() - 3) > 0.5  # the raw keys were far from Gaussian


# --- (e) configuration --------------------------------------------------------------------------------------------
def test_config_round_trips():
    for cfg in list(CONFIGS.values()) + [KVCacheConfig()]:
        assert KVCacheConfig.from_string(str(cfg)) == cfg
        assert KVCacheConfig.from_dict(cfg.to_dict()) == cfg
    assert KVCacheConfig(method="nsnquant").rotation == "hadamard" and KVCacheConfig().rotation == "none"
    assert KVCacheConfig.from_string("method=kivi,key_bits=4") == KVCacheConfig(key_bits=4)
    with pytest.raises(dataclasses_frozen_error()):
        KVCacheConfig().key_bits = 3


def dataclasses_frozen_error():
    import dataclasses

    return dataclasses.FrozenInstanceError


@pytest.mark.parametrize("kwargs,match", [
    ({"key_bits": 0}, "key_bits"),
    ({"value_bits": 12}, "value_bits=12"),
    ({"method": "vq"}, "method"),
    ({"key_grouping": "head"}, "key_grouping"),
    ({"group_size": 0}, "group_size"),
    ({"residual_length": -1}, "residual_length"),
    ({"rotation": "dct"}, "rotation"),
    ({"scale_dtype": "float32"}, "scale_dtype"),
    ({"method": "nsnquant", "rotation": "none"}, "hadamard"),
    ({"method": "nsnquant", "key_bits": 3, "vq_dim": 8}, "vq_dim"),
    ({"random_signs": 1}, "random_signs"),
])
def test_bad_config_raises(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        KVCacheConfig(**kwargs)


def test_bad_inputs_raise():
    with pytest.raises(TypeError, match="int"):
        KVCacheConfig(key_bits=2.0)
    with pytest.raises(ValueError, match="unknown field"):
        KVCacheConfig.from_string("bits=2")
    with pytest.raises(ValueError, match="key=value"):
        KVCacheConfig.from_string("kivi")
    with pytest.raises(ValueError, match="unknown field"):
        KVCacheConfig.from_dict({"nbits": 2})
    with pytest.raises(ValueError, match="token_group_size"):
        PackedKVLayer(KVCacheConfig(token_group_size=24)).update(torch.randn(1, 1, 4, 64), torch.randn(1, 1, 4, 64))
    with pytest.raises(ValueError, match="Hadamard"):  # 18 is not a multiple of 4: no Hadamard matrix can exist
        PackedKVLayer(KVCacheConfig(rotation="hadamard")).update(torch.randn(1, 1, 4, 18), torch.randn(1, 1, 4, 18))
    with pytest.raises(ValueError, match="codebook"):
        PackedKVCache(KVCacheConfig(method="nsnquant", vq_dim=4), codebooks={"key": torch.randn(16, 4)})
    with pytest.raises(TypeError, match="KVCacheConfig"):
        PackedKVCache({"key_bits": 2})
    with pytest.raises(ValueError, match="head_dim"):
        fake_quantize_kv(torch.randn(1, 1, 4), torch.randn(1, 1, 4), KVCacheConfig())
    with pytest.raises(ValueError, match="rows"):
        fit_codebook(torch.randn(10, 4), 2, 4)
    layer = PackedKVLayer(KVCacheConfig())
    layer.update(torch.randn(1, 1, 4, 64), torch.randn(1, 1, 4, 64))
    with pytest.raises(ValueError, match="do not match"):
        layer.update(torch.randn(1, 2, 4, 64), torch.randn(1, 2, 4, 64))


def test_sliding_window_layers_match_dynamic_cache():
    """On a hybrid sliding/full model the cache stores every token of a sliding layer and the model's sliding mask
    does the rest: with bits 16 it matches DynamicCache (which evicts) to float rounding."""
    cfg = transformers.Gemma3TextConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=8,
                                        layer_types=["sliding_attention", "full_attention"],
                                        attn_implementation="eager")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = transformers.Gemma3ForCausalLM(cfg).eval()
    prompt = torch.tensor([[2, 17, 33, 5]])
    kw = dict(max_new_tokens=30, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    ref = model.generate(prompt, cache=DynamicCache(config=model.config), **kw)
    got = model.generate(prompt, cache=PackedKVCache(KVCacheConfig(key_bits=16, value_bits=16, group_size=4,
                                                                   residual_length=0), model.config), **kw)
    assert torch.equal(ref.sequences, got.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(ref.logits), atol=1e-5, rtol=1e-5)
    quant = model.generate(prompt, cache=PackedKVCache(KVCacheConfig(group_size=4, residual_length=0),
                                                       model.config), **kw)
    assert (torch.stack(quant.logits) - torch.stack(ref.logits)).abs().max() > 1e-3  # negative control
