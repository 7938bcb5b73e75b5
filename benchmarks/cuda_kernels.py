"""The CUDA kernels' bandwidth, kernel by kernel: the predictions of benchmarks/README.md
("CUDA: the kernels") checked on a GPU.

    python benchmarks/cuda_kernels.py --out DIR        # writes DIR/kernels.json and kernels.md

Each case is one op on tensors of about --mib MiB (far beyond the L2 cache), timed with CUDA
events (median of --reps calls after a warm-up) in rounds interleaved with x.clone() of its
input. GB/s = the bytes the op must move (every tensor read or written once) / its time;
"of copy" = that over clone's GB/s in the same rounds: the fraction of the bandwidth a copy
attains on this GPU. The kernel each case runs is named (the launch plan of
tests/test_cuda_emulation.py). `--device cpu --mib 4` runs the same code on the CPU kernels
(a dry run of this script; its numbers mean nothing).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import frozennorm  # noqa: F401  (loads the ops)

ops = torch.ops.frozennorm


def cases(dev, mib):
    """(name, kernel, bytes per element moved, make) with make() -> (op, input to clone)."""
    h, f = torch.float16, torch.float32

    def tensor(dtype, C, hw, layout="nchw", offset=0):
        esize = torch.tensor([], dtype=dtype).element_size()
        n = max(1, (mib << 20) // (esize * C * hw * hw))
        shape = (n, C, hw, hw)
        numel = n * C * hw * hw
        base = torch.randn(numel + offset, device=dev, dtype=dtype)[offset:]
        if layout == "nchw":
            return base.view(shape)
        return base.view(n, hw, hw, C).permute(0, 3, 1, 2)

    def stats(C):
        mean, w, b = (torch.randn(C, device=dev) for _ in range(3))
        return w, b, mean, torch.rand(C, device=dev) + 0.5

    def forward(x):
        s = stats(x.shape[1])
        return lambda: ops.frozen_bn(x, *s, 1e-5), x

    def backward(x):
        scale = torch.rand(x.shape[1], device=dev) + 0.5
        return lambda: ops.frozen_bn_backward(x, scale), x

    def fused_forward(x, act, residual):
        s = stats(x.shape[1])
        r = torch.randn_like(x) if residual else None
        return lambda: ops.frozen_bn_act(x, r, *s, 1e-5, act, False), x

    def fused_backward(x, act):
        scale = torch.rand(x.shape[1], device=dev) + 0.5
        saved = torch.randn_like(x)
        return lambda: ops.frozen_bn_act_backward(x, saved, scale, act, True), x

    def expanded_backward(x):
        scale = torch.rand(x.shape[1], device=dev) + 0.5
        g = torch.ones((), device=dev, dtype=x.dtype).expand(x.shape)
        return lambda: ops.frozen_bn_backward(g, scale), x

    return [
        ("forward fp16 NCHW 56x56", "params + planes vec 8", 4, lambda: forward(tensor(h, 256, 56))),
        ("forward fp16 NCHW 7x7", "params + planes vec 8 (straddles)", 4, lambda: forward(tensor(h, 2048, 7))),
        ("backward fp16 NCHW 56x56", "planes vec 8", 4, lambda: backward(tensor(h, 256, 56))),
        ("forward fp32 NCHW 56x56", "params + planes vec 4", 8, lambda: forward(tensor(f, 256, 56))),
        ("forward fp16 NCHW 8-byte aligned", "params + planes vec 4", 4,
         lambda: forward(tensor(h, 256, 56, offset=4))),
        ("forward fp16 channels_last C=256", "params + rows vec 8", 4,
         lambda: forward(tensor(h, 256, 56, "cl"))),
        ("forward fp16 channels_last C=36", "params + rows vec 4", 4,
         lambda: forward(tensor(h, 36, 56, "cl"))),
        ("backward fp16 channels_last C=256", "rows vec 8", 4, lambda: backward(tensor(h, 256, 56, "cl"))),
        ("forward fp32 channels_last C=256", "params + rows vec 4", 8,
         lambda: forward(tensor(f, 256, 56, "cl"))),
        ("forward fp16 NCHW channel slice", "params + strided", 4,
         lambda: forward(tensor(h, 512, 56)[:, :256])),
        ("backward fp16 expanded gradient", "strided (reads nothing)", 2,
         lambda: expanded_backward(tensor(h, 256, 56))),
        ("fused forward fp16 NCHW relu + residual", "params + planes vec 8", 6,
         lambda: fused_forward(tensor(h, 256, 56), 1, True)),
        ("fused backward fp16 NCHW relu, residual grad", "planes vec 8", 8,
         lambda: fused_backward(tensor(h, 256, 56), 1)),
        ("fused forward fp16 channels_last silu", "params + rows vec 8", 4,
         lambda: fused_forward(tensor(h, 256, 56, "cl"), 3, False)),
    ]


class Timer:
    def __init__(self, dev):
        self.cuda = dev.startswith("cuda")

    def __call__(self, fn, reps):
        fn()
        times = []
        for _ in range(reps):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
        return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--mib", type=int, default=512, help="size of each case's input (MiB)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("cuda_kernels: no CUDA GPU, nothing to run")
        return 0
    timer = Timer(args.device)
    name = torch.cuda.get_device_name() if timer.cuda else "cpu"
    print(f"{name}, torch {torch.__version__}, {args.mib} MiB inputs, median of {args.reps} calls x {args.rounds} rounds")
    rows = []
    for case, kernel, bytes_per_elem, make in cases(args.device, args.mib):
        op, x = make()
        t_op, t_copy = [], []
        for _ in range(args.rounds):
            t_op.append(timer(op, args.reps))
            t_copy.append(timer(x.clone, args.reps))
        t, tc = statistics.median(t_op), statistics.median(t_copy)
        gbs = bytes_per_elem * x.numel() / t / 1e9
        copy_gbs = 2 * x.element_size() * x.numel() / tc / 1e9
        rows.append(dict(case=case, kernel=kernel, numel=x.numel(), seconds=t, gb_per_s=gbs,
                         copy_gb_per_s=copy_gbs, of_copy=gbs / copy_gbs))
        print(f"{case:48s} {kernel:34s} {t * 1e6:9.1f} us {gbs:8.0f} GB/s  {gbs / copy_gbs:5.2f} of copy "
              f"({copy_gbs:.0f} GB/s)")
        del op, x
        if timer.cuda:
            torch.cuda.empty_cache()
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = dict(device=name, torch=torch.__version__, mib=args.mib, reps=args.reps, rounds=args.rounds,
                    command=" ".join(sys.argv))
        (args.out / "kernels.json").write_text(json.dumps(dict(metadata=meta, rows=rows), indent=1))
        lines = [f"{name}, torch {torch.__version__}, {args.mib} MiB inputs", "",
                 "| case | kernel | time | GB/s | of copy |", "|---|---|---|---|---|"]
        lines += [f"| {r['case']} | {r['kernel']} | {r['seconds'] * 1e6:.1f} us | {r['gb_per_s']:.0f} | "
                  f"{r['of_copy']:.2f} |" for r in rows]
        (args.out / "kernels.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
