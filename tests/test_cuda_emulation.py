"""The CUDA kernels' host logic and bodies, run on the CPU by an emulated grid.

tests/cuda_emulation/emulation.cpp compiles csrc/cuda's host logic and kernels as plain C++
and runs every (block, thread) of each launch, blocks and threads in a random order, with
every load and store checked (aligned, in bounds, each output byte stored exactly once,
everything the op allocates pre-filled with NaN). Results must equal the CPU kernel's bit for
bit (where the CPU build computes with FMA, as the CUDA kernels do). For meta tensors the
same host code only plans its launches, so the chosen kernel, vector width, index width and
grid are checked for tensors of any size. tests/cuda_emulation/mutations.py shows these
checks failing on planted bugs; tests/test_cuda.py runs the real kernels on a GPU.
"""
import hashlib
import os
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import frozennorm  # noqa: F401  (registers torch.ops.frozennorm)
from oracle import (DTYPES, LAYOUTS, assert_close_to_exact, compute_eps, is_dense, make_layout,
                    make_sample, oracle, oracle_terms, samples)

ROOT = Path(__file__).resolve().parents[1]
cpu_ops = torch.ops.frozennorm

def dtype_id(dtype):
    return str(dtype).replace("torch.", "")


# The emulated device: one resident block (every grid-stride loop wraps), a few, or an H100's
# 132 SMs x 2.
DEVICES = [1, 3, 264]


@pytest.fixture(scope="module")
def emu():
    from torch.utils import cpp_extension
    # torch's JIT build tracks only the listed sources: key the build on the headers too
    files = sorted(p for p in (ROOT / "csrc").rglob("*") if p.suffix in (".h", ".cuh")) + sorted(
        (ROOT / "tests" / "cuda_emulation").glob("*.cpp"))
    digest = hashlib.sha1(b"".join(p.read_bytes() for p in files)).hexdigest()[:12]
    try:
        cpp_extension.load(
            name=f"frozennorm_cuda_emulation_{digest}",
            sources=[str(ROOT / "tests" / "cuda_emulation" / "emulation.cpp"),
                     str(ROOT / "csrc" / "common.cpp")],
            extra_include_paths=[str(ROOT / "csrc")],
            # (the mutation harness builds its copies with -O0: quicker to compile)
            extra_cflags=[os.environ.get("FROZENNORM_EMULATION_CFLAGS", "-O2")],
            is_python_module=False, verbose=False)
    except (RuntimeError, OSError) as e:  # no compiler
        pytest.skip(f"cannot build the CUDA emulation: {e}")
    ops = torch.ops.frozennorm_emu
    ops.configure(2, 0, False)
    yield ops
    ops.configure(2, 0, False)


def cpu_uses_fma():
    """Whether the CPU kernels compute the forward with FMA, as the CUDA kernels do (the x86
    SIMD builds); the baseline build rounds the product and the sum separately."""
    try:
        return cpu_ops._cpu_capability().startswith("AVX")
    except (AttributeError, RuntimeError):  # the pure-PyTorch fallback
        return False


def assert_same_bits(a, b, what):
    """a and b hold the same value in every element, to the bit (NaN where the other has NaN;
    a NaN's payload is not compared)."""
    assert a.dtype == b.dtype and a.shape == b.shape, what
    nan = torch.isnan(a)
    assert torch.equal(nan, torch.isnan(b)), f"{what}: NaN in different places"
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    diff = (a.view(ints) != b.view(ints)) & ~nan
    if diff.any():
        k = tuple(diff.nonzero()[0].tolist())
        raise AssertionError(f"{what}: not bit-identical to the CPU kernel in {int(diff.sum())} of "
                             f"{a.numel()} elements; first at {k}: {a[k].item()!r} vs {b[k].item()!r}")


def element_kernel(x):
    """The kernel the host logic must choose for an input (or gradient) x."""
    if not is_dense(x):
        return "strided"
    plane = x.numel() if x.shape[1] == 1 else x.stride(1)
    return "rows" if plane == 1 else "planes"


def run(emu, fn, *args, max_blocks=2, seed=0, index64=False):
    """fn(*args) on the emulated device; returns its result and the launches it made."""
    emu.configure(max_blocks, seed, index64)
    out = fn(*args)
    log = emu.launch_log()
    assert emu.configure(2, 0, False) == len(log)
    return out, log


def run_and_check(emu, s, max_blocks=2, seed=0, index64=False):
    kw = dict(max_blocks=max_blocks, seed=seed, index64=index64)
    (y, scale), log = run(emu, emu.frozen_bn, *s.args(), **kw)
    C, numel = s.x.shape[1], s.x.numel()
    kinds = [line.split()[0] for line in log]
    assert kinds == ["params"] * (C > 0) + [element_kernel(s.x)] * (numel > 0), log
    if numel:
        assert all(f"index={64 if index64 else 32}" in line for line in log[1:]), log
    assert y.dtype == s.x.dtype and y.shape == s.x.shape
    if numel and is_dense(s.x):
        assert y.stride() == s.x.stride()
    assert_close_to_exact(y, oracle(*s.args()), oracle_terms(*s.args()),
                          compute_eps(s.x.dtype, s.mean.dtype))
    y_cpu, scale_cpu = cpu_ops.frozen_bn(*s.args())
    assert_same_bits(scale, scale_cpu, "scale")
    if cpu_uses_fma():
        assert_same_bits(y, y_cpu, "output")

    g = torch.randn(s.x.shape, dtype=torch.float64).to(s.x.dtype)
    grads = [g]
    if numel:
        # in the input's layout, not dense, and expanded (stride 0, as x.sum().backward() gives)
        grads += [torch.empty_like(s.x).copy_(g), make_layout(g, "sliced"),
                  torch.ones((), dtype=g.dtype).expand(g.shape)]
    for grad in grads:
        gi, log = run(emu, emu.frozen_bn_backward, grad, scale, **kw)
        assert [line.split()[0] for line in log] == [element_kernel(grad)] * (numel > 0), log
        assert_same_bits(gi, cpu_ops.frozen_bn_backward(grad, scale), "grad_input")
    exact = oracle(g, s.weight, None, torch.zeros_like(s.mean), s.var, s.eps)
    gi, _ = run(emu, emu.frozen_bn_backward, g, scale, **kw)
    assert_close_to_exact(gi, exact, exact.abs(), compute_eps(g.dtype, scale.dtype), "grad_input")


@given(data=st.data())
def test_emulated_kernels_match_cpu_and_oracle(emu, data):
    s = data.draw(samples())
    run_and_check(emu, s, max_blocks=data.draw(st.sampled_from(DEVICES)),
                  seed=data.draw(st.integers(0, 2**31)), index64=data.draw(st.booleans()))


# Shapes for every kernel's corners: planes of 35, 9, 4 and 3 elements (vectors straddle
# two or more of them), numel % VEC tails, channels-last rows with C % 8 == 4, odd C, a single
# channel, an empty batch; and (the last four) enough data for the grid-stride loops to wrap
# on a one-block device (planes: > 1024 vectors, rows: > 4 * blockDim.y rows, strided:
# > 1024 elements).
SHAPES = [[2, 3, 5, 7], [3, 64, 1, 1], [4, 24, 3, 3], [2, 5, 2, 2], [5, 7], [2, 8], [4, 6, 11],
          [2, 4, 3, 5, 6], [1, 1, 9, 9], [0, 4, 3, 3], [2, 12, 3, 1], [3, 36, 2, 2],
          [2, 8, 33, 17], [3, 24, 7, 7], [2, 64, 9, 9], [2, 8, 9, 16]]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_emulated_layouts(emu, dtype, layout, shape):
    s = make_sample(shape, dtype, layout, seed=len(shape))
    run_and_check(emu, s, max_blocks=1, seed=sum(shape))
    run_and_check(emu, s, max_blocks=3, seed=7, index64=True)


def misaligned(shape, dtype, offset, channels_last=False):
    """A dense tensor whose data pointer is `offset` elements past an aligned allocation."""
    n = torch.Size(shape).numel()
    base = torch.randn(n + offset, dtype=torch.float64).to(dtype)[offset:]
    assert base.data_ptr() % 16 == (offset * base.element_size()) % 16
    if not channels_last:
        return base.view(shape)
    N, C, *rest = shape
    return base.view(N, *rest, C).movedim(-1, 1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("offset", [1, 2, 3, 4])
@pytest.mark.parametrize("channels_last", [False, True])
def test_emulated_misaligned_inputs_use_narrower_vectors(emu, dtype, offset, channels_last):
    shape = [2, 8, 6, 6]
    x = misaligned(shape, dtype, offset, channels_last)
    assert is_dense(x) and x.is_contiguous(memory_format=torch.channels_last) == channels_last
    s = make_sample(shape, dtype, seed=offset)
    s.x = x
    run_and_check(emu, s, max_blocks=1)
    _, log = run(emu, emu.frozen_bn, *s.args())
    # the widest vector the data pointer's alignment allows (8 channels divide every width)
    vec = 16 // x.element_size()
    while (offset * x.element_size()) % (vec * x.element_size()):
        vec //= 2
    assert f"vec={vec} " in log[1], log


# The plan for tensors of every layout, alignment and size (meta tensors: nothing runs, so
# sizes past 2^31 elements cost nothing), on an H100-sized device (264 resident blocks).
# Each case: the input, and the launches of its forward.
def meta(shape, dtype=torch.float16, offset=0, channels_last=False, strides=None):
    n = torch.Size(shape).numel()
    if strides is not None:
        size = 1 + sum((s - 1) * st for s, st in zip(shape, strides))
        return torch.empty(size + offset, device="meta", dtype=dtype)[offset:].as_strided(shape, strides)
    base = torch.empty(n + offset, device="meta", dtype=dtype)[offset:]
    if not channels_last:
        return base.view(shape)
    N, C, *rest = shape
    return base.view(N, *rest, C).movedim(-1, 1)


PLANS = {
    # NCHW: 16-byte vectors, each block 1024 of them per step, 1 block per 1024 vectors
    "nchw fp16": (meta([2, 64, 56, 56]), "planes vec=8 unroll=4 index=32 grid=49x1 block=256x1"),
    "nchw fp16 8-byte aligned": (meta([2, 64, 56, 56], offset=4), "planes vec=4 unroll=4 index=32 grid=98x1 block=256x1"),
    "nchw fp16 4-byte aligned": (meta([2, 64, 56, 56], offset=2), "planes vec=2 unroll=4 index=32 grid=196x1 block=256x1"),
    "nchw fp16 2-byte aligned": (meta([2, 64, 56, 56], offset=1), "planes vec=1 unroll=4 index=32 grid=264x1 block=256x1"),
    "nchw fp32": (meta([2, 64, 56, 56], torch.float32), "planes vec=4 unroll=4 index=32 grid=98x1 block=256x1"),
    "nchw fp64": (meta([2, 64, 56, 56], torch.float64), "planes vec=2 unroll=4 index=32 grid=196x1 block=256x1"),
    "nchw fp16 7x7 maps": (meta([32, 2048, 7, 7]), "planes vec=8 unroll=4 index=32 grid=264x1 block=256x1"),
    "nchw fp16 numel < VEC": (meta([1, 3, 1, 2]), "planes vec=8 unroll=4 index=32 grid=1x1 block=256x1"),
    # channels-last: blocks of min(C/VEC rounded up to a power of two, 32) x the rest in rows
    "cl fp16 C=64": (meta([2, 64, 56, 56], channels_last=True), "rows vec=8 unroll=4 index=32 grid=1x49 block=8x32"),
    "cl fp16 C=36 (C % 8 == 4)": (meta([2, 36, 56, 56], channels_last=True),
                                  "rows vec=4 unroll=4 index=32 grid=1x98 block=16x16"),
    "cl fp16 C=2048": (meta([2, 2048, 7, 7], channels_last=True), "rows vec=8 unroll=4 index=32 grid=8x4 block=32x8"),
    "cl fp16 C=3": (meta([2, 3, 56, 56], channels_last=True), "rows vec=1 unroll=4 index=32 grid=1x25 block=4x64"),
    "cl fp16 8-byte aligned": (meta([2, 64, 56, 56], offset=4, channels_last=True),
                               "rows vec=4 unroll=4 index=32 grid=1x98 block=16x16"),
    "(N, C) fp32": (meta([4096, 1000], torch.float32), "rows vec=4 unroll=4 index=32 grid=8x33 block=32x8"),
    "cl bf16 C=256 many rows": (meta([64, 256, 56, 56], torch.bfloat16, channels_last=True),
                                "rows vec=8 unroll=4 index=32 grid=1x264 block=32x8"),
    # strided: one element per thread and step, 1024 per block and step
    "sliced fp32": (meta([2, 8, 9, 16], torch.float32, strides=[2 * 8 * 9 * 16, 2 * 9 * 16, 2 * 16, 2]),
                    "strided vec=1 unroll=4 index=32 dims=3 grid=3x1 block=256x1"),
    "every other row and column fp32": (meta([2, 8, 9, 16], torch.float32, strides=[4608, 576, 64, 2]),
                                        "strided vec=1 unroll=4 index=32 dims=4 grid=3x1 block=256x1"),
    "6-d, every dim sliced": (meta([2, 3, 2, 2, 2, 2], torch.float32, strides=[3072, 512, 128, 32, 8, 2]),
                              "strided vec=1 unroll=4 index=32 dims=8 grid=1x1 block=256x1"),
    # 64-bit index math: more than 2^31 - 1 elements, or offsets past it
    "nchw fp16 2^31 + 16 elements": (meta([1, 2, 2**30 + 8]), "planes vec=8 unroll=4 index=64 grid=264x1 block=256x1"),
    "nchw fp16 2^31 - 1 elements": (meta([1, 1, 2**31 - 1]), "planes vec=8 unroll=4 index=32 grid=264x1 block=256x1"),
    "cl fp16 > 2^31 elements": (meta([1, 2**16 + 8, 2**15 + 8, 1], channels_last=True),
                                "rows vec=8 unroll=4 index=64 grid=257x1 block=32x8"),
    "strided, offsets past 2^31": (meta([2, 4, 8], torch.float32, strides=[2**31, 8, 1]),
                                   "strided vec=1 unroll=4 index=64 dims=3 grid=1x1 block=256x1"),
}


@pytest.mark.parametrize("case", list(PLANS))
def test_launch_plan(emu, case):
    x, expected = PLANS[case]
    C = x.shape[1]
    stats = [torch.ones(C, device="meta") for _ in range(4)]
    _, log = run(emu, emu.frozen_bn, x, *stats, 1e-5, max_blocks=264)
    params_blocks = min(-(-C // 256), 264)
    assert log == [f"params vec=1 unroll=1 index=64 grid={params_blocks}x1 block=256x1", expected]
    # the backward: the same element kernel, one launch
    _, log = run(emu, emu.frozen_bn_backward, x, torch.ones(C, device="meta"), max_blocks=264)
    assert log == [expected]


def test_launch_plan_empty_and_no_channels(emu):
    stats = [torch.ones(4) for _ in range(4)]
    (y, scale), log = run(emu, emu.frozen_bn, torch.empty(0, 4, 3, 3), *stats, 1e-5)
    assert log == ["params vec=1 unroll=1 index=64 grid=1x1 block=256x1"] and y.shape == (0, 4, 3, 3)
    assert torch.equal(scale, torch.ones(4) / torch.sqrt(torch.ones(4) + 1e-5))
    _, log = run(emu, emu.frozen_bn, torch.empty(2, 0, 3), *[torch.ones(0)] * 4, 1e-5)
    assert log == []


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("view", ["rows and columns", "6-d", "channels and rows", "2-d"])
def test_emulated_strided_dims(emu, dtype, view):
    """Non-dense inputs of 2 to 6 dimensions after merging (the kernels of 3, 4 and 8)."""
    shape, index = {"rows and columns": ([2, 8, 9, 16], (slice(None), slice(None), slice(None, None, 2),
                                                         slice(None, None, 2))),
                    "6-d": ([2, 3, 2, 2, 2, 2], (slice(None, None, 2),) * 6),
                    "channels and rows": ([3, 5, 7, 6], (slice(None), slice(1, None, 2), slice(None, None, 3))),
                    "2-d": ([9, 7], (slice(None), slice(None, None, 2)))}[view]
    big = [3 * d + 2 for d in shape]
    x = torch.randn(big, dtype=torch.float64).to(dtype)[index][tuple(slice(0, d) for d in shape)]
    assert list(x.shape) == shape and not is_dense(x)
    s = make_sample(shape, dtype, seed=13)
    s.x = x
    run_and_check(emu, s, max_blocks=1, seed=3)
    run_and_check(emu, s, max_blocks=2, seed=4, index64=True)


def test_emulated_many_dims_fall_back(emu):
    """More than 8 non-mergeable strided dims: copied to dense first (still correct)."""
    shape = [2, 3] + [2] * 8
    x = torch.randn([2 * d for d in shape], dtype=torch.float32)[tuple(slice(None, None, 2) for _ in shape)]
    s = make_sample(shape, torch.float32, seed=3)
    s.x = x
    (y, _), log = run(emu, emu.frozen_bn, *s.args())
    assert [line.split()[0] for line in log] == ["params", "planes"]  # the copy to dense is ATen's
    assert_same_bits(y, cpu_ops.frozen_bn(*s.args())[0], "output")


def test_blocks_and_threads_run_in_a_random_order(emu):
    """What the kernels must not depend on: a dependence between blocks (or threads) of one
    launch shows as a failure under some seed instead of passing in launch order."""
    orders = [emu.execution_order(64, seed) for seed in (1, 2)]
    for blocks, threads in orders:
        assert sorted(blocks) == list(range(64)) and blocks != sorted(blocks)
        assert sorted(threads) == list(range(256)) and threads != sorted(threads)
    assert orders[0] != orders[1]
    assert emu.execution_order(64, 1) == orders[0]  # seeded: a failure reproduces


@pytest.mark.parametrize("bits,divisor", [(b, d) for b in (32, 64) for d in
                                          [1, 2, 3, 7, 49, 64, 100, 1000, 3025, 65536, 2**20 + 1,
                                           2**30, 2**31 - 1]]
                         + [(64, d) for d in [2**31, 2**33 + 5, 3 * 2**40]])
def test_fast_divider(emu, bits, divisor):
    """The kernels' multiply-shift division, up to the largest dividend of each index width."""
    highs = (2**31 - 1,) if bits == 32 else (2**31 + 7, 2**40 + 3, 2**63 - 1)
    for high in highs:
        assert emu.divider_mismatches(bits, divisor, 20_000, high) == 0


def within_two_ulps(a, b):
    """SiLU's exp differs in its last float bit between the CUDA path (expf) and the CPU's
    vector exp; rounded to the data dtype, a result may then differ by one of its units in
    the last place, and the backward's input gradient (the activation's gradient rounded to
    the data dtype as the unfused ops store it, times the scale, rounded again) by two.
    atol: near SiLU's zero-derivative point the float32 result cancels, and a last-bit
    difference of its O(1) terms is an absolute one."""
    return torch.allclose(a.double(), b.double(), rtol=max(2 * torch.finfo(a.dtype).eps, 1e-5), atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("shape", [[2, 8, 5, 7], [3, 16, 4, 4], [4, 6], [2, 5, 1, 3], [0, 4, 3],
                                   [2, 12, 7, 5]])
def test_emulated_fused_epilogues_match_cpu(emu, dtype, layout, shape):
    """frozen_bn_act and its backward: the CUDA code path gives the CPU kernel's results."""
    s = make_sample(shape, dtype, layout, seed=11)
    s.bias = s.bias + 6 * (torch.arange(shape[1]) % 2)  # outputs above 6 in every other channel
    r = torch.randn(s.x.shape, dtype=torch.float64).to(dtype)
    for act in range(4):
        for res in (None, r):
            (y, scale, pre), log = run(emu, emu.frozen_bn_act, s.x, res, s.weight, s.bias, s.mean, s.var,
                                       s.eps, act, True, max_blocks=1 + act, seed=act)
            assert len(log) == 1 + (y.numel() > 0)
            y_ref, scale_ref, pre_ref = cpu_ops.frozen_bn_act(s.x, res, s.weight, s.bias, s.mean, s.var,
                                                              s.eps, act, True)
            assert y.stride() == y_ref.stride() and pre.shape == pre_ref.shape
            assert_same_bits(scale, scale_ref, "scale")
            if act == 3:
                assert within_two_ulps(y, y_ref) and within_two_ulps(pre, pre_ref)
            elif cpu_uses_fma():
                assert_same_bits(y, y_ref, f"act {act} output")
                assert_same_bits(pre, pre_ref, f"act {act} pre-activation")
            if act == 0 or y.numel() == 0:
                continue
            if act == 2:
                assert (y == 6).any() and (y == 0).any()
            g = torch.randn(y.shape, dtype=torch.float64).to(dtype)
            saved = pre if act == 3 else y
            got, log = run(emu, emu.frozen_bn_act_backward, g, saved, scale, act, res is not None,
                           max_blocks=2, seed=act)
            assert len(log) == 1
            want = cpu_ops.frozen_bn_act_backward(g, saved, scale, act, res is not None)
            for a, b, what in zip(got, want, ("grad_input", "grad_residual")):
                if act == 3:
                    assert within_two_ulps(a, b), what
                else:
                    assert_same_bits(a, b, f"act {act} {what}")
