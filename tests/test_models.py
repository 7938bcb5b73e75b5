"""Model zoo: torchvision and timm models with random BatchNorm statistics.

For each model: ``convert_frozen_bn(strict=True)`` converts every BatchNorm-like layer; the
converted model in ``train()`` mode (dropout-like layers off) gives the original's
``eval()`` output: float32, each element within 1e-5 of its float64 value (relative to
it plus its tensor's rms: the fused op rounds differently from ``nn.BatchNorm2d``'s
``x * alpha + beta``, which itself stays within 2e-6); no statistic moves;
``revert_frozen_bn`` gives the original back (same classes, bit-identical state dict,
``num_batches_tracked`` included where the original had it, bit-identical eval output).

Detection models in train mode compute losses, so what is compared is the part that holds
the BatchNorm layers: the backbone's feature maps (and, where the heads have BatchNorm,
their raw outputs on those features), not the post-processed detections (top-k and NMS
may reorder near-ties).
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import importlib.util
from pathlib import Path
from typing import Any, Callable, Dict

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from frozennorm import FrozenBatchNorm, assert_frozen, audit, convert_frozen_bn, revert_frozen_bn

from model_helpers import (assert_close_rel, assert_matches_float64, float64_reference,
                           randomize_norm_stats_, train_without_dropout)

tvm = pytest.importorskip("torchvision.models")

ROOT = Path(__file__).resolve().parents[1]
DET = dict(weights=None, weights_backbone=None, num_classes=5, min_size=128, max_size=160)


def is_norm(m: nn.Module) -> bool:
    return (isinstance(m, (_BatchNorm, FrozenBatchNorm))
            or "FrozenBatchNorm" in type(m).__name__)


def check_model(model: nn.Module, x: Any, forward: Callable[[nn.Module, Any], Any],
                rtol: float = 1e-5) -> None:
    randomize_norm_stats_(model, seed=0)
    original = copy.deepcopy(model).eval()
    with torch.no_grad():
        ref = forward(original, x)
    ref64 = float64_reference(original, x, forward=forward)
    n_norm = sum(is_norm(m) for m in model.modules())
    assert n_norm > 0

    converted, rep = convert_frozen_bn(model, trainable_affine=False, strict=True, report=True)
    assert len(rep.converted) == n_norm and rep.skipped == []
    assert not any(isinstance(m, _BatchNorm) for m in converted.modules())
    assert sum(isinstance(m, FrozenBatchNorm) for m in converted.modules()) == n_norm

    train_without_dropout(converted)
    assert_frozen(converted)
    stats = {k: v.clone() for k, v in converted.state_dict().items()}
    with torch.no_grad():
        out = forward(converted, x)
    assert_matches_float64(out, ref64, rtol)
    assert all(torch.equal(v, stats[k]) for k, v in converted.state_dict().items())

    back = revert_frozen_bn(converted)
    assert all(isinstance(m, _BatchNorm) for m in back.modules() if is_norm(m))
    # A model built with live BatchNorm comes back as it was; one built with another
    # library's frozen layers comes back with live BatchNorm (which rounds differently).
    was_live = not any(is_norm(m) and not isinstance(m, _BatchNorm) for m in original.modules())
    if was_live:
        assert [type(m) for m in back.modules()] == [type(m) for m in original.modules()]
    back_sd, orig_sd = back.state_dict(), original.state_dict()
    counter = "num_batches_tracked"
    assert ([k for k in back_sd if not k.endswith(counter)]
            == [k for k in orig_sd if not k.endswith(counter)])
    for k, v in back_sd.items():
        if k in orig_sd:  # num_batches_tracked included
            assert torch.equal(v, orig_sd[k]), k
        else:  # a counter the original's frozen layers did not have
            assert k.endswith(counter) and v.item() == 0, k
    with torch.no_grad():
        again = forward(back.eval(), x)
    if was_live:
        assert_close_rel(again, ref, rtol=0.0)
    else:
        assert_matches_float64(again, ref64, rtol)


def call(model: nn.Module, x: torch.Tensor) -> Any:
    return model(x)


# --------------------------------------------------------------------------------------
# Classification, segmentation, video
# --------------------------------------------------------------------------------------

IMAGE = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "efficientnet_b0",
                                  pytest.param("regnet_y_400mf", marks=pytest.mark.slow),
                                  "shufflenet_v2_x0_5",
                                  pytest.param("densenet121", marks=pytest.mark.slow)])
def test_torchvision_classification(name):
    torch.manual_seed(0)
    check_model(getattr(tvm, name)(), IMAGE, call)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large",
                                  "fcn_resnet50"])
def test_torchvision_segmentation(name):
    # batch of one: a live BatchNorm on the ASPP's pooled 1x1 features would refuse it in
    # train mode ("Expected more than 1 value per channel"); a frozen one does not care.
    torch.manual_seed(0)
    model = getattr(tvm.segmentation, name)(weights=None, weights_backbone=None, num_classes=4)
    check_model(model, IMAGE[:1], call)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["r3d_18", "r2plus1d_18"])
def test_torchvision_video(name):
    torch.manual_seed(0)
    clip = torch.randn(1, 3, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    check_model(getattr(tvm.video, name)(), clip, call)


# --------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------

DET_IMAGE = torch.rand(1, 3, 128, 160, generator=torch.Generator().manual_seed(0))


def backbone(model: nn.Module, x: torch.Tensor) -> Dict[str, torch.Tensor]:
    return model.backbone(x)


def ssd_backbone_and_head(model: nn.Module, x: torch.Tensor) -> Any:
    features = model.backbone(x)
    return features, model.head(list(features.values()))


def rcnn_v2_backbone_and_heads(model: nn.Module, x: torch.Tensor) -> Any:
    """Backbone, RPN head and box head (v2 models have BatchNorm in both heads)."""
    features = model.backbone(x)
    rpn = model.rpn.head(list(features.values()))
    pooled = torch.randn(4, 256, 7, 7, generator=torch.Generator().manual_seed(1))
    return features, rpn, model.roi_heads.box_head(pooled.to(x.dtype))


@dataclasses.dataclass
class DetCase:
    builder: str
    forward: Callable[[nn.Module, Any], Any] = backbone
    kwargs: Dict[str, Any] = dataclasses.field(default_factory=lambda: dict(DET))


DET_CASES = {
    "fasterrcnn_resnet50_fpn": DetCase("fasterrcnn_resnet50_fpn"),
    "fasterrcnn_resnet50_fpn_v2": DetCase("fasterrcnn_resnet50_fpn_v2", rcnn_v2_backbone_and_heads),
    "fasterrcnn_mobilenet_v3_large_320_fpn": DetCase(
        "fasterrcnn_mobilenet_v3_large_320_fpn", kwargs=dict(DET, min_size=160, max_size=160)),
    "retinanet_resnet50_fpn": DetCase("retinanet_resnet50_fpn"),
    "maskrcnn_resnet50_fpn": DetCase("maskrcnn_resnet50_fpn"),
    "fcos_resnet50_fpn": DetCase("fcos_resnet50_fpn"),
    "ssdlite320_mobilenet_v3_large": DetCase(
        "ssdlite320_mobilenet_v3_large", ssd_backbone_and_head,
        dict(weights=None, weights_backbone=None, num_classes=5)),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(DET_CASES))
def test_torchvision_detection(name):
    case = DET_CASES[name]
    torch.manual_seed(0)
    model = getattr(tvm.detection, case.builder)(**case.kwargs)
    x = DET_IMAGE if "ssd" not in name else torch.rand(1, 3, 320, 320)
    check_model(model, x, case.forward)


@pytest.mark.slow
def test_pretrained_style_detector_with_torchvision_frozen_batchnorm():
    """With pretrained weights torchvision builds its backbones with its own
    FrozenBatchNorm2d (and trainable_layers); those are converted too."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.misc import FrozenBatchNorm2d as TvFrozen

    torch.manual_seed(0)
    body = resnet_fpn_backbone(backbone_name="resnet50", weights=None, norm_layer=TvFrozen,
                               trainable_layers=3)
    model = FasterRCNN(body, num_classes=5, min_size=128, max_size=160)
    assert sum(isinstance(m, TvFrozen) for m in model.modules()) == 53
    check_model(model, DET_IMAGE, backbone)


@pytest.mark.slow
def test_detection_backbone_only_recipe():
    """Freeze the backbone body only (the usual recipe): a v2 model's FPN and box head
    keep live BatchNorm."""
    torch.manual_seed(0)
    model = tvm.detection.fasterrcnn_resnet50_fpn_v2(**DET)
    _, rep = convert_frozen_bn(model, include="backbone.body", report=True)
    assert len(rep.converted) == 53
    assert {".".join(r.name.split(".")[:2]) for r in rep.skipped} == {"backbone.fpn",
                                                                      "roi_heads.box_head"}
    model.train()
    table = audit(model)
    live = [r.name for r in table.not_frozen()]
    assert live and all(not n.startswith("backbone.body") for n in live)
    assert_frozen(model.backbone.body)


# --------------------------------------------------------------------------------------
# timm
# --------------------------------------------------------------------------------------

TIMM_MODELS = ["efficientnet_b0", "mobilenetv3_small_050", "ese_vovnet19b_dw", "regnetx_002",
               "dla34"]
# drop_rate 0: some timm heads call F.dropout, which train_without_dropout cannot turn off
TIMM_KW = dict(pretrained=False, num_classes=10, drop_rate=0.0)


@functools.lru_cache(maxsize=None)
def _timm():
    return pytest.importorskip("timm")


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_timm(name):
    timm = _timm()
    torch.manual_seed(0)
    check_model(timm.create_model(name, **TIMM_KW), IMAGE, call)


@pytest.mark.parametrize("variant", ["freeze_batch_norm_2d", "convert_sync_batchnorm"])
def test_timm_frozen_and_sync_variants(variant):
    """timm's own frozen layers (torchvision's FrozenBatchNorm2d and timm's
    FrozenBatchNormAct2d) and its SyncBatchNorm/SyncBatchNormAct are converted too."""
    timm = _timm()
    torch.manual_seed(0)
    model = timm.create_model("ghostnet_100", **TIMM_KW)  # BatchNorm2d and BatchNormAct2d
    model = getattr(timm.layers, variant)(model)
    names = {type(m).__name__ for m in model.modules() if is_norm(m)}
    assert names == ({"FrozenBatchNorm2d", "FrozenBatchNormAct2d"} if variant.startswith("freeze")
                     else {"SyncBatchNorm", "SyncBatchNormAct"})
    check_model(model, IMAGE, call)


# --------------------------------------------------------------------------------------
# The example script
# --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_finetune_detection_example_runs():
    spec = importlib.util.spec_from_file_location(
        "finetune_detection", ROOT / "examples" / "finetune_detection.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.main(["--model", "fasterrcnn_mobilenet_v3_large_320_fpn", "--steps", "2",
                           "--batch-size", "1", "--calibrate", "1", "--image-size", "128",
                           "--min-size", "128", "--max-size", "160"])
    assert result["frozen_layers"] > 0
    assert torch.isfinite(torch.tensor([result["first_loss"], result["last_loss"]])).all()
