"""``python -m frozennorm.bench``: frozennorm side by side with the ways people freeze
BatchNorm today (``nn.BatchNorm2d`` in eval, torchvision's ``FrozenBatchNorm2d``, the
detectron2 way, ``torch.compile`` of torchvision's module), ``x.clone()`` as the
memory-bandwidth floor; op level on ResNet-50 detection/classification shapes, and a
Faster R-CNN ResNet-50-FPN backbone end to end. Also installed as ``frozennorm-bench``.
"""
from .cli import main

__all__ = ["main"]
