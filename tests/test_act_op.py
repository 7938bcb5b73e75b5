"""The fused epilogue op frozen_bn_act: equal to frozen_bn -> (+ residual) -> activation."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from conftest import device_params
from oracle import DTYPES, make_layout, make_sample
from test_op import check_backward, check_forward

import frozennorm
from frozennorm import frozen_batch_norm, frozen_batch_norm_act
from frozennorm.ops import ACTIVATIONS

frozen_bn_act = torch.ops.frozennorm.frozen_bn_act
frozen_bn_act_backward = torch.ops.frozennorm.frozen_bn_act_backward
ACT_FN = {"identity": lambda t: t, "relu": torch.relu, "relu6": F.relu6, "silu": F.silu}


def unfused(s, activation, residual):
    y = frozen_batch_norm(s.x, s.mean, s.var, s.weight, s.bias, s.eps)
    if residual is not None:
        y = y + residual
    return ACT_FN[activation](y)


def check_case(s, activation, with_residual, check_grad=True):
    """The fused op against the unfused sequence, forward and (``check_grad``) backward;
    returns the unfused output. The unfused sequence's own kernels (frozen_bn and
    frozen_bn_backward on this sample, these threads) are checked against the float64 oracle
    first: a bug the fused and the unfused paths share (the channel walk) would pass the
    comparison."""
    scale = check_forward(s)[1] if s.x.numel() else None
    if scale is not None and check_grad:
        check_backward(s, scale)
    residual = None
    if with_residual:
        g = torch.Generator().manual_seed(1)
        residual = torch.randn(s.x.shape, generator=g).to(s.x.dtype).to(s.x.device)
        residual = make_layout(residual, "contiguous")
    x = s.x.detach().requires_grad_()
    r = residual.detach().requires_grad_() if residual is not None else None
    y = frozen_batch_norm_act(x, s.mean, s.var, s.weight, s.bias, s.eps, activation, r)
    x2 = s.x.detach().requires_grad_()
    r2 = residual.detach().requires_grad_() if residual is not None else None
    s2 = type(s)(x2, s.weight, s.bias, s.mean, s.var, s.eps)
    ref = unfused(s2, activation, r2)
    assert y.dtype == ref.dtype and y.shape == ref.shape
    if activation == "silu":  # exp may differ by an ulp between implementations
        tol = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 2e-6, torch.float64: 1e-12}[y.dtype]
        torch.testing.assert_close(y, ref, rtol=tol, atol=tol)
    else:
        assert torch.equal(y, ref), (y - ref).abs().max()
    if not check_grad or y.numel() == 0:
        return ref
    g = torch.randn(y.shape, dtype=torch.float64).to(y.dtype).to(y.device)
    y.backward(g)
    ref.backward(g)
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5, torch.float64: 1e-12}[y.dtype]
    torch.testing.assert_close(x.grad, x2.grad, rtol=tol, atol=tol)
    if r is not None:
        torch.testing.assert_close(r.grad, r2.grad, rtol=tol, atol=tol)
    if activation != "silu":
        assert torch.equal(x.grad, x2.grad)
    return ref


def reaches_relu6_bounds(ref):
    """Some outputs clamped at 6, some at 0 and some in between: the samples' "wide" regime
    puts ReLU6's both kinks in reach."""
    return bool((ref == 6).any() and (ref == 0).any() and ((ref > 0) & (ref < 6)).any())


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_matches_unfused_sequence(device, dtype, activation, with_residual, layout):
    s = make_sample([2, 8, 5, 7], dtype, layout, "wide", seed=4, device=device)
    ref = check_case(s, activation, with_residual)
    assert activation != "relu6" or reaches_relu6_bounds(ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_parallel_chunks_cpu(dtype, activation, layout):
    """Three threads split the flat range mid-plane and mid-channel (no chunk starts at
    channel 0): the fused op still equals the unfused sequence, forward and backward (with a
    residual)."""
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        s = make_sample([5, 7, 61, 67], dtype, layout, "wide", seed=7)
        ref = check_case(s, activation, with_residual=True)
        assert activation != "relu6" or reaches_relu6_bounds(ref)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("plane", [3, 8, 9, 15, 16, 17, 49])
def test_plane_lengths_around_the_vector_width_cpu(dtype, activation, plane):
    """Planes around the vector width (overlapping last vector, short planes) on three
    threads: the fused op equals the unfused sequence, forward and backward."""
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        s = make_sample([-(-100_000 // (37 * plane)), 37, plane], dtype, "contiguous", "wide",
                        seed=plane)
        ref = check_case(s, activation, with_residual=True)
        assert activation != "relu6" or reaches_relu6_bounds(ref)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["relu", "relu6"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_backward_at_the_kinks_and_non_finite_values(device, dtype, activation, layout):
    """ReLU's and ReLU6's gradients where the saved output sits on a kink or is not finite,
    as torch computes them: zero where it is <= 0 (either zero) or, for ReLU6, >= 6; the
    gradient itself elsewhere, NaN of either sign and subnormals included; the residual's
    gradient is that same tensor, and the input's is it times the scale."""
    fi = torch.finfo(dtype)
    nan = torch.tensor(float("nan"))
    special = torch.stack([
        torch.tensor(0.0), torch.tensor(-0.0), torch.tensor(6.0), torch.tensor(-6.0),
        torch.tensor(6.0).to(dtype).nextafter(torch.tensor(7.0, dtype=dtype)).double(),
        torch.tensor(6.0).to(dtype).nextafter(torch.tensor(5.0, dtype=dtype)).double(),
        torch.tensor(float("inf")), torch.tensor(float("-inf")), nan, -nan,
        torch.tensor(fi.smallest_normal / 4), torch.tensor(-fi.smallest_normal / 4),
        torch.tensor(fi.tiny), torch.tensor(fi.max), torch.tensor(-fi.max)]).to(dtype)
    shape = [2, 33, 4, 9]  # planes of 36 and rows of 33: whole vectors and remainders
    g = torch.Generator().manual_seed(3)
    saved = torch.randn(shape, generator=g).to(dtype).flatten()
    pick = torch.randint(0, 2, saved.shape, generator=g).bool()
    saved[pick] = special[torch.arange(int(pick.sum())) % len(special)]
    saved = make_layout(saved.view(shape), layout).to(device)
    grad = make_layout(torch.randn(shape, generator=g).to(dtype), layout).to(device)
    scale = (torch.rand(shape[1], generator=g) + 0.5).to(device)
    gi, gr = frozen_bn_act_backward(grad, saved, scale, ACTIVATIONS[activation], True)
    kink = saved <= 0
    if activation == "relu6":
        kink |= saved >= 6
    ga = torch.where(kink, torch.zeros((), dtype=dtype, device=device), grad)
    exact = dict(rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(gr, ga, **exact)
    acc = torch.float64 if dtype == torch.float64 else torch.float32  # the compute dtype
    torch.testing.assert_close(gi, (ga.to(acc) * scale.to(acc).view(1, -1, 1, 1)).to(dtype),
                               **exact)
    assert gi.stride() == grad.stride() and gr.stride() == grad.stride()


@pytest.mark.parametrize("device", device_params())
@given(data=st.data())
def test_matches_unfused_sequence_property(device, data):
    shape = [data.draw(st.integers(0, 3)), data.draw(st.integers(1, 40))] + [
        data.draw(st.integers(1, 9)) for _ in range(data.draw(st.integers(0, 3)))]
    s = make_sample(shape, data.draw(st.sampled_from(DTYPES)),
                    data.draw(st.sampled_from(["contiguous", "channels_last", "permuted"])),
                    data.draw(st.sampled_from(["typical", "mean_gg_std", "tiny_var", "wide"])),
                    affine=data.draw(st.booleans()), device=device, seed=data.draw(st.integers(0, 999)))
    check_case(s, data.draw(st.sampled_from(sorted(ACTIVATIONS))), data.draw(st.booleans()))


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("activation,expected", [("identity", 1), ("relu", 2), ("relu6", 2), ("silu", 2)])
def test_saves_what_the_unfused_sequence_saves(device, activation, expected):
    """scale + output (ReLU/ReLU6) or pre-activation (SiLU); never input and output both."""
    s = make_sample([2, 16, 8, 8], torch.float32, device=device)
    x = s.x.detach().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = frozen_batch_norm_act(x, s.mean, s.var, s.weight, s.bias, s.eps, activation,
                                  torch.randn_like(x))
    big = [t for t in saved if t is not None and t.numel() == x.numel()]
    small = [t for t in saved if t is not None and t.numel() == x.shape[1]]
    assert len(small) == 1 and len(big) == expected - 1
    for t in big:
        assert t.data_ptr() != x.data_ptr()
        if activation in ("relu", "relu6"):
            assert t.data_ptr() == y.data_ptr()  # the output itself


@pytest.mark.parametrize("device", device_params())
def test_opcheck_act(device):
    for i, (shape, dtype, layout) in enumerate([([2, 3, 5, 7], torch.float32, "contiguous"),
                                               ([2, 8, 4, 4], torch.float16, "channels_last"),
                                               ([0, 3, 4], torch.float32, "contiguous")]):
        s = make_sample(shape, dtype, layout, seed=i, device=device)
        r = torch.randn_like(s.x)
        for act in range(4):
            for res in (None, r):
                for grad in (False, True):
                    x = s.x.detach().requires_grad_(grad)
                    rr = res.detach().requires_grad_(grad) if res is not None else None
                    args = (x, rr, s.weight, s.bias, s.mean, s.var, s.eps, act, act == 3)
                    torch.library.opcheck(frozen_bn_act.default, args)
                y, scale, pre = frozen_bn_act(s.x, res, s.weight, s.bias, s.mean, s.var, s.eps, act, True)
                if act:
                    saved = pre if act == 3 else y
                    torch.library.opcheck(frozen_bn_act_backward.default,
                                          (torch.randn_like(y), saved, scale, act, res is not None))


@pytest.mark.parametrize("device", device_params())
def test_module_and_compile(device):
    bn = torch.nn.BatchNorm2d(8)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    frozen = frozennorm.FrozenBatchNorm2d.from_batchnorm(bn).to(device)
    x = torch.randn(2, 8, 5, 5, device=device)
    r = torch.randn_like(x)
    ref = torch.relu(bn.to(device).eval()(x) + r)
    torch.testing.assert_close(frozen(x, r, "relu"), ref)
    compiled = torch.compile(frozen, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, r, "relu"), ref)
    with pytest.raises(ValueError, match="expected 4D input"):
        frozen(x[0], r[0], "relu")


class TestActErrors:
    def test_bad_activation(self):
        s = make_sample([2, 3, 4], torch.float32)
        with pytest.raises(ValueError, match="activation must be one of"):
            frozen_batch_norm_act(s.x, s.mean, s.var, activation="gelu")
        with pytest.raises(RuntimeError, match="activation must be 0"):
            frozen_bn_act(s.x, None, None, None, s.mean, s.var, 1e-5, 7, False)

    def test_residual_mismatch(self):
        """The op takes a residual of the input's shape and dtype only; the functional form
        adds any other as torch does (below), and fails where torch's add fails."""
        s = make_sample([2, 3, 4], torch.float32)
        op = torch.ops.frozennorm.frozen_bn_act
        with pytest.raises(RuntimeError, match="residual must have the input's shape"):
            op(s.x, torch.randn(2, 3, 5), None, None, s.mean, s.var, 1e-5, 1, False)
        with pytest.raises(RuntimeError, match="residual must have the input's dtype"):
            op(s.x, torch.randn(2, 3, 4).double(), None, None, s.mean, s.var, 1e-5, 1, False)
        with pytest.raises(RuntimeError, match="must match the size"):
            frozen_batch_norm_act(s.x, s.mean, s.var, residual=torch.randn(2, 3, 5))

    @pytest.mark.parametrize("activation", ["identity", "relu", "relu6", "silu"])
    @pytest.mark.parametrize("with_residual", [False, True])
    def test_statistics_gradients(self, activation, with_residual):
        """Weight, bias and the statistics (trainable affine parameters, functional use) get
        their gradients through the fused op, with the input's and the residual's."""
        g = torch.Generator().manual_seed(3)
        x = (torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=g) * 3).requires_grad_()
        stats = [torch.randn(3, dtype=torch.float64, generator=g).requires_grad_(),
                 (torch.rand(3, dtype=torch.float64, generator=g) + 0.5).requires_grad_(),
                 torch.randn(3, dtype=torch.float64, generator=g).requires_grad_(),
                 torch.randn(3, dtype=torch.float64, generator=g).requires_grad_()]
        extra = ([torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=g).requires_grad_()]
                 if with_residual else [])

        def f(x, mean, var, w, b, *r):
            return frozen_batch_norm_act(x, mean, var, w, b, 1e-3, activation, r[0] if r else None)
        assert torch.autograd.gradcheck(f, [x] + stats + extra)
        # any subset (absent optional arguments shift the op's autograd edges)
        for absent in ([2], [3], [2, 3]):
            args = [x] + [None if i in absent else t for i, t in enumerate(stats)]
            y = frozen_batch_norm_act(*args, 1e-3, activation)
            grads = torch.autograd.grad(y.sum(), [t for t in args if t is not None])
            assert all(gr is not None for gr in grads)

    def test_double_backward_is_a_clear_error(self):
        s = make_sample([2, 3, 4], torch.float64)
        x = s.x.detach().requires_grad_()
        y = frozen_batch_norm_act(x, s.mean, s.var, activation="silu")
        with pytest.raises(RuntimeError, match="double backward"):
            torch.autograd.grad(y.sum(), x, create_graph=True)


@pytest.mark.parametrize("op", ["frozen_bn", "frozen_bn_act"])
def test_backward_runs_one_op_and_allocates_no_zeros(op):
    """The backward of either op is one call of its backward op: the unused gradients of
    the extra outputs (scale, pre-activation) are not materialized as zeros."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    s = make_sample([2, 16, 8, 8], torch.float32, seed=2)
    x = s.x.detach().requires_grad_()
    if op == "frozen_bn":
        y = frozen_batch_norm(x, s.mean, s.var, s.weight, s.bias, s.eps)
    else:
        y = frozen_batch_norm_act(x, s.mean, s.var, s.weight, s.bias, s.eps, "relu")
    grad = torch.randn_like(y)
    with Record() as rec:
        y.backward(grad)
    ops = [o for o in rec.ops if o != "aten.detach"]  # AccumulateGrad's, into x.grad
    assert ops == [f"frozennorm.{op}_backward"], rec.ops
