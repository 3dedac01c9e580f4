"""Layer-streamed quantization from disk (hadakit.io.streaming): bit-identical to the in-memory path, less memory.

Synthetic models have random weights: these tests check exactness and memory, never accuracy.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("safetensors")

from safetensors.torch import load_file  # noqa: E402

from hadakit.io.checkpoint import load_quantized_model, save_quantized_model  # noqa: E402
from hadakit.io.loading import load_model  # noqa: E402
from hadakit.io.streaming import StreamingUnsupported, estimate_stream_memory, stream_quantize  # noqa: E402
from hadakit.io.synthetic import write_synthetic_model  # noqa: E402
from hadakit.quantization.pipeline import quantize_model  # noqa: E402
from hadakit.quantization.recipes import get_recipe  # noqa: E402

VOCAB = 16000
DIMS = dict(hidden=256, intermediate=768, layers=3, heads=4, kv_heads=2, vocab=VOCAB)  # ~21 MB of bf16
SLIDING = 8  # the Gemma 3 model's sliding window: shorter than the windows below, so it masks something


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    out = {}
    # qwen2: q/k/v biases and tied embeddings; gemma3: q/k norms, four norms a layer, a scaled tied embedding, and
    # sliding-window layers (window 8, shorter than the calibration windows) before a global one
    for arch in ("llama", "qwen2", "gemma3"):
        info = write_synthetic_model(root / arch, arch=arch, size=DIMS, shard_size="4MB", seed=3,
                                     sliding_window=SLIDING if arch == "gemma3" else None)
        assert info.shard_count > 2  # the layers really come from several shards
        out[arch] = info.path
    return out


def _calib(n=4, length=24):
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(1))


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    return load_file(str(d / "model.safetensors"))


def _differences(a: dict, b: dict) -> list[str]:
    if set(a) != set(b):
        return sorted(set(a) ^ set(b))
    return [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]


def _in_memory(model_dir: Path, recipe, calib, out: Path):
    model, tok = load_model(model_dir)
    report = quantize_model(model, recipe, calib=calib)
    save_quantized_model(model, tok, recipe, out)
    return model, report


@pytest.mark.parametrize("arch,recipe", [
    ("llama", "w4a16_g128:none:rtn"),
    ("llama", "w4a16_g128:none:gptq"),
    ("qwen2", "w4a16_g128:block-128:gptq"),
    ("qwen2", "w4a4:random:gptq"),
    ("llama", "w4a16_g128:random:gptq:seq,fptarget"),
    ("qwen2", "w4a16_g128:random:rtn:store=bf16"),
    ("gemma3", "w4a16_g128:random:rtn"),
    ("gemma3", "w4a16_g128:none:gptq"),
    ("gemma3", "w4a16_g128:random:gptq:seq,fptarget"),
])
def test_streamed_checkpoint_is_bit_identical(models, tmp_path, arch, recipe):
    recipe = get_recipe(recipe)
    calib = _calib() if recipe.linears_need_calibration else None
    streamed = stream_quantize(models[arch], recipe, tmp_path / "s", calib=calib, device="cpu")
    model, report = _in_memory(models[arch], recipe, calib, tmp_path / "m")
    a, b = _tensors(tmp_path / "s"), _tensors(tmp_path / "m")
    assert _differences(a, b) == []
    assert any(k.endswith(".qweight.payload") or ".qweight." in k for k in a)  # packed weights were compared
    assert streamed.quantized == report.quantized and streamed.skipped == report.skipped
    assert streamed.weight_bits == report.weight_bits and streamed.stored_rounded == report.stored_rounded
    ma, mb = (json.loads((tmp_path / d / "hadakit.json").read_text()) for d in ("s", "m"))
    assert ma["linears"] == mb["linears"] and ma["tied"] == mb["tied"] and ma["model_class"] == mb["model_class"]
    # hadakit.load reads it, and the loaded model computes what the in-memory quantized model computes
    loaded, _ = load_quantized_model(tmp_path / "s")
    ids = _calib(1, 16)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, load_quantized_model(tmp_path / "m")[0](ids).logits)
        if recipe.store_dtype is None:
            assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


def test_gemma3_model_has_sliding_and_global_layers(models):
    """The Gemma 3 config the bit-exactness test streams: both layer kinds, and the sliding window changes the
    outputs on windows longer than it (so the per-layer-type masks are exercised, not a no-op)."""
    from transformers import AutoModelForCausalLM

    cfg = json.loads((models["gemma3"] / "config.json").read_text())
    assert cfg["architectures"] == ["Gemma3ForCausalLM"] and cfg["tie_word_embeddings"]
    assert cfg["layer_types"] == ["sliding_attention", "sliding_attention", "full_attention"]
    model = AutoModelForCausalLM.from_pretrained(models["gemma3"], dtype=torch.float32)
    wide = AutoModelForCausalLM.from_pretrained(models["gemma3"], dtype=torch.float32, sliding_window=64)
    ids = _calib(1, 24)
    with torch.no_grad():
        a, b = model(ids).logits, wide(ids).logits
    assert torch.equal(a[:, :SLIDING], b[:, :SLIDING]) and not torch.allclose(a, b)


def test_comparison_can_fail(models, tmp_path):
    """Negative control: a streamed RTN checkpoint is not the in-memory GPTQ one (the comparison sees the weights)."""
    stream_quantize(models["llama"], "w4a16_g128:none:rtn", tmp_path / "s")
    _in_memory(models["llama"], get_recipe("w4a16_g128:none:gptq"), _calib(), tmp_path / "m")
    diff = _differences(_tensors(tmp_path / "s"), _tensors(tmp_path / "m"))
    assert diff and all(".qweight." in k for k in diff)


def test_refusals_and_budget(models, tmp_path):
    with pytest.raises(StreamingUnsupported, match="KV cache"):
        stream_quantize(models["llama"], "w4a4kv4:random:rtn", tmp_path / "a")
    with pytest.raises(StreamingUnsupported, match="fusevo"):
        stream_quantize(models["llama"], "w4a16_g128:random:rtn:fusevo", tmp_path / "b")
    with pytest.raises(ValueError, match="needs calibration"):
        stream_quantize(models["llama"], "w4a16_g128:none:gptq", tmp_path / "c")
    need = estimate_stream_memory(models["llama"], "w4a16_g128:none:gptq", 4, 24)
    assert need["hessian"] == 768 ** 2 * 8 and need["total"] == sum(v for k, v in need.items() if k != "total")
    with pytest.raises(ValueError, match="max_memory"):
        stream_quantize(models["llama"], "w4a16_g128:none:gptq", tmp_path / "d", calib=_calib(), max_memory=10**6)
    assert not any((tmp_path / n).exists() for n in "abcd")  # nothing written by a refused run


def test_cli_and_api_stream(models, tmp_path):
    from hadakit.api import quantize_streamed
    from hadakit.cli.main import main

    rc = main(["quantize", "--model", str(models["qwen2"]), "--stream", "--recipe", "w4a16_g128:none:rtn",
               "--store", "fp32", "--out", str(tmp_path / "cli")])
    assert rc == 0
    quantize_streamed(models["qwen2"], "w4a16_g128:none:rtn", None, tmp_path / "api", progress=False)
    assert _differences(_tensors(tmp_path / "cli"), _tensors(tmp_path / "api")) == []
    assert json.loads((tmp_path / "cli" / "hadakit.json").read_text())["streamed"] is True
    assert main(["quantize", "--model", str(models["qwen2"]), "--stream", "--recipe", "w4a16_g128:none:gptq",
                 "--out", str(tmp_path / "x")]) == 2  # no tokenizer for the calibration text: a clear error


_RSS = textwrap.dedent("""
    import sys, torch
    from pathlib import Path

    def hwm_mb():  # this process's own peak (VmHWM); ru_maxrss would carry the launching process's over exec
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) // 1024

    mode, model_dir, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    recipe = "w4a16_g128:none:rtn"
    import transformers, hadakit.io.streaming, hadakit.io.loading, hadakit.io.checkpoint
    from transformers import LlamaForCausalLM
    base = hwm_mb()  # the interpreter and libraries
    if mode == "stream":
        from hadakit.io.streaming import stream_quantize
        stream_quantize(model_dir, recipe, out)
    else:
        from hadakit.io.loading import load_model
        from hadakit.io.checkpoint import save_quantized_model
        from hadakit.quantization.pipeline import quantize_model
        from hadakit.quantization.recipes import get_recipe
        model, tok = load_model(model_dir, materialize=True)
        quantize_model(model, recipe, keep_dense=False)
        save_quantized_model(model, tok, get_recipe(recipe), out)
    print(base, hwm_mb())
""")


def test_streamed_peak_rss_below_in_memory(tmp_path):
    """A model of 24 layers (~310 MB in float32, each layer ~13 MB): the streamed run's peak RSS stays well below
    the in-memory run's (both RTN, in child processes, peak by getrusage)."""
    dims = dict(hidden=512, intermediate=1536, layers=24, heads=8, kv_heads=2, vocab=4000)
    info = write_synthetic_model(tmp_path / "big", arch="llama", size=dims, shard_size="20MB")
    fp32_mb = info.parameter_count * 4 / 2**20
    peaks = {}
    for mode in ("stream", "memory"):
        res = subprocess.run([sys.executable, "-c", _RSS, mode, str(info.path), str(tmp_path / mode)],
                             capture_output=True, text=True, timeout=300,
                             env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
        assert res.returncode == 0, res.stderr[-2000:]
        base, peak = map(int, res.stdout.split()[-2:])
        peaks[mode] = peak - base  # what the run added to the peak over the imports
    assert _differences(_tensors(tmp_path / "stream"), _tensors(tmp_path / "memory")) == []
    # the in-memory run holds the float32 model (fp32_mb); the streamed one about one layer of it (and the
    # float32 embedding and head, 16 MB here)
    assert peaks["stream"] < peaks["memory"] - 0.3 * fp32_mb, (peaks, fp32_mb)
