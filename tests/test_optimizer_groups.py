"""Optimizer parameter groups of models converted with trainable weight and bias
(``trainable_affine="source"``) against the unconverted models, with builders that exempt
norm parameters from weight decay by shape or name (timm), and torchvision's split by class
with frozennorm's class added. The other builders that go by class have their own tests:
mmengine's constructor in test_mmdet.py, Ultralytics' ``build_optimizer`` in
test_ultralytics.py. (detectron2's ``get_default_optimizer_params``,
a tuple of torch norm classes, is not tested: detectron2 is not on PyPI.)"""
import pytest
import torch

from frozennorm import FrozenBatchNorm, FrozenBatchNormAct2d, convert_frozen_bn

from model_helpers import randomize_norm_stats_

timm = pytest.importorskip("timm")
timm_optim = pytest.importorskip("timm.optim")


def groups(param_groups) -> list:
    """(the tensors by identity, the other options) for each group."""
    return [([id(p) for p in g["params"]], {k: v for k, v in g.items() if k != "params"})
            for g in param_groups]


@pytest.mark.parametrize("name, act_layers", [("resnet18", 0), ("efficientnet_b0", 49)])
def test_timm_weight_decay_groups_match(name, act_layers):
    """timm's ``param_groups_weight_decay`` (no decay for ``ndim <= 1`` and biases) and
    ``create_optimizer_v2`` with and without layer-wise decay give a converted model the
    unconverted model's groups: the same tensors, options and order (EfficientNet's
    ``BatchNormAct2d`` layers become ``FrozenBatchNormAct2d`` with the same Parameters)."""
    model = randomize_norm_stats_(timm.create_model(name, pretrained=False, num_classes=10))
    # a frozen stem, as fine-tuning recipes do: "source" keeps requires_grad as it is
    stem = model.conv_stem if hasattr(model, "conv_stem") else model.conv1
    stem.requires_grad_(False)
    builders = {
        "param_groups_weight_decay": lambda m: timm_optim.param_groups_weight_decay(m, 0.05),
        "create_optimizer_v2": lambda m: timm_optim.create_optimizer_v2(
            m, "sgd", lr=0.1, momentum=0.9, weight_decay=0.05).param_groups,
        "layer_decay": lambda m: timm_optim.create_optimizer_v2(
            m, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75).param_groups,
    }
    want = {k: groups(build(model)) for k, build in builders.items()}
    convert_frozen_bn(model, trainable_affine="source")
    frozen = [m for m in model.modules() if isinstance(m, FrozenBatchNorm)]
    assert frozen and all(m.trainable_affine for m in frozen)
    assert sum(isinstance(m, FrozenBatchNormAct2d) for m in frozen) == act_layers
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    for k, build in builders.items():
        assert groups(build(model)) == want[k], k
    # the frozen layers' weight and bias are in the no-decay groups
    no_decay = {i for ids, opts in want["param_groups_weight_decay"] if opts["weight_decay"] == 0
                for i in ids}
    assert {id(p) for m in frozen for p in m.parameters() if p.requires_grad} <= no_decay


#: torchvision's default norm classes for split_normalization_params, and frozennorm's
TV_NORMS = [torch.nn.modules.batchnorm._BatchNorm, torch.nn.LayerNorm, torch.nn.GroupNorm,
            torch.nn.modules.instancenorm._InstanceNorm, torch.nn.LocalResponseNorm]


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_torchvision_norm_split_with_frozen_classes(name):
    """torchvision's ``split_normalization_params`` (its classification reference's
    ``--norm-weight-decay``) goes by class: with ``FrozenBatchNorm`` added to its norm
    classes (docs/frameworks.md), a converted model splits as the unconverted one did."""
    models = pytest.importorskip("torchvision.models")
    split = pytest.importorskip("torchvision.ops._utils").split_normalization_params
    model = randomize_norm_stats_(getattr(models, name)(num_classes=10))
    ids = lambda parts: [[id(p) for p in part] for part in parts]  # noqa: E731
    want = ids(split(model))
    convert_frozen_bn(model, trainable_affine="source")
    assert ids(split(model))[0] == []  # the default classes miss every frozen layer
    assert ids(split(model, norm_classes=TV_NORMS + [FrozenBatchNorm])) == want
    assert want[0]
