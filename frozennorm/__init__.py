"""frozennorm: BatchNorm frozen correctly and fast, for fine-tuning detection backbones.

* :class:`FrozenBatchNorm1d` / ``2d`` / ``3d`` — buffers-only BatchNorm in inference mode on
  one fused C++/CUDA op (forward and backward), exact where ``x * scale + shift`` is not.
* :func:`frozen_batch_norm` — the functional form, arguments as ``F.batch_norm``.
* :func:`convert_frozen_bn` / :func:`revert_frozen_bn` — freeze (unfreeze) every BatchNorm of
  a model, torchvision/timm/detectron2/apex layers included; :class:`FrozenBatchNormAct2d`
  for timm's BatchNorm+activation layers.
* :func:`audit` / :func:`assert_frozen` — what each normalisation layer will do next forward.
* :func:`frozen_batch_norm_act` — frozen BN (+ residual) + ReLU/ReLU6/SiLU in one kernel each
  way; :func:`fuse` puts it into a model's forwards, :func:`fold_frozen_bn` folds frozen BN
  into the convolutions before them.
"""
from .version import __version__
from .ops import ACTIVATIONS, COMPILED, frozen_batch_norm, frozen_batch_norm_act
from .modules import FrozenBatchNorm, FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d
from .act import FrozenBatchNormAct2d
from .convert import (ConversionRecord, ConversionReport, FrozenNormWarning, SkipReason,
                      convert_frozen_bn, revert_frozen_bn)
from .diagnostics import AuditRow, AuditTable, NotFrozenError, assert_frozen, audit
from .fuse import FusedSite, FuseReport, SkippedLayer, UntraceableError, fuse
from .fold import (FoldedConv1d, FoldedConv2d, FoldedConv3d, FoldedFrozenBatchNorm,
                   FoldedFrozenBatchNormAct2d, FoldedPair, FoldReport, IdentityBatchNorm,
                   fold_frozen_bn)

__all__ = [
    "__version__",
    "COMPILED",
    "frozen_batch_norm",
    "frozen_batch_norm_act",
    "ACTIVATIONS",
    "FrozenBatchNorm",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "FrozenBatchNormAct2d",
    "convert_frozen_bn",
    "revert_frozen_bn",
    "ConversionReport",
    "ConversionRecord",
    "SkipReason",
    "FrozenNormWarning",
    "audit",
    "assert_frozen",
    "AuditRow",
    "AuditTable",
    "NotFrozenError",
    "fuse",
    "FuseReport",
    "FusedSite",
    "SkippedLayer",
    "UntraceableError",
    "fold_frozen_bn",
    "FoldReport",
    "FoldedPair",
    "FoldedConv1d",
    "FoldedConv2d",
    "FoldedConv3d",
    "FoldedFrozenBatchNorm",
    "FoldedFrozenBatchNormAct2d",
    "IdentityBatchNorm",
]
