"""Re-parameterizable models (timm's MobileOne, RepVGG, FastViT, RepGhost, RepViT, GhostNetV2)
after conversion: timm's own ``reparameterize_model`` works and gives the original model's
re-parameterized output, directly or after an inference fold (whose default leaves no conv
bias for a fuser that assumes bias-free convs to drop)."""
import copy
import io
import pickle

import pytest
import torch
from torch import nn

from frozennorm import FrozenBatchNorm2d, convert_frozen_bn, fold_frozen_bn, revert_frozen_bn
from frozennorm.convert import BatchNormView

from model_helpers import assert_close_rel, randomize_norm_stats_

timm = pytest.importorskip("timm")
from timm.utils.model import reparameterize_model  # noqa: E402

MODELS = ["mobileone_s0", "repvgg_a0", "fastvit_t8", "repghostnet_100", "repvit_m1",
          pytest.param("ghostnetv2_100", marks=pytest.mark.slow),
          pytest.param("repvgg_b0", marks=pytest.mark.slow)]


def model_and_input(name):
    torch.manual_seed(0)
    model = randomize_norm_stats_(timm.create_model(name, pretrained=False)).eval()
    return model, torch.randn(1, 3, 96, 96)


@pytest.mark.parametrize("name", MODELS)
def test_reparameterize_after_conversion(name):
    model, x = model_and_input(name)
    with torch.no_grad():
        expected = reparameterize_model(model)(x)
        converted = convert_frozen_bn(copy.deepcopy(model), trainable_affine=False)
        got = reparameterize_model(converted)(x)
        assert_close_rel(got, expected, 1e-4)
        # the same after the default inference fold (no conv bias for a fuser to drop)
        folded = fold_frozen_bn(converted)
        assert_close_rel(reparameterize_model(folded)(x), expected, 1e-4)


def test_conv_bias_fold_is_dropped_by_a_fuser_that_assumes_bias_free_convs():
    """Why the default fold keeps the shift at the BatchNorm's place: RepViT's fuse() builds
    the fused conv from the conv's weight alone. (Documented for shift="conv_bias".)"""
    model, x = model_and_input("repvit_m1")
    converted = convert_frozen_bn(copy.deepcopy(model), trainable_affine=False)
    with torch.no_grad():
        expected = model(x)
        wrong = reparameterize_model(fold_frozen_bn(converted, shift="conv_bias"))(x)
    assert (wrong - expected).norm() > 0.1 * expected.norm()


def test_view_survives_copies_and_takes_frozen_layers_only():
    model, x = model_and_input("mobileone_s0")
    converted = convert_frozen_bn(model, trainable_affine=False)
    blocks = [m for m in converted.modules() if isinstance(m.__dict__.get("_fuse_bn_tensor"), BatchNormView)]
    assert blocks and all(type(b).__module__.startswith("timm") for b in blocks)
    buf = io.BytesIO()
    torch.save(converted, buf)
    buf.seek(0)
    for copied in (copy.deepcopy(converted), pickle.loads(pickle.dumps(converted)),
                   torch.load(buf, weights_only=False)):
        views = [m.__dict__["_fuse_bn_tensor"] for m in copied.modules()
                 if isinstance(m.__dict__.get("_fuse_bn_tensor"), BatchNormView)]
        assert len(views) == len(blocks) and all(v.module in list(copied.modules()) for v in views)
        with torch.no_grad():
            assert_close_rel(reparameterize_model(copied)(x), reparameterize_model(converted)(x), 1e-6)
    # converting again adds nothing; reverting leaves blocks that take live layers as before
    assert convert_frozen_bn(converted, trainable_affine=False) is converted
    reverted = revert_frozen_bn(copy.deepcopy(converted))
    with torch.no_grad():
        assert_close_rel(reparameterize_model(reverted.eval())(x),
                         reparameterize_model(converted)(x), 1e-5)


def test_timm_unfreeze_leaves_frozennorm_layers_revert_does_not():
    """timm's unfreeze_batch_norm_2d knows its own frozen classes only; frozennorm's inverse
    is revert_frozen_bn (the compatibility table says so)."""
    model, _ = model_and_input("resnet18")
    converted = convert_frozen_bn(model, trainable_affine=False)
    timm.layers.unfreeze_batch_norm_2d(converted)
    assert isinstance(converted.bn1, FrozenBatchNorm2d)
    assert isinstance(revert_frozen_bn(converted).bn1, nn.BatchNorm2d)
