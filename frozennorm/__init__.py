"""frozennorm: BatchNorm frozen correctly and fast, for fine-tuning detection backbones.

* :class:`FrozenBatchNorm1d` / ``2d`` / ``3d`` (and :class:`FrozenBatchNorm`, any rank) —
  buffers-only BatchNorm in inference mode on one fused C++/CUDA op (forward and backward),
  exact where ``x * scale + shift`` is not; :class:`FrozenBatchNormAct2d` for timm's
  BatchNorm+activation layers.
* :func:`frozen_batch_norm` / :func:`frozen_batch_norm_act` — the functional forms (the
  second adds a residual and ReLU/ReLU6/SiLU in the same pass).
* :func:`convert_frozen_bn` / :func:`revert_frozen_bn` — freeze (unfreeze) every BatchNorm of
  a model, torchvision/timm/detectron2/apex layers included.
* :func:`audit` / :func:`assert_frozen` — what each normalisation layer will do next forward.
* :func:`fuse` — BN + add + activation in one pass, in the modules' forwards;
  :func:`fold_frozen_bn` — frozen BN folded into the convolutions before them.

The rest is one import away: the reports and records (``frozennorm.convert``,
``frozennorm.diagnostics``, ``frozennorm.fuse``, ``frozennorm.fold``), the modules a fold
leaves (``frozennorm.fold``), ``frozennorm.ops.COMPILED``, framework integrations
(``frozennorm.integrations``), ``python -m frozennorm.info``, ``python -m frozennorm.bench``.
"""
from .version import __version__
from .ops import frozen_batch_norm, frozen_batch_norm_act
from .modules import FrozenBatchNorm, FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d
from .act import FrozenBatchNormAct2d
from .convert import FrozenNormWarning, convert_frozen_bn, revert_frozen_bn
from .diagnostics import NotFrozenError, assert_frozen, audit
from .fuse import UntraceableError, fuse
from .fold import fold_frozen_bn
from . import quantization  # noqa: F401  (registers torch.ao's fuser methods for frozen layers)

__all__ = [
    "__version__",
    "FrozenBatchNorm",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "FrozenBatchNormAct2d",
    "frozen_batch_norm",
    "frozen_batch_norm_act",
    "convert_frozen_bn",
    "revert_frozen_bn",
    "audit",
    "assert_frozen",
    "fuse",
    "fold_frozen_bn",
    "NotFrozenError",
    "FrozenNormWarning",
    "UntraceableError",
]
