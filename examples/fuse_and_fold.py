"""Fuse and fold the frozen BatchNorm layers of a ResNet, for training and for inference.

    python examples/fuse_and_fold.py                    # resnet50, random weights, CPU
    python examples/fuse_and_fold.py --model resnet18 --time --device cuda

1. ``convert_frozen_bn`` freezes the BatchNorm layers (here with made-up statistics, so that
   the checks below mean something without downloading weights).
2. Training: ``fuse`` merges each BatchNorm with the ReLU, or the add and the ReLU, after
   it: one pass over memory instead of two or three (the modules and the state dict stay
   as they are; only the forwards of the blocks change).
3. Quantization-aware training: ``fold_frozen_bn(model, "training")`` makes each conv use
   its weight times the BatchNorm's scale at every call (the weights stay trainable, the
   state dict is the same); ``fuse`` still merges the shift that is left with the ReLU.
4. Inference: ``fold_frozen_bn(model)`` rewrites the weights once; what is left of each
   BatchNorm is its per-channel shift, which ``fuse`` merges with the ReLU (or add and
   ReLU) after it.
"""
from __future__ import annotations

import argparse
import copy

import torch
import torchvision
from torch import nn

import frozennorm


def made_up_statistics(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)


def without_bn(model: nn.Module) -> nn.Module:
    """The same network with every frozen BatchNorm removed: the speed to aim for."""
    bare = copy.deepcopy(model)
    for name, m in list(bare.named_modules()):
        if isinstance(m, frozennorm.FrozenBatchNorm):
            bare.set_submodule(name, nn.Identity())
    return bare


def train_step_time(model: nn.Module, x: torch.Tensor) -> str:
    from torch.utils import benchmark  # (imports torch's C++ extension builder: only here)

    def step():
        model(x).sum().backward()
    m = benchmark.Timer("step()", globals={"step": step}).blocked_autorange(min_run_time=2)
    return f"{m.median * 1e3:8.1f} ms (IQR {m.iqr * 1e3:.1f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--time", action="store_true", help="time a training step of each variant")
    args = p.parse_args()

    model = getattr(torchvision.models, args.model)()
    made_up_statistics(model)
    model = frozennorm.convert_frozen_bn(model, trainable_affine=False).to(args.device).train()
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=args.device)

    fused, fuse_report = frozennorm.fuse(model, report=True)
    folded, fold_report = frozennorm.fold_frozen_bn(model, "training", report=True)
    qat = frozennorm.fuse(folded)
    print(fuse_report, fold_report, sep="\n")
    for m in (fused, qat):
        assert list(m.state_dict()) == list(model.state_dict())  # checkpoints: unchanged

    with torch.no_grad():
        ref = model(x)
        deploy = frozennorm.fuse(frozennorm.fold_frozen_bn(model.eval()))
        for name, m in (("fuse", fused), ("training fold + fuse", qat),
                        ("inference fold", deploy)):
            err = (m(x) - ref).abs().max() / ref.abs().max()
            print(f"{name + ':':<22}max difference {err:.2e} (relative to max |output|)")

    if args.time:
        variants = {"frozen BN": model, "fused": fused, "folded + fused": qat,
                    "BN removed": without_bn(model)}
        for name, m in variants.items():
            print(f"{name:>15}: {train_step_time(m.train(), x)}")


if __name__ == "__main__":
    main()
