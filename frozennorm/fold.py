"""fold_frozen_bn: fold each ``conv -> frozen BatchNorm`` pair into the convolution.

A frozen BatchNorm after a convolution is an affine map per output channel, ``s * y +
shift`` with ``s = weight / sqrt(running_var + eps)`` and ``shift = bias - running_mean *
s``, so ``bn(conv(x, W, b)) = conv(x, W * s, b * s) + shift``.

* ``mode="inference"``: the weights are rewritten once, in float64: the conv gets
  ``W * s`` and the BatchNorm's place a shift-only frozen BatchNorm (identity statistics,
  bias ``(b - running_mean) * s + bias``), which :func:`frozennorm.fuse` merges with the
  activation after it; or, with ``shift="conv_bias"``, the conv gets that bias and the
  BatchNorm's place holds an :class:`IdentityBatchNorm`.
* ``mode="training"``: the conv keeps its own trainable ``weight`` and ``bias`` and uses
  ``W * s`` (and ``b * s``) at each call (:class:`FoldedConv2d`), so the gradients with
  respect to ``W`` are those of the unfolded model and the conv sees the weight it will
  have after an inference fold (what quantization-aware training wants); the BatchNorm's
  place holds its frozen statistics, under the same state dict keys, and adds only the
  shift (:class:`FoldedFrozenBatchNorm`). Both read the statistics at call time. An
  inference fold of the model later completes the training fold.

Nothing a fold leaves behind can be folded twice by another tool: the inference fold's
shift-only BatchNorm and :class:`IdentityBatchNorm` fold again exactly (a framework's
conv+BN fuser, such as Ultralytics' ``fuse()``, which ``predict``/``val``/``export`` call,
then changes nothing), and the training fold's :class:`FoldedFrozenBatchNorm` presents no
BatchNorm attributes (such a fuser fails, saying to fold for inference first). The default
shift-only BatchNorm also survives fusers that build the fused conv from the conv's weight
alone, assuming it has no bias (timm's RepViT ``fuse()``, ``reparameterize_model``): with
``shift="conv_bias"`` such a fuser drops the folded bias.

The pairs are found in the forward of each module that calls a frozen BatchNorm (a
torch.fx trace of that forward alone, see :func:`frozennorm.fuse`): the conv's output must
feed the BatchNorm and nothing else. The modules are replaced in place in the module tree,
so the model keeps its classes and its own forwards.
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import warnings
from typing import (ClassVar, Dict, List, Literal, Optional, Set, Tuple, Type, Union,
                    overload)

import torch
from torch import Tensor, fx, nn

from .act import FrozenBatchNormAct2d, activation_of_module, bn_act_forward, has_hooks
from .convert import FrozenNormWarning
from .fuse import (SkippedLayer, TracedPart, UntraceableError, describe, join_path,
                   missed_layers, prepare, traced_parts)
from .modules import FrozenBatchNorm, is_frozen_batchnorm, register_fusable_forward
from .ops import channel_scale, compute_dtype, frozen_batch_norm_act

__all__ = ["fold_frozen_bn", "FoldReport", "FoldedPair", "FoldedFrozenBatchNorm",
           "FoldedFrozenBatchNormAct2d", "FoldedConv1d", "FoldedConv2d", "FoldedConv3d",
           "IdentityBatchNorm"]

Mode = Literal["inference", "training"]
Shift = Literal["conv_bias", "bn"]

_STATS = ("weight", "bias", "running_mean", "running_var")


def _check_not_symbolic(module: nn.Module, input: object) -> None:
    """torch.fx symbolic tracing (its input is a Proxy) cannot record a training fold."""
    if not isinstance(input, Tensor):
        from .quantization import check_not_quantization_tracing
        check_not_quantization_tracing(module, input)
        raise fx.proxy.TraceError(
            f"{type(module).__name__} (from fold_frozen_bn(..., 'training')) works from the "
            f"live weights and statistics at each call, which torch.fx symbolic tracing cannot "
            f"record: keep the folded modules leaf modules of the tracer (torchvision's "
            f"create_feature_extractor: tracer_kwargs={{'leaf_modules': [...]}})")


def _times_channel(t: Tensor, scale: Tensor) -> Tensor:
    """``t * scale`` per output channel (dim 0), in the scale's precision, in t's dtype."""
    view = scale.view([-1] + [1] * (t.dim() - 1))
    return (t.to(scale.dtype) * view).to(t.dtype)


# --------------------------------------------------------------------------------------
# What an inference fold leaves
# --------------------------------------------------------------------------------------

class IdentityBatchNorm(nn.Module):
    """What stays at a BatchNorm's place once :func:`fold_frozen_bn` folded it into the
    convolution before it: the identity.

    It presents the statistics of a BatchNorm that computes the identity (``weight`` 1,
    ``bias`` 0, ``running_mean`` 0, ``running_var`` 1, ``eps`` 0; non-persistent buffers,
    so not in the state dict), so that a framework's conv+BatchNorm fuser that folds it
    again (Ultralytics' ``fuse()``, which its ``predict``/``val``/``export`` call) changes
    nothing, exactly. Like a frozen BatchNorm it also takes the call
    ``(input, residual, activation=...)`` of a forward :func:`~frozennorm.fuse` rewrote.
    """

    def __init__(self, num_features: int, *, device: Optional[torch.device] = None,
                 dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        self.num_features = int(num_features)
        self.eps = 0.0
        kw = {"device": device, "dtype": dtype or torch.float32}
        for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0),
                            ("running_var", 1.0)):
            self.register_buffer(name, torch.full((num_features,), value, **kw),
                                 persistent=False)

    def forward(self, input: Tensor, residual: Optional[Tensor] = None,
                activation: str = "identity", inplace_add: bool = False) -> Tensor:
        if residual is None and activation == "identity":
            return input
        return frozen_batch_norm_act(input, self.running_mean, self.running_var, None, None,
                                     0.0, activation, residual, inplace_add)

    def extra_repr(self) -> str:
        return f"{self.num_features}, folded into the convolution before it"


register_fusable_forward(IdentityBatchNorm.forward)


# --------------------------------------------------------------------------------------
# Training-mode modules
# --------------------------------------------------------------------------------------

_HIDDEN = frozenset(_STATS + ("eps",))


class FoldedFrozenBatchNorm(nn.Module):
    """The BatchNorm half of a training-mode fold: ``x + shift``.

    Holds the frozen BatchNorm's tensors (``weight``, ``bias``, ``running_mean``,
    ``running_var``: the same tensors, buffers or, for a trainable-affine layer, weight and
    bias as the same Parameters, which keep training; the same state dict keys) and adds
    what the :class:`FoldedConv2d` before it leaves, ``shift = bias - running_mean *
    scale``, computed from them at each call. Called as ``(input, residual, activation=...)``
    (a forward :func:`~frozennorm.fuse` rewrote) it also adds the residual and applies the
    activation in the same pass.

    It does not compute a BatchNorm and does not look like one: the statistics are not
    attributes (``bn.running_mean`` raises, saying why; read them from the state dict or
    :meth:`statistics`), so that no conv+BatchNorm fuser folds them into the convolution
    a second time. ``convert_frozen_bn`` and ``revert_frozen_bn`` leave it alone (revert
    before folding). The statistics stay float32 under ``.half()``/``.bfloat16()``, as in
    FrozenBatchNorm.
    """

    #: A frozen normalisation layer to :func:`frozennorm.audit` and the converter.
    frozen_statistics: ClassVar[bool] = True

    def __init__(self, source: nn.Module) -> None:
        super().__init__()
        self.num_features = int(source.running_mean.numel())
        self.bn_eps = float(source.eps)
        for name, param in source.named_parameters(recurse=False):  # trainable weight/bias
            self.register_parameter(name, param)
        for name, buf in source.named_buffers(recurse=False):
            self.register_buffer(name, buf,
                                 persistent=name not in source._non_persistent_buffers_set)
        self.training = source.training

    # FrozenBatchNorm's cast rule (statistics never below float32); it calls no super().
    _apply = FrozenBatchNorm._apply

    def __getattr__(self, name: str):
        if name in _HIDDEN:
            raise AttributeError(
                f"{type(self).__name__} has no attribute {name!r}: it is the BatchNorm half "
                f"of a training-mode fold (frozennorm.fold_frozen_bn(model, 'training')), whose "
                f"scale already acts in the convolution before it, so no conv+BatchNorm fuser "
                f"may fold it again. Fold for inference first: frozennorm.fold_frozen_bn(model) "
                f"completes training-mode folds (its statistics: .statistics())")
        return super().__getattr__(name)

    def statistics(self) -> Dict[str, Tensor]:
        """``weight``, ``bias``, ``running_mean``, ``running_var`` (the tensors themselves:
        buffers, or Parameters for trainable weight and bias)."""
        return {name: self._buffers[name] if name in self._buffers else self._parameters[name]
                for name in _STATS}

    def affine(self, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
        """``(scale, shift)`` in ``dtype``, from the tensors as they are now:
        ``scale = weight / sqrt(running_var + eps)``, ``shift = bias - running_mean * scale``
        (differentiable in trainable weight and bias)."""
        b = self.statistics()
        scale = channel_scale(b["weight"], b["running_var"], self.bn_eps, dtype)
        return scale, b["bias"].to(dtype) - b["running_mean"].to(dtype) * scale

    def forward(self, input: Tensor, residual: Optional[Tensor] = None,
                activation: str = "identity", inplace_add: bool = False) -> Tensor:
        _check_not_symbolic(self, input)
        _, shift = self.affine(compute_dtype(input.dtype, self._buffers["running_mean"].dtype))
        zeros = torch.zeros_like(shift)
        # (input - 0) / sqrt(1 + 0) + shift: the shift, added with a single rounding
        return frozen_batch_norm_act(input, zeros, zeros + 1.0, None, shift, 0.0, activation,
                                     residual, inplace_add)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs):
        state_dict.pop(prefix + "num_batches_tracked", None)  # nn.BatchNorm*d checkpoints
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.bn_eps} (shift only: the scale is folded "
                f"into the conv)")


register_fusable_forward(FoldedFrozenBatchNorm.forward)


class FoldedFrozenBatchNormAct2d(FoldedFrozenBatchNorm):
    """:class:`FoldedFrozenBatchNorm` of a :class:`FrozenBatchNormAct2d`: ``act(drop(x +
    shift))``, with the source's ``drop`` and ``act`` modules (their state dict keys kept);
    a ReLU/ReLU6/SiLU without dropout runs in the same pass."""

    def __init__(self, source: FrozenBatchNormAct2d) -> None:
        super().__init__(source)
        for name in source._modules:
            self.add_module(name, source._modules[name])

    def forward(self, input: Tensor, residual: Optional[Tensor] = None,
                activation: str = "identity", inplace_add: bool = False) -> Tensor:
        return bn_act_forward(self, super().forward, input, residual, activation, inplace_add)


register_fusable_forward(FoldedFrozenBatchNormAct2d.forward)


class _FoldedConv:
    """A convolution that uses ``weight * s`` (and ``bias * s``) at each call, ``s`` read
    from its :class:`FoldedFrozenBatchNorm` (a plain attribute, not a submodule: the
    BatchNorm stays where it was in the module tree)."""

    weight: Tensor
    bias: Optional[Tensor]
    _conv_forward: "torch.nn.modules.conv._ConvNd._conv_forward"
    #: qualified name of the BatchNorm, for printing
    folded_bn_name: str
    _folded_bn: FoldedFrozenBatchNorm

    def forward(self, input: Tensor) -> Tensor:
        _check_not_symbolic(self, input)
        bn = self._folded_bn
        scale, _ = bn.affine(compute_dtype(self.weight.dtype,
                                           bn._buffers["running_var"].dtype))
        bias = None if self.bias is None else _times_channel(self.bias, scale)
        return self._conv_forward(input, _times_channel(self.weight, scale), bias)

    def extra_repr(self) -> str:
        base = super().extra_repr()  # type: ignore[misc]
        return f"{base}, folded_bn={self.folded_bn_name} (scale)"


class FoldedConv1d(_FoldedConv, nn.Conv1d):
    """``nn.Conv1d`` with a frozen BatchNorm's scale folded in at each call."""


class FoldedConv2d(_FoldedConv, nn.Conv2d):
    """``nn.Conv2d`` with a frozen BatchNorm's scale folded in at each call."""


class FoldedConv3d(_FoldedConv, nn.Conv3d):
    """``nn.Conv3d`` with a frozen BatchNorm's scale folded in at each call."""


_FOLDED_CONV: Dict[type, type] = {nn.Conv1d: FoldedConv1d, nn.Conv2d: FoldedConv2d,
                                  nn.Conv3d: FoldedConv3d}
_PLAIN_CONV: Dict[type, type] = {v: k for k, v in _FOLDED_CONV.items()}


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class FoldedPair:
    """A convolution and the frozen BatchNorm folded into it (qualified names)."""

    conv: str
    bn: str


@dataclasses.dataclass
class FoldReport:
    """What :func:`fold_frozen_bn` folded, what it left and why."""

    mode: str
    folded: List[FoldedPair] = dataclasses.field(default_factory=list)
    unfolded: List[SkippedLayer] = dataclasses.field(default_factory=list)
    #: Modules that call frozen BatchNorm layers from a forward that does not trace.
    untraced: List[UntraceableError] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"folded {len(self.folded)} conv -> frozen BatchNorm pair(s) ({self.mode})",
                 f"left {len(self.unfolded)} frozen BatchNorm layer(s) unfolded"]
        lines += [f"  {s.name}: {s.reason}" for s in self.unfolded]
        lines += [f"not traced: {e.path or '<root>'} ({e.module_type})" for e in self.untraced]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Finding the pairs
# --------------------------------------------------------------------------------------

_FOLDABLE_FORWARDS = (FrozenBatchNorm.forward, FrozenBatchNormAct2d.forward)


def _is_training_folded(conv: nn.Module, bn: nn.Module) -> bool:
    return isinstance(conv, _FoldedConv) and conv._folded_bn is bn


def _why_not(bn_node: fx.Node, modules: Dict[str, nn.Module], calls: Dict[int, int],
             part: TracedPart, mode: Mode) -> Optional[str]:
    """Why ``bn_node`` and the node before it cannot be folded (None: they can)."""
    bn = modules[bn_node.target]
    conv_node = bn_node.args[0] if bn_node.args else None
    conv = (modules.get(conv_node.target)
            if isinstance(conv_node, fx.Node) and conv_node.op == "call_module" else None)
    if isinstance(bn, FoldedFrozenBatchNorm):
        if mode == "training" or conv is None or not _is_training_folded(conv, bn):
            return "already folded (training mode)"
    elif type(bn).forward not in _FOLDABLE_FORWARDS:
        return (f"a {type(bn).__name__} (fold knows FrozenBatchNorm1d/2d/3d and "
                f"FrozenBatchNormAct2d)")
    elif conv is None or type(conv) not in _FOLDED_CONV:
        what = describe(conv_node, part.path) if isinstance(conv_node, fx.Node) else "a constant"
        if conv is not None:
            what += f" ({type(conv).__name__})"
        return f"its input comes from {what}, not from an nn.Conv1d/2d/3d"
    if len(conv_node.users) != 1:
        return f"the output of {describe(conv_node, part.path)} has other users"
    for node, module in ((bn_node, bn), (conv_node, conv)):
        if calls[id(module)] > 1:
            return f"{describe(node, part.path)} is called at {calls[id(module)]} places"
        if has_hooks(module):
            return f"{describe(node, part.path)} has hooks"
    if conv_node.kwargs or len(conv_node.args) != 1 or bn_node.kwargs or len(bn_node.args) != 1:
        return "called with extra arguments"
    if conv.out_channels != bn._buffers["running_mean"].numel():
        return (f"{conv.out_channels} conv channels, "
                f"{bn._buffers['running_mean'].numel()} BatchNorm channels")
    return None


def _foldable(module: nn.Module) -> bool:
    return is_frozen_batchnorm(module)


def _find_pairs(parts: List[TracedPart], mode: Mode, report: FoldReport, seen: Set[int]
                ) -> List[Tuple[TracedPart, str, str]]:
    """The (part, conv, bn) to fold; adds the frozen BatchNorm layers the graphs call to
    ``seen``."""
    calls: Dict[int, int] = collections.Counter()
    for part in parts:
        modules = part.modules()
        calls.update(id(modules[n.target]) for n in part.graph.nodes if n.op == "call_module")
    pairs = []
    for part in parts:
        modules = part.modules()
        for node in part.graph.nodes:
            if node.op != "call_module" or not _foldable(modules[node.target]):
                continue
            seen.add(id(modules[node.target]))
            reason = _why_not(node, modules, calls, part, mode)
            if reason is None:
                pairs.append((part, node.args[0].target, node.target))
            else:
                report.unfolded.append(SkippedLayer(describe(node, part.path), reason))
    return pairs


# --------------------------------------------------------------------------------------
# Folding one pair
# --------------------------------------------------------------------------------------

def _rebuild_conv(conv: nn.Module, cls: type, weight: nn.Parameter,
                  bias: Optional[nn.Parameter]) -> nn.Module:
    """A ``cls`` convolution configured like ``conv``, holding ``weight`` and ``bias``."""
    new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
              padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
              bias=bias is not None, padding_mode=conv.padding_mode, device="meta",
              dtype=weight.dtype)
    new.weight = weight
    new.bias = bias
    new.train(conv.training)
    return new


def _statistics(bn: nn.Module) -> Dict[str, Tensor]:
    if isinstance(bn, FoldedFrozenBatchNorm):
        return dict(bn.statistics(), eps=bn.bn_eps)
    return {name: getattr(bn, name) for name in _STATS + ("eps",)}


def _folded_constants(conv: nn.Module, stats: Dict[str, Tensor]) -> Tuple[Tensor, Tensor]:
    """``W * s`` and ``(b - running_mean) * s + bias``, computed in float64."""
    s = channel_scale(stats["weight"].detach(), stats["running_var"].detach(), stats["eps"],
                      torch.float64)
    weight = _times_channel(conv.weight.detach().double(), s)
    conv_bias = conv.bias.detach().double() if conv.bias is not None else 0.0
    shift = ((conv_bias - stats["running_mean"].detach().double()) * s
             + stats["bias"].detach().double())
    return weight, shift


def _shift_only(bn: nn.Module, shift: Tensor) -> nn.Module:
    """A frozen BatchNorm computing ``x + shift`` (then ``bn``'s drop and act, if any)."""
    if isinstance(bn, FoldedFrozenBatchNorm):
        mean = bn.statistics()["running_mean"]
        kw = {"device": mean.device, "dtype": mean.dtype}
        new = (FrozenBatchNormAct2d(mean.numel(), act=bn.act, drop=bn.drop, **kw)
               if isinstance(bn, FoldedFrozenBatchNormAct2d) else FrozenBatchNorm(mean.numel(), **kw))
        new.train(bn.training)
    else:
        new = copy.deepcopy(bn)
    new.eps = 0.0  # scale = weight / sqrt(var + eps) = 1 exactly
    with torch.no_grad():
        new.running_mean.zero_()
        new.running_var.fill_(1.0)
        new.weight.fill_(1.0)
        new.bias.copy_(shift)
    return new


def _what_remains(bn: nn.Module, conv: nn.Module) -> nn.Module:
    """What stays at a BatchNorm's place when its affine map went into the conv's bias."""
    if isinstance(bn, (FrozenBatchNormAct2d, FoldedFrozenBatchNormAct2d)):
        rest = [(n, m) for n, m in bn.named_children() if activation_of_module(m) != "identity"]
        if rest:
            return nn.Sequential(collections.OrderedDict(rest))
    return IdentityBatchNorm(conv.out_channels, device=conv.weight.device,
                             dtype=conv.weight.dtype).train(bn.training)


def _inference_pair(conv: nn.Module, bn: nn.Module, shift_to: Shift
                    ) -> Tuple[nn.Module, nn.Module]:
    weight, shift = _folded_constants(conv, _statistics(bn))
    cls = _PLAIN_CONV.get(type(conv), type(conv))
    w = nn.Parameter(weight.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)
    if shift_to == "conv_bias":
        b = nn.Parameter(shift.to(conv.weight.dtype), requires_grad=w.requires_grad)
        return _rebuild_conv(conv, cls, w, b), _what_remains(bn, conv)
    return _rebuild_conv(conv, cls, w, None), _shift_only(bn, shift)


def _training_pair(conv: nn.Module, bn: nn.Module, bn_name: str
                   ) -> Tuple[nn.Module, nn.Module]:
    folded_bn = (FoldedFrozenBatchNormAct2d(bn) if isinstance(bn, FrozenBatchNormAct2d)
                 else FoldedFrozenBatchNorm(bn))
    folded = _rebuild_conv(conv, _FOLDED_CONV[type(conv)], conv.weight, conv.bias)
    folded.folded_bn_name = bn_name
    folded.__dict__["_folded_bn"] = folded_bn  # not a submodule: no second state dict entry
    return folded, folded_bn


# --------------------------------------------------------------------------------------
# fold_frozen_bn
# --------------------------------------------------------------------------------------

@overload
def fold_frozen_bn(module: nn.Module, mode: Mode = ..., *, shift: Optional[Shift] = ...,
                   inplace: bool = ..., tracer_class: Type[fx.Tracer] = ...,
                   report: Literal[False] = ...) -> nn.Module: ...


@overload
def fold_frozen_bn(module: nn.Module, mode: Mode = ..., *, shift: Optional[Shift] = ...,
                   inplace: bool = ..., tracer_class: Type[fx.Tracer] = ...,
                   report: Literal[True]) -> Tuple[nn.Module, FoldReport]: ...


def fold_frozen_bn(module: nn.Module, mode: Mode = "inference", *,
                   shift: Optional[Shift] = None, inplace: bool = False,
                   tracer_class: Type[fx.Tracer] = fx.Tracer,
                   report: bool = False) -> Union[nn.Module, Tuple[nn.Module, FoldReport]]:
    """Fold every ``conv -> frozen BatchNorm`` pair of ``module`` into the convolution.

    A pair is an ``nn.Conv1d/2d/3d`` (any stride, padding, dilation, groups, with or
    without bias; transposed convolutions are not folded) whose output feeds only a frozen
    BatchNorm (:class:`FrozenBatchNorm1d/2d/3d` or :class:`FrozenBatchNormAct2d`), each
    called once, in the forward of the module that holds them.

    Args:
        module: the model, its BatchNorm frozen (:func:`convert_frozen_bn`). Modules whose
            forward does not trace keep their pairs unfolded (a warning names them).
        mode: ``"inference"``: rewrite the weights once (``W * s`` and the folded shift,
            computed in float64, cast to the conv's dtype; see ``shift``). Pairs of an
            earlier training-mode fold are folded this way too.
            ``"training"``: the conv keeps ``weight``/``bias`` as its trainable parameters
            and uses ``W * s`` at each call (what quantization-aware training wants); the
            BatchNorm's place keeps the frozen statistics and adds the shift. Outputs,
            gradients, state dict keys and values are the unfolded model's.
        shift: where the per-channel shift goes in inference mode: ``"bn"`` (the default),
            a shift-only frozen BatchNorm at the BatchNorm's place, which :func:`fuse`
            merges with the activation or residual add after it and every conv+BN fuser
            folds exactly; or ``"conv_bias"``, the conv's bias (one module less; a fuser
            that assumes bias-free convs drops it). Training mode always keeps it at the
            BatchNorm's place.
        inplace: change ``module`` itself (and return it); the default folds a deep copy.
        tracer_class: the ``torch.fx.Tracer`` subclass to trace with (see :func:`fuse`).
        report: also return a :class:`FoldReport`.

    Example::

        model = frozennorm.convert_frozen_bn(torchvision.models.resnet50(weights="DEFAULT"))
        deploy = frozennorm.fuse(frozennorm.fold_frozen_bn(model.eval()))  # inference
        qat = frozennorm.fold_frozen_bn(model, "training")             # the conv sees W * s
    """
    if mode not in ("inference", "training"):
        raise ValueError(f"mode must be 'inference' or 'training', got {mode!r}")
    if shift not in (None, "conv_bias", "bn"):
        raise ValueError(f"shift must be 'conv_bias' or 'bn', got {shift!r}")
    if mode == "training" and shift == "conv_bias":
        raise ValueError("fold_frozen_bn(mode='training') keeps the shift at the BatchNorm's "
                         "place, which holds the statistics: shift='conv_bias' is for inference")
    root = prepare(module, inplace)
    rep = FoldReport(mode)
    parts, rep.untraced = traced_parts(root, "fold_frozen_bn", _foldable, tracer_class)
    seen: Set[int] = set()
    pairs = _find_pairs(parts, mode, rep, seen)
    missed = missed_layers(root, rep.untraced, _foldable, seen)
    rep.unfolded += [SkippedLayer(name, why) for name, why in missed]
    for part, conv_name, bn_name in pairs:
        conv, bn = part.module.get_submodule(conv_name), part.module.get_submodule(bn_name)
        full_bn = join_path(part.path, bn_name)
        if mode == "training":
            new_conv, new_bn = _training_pair(conv, bn, full_bn)
        else:
            new_conv, new_bn = _inference_pair(conv, bn, shift or "bn")
        part.module.set_submodule(conv_name, new_conv)
        part.module.set_submodule(bn_name, new_bn)
        rep.folded.append(FoldedPair(join_path(part.path, conv_name), full_bn))
    if rep.untraced:
        untraced = [name for name, why in missed if "does not trace" in why]
        warnings.warn(
            f"fold_frozen_bn: {len(untraced)} frozen BatchNorm layer(s) are called from a "
            f"forward torch.fx cannot trace and were not folded ({', '.join(untraced[:4])}"
            f"{', ...' if len(untraced) > 4 else ''}):\n"
            + "\n".join(str(e) for e in rep.untraced), FrozenNormWarning, stacklevel=2)
    return (root, rep) if report else root
