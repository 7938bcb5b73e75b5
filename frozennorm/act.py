"""FrozenBatchNormAct2d: a frozen BatchNorm2d followed by dropout and an activation.

The frozen counterpart of timm's ``BatchNormAct2d`` family (``BatchNormAct2d``,
``SyncBatchNormAct``, ``FrozenBatchNormAct2d``), which are BatchNorm layers that also run
``self.drop`` and ``self.act``: a converter that swapped them for a plain frozen BN would
silently drop the activation.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Union

import torch
from torch import Tensor, nn

from .modules import FrozenBatchNorm2d, register_fusable_forward

__all__ = ["FrozenBatchNormAct2d"]

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


def own_activation(module: nn.Module) -> Optional[str]:
    """The fused op's name for ``module.act`` when ``module.drop`` is an identity (what a
    BN+activation layer can compute in its own single pass); None otherwise."""
    if activation_of_module(module.drop) != "identity":
        return None
    return activation_of_module(module.act)


def bn_act_forward(module: nn.Module, bn: Callable[..., Tensor], input: Tensor,
                   residual: Optional[Tensor], activation: str,
                   inplace_add: bool = False) -> Tensor:
    """``act(drop(bn(input)))`` for a BN+activation layer whose BatchNorm part is
    ``bn(input, residual=None, activation="identity")``: one pass when ``act`` is a
    ReLU/ReLU6/SiLU/identity and ``drop`` an identity. A ``residual`` and an
    ``activation`` (a call from a forward fuse() rewrote) need both to be identities."""
    own = own_activation(module)
    if own != "identity" and (residual is not None or activation != "identity"):
        raise ValueError(
            f"{type(module).__name__}: a residual and an activation are taken only when its "
            f"own drop and act are identities (act={type(module.act).__name__}, "
            f"drop={type(module.drop).__name__})")
    if own is None:
        return module.act(module.drop(bn(input)))
    return bn(input, residual, own if activation == "identity" else activation, inplace_add)


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
                 trainable_affine: bool = False, device: Optional[torch.device] = None,
                 dtype: Optional[torch.dtype] = None) -> None:
        super().__init__(num_features, eps, trainable_affine=trainable_affine, device=device,
                         dtype=dtype)
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, input: Tensor, residual: Optional[Tensor] = None,
                activation: str = "identity", inplace_add: bool = False) -> Tensor:
        """``act(drop(bn(input)))``, in one fused pass each way when ``act`` is a ReLU,
        ReLU6, SiLU or identity and ``drop`` an identity. With both identities it takes a
        ``residual`` and an ``activation`` as :class:`FrozenBatchNorm2d` does."""
        if torch.jit.is_scripting():
            # the same decision as bn_act_forward, taken when the module was scripted
            own = self._scripted_activation
            if own != "identity" and (residual is not None or activation != "identity"):
                raise ValueError("FrozenBatchNormAct2d: a residual and an activation are taken "
                                 "only when its own drop and act are identities")
            if own == "":
                return self.act(self.drop(self._normalize(input, None, "identity")))
            return self._normalize(input, residual,
                                   own if activation == "identity" else activation, inplace_add)
        return bn_act_forward(self, self._normalize, input, residual, activation, inplace_add)

    def __prepare_scriptable__(self) -> "FrozenBatchNormAct2d":
        # torch.jit.script calls this first: which of act/drop the fused op computes is
        # decided by their types, which TorchScript cannot test, so it is decided here
        # ("" where act or drop is another module, run after the frozen BatchNorm).
        self._scripted_activation = own_activation(self) or ""
        return self

    @classmethod
    def from_batchnorm(cls, bn: nn.Module, eps: Optional[float] = None,
                       trainable_affine: Union[bool, str] = False) -> "FrozenBatchNormAct2d":
        """A frozen copy of ``bn`` (statistics copied) that takes over its ``act``/``drop``.

        Any BatchNorm-like module is accepted (see
        :meth:`FrozenBatchNorm.from_batchnorm`); one without ``act``/``drop`` submodules
        gives identities.
        """
        frozen = super().from_batchnorm(bn, eps, trainable_affine)
        assert isinstance(frozen, FrozenBatchNormAct2d)
        for name in ("drop", "act"):
            sub = getattr(bn, name, None)
            if isinstance(sub, nn.Module):
                setattr(frozen, name, sub)
        # the source's order (timm's sync conversion registers act first)
        for name in [n for n in bn._modules if n in ("drop", "act")]:
            frozen._modules[name] = frozen._modules.pop(name)
        return frozen


register_fusable_forward(FrozenBatchNormAct2d.forward)
