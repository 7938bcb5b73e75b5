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
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from frozennorm import FrozenBatchNorm, assert_frozen, convert_frozen_bn

from model_helpers import randomize_norm_stats_, tame_norm_stats_

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


def _worker(rank: int, port: int, out_dir: str, trainable_affine: bool = False) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        # different statistics on each rank: DDP makes them rank 0's at construction
        torch.manual_seed(0)
        net = randomize_norm_stats_(small_net(), seed=rank)
        convert_frozen_bn(net, trainable_affine=trainable_affine, strict=True)
        model = ddp(net)
        stats0 = _flat(model.buffers())
        with pytest.raises(TypeError, match="DistributedDataParallel"):
            convert_frozen_bn(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        model.train()
        affine = [p for m in net.modules() if isinstance(m, FrozenBatchNorm)
                  for p in m.parameters(recurse=False)]
        affine0 = _flat(affine) if affine else torch.zeros(0)
        grads_equal = True
        for _ in range(2):
            opt.zero_grad()
            _two_forwards_one_backward(model, rank)  # (different data on each rank)
            if affine:  # all-reduced: the same averaged gradients on every rank
                grads_equal &= _all_equal(_flat(p.grad for p in affine))
            opt.step()
        assert_frozen(model)
        stats = _flat(model.buffers())
        params = _flat(model.parameters())
        result = {
            "stats_equal_across_ranks": _all_equal(stats),
            "stats_unchanged": torch.equal(stats, stats0),
            "params_equal_across_ranks": _all_equal(params),
            "frozen_layers": sum(isinstance(m, FrozenBatchNorm) for m in net.modules()),
            "affine_parameters": len(affine),
            "affine_grads_equal_across_ranks": grads_equal,
            "affine_trained": bool(affine) and not torch.equal(_flat(affine), affine0),
        }

        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
        # both ranks done with every collective before either tears gloo down (a rank that
        # closed its connections while the other was still finishing aborted it, once)
        dist.barrier()
        _done(out_dir, rank)
    finally:
        dist.destroy_process_group()


def _done(out_dir: str, rank: int) -> None:
    """Marks that ``rank`` passed the last barrier: every collective and result is done."""
    (Path(out_dir) / f"rank{rank}.done").touch()


def _spawn(worker, port: int, out_dir: str, *args) -> None:
    """Runs ``worker`` on WORLD processes. Under load gloo sometimes aborts a rank while it
    tears its connections down after the last barrier ("terminate called without an active
    exception", SIGABRT): once every rank has passed that barrier (its results written), such
    a crash is gloo's teardown, not what these tests check; any other failure is raised."""
    try:
        mp.spawn(worker, args=(port, out_dir, *args), nprocs=WORLD, join=True)
    except mp.ProcessExitedException:
        if not all((Path(out_dir) / f"rank{r}.done").exists() for r in range(WORLD)):
            raise
        warnings.warn("a rank aborted in gloo's teardown after the last barrier")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("trainable_affine", [False, True])
def test_ddp_buffer_sync_two_forwards_one_backward(tmp_path, trainable_affine):
    """Fully frozen, and with trainable weight/bias (their gradients all-reduced, the
    statistics untouched)."""
    _spawn(_worker, _free_port(), str(tmp_path), trainable_affine)
    for rank in range(WORLD):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["frozen_layers"] == 4
        assert result["stats_equal_across_ranks"] and result["stats_unchanged"]
        assert result["params_equal_across_ranks"]
        assert result["affine_parameters"] == (8 if trainable_affine else 0)
        if trainable_affine:
            assert result["affine_grads_equal_across_ranks"] and result["affine_trained"]


@pytest.mark.parametrize("frozen", [False, True, "trainable affine"])
def test_in_place_buffer_writes_between_forwards(frozen):
    """What older DDP's broadcast did, in one process: the buffers are overwritten in place
    between two forwards, then one backward. An eval-mode nn.BatchNorm2d's backward saved
    them and fails; frozennorm's does not (with trainable weight/bias it keeps copies)."""
    torch.manual_seed(0)
    model = randomize_norm_stats_(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))).eval()
    if frozen:
        convert_frozen_bn(model, trainable_affine=frozen == "trainable affine").train()
    x = torch.randn(2, 3, 4, 4)
    y1 = model(x)
    with torch.no_grad():
        for b in model.buffers():
            b.copy_(b)
    y2 = model(x)
    if frozen:
        (y1.sum() + y2.sum()).backward()
        assert model[0].weight.grad is not None
        assert (model[1].weight.grad is not None) == (frozen == "trainable affine")
    else:
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            (y1.sum() + y2.sum()).backward()


def _fsdp2_net() -> nn.Module:
    torch.manual_seed(0)
    net = tame_norm_stats_(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4)))
    return convert_frozen_bn(net, trainable_affine=True)


def _fsdp2_batch(rank: int) -> torch.Tensor:
    return torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(7 + rank))


def _fsdp2_worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        net = _fsdp2_net()
        stats0 = _flat(net.buffers())
        mesh = init_device_mesh("cpu", (WORLD,))
        for m in net:
            if isinstance(m, FrozenBatchNorm):
                fully_shard(m, mesh=mesh)
        fully_shard(net, mesh=mesh)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        for _ in range(2):
            opt.zero_grad()
            net.train()(_fsdp2_batch(rank)).square().mean().backward()
            opt.step()
        full = {n: p.full_tensor().detach() for n, p in net.named_parameters()}
        torch.save({"params": full, "stats_unchanged": torch.equal(_flat(net.buffers()), stats0)},
                   Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()
        _done(out_dir, rank)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_shards_and_trains_the_affine_parameters(tmp_path):
    """FSDP2 (fully_shard, gloo, CPU): the trainable weight/bias are sharded and trained like
    any parameter (the same result as one process on both ranks' data), the statistics
    untouched."""
    pytest.importorskip("torch.distributed.fsdp")
    _spawn(_fsdp2_worker, _free_port(), str(tmp_path))
    reference, initial = _fsdp2_net(), _fsdp2_net()
    opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    batch = torch.cat([_fsdp2_batch(r) for r in range(WORLD)])
    for _ in range(2):
        opt.zero_grad()
        reference.train()(batch).square().mean().backward()
        opt.step()
    for rank in range(WORLD):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["stats_unchanged"]
        for (name, p), p0 in zip(reference.named_parameters(), initial.parameters()):
            torch.testing.assert_close(result["params"][name], p.detach(), rtol=1e-5, atol=1e-6,
                                       msg=name)
            assert (p - p0).abs().max() > 1e-3, f"{name} did not train"
