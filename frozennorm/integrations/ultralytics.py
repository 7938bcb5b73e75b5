"""Frozen BatchNorm for Ultralytics YOLO training: frozen in the live model, the EMA, every
checkpoint, and again when training resumes or restarts from one.

::

    from ultralytics import YOLO
    from frozennorm.integrations.ultralytics import FrozenBNDetectionTrainer

    YOLO("yolo11n.pt").train(data="coco8.yaml", freeze=10, trainer=FrozenBNDetectionTrainer)

The trainer converts the BatchNorm layers of the layers ``freeze=`` freezes (all of them
when ``freeze`` is not set) in ``get_model``: before Ultralytics builds the optimizer and
the EMA from the model, so neither holds a BatchNorm parameter and the EMA is converted
too. Ultralytics rebuilds a model from its yaml when it trains from a checkpoint (resume
included) and loads the checkpoint's weights into it: ``get_model`` converts that model
too, so the freeze holds there as well. ``val``, ``predict`` and ``export`` work on the
result (their conv+BN fuser folds the frozen layers like any BatchNorm).

Checkpoints hold the frozen modules, so loading them needs frozennorm installed (or
Ultralytics tries to install a package named after the missing module). For checkpoints
that load anywhere, set ``portable_checkpoints = True`` on the trainer class (they then
hold plain ``nn.BatchNorm2d`` layers with the same statistics; training from them with this
trainer freezes them again), or convert a checkpoint afterwards with
:func:`portable_checkpoint`.

Statistics frozen, weight and bias trained (mmdet's recipe: ``norm_eval=True`` with
``requires_grad=True``): set ``trainable_affine = True`` on a subclass, at module level
(Ultralytics' DDP imports the trainer class by name). ``freeze=`` still decides which
weights train: Ultralytics stops the gradients of the layers it names, so the frozen
layers' weight and bias train outside them::

    class FrozenStatsTrainer(FrozenBNDetectionTrainer):
        include = "model"           # every BatchNorm's statistics, whatever freeze= says
        trainable_affine = True     # weight and bias train (outside the freeze= layers)

The optimizer gets the groups Ultralytics gives the unconverted model: its
``build_optimizer`` spares the weights of ``torch.nn`` classes named "Norm" from weight
decay (biases go by name), and the trainer puts frozen layers' trainable weights in that
group too. The EMA and the checkpoints keep the frozen statistics bit for bit (the EMA's
update moves each entry towards the model's, which is the same).

Other tasks: mix :class:`FrozenBN` into their trainer, at module level::

    class FrozenBNPoseTrainer(FrozenBN, PoseTrainer):
        include = "model"           # every BatchNorm, whatever freeze= says
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import List, Optional, Union

import torch
from torch import nn

from ..convert import Patterns, convert_frozen_bn, revert_frozen_bn
from ..fuse import unfuse
from ..modules import is_frozen_batchnorm

try:
    from ultralytics.models.yolo.detect import DetectionTrainer
    from ultralytics.models.yolo.pose import PoseTrainer
    from ultralytics.models.yolo.segment import SegmentationTrainer
    from ultralytics.utils import LOGGER
    from ultralytics.utils.torch_utils import unwrap_model
except ImportError as e:  # pragma: no cover - exercised only without ultralytics
    raise ImportError(f"frozennorm.integrations.ultralytics needs ultralytics "
                      f"(pip install ultralytics): {e}") from e

__all__ = ["FrozenBN", "FrozenBNDetectionTrainer", "FrozenBNSegmentationTrainer",
           "FrozenBNPoseTrainer", "freeze_scope", "norm_weights_without_decay", "portable",
           "portable_checkpoint"]


def freeze_scope(freeze: Union[None, int, List[Union[int, str]]]) -> List[str]:
    """The module names Ultralytics' ``freeze=`` argument freezes: ``model.0`` ... for an
    int N or a list of layer indices; every layer (``model``) when ``freeze`` is not set."""
    if freeze is None or freeze == 0 or freeze == []:
        return ["model"]
    layers = range(freeze) if isinstance(freeze, int) else freeze
    return [f"model.{x}" for x in layers]


class FrozenBN:
    """Mixin for an Ultralytics trainer: the model's BatchNorm layers frozen for good.

    Class attributes (set them on a subclass):

    * ``include`` / ``exclude``: which BatchNorm layers, as in
      :func:`~frozennorm.convert_frozen_bn` (``include=None``: the layers ``freeze=``
      freezes, see :func:`freeze_scope`);
    * ``trainable_affine``: weight and bias stay Parameters that train (where ``freeze=``
      lets them), only the running statistics are frozen; the optimizer treats them as
      Ultralytics treats BatchNorm's (see :func:`norm_weights_without_decay`);
    * ``portable_checkpoints``: save checkpoints with plain ``nn.BatchNorm2d`` layers,
      which load where frozennorm is not installed.
    """

    include: Patterns = None
    exclude: Patterns = None
    trainable_affine: bool = False
    portable_checkpoints: bool = False

    def get_model(self, cfg=None, weights=None, verbose=True):
        model = super().get_model(cfg=cfg, weights=weights, verbose=verbose)  # type: ignore[misc]
        include = self.include if self.include is not None else freeze_scope(self.args.freeze)
        # "source": the model's own Parameters; Ultralytics' freeze= sets requires_grad later
        return convert_frozen_bn(model, include=include, exclude=self.exclude,
                                 trainable_affine="source" if self.trainable_affine else False)

    def build_optimizer(self, model, *args, **kwargs):
        optimizer = super().build_optimizer(model, *args, **kwargs)  # type: ignore[misc]
        moved = norm_weights_without_decay(optimizer, model)
        if moved:  # Ultralytics' own log line, just printed, counts them as decayed
            LOGGER.info(f"frozennorm: {moved} frozen BatchNorm weight(s) moved into the "
                        f"weight(decay=0.0) group, as Ultralytics groups BatchNorm weights")
        return optimizer

    def save_model(self):
        if not self.portable_checkpoints:
            return super().save_model()  # type: ignore[misc]
        ema = self.ema.ema
        self.ema.ema = portable(ema)
        try:
            return super().save_model()  # type: ignore[misc]
        finally:
            self.ema.ema = ema


class FrozenBNDetectionTrainer(FrozenBN, DetectionTrainer):
    """Ultralytics' ``DetectionTrainer`` with frozen BatchNorm (see :class:`FrozenBN`)."""


class FrozenBNSegmentationTrainer(FrozenBN, SegmentationTrainer):
    """Ultralytics' ``SegmentationTrainer`` with frozen BatchNorm (see :class:`FrozenBN`)."""


class FrozenBNPoseTrainer(FrozenBN, PoseTrainer):
    """Ultralytics' ``PoseTrainer`` with frozen BatchNorm (see :class:`FrozenBN`)."""


def norm_weights_without_decay(optimizer: torch.optim.Optimizer, model: nn.Module) -> int:
    """Moves the weights of frozen BatchNorm layers (those that are Parameters) into the
    groups Ultralytics' ``build_optimizer`` gives BatchNorm weights, in place; returns how
    many moved.

    ``build_optimizer`` puts the weights of every ``torch.nn`` class with "Norm" in its name
    in its ``"bn"`` group (no weight decay), and a frozen layer's in ``"weight"`` (decay).
    Each one goes to the ``"bn"`` group with the same other options (MuSGD's boosted head
    groups have their own), where it takes the place the unconverted model's BatchNorm
    weight has: the groups are then the unconverted model's, parameter for parameter.
    Call it before the first step (the optimizer holds no state yet)."""
    model = unwrap_model(model)
    order = {id(p): i for i, p in enumerate(p for m in model.modules()
                                            for p in m.parameters(recurse=False))}
    norm_weights = {id(p) for m in model.modules() if is_frozen_batchnorm(m)
                    for p in m.parameters(recurse=False)}
    groups = optimizer.param_groups

    def options(group: dict) -> dict:
        return {k: v for k, v in group.items() if k not in ("params", "weight_decay", "param_group")}

    moved = 0
    for group in groups:
        if group.get("param_group") != "weight":
            continue
        move = [p for p in group["params"] if id(p) in norm_weights]
        if not move:
            continue
        target = next((g for g in groups if g.get("param_group") == "bn"
                       and options(g) == options(group)), None)
        if target is None:
            raise RuntimeError(f"Ultralytics' optimizer has no 'bn' parameter group with the "
                               f"options {options(group)} for {len(move)} frozen BatchNorm "
                               f"weight(s) (its build_optimizer changed?)")
        group["params"] = [p for p in group["params"] if id(p) not in norm_weights]
        target["params"] = sorted(target["params"] + move, key=lambda p: order[id(p)])
        moved += len(move)
    return moved


def portable(model: nn.Module) -> nn.Module:
    """A copy of ``model`` without anything of frozennorm: frozen BatchNorm layers become
    ``nn.BatchNorm2d`` (same statistics), forwards :func:`~frozennorm.fuse` rewrote are
    dropped. What a fold left (an inference fold's identities, a training fold) cannot be
    undone: run the framework's own ``fuse()`` first, or fold for inference and fuse."""
    copy_ = unfuse(revert_frozen_bn(copy.deepcopy(model)))
    left = sorted({type(m).__name__ for m in copy_.modules()
                   if type(m).__module__.partition(".")[0] == "frozennorm"})
    if left:
        raise ValueError(
            f"the model still holds frozennorm modules after reverting its frozen BatchNorm "
            f"layers: {', '.join(left)} (from fold_frozen_bn). An inference fold's "
            f"IdentityBatchNorm goes with Ultralytics' model.fuse(); a training fold needs "
            f"frozennorm.fold_frozen_bn(model) (inference) first")
    return copy_


def portable_checkpoint(path: Union[str, Path], out: Optional[Union[str, Path]] = None) -> Path:
    """Rewrites an Ultralytics checkpoint (``last.pt``, ``best.pt``) so that it loads
    without frozennorm: its ``model`` and ``ema`` entries through :func:`portable`. Writes
    ``out`` (default: ``<name>_portable.pt`` beside it) and returns its path."""
    path = Path(path)
    out = Path(out) if out is not None else path.with_name(f"{path.stem}_portable{path.suffix}")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    for key in ("model", "ema"):
        if isinstance(ckpt.get(key), nn.Module):
            ckpt[key] = portable(ckpt[key])
    torch.save(ckpt, out)
    return out
