"""Quantization of models with frozen BatchNorm (torch.ao eager and FX, torchao PT2E).

Quantization tools match BatchNorm by type (``(nn.Conv2d, nn.BatchNorm2d)`` and the like)
and fold it into the convolution before it. A frozen BatchNorm's affine map never changes,
so folding it is exact for good, and post-training and quantization-aware training alike
quantize the folded convolution:

* **Eager mode**: frozennorm adds its layers to torch.ao's default fuser table when it is
  imported, so ``torch.ao.quantization.fuse_modules(model, [["conv", "bn", "relu"]])``
  (and ``fuse_modules_qat``) fuse a conv with a frozen BatchNorm (any frozennorm class,
  the shift-only layer an inference fold leaves, ``IdentityBatchNorm``), and a ReLU,
  where the BatchNorm model fuses a conv with ``nn.BatchNorm2d``: post-training into the
  conv (torch's own fold, the same bits as for the BatchNorm model), for QAT into a conv
  that trains the folded weights (a frozen BatchNorm keeps no statistics that QAT could
  update; ``nni.ConvBn2d`` would update them).
* **FX mode** (``prepare_fx``/``prepare_qat_fx``) traces through frozen layers and would
  leave them in float between dequantize/quantize: it stops instead, with an error that
  says to fold first (``fold_frozen_bn(model, shift="conv_bias")``: then the model has
  the convolutions, biases and ReLUs a BatchNorm model has once FX fused it).
* **PT2E** (torchao, ``torch.export``): the frozen layers export as elementwise ops, which
  the quantizers leave in float; fold first, as for FX.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
from torch import fx, nn

from .act import FrozenBatchNormAct2d, activation_of_module
from .modules import FrozenBatchNorm, FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d

__all__ = ["fuser_method_mapping", "check_not_quantization_tracing"]

_FIX = ("fold them into the convolutions before them first, "
        "model = frozennorm.fold_frozen_bn(model, shift=\"conv_bias\") (the model then has the "
        "convolutions, biases and ReLUs a BatchNorm model has once quantization fused it)")


def check_not_quantization_tracing(module: nn.Module, input: object) -> None:
    """Raises where torch.ao's FX quantization traces into a frozen layer (``input`` is its
    Proxy): its patterns match ``nn.BatchNorm*d`` modules, so the layer would stay in float
    between dequantize and quantize."""
    tracer = getattr(input, "tracer", None)
    if tracer is None or not any(c.__name__ == "QuantizationTracer" and
                                 c.__module__.startswith("torch.ao.quantization")
                                 for c in type(tracer).__mro__):
        return
    try:
        name = repr(tracer.path_of_module(module))
    except NameError:
        name = "a layer"
    raise TypeError(
        f"torch.ao FX quantization (prepare_fx/prepare_qat_fx) reached the frozen BatchNorm "
        f"{name} ({type(module).__name__}): its patterns match nn.BatchNorm modules, so it "
        f"would stay in float between dequantize and quantize. Frozen BatchNorm layers are "
        f"folded, never updated: {_FIX}. A layer no convolution precedes stays frozen "
        f"BatchNorm: revert it for quantization, "
        f"frozennorm.revert_frozen_bn(model, include={name if name != 'a layer' else '...'})"
        f".eval().")


def _folded(conv: nn.Module, bn: nn.Module) -> nn.Module:
    """A copy of ``conv`` with ``bn`` folded in: torch's own fold (what the BatchNorm model
    gets), trainable as the conv's weight was, in the conv's mode."""
    training = conv.training
    fold = (nn.utils.fusion.fuse_linear_bn_eval if isinstance(conv, nn.Linear)
            else nn.utils.fusion.fuse_conv_bn_eval)
    try:
        return fold(conv.eval(), _EvalView(bn)).train(training)
    finally:
        conv.train(training)


class _EvalView:
    """What torch's fold reads of a BatchNorm (``training`` False: frozen layers are)."""

    training = False

    def __init__(self, bn: nn.Module) -> None:
        self.running_mean, self.running_var = bn.running_mean, bn.running_var
        self.weight, self.bias, self.eps = bn.weight, bn.bias, bn.eps


def _own_activation(bn: nn.Module) -> Optional[nn.Module]:
    """The ReLU a BN+activation layer runs (None for an identity); an error for others."""
    if not isinstance(bn, FrozenBatchNormAct2d):
        return None
    kind = activation_of_module(bn.act)
    if activation_of_module(bn.drop) != "identity" or kind not in ("identity", "relu"):
        raise NotImplementedError(
            f"Cannot fuse a convolution with a {type(bn).__name__} whose act is "
            f"{type(bn.act).__name__} and drop {type(bn.drop).__name__}: quantized fused "
            f"modules end in a ReLU or nothing")
    return bn.act if kind == "relu" else None


def _with_relu(fused: nn.Module, relu: Optional[nn.Module]) -> nn.Module:
    if relu is None:
        return fused
    import torch.ao.nn.intrinsic as nni
    fused_cls = {nn.Conv1d: nni.ConvReLU1d, nn.Conv2d: nni.ConvReLU2d, nn.Conv3d: nni.ConvReLU3d,
                 nn.Linear: nni.LinearReLU}[type(fused)]
    return fused_cls(fused, relu)


def fuse_conv_frozen_bn(is_qat: bool, conv: nn.Module, bn: nn.Module) -> nn.Module:
    """torch.ao fuser method for ``(conv, frozen BatchNorm)``."""
    return _with_relu(_folded(conv, bn), _own_activation(bn))


def fuse_conv_frozen_bn_relu(is_qat: bool, conv: nn.Module, bn: nn.Module,
                             relu: nn.Module) -> nn.Module:
    """torch.ao fuser method for ``(conv, frozen BatchNorm, ReLU)``."""
    if _own_activation(bn) is not None:
        raise NotImplementedError(f"{type(bn).__name__} already ends in a ReLU")
    return _with_relu(_folded(conv, bn), relu)


def fuser_method_mapping() -> Dict[Tuple[type, ...], Callable[..., nn.Module]]:
    """torch.ao's fuser methods for frozennorm's layers, by module types: what
    ``fuse_custom_config_dict={"additional_fuser_method_mapping": ...}`` takes (frozennorm
    registers them as defaults when imported)."""
    from .fold import IdentityBatchNorm
    convs = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
    ranked = {1: (FrozenBatchNorm1d,), 2: (FrozenBatchNorm2d, FrozenBatchNormAct2d),
              3: (FrozenBatchNorm3d,)}
    mapping: Dict[Tuple[type, ...], Callable[..., nn.Module]] = {}
    for rank, conv in convs.items():
        for bn in ranked[rank] + (FrozenBatchNorm, IdentityBatchNorm):
            mapping[(conv, bn)] = fuse_conv_frozen_bn
            mapping[(conv, bn, nn.ReLU)] = fuse_conv_frozen_bn_relu
    for bn in (FrozenBatchNorm1d, FrozenBatchNorm, IdentityBatchNorm):
        mapping[(nn.Linear, bn)] = fuse_conv_frozen_bn
    return mapping


def _register_defaults() -> None:
    """Adds the mapping to torch.ao's default fuser table (a no-op on a torch without it)."""
    try:
        from torch.ao.quantization import fuser_method_mappings
    except ImportError:  # torch.ao.quantization is deprecated; once it is gone, nothing to do
        return
    table = getattr(fuser_method_mappings, "_DEFAULT_OP_LIST_TO_FUSER_METHOD", None)
    if isinstance(table, dict):
        for key, method in fuser_method_mapping().items():
            table.setdefault(key, method)


_register_defaults()
