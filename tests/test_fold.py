"""fold_frozen_bn(): conv -> frozen BatchNorm pairs folded into the convolution.

Against the unfolded (converted) model with random statistics: float32 outputs, element by
element, within 1e-5 of that model computed in float64 (model_helpers.assert_matches_float64);
for training-mode folds, outputs, input gradients and every parameter gradient of float64
copies within 1e-9. An inference fold's constants (the conv's weight and bias, or the shift
of shift="bn") are the float64 fold of the unfolded model's, rounded once to their dtype.
(Float32 gradients of deep ReLU nets are not compared element by element: folding moves a
pre-activation by an ulp or so, and one that lies within that of 0 switches its ReLU, or a
max-pool's argmax, which changes the gradient there outright, by chance, in about one model
in two at these sizes.) Training
mode must also keep the state dict (keys and values), load checkpoints both ways, and
read the statistics at call time.
"""
from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from frozennorm import (FrozenBatchNorm, FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d,
                        FrozenNormWarning, audit, convert_frozen_bn, fold_frozen_bn, fuse,
                        revert_frozen_bn)
from frozennorm.fold import (FoldedConv1d, FoldedConv2d, FoldedConv3d, FoldedFrozenBatchNorm,
                             FoldedFrozenBatchNormAct2d, IdentityBatchNorm)

from model_helpers import assert_close_rel, assert_matches_float64, float64_reference
from oracle import assert_close_to_exact
from test_fuse import DET, IMAGE, SMALL, Routed, duck_fuse, frozen, run, tensors

tvm = pytest.importorskip("torchvision.models")


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)  # the models' initial weights


def check_close(model, folded, *inputs, rtol=1e-5, grads=True):
    """Outputs within ``rtol`` of the unfolded model's in float64, element by element; with
    ``grads``, outputs and gradients (inputs, parameters by name) of float64 copies within
    1e-9."""
    with torch.no_grad():
        out = tensors(folded(*inputs))
    assert_matches_float64(out, tensors(float64_reference(model, *inputs)), rtol)
    if not grads:
        return
    inputs = tuple(x.double() for x in inputs)
    expected = run(copy.deepcopy(model).double(), *inputs)
    got = run(copy.deepcopy(folded).double(), *inputs)
    assert list(got[2]) == list(expected[2])
    for what, e, a in (("output", expected[0], got[0]), ("input grad", expected[1], got[1]),
                       ("param grad", list(expected[2].values()), list(got[2].values()))):
        assert_matches_float64(a, e, 1e-9, what)


def check_folded_constants(source, deploy, rep, shift="bn"):
    """Each pair an inference fold folded: the conv's weight ``W * s`` and its bias (or, with
    ``shift="bn"``, the bias of the BatchNorm left) ``(b - mean) * s + bias``, with ``s =
    weight / sqrt(var + eps)`` of ``source``'s statistics, computed in float64 and rounded
    once: within half an ulp of their dtype (plus the float64 arithmetic's few ulps)."""
    assert rep.mode == "inference" and rep.folded
    d = lambda t: t.detach().double()
    for pair in rep.folded:
        conv, bn = source.get_submodule(pair.conv), source.get_submodule(pair.bn)
        if isinstance(bn, FoldedFrozenBatchNorm):
            stats, eps = bn.statistics(), bn.bn_eps
        else:
            stats, eps = {n: getattr(bn, n) for n in ("weight", "bias", "running_mean",
                                                       "running_var")}, bn.eps
        s = d(stats["weight"]) / torch.sqrt(d(stats["running_var"]) + eps)
        weight = d(conv.weight) * s.view([-1] + [1] * (conv.weight.dim() - 1))
        centred = ((d(conv.bias) if conv.bias is not None else 0.0) - d(stats["running_mean"])) * s
        folded_conv = deploy.get_submodule(pair.conv)
        assert_close_to_exact(folded_conv.weight, weight, weight.abs(), 2.0**-53,
                              f"{pair.conv}.weight", factor=2.0)
        held = folded_conv.bias if shift == "conv_bias" else deploy.get_submodule(pair.bn).bias
        bias = d(stats["bias"])
        assert_close_to_exact(held, centred + bias, centred.abs() + bias.abs(), 2.0**-53,
                              f"the shift of {pair.bn}", factor=4.0)


def check_state_dict(model, folded):
    sd, folded_sd = model.state_dict(), folded.state_dict()
    assert list(folded_sd) == list(sd)
    assert all(torch.equal(folded_sd[k], v) for k, v in sd.items())


# --------------------------------------------------------------------------------------
# torchvision / timm / detection
# --------------------------------------------------------------------------------------

def test_resnet18_training_fold_keeps_checkpoints():
    model = frozen(tvm.resnet18())
    folded, rep = fold_frozen_bn(model, "training", report=True)
    assert len(rep.folded) == 20 and rep.unfolded == [] and rep.untraced == []
    assert rep.folded[0].conv == "conv1" and rep.folded[0].bn == "bn1"
    assert type(folded.conv1) is FoldedConv2d and type(folded.bn1) is FoldedFrozenBatchNorm
    assert type(model.conv1) is nn.Conv2d  # the original is left as it is
    check_state_dict(model, folded)
    check_close(model, folded, SMALL)

    # checkpoints load both ways (strict), and the folding follows the loaded statistics
    other = frozen(tvm.resnet18(), seed=5)
    folded.load_state_dict(other.state_dict(), strict=True)
    check_state_dict(other, folded)
    check_close(other, folded, IMAGE, grads=False)
    unfolded = frozen(tvm.resnet18(), seed=7)
    unfolded.load_state_dict(folded.state_dict(), strict=True)
    check_close(unfolded, folded, IMAGE, grads=False)


@pytest.mark.slow
def test_resnet50_inference_and_training_with_fuse():
    model = frozen(tvm.resnet50())
    deploy, rep = fold_frozen_bn(model.eval(), shift="conv_bias", report=True)
    assert len(rep.folded) == 53 and rep.unfolded == []
    assert not any(isinstance(m, FrozenBatchNorm) for m in deploy.modules())
    assert type(deploy.bn1) is IdentityBatchNorm and deploy.conv1.bias is not None
    # the BatchNorm entries are gone from the state dict, the convs have a bias
    assert not any("bn" in k or "downsample.1" in k for k in deploy.state_dict())
    check_folded_constants(model, deploy, rep, shift="conv_bias")
    check_close(model, deploy, IMAGE, grads=False)

    model.train()
    trained, rep = fuse(fold_frozen_bn(model, "training"), report=True)
    assert sum(type(m) is FoldedConv2d for m in trained.modules()) == 53
    assert rep.count(activation="relu") == 49 and rep.count(residual=True) == 16
    check_state_dict(model, trained)
    check_close(model, trained, SMALL)
    check_close(model, trained, IMAGE[:1, :, :, :48])


def test_inference_shift_on_bn_fuses():
    """The default inference fold: the conv stays bias-free, the shift stays at the
    BatchNorm's place, where fuse() merges it with the add and the ReLU after it."""
    model = frozen(tvm.resnet18()).eval()
    deploy, rep = fold_frozen_bn(model, report=True)
    assert deploy.conv1.bias is None and type(deploy.bn1) is FrozenBatchNorm2d
    assert deploy.bn1.eps == 0.0 and torch.equal(deploy.bn1.running_var, torch.ones(64))
    check_folded_constants(model, deploy, rep)
    deploy, rep = fuse(deploy, report=True)
    assert rep.count() == 17
    check_close(model, deploy, IMAGE, grads=False)


def test_detection_model():
    det = frozen(tvm.detection.fasterrcnn_resnet50_fpn(**DET))
    # the detector's own forward does not trace: its modules' forwards are folded
    with warnings.catch_warnings():
        warnings.simplefilter("error", FrozenNormWarning)
        folded, rep = fold_frozen_bn(det, "training", report=True)
    assert len(rep.folded) == 53 and rep.unfolded == [] and rep.untraced == []
    assert all(p.conv.startswith("backbone.body.") for p in rep.folded)
    folded, frep = fuse(folded, report=True)
    assert frep.count() == 49
    check_state_dict(det, folded)
    check_close(det.backbone, folded.backbone, SMALL)


def test_timm_models():
    timm = pytest.importorskip("timm")
    x = SMALL
    for name, n_pairs in (("efficientnet_b0", 49), ("mobilenetv3_small_050", 34)):
        model = frozen(timm.create_model(name))
        folded, rep = fold_frozen_bn(model, "training", report=True)
        assert len(rep.folded) == n_pairs and rep.unfolded == []
        check_state_dict(model, folded)
        check_close(model, fuse(folded), x)
        if name == "efficientnet_b0":  # BN+SiLU layers: the act stays, the BN goes
            deploy, rep = fold_frozen_bn(model.eval(), report=True)
            check_folded_constants(model, deploy, rep)
            check_close(model, deploy, x, grads=False)
    # efficientnet: BN+SiLU layers fold with their activation; mobilenetv3's Hardswish
    # ones keep their act module
    assert any(type(m) is FoldedFrozenBatchNormAct2d and type(m.act) is nn.Hardswish
               for m in folded.modules())


# --------------------------------------------------------------------------------------
# Convolution variants and what is not folded
# --------------------------------------------------------------------------------------

class Convs(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 6, 3, padding=1, bias=True)
        self.b1 = FrozenBatchNorm1d(6)
        self.c2 = nn.Conv2d(4, 8, 3, stride=2, padding=2, dilation=2, groups=2, bias=True,
                            padding_mode="reflect")
        self.b2 = FrozenBatchNorm2d(8)
        self.c3 = nn.Conv3d(4, 5, (1, 3, 3), padding=(0, 1, 1), bias=False)
        self.b3 = FrozenBatchNorm3d(5)
        self.t = nn.ConvTranspose2d(4, 4, 2, stride=2)
        self.bt = FrozenBatchNorm2d(4)
        self.c4 = nn.Conv2d(4, 4, 1)
        self.b4 = FrozenBatchNorm2d(4)
        self.b5 = FrozenBatchNorm2d(4)

    def forward(self, x1, x2, x3):
        y1 = F.relu(self.b1(self.c1(x1)))
        y2 = self.b2(self.c2(x2))
        y3 = self.b3(self.c3(x3))
        yt = self.bt(self.t(x2))
        c4 = self.c4(x2)
        y4 = self.b4(c4) + c4  # the conv's output has another user
        y5 = self.b5(x2 + 1)
        return y1.sum() + y2.sum() + y3.sum() + yt.sum() + y4.sum() + y5.sum(), y2


CONV_INPUTS = (torch.randn(2, 4, 7), torch.randn(2, 4, 9, 9), torch.randn(2, 4, 3, 5, 5))


@pytest.mark.parametrize("mode", ["inference", "training"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_conv_variants(mode, dtype):
    model = frozen(Convs()).to(dtype)
    for p in model.parameters():  # randomize the conv biases too
        nn.init.normal_(p)
    folded, rep = fold_frozen_bn(model, mode, report=True)
    names = ("c1", "c2", "c3")
    assert [(p.conv, p.bn) for p in rep.folded] == [(c, "b" + c[1]) for c in names]
    reasons = {s.name: s.reason for s in rep.unfolded}
    assert set(reasons) == {"bt", "b4", "b5"}
    assert "ConvTranspose2d" in reasons["bt"] and "other users" in reasons["b4"]
    assert "add" in reasons["b5"]
    if mode == "training":
        assert [type(folded.get_submodule(n)) for n in names] == [
            FoldedConv1d, FoldedConv2d, FoldedConv3d]
        check_state_dict(model, folded)
    else:
        check_folded_constants(model, folded, rep)
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    check_close(model, folded, *(x.to(dtype) for x in CONV_INPUTS), rtol=rtol,
                grads=mode == "training")


def test_fold_after_fuse():
    """fuse() rewrites forwards, fold_frozen_bn() swaps modules: in either order, the
    rewritten forwards' fused calls reach the modules now at the BatchNorms' places."""
    model = frozen(tvm.resnet18())
    fused = fuse(model)
    folded, rep = fold_frozen_bn(fused, "training", report=True)
    assert len(rep.folded) == 20
    assert type(folded.layer1[0].bn2) is FoldedFrozenBatchNorm
    assert "forward" in folded.layer1[0].__dict__  # still the fused forward
    check_state_dict(model, folded)
    check_close(model, folded, SMALL)
    for shift in ("conv_bias", "bn"):
        deploy, rep = fold_frozen_bn(fused.eval(), shift=shift, report=True)
        assert type(deploy.layer1[0].bn2) is (IdentityBatchNorm if shift == "conv_bias"
                                              else FrozenBatchNorm2d)
        check_folded_constants(fused, deploy, rep, shift)
        check_close(model.eval(), deploy, SMALL, grads=False)


# --------------------------------------------------------------------------------------
# The training-mode modules
# --------------------------------------------------------------------------------------

def test_folded_modules_copy_cast_and_stay_frozen():
    model = frozen(tvm.resnet18())
    folded = fold_frozen_bn(model, "training")
    for clone in (copy.deepcopy(folded), pickle.loads(pickle.dumps(folded))):
        assert clone.conv1._folded_bn is clone.bn1 and clone.bn1 is not folded.bn1
        check_close(model, clone, SMALL, grads=False)
    # casts: the conv follows the BN's buffers, which stay float32 under bfloat16
    half, model_half = copy.deepcopy(folded).bfloat16(), copy.deepcopy(model).bfloat16()
    assert half.bn1.statistics()["running_mean"].dtype == torch.float32
    assert half.conv1.weight.dtype == torch.bfloat16
    with torch.no_grad():
        x = SMALL.bfloat16()
        assert_close_rel(half(x), model_half(x), 5e-2)
    double = copy.deepcopy(folded).double()
    assert double.conv1._folded_bn.statistics()["running_var"].dtype == torch.float64
    # the converter and reverter leave the folded halves alone: it still computes the same
    with pytest.warns(FrozenNormWarning, match="FoldedFrozenBatchNorm"):
        reverted = revert_frozen_bn(copy.deepcopy(folded))
    for again in (convert_frozen_bn(copy.deepcopy(folded)), reverted):
        assert type(again.bn1) is FoldedFrozenBatchNorm
        check_close(model, again, SMALL, grads=False)
    # statistics receive no gradient; nothing new to train
    assert [n for n, _ in folded.named_parameters()] == [n for n, _ in model.named_parameters()]
    # still frozen normalisation layers to audit
    assert [(r.name, r.frozen, r.updates_stats) for r in audit(folded)] == [
        (r.name, True, False) for r in audit(model)]


class Opaque(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = FrozenBatchNorm2d(4)

    def forward(self, x):
        if x.sum() > 0:  # not traceable
            x = x * 2
        return self.bn(self.conv(x))


def test_untraceable_forward_warns_and_arguments_are_checked():
    model = nn.Sequential(Opaque(), nn.Sequential(nn.Conv2d(4, 4, 1), FrozenBatchNorm2d(4)))
    with pytest.warns(FrozenNormWarning, match="0.bn"):
        folded, rep = fold_frozen_bn(model, "training", report=True)
    assert [(p.conv, p.bn) for p in rep.folded] == [("1.0", "1.1")]
    assert [(s.name, s.reason) for s in rep.unfolded] == [
        ("0.bn", "called from a forward that does not trace")]
    assert [(e.path, e.module_type) for e in rep.untraced] == [("0", "Opaque")]
    with pytest.raises(ValueError, match="mode"):
        fold_frozen_bn(model, "train")
    with pytest.raises(ValueError, match="conv_bias"):
        fold_frozen_bn(model, "training", shift="conv_bias")


# --------------------------------------------------------------------------------------
# What a fold leaves, in a framework's conv+BN fuser's hands
# --------------------------------------------------------------------------------------

def routed_model(seed: int = 0) -> nn.Module:
    """Two layers of the Ultralytics kind (conv -> bn -> act, a forward_fuse)."""
    model = nn.Sequential(Routed(), Routed())
    model[1].conv = nn.Conv2d(8, 8, 3, padding=1, bias=True)
    for p in model.parameters():
        nn.init.normal_(p, std=0.3)
    return frozen(model, seed).eval()


def test_inference_fold_survives_a_duck_typed_fuser():
    """What an inference fold leaves at the BatchNorm's place folds again exactly: the
    framework's fuser (which reads bn.running_mean etc. by name and folds in place) then
    changes nothing."""
    model = routed_model()
    x = torch.randn(2, 3, 8, 8)
    expected = float64_reference(model, x)
    with torch.no_grad():
        for shift in ("conv_bias", "bn"):
            deploy, rep = fold_frozen_bn(model, shift=shift, report=True)
            bn = deploy[0].bn
            assert type(bn) is (IdentityBatchNorm if shift == "conv_bias" else FrozenBatchNorm2d)
            assert bn.eps == 0.0 and torch.equal(bn.running_var, torch.ones(8))
            check_folded_constants(model, deploy, rep, shift)
            out = deploy(x)
            assert_matches_float64(out, expected)
            refused = duck_fuse(copy.deepcopy(deploy))
            assert not hasattr(refused[0], "bn")
            torch.testing.assert_close(refused(x), out, rtol=0, atol=0)  # exactly the same
    ident = IdentityBatchNorm(4).half()
    assert ident.running_mean.dtype == torch.float16 and list(ident.state_dict()) == []
    y, r = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    assert ident.float()(y) is y
    torch.testing.assert_close(ident(y, r, "relu"), torch.relu(y + r), rtol=0, atol=0)


def test_training_fold_refuses_a_duck_typed_fuser_then_folds_for_inference():
    model = routed_model()
    x = torch.randn(2, 3, 8, 8)
    trained = fold_frozen_bn(model, "training")
    bn = trained[0].bn
    # no BatchNorm attributes: a fuser cannot fold the scale in a second time
    assert not any(hasattr(bn, a) for a in ("running_mean", "running_var", "weight", "bias", "eps"))
    with pytest.raises(AttributeError, match=r"fold_frozen_bn\(model\) completes"):
        duck_fuse(copy.deepcopy(trained))
    assert set(bn.statistics()) == {"weight", "bias", "running_mean", "running_var"}
    assert list(trained.state_dict()) == list(model.state_dict())
    # an inference fold completes the training fold; then the fuser is harmless
    deploy, rep = fold_frozen_bn(trained, shift="conv_bias", report=True)
    assert len(rep.folded) == 2 and type(deploy[0].conv) is nn.Conv2d
    assert type(deploy[0].bn) is IdentityBatchNorm
    check_folded_constants(trained, deploy, rep, shift="conv_bias")
    expected = float64_reference(model, x)
    with torch.no_grad():
        assert_matches_float64(deploy(x), expected)
        assert_matches_float64(duck_fuse(deploy)(x), expected)
    # a second training fold changes nothing
    again, rep = fold_frozen_bn(trained, "training", report=True)
    assert rep.folded == [] and {s.reason for s in rep.unfolded} == {"already folded (training mode)"}
