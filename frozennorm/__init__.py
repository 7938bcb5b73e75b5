"""frozennorm: BatchNorm frozen correctly and fast, for fine-tuning detection backbones.

* :class:`FrozenBatchNorm1d` / ``2d`` / ``3d`` — buffers-only BatchNorm in inference mode on
  one fused C++/CUDA op (forward and backward), exact where ``x * scale + shift`` is not.
* :func:`frozen_batch_norm` — the functional form, arguments as ``F.batch_norm``.
"""
from .version import __version__
from .ops import COMPILED, frozen_batch_norm
from .modules import FrozenBatchNorm, FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d

__all__ = [
    "__version__",
    "COMPILED",
    "frozen_batch_norm",
    "FrozenBatchNorm",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
]
