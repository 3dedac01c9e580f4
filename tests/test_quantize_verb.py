"""``hadakit.api.quantize``: the public verb over the private pipeline.

Tiny seeded random transformers models built from configs (no download); text goes through the real tokenizer of
the all-MiniLM-L6-v2 package. Every quantized result is compared bit for bit.
"""

import copy
import doctest
import logging
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hadakit.quantization import pipeline  # noqa: E402
from hadakit.io.texts import document_windows, text_calibration_windows  # noqa: E402
from hadakit.quantization.pipeline import QuantizationReport, prepare_calibration, quantize_model  # noqa: E402
from hadakit.quantization.qlinear import RotatedQuantLinear  # noqa: E402
from hadakit.quantization.recipes import get_recipe  # noqa: E402
from hadakit.api import quantize  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

VOCAB = 30522  # the MiniLM (BERT WordPiece) tokenizer's vocabulary
GPTQ = "w4a16:random:gptq"

TEXT = " ".join(
    f"Sentence {i}: the rotation spreads the outliers of layer {i % 7} across all channels, so that a four bit "
    f"grid with one scale per row loses less of what matters; calibration then fits the rounding to the inputs."
    for i in range(40))


def _tiny(arch: str = "llama", vocab: int = VOCAB):
    torch.manual_seed(0)
    if arch == "gpt2":  # Conv1D linears; the attention mask reaches its blocks positionally
        cfg = transformers.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=64)
        return transformers.GPT2LMHeadModel(cfg).eval()
    if arch == "bert":  # bidirectional encoder; its layers get the mask positionally too
        cfg = transformers.BertConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=64)
        return transformers.BertModel(cfg).eval()
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def llama():
    return _tiny("llama")


@pytest.fixture(scope="module")
def tok(minilm_dir):
    return transformers.AutoTokenizer.from_pretrained(minilm_dir)


def _tokens(n=3, length=24, seed=1, vocab=VOCAB):
    return torch.randint(5, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a, b) -> bool:
    sa, sb = (m.state_dict() if isinstance(m, torch.nn.Module) else m for m in (a, b))
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _verb(model, recipe, calibration=None, **kw):
    m = copy.deepcopy(model)
    kw.setdefault("progress", False)
    return m, quantize(m, recipe, calibration, **kw)


def _pipe(model, recipe, **kw):
    m = copy.deepcopy(model)
    return m, quantize_model(m, get_recipe(recipe), **kw)


# --------------------------------------------------------------------------------------------- recipe, pipeline


def test_string_recipe_equals_recipe_object(llama):
    calib = _tokens()
    a, ra = _verb(llama, GPTQ, calib)
    b, rb = _verb(llama, get_recipe(GPTQ), calib)
    assert isinstance(ra, QuantizationReport) and ra.recipe == rb.recipe
    assert _same(a, b)
    assert any(isinstance(m, RotatedQuantLinear) for m in a.modules())
    # the private pipeline takes a string too now (it raised AttributeError)
    c = copy.deepcopy(llama)
    quantize_model(c, GPTQ, calib=calib)
    assert _same(a, c)


@pytest.mark.parametrize("spec", [GPTQ, "w4a16:block-32:gptq:seq,actorder", "w4a16:random:gptq:fptarget",
                                  "w8a8:random:rtn"])
def test_verb_equals_the_private_pipeline_bit_for_bit(llama, spec):
    calib = _tokens()
    a, ra = _verb(llama, spec, calib if get_recipe(spec).needs_calibration else None)
    b, rb = _pipe(llama, spec, calib=calib if get_recipe(spec).needs_calibration else None)
    assert _same(a, b)
    assert ra.quantized == rb.quantized and ra.weight_bits == rb.weight_bits
    ids = _tokens(1, 16, seed=9)
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


def test_same_length_windows_as_a_list_equal_the_tensor(llama):
    # the variable-length path (a list of windows) computes exactly what the [n, L] tensor path computes
    calib = _tokens()
    a, _ = _pipe(llama, GPTQ, calib=calib)
    b, _ = _pipe(llama, GPTQ, calib=list(calib))
    c, _ = _pipe(llama, GPTQ, calib=calib, attention_mask=torch.ones_like(calib))
    assert _same(a, b) and _same(a, c)


# ------------------------------------------------------------------------------------------ calibration kinds


def test_text_file_and_path_string_give_the_same_windows(llama, tok, tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(TEXT)
    kw = dict(tokenizer=tok, calib_windows=3, calib_len=20)
    a, ra = _verb(llama, GPTQ, TEXT, **kw)
    b, rb = _verb(llama, GPTQ, path, **kw)
    c, rc = _verb(llama, GPTQ, str(path), **kw)
    assert _same(a, b) and _same(a, c)
    assert (ra.calib_source, rb.calib_source, rc.calib_source) == ("text", "file", "file")
    assert rb.calib_path == str(path) and ra.calib_path is None
    # the windows are text_calibration_windows' (MiniLM's tokenizer has no BOS: none is added)
    want = text_calibration_windows(tok, TEXT, n_windows=3, window=20, add_bos=False)
    d, _ = _pipe(llama, GPTQ, calib=want)
    assert _same(a, d)
    assert ra.calibration_info() == dict(source="text", path=None, n_windows=3, window=20, tokens=60, padded=0)
    # another seed draws other windows
    e, _ = _verb(llama, GPTQ, TEXT, seed=1, **kw)
    assert not _same(a, e)


def test_text_windows_default_to_the_recipe(llama, tok):
    recipe = get_recipe(GPTQ, calib_windows=2, calib_len=24)
    _, rep = _verb(llama, recipe, TEXT, tokenizer=tok)
    assert (rep.calib_windows, rep.calib_len, rep.calib_tokens) == (2, 24, 48)


def test_documents_are_one_padded_window_each(llama, tok):
    docs = ["A short document about rotations.", TEXT[:400], "Quantization keeps four bits of every weight."]
    a, ra = _verb(llama, GPTQ, docs, tokenizer=tok, calib_len=40)
    enc = document_windows(tok, docs, window=40, add_bos=False)
    lengths = enc["attention_mask"].sum(1)
    assert enc["input_ids"].shape == (3, 40) and lengths[1] == 40 and lengths[0] < 40
    b, _ = _pipe(llama, GPTQ, calib=enc["input_ids"], attention_mask=enc["attention_mask"])
    c, _ = _pipe(llama, GPTQ, calib=[row[:n] for row, n in zip(enc["input_ids"], lengths)])
    assert _same(a, b) and _same(a, c)
    assert (ra.calib_source, ra.calib_windows, ra.calib_len, ra.calib_tokens, ra.calib_padded) == \
        ("documents", 3, 40, int(lengths.sum()), 2)
    d, rd = _verb(llama, GPTQ, docs, tokenizer=tok, calib_len=40, calib_windows=2)  # the first two documents
    assert rd.calib_windows == 2 and not _same(a, d)


def test_token_forms(llama, tok):
    calib = _tokens()
    a, ra = _verb(llama, GPTQ, calib)
    b, _ = _verb(llama, GPTQ, {"input_ids": calib})
    c, _ = _verb(llama, GPTQ, (calib, torch.ones_like(calib)))
    d, _ = _verb(llama, GPTQ, calib.to(torch.int32))
    assert _same(a, b) and _same(a, c) and _same(a, d)
    assert (ra.calib_source, ra.calib_windows, ra.calib_len, ra.calib_tokens) == ("tokens", 3, 24, 72)
    # a tokenizer's padded batch (a BatchEncoding with token_type_ids) is taken as it is
    enc = tok([TEXT[:120], TEXT[:300]], padding=True, return_tensors="pt")
    e, re_ = _verb(llama, GPTQ, enc)
    n = enc["attention_mask"].sum(1)
    f, _ = _pipe(llama, GPTQ, calib=[enc["input_ids"][j, :n[j]] for j in range(2)])
    assert _same(e, f) and re_.calib_tokens == int(n.sum()) and re_.calib_padded == 1


def test_rtn_needs_no_calibration_and_ignores_one(llama):
    a, ra = _verb(llama, "w8a8:random:rtn")
    assert ra.calibration_info() is None and ra.calib_source is None
    with pytest.warns(UserWarning, match="needs no calibration"):
        b, rb = _verb(llama, "w8a8:random:rtn", _tokens())
    assert _same(a, b) and rb.calib_windows == 0


def test_progress_goes_to_the_logger_or_a_callable_never_to_print(llama, caplog, capsys):
    calib = _tokens()
    seen = []
    _verb(llama, GPTQ, calib, progress=seen.append)
    assert any("layer 2/2" in s for s in seen) and any("calibration: 3 windows" in s for s in seen)
    with caplog.at_level(logging.INFO, logger="hadakit"):
        _verb(llama, GPTQ, calib, progress=True, device="cpu")
    msgs = [r.getMessage() for r in caplog.records if r.name == "hadakit"]
    assert any("layer 1/2" in m for m in msgs) and all(r.levelno == logging.INFO for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hadakit"):
        _verb(llama, GPTQ, calib, progress=False)
    assert not [r for r in caplog.records if r.name == "hadakit"]
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_the_docstring_example_runs():
    import hadakit.api as verbs

    result = doctest.testmod(verbs, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


# --------------------------------------------------------------------------------------------------- bad input


def _bad(llama, tok):
    calib = _tokens()
    return [
        (("w5a5",), {}, ValueError, "unknown recipe"),
        ((42,), {}, TypeError, "recipe string .* or a hadakit QuantRecipe"),
        ((GPTQ, 3.5), {}, TypeError, "calibration must be None, a text str"),
        ((GPTQ, TEXT), {}, ValueError, "needs the model's tokenizer"),
        ((GPTQ, ["a doc"]), {}, ValueError, "needs the model's tokenizer"),
        ((GPTQ, []), {"tokenizer": tok}, ValueError, "empty list"),
        ((GPTQ, ["ok", 3]), {"tokenizer": tok}, TypeError, "item 1 is a int"),
        ((GPTQ, ["ok", "   "]), {"tokenizer": tok}, ValueError, r"documents\[1\] is empty"),
        ((GPTQ, ""), {"tokenizer": tok}, ValueError, "empty str"),
        ((GPTQ, "too short"), {"tokenizer": tok}, ValueError, "fewer than one window"),
        ((GPTQ,), {}, ValueError, "needs calibration data: pass calibration="),
        ((GPTQ, calib.float()), {}, TypeError, "integer token ids"),
        ((GPTQ, calib[0]), {}, ValueError, r"2-D tensor .* ids\[None\]"),
        ((GPTQ, calib[None]), {}, ValueError, "2-D tensor"),
        ((GPTQ, (calib, torch.ones(3, 23))), {}, ValueError, "attention_mask has shape"),
        ((GPTQ, (calib, torch.full_like(calib, 2))), {}, ValueError, "only 0"),
        ((GPTQ, (calib, torch.zeros_like(calib))), {}, ValueError, "no real token"),
        ((GPTQ, {"input_ids": calib, "labels": calib}), {}, ValueError, "unknown keys"),
        ((GPTQ, {"attention_mask": calib}), {}, ValueError, "needs 'input_ids'"),
        ((GPTQ, (calib,)), {}, TypeError, r"\(input_ids, attention_mask\)"),
        ((GPTQ, calib + VOCAB), {}, ValueError, "outside the model's vocabulary"),
        ((GPTQ, calib), {"calib_len": 8}, ValueError, "used as given"),
        ((GPTQ, TEXT), {"tokenizer": tok, "calib_windows": 0}, ValueError, "positive int"),
        ((GPTQ, calib), {"progress": "yes"}, TypeError, "progress must be"),
        ((GPTQ, calib), {"device": "nonsense"}, ValueError, "not a device"),
        (("w4a16_g128:random:rtn",), {}, ValueError, "group size 128 does not divide"),
        (("w4a16:block-128:gptq", calib), {}, ValueError, "block size 128 does not divide"),
    ]


def test_bad_inputs_raise_named_errors_before_any_work(llama, tok, monkeypatch):
    before = _state(llama)
    calls = []
    monkeypatch.setattr(pipeline, "_calibrate_layerwise", lambda *a, **k: calls.append(1))
    for args, kw, exc, match in _bad(llama, tok):
        with pytest.raises(exc, match=match):
            quantize(llama, *args, **{"progress": False, **kw})
        assert not calls, args
        assert not any(isinstance(m, RotatedQuantLinear) for m in llama.modules()), args
    assert _same(llama, before)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        quantize("model", GPTQ, _tokens())
    with pytest.raises(FileNotFoundError):
        quantize(llama, GPTQ, Path("/nonexistent/calib.txt"), tokenizer=tok)


def test_the_pipeline_checks_calibration_first_too(llama):
    m = copy.deepcopy(llama)
    for calib, mask, exc in [(_tokens().float(), None, TypeError), (_tokens(), torch.ones(2, 24), ValueError),
                             ([], None, ValueError), ([torch.ones(2, 3, dtype=torch.long)], None, ValueError),
                             (None, torch.ones(3, 24), ValueError)]:
        with pytest.raises(exc):
            quantize_model(m, get_recipe(GPTQ), calib=calib, attention_mask=mask)
    with pytest.raises(ValueError, match="needs calibration windows"):
        quantize_model(m, get_recipe("w4a16:random:gptq:fusevo"))  # refused before the fusion changes m
    assert _same(m, llama)
    # kvcenter calibrates on masked-free windows: holes among its first windows are refused up front
    mask = torch.ones(3, 24, dtype=torch.long)
    mask[0, 5] = 0
    with pytest.raises(ValueError, match="kvcenter"):
        prepare_calibration(_tokens(), mask, kv_windows=8)


# --------------------------------------------------------------------------------------- padding and masks


def _pad(windows, length, pad_id, left=False):
    ids = torch.full((len(windows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(windows), length), dtype=torch.long)
    for j, w in enumerate(windows):
        sl = slice(length - len(w), length) if left else slice(0, len(w))
        ids[j, sl], mask[j, sl] = w, 1
    return ids, mask


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_padded_windows_with_their_mask_equal_the_unpadded_windows(arch):
    # windows of 24 and 16 tokens, the short one padded to 24: with the mask, exactly the weights the two windows
    # give unpadded (each window runs alone and padding is cut off, so this holds bit for bit); without it the
    # pad tokens are calibrated on and the weights differ
    model = _tiny(arch, vocab=96)
    long_, short = _tokens(1, 24, seed=3, vocab=96)[0], _tokens(1, 16, seed=4, vocab=96)[0]
    spec = "w4a16:random:gptq:fptarget"
    ref, _ = _pipe(model, spec, calib=[long_, short])
    for left in (False, True):
        ids, mask = _pad([long_, short], 24, pad_id=0, left=left)
        got, rep = _verb(model, spec, {"input_ids": ids, "attention_mask": mask})
        assert _same(ref, got), (arch, left)
        assert (rep.calib_windows, rep.calib_len, rep.calib_tokens, rep.calib_padded) == (2, 24, 40, 1)
    unmasked, rep = _verb(model, spec, ids)
    assert not _same(ref, unmasked)
    assert rep.calib_tokens == 48 and rep.calib_padded == 0


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_masked_holes_never_reach_the_statistics(arch, monkeypatch):
    # a window with holes runs with its mask: what the holes hold cannot change the weights (the mask reaches the
    # layers, including GPT-2's and BERT's positional masks, and the holes' rows are dropped from the Hessians and
    # samples); counting the holes as real tokens changes them
    model = _tiny(arch, vocab=96)
    ids = _tokens(3, 24, seed=5, vocab=96)
    mask = torch.ones_like(ids)
    mask[0, 6:9] = 0
    mask[2, 1] = 0
    other = ids.clone()
    other[mask == 0] = (other[mask == 0] + 17) % 96
    spec = "w4a4:random:gptq:smooth=search,aclip=search,seq" if arch == "llama" else "w4a16:random:gptq:fptarget"
    if arch == "llama":  # int4_g128 activations need 128 columns: w4a4 with 32-groups here
        spec = get_recipe(spec, weight="int4_g32", act="int4")
    a, rep = _verb(model, spec, (ids, mask))
    b, _ = _verb(model, spec, (other, mask))
    assert _same(a, b)
    assert rep.calib_tokens == 72 - 4 and rep.calib_padded == 2
    c, _ = _verb(model, spec, (ids, torch.ones_like(mask)))
    assert not _same(a, c)
    # the rows recorded are exactly the real ones
    counts = []
    real = pipeline.InputStats.add

    def spy(self, x, ref=None):
        counts.append(x.reshape(-1, x.shape[-1]).shape[0])
        return real(self, x, ref)

    monkeypatch.setattr(pipeline.InputStats, "add", spy)
    _verb(model, spec, (ids, mask))
    assert counts and set(counts[:3]) == {24 - 3, 24, 24 - 1}


def test_capture_layer_inputs_keeps_its_contract(llama):
    layers = pipeline.find_decoder_layers(llama)
    calib = _tokens()
    inputs, kwargs = pipeline.capture_layer_inputs(llama, layers, calib)
    assert len(inputs) == 3 and len(kwargs) == 2 and isinstance(kwargs[0], dict)
    ids, mask = _pad([calib[0], calib[1, :10]], 24, pad_id=0)
    with pytest.raises(ValueError, match="capture_window_inputs"):
        pipeline.capture_layer_inputs(llama, layers, ids, mask)
    inputs, kwargs = pipeline.capture_window_inputs(llama, layers, prepare_calibration(ids, mask))
    assert [x.shape[1] for x in inputs] == [24, 10] and len(kwargs[0]) == 2
