"""GPU-only checks of the CUDA kernels (skipped without a GPU): the kernels each call
launches, bit-equality with the CPU kernels, the current stream, CUDA graphs, the 64-bit
kernels, tensors past 2^31 elements, ReLU6 above 6. Values against the float64 oracle also
run on CUDA in tests/test_op.py and tests/test_act_op.py (their device parameter)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import frozennorm
from conftest import requires_cuda
from oracle import DTYPES, assert_close_to_exact, compute_eps, make_sample, oracle, oracle_terms

pytestmark = [requires_cuda, pytest.mark.cuda]

ops = torch.ops.frozennorm
GiB = 2**30


def kernels_launched(fn):
    """Names of the CUDA kernels launched while fn() runs (after a warm-up call)."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
            and "Memcpy" not in e.name and "Memset" not in e.name]


def kinds(names):
    """frozennorm's kernel of each launch: params, planes, rows or strided (else the name)."""
    out = []
    for n in names:
        for kind, tag in (("params", "ParamsKernel"), ("planes", "PlanesKernel"), ("rows", "RowsKernel"),
                          ("strided", "StridedKernel")):
            if f"frozennorm::cuda::{tag}<" in n:
                out.append(kind)
                break
        else:
            out.append(n)
    return out


def cpu_uses_fma():
    return ops._cpu_capability().startswith("AVX")


def assert_same_bits(a, b, what):
    """Bit-identical (NaN where the other has NaN), compared on the CPU."""
    a, b = a.detach().cpu(), b.detach().cpu()
    assert a.dtype == b.dtype and a.shape == b.shape, what
    nan = torch.isnan(a)
    assert torch.equal(nan, torch.isnan(b)), f"{what}: NaN in different places"
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    diff = (a.view(ints) != b.view(ints)) & ~nan
    assert not diff.any(), f"{what}: {int(diff.sum())} of {a.numel()} elements differ from the CPU kernel's"


LAYOUT_KERNEL = {"contiguous": "planes", "channels_last": "rows", "sliced": "strided"}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", sorted(LAYOUT_KERNEL))
def test_kernels_per_forward_and_backward(dtype, layout):
    """A forward: the per-channel parameters, then one element kernel of the layout's kind; a
    backward: one element kernel (the expanded gradient of x.sum(): the strided one)."""
    s = make_sample([4, 32, 20, 24], dtype, layout, device="cuda")
    kernel = LAYOUT_KERNEL[layout]
    assert kinds(kernels_launched(lambda: ops.frozen_bn(*s.args()))) == ["params", kernel]
    _, scale = ops.frozen_bn(*s.args())
    g = torch.randn_like(s.x)
    assert kinds(kernels_launched(lambda: ops.frozen_bn_backward(g, scale))) == [
        "rows" if layout == "channels_last" else "planes"]
    ge = torch.ones((), device="cuda", dtype=dtype).expand(s.x.shape)
    assert kinds(kernels_launched(lambda: ops.frozen_bn_backward(ge, scale))) == ["strided"]
    m = frozennorm.FrozenBatchNorm2d(32).cuda()
    x = s.x.detach().requires_grad_()
    assert kinds(kernels_launched(lambda: m(x))) == ["params", kernel]  # also with autograd recording


@pytest.mark.parametrize("activation", ["relu", "relu6", "silu", "identity"])
def test_kernels_per_fused_forward_and_backward(activation):
    s = make_sample([4, 32, 20, 24], torch.float16, "channels_last", device="cuda")
    x = s.x.detach().requires_grad_()
    r = torch.randn_like(x).requires_grad_()
    fwd = lambda: frozennorm.frozen_batch_norm_act(x, s.mean, s.var, s.weight, s.bias, s.eps, activation, r)
    assert kinds(kernels_launched(fwd)) == ["params", "rows"]
    y = fwd()
    g = torch.randn_like(y)
    # the identity's residual gradient is the incoming gradient itself, which autograd passes on
    assert kinds(kernels_launched(lambda: torch.autograd.grad(y, (x, r), g, retain_graph=True))) == ["rows"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced", "expanded", "misaligned"])
@pytest.mark.parametrize("stats_dtype", [torch.float32, torch.float64, torch.float16])
def test_bit_identical_to_the_cpu_kernels(dtype, layout, stats_dtype):
    """The CUDA kernels compute what the CPU kernels compute, to the bit: the scale, the
    forward (one FMA, one rounding) and the backward. Planes of 35 elements: vectors straddle
    them."""
    if not cpu_uses_fma():
        pytest.skip("the CPU kernels of this build round without FMA")
    shape = [3, 12, 5, 7]
    base = "contiguous" if layout == "misaligned" else layout
    s = make_sample(shape, dtype, base, regime="mean_gg_std", stats_dtype=stats_dtype, device="cuda", seed=5)
    cpu = make_sample(shape, dtype, base, regime="mean_gg_std", stats_dtype=stats_dtype, seed=5)
    if layout == "misaligned":  # dense, the data pointer one element past an aligned one
        s.x = torch.cat([s.x.new_zeros(1), s.x.flatten()])[1:].view(shape)
    y, scale = ops.frozen_bn(*s.args())
    y_cpu, scale_cpu = ops.frozen_bn(*cpu.args())
    assert_same_bits(scale, scale_cpu, "scale")
    assert_same_bits(y, y_cpu, "output")
    g = torch.randn(shape, dtype=torch.float64).to(dtype)
    assert_same_bits(ops.frozen_bn_backward(g.cuda(), scale), ops.frozen_bn_backward(g, scale_cpu),
                     "grad_input")


@pytest.mark.parametrize("activation", [1, 2, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_bit_identical_to_the_cpu_kernels(activation, dtype):
    """frozen_bn_act and its backward on CUDA against the CPU kernels: to the bit for ReLU and
    ReLU6 (with outputs above 6), within the exp's last bit for SiLU."""
    if not cpu_uses_fma():
        pytest.skip("the CPU kernels of this build round without FMA")
    s = make_sample([2, 24, 9, 7], dtype, seed=6)
    s.bias = s.bias + 6 * (torch.arange(24) % 2)
    r = torch.randn(s.x.shape, dtype=torch.float64).to(dtype)
    args = (s.x, r, s.weight, s.bias, s.mean, s.var, s.eps, activation, True)
    got = ops.frozen_bn_act(*[a.cuda() if isinstance(a, torch.Tensor) else a for a in args])
    want = ops.frozen_bn_act(*args)
    g = torch.randn(s.x.shape, dtype=torch.float64).to(dtype)
    saved = 2 if activation == 3 else 0
    got_b = ops.frozen_bn_act_backward(g.cuda(), got[saved], got[1], activation, True)
    want_b = ops.frozen_bn_act_backward(g, want[saved], want[1], activation, True)
    assert_same_bits(got[1], want[1], "scale")
    for a, b, what in zip(got[:1] + got[2:] + got_b, want[:1] + want[2:] + want_b,
                          ("output", "pre-activation", "grad_input", "grad_residual")):
        if activation == 3:
            tol = 2 * torch.finfo(dtype).eps
            torch.testing.assert_close(a.cpu().double(), b.double(), rtol=tol, atol=1e-5, msg=what)
        else:
            assert_same_bits(a, b, what)
    if activation == 2:
        assert (got[0] == 6).float().mean() > 0.2


def test_index64_kernels_bit_identical_to_the_cpu_kernels():
    """FROZENNORM_CUDA_INDEX64=1 (read once per process): the 64-bit index kernels of every
    layout and op on small tensors, against the CPU kernels."""
    if not cpu_uses_fma():
        pytest.skip("the CPU kernels of this build round without FMA")
    script = textwrap.dedent("""
        import torch, frozennorm
        ops = torch.ops.frozennorm
        torch.manual_seed(0)
        bad = []
        def same(a, b, what):
            ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[b.element_size()]
            if not torch.equal(a.cpu().view(ints), b.view(ints)):
                bad.append(what)
        for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            base = torch.randn(3, 12, 5, 7, dtype=torch.float64).to(dtype)
            for name, x in (("planes", base), ("rows", base.contiguous(memory_format=torch.channels_last)),
                            ("strided", base[..., ::2]), ("narrow", torch.cat([base.new_zeros(1), base.flatten()])[1:].view(base.shape))):
                C = x.shape[1]
                stats = [torch.randn(C), torch.randn(C), torch.randn(C), torch.rand(C) + 0.5]
                y, s = ops.frozen_bn(x.cuda(), *[t.cuda() for t in stats], 1e-5)
                y_c, s_c = ops.frozen_bn(x, *stats, 1e-5)
                same(y, y_c, f"{dtype} {name} forward")
                same(ops.frozen_bn_backward(x.cuda(), s), ops.frozen_bn_backward(x, s_c), f"{dtype} {name} backward")
                if name == "strided":
                    continue
                r = torch.randn(x.shape, dtype=torch.float64).to(dtype)
                for act in (0, 1, 2):
                    got = ops.frozen_bn_act(x.cuda(), r.cuda(), *[t.cuda() for t in stats], 1e-5, act, False)
                    want = ops.frozen_bn_act(x, r, *stats, 1e-5, act, False)
                    same(got[0], want[0], f"{dtype} {name} act {act}")
                    if act:
                        for a, b in zip(ops.frozen_bn_act_backward(x.cuda(), got[0], got[1], act, True),
                                        ops.frozen_bn_act_backward(x, want[0], want[1], act, True)):
                            same(a, b, f"{dtype} {name} act {act} backward")
        print("BAD", bad)
        from torch.profiler import profile, ProfilerActivity
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            ops.frozen_bn(base.cuda(), *[t.cuda() for t in stats], 1e-5)
            torch.cuda.synchronize()
        print("NAMES", [e.name for e in prof.events() if "Kernel<" in e.name])
    """)
    env = dict(os.environ, FROZENNORM_CUDA_INDEX64="1")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "BAD []" in out.stdout, out.stdout[-3000:]
    names = out.stdout.split("NAMES", 1)[1]
    assert "PlanesKernel<2, 4, unsigned long" in names and "unsigned int" not in names, names


SLEEP_CYCLES = 2**31  # about a second at an H100's clock


def _on(op, x, s, scale):
    if op == "forward":
        return ops.frozen_bn(x, s.weight, s.bias, s.mean, s.var, s.eps)[0]
    if op == "backward":
        return ops.frozen_bn_backward(x, scale)
    if op == "fused forward":
        return ops.frozen_bn_act(x, x, s.weight, s.bias, s.mean, s.var, s.eps, 1, False)[0]
    return ops.frozen_bn_act_backward(x, x, scale, 2, True)[0]


@pytest.mark.parametrize("op", ["forward", "backward", "fused forward", "fused backward"])
def test_runs_on_the_current_stream(op):
    """Work queued on a side stream behind a long kernel: the op, called with that stream
    current, must see the data the side stream writes after the long kernel. On any other
    stream it would run at once, on the old data."""
    s = make_sample([8, 64, 32, 32], torch.float32, device="cuda")
    _, scale = ops.frozen_bn(*s.args())
    new = s.x
    x = torch.zeros_like(new)  # what the op reads if it does not wait
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(SLEEP_CYCLES)
        x.copy_(new)
        out = _on(op, x, s, scale)
        queued_behind = not side.query()
    assert queued_behind, "the side stream finished before the op was queued: sleep longer"
    side.synchronize()
    expected = _on(op, new, s, scale)
    torch.cuda.synchronize()
    assert_same_bits(out, expected, op)


def test_cuda_graph_replays_the_ops_bit_for_bit():
    """Forward and backward captured in a CUDA graph: each replay on new data equals an eager call."""
    s = make_sample([4, 32, 9, 7], torch.float16, device="cuda")
    static_x = s.x.clone()
    static_g = torch.randn_like(static_x)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the graph
        ops.frozen_bn_backward(static_g, ops.frozen_bn(static_x, s.weight, s.bias, s.mean, s.var, s.eps)[1])
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, scale = ops.frozen_bn(static_x, s.weight, s.bias, s.mean, s.var, s.eps)
        gi = ops.frozen_bn_backward(static_g, scale)
    for seed in range(3):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        static_x.copy_(torch.randn(static_x.shape, device="cuda", generator=gen))
        static_g.copy_(torch.randn(static_g.shape, device="cuda", generator=gen))
        graph.replay()
        y_e, scale_e = ops.frozen_bn(static_x, s.weight, s.bias, s.mean, s.var, s.eps)
        assert_same_bits(y, y_e, "output")
        assert_same_bits(gi, ops.frozen_bn_backward(static_g, scale_e), "grad_input")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_device_guard_second_gpu():
    s = make_sample([2, 8, 5, 5], torch.float32, device="cuda:1")
    y, scale = ops.frozen_bn(*s.args())
    assert y.device == torch.device("cuda:1") and scale.device == torch.device("cuda:1")
    assert_close_to_exact(y, oracle(*s.args()), oracle_terms(*s.args()), compute_eps(torch.float32))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_relu6_above_six_against_the_oracle(dtype, layout):
    """ReLU6 where half the outputs pass 6: against the float64 oracle, forward and backward."""
    C = 16
    s = make_sample([4, C, 9, 7], dtype, layout, device="cuda", seed=9)
    s.bias = s.bias + 6 * (torch.arange(C, device="cuda") % 2)
    y, scale, _ = ops.frozen_bn_act(s.x, None, s.weight, s.bias, s.mean, s.var, s.eps, 2, False)
    exact = oracle(*s.args())
    assert (exact > 6).double().mean() > 0.2 and (exact < 0).double().mean() > 0.1
    assert_close_to_exact(y, exact.clamp(0, 6), oracle_terms(*s.args()), compute_eps(dtype))
    g = torch.randn(s.x.shape, dtype=torch.float64, device="cuda").to(dtype)
    gi, gr = ops.frozen_bn_act_backward(g, y, scale, 2, True)
    clipped = (y <= 0) | (y >= 6)
    assert torch.equal(gr, torch.where(clipped, torch.zeros_like(g), g))
    gi_exact = oracle(torch.where(clipped, 0, g).double(), s.weight, None, torch.zeros_like(s.mean), s.var, s.eps)
    assert_close_to_exact(gi, gi_exact, gi_exact.abs(), compute_eps(dtype), "grad_input")


# ---- tensors past 2^31 elements: the 64-bit kernels where the 32-bit ones would wrap -------

N_7X7 = 2**31 // (64 * 49) + 1  # (N, 64, 7, 7): 2^31 + 2112 elements, the last stage's map
WINDOW = 4096


def _need_free(nbytes, what):
    free, _ = torch.cuda.mem_get_info()
    if free < nbytes:
        pytest.skip(f"{what} needs {nbytes / GiB:.1f} GiB of free GPU memory; {free / GiB:.1f} GiB free")


def _windows(numel):
    """Flat indices on both sides of 2^31, and the first and last ones."""
    k = torch.arange(-WINDOW, WINDOW, device="cuda") + 2**31
    return torch.cat([torch.arange(WINDOW, device="cuda"), k, torch.arange(numel - WINDOW, numel, device="cuda")])


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_more_than_2_pow_31_elements(layout):
    """A float16 (N, 64, 7, 7) map of 2^31 + 2112 random elements with random statistics,
    forward and backward, checked against the float64 oracle at the elements on both sides of
    2^31 (flat, in memory order) and at both ends. Planes of 49 elements: vectors straddle
    them; channels-last: rows of 64."""
    numel = N_7X7 * 64 * 49
    _need_free(2 * numel * 2 + GiB // 2, "an input and an output of 2^31 float16 elements")
    torch.manual_seed(0)
    flat = torch.randn(numel, device="cuda", dtype=torch.float16)
    if layout == "contiguous":
        x = flat.view(N_7X7, 64, 7, 7)
        channel = lambda k: (k // 49) % 64
    else:
        x = flat.view(N_7X7, 7, 7, 64).permute(0, 3, 1, 2)
        channel = lambda k: k % 64
    mean, w, b = (torch.randn(64, device="cuda") for _ in range(3))
    var = torch.rand(64, device="cuda") + 0.25
    y, scale = ops.frozen_bn(x, w, b, mean, var, 1e-5)
    assert y.stride() == x.stride()
    k = _windows(numel)
    c = channel(k)
    y_flat = y.permute(0, 2, 3, 1).reshape(-1) if layout == "channels_last" else y.view(-1)
    xs = flat[k].double()
    exact = (xs - mean[c].double()) / torch.sqrt(var[c].double() + 1e-5) * w[c].double() + b[c].double()
    terms = ((xs - mean[c].double()) / torch.sqrt(var[c].double() + 1e-5) * w[c].double()).abs() + b[c].double().abs()
    assert_close_to_exact(y_flat[k], exact, terms, compute_eps(torch.float16))
    del y, y_flat
    gi = ops.frozen_bn_backward(x, scale)  # the input as the incoming gradient
    gi_flat = gi.permute(0, 2, 3, 1).reshape(-1) if layout == "channels_last" else gi.view(-1)
    assert torch.equal(gi_flat[k], (flat[k].float() * scale[c]).half())


def test_more_than_2_pow_31_elements_expanded_gradient():
    """The stride-0 gradient of x.sum() over 2^31 + 2112 elements (the strided kernel, 64-bit):
    each element is its channel's scale, rounded once."""
    numel = N_7X7 * 64 * 49
    _need_free(numel * 2 + GiB // 2, "an output of 2^31 float16 elements")
    scale = torch.rand(64, device="cuda") + 0.5
    g = torch.ones((), device="cuda", dtype=torch.float16).expand(N_7X7, 64, 7, 7)
    gi = ops.frozen_bn_backward(g, scale)
    k = _windows(numel)
    assert torch.equal(gi.view(-1)[k], scale[(k // 49) % 64].half())
