"""The public verbs on a user's own model (issue 18): ``hadakit.quantize`` / ``save`` / ``load`` / ``export``, and the
CLI's single-run path (``hadakit quantize --recipe R --out D``, ``hadakit export``) as a thin layer over them.

The model is a seeded tiny Llama saved as a Hugging Face directory with a real tokenizer (``tiny_llama_dir`` in
conftest); what is checked are exact properties: logits bit for bit after a reload, packed weights in memory,
what ``recipe.json`` / ``hadakit.json`` record, and that the single run skips what it was not asked to do.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import hadakit  # noqa: E402
from hadakit.cli.main import main  # noqa: E402
from hadakit.io.texts import read_text  # noqa: E402
from hadakit.quantization.qlinear import RotatedQuantLinear  # noqa: E402

RECIPE = "w4a16_g128:hadamard:gptq"


def _model(d):
    model = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
    tok = transformers.AutoTokenizer.from_pretrained(d)
    return model, tok


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _ids(n=2, length=24, seed=1):
    return torch.randint(0, 30522, (n, length), generator=torch.Generator().manual_seed(seed))


def test_quantize_save_load_on_a_users_model(tiny_llama_dir, tmp_path):
    model, tok = _model(tiny_llama_dir)
    fp = _logits(model, _ids())
    report = hadakit.quantize(model, RECIPE, read_text("lear")[:20000], tokenizer=tok, calib_windows=4,
                              calib_len=32, progress=False)
    assert len(report.quantized) == 7 and report.calib_windows == 4
    ref = _logits(model, _ids())
    assert not torch.equal(ref, fp)  # it did quantize
    out = hadakit.save(model, tmp_path / "ckpt", tok)
    recipe = json.loads((out / "recipe.json").read_text())
    meta = json.loads((out / "hadakit.json").read_text())
    assert (recipe["calib_windows"], recipe["calib_len"], recipe["method"]) == (4, 32, "gptq")
    assert meta["calibration"]["source"] == "text" and meta["calibration"]["n_windows"] == 4
    loaded = hadakit.load(out)
    assert torch.equal(_logits(loaded, _ids()), ref)  # bit for bit, from the packed weights
    q = [m for m in loaded.modules() if isinstance(m, RotatedQuantLinear)]
    assert len(q) == 7 and all(m.packed_only for m in q)
    held = sum(m.state_nbytes() for m in q)
    fp32 = sum(m.in_features * m.out_features * 4 for m in q)
    assert held < 0.2 * fp32
    assert any(k.endswith("qweight.payload") for k in loaded.state_dict())
    cached = hadakit.load(out, cache_weights=True)
    assert torch.equal(_logits(cached, _ids()), ref)


def test_save_needs_a_model_quantized_by_hadakit(tiny_llama_dir, tmp_path):
    model, tok = _model(tiny_llama_dir)
    with pytest.raises(ValueError, match="not quantized by hadakit.quantize"):
        hadakit.save(model, tmp_path / "ckpt", tok)
    assert not (tmp_path / "ckpt").exists()


def test_export_verb_and_unknown_format(tiny_llama_dir, tmp_path):
    pytest.importorskip("compressed_tensors")
    model, tok = _model(tiny_llama_dir)
    hadakit.quantize(model, "w4a16_g128:none:rtn", progress=False)
    ckpt = hadakit.save(model, tmp_path / "ckpt", tok)
    with pytest.raises(ValueError, match="unknown export format 'gguf'"):
        hadakit.export(ckpt, tmp_path / "x", format="gguf")
    out = hadakit.export(ckpt, tmp_path / "ct")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["format"] == "pack-quantized"
    assert (out / "hadakit_export.json").is_file()


def _quantize_cli(d, out, *extra):
    return main(["quantize", "--model", str(d), "--recipe", RECIPE, "--calib-windows", "3", "--calib-len", "32",
                 "--text", "macbeth", "--windows", "2", "--window-len", "32", "--out", str(out), *extra])


def test_cli_single_run_skips_the_fp_model_and_records_what_ran(tiny_llama_dir, tmp_path, capsys):
    assert _quantize_cli(tiny_llama_dir, tmp_path / "ckpt", "--results", str(tmp_path / "res")) == 0
    printed = capsys.readouterr().out
    assert "fp " not in printed and "PPL" in printed and "peak memory (RSS)" in printed
    assert not (tmp_path / "res").exists()  # no comparison table is written
    recipe = json.loads((tmp_path / "ckpt" / "recipe.json").read_text())
    meta = json.loads((tmp_path / "ckpt" / "hadakit.json").read_text())
    assert (recipe["calib_windows"], recipe["calib_len"]) == (3, 32)
    assert meta["calibration"] == dict(source="tokens", path=None, n_windows=3, window=33, tokens=99, padded=0,
                                       text="lear")
    assert meta["fp_ppl"] is None and meta["ppl"] > 1
    assert recipe["store_dtype"] is None  # the source directory is fp32
    assert main(["eval", str(tmp_path / "ckpt")]) == 0
    assert "identical" in capsys.readouterr().out
    # asked for: the FP evaluation, and bf16 storage of the unquantized tensors
    assert _quantize_cli(tiny_llama_dir, tmp_path / "ckpt2", "--eval-fp", "--store", "bf16") == 0
    meta = json.loads((tmp_path / "ckpt2" / "hadakit.json").read_text())
    assert meta["fp_ppl"] > 1
    assert json.loads((tmp_path / "ckpt2" / "recipe.json").read_text())["store_dtype"] == "bf16"
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ckpt2" / "model.safetensors"), "pt") as f:
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "BF16"
    assert main(["eval", str(tmp_path / "ckpt2")]) == 0


def test_cli_single_run_flags_need_out(capsys):
    for flag in (["--samples"], ["--eval-fp"], ["--store", "bf16"], ["--format", "compressed-tensors"]):
        assert main(["quantize", "--recipe", RECIPE, *flag]) == 2
        assert "goes with --out DIR" in capsys.readouterr().err


def test_cli_export_and_quantize_straight_to_compressed_tensors(tiny_llama_dir, tmp_path, capsys):
    pytest.importorskip("compressed_tensors")
    assert _quantize_cli(tiny_llama_dir, tmp_path / "ckpt") == 0
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "ct")]) == 0
    assert "exported" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "ct")]) == 2  # exists, no --force
    assert "already exists" in capsys.readouterr().err
    assert _quantize_cli(tiny_llama_dir, tmp_path / "ct2", "--format", "compressed-tensors") == 0
    cfg = json.loads((tmp_path / "ct2" / "config.json").read_text())
    assert cfg["quantization_config"]["format"] == "pack-quantized"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "ct", "ct2"]  # no temporary checkpoint left
    # the export holds the same weights hadakit saved: the two CLI runs quantized identically
    a = (tmp_path / "ct" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "ct2" / "model.safetensors").read_bytes()
