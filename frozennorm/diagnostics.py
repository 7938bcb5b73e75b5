"""audit / assert_frozen: what each normalisation layer of a model will do on its next forward.

``print(frozennorm.audit(model))`` answers the usual questions about "frozen" BatchNorm:
is the layer in train or eval mode right now (``model.apply(set_bn_eval)`` does not survive
the next ``model.train()``), does it normalise with the batch's statistics or with running
ones, will its running statistics change on the next forward, do its weight and bias
require grad, and what does its momentum mean (PyTorch's momentum is 1 - TF/Keras's).
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union, overload

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

from .convert import FrozenNormWarning, Patterns, Predicate, Scope, _names
from .modules import FrozenBatchNorm, is_frozen_batchnorm

__all__ = ["audit", "assert_frozen", "AuditRow", "AuditTable", "NotFrozenError"]

#: Normalisation layers without running statistics (they normalise each sample by itself).
_PER_SAMPLE = tuple(c for c in (nn.GroupNorm, nn.LayerNorm, getattr(nn, "RMSNorm", None))
                    if c is not None)

RUNNING, BATCH, SAMPLE = "running", "batch", "per-sample"


@dataclasses.dataclass(frozen=True)
class AuditRow:
    """One normalisation layer, as it stands now."""

    #: Qualified name (``""`` for the root).
    name: str
    cls: type
    #: The module's ``training`` flag.
    training: bool
    #: A frozen BatchNorm (frozennorm's or another library's): fixed statistics in every mode.
    frozen: bool
    #: ``track_running_stats``; None where the layer has no such option (frozen, GroupNorm, ...).
    track_running_stats: Optional[bool]
    #: PyTorch momentum (``running = (1 - m) * running + m * batch``); None where there are no
    #: running statistics to update, or for a cumulative average (``momentum=None``, see
    #: :attr:`cumulative_average`).
    momentum: Optional[float]
    #: None: no weight Parameter (none at all, or a buffer as in frozen layers).
    weight_requires_grad: Optional[bool]
    bias_requires_grad: Optional[bool]
    #: ``"running"`` statistics, the ``"batch"``'s statistics, or ``"per-sample"`` ones
    #: (GroupNorm, LayerNorm, InstanceNorm without tracking), on the next forward.
    normalizes_with: str
    #: Whether the next forward, in the current mode, changes ``running_mean``/``running_var``.
    updates_stats: bool

    @property
    def tf_momentum(self) -> Optional[float]:
        """The same momentum in TF/Keras's convention, ``1 - momentum``."""
        return None if self.momentum is None else 1.0 - self.momentum

    @property
    def cumulative_average(self) -> bool:
        """Running statistics kept as a cumulative average (``momentum=None``)."""
        return bool(self.track_running_stats) and self.momentum is None and not self.frozen

    @property
    def is_frozen_now(self) -> bool:
        """Neither updates statistics nor normalises with the batch's, on the next forward."""
        return not self.updates_stats and self.normalizes_with != BATCH

    @property
    def type_name(self) -> str:
        """The class name, with its package where that is not torch or frozennorm."""
        package = self.cls.__module__.partition(".")[0]
        suffix = "" if package in ("torch", "frozennorm") else f" ({package})"
        return self.cls.__name__ + suffix


def _requires_grad(module: nn.Module, name: str) -> Optional[bool]:
    p = module._parameters.get(name)
    return None if p is None else bool(p.requires_grad)


def _row(name: str, m: nn.Module) -> AuditRow:
    w, b = _requires_grad(m, "weight"), _requires_grad(m, "bias")
    if is_frozen_batchnorm(m):
        return AuditRow(name, type(m), m.training, True, None, None, w, b, RUNNING, False)
    if isinstance(m, _NormBase):
        has_stats = m.running_mean is not None and m.running_var is not None
        track = bool(m.track_running_stats)
        momentum = m.momentum
        if isinstance(m, _BatchNorm):
            uses = BATCH if (m.training or not has_stats) else RUNNING
            moves = momentum is None or momentum != 0.0
        else:  # instance norm: per-sample statistics unless tracking in eval mode
            uses = SAMPLE if (m.training or not track) else RUNNING
            moves = momentum is not None and momentum != 0.0
        updates = m.training and track and has_stats and moves
        return AuditRow(name, type(m), m.training, False, track,
                        momentum if track else None, w, b, uses, updates)
    return AuditRow(name, type(m), m.training, False, None, None, w, b, SAMPLE, False)


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, (_NormBase,) + _PER_SAMPLE) or is_frozen_batchnorm(m)


class AuditTable(Sequence[AuditRow]):
    """The rows of :func:`audit`; ``str()`` (and ``repr()``) is a readable table."""

    def __init__(self, rows: Sequence[AuditRow]) -> None:
        self.rows = tuple(rows)

    @overload
    def __getitem__(self, index: int) -> AuditRow: ...

    @overload
    def __getitem__(self, index: slice) -> "AuditTable": ...

    def __getitem__(self, index: Union[int, slice]) -> Union[AuditRow, "AuditTable"]:
        if isinstance(index, slice):
            return AuditTable(self.rows[index])
        return self.rows[index]

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[AuditRow]:
        return iter(self.rows)

    def not_frozen(self) -> List[AuditRow]:
        """Rows that update statistics or normalise with the batch's on the next forward."""
        return [r for r in self.rows if not r.is_frozen_now]

    def to_dicts(self) -> List[Dict[str, Any]]:
        """One plain dict per row (e.g. for ``pandas.DataFrame``), the class as its path."""
        out = []
        for r in self.rows:
            d = dataclasses.asdict(r)
            d["cls"] = f"{r.cls.__module__}.{r.cls.__qualname__}"
            d["tf_momentum"] = r.tf_momentum
            out.append(d)
        return out

    def summary(self) -> str:
        n = len(self.rows)
        frozen = sum(r.frozen for r in self.rows)
        updating = sum(r.updates_stats for r in self.rows)
        batch = sum(r.normalizes_with == BATCH for r in self.rows)
        return (f"{n} normalization layer(s): {frozen} frozen, {updating} will update running "
                f"statistics on the next forward, {batch} normalize with batch statistics")

    def __str__(self) -> str:
        header = ("name", "type", "mode", "track_running_stats", "momentum (TF)",
                  "requires_grad w/b", "normalizes with", "stats update")
        body = [(r.name or "<root>", r.type_name, "train" if r.training else "eval",
                 _yes_no(r.track_running_stats), _momentum(r),
                 f"{_yes_no(r.weight_requires_grad)}/{_yes_no(r.bias_requires_grad)}",
                 r.normalizes_with, "YES" if r.updates_stats else "no")
                for r in self.rows]
        widths = [max(len(row[i]) for row in [header] + body) for i in range(len(header))]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines = [fmt.format(*header).rstrip(), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*row).rstrip() for row in body]
        lines.append(self.summary())
        lines.append("momentum is PyTorch's: running = (1 - m) * running + m * batch; "
                     "in parentheses the TF/Keras value, 1 - m.")
        return "\n".join(lines)

    __repr__ = __str__


def _yes_no(flag: Optional[bool]) -> str:
    return "-" if flag is None else ("yes" if flag else "no")


def _momentum(r: AuditRow) -> str:
    if r.cumulative_average:
        return "cumulative"
    if r.momentum is None:
        return "-"
    return f"{r.momentum:g} ({r.tf_momentum:g})"


def _rows(module: nn.Module, scope: Scope) -> List[AuditRow]:
    return [_row(name, m) for name, m in module.named_modules()
            if _is_norm(m) and scope.selects(name, m)]


def audit(module: nn.Module, *, include: Patterns = None, exclude: Patterns = None,
          predicate: Optional[Predicate] = None) -> AuditTable:
    """One row per normalisation layer of ``module`` (BatchNorm, SyncBatchNorm, timm's BN+act,
    frozen BatchNorms of any library, InstanceNorm, GroupNorm, LayerNorm, RMSNorm).

    ``print(audit(model))`` shows the table; the rows are :class:`AuditRow` data. What a row
    says holds for the next forward in the model's current train/eval mode.

    ``include``, ``exclude`` and ``predicate`` limit the table to some layers, as they limit
    :func:`~frozennorm.convert_frozen_bn` (``include="backbone.body"``,
    ``include=[f"model.{i}" for i in range(10)]``); a pattern that matches no module is a
    :class:`FrozenNormWarning`.
    """
    scope = Scope.build(include, exclude, predicate)
    unmatched = scope.unmatched(module)
    if unmatched:
        warnings.warn(f"audit: include/exclude pattern(s) {unmatched} match no module",
                      FrozenNormWarning, stacklevel=2)
    return AuditTable(_rows(module, scope))


class NotFrozenError(AssertionError):
    """Raised by :func:`assert_frozen`; ``rows`` are the offending layers."""

    def __init__(self, message: str, rows: Sequence[AuditRow]) -> None:
        super().__init__(message)
        self.rows = list(rows)


def assert_frozen(module: nn.Module, *, params: bool = False, include: Patterns = None,
                  exclude: Patterns = None, predicate: Optional[Predicate] = None) -> None:
    """Raise :class:`NotFrozenError`, naming the layers, unless every normalisation layer is
    frozen in the model's current mode.

    A layer fails when its running statistics would change on the next forward, or when it
    would normalise with the batch's statistics (a BatchNorm in train mode, or one without
    running statistics). With ``params=True`` a BatchNorm also fails when its weight or
    bias requires grad. Per-sample normalisations (GroupNorm, LayerNorm) have nothing to freeze
    and pass.

    ``include``, ``exclude`` and ``predicate`` check only some layers, as they select them for
    :func:`~frozennorm.convert_frozen_bn` (a partly frozen model: pass the scope you
    converted). A pattern that matches no module raises ValueError: an assertion about
    nothing would pass whatever the model does.
    """
    scope = Scope.build(include, exclude, predicate)
    unmatched = scope.unmatched(module)
    if unmatched:
        raise ValueError(f"assert_frozen: include/exclude pattern(s) {unmatched} match no "
                         f"module of the model: nothing would be checked there")
    failures = []
    for r in _rows(module, scope):
        why = []
        if r.updates_stats:
            why.append("its running statistics update on the next forward")
        if r.normalizes_with == BATCH:
            why.append("it normalizes with batch statistics")
        if (params and (r.frozen or issubclass(r.cls, _BatchNorm))
                and (r.weight_requires_grad or r.bias_requires_grad)):
            why.append("its weight/bias require grad")
        if why:
            failures.append((r, why))
    if failures:
        lines = [f"  {r.name or '<root>'} ({r.type_name}, {'train' if r.training else 'eval'} "
                 f"mode): {'; '.join(why)}" for r, why in failures]
        # frozennorm's own layers fail only for trainable weight/bias (trainable_affine),
        # which convert_frozen_bn leaves as they are: they need another remedy
        own = [r.name or "<root>" for r, _ in failures if issubclass(r.cls, FrozenBatchNorm)]
        advice = []
        if len(own) < len(failures):
            advice.append("frozennorm.convert_frozen_bn(model) freezes them for good "
                          "(model.eval() on a layer is undone by the next model.train()).")
        if own:
            advice.append(
                f"{_names(own)}: frozen by frozennorm with trainable weight and bias "
                "(trainable_affine), which convert_frozen_bn leaves as they are; "
                "frozennorm.revert_frozen_bn(model) then convert_frozen_bn(model, "
                "trainable_affine=False) makes them buffers, or requires_grad_(False) on "
                "their weight and bias stops their training.")
        raise NotFrozenError(
            f"{len(failures)} normalization layer(s) are not frozen:\n" + "\n".join(lines)
            + "\n" + "\n".join(advice), [r for r, _ in failures])
