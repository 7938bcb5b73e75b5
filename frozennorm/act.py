"""FrozenBatchNormAct2d: a frozen BatchNorm2d followed by dropout and an activation.

The frozen counterpart of timm's ``BatchNormAct2d`` family (``BatchNormAct2d``,
``SyncBatchNormAct``, ``FrozenBatchNormAct2d``), which are BatchNorm layers that also run
``self.drop`` and ``self.act``: a converter that swapped them for a plain frozen BN would
silently drop the activation.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import Tensor, nn

from .modules import FrozenBatchNorm2d
from .ops import frozen_batch_norm_act

__all__ = ["FrozenBatchNormAct2d"]

torch.fx.wrap("frozen_batch_norm_act")  # one call in torch.fx graphs (see modules.py)

#: Activation modules the fused op computes, by exact type.
ACTIVATION_MODULES: Dict[type, str] = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.SiLU: "silu"}


def has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or getattr(module, "_backward_pre_hooks", None))


def activation_of_module(module: Optional[nn.Module]) -> Optional[str]:
    """"relu"/"relu6"/"silu"/"identity" for the activation modules the fused op computes."""
    if module is None or has_hooks(module):
        return None
    return "identity" if type(module) is nn.Identity else ACTIVATION_MODULES.get(type(module))


class FrozenBatchNormAct2d(FrozenBatchNorm2d):
    """Frozen ``BatchNorm2d``, then ``drop``, then ``act``: ``act(drop(frozen_bn(x)))``.

    With ``act`` a ReLU, ReLU6, SiLU or identity and no dropout, the whole layer runs as one
    fused kernel forward and one backward (:func:`frozennorm.frozen_batch_norm_act`).

    The statistics are buffers as in :class:`FrozenBatchNorm2d`; ``drop`` and ``act`` are
    submodules named as in timm's ``BatchNormAct2d``, so a timm model's state dict loads
    with ``strict=True`` and the output equals timm's eval-mode output. Both default to
    ``nn.Identity``. ``drop`` keeps its own train/eval behaviour (timm's BN+act layers use
    dropout-like layers such as DropBlock there).

    :meth:`from_batchnorm` moves the source's ``act`` and ``drop`` modules over rather
    than copying them: an activation with parameters (``PReLU``) stays the one the
    optimizer already holds.
    """


    def __init__(self, num_features: int, eps: float = 1e-5, *,
                 act: Optional[nn.Module] = None, drop: Optional[nn.Module] = None,
                 device: Optional[torch.device] = None,
                 dtype: Optional[torch.dtype] = None) -> None:
        super().__init__(num_features, eps, device=device, dtype=dtype)
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, input: Tensor) -> Tensor:
        # ReLU/ReLU6/SiLU/identity without dropout: one fused kernel each way
        activation = activation_of_module(self.act) if type(self.drop) is nn.Identity else None
        if activation is not None:
            self._check_input(input)
            weight, bias, mean, var = self._stats(input)
            return frozen_batch_norm_act(input, mean, var, weight, bias, self.eps, activation)
        return self.act(self.drop(super().forward(input)))

    @classmethod
    def from_batchnorm(cls, bn: nn.Module) -> "FrozenBatchNormAct2d":
        """A frozen copy of ``bn`` (statistics copied) that takes over its ``act``/``drop``.

        Any BatchNorm-like module is accepted (see
        :meth:`FrozenBatchNorm.from_batchnorm`); one without ``act``/``drop`` submodules
        gives identities.
        """
        frozen = super().from_batchnorm(bn)
        assert isinstance(frozen, FrozenBatchNormAct2d)
        for name in ("drop", "act"):
            sub = getattr(bn, name, None)
            if isinstance(sub, nn.Module):
                setattr(frozen, name, sub)
        # the source's order (timm's sync conversion registers act first)
        for name in [n for n in bn._modules if n in ("drop", "act")]:
            frozen._modules[name] = frozen._modules.pop(name)
        return frozen
