"""GPU-only checks of the CUDA kernels (skipped without a GPU): launches per call, streams,
tensors past 2^31 elements. The value checks run for CUDA in the other test files too."""
import pytest
import torch

import frozennorm
from conftest import requires_cuda
from oracle import DTYPES, make_sample

pytestmark = [requires_cuda, pytest.mark.cuda]


def kernels_launched(fn):
    """CUDA kernels launched while fn() runs (after a warm-up call)."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
            and "Memcpy" not in e.name and "Memset" not in e.name]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_one_kernel_per_forward_and_per_backward(dtype, layout):
    s = make_sample([4, 32, 20, 24], dtype, layout, device="cuda")
    op, bwd = torch.ops.frozennorm.frozen_bn, torch.ops.frozennorm.frozen_bn_backward
    assert len(kernels_launched(lambda: op(*s.args()))) == 1
    _, scale = op(*s.args())
    for g in (torch.randn_like(s.x), torch.ones((), device="cuda", dtype=dtype).expand(s.x.shape)):
        assert len(kernels_launched(lambda: bwd(g, scale))) == 1
    m = frozennorm.FrozenBatchNorm2d(32).cuda()
    x = s.x.detach().requires_grad_()
    assert len(kernels_launched(lambda: m(x))) == 1  # also with autograd recording


@pytest.mark.parametrize("activation", ["relu", "relu6", "silu", "identity"])
def test_one_kernel_per_fused_forward_and_backward(activation):
    s = make_sample([4, 32, 20, 24], torch.float16, "channels_last", device="cuda")
    x = s.x.detach().requires_grad_()
    r = torch.randn_like(x).requires_grad_()
    fwd = lambda: frozennorm.frozen_batch_norm_act(x, s.mean, s.var, s.weight, s.bias, s.eps, activation, r)
    assert len(kernels_launched(fwd)) == 1
    y = fwd()
    g = torch.randn_like(y)
    expected = 1
    assert len(kernels_launched(lambda: torch.autograd.grad(y, (x, r), g, retain_graph=True))) == expected


def test_runs_on_the_current_stream():
    s = make_sample([8, 64, 32, 32], torch.float32, device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        y, _ = torch.ops.frozennorm.frozen_bn(*s.args())
    stream.synchronize()
    torch.testing.assert_close(y, torch.nn.functional.batch_norm(s.x, s.mean, s.var, s.weight, s.bias,
                                                                 False, 0.0, s.eps))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_device_guard_second_gpu():
    s = make_sample([2, 8, 5, 5], torch.float32, device="cuda:1")
    y, scale = torch.ops.frozennorm.frozen_bn(*s.args())
    assert y.device == torch.device("cuda:1") and scale.device == torch.device("cuda:1")


def test_more_than_2_pow_31_elements_cuda():
    free, _ = torch.cuda.mem_get_info()
    numel = 2**31 + 4096
    if free < 3 * numel * 2:
        pytest.skip("not enough GPU memory")
    x = torch.full((1, 2, numel // 2), 1.0, dtype=torch.float16, device="cuda")
    x[0, 1, -1] = 3.0
    x[0, 0, 0] = -1.0
    mean = torch.tensor([1.0, 2.0], device="cuda")
    var = torch.tensor([4.0, 0.25], device="cuda")
    y = frozennorm.frozen_batch_norm(x, mean, var, eps=0.0)
    assert y[0, 1, -1].item() == 2.0 and y[0, 0, 0].item() == -1.0
    assert y[0, 1, 0].item() == -2.0 and y[0, 0, -1].item() == 0.0
    g = torch.ones_like(x)
    gi = torch.ops.frozennorm.frozen_bn_backward(g, torch.tensor([0.5, 2.0], device="cuda"))
    assert gi[0, 1, -1].item() == 2.0 and gi[0, 0, 0].item() == 0.5
    cl = torch.full((1, 2**16 + 8, 2**15 + 8, 1), 1.0, dtype=torch.float16, device="cuda")
    del x, y, g, gi
    cl = cl.contiguous(memory_format=torch.channels_last)  # > 2^31 elements, channels last
    C = cl.shape[1]
    out = frozennorm.frozen_batch_norm(cl, torch.zeros(C, device="cuda"), torch.ones(C, device="cuda"), eps=0.0)
    assert out[0, -1, -1, 0].item() == 1.0
