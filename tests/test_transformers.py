"""Hugging Face transformers' DETR family: their frozen layers (``DetrFrozenBatchNorm2d``
and its copies, eps 1e-5 written into the forward, no ``eps`` attribute) are converted with
their real eps, and the converted model computes what the original does, also where a
variance is 0 (an eps of 0 would give inf/NaN there)."""
import copy

import pytest
import torch

from frozennorm import FrozenBatchNorm2d, convert_frozen_bn, revert_frozen_bn

from model_helpers import assert_close_rel, randomize_norm_stats_

transformers = pytest.importorskip("transformers")

FAMILIES = ["Detr", "ConditionalDetr", "DeformableDetr", "DabDetr", "TableTransformer", "RTDetr"]


def build(family: str) -> torch.nn.Module:
    config_cls = getattr(transformers, f"{family}Config")
    model_cls = getattr(transformers, f"{family}ForObjectDetection")
    defaults = config_cls().to_dict()
    kw = {"use_pretrained_backbone": False} if "use_pretrained_backbone" in defaults else {}
    # no dropout (HF calls F.dropout in train mode): train mode then differs only where
    # normalisation layers do
    kw.update({k: 0.0 for k in defaults if k.endswith("dropout")})
    kw["num_queries"] = 20  # (RT-DETR picks its queries among the anchors of a 64x64 image)
    torch.manual_seed(0)
    model = model_cls(config_cls(**kw)).eval()
    randomize_norm_stats_(model)
    with torch.no_grad():  # variance 0 in some channels: eps decides the output there
        for m in model.modules():
            if "FrozenBatchNorm2d" in type(m).__name__:
                m.running_var[::16] = 0.0  # scale weight / sqrt(1e-5): keep it near 1
                m.weight[::16] = 3e-3
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_detr_family_converts_with_its_eps(family):
    model = build(family)
    hf_frozen = {n: type(m) for n, m in model.named_modules() if "FrozenBatchNorm2d" in type(m).__name__}
    assert hf_frozen, "no frozen layers in the backbone"
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(pixel_values=pixels)
    assert all(torch.isfinite(expected[k]).all() for k in ("logits", "pred_boxes"))
    converted, rep = convert_frozen_bn(copy.deepcopy(model), trainable_affine=False, report=True)
    assert {r.name for r in rep.converted} >= set(hf_frozen) and rep.skipped == []
    for name in hf_frozen:
        layer = converted.get_submodule(name)
        assert type(layer) is FrozenBatchNorm2d and layer.eps == 1e-5
    with torch.no_grad():
        got = converted.train()(pixel_values=pixels)  # frozen in train mode too
    for key in ("logits", "pred_boxes"):
        assert torch.isfinite(got[key]).all()
        assert_close_rel(got[key], expected[key], rtol=1e-4, what=key)
    # and back: revert gives trainable BatchNorm with the same eps
    reverted = revert_frozen_bn(converted)
    layer = reverted.get_submodule(next(iter(hf_frozen)))
    assert isinstance(layer, torch.nn.BatchNorm2d) and layer.eps == 1e-5


@pytest.mark.parametrize("family", ["Detr", "RTDetr"])
def test_revert_of_unconverted_hf_frozen_layers_keeps_their_eps(family):
    # revert_frozen_bn straight on the HF model (its frozen layers never converted): the new
    # BatchNorm layers get the eps the HF forward hard-codes, not 0 (inf/NaN where a
    # variance is 0)
    model = build(family)
    hf_frozen = [n for n, m in model.named_modules() if "FrozenBatchNorm2d" in type(m).__name__]
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(pixel_values=pixels)
    reverted = revert_frozen_bn(copy.deepcopy(model)).eval()
    for name in hf_frozen:
        layer = reverted.get_submodule(name)
        assert type(layer) is torch.nn.BatchNorm2d and layer.eps == 1e-5, name
    with torch.no_grad():
        got = reverted(pixel_values=pixels)
    for key in ("logits", "pred_boxes"):
        assert torch.isfinite(got[key]).all()
        assert_close_rel(got[key], expected[key], rtol=1e-4, what=key)
