"""convert_frozen_bn / revert_frozen_bn: freeze, or unfreeze, every BatchNorm of a model.

``convert_frozen_bn(model)`` swaps each BatchNorm layer for the frozen module that computes
what the layer computes in ``eval()`` mode, so that ``model.train()`` cannot unfreeze
anything and the model's output is the original's eval-mode output, in every mode:

* ``nn.BatchNorm1d`` / ``2d`` / ``3d`` -> ``FrozenBatchNorm1d`` / ``2d`` / ``3d``;
* ``nn.SyncBatchNorm``, apex's ``SyncBatchNorm`` -> ``FrozenBatchNorm`` (any rank);
* torchvision's and detectron2's ``FrozenBatchNorm2d``, detectron2's ``NaiveSyncBatchNorm``,
  Hugging Face transformers' ``DetrFrozenBatchNorm2d`` and its copies (RT-DETR, Conditional/
  Deformable/DAB-DETR, ...; eps 1e-5, which their forward hard-codes) -> ``FrozenBatchNorm2d``;
* timm's ``BatchNormAct2d`` / ``SyncBatchNormAct`` / ``FrozenBatchNormAct2d`` ->
  ``FrozenBatchNormAct2d`` (their ``act`` and ``drop`` kept);
* subclasses of these that keep their forward, likewise.

Other libraries' classes are recognised by package and class name, so nothing is imported
to look for them. Layers are never converted silently into something that computes
differently: a BatchNorm subclass with a forward of its own, or one without running
statistics, is left as it is, with a warning (or an error with ``strict=True``), and the
report says why.
"""
from __future__ import annotations

import dataclasses
import enum
import fnmatch
import importlib
import inspect
import warnings
from typing import (Any, Callable, Dict, List, Literal, Mapping, Optional, Sequence, Tuple, Type,
                    Union, overload)

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .act import FrozenBatchNormAct2d
from .fuse import unfuse
from .modules import (FrozenBatchNorm, FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d,
                      check_trainable_affine, is_frozen_batchnorm, looks_frozen, own_eps)

__all__ = [
    "convert_frozen_bn",
    "revert_frozen_bn",
    "ConversionReport",
    "ConversionRecord",
    "SkipReason",
    "FrozenNormWarning",
]

#: Qualified-name patterns: a prefix (``"backbone.body"``) or an fnmatch glob
#: (``"backbone.body.layer[34]*"``), or several of them.
Patterns = Union[str, Sequence[str], None]
#: ``predicate(qualified_name, module) -> bool``: whether to convert this layer.
Predicate = Callable[[str, nn.Module], bool]


class FrozenNormWarning(UserWarning):
    """A BatchNorm layer was left as it is (its statistics still update in ``train()``)."""


class SkipReason(str, enum.Enum):
    """Why a normalisation layer was left as it is."""

    #: Not selected by ``include`` / ``exclude`` / ``predicate``.
    OUT_OF_SCOPE = "out of scope"
    #: A BatchNorm subclass with a ``forward`` of its own: what it computes is unknown.
    UNKNOWN_FORWARD = "unknown forward"
    #: ``track_running_stats=False``: it normalises with batch statistics, has none to freeze.
    NO_RUNNING_STATS = "no running statistics"
    #: A lazy BatchNorm whose parameters are not initialised yet.
    UNINITIALIZED = "uninitialized"
    #: A configuration the frozen modules do not compute (e.g. apex's ``channel_last``).
    UNSUPPORTED = "unsupported"
    #: A frozen BatchNorm from an unknown library (its forward, e.g. its eps, is unknown).
    UNKNOWN_FROZEN = "unknown frozen implementation"

    def __str__(self) -> str:
        return self.value


#: Reasons that leave a live BatchNorm (statistics still updating) behind: warned about,
#: errors with ``strict=True``.
_PROBLEMS = (SkipReason.UNKNOWN_FORWARD, SkipReason.NO_RUNNING_STATS,
             SkipReason.UNINITIALIZED, SkipReason.UNSUPPORTED)


@dataclasses.dataclass(frozen=True)
class ConversionRecord:
    """One layer that was converted, or skipped (``target`` None, ``reason`` set)."""

    #: Qualified name in the model (``""`` for the root); the first one, if it is shared.
    name: str
    #: Class of the layer before.
    source: type
    #: Class of the layer after, or None when it was left as it is.
    target: Optional[type] = None
    reason: Optional[SkipReason] = None
    #: What exactly, and what to do about it.
    detail: str = ""


@dataclasses.dataclass
class ConversionReport:
    """What :func:`convert_frozen_bn` (or :func:`revert_frozen_bn`) did, layer by layer."""

    #: Layers replaced (by revert_frozen_bn: reverted), in model order.
    converted: List[ConversionRecord] = dataclasses.field(default_factory=list)
    #: Layers left as they are, with the reason.
    skipped: List[ConversionRecord] = dataclasses.field(default_factory=list)
    #: ``include``/``exclude`` patterns that matched no module (a typo?).
    unmatched_patterns: List[str] = dataclasses.field(default_factory=list)
    #: What was done to the converted layers: "converted" or "reverted".
    action: str = "converted"
    #: Parameters (qualified names) that required grad and became frozen buffers: an
    #: optimizer built before converting still holds the old tensors.
    frozen_parameters: List[str] = dataclasses.field(default_factory=list)
    #: Layers whose statistics were never trained (running_mean 0, running_var 1,
    #: num_batches_tracked 0): freezing them freezes an identity normalisation.
    untrained: List[str] = dataclasses.field(default_factory=list)
    #: frozennorm layers in scope, already frozen, whose weight and bias are not what an
    #: explicit ``trainable_affine=True``/``False`` asks for (True: Parameters that all
    #: require grad; False: buffers): left as they are.
    other_variant: List[str] = dataclasses.field(default_factory=list)
    #: The ``trainable_affine`` convert_frozen_bn was given (None for revert_frozen_bn).
    trainable_affine: Union[None, bool, str] = None

    @property
    def problems(self) -> List[ConversionRecord]:
        """Skipped layers whose statistics still update (everything but scope/foreign-frozen)."""
        return [r for r in self.skipped if r.reason in _PROBLEMS]

    def __str__(self) -> str:
        lines = [f"{self.action} {len(self.converted)} layer(s)"]
        counts: Dict[Tuple[str, str], int] = {}
        for r in self.converted:
            key = (_class_path(r.source), _class_path(r.target))
            counts[key] = counts.get(key, 0) + 1
        lines += [f"  {n:4d} x {src} -> {dst}" for (src, dst), n in counts.items()]
        lines.append(f"skipped {len(self.skipped)} layer(s)")
        lines += [f"  {r.name or '<root>'} ({_class_path(r.source)}): {r.reason}"
                  + (f" - {r.detail}" if r.detail else "") for r in self.skipped]
        if self.unmatched_patterns:
            lines.append(f"patterns that matched no module: {self.unmatched_patterns}")
        for title, names in (("trainable parameters frozen: {}", self.frozen_parameters),
                             ("statistics never trained: {} layer(s)", self.untrained),
                             ("already frozen, the other variant kept: {} layer(s)",
                              self.other_variant)):
            if names:
                lines.append(f"{title.format(len(names))} ({', '.join(names[:4])}"
                             f"{', ...' if len(names) > 4 else ''})")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Which class is what
# --------------------------------------------------------------------------------------

_TORCH_TARGETS: Dict[type, Type[FrozenBatchNorm]] = {
    nn.BatchNorm1d: FrozenBatchNorm1d,
    nn.BatchNorm2d: FrozenBatchNorm2d,
    nn.BatchNorm3d: FrozenBatchNorm3d,
    nn.SyncBatchNorm: FrozenBatchNorm,
    _BatchNorm: FrozenBatchNorm,
}

#: A frozen class, or a frozen class and the eps to use (for sources without an ``eps``
#: attribute, whose forward hard-codes it).
Target = Union[Type[FrozenBatchNorm], Tuple[Type[FrozenBatchNorm], float]]

# Other libraries' classes, by (top-level package, class name): matching by name means
# none of them is imported here. Each of these computes plain BatchNorm in eval mode (the
# timm ones then run self.drop and self.act).
_FOREIGN_TARGETS: Dict[Tuple[str, str], Target] = {
    ("timm", "BatchNormAct2d"): FrozenBatchNormAct2d,
    ("timm", "SyncBatchNormAct"): FrozenBatchNormAct2d,
    ("timm", "FrozenBatchNormAct2d"): FrozenBatchNormAct2d,
    ("torchvision", "FrozenBatchNorm2d"): FrozenBatchNorm2d,
    ("detectron2", "FrozenBatchNorm2d"): FrozenBatchNorm2d,
    ("detectron2", "NaiveSyncBatchNorm"): FrozenBatchNorm2d,
    ("mmdet", "FrozenBatchNorm2d"): FrozenBatchNorm2d,  # norm_cfg type "FrozenBN"
    ("apex", "SyncBatchNorm"): FrozenBatchNorm,
}
# Hugging Face transformers' frozen layers (DetrFrozenBatchNorm2d and its copies in RT-DETR,
# Conditional/Deformable/DAB-DETR, Table Transformer, Grounding DINO, D-FINE, ...): buffers
# only, eps 1e-5 written into their forward, no eps attribute.
_TRANSFORMERS_FROZEN = ("transformers", "FrozenBatchNorm2d", (FrozenBatchNorm2d, 1e-5))

# Classes revert_frozen_bn restores when a layer was converted from them (by path, so
# that the record on the frozen module is a plain string).
_TORCH_RESTORABLE = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_TIMM_ACT_CLASSES = ("BatchNormAct2d", "SyncBatchNormAct")

#: Attribute of a converted module that records what it was converted from (a dict of
#: plain values, so it survives deepcopy, pickle and torch.save; not part of state_dict).
ORIGIN_ATTR = "_frozennorm_origin"

_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_backward_pre_hooks", "_backward_hooks")


def _class_path(cls: Optional[type]) -> str:
    if cls is None:
        return "-"
    module = cls.__module__
    if module.startswith("torch.nn.modules."):
        module = "torch.nn"
    elif module.startswith("frozennorm."):
        module = "frozennorm"
    return f"{module}.{cls.__qualname__}"


def _full_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _package(cls: type) -> str:
    return cls.__module__.partition(".")[0]


def _foreign_target(cls: type) -> Optional[Target]:
    target = _FOREIGN_TARGETS.get((_package(cls), cls.__name__))
    package, suffix, hf_target = _TRANSFORMERS_FROZEN
    if target is None and _package(cls) == package and cls.__name__.endswith(suffix):
        target = hf_target
    return target


def _split_target(target: Target) -> Tuple[Type[FrozenBatchNorm], Optional[float]]:
    return (target[0], float(target[1])) if isinstance(target, tuple) else (target, None)


def _known_base(cls: type, classes: Mapping[type, Target]
                ) -> Optional[Tuple[type, Type[FrozenBatchNorm], Optional[float]]]:
    """The nearest class in ``cls``'s MRO that frozennorm knows, with its frozen class and
    the eps to give it (None: the module's own ``eps``)."""
    for base in cls.__mro__:
        target = classes.get(base) or _TORCH_TARGETS.get(base) or _foreign_target(base)
        if target is not None:
            return (base, *_split_target(target))
    return None


def _keeps_forward(module: nn.Module, base: type) -> bool:
    """``module`` runs ``base``'s forward (no override in a subclass or on the instance)."""
    return (getattr(type(module), "forward", None) is getattr(base, "forward", None)
            and "forward" not in vars(module))


# --------------------------------------------------------------------------------------
# Scope
# --------------------------------------------------------------------------------------

def _as_patterns(patterns: Patterns, what: str) -> Tuple[str, ...]:
    if patterns is None:
        return ()
    if isinstance(patterns, str):
        return (patterns,)
    out = tuple(patterns)
    for p in out:
        if not isinstance(p, str):
            raise TypeError(f"{what} must be a string or a sequence of strings, got {p!r}")
    return out


def _matches(name: str, pattern: str) -> bool:
    """Whether the module ``name``, or one of the modules it is inside, matches ``pattern``."""
    if pattern == "" or fnmatch.fnmatchcase(name, pattern):
        return True
    parts = name.split(".") if name else []
    return any(fnmatch.fnmatchcase(".".join(parts[:i]), pattern) for i in range(1, len(parts)))


@dataclasses.dataclass(frozen=True)
class Scope:
    """Which layers a call concerns: ``include``/``exclude`` patterns and a ``predicate``
    (see :func:`convert_frozen_bn`)."""

    include: Tuple[str, ...]
    exclude: Tuple[str, ...]
    predicate: Optional[Predicate]

    @classmethod
    def build(cls, include: Patterns, exclude: Patterns, predicate: Optional[Predicate]
              ) -> "Scope":
        return cls(_as_patterns(include, "include"), _as_patterns(exclude, "exclude"), predicate)

    def selects(self, name: str, module: nn.Module) -> bool:
        if self.include and not any(_matches(name, p) for p in self.include):
            return False
        if any(_matches(name, p) for p in self.exclude):
            return False
        return self.predicate is None or bool(self.predicate(name, module))

    def unmatched(self, root: nn.Module) -> List[str]:
        if not (self.include or self.exclude):
            return []
        names = [name for name, _ in root.named_modules(remove_duplicate=False)]
        return [p for p in self.include + self.exclude
                if not any(_matches(n, p) for n in names)]


# --------------------------------------------------------------------------------------
# The walk: plan everything, then change the model (so strict=True changes nothing)
# --------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Verdict:
    """What to do with a normalisation layer."""

    #: Builds the replacement from (old module, training mode to give it); None: skip.
    make: Optional[Callable[[nn.Module, bool], nn.Module]] = None
    target: Optional[type] = None
    reason: Optional[SkipReason] = None
    detail: str = ""


# A layer that needs nothing (already frozen by convert, already live for revert).
_LEAVE = _Verdict()

Classifier = Callable[[nn.Module], Optional[_Verdict]]


@dataclasses.dataclass
class _Entry:
    module: nn.Module
    name: str
    verdict: _Verdict
    #: (parent, attribute) of every place the module is registered; parent None: the root
    places: List[Tuple[Optional[nn.Module], str]]


def _plan(root: nn.Module, classify: Classifier, scope: Scope, caller: str) -> List[_Entry]:
    entries: Dict[int, _Entry] = {}
    visited = set()
    stack: List[Tuple[Optional[nn.Module], str, nn.Module, str]] = [(None, "", root, "")]
    while stack:
        parent, key, module, name = stack.pop()
        if id(module) in visited:
            if id(module) in entries:
                entries[id(module)].places.append((parent, key))
            continue
        visited.add(id(module))
        if isinstance(module, nn.parallel.DistributedDataParallel):
            raise TypeError(
                f"{caller}: {name or 'the model'} is wrapped in DistributedDataParallel, "
                f"whose gradient buckets would keep the replaced layers' parameters. Call "
                f"{caller} on the model first, then wrap it: DDP({caller}(model), ...)")
        verdict = classify(module)
        if verdict is None:
            for k, child in reversed(list(module._modules.items())):
                if child is not None:
                    stack.append((module, k, child, f"{name}.{k}" if name else k))
            continue
        if verdict is _LEAVE:
            continue
        if not scope.selects(name, module):
            verdict = _Verdict(reason=SkipReason.OUT_OF_SCOPE)
        entries[id(module)] = _Entry(module, name, verdict, [(parent, key)])
    return list(entries.values())


def _move_hooks(old: nn.Module, new: nn.Module) -> None:
    # The same dicts, so that handles returned by register_*_hook still remove them.
    for attr in _HOOK_DICTS:
        hooks = getattr(old, attr, None)
        if hooks:
            setattr(new, attr, hooks)
    if getattr(old, "_is_full_backward_hook", None) is not None:
        new._is_full_backward_hook = old._is_full_backward_hook


def _run(root: nn.Module, classify: Classifier, scope: Scope, strict: bool,
         caller: str, action: str, left: str,
         review: Optional[Callable[[List[_Entry], ConversionReport], None]] = None
         ) -> Tuple[nn.Module, ConversionReport]:
    entries = _plan(root, classify, scope, caller)
    report = ConversionReport(unmatched_patterns=scope.unmatched(root), action=action)
    for e in entries:
        record = ConversionRecord(e.name, type(e.module), e.verdict.target, e.verdict.reason,
                                  e.verdict.detail)
        (report.converted if e.verdict.make is not None else report.skipped).append(record)
    if review is not None:
        review(entries, report)
    _complain(report, strict, caller, left)

    result = root
    for e in entries:
        if e.verdict.make is None:
            continue
        first_parent = e.places[0][0]
        training = first_parent.training if first_parent is not None else e.module.training
        new = e.verdict.make(e.module, training)
        _move_hooks(e.module, new)
        for parent, key in e.places:
            if parent is None:
                result = new
            else:
                parent._modules[key] = new
    return result, report


def _names(names: Sequence[str], limit: int = 6) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _complain(report: ConversionReport, strict: bool, caller: str, left: str) -> None:
    """Warn (or raise, with strict) about layers left as they are, unused patterns, trainable
    parameters frozen unannounced and untrained statistics; mention (never raise for)
    frozen layers of unknown implementations."""
    problems = report.problems
    sections = []
    lines = [f"  {r.name or '<root>'} ({_class_path(r.source)}): {r.reason}: {r.detail}"
             for r in problems]
    if report.unmatched_patterns:
        lines.append(f"  include/exclude patterns that match no module: "
                     f"{report.unmatched_patterns}")
    if lines:
        sections.append(f"{caller} left {len(problems)} {left}:\n" + "\n".join(lines))
    if report.frozen_parameters:
        sections.append(
            f"{caller} froze {len(report.frozen_parameters)} parameter(s) that required grad "
            f"(the layers' weight and bias become buffers): {_names(report.frozen_parameters)}. "
            f"Build the optimizer after converting (one built before still holds the old "
            f"tensors); pass trainable_affine=False to say that freezing them is meant, or "
            f"trainable_affine=\"source\" to keep them trainable (statistics frozen, weight "
            f"and bias trained: mmdet's norm_eval=True, requires_grad=True recipe).")
    if report.untrained:
        sections.append(
            f"{caller}: {len(report.untrained)} layer(s) have statistics that were never "
            f"trained (running_mean 0, running_var 1, num_batches_tracked 0), which freezing "
            f"keeps for good: {_names(report.untrained)}. Load the pretrained weights before "
            f"converting.")
    if report.other_variant:
        have, asked = (("frozen buffers (or Parameters that do not require grad)", "trainable")
                       if report.trainable_affine is True else ("trainable Parameters", "frozen"))
        sections.append(
            f"{caller}: {len(report.other_variant)} layer(s) were already frozen by frozennorm "
            f"with weight and bias as {have}, and an already frozen layer is left as it is: "
            f"{_names(report.other_variant)}. To make them {asked}, revert_frozen_bn them "
            f"first, then convert again.")
    unknown = [r for r in report.skipped if r.reason is SkipReason.UNKNOWN_FROZEN]
    if not sections and not unknown:
        return
    message = "\n".join(sections)
    if strict and sections:
        raise ValueError(message + "\n(nothing was changed: strict=True)")
    if unknown:
        message += ("\n" if message else "") + (
            f"{caller} left {len(unknown)} frozen layer(s) of implementations it does not know "
            f"as they are (frozen, not converted): " + _names([r.name or "<root>" for r in unknown])
            + f". {unknown[0].detail}")
    # stacklevel: _complain < _run < the public function < its caller
    if sections:
        message += "\n(strict=True makes this an error)"
    warnings.warn(message, FrozenNormWarning, stacklevel=4)


# --------------------------------------------------------------------------------------
# convert_frozen_bn
# --------------------------------------------------------------------------------------

def _is_ours(module: nn.Module) -> bool:
    return _package(type(module)) == "frozennorm"


def _freeze_verdict(module: nn.Module, classes: Mapping[type, Target],
                    trainable_affine: Union[bool, str] = False) -> Optional[_Verdict]:
    if _is_ours(module) and is_frozen_batchnorm(module):
        return _LEAVE  # frozennorm's own (plain or folded)
    match = _known_base(type(module), classes)
    is_bn = isinstance(module, _BatchNorm)
    if match is None or not _keeps_forward(module, match[0]):
        if is_bn:
            name = type(module).__name__
            return _Verdict(reason=SkipReason.UNKNOWN_FORWARD, detail=(
                f"a BatchNorm subclass with a forward of its own; if it computes plain "
                f"BatchNorm in eval mode, pass classes={{{name}: FrozenBatchNorm2d}} (or the "
                f"frozen class of its rank)"))
        if looks_frozen(module):
            name = _full_path(type(module))
            return _Verdict(reason=SkipReason.UNKNOWN_FROZEN, detail=(
                f"already frozen, but by an implementation frozennorm does not know; if its "
                f"forward computes plain frozen BatchNorm, pass classes={{{name}: "
                f"frozennorm.FrozenBatchNorm2d}}, or classes={{{name}: "
                f"(frozennorm.FrozenBatchNorm2d, eps)}} with the eps its forward uses where it "
                f"has no eps attribute"))
        return None
    base, target, eps = match
    if eps is None and own_eps(module) is None:
        raise ValueError(
            f"convert_frozen_bn: {type(module).__name__} has no eps attribute, so the eps its "
            f"forward uses is unknown (DETR-style layers hard-code 1e-5, maskrcnn-benchmark's "
            f"use none); give it: classes={{{type(module).__name__}: "
            f"({target.__name__}, eps)}} (nothing was changed)")
    if getattr(module, "has_uninitialized_params", lambda: False)():
        return _Verdict(reason=SkipReason.UNINITIALIZED,
                        detail="a lazy module: run one forward pass before converting")
    if (getattr(module, "running_mean", None) is None
            or getattr(module, "running_var", None) is None):
        return _Verdict(reason=SkipReason.NO_RUNNING_STATS, detail=(
            "track_running_stats=False: it normalises with the batch's statistics in every "
            "mode and has none to freeze"))
    parametrized = _parametrized_affine(module)
    if trainable_affine and parametrized:
        return _Verdict(reason=SkipReason.UNSUPPORTED, detail=(
            f"its {' and '.join(parametrized)} {'is' if len(parametrized) == 1 else 'are'} "
            f"parametrized (torch.nn.utils.parametrize), which a frozen layer's trainable "
            f"Parameters cannot keep; remove the parametrization first "
            f"(parametrize.remove_parametrizations), or freeze weight and bias with the "
            f"statistics (trainable_affine=False)"))
    flags = [f for f in ("channel_last", "fuse_relu") if getattr(module, f, False)]
    if _package(base) == "apex" and flags:
        return _Verdict(reason=SkipReason.UNSUPPORTED, detail=(
            f"apex SyncBatchNorm with {' and '.join(f + '=True' for f in flags)}"))
    check_dim = getattr(type(module), "_check_input_dim", None)
    if base in _TORCH_TARGETS and check_dim is not getattr(base, "_check_input_dim", None):
        target = FrozenBatchNorm  # the subclass accepts other ranks than its base
    # (frozen sources have no momentum: a reverted layer gets BatchNorm's default)
    origin = {"class": _full_path(base), "momentum": getattr(module, "momentum", 0.1)}
    count = _tensor(module, "num_batches_tracked")
    if count is not None and count.numel() == 1 and not count.is_meta:
        origin["num_batches_tracked"] = int(count)  # what momentum=None averages with

    def make(old: nn.Module, training: bool) -> nn.Module:
        new = target.from_batchnorm(old, eps, trainable_affine)
        new.training = old.training
        setattr(new, ORIGIN_ATTR, dict(origin))
        return new

    return _Verdict(make=make, target=target)


@overload
def convert_frozen_bn(module: nn.Module, *, include: Patterns = ..., exclude: Patterns = ...,
                      predicate: Optional[Predicate] = ...,
                      classes: Optional[Mapping[type, Target]] = ...,
                      trainable_affine: Union[None, bool, Literal["source"]] = ...,
                      strict: bool = ..., report: Literal[False] = ...) -> nn.Module: ...


@overload
def convert_frozen_bn(module: nn.Module, *, include: Patterns = ..., exclude: Patterns = ...,
                      predicate: Optional[Predicate] = ...,
                      classes: Optional[Mapping[type, Target]] = ...,
                      trainable_affine: Union[None, bool, Literal["source"]] = ...,
                      strict: bool = ..., report: Literal[True]
                      ) -> Tuple[nn.Module, ConversionReport]: ...


def convert_frozen_bn(module: nn.Module, *, include: Patterns = None, exclude: Patterns = None,
                      predicate: Optional[Predicate] = None,
                      classes: Optional[Mapping[type, Target]] = None,
                      trainable_affine: Union[None, bool, Literal["source"]] = None,
                      strict: bool = False, report: bool = False
                      ) -> Union[nn.Module, Tuple[nn.Module, ConversionReport]]:
    """Replace every BatchNorm in ``module`` by its frozen counterpart, in place.

    Each layer becomes the frozennorm module that computes what it computes in ``eval()``
    mode (see the module docstring for the table), with its statistics, weight, bias and
    eps copied (not aliased; device and dtype kept), its train/eval flag, forward hooks
    and, for timm's BN+activation layers, its ``act``/``drop`` modules. The result's
    output in ``train()`` is the original's output in ``eval()``; ``train()`` cannot
    unfreeze it. ``affine=False`` layers get weight 1 and bias 0. Converting twice changes
    nothing the second time (it warns where an explicit ``trainable_affine`` asks for the
    other variant of a layer frozennorm already froze, or ``True`` for weights that do not
    require grad: revert such layers first).

    Convert before building the optimizer and before wrapping the model in
    ``DistributedDataParallel`` (a DDP-wrapped model is refused): the frozen layers have
    no parameters. Where a layer's weight or bias required grad, the conversion says so
    (a :class:`FrozenNormWarning`, unless ``trainable_affine=False`` says it is meant), as
    it does for statistics that were never trained (running_mean 0, running_var 1,
    ``num_batches_tracked`` 0: a model whose pretrained weights were not loaded yet).

    Args:
        module: the model; it may itself be a BatchNorm, and then the frozen module is
            returned (always use the return value).
        include: convert only layers inside these modules, given by qualified name:
            a prefix (``"backbone.body"`` covers ``backbone.body.layer1.0.bn1``) or an
            fnmatch glob, where ``*`` also matches dots (``"backbone.body.layer[34]*"``,
            ``"*.bn1"``). A string or a sequence of them; None: everything.
        exclude: leave layers inside these modules alone (same forms); wins over include.
        predicate: ``predicate(qualified_name, layer) -> bool``, checked last.
        classes: more classes to convert, ``{MyBatchNorm: FrozenBatchNorm2d}``: you vouch
            that their eval-mode forward is plain BatchNorm (map BN+activation classes
            with ``act``/``drop`` submodules to :class:`FrozenBatchNormAct2d`). For a class
            without an ``eps`` attribute give the eps its forward uses:
            ``{MyFrozenBN: (FrozenBatchNorm2d, 1e-5)}``; without one that is an error.
        trainable_affine: what becomes of weight and bias (the running statistics are
            frozen buffers whatever this says). ``None`` (default) and ``False``: frozen
            buffers too (torchvision's and detectron2's recipe); ``None`` warns where they
            required grad, ``False`` says that this is meant. ``True``: trainable
            ``nn.Parameter`` objects (the layer's own ones, so an optimizer that
            holds them keeps working). ``"source"``: each layer's own weight and bias
            Parameters as they are, trainable where they required grad (mmdet's
            ``norm_cfg=dict(type="BN", requires_grad=True), norm_eval=True`` recipe, and
            its ``frozen_stages``), frozen buffers where the layer had none.
        strict: raise ValueError, changing nothing, where a layer would be left live
            (unknown subclass, no running statistics, ...), a pattern matches no module,
            trainable parameters would be frozen unannounced (``trainable_affine=None``),
            statistics look untrained or an already frozen layer is not what an explicit
            ``trainable_affine`` asks for; the default warns (:class:`FrozenNormWarning`)
            and goes on.
        report: also return a :class:`ConversionReport`: what was converted, what was
            skipped and why (out-of-scope layers included).

    Returns:
        the converted model, or ``(model, report)`` with ``report=True``.

    Example::

        model = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights="DEFAULT")
        model = frozennorm.convert_frozen_bn(model, include="backbone.body")
        model, rep = frozennorm.convert_frozen_bn(model, exclude="roi_heads", report=True)
    """
    extra = dict(classes or {})
    for cls, target in extra.items():
        frozen_cls = target[0] if isinstance(target, tuple) and len(target) == 2 else target
        eps_ok = not isinstance(target, tuple) or (isinstance(target[1], (int, float))
                                                   and not isinstance(target[1], bool))
        if not (isinstance(frozen_cls, type) and issubclass(frozen_cls, FrozenBatchNorm)
                and eps_ok):
            raise TypeError(f"classes[{cls!r}] must be a frozennorm FrozenBatchNorm class or "
                            f"a (class, eps) pair, got {target!r}")
    check_trainable_affine(trainable_affine, (None, False, True, "source"))
    affine = trainable_affine or False
    scope = Scope.build(include, exclude, predicate)
    result, rep = _run(module, lambda m: _freeze_verdict(m, extra, affine), scope, strict,
                       "convert_frozen_bn", "converted",
                       "BatchNorm layer(s) as they are (their statistics still update in train())",
                       review=lambda entries, r: _review_freeze(entries, r, trainable_affine,
                                                                module, scope))
    if rep.converted:
        _adapt_reparameterizers(result)
    return (result, rep) if report else result


# --------------------------------------------------------------------------------------
# Reparameterizable blocks
# --------------------------------------------------------------------------------------

_FUSE_BN_TENSOR = "_fuse_bn_tensor"


class BatchNormView:
    """A block's ``_fuse_bn_tensor``, taking frozen layers as the BatchNorm they compute.

    Re-parameterizable blocks (RepVGG's convention, followed by timm's MobileOne, RepVGG,
    FastViT, GhostNetV2, RepGhost blocks and Ultralytics' RepConv) fold their branches
    into one conv by handing each branch's BatchNorm to ``_fuse_bn_tensor``, which checks
    ``isinstance(branch, nn.BatchNorm2d)`` (else an assert, or a silently wrong kernel).
    :func:`convert_frozen_bn` puts this wrapper on such blocks (the instance; the class is
    unchanged), so that their reparameterization (timm's ``reparameterize_model``) works
    on a converted model: each frozen layer passed is seen as an eval-mode
    ``nn.BatchNorm2d`` with its statistics, weight, bias and eps, the kernel and bias it
    gives are the original model's. Copies, pickles and ``torch.save`` carry it along.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        original = inspect.getattr_static(type(self.module), _FUSE_BN_TENSOR)
        args = tuple(_as_batchnorm(a) for a in args)
        kwargs = {k: _as_batchnorm(v) for k, v in kwargs.items()}
        if isinstance(original, staticmethod):
            return original.__func__(*args, **kwargs)
        if isinstance(original, classmethod):
            return original.__func__(type(self.module), *args, **kwargs)
        return original(self.module, *args, **kwargs)

    def __reduce__(self):
        return type(self), (self.module,)


def _as_batchnorm(value: Any) -> Any:
    """A frozen layer as the eval-mode ``nn.BatchNorm2d`` it computes; anything else as is."""
    if not (isinstance(value, FrozenBatchNorm) and type(value).forward in
            (FrozenBatchNorm.forward, FrozenBatchNormAct2d.forward)):
        return value
    return _build_live(nn.BatchNorm2d, value, value.eps, 0.1, training=False,
                       reuse_parameters=False)


def _adapt_reparameterizers(root: nn.Module) -> None:
    for m in root.modules():
        if (inspect.getattr_static(type(m), _FUSE_BN_TENSOR, None) is not None
                and not isinstance(m.__dict__.get(_FUSE_BN_TENSOR), BatchNormView)):
            m.__dict__[_FUSE_BN_TENSOR] = BatchNormView(m)


def _parametrized_affine(module: nn.Module) -> List[str]:
    """The names among weight and bias that torch.nn.utils.parametrize computes."""
    return [n for n in ("weight", "bias") if torch.nn.utils.parametrize.is_parametrized(module, n)]


def _is_untrained(module: nn.Module) -> bool:
    """Statistics as a fresh BatchNorm has them: running_mean 0, running_var 1 and
    num_batches_tracked 0 (a layer without the counter: also weight 1 and bias 0)."""
    mean, var = _tensor(module, "running_mean"), _tensor(module, "running_var")
    if mean is None or var is None or mean.is_meta or mean.numel() == 0:
        return False
    count = _tensor(module, "num_batches_tracked")
    if count is not None:
        if count.numel() != 1 or int(count) != 0:
            return False
    else:
        weight, bias = _tensor(module, "weight"), _tensor(module, "bias")
        if (weight is not None and not bool((weight == 1).all())) or (
                bias is not None and not bool((bias == 0).all())):
            return False
    return bool((mean == 0).all()) and bool((var == 1).all())


def _review_freeze(entries: List["_Entry"], report: ConversionReport,
                   trainable_affine: Union[None, bool, str], root: nn.Module,
                   scope: "Scope") -> None:
    """Records what converting the planned layers would silently change, and the frozen
    layers in scope that an explicit ``trainable_affine`` would not change."""
    report.trainable_affine = trainable_affine
    if isinstance(trainable_affine, bool):
        # True asks for weight and bias that train: Parameters that require grad
        report.other_variant += [
            name or "<root>" for name, m in root.named_modules()
            if isinstance(m, FrozenBatchNorm) and scope.selects(name, m)
            and (m.trainable_affine != trainable_affine or trainable_affine and not all(
                p.requires_grad for p in m.parameters(recurse=False)))]
    for e in entries:
        if e.verdict.make is None:
            continue
        if trainable_affine is None:
            prefix = f"{e.name}." if e.name else ""
            report.frozen_parameters += [
                prefix + n for n, p in e.module.named_parameters(recurse=False)
                if n in ("weight", "bias") and p.requires_grad]
            report.frozen_parameters += [  # what a parametrization computes them from
                f"{prefix}parametrizations.{n}.{k}" for n in _parametrized_affine(e.module)
                for k, p in e.module.parametrizations[n].named_parameters() if p.requires_grad]
        if _is_untrained(e.module):
            report.untrained.append(e.name or "<root>")


# --------------------------------------------------------------------------------------
# revert_frozen_bn
# --------------------------------------------------------------------------------------

def _timm_class(name: str, module_path: str = "timm.layers") -> Optional[type]:
    try:
        return getattr(importlib.import_module(module_path), name)
    except (ImportError, AttributeError):
        return None


def _restorable(path: Optional[str]) -> Optional[type]:
    """The class a layer was converted from, when revert knows how to build it."""
    if not isinstance(path, str):
        return None
    for cls in _TORCH_RESTORABLE:
        if path == _full_path(cls):
            return cls
    module_path, _, name = path.rpartition(".")
    if module_path.partition(".")[0] == "timm" and name in _TIMM_ACT_CLASSES:
        return _timm_class(name, module_path)
    return None


def _is_timm_act(cls: type) -> bool:
    return _package(cls) == "timm" and cls.__name__ in _TIMM_ACT_CLASSES


def _unfreeze_target(module: nn.Module, is_act: bool) -> Tuple[Optional[type], str]:
    """The live class for a frozen layer, or (None, why not)."""
    origin = getattr(module, ORIGIN_ATTR, None)
    cls = _restorable(origin.get("class") if isinstance(origin, dict) else None)
    if cls is not None and _is_timm_act(cls) == is_act:
        return cls, ""
    if is_act:
        cls = _timm_class("BatchNormAct2d")
        return cls, ("" if cls is not None else
                     "a BatchNorm+activation layer: reverting it needs timm's BatchNormAct2d "
                     "(timm is not installed)")
    for frozen_cls, live in ((FrozenBatchNorm1d, nn.BatchNorm1d), (FrozenBatchNorm3d, nn.BatchNorm3d)):
        if isinstance(module, frozen_cls):
            return live, ""
    if isinstance(module, FrozenBatchNorm) and not isinstance(module, FrozenBatchNorm2d):
        return nn.SyncBatchNorm, ""  # any rank, like FrozenBatchNorm
    return nn.BatchNorm2d, ""


def _tensor(module: nn.Module, name: str) -> Optional[torch.Tensor]:
    t = getattr(module, name, None)
    return t if isinstance(t, torch.Tensor) else None


def _build_live(cls: type, frozen: nn.Module, eps: float, momentum: Optional[float],
                training: bool, reuse_parameters: bool = True) -> nn.Module:
    """A live ``cls`` computing what ``frozen`` does (with ``eps``, the one its forward
    uses), its statistics copied; weight and bias are ``frozen``'s own Parameters where it
    has them (``reuse_parameters``: an optimizer that holds them keeps working), else new
    ones."""
    mean, var = _tensor(frozen, "running_mean"), _tensor(frozen, "running_var")
    assert mean is not None and var is not None
    kw: Dict[str, Any] = dict(eps=eps, momentum=momentum, device=mean.device, dtype=mean.dtype)
    bn: nn.Module
    if _is_timm_act(cls) and cls.__name__ == "BatchNormAct2d":
        bn = cls(mean.numel(), apply_act=False, **kw)
    else:
        bn = cls(mean.numel(), affine=True, track_running_stats=True, **kw)
    with torch.no_grad():
        for name, fill in (("weight", 1.0), ("bias", 0.0)):
            value = _tensor(frozen, name)
            if reuse_parameters and isinstance(value, nn.Parameter):
                setattr(bn, name, value.requires_grad_(True))
            else:
                setattr(bn, name, nn.Parameter(value.detach().clone() if value is not None
                                               else torch.full_like(mean, fill)))
        bn.running_mean = mean.detach().clone()
        bn.running_var = var.detach().clone()
    if _is_timm_act(cls):
        names = [n for n in frozen._modules if n in ("drop", "act")]
        for name in names + [n for n in ("drop", "act") if n not in names]:
            sub = getattr(frozen, name, None)
            bn.add_module(name, sub if isinstance(sub, nn.Module) else nn.Identity())
    bn.training = training
    return bn


def _unfreeze_verdict(module: nn.Module) -> Optional[_Verdict]:
    if isinstance(module, _BatchNorm):
        return _LEAVE
    if isinstance(module, FrozenBatchNorm) or _is_ours(module):
        forward = getattr(type(module), "forward", None)
        if forward not in (FrozenBatchNorm.forward, FrozenBatchNormAct2d.forward):
            if not is_frozen_batchnorm(module):
                return None
            return _Verdict(reason=SkipReason.UNSUPPORTED, detail=(
                f"a {type(module).__name__} computes other than a frozen BatchNorm (a forward "
                f"of its own, or a convolution's scale folded in): reverting it would change "
                f"the model (revert before folding)"))
        is_act = isinstance(module, FrozenBatchNormAct2d)
        eps: Optional[float] = module.eps
    else:
        match = _known_base(type(module), {})
        if match is None or not _keeps_forward(module, match[0]):
            if looks_frozen(module):
                return _Verdict(reason=SkipReason.UNKNOWN_FROZEN, detail=(
                    "a frozen BatchNorm frozennorm does not know; left as it is"))
            return None
        is_act = match[1] is FrozenBatchNormAct2d
        # the eps its forward uses: the known one (1e-5 hard-coded in HF's DETR-style
        # layers, which have no eps attribute), else its own
        eps = match[2] if match[2] is not None else own_eps(module)
        if eps is None:
            return _Verdict(reason=SkipReason.UNSUPPORTED, detail=(
                f"a {type(module).__name__} has no eps attribute, so the eps its forward "
                f"uses is unknown: left as it is"))
    cls, why = _unfreeze_target(module, is_act)
    if cls is None:
        return _Verdict(reason=SkipReason.UNSUPPORTED, detail=why)
    origin = getattr(module, ORIGIN_ATTR, None)
    origin = origin if isinstance(origin, dict) else {}
    momentum = origin.get("momentum", 0.1)
    count = origin.get("num_batches_tracked", 0)

    def make(old: nn.Module, training: bool) -> nn.Module:
        live = _build_live(cls, old, eps, momentum, training)
        tracked = _tensor(live, "num_batches_tracked")
        if tracked is not None:
            tracked.fill_(count)
        return live

    return _Verdict(make=make, target=cls)


@overload
def revert_frozen_bn(module: nn.Module, *, include: Patterns = ..., exclude: Patterns = ...,
                     predicate: Optional[Predicate] = ..., strict: bool = ...,
                     report: Literal[False] = ...) -> nn.Module: ...


@overload
def revert_frozen_bn(module: nn.Module, *, include: Patterns = ..., exclude: Patterns = ...,
                     predicate: Optional[Predicate] = ..., strict: bool = ...,
                     report: Literal[True]) -> Tuple[nn.Module, ConversionReport]: ...


def revert_frozen_bn(module: nn.Module, *, include: Patterns = None, exclude: Patterns = None,
                     predicate: Optional[Predicate] = None, strict: bool = False,
                     report: bool = False
                     ) -> Union[nn.Module, Tuple[nn.Module, ConversionReport]]:
    """Turn frozen BatchNorm layers back into trainable ones, in place: the inverse.

    Layers converted by :func:`convert_frozen_bn` get their original class back
    (``nn.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm``, timm's ``BatchNormAct2d`` /
    ``SyncBatchNormAct`` with their ``act``/``drop``) and momentum; other frozen layers
    become ``nn.BatchNorm1d/2d/3d`` by rank (``nn.SyncBatchNorm`` for the any-rank
    :class:`FrozenBatchNorm`, timm's ``BatchNormAct2d`` for :class:`FrozenBatchNormAct2d`),
    momentum 0.1. torchvision's and detectron2's ``FrozenBatchNorm2d`` and timm's
    ``FrozenBatchNormAct2d`` are reverted too.

    Each new layer has ``affine=True`` and ``track_running_stats=True``, weight and bias as
    trainable Parameters (``requires_grad=True``: a trainable-affine layer's own Parameter
    objects, which an optimizer that holds them keeps training; new ones where they were
    buffers), running statistics that are bit-identical copies, the ``num_batches_tracked``
    the layer had when :func:`convert_frozen_bn` converted it (0 for other frozen layers;
    ``momentum=None`` averages with it), and the train/eval mode of its parent. Rebuild the
    optimizer afterwards where weight and bias were buffers: the new parameters are not in
    the old one.

    ``include``, ``exclude``, ``predicate``, ``strict`` and ``report`` work as in
    :func:`convert_frozen_bn` (e.g. ``include="backbone.body.layer4"`` unfreezes one stage).
    """
    scope = Scope.build(include, exclude, predicate)
    result, rep = _run(module, _unfreeze_verdict, scope, strict, "revert_frozen_bn",
                       "reverted", "frozen layer(s) frozen")
    unfuse(result, stale_only=True)  # forwards fuse() rewrote to call the reverted layers fused
    return (result, rep) if report else result
