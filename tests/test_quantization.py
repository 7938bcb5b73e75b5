"""Quantization of converted models, against the same flow on the BatchNorm model.

* torch.ao eager mode: ``fuse_modules``/``fuse_modules_qat`` (torchvision's quantizable
  ResNets call them in ``fuse_model``) take frozen layers; post-training quantization then
  gives the BatchNorm model's quantized model bit for bit, QAT trains the folded convs.
* torch.ao FX mode: tracing into a frozen layer stops with the fix; after
  ``fold_frozen_bn(model, shift="conv_bias")`` PTQ and QAT give the BatchNorm model's
  structure (the same quantized modules, the same dequantize calls) and its accuracy.
* torchao PT2E: after the same fold, the same quantized graph as the BatchNorm model.
"""
import copy
import warnings

import pytest
import torch
from torch import nn

import frozennorm
from frozennorm import FrozenBatchNorm2d, convert_frozen_bn, fold_frozen_bn

from model_helpers import randomize_norm_stats_

tv = pytest.importorskip("torchvision")
ao = pytest.importorskip("torch.ao.quantization")
from torch.ao.quantization import quantize_fx  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning",
                                        "ignore:Please use quant_min and quant_max")

X = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def types(model):
    out = {}
    for m in model.modules():
        out[type(m).__name__] = out.get(type(m).__name__, 0) + 1
    return out


def quantizable_resnet(name="resnet18"):
    torch.manual_seed(0)
    model = getattr(tv.models.quantization, name)(weights=None, quantize=False)
    return randomize_norm_stats_(model).eval()


@pytest.mark.parametrize("name", ["resnet18", pytest.param("resnet50", marks=pytest.mark.slow)])
def test_eager_post_training_quantization_equals_the_batchnorm_models(name):
    results = []
    for model in (quantizable_resnet(name),
                  convert_frozen_bn(quantizable_resnet(name), trainable_affine=False)):
        model.fuse_model()  # torch.ao.quantization.fuse_modules on conv/bn/relu triples
        assert not any(isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)) for m in model.modules())
        model.qconfig = ao.get_default_qconfig("x86")
        prepared = ao.prepare(model)
        prepared(X)
        results.append(ao.convert(prepared)(X))
    assert torch.equal(results[1], results[0])


def check_qat(ours, reference, convert):
    """``ours`` (folded convs) simulates what ``reference`` (the BatchNorm model's ConvBn
    QAT modules, statistics frozen with freeze_bn_stats) does, trains, and converts to a
    quantized model that computes what the simulation did."""
    reference.apply(torch.ao.nn.intrinsic.qat.freeze_bn_stats)
    with torch.no_grad():
        simulated, expected = ours(X), reference(X)  # (train mode: observers calibrate)
    assert rel(simulated, expected) < 0.05
    # the quantized model computes what the simulation did, as closely as the reference's
    errors = []
    for model in (ours, reference):
        model.apply(torch.ao.quantization.disable_observer)
        with torch.no_grad():
            errors.append(rel(convert(copy.deepcopy(model))(X), model.eval()(X)))
    assert errors[0] < 1.5 * errors[1] + 0.02, errors
    # and it trains
    opt = torch.optim.SGD(ours.train().parameters(), lr=1e-3, momentum=0.9)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = ours(X).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    with torch.no_grad():
        assert torch.isfinite(convert(ours.eval())(X)).all()


def test_eager_quantization_aware_training_trains_the_folded_convs():
    bn_model = quantizable_resnet().train()
    model = convert_frozen_bn(quantizable_resnet(), trainable_affine=False).train()
    bn_model.fuse_model(is_qat=True)
    model.fuse_model(is_qat=True)
    # where the BatchNorm model gets ConvBn(ReLU) QAT modules (which update statistics in
    # train mode unless frozen), the frozen model gets the folded conv: nothing to update
    bn_types, our_types = types(bn_model), types(model)
    assert our_types.get("ConvReLU2d") == bn_types["ConvBnReLU2d"]
    assert not any(isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)) for m in model.modules())
    for m in (model, bn_model):
        m.qconfig = ao.get_default_qat_qconfig("x86")
    qat, reference = ao.prepare_qat(model), ao.prepare_qat(bn_model)
    assert sum(type(m).__module__.startswith("torch.ao.nn.intrinsic.qat") for m in qat.modules()) == 9
    check_qat(qat, reference, ao.convert)


def test_eager_fusion_of_what_folds_leave():
    """After an inference fold: the shift-only BatchNorm (default) and IdentityBatchNorm
    (shift="conv_bias") fuse with their conv and ReLU too."""
    torch.manual_seed(0)
    model = randomize_norm_stats_(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())).eval()
    with torch.no_grad():
        expected = model(X)
    converted = convert_frozen_bn(copy.deepcopy(model), trainable_affine=False)
    for shift in ("bn", "conv_bias"):
        folded = fold_frozen_bn(converted, shift=shift)
        fused = ao.fuse_modules(folded, [["0", "1", "2"]])
        assert type(fused[0]).__name__ == "ConvReLU2d" and isinstance(fused[1], nn.Identity)
        with torch.no_grad():
            torch.testing.assert_close(fused(X), expected, rtol=1e-5, atol=1e-5)


def fx_ptq(model):
    prepared = quantize_fx.prepare_fx(copy.deepcopy(model).eval(),
                                      ao.get_default_qconfig_mapping("x86"), (X[:1],))
    prepared(X)
    return quantize_fx.convert_fx(prepared)


def dequantize_calls(gm):
    return sum(1 for n in gm.graph.nodes if n.op == "call_method" and n.target == "dequantize")


def float_resnet(name):
    torch.manual_seed(0)
    return randomize_norm_stats_(getattr(tv.models, name)()).eval()


def fasterrcnn_backbone():
    torch.manual_seed(0)
    det = tv.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    return randomize_norm_stats_(det.backbone).eval()


MODELS = {"resnet18": lambda: float_resnet("resnet18"),
          "resnet50": lambda: float_resnet("resnet50"),
          "fasterrcnn_r50_fpn_backbone": fasterrcnn_backbone}


def outputs(y):
    return torch.cat([t.flatten() for t in y.values()]) if isinstance(y, dict) else y


@pytest.mark.parametrize("name", ["resnet18", pytest.param("resnet50", marks=pytest.mark.slow),
                                  pytest.param("fasterrcnn_r50_fpn_backbone", marks=pytest.mark.slow)])
def test_fx_post_training_quantization(name):
    model = MODELS[name]()
    with torch.no_grad():
        expected = outputs(model(X))
    converted = convert_frozen_bn(copy.deepcopy(model), trainable_affine=False)
    # tracing into a frozen layer stops, with the fix
    with pytest.raises(TypeError, match=r"fold_frozen_bn\(model, shift=\"conv_bias\"\)"):
        fx_ptq(converted)
    with pytest.raises(TypeError, match="reached the frozen BatchNorm"):
        fx_ptq(fold_frozen_bn(converted))  # the default fold leaves the shift as a BatchNorm
    reference = fx_ptq(model)
    ours = fx_ptq(fold_frozen_bn(converted, shift="conv_bias"))
    # the BatchNorm model's quantized structure: the same quantized modules, nothing left
    # in float between dequantize and quantize
    kinds = lambda gm: {k: v for k, v in types(gm).items() if "quantized" in k.lower() or "Conv" in k}
    assert kinds(ours) == kinds(reference)
    assert dequantize_calls(ours) == dequantize_calls(reference)
    with torch.no_grad():
        err, ref_err = rel(outputs(ours(X)), expected), rel(outputs(reference(X)), expected)
    assert err < 1.25 * ref_err + 0.01, (err, ref_err)


def test_fx_quantization_aware_training():
    model = float_resnet("resnet18")
    folded = fold_frozen_bn(convert_frozen_bn(copy.deepcopy(model), trainable_affine=False),
                            shift="conv_bias")
    mapping = ao.get_default_qat_qconfig_mapping("x86")
    reference = quantize_fx.prepare_qat_fx(copy.deepcopy(model).train(), mapping, (X[:1],))
    ours = quantize_fx.prepare_qat_fx(copy.deepcopy(folded).train(), mapping, (X[:1],))
    ref_types, our_types = types(reference), types(ours)
    # ConvBn(ReLU) QAT modules there (simulating the fold), folded Conv(ReLU) QAT ones here
    assert our_types["ConvReLU2d"] == ref_types["ConvBnReLU2d"]
    assert our_types["Conv2d"] == ref_types["ConvBn2d"]
    check_qat(ours, reference, quantize_fx.convert_fx)


def test_pt2e_after_folding():
    torchao = pytest.importorskip("torchao")
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq
    torch.manual_seed(0)
    model = randomize_norm_stats_(nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8))).eval()

    def quantize(m):
        exported = torch.export.export(m, (X,)).module()
        quantizer = xiq.X86InductorQuantizer()
        quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(exported, quantizer)
        prepared(X)
        out = convert_pt2e(prepared)
        return out, sorted(str(n.target) for n in out.graph.nodes if n.op == "call_function")
    with torch.no_grad():
        expected = model(X)
    _, reference_ops = quantize(copy.deepcopy(model))
    folded = fold_frozen_bn(convert_frozen_bn(copy.deepcopy(model), trainable_affine=False),
                            shift="conv_bias")
    ours, our_ops = quantize(folded)
    assert our_ops == reference_ops
    with torch.no_grad():
        assert rel(ours(X), expected) < 0.05
