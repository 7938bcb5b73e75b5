"""convert_frozen_bn / revert_frozen_bn on small models: what is converted, into what, with
which numbers; scope; what is skipped and why; the inverse.

"""
from __future__ import annotations

import copy
import io
import pickle
import sys
import types
import warnings


import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import frozennorm
from frozennorm import (FrozenBatchNorm, FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d,
                        FrozenBatchNormAct2d, FrozenNormWarning, convert_frozen_bn,
                        revert_frozen_bn)
from frozennorm.convert import ConversionReport, SkipReason


from model_helpers import assert_close_rel, randomize_norm_stats_


def stats_of(model: nn.Module) -> dict:
    """Copies of every floating buffer (the statistics) and parameter, by name."""
    out = {f"buffer:{k}": v.detach().clone() for k, v in model.named_buffers()}
    out.update({f"param:{k}": v.detach().clone() for k, v in model.named_parameters()})
    return out


def norm_layers(model: nn.Module):
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, (_BatchNorm, FrozenBatchNorm)) or "FrozenBatchNorm" in type(m).__name__]


# --------------------------------------------------------------------------------------
# A small model with every torch BatchNorm
# --------------------------------------------------------------------------------------

class Zoo(nn.Module):
    """Conv2d/BN2d, Conv3d/BN3d, Linear/BN1d and SyncBatchNorm fed 4-D input."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.sync = nn.SyncBatchNorm(8)
        self.video = nn.Sequential(nn.Conv3d(8, 4, 1), nn.BatchNorm3d(4, eps=1e-3))
        self.head = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6, momentum=None),
                                  nn.Linear(6, 5), nn.BatchNorm1d(5, affine=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.sync(self.stem(x))
        v = self.video(x.unsqueeze(2).repeat(1, 1, 2, 1, 1))
        return self.head(v.mean((2, 3, 4)))


def zoo(seed: int = 0) -> Zoo:
    torch.manual_seed(seed)
    return randomize_norm_stats_(Zoo(), seed)


X = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(1))


def test_every_torch_batchnorm_is_converted_to_its_frozen_twin():
    model = zoo()
    ref = copy.deepcopy(model).eval()
    converted, rep = convert_frozen_bn(model, report=True)
    assert converted is model
    assert type(model.stem[1]) is FrozenBatchNorm2d
    assert type(model.sync) is FrozenBatchNorm  # any rank, as SyncBatchNorm
    assert type(model.video[1]) is FrozenBatchNorm3d and model.video[1].eps == 1e-3
    assert type(model.head[1]) is FrozenBatchNorm1d and type(model.head[3]) is FrozenBatchNorm1d
    assert [r.name for r in rep.converted] == ["stem.1", "sync", "video.1", "head.1", "head.3"]
    assert rep.converted[1].source is nn.SyncBatchNorm and rep.converted[1].target is FrozenBatchNorm
    assert rep.skipped == [] and rep.problems == []
    # in train mode, the original's eval-mode output; the statistics do not move
    before = stats_of(model)
    model.train()
    y = model(X)
    assert_close_rel(y, ref(X), rtol=1e-5)
    for k, v in stats_of(model).items():
        assert torch.equal(v, before[k]), k


def test_affine_false_gives_weight_one_bias_zero():
    model = zoo()
    frozen = convert_frozen_bn(model).head[3]
    assert torch.equal(frozen.weight, torch.ones(5)) and torch.equal(frozen.bias, torch.zeros(5))


def test_statistics_are_copied_not_aliased_and_dtype_device_kept():
    bn = randomize_norm_stats_(nn.BatchNorm2d(4)).double()
    ref = copy.deepcopy(bn)
    frozen = convert_frozen_bn(bn)
    assert isinstance(frozen, FrozenBatchNorm2d)
    for name in ("running_mean", "running_var", "weight", "bias"):
        t = getattr(frozen, name)
        assert t.dtype == torch.float64 and t.device == ref.running_mean.device
        assert t.data_ptr() != getattr(bn, name).data_ptr()
        assert torch.equal(t, getattr(ref, name))
    frozen.running_mean.add_(1)
    assert torch.equal(bn.running_mean, ref.running_mean)


def test_root_batchnorm_returns_the_frozen_module():
    bn = randomize_norm_stats_(nn.BatchNorm1d(3))
    out, rep = convert_frozen_bn(bn, report=True)
    assert isinstance(out, FrozenBatchNorm1d) and out is not bn
    assert rep.converted[0].name == ""
    x = torch.randn(5, 3)
    assert_close_rel(out(x), bn.eval()(x), rtol=1e-6)


def test_idempotent():
    model = convert_frozen_bn(zoo())
    modules = list(model.modules())
    state = copy.deepcopy(model.state_dict())
    again, rep = convert_frozen_bn(model, report=True)
    assert again is model and list(model.modules()) == modules
    assert rep.converted == [] and rep.skipped == []
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


def test_train_cannot_unfreeze_and_optimizer_steps_change_no_statistic():
    model = convert_frozen_bn(zoo())
    norm_buffers = {n: {k: v.clone() for k, v in m.named_buffers()} for n, m in norm_layers(model)}
    assert all(not list(m.parameters()) for _, m in norm_layers(model))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    for _ in range(3):
        model.train()
        model.apply(lambda m: m.train())  # everything, explicitly
        opt.zero_grad()
        model(X).square().mean().backward()
        opt.step()
    for n, m in norm_layers(model):
        for k, v in m.named_buffers():
            assert torch.equal(v, norm_buffers[n][k]), f"{n}.{k}"
    frozennorm.assert_frozen(model)


def test_convert_sync_batchnorm_leaves_frozen_layers_alone():
    model = convert_frozen_bn(zoo(), exclude="head")
    frozen = [m for _, m in norm_layers(model) if isinstance(m, FrozenBatchNorm)]
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert all(any(m is f for m in synced.modules()) for f in frozen)
    assert type(synced.head[1]) is nn.SyncBatchNorm  # the live ones are converted


def test_state_dict_stays_batchnorm_compatible():
    original = zoo()
    model = convert_frozen_bn(copy.deepcopy(original))
    keys = {k for k in original.state_dict() if not k.endswith("num_batches_tracked")}
    # the affine=False layer (head.3) gains the weight 1 / bias 0 it computes with
    assert set(model.state_dict()) == keys | {"head.3.weight", "head.3.bias"}
    fresh = convert_frozen_bn(Zoo())
    result = fresh.load_state_dict(original.state_dict(), strict=True)  # a BN checkpoint
    assert result.unexpected_keys == [] and result.missing_keys == []
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_serialisation_keeps_the_origin_record():
    model = convert_frozen_bn(zoo())
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model)),
                  torch.load(buf, weights_only=False)):
        assert type(revert_frozen_bn(clone).sync) is nn.SyncBatchNorm


# --------------------------------------------------------------------------------------
# Skipped layers: never a silent change
# --------------------------------------------------------------------------------------

class SplitLikeBN(nn.BatchNorm2d):
    """A BatchNorm subclass with its own forward (adds one): must not be converted."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + 1


class InitOnlyBN(nn.BatchNorm2d):
    """Changes only the constructor: its forward is BatchNorm2d's, so it is converted."""

    def __init__(self, c: int) -> None:
        super().__init__(c, eps=1e-3)


class AnyRankBN(nn.BatchNorm2d):
    """Accepts any rank: converted to the any-rank FrozenBatchNorm."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        pass


def test_unknown_subclass_is_skipped_with_a_warning_naming_it():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), SplitLikeBN(4), InitOnlyBN(4), AnyRankBN(4))
    randomize_norm_stats_(model)
    with pytest.warns(FrozenNormWarning, match=r"1 BatchNorm layer.*\n  1 \(.*SplitLikeBN\): "
                                               r"unknown forward") as record:
        _, rep = convert_frozen_bn(model, report=True)
    assert record[0].filename == __file__  # points at the caller
    assert type(model[1]) is SplitLikeBN
    assert type(model[2]) is FrozenBatchNorm2d and model[2].eps == 1e-3
    assert type(model[3]) is FrozenBatchNorm
    assert [(r.name, r.reason) for r in rep.skipped] == [("1", SkipReason.UNKNOWN_FORWARD)]
    assert rep.problems == rep.skipped
    assert "classes={SplitLikeBN: FrozenBatchNorm2d}" in rep.skipped[0].detail


def test_instance_level_forward_override_is_unknown_too():
    bn = nn.BatchNorm2d(3)
    bn.forward = lambda x: x  # type: ignore[method-assign]
    with pytest.warns(FrozenNormWarning):
        assert convert_frozen_bn(nn.Sequential(bn))[0] is bn


def test_classes_argument_vouches_for_a_subclass():
    model = nn.Sequential(randomize_norm_stats_(SplitLikeBN(4)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert_frozen_bn(model, classes={SplitLikeBN: FrozenBatchNorm2d}, trainable_affine=False)
    assert type(model[0]) is FrozenBatchNorm2d
    with pytest.raises(TypeError, match="frozennorm FrozenBatchNorm class"):
        convert_frozen_bn(model, classes={SplitLikeBN: nn.BatchNorm2d})


def test_no_running_stats_warns_or_raises_with_strict():
    model = nn.Sequential(nn.BatchNorm2d(3), nn.BatchNorm2d(3, track_running_stats=False))
    bn0, bn1 = model
    with pytest.raises(ValueError, match=r"  1 \(torch.nn.BatchNorm2d\): no running statistics"):
        convert_frozen_bn(model, strict=True)
    assert model[0] is bn0 and model[1] is bn1  # strict: nothing changed
    with pytest.warns(FrozenNormWarning, match="track_running_stats=False"):
        _, rep = convert_frozen_bn(model, report=True)
    assert isinstance(model[0], FrozenBatchNorm2d) and model[1] is bn1
    assert rep.skipped[0].reason is SkipReason.NO_RUNNING_STATS


def test_uninitialized_lazy_batchnorm_is_skipped():
    model = nn.Sequential(nn.LazyBatchNorm2d())
    with pytest.warns(FrozenNormWarning, match="uninitialized"):
        convert_frozen_bn(model)
    model(torch.randn(2, 3, 4, 4))  # materialises it: now a BatchNorm2d
    assert isinstance(convert_frozen_bn(model)[0], FrozenBatchNorm2d)


def test_other_norms_are_untouched():
    model = nn.Sequential(nn.GroupNorm(2, 4), nn.InstanceNorm2d(4, track_running_stats=True),
                          nn.LayerNorm(4))
    mods = list(model)
    _, rep = convert_frozen_bn(model, report=True)
    assert list(model) == mods and rep.converted == [] and rep.skipped == []


def test_parametrized_weight_is_frozen_at_its_value():
    bn = randomize_norm_stats_(nn.BatchNorm2d(4))
    torch.nn.utils.parametrize.register_parametrization(bn, "weight", _Double())
    x = torch.randn(2, 4, 3, 3)
    ref = bn.eval()(x)
    frozen = convert_frozen_bn(nn.Sequential(bn))[0]
    assert isinstance(frozen, FrozenBatchNorm2d)
    assert_close_rel(frozen(x), ref, rtol=1e-6)


class _Double(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return 2 * w


def test_shared_layer_is_replaced_everywhere_by_one_module():
    bn = nn.BatchNorm2d(3)
    model = nn.Sequential(nn.Sequential(bn), nn.ModuleDict({"again": bn}))
    _, rep = convert_frozen_bn(model, report=True)
    assert model[0][0] is model[1]["again"] and isinstance(model[0][0], FrozenBatchNorm2d)
    assert len(rep.converted) == 1


def test_forward_hooks_move_with_the_layer():
    bn = nn.BatchNorm2d(3)
    seen = []
    handle = bn.register_forward_hook(lambda mod, inp, out: seen.append(type(mod).__name__))
    pre = bn.register_forward_pre_hook(lambda mod, inp: None)
    model = convert_frozen_bn(nn.Sequential(bn))
    model(torch.randn(1, 3, 2, 2))
    assert seen == ["FrozenBatchNorm2d"]
    handle.remove()
    pre.remove()
    model(torch.randn(1, 3, 2, 2))
    assert seen == ["FrozenBatchNorm2d"]


def test_training_flag_is_kept():
    model = nn.Sequential(nn.BatchNorm2d(3), nn.BatchNorm2d(3).eval())
    convert_frozen_bn(model)
    assert model[0].training and not model[1].training


# --------------------------------------------------------------------------------------
# Scope
# --------------------------------------------------------------------------------------

class Detector(nn.Module):
    def __init__(self) -> None:
        super().__init__()

        def stage(c: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c, c, 1), nn.BatchNorm2d(c))

        self.backbone = nn.Module()
        self.backbone.body = nn.ModuleDict({f"layer{i}": stage(4) for i in range(1, 5)})
        self.backbone.fpn = stage(4)
        self.head = stage(4)


def frozen_names(model: nn.Module):
    return sorted(n for n, m in model.named_modules() if isinstance(m, FrozenBatchNorm))


@pytest.mark.parametrize("kwargs,expected", [
    (dict(include="backbone.body"), [f"backbone.body.layer{i}.1" for i in range(1, 5)]),
    (dict(include="backbone.body.layer[34]*"), ["backbone.body.layer3.1", "backbone.body.layer4.1"]),
    (dict(include="backbone.body.layer[34]"), ["backbone.body.layer3.1", "backbone.body.layer4.1"]),
    (dict(exclude="head"), [f"backbone.body.layer{i}.1" for i in range(1, 5)] + ["backbone.fpn.1"]),
    (dict(include=["backbone.fpn", "head"]), ["backbone.fpn.1", "head.1"]),
    (dict(include="backbone", exclude=["*layer1*", "backbone.fpn"]),
     [f"backbone.body.layer{i}.1" for i in range(2, 5)]),
    (dict(predicate=lambda name, m: name.startswith("head")), ["head.1"]),
    (dict(include="*.1", predicate=lambda name, m: "layer" not in name), ["backbone.fpn.1", "head.1"]),
])
def test_scope(kwargs, expected):
    model = Detector()
    _, rep = convert_frozen_bn(model, report=True, **kwargs)
    assert frozen_names(model) == sorted(expected)
    assert sorted(r.name for r in rep.converted) == sorted(expected)
    assert all(r.reason is SkipReason.OUT_OF_SCOPE for r in rep.skipped)
    assert len(rep.converted) + len(rep.skipped) == 6


def test_scope_does_not_match_partial_names():
    model = Detector()
    model.headless = nn.Sequential(nn.BatchNorm2d(2))
    convert_frozen_bn(model, include="head")
    assert frozen_names(model) == ["head.1"]


def test_a_pattern_that_matches_nothing_warns_or_raises():
    model = Detector()
    with pytest.warns(FrozenNormWarning, match=r"patterns that match no module: \['backbone.bdy'\]"):
        _, rep = convert_frozen_bn(model, include="backbone.bdy", report=True)
    assert rep.unmatched_patterns == ["backbone.bdy"] and rep.converted == []
    with pytest.raises(ValueError, match="backbone.bdy"):
        convert_frozen_bn(Detector(), include="backbone.bdy", strict=True)


def test_out_of_scope_is_reported_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, rep = convert_frozen_bn(randomize_norm_stats_(Detector()), include="head",
                                   trainable_affine=False, report=True)
    assert len(rep.skipped) == 5
    text = str(rep)
    assert "converted 1 layer(s)" in text and "backbone.fpn.1 (torch.nn.BatchNorm2d): out of scope" in text


def test_report_type():
    _, rep = convert_frozen_bn(zoo(), report=True)
    assert isinstance(rep, ConversionReport)
    assert "5 x torch.nn.BatchNorm2d" not in str(rep)
    assert "1 x torch.nn.BatchNorm2d -> frozennorm.FrozenBatchNorm2d" in str(rep)


# --------------------------------------------------------------------------------------
# Other libraries' layers
# --------------------------------------------------------------------------------------

def _fake_class(module_name: str, name: str, base: type, body: dict) -> type:
    """A class that says it lives in ``module_name`` (detectron2 is not installed)."""
    mod = sys.modules.setdefault(module_name, types.ModuleType(module_name))
    cls = type(name, (base,), dict(body, __module__=module_name))
    setattr(mod, name, cls)
    return cls


def _buffers_frozen_bn(eps_attr: bool, hard_eps: float = 0.0) -> dict:
    def __init__(self, n: int, eps: float = 1e-5) -> None:
        nn.Module.__init__(self)
        if eps_attr:
            self.eps = eps
        for name, fill in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            self.register_buffer(name, torch.full((n,), fill))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = self.eps if eps_attr else hard_eps
        scale = self.weight * (self.running_var + eps).rsqrt()
        return x * scale.view(1, -1, 1, 1) + (self.bias - self.running_mean * scale).view(1, -1, 1, 1)

    return {"__init__": __init__, "forward": forward}


def test_torchvision_frozen_batchnorm_is_converted():
    misc = pytest.importorskip("torchvision.ops.misc")
    src = randomize_norm_stats_(misc.FrozenBatchNorm2d(6, eps=1e-3))
    out, rep = convert_frozen_bn(nn.Sequential(src), report=True)
    assert type(out[0]) is FrozenBatchNorm2d and out[0].eps == 1e-3
    x = torch.randn(2, 6, 4, 4)
    assert_close_rel(out[0](x), src(x), rtol=1e-5)
    back = revert_frozen_bn(out)[0]
    assert type(back) is nn.BatchNorm2d and torch.equal(back.running_var, src.running_var)
    assert back.momentum == 0.1 and back.eps == 1e-3


def test_detectron2_layers_are_recognised_without_detectron2():
    Frozen = _fake_class("detectron2.layers.batch_norm", "FrozenBatchNorm2d", nn.Module,
                         _buffers_frozen_bn(eps_attr=True))
    NaiveSync = _fake_class("detectron2.layers.batch_norm", "NaiveSyncBatchNorm", nn.BatchNorm2d,
                            {"forward": lambda self, x: nn.BatchNorm2d.forward(self, x)})
    model = randomize_norm_stats_(nn.Sequential(Frozen(4, eps=1e-4), NaiveSync(4)))
    x = torch.randn(2, 4, 3, 3)
    ref = copy.deepcopy(model).eval()(x)
    convert_frozen_bn(model)
    assert [type(m) for m in model] == [FrozenBatchNorm2d, FrozenBatchNorm2d]
    assert model[0].eps == 1e-4
    assert_close_rel(model.train()(x), ref, rtol=1e-5)


def test_lookalike_frozen_batchnorm_of_unknown_origin_is_left_alone():
    # DETR-style copies hard-code eps in forward: converting would change the output.
    Lookalike = _fake_class("my_detr.backbone", "FrozenBatchNorm2d", nn.Module,
                            _buffers_frozen_bn(eps_attr=False, hard_eps=1e-5))
    m = randomize_norm_stats_(Lookalike(3))
    with pytest.warns(FrozenNormWarning, match=r"left 1 frozen layer\(s\) of implementations it "
                      r"does not know.*classes=\{my_detr\.backbone\.FrozenBatchNorm2d: "
                      r"\(frozennorm\.FrozenBatchNorm2d, eps\)\}"):
        out, rep = convert_frozen_bn(nn.Sequential(m), strict=True, report=True)  # not live
    assert out[0] is m
    assert rep.skipped[0].reason is SkipReason.UNKNOWN_FROZEN and rep.problems == []
    # vouched for without its eps: an error naming the fix (never a silent eps of 0)
    with pytest.raises(ValueError, match=r"no eps attribute.*classes=\{FrozenBatchNorm2d: "
                       r"\(FrozenBatchNorm2d, eps\)\}"):
        convert_frozen_bn(nn.Sequential(m), classes={Lookalike: FrozenBatchNorm2d})
    out, rep = convert_frozen_bn(nn.Sequential(m), classes={Lookalike: (FrozenBatchNorm2d, 1e-5)},
                                 report=True)
    assert isinstance(out[0], FrozenBatchNorm2d) and out[0].eps == 1e-5
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(out[0](x), m(x))
    with pytest.raises(TypeError, match=r"a \(class, eps\) pair"):
        convert_frozen_bn(nn.Sequential(m), classes={Lookalike: (FrozenBatchNorm2d, "1e-5")})


class TestTimm:
    @pytest.fixture(autouse=True)
    def _timm(self):
        self.timm_layers = pytest.importorskip("timm.layers")

    def bn_act(self, act=None, drop=None) -> nn.Module:
        layers = self.timm_layers
        bn = layers.BatchNormAct2d(5, act_layer=nn.SiLU, drop_layer=drop)
        return randomize_norm_stats_(bn)

    def test_batchnorm_act_keeps_act_and_drop(self):
        bn = self.bn_act(drop=nn.Dropout)
        act, drop = bn.act, bn.drop
        x = torch.randn(2, 5, 3, 3)
        ref = copy.deepcopy(bn).eval()(x)
        frozen = convert_frozen_bn(bn)
        assert type(frozen) is FrozenBatchNormAct2d
        assert frozen.act is act and frozen.drop is drop  # moved, not copied
        frozen.train()
        frozen.drop.eval()
        assert_close_rel(frozen(x), ref, rtol=1e-5)

    def test_timm_state_dict_loads_strict(self):
        bn = self.bn_act()
        frozen = FrozenBatchNormAct2d(5, act=nn.SiLU())
        frozen.load_state_dict(bn.state_dict(), strict=True)
        x = torch.randn(2, 5, 3, 3)
        assert_close_rel(frozen(x), bn.eval()(x), rtol=1e-5)

    def test_sync_act_and_timm_frozen_act(self):
        layers = self.timm_layers
        model = nn.Sequential(nn.Conv2d(3, 5, 1), self.bn_act(), nn.Conv2d(5, 5, 1), self.bn_act())
        x = torch.randn(2, 3, 4, 4)
        ref = copy.deepcopy(model).eval()(x)
        synced = layers.convert_sync_batchnorm(copy.deepcopy(model))
        assert type(synced[1]).__name__ == "SyncBatchNormAct"
        frozen_timm = layers.freeze_batch_norm_2d(copy.deepcopy(model))
        assert type(frozen_timm[1]).__name__ == "FrozenBatchNormAct2d"
        for variant in (synced, frozen_timm):
            out = convert_frozen_bn(variant)
            assert all(type(out[i]) is FrozenBatchNormAct2d for i in (1, 3))
            assert isinstance(out[1].act, nn.SiLU)
            assert_close_rel(out.train()(x), ref, rtol=1e-5)
        reverted = revert_frozen_bn(synced)
        assert type(reverted[1]) is layers.SyncBatchNormAct and isinstance(reverted[1].act, nn.SiLU)
        back = revert_frozen_bn(frozen_timm)
        assert type(back[1]) is layers.BatchNormAct2d
        assert_close_rel(back.eval()(x), ref, rtol=1e-5)

    def test_apply_act_false_and_affine_false(self):
        bn = randomize_norm_stats_(self.timm_layers.BatchNormAct2d(4, apply_act=False, affine=False))
        x = torch.randn(2, 4, 3, 3)
        ref = bn.eval()(x)
        frozen = convert_frozen_bn(copy.deepcopy(bn))
        assert isinstance(frozen.act, nn.Identity)
        assert_close_rel(frozen(x), ref, rtol=1e-5)


# --------------------------------------------------------------------------------------
# revert_frozen_bn
# --------------------------------------------------------------------------------------

def test_revert_restores_classes_and_bit_identical_statistics():
    original = zoo()
    model = convert_frozen_bn(copy.deepcopy(original))
    model.train()
    back, rep = revert_frozen_bn(model, report=True)
    assert rep.action == "reverted" and len(rep.converted) == 5
    assert [type(m) for m in back.modules()] == [type(m) for m in original.modules()]
    assert back.head[1].momentum is None and back.sync.momentum == 0.1
    for (name, m), (_, o) in zip(norm_layers(back), norm_layers(original)):
        assert m.training and m.affine and m.track_running_stats, name
        # the count the layer had (momentum=None averages with it)
        assert m.num_batches_tracked.item() == o.num_batches_tracked.item() > 0, name
        assert isinstance(m.weight, nn.Parameter) and m.weight.requires_grad
        for attr in ("running_mean", "running_var"):
            assert torch.equal(getattr(m, attr), getattr(o, attr)), (name, attr)
        if o.affine:
            assert torch.equal(m.weight, o.weight) and torch.equal(m.bias, o.bias)
        assert m.eps == o.eps
    assert torch.equal(back.eval()(X), original.eval()(X))
    # ready to train BN again
    back.train()
    back(X)
    assert back.stem[1].num_batches_tracked.item() == original.stem[1].num_batches_tracked.item() + 1


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_revert_keeps_the_statistics_dtype(dtype):
    """A model cast before conversion (statistics in float64, or in 16 bits as apex's
    network_to_half leaves them) comes back with the statistics, weights and biases in that
    dtype, bit for bit, and the original's output."""
    original = zoo().to(dtype)
    back = revert_frozen_bn(convert_frozen_bn(copy.deepcopy(original)))
    for (name, m), (_, o) in zip(norm_layers(back), norm_layers(original)):
        for attr in ("running_mean", "running_var", "weight", "bias"):
            got, want = getattr(m, attr), getattr(o, attr)
            if want is None:  # affine=False: weight 1, bias 0, in the dtype too
                assert got.dtype == dtype, (name, attr)
                continue
            assert got.dtype == dtype and torch.equal(got, want), (name, attr)
    x = X.to(dtype)
    assert torch.equal(back.eval()(x), original.eval()(x))


def test_revert_mode_follows_the_parent():
    model = convert_frozen_bn(nn.Sequential(nn.Sequential(nn.BatchNorm2d(2)), nn.BatchNorm2d(2)))
    model[0].eval()
    model[1].eval()  # the frozen layer's own flag does not matter
    revert_frozen_bn(model)
    assert not model[0][0].training and model[1].training


def test_revert_without_a_record_goes_by_rank():
    model = nn.Sequential(FrozenBatchNorm1d(2), FrozenBatchNorm2d(2), FrozenBatchNorm3d(2),
                          FrozenBatchNorm(2))
    revert_frozen_bn(model)
    assert [type(m) for m in model] == [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
                                        nn.SyncBatchNorm]


def test_revert_scope_and_idempotence():
    model = convert_frozen_bn(Detector())
    revert_frozen_bn(model, include="backbone.body.layer4")
    assert frozen_names(model) == ([f"backbone.body.layer{i}.1" for i in range(1, 4)]
                                   + ["backbone.fpn.1", "head.1"])
    _, rep = revert_frozen_bn(revert_frozen_bn(model), report=True)
    assert frozen_names(model) == [] and rep.converted == []


def test_revert_root():
    frozen = convert_frozen_bn(randomize_norm_stats_(nn.BatchNorm3d(2)))
    bn = revert_frozen_bn(frozen)
    assert type(bn) is nn.BatchNorm3d and torch.equal(bn.running_mean, frozen.running_mean)


class PlusOneFrozen(FrozenBatchNorm2d):
    """A frozen BatchNorm that computes more."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return super().forward(input) + 1


def test_revert_leaves_frozen_modules_with_their_own_forward():
    model = nn.Sequential(PlusOneFrozen(3), FrozenBatchNorm2d(3))
    assert convert_frozen_bn(model, report=True)[1].skipped == []  # ours: nothing to say
    with pytest.warns(FrozenNormWarning, match="computes other than a frozen BatchNorm"):
        _, rep = revert_frozen_bn(model, report=True)
    assert type(model[0]) is PlusOneFrozen and type(model[1]) is nn.BatchNorm2d
    assert rep.skipped[0].reason is SkipReason.UNSUPPORTED
    with pytest.raises(ValueError, match="strict=True"):
        revert_frozen_bn(nn.Sequential(PlusOneFrozen(3)), strict=True)
