"""fold_frozen_bn(): conv -> frozen BatchNorm pairs folded into the convolution.

Against the unfolded (converted) model with random statistics: float32 outputs within 1e-4
of their magnitude; for training-mode folds, outputs, input gradients and every parameter
gradient of float64 copies within 1e-9. (Float32 gradients of deep ReLU nets are not
compared element by element: folding moves a pre-activation by an ulp or so, and one that
lies within that of 0 switches its ReLU, or a max-pool's argmax, which changes the
gradient there outright, by chance, in about one model in two at these sizes.) Training
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

from frozennorm import (FoldedConv1d, FoldedConv2d, FoldedConv3d, FoldedFrozenBatchNorm,
                        FoldedFrozenBatchNormAct2d, FrozenBatchNorm, FrozenBatchNorm1d,
                        FrozenBatchNorm2d, FrozenBatchNorm3d, FrozenNormWarning,
                        FusedFrozenBatchNorm, convert_frozen_bn, fold_frozen_bn, fuse,
                        revert_frozen_bn)

from model_helpers import assert_close_rel
from test_fuse import DET, IMAGE, SMALL, frozen, run, tensors

tvm = pytest.importorskip("torchvision.models")


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)  # the models' initial weights


def check_close(model, folded, *inputs, rtol=1e-4, grads=True):
    """Outputs within ``rtol``; with ``grads``, outputs and gradients (inputs, parameters by
    name) of float64 copies within 1e-9."""
    with torch.no_grad():
        for i, (a, e) in enumerate(zip(tensors(folded(*inputs)), tensors(model(*inputs)))):
            assert_close_rel(a, e, rtol, f"output {i}")
    if not grads:
        return
    inputs = tuple(x.double() for x in inputs)
    expected = run(copy.deepcopy(model).double(), *inputs)
    got = run(copy.deepcopy(folded).double(), *inputs)
    assert list(got[2]) == list(expected[2])
    for what, e, a in (("output", expected[0], got[0]), ("input grad", expected[1], got[1]),
                       ("param grad", list(expected[2].values()), list(got[2].values()))):
        for i, (ai, ei) in enumerate(zip(a, e)):
            assert_close_rel(ai, ei, 1e-9, f"{what} {i}")


def check_state_dict(model, folded):
    sd, folded_sd = model.state_dict(), folded.state_dict()
    assert list(folded_sd) == list(sd)
    assert all(torch.equal(folded_sd[k], v) for k, v in sd.items())


# --------------------------------------------------------------------------------------
# torchvision / timm / detection
# --------------------------------------------------------------------------------------

def test_resnet18_training_fold_keeps_checkpoints():
    model = frozen(tvm.resnet18())
    folded, rep = fold_frozen_bn(model, "training", report=True)  # default policy="all"
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


def test_resnet50_inference_and_training_with_fuse():
    model = frozen(tvm.resnet50())
    deploy, rep = fold_frozen_bn(model.eval(), report=True)
    assert len(rep.folded) == 53 and rep.unfolded == []
    assert not any(isinstance(m, FrozenBatchNorm) for m in deploy.modules())
    assert type(deploy.bn1) is nn.Identity and deploy.conv1.bias is not None
    with torch.no_grad():
        assert_close_rel(deploy(IMAGE), model(IMAGE), 1e-4)

    model.train()
    trained = fuse(fold_frozen_bn(model, "training", policy="all"))
    assert sum(type(m) is FoldedConv2d for m in trained.modules()) == 53
    fused = [m for m in trained.modules() if isinstance(m, FoldedFrozenBatchNorm)]
    assert sum(m.activation == "relu" for m in fused) == 49
    check_state_dict(model, trained)
    check_close(model, trained, SMALL)

    # policy="auto": the 49 BatchNorms fuse merges with a ReLU (or add + ReLU) stay for
    # fuse; the four downsample BatchNorms, alone in their pass, fold whole
    folded, rep = fold_frozen_bn(model, "training", policy="auto", report=True)
    assert [p.bn for p in rep.folded] == [f"layer{i}.0.downsample.1" for i in range(1, 5)]
    assert len(rep.unfolded) == 49
    assert all("computes relu" in s.reason or "computes add -> relu" in s.reason
               for s in rep.unfolded)
    trained, frep = fuse(folded, report=True)
    assert frep.count() == 49 and frep.count(residual=True) == 16
    assert all(m.fold_shift for m in trained.modules() if isinstance(m, FoldedConv2d))
    check_state_dict(model, trained)
    check_close(model, trained, SMALL)
    check_close(model, trained, IMAGE[:1, :, :, :48])


def test_inference_shift_on_bn_fuses():
    model = frozen(tvm.resnet18()).eval()
    deploy = fold_frozen_bn(model, shift="bn")
    assert deploy.conv1.bias is None and type(deploy.bn1) is FrozenBatchNorm2d
    assert deploy.bn1.eps == 0.0 and torch.equal(deploy.bn1.running_var, torch.ones(64))
    deploy, rep = fuse(deploy, report=True)
    assert rep.count() == 17
    with torch.no_grad():
        assert_close_rel(deploy(IMAGE), model(IMAGE), 1e-4)


def test_detection_model():
    det = frozen(tvm.detection.fasterrcnn_resnet50_fpn(**DET))
    # the detector's own forward does not trace: its traceable parts are folded
    with warnings.catch_warnings():
        warnings.simplefilter("error", FrozenNormWarning)
        folded, rep = fold_frozen_bn(det, "training", policy="auto", report=True)
    assert len(rep.folded) == 4 and len(rep.unfolded) == 49  # see test_resnet50_...
    assert [(e.path, e.module_type) for e in rep.untraced] == [("", "FasterRCNN")]
    assert all(p.conv.startswith("backbone.body.") for p in rep.folded)
    folded, frep = fuse(folded, submodule="backbone.body", report=True)
    assert frep.count() == 49
    check_state_dict(det, folded)
    check_close(det.backbone, folded.backbone, SMALL)


def test_timm_models():
    timm = pytest.importorskip("timm")
    x = SMALL
    for name, n_pairs in (("efficientnet_b0", 49), ("mobilenetv3_small_050", 34)):
        model = frozen(timm.create_model(name))
        folded, rep = fold_frozen_bn(model, "training", policy="all", report=True)
        assert len(rep.folded) == n_pairs and rep.unfolded == []
        check_state_dict(model, folded)
        check_close(model, fuse(folded), x)
        # auto: the BN+activation layers stay (fused), the projections fold whole
        auto, rep = fold_frozen_bn(model, "training", policy="auto", report=True)
        assert 0 < len(rep.folded) < n_pairs and len(rep.folded) + len(rep.unfolded) == n_pairs
        assert all(not isinstance(m, FoldedFrozenBatchNorm) or m.conv_applies_shift
                   for m in auto.modules())
        check_state_dict(model, auto)
        check_close(model, fuse(auto), x)
        if name == "efficientnet_b0":  # BN+SiLU layers: the act stays, the BN goes
            with torch.no_grad():
                assert_close_rel(fold_frozen_bn(model.eval())(x), model(x), 1e-4)
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


@pytest.mark.parametrize("mode,policy", [("inference", "auto"), ("training", "all"),
                                         ("training", "auto")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_conv_variants(mode, policy, dtype):
    model = frozen(Convs()).to(dtype)
    for p in model.parameters():  # randomize the conv biases too
        nn.init.normal_(p)
    folded, rep = fold_frozen_bn(model, mode, policy=policy, report=True)
    auto = mode == "training" and policy == "auto"
    names = ("c2", "c3") if auto else ("c1", "c2", "c3")
    assert [(p.conv, p.bn) for p in rep.folded] == [(c, "b" + c[1]) for c in names]
    reasons = {s.name: s.reason for s in rep.unfolded}
    assert set(reasons) == {"bt", "b4", "b5"} | ({"b1"} if auto else set())
    assert "ConvTranspose2d" in reasons["bt"] and "other users" in reasons["b4"]
    assert "add" in reasons["b5"]
    if auto:  # its ReLU goes into its pass with fuse()
        assert "computes relu" in reasons["b1"] and type(folded.c1) is nn.Conv1d
    if mode == "training":
        assert [type(folded.get_submodule(n)) for n in names] == [
            {"c1": FoldedConv1d, "c2": FoldedConv2d, "c3": FoldedConv3d}[n] for n in names]
        assert all(folded.get_submodule(n).fold_shift == auto for n in names)
        check_state_dict(model, folded)
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    check_close(model, folded, *(x.to(dtype) for x in CONV_INPUTS), rtol=rtol,
                grads=mode == "training")


def test_fold_after_fuse():
    model = frozen(tvm.resnet18())
    fused = fuse(model)
    folded, rep = fold_frozen_bn(fused, "training", policy="all", report=True)
    assert len(rep.folded) == 20
    assert folded.layer1[0].bn2.activation == "relu"  # a fused BN keeps its activation
    check_state_dict(model, folded)
    check_close(model, folded, SMALL)
    # auto: the fused BatchNorms (ReLU, add + ReLU) stay, the three downsample ones fold
    folded, rep = fold_frozen_bn(fused, "training", policy="auto", report=True)
    assert [p.bn for p in rep.folded] == [f"layer{i}.0.downsample.1" for i in range(2, 5)]
    assert type(folded.layer1[0].bn2) is FusedFrozenBatchNorm
    check_state_dict(model, folded)
    check_close(model, folded, SMALL)
    with torch.no_grad():
        deploy = fold_frozen_bn(fused.eval())
        assert isinstance(deploy.layer1[0].bn2, FusedFrozenBatchNorm)
        assert_close_rel(deploy(SMALL), model.eval()(SMALL), 1e-4)


# --------------------------------------------------------------------------------------
# The training-mode modules
# --------------------------------------------------------------------------------------

def test_folded_modules_copy_cast_and_stay_frozen():
    model = frozen(tvm.resnet18())
    folded = fold_frozen_bn(model, "training", policy="all")
    for clone in (copy.deepcopy(folded), pickle.loads(pickle.dumps(folded))):
        assert clone.conv1._folded_bn is clone.bn1 and clone.bn1 is not folded.bn1
        check_close(model, clone, SMALL, grads=False)
    # casts: the conv follows the BN's buffers, which stay float32 under bfloat16
    half, model_half = copy.deepcopy(folded).bfloat16(), copy.deepcopy(model).bfloat16()
    assert half.bn1.running_mean.dtype == torch.float32
    assert half.conv1.weight.dtype == torch.bfloat16
    with torch.no_grad():
        x = SMALL.bfloat16()
        assert_close_rel(half(x), model_half(x), 5e-2)
    double = copy.deepcopy(folded).double()
    assert double.conv1._folded_bn.running_var.dtype == torch.float64
    # the converter and reverter leave the folded halves alone: it still computes the same
    with pytest.warns(FrozenNormWarning, match="FoldedFrozenBatchNorm"):
        reverted = revert_frozen_bn(copy.deepcopy(folded))
    for again in (convert_frozen_bn(copy.deepcopy(folded)), reverted):
        assert type(again.bn1) is FoldedFrozenBatchNorm
        check_close(model, again, SMALL, grads=False)
    # statistics receive no gradient; nothing new to train
    assert [n for n, _ in folded.named_parameters()] == [n for n, _ in model.named_parameters()]


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
        ("0.bn", "inside a forward that does not trace")]
    assert [(e.path, e.module_type) for e in rep.untraced] == [("0", "Opaque")]
    folded, rep = fold_frozen_bn(model, "training", leaf_modules=[Opaque], report=True)
    assert len(rep.folded) == 1 and rep.untraced == []
    assert [(s.name, s.reason) for s in rep.unfolded] == [("0.bn", "inside a leaf module")]
    with pytest.raises(ValueError, match="mode"):
        fold_frozen_bn(model, "train")
    with pytest.raises(ValueError, match="conv_bias"):
        fold_frozen_bn(model, "training", shift="conv_bias")
    with pytest.raises(ValueError, match="policy"):
        fold_frozen_bn(model, "training", policy="some")


# --------------------------------------------------------------------------------------
# policy="auto": whole-map folds, the per-call choice, the kept scaled weight
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("conv", [
    nn.Conv1d(3, 5, 3), nn.Conv1d(3, 6, 4, stride=3, padding=2, dilation=2, groups=3),
    nn.Conv2d(4, 6, 3, padding="same", dilation=2), nn.Conv2d(4, 6, (2, 5), padding="valid"),
    nn.Conv2d(4, 8, 3, stride=(2, 3), padding=(1, 2), padding_mode="reflect"),
    nn.Conv2d(4, 4, 7, stride=2, padding=3, groups=4),
    nn.Conv3d(2, 3, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))])
def test_output_numel_matches_the_conv(conv):
    from frozennorm.fold import _output_numel
    dims = len(conv.kernel_size)
    for batch in ([], [1], [3]):  # unbatched too
        for size in (5, 8, 11):
            x = torch.randn(batch + [conv.in_channels] + [size] * dims)
            assert _output_numel(conv, x) == conv(x).numel(), (batch, size)


class Wide(nn.Module):
    """Two 1x1 convs (weights of 256 x 128 and 4 x 256 elements), each followed by a
    BatchNorm alone in its pass: whole-map folds."""

    def __init__(self):
        super().__init__()
        self.big = nn.Conv2d(128, 256, 1, bias=True)
        self.bn_big = FrozenBatchNorm2d(256)
        self.small = nn.Conv2d(256, 4, 1, bias=False)
        self.bn_small = FrozenBatchNorm2d(4)

    def forward(self, x):
        return self.bn_small(self.small(self.bn_big(self.big(x))))


def test_auto_picks_the_cheaper_way_per_call():
    """A weight is scaled when the conv's output is at least as large (batch 2 at 12x12:
    73728 >= 32768 and 1152 >= 1024 elements), else left alone for a pass over the output
    (1 x 4 x 4: 4096 and 64 elements); both ways give the unfolded results and gradients."""
    model = frozen(Wide())
    for p in model.parameters():
        nn.init.normal_(p, std=0.1)
    folded, rep = fold_frozen_bn(model, "training", policy="auto", report=True)
    assert [p.bn for p in rep.folded] == ["bn_big", "bn_small"]
    assert type(folded.bn_big) is FoldedFrozenBatchNorm and folded.bn_big.conv_applies_shift
    for shape, scaled in (((2, 128, 12, 12), True), ((1, 128, 4, 4), False)):
        x = torch.randn(shape)
        assert folded.big._scale_weight(x) is scaled
        assert folded.small._scale_weight(torch.randn(shape[0], 256, *shape[2:])) is scaled
        check_close(model, folded, x, rtol=1e-5)
    # without gradients the scaled weight is kept, so it always pays
    with torch.no_grad():
        assert folded.big._scale_weight(torch.randn(1, 128, 1, 1))
    frozen_conv = copy.deepcopy(folded).requires_grad_(False)
    assert frozen_conv.big._scale_weight(torch.randn(1, 128, 1, 1))


def test_scaled_weight_is_kept_while_nothing_changes():
    model = frozen(Wide())
    folded = fold_frozen_bn(model, "training", policy="auto")
    conv, bn = folded.big, folded.bn_big
    x = torch.randn(1, 128, 4, 4)

    def same_as_unfolded():
        with torch.no_grad():
            assert_close_rel(folded(x), model(x), 1e-5)

    # a weight that receives gradients is scaled anew at every call, in the graph
    w1, _ = conv._folded_parameters(bn)
    w2, _ = conv._folded_parameters(bn)
    assert w1 is not w2 and w1.requires_grad
    with torch.no_grad():
        w1, b1 = conv._folded_parameters(bn)
        w2, b2 = conv._folded_parameters(bn)
        assert w1 is w2 and b1 is b2 and not w1.requires_grad
        same_as_unfolded()
        # an optimizer step (in place) on the weight, then on the bias
        for p_folded, p_model in ((conv.weight, model.big.weight), (conv.bias, model.big.bias)):
            p_folded.mul_(1.5)
            p_model.mul_(1.5)
            w3, b3 = conv._folded_parameters(bn)
            assert w3 is not w1 or b3 is not b1
            w1, b1 = w3, b3
            same_as_unfolded()
    # new statistics (load_state_dict copies into the buffers)
    other = frozen(Wide(), seed=3)
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        other.bn_big.running_var.mul_(4.0)
    folded.load_state_dict(other.state_dict())
    model.load_state_dict(other.state_dict())
    with torch.no_grad():
        assert conv._folded_parameters(bn)[0] is not w1
    same_as_unfolded()
    # casts, copies and pickles: recomputed, not carried along
    double = copy.deepcopy(folded).double()
    assert "_folded_cache" not in double.big.__dict__
    with torch.no_grad():
        assert double.big._folded_parameters(double.bn_big)[0].dtype == torch.float64
        assert_close_rel(double(x.double()), model.double()(x.double()), 1e-12)
    assert "_folded_cache" not in pickle.loads(pickle.dumps(folded)).big.__dict__


def test_frozen_convs_train_with_kept_weights():
    """A partly frozen backbone (requires_grad=False convs, as detection fine-tuning does):
    the frozen convs reuse their scaled weights across training steps, the others get
    exact gradients."""
    model = frozen(tvm.resnet18())
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith(("conv1", "layer1")))
    folded = fuse(fold_frozen_bn(model, "training", policy="all"))
    x = SMALL
    run(folded, x)
    def kept_weight(conv):  # what the conv's last call used, as kept between calls
        return conv.__dict__["_folded_cache"][-1][0]

    kept = kept_weight(folded.conv1)
    assert "_folded_cache" not in folded.layer2[0].conv1.__dict__
    run(folded, x)
    assert kept_weight(folded.conv1) is kept
    check_close(model, folded, x)
