"""fuse(): frozen BN -> [add ->] activation chains computed by one fused call.

Each model gets random BatchNorm statistics, is converted (convert_frozen_bn) and put in
train mode with dropout off; the fused model must give the unfused one's output, input
gradient and parameter gradients (bit for bit for ReLU/identity models, in float32 and
bfloat16; SiLU within an ulp), with the same modules (classes included) and state dict,
and the counts of fused sites are checked against the architecture.
"""
from __future__ import annotations

import copy
import re
from typing import Any, Dict, List, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from frozennorm import (FrozenBatchNorm2d, FrozenBatchNormAct2d, convert_frozen_bn,
                        revert_frozen_bn, fuse)
from frozennorm.fuse import FusedForward, unfuse

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
    return train_without_dropout(convert_frozen_bn(model, trainable_affine=False, strict=True))


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


def fused_forwards(model: nn.Module) -> List[str]:
    """Names of the modules that run a forward fuse() rewrote."""
    return [n for n, m in model.named_modules() if isinstance(m.__dict__.get("forward"), FusedForward)]


def check_same(model: nn.Module, fused: nn.Module, *inputs: Tensor, rtol: float = 0.0) -> None:
    """Same modules (names and classes), state dict keys and values; same outputs and
    gradients (equal when rtol is 0)."""
    assert [(n, type(m)) for n, m in fused.named_modules()] == [
        (n, type(m)) for n, m in model.named_modules()]
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
    # the stem (the model's own forward) and every block run a rewritten forward; the
    # BatchNorm layers stay what they were, the shared self.relu serves its other calls
    assert fused_forwards(fused) == [""] + [n for n, m in fused.named_modules()
                                            if type(m).__name__ in ("BasicBlock", "Bottleneck")]
    assert type(fused) is type(model) and type(fused.get_submodule(tails[0])) is FrozenBatchNorm2d
    assert type(fused.layer1[0].relu) is nn.ReLU
    assert fused_forwards(model) == []  # the original is untouched
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
             for s in rep.unfused if "goes to" in s.reason and "the output" not in s.reason]
    assert nn.Hardswish in after and nn.ReLU not in after
    check_same(model, fused, SMALL)


def test_detection_model():
    """The detector's own forward does not trace: what its modules' forwards call is fused."""
    det = randomize_norm_stats_(tvm.detection.fasterrcnn_resnet50_fpn(**DET), seed=0)
    det = convert_frozen_bn(det, trainable_affine=False, strict=True)
    fused, rep = fuse(det, report=True)
    assert rep.untraced == [] and fused_forwards(fused)[0] == "backbone.body"
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
    # FrozenBatchNormAct2d(SiLU) runs its SiLU in its own pass already; bn3 (a
    # FrozenBatchNormAct2d without act) -> drop_path -> + shortcut fuses
    assert sum("runs its own SiLU" in s.reason for s in rep.unfused) == n_act == 33
    assert rep.count() == rep.count(activation="identity", residual=True) == 9
    check_same(model, fused, SMALL)


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
    # a module called at two places is fused at each call that can be (the module itself
    # does not change): shared(x) takes shared(r) as its residual
    assert got == {"bn1": ("relu", False), "bn2": ("relu", False), "bn3": ("relu", False),
                   "bn4": ("silu", False), "bn5": ("relu6", True), "bn6": ("relu", True),
                   "bn7": ("identity", True), "bn9": ("relu", True),
                   "shared": ("identity", True)}
    reasons = {s.name: s.reason for s in rep.unfused}
    assert set(reasons) == {"bn8", "shared", "hooked", "bn10", "bn11"}
    assert "2 users" in reasons["bn8"] and reasons["shared"] == "it is the residual of shared"
    assert "hooks" in reasons["hooked"] and "goes to mul" in reasons["bn11"]
    x, r = torch.randn(2, 4, 5, 5) * 8, torch.randn(2, 4, 5, 5)
    with torch.no_grad():  # ReLU6's input reaches past both of its kinks
        pre = r + model.bn5(x)
    assert (pre > 6).any() and (pre < 0).any() and ((pre > 0) & (pre < 6)).any()
    check_same(model, fused, x, r)


def test_fuse_twice_changes_nothing():
    model = frozen(tvm.resnet18())
    once, rep1 = fuse(model, report=True)
    twice, rep2 = fuse(once, report=True)
    assert rep2 == rep1 and fused_forwards(twice) == fused_forwards(once)
    check_same(once, twice, SMALL)
    check_same(model, twice, SMALL)


# --------------------------------------------------------------------------------------
# Untraceable modules, inplace=
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


def test_untraceable_forward_is_reported_and_the_rest_fused():
    model = frozen(Net())
    fused, rep = fuse(model, report=True)
    # Net's forward goes through its Sequential children; DataDependent's does not trace
    assert fused_names(rep) == ["stem.1", "head.1"] and fused_forwards(fused) == [""]
    assert [(e.path, e.module_type) for e in rep.untraced] == [("body.1", "DataDependent")]
    assert "'body.1' (DataDependent)" in str(rep.untraced[0]) and "TraceError" in str(
        rep.untraced[0])
    assert [(s.name, s.reason) for s in rep.unfused] == [
        ("body.1.bn", "called from a forward that does not trace")]
    check_same(model, fused, torch.randn(2, 4, 3, 3))


def test_inplace():
    model = frozen(Net())
    params = list(model.parameters())
    fused = fuse(model, inplace=True)
    assert fused is model and fused_forwards(model) == [""]
    assert all(p is q for p, q in zip(model.parameters(), params))
    untouched = frozen(Net())
    copy_ = fuse(untouched)
    assert fused_forwards(untouched) == [] and fused_forwards(copy_) == [""]
    assert all(p is not q for p, q in zip(copy_.parameters(), untouched.parameters()))


class Routed(nn.Module):
    """A framework's layer: attributes its parent routes by (Ultralytics' f, i, type), a
    forward that calls conv -> bn -> act, and a second forward the framework switches to
    after folding bn into conv itself."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = FrozenBatchNorm2d(8)
        self.act = nn.SiLU()
        self.f, self.i, self.type = -1, 0, "Routed"

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))

    def forward_fuse(self, x):
        return self.act(self.conv(x))


class RoutedModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Routed(), Routed()])
        self.layers[1].conv = nn.Conv2d(8, 8, 3, padding=1)
        self.layers[1].f, self.layers[1].i = 0, 1

    def forward(self, x):
        outs = []
        for m in self.layers:  # routing by attribute: fx cannot trace this forward
            x = (outs[m.f] if m.f != -1 else x) if outs else x
            x = m(x)
            outs.append(x)
        if x.sum() > 1e9:
            x = x * 2
        return x


def duck_fuse(model: nn.Module) -> nn.Module:
    """A framework's conv+BN fuser of the Ultralytics kind: every module with ``conv`` and
    ``bn`` gets ``bn`` folded into ``conv`` in place (by attribute names), loses ``bn`` and
    runs ``forward_fuse``."""
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    for m in model.modules():
        if hasattr(m, "conv") and hasattr(m, "bn") and hasattr(m, "forward_fuse"):
            bn = m.bn
            m.conv.weight, m.conv.bias = fuse_conv_bn_weights(
                m.conv.weight, m.conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight,
                bn.bias)
            delattr(m, "bn")
            m.forward = m.forward_fuse
    return model


def test_frameworks_routing_forward_and_fuser_keep_working():
    model = frozen(RoutedModel())
    x = torch.randn(2, 3, 8, 8)
    fused, rep = fuse(model, report=True)
    assert fused_names(rep, "silu") == ["layers.0.bn", "layers.1.bn"]
    assert [(e.path, e.module_type) for e in rep.untraced] == []
    assert fused_forwards(fused) == ["layers.0", "layers.1"]
    assert [(m.f, m.i, m.type) for m in fused.layers] == [(-1, 0, "Routed"), (0, 1, "Routed")]
    check_same(model, fused, x, rtol=1e-6)  # SiLU
    # the framework's own fuser: the BatchNorm is a plain frozen BatchNorm it folds, its
    # forward_fuse replaces the rewritten forward
    with torch.no_grad():
        expected = model.eval()(x)
        for m in (duck_fuse(copy.deepcopy(model)), duck_fuse(copy.deepcopy(fused).eval())):
            assert_close_rel(m(x), expected, 1e-5)
            assert fused_forwards(m) == []


def test_script_trace_export_of_a_fused_model():
    model = frozen(tvm.resnet18()).eval()
    fused = fuse(model)
    x = SMALL
    with torch.no_grad():
        ref = model(x)
        # TorchScript compiles class forwards: it refuses the ones on instances, saying what
        # to do, and scripts the same model unfused
        with pytest.raises(TypeError, match="before fusing"):
            torch.jit.script(fused)
        assert fused_forwards(fused) == fused_forwards(fuse(model))  # (left as it was)
        torch.testing.assert_close(torch.jit.script(unfuse(copy.deepcopy(fused)))(x), ref,
                                   rtol=0, atol=0)
        traced = torch.jit.trace(fused, x)  # the rewritten forwards, as called
        torch.testing.assert_close(traced(x), ref, rtol=0, atol=0)
        assert "frozen_bn_act" in str(traced.inlined_graph)
        # torch.fx sees the classes' forwards too (what create_feature_extractor traces)
        torch.testing.assert_close(torch.fx.symbolic_trace(fused)(x), ref, rtol=0, atol=0)


def test_revert_after_fuse():
    model = frozen(tvm.resnet18())
    fused = fuse(model)
    reverted = revert_frozen_bn(copy.deepcopy(fused))
    # the forwards that called the reverted layers fused are gone: the live model runs
    assert fused_forwards(reverted) == []
    assert isinstance(reverted.layer1[0].bn1, nn.BatchNorm2d)
    reverted.eval()
    with torch.no_grad():
        assert_close_rel(reverted(SMALL), model.eval()(SMALL), 1e-6)
    # partial revert: only the forwards that call a reverted layer
    part = revert_frozen_bn(copy.deepcopy(fused), include="layer4")
    assert fused_forwards(part) == [n for n in fused_forwards(fused) if not n.startswith("layer4")]
    assert unfuse(part) is part and fused_forwards(part) == []


def test_fused_model_loads_state_dicts_deepcopies_and_pickles():
    import io
    import pickle

    model = frozen(tvm.resnet18())
    fused = fuse(model)
    other = frozen(tvm.resnet18(), seed=3)
    fused.load_state_dict(other.state_dict(), strict=True)
    buf = io.BytesIO()
    torch.save(fused, buf)
    buf.seek(0)
    for clone in (copy.deepcopy(fused), pickle.loads(pickle.dumps(fused)),
                  torch.load(buf, weights_only=False)):
        assert fused_forwards(clone) == fused_forwards(fused)
        assert clone.layer1[0].forward.module is clone.layer1[0]  # not the original's
        assert list(clone.state_dict()) == list(other.state_dict())
        check_same(other, clone, SMALL)


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
    # ResNet-18: 9 BN -> ReLU (stem + each block's first) and 8 tails fuse, the 3 downsample
    # BNs are residuals; 20 conv -> BN pairs fold
    assert "folded 20 conv -> frozen BatchNorm pair(s) (training)" in out.stdout
    assert "9 x bn -> relu" in out.stdout and "8 x bn + add -> relu" in out.stdout
    diffs = [float(d) for d in re.findall(r"max difference ([0-9.e+-]+)", out.stdout)]
    assert len(diffs) == 3 and diffs[0] == 0.0 and all(d < 1e-5 for d in diffs), out.stdout


class _AddThenAct(nn.Module):
    """bn(x) combined with ``t`` by one of the adds fuse() takes over, then a ReLU."""

    def __init__(self, how: str):
        super().__init__()
        self.bn, self.relu, self.how = nn.BatchNorm2d(4), nn.ReLU(), how

    def forward(self, x: Tensor, t: Any) -> Tensor:
        y = self.bn(x)
        if self.how == "+":
            y = y + t
        elif self.how == "+r":
            y = t + y
        elif self.how == "+=":
            y += t
        elif self.how == "add_":
            y = y.add_(t)
        else:
            y = torch.add(y, t)
        return self.relu(y)


OTHER_OPERANDS = {
    "same": lambda x: torch.randn(x.shape, dtype=x.dtype),
    "per-channel": lambda x: torch.randn(2, 4, 1, 1, dtype=x.dtype),
    "per-column": lambda x: torch.randn(5, dtype=x.dtype),
    "0-d": lambda x: torch.tensor(0.75, dtype=x.dtype),
    "float32": lambda x: torch.randn(x.shape),
    "float64 per-channel": lambda x: torch.randn(1, 4, 1, 1, dtype=torch.float64),
    "number": lambda x: 0.5,
    "larger": lambda x: torch.randn((3,) + tuple(x.shape), dtype=x.dtype),
}


@pytest.mark.parametrize("how", ["+", "+r", "+=", "add_", "torch.add"])
@pytest.mark.parametrize("other", list(OTHER_OPERANDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_add_broadcasts_and_promotes_like_the_original(how, other, dtype):
    """Whatever the other operand of a fused add (broadcast, promoted, a number), the fused
    forward computes what the module's own forward does — values, dtype, gradients — and
    raises where it raises (an in-place add that would have to grow its output)."""
    model = frozen(_AddThenAct(how))
    fused, rep = fuse(model, report=True)
    assert rep.count(residual=True) == 1, rep
    x = torch.randn(2, 4, 5, 5, dtype=dtype) * 3
    t = OTHER_OPERANDS[other](x)
    inputs = [x.detach().requires_grad_()]
    if isinstance(t, Tensor):
        inputs.append(t.detach().requires_grad_())
    try:
        expected = model(inputs[0] * 1, inputs[1] * 1 if len(inputs) > 1 else t)
    except RuntimeError as e:
        with pytest.raises(RuntimeError, match=re.escape(str(e).split("\n")[0])):
            fused(inputs[0] * 1, inputs[1] * 1 if len(inputs) > 1 else t)
        return
    expected_grads = torch.autograd.grad(expected.float().square().sum(), inputs)
    got = fused(inputs[0] * 1, inputs[1] * 1 if len(inputs) > 1 else t)
    got_grads = torch.autograd.grad(got.float().square().sum(), inputs)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert torch.equal(got, expected)
    for g, e in zip(got_grads, expected_grads):
        assert g.dtype == e.dtype and torch.equal(g, e)
