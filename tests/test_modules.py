"""FrozenBatchNorm1d/2d/3d: freezing semantics, checkpoints, casting, serialisation."""
import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import frozennorm
from frozennorm import FrozenBatchNorm, FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d

from conftest import device_params
from oracle import assert_close_to_exact, compute_eps, oracle, oracle_terms

CASES = [(FrozenBatchNorm1d, nn.BatchNorm1d, (4, 6)), (FrozenBatchNorm1d, nn.BatchNorm1d, (4, 6, 5)),
         (FrozenBatchNorm2d, nn.BatchNorm2d, (2, 6, 5, 4)),
         (FrozenBatchNorm3d, nn.BatchNorm3d, (2, 6, 3, 4, 5))]


def random_bn(cls, c=6, affine=True, seed=0):
    torch.manual_seed(seed)
    bn = cls(c, affine=affine, eps=1e-3)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.3, 2)
        if affine:
            bn.weight.normal_()
            bn.bias.normal_()
    bn.num_batches_tracked.fill_(123)
    return bn.eval()


@pytest.mark.parametrize("frozen_cls,bn_cls,shape", CASES)
@pytest.mark.parametrize("affine", [True, False])
def test_from_batchnorm_matches_eval(frozen_cls, bn_cls, shape, affine):
    bn = random_bn(bn_cls, affine=affine)
    frozen = frozen_cls.from_batchnorm(bn)
    x = torch.randn(shape)
    torch.testing.assert_close(frozen(x), bn(x))
    assert frozen.eps == bn.eps
    # copied, not aliased
    frozen.running_mean.add_(1)
    assert not torch.equal(frozen.running_mean, bn.running_mean)


def test_buffers_only_and_not_a_batchnorm():
    m = FrozenBatchNorm2d(8)
    assert list(m.parameters()) == []
    assert sorted(n for n, _ in m.named_buffers()) == ["bias", "running_mean", "running_var", "weight"]
    assert not isinstance(m, nn.modules.batchnorm._BatchNorm)
    # convert_sync_batchnorm leaves it alone
    seq = nn.Sequential(nn.Conv2d(3, 8, 3), m)
    assert nn.SyncBatchNorm.convert_sync_batchnorm(seq)[1] is m


def test_train_eval_change_nothing():
    bn = random_bn(nn.BatchNorm2d)
    m = FrozenBatchNorm2d.from_batchnorm(bn)
    x = torch.randn(4, 6, 5, 5)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m.train()
    y_train = m(x)
    opt = torch.optim.SGD(list(m.parameters()) or [nn.Parameter(torch.zeros(1))], lr=1.0)
    opt.step()
    m.eval()
    y_eval = m(x)
    assert torch.equal(y_train, y_eval)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k])


def test_set_bn_eval_pitfall_is_gone():
    """The seed's `model.apply(set_bn_eval)` is undone by train(); a frozen layer is not."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU())
    model.apply(lambda m: m.eval() if isinstance(m, nn.BatchNorm2d) else None)
    model.train()
    stats = model[1].running_mean.clone()
    model(torch.randn(2, 3, 8, 8))
    assert not torch.equal(stats, model[1].running_mean)  # the pitfall

    frozen = nn.Sequential(nn.Conv2d(3, 6, 3), FrozenBatchNorm2d.from_batchnorm(nn.BatchNorm2d(6)), nn.ReLU())
    frozen.train()
    stats = frozen[1].running_mean.clone()
    frozen(torch.randn(2, 3, 8, 8))
    assert torch.equal(stats, frozen[1].running_mean)


@pytest.mark.parametrize("frozen_cls,bn_cls,shape", CASES)
def test_loads_batchnorm_checkpoint_strict(frozen_cls, bn_cls, shape):
    bn = random_bn(bn_cls)
    m = frozen_cls(6, eps=bn.eps)  # eps is configuration, not state
    result = m.load_state_dict(bn.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(shape)
    torch.testing.assert_close(m(x), bn(x))
    # and inside a model, with its prefix
    model_bn = nn.Sequential(nn.Identity(), bn)
    model_frozen = nn.Sequential(nn.Identity(), frozen_cls(6, eps=bn.eps))
    model_frozen.load_state_dict(model_bn.state_dict(), strict=True)


def test_loads_affine_false_batchnorm_checkpoint_strict():
    bn = random_bn(nn.BatchNorm2d, affine=False)
    m = FrozenBatchNorm2d(6, eps=bn.eps)
    m.load_state_dict(bn.state_dict(), strict=True)
    assert torch.equal(m.weight, torch.ones(6)) and torch.equal(m.bias, torch.zeros(6))
    x = torch.randn(2, 6, 4, 4)
    torch.testing.assert_close(m(x), bn(x))


def test_wrong_checkpoint_still_fails_strict():
    m = FrozenBatchNorm2d(6)
    with pytest.raises(RuntimeError, match="size mismatch"):
        m.load_state_dict(nn.BatchNorm2d(5).state_dict())
    sd = nn.BatchNorm2d(6).state_dict()
    del sd["running_var"]
    with pytest.raises(RuntimeError, match="Missing key"):
        m.load_state_dict(sd)


def test_loads_torchvision_frozen_state_dict():
    tv = pytest.importorskip("torchvision.ops.misc")
    src = tv.FrozenBatchNorm2d(6, eps=1e-5)
    with torch.no_grad():
        src.running_mean.normal_()
        src.running_var.uniform_(0.5, 2)
        src.weight.normal_()
        src.bias.normal_()
    m = FrozenBatchNorm2d(6)
    m.load_state_dict(src.state_dict(), strict=True)
    x = torch.randn(2, 6, 7, 7)
    torch.testing.assert_close(m(x), src(x), rtol=1e-5, atol=1e-5)
    m2 = FrozenBatchNorm2d.from_batchnorm(src)
    torch.testing.assert_close(m2(x), src(x), rtol=1e-5, atol=1e-5)


def _metadata_state_dict(tensors, version):
    from collections import OrderedDict
    sd = OrderedDict(tensors)
    sd._metadata = OrderedDict({"": {"version": version}})
    return sd


def test_loads_detectron2_state_dicts():
    w, b = torch.randn(6), torch.randn(6)
    mean, var = torch.randn(6), torch.rand(6) + 0.5
    # current detectron2 (version 3): the four tensors
    m = FrozenBatchNorm2d(6)
    m.load_state_dict(_metadata_state_dict(
        {"weight": w, "bias": b, "running_mean": mean, "running_var": var}, 3), strict=True)
    assert torch.equal(m.running_var, var)
    # Caffe2-converted (no version, weight/bias only): identity statistics, folded affine;
    # into a layer as built, and one converted from detectron2's (its variance 1 - eps)
    for var in (1.0, 1 - 1e-5):
        m = FrozenBatchNorm2d(6)
        with torch.no_grad():
            m.running_var.fill_(var)
        m.load_state_dict(_metadata_state_dict({"weight": w, "bias": b}, None), strict=True)
        assert torch.equal(m.running_mean, torch.zeros(6))
        assert torch.equal(m.running_var, torch.ones(6))
        x = torch.randn(2, 6, 3, 3)
        torch.testing.assert_close(
            m(x), x * w.view(1, -1, 1, 1) / (1 + m.eps) ** 0.5 + b.view(1, -1, 1, 1))


@pytest.mark.parametrize("trainable_affine", [False, True])
def test_a_partial_state_dict_never_resets_what_the_layer_holds(trainable_affine):
    # trainable parameters only (no _metadata: a dict comprehension), or buffers only: the
    # identity values the two checkpoint kinds above stand for must not overwrite a
    # layer's own; the keys are reported missing, as nn.BatchNorm2d reports them
    bn = random_bn(nn.BatchNorm2d)
    x = torch.randn(2, 6, 4, 4)
    want = bn.eval()(x)
    sd = FrozenBatchNorm2d.from_batchnorm(bn).state_dict()
    for keep in (("weight", "bias"), ("running_mean", "running_var")):
        partial = {k: sd[k].clone() for k in keep}
        m = FrozenBatchNorm2d.from_batchnorm(bn, trainable_affine=trainable_affine)
        with pytest.raises(RuntimeError, match="Missing key"):
            m.load_state_dict(partial, strict=True)
        result = m.load_state_dict(partial, strict=False)
        assert sorted(result.missing_keys) == sorted(set(sd) - set(keep))
        assert torch.equal(m(x), FrozenBatchNorm2d.from_batchnorm(bn)(x))
        torch.testing.assert_close(m(x), want)


def test_affine_false_checkpoint_onto_the_meta_device():
    # load_state_dict(assign=True) into a layer built on meta: the weight 1 / bias 0 the
    # checkpoint stands for take its device, not the meta one
    bn = random_bn(nn.BatchNorm2d, affine=False)
    with torch.device("meta"):
        m = FrozenBatchNorm2d(6, eps=bn.eps)
    m.load_state_dict(bn.state_dict(), strict=True, assign=True)
    assert not any(t.is_meta for t in m.state_dict().values())
    x = torch.randn(2, 6, 4, 4)
    torch.testing.assert_close(m(x), bn.eval()(x))


@pytest.mark.parametrize("trainable_affine", [False, True])
def test_reset_parameters_after_meta_materialisation(trainable_affine):
    # what Lightning and FSDP do to a module built on meta: to_empty, then reset_parameters
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6))
    model = frozennorm.convert_frozen_bn(model, trainable_affine=trainable_affine)
    model.to_empty(device="cpu")
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    ref = nn.BatchNorm2d(6).eval()
    frozen = model[1]
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(getattr(frozen, name), getattr(ref, name).detach()), name
    assert frozen.trainable_affine is trainable_affine
    with torch.no_grad():
        frozen.running_mean.fill_(3.0)
        frozen.running_var.fill_(5.0)
    frozen.reset_running_stats()
    assert torch.equal(frozen.running_mean, ref.running_mean)
    assert torch.equal(frozen.running_var, ref.running_var)


@pytest.mark.parametrize("default", [torch.float64, torch.float16])
def test_built_in_the_default_dtype_never_below_float32(default):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default)
    try:
        bn, m = nn.BatchNorm2d(4), FrozenBatchNorm2d(4)
    finally:
        torch.set_default_dtype(previous)
    want = torch.float64 if default == torch.float64 else torch.float32
    assert bn.running_mean.dtype == default
    assert all(t.dtype == want for t in m.state_dict().values())
    assert FrozenBatchNorm2d(4, dtype=torch.float16).running_mean.dtype == torch.float16


@pytest.mark.parametrize("device", device_params())
def test_half_cast_keeps_fp32_statistics(device):
    bn = random_bn(nn.BatchNorm2d).to(device)
    m = FrozenBatchNorm2d.from_batchnorm(bn)
    for cast in (lambda m: m.half(), lambda m: m.bfloat16(), lambda m: m.to(torch.float16)):
        c = cast(copy.deepcopy(m))
        assert all(b.dtype == torch.float32 for b in c.buffers())
        x = torch.randn(2, 6, 4, 4, device=device, dtype=torch.float16)
        assert c(x).dtype == torch.float16
    d = copy.deepcopy(m).double()
    assert all(b.dtype == torch.float64 for b in d.buffers())
    assert d(torch.randn(2, 6, 3, 3, device=device, dtype=torch.float64)).dtype == torch.float64
    # back to float32 from float64 works as usual
    assert all(b.dtype == torch.float32 for b in d.float().buffers())
    # statistics already in half (apex's network_to_half sets .data directly) still work:
    # the float16 values as given, computed in float32, rounded once
    h = copy.deepcopy(m)
    for b in h.buffers():
        b.data = b.data.half()
    x = torch.randn(2, 6, 4, 4, device=device, dtype=torch.float16)
    args = (x, h.weight, h.bias, h.running_mean, h.running_var, h.eps)
    assert_close_to_exact(h(x), oracle(*args), oracle_terms(*args), compute_eps(x.dtype))


def test_to_meta_and_back_keeps_working():
    m = FrozenBatchNorm2d(4).to("meta")
    assert all(b.device.type == "meta" for b in m.buffers())
    y = m(torch.empty(2, 4, 3, 3, device="meta"))
    assert y.shape == (2, 4, 3, 3)


def test_serialisation_roundtrips():
    bn = random_bn(nn.BatchNorm2d)
    m = FrozenBatchNorm2d.from_batchnorm(bn)
    x = torch.randn(2, 6, 5, 5)
    y = m(x)
    for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert torch.equal(clone(x), y)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert torch.equal(loaded(x), y)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    fresh = FrozenBatchNorm2d(6, eps=m.eps)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(fresh(x), y)


def test_repr():
    assert repr(FrozenBatchNorm2d(64)) == "FrozenBatchNorm2d(64, eps=1e-05)"
    assert repr(FrozenBatchNorm1d(3, eps=1e-3)) == "FrozenBatchNorm1d(3, eps=0.001)"


class TestModuleErrors:
    def test_rank(self):
        with pytest.raises(ValueError, match=r"expected 4D input, got 3D input"):
            FrozenBatchNorm2d(3)(torch.randn(2, 3, 4))
        with pytest.raises(ValueError, match=r"expected 2D or 3D input, got 4D"):
            FrozenBatchNorm1d(3)(torch.randn(2, 3, 4, 4))
        with pytest.raises(ValueError, match=r"expected 5D input"):
            FrozenBatchNorm3d(3)(torch.randn(2, 3, 4, 4))

    def test_channels(self):
        with pytest.raises(ValueError, match=r"input has 4 channels .* num_features=3"):
            FrozenBatchNorm2d(3)(torch.randn(2, 4, 4, 4))

    def test_num_features(self):
        with pytest.raises(ValueError, match="num_features must be positive"):
            FrozenBatchNorm2d(0)

    def test_no_running_stats(self):
        with pytest.raises(ValueError, match="track_running_stats=False"):
            FrozenBatchNorm2d.from_batchnorm(nn.BatchNorm2d(3, track_running_stats=False))


def test_any_rank_variant_accepts_every_rank():
    m = FrozenBatchNorm.from_batchnorm(random_bn(nn.BatchNorm2d))
    for shape in [(3, 6), (3, 6, 4), (2, 6, 3, 3), (2, 6, 2, 2, 2), (1, 6, 1, 2, 1, 2)]:
        x = torch.randn(shape)
        ref = torch.nn.functional.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False, 0, m.eps)
        torch.testing.assert_close(m(x), ref)


def test_apex_style_module_without_eps():
    class ApexFrozen(nn.Module):  # apex.contrib FrozenBatchNorm2d keeps no eps
        def __init__(self):
            super().__init__()
            self.register_buffer("weight", torch.rand(3) + 0.5)
            self.register_buffer("bias", torch.randn(3))
            self.register_buffer("running_mean", torch.randn(3))
            self.register_buffer("running_var", torch.rand(3) + 0.5)

        def forward(self, x):
            scale = self.weight * self.running_var.rsqrt()
            return x * scale.view(1, -1, 1, 1) + (self.bias - self.running_mean * scale).view(1, -1, 1, 1)

    src = ApexFrozen()
    with pytest.raises(ValueError, match=r"no eps attribute.*from_batchnorm\(bn, eps=\.\.\.\)"):
        FrozenBatchNorm2d.from_batchnorm(src)
    m = FrozenBatchNorm2d.from_batchnorm(src, eps=0.0)
    assert m.eps == 0.0
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(m(x), src(x))


def test_functional_mirrors_f_batch_norm():
    x = torch.randn(2, 5, 3, 3)
    mean, var, w, b = torch.randn(5), torch.rand(5) + 0.1, torch.randn(5), torch.randn(5)
    ref = torch.nn.functional.batch_norm(x, mean, var, w, b, training=False, eps=1e-4)
    torch.testing.assert_close(frozennorm.frozen_batch_norm(x, mean, var, w, b, eps=1e-4), ref)
    torch.testing.assert_close(frozennorm.frozen_batch_norm(x, mean, var),
                               torch.nn.functional.batch_norm(x, mean, var, training=False))


def _fused_or_plain(kind):
    """A frozen BN, its reference, and the arguments after the input: plain ``bn(x)``, or
    the fused call ``bn(x, None, "relu")`` (what forwards fuse() rewrote make)."""
    bn = random_bn(nn.BatchNorm2d)
    frozen = FrozenBatchNorm2d.from_batchnorm(bn)
    if kind == "plain":
        return frozen, bn, ()
    return frozen, nn.Sequential(bn, nn.ReLU()), (None, "relu")


@pytest.mark.parametrize("kind", ["plain", "fused"])
def test_forward_follows_whatever_holds_the_statistics(kind):
    """The eager forward reads the buffer dict directly (nn.Module.__getattr__ is slow); a
    statistic that is no longer a plain buffer (made a Parameter, parametrized, swapped by
    functional_call) is still the one used, and gets its gradient."""
    from torch.nn.utils import parametrize

    x = torch.randn(2, 6, 5, 4)
    frozen, ref, more = _fused_or_plain(kind)
    bn = ref if kind == "plain" else ref[0]
    torch.testing.assert_close(frozen(x, *more), ref(x))

    # a buffer turned into a trainable Parameter: used, and it gets a gradient
    frozen.weight = nn.Parameter(frozen.weight * 3)
    with torch.no_grad():
        bn.weight.mul_(3)
    torch.testing.assert_close(frozen(x, *more), ref(x))
    frozen(x, *more).square().sum().backward()
    ref(x).square().sum().backward()
    torch.testing.assert_close(frozen.weight.grad, bn.weight.grad, rtol=1e-4, atol=1e-3)

    # a parametrized buffer: the parametrization's value is used
    frozen, ref, more = _fused_or_plain(kind)
    bn = ref if kind == "plain" else ref[0]

    class Halve(nn.Module):
        def forward(self, t):
            return t / 2

    parametrize.register_parametrization(frozen, "running_var", Halve())
    with torch.no_grad():
        bn.running_var.div_(2)
    torch.testing.assert_close(frozen(x, *more), ref(x))

    # functional_call with other statistics, the module's own left alone
    frozen, ref, more = _fused_or_plain(kind)
    bn = ref if kind == "plain" else ref[0]
    mean = torch.randn(6)
    out = torch.func.functional_call(frozen, {"running_mean": mean}, (x, *more))
    expected_frozen = copy.deepcopy(frozen)
    with torch.no_grad():
        expected_frozen.running_mean.copy_(mean)
    torch.testing.assert_close(out, expected_frozen(x, *more))
    torch.testing.assert_close(frozen(x, *more), ref(x))



@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("frozen_cls,bn_cls,shape", CASES)
def test_16_bit_inputs_match_batchnorm_rounded_once(frozen_cls, bn_cls, shape, dtype):
    """A float16/bfloat16 input through a module with float32 statistics (what
    ``model.half()`` leaves), variances down to 1e-6 (eps decides those channels): the
    BatchNorm's eval output in float64, rounded once to the input's dtype (within float32's
    few ulps of it), also after ``.half()``/``.bfloat16()`` of the module."""
    bn = random_bn(bn_cls, affine=True)
    with torch.no_grad():
        bn.running_var.copy_(10 ** torch.linspace(-6, 0.3, 6))
    x = (torch.randn(shape) * 3).to(dtype)
    exact = bn.double()(x.double())
    bn.float()
    frozen = frozen_cls.from_batchnorm(bn)
    args = (x, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
    for module in (frozen, copy.deepcopy(frozen).to(dtype)):
        y = module(x)
        assert y.dtype == dtype
        assert_close_to_exact(y, exact, oracle_terms(*args), compute_eps(dtype))


@pytest.mark.parametrize("activation", ["identity", "relu", "relu6", "silu"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("with_residual", [False, True])
def test_forward_with_residual_and_activation(activation, dtype, with_residual):
    """``bn(x, residual, activation)`` (what forwards fuse() rewrote call) is ``act(bn(x) +
    residual)`` as the unfused sequence computes it (bit for bit; SiLU within an ulp), the
    residual included with the identity too; inputs wide enough to reach ReLU6's 6."""
    m = FrozenBatchNorm2d.from_batchnorm(random_bn(nn.BatchNorm2d)).to(dtype)
    x = (torch.randn(2, 6, 5, 4, dtype=torch.float64) * 4).to(dtype)
    residual = torch.randn(x.shape, dtype=torch.float64).to(dtype) if with_residual else None
    act = {"identity": lambda t: t, "relu": torch.relu, "relu6": F.relu6, "silu": F.silu}
    plain = m(x)
    expected = act[activation](plain + residual if with_residual else plain)
    got = m(x, residual, activation)
    assert got.dtype == dtype
    if activation == "silu":
        tol = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 2e-6,
               torch.float64: 1e-12}[dtype]
        torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    else:
        assert torch.equal(got, expected), (got - expected).abs().max()
    if activation == "relu6":
        assert (expected == 6).any() and ((expected > 0) & (expected < 6)).any()
