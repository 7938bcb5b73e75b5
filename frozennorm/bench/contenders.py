"""The contenders: frozennorm and the ways people freeze BatchNorm today, built from one BN."""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..modules import FrozenBatchNorm2d

#: Display names, in table order. ``clone`` is the memory-bandwidth floor, not a BatchNorm.
LABELS: Dict[str, str] = {
    "clone": "x.clone() (floor)",
    "frozennorm": "frozennorm",
    "bn_eval": "nn.BatchNorm2d eval",
    "torchvision": "torchvision FrozenBN",
    "detectron2": "detectron2 way",
    "compiled_tv": "torch.compile(torchvision)",
}
CONTENDERS = list(LABELS)
PEERS = [n for n in CONTENDERS if n not in ("clone", "frozennorm")]


class Detectron2Style(nn.Module):
    """Frozen BN computed the way detectron2 does: ``F.batch_norm`` in inference when no
    gradient is needed, else ``x * scale + shift`` with scale/shift cast to the input's
    dtype (reimplemented here; detectron2 is not imported)."""

    def __init__(self, bn: nn.BatchNorm2d) -> None:
        super().__init__()
        self.eps = bn.eps
        for name in ("weight", "bias", "running_mean", "running_var"):
            self.register_buffer(name, getattr(bn, name).detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        if not x.requires_grad:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                training=False, eps=self.eps)
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.to(x.dtype).view(1, -1, 1, 1) + shift.to(x.dtype).view(1, -1, 1, 1)


def reference_bn(channels: int, device: str, seed: int = 0) -> nn.BatchNorm2d:
    """A BatchNorm2d in eval mode with random statistics and frozen affine parameters."""
    gen = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.running_mean.normal_(generator=gen)
        bn.running_var.uniform_(0.5, 2.0, generator=gen)
        bn.weight.normal_(generator=gen)
        bn.bias.normal_(generator=gen)
    bn.requires_grad_(False)
    return bn.to(device).eval()


def torchvision_frozen(bn: nn.BatchNorm2d) -> nn.Module:
    """torchvision's FrozenBatchNorm2d holding ``bn``'s statistics (ImportError without it)."""
    from torchvision.ops.misc import FrozenBatchNorm2d as TorchvisionFrozenBN

    tv = TorchvisionFrozenBN(bn.num_features, eps=bn.eps).to(bn.running_mean.device)
    tv.load_state_dict(bn.state_dict(), strict=False)  # num_batches_tracked is not a buffer there
    return tv


def compiled_torchvision(bn: nn.BatchNorm2d) -> nn.Module:
    """``torch.compile`` of torchvision's module, static shapes; Dynamo's caches are reset
    first, so each case compiles afresh instead of hitting the recompile limit."""
    torch._dynamo.reset()
    return torch.compile(torchvision_frozen(bn), dynamic=False)


BUILDERS: Dict[str, Callable[[nn.BatchNorm2d], Optional[nn.Module]]] = {
    "clone": lambda bn: None,
    "frozennorm": FrozenBatchNorm2d.from_batchnorm,
    "bn_eval": lambda bn: bn,
    "torchvision": torchvision_frozen,
    "detectron2": Detectron2Style,
    "compiled_tv": compiled_torchvision,
}


def forward_of(module: Optional[nn.Module], x: Tensor, mode: str) -> Callable[[], Tensor]:
    """The forward: under ``no_grad`` in inference (and for the floor, ``x.clone()``); in
    training ``x`` must require grad."""
    if module is not None and mode == "training":
        return lambda: module(x)

    def forward() -> Tensor:
        with torch.no_grad():
            return x.clone() if module is None else module(x)
    return forward


def harness(module: Optional[nn.Module], x: Tensor, grad: Tensor, mode: str
            ) -> Callable[[], object]:
    """The timed call. inference: the forward under ``no_grad``. training: forward and the
    gradient to ``x`` (which requires grad) through ``autograd.grad``, so nothing
    accumulates. The floor (``module=None``) copies ``x``, and in training also ``grad``:
    one ideal pass each way."""
    forward = forward_of(module, x, mode)
    if mode == "inference":
        return forward
    if module is None:
        return lambda: (forward(), grad.clone())
    grad_out = grad.to(forward().dtype)  # torchvision's module makes half input float32

    def step() -> object:
        return torch.autograd.grad(forward(), x, grad_out)
    return step
