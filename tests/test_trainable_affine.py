"""Frozen statistics, trainable affine parameters (mmdet's ``norm_eval=True`` with
``requires_grad=True``): weight and bias are Parameters that train, the running statistics
buffers that nothing changes; conversion, revert, fuse, fold, audit, checkpoints, DDP's
buffer writes and mixed precision keep working with them."""
import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import frozennorm
from frozennorm import (FrozenBatchNorm, FrozenBatchNorm1d, FrozenBatchNorm2d,
                        FrozenBatchNorm3d, FrozenBatchNormAct2d, assert_frozen, audit,
                        convert_frozen_bn, fold_frozen_bn, fuse, revert_frozen_bn)
from frozennorm.convert import FrozenNormWarning

from model_helpers import assert_close_rel, randomize_norm_stats_

tvm = pytest.importorskip("torchvision.models")

SHAPES = {FrozenBatchNorm1d: (4, 6, 5), FrozenBatchNorm2d: (2, 6, 5, 4),
          FrozenBatchNorm3d: (2, 6, 3, 4, 2), FrozenBatchNormAct2d: (2, 6, 5, 4)}
BNS = {FrozenBatchNorm1d: nn.BatchNorm1d, FrozenBatchNorm2d: nn.BatchNorm2d,
       FrozenBatchNorm3d: nn.BatchNorm3d, FrozenBatchNormAct2d: nn.BatchNorm2d}


def bn_and_frozen(frozen_cls, mode=True):
    torch.manual_seed(0)
    bn = randomize_norm_stats_(BNS[frozen_cls](6)).eval()
    return bn, frozen_cls.from_batchnorm(copy.deepcopy(bn), trainable_affine=mode)


@pytest.mark.parametrize("frozen_cls", list(SHAPES))
def test_parameters_train_statistics_stay(frozen_cls):
    bn, frozen = bn_and_frozen(frozen_cls)
    assert frozen.trainable_affine and "trainable_affine=True" in repr(frozen)
    assert [n for n, _ in frozen.named_parameters()] == ["weight", "bias"]
    assert [n for n, _ in frozen.named_buffers()] == ["running_mean", "running_var"]
    assert list(frozen.state_dict()) == ["weight", "bias", "running_mean", "running_var"]
    stats = [b.clone() for b in frozen.buffers()]
    x = torch.randn(SHAPES[frozen_cls]).double() * 3
    frozen.double().train()
    bn.double()
    opt = torch.optim.SGD(frozen.parameters(), lr=0.1)
    for _ in range(3):
        xf, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        y, ref = frozen(xf), bn(xb)
        torch.testing.assert_close(y, ref)
        y.square().sum().backward()
        ref.square().sum().backward()
        torch.testing.assert_close(xf.grad, xb.grad)
        torch.testing.assert_close(frozen.weight.grad, bn.weight.grad)
        torch.testing.assert_close(frozen.bias.grad, bn.bias.grad)
        opt.step()
        opt.zero_grad()
        with torch.no_grad():  # the same step on the reference
            for p in bn.parameters():
                p -= 0.1 * p.grad
                p.grad = None
    assert all(torch.equal(a, b.double()) for a, b in zip(frozen.buffers(), stats))
    assert_frozen(frozen)  # statistics frozen: trainable affine is not a failure ...
    with pytest.raises(frozennorm.NotFrozenError, match="weight/bias require grad"):
        assert_frozen(frozen, params=True)  # ... unless asked about


def test_casts_copies_and_scripting_keep_the_parameters():
    bn, frozen = bn_and_frozen(FrozenBatchNorm2d)
    weight = frozen.weight
    frozen.half()
    assert frozen.weight is weight and weight.dtype == torch.float32  # never below float32
    assert frozen.running_mean.dtype == torch.float32
    x = torch.randn(2, 6, 5, 4).half()
    y = frozen(x)
    assert y.dtype == torch.float16
    y.float().sum().backward()
    assert weight.grad.dtype == torch.float32
    frozen.double()
    assert frozen.weight is weight and weight.dtype == torch.float64
    frozen.float()
    for copied in (copy.deepcopy(frozen), pickle.loads(pickle.dumps(frozen))):
        assert copied.trainable_affine and isinstance(copied.weight, nn.Parameter)
        assert torch.equal(copied.weight, frozen.weight)
    buf = io.BytesIO()
    torch.save(frozen.state_dict(), buf)
    buf.seek(0)
    fresh = FrozenBatchNorm2d(6, trainable_affine=True)
    fresh.load_state_dict(torch.load(buf))
    fresh.load_state_dict(bn.state_dict())  # an nn.BatchNorm2d checkpoint
    x = torch.randn(2, 6, 5, 4)
    assert torch.equal(torch.jit.script(fresh)(x), fresh(x))


def test_convert_modes():
    torch.manual_seed(0)
    model = randomize_norm_stats_(tvm.resnet18())
    for p in model.layer1.parameters():  # a frozen stage, as mmdet's frozen_stages does
        p.requires_grad_(False)
    trainable_before = sum(p.numel() for p in model.parameters() if p.requires_grad)
    by_name = dict(model.named_parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # built before converting

    source = convert_frozen_bn(copy.deepcopy(model), trainable_affine="source")
    assert sum(p.numel() for p in source.parameters() if p.requires_grad) == trainable_before
    assert not source.layer1[0].bn1.weight.requires_grad and source.bn1.weight.requires_grad

    everything = convert_frozen_bn(copy.deepcopy(model), trainable_affine=True)
    assert everything.layer1[0].bn1.weight.requires_grad

    converted = convert_frozen_bn(model, trainable_affine="source")  # in place
    # the same Parameter objects: the optimizer built before converting keeps training them
    assert converted.bn1.weight is by_name["bn1.weight"]
    before = converted.bn1.weight.detach().clone()
    converted.train()(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    assert not torch.equal(converted.bn1.weight, before)

    with pytest.raises(ValueError, match="trainable_affine must be"):
        convert_frozen_bn(tvm.resnet18(), trainable_affine="yes")


@pytest.mark.parametrize("value", [1, 0, 1.0, "false", "True"], ids=repr)
def test_trainable_affine_is_checked_by_type(value):
    """A value equal to True, False or "source" but not one of them (1 == True) is refused,
    not taken for the variant its truthiness or equality picks."""
    with pytest.raises(ValueError, match="trainable_affine must be one of"):
        convert_frozen_bn(nn.Sequential(nn.BatchNorm2d(3)), trainable_affine=value)
    with pytest.raises(ValueError, match="trainable_affine must be one of"):
        FrozenBatchNorm2d.from_batchnorm(nn.BatchNorm2d(3), trainable_affine=value)
    for cls in (FrozenBatchNorm2d, FrozenBatchNormAct2d):
        with pytest.raises(ValueError, match="trainable_affine must be one of"):
            cls(3, trainable_affine=value)


def test_the_default_names_the_trainable_variant():
    with pytest.warns(FrozenNormWarning, match=r'trainable_affine="source" to keep them trainable'):
        convert_frozen_bn(randomize_norm_stats_(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))))


def test_revert_round_trip_keeps_the_parameters():
    torch.manual_seed(0)
    model = randomize_norm_stats_(tvm.resnet18()).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    params = dict(model.named_parameters())
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    converted = convert_frozen_bn(model, trainable_affine="source")
    reverted = revert_frozen_bn(converted).eval()
    assert all(p is params[n] for n, p in reverted.named_parameters())
    assert all(torch.equal(v, reverted.state_dict()[k]) for k, v in stats.items())
    with torch.no_grad():
        assert torch.equal(reverted(x), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_model_gives_the_unfused_gradients(dtype):
    """fuse() on a trainable-affine model: BN + add + ReLU in one pass each way, with the
    weight and bias gradients of the unfused model (the same fused reduction: bit for bit)."""
    torch.manual_seed(0)
    model = convert_frozen_bn(randomize_norm_stats_(tvm.resnet18()), trainable_affine=True)
    model = model.to(dtype).train()
    fused, rep = fuse(model, report=True)
    assert rep.count() == 17
    x = torch.randn(2, 3, 32, 32, dtype=dtype)
    results = []
    for m in (model, fused):
        m.zero_grad()
        xx = x.clone().requires_grad_()
        out = m(xx)
        out.float().square().mean().backward()
        results.append((out, xx.grad, {n: p.grad for n, p in m.named_parameters()}))
    (out, gx, gp), (out_f, gx_f, gp_f) = results
    assert torch.equal(out_f, out) and torch.equal(gx_f, gx)
    assert list(gp_f) == list(gp)
    assert all(torch.equal(gp_f[n], gp[n]) for n in gp), "parameter gradients differ"


def test_training_fold_keeps_the_parameters_trainable():
    torch.manual_seed(0)
    model = convert_frozen_bn(randomize_norm_stats_(tvm.resnet18()), trainable_affine=True)
    model = model.double().train()
    folded = fold_frozen_bn(model, "training")
    assert [n for n, _ in folded.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert list(folded.state_dict()) == list(model.state_dict())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    grads = []
    for m in (model, folded):
        m.zero_grad()
        m(x).square().mean().backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-9, atol=1e-12, msg=n)
    deploy = fold_frozen_bn(folded.eval())
    with torch.no_grad():
        assert_close_rel(deploy(x), model.eval()(x), 1e-9)


def test_audit_shows_frozen_statistics_and_trainable_parameters():
    model = convert_frozen_bn(randomize_norm_stats_(tvm.resnet18()), trainable_affine=True).train()
    rows = audit(model)
    assert all(r.frozen and not r.updates_stats and r.weight_requires_grad for r in rows)
    assert "20 frozen, 0 will update" in str(rows)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_trains_weight_and_bias(dtype):
    """The seed's case on the CPU: a BatchNorm kept in eval mode whose affine parameters
    train under mixed precision (torch.autocast): finite float32 gradients."""
    torch.manual_seed(0)
    model = convert_frozen_bn(randomize_norm_stats_(tvm.resnet18()), trainable_affine=True).train()
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=dtype):
        out = model(x)
    assert out.dtype == dtype
    out.float().square().mean().backward()
    for name in ("bn1.weight", "bn1.bias", "layer4.1.bn2.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.dtype == torch.float32 and torch.isfinite(grad).all()
        assert grad.abs().sum() > 0


def test_network_to_half_style_cast_trains_weight_and_bias():
    """apex's network_to_half recipe with plain torch: the model cast to half, BatchNorm kept
    in eval mode while the rest trains (cuDNN has no eval-mode BatchNorm backward there).
    Converted, the statistics and weight/bias stay float32 and train."""
    torch.manual_seed(0)
    model = convert_frozen_bn(randomize_norm_stats_(tvm.resnet18()), trainable_affine=True)
    model = model.half().train()
    assert model.bn1.weight.dtype == torch.float32 and model.conv1.weight.dtype == torch.float16
    x = torch.randn(2, 3, 32, 32).half().requires_grad_()
    model(x).float().square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert torch.isfinite(model.bn1.weight.grad).all() and model.bn1.bias.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", ["real", "fake", "symbolic"])
@pytest.mark.parametrize("act", [None, "relu"])
def test_traced_graphs_compute_from_their_inputs(mode, act):
    """make_fx of forward + backward with trainable weight/bias: the graph traces (fake and
    symbolic tensors have no data to read) and, run on other statistics, weight and inputs,
    gives what eager gives on them (a real-mode trace holds nothing computed from the traced
    statistics as a constant)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def step(x, r, w, b, mean, var):
        if act is None:
            y = frozennorm.frozen_batch_norm(x, mean, var, w, b)
        else:
            y = frozennorm.frozen_batch_norm_act(x, mean, var, w, b, 1e-5, act, r)
        return torch.autograd.grad((y * y).sum(), (x, w, b))

    def inputs(seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(2, 6, 5, 4, generator=g).requires_grad_()
        r = torch.randn(2, 6, 5, 4, generator=g)
        w = torch.randn(6, generator=g).requires_grad_()
        b = torch.randn(6, generator=g).requires_grad_()
        return x, r, w, b, torch.randn(6, generator=g) * 3, torch.rand(6, generator=g) * 2 + 0.1

    graph = make_fx(step, tracing_mode=mode)(*inputs(0))
    other = inputs(1)
    for got, want in zip(graph(*other), step(*other)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_torch_func_gradients_of_trainable_weight_and_bias():
    """torch.func.grad (and vmap of it: per-sample gradients) with respect to a trainable
    module's weight and bias, through functional_call, equal autograd's (to rounding:
    torch.func differentiates with create_graph, which takes the backward's ATen sums)."""
    m = FrozenBatchNorm2d(6, trainable_affine=True)
    randomize_norm_stats_(m)
    x = torch.randn(4, 6, 5, 4)
    params = {k: v.detach() for k, v in m.named_parameters()}

    def loss(p, t):
        return (torch.func.functional_call(m, p, (t,)) ** 2).sum()

    got = torch.func.grad(loss)(params, x)
    (loss(dict(m.named_parameters()), x)).backward()
    for k, p in m.named_parameters():
        torch.testing.assert_close(got[k], p.grad)
    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x[:, None])
    for i in range(4):
        one = torch.func.grad(loss)(params, x[i:i + 1])
        for k in params:
            torch.testing.assert_close(per_sample[k][i], one[k])


class _Wrapped(torch.Tensor):
    """A minimal __torch_dispatch__ wrapper subclass (as DTensor and the logging tensors are):
    no storage of its own, every op unwrapped and rewrapped."""

    @staticmethod
    def __new__(cls, elem):
        return torch.Tensor._make_wrapper_subclass(cls, elem.shape, dtype=elem.dtype,
                                                   device=elem.device)

    def __init__(self, elem):
        self.elem = elem

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_map
        out = func(*tree_map(lambda t: t.elem if isinstance(t, _Wrapped) else t, args),
                   **tree_map(lambda t: t.elem if isinstance(t, _Wrapped) else t, kwargs or {}))
        return tree_map(lambda t: _Wrapped(t) if isinstance(t, torch.Tensor) else t, out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("C", [6, 37])
def test_statistics_as_a_tensor_subclass_with_trainable_weight_and_bias(dtype, C):
    """Statistics that are a __torch_dispatch__ subclass (no data of their own to read):
    forward and the gradients of input, weight and bias as with plain tensors, bit for bit
    (plain CPU statistics take the compiled autograd's own per-channel loops, vectors and a
    tail: 1 / sqrt(var + eps) and grad_weight's scaling; a subclass, ATen's ops)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, C, 5, 4, generator=g, dtype=dtype).requires_grad_()
    w = torch.randn(C, generator=g, dtype=dtype).requires_grad_()
    b = torch.randn(C, generator=g, dtype=dtype).requires_grad_()
    mean = torch.randn(C, generator=g, dtype=dtype) * 3
    var = torch.rand(C, generator=g, dtype=dtype) + 0.1
    plain = frozennorm.frozen_batch_norm(x, mean, var, w, b)
    wrapped = frozennorm.frozen_batch_norm(x, _Wrapped(mean), _Wrapped(var), w, b)
    want = (plain,) + torch.autograd.grad((plain ** 2).sum(), (x, w, b))
    got = (wrapped,) + torch.autograd.grad((wrapped ** 2).sum(), (x, w, b))
    for a, e in zip(got, want):
        torch.testing.assert_close(a.elem if isinstance(a, _Wrapped) else a, e, rtol=0, atol=0)


@pytest.mark.parametrize("first,second", [(False, True), (True, False)])
def test_a_second_call_names_the_variant_it_does_not_change(first, second):
    """convert_frozen_bn(model, trainable_affine=True) on layers frozen with buffers (or
    False on trainable ones) leaves them as they are, and says so (strict: an error)."""
    model = randomize_norm_stats_(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4),
                                                nn.Sequential(nn.BatchNorm2d(4))))
    model = convert_frozen_bn(model, trainable_affine=first, include="1")
    with pytest.warns(FrozenNormWarning, match=r"1 layer\(s\) were already frozen.*: 1\. To make "
                      f"them {'trainable' if second else 'frozen'}, revert_frozen_bn"):
        model, rep = convert_frozen_bn(model, trainable_affine=second, report=True)
    assert rep.other_variant == ["1"] and [r.name for r in rep.converted] == ["2.0"]
    assert model[1].trainable_affine is first and model[2][0].trainable_affine is second
    with pytest.raises(ValueError, match="already frozen"):
        convert_frozen_bn(model, trainable_affine=second, strict=True)
    # the same variant, "source" or the default: nothing to say about layer 1
    for again in (first, "source"):
        convert_frozen_bn(model, trainable_affine=again, include="1", strict=True)


def test_true_after_source_names_the_layers_whose_weights_do_not_train():
    """trainable_affine=True makes every weight and bias train; on layers that "source" froze
    with weights that do not require grad (a frozen stage) a second call cannot, and says
    so; reverting first, as it advises, gives trainable ones."""
    model = randomize_norm_stats_(nn.Sequential(nn.BatchNorm2d(4), nn.BatchNorm2d(4)))
    model[0].requires_grad_(False)
    convert_frozen_bn(model, trainable_affine="source", strict=True)
    assert [p.requires_grad for p in model.parameters()] == [False, False, True, True]
    with pytest.warns(FrozenNormWarning, match=r"1 layer\(s\) were already frozen.*Parameters "
                      r"that do not require grad\).*: 0\. To make them trainable, revert"):
        model, rep = convert_frozen_bn(model, trainable_affine=True, report=True)
    assert rep.other_variant == ["0"]
    assert [p.requires_grad for p in model.parameters()] == [False, False, True, True]
    convert_frozen_bn(frozennorm.revert_frozen_bn(model), trainable_affine=True, strict=True)
    assert all(p.requires_grad for p in model.parameters()) and len(list(model.parameters())) == 4
    assert all(m.trainable_affine for m in model)


class _Positive(nn.Module):
    def forward(self, w):
        return w.abs() + 0.1


def test_a_parametrized_weight_is_not_dropped():
    """A BatchNorm whose weight torch.nn.utils.parametrize computes: trainable variants
    cannot keep the parametrization, so the layer is left live with a warning that says
    why; fully freezing it freezes the computed weight, and names what was trained."""
    from torch.nn.utils import parametrize

    def make():
        m = randomize_norm_stats_(nn.Sequential(nn.BatchNorm2d(4)))
        parametrize.register_parametrization(m[0], "weight", _Positive())
        return m
    x = torch.randn(2, 4, 3, 3)
    for variant in ("source", True):
        with pytest.warns(FrozenNormWarning, match="its weight is parametrized"):
            m = convert_frozen_bn(make(), trainable_affine=variant)
        assert isinstance(m[0], nn.BatchNorm2d) and parametrize.is_parametrized(m[0], "weight")
    ref = make().eval()
    with pytest.warns(FrozenNormWarning, match=r"froze 2 parameter\(s\).*0\.bias, "
                      r"0\.parametrizations\.weight\.original"):
        frozen = convert_frozen_bn(make())
    assert isinstance(frozen[0], FrozenBatchNorm2d) and not frozen[0].trainable_affine
    assert_close_rel(frozen(x), ref(x), rtol=1e-5)
