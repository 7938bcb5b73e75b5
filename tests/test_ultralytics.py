"""Ultralytics YOLO, a framework nobody here wrote: its models (YOLOv8, YOLO11) through
convert/fuse/fold, its own fuser, exporter and checkpoints, and its trainer with
frozennorm's (examples/ultralytics_frozen_bn.py, the documented recipe).

Offline (YOLO_OFFLINE=1, models built from yaml, a synthetic dataset), CPU. Skipped where
ultralytics is not installed (``pip install ultralytics``; CI installs it).
"""
from __future__ import annotations

import copy
import importlib.util
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import frozennorm
from frozennorm import (FrozenBatchNorm2d, assert_frozen, audit, convert_frozen_bn,
                        fold_frozen_bn, fuse)
from frozennorm.fold import IdentityBatchNorm

from model_helpers import randomize_norm_stats_

os.environ.setdefault("YOLO_OFFLINE", "1")
ultralytics = pytest.importorskip("ultralytics")
from ultralytics import YOLO  # noqa: E402

from frozennorm.integrations import ultralytics as fn_ultralytics  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ultralytics_frozen_bn.py"
FROZEN = [f"model.{i}" for i in range(10)]  # what freeze=10 freezes
ROUTING = ("f", "i", "type", "np")


def yolo_model(yaml: str, seed: int = 0) -> nn.Module:
    """A YOLO DetectionModel from its yaml (random weights), with random BN statistics."""
    torch.manual_seed(seed)
    return randomize_norm_stats_(YOLO(yaml).model, seed=seed).eval()


def boxes(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return out[0] if isinstance(out, (tuple, list)) else out


def stats(model: nn.Module, include=FROZEN) -> dict:
    names = {r.name for r in audit(model, include=include)}
    return {f"{n}.{k}": v.clone() for n, m in model.named_modules() if n in names
            for k, v in m.state_dict().items() if k.startswith("running_")}


def n_changed(before: dict, after: dict) -> int:
    assert before.keys() == after.keys()
    return sum(not torch.equal(before[k], after[k]) for k in before)


X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("yaml", ["yolov8n.yaml", "yolo11n.yaml"])
def test_convert_fuse_and_ultralytics_fuse(yaml):
    model = yolo_model(yaml)
    expected = boxes(model, X)
    converted = convert_frozen_bn(copy.deepcopy(model))
    torch.testing.assert_close(boxes(converted, X), expected, rtol=1e-5, atol=1e-4)

    # the model's own forward does not trace (it routes by per-layer attributes): fuse()
    # rewrites the forwards of its Conv layers, every class and attribute kept
    fused, rep = fuse(converted, report=True)
    conv_silu = {f"{n}.bn" for n, m in model.named_modules()
                 if type(m).__name__ == "Conv" and type(m.act) is nn.SiLU}
    assert len(conv_silu) > 50 and conv_silu <= {s.name for s in rep.fused}
    assert [(n, type(m)) for n, m in fused.named_modules()] == [
        (n, type(m)) for n, m in converted.named_modules()]
    for a, b in zip(fused.model, model.model):
        assert [getattr(a, k) for k in ROUTING] == [getattr(b, k) for k in ROUTING]
    torch.testing.assert_close(boxes(fused, X), expected, rtol=1e-5, atol=1e-4)
    # gradients in training mode (the raw head maps), fused and unfused
    grads = []
    for m in (converted, fused):
        x = X.clone().requires_grad_()
        out = m.train()(x)  # {"boxes", "scores", "feats"}
        (out["boxes"].sum() + out["scores"].sum() + sum(f.sum() for f in out["feats"])).backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-5)

    # Ultralytics' own fuse (predict/val/export call it) folds the frozen BN layers like
    # BatchNorm, into the conv: the same outputs, whether frozennorm.fuse ran or not
    for m in (converted, fused):
        m = copy.deepcopy(m).eval().fuse(verbose=False)
        assert not any(isinstance(sub, FrozenBatchNorm2d) for sub in m.modules())
        torch.testing.assert_close(boxes(m, X), expected, rtol=1e-5, atol=1e-3)

    # checkpoints: the whole model pickled, as Ultralytics saves it
    buf = io.BytesIO()
    torch.save({"model": fused}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)["model"]
    torch.testing.assert_close(boxes(loaded.eval(), X), expected, rtol=1e-5, atol=1e-4)


def test_folds_in_ultralytics_hands():
    """Inference fold: Ultralytics' fuser folds what is left again, exactly. Training fold:
    it refuses, saying to fold for inference first, which then works."""
    model = convert_frozen_bn(yolo_model("yolov8n.yaml"))
    expected = boxes(model, X)
    for shift in ("conv_bias", "bn"):
        deploy = fold_frozen_bn(model, shift=shift)
        assert isinstance(deploy.model[0].bn, IdentityBatchNorm if shift == "conv_bias"
                          else FrozenBatchNorm2d)
        out = boxes(deploy, X)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-3)
        # what the conv computes once the fuser folded the BN's place into it
        expected_params = {n: p.detach().clone() for n, p in deploy.named_parameters()}
        if shift == "bn":  # the shift becomes the conv's bias
            expected_params.update({f"{n}.conv.bias": m.bn.bias.clone()
                                    for n, m in deploy.named_modules() if hasattr(m, "bn")})
        deploy.fuse(verbose=False)
        # folded again exactly: these parameters, bit for bit (the outputs may move by an
        # ulp: the fuser sets requires_grad=False, and oneDNN then convolves otherwise)
        after = dict(deploy.named_parameters())
        assert sorted(after) == sorted(expected_params)
        assert all(torch.equal(after[k], v) for k, v in expected_params.items())
        torch.testing.assert_close(boxes(deploy, X), out, rtol=1e-5, atol=1e-3)

    trained = fold_frozen_bn(model, "training")
    torch.testing.assert_close(boxes(trained, X), expected, rtol=1e-5, atol=1e-3)
    with pytest.raises(AttributeError, match="fold_frozen_bn"):
        copy.deepcopy(trained).fuse(verbose=False)
    deploy = fold_frozen_bn(trained).fuse(verbose=False)
    torch.testing.assert_close(boxes(deploy, X), expected, rtol=1e-5, atol=1e-3)


def test_export_onnx_of_a_fused_model(tmp_path, monkeypatch):
    ort = pytest.importorskip("onnxruntime")
    monkeypatch.chdir(tmp_path)  # a yaml model exports into the working directory
    yolo = YOLO("yolov8n.yaml")
    randomize_norm_stats_(yolo.model)
    yolo.model = fuse(convert_frozen_bn(yolo.model))
    expected = boxes(copy.deepcopy(yolo.model).eval(), X[:1])
    path = yolo.export(format="onnx", imgsz=64)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: X[:1].numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(out), expected, rtol=1e-4, atol=1e-3)


def test_the_trap_and_the_freeze_in_a_hand_written_loop():
    """The seed's trap in YOLO: requires_grad=False on layers 0-9 and model.train() (what a
    callback or a hand-written loop does) lets every BN of those layers drift; converted,
    none does, and assert_frozen with the same scope says so."""
    for convert in (False, True):
        model = yolo_model("yolov8n.yaml")
        if convert:
            model = convert_frozen_bn(model, include=FROZEN)
        for name, p in model.named_parameters():
            p.requires_grad_(not name.startswith(tuple(f"{s}." for s in FROZEN)))
        before = stats(model)
        model.train()
        with torch.no_grad():
            model(X)
        drifted = n_changed(before, stats(model))
        if convert:
            assert drifted == 0
            assert_frozen(model, include=FROZEN)
        else:
            assert drifted == len(before) == 54  # 27 BatchNorm layers, mean and var each
            with pytest.raises(frozennorm.NotFrozenError):
                assert_frozen(model, include=FROZEN)


def test_freeze_scope():
    assert fn_ultralytics.freeze_scope(3) == ["model.0", "model.1", "model.2"]
    assert fn_ultralytics.freeze_scope([0, 4]) == ["model.0", "model.4"]
    assert fn_ultralytics.freeze_scope(None) == fn_ultralytics.freeze_scope(0) == ["model"]


def test_repconv_with_an_identity_batchnorm_fuses_after_conversion():
    """RepConv's _fuse_bn_tensor takes its identity branch only as an nn.BatchNorm2d (a
    frozen one would raise UnboundLocalError in Ultralytics' fuse()): converted blocks get
    a view that hands it the BatchNorm the frozen layer computes."""
    from ultralytics.nn.modules.conv import RepConv
    torch.manual_seed(0)
    block = randomize_norm_stats_(RepConv(8, 8, bn=True)).eval()
    x = torch.randn(2, 8, 10, 10)
    with torch.no_grad():
        expected = block(x)
        converted = convert_frozen_bn(copy.deepcopy(block), trainable_affine=False)
        assert isinstance(converted.bn, FrozenBatchNorm2d)
        converted.fuse_convs()
        torch.testing.assert_close(converted.forward_fuse(x), expected, rtol=1e-5, atol=1e-5)
    from ultralytics.nn.tasks import RTDETRDetectionModel  # RepC3 blocks of RepConv
    torch.manual_seed(0)
    model = randomize_norm_stats_(RTDETRDetectionModel("rtdetr-l.yaml", verbose=False)).eval()
    with torch.no_grad():
        expected = boxes(copy.deepcopy(model).fuse(verbose=False), X)
        got = boxes(convert_frozen_bn(copy.deepcopy(model), trainable_affine=False)
                    .fuse(verbose=False), X)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-3)


def test_portable_copies_carry_no_frozennorm():
    model = fuse(convert_frozen_bn(yolo_model("yolov8n.yaml")))
    plain = fn_ultralytics.portable(model)
    assert not any(type(m).__module__.startswith("frozennorm") for m in plain.modules())
    assert not any("forward" in m.__dict__ for m in plain.modules())
    torch.testing.assert_close(boxes(plain.eval(), X), boxes(model, X), rtol=1e-5, atol=1e-3)
    with pytest.raises(ValueError, match="IdentityBatchNorm"):
        fn_ultralytics.portable(fold_frozen_bn(model, shift="conv_bias"))


# --------------------------------------------------------------------------------------
# The recipe: Ultralytics' trainer, end to end (a minute or two on 2 CPU cores)
# --------------------------------------------------------------------------------------

def load_example():
    spec = importlib.util.spec_from_file_location("ultralytics_frozen_bn", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


LOAD_WITHOUT_FROZENNORM = """
import sys, torch
sys.modules["frozennorm"] = None  # any import of frozennorm fails
ckpt = torch.load(sys.argv[1], map_location="cpu", weights_only=False)
model = (ckpt.get("ema") or ckpt["model"]).float().eval()  # (a finished run keeps "model")
with torch.no_grad():
    model(torch.zeros(1, 3, 64, 64))
print("loaded", type(model).__name__)
"""


@pytest.mark.slow
def test_recipe_end_to_end(tmp_path):
    """examples/ultralytics_frozen_bn.py: train with FrozenBNDetectionTrainer (freeze=10),
    then train again from last.pt: the frozen layers' statistics never change; val,
    predict and ONNX export run; the portable checkpoint loads without frozennorm, the
    other one does not."""
    result = load_example().main(["--out", str(tmp_path)])
    assert result["frozen statistics"] == 54
    assert result["changed"] == 0 and result["changed after training from last.pt"] == 0
    assert Path(result["onnx"]).is_file() and "predict boxes" in result
    assert result["converted vs unconverted outputs (relative)"] < 1e-5
    assert result.get("onnx vs pytorch outputs (relative)", 0.0) < 1e-4
    last = tmp_path / "train" / "weights" / "last.pt"
    for path, loads in ((result["portable checkpoint"], True), (last, False)):
        out = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_FROZENNORM, str(path)],
                             capture_output=True, text=True, timeout=300)
        assert (out.returncode == 0) == loads, out.stderr[-2000:]
        if not loads:
            assert "frozennorm" in out.stderr


@pytest.mark.slow
def test_resume_and_the_trainer_without_frozennorm(tmp_path):
    """resume=True keeps the freeze (the interrupted run's last.pt, then the rest); a
    callback that freezes by requires_grad in Ultralytics' own trainer does not."""
    from ultralytics.models.yolo.detect import DetectionTrainer

    example = load_example()
    data = example.synthetic_dataset(tmp_path / "data")
    start = YOLO("yolov8n.yaml")
    example.made_up_statistics(start.model)
    start.ckpt = {}
    start.save(tmp_path / "start.pt")
    before = stats(YOLO(str(tmp_path / "start.pt")).model)
    common = dict(data=str(data), imgsz=64, batch=4, device="cpu", workers=0, plots=False,
                  amp=False, project=str(tmp_path), exist_ok=True, verbose=False)

    class Interrupt(Exception):
        pass

    def stop_after_first_epoch(trainer):
        if trainer.epoch == 0:
            raise Interrupt

    yolo = YOLO(str(tmp_path / "start.pt"))
    yolo.add_callback("on_fit_epoch_end", stop_after_first_epoch)
    with pytest.raises(Interrupt):
        yolo.train(epochs=2, freeze=10, trainer=fn_ultralytics.FrozenBNDetectionTrainer,
                   name="run", **common)
    last = tmp_path / "run" / "weights" / "last.pt"
    assert n_changed(before, stats(YOLO(str(last)).model)) == 0
    resumed = YOLO(str(last))
    resumed.train(resume=True, trainer=fn_ultralytics.FrozenBNDetectionTrainer)
    assert resumed.trainer.epoch == 1  # the second epoch ran
    assert n_changed(before, stats(resumed.trainer.model)) == 0
    assert n_changed(before, stats(resumed.trainer.ema.ema)) == 0
    assert n_changed(before, stats(YOLO(str(last)).model)) == 0

    # Ultralytics' own trainer, frozen by requires_grad in a callback: the statistics drift
    def freeze_by_requires_grad(trainer):
        for name, p in trainer.model.named_parameters():
            if name.startswith(tuple(f"{s}." for s in FROZEN)):
                p.requires_grad_(False)

    plain = YOLO(str(tmp_path / "start.pt"))
    plain.add_callback("on_pretrain_routine_end", freeze_by_requires_grad)
    plain.train(epochs=1, trainer=DetectionTrainer, name="plain", **common)
    assert n_changed(before, stats(YOLO(str(tmp_path / "plain" / "weights" / "last.pt")).model)) \
        == len(before)
