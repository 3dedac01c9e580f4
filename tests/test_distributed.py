"""Data-parallel calibration of the streamed quantizer on torch.distributed (gloo, CPU, two processes).

What holds, and what is checked: ranks own contiguous runs of the one-process Hessian batches (a Gram product every
4096 rows), each rank keeps its batches' float32 Gram products, and the reduction adds them in the one-process
order (rank 0 → 1 → broadcast), so the Hessian each linear is quantized with, and the whole GPTQ checkpoint, are bit
for bit the one-process ones — with ``seq`` and ``fptarget`` (cross products) too. Controls: the old all-reduce of
per-rank Hessians (the split ignoring the batches) gives Hessians equal only to float rounding, and another
calibration set gives another checkpoint. RTN, which needs no calibration, is bit-identical under torchrun. Synthetic
random weights: exactness only, never accuracy.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
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

from hadakit.io.streaming import hessian_batches, split_windows  # noqa: E402
from hadakit.io.synthetic import write_synthetic_model  # noqa: E402
from hadakit.quantization.calibrate import BatchLogHessian  # noqa: E402
from hadakit.quantization.gptq import HessianAccumulator  # noqa: E402

VOCAB = 500
GPTQ = "w4a16_g128:none:gptq"
FLUSH = 256  # HessianAccumulator.flush_rows in the children (4096 by default): several batches from few windows
N_WINDOWS, WINDOW = 17, 32  # 544 rows: one-process batches of windows [0, 8), [8, 16), [16, 17)

_CHILD = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    rank, world, init, model_dir, out, recipe, mode, seed = sys.argv[1:9]
    rank, world = int(rank), int(world)
    import hadakit.io.streaming as S
    import hadakit.quantization.pipeline as P
    from hadakit.quantization.gptq import HessianAccumulator
    HessianAccumulator.flush_rows = %d  # a child process of its own: both runs alike
    if world > 1:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    if mode == "allreduce":  # the control: an even window split and an all-reduce of per-rank Hessians
        S.split_windows = lambda rows, world: None
    dumps = {"used": {}, "cross": {}}
    replace = P._replace
    def spy(model, name, mod, recipe, report, hessian=None, cross=None, **kw):
        if hessian is not None and ".layers.0." in name:
            dumps["used"][name] = hessian.clone()
            if cross is not None:
                dumps["cross"][name] = cross.clone()
        return replace(model, name, mod, recipe, report, hessian=hessian, cross=cross, **kw)
    P._replace = spy
    S._replace = spy
    calib = torch.randint(0, %d, (%d, %d), generator=torch.Generator().manual_seed(int(seed)))
    S.stream_quantize(model_dir, recipe, out, calib=calib, progress=None)
    if rank == 0:
        torch.save(dumps, out + ".hessians.pt")
    if world > 1:
        dist.destroy_process_group()
""" % (FLUSH, VOCAB, N_WINDOWS, WINDOW))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    dims = dict(hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2, vocab=VOCAB)
    return write_synthetic_model(root / "m", arch="qwen2", size=dims, shard_size="1MB", tokenizer=True).path


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(model_dir: Path, out: Path, recipe: str, world: int, mode: str = "ordered", seed: int = 1) -> dict:
    init = f"file://{out.parent / (out.name + '.rendezvous')}"
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, str(r), str(world), init, str(model_dir), str(out),
                               recipe, mode, str(seed)], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
             for r in range(world)]
    for p in procs:
        _, err = p.communicate(timeout=900)  # a bound for a loaded machine, not a timing check
        assert p.returncode == 0, err[-3000:]
    return torch.load(str(out) + ".hessians.pt")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_batches_and_split_follow_the_accumulator():
    # hessian_batches predicts the accumulator's own flushes (window ends, every flush_rows rows)
    rows = [100, 3000, 1000, 5000, 10, 4096, 7]
    acc = BatchLogHessian(4)
    for r in rows:
        acc.add(torch.randn(r, 4, generator=torch.Generator().manual_seed(r)))
    acc._flush()
    batches = hessian_batches(rows)
    assert [n for n, _, _ in acc.batches] == [sum(rows[a:b]) for a, b in batches]
    assert batches == [(0, 3), (3, 4), (4, 6), (6, 7)]
    split = split_windows(rows, 2)
    assert split == [(0, 4), (4, 7)] and split_windows(rows, 5) is None
    assert hessian_batches([WINDOW] * N_WINDOWS, FLUSH) == [(0, 8), (8, 16), (16, 17)]
    # replaying the batches reproduces the plain accumulator bit for bit; one batch fewer does not (control)
    plain = HessianAccumulator(4)
    for r in rows:
        plain.add(torch.randn(r, 4, generator=torch.Generator().manual_seed(r)))
    h = torch.zeros(4, 4, dtype=torch.float64)
    head, tail = acc.batches[:2], acc.batches[2:]
    acc.batches = head
    count = acc.replay(h, None, 0)
    acc.batches = tail
    acc.replay(h, None, count)
    assert torch.equal(acc.h, plain.h) and acc.count == plain.count
    acc.batches = tail
    acc.replay(torch.zeros(4, 4, dtype=torch.float64), None, 0)
    assert not torch.equal(acc.h, plain.h)


@pytest.mark.parametrize("recipe", [GPTQ, "w4a16_g128:random:gptq:seq,fptarget"])
def test_two_ranks_bit_identical_to_one(model_dir, tmp_path, recipe):
    one = _run(model_dir, tmp_path / "one", recipe, 1)
    two = _run(model_dir, tmp_path / "two", recipe, 2)
    assert set(one["used"]) == set(two["used"]) and len(one["used"]) == 7
    for name in one["used"]:
        assert torch.equal(two["used"][name], one["used"][name]), name
    assert set(one["cross"]) == set(two["cross"]) and len(one["cross"]) == (7 if "fptarget" in recipe else 0)
    for name in one["cross"]:
        assert torch.equal(two["cross"][name], one["cross"][name]), name
    a = load_file(str(tmp_path / "one" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    meta = [json.loads((tmp_path / d / "hadakit.json").read_text()) for d in ("one", "two")]
    assert meta[0] == meta[1]  # (recipe_sha256 too: a recipes.py edit between the two runs would show here)


def test_controls_differ(model_dir, tmp_path):
    one = _run(model_dir, tmp_path / "one", GPTQ, 1)
    # the unordered all-reduce: the same Hessians to float rounding, not bit for bit
    red = _run(model_dir, tmp_path / "red", GPTQ, 2, mode="allreduce")
    assert all(_rel(red["used"][k], h) < 1e-6 for k, h in one["used"].items())
    assert any(not torch.equal(red["used"][k], h) for k, h in one["used"].items())
    # another calibration set: other Hessians, other codes
    other = _run(model_dir, tmp_path / "other", GPTQ, 2, seed=2)
    assert all(_rel(other["used"][k], h) > 1e-3 for k, h in one["used"].items())
    a = load_file(str(tmp_path / "one" / "model.safetensors"))
    b = load_file(str(tmp_path / "other" / "model.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a if ".qweight." in k)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_cli_rtn_bit_identical(model_dir, tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    if not Path(torchrun).exists():
        pytest.skip("torchrun is not installed next to this Python")
    args = ["quantize", "--model", str(model_dir), "--stream", "--recipe", "w4a16_g128:random:rtn", "--store", "fp32"]
    res = subprocess.run([torchrun, "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port",
                          str(_free_port()), "-m", "hadakit.cli.main", *args, "--out", str(tmp_path / "two")],
                         env=_env(), capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    from hadakit.cli.main import main

    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    a, b = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / "two" / "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
