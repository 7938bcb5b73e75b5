"""The CUDA kernels' host logic and bodies, run on the CPU by an emulated grid.

tests/cuda_emulation/emulation.cpp compiles csrc/cuda/frozen_bn_cuda_impl.h and
csrc/cuda/affine_kernels.cuh as plain C++ and runs every (block, thread) of each launch in
turn. This checks the CUDA indexing, vector widths, tails, the NCHW/channels-last/strided
kernels and the 64-bit index division without a GPU (tests/test_op.py runs the real kernels
when one is present).
"""
import hashlib
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import frozennorm  # noqa: F401  (registers torch.ops.frozennorm)
from oracle import (DTYPES, LAYOUTS, assert_close_to_exact, compute_eps, is_dense, make_sample,
                    oracle, oracle_terms, samples)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def emu():
    from torch.utils import cpp_extension
    # torch's JIT build tracks only the listed sources: key the build on the headers too
    files = sorted((ROOT / "csrc").rglob("*.h*")) + sorted((ROOT / "tests" / "cuda_emulation").glob("*"))
    digest = hashlib.sha1(b"".join(p.read_bytes() for p in files)).hexdigest()[:12]
    try:
        cpp_extension.load(
            name=f"frozennorm_cuda_emulation_{digest}",
            sources=[str(ROOT / "tests" / "cuda_emulation" / "emulation.cpp"),
                     str(ROOT / "csrc" / "common.cpp")],
            extra_include_paths=[str(ROOT / "csrc")],
            extra_cflags=["-O2"], is_python_module=False, verbose=False)
    except (RuntimeError, OSError) as e:  # no compiler
        pytest.skip(f"cannot build the CUDA emulation: {e}")
    ops = torch.ops.frozennorm_emu
    ops.configure(2)
    yield ops
    ops.configure(2)


def run_and_check(emu, s, sms=2):
    emu.configure(sms)
    y, scale = emu.frozen_bn(*s.args())
    launches = emu.configure(sms)
    assert launches == (1 if s.x.numel() > 0 or s.x.shape[1] > 0 else 0)
    assert y.dtype == s.x.dtype and y.shape == s.x.shape
    if s.x.numel() and is_dense(s.x):
        assert y.stride() == s.x.stride()
    assert_close_to_exact(y, oracle(*s.args()), oracle_terms(*s.args()),
                          compute_eps(s.x.dtype, s.mean.dtype))
    # the same arithmetic as the CPU kernel, to the bit where the CPU build uses FMA
    y_cpu, scale_cpu = torch.ops.frozennorm.frozen_bn(*s.args())
    assert torch.equal(scale, scale_cpu)
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        assert torch.equal(y, y_cpu) or (torch.isnan(y) == torch.isnan(y_cpu)).all()
    g = torch.randn(s.x.shape, dtype=torch.float64).to(s.x.dtype)
    gi = emu.frozen_bn_backward(g, scale)
    assert emu.configure(sms) == (1 if g.numel() else 0)
    exact = oracle(g, s.weight, None, torch.zeros_like(s.mean), s.var, s.eps)
    assert_close_to_exact(gi, exact, exact.abs(), compute_eps(g.dtype, scale.dtype), "grad_input")
    # an expanded (stride-0) gradient, as x.sum().backward() produces
    if g.numel():
        ge = torch.ones((), dtype=g.dtype).expand(g.shape)
        torch.testing.assert_close(emu.frozen_bn_backward(ge, scale),
                                   torch.ops.frozennorm.frozen_bn_backward(ge, scale))


@given(data=st.data())
def test_emulated_kernels_match_oracle(emu, data):
    s = data.draw(samples())
    sms = data.draw(st.sampled_from([1, 2, 132]))
    run_and_check(emu, s, sms=sms)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [[2, 3, 5, 7], [3, 64, 1, 1], [4, 24, 3, 3], [2, 5, 6, 6],
                                   [5, 7], [2, 8], [4, 6, 11], [2, 4, 3, 5, 6], [1, 1, 9, 9],
                                   [0, 4, 3, 3], [2, 3, 33, 3]])
def test_emulated_layouts(emu, dtype, layout, shape):
    run_and_check(emu, make_sample(shape, dtype, layout, seed=len(shape)))


def test_emulated_misaligned_pointers_use_narrow_vectors(emu):
    base = torch.randn(2 * 8 * 6 * 6 + 3, dtype=torch.float16)
    x = base[3:].view(2, 8, 6, 6)  # dense, data pointer 6 bytes past a 16-byte boundary
    s = make_sample([2, 8, 6, 6], torch.float16, seed=2)
    s.x = x
    run_and_check(emu, s)
    s.x = x.contiguous(memory_format=torch.channels_last)[:, :, :, :]
    run_and_check(emu, s)


def test_emulated_many_dims_fall_back(emu):
    """More than 8 non-mergeable strided dims: copied to dense first (still correct)."""
    shape = [2, 3] + [2] * 8
    x = torch.randn([2 * d for d in shape], dtype=torch.float32)[tuple(slice(None, None, 2) for _ in shape)]
    s = make_sample(shape, torch.float32, seed=3)
    s.x = x
    emu.configure(2)
    y, _ = emu.frozen_bn(*s.args())
    assert emu.configure(2) == 1  # ours; the copy to dense is ATen's
    torch.testing.assert_close(y, torch.ops.frozennorm.frozen_bn(*s.args())[0])


@pytest.mark.parametrize("divisor", [1, 2, 3, 7, 49, 64, 100, 1000, 3025, 65536, 2**20 + 1, 2**30,
                                     2**33 + 5, 3 * 2**40])
def test_fast_divider(emu, divisor):
    """The kernels' 64-bit multiply-shift division, also past 2^31 and near 2^63."""
    for high in (2**31 + 7, 2**40 + 3, 2**62 + 12345):
        assert emu.divider_mismatches(divisor, 20_000, high) == 0


def within_two_ulps(a, b):
    """SiLU's exp differs in its last float bit between the CUDA path (expf) and the CPU's
    vector exp; rounded to the data dtype, a result may then differ by one of its units in
    the last place, and the backward's input gradient (the activation's gradient rounded to
    the data dtype as the unfused ops store it, times the scale, rounded again) by two.
    atol: near SiLU's zero-derivative point the float32 result cancels, and a last-bit
    difference of its O(1) terms is an absolute one."""
    return torch.allclose(a.double(), b.double(), rtol=max(2 * torch.finfo(a.dtype).eps, 1e-5), atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("shape", [[2, 8, 5, 7], [3, 16, 4, 4], [4, 6], [2, 5, 1, 3], [0, 4, 3]])
def test_emulated_fused_epilogues_match_cpu(emu, dtype, layout, shape):
    """frozen_bn_act and its backward: the CUDA code path gives the CPU kernel's results."""
    s = make_sample(shape, dtype, layout, seed=11)
    r = torch.randn(s.x.shape, dtype=torch.float64).to(dtype)
    cpu = torch.ops.frozennorm
    for act in range(4):
        for res in (None, r):
            emu.configure(2)
            y, scale, pre = emu.frozen_bn_act(s.x, res, s.weight, s.bias, s.mean, s.var, s.eps, act, True)
            assert emu.configure(2) == 1
            y_ref, scale_ref, pre_ref = cpu.frozen_bn_act(s.x, res, s.weight, s.bias, s.mean, s.var, s.eps, act, True)
            assert y.stride() == y_ref.stride() and pre.shape == pre_ref.shape
            assert torch.equal(scale, scale_ref)
            exact = act != 3 and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
            check = torch.equal if exact else within_two_ulps
            assert check(y, y_ref) and check(pre, pre_ref)
            if act == 0 or y.numel() == 0:
                continue
            g = torch.randn(y.shape, dtype=torch.float64).to(dtype)
            saved = pre if act == 3 else y
            for a, b in zip(emu.frozen_bn_act_backward(g, saved, scale, act, res is not None),
                            cpu.frozen_bn_act_backward(g, saved, scale, act, res is not None)):
                assert check(a, b)
            assert emu.configure(2) == 1
