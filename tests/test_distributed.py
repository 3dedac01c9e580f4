"""Data-parallel calibration of the streamed quantizer on torch.distributed (gloo, CPU, two processes).

What holds, and what is checked: the windows are split across ranks and every statistic is all-reduced, so the
Hessians each linear is quantized with equal the one-process Hessians to float32 rounding (the Gram products are
summed in another grouping); GPTQ's greedy rounding turns those last-bit differences into different codes, so the
two-process GPTQ checkpoint is *not* bit-identical to the one-process one — it is an equally good quantization (same
proxy error within a few percent, far below RTN's). RTN, which needs no calibration, is bit-identical. Synthetic
random weights: exactness only, never accuracy.
"""

from __future__ import annotations

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

from hadakit.io.checkpoint import load_quantized_model  # noqa: E402
from hadakit.io.synthetic import write_synthetic_model  # noqa: E402
from hadakit.quantization.qlinear import RotatedQuantLinear  # noqa: E402

VOCAB = 500
GPTQ = "w4a16_g128:none:gptq"

_CHILD = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    rank, world, init, model_dir, out, recipe = sys.argv[1:7]
    rank, world = int(rank), int(world)
    import hadakit.io.streaming as S
    import hadakit.quantization.pipeline as P
    if world > 1:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    dumps = {"used": {}, "local": {}}
    replace = P._replace
    def spy(model, name, mod, recipe, report, hessian=None, **kw):
        if hessian is not None and ".layers.0." in name:
            dumps["used"][name] = hessian.clone()
        return replace(model, name, mod, recipe, report, hessian=hessian, **kw)
    P._replace = spy
    S._replace = spy
    reduce = S.all_reduce_stats
    def spy_reduce(stats):
        if not dumps["local"]:
            dumps["local"] = {k: s.h.clone() for k, s in stats.items() if s.h is not None}
        reduce(stats)
    S.all_reduce_stats = spy_reduce
    calib = torch.randint(0, %d, (6, 20), generator=torch.Generator().manual_seed(1))
    S.stream_quantize(model_dir, recipe, out, calib=calib, progress=None)
    if rank == 0:
        torch.save(dumps, out + ".hessians.pt")
    if world > 1:
        dist.destroy_process_group()
""" % VOCAB)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    dims = dict(hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2, vocab=VOCAB)
    return write_synthetic_model(root / "m", arch="qwen2", size=dims, shard_size="1MB", tokenizer=True).path


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(model_dir: Path, out: Path, recipe: str, world: int) -> dict:
    init = f"file://{out.parent / (out.name + '.rendezvous')}"
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, str(r), str(world), init, str(model_dir), str(out),
                               recipe], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(world)]
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
    return torch.load(str(out) + ".hessians.pt")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _proxy_errors(ckpt: Path, model_dir: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer-0 linear of checkpoint ``ckpt``: (dequantized weight, original weight from the shards), float64;
    the test scores them with GPTQ's objective ``tr((W-Q)·H·(W-Q)ᵀ) / tr(W·H·Wᵀ)``."""
    from hadakit.io.streaming import ShardReader

    model, _ = load_quantized_model(ckpt)
    reader = ShardReader(model_dir)
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, RotatedQuantLinear) and ".layers.0." in name:
            out[name] = (mod.packed.dequantize(torch.float64), reader.get(name + ".weight").double())
    return out


def test_two_ranks_match_one(model_dir, tmp_path):
    one = _run(model_dir, tmp_path / "one", GPTQ, 1)
    two = _run(model_dir, tmp_path / "two", GPTQ, 2)
    # the reduced Hessians are the one-process ones to float32 rounding; a single rank's own are not (control)
    assert set(one["used"]) == set(two["used"]) and len(one["used"]) == 7
    for name in one["used"]:
        assert _rel(two["used"][name], one["used"][name]) < 1e-6, name
    assert two["local"] and all(_rel(h, one["used"][k]) > 1e-3 for k, h in two["local"].items())
    a, b = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / "two" / "model.safetensors"))
    assert set(a) == set(b) and all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a)
    # everything but the packed weights (embedding, norms, biases) is bit-identical
    assert all(torch.equal(a[k], b[k]) for k in a if ".qweight." not in k)
    # same quality: GPTQ's proxy error on the one-process Hessian, 2 ranks vs 1 vs plain rounding of the same weights
    from hadakit.formats import quantize
    from hadakit.quantization.recipes import get_recipe

    scheme = get_recipe(GPTQ).weight_scheme()
    q1, q2 = _proxy_errors(tmp_path / "one", model_dir), _proxy_errors(tmp_path / "two", model_dir)
    for name, (w1, w) in q1.items():
        h = one["used"][name]
        err = lambda q: float(torch.trace((w - q) @ h @ (w - q).T) / torch.trace(w @ h @ w.T))  # noqa: E731
        rtn = quantize(w.float(), scheme).dequantize(torch.float64)
        e1, e2, er = err(w1), err(q2[name][0]), err(rtn)
        assert e2 < 1.1 * e1 and e2 < er, (name, e1, e2, er)


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
