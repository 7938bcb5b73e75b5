"""Runs every CUDA kernel variant of frozennorm once, small, for compute-sanitizer.

    compute-sanitizer --tool memcheck  python benchmarks/cuda_kernel_driver.py
    compute-sanitizer --tool memcheck  python benchmarks/cuda_kernel_driver.py --index64
    compute-sanitizer --tool initcheck python benchmarks/cuda_kernel_driver.py

(The kernels use no shared memory: racecheck has nothing to check.) Covers the parameter
kernel and, for float16/bfloat16/float32/float64 data and float32/float64/float16
statistics, the planes kernel (tails, vectors straddling planes, planes shorter than a
vector, every vector width through misaligned views), the rows kernel (channels-last and
(N, C), every vector width through C), the strided kernel (sliced views, expanded
gradients), of the forward, the backward and the fused epilogues (every activation, with
and without residual); empty tensors; with --index64 (FROZENNORM_CUDA_INDEX64=1) the 64-bit
index kernels instead of the 32-bit ones. Every result is compared with the CPU kernel's:
bit for bit where the CPU build computes with FMA (SiLU: within the exp's last bit). Exits
non-zero on a mismatch.
"""
import argparse
import os
import sys


def cases(torch, dtype, dev):
    """(name, input) pairs on `dev` covering every kernel and vector width."""

    def rand(*shape):
        return torch.randn(*shape, dtype=torch.float64).to(dtype).to(dev)

    def offset(shape, k):  # dense, data pointer k elements past an aligned allocation
        n = torch.Size(shape).numel()
        return rand(n + k)[k:].view(shape)

    max_vec = 16 // torch.tensor([], dtype=dtype).element_size()
    yield "planes tail+straddle", rand(2, 3, 5, 7)
    yield "planes shorter than a vector", rand(3, 5, 2, 1)
    k = 1
    while k < max_vec:
        yield f"planes offset {k}", offset([2, 8, 6, 6], k)
        k *= 2
    for C in (16, 12, 6, 5):  # vector widths 8/4/2/1 (float16), 4/4/2/1 (float32), ...
        yield f"rows C={C}", rand(3, C, 4, 5).contiguous(memory_format=torch.channels_last)
    yield "rows (N, C)", rand(7, 24)
    yield "rows channels_last_3d", rand(2, 8, 3, 5, 6).contiguous(memory_format=torch.channels_last_3d)
    yield "strided sliced", rand(2, 6, 9, 8)[:, :, ::2]
    yield "strided permuted slice", rand(4, 9, 6, 5).permute(0, 1, 3, 2)[:, 1:]
    yield "empty", rand(0, 4, 3)
    yield "C=1", rand(2, 1, 33)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--index64", action="store_true",
                        help="every launch with 64-bit index math (FROZENNORM_CUDA_INDEX64=1)")
    parser.add_argument("--device", default="cuda",
                        help="cuda (default); cpu runs the same calls against the CPU kernels "
                             "themselves: a dry run of this script")
    args = parser.parse_args(argv)
    if args.index64:
        os.environ["FROZENNORM_CUDA_INDEX64"] = "1"  # read once, at the first launch

    import torch

    import frozennorm  # noqa: F401  (registers the ops)

    dev = args.device
    if dev.startswith("cuda") and not torch.cuda.is_available():
        print("kernel driver: no CUDA GPU, nothing to run")
        return 0
    ops = torch.ops.frozennorm
    fma = ops._cpu_capability().startswith("AVX")
    torch.manual_seed(0)
    bad = []
    count = 0

    def check(what, got, want, silu=False):
        nonlocal count
        count += 1
        got = got.cpu()
        if got.numel() == 0:
            return
        if silu or not fma:
            tol = max(2 * torch.finfo(got.dtype).eps, 1e-5)
            ok = torch.allclose(got.double(), want.double(), rtol=tol, atol=1e-5, equal_nan=True)
        else:
            ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[got.element_size()]
            ok = torch.equal(got.view(ints), want.view(ints))
        if not ok:
            bad.append(what)
            print(f"MISMATCH {what}")

    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        for name, x in cases(torch, dtype, dev):
            C = x.shape[1]
            xc = x.cpu()
            for stats in (torch.float32, torch.float64, torch.float16):
                w, b, m = (torch.randn(C, dtype=stats) for _ in range(3))
                v = torch.rand(C, dtype=stats) + 0.5
                st = [t.to(dev) for t in (w, b, m, v)]
                tag = f"{dtype} {name} stats {stats}"
                y, scale = ops.frozen_bn(x, *st, 1e-5)
                y_c, scale_c = ops.frozen_bn(xc, w, b, m, v, 1e-5)
                check(f"forward {tag}", y, y_c)
                check(f"scale {tag}", scale, scale_c)
                grads = [torch.randn(x.shape, dtype=torch.float64).to(dtype)]
                if x.numel():
                    grads.append(torch.ones((), dtype=dtype).expand(x.shape))  # strided, stride 0
                for g in grads:
                    g_dev = g.to(dev) if g.is_contiguous() else torch.ones((), dtype=dtype, device=dev).expand(g.shape)
                    check(f"backward {tag}", ops.frozen_bn_backward(g_dev, scale), ops.frozen_bn_backward(g, scale_c))
                if stats != torch.float32:
                    continue  # the fused ops once per input
                r = torch.randn(x.shape, dtype=torch.float64).to(dtype)
                for act in range(4):
                    for res in (None, r):
                        rd = res.to(dev) if res is not None else None
                        got = ops.frozen_bn_act(x, rd, *st, 1e-5, act, True)
                        want = ops.frozen_bn_act(xc, res, w, b, m, v, 1e-5, act, True)
                        for a, e, part in zip(got, want, ("out", "scale", "preact")):
                            check(f"act{act} {part} {tag}", a, e, silu=act == 3)
                        if act == 0 or x.numel() == 0:
                            continue
                        saved, saved_c = (got[2], want[2]) if act == 3 else (got[0], want[0])
                        g = torch.randn(x.shape, dtype=torch.float64).to(dtype)
                        got_b = ops.frozen_bn_act_backward(g.to(dev), saved, got[1], act, res is not None)
                        want_b = ops.frozen_bn_act_backward(g, saved_c, want[1], act, res is not None)
                        for a, e in zip(got_b, want_b):
                            check(f"act{act} backward {tag}", a, e, silu=act == 3)
    if dev.startswith("cuda"):
        torch.cuda.synchronize()
    print(f"kernel driver ({'64' if args.index64 else '32'}-bit index math): {count} results, "
          + ("OK" if not bad else f"{len(bad)} mismatches"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
