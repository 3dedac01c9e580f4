"""Memory options of the model pipeline (issue 18 item 6): each one changes what is held, never a number.

* ``quantize_model(keep_dense=False)``: packed-only linears, the same packed weights and logits bit for bit;
* the original linears are freed as they are replaced;
* ``capture_window_inputs`` stops its argument-recording forward before the head (no logits);
* ``round_unquantized_parameters(chunk=...)``: the same rounded values for any chunk;
* ``next_token_nll`` / ``perplexity(chunk=...)``: the same float32 NLL as one ``cross_entropy``, bit for bit;
* ``load_model(materialize=True)``: the same weights, out of the safetensors mapping.

Tiny seeded random models built from configs (no download); no timing or memory thresholds.
"""

import copy
import gc
import weakref

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hadakit.quantization import pipeline  # noqa: E402
from hadakit.evaluation.metrics import next_token_nll, perplexity, window_nll  # noqa: E402
from hadakit.io.loading import _file_mappings, load_model, materialize_mapped_tensors  # noqa: E402
from hadakit.quantization.pipeline import (prepare_calibration, quantize_model,  # noqa: E402
                                     round_unquantized_parameters)
from hadakit.quantization.qlinear import RotatedQuantLinear  # noqa: E402
from hadakit.quantization.recipes import get_recipe  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

VOCAB = 512


def _llama(vocab=VOCAB, tie=False):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(cfg).eval()


def _gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=128, n_layer=2, n_head=4, n_positions=64)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _tokens(n=3, length=24, seed=1):
    return torch.randint(5, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def _qmods(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, RotatedQuantLinear)}


def _packed_state(model):
    """Every tensor of the model except the quantized linears' dense ``weight``s (the packed ones included)."""
    dense = {f"{n}.weight" for n, m in _qmods(model).items() if m.packed is not None}
    return {k: v for k, v in model.state_dict().items() if k not in dense}


# ------------------------------------------------------------------------------------------------ keep_dense


@pytest.mark.parametrize("make,spec", [(_llama, "w4a4:random:gptq"), (_llama, "w4a16:block-32:gptq:seq,actorder"),
                                       (_llama, "w4a16:random:gptq:fptarget"), (_llama, "w4a4kv4:random:gptq"),
                                       (_llama, "w8a8:hadamard:rtn"), (_gpt2, "w4a16:random:gptq")])
def test_keep_dense_false_is_bit_identical_and_packed_only(make, spec):
    base = make()
    calib = _tokens()
    recipe = get_recipe(spec)
    kw = dict(calib=calib) if recipe.needs_calibration else {}
    dense, packed = copy.deepcopy(base), copy.deepcopy(base)
    rd = quantize_model(dense, recipe, **kw)
    rp = quantize_model(packed, recipe, keep_dense=False, **kw)
    assert rd.quantized == rp.quantized and rd.weight_bits == rp.weight_bits
    qd, qp = _qmods(dense), _qmods(packed)
    assert qd.keys() == qp.keys() and qd
    for n, m in qp.items():
        assert m.packed_only and "weight" not in m._parameters, n  # no dense weight anywhere
        assert not qd[n].packed_only
        assert torch.equal(m.weight, qd[n].weight), n  # the dequantized weight is the dense one
    sd, sp = _packed_state(dense), _packed_state(packed)
    assert sd.keys() == sp.keys()
    assert all(torch.equal(sd[k], sp[k]) for k in sd)
    ids = _tokens(2, 20, seed=7)
    with torch.no_grad():
        assert torch.equal(dense(ids).logits, packed(ids).logits)


def test_keep_dense_false_checkpoint_tensors_are_the_same():
    from hadakit.io.checkpoint import checkpoint_tensors

    base, calib = _llama(), _tokens()
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    quantize_model(a, "w4a4:random:gptq", calib=calib)
    quantize_model(b, "w4a4:random:gptq", calib=calib, keep_dense=False)
    ta, la, tied_a = checkpoint_tensors(a)
    tb, lb, tied_b = checkpoint_tensors(b)
    assert ta.keys() == tb.keys() and la == lb and tied_a == tied_b
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_keep_dense_default_keeps_the_dense_weights():
    m = _llama()
    quantize_model(m, "w4a16:random:gptq", calib=_tokens())
    assert all(not q.packed_only for q in _qmods(m).values())


@pytest.mark.parametrize("spec", ["w4a16:random:gptq", "w4a16:random:rtn"])
def test_original_linears_are_freed(spec):
    m = _llama()
    originals = [weakref.ref(mod) for mod in m.modules() if isinstance(mod, torch.nn.Linear)
                 and mod is not m.lm_head]
    recipe = get_recipe(spec)
    quantize_model(m, recipe, calib=_tokens() if recipe.needs_calibration else None, keep_dense=False)
    gc.collect()
    assert originals and all(r() is None for r in originals)


# -------------------------------------------------------------------------------------- capture_window_inputs


def test_capture_stops_before_the_head_and_records_every_layer():
    m = _llama()
    layers = pipeline.find_decoder_layers(m)
    seen = []  # the kwargs each layer receives in a plain forward
    hooks = [layer.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(kwargs), with_kwargs=True)
             for layer in layers]
    ids = _tokens(2, 16)
    with torch.no_grad():
        m(ids[:1], use_cache=False)
    for h in hooks:
        h.remove()
    head_calls = []
    h = m.lm_head.register_forward_hook(lambda *a: head_calls.append(1))
    norm_calls = []
    h2 = m.model.norm.register_forward_hook(lambda *a: norm_calls.append(1))
    try:
        inputs, kwargs = pipeline.capture_window_inputs(m, layers, prepare_calibration(ids))
    finally:
        h.remove()
        h2.remove()
    assert not head_calls and not norm_calls  # no logits were computed
    assert len(inputs) == 2 and all(len(row) == 2 for row in kwargs)
    for i, plain in enumerate(seen):
        rec = kwargs[i][0]
        for k, v in rec.items():
            ref = plain[k]
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, ref), (i, k)
            elif isinstance(v, tuple):
                assert all(torch.equal(x, y) for x, y in zip(v, ref)), (i, k)


# ----------------------------------------------------------------------------------------- rounding in chunks


@pytest.mark.parametrize("chunk", [1, 7, 1000, 1 << 22])
def test_round_unquantized_chunked_equals_unchunked(chunk):
    base = _llama(tie=True)
    with torch.no_grad():
        for p in base.parameters():  # values that bf16 cannot hold exactly
            p.add_(torch.randn_like(p) * 1e-3)
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    na = round_unquantized_parameters(a, "bf16", chunk=None)
    nb = round_unquantized_parameters(b, "bf16", chunk=chunk)
    assert na == nb > 0
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all(torch.equal(p, p.to(torch.bfloat16).float()) for p in b.parameters())


def test_round_unquantized_fp16_and_non_contiguous():
    m = torch.nn.Module()
    m.w = torch.nn.Parameter(torch.randn(33, 17).t(), requires_grad=False)  # not contiguous: rounded whole
    m.v = torch.nn.Parameter(torch.randn(1001), requires_grad=False)
    ref = {k: v.detach().to(torch.float16).float() for k, v in m.named_parameters()}
    assert round_unquantized_parameters(m, "fp16", chunk=10) == 33 * 17 + 1001
    assert all(torch.equal(p, ref[k]) for k, p in m.named_parameters())
    with pytest.raises(ValueError, match="chunk"):
        round_unquantized_parameters(m, "fp16", chunk=0)


# ----------------------------------------------------------------------------------------------- chunked NLL


@pytest.mark.parametrize("n,v,chunk", [(511, 3000, 64), (64, 1000, 64), (65, 1000, 64), (10, 257, 3),
                                       (1, 50, 1), (300, 4096, 1), (7, 9, 100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_nll_is_bit_identical(n, v, chunk, dtype):
    g = torch.Generator().manual_seed(n * 31 + v)
    logits = (torch.randn(n, v, generator=g) * 4).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    ref = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
    got = next_token_nll(logits, targets, chunk=chunk)
    assert got.dtype == torch.float32 and torch.equal(got, ref)
    assert torch.equal(next_token_nll(logits, targets, chunk=None), ref)


def test_chunked_nll_rejects_bad_input():
    with pytest.raises(ValueError, match="chunk"):
        next_token_nll(torch.zeros(4, 5), torch.zeros(4, dtype=torch.long), chunk=0)
    with pytest.raises(ValueError, match=r"\[N, V\]"):
        next_token_nll(torch.zeros(2, 4, 5), torch.zeros(2, 4, dtype=torch.long))


def test_perplexity_chunked_equals_unchunked():
    m = _llama()
    windows = _tokens(3, 40, seed=3)
    ref = perplexity(m, windows, progress=False, chunk=None)
    for chunk in (1, 5, 39, 64):
        assert perplexity(m, windows, progress=False, chunk=chunk) == ref
    assert perplexity(m, windows, progress=False, batch_size=2, chunk=7) == perplexity(
        m, windows, progress=False, batch_size=2, chunk=None)
    assert window_nll(m, windows[:1], chunk=3) == window_nll(m, windows[:1], chunk=None)


def _gemma3(softcap=None):
    torch.manual_seed(0)
    cfg = transformers.Gemma3TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                        max_position_embeddings=64, sliding_window=8,
                                        final_logit_softcapping=softcap)
    return transformers.Gemma3ForCausalLM(cfg).eval()


def _head_rows(model):
    """Records how many positions each call of the model's output head computes."""
    rows = []
    model.get_output_embeddings().register_forward_hook(lambda m, i, o: rows.append(i[0].shape[-2]))
    return rows


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_perplexity_never_holds_whole_logits_and_matches(softcap):
    """The chunked path computes the head on at most ``chunk`` positions per call (plus one for the check of the
    model's own post-processing) and gives the plain path's NLL bit for bit, Gemma's soft-capping included."""
    m = _gemma3(softcap)
    windows = _tokens(2, 40, seed=4)
    ref = window_nll(m, windows, chunk=None)
    rows = _head_rows(m)
    assert window_nll(m, windows, chunk=16) == ref
    assert max(rows) <= 16 + 15 and sum(rows) == 39 + 2  # 39 scored positions; the last one twice, for the check
    rows.clear()
    window_nll(m, windows, chunk=None)
    assert rows == [40]  # negative control: the plain path does hold all positions


class _Doubled(transformers.LlamaForCausalLM):
    """A causal LM with a post-processing of its logits that the chunked path does not know."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 2.0
        return out


def test_unknown_logit_post_processing_falls_back_to_plain_path():
    base = _llama()
    m = _Doubled(base.config).eval()
    m.load_state_dict(base.state_dict())
    windows = _tokens(1, 30, seed=5)
    logits = m(input_ids=windows).logits[:, :-1]
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB).float(), windows[0, 1:], reduction="sum")
    nll, n = window_nll(m, windows, chunk=4)
    assert n == 29 and nll == float(expected.double())
    assert nll != window_nll(base, windows, chunk=4)[0]  # the doubling does change the NLL


# ------------------------------------------------------------------------------------------- materialize


def _in_mapping(ptr, mappings):
    return any(a <= ptr < b for a, b in mappings)


@pytest.mark.filterwarnings("ignore:no tokenizer files")
@pytest.mark.parametrize("tie", [False, True])
def test_materialize_keeps_values_and_leaves_the_mapping(tmp_path, tie):
    src = _llama(tie=tie)
    src.save_pretrained(tmp_path)  # model.safetensors
    mapped, _ = load_model(tmp_path, materialize=False)
    ours, _ = load_model(tmp_path, materialize=True)
    sm, so = mapped.state_dict(), ours.state_dict()
    assert sm.keys() == so.keys() and all(torch.equal(sm[k], so[k]) for k in sm)
    assert all(torch.equal(sm[k], v) for k, v in src.state_dict().items())
    mappings = _file_mappings()
    if not mappings:
        pytest.skip("no /proc/self/maps here: materialize copies nothing")
    assert not any(_in_mapping(p.untyped_storage().data_ptr(), mappings) for p in ours.parameters())
    if tie:
        assert ours.lm_head.weight is ours.model.embed_tokens.weight
    # a second call finds nothing left to copy; calling it on the mapped model copies what the mapping held
    assert materialize_mapped_tensors(ours) == 0
    ids = {k: id(p) for k, p in mapped.named_parameters()}
    held = sum(_in_mapping(p.untyped_storage().data_ptr(), mappings) for p in mapped.parameters())
    copied = materialize_mapped_tensors(mapped)
    assert (copied > 0) == (held > 0)
    assert {k: id(p) for k, p in mapped.named_parameters()} == ids  # the same Parameter objects
    sm2 = mapped.state_dict()
    assert all(torch.equal(sm2[k], so[k]) for k in so)
    with torch.no_grad():
        x = _tokens(1, 12)
        assert torch.equal(mapped(x).logits, ours(x).logits)


def test_release_free_memory_changes_nothing():
    m = _llama()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    pipeline.release_free_memory()
    pipeline.release_free_memory()
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
