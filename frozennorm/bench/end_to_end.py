"""End to end: a Faster R-CNN ResNet-50-FPN backbone (body + FPN) or a ResNet-50 body with
each way of freezing BatchNorm, a training step (forward, backward, SGD) and inference,
interleaved: BatchNorm in eval, torchvision's FrozenBatchNorm2d, frozennorm as converted,
frozennorm fused (:func:`~frozennorm.fuse` for training, :func:`~frozennorm.fold_frozen_bn`
for inference),
``torch.compile`` of the torchvision and of the frozennorm model, and BatchNorm removed
(``nn.Identity``) as the lower bound."""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..convert import convert_frozen_bn
from ..fold import fold_frozen_bn
from ..fuse import fuse
from .cases import DTYPES, LAYOUTS
from .contenders import torchvision_frozen
from .memory import cuda_peak_bytes, forward_footprint
from .results import Result
from .timing import Progress, Timer, make_timer, timed_rounds

VARIANTS: Dict[str, str] = {
    "bn_eval": "nn.BatchNorm2d eval",
    "torchvision": "torchvision FrozenBN",
    "frozennorm": "frozennorm",
    "frozennorm_fold": "frozennorm fuse/fold",
    "compiled_tv": "torch.compile(torchvision)",
    "compiled_frozennorm": "torch.compile(frozennorm)",
    "identity": "no BN (identity)",
}
#: Variants compiled with torch.compile: minutes of compilation each on a small CPU, so
#: only ``--full`` (or ``--e2e-variants``) runs them.
COMPILED = ("compiled_tv", "compiled_frozennorm")
QUICK_VARIANTS = [v for v in VARIANTS if v not in COMPILED]


@dataclass(frozen=True)
class E2ECase:
    """The backbone on ``batch`` images of ``height`` x ``width``; half dtypes by autocast."""

    batch: int
    height: int
    width: int
    dtype: str
    layout: str
    mode: str
    model: str = "fpn"

    @property
    def label(self) -> str:
        return (f"{MODELS[self.model][0]} {self.batch}x3x{self.height}x{self.width} "
                f"{self.dtype} {self.layout} {self.mode}")


@dataclass
class E2EResult(Result):
    """One variant (``name``) on one end-to-end configuration."""

    x_identity: Optional[float] = None
    bn_share: Optional[float] = None

    LABELS = VARIANTS
    NAME_KEY = "variant"


def backbone() -> nn.Module:
    """torchvision's Faster R-CNN backbone: ResNet-50 body + FPN, random weights, no
    download; conv1 and layer1 frozen as in detection fine-tuning (trainable_layers=3)."""
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    return resnet_fpn_backbone(backbone_name="resnet50", weights=None,
                               norm_layer=nn.BatchNorm2d, trainable_layers=3)


def resnet50_body() -> nn.Module:
    """torchvision's ResNet-50 without its pooling and classifier (stem and the four
    stages), random weights, every layer trainable."""
    from torchvision.models import resnet50

    return nn.Sequential(*list(resnet50(weights=None).children())[:-2])


#: model key -> (display name, builder)
MODELS: Dict[str, Tuple[str, Callable[[], nn.Module]]] = {
    "fpn": ("R50-FPN backbone", backbone),
    "resnet50": ("ResNet-50 body", resnet50_body),
}


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BatchNorm statistics and affine parameters (a trained model's are not 0 and
    1), so that no variant is timed on a special case."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
                m.weight.uniform_(0.2, 1.0, generator=gen)
                m.bias.normal_(0, 0.2, generator=gen)
    return model


def replace_bn(module: nn.Module, make: Callable[[nn.BatchNorm2d], nn.Module]) -> nn.Module:
    """Replaces every ``nn.BatchNorm2d`` below ``module`` by ``make(bn)``, in place."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, make(child))
        else:
            replace_bn(child, make)
    return module


def make_variant(base: nn.Module, variant: str, mode: str = "training",
                 memory_format: torch.memory_format = torch.contiguous_format) -> nn.Module:
    """A copy of ``base`` with its BatchNorm frozen the ``variant`` way, for ``mode``:
    fuse/fold fuses for training (:func:`fuse`: BN + activation + residual in one pass) and
    folds for inference (:func:`fold_frozen_bn`: weights rewritten once)."""
    model = copy.deepcopy(base)
    if variant == "bn_eval":
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.requires_grad_(False)  # frozen affine, like the frozen modules
        return model
    if variant in ("frozennorm", "compiled_frozennorm", "frozennorm_fold"):
        model = convert_frozen_bn(model, trainable_affine=False, strict=True)  # the library's own converter
        if variant == "frozennorm_fold":
            model = (fuse(model, inplace=True) if mode == "training"
                     else fold_frozen_bn(model, inplace=True))
    else:
        make = {"torchvision": torchvision_frozen, "compiled_tv": torchvision_frozen,
                "identity": lambda bn: nn.Identity()}[variant]
        model = replace_bn(model, make)
    model = model.to(memory_format=memory_format)
    if variant in COMPILED:
        model = torch.compile(model)
    return model


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
            out = model(x)
            maps = out.values() if isinstance(out, dict) else [out]
            loss = sum(f.float().mean() for f in maps)
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
    if any(v in COMPILED for v in variants):
        torch._dynamo.reset()  # each configuration compiles afresh, within Dynamo's cache limit
    samplers = {}
    for result in results:
        try:
            model = make_variant(base, result.name, case.mode, fmt)
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
        variants: Sequence[str] = tuple(QUICK_VARIANTS), progress: bool = True,
        retries: int = 0) -> List[E2EResult]:
    timer = make_timer(device, min_run_time)
    bases: Dict[str, nn.Module] = {}
    bar = Progress(len(cases), "end to end") if progress else None
    out: List[E2EResult] = []
    for case in cases:
        if case.model not in bases:
            torch.manual_seed(0)
            bases[case.model] = randomize_bn(MODELS[case.model][1]()).to(device)
        if bar:
            bar.step(case.label)
        out.extend(run_config(bases[case.model], case, device, timer, rounds, variants,
                              retries))
    if bar:
        bar.close()
    return out
