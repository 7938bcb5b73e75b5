"""Fine-tune a torchvision Faster R-CNN with its backbone's BatchNorm frozen by frozennorm.

    python examples/finetune_detection.py                      # offline: random init, synthetic data
    python examples/finetune_detection.py --weights DEFAULT    # COCO weights (downloads them)
    python examples/finetune_detection.py --freeze backbone.body --amp --steps 50

What it shows:

1. ``convert_frozen_bn(model, include=...)`` freezes the BatchNorm layers of part of the
   model (the backbone by default) in one line, whatever they are: ``nn.BatchNorm2d`` when
   the model is built from scratch, torchvision's ``FrozenBatchNorm2d`` when it is built
   with pretrained weights. The report says what was converted and what was left.
2. ``audit(model)`` shows, per normalisation layer, what the next forward will do.
3. Training in ``model.train()`` mode (which the detection models need for their losses)
   does not move a single frozen statistic: checked after the last step.

The data are synthetic (coloured rectangles on noise, one class per colour), so the
script runs anywhere without downloads; swap ``synthetic_batch`` for a real data loader.
"""
from __future__ import annotations

import argparse
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

import frozennorm

try:
    from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
except ImportError as e:  # pragma: no cover
    raise SystemExit("this example needs torchvision: pip install torchvision") from e

MODELS = ("fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2",
          "fasterrcnn_mobilenet_v3_large_fpn", "fasterrcnn_mobilenet_v3_large_320_fpn")

COLOURS = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.9, 0.1], [0.1, 0.1, 0.9], [0.9, 0.9, 0.1]])


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="fasterrcnn_resnet50_fpn", choices=MODELS)
    p.add_argument("--weights", default=None,
                   help="torchvision weights to start from, e.g. DEFAULT (downloads); "
                        "default: random initialisation")
    p.add_argument("--num-classes", type=int, default=3,
                   help="object classes (background excluded), at most %d" % len(COLOURS))
    p.add_argument("--freeze", default="backbone", nargs="*",
                   help="qualified-name prefixes/globs whose BatchNorm to freeze "
                        "(default: backbone; e.g. backbone.body, 'backbone.body.layer[234]*')")
    p.add_argument("--calibrate", type=int, default=4,
                   help="without --weights: batches to estimate the BatchNorm statistics "
                        "on before freezing them (frozen at their initial mean 0 / var 1, a "
                        "randomly initialised ResNet diverges)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--image-size", type=int, default=256, help="synthetic image side")
    p.add_argument("--min-size", type=int, default=256, help="the model's resize target")
    p.add_argument("--max-size", type=int, default=320)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--amp", action="store_true",
                   help="autocast: float16 with a GradScaler on CUDA, bfloat16 on CPU")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--audit", action="store_true", help="print the full audit table")
    p.add_argument("--save", default=None, help="write the fine-tuned state_dict here")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not 1 <= args.num_classes <= len(COLOURS):
        p.error(f"--num-classes must be between 1 and {len(COLOURS)}")
    return args


def build_model(args: argparse.Namespace) -> GeneralizedRCNN:
    from torchvision.models import detection
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor

    builder = getattr(detection, args.model)
    kwargs = dict(min_size=args.min_size, max_size=args.max_size)
    if args.weights is None:
        # From scratch the backbone uses nn.BatchNorm2d (all layers trainable).
        return builder(weights=None, weights_backbone=None, num_classes=args.num_classes + 1,
                       **kwargs)
    # Pretrained: torchvision builds the backbone with its own FrozenBatchNorm2d; the
    # converter swaps those for frozennorm's (exact and faster) just the same.
    model = builder(weights=args.weights, **kwargs)
    in_features = model.roi_heads.box_predictor.cls_score.in_features
    model.roi_heads.box_predictor = FastRCNNPredictor(in_features, args.num_classes + 1)
    return model


def synthetic_batch(n: int, size: int, num_classes: int, g: torch.Generator
                    ) -> Tuple[List[Tensor], List[Dict[str, Tensor]]]:
    """Noise images with 1-3 coloured rectangles each; the colour is the class."""
    images, targets = [], []
    for _ in range(n):
        img = torch.rand(3, size, size, generator=g) * 0.3
        k = int(torch.randint(1, 4, (1,), generator=g))
        boxes, labels = [], []
        for _ in range(k):
            w, h = (torch.randint(size // 8, size // 2, (2,), generator=g)).tolist()
            x0 = int(torch.randint(0, size - w, (1,), generator=g))
            y0 = int(torch.randint(0, size - h, (1,), generator=g))
            c = int(torch.randint(0, num_classes, (1,), generator=g))
            img[:, y0:y0 + h, x0:x0 + w] = COLOURS[c].view(3, 1, 1)
            boxes.append([x0, y0, x0 + w, y0 + h])
            labels.append(c + 1)
        images.append(img)
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32),
                        "labels": torch.tensor(labels, dtype=torch.int64)})
    return images, targets


@torch.no_grad()
def calibrate_batchnorm(model: GeneralizedRCNN, batches: int, args: argparse.Namespace,
                        g: torch.Generator) -> None:
    """Estimate the BatchNorm statistics of a randomly initialised model (cumulative
    average over a few batches) so that there is something worth freezing."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    modes = [(m, m.training) for m in model.modules()]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    model.eval()
    for bn in bns:
        bn.train()
    for _ in range(batches):
        images, _ = synthetic_batch(args.batch_size, args.image_size, args.num_classes, g)
        model.backbone(model.transform(images)[0].tensors)
    for m, training in modes:
        m.training = training
    for bn, momentum in zip(bns, momenta):
        bn.momentum = momentum


def frozen_state(model: nn.Module) -> Dict[str, Tensor]:
    """Copies of every frozen layer's buffers (to check that training leaves them alone)."""
    return {f"{name}.{k}": v.detach().clone()
            for name, m in model.named_modules() if isinstance(m, frozennorm.FrozenBatchNorm)
            for k, v in m.named_buffers(recurse=False)}


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, float]:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)

    g = torch.Generator().manual_seed(args.seed)
    detector = build_model(args)
    if args.weights is None and args.calibrate > 0:
        calibrate_batchnorm(detector, args.calibrate, args, g)
    # The one line: freeze the BatchNorm layers inside the chosen modules (before building
    # the optimizer, before wrapping in DistributedDataParallel), weight and bias with the
    # statistics as torchvision's and detectron2's recipes do (trainable_affine="source"
    # would keep them training: mmdet's recipe).
    model, report = frozennorm.convert_frozen_bn(detector, include=args.freeze,
                                                 trainable_affine=False, report=True)
    print(report)
    table = frozennorm.audit(model)
    print(table if args.audit else table.summary())

    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=1e-4)
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and amp_dtype == torch.float16)

    before = frozen_state(model)
    model.train()
    losses: List[float] = []
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        images, targets = synthetic_batch(args.batch_size, args.image_size, args.num_classes, g)
        images = [im.to(device) for im in images]
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        with torch.autocast(device.type, dtype=amp_dtype, enabled=args.amp):
            loss_dict = model(images, targets)
            loss = sum(loss_dict.values())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        scaler.step(optimizer)
        scaler.update()
        losses.append(float(loss.detach()))
        if step == 1 or step % 10 == 0 or step == args.steps:
            parts = ", ".join(f"{k} {float(v.detach()):.3f}" for k, v in loss_dict.items())
            print(f"step {step:4d}  loss {losses[-1]:.3f}  ({parts})")
    elapsed = time.perf_counter() - start

    after = frozen_state(model)
    unchanged = all(torch.equal(after[k], v) for k, v in before.items())
    print(f"{len(before) // 4} frozen layers, statistics unchanged after {args.steps} "
          f"training steps: {unchanged}")
    if not unchanged:
        raise RuntimeError("a frozen statistic changed during training")

    model.eval()
    with torch.no_grad():
        images, _ = synthetic_batch(1, args.image_size, args.num_classes, g)
        detections = model([images[0].to(device)])[0]
    print(f"{len(detections['boxes'])} detections on a new image; "
          f"{args.steps / elapsed:.2f} steps/s")
    if args.save:
        # BatchNorm-compatible keys: loads into the same model built with nn.BatchNorm2d
        # (strict=False for num_batches_tracked) or into the converted one.
        torch.save(model.state_dict(), args.save)
        print(f"saved {args.save}")
    return {"first_loss": losses[0], "last_loss": losses[-1], "frozen_layers": len(before) // 4,
            "steps_per_s": args.steps / elapsed}


if __name__ == "__main__":
    main()
