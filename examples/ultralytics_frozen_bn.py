"""Fine-tune an Ultralytics YOLO model with its first layers' BatchNorm frozen for good.

    python examples/ultralytics_frozen_bn.py          # yolov8n.yaml, 8 synthetic images, CPU
    python examples/ultralytics_frozen_bn.py --model yolo11n.pt --data coco8.yaml --epochs 10

Ultralytics' ``freeze=10`` stops the gradients of layers 0-9 and puts their BatchNorm in
eval mode at each epoch, inside its own trainer only: a callback, a hand-written loop or a
second training from the checkpoint lets their statistics drift again. With frozennorm's
trainer those BatchNorm layers become frozen modules before the optimizer and the EMA
exist, and stay frozen in every checkpoint and every later training. This script

1. trains with ``trainer=FrozenBNDetectionTrainer`` (offline: a synthetic dataset unless
   ``--data`` is given; a yaml model gets made-up statistics first, so that "unchanged"
   means something),
2. checks the frozen layers' statistics in ``last.pt`` (the EMA Ultralytics saves) and
   after a second training started from ``last.pt``: changed 0 of N,
3. runs Ultralytics' ``val``, ``predict`` and ONNX ``export`` on the result, and writes
   a portable copy of ``last.pt`` that loads without frozennorm;
4. compares outputs: the converted starting model against the unconverted one (eval mode),
   and the exported ONNX model (onnxruntime) against the trained PyTorch model.
"""
from __future__ import annotations

import argparse
import copy
import os
import tempfile
from pathlib import Path
from typing import Dict, List

os.environ.setdefault("YOLO_OFFLINE", "1")  # no downloads (fonts, weights, datasets)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from frozennorm import audit, convert_frozen_bn  # noqa: E402
from frozennorm.integrations.ultralytics import (FrozenBNDetectionTrainer,  # noqa: E402
                                                 freeze_scope, portable_checkpoint)


def synthetic_dataset(root: Path, images: int = 8, size: int = 64) -> Path:
    """``images`` random images with one box each, in Ultralytics' layout; its data.yaml."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(images):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "images" / split / f"{i}.jpg")
            x, y, w, h = rng.uniform(0.3, 0.7, 2).tolist() + rng.uniform(0.2, 0.4, 2).tolist()
            (root / "labels" / split / f"{i}.txt").write_text(f"{i % 2} {x} {y} {w} {h}\n")
    data = root / "data.yaml"
    data.write_text(f"path: {root}\ntrain: images/train\nval: images/val\n"
                    f"names:\n  0: a\n  1: b\n")
    return data


def made_up_statistics(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def statistics(model: torch.nn.Module, include: List[str]) -> Dict[str, torch.Tensor]:
    """The running statistics of the BatchNorm layers in ``include``, by name."""
    scoped = {row.name for row in audit(model, include=include)}
    return {f"{name}.{key}": value.detach().float().clone()
            for name, m in model.named_modules() if name in scoped
            for key, value in m.state_dict().items() if key.startswith("running_")}


def changed(before: Dict[str, torch.Tensor], after: Dict[str, torch.Tensor]) -> int:
    return sum(not torch.equal(before[k], after[k]) for k in before)


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def predictions(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model.eval()(x)
    return out[0] if isinstance(out, (tuple, list)) else out


def train(model: str, data: Path, out: Path, name: str, args: argparse.Namespace) -> Path:
    from ultralytics import YOLO

    YOLO(model).train(data=str(data), epochs=args.epochs, imgsz=args.imgsz, batch=args.batch,
                      freeze=args.freeze, trainer=FrozenBNDetectionTrainer, device=args.device,
                      workers=0, plots=False, amp=False, project=str(out), name=name,
                      exist_ok=True, verbose=False)
    return out / name / "weights" / "last.pt"


def main(argv=None) -> Dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="yolov8n.yaml", help="a yaml (random weights) or a .pt")
    p.add_argument("--data", help="a dataset yaml (default: 8 synthetic 64x64 images)")
    p.add_argument("--freeze", type=int, default=10, help="freeze layers 0..N-1 (default 10)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--imgsz", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, help="where runs go (default: a temporary folder)")
    args = p.parse_args(argv)
    from ultralytics import YOLO

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        data = Path(args.data) if args.data else synthetic_dataset(out / "data")
        start = YOLO(args.model)
        if args.model.endswith(".yaml"):  # a .pt to train from, with made-up statistics
            made_up_statistics(start.model)
            start.ckpt = {}
            start.save(out / "start.pt")
            args.model = str(out / "start.pt")
        scope = freeze_scope(args.freeze)
        unconverted = YOLO(args.model).model.float()
        before = statistics(unconverted, scope)
        x = torch.rand(1, 3, args.imgsz, args.imgsz, generator=torch.Generator().manual_seed(0))
        converted = convert_frozen_bn(copy.deepcopy(unconverted), include=scope,
                                      trainable_affine=False)
        converted_vs_unconverted = relative_difference(predictions(converted, x),
                                                       predictions(unconverted, x))

        last = train(args.model, data, out, "train", args)
        after = statistics(YOLO(str(last)).model, scope)
        again = statistics(YOLO(str(train(str(last), data, out, "again", args))).model, scope)
        result = {"frozen statistics": len(before), "changed": changed(before, after),
                  "changed after training from last.pt": changed(before, again),
                  "converted vs unconverted outputs (relative)": converted_vs_unconverted}

        trained = YOLO(str(last))
        metrics = trained.val(data=str(data), imgsz=args.imgsz, batch=args.batch,
                              device=args.device, plots=False, verbose=False)
        image = next((data.parent / "images" / "val").glob("*.jpg"), None) if not args.data else None
        if image is not None:
            result["predict boxes"] = len(trained.predict(str(image), imgsz=args.imgsz,
                                                           device=args.device, verbose=False)[0].boxes)
        result["val mAP50-95"] = float(metrics.box.map)
        result["onnx"] = trained.export(format="onnx", imgsz=args.imgsz)
        try:
            import onnxruntime as ort
        except ImportError:
            pass
        else:
            session = ort.InferenceSession(result["onnx"], providers=["CPUExecutionProvider"])
            onnx_out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
            result["onnx vs pytorch outputs (relative)"] = relative_difference(
                torch.from_numpy(onnx_out), predictions(YOLO(str(last)).model.float(), x))
        result["portable checkpoint"] = str(portable_checkpoint(last))
        for key, value in result.items():
            print(f"{key}: {value}")
        return result


if __name__ == "__main__":
    main()
