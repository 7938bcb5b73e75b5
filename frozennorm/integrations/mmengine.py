"""frozennorm in OpenMMLab's configs (mmengine, mmcv, mmdet 3.x): a norm type and an
optimizer-wrapper constructor, registered in mmengine's root registries when this module is
imported::

    custom_imports = dict(imports=["frozennorm.integrations.mmengine"],
                          allow_failed_imports=False)
    model = dict(backbone=dict(type="ResNet", depth=50, frozen_stages=1, norm_eval=True,
                               norm_cfg=dict(type="FrozenStatsBN", requires_grad=True)))
    optim_wrapper = dict(type="OptimWrapper", constructor="FrozenNormOptimWrapperConstructor",
                         optimizer=dict(type="SGD", lr=0.02, momentum=0.9, weight_decay=1e-4),
                         paramwise_cfg=dict(norm_decay_mult=0))

* ``norm_cfg=dict(type="FrozenStatsBN", requires_grad=True)`` (and ``FrozenStatsBN1d``,
  ``FrozenStatsBN2d``, ``FrozenStatsBN3d``) builds :class:`~frozennorm.FrozenBatchNorm2d`
  (1d, 3d) layers with frozen running statistics and ``weight``/``bias`` Parameters whose
  ``requires_grad`` is the config's, as ``type="BN"`` with ``norm_eval=True`` means in mmdet's
  ResNet configs, for good (``norm_eval`` holds only through the backbone's own ``train()``).
  The layers are named ``bn1``, ``bn2``, ... as with ``BN``, so BatchNorm checkpoints load
  into them (``num_batches_tracked`` is dropped). ``momentum`` is accepted and ignored:
  nothing updates the statistics. ``requires_grad=False`` freezes weight and bias too.
  (mmdet's own ``FrozenBN`` is detectron2's module: everything frozen, as buffers, and the
  unfused ``x * scale + shift``.)
* ``constructor="FrozenNormOptimWrapperConstructor"``: mmengine's
  ``DefaultOptimWrapperConstructor`` recognises norm layers by class (``_BatchNorm``,
  ``_InstanceNorm``, ``GroupNorm``, ``LayerNorm``), so ``paramwise_cfg`` options for norms
  (``norm_decay_mult``; ``bias_lr_mult`` and ``bias_decay_mult``, which spare norm biases)
  would treat a frozen layer's trainable weight and bias as a convolution's. This
  constructor gives them exactly what a BatchNorm's get: the same parameter groups as the
  unconverted model. It works with a model converted by
  ``convert_frozen_bn(..., trainable_affine="source")`` and with one built with the norm
  types above; it also serves as a base next to another constructor that derives from the
  default one (``class Mine(FrozenNormOptimWrapperConstructor, TheirConstructor)``).
"""
from __future__ import annotations

from typing import List, Optional, Union

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..modules import (FrozenBatchNorm, FrozenBatchNorm1d, FrozenBatchNorm2d,
                       FrozenBatchNorm3d, is_frozen_batchnorm)

try:
    from mmengine.optim import DefaultOptimWrapperConstructor
    from mmengine.registry import MODELS, OPTIM_WRAPPER_CONSTRUCTORS
except ImportError as e:  # pragma: no cover - exercised only without mmengine
    raise ImportError(f"frozennorm.integrations.mmengine needs mmengine "
                      f"(pip install mmengine): {e}") from e

__all__ = ["FrozenNormOptimWrapperConstructor", "FrozenStatsBN", "FrozenStatsBN1d",
           "FrozenStatsBN2d", "FrozenStatsBN3d"]


class _FrozenStatsNorm:
    """A norm type for ``build_norm_layer``: calling it builds the frozennorm module of its
    ``_frozen_class`` with trainable-affine Parameters (``build_norm_layer`` then sets their
    ``requires_grad`` from the config). A factory rather than a subclass, so that models hold
    frozennorm's own classes (checkpoints, ``revert_frozen_bn``, ``fuse`` see nothing new)."""

    #: mmcv's ``infer_abbr`` names the layers ``bn1``, ``bn2``, ... as for ``type="BN"``
    _abbr_ = "bn"
    _frozen_class: type = FrozenBatchNorm2d

    def __new__(cls, num_features: int, eps: float = 1e-5, momentum: Optional[float] = None,
                *, device: Optional[torch.device] = None,
                dtype: Optional[torch.dtype] = None) -> FrozenBatchNorm:  # type: ignore[misc]
        del momentum  # a BatchNorm option; the statistics of a frozen layer never update
        return cls._frozen_class(num_features, eps, trainable_affine=True, device=device,
                                 dtype=dtype)


class FrozenStatsBN(_FrozenStatsNorm):
    """``norm_cfg=dict(type="FrozenStatsBN", requires_grad=...)``: a
    :class:`~frozennorm.FrozenBatchNorm2d` with trainable-affine Parameters."""


class FrozenStatsBN1d(_FrozenStatsNorm):
    """``type="FrozenStatsBN1d"``: a :class:`~frozennorm.FrozenBatchNorm1d`, affine Parameters."""
    _frozen_class = FrozenBatchNorm1d


class FrozenStatsBN2d(FrozenStatsBN):
    """``type="FrozenStatsBN2d"``: the same as ``FrozenStatsBN``."""


class FrozenStatsBN3d(_FrozenStatsNorm):
    """``type="FrozenStatsBN3d"``: a :class:`~frozennorm.FrozenBatchNorm3d`, affine Parameters."""
    _frozen_class = FrozenBatchNorm3d


for _norm in (FrozenStatsBN, FrozenStatsBN1d, FrozenStatsBN2d, FrozenStatsBN3d):
    MODELS.register_module(module=_norm)


class _AsBatchNorm(_BatchNorm):
    """A frozen layer as mmengine's constructor should see it: a ``_BatchNorm`` with the
    layer's own parameters and children (it reads nothing else)."""

    def __init__(self, layer: nn.Module) -> None:
        nn.Module.__init__(self)
        object.__setattr__(self, "_layer", layer)  # not a submodule

    def named_parameters(self, *args, **kwargs):  # type: ignore[override]
        return self._layer.named_parameters(*args, **kwargs)

    def named_children(self):  # type: ignore[override]
        return self._layer.named_children()


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class FrozenNormOptimWrapperConstructor(DefaultOptimWrapperConstructor):
    """mmengine's ``DefaultOptimWrapperConstructor``, with frozennorm's layers (and other
    frozen BatchNorm layers) treated as the BatchNorm layers they replace by ``paramwise_cfg``
    (``norm_decay_mult``, ``bias_lr_mult``, ``bias_decay_mult``, ...): a converted model
    gets the unconverted model's parameter groups, parameter for parameter."""

    def add_params(self, params: List[dict], module: nn.Module, prefix: str = "",
                   is_dcn_module: Optional[Union[int, float]] = None) -> None:
        if is_frozen_batchnorm(module):
            module = _AsBatchNorm(module)
        super().add_params(params, module, prefix=prefix, is_dcn_module=is_dcn_module)
