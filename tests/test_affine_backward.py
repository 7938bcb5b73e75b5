"""frozen_bn_affine_backward, the backward when weight/bias (or the statistics) train: the
input's and the residual's gradients and the per-channel sums of ga and ga * (x - mean),
against a float64 oracle with bounds that scale with the sums of |terms|; the sums the same
bits for any thread count; gradcheck/opcheck of the ops that call it."""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from oracle import DTYPES, LAYOUTS, is_dense, make_layout, make_sample, samples, ulp

import frozennorm
from frozennorm import frozen_batch_norm, frozen_batch_norm_act
from frozennorm._op.fallback import frozen_bn_affine_backward_fallback, statistics_grads
from frozennorm.ops import ACTIVATIONS, compute_dtype

affine_backward = torch.ops.frozennorm.frozen_bn_affine_backward
IDENTITY, RELU, RELU6, SILU = (ACTIVATIONS[n] for n in ("identity", "relu", "relu6", "silu"))

# The kernel's accuracy contract (csrc/cpu/affine_backward_kernel.h): an accumulator adds at
# most 1024 values in sequence (2048 in float64), then vector lanes and tiles are added in
# trees. The depth of any term's path to the sum is below this for tensors of n elements.
MAX_DEPTH = 2048


def depth(numel):
    return MAX_DEPTH + 2 * math.ceil(math.log2(numel + 2)) + 8


def unit_roundoff(acc):
    return 2.0 ** -53 if acc == torch.float64 else 2.0 ** -24


def channel(t, ndim):
    return t.reshape([1, -1] + [1] * (ndim - 2))


def reduce_dims(ndim):
    return [0] + list(range(2, ndim))


def exact_ga(g, saved, activation):
    """grad * act'(saved) in float64 (the same NaN rules as torch's backward)."""
    g = g.double()
    if activation == IDENTITY:
        return g
    s = saved.double()
    if activation == RELU:
        return torch.where(s <= 0, torch.zeros_like(g), g)
    if activation == RELU6:
        return torch.where((s <= 0) | (s >= 6), torch.zeros_like(g), g)
    sig = torch.sigmoid(s)
    return g * sig * (1 + s * (1 - sig))


def ga_error(g, saved, ga, activation, dtype, acc):
    """Bound on |kernel's ga - exact ga| per element: 0 where ga is grad or zero; for SiLU the
    arithmetic in the compute dtype and the rounding to the data dtype."""
    if activation != SILU:
        return torch.zeros_like(ga)
    return 0.5 * ulp(ga, dtype) + 16 * unit_roundoff(acc) * g.double().abs() * (1 + saved.double().abs())


def check_against_oracle(g, x, saved, mean, scale, activation, input_grad=True,
                         residual_grad=True, out=None):
    """Runs the op (or takes its outputs `out`) and checks every output against the float64
    oracle: ga (the residual's gradient) within its rounding, grad_input within one rounding
    of ga * scale, the sums within depth() roundings of their sums of |terms| (plus ga's
    rounding, for SiLU)."""
    gi, gr, sum_g, sum_gx = out if out is not None else affine_backward(
        g, x, saved, mean, scale, activation, input_grad, residual_grad)
    dtype, acc = x.dtype, compute_dtype(x.dtype, scale.dtype)
    like = x if is_dense(x) else x.contiguous()
    C, nd = x.shape[1], x.dim()
    assert sum_g.dtype == sum_gx.dtype == acc and sum_g.shape == sum_gx.shape == (C,)
    ga = exact_ga(g, saved, activation)
    err = ga_error(g, saved, ga, activation, dtype, acc)
    for flag, t in ((input_grad, gi), (residual_grad, gr)):
        if not flag:
            assert t.shape == (0,) and t.dtype == dtype
            continue
        assert t.dtype == dtype and t.shape == x.shape
        if x.numel() > 0:
            assert t.stride() == like.stride(), "outputs take the input's dense layout"
    if residual_grad and x.numel() > 0:
        finite = torch.isfinite(ga)
        assert torch.equal(torch.isfinite(gr.double()), finite)
        diff = (gr.double() - ga).abs()[finite]
        assert (diff <= err[finite]).all(), f"ga: error {diff.max().item():.3g}"
    if input_grad and x.numel() > 0:
        ga_k = gr.double() if residual_grad else ga
        if residual_grad or activation != SILU:
            exact = ga_k * channel(scale.double(), nd)  # one rounding of it, in the compute dtype
            bound = 0.5 * ulp(exact, dtype) + 2 * unit_roundoff(acc) * exact.abs()
            finite = torch.isfinite(exact)
            assert torch.equal(torch.isfinite(gi.double()), finite)
            assert ((gi.double() - exact).abs()[finite] <= bound[finite]).all(), "grad_input"
    # the sums: the mean in the compute dtype (the op's rule), then exact arithmetic
    u, n = unit_roundoff(acc), x.numel()
    xc = x.double() - channel(mean.to(acc).double(), nd)
    dims = reduce_dims(nd)
    for got, terms, errs, what in (
            (sum_g, ga, err, "sum_grad"),
            (sum_gx, ga * xc, err * xc.abs(), "sum_centered")):
        exact = terms.sum(dims)
        bound = errs.sum(dims) + (depth(n) + 2) * u * terms.abs().sum(dims)
        finite = torch.isfinite(exact)
        assert torch.equal(torch.isfinite(got.double()), finite), f"{what}: non-finite pattern"
        assert torch.equal(got.double()[~finite].isnan(), exact[~finite].isnan()), what
        assert torch.equal(got.double()[~finite & ~exact.isnan()],
                           exact[~finite & ~exact.isnan()]), what
        worst = ((got.double() - exact).abs() - bound)[finite]
        assert (worst <= 0).all(), (
            f"{what}: error exceeds the bound by {worst.max().item():.3g} "
            f"(bound {bound[finite].max().item():.3g})")
    return gi, gr, sum_g, sum_gx


def forward_saved(x, mean, var, weight, bias, eps, activation):
    """The scale and the saved tensor of the forward (output for ReLU/ReLU6, pre-activation for
    SiLU, None for the identity), from the fused forward itself."""
    out, scale, preact = torch.ops.frozennorm.frozen_bn_act(
        x, None, weight, bias, mean, var, eps, activation, activation == SILU)
    saved = None if activation == IDENTITY else (preact if activation == SILU else out)
    return scale, saved


def case(shape, dtype, layout, activation, regime="typical", grad_layout="contiguous", seed=0):
    s = make_sample(shape, dtype, layout, regime, seed=seed)
    scale, saved = forward_saved(s.x, s.mean, s.var, s.weight, s.bias, s.eps, activation)
    gen = torch.Generator().manual_seed(seed + 1)
    g = make_layout(torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype), grad_layout)
    return g, s.x, saved, s.mean, scale


# ---- values against the oracle ------------------------------------------------------------

@given(data=st.data())
def test_matches_oracle(data):
    s = data.draw(samples())
    activation = data.draw(st.sampled_from(sorted(ACTIVATIONS.values())))
    flags = data.draw(st.tuples(st.booleans(), st.booleans()))
    scale, saved = forward_saved(s.x, s.mean, s.var, s.weight, s.bias, s.eps, activation)
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    g = make_layout(torch.randn(s.x.shape, generator=gen, dtype=torch.float64).to(s.x.dtype),
                    data.draw(st.sampled_from(LAYOUTS)))
    check_against_oracle(g, s.x, saved, s.mean, scale, activation, *flags)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_layouts_shapes_activations(dtype, activation, layout):
    """Every dtype, activation and layout (grad_output in another one) on short planes and
    rows (element by element), 7x7 planes (a masked last vector), planes longer than a
    tile's run, and tiles of several outer indices; |mean| >> std in turn."""
    act = ACTIVATIONS[activation]
    for i, shape in enumerate([[2, 8, 5, 7], [3, 37, 7, 7], [2, 3, 3, 3001], [5, 70, 21, 19]]):
        regime = ("typical", "mean_gg_std")[(i + len(layout)) % 2]
        args = case(shape, dtype, layout, act, regime, seed=sum(shape),
                    grad_layout="channels_last" if layout == "contiguous" else "contiguous")
        check_against_oracle(*args, act)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("input_grad, residual_grad", [(True, False), (False, True), (False, False)])
def test_which_gradients(dtype, activation, input_grad, residual_grad):
    """Without grad_input and/or grad_residual the op returns empty tensors for them and the
    same sums."""
    args = case([3, 33, 6, 5], dtype, "channels_last", ACTIVATIONS[activation], seed=5)
    full = affine_backward(*args, ACTIVATIONS[activation], True, True)
    part = check_against_oracle(*args, ACTIVATIONS[activation], input_grad, residual_grad)
    assert torch.equal(part[2], full[2]) and torch.equal(part[3], full[3])
    if input_grad:
        assert torch.equal(part[0], full[0])
    if residual_grad:
        assert torch.equal(part[1], full[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["identity", "relu"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [[2, 7, 61, 67],     # planes: tiles of several channels
                                   [2, 2, 1, 8500],    # planes longer than one run of a tile
                                   [2, 1100, 3, 11],   # many channels: channel blocks
                                   [3, 70, 5, 5],      # short planes, channels left over
                                   [2, 9, 40, 40],     # rows: tiles of 1024 rows
                                   [2, 1, 100, 101],   # one channel: the whole tensor a plane
                                   [7000, 3]])         # one value per (n, c)
def test_exact_sums_on_exact_values(dtype, activation, layout, shape):
    """Small integers everywhere, so that every product and partial sum is exact in float32:
    the sums must equal the float64 oracle bit for bit, whatever the order, which shows any
    element summed twice or not at all, or into the wrong channel (at tile, run, vector and
    row boundaries) — errors the rounding bound of a large sum could hide."""
    gen = torch.Generator().manual_seed(len(shape) + shape[1])
    C = shape[1]
    x = torch.randint(-8, 9, shape, generator=gen).to(dtype)
    g = torch.randint(-4, 5, shape, generator=gen).to(dtype)
    saved = torch.randint(-2, 8, shape, generator=gen).to(dtype)  # 0 and 6: ReLU's kinks
    mean = torch.randint(-3, 4, (C,), generator=gen).float()
    scale = torch.rand(C, generator=gen) + 0.5
    x, g, saved = (make_layout(t, layout) for t in (x, g, saved))
    act = ACTIVATIONS[activation]
    gi, gr, sum_g, sum_gx = check_against_oracle(g, x, saved, mean, scale, act)
    ga = exact_ga(g, saved, act)
    dims = reduce_dims(len(shape))
    assert torch.equal(sum_g.double(), ga.sum(dims))
    assert torch.equal(sum_gx.double(), (ga * (x.double() - channel(mean.double(), len(shape)))).sum(dims))
    ref = frozen_bn_affine_backward_fallback(g, x, saved, mean, scale, act, True, True)
    assert torch.equal(gi, ref[0]) and torch.equal(gr, ref[1])  # one rounding, as the fallback


def test_sums_are_more_accurate_than_a_running_sum():
    """2^21 values of 0.1 in one channel: a float32 running sum drifts by ~1 % (each addition
    rounds at the size of the total); the tiled sums stay within the depth bound, which the
    running sum (numpy's float32 add.accumulate, sequential) exceeds."""
    import numpy as np

    n = 1 << 21
    g = torch.full((1, 1, n), 0.1)
    x = torch.full((1, 1, n), 1.1)
    mean = torch.tensor([1.0])
    scale = torch.ones(1)
    _, _, sum_g, sum_gx = check_against_oracle(g, x, None, mean, scale, IDENTITY, False, False)
    exact = n * torch.tensor(0.1, dtype=torch.float32).double()
    bound = (depth(n) + 2) * 2.0 ** -24 * exact
    running = float(np.add.accumulate(g.flatten().numpy())[-1])
    assert abs(running - exact) > bound, "the bound must be tighter than a running sum's error"
    assert abs(sum_g.double() - exact) <= bound


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_non_finite_values_propagate(dtype, layout):
    """An inf in the input or a NaN in the gradient makes its channel's sums inf/NaN as in the
    oracle and no other channel's: lanes masked out of an overlapping last vector add zeros,
    not their products with zero."""
    shape = [3, 49, 7, 7]  # planes and rows of 49: a last vector overlapping in every build
    g, x, saved, mean, scale = case(shape, dtype, layout, IDENTITY, seed=11)
    g = g.abs() + 0.5  # no zero gradient: an inf input gives an inf term
    x = x.clone()
    g = g.clone()
    for c, pos in ((1, 47), (2, 40), (3, 33), (4, 17), (5, 1)):
        x[0, c].view(-1)[pos] = float("inf")
        x[2, c + 10].view(-1)[pos] = float("-inf")
    g[1, 20, 3, 3] = float("nan")
    _, _, sum_g, sum_gx = check_against_oracle(g, x, saved, mean, scale, IDENTITY, True, True)
    assert torch.isinf(sum_gx[1:6]).all() and torch.isnan(sum_g[20]) and torch.isnan(sum_gx[20])
    assert torch.isfinite(sum_g[:20]).all() and torch.isfinite(sum_gx[6:11]).all()


def test_empty_and_single_elements():
    for shape in ([0, 3, 4, 4], [2, 3, 0], [1, 1], [1, 5], [3, 1, 1, 1]):
        for act in (IDENTITY, SILU):
            g, x, saved, mean, scale = case(shape, torch.float32, "contiguous", act, seed=2)
            gi, gr, sum_g, sum_gx = check_against_oracle(g, x, saved, mean, scale, act)
            if x.numel() == 0:
                assert (sum_g == 0).all() and (sum_gx == 0).all()


def test_float32_data_with_float64_scale_computes_in_float64():
    g, x, saved, mean, scale = case([2, 6, 5, 33], torch.float32, "contiguous", RELU,
                                    "mean_gg_std", seed=3)
    check_against_oracle(g, x, saved, mean.double(), scale.double(), RELU)


# ---- determinism -------------------------------------------------------------------------

def same_bits_on(thread_counts, args, activation, residual_grad=True):
    """The op's outputs on each number of threads in turn, asserted to be the same bits;
    returns the first."""
    before = torch.get_num_threads()
    results = []
    try:
        for threads in thread_counts:
            torch.set_num_threads(threads)
            results.append(affine_backward(*args, activation, True, residual_grad))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert (a is None and b is None) or torch.equal(a, b)
    return results[0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "permuted"])
def test_same_bits_for_any_thread_count(dtype, layout):
    """Shapes of many tiles (planes cut into runs, channel blocks, rows): 1, 2 and 3 threads
    (and a second run) give the same bits."""
    for i, shape in enumerate([[2, 64, 40, 40], [2, 6, 150, 151], [3, 1000, 7, 7]]):
        act = (IDENTITY, SILU)[(i + len(layout)) % 2]
        args = case(shape, dtype, layout, act, seed=9)
        check_against_oracle(*args, act, out=same_bits_on((1, 2, 3, 3), args, act))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", [IDENTITY, RELU])
@pytest.mark.parametrize("plane", [[7, 7], [4, 4], [4, 8], [5, 5], [5, 9], [2, 3], [3, 11]])
def test_a_channels_results_do_not_depend_on_its_neighbours(dtype, activation, plane):
    """Every other channel's data replaced (infs and NaNs among them): the other channels'
    sums and input gradients keep their bits. On x86 short planes are walked as one flat run
    whose vectors hold the end of one plane and the start of the next (flat_planes), a
    vector's width of channels at a time (group_lanes) or one by one (plane_run); a lane of
    a neighbour leaking into a channel's sums, or a neighbour's parameters into its
    gradient, changes bits. 71 channels: each path, with vectors of 8, 16 and 32 elements."""
    C, N = 71, 5
    gen = torch.Generator().manual_seed(3)

    def spread():  # magnitudes over 2^-6..2^6: sums that round at every add
        t = torch.randn([N, C] + plane, generator=gen, dtype=torch.float64)
        return (t * 2.0 ** torch.randint(-6, 7, t.shape, generator=gen)).to(dtype)

    g, x, saved = spread(), spread(), spread()
    acc = compute_dtype(dtype, torch.float32)
    mean = torch.randn(C, generator=gen, dtype=acc)
    scale = torch.rand(C, generator=gen, dtype=acc) + 0.5
    saved_or_none = (lambda t: None) if activation == IDENTITY else (lambda t: t)
    first = affine_backward(g, x, saved_or_none(saved), mean, scale, activation, True, False)
    g2, x2, saved2 = g.clone(), x.clone(), saved.clone()
    for t in (g2, x2, saved2):
        t[:, ::2] = spread()[:, ::2]
    for n in range(N):  # planes' first and last values
        for c in range(0, C, 4):
            x2[n, c].view(-1)[0] = float("inf")
            x2[n, c + 2].view(-1)[-1] = float("-inf")
    g2[0, 6].view(-1)[-1] = float("nan")
    second = affine_backward(g2, x2, saved_or_none(saved2), mean, scale, activation, True, False)
    for one, two in zip(first[2:], second[2:]):
        assert torch.equal(one[1::2], two[1::2])
        assert not torch.equal(one[::2], two[::2])  # the neighbours' did change
    assert torch.equal(first[0][:, 1::2], second[0][:, 1::2])


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_large_outputs_stream_with_the_same_bits(layout):
    """Outputs of 16 MiB and more are written with non-temporal stores (planes whose runs
    start aligned, channels-last rows): the input gradient is still exactly
    round(grad * scale), the sums the same bits on 1 and 2 threads and within the oracle's
    bounds. 2x64x200x168 float32 with a residual gradient: 2 x 17.2 MB of outputs."""
    args = case([2, 64, 200, 168], torch.float32, layout, IDENTITY, seed=4)
    g, x, saved, mean, scale = args
    out = same_bits_on((1, 2), args, IDENTITY)
    grad_input, grad_residual = out[:2]
    assert torch.equal(grad_input, g * scale.view(1, -1, 1, 1))
    assert torch.equal(grad_residual, g)
    check_against_oracle(*args, IDENTITY, out=out)


@pytest.mark.parametrize("shape,dtype,activation,residual_grad", [
    ([22, 1024, 14, 14], torch.float32, IDENTITY, False),  # 196 values: not whole vectors
    ([72, 1024, 8, 8], torch.float32, RELU, False),  # whole vectors
    ([35, 1000, 7, 9], torch.float32, SILU, True),  # tiles that start on unaligned planes
    ([176, 1024, 7, 7], torch.bfloat16, IDENTITY, False),
])
def test_large_short_planes_stream_with_the_same_bits(shape, dtype, activation, residual_grad):
    """Short whole planes whose outputs take 16 MiB and more go as flat runs with
    non-temporal stores, from each tile's first plane that starts aligned (the planes before
    it with ordinary stores): every output within the oracle's bounds, the same bits on 1
    and 2 threads."""
    args = case(shape, dtype, "contiguous", activation, seed=5)
    out = same_bits_on((1, 2), args, activation, residual_grad)
    check_against_oracle(*args, activation, residual_grad=residual_grad, out=out)


@pytest.mark.parametrize("shape,dtype,activation,residual_grad,regime", [
    # tiles of 4 outer indices x 160 channels (128 in the last), then 3 left
    ([7, 2048, 7, 7], torch.bfloat16, IDENTITY, False, "typical"),
    # groups of a vector's width of channels and channels left over, in each outer index
    ([6, 300, 5, 5], torch.float32, SILU, True, "mean_gg_std"),
    ([9, 1000, 3, 11], torch.float16, RELU, False, "typical"),
    ([5, 70, 17], torch.float16, RELU6, True, "mean_gg_std"),
])
def test_short_planes_walk_outer_indices_in_step(shape, dtype, activation, residual_grad, regime):
    """Short whole planes (fewer than 256 values, not whole vectors) go several outer indices
    at a time on x86 (flat_planes' rows: 4 in the AVX-512 build, 2 in AVX2), in tiles of a
    multiple of them and of the walk's width in channels where the tensor has as many; the
    outer indices and channels left over go as before. Every output within the oracle's
    bounds (|mean| >> std among them), the same bits on 1, 2 and 3 threads."""
    args = case(shape, dtype, "contiguous", activation, regime, seed=6)
    out = same_bits_on((1, 2, 3), args, activation, residual_grad)
    check_against_oracle(*args, activation, residual_grad=residual_grad, out=out)


@pytest.mark.parametrize("shape,dtype,activation,residual_grad,regime", [
    ([3, 16, 9, 11], torch.float16, IDENTITY, False, "typical"),  # 1 vector of channels (AVX2)
    ([4, 32, 40, 50], torch.bfloat16, SILU, True, "mean_gg_std"),  # 8 tiles of 1000 rows
    ([2, 64, 21, 23], torch.float16, RELU, False, "typical"),
    ([3, 96, 10, 13], torch.bfloat16, RELU6, True, "typical"),  # 3 vectors (AVX-512)
    ([2, 128, 9, 15], torch.float16, IDENTITY, False, "mean_gg_std"),  # 4 vectors (AVX-512)
    ([2, 160, 5, 7], torch.bfloat16, IDENTITY, False, "typical"),  # wider: kRowBlock rows
    ([2, 48, 9, 9], torch.float16, RELU, False, "typical"),  # not whole vectors: kRowBlock rows
    ([2, 64, 256, 272], torch.float16, IDENTITY, False, "typical"),  # 17.8 MB: streamed
])
def test_narrow_channels_last_rows_sum_in_registers(shape, dtype, activation, residual_grad,
                                                     regime):
    """Channels-last rows of 16-bit data that are at most 4 whole vectors wide (at most 128
    channels in the AVX-512 build, 32 in AVX2) go through their tiles in memory order, each
    vector of channels' sums in registers (register_rows), with non-temporal stores where
    the outputs are large; other rows as before. Every output within the oracle's bounds
    (|mean| >> std among them), the same bits on 1, 2 and 3 threads."""
    args = case(shape, dtype, "channels_last", activation, regime, grad_layout="channels_last",
                seed=8)
    out = same_bits_on((1, 2, 3), args, activation, residual_grad)
    check_against_oracle(*args, activation, residual_grad=residual_grad, out=out)


# ---- the ops that call it: autograd, opcheck, errors ---------------------------------------

def test_gradcheck_frozen_bn_and_frozen_bn_act_with_trainable_affine():
    gen = torch.Generator().manual_seed(0)
    opts = dict(dtype=torch.float64)
    x = torch.randn(2, 3, 4, 5, generator=gen, **opts).requires_grad_()
    w = torch.randn(3, generator=gen, **opts).requires_grad_()
    b = torch.randn(3, generator=gen, **opts).requires_grad_()
    m = torch.randn(3, generator=gen, **opts)
    v = torch.rand(3, generator=gen, **opts) + 0.5
    r = torch.randn(2, 3, 4, 5, generator=gen, **opts).requires_grad_()
    xc = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w, b: frozen_batch_norm(x, m, v, w, b, 1e-3), (x, w, b))
    assert torch.autograd.gradcheck(lambda w, b: frozen_batch_norm(x.detach(), m, v, w, b), (w, b))
    for act in ("identity", "relu", "relu6", "silu"):
        fn = lambda x, r, w, b: frozen_batch_norm_act(x, m, v, w, b, 1e-3, act, r)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (xc, r, w, b)), act
        assert torch.autograd.gradcheck(lambda w: frozen_batch_norm_act(x.detach(), m, v, w, None,
                                                                        1e-3, act), (w,)), act


def test_opcheck():
    for shape, dtype, layout, act in (([2, 3, 5, 7], torch.float32, "contiguous", RELU),
                                      ([2, 8, 4, 4], torch.float16, "channels_last", SILU),
                                      ([3, 5, 6], torch.bfloat16, "contiguous", IDENTITY),
                                      ([2, 3, 4, 6], torch.float32, "sliced", RELU6),
                                      ([0, 3, 4, 4], torch.float64, "contiguous", SILU)):
        g, x, saved, mean, scale = case(shape, dtype, layout, act)
        for flags in ((True, True), (False, False)):
            torch.library.opcheck(affine_backward.default, (g, x, saved, mean, scale, act, *flags))


@pytest.mark.parametrize("fn", [affine_backward, frozen_bn_affine_backward_fallback],
                         ids=["compiled", "fallback"])
def test_errors_name_the_problem(fn):
    """The compiled op and the pure-PyTorch one refuse the same arguments, naming the op."""
    x = torch.randn(2, 4, 3)
    g, m, s = torch.randn(2, 4, 3), torch.zeros(4), torch.ones(4)
    bad = [
        ((g, x, None, m, s, 7, True, True), r"frozen_bn_affine_backward: activation must be 0 "),
        ((g, x, None, m, s, RELU, True, True), r"saved .* is needed for activation 1"),
        ((g, x[:, :3], None, m, s, 0, True, True), r"input must have grad_output's shape"),
        ((g, x.double(), None, m, s, 0, True, True), r"input must have grad_output's shape"),
        ((g, x, x.half(), m, s, SILU, True, True), r"saved must have grad_output's shape"),
        ((g, x, None, torch.zeros(3), s, 0, True, True), r"running_mean must be a 1-D tensor"),
        ((g, x, None, m, s.half(), 0, True, True),
         r"frozen_bn_affine_backward: scale must be float32 or float64"),
        ((g.long(), x, None, m, s, 0, True, True), r"grad_output must be float16, bfloat16"),
        ((g, x, None, m.to("meta"), s, 0, True, True), r"running_mean is on meta"),
    ]
    if not frozennorm.ops.COMPILED and fn is affine_backward:
        pytest.skip("the compiled op is the fallback here")
    for args, match in bad:
        with pytest.raises(RuntimeError, match=match):
            fn(*args)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_module_level_gradients_match_the_fallback(dtype, activation, layout):
    """Trainable weight and bias through frozen_batch_norm_act (with a residual): the
    gradients of the compiled backward and those of the pure-PyTorch one (its op and its
    autograd formulas) are each within the oracle's bound of the float64 gradients."""
    s = make_sample([4, 24, 9, 11], dtype, layout, "mean_gg_std", seed=21)
    act = ACTIVATIONS[activation]
    weight = torch.nn.Parameter(s.weight.clone())
    bias = torch.nn.Parameter(s.bias.clone())
    x = s.x.detach().requires_grad_()
    r = make_layout(torch.randn(s.x.shape).to(dtype), layout).requires_grad_()
    y = frozen_batch_norm_act(x, s.mean, s.var, weight, bias, s.eps, activation, r)
    g = torch.randn(y.shape).to(dtype)
    y.backward(g)
    compiled = (x.grad, r.grad, weight.grad, bias.grad)

    out, scale, preact = torch.ops.frozennorm.frozen_bn_act(
        s.x, r.detach(), s.weight, s.bias, s.mean, s.var, s.eps, act, act == SILU)
    saved = None if act == IDENTITY else (preact if act == SILU else out)
    fb = frozen_bn_affine_backward_fallback(g, s.x, saved, s.mean, scale, act, True, True)
    invstd = torch.sqrt(s.var.to(scale.dtype) + s.eps).reciprocal()
    fallback = fb[:2] + statistics_grads((True, True, False, False), fb[2], fb[3], scale, weight,
                                         bias.dtype, s.mean, s.var, s.eps)[:2]

    ga = exact_ga(g, saved, act)
    err = ga_error(g, saved, ga, act, dtype, scale.dtype)
    xc = s.x.double() - channel(s.mean.to(scale.dtype).double(), 4)
    u, d = unit_roundoff(scale.dtype), depth(s.x.numel()) + 4
    invstd64 = invstd.double()
    exact = {"weight": (ga * xc).sum([0, 2, 3]) * invstd64, "bias": ga.sum([0, 2, 3])}
    bound = {"weight": ((err * xc.abs()).sum([0, 2, 3]) + d * u * (ga * xc).abs().sum([0, 2, 3]))
             * invstd64 + 2 ** -23 * exact["weight"].abs(),  # (the result's rounding to float32)
             "bias": err.sum([0, 2, 3]) + d * u * ga.abs().sum([0, 2, 3])
             + 2 ** -23 * exact["bias"].abs()}
    for grads in (compiled, fallback):
        check_against_oracle(g, s.x, saved, s.mean, scale, act, out=grads[:2] + fb[2:])
        for name, got in zip(("weight", "bias"), grads[2:]):
            assert got.dtype == torch.float32 and got.shape == (24,)
            assert ((got.double() - exact[name]).abs() <= bound[name]).all(), name


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stats_dtype", [None, torch.float16, torch.float64])
def test_weight_and_bias_grads_are_the_sums_bit_for_bit(dtype, stats_dtype):
    """The autograd node's weight and bias gradients are the backward op's sums, times
    torch.rsqrt(var + eps) for the weight (one rule in both builds): whichever way the node
    keeps the statistics for its backward (a loop on the CPU) and forms the product (in place
    there), with statistics in the compute dtype or not."""
    s = make_sample([3, 20, 5, 7], dtype, "contiguous", "mean_gg_std", seed=5)
    mean, var = (s.mean, s.var) if stats_dtype is None else (s.mean.to(stats_dtype),
                                                             s.var.to(stats_dtype))
    weight = torch.nn.Parameter(s.weight.clone())
    bias = torch.nn.Parameter(s.bias.clone())
    x = s.x.detach().requires_grad_()
    y = frozen_batch_norm(x, mean, var, weight, bias, s.eps)
    g = torch.randn(y.shape).to(dtype)
    _, grad_weight, grad_bias = torch.autograd.grad(y, (x, weight, bias), g)

    _, scale = torch.ops.frozennorm.frozen_bn(s.x, s.weight, s.bias, mean, var, s.eps)
    _, _, sum_grad, sum_centered = affine_backward(g, s.x, None, mean, scale, IDENTITY, True,
                                                   False)
    acc = scale.dtype
    invstd = torch.rsqrt(var.to(acc) + torch.tensor(s.eps, dtype=acc))
    assert torch.equal(grad_weight, (sum_centered * invstd).to(weight.dtype))
    assert torch.equal(grad_bias, sum_grad.to(bias.dtype))
