"""hadakit.training with DistributedDataParallel and FSDP2 (fully_shard): 2 CPU processes, gloo."""

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

STEPS = 4


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))  # fail instead of hanging
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    from hadakit.training import QuantLinear, convert

    results = {}
    for mode in ("ddp", "fsdp2"):
        torch.manual_seed(0)  # same initial weights and SR / sign draws on every rank
        model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        convert(model, "mxfp4", verbose=False)
        assert isinstance(model[0], QuantLinear)
        if mode == "ddp":
            wrapped = DDP(model)
        else:
            mesh = init_device_mesh("cpu", (world,))
            fully_shard(model[0], mesh=mesh)
            fully_shard(model[2], mesh=mesh)
            wrapped = fully_shard(model, mesh=mesh)
        opt = torch.optim.SGD(wrapped.parameters(), lr=0.05)
        g = torch.Generator().manual_seed(100 + rank)  # each rank its own data
        x, y = torch.randn(4, 16, 32, generator=g), torch.randn(4, 16, 32, generator=g)
        losses, grads = [], []
        for _ in range(STEPS):
            loss = (wrapped(x) - y).square().mean()
            opt.zero_grad()
            loss.backward()
            grads.append([(p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
                          for p in wrapped.parameters()])
            opt.step()
            losses.append(loss.item())
        results[mode] = {"losses": losses, "grads": grads}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_ddp_and_fsdp2_with_quantized_recipe(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for mode in ("ddp", "fsdp2"):
        for step in range(STEPS):
            for a, b in zip(r0[mode]["grads"][step], r1[mode]["grads"][step]):
                assert torch.equal(a, b), f"{mode}: gradients differ across ranks at step {step}"
        for r in (r0, r1):
            assert r[mode]["losses"][-1] < r[mode]["losses"][0], f"{mode}: loss did not decrease"
    # FSDP2 computes the same training run as DDP (sharding changes no numerics of the quantized products)
    for step in range(STEPS):
        for a, b in zip(r0["ddp"]["grads"][step], r0["fsdp2"]["grads"][step]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        assert abs(r0["ddp"]["losses"][step] - r0["fsdp2"]["losses"][step]) < 1e-5
