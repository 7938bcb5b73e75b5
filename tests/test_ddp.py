"""DistributedDataParallel (gloo, 2 CPU processes) with frozen BatchNorm.

DDP's default syncs rank 0's buffers into every rank's at the start of each forward
(``forward_sync_buffers=True`` since torch 2.13, ``broadcast_buffers=True`` before). On older
torch that was an in-place copy, and a backward that had saved a
BatchNorm's running statistics (as an eval-mode BatchNorm's does) failed when two forwards
ran before one backward ("modified by an inplace operation", pytorch #22095).
frozennorm's backward saves only a per-channel scale it computes itself, never the buffers,
so this works whatever DDP does with them.
"""
from __future__ import annotations

import datetime
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from frozennorm import FrozenBatchNorm, assert_frozen, convert_frozen_bn

from model_helpers import randomize_norm_stats_

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

WORLD = 2


def small_net() -> nn.Module:
    # (DDP refuses a live SyncBatchNorm on CPU; frozen, it is an ordinary module)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 4, 1), nn.SyncBatchNorm(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 3),
        nn.BatchNorm1d(3))


def ddp(module: nn.Module) -> DDP:
    """DDP as built by default: buffers synced at each forward."""
    model = DDP(module)
    assert model.broadcast_buffers  # a property over forward_sync_buffers since torch 2.13
    return model


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).double() for t in tensors])


def _all_equal(t: torch.Tensor) -> bool:
    gathered = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, t)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def _two_forwards_one_backward(model: nn.Module, rank: int) -> None:
    g = torch.Generator().manual_seed(100 + rank)
    x1, x2 = torch.randn(4, 3, 6, 6, generator=g), torch.randn(4, 3, 6, 6, generator=g)
    loss = model(x1).square().mean() + model(x2).square().mean()
    loss.backward()


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        # different statistics on each rank: DDP makes them rank 0's at construction
        torch.manual_seed(0)
        net = randomize_norm_stats_(small_net(), seed=rank)
        convert_frozen_bn(net, strict=True)
        model = ddp(net)
        stats0 = _flat(model.buffers())
        with pytest.raises(TypeError, match="DistributedDataParallel"):
            convert_frozen_bn(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        model.train()
        for _ in range(2):
            opt.zero_grad()
            _two_forwards_one_backward(model, rank)
            opt.step()
        assert_frozen(model)
        stats = _flat(model.buffers())
        params = _flat(model.parameters())
        result = {
            "stats_equal_across_ranks": _all_equal(stats),
            "stats_unchanged": torch.equal(stats, stats0),
            "params_equal_across_ranks": _all_equal(params),
            "frozen_layers": sum(isinstance(m, FrozenBatchNorm) for m in net.modules()),
        }

        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
        # both ranks done with every collective before either tears gloo down (a rank that
        # closed its connections while the other was still finishing aborted it, once)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_buffer_sync_two_forwards_one_backward(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["frozen_layers"] == 4
        assert result["stats_equal_across_ranks"] and result["stats_unchanged"]
        assert result["params_equal_across_ranks"]


@pytest.mark.parametrize("frozen", [False, True])
def test_in_place_buffer_writes_between_forwards(frozen):
    """What older DDP's broadcast did, in one process: the buffers are overwritten in place
    between two forwards, then one backward. An eval-mode nn.BatchNorm2d's backward saved
    them and fails; frozennorm's does not."""
    torch.manual_seed(0)
    model = randomize_norm_stats_(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))).eval()
    if frozen:
        convert_frozen_bn(model).train()
    x = torch.randn(2, 3, 4, 4)
    y1 = model(x)
    with torch.no_grad():
        for b in model.buffers():
            b.copy_(b)
    y2 = model(x)
    if frozen:
        (y1.sum() + y2.sum()).backward()
        assert model[0].weight.grad is not None
    else:
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            (y1.sum() + y2.sum()).backward()
