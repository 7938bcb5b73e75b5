"""The fused op against an fp64 oracle: values, gradients, layouts, opcheck, errors."""

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st

from conftest import device_params, requires_cuda
from oracle import (DTYPES, SampleSpec, assert_close_to_exact, compute_eps, fixed_samples, is_dense,
                    make_layout, make_sample, oracle, oracle_terms, sample_specs)

import frozennorm
from frozennorm import frozen_batch_norm

frozen_bn = torch.ops.frozennorm.frozen_bn
frozen_bn_backward = torch.ops.frozennorm.frozen_bn_backward


def stats_dtype(s):
    return s.mean.dtype


def check_forward(s):
    y, scale = frozen_bn(*s.args())
    assert y.dtype == s.x.dtype
    assert y.shape == s.x.shape
    if s.x.numel() > 0 and is_dense(s.x):
        assert y.stride() == s.x.stride(), "output must keep the input's memory format"
    cdt = torch.float64 if compute_eps(s.x.dtype, stats_dtype(s)) < 2**-30 else torch.float32
    assert scale.dtype == cdt and scale.shape == (s.x.shape[1],)
    exact = oracle(*s.args())
    assert_close_to_exact(y, exact, oracle_terms(*s.args()),
                          compute_eps(s.x.dtype, stats_dtype(s)))
    return y, scale


def check_backward(s, scale):
    g = make_layout(torch.randn(s.x.shape, dtype=torch.float64).to(s.x.dtype).to(s.x.device),
                    "contiguous")
    gi = frozen_bn_backward(g, scale)
    assert gi.dtype == g.dtype and gi.stride() == g.stride()
    ones = torch.zeros_like(s.mean)
    exact = oracle(g, s.weight, None, ones, s.var, s.eps)
    terms = exact.abs()
    assert_close_to_exact(gi, exact, terms, compute_eps(g.dtype, scale.dtype), "grad_input")


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", DTYPES)
@given(spec=sample_specs(dtypes=[None], big=True))  # the dtype: each gets its own examples
# (the big ones: at::parallel_for's three chunks each start mid-channel, not at channel 0)
@example(spec=SampleSpec((0, 5, 3, 3), None))
@example(spec=SampleSpec((2, 37, 29, 31), None, "channels_last"))  # rows of 37
@example(spec=SampleSpec((5, 7, 61, 67), None, "contiguous", "mean_gg_std"))  # long planes
@example(spec=SampleSpec((1403, 64), None, "contiguous", "wide"))  # (N, C), whole vectors a row
@example(spec=SampleSpec((3, 5, 9, 997), None, "sliced", "tiny_var", affine=False))
@example(spec=SampleSpec((2, 6, 5, 7), None, "permuted", "eps0", stats_dtype=torch.float64))
@example(spec=SampleSpec((2, 9, 4, 4), None, "expanded", "mean_gg_std",
                         stats_dtype=torch.float16))
def test_forward_backward_match_oracle(device, dtype, spec):
    """Drawn samples (empty tensors rare, about one in five past the parallel grain) and the
    hard cases by name, on three threads on the CPU (so that chunks start mid-channel)."""
    s = dataclasses.replace(spec, dtype=dtype).make(device)
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        _, scale = check_forward(s)
        check_backward(s, scale)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced", "permuted", "expanded"])
@pytest.mark.parametrize("shape", [[2, 3, 5, 7], [0, 4, 3, 3], [3, 64, 1, 1], [1, 1, 9, 9],
                                   [2, 4, 3, 5, 6], [5, 7], [4, 6, 11], [2, 13, 17, 19],
                                   # planes of 4, 8, 255, 256, 257 elements (vector-width and
                                   # small-plane boundaries of the CPU kernel)
                                   [3, 5, 2, 2], [3, 5, 2, 4], [2, 3, 1, 255], [2, 3, 16, 16],
                                   [2, 3, 1, 257]])
def test_layouts_and_shapes(device, dtype, layout, shape):
    s = make_sample(shape, dtype, layout, "typical", device=device, seed=len(shape))
    _, scale = check_forward(s)
    check_backward(s, scale)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", DTYPES)
def test_mean_much_larger_than_std_is_exact(device, dtype):
    """Where x * scale + shift loses ~1000 ulps, (x - mean) * scale + bias stays exact."""
    s = make_sample([4, 32, 16, 16], dtype, regime="mean_gg_std", device=device, seed=3)
    y, _ = check_forward(s)
    if dtype == torch.float32:
        exact = oracle(*s.args())
        err = ((y.double() - exact).abs() / exact.abs().clamp_min(1)).max().item()
        assert err <= 4 * 2**-23, f"{err / 2**-23:.1f} ulps"
        # nn.BatchNorm2d's eval path, on the same values, is measurably worse
        bn = F.batch_norm(s.x, s.mean, s.var, s.weight, s.bias, False, 0.0, s.eps)
        bn_err = ((bn.double() - exact).abs() / exact.abs().clamp_min(1)).max().item()
        assert err < bn_err


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stats", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_statistics_dtype_is_independent_of_input(device, dtype, stats):
    s = make_sample([2, 6, 5, 5], dtype, stats_dtype=stats, device=device, seed=5)
    y, _ = check_forward(s)
    # mixed statistics dtypes too
    y2, _ = frozen_bn(s.x, s.weight.half() if s.weight is not None else None, s.bias,
                      s.mean, s.var.double(), s.eps)
    exact = oracle(s.x, s.weight.half(), s.bias, s.mean, s.var.double(), s.eps)
    assert_close_to_exact(y2, exact, exact.abs() + 10, compute_eps(dtype, torch.float64))


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_batchnorm_eval(device, dtype):
    """nn.BatchNorm2d's eval output computed in float64, rounded once to the input's dtype
    (within a few ulps of the compute dtype): variances down to 1e-6, where eps decides the
    scale, and half-ulp accuracy in float16/bfloat16, where a truncating or double rounding
    would be a whole ulp off."""
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(24).to(device)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.copy_(10 ** torch.linspace(-6, 0.5, 24))
        bn.weight.normal_()
        bn.bias.normal_()
    bn.eval()
    x = torch.randn(3, 24, 9, 11).to(dtype).to(device)  # drawn on the CPU: the same values everywhere
    exact = copy.deepcopy(bn).double()(x.double())
    frozen = frozennorm.FrozenBatchNorm2d.from_batchnorm(bn)
    y = frozen(x)
    assert y.dtype == dtype
    args = (x, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
    # BatchNorm's own float64 eval computes x * alpha + beta: its error scales with |x * alpha|
    alpha = (bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)).view(1, -1, 1, 1)
    terms = oracle_terms(*args) + (x.double() * alpha).abs()
    assert_close_to_exact(y, exact, terms, compute_eps(dtype))


@pytest.mark.parametrize("device", device_params())
def test_nan_inf_propagate_as_batchnorm(device):
    x = torch.randn(2, 4, 3, 3, device=device)
    x[0, 0, 0, 0] = float("nan")
    x[0, 1, 1, 1] = float("inf")
    x[1, 2, 2, 2] = float("-inf")
    mean = torch.randn(4, device=device)
    var = torch.rand(4, device=device) + 0.1
    w = torch.tensor([1.0, -2.0, 0.5, 1.0], device=device)
    b = torch.randn(4, device=device)
    y = frozen_batch_norm(x, mean, var, w, b)
    ref = F.batch_norm(x, mean, var, w, b, False, 0.0, 1e-5)
    assert torch.equal(torch.isnan(y), torch.isnan(ref))
    assert torch.equal(torch.isposinf(y), torch.isposinf(ref))
    assert torch.equal(torch.isneginf(y), torch.isneginf(ref))
    # NaN statistics poison exactly their channel
    var2 = var.clone()
    var2[3] = float("nan")
    y2 = frozen_batch_norm(torch.randn(2, 4, 3, 3, device=device), mean, var2, w, b)
    assert torch.isnan(y2[:, 3]).all() and torch.isfinite(y2[:, :3]).all()


@pytest.mark.parametrize("device", device_params())
def test_gradcheck_fp64(device):
    torch.manual_seed(0)
    opts = dict(device=device, dtype=torch.float64)
    x = torch.randn(2, 3, 4, 5, **opts, requires_grad=True)
    w = torch.randn(3, **opts, requires_grad=True)
    b = torch.randn(3, **opts, requires_grad=True)
    m = torch.randn(3, **opts, requires_grad=True)
    v = (torch.rand(3, **opts) + 0.5).requires_grad_()
    fn = lambda x, w, b, m, v: frozen_batch_norm(x, m, v, w, b, 1e-3)
    assert torch.autograd.gradcheck(fn, (x, w, b, m, v))
    assert torch.autograd.gradgradcheck(fn, (x, w, b, m, v))
    # the common case: only the input requires grad (buffers), channels_last
    xc = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    fn2 = lambda x: frozen_batch_norm(x, m.detach(), v.detach(), w.detach(), b.detach())
    assert torch.autograd.gradcheck(fn2, (xc,))
    assert torch.autograd.gradgradcheck(fn2, (xc,))


@pytest.mark.parametrize("device", device_params())
def test_backward_saves_no_activation_and_no_buffers(device):
    """Only the per-channel scale is saved: no input, no output, no statistics tensor."""
    m = frozennorm.FrozenBatchNorm2d(16).to(device)
    x = torch.randn(4, 16, 32, 32, device=device, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = m(x)
    assert len(saved) == 1
    assert saved[0].shape == (16,)
    for buf in m.buffers():
        assert saved[0].data_ptr() != buf.data_ptr()
    # buffers changed in place between forward and backward (as DDP's broadcast does)
    with torch.no_grad():
        for buf in m.buffers():
            buf.add_(1.0)
    y.sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("device", device_params())
def test_opcheck(device):
    for s in fixed_samples(device) + fixed_samples(device, requires_grad=True):
        torch.library.opcheck(frozen_bn.default, s.args())
        _, scale = frozen_bn(*[a.detach() if torch.is_tensor(a) else a for a in s.args()])
        g = torch.randn_like(s.x.detach())
        torch.library.opcheck(frozen_bn_backward.default, (g, scale))


class _OpCall(torch.nn.Module):
    """Calls the op itself (the modules use plain ATen ops while a graph is captured)."""

    def __init__(self, c):
        super().__init__()
        self.inner = frozennorm.FrozenBatchNorm2d(c)
        with torch.no_grad():
            self.inner.running_mean.normal_()
            self.inner.running_var.uniform_(0.5, 2)

    def forward(self, x):
        m = self.inner
        return frozen_bn(x, m.weight, m.bias, m.running_mean, m.running_var, m.eps)[0]


@pytest.mark.parametrize("device", device_params())
def test_torch_compile_traces_the_op(device):
    """Fake kernel + autograd: the op itself compiles with fullgraph, forward and backward."""
    mod = _OpCall(8).to(device)
    x = torch.randn(2, 8, 5, 5, device=device, requires_grad=True)
    eager = mod(x)
    compiled = torch.compile(mod, fullgraph=True, backend="aot_eager", dynamic=True)
    out = compiled(x)
    torch.testing.assert_close(out, eager)
    out.sum().backward()
    m = mod.inner
    torch.testing.assert_close(x.grad, (m.weight / torch.sqrt(m.running_var + m.eps)).view(
        1, -1, 1, 1).expand_as(x))
    out2 = compiled(torch.randn(3, 8, 4, 6, device=device).to(memory_format=torch.channels_last))
    assert out2.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("device", device_params())
def test_export_traces_the_op(device):
    mod = _OpCall(8).to(device)
    x = torch.randn(2, 8, 5, 5, device=device)
    ep = torch.export.export(mod, (x,))
    assert any(n.target == frozen_bn.default for n in ep.graph.nodes)
    torch.testing.assert_close(ep.module()(x), mod(x))


class TestErrors:
    def stats(self, c=4, **kw):
        return torch.zeros(c, **kw), torch.ones(c, **kw)

    def test_rank(self):
        mean, var = self.stats()
        with pytest.raises(RuntimeError, match="at least 2 dimensions"):
            frozen_batch_norm(torch.randn(4), mean, var)

    def test_channel_count(self):
        mean, var = self.stats(4)
        with pytest.raises(RuntimeError, match=r"running_mean must be a 1-D tensor with one value per channel \(3 channels"):
            frozen_batch_norm(torch.randn(2, 3, 5), mean, var)

    def test_statistic_wrong_length(self):
        mean, var = self.stats(4)
        with pytest.raises(RuntimeError, match="weight must be a 1-D tensor"):
            frozen_batch_norm(torch.randn(2, 4, 5), mean, var, torch.ones(5))
        with pytest.raises(RuntimeError, match="bias must be a 1-D tensor"):
            frozen_batch_norm(torch.randn(2, 4, 5), mean, var, None, torch.ones(2, 2))

    def test_non_floating_input(self):
        mean, var = self.stats()
        with pytest.raises(RuntimeError, match="input must be float16, bfloat16, float32 or float64, got (Long|torch.int64)"):
            frozen_batch_norm(torch.ones(2, 4, dtype=torch.long), mean, var)

    def test_non_floating_statistics(self):
        with pytest.raises(RuntimeError, match="running_var must be a floating-point tensor"):
            frozen_batch_norm(torch.randn(2, 4), torch.zeros(4), torch.ones(4, dtype=torch.int32))

    def test_device_mismatch_is_named(self):
        mean, var = self.stats(device="meta")
        with pytest.raises(RuntimeError, match="is on meta but the input is on cpu"):
            frozen_batch_norm(torch.randn(2, 4), mean, var)

    @requires_cuda
    def test_device_mismatch_cuda(self):
        mean, var = self.stats()
        with pytest.raises(RuntimeError, match="running_mean is on cpu but the input is on cuda"):
            frozen_batch_norm(torch.randn(2, 4, device="cuda"), mean, var)

    def test_backward_scale_checks(self):
        with pytest.raises(RuntimeError, match="scale must be float32 or float64"):
            frozen_bn_backward(torch.randn(2, 4), torch.ones(4, dtype=torch.float16))
        with pytest.raises(RuntimeError, match="one value per channel"):
            frozen_bn_backward(torch.randn(2, 4), torch.ones(3))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels", [5, 64, 300])
@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
def test_channel_slices_cpu(dtype, channels, memory_format):
    """The first C channels of a 2C-channel tensor (torch.split / chunk): rows of dense data
    with gaps between them — a channels-last pixel's C channels (parameters following the
    channel) or an NCHW plane (one channel's parameters) — walked row by row, on 1 and 3
    threads, forward and backward."""
    big = torch.randn(2, 2 * channels, 7, 9, dtype=torch.float64).to(dtype)
    x = big.contiguous(memory_format=memory_format)[:, :channels]
    assert not x.is_contiguous(memory_format=memory_format)
    s = make_sample(list(x.shape), dtype, seed=channels)
    s = type(s)(x, s.weight, s.bias, s.mean, s.var, s.eps)
    before = torch.get_num_threads()
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            y, scale = check_forward(s)
            assert y.is_contiguous(memory_format=memory_format)
            gi = frozen_bn_backward(x, scale)  # the slice as grad_output
            exact = oracle(x, s.weight, None, torch.zeros_like(s.mean), s.var, s.eps)
            assert_close_to_exact(gi, exact, exact.abs(), compute_eps(dtype, scale.dtype),
                                  "grad_input")
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("step", [2, 3])
def test_strided_channels_of_channels_last_cpu(dtype, step):
    """Every other (third) channel of a channels-last tensor: the channels are the innermost
    dimension but strided, so each row is gathered (in chunks, 300 channels being more than
    one) before the vector loop, the parameters following the channel."""
    big = torch.randn(2, step * 300, 3, 5, dtype=torch.float64).to(dtype)
    x = big.contiguous(memory_format=torch.channels_last)[:, ::step]
    assert not x.is_contiguous(memory_format=torch.channels_last) and x.stride(1) == step
    s = make_sample(list(x.shape), dtype, seed=step)
    s = type(s)(x, s.weight, s.bias, s.mean, s.var, s.eps)
    _, scale = check_forward(s)
    gi = frozen_bn_backward(x, scale)  # the strided tensor as grad_output
    exact = oracle(x, s.weight, None, torch.zeros_like(s.mean), s.var, s.eps)
    assert_close_to_exact(gi, exact, exact.abs(), compute_eps(dtype, scale.dtype), "grad_input")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_subnormal_results_are_rounded_not_flushed_cpu(dtype, layout):
    """Results in the subnormal range of the data dtype, beside normal ones in every vector,
    forward, backward and fused, are rounded to nearest even like any other (the AVX512-BF16
    conversion instruction alone would flush them to zero). Scale 1.5 with mean and shift 0:
    the float32 products are exact, so the only rounding is the one to the data dtype."""
    fi = torch.finfo(dtype)
    lo, hi = math.log2(fi.smallest_normal * fi.eps), math.log2(fi.smallest_normal) + 4
    g = torch.Generator().manual_seed(7)
    shape = [2, 64, 6, 11]  # NCHW planes of 66, channels-last rows of 64: whole vectors
    mag = torch.exp2(torch.empty(shape, dtype=torch.float64).uniform_(lo, hi, generator=g))
    sign = torch.randint(0, 2, shape, generator=g) * 2 - 1
    x = make_layout((mag * sign).to(dtype), layout)
    C = shape[1]
    weight, bias = torch.full((C,), 1.5), torch.zeros(C)
    mean, var = torch.zeros(C), torch.ones(C)
    args = (x, weight, bias, mean, var, 0.0)
    exact = oracle(*args)
    y, scale = frozen_bn(*args)
    assert_close_to_exact(y, exact, oracle_terms(*args), compute_eps(dtype))
    gi = frozen_bn_backward(x, scale)
    assert_close_to_exact(gi, exact, oracle_terms(*args), compute_eps(dtype), "grad_input")
    fused = torch.ops.frozennorm.frozen_bn_act(x, None, weight, bias, mean, var, 0.0, 1, False)[0]
    assert torch.equal(fused, torch.relu(y))
    subnormal = (y != 0) & (y.abs() < fi.smallest_normal)
    assert subnormal.sum() > y.numel() // 10 and (y.abs() >= fi.smallest_normal).any()


def test_zero_size_and_one_by_one():
    s = make_sample([0, 5, 3, 3], torch.float32)
    y, scale = frozen_bn(*s.args())
    assert y.shape == (0, 5, 3, 3) and torch.isfinite(scale).all()
    x = torch.randn(0, 5, 3, 3, requires_grad=True)
    frozen_batch_norm(x, s.mean, s.var).sum().backward()
    assert x.grad.shape == x.shape
    s = make_sample([7, 3, 1, 1], torch.float16)
    check_forward(s)


@pytest.fixture
def cpu_threads(request):
    """torch's intra-op threads set to request.param for the test, then restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("cpu_threads", [2, 3], indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("shape", [[5, 7, 61, 67],     # chunk edges fall inside planes
                                   [7, 5, 1, 3001],    # long odd planes
                                   [11, 40, 13, 17],   # small planes, many per chunk
                                   [71, 1200]])        # one value per (n, c)
def test_parallel_chunks_cpu(cpu_threads, dtype, layout, shape):
    """Several threads split the flat range at arbitrary points (mid-plane, mid-vector, and
    mid-channel: with 2 and with 3 threads no chunk of these shapes starts at channel 0):
    every element is written once and exactly."""
    s = make_sample(shape, dtype, layout, "typical", seed=sum(shape))
    _, scale = check_forward(s)
    check_backward(s, scale)


@pytest.mark.parametrize("cpu_threads", [1, 3], indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("plane", [1, 3, 4, 5, 7, 8, 9, 12, 15, 16, 17, 24, 31, 33, 49, 255, 257])
def test_plane_lengths_around_the_vector_width_cpu(cpu_threads, dtype, plane):
    """NCHW-like planes shorter than, equal to and just past one or two vectors (4 doubles,
    8 floats, 16 halves): the overlapping last vector of a plane, the element-by-element
    short planes, and chunk edges inside planes all give every element exactly."""
    s = make_sample([-(-100_000 // (37 * plane)), 37, plane], dtype, "contiguous", "typical",
                    seed=plane)  # > 3 grains of 32768: split over the threads
    _, scale = check_forward(s)
    check_backward(s, scale)


@pytest.mark.parametrize("cpu_threads", [3], indirect=True)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_streaming_stores_in_parallel_cpu(cpu_threads, layout):
    """Outputs of 16 MiB and more take the non-temporal-store path; split over threads."""
    s = make_sample([2, 64, 181, 190], torch.float32, layout, "typical", seed=3)
    _, scale = check_forward(s)
    check_backward(s, scale)


@pytest.mark.slow
def test_more_than_2_pow_31_elements_cpu():
    """64-bit indexing: a 2^31 + 1000 element float16 tensor (~4 GiB in, ~4 GiB out)."""
    if not frozennorm.ops.COMPILED:
        pytest.skip("the pure-PyTorch fallback computes in float32 intermediates (~20 GiB here)")
    numel = 2**31 + 1000
    C = 2
    try:
        x = torch.empty(numel, dtype=torch.float16).view(1, C, numel // C)
    except RuntimeError:
        pytest.skip("not enough memory")
    x.fill_(1.0)
    x[0, 1, -1] = 3.0
    x[0, 0, 0] = -1.0
    mean = torch.tensor([1.0, 2.0])
    var = torch.tensor([4.0, 0.25])
    y = frozen_batch_norm(x, mean, var, eps=0.0)
    assert y[0, 1, -1].item() == 2.0  # (3 - 2) / 0.5
    assert y[0, 0, 0].item() == -1.0  # (-1 - 1) / 2
    assert y[0, 1, 0].item() == -2.0
    assert y[0, 0, -1].item() == 0.0
    del y


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("which", ["weight", "bias", "running_mean", "running_var"])
def test_input_gradient_does_not_depend_on_which_statistics_require_grad(dtype, which):
    """One rule for the scale: the input gradient is grad * (weight / sqrt(var + eps)), the
    forward's scale, whether or not a statistic requires grad (the backward once recomputed
    it as invstd * weight there: two roundings, a third of float32 gradients off by an ulp)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, 256, 8, 8, generator=g).to(dtype)
    grad = torch.randn(4, 256, 8, 8, generator=g).to(dtype)
    stats = {"weight": torch.randn(256, generator=g), "bias": torch.randn(256, generator=g),
             "running_mean": torch.randn(256, generator=g),
             "running_var": torch.rand(256, generator=g) + 0.1}

    def input_grad(requires, create_graph=False):
        xx = x.clone().requires_grad_()
        s = {k: v.clone().requires_grad_(requires and k == which) for k, v in stats.items()}
        y = frozennorm.frozen_batch_norm(xx, s["running_mean"], s["running_var"], s["weight"],
                                         s["bias"])
        return torch.autograd.grad(y, xx, grad, create_graph=create_graph)[0].detach()
    expected = input_grad(False)
    assert torch.equal(input_grad(True), expected)
    assert torch.equal(input_grad(True, create_graph=True), expected)  # (double backward)
