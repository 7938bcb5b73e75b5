"""audit / assert_frozen: one row per normalisation layer, what it will do on the next forward."""
import copy

import pytest
from torch import nn

import frozennorm
from frozennorm import NotFrozenError, assert_frozen, audit, convert_frozen_bn
from frozennorm.diagnostics import AuditRow, AuditTable

from model_helpers import randomize_norm_stats_


def set_bn_eval(m: nn.Module) -> None:
    """The usual recipe: BatchNorm layers to eval mode (undone by the next model.train())."""
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        m.eval()


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.bn_eval = nn.BatchNorm2d(4).eval()
        self.bn_cma = nn.BatchNorm2d(4, momentum=None)
        self.bn_nostats = nn.BatchNorm2d(4, track_running_stats=False).eval()
        self.bn_m0 = nn.BatchNorm2d(4, momentum=0.0)
        self.frozen = frozennorm.FrozenBatchNorm2d(4)
        self.gn = nn.GroupNorm(2, 4)
        self.ln = nn.LayerNorm(4, elementwise_affine=False)
        self.inorm = nn.InstanceNorm2d(4, track_running_stats=True).eval()
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn.weight.requires_grad_(False)


def by_name(table: AuditTable) -> dict:
    return {r.name: r for r in table}


def test_rows_describe_each_layer():
    rows = by_name(audit(Mixed()))
    assert list(rows) == ["bn", "bn_eval", "bn_cma", "bn_nostats", "bn_m0", "frozen", "gn", "ln", "inorm"]
    bn = rows["bn"]
    assert (bn.training, bn.frozen, bn.track_running_stats, bn.momentum) == (True, False, True, 0.1)
    assert bn.tf_momentum == pytest.approx(0.9)
    assert (bn.weight_requires_grad, bn.bias_requires_grad) == (False, True)
    assert (bn.normalizes_with, bn.updates_stats, bn.is_frozen_now) == ("batch", True, False)
    ev = rows["bn_eval"]
    assert (ev.normalizes_with, ev.updates_stats, ev.is_frozen_now) == ("running", False, True)
    cma = rows["bn_cma"]
    assert cma.cumulative_average and cma.momentum is None and cma.updates_stats
    ns = rows["bn_nostats"]
    assert (ns.track_running_stats, ns.normalizes_with, ns.updates_stats) == (False, "batch", False)
    m0 = rows["bn_m0"]  # momentum 0: the statistics stay, but the batch's are used
    assert (m0.updates_stats, m0.normalizes_with, m0.tf_momentum) == (False, "batch", 1.0)
    fr = rows["frozen"]
    assert (fr.frozen, fr.track_running_stats, fr.momentum, fr.weight_requires_grad) == (True, None, None, None)
    assert (fr.normalizes_with, fr.updates_stats) == ("running", False)
    assert (rows["gn"].normalizes_with, rows["gn"].weight_requires_grad) == ("per-sample", True)
    assert rows["ln"].weight_requires_grad is None
    assert (rows["inorm"].normalizes_with, rows["inorm"].updates_stats) == ("running", False)


def test_the_set_bn_eval_pitfall_shows():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    model.apply(set_bn_eval)
    assert audit(model)[0].is_frozen_now
    model.train()  # every epoch does this
    row = audit(model)[0]
    assert row.training and row.updates_stats and not row.is_frozen_now
    convert_frozen_bn(model)
    model.train()
    assert audit(model)[0].is_frozen_now and audit(model)[0].frozen


def test_table_text():
    text = str(audit(Mixed()))
    lines = text.splitlines()
    assert lines[0].split() == ["name", "type", "mode", "track_running_stats", "momentum", "(TF)",
                                "requires_grad", "w/b", "normalizes", "with", "stats", "update"]
    bn_line = next(line for line in lines if line.startswith("bn "))
    assert bn_line.split() == ["bn", "BatchNorm2d", "train", "yes", "0.1", "(0.9)", "no/yes", "batch", "YES"]
    assert next(line for line in lines if line.startswith("bn_cma ")).split()[4] == "cumulative"
    frozen_line = next(line for line in lines if line.startswith("frozen "))
    assert frozen_line.split() == ["frozen", "FrozenBatchNorm2d", "train", "-", "-", "-/-", "running", "no"]
    assert "9 normalization layer(s): 1 frozen, 2 will update running statistics" in text
    assert "TF/Keras value, 1 - m" in text
    assert repr(audit(Mixed())) == text


def test_foreign_layers_are_named_with_their_package():
    misc = pytest.importorskip("torchvision.ops.misc")
    row = audit(nn.Sequential(misc.FrozenBatchNorm2d(3)))[0]
    assert row.frozen and row.type_name == "FrozenBatchNorm2d (torchvision)"
    timm_layers = pytest.importorskip("timm.layers")
    row = audit(nn.Sequential(timm_layers.BatchNormAct2d(3)))[0]
    assert row.type_name == "BatchNormAct2d (timm)" and row.updates_stats


def test_table_is_data():
    table = audit(Mixed())
    assert isinstance(table, AuditTable) and len(table) == 9
    assert isinstance(table[0], AuditRow) and isinstance(table[1:3], AuditTable) and len(table[1:3]) == 2
    assert [r.name for r in table.not_frozen()] == ["bn", "bn_cma", "bn_nostats", "bn_m0"]
    dicts = table.to_dicts()
    assert dicts[0]["cls"] == "torch.nn.modules.batchnorm.BatchNorm2d"
    assert dicts[0]["tf_momentum"] == pytest.approx(0.9) and dicts[0]["updates_stats"] is True


def test_assert_frozen_names_the_layers():
    with pytest.raises(NotFrozenError) as info:
        assert_frozen(Mixed())
    message = str(info.value)
    assert "4 normalization layer(s) are not frozen" in message
    assert "  bn (BatchNorm2d, train mode): its running statistics update on the next forward; " \
           "it normalizes with batch statistics" in message
    assert "  bn_m0 (BatchNorm2d, train mode): it normalizes with batch statistics" in message
    assert [r.name for r in info.value.rows] == ["bn", "bn_cma", "bn_nostats", "bn_m0"]
    assert isinstance(info.value, AssertionError)


def test_assert_frozen_passes_after_conversion_in_train_mode():
    model = randomize_norm_stats_(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.GroupNorm(2, 4)))
    with pytest.raises(NotFrozenError):
        assert_frozen(model)
    convert_frozen_bn(model).train()
    assert_frozen(model)
    assert_frozen(model, params=True)  # frozen layers have no parameters


def test_assert_frozen_params():
    model = nn.Sequential(nn.BatchNorm2d(4)).eval()  # eval: statistics fixed for now
    assert_frozen(model)
    with pytest.raises(NotFrozenError, match="weight/bias require grad"):
        assert_frozen(model, params=True)
    for p in model.parameters():
        p.requires_grad_(False)
    assert_frozen(model, params=True)
    assert_frozen(nn.Sequential(nn.GroupNorm(1, 2)), params=True)  # not a BatchNorm


def test_assert_frozen_params_advice_fits_the_layer():
    """A trainable-affine frozennorm layer: convert_frozen_bn leaves it as it is, so the error
    says what does freeze it, and following that advice passes."""
    for fix in ("revert", "requires_grad"):
        model = randomize_norm_stats_(nn.Sequential(
            nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1),
            frozennorm.FrozenBatchNorm2d(4, trainable_affine=True))).eval()
        with pytest.raises(NotFrozenError) as info:
            assert_frozen(model, params=True)
        message = str(info.value)
        assert "convert_frozen_bn(model) freezes them" in message  # for the nn.BatchNorm2d
        assert "2: frozen by frozennorm with trainable weight and bias" in message
        assert "0: frozen" not in message
        with pytest.warns(frozennorm.FrozenNormWarning, match="left as it is: 2"):
            convert_frozen_bn(model, trainable_affine=False)
        with pytest.raises(NotFrozenError) as info:  # the frozennorm layer is left as it was
            assert_frozen(model, params=True)
        assert [r.name for r in info.value.rows] == ["2"]
        assert "convert_frozen_bn(model) freezes them" not in str(info.value)
        if fix == "revert":
            frozennorm.revert_frozen_bn(model)
            convert_frozen_bn(model, trainable_affine=False)
        else:
            model[2].weight.requires_grad_(False)
            model[2].bias.requires_grad_(False)
        assert_frozen(model, params=True)


def test_audit_root_and_empty():
    assert audit(nn.BatchNorm1d(2))[0].name == ""
    table = audit(nn.Linear(2, 2))
    assert len(table) == 0 and "0 normalization layer(s)" in str(table)
    assert_frozen(copy.deepcopy(nn.Linear(2, 2)))


def test_scope_of_a_partly_frozen_model():
    """A partly frozen model (the first stages converted, the head left live, as detection
    fine-tuning does): the converter's scope selects what audit and assert_frozen check."""
    torchvision = pytest.importorskip("torchvision")
    model = convert_frozen_bn(torchvision.models.resnet18(), include=["bn1", "layer1", "layer2"])
    model.train()
    with pytest.raises(NotFrozenError):
        assert_frozen(model)
    scope = dict(include=["bn1", "layer1", "layer2"])
    assert_frozen(model, **scope)
    assert_frozen(model, exclude="layer[34]*")
    assert_frozen(model, predicate=lambda name, m: not name.startswith(("layer3", "layer4")))
    table = audit(model, **scope)
    assert len(table) == 1 + 4 + 5 and all(r.frozen for r in table)
    assert [r.name for r in audit(model, include="layer4.0")] == [
        "layer4.0.bn1", "layer4.0.bn2", "layer4.0.downsample.1"]
    with pytest.raises(NotFrozenError) as info:
        assert_frozen(model, include="layer3")
    assert all(r.name.startswith("layer3.") for r in info.value.rows)
    # a pattern that matches nothing: an assertion about nothing is refused, audit warns
    with pytest.raises(ValueError, match=r"\['layer9'\] match no module"):
        assert_frozen(model, include=["layer1", "layer9"])
    with pytest.warns(frozennorm.FrozenNormWarning, match="layer9"):
        assert len(audit(model, include="layer9")) == 0
    with pytest.raises(TypeError, match="include must be a string"):
        audit(model, include=[1])


def test_the_documented_example():
    """docs/diagnostics.md's two printouts (ResNet-18 after set_bn_eval and the next
    model.train(), then converted but for layer4) are what audit prints, line for line."""
    from pathlib import Path

    tvm = pytest.importorskip("torchvision.models")
    doc = Path(__file__).resolve().parents[1] / "docs" / "diagnostics.md"
    if not doc.exists():
        pytest.skip("not a checkout")
    blocks = doc.read_text().split("```")[1::2]
    model = tvm.resnet18()
    model.apply(set_bn_eval)
    model.train()
    printed = [str(audit(model))]
    convert_frozen_bn(model, exclude="layer4")
    printed.append(str(audit(model)))
    assert len(blocks) == 2
    for block, text in zip(blocks, printed):
        shown = [line for line in block.strip().splitlines() if line != "..."]
        assert shown and set(shown) <= set(text.splitlines()), (block, text)
