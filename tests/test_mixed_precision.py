"""Mixed precision with frozen BatchNorm, no workarounds: casts, channels_last, autocast, and
apex's fp16 utilities (the real ones when apex is installed, an emulation otherwise).

The classic failure ("expected scalar type Half but found Float", apex #122/#614): a model
cast to half whose frozen BN keeps float32 buffers, or a BN kept in eval mode by hand while
training. frozennorm's op takes any input dtype with any statistics dtype and returns the
input's dtype.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from frozennorm import FrozenBatchNorm, assert_frozen, convert_frozen_bn

from model_helpers import assert_close_rel, randomize_norm_stats_

tvm = pytest.importorskip("torchvision.models")

LOW = [torch.float16, torch.bfloat16]
# float16 keeps 11 significant bits, bfloat16 8: measured max errors relative to the float32
# output's magnitude are 0.06-0.15% (float16) and 0.4-0.8% (bfloat16) here
TOL = {torch.float16: 5e-3, torch.bfloat16: 3e-2}


#: fully frozen (buffers), and frozen statistics with trainable weight and bias
AFFINE = [pytest.param(False, id="frozen"), pytest.param("source", id="trainable_affine")]


def frozen_model(name: str, seed: int = 0, trainable_affine=False) -> nn.Module:
    torch.manual_seed(seed)
    return convert_frozen_bn(randomize_norm_stats_(getattr(tvm, name)(num_classes=10), seed),
                             trainable_affine=trainable_affine)


def images(dtype=torch.float32, n=2, size=32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0)).to(dtype)


def frozen_buffers(model: nn.Module) -> dict:
    return {f"{n}.{k}": v.clone() for n, m in model.named_modules() if isinstance(m, FrozenBatchNorm)
            for k, v in m.named_buffers(recurse=False)}


def forward_backward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_()
    y = model(x)
    y.float().square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == p.dtype, name
        assert torch.isfinite(p.grad).all(), name
    return y.detach()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", LOW)
def test_resnet50_cast_channels_last_train_forward_backward(dtype):
    model = frozen_model("resnet50")
    with torch.no_grad():
        ref = model.eval()(images())
    model = model.to(dtype=dtype, memory_format=torch.channels_last).train()
    before = frozen_buffers(model)
    assert all(v.dtype == torch.float32 for v in before.values())  # .to() keeps fp32 statistics

    layouts = []
    model.layer4[2].bn3.register_forward_hook(
        lambda m, i, o: layouts.append(o.is_contiguous(memory_format=torch.channels_last)))
    x = images(dtype).contiguous(memory_format=torch.channels_last)
    y = forward_backward(model, x)
    assert y.dtype == dtype and layouts == [True]
    assert_close_rel(y.float(), ref, rtol=TOL[dtype], what=str(dtype))
    assert all(torch.equal(v, before[k]) for k, v in frozen_buffers(model).items())
    assert_frozen(model)


@pytest.mark.parametrize("trainable_affine", AFFINE)
@pytest.mark.parametrize("dtype", LOW)
def test_autocast_train_forward_backward(dtype, trainable_affine):
    model = frozen_model("resnet18", trainable_affine=trainable_affine).train()
    with torch.no_grad():
        ref = copy.deepcopy(model).eval()(images())
    with torch.autocast("cpu", dtype=dtype):
        y = forward_backward(model, images())
    assert y.dtype == dtype  # the classifier's output under autocast
    assert_close_rel(y.float(), ref, rtol=TOL[dtype], what=str(dtype))


# --------------------------------------------------------------------------------------
# apex-style half conversion: everything but _BatchNorm to half
# --------------------------------------------------------------------------------------

def emulate_convert_network(network: nn.Module, dtype: torch.dtype) -> nn.Module:
    """What apex.fp16_utils.convert_network does: every module that is not an affine
    _BatchNorm gets its parameters' and buffers' ``.data`` replaced by a ``dtype`` copy (so
    a frozen BN, not being a _BatchNorm, gets half statistics; ``_apply`` is bypassed)."""
    for module in network.modules():
        if isinstance(module, _BatchNorm) and module.affine:
            continue
        for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            if t.is_floating_point():
                t.data = t.data.to(dtype)
    return network


class ToHalf(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.half()


def emulate_network_to_half(network: nn.Module) -> nn.Module:
    """apex.fp16_utils.network_to_half: ``network.half()`` (frozennorm keeps its statistics
    float32 through ``.half()``), affine _BatchNorm back to float, input cast to half."""
    network = network.half()
    for m in network.modules():
        if isinstance(m, _BatchNorm) and m.affine:
            m.float()
    return nn.Sequential(ToHalf(), network)


def check_half_network(model: nn.Module, ref: torch.Tensor, stats_dtype: torch.dtype) -> None:
    """A half network's forward and backward in train mode: finite gradients for the input
    and every parameter (trainable frozen weight and bias included, in their own dtype)."""
    frozen = [m for m in model.modules() if isinstance(m, FrozenBatchNorm)]
    assert frozen and all(b.dtype == stats_dtype for m in frozen for b in m.buffers())
    model.train()
    y = forward_backward(model, images(torch.float16))
    assert y.dtype == torch.float16
    # float16 statistics lose a little (the mean rounds to 11 bits), still well within tolerance
    assert_close_rel(y.float(), ref, rtol=TOL[torch.float16], what="half network")
    assert_frozen(model)


@pytest.fixture(params=AFFINE)
def resnet_and_reference(request):
    model = frozen_model("resnet18", trainable_affine=request.param)
    with torch.no_grad():
        ref = model.eval()(images())
    return model, ref


def test_convert_network_style_half_statistics(resnet_and_reference):
    model, ref = resnet_and_reference
    check_half_network(emulate_convert_network(model, torch.float16), ref, torch.float16)


def test_network_to_half_style(resnet_and_reference):
    model, ref = resnet_and_reference
    check_half_network(emulate_network_to_half(model), ref, torch.float32)


@pytest.fixture
def apex_fp16():
    pytest.importorskip("apex")
    return pytest.importorskip("apex.fp16_utils")


def test_apex_convert_network(apex_fp16, resnet_and_reference):
    model, ref = resnet_and_reference
    check_half_network(apex_fp16.convert_network(model, torch.float16), ref, torch.float16)


def test_apex_network_to_half(apex_fp16, resnet_and_reference):
    model, ref = resnet_and_reference
    check_half_network(apex_fp16.network_to_half(model), ref, torch.float32)


def test_apex_network_to_half_of_a_partly_frozen_model(apex_fp16):
    """Live BN (kept float32 by apex) and frozen BN (float32 statistics) side by side."""
    torch.manual_seed(0)
    model = convert_frozen_bn(randomize_norm_stats_(tvm.resnet18(num_classes=10)), exclude="layer4")
    with torch.no_grad():
        ref = copy.deepcopy(model).eval()(images())
    half = apex_fp16.network_to_half(model).eval()  # eval: the live layer4 BN uses its statistics
    with torch.no_grad():
        y = half(images())
    assert y.dtype == torch.float16
    assert_close_rel(y.float(), ref, rtol=TOL[torch.float16])


def apex_network_to_half(network: nn.Module) -> nn.Module:
    return pytest.importorskip("apex.fp16_utils").network_to_half(network)


@pytest.mark.parametrize("network_to_half", [emulate_network_to_half, apex_network_to_half],
                         ids=["emulated", "apex"])
def test_the_seeds_recipe_with_trainable_affine(network_to_half):
    """The blog post's mixed-precision case, on the CPU: ``network_to_half(model)``,
    ``model.train()``, ``model.apply(fix_bn)`` (``eval()`` for every class named
    "BatchNorm"), a half input, ``output.mean().backward()`` -- with the BatchNorm layers
    frozen, weight and bias trainable. The step runs: float32 gradients for weight and bias,
    finite, and a finite input gradient; SGD moves weight and bias, never the statistics."""
    def fix_bn(m: nn.Module) -> None:
        if m.__class__.__name__.find("BatchNorm") != -1:
            m.eval()

    model = network_to_half(frozen_model("resnet18", trainable_affine=True))
    model.train()
    model.apply(fix_bn)
    layers = [m for m in model.modules() if isinstance(m, FrozenBatchNorm)]
    assert len(layers) == 20 and all(m.weight.dtype == torch.float32 for m in layers)
    before = frozen_buffers(model)
    affine = {id(p): p.detach().clone() for m in layers for p in (m.weight, m.bias)}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = images(torch.float16).requires_grad_()
    output = model(x)
    assert output.dtype == torch.float16
    output.float().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for m in layers:
        for p in (m.weight, m.bias):
            assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
    optimizer.step()
    assert all(torch.equal(v, before[k]) for k, v in frozen_buffers(model).items())
    moved = sum(not torch.equal(p, affine[id(p)]) for m in layers for p in (m.weight, m.bias))
    assert moved == 2 * len(layers)


@pytest.mark.filterwarnings("ignore:apex.parallel.*is deprecated")
def test_apex_convert_syncbn_model():
    apex_parallel = pytest.importorskip("apex.parallel")
    torch.manual_seed(0)
    model = randomize_norm_stats_(tvm.resnet18(num_classes=10))
    convert_frozen_bn(model, include="layer1")
    frozen = {n: m for n, m in model.named_modules() if isinstance(m, FrozenBatchNorm)}
    synced = apex_parallel.convert_syncbn_model(model)
    # apex leaves frozennorm's layers alone (they are not _BatchNorm) and converts the rest
    assert all(synced.get_submodule(n) is m for n, m in frozen.items())
    assert type(synced.bn1) is apex_parallel.SyncBatchNorm
    with torch.no_grad():
        ref = synced.eval()(images())
    # ... and convert_frozen_bn freezes apex's SyncBatchNorm
    out, rep = convert_frozen_bn(synced, trainable_affine=False, strict=True, report=True)
    assert {r.source for r in rep.converted} == {apex_parallel.SyncBatchNorm}
    assert type(out.bn1) is FrozenBatchNorm and not any(isinstance(m, _BatchNorm) for m in out.modules())
    with torch.no_grad():
        assert_close_rel(out.train()(images()), ref)
