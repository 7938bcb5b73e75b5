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


def offline_training(tmp_path: Path) -> dict:
    """Writes a synthetic dataset and ``start.pt`` (YOLOv8n with made-up statistics) under
    ``tmp_path``; returns the arguments of ``YOLO.train`` for a short offline CPU run there."""
    example = load_example()
    data = example.synthetic_dataset(tmp_path / "data")
    start = YOLO("yolov8n.yaml")
    example.made_up_statistics(start.model)
    start.ckpt = {}
    start.save(tmp_path / "start.pt")
    return dict(data=str(data), imgsz=64, batch=4, device="cpu", workers=0, plots=False,
                amp=False, project=str(tmp_path), exist_ok=True, verbose=False)


@pytest.mark.slow
def test_resume_and_the_trainer_without_frozennorm(tmp_path):
    """resume=True keeps the freeze (the interrupted run's last.pt, then the rest); a
    callback that freezes by requires_grad in Ultralytics' own trainer does not."""
    from ultralytics.models.yolo.detect import DetectionTrainer

    common = offline_training(tmp_path)
    before = stats(YOLO(str(tmp_path / "start.pt")).model)

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


# --------------------------------------------------------------------------------------
# Statistics frozen, weight and bias trained (trainable_affine)
# --------------------------------------------------------------------------------------

class FrozenStatsTrainer(fn_ultralytics.FrozenBNDetectionTrainer):
    """Every BatchNorm's statistics frozen; weight and bias train outside the freeze= layers.
    (At module level: Ultralytics' DDP imports trainers by name.)"""
    include = "model"
    trainable_affine = True


def optimizer_groups(optimizer: torch.optim.Optimizer) -> list:
    """(tag, the tensors by identity, the other options) for each group."""
    return [(g.get("param_group"), [id(p) for p in g["params"]],
             {k: v for k, v in g.items() if k not in ("params", "param_group")})
            for g in optimizer.param_groups]


@pytest.fixture(scope="module")
def detection_trainer(tmp_path_factory):
    """A FrozenStatsTrainer set up as YOLO(...).train builds one (offline dataset)."""
    root = tmp_path_factory.mktemp("ultralytics")
    data = load_example().synthetic_dataset(root / "data")
    return FrozenStatsTrainer(overrides=dict(model="yolov8n.yaml", data=str(data), imgsz=64,
                                             device="cpu", project=str(root), name="groups",
                                             exist_ok=True, plots=False, verbose=False))


@pytest.mark.parametrize("name", ["SGD", "AdamW", "MuSGD"])
def test_optimizer_groups_with_trainable_affine(detection_trainer, name, monkeypatch):
    """Ultralytics' build_optimizer spares the weights of torch.nn "Norm" classes from weight
    decay: a converted model's trainable frozen weights (57 in YOLOv8n) would decay. The
    trainer's optimizer has the unconverted model's groups: the same tensors (converted in
    place: the same Parameter objects), tags and options, in the same order; MuSGD's boosted
    head groups included."""
    from ultralytics.models.yolo.detect import DetectionTrainer
    kw = dict(name=name, lr=0.01, momentum=0.9, decay=5e-4)
    model = yolo_model("yolov8n.yaml")
    want = optimizer_groups(DetectionTrainer.build_optimizer(detection_trainer, model, **kw))
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    converted = convert_frozen_bn(model, trainable_affine="source")
    assert sum(isinstance(m, FrozenBatchNorm2d) and m.trainable_affine
               for m in converted.modules()) == n_bn == 57
    logged = []
    monkeypatch.setattr(fn_ultralytics.LOGGER, "info", logged.append)
    assert optimizer_groups(detection_trainer.build_optimizer(converted, **kw)) == want
    # Ultralytics' own line counts them among the decayed weights: the trainer says they moved
    assert logged[-1] == ("frozennorm: 57 frozen BatchNorm weight(s) moved into the "
                          "weight(decay=0.0) group, as Ultralytics groups BatchNorm weights")
    monkeypatch.undo()
    plain = optimizer_groups(DetectionTrainer.build_optimizer(detection_trainer, converted, **kw))
    decayed = {i for tag, ids, opts in plain if opts["weight_decay"] > 0 for i in ids}
    weights = {id(m.weight) for m in converted.modules() if isinstance(m, FrozenBatchNorm2d)}
    assert weights <= decayed  # what Ultralytics' own trainer does with them
    assert fn_ultralytics.norm_weights_without_decay(
        DetectionTrainer.build_optimizer(detection_trainer, converted, **kw), converted) == n_bn


@pytest.mark.slow
def test_trainable_affine_training_ema_and_checkpoints(tmp_path):
    """A short offline training with trainable_affine (freeze=10, every BatchNorm's statistics
    frozen): weight and bias train outside layers 0-9 and not inside; Ultralytics' EMA
    (which moves every floating state-dict entry towards the model's) and the checkpoints
    keep every frozen statistic bit for bit; training on from last.pt keeps the layers
    frozen, with weight and bias trainable."""
    common = offline_training(tmp_path)
    initial = YOLO(str(tmp_path / "start.pt")).model.float()
    everything = ["model"]
    before = stats(initial, everything)
    affine = {n: p.detach().clone() for n, p in initial.named_parameters()
              if n.endswith((".bn.weight", ".bn.bias"))}
    assert len(before) == 2 * 57 and len(affine) == 2 * 57

    yolo = YOLO(str(tmp_path / "start.pt"))
    yolo.train(epochs=1, freeze=10, name="run", trainer=FrozenStatsTrainer, **common)
    trainer = yolo.trainer
    for model in (trainer.model, trainer.ema.ema):
        layers = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
        assert len(layers) == 57 and all(m.trainable_affine for m in layers)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
        assert n_changed(before, stats(model, everything)) == 0
    trained = {n: p for n, p in trainer.model.named_parameters() if n in affine}
    frozen_layers = tuple(f"{s}." for s in FROZEN)
    moved = {n for n, p in trained.items() if not torch.equal(p.detach(), affine[n])}
    # all outside layers 0-9 but the stride-32 box branch, which 64-pixel images with one
    # small box each never assign a target (no gradient)
    assert moved == {n for n in affine if not n.startswith(frozen_layers + ("model.22.cv2.2.",))}
    ema = dict(trainer.ema.ema.named_parameters())
    assert all(not torch.equal(ema[n], affine[n]) for n in moved)  # the EMA follows them
    no_decay = {id(p) for g in trainer.optimizer.param_groups if g["weight_decay"] == 0
                for p in g["params"]}
    assert all(id(p) in no_decay for n, p in trained.items() if n.endswith(".weight"))

    for name in ("last.pt", "best.pt"):
        ckpt = torch.load(tmp_path / "run" / "weights" / name, map_location="cpu",
                          weights_only=False)
        saved = [m for m in (ckpt.get("model"), ckpt.get("ema")) if isinstance(m, nn.Module)]
        assert saved, name
        for model in saved:
            assert n_changed(before, stats(model.float(), everything)) == 0, name

    again = YOLO(str(tmp_path / "run" / "weights" / "last.pt"))
    again.train(epochs=1, freeze=10, name="again", trainer=FrozenStatsTrainer, **common)
    for model in (again.trainer.model, again.trainer.ema.ema):
        assert n_changed(before, stats(model, everything)) == 0
