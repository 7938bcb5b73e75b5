"""Runs every CUDA kernel variant of frozennorm once, small, for compute-sanitizer.

    compute-sanitizer --tool memcheck  python benchmarks/cuda_kernel_driver.py
    compute-sanitizer --tool racecheck python benchmarks/cuda_kernel_driver.py

Covers: forward/backward of frozen_bn and of the fused epilogues (every activation, with and
without residual), float16/bfloat16/float32/float64 data, float32/float64/float16 statistics,
NCHW (planes straddling vectors), channels-last (vectorised and odd C), strided views,
misaligned pointers, stride-0 gradients, empty tensors. Exits non-zero if a result is off.
"""
import sys

import torch

import frozennorm  # noqa: F401  (registers the ops)

ops = torch.ops.frozennorm


def cases(dtype):
    dev = "cuda"
    base = torch.randn(2 * 8 * 6 * 6 + 3, device=dev).to(dtype)
    yield torch.randn(2, 8, 5, 7, device=dev).to(dtype)                       # planes, tail
    yield torch.randn(3, 16, 4, 4, device=dev).to(dtype).contiguous(memory_format=torch.channels_last)
    yield torch.randn(3, 5, 4, 4, device=dev).to(dtype).contiguous(memory_format=torch.channels_last)
    yield torch.randn(4, 6, device=dev).to(dtype)                             # (N, C)
    yield torch.randn(2, 4, 3, 5, 6, device=dev).to(dtype).contiguous(memory_format=torch.channels_last_3d)
    yield torch.randn(2, 6, 9, 8, device=dev).to(dtype)[:, :, ::2]            # strided
    yield base[3:].view(2, 8, 6, 6)                                          # misaligned
    yield torch.randn(0, 4, 3, device=dev).to(dtype)                          # empty
    yield torch.randn(1, 1, 33, device=dev).to(dtype)                         # C == 1


def check(name, got, ref, tol):
    if got.numel() and not torch.allclose(got.double(), ref.double(), rtol=tol, atol=tol):
        print(f"MISMATCH {name}: {(got.double() - ref.double()).abs().max().item()}")
        return 1
    return 0


def main():
    bad = 0
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        tol = {torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
        for x in cases(dtype):
            C = x.shape[1]
            for stats in (torch.float32, torch.float64, torch.float16):
                w, b, m = (torch.randn(C, device="cuda", dtype=stats) for _ in range(3))
                v = torch.rand(C, device="cuda", dtype=stats) + 0.5
                y, scale = ops.frozen_bn(x, w, b, m, v, 1e-5)
                ref, ref_scale = ops.frozen_bn(x.cpu(), w.cpu(), b.cpu(), m.cpu(), v.cpu(), 1e-5)
                bad += check(f"fwd {dtype} {tuple(x.shape)} {stats}", y.cpu(), ref, tol)
                for g in (torch.randn_like(x), torch.ones((), device="cuda", dtype=dtype).expand(x.shape)):
                    gi = ops.frozen_bn_backward(g, scale)
                    bad += check(f"bwd {dtype}", gi.cpu(), ops.frozen_bn_backward(g.cpu(), ref_scale), tol)
                r = torch.randn_like(x)
                for act in range(4):
                    for res in (None, r):
                        y, s, pre = ops.frozen_bn_act(x, res, w, b, m, v, 1e-5, act, True)
                        rc = res.cpu() if res is not None else None
                        yr, sr, prer = ops.frozen_bn_act(x.cpu(), rc, w.cpu(), b.cpu(), m.cpu(), v.cpu(), 1e-5, act, True)
                        bad += check(f"act{act} fwd {dtype}", y.cpu(), yr, tol)
                        if act and y.numel():
                            saved, saved_r = (pre, prer) if act == 3 else (y, yr)
                            g = torch.randn_like(y)
                            got = ops.frozen_bn_act_backward(g, saved, s, act, res is not None)
                            want = ops.frozen_bn_act_backward(g.cpu(), saved_r, sr, act, res is not None)
                            for a, e in zip(got, want):
                                bad += check(f"act{act} bwd {dtype}", a.cpu(), e, tol)
    torch.cuda.synchronize()
    print("kernel driver:", "OK" if bad == 0 else f"{bad} mismatches")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
