"""mmdet 3.x / mmengine / mmcv as a client of frozennorm.

mmdet's ResNet freezes BatchNorm its own way: ``norm_eval=True`` re-applies ``eval()`` to
every ``_BatchNorm`` in the backbone's ``train()`` override, and ``frozen_stages=N`` sets
``requires_grad=False`` on the stem and stages 1..N (and puts them in eval mode). These
tests first show what that does and does not do (no frozennorm involved), then the same
models converted with ``convert_frozen_bn``: ``train()`` (mmdet's override still runs),
an SGD step (and mmengine's ``train_step``), statistics bit for bit, eval outputs against
the unconverted model, checkpoints through mmengine both ways and ``init_weights()`` with a
``Pretrained`` init_cfg, ``mmcv.cnn.fuse_conv_bn`` and ``fold_frozen_bn``, ``assert_frozen``
with the converted scope; ``norm_cfg`` ``BN`` and ``SyncBN``.

Everything is built offline from config dicts, random weights (``init_cfg=None``) and
random BatchNorm statistics; nothing is downloaded.

The tests skip, saying why, where mmengine, mmcv or mmdet are not installed or fail to
import (mmdet 3.3.0 asserts ``mmcv<2.2.0`` when imported, for instance).

**mmcv-lite**: ``import mmdet.models`` imports ``mmcv.ops`` at module level (NMS, RoIAlign,
deformable convolution, ...), whose compiled extension ``mmcv._ext`` mmcv-lite does not ship,
so it fails with ``ModuleNotFoundError: No module named 'mmcv._ext'`` even for a ResNet.
Nothing exercised here calls a compiled op (the ResNet, FPN, RetinaNet's head and its
training loss on CPU are plain PyTorch; ``predict`` and its NMS run only with a full
mmcv). Where ``mmcv._ext`` is missing, the tests therefore put a stand-in module under that
name before importing ``mmdet.models``: every function of it raises (and is recorded), so
a call to a compiled op fails the test instead of being faked. A full mmcv with its
extension is used as it is.
"""
from __future__ import annotations

import copy
import importlib
import importlib.machinery
import importlib.util
import sys
import types
from typing import Dict, List

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import frozennorm
from frozennorm import FrozenBatchNorm, FrozenBatchNorm2d, NotFrozenError
from model_helpers import assert_close_rel, randomize_norm_stats_


def _import_or_skip(name: str) -> types.ModuleType:
    """``import name``, or skip this module with the reason: not installed (ImportError),
    a broken binary (OSError), or any other import-time failure (mmdet's version
    assertions, a missing compiled op)."""
    try:
        return importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - any import-time failure means "not usable here"
        pytest.skip(f"{name} not importable: {type(exc).__name__}: {exc}",
                    allow_module_level=True)


mmengine = _import_or_skip("mmengine")
mmcv = _import_or_skip("mmcv")
mmdet = _import_or_skip("mmdet")

#: calls to the mmcv._ext stand-in (must stay empty: no compiled op is used)
_EXT_CALLS: List[str] = []


def _ext_standin() -> types.ModuleType:
    ext = types.ModuleType("mmcv._ext", "stand-in for mmcv's compiled ops (mmcv-lite)")
    ext.__spec__ = importlib.machinery.ModuleSpec("mmcv._ext", None)

    def __getattr__(name: str):
        if name.startswith("__"):
            raise AttributeError(name)

        def missing(*args, **kwargs):
            _EXT_CALLS.append(name)
            raise RuntimeError(f"mmcv._ext.{name}: compiled mmcv op called, but this mmcv "
                               f"({mmcv.__version__}) has no compiled ops (mmcv-lite)")
        return missing

    ext.__getattr__ = __getattr__  # type: ignore[attr-defined]
    return ext


def _import_mmdet_models() -> bool:
    """Import mmdet.models (registers ResNet, RetinaNet, ...); returns whether the stand-in
    for mmcv._ext was needed. Skips the module where it does not import."""
    standin = importlib.util.find_spec("mmcv._ext") is None
    if standin:
        sys.modules["mmcv._ext"] = _ext_standin()
    try:
        importlib.import_module("mmdet.models")
    except Exception as exc:  # noqa: BLE001
        if standin:
            sys.modules.pop("mmcv._ext", None)
        pytest.skip(f"mmdet.models not importable (mmcv {mmcv.__version__}, mmdet "
                    f"{mmdet.__version__}): {type(exc).__name__}: {exc}",
                    allow_module_level=True)
    return standin


EXT_STANDIN = _import_mmdet_models()
_import_or_skip("mmengine.runner")
_import_or_skip("mmengine.optim")

from mmdet.registry import MODELS  # noqa: E402
from mmdet.structures import DetDataSample  # noqa: E402
from mmengine.config import ConfigDict  # noqa: E402
from mmengine.optim import OptimWrapper  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from mmengine.structures import InstanceData  # noqa: E402

init_default_scope("mmdet")

RTOL = 1e-5
#: BatchNorm layers of mmdet's ResNet-50: stem 1, 16 bottlenecks x 3, 4 downsample
RESNET50_BN = 53
#: ... per stage (3, 4, 6, 3 bottlenecks x 3, + 1 downsample)
STAGE_BN = {"layer1": 10, "layer2": 13, "layer3": 19, "layer4": 10}


@pytest.fixture(autouse=True)
def _no_compiled_op_called():
    _EXT_CALLS.clear()
    yield
    assert not _EXT_CALLS, f"compiled mmcv ops were called: {_EXT_CALLS}"


# --------------------------------------------------------------------------------------
# Models (config dicts through mmdet's registry, random weights, random statistics)
# --------------------------------------------------------------------------------------

def resnet_cfg(**overrides) -> dict:
    cfg = dict(type="ResNet", depth=50, num_stages=4, out_indices=(0, 1, 2, 3),
               frozen_stages=1, norm_cfg=dict(type="BN", requires_grad=True),
               norm_eval=True, style="pytorch", init_cfg=None)
    cfg.update(overrides)
    return cfg


def retinanet_cfg() -> dict:
    """A small RetinaNet (ResNet-50, 64-channel FPN and head) whose head convolutions have
    BatchNorm too (``norm_cfg=BN``): layers that the backbone's ``norm_eval`` never sees.
    A ``ConfigDict``, as mmengine's ``Config`` gives (mmdet's heads read ``test_cfg.nms``)."""
    return ConfigDict(
        type="RetinaNet",
        data_preprocessor=dict(type="DetDataPreprocessor", mean=[123.675, 116.28, 103.53],
                               std=[58.395, 57.12, 57.375], bgr_to_rgb=True,
                               pad_size_divisor=32),
        backbone=resnet_cfg(),
        neck=dict(type="FPN", in_channels=[256, 512, 1024, 2048], out_channels=64,
                  start_level=1, add_extra_convs="on_input", num_outs=5),
        bbox_head=dict(
            type="RetinaHead", num_classes=3, in_channels=64, stacked_convs=2,
            feat_channels=64, norm_cfg=dict(type="BN"),
            anchor_generator=dict(type="AnchorGenerator", octave_base_scale=4,
                                  scales_per_octave=3, ratios=[0.5, 1.0, 2.0],
                                  strides=[8, 16, 32, 64, 128]),
            bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4,
                            target_stds=[1.0] * 4),
            loss_cls=dict(type="FocalLoss", use_sigmoid=True, gamma=2.0, alpha=0.25,
                          loss_weight=1.0),
            loss_bbox=dict(type="L1Loss", loss_weight=1.0)),
        train_cfg=dict(assigner=dict(type="MaxIoUAssigner", pos_iou_thr=0.5, neg_iou_thr=0.4,
                                     min_pos_iou=0, ignore_iof_thr=-1),
                       sampler=dict(type="PseudoSampler"), allowed_border=-1, pos_weight=-1,
                       debug=False),
        test_cfg=dict(nms_pre=1000, min_bbox_size=0, score_thr=0.05,
                      nms=dict(type="nms", iou_threshold=0.5), max_per_img=100),
        init_cfg=None)


def build(cfg: dict, seed: int = 0, train: bool = False) -> nn.Module:
    """Built, random statistics, in eval mode (or train). mmdet's ``train()`` overrides
    return None, so ``model.eval()`` does too: these tests never chain it."""
    model = randomize_norm_stats_(MODELS.build(cfg), seed=seed)
    model.train(train)
    return model


def det_batch(n: int = 2, size: int = 64) -> dict:
    """What mmengine's dataloader hands ``train_step``: uint8 images and data samples with
    one ground-truth box each."""
    g = torch.Generator().manual_seed(1)
    inputs, samples = [], []
    for i in range(n):
        inputs.append(torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g))
        s = DetDataSample(metainfo=dict(img_shape=(size, size), ori_shape=(size, size),
                                        scale_factor=(1.0, 1.0)))
        s.gt_instances = InstanceData(bboxes=torch.tensor([[4.0 + i, 6.0, 40.0, 50.0 - i]]),
                                      labels=torch.tensor([i % 3]))
        samples.append(s)
    return dict(inputs=inputs, data_samples=samples)


def det_tensor_outputs(model: nn.Module, data: dict):
    """The detector's raw head outputs (``mode='tensor'``: no NMS)."""
    with torch.no_grad():
        d = model.data_preprocessor(copy.deepcopy(data), False)
        return model(d["inputs"], d["data_samples"], mode="tensor")


def images(n: int = 2, size: int = 64) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(2))


def norm_stats(model: nn.Module) -> Dict[str, Dict[str, torch.Tensor]]:
    """Clones of every BatchNorm-like layer's statistics, weight and bias, by name."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(getattr(m, "running_mean", None), torch.Tensor):
            out[name] = {k: getattr(m, k).detach().clone()
                         for k in ("running_mean", "running_var", "weight", "bias")
                         if isinstance(getattr(m, k, None), torch.Tensor)}
    return out


def changed(before: dict, after: dict) -> List[str]:
    """Names of the layers whose running statistics are not bit-identical."""
    assert before.keys() == after.keys()
    return sorted(n for n in before
                  if not all(torch.equal(before[n][k], after[n][k])
                             for k in ("running_mean", "running_var")))


def bn_names(model: nn.Module, prefix: str = "") -> List[str]:
    return sorted(n for n, m in model.named_modules()
                  if isinstance(m, _BatchNorm) and n.startswith(prefix))


def frozen_count(model: nn.Module) -> int:
    """Frozen BatchNorm layers of any rank (FrozenBatchNorm2d and its any-rank base)."""
    return sum(isinstance(m, FrozenBatchNorm) for m in model.modules())


def sgd_step(model: nn.Module, x: torch.Tensor) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    out = model(x)
    loss = sum(o.float().pow(2).mean() for o in out)
    loss.backward()
    opt.step()
    opt.zero_grad()


# --------------------------------------------------------------------------------------
# mmdet's own freezing, without frozennorm
# --------------------------------------------------------------------------------------

def test_mmdet_norm_eval_holds_only_through_resnet_train():
    """``norm_eval`` + ``frozen_stages`` keep the backbone's statistics through
    ``model.train()`` (mmdet re-applies ``eval()``); ``.train()`` called on a stage directly
    (a hook, a helper, ``nn.Module.train``) bypasses the override, and that stage's
    statistics drift, a "frozen" stage included."""
    model = build(resnet_cfg())
    x = images()
    model.train()  # mmdet's override (returns None in mmdet 3.3: never chain .eval())
    assert len(bn_names(model)) == RESNET50_BN
    assert not any(m.training for m in model.modules() if isinstance(m, _BatchNorm))
    # frozen_stages=1: stem and stage 1 have no trainable parameters; the other stages'
    # BatchNorm weight and bias still train (norm_cfg requires_grad=True).
    for name, p in model.named_parameters():
        frozen_stage = name.startswith(("conv1.", "bn1.", "layer1."))
        assert p.requires_grad is not frozen_stage, name
    live_affine = [n for n, m in model.named_modules()
                   if isinstance(m, _BatchNorm) and m.weight.requires_grad]
    assert len(live_affine) == STAGE_BN["layer2"] + STAGE_BN["layer3"] + STAGE_BN["layer4"]
    before = norm_stats(model)
    with torch.no_grad():
        model(x)
    assert changed(before, norm_stats(model)) == []

    for stage in ("layer1", "layer3"):
        model.train()
        getattr(model, stage).train()  # not ResNet.train: norm_eval is not re-applied
        before = norm_stats(model)
        with torch.no_grad():
            model(x)
        drifted = changed(before, norm_stats(model))
        assert drifted == bn_names(model, stage + ".")
        assert len(drifted) == STAGE_BN[stage]
    # the next ResNet.train() puts them back in eval mode, after the fact
    model.train()
    assert not any(m.training for m in model.modules() if isinstance(m, _BatchNorm))


def test_mmdet_norm_eval_does_not_reach_bn_outside_the_backbone():
    """A detector's ``train()`` + mmengine's ``train_step``: the backbone's statistics hold
    (norm_eval), the head's BatchNorm layers (4 here) update on every step. ``audit`` says
    so beforehand."""
    model = build(retinanet_cfg())
    model.train()
    head_bn = bn_names(model, "bbox_head.")
    assert len(head_bn) == 4 and len(bn_names(model, "backbone.")) == RESNET50_BN
    rows = frozennorm.audit(model).not_frozen()
    assert sorted(r.name for r in rows) == head_bn
    with pytest.raises(NotFrozenError):
        frozennorm.assert_frozen(model, include="bbox_head")
    frozennorm.assert_frozen(model, include="backbone")  # norm_eval holds it, for now

    before = norm_stats(model)
    optim = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
    losses = model.train_step(det_batch(), optim)
    assert all(torch.isfinite(v) for v in losses.values())
    assert changed(before, norm_stats(model)) == head_bn


# --------------------------------------------------------------------------------------
# Converted with frozennorm
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("norm", ["BN", "SyncBN"])
def test_mmdet_resnet_converted_trains_with_statistics_fixed(norm):
    """The whole mmdet ResNet-50 converted (``norm_cfg`` type ``BN``: ``nn.BatchNorm2d`` ->
    ``FrozenBatchNorm2d``; ``SyncBN``: mmengine's ``nn.SyncBatchNorm`` subclass ->
    ``FrozenBatchNorm``): mmdet's ``train()`` override still runs (``_freeze_stages``: stem
    and stage 1 in eval mode, no gradients) and finds no ``_BatchNorm`` to put in eval
    mode; train-mode output = the unconverted model's eval output; an SGD step changes
    weights but no statistic, even after ``.train()`` on a stage directly."""
    original = build(resnet_cfg(norm_cfg=dict(type=norm, requires_grad=True)))
    x = images()
    with torch.no_grad():
        ref = original(x)

    model, report = frozennorm.convert_frozen_bn(copy.deepcopy(original), report=True)
    assert len(report.converted) == RESNET50_BN and not report.skipped
    target = FrozenBatchNorm2d if norm == "BN" else FrozenBatchNorm
    assert all(type(m) is target for m in model.modules() if isinstance(m, FrozenBatchNorm))
    # the 42 BatchNorm weights and biases of stages 2-4 that norm_eval leaves trainable
    # are buffers now: frozen too (torchvision's/detectron2's convention)
    trainable = lambda m: sum(p.requires_grad for p in m.parameters())  # noqa: E731
    assert trainable(original) - trainable(model) == 2 * 42
    assert bn_names(model) == [] and frozen_count(model) == RESNET50_BN
    with torch.no_grad():
        assert_close_rel(model(x), ref, RTOL)  # eval mode

    model.train()
    assert model.training and model.layer2.training and not model.layer1.training
    assert not model.norm1.training  # _freeze_stages ran (norm1 is the frozen module now)
    assert not any(p.requires_grad for p in model.layer1.parameters())
    assert not model.conv1.weight.requires_grad
    assert all(p.requires_grad for p in model.layer2.parameters())
    model.layer3.train()
    frozennorm.assert_frozen(model, params=True)
    with torch.no_grad():
        assert_close_rel(model(x), ref, RTOL)  # train mode: still the eval output

    stats = norm_stats(model)
    conv1, layer2 = model.conv1.weight.detach().clone(), model.layer2[0].conv1.weight.detach().clone()
    for _ in range(2):
        sgd_step(model, x)
    assert changed(stats, norm_stats(model)) == []
    for name in stats:  # weight and bias too: buffers, never trained
        for k in stats[name]:
            assert torch.equal(stats[name][k], norm_stats(model)[name][k]), (name, k)
    assert torch.equal(model.conv1.weight, conv1)  # frozen stage: no gradient
    assert not torch.equal(model.layer2[0].conv1.weight, layer2)  # the step did train


@pytest.mark.parametrize("scope", ["backbone", None], ids=["backbone", "whole"])
def test_mmdet_retinanet_converted_train_step(scope):
    """A RetinaNet converted in the backbone (the usual recipe) or whole, through mmengine's
    ``train_step`` (data preprocessor, loss, backward, SGD step): the converted layers'
    statistics do not move; the head's live BatchNorm layers (backbone scope) do, as
    without frozennorm. Before the step, raw head outputs in eval mode equal the unconverted
    model's."""
    original = build(retinanet_cfg())
    data = det_batch()
    ref = det_tensor_outputs(original, data)

    model = frozennorm.convert_frozen_bn(copy.deepcopy(original), include=scope)
    live = bn_names(model)
    assert live == ([] if scope is None else bn_names(original, "bbox_head."))
    assert frozen_count(model) == RESNET50_BN + (4 if scope is None else 0)
    assert_close_rel(det_tensor_outputs(model, data), ref, RTOL)

    model.train()
    frozennorm.assert_frozen(model, include=scope)
    if scope is not None:
        with pytest.raises(NotFrozenError) as err:
            frozennorm.assert_frozen(model)
        assert sorted(r.name for r in err.value.rows) == live
    before = norm_stats(model)
    optim = OptimWrapper(torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9))
    for _ in range(2):
        losses = model.train_step(data, optim)
        assert all(torch.isfinite(v) for v in losses.values())
    assert changed(before, norm_stats(model)) == live


@pytest.mark.skipif(EXT_STANDIN, reason="mmcv-lite: no compiled NMS for mmdet's predict()")
def test_mmdet_retinanet_converted_predict_with_mmcv_ops():
    """With a full mmcv (compiled ops): the converted detector's ``predict`` (NMS through
    mmcv.ops) in eval mode gives the unconverted model's detections."""
    original = build(retinanet_cfg())
    data = det_batch()
    model = frozennorm.convert_frozen_bn(copy.deepcopy(original), include="backbone")
    model.eval()
    with torch.no_grad():
        got = model.test_step(copy.deepcopy(data))
        want = original.test_step(copy.deepcopy(data))
    assert len(got) == len(want) == 2
    for g, w in zip(got, want):
        g, w = g.pred_instances, w.pred_instances
        assert len(g) == len(w) > 0
        assert_close_rel(g.scores.sort().values, w.scores.sort().values, 1e-4)
        # the same (box, label) pairs, in whatever order ties come out (a label differs by
        # 1000 px: a box is matched only with a box of its own label)
        def key(i):
            return torch.cat([i.bboxes, i.labels[:, None].to(i.bboxes.dtype) * 1000], 1)
        dist = torch.cdist(key(g), key(w), compute_mode="donot_use_mm_for_euclid_dist")
        assert dist.min(dim=1).values.max().item() <= 1e-4 * w.bboxes.abs().max().item()


# --------------------------------------------------------------------------------------
# Checkpoints through mmengine
# --------------------------------------------------------------------------------------

def test_mmdet_checkpoint_round_trip_mmengine(tmp_path):
    """``mmengine.runner.save_checkpoint`` / ``load_checkpoint(strict=True)``: a converted
    model's checkpoint loads into a fresh unconverted mmdet ResNet, and an unconverted one
    into a fresh converted ResNet; statistics, weights and eval outputs equal. (The frozen
    state dict has no ``num_batches_tracked``: mmengine's strict load ignores that key,
    torch's ``load_state_dict(strict=True)`` reports it missing, and nothing else.)"""
    from mmengine.runner import load_checkpoint, save_checkpoint

    x = images()
    frozen = frozennorm.convert_frozen_bn(build(resnet_cfg(), seed=1))
    plain = build(resnet_cfg(), seed=2)
    counter = "num_batches_tracked"
    assert sorted(frozen.state_dict()) == sorted(k for k in plain.state_dict()
                                                 if not k.endswith(counter))

    path = str(tmp_path / "frozen.pth")
    save_checkpoint({"state_dict": frozen.state_dict(), "meta": {"epoch": 1}}, path)
    fresh_plain = MODELS.build(resnet_cfg())
    load_checkpoint(fresh_plain, path, map_location="cpu", strict=True)
    sd = fresh_plain.state_dict()
    for k, v in frozen.state_dict().items():
        assert torch.equal(sd[k], v), k
    assert all(sd[k].item() == 0 for k in sd if k.endswith(counter))
    # mmengine's strict load ignores missing num_batches_tracked keys; torch's own
    # load_state_dict(strict=True) would report them (and only them) as missing.
    torch_plain = MODELS.build(resnet_cfg())
    result = torch_plain.load_state_dict(torch.load(path, weights_only=True)["state_dict"],
                                         strict=False)
    assert result.unexpected_keys == []
    assert all(k.endswith(counter) for k in result.missing_keys)
    fresh_plain.eval()
    with torch.no_grad():
        assert_close_rel(fresh_plain(x), frozen(x), RTOL)

    path = str(tmp_path / "plain.pth")
    save_checkpoint({"state_dict": plain.state_dict(), "meta": {"epoch": 1}}, path)
    fresh_frozen = frozennorm.convert_frozen_bn(MODELS.build(resnet_cfg()))
    load_checkpoint(fresh_frozen, path, map_location="cpu", strict=True)
    sd = fresh_frozen.state_dict()
    for k, v in plain.state_dict().items():
        if not k.endswith(counter):
            assert torch.equal(sd[k], v), k
    assert frozen_count(fresh_frozen) == RESNET50_BN
    fresh_frozen.train()
    with torch.no_grad():
        assert_close_rel(fresh_frozen(x), plain(x), RTOL)


def test_mmdet_pretrained_init_weights_after_conversion(tmp_path):
    """The fine-tuning order mmengine's Runner imposes: the model is built (and converted),
    then ``init_weights()`` loads ``init_cfg=dict(type='Pretrained', ...)``: the BatchNorm
    checkpoint lands in the frozen layers, exactly.

    Without a checkpoint, ResNet's default init is ``Constant(1)`` for layers whose class or
    base class is named ``_BatchNorm`` (no frozen layer matches) and, with
    ``zero_init_residual=True`` (the default), ``Constant(0)`` by attribute name ``norm3``,
    which does reach the 16 frozen ``bn3`` layers: their weight and bias become 0, as the
    unconverted model's would; no statistic and no other frozen layer changes."""
    from mmengine.runner import save_checkpoint

    x = images()
    pretrained = build(resnet_cfg(), seed=3)
    with torch.no_grad():
        ref = pretrained(x)
    path = str(tmp_path / "pretrained.pth")
    save_checkpoint({"state_dict": pretrained.state_dict()}, path)

    model = frozennorm.convert_frozen_bn(MODELS.build(
        resnet_cfg(init_cfg=dict(type="Pretrained", checkpoint=path))))
    model.init_weights()
    want = norm_stats(pretrained)
    assert changed(want, norm_stats(model)) == []
    model.train()
    with torch.no_grad():
        assert_close_rel(model(x), ref, RTOL)

    model = frozennorm.convert_frozen_bn(build(resnet_cfg(), seed=4))  # default init_cfg
    before = norm_stats(model)
    model.init_weights()
    after = norm_stats(model)
    assert changed(before, after) == []
    touched = sorted({n for n in before for k in ("weight", "bias")
                      if not torch.equal(before[n][k], after[n][k])})
    assert touched == sorted(n for n in before if n.endswith(".bn3")) and len(touched) == 16
    assert all(not after[n][k].any() for n in touched for k in ("weight", "bias"))


# --------------------------------------------------------------------------------------
# mmcv's fuse_conv_bn, frozennorm's fold
# --------------------------------------------------------------------------------------

def test_mmcv_fuse_conv_bn_leaves_frozen_layers_then_fold_frozen_bn():
    """``mmcv.cnn.fuse_conv_bn`` folds ``_BatchNorm`` layers it finds after a conv, matched
    by type: it folds all 53 of an unconverted ResNet-50 and leaves a converted one's
    frozen layers alone (output bit-identical). ``fold_frozen_bn`` then folds them (eval
    output within 1e-4 of the unconverted model's)."""
    from mmcv.cnn import fuse_conv_bn

    original = build(resnet_cfg())
    x = images()
    with torch.no_grad():
        ref = original(x)

    fused_plain = fuse_conv_bn(copy.deepcopy(original))
    assert bn_names(fused_plain) == []
    with torch.no_grad():
        assert_close_rel(fused_plain(x), ref, 1e-4)

    model = frozennorm.convert_frozen_bn(copy.deepcopy(original))
    with torch.no_grad():
        before = model(x)
    model = fuse_conv_bn(model)
    assert frozen_count(model) == RESNET50_BN
    with torch.no_grad():
        after = model(x)
    assert all(torch.equal(a, b) for a, b in zip(after, before))

    folded = frozennorm.fold_frozen_bn(model, shift="conv_bias")
    assert frozen_count(folded) == 0 and frozen_count(model) == RESNET50_BN  # on a copy
    with torch.no_grad():
        assert_close_rel(folded(x), ref, 1e-4)


# --------------------------------------------------------------------------------------
# Statistics frozen, weight and bias trained: mmdet's recipe (norm_eval=True with
# requires_grad=True), its optimizer groups and its norm type
# --------------------------------------------------------------------------------------

from mmengine.optim import build_optim_wrapper  # noqa: E402

import frozennorm.integrations.mmengine  # noqa: E402,F401  (registers the norm types, the constructor)

CONSTRUCTOR = "FrozenNormOptimWrapperConstructor"
SGD = dict(type="SGD", lr=0.01, momentum=0.9, weight_decay=1e-4)


def optim_wrapper(model: nn.Module, constructor: str = CONSTRUCTOR,
                  paramwise_cfg: dict = None) -> OptimWrapper:
    """mmengine's optimizer wrapper for ``model``, as the Runner builds it from a config."""
    cfg = dict(type="OptimWrapper", constructor=constructor, optimizer=SGD,
               paramwise_cfg=paramwise_cfg or dict(norm_decay_mult=0))
    return build_optim_wrapper(model, cfg)


def param_groups(wrapper: OptimWrapper) -> list:
    """The optimizer's groups: (the tensors, the options), tensors by identity."""
    return [([id(p) for p in g["params"]], {k: v for k, v in g.items() if k != "params"})
            for g in wrapper.optimizer.param_groups]


@pytest.mark.parametrize("paramwise_cfg", [
    dict(norm_decay_mult=0),
    dict(norm_decay_mult=0.5, bias_lr_mult=2.0, bias_decay_mult=0.0),
    dict(norm_decay_mult=0, custom_keys={"layer4": dict(lr_mult=0.1)}),
], ids=["norm_decay", "bias_mults", "custom_keys"])
def test_mmengine_constructor_groups_of_a_converted_model(paramwise_cfg):
    """mmengine's default constructor finds norms by class: after ``convert_frozen_bn(...,
    trainable_affine="source")`` the 42 trainable weights and biases of stages 2-4 get a
    convolution's options (weight decay, ``bias_lr_mult``). frozennorm's constructor gives
    the converted model the unconverted model's groups: the same tensors (converted in
    place, the Parameters are the same objects) with the same options, in the same order."""
    model = build(resnet_cfg())
    want = param_groups(optim_wrapper(model, "DefaultOptimWrapperConstructor", paramwise_cfg))
    trainable = sum(p.requires_grad for p in model.parameters())
    assert len(want) == trainable  # mmengine: one group a parameter, frozen stages skipped

    frozennorm.convert_frozen_bn(model, trainable_affine="source")
    assert frozen_count(model) == RESNET50_BN and bn_names(model) == []
    assert param_groups(optim_wrapper(model, CONSTRUCTOR, paramwise_cfg)) == want
    plain = param_groups(optim_wrapper(model, "DefaultOptimWrapperConstructor", paramwise_cfg))
    names = {id(p): n for n, p in model.named_parameters()}
    differ = [names[ids[0]] for (ids, opts), (_, w) in zip(plain, want) if opts != w]
    # every trainable frozen weight and bias (42 layers of stages 2-4) but those a custom
    # key sets (custom_keys override the norm rules), and nothing else
    custom = tuple(paramwise_cfg.get("custom_keys", {}))
    assert differ == [n for n, p in model.named_parameters() if p.requires_grad and p.ndim == 1
                      and not any(k in n for k in custom)]
    assert len(differ) == 2 * (42 if not custom else 42 - STAGE_BN["layer4"])


def affine_and_conv(model: nn.Module):
    """(the weights and biases of the norm layers, the convolution weights), by name."""
    sd = model.state_dict()
    names = [n for n, _ in model.named_parameters()]
    return ({n: sd[n] for n in names if sd[n].ndim == 1},
            {n: sd[n] for n in names if sd[n].ndim == 4})


@pytest.fixture
def bn_checkpoint(tmp_path):
    """An mmdet ResNet-50 (BN, frozen_stages=1, norm_eval, requires_grad=True) with random
    statistics, and its checkpoint saved by mmengine."""
    from mmengine.runner import save_checkpoint
    model = build(resnet_cfg(), seed=5)
    path = str(tmp_path / "resnet50_bn.pth")
    save_checkpoint({"state_dict": model.state_dict()}, path)
    return model, path


def test_mmdet_norm_type_builds_frozen_layers_that_load_bn_checkpoints(bn_checkpoint):
    """``norm_cfg=dict(type="FrozenStatsBN", requires_grad=True)``: mmdet's ResNet-50 with
    53 ``FrozenBatchNorm2d`` layers named as with ``BN`` (``bn1``, ``downsample.1``), whose
    weight and bias are Parameters trained where ``frozen_stages`` lets them (and frozen
    with ``requires_grad=False``); a BN checkpoint loads through mmengine with
    ``strict=True``; eval outputs equal the BN model's."""
    from mmengine.runner import load_checkpoint
    reference, path = bn_checkpoint
    model = MODELS.build(resnet_cfg(norm_cfg=dict(type="FrozenStatsBN", requires_grad=True)))
    layers = [m for m in model.modules() if isinstance(m, FrozenBatchNorm)]
    assert len(layers) == RESNET50_BN and all(type(m) is FrozenBatchNorm2d for m in layers)
    assert all(m.trainable_affine for m in layers) and bn_names(model) == []
    assert model.norm1_name == "bn1" and model.layer1[0].norm3_name == "bn3"
    counter = "num_batches_tracked"
    assert list(model.state_dict()) == [k for k in reference.state_dict()
                                        if not k.endswith(counter)]
    load_checkpoint(model, path, map_location="cpu", strict=True)
    model.train()  # mmdet's train(): _freeze_stages
    assert ({n: p.requires_grad for n, p in model.named_parameters()}
            == {n: p.requires_grad for n, p in reference.named_parameters()})
    assert changed(norm_stats(reference), norm_stats(model)) == []
    x = images()
    with torch.no_grad():
        assert_close_rel(model(x), reference(x), RTOL)

    for name, cls in (("FrozenStatsBN1d", frozennorm.FrozenBatchNorm1d),
                      ("FrozenStatsBN2d", FrozenBatchNorm2d),
                      ("FrozenStatsBN3d", frozennorm.FrozenBatchNorm3d)):
        abbr, layer = mmcv.cnn.build_norm_layer(dict(type=name, requires_grad=False,
                                                     momentum=0.03), 8, postfix=2)
        assert abbr == "bn2" and type(layer) is cls and layer.eps == 1e-5
        assert layer.trainable_affine and not any(p.requires_grad for p in layer.parameters())


@pytest.mark.slow
def test_mmdet_trainable_affine_parity_20_sgd_steps(bn_checkpoint):
    """The user's view of mmdet's recipe: ResNet-50 (``frozen_stages=1``, ``norm_eval=True``,
    BN with ``requires_grad=True``) trained 20 SGD steps (momentum, weight decay, mmengine's
    constructor with ``norm_decay_mult=0``) side by side with the same backbone converted
    with ``trainable_affine="source"`` and one built with ``type="FrozenStatsBN"`` from the
    BN checkpoint: at every step the losses, the norm weights and biases and the convolution
    weights equal the BN model's within float32 tolerance (torch.testing's: rtol 1.3e-6,
    atol 1e-5), and every running statistic is bit-identical.

    Measured here: relative differences at most 3.3e-7 over the 20 steps. The two compute BN
    with different roundings, so a ReLU input can land on either side of 0 (64x64 images,
    the 15th step: 0.0 in nn.BatchNorm2d's output, 5.5e-8 in frozennorm's): that one element's
    gradient then passes in one model only, and the conv weight before it differs by up to
    5e-6 (2e-4 of its largest weight) five steps later, within the tolerance."""
    from mmengine.runner import load_checkpoint
    reference, path = bn_checkpoint
    converted = frozennorm.convert_frozen_bn(copy.deepcopy(reference), trainable_affine="source")
    typed = MODELS.build(resnet_cfg(norm_cfg=dict(type="FrozenStatsBN", requires_grad=True)))
    load_checkpoint(typed, path, map_location="cpu", strict=True)
    models = {"BN": reference, "converted": converted, "FrozenStatsBN": typed}
    wrappers = {k: optim_wrapper(m, "DefaultOptimWrapperConstructor" if k == "BN" else CONSTRUCTOR)
                for k, m in models.items()}
    stats = norm_stats(reference)
    start = {n: t.clone() for n, t in affine_and_conv(converted)[0].items()}
    for m in models.values():
        m.train()
    g = torch.Generator().manual_seed(3)
    targets = None
    for step in range(20):
        x = torch.randn(2, 3, 32, 32, generator=g)
        losses = {}
        for name, model in models.items():
            out = model(x)
            if targets is None:
                targets = [torch.randn(o.shape, generator=g) for o in out]
            loss = sum((o - t).pow(2).mean() for o, t in zip(out, targets))
            wrappers[name].update_params(loss)
            losses[name] = loss.detach()
        want_affine, want_conv = affine_and_conv(reference)
        for name in ("converted", "FrozenStatsBN"):
            affine, conv = affine_and_conv(models[name])
            where = f"{name}, step {step}"
            torch.testing.assert_close(losses[name], losses["BN"], msg=where)
            torch.testing.assert_close(affine, want_affine, msg=where)
            torch.testing.assert_close(conv, want_conv, msg=where)
            assert changed(stats, norm_stats(models[name])) == [], where
    assert changed(stats, norm_stats(reference)) == []  # norm_eval held it too, here
    # it trained: stages 2-4's norm weights moved, the frozen stages' did not
    affine, _ = affine_and_conv(converted)
    moved = {n for n in affine if not torch.equal(affine[n], start[n])}
    assert moved == {n for n, p in converted.named_parameters() if p.requires_grad and p.ndim == 1}
    assert len(moved) == 2 * 42


def test_mmdet_retinanet_config_with_the_norm_type_train_step():
    """A RetinaNet config as a user writes it: the backbone's ``norm_cfg`` type
    ``FrozenStatsBN``, the optimizer wrapper with frozennorm's constructor; two
    ``train_step`` calls train the backbone's norm weights (stages 2-4) and leave every
    backbone statistic bit-identical (the head's live BatchNorm layers update, as they do
    without frozennorm)."""
    cfg = retinanet_cfg()
    cfg.backbone.norm_cfg = dict(type="FrozenStatsBN", requires_grad=True)
    model = build(cfg)
    model.train()
    wrapper = optim_wrapper(model)
    no_decay = {id(p) for g in wrapper.optimizer.param_groups if g["weight_decay"] == 0
                for p in g["params"]}
    backbone_affine = {n: p for n, p in model.backbone.named_parameters()
                       if p.requires_grad and p.ndim == 1}
    assert len(backbone_affine) == 2 * 42
    assert all(id(p) in no_decay for p in backbone_affine.values())
    before = norm_stats(model)
    start = {n: p.detach().clone() for n, p in backbone_affine.items()}
    for _ in range(2):
        losses = model.train_step(det_batch(), wrapper)
        assert all(torch.isfinite(v) for v in losses.values())
    assert changed(before, norm_stats(model)) == bn_names(model, "bbox_head.")
    assert all(not torch.equal(p, start[n]) for n, p in backbone_affine.items())
