"""fuse(): frozen BN -> [add ->] activation chains rewritten to FusedFrozenBatchNorm.

Each model gets random BatchNorm statistics, is converted (convert_frozen_bn) and put in
train mode with dropout off; the fused model must give the unfused one's output, input
gradient and parameter gradients (bit for bit for ReLU/identity models, in float32 and
bfloat16; SiLU within an ulp), with the same state dict keys, and the counts of fused sites
are checked against the architecture.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, List, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from frozennorm import (FrozenBatchNorm2d, FrozenBatchNormAct2d, FusedFrozenBatchNorm,
                        UntraceableError, convert_frozen_bn, fuse)

from model_helpers import assert_close_rel, randomize_norm_stats_, train_without_dropout

tvm = pytest.importorskip("torchvision.models")

IMAGE = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
SMALL = IMAGE[:1, :, :32, :32]
DET = dict(weights=None, weights_backbone=None, num_classes=5, min_size=128, max_size=160)


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)  # the models' initial weights


def frozen(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` with random statistics, converted, in train mode without dropout."""
    randomize_norm_stats_(model, seed=seed)
    return train_without_dropout(convert_frozen_bn(model, strict=True))


def tensors(out: Any) -> List[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        return list(out.values())
    return list(out)


def run(model: nn.Module, *inputs: Tensor) -> Tuple[List[Tensor], List[Tensor], Dict[str, Tensor]]:
    """Outputs, input gradients and parameter gradients of a random projection of the output."""
    inputs = tuple(x.detach().clone().requires_grad_() for x in inputs)
    model.zero_grad(set_to_none=True)
    outs = tensors(model(*inputs))
    g = torch.Generator().manual_seed(1)
    loss = sum((o * torch.randn(o.shape, generator=g).to(o.dtype)).float().sum() for o in outs)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return [o.detach() for o in outs], [x.grad for x in inputs], grads


def check_same(model: nn.Module, fused: nn.Module, *inputs: Tensor, rtol: float = 0.0) -> None:
    """Same state dict keys and values; same outputs and gradients (equal when rtol is 0)."""
    sd, fused_sd = model.state_dict(), fused.state_dict()
    assert list(fused_sd) == list(sd)
    assert all(torch.equal(fused_sd[k], v) for k, v in sd.items())
    (out, grads, params), (out_f, grads_f, params_f) = run(model, *inputs), run(fused, *inputs)
    assert list(params_f) == list(params)
    for what, expected, got in (("output", out, out_f), ("input grad", grads, grads_f),
                                ("param grad", list(params.values()), list(params_f.values()))):
        for i, (e, a) in enumerate(zip(expected, got)):
            if rtol == 0.0:
                assert torch.equal(a, e), f"{what} {i}: max diff {(a - e).abs().max()}"
            else:
                assert_close_rel(a, e, rtol, f"{what} {i}")


def fused_names(rep, activation=None, residual=None) -> List[str]:
    return [s.name for s in rep.fused if (activation is None or s.activation == activation)
            and (residual is None or s.residual == residual)]


# --------------------------------------------------------------------------------------
# torchvision
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, dtype, n_relu, n_tail", [
    ("resnet18", torch.float32, 9, 8),
    ("resnet18", torch.bfloat16, 9, 8),
    ("resnet50", torch.float32, 33, 16),
])
def test_torchvision_resnet(name, dtype, n_relu, n_tail):
    model = frozen(getattr(tvm, name)()).to(dtype)
    fused, rep = fuse(model, report=True)
    # every bn followed by relu, and the bottleneck/basic-block tails bn -> add -> relu
    assert rep.count(activation="relu", residual=False) == n_relu
    assert rep.count(activation="relu", residual=True) == n_tail
    assert rep.count() == n_relu + n_tail
    tails = fused_names(rep, residual=True)
    assert tails[0] == ("layer1.0.bn3" if name == "resnet50" else "layer1.0.bn2")
    # the downsample BNs are the residuals of the tails: left as they are
    assert [s.reason.split(" of ")[0] for s in rep.unfused] == ["it is the residual"] * len(
        rep.unfused)
    assert all(s.name.endswith("downsample.1") for s in rep.unfused)
    assert isinstance(fused, torch.fx.GraphModule)
    assert isinstance(fused.get_submodule(tails[0]), FusedFrozenBatchNorm)
    # the original is untouched; the shared self.relu still serves its other call sites
    assert type(model.get_submodule(tails[0])) is FrozenBatchNorm2d
    assert type(fused.layer1[0].relu) is nn.ReLU
    check_same(model, fused, (IMAGE if name == "resnet18" else SMALL).to(dtype))


def test_resnext():
    model = frozen(tvm.resnext50_32x4d())
    fused, rep = fuse(model, report=True)
    assert (rep.count(residual=False), rep.count(residual=True)) == (33, 16)
    check_same(model, fused, SMALL)


def test_mobilenet_v3_fuses_only_supported_activations():
    model = frozen(tvm.mobilenet_v3_small())
    fused, rep = fuse(model, report=True)
    # ReLU blocks fuse; the inverted residuals' bn -> += input fuse as identity + residual
    assert rep.count(activation="relu") == 5
    assert rep.count(activation="identity", residual=True) == 6
    after = [type(fused.get_submodule(s.reason.split()[-1]))
             for s in rep.unfused if "goes to" in s.reason]
    assert nn.Hardswish in after and nn.ReLU not in after
    check_same(model, fused, SMALL)


def test_detection_backbone_body():
    det = convert_frozen_bn(tvm.detection.fasterrcnn_resnet50_fpn(**DET), strict=True)
    randomize_norm_stats_(det, seed=0)
    with pytest.raises(UntraceableError) as info:
        fuse(det)
    err = info.value
    assert (err.path, err.module_type, err.suggestions) == ("", "FasterRCNN", ["backbone"])
    assert "submodule=['backbone']" in str(err)

    fused, rep = fuse(det, submodule="backbone.body", report=True)
    assert type(fused) is type(det) and isinstance(fused.backbone.body, torch.fx.GraphModule)
    assert (rep.count(residual=False), rep.count(residual=True)) == (33, 16)
    assert rep.fused[0].name == "backbone.body.bn1"
    check_same(det.backbone.train(), fused.backbone.train(), IMAGE[:1])
    # the whole detector still runs, with the same detections
    det.eval(), fused.eval()
    with torch.no_grad():
        expected, got = det([IMAGE[0]])[0], fused([IMAGE[0]])[0]
    assert all(torch.equal(got[k], v) for k, v in expected.items())


# --------------------------------------------------------------------------------------
# timm
# --------------------------------------------------------------------------------------

def test_timm_resnet():
    timm = pytest.importorskip("timm")
    model = frozen(timm.create_model("resnet18"))
    fused, rep = fuse(model, report=True)
    # bn1 -> drop_block (an nn.Identity) -> act1 fuses over the identity
    assert (rep.count(residual=False), rep.count(residual=True)) == (9, 8)
    assert next(s for s in rep.fused if s.name == "layer1.0.bn1").removed == (
        "layer1.0.drop_block", "layer1.0.act1")
    check_same(model, fused, SMALL)


def test_timm_efficientnet_batchnorm_act():
    timm = pytest.importorskip("timm")
    model = frozen(timm.create_model("efficientnet_b0"))
    n_act = sum(isinstance(m, FrozenBatchNormAct2d) and isinstance(m.act, nn.SiLU)
                for m in model.modules())
    fused, rep = fuse(model, report=True)
    # FrozenBatchNormAct2d(SiLU) -> fused SiLU; bn3 (no act) -> drop_path -> + shortcut
    assert rep.count(activation="silu") == n_act == 33
    assert rep.count(activation="identity", residual=True) == 9
    assert not any(type(m) is FrozenBatchNormAct2d and isinstance(m.act, nn.SiLU)
                   for m in fused.modules())
    check_same(model, fused, SMALL, rtol=1e-5)  # SiLU: within an ulp, not bit for bit


# --------------------------------------------------------------------------------------
# Patterns
# --------------------------------------------------------------------------------------

class Patterns(nn.Module):
    def __init__(self):
        super().__init__()
        for i in range(1, 12):
            setattr(self, f"bn{i}", FrozenBatchNorm2d(4))
        self.relu6 = nn.ReLU6(inplace=True)
        self.drop = nn.Identity()
        self.shared = FrozenBatchNorm2d(4)
        self.hooked = FrozenBatchNorm2d(4)
        self.hooked.register_forward_hook(lambda m, i, o: None)
        # state the graph does not use, and tensors that are not state: the state dict and
        # the module tree stay as they are
        self.unused = nn.Linear(2, 2)
        self.register_buffer("step", torch.zeros(()), persistent=False)
        self.plain = torch.ones(())

    def forward(self, x, r):
        a = F.relu(self.bn1(x))
        b = torch.relu_(self.bn2(x))
        c = self.bn3(x).relu()
        d = F.silu(self.bn4(x), inplace=True)
        e = self.relu6(torch.add(r, self.bn5(x)))  # residual first
        f = self.bn6(x)
        f += r
        f = F.relu(f)
        g = self.bn7(x).add(r)  # no activation: identity + residual
        h = self.bn8(x)
        h = F.relu(h) + h  # two users
        s = self.shared(x) + self.shared(r)
        k = F.relu(self.hooked(x))
        m = F.relu(self.drop(self.bn9(x) + r))
        r2 = r.clone()
        n = F.relu(r2.add_(self.bn10(x)))  # writes to r2: not fused
        o = F.relu(self.bn11(x) * 2)
        return a + b + c + d + e + f + g + h + s + k + m + n + o * self.plain + self.step


def test_patterns():
    model = frozen(Patterns())
    fused, rep = fuse(model, report=True)
    got = {s.name: (s.activation, s.residual) for s in rep.fused}
    assert got == {"bn1": ("relu", False), "bn2": ("relu", False), "bn3": ("relu", False),
                   "bn4": ("silu", False), "bn5": ("relu6", True), "bn6": ("relu", True),
                   "bn7": ("identity", True), "bn9": ("relu", True)}
    reasons = {s.name: s.reason for s in rep.unfused}
    assert set(reasons) == {"bn8", "shared", "hooked", "bn10", "bn11"}
    assert "2 users" in reasons["bn8"] and "2 places" in reasons["shared"]
    assert "hooks" in reasons["hooked"]
    assert [n for n, _ in fused.named_modules()] == [n for n, _ in model.named_modules()]
    x, r = torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5)
    check_same(model, fused, x, r)


def test_fuse_twice_changes_nothing():
    model = frozen(tvm.resnet18())
    once = fuse(model)
    twice, rep = fuse(once, report=True)
    assert rep.count() == 0
    assert {s.reason for s in rep.unfused if "downsample" not in s.name} == {
        "already fused with relu"}
    check_same(once, twice, SMALL)


# --------------------------------------------------------------------------------------
# Untraceable modules, submodule=, inplace=
# --------------------------------------------------------------------------------------

class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = FrozenBatchNorm2d(4)

    def forward(self, x):
        if x.sum() > 0:  # control flow on a value: fx cannot trace it
            x = -x
        return F.relu(self.bn(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(4, 4, 1), FrozenBatchNorm2d(4), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(4, 4, 1), DataDependent())
        self.head = nn.Sequential(nn.Conv2d(4, 4, 1), FrozenBatchNorm2d(4), nn.ReLU())

    def forward(self, x):
        return self.head(self.body(self.stem(x)))


def test_untraceable_error_names_the_module():
    model = frozen(Net())
    with pytest.raises(UntraceableError) as info:
        fuse(model)
    err = info.value
    assert (err.path, err.module_type) == ("body.1", "DataDependent")
    assert err.suggestions == ["stem", "head"]
    assert "leaf_modules=['body.1']" in str(err) and "submodule=['stem', 'head']" in str(err)
    with pytest.raises(UntraceableError) as info:
        fuse(model, submodule="body")
    assert (info.value.path, info.value.suggestions) == ("body.1", [])

    x = torch.randn(2, 4, 3, 3)
    for kwargs, sites in (({"submodule": ["stem", "head"]}, ["stem.1", "head.1"]),
                          ({"leaf_modules": ["body.1"]}, ["stem.1", "head.1"]),
                          ({"leaf_modules": [DataDependent]}, ["stem.1", "head.1"])):
        fused, rep = fuse(model, report=True, **kwargs)
        assert fused_names(rep) == sites
        check_same(model, fused, x)


def test_inplace():
    model = frozen(Net())
    params = list(model.parameters())
    fused = fuse(model, submodule="head", inplace=True)
    assert fused is model and isinstance(model.head, torch.fx.GraphModule)
    assert isinstance(model.head.get_submodule("1"), FusedFrozenBatchNorm)
    assert all(p is q for p, q in zip(model.parameters(), params))
    untouched = frozen(Net())
    copy_ = fuse(untouched, submodule="stem")
    assert type(untouched.stem) is nn.Sequential and type(untouched.stem[1]) is FrozenBatchNorm2d
    assert all(p is not q for p, q in zip(copy_.parameters(), untouched.parameters()))


def test_fused_model_loads_state_dicts_and_deepcopies():
    model = frozen(tvm.resnet18())
    fused = fuse(model)
    other = frozen(tvm.resnet18(), seed=3)
    fused.load_state_dict(other.state_dict(), strict=True)
    copied = copy.deepcopy(fused)
    assert list(copied.state_dict()) == list(other.state_dict())
    check_same(other, copied, SMALL)


def test_fuse_and_fold_example_runs():
    """examples/fuse_and_fold.py (the README's example) runs and reports tiny differences."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "fuse_and_fold.py"
    out = subprocess.run([sys.executable, str(script), "--model", "resnet18", "--batch-size", "2",
                          "--image-size", "64"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    # ResNet-18: 20 conv -> BN pairs; 9 BN -> ReLU (stem + each block's first) and 8 tails
    # are left to fuse, the 3 downsample BNs are folded
    assert "folded 3 conv -> frozen BatchNorm pair(s) (training)" in out.stdout
    assert "9 x bn -> relu" in out.stdout and "8 x bn + add -> relu" in out.stdout
    diffs = [float(d) for d in re.findall(r"max difference ([0-9.e+-]+)", out.stdout)]
    assert len(diffs) == 2 and all(d < 1e-5 for d in diffs), out.stdout
