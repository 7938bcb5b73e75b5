"""``python -m frozennorm.bench``: frozennorm side by side with the alternatives.

A first op-level comparison: for a few BatchNorm shapes of a detection backbone, the
forward (and forward+backward) time of frozennorm, ``nn.BatchNorm2d`` in eval mode,
torchvision's ``FrozenBatchNorm2d`` and ``x.clone()`` (the memory-bandwidth floor), all
timed in one run with ``torch.utils.benchmark`` (CPU) or CUDA events (GPU).
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Dict, List

import torch
from torch import nn
from torch.utils import benchmark

from . import FrozenBatchNorm2d

SHAPES = [(2, 256, 200, 304), (2, 512, 100, 152), (32, 256, 56, 56), (32, 2048, 7, 7), (1, 64, 7, 7)]


def _time(fn: Callable[[], object], device: str, min_run_time: float) -> float:
    """Median seconds per call."""
    if device == "cuda":
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(25):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        times.sort()
        return times[len(times) // 2]
    return benchmark.Timer("fn()", globals={"fn": fn}).blocked_autorange(
        min_run_time=min_run_time).median


def _candidates(c: int, device: str, dtype: torch.dtype) -> Dict[str, nn.Module]:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(c).to(device)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    bn.eval()
    out = {"frozennorm": FrozenBatchNorm2d.from_batchnorm(bn),
           "nn.BatchNorm2d eval": bn.to(dtype) if device == "cuda" or dtype != torch.float16 else bn}
    try:
        from torchvision.ops.misc import FrozenBatchNorm2d as TVFrozen
        tv = TVFrozen(c).to(device)
        tv.load_state_dict(bn.float().state_dict(), strict=False)
        out["torchvision FrozenBN"] = tv
    except ImportError:
        pass
    return out


def run(device: str, dtype: torch.dtype, shapes: List[tuple], backward: bool, min_run_time: float):
    rows = []
    for shape in shapes:
        x = torch.randn(shape, device=device).to(dtype)
        grad = torch.randn_like(x)
        base = _time(lambda: x.clone(), device, min_run_time)
        for name, mod in _candidates(shape[1], device, dtype).items():
            if backward:
                xr = x.detach().requires_grad_()

                def step(mod=mod, xr=xr):
                    y = mod(xr)
                    torch.autograd.grad(y, xr, grad.to(y.dtype))
            else:
                def step(mod=mod):
                    with torch.no_grad():
                        mod(x)
            t = _time(step, device, min_run_time)
            rows.append((shape, name, t, t / base))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--backward", action="store_true", help="time forward + backward")
    p.add_argument("--min-run-time", type=float, default=0.2)
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    print(f"device={args.device} dtype={args.dtype} torch={torch.__version__} "
          f"threads={torch.get_num_threads()} {'fwd+bwd' if args.backward else 'forward'}")
    print(f"{'shape':<22} {'implementation':<22} {'time':>10} {'x clone':>8}")
    for shape, name, t, ratio in run(args.device, dtype, SHAPES, args.backward, args.min_run_time):
        print(f"{str(shape):<22} {name:<22} {t * 1e6:>8.1f}us {ratio:>7.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
