"""torch.jit.script of the frozen modules and of converted models: every model that scripts
before conversion scripts after it, and the scripted model computes what the eager one does
(bit for bit: the same fused ops)."""
import copy

import pytest
import torch
from torch import nn

from frozennorm import FrozenBatchNormAct2d, convert_frozen_bn

from model_helpers import randomize_norm_stats_

ACTS = [nn.ReLU(), nn.ReLU6(), nn.SiLU(), nn.Identity(), nn.GELU(), nn.PReLU(8), nn.Hardswish()]


@pytest.mark.parametrize("act", ACTS, ids=lambda a: type(a).__name__)
@pytest.mark.parametrize("drop", [None, nn.Dropout(0.5)], ids=["no-drop", "dropout"])
def test_bn_act_module_scripts(act, drop):
    m = FrozenBatchNormAct2d(8, act=copy.deepcopy(act), drop=drop)
    randomize_norm_stats_(m)
    x = torch.randn(2, 8, 5, 5) * 3
    scripted = torch.jit.script(copy.deepcopy(m))
    for mode in ("eval", "train"):
        getattr(m, mode)(), getattr(scripted, mode)()
        if mode == "train" and drop is not None:
            continue  # dropout draws
        assert torch.equal(scripted(x), m(x))
    m.eval(), scripted.eval()
    r = torch.randn_like(x)
    if isinstance(act, nn.Identity) and drop is None:  # takes a residual and an activation
        assert torch.equal(scripted(x, r, "relu6"), m(x, r, "relu6"))
    else:
        for call in (lambda f: f(x, r), lambda f: f(x, None, "relu")):
            with pytest.raises(Exception, match="only when its own drop and act are identities"):
                call(scripted)
            with pytest.raises(ValueError, match="only when its own drop and act are identities"):
                call(m)


def test_scripting_follows_act_changed_after_construction():
    m = FrozenBatchNormAct2d(4, act=nn.ReLU())
    m.act = nn.SiLU()
    x = torch.randn(2, 4, 3, 3) * 3
    scripted = torch.jit.script(m)
    assert scripted._scripted_activation == "silu"
    assert torch.equal(scripted(x), m(x))


def _check_scripts_after_conversion(model: nn.Module, x: torch.Tensor) -> None:
    model = randomize_norm_stats_(model).eval()
    try:
        torch.jit.script(copy.deepcopy(model))
    except Exception as e:  # noqa: BLE001 (only models that script before conversion count)
        pytest.skip(f"does not script before conversion: {type(e).__name__}")
    converted = convert_frozen_bn(copy.deepcopy(model), trainable_affine=False)
    scripted = torch.jit.script(converted)
    with torch.no_grad():
        assert torch.equal(scripted(x), converted(x))
        expected = model(x)
        got = scripted(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


TIMM_MODELS = ["resnet18", "efficientnet_b0", "mobilenetv3_large_100", "ghostnet_100",
               pytest.param("cspresnet50", marks=pytest.mark.slow),
               pytest.param("regnetx_002", marks=pytest.mark.slow),
               pytest.param("vovnet39a", marks=pytest.mark.slow),
               pytest.param("dla34", marks=pytest.mark.slow),
               pytest.param("rexnet_100", marks=pytest.mark.slow),
               pytest.param("mixnet_s", marks=pytest.mark.slow),
               pytest.param("dpn68", marks=pytest.mark.slow),
               pytest.param("tresnet_m", marks=pytest.mark.slow),
               pytest.param("densenet121", marks=pytest.mark.slow)]


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_timm_model_scripts_after_conversion(name):
    timm = pytest.importorskip("timm")
    with timm.layers.set_scriptable(True):
        model = timm.create_model(name, pretrained=False)
    _check_scripts_after_conversion(model, torch.randn(1, 3, 96, 96))


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small",
                                  pytest.param("regnet_y_400mf", marks=pytest.mark.slow),
                                  pytest.param("efficientnet_b0", marks=pytest.mark.slow)])
def test_torchvision_model_scripts_after_conversion(name):
    tv = pytest.importorskip("torchvision")
    _check_scripts_after_conversion(tv.models.get_model(name), torch.randn(1, 3, 96, 96))
