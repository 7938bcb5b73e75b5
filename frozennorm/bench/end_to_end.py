"""End to end: a Faster R-CNN ResNet-50-FPN backbone (body + FPN) with each way of freezing
BatchNorm, a training step (forward, backward, SGD) and inference, interleaved."""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from ..convert import convert_frozen_bn
from .cases import DTYPES, LAYOUTS
from .contenders import torchvision_frozen
from .memory import cuda_peak_bytes, forward_footprint
from .results import Result
from .timing import Progress, Timer, make_timer, timed_rounds

VARIANTS: Dict[str, str] = {
    "bn_eval": "nn.BatchNorm2d eval",
    "torchvision": "torchvision FrozenBN",
    "frozennorm": "frozennorm",
    "identity": "no BN (identity)",
}


@dataclass(frozen=True)
class E2ECase:
    """The backbone on ``batch`` images of ``height`` x ``width``; half dtypes by autocast."""

    batch: int
    height: int
    width: int
    dtype: str
    layout: str
    mode: str

    @property
    def label(self) -> str:
        return f"{self.batch}x3x{self.height}x{self.width} {self.dtype} {self.layout} {self.mode}"


@dataclass
class E2EResult(Result):
    """One variant (``name``) on one end-to-end configuration."""

    x_identity: Optional[float] = None
    bn_share: Optional[float] = None
    saved_bytes: Optional[int] = None
    memory_bytes: Optional[int] = None

    LABELS = VARIANTS
    NAME_KEY = "variant"


def backbone() -> nn.Module:
    """torchvision's Faster R-CNN backbone: ResNet-50 body + FPN, random weights, no
    download; conv1 and layer1 frozen as in detection fine-tuning (trainable_layers=3)."""
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    return resnet_fpn_backbone(backbone_name="resnet50", weights=None,
                               norm_layer=nn.BatchNorm2d, trainable_layers=3)


def replace_bn(module: nn.Module, make: Callable[[nn.BatchNorm2d], nn.Module]) -> nn.Module:
    """Replaces every ``nn.BatchNorm2d`` below ``module`` by ``make(bn)``, in place."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, make(child))
        else:
            replace_bn(child, make)
    return module


def make_variant(base: nn.Module, variant: str) -> nn.Module:
    model = copy.deepcopy(base)
    if variant == "bn_eval":
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.requires_grad_(False)  # frozen affine, like the frozen modules
        return model
    if variant == "frozennorm":
        return convert_frozen_bn(model, strict=True)  # the library's own converter
    make = {"torchvision": torchvision_frozen, "identity": lambda bn: nn.Identity()}[variant]
    return replace_bn(model, make)


def set_mode(model: nn.Module, variant: str, mode: str) -> None:
    """train() for a training step with BN layers back in eval() (what mmdet's norm_eval
    does); eval() for inference."""
    model.train(mode == "training")
    if variant == "bn_eval":
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()


def _autocast(device: str, dtype: str):
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=DTYPES[dtype])


def make_call(model: nn.Module, case: E2ECase, x: Tensor, device: str) -> Callable[[], object]:
    """One training step (forward, a scalar loss over the FPN maps, backward, SGD) or one
    inference forward under no_grad."""
    if case.mode == "inference":
        def infer() -> object:
            with torch.no_grad(), _autocast(device, case.dtype):
                return model(x)
        return infer
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-6, momentum=0.9)

    def step() -> object:
        opt.zero_grad(set_to_none=True)
        with _autocast(device, case.dtype):
            loss = sum(f.float().mean() for f in model(x).values())
        loss.backward()
        opt.step()
        return loss
    return step


def run_config(base: nn.Module, case: E2ECase, device: str, timer: Timer, rounds: int,
               variants: Sequence[str], retries: int = 0) -> List[E2EResult]:
    """All variants on one configuration, timed in the same interleaved rounds."""
    torch.manual_seed(0)
    fmt = LAYOUTS[case.layout]
    x = torch.randn(case.batch, 3, case.height, case.width, device=device)
    x = x.contiguous(memory_format=fmt)
    results = [E2EResult(case, v) for v in variants]
    samplers = {}
    for result in results:
        try:
            model = make_variant(base, result.name).to(memory_format=fmt)
            set_mode(model, result.name, case.mode)
            call = make_call(model, case, x, device)
            call()
            if case.mode == "training":
                with _autocast(device, case.dtype):
                    result.saved_bytes = forward_footprint(lambda: model(x))[0]
            if device.startswith("cuda"):
                result.memory_bytes = cuda_peak_bytes(call, device)
            samplers[result.name] = timer.prepare(call, number=1)  # a step is long
        except Exception as exc:  # record and go on
            result.failed(exc)
    stats, load = timed_rounds(samplers, rounds, retries)
    ref = stats.get("identity")
    for result in results:
        result.foreign_load = load
        st = stats.get(result.name)
        if st is None:
            continue
        result.stats = st
        if ref is not None:
            result.x_identity = st.median / ref.median
            result.bn_share = (st.median - ref.median) / st.median
    return results


def run(cases: Sequence[E2ECase], device: str, rounds: int, min_run_time: float,
        variants: Sequence[str] = tuple(VARIANTS), progress: bool = True,
        retries: int = 0) -> List[E2EResult]:
    timer = make_timer(device, min_run_time)
    torch.manual_seed(0)
    base = backbone().to(device)
    bar = Progress(len(cases), "end to end") if progress else None
    out: List[E2EResult] = []
    for case in cases:
        if bar:
            bar.step(case.label)
        out.extend(run_config(base, case, device, timer, rounds, variants, retries))
    if bar:
        bar.close()
    return out
