"""fold_frozen_bn: fold each ``conv -> frozen BatchNorm`` pair into the convolution.

A frozen BatchNorm after a convolution is an affine map per output channel, ``s * y +
shift`` with ``s = weight / sqrt(running_var + eps)`` and ``shift = bias - running_mean *
s``, so ``bn(conv(x, W, b)) = conv(x, W * s, b * s) + shift``.

* ``mode="inference"``: the weights are rewritten once, in float64: the conv gets
  ``W * s`` and the bias ``(b - running_mean) * s + bias`` and the BatchNorm becomes
  ``nn.Identity`` (or, with ``shift="bn"``, a shift-only frozen BatchNorm that
  :func:`~frozennorm.fuse` merges with the activation after it).
* ``mode="training"``: the conv keeps its own trainable ``weight`` and ``bias`` and uses
  ``W * s`` (and ``b * s``) at each call (:class:`FoldedConv2d`), so the gradients with
  respect to ``W`` are those of the unfolded model; the BatchNorm's place holds its
  frozen statistics, under the same state dict keys, and applies only the shift
  (:class:`FoldedFrozenBatchNorm`). Both read the statistics at call time, so loading a
  checkpoint into the folded model updates the folding. State dicts load both ways.
  That is ``policy="all"`` (the default). ``policy="auto"`` folds only where that saves
  work: a BatchNorm that :func:`~frozennorm.fuse` merges with its activation already
  costs no pass of its own, while the others (a ResNet's downsample BatchNorm) fold whole
  and pick per call the cheaper of scaling the weight and a pass over the output.

The pairs are found by tracing with ``torch.fx`` (the conv's output must feed the
BatchNorm and nothing else); the modules are replaced in place in the module tree, so the
model keeps its classes and its own forward. Parts that do not trace (a detection model's
transform) are passed over: the traceable parts below them are folded.
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import warnings
from typing import (Callable, ClassVar, Dict, List, Literal, Optional, Set, Tuple, Type,
                    TypeVar, Union, overload)

import torch
from torch import Tensor, fx, nn

from .act import FrozenBatchNormAct2d
from .convert import FrozenNormWarning, is_frozen_batchnorm
from .fuse import (FuseReport, LeafModules, SkippedLayer, TracedPart, UntraceableError,
                   _Rewriter, activation_of_module, call_counts, describe, has_hooks, join_path,
                   only_user, prepare, traceable_parts)
from .modules import FrozenBatchNorm, FusedFrozenBatchNorm
from .ops import (ACTIVATIONS, channel_scale, compute_dtype, frozen_batch_norm,
                  frozen_batch_norm_act)

__all__ = ["fold_frozen_bn", "FoldReport", "FoldedPair", "FoldedFrozenBatchNorm",
           "FoldedFrozenBatchNormAct2d", "FoldedConv1d", "FoldedConv2d", "FoldedConv3d"]

Mode = Literal["inference", "training"]
Shift = Literal["conv_bias", "bn"]
Policy = Literal["auto", "all"]


def _capturing() -> bool:
    """A graph is being captured (torch.compile/export, jit.trace): nothing is cached."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def _check_not_symbolic(module: nn.Module, input: object) -> None:
    """torch.fx symbolic tracing (its input is a Proxy) cannot record a training fold."""
    if not isinstance(input, Tensor):
        raise fx.proxy.TraceError(
            f"{type(module).__name__} (from fold_frozen_bn(..., 'training')) works from the "
            f"live weights and statistics at each call, which torch.fx symbolic tracing cannot "
            f"record: keep the folded modules leaf modules of the tracer, as frozennorm.fuse "
            f"does (torchvision's create_feature_extractor: tracer_kwargs={{'leaf_modules': "
            f"[...]}})")


_T = TypeVar("_T")


def _kept(owner: nn.Module, slot: str, sources: Tuple[Optional[Tensor], ...], key: tuple,
          compute: Callable[[], _T], keep: bool = True) -> _T:
    """``compute()``, kept in ``owner.__dict__[slot]`` between calls while ``sources`` are
    the same tensors, unchanged (storage, version, dtype, device: an in-place update,
    ``load_state_dict``, ``.to()`` or DDP's buffer broadcast all invalidate it) and ``key``
    is equal; computed afresh at every call when ``keep`` is false or a graph is captured."""
    keep = keep and not _capturing()
    if keep:
        try:
            key = key + tuple(None if t is None else (t.data_ptr(), t._version, t.dtype, t.device)
                              for t in sources)
        except RuntimeError:  # inference tensors have no version counter
            keep = False
    cache = owner.__dict__.get(slot)
    if (keep and cache is not None and cache[0] == key
            and all(a is b for a, b in zip(cache[1], sources))):
        return cache[2]
    value = compute()
    if keep:
        owner.__dict__[slot] = (key, sources, value)
    return value


# --------------------------------------------------------------------------------------
# Training-mode modules
# --------------------------------------------------------------------------------------

class FoldedFrozenBatchNorm(nn.Module):
    """The BatchNorm half of a training-mode fold: ``act(x + shift [+ residual])``.

    Holds the frozen BatchNorm's buffers (``weight``, ``bias``, ``running_mean``,
    ``running_var``: the same tensors, the same state dict keys) and applies what the
    :class:`FoldedConv2d` before it leaves: ``shift = bias - running_mean * scale``,
    computed from the buffers at each call, then ``activation`` ("identity", "relu",
    "relu6" or "silu") with an optional residual, in one fused op. :func:`fuse` sets
    ``activation`` to merge a following add/activation.

    Deliberately not a :class:`FrozenBatchNorm`: on its own it does not compute a
    BatchNorm, so ``convert_frozen_bn`` leaves it alone and ``revert_frozen_bn`` leaves it
    too, with a warning (revert before folding). The statistics stay float32 under
    ``.half()``/``.bfloat16()``, as in FrozenBatchNorm.
    """

    #: fuse() may set ``activation``; forward takes ``(input, residual=None)``.
    fusable_activation: ClassVar[bool] = True
    #: (class default: modules pickled before the attribute existed apply the shift)
    conv_applies_shift: bool = False

    weight: Tensor
    bias: Tensor
    running_mean: Tensor
    running_var: Tensor

    def __init__(self, source: nn.Module, activation: str = "identity",
                 conv_applies_shift: bool = False) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.num_features = int(source.running_mean.numel())
        self.eps = float(source.eps)
        self.activation = activation
        #: The conv before applies the whole affine map, shift included (the pairs that
        #: ``policy="auto"`` folds): only the residual and the activation are left here.
        self.conv_applies_shift = conv_applies_shift
        for name, buf in source.named_buffers(recurse=False):
            self.register_buffer(name, buf,
                                 persistent=name not in source._non_persistent_buffers_set)
        self.training = source.training

    # FrozenBatchNorm's cast rule (statistics never below float32); it calls no super().
    _apply = FrozenBatchNorm._apply

    def _constants(self, dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(scale, mean * scale - bias, ones, zeros)`` in ``dtype``, from the buffers as
        they are.

        Kept between calls while the buffers are the same tensors at the same version (an
        in-place update, ``load_state_dict``, ``.to()`` or DDP's buffer broadcast all
        invalidate it), so a training step does not relaunch these per-channel ops for every
        layer; recomputed on every call while a graph is captured.
        """
        def compute() -> Tuple[Tensor, Tensor, Tensor, Tensor]:
            scale = channel_scale(self.weight, self.running_var, self.eps, dtype)
            # (input - (mean * scale - bias)) * 1: the shift, added with a single rounding
            neg_shift = self.running_mean.to(dtype) * scale - self.bias.to(dtype)
            return scale, neg_shift, torch.ones_like(neg_shift), torch.zeros_like(neg_shift)

        buffers = (self.weight, self.bias, self.running_mean, self.running_var)
        return _kept(self, "_constants_cache", buffers, (dtype, self.eps), compute)

    def scale(self, dtype: torch.dtype) -> Tensor:
        """``weight / sqrt(running_var + eps)`` in ``dtype``, from the buffers as they are now."""
        return self._constants(dtype)[0]

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        _check_not_symbolic(self, input)
        if self.conv_applies_shift and self.activation == "identity" and residual is None:
            return input
        _, neg_shift, ones, zeros = self._constants(
            compute_dtype(input.dtype, self.running_mean.dtype))
        if self.conv_applies_shift:
            neg_shift = zeros
        return frozen_batch_norm_act(input, neg_shift, ones, None, None, 0.0, self.activation,
                                     residual)

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_constants_cache", None)  # tensors derived from the buffers: not state
        return state

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs):
        state_dict.pop(prefix + "num_batches_tracked", None)  # nn.BatchNorm*d checkpoints
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        folded = ("the affine map is folded into the conv" if self.conv_applies_shift
                  else "shift only: the scale is folded into the conv")
        return f"{self.num_features}, eps={self.eps}, activation={self.activation} ({folded})"


class FoldedFrozenBatchNormAct2d(FoldedFrozenBatchNorm):
    """:class:`FoldedFrozenBatchNorm` of a :class:`FrozenBatchNormAct2d` whose ``drop`` or
    ``act`` the fused op does not compute: ``act(drop(x + shift))``, with the source's
    ``drop`` and ``act`` modules (their state dict keys kept)."""

    fusable_activation: ClassVar[bool] = False

    def __init__(self, source: FrozenBatchNormAct2d, conv_applies_shift: bool = False) -> None:
        super().__init__(source, conv_applies_shift=conv_applies_shift)
        for name in source._modules:
            self.add_module(name, source._modules[name])

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        return self.act(self.drop(super().forward(input, residual)))


def _times_channel(t: Tensor, scale: Tensor) -> Tensor:
    """``t * scale`` per output channel (dim 0), in the scale's precision, in t's dtype."""
    view = scale.view([-1] + [1] * (t.dim() - 1))
    return (t.to(scale.dtype) * view).to(t.dtype)


def _output_numel(conv: nn.Module, input: Tensor) -> int:
    """Elements of ``conv(input)``, from the shapes alone."""
    dims = len(conv.kernel_size)
    spatial = input.shape[input.dim() - dims:]
    numel_in = 1
    for size in spatial:
        numel_in *= size
    numel = input.numel() // max(conv.in_channels * numel_in, 1) * conv.out_channels
    for i, size in enumerate(spatial):
        if conv.padding == "same":
            numel *= size
            continue
        pad = 0 if conv.padding == "valid" else conv.padding[i]
        extent = conv.dilation[i] * (conv.kernel_size[i] - 1) + 1
        numel *= max((size + 2 * pad - extent) // conv.stride[i] + 1, 0)
    return numel


class _FoldedConv:
    """A convolution that uses ``weight * s`` (and ``bias * s``) at each call, ``s`` read
    from its :class:`FoldedFrozenBatchNorm` (a plain attribute, not a submodule: the
    BatchNorm stays where it was in the module tree).

    With ``fold_shift`` (the pairs ``policy="auto"`` folds) it applies the BatchNorm's whole
    affine map, and at each call takes the cheaper way: the scaled weight with the shift
    as the conv's bias, when the weight has no more elements than the conv's output (or
    needs no gradient, see below), else the conv with its own weight followed by the
    frozen BatchNorm op on the output (the unfolded computation). Either way one pass over
    weight-sized or output-sized memory forward, and one backward, instead of both.

    While no gradient reaches the weight (frozen convs, ``no_grad`` evaluation) the scaled
    weight and bias are kept between calls, recomputed when the weight, bias or the
    BatchNorm's buffers change (an optimizer step, ``load_state_dict``, ``.to()``).
    """

    weight: Tensor
    bias: Optional[Tensor]
    _conv_forward: Callable[[Tensor, Tensor, Optional[Tensor]], Tensor]
    #: qualified name of the BatchNorm, for printing
    folded_bn_name: str
    _folded_bn: FoldedFrozenBatchNorm
    #: also add the BatchNorm's shift (through the bias), choosing per call (see above)
    fold_shift: bool = False

    def forward(self, input: Tensor) -> Tensor:
        _check_not_symbolic(self, input)
        bn = self._folded_bn
        if self.fold_shift and not self._scale_weight(input):
            out = self._conv_forward(input, self.weight, self.bias)
            return frozen_batch_norm(out, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                     bn.eps)
        weight, bias = self._folded_parameters(bn)
        return self._conv_forward(input, weight, bias)

    def _needs_grad(self) -> bool:
        return torch.is_grad_enabled() and (
            self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad))

    def _scale_weight(self, input: Tensor) -> bool:
        """Whether scaling the weight costs less than a pass over the conv's output."""
        return not self._needs_grad() or self.weight.numel() <= _output_numel(self, input)

    def _folded_parameters(self, bn: FoldedFrozenBatchNorm) -> Tuple[Tensor, Optional[Tensor]]:
        """``W * s`` and ``b * s`` (``+ shift`` with ``fold_shift``), kept between calls
        while nothing needs their gradient."""
        dtype = compute_dtype(self.weight.dtype, bn.running_var.dtype)
        scale, neg_shift = bn._constants(dtype)[:2]

        def compute() -> Tuple[Tensor, Optional[Tensor]]:
            weight = _times_channel(self.weight, scale)
            bias = None if self.bias is None else _times_channel(self.bias, scale)
            if self.fold_shift:
                # (b - mean) * s + beta = b * s - (mean * s - beta), in the compute dtype
                b = -neg_shift if self.bias is None else self.bias.to(dtype) * scale - neg_shift
                bias = b.to(self.weight.dtype)
            return weight, bias

        # (the constants are new tensors whenever the BatchNorm's buffers change)
        return _kept(self, "_folded_cache", (self.weight, self.bias, scale, neg_shift),
                     (self.fold_shift,), compute, keep=not self._needs_grad())

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_folded_cache", None)  # tensors derived from the parameters: not state
        return state

    def extra_repr(self) -> str:
        what = "affine map" if self.fold_shift else "scale"
        base = super().extra_repr()  # type: ignore[misc]
        return f"{base}, folded_bn={self.folded_bn_name} ({what})"


class FoldedConv1d(_FoldedConv, nn.Conv1d):
    """``nn.Conv1d`` with a frozen BatchNorm's scale folded in at each call."""


class FoldedConv2d(_FoldedConv, nn.Conv2d):
    """``nn.Conv2d`` with a frozen BatchNorm's scale folded in at each call."""


class FoldedConv3d(_FoldedConv, nn.Conv3d):
    """``nn.Conv3d`` with a frozen BatchNorm's scale folded in at each call."""


_FOLDED_CONV: Dict[type, type] = {nn.Conv1d: FoldedConv1d, nn.Conv2d: FoldedConv2d,
                                  nn.Conv3d: FoldedConv3d}


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
    #: Modules whose own forward did not trace (the traceable parts below them were folded).
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

def _is_foldable_bn(module: nn.Module) -> bool:
    forward = type(module).forward
    return forward in (FrozenBatchNorm.forward, FrozenBatchNormAct2d.forward,
                       FusedFrozenBatchNorm.forward)


def _why_not(bn_node: fx.Node, modules: Dict[str, nn.Module], calls: Dict[str, int],
             prefix: str) -> Optional[str]:
    """Why ``bn_node`` and the node before it cannot be folded (None: they can)."""
    bn = modules[bn_node.target]
    if isinstance(bn, FoldedFrozenBatchNorm):
        return "already folded"
    if not _is_foldable_bn(bn):
        return (f"a {type(bn).__name__} (fold knows FrozenBatchNorm1d/2d/3d, "
                f"FrozenBatchNormAct2d and FusedFrozenBatchNorm)")
    conv_node = bn_node.args[0] if bn_node.args else None
    if not isinstance(conv_node, fx.Node):
        return "its input is not a graph value"
    conv = modules.get(conv_node.target) if conv_node.op == "call_module" else None
    if conv is None or type(conv) not in _FOLDED_CONV:
        what = describe(conv_node, prefix)
        if conv is not None:
            what += f" ({type(conv).__name__})"
        return f"its input comes from {what}, not from an nn.Conv1d/2d/3d"
    if only_user(conv_node) is not bn_node:
        return f"the output of {describe(conv_node, prefix)} has other users"
    for node, module in ((bn_node, bn), (conv_node, conv)):
        if calls[node.target] > 1:
            return f"{describe(node, prefix)} is called at {calls[node.target]} places"
        if has_hooks(module):
            return f"{describe(node, prefix)} has hooks"
    if conv_node.kwargs or len(conv_node.args) != 1 or bn_node.kwargs:
        return "called with extra arguments"
    if conv.out_channels != bn.running_mean.numel():
        return f"{conv.out_channels} conv channels, {bn.running_mean.numel()} BatchNorm channels"
    return None


def _find_pairs(part: TracedPart, report: FoldReport, seen: Set[int], auto: bool
                ) -> List[Tuple[str, str, bool]]:
    """The (conv, bn, whole map) to fold in ``part``; adds the frozen BatchNorm layers its
    graph calls to ``seen``. ``auto``: a BatchNorm that computes, or that :func:`fuse`
    would make compute, an add or activation in its pass is left as it is; the others fold
    whole (scale and shift)."""
    modules = dict(part.module.named_modules())
    calls = call_counts(part.graph)
    fusion = _Rewriter(part.module, part.graph, part.path, FuseReport()) if auto else None
    pairs = []
    for node in part.graph.nodes:
        if node.op != "call_module" or not is_frozen_batchnorm(modules[node.target]):
            continue
        seen.add(id(modules[node.target]))
        reason = _why_not(node, modules, calls, part.path)
        # asked of every BatchNorm in graph order, as fuse() meets them
        tail = fusion.fusable_tail(node) if fusion is not None else None
        if tail and reason is None:
            reason = (f"its pass also computes {tail} (with fuse()): folding would add a "
                      f"pass over the weight and remove none (policy='auto')")
        if reason is None:
            pairs.append((node.args[0].target, node.target, auto))
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


def _folded_constants(conv: nn.Module, bn: nn.Module) -> Tuple[Tensor, Tensor]:
    """``W * s`` and ``(b - running_mean) * s + bias``, computed in float64."""
    s = channel_scale(bn.weight.detach(), bn.running_var.detach(), bn.eps, torch.float64)
    weight = _times_channel(conv.weight.detach().double(), s)
    conv_bias = conv.bias.detach().double() if conv.bias is not None else 0.0
    shift = (conv_bias - bn.running_mean.detach().double()) * s + bn.bias.detach().double()
    return weight, shift


def _shift_only(bn: nn.Module, shift: Tensor) -> nn.Module:
    """A module of ``bn``'s class (with its activation, residual, drop) computing ``x + shift``."""
    new = copy.deepcopy(bn)
    new.eps = 0.0  # scale = weight / sqrt(var + eps) = 1 exactly
    with torch.no_grad():
        new.running_mean.zero_()
        new.running_var.fill_(1.0)
        new.weight.fill_(1.0)
        new.bias.copy_(shift)
    return new


def _what_remains(bn: nn.Module) -> nn.Module:
    """What stays at a BatchNorm's place when its affine map went into the conv's bias."""
    if not isinstance(bn, FrozenBatchNormAct2d):
        return nn.Identity()
    rest = [(n, m) for n, m in bn.named_children() if activation_of_module(m) != "identity"]
    return nn.Sequential(collections.OrderedDict(rest)) if rest else nn.Identity()


def _inference_pair(conv: nn.Module, bn: nn.Module, shift_to: Shift
                    ) -> Tuple[nn.Module, nn.Module]:
    weight, shift = _folded_constants(conv, bn)
    w = nn.Parameter(weight.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)
    if shift_to == "conv_bias" and not isinstance(bn, FusedFrozenBatchNorm):
        b = nn.Parameter(shift.to(conv.weight.dtype), requires_grad=w.requires_grad)
        return _rebuild_conv(conv, type(conv), w, b), _what_remains(bn)
    return _rebuild_conv(conv, type(conv), w, None), _shift_only(bn, shift)


def _training_bn(bn: nn.Module, whole: bool) -> FoldedFrozenBatchNorm:
    if isinstance(bn, FusedFrozenBatchNorm):
        return FoldedFrozenBatchNorm(bn, bn.activation, whole)
    if isinstance(bn, FrozenBatchNormAct2d):
        act = activation_of_module(bn.act)
        if act is None or activation_of_module(bn.drop) != "identity":
            return FoldedFrozenBatchNormAct2d(bn, whole)
        return FoldedFrozenBatchNorm(bn, act, whole)
    return FoldedFrozenBatchNorm(bn, conv_applies_shift=whole)


def _training_pair(conv: nn.Module, bn: nn.Module, bn_name: str, whole: bool
                   ) -> Tuple[nn.Module, nn.Module]:
    folded_bn = _training_bn(bn, whole)
    folded = _rebuild_conv(conv, _FOLDED_CONV[type(conv)], conv.weight, conv.bias)
    folded.folded_bn_name = bn_name
    folded.fold_shift = whole
    folded.__dict__["_folded_bn"] = folded_bn  # not a submodule: no second state dict entry
    return folded, folded_bn


# --------------------------------------------------------------------------------------
# fold_frozen_bn
# --------------------------------------------------------------------------------------

def _fold_part(part: TracedPart, pairs: List[Tuple[str, str, bool]], mode: Mode,
               shift: Shift, report: FoldReport) -> None:
    for conv_name, bn_name, whole in pairs:
        conv = part.module.get_submodule(conv_name)
        bn = part.module.get_submodule(bn_name)
        full_bn = join_path(part.path, bn_name)
        if mode == "training":
            new_conv, new_bn = _training_pair(conv, bn, full_bn, whole)
        else:
            new_conv, new_bn = _inference_pair(conv, bn, shift)
        part.module.set_submodule(conv_name, new_conv)
        part.module.set_submodule(bn_name, new_bn)
        report.folded.append(FoldedPair(join_path(part.path, conv_name), full_bn))


def _not_seen(root: nn.Module, parts: List[TracedPart], seen: Set[int]
              ) -> Tuple[List[SkippedLayer], List[str]]:
    """Frozen BatchNorm layers no traced graph calls: inside leaf modules, or (returned
    apart too) called from a forward that does not trace."""
    traced = {id(m) for part in parts for m in part.module.modules()}
    skipped, untraced = [], []
    for name, m in root.named_modules():
        if is_frozen_batchnorm(m) and id(m) not in seen:
            if id(m) in traced:
                skipped.append(SkippedLayer(name, "inside a leaf module"))
            else:
                skipped.append(SkippedLayer(name, "inside a forward that does not trace"))
                untraced.append(name)
    return skipped, untraced


@overload
def fold_frozen_bn(module: nn.Module, mode: Mode = ..., *, shift: Optional[Shift] = ...,
                   policy: Policy = ..., inplace: bool = ..., leaf_modules: LeafModules = ...,
                   tracer_class: Type[fx.Tracer] = ..., report: Literal[False] = ...
                   ) -> nn.Module: ...


@overload
def fold_frozen_bn(module: nn.Module, mode: Mode = ..., *, shift: Optional[Shift] = ...,
                   policy: Policy = ..., inplace: bool = ..., leaf_modules: LeafModules = ...,
                   tracer_class: Type[fx.Tracer] = ..., report: Literal[True]
                   ) -> Tuple[nn.Module, FoldReport]: ...


def fold_frozen_bn(module: nn.Module, mode: Mode = "inference", *,
                   shift: Optional[Shift] = None, policy: Policy = "all", inplace: bool = False,
                   leaf_modules: LeafModules = (), tracer_class: Type[fx.Tracer] = fx.Tracer,
                   report: bool = False) -> Union[nn.Module, Tuple[nn.Module, FoldReport]]:
    """Fold every ``conv -> frozen BatchNorm`` pair of ``module`` into the convolution.

    A pair is an ``nn.Conv1d/2d/3d`` (any stride, padding, dilation, groups, with or
    without bias; transposed convolutions are not folded) whose output feeds only a frozen
    BatchNorm (:class:`FrozenBatchNorm1d/2d/3d`, :class:`FrozenBatchNormAct2d`, or a
    :class:`FusedFrozenBatchNorm` from :func:`fuse`), each called once.

    Args:
        module: the model, its BatchNorm frozen (:func:`convert_frozen_bn`). Parts whose
            forward does not trace are passed over; the report lists them.
        mode: ``"inference"``: rewrite the weights once (``W * s`` and the folded bias,
            computed in float64, cast to the conv's dtype); the BatchNorm disappears (its
            state dict keys with it, and the conv gains a ``bias``). ``"training"``: the
            conv keeps ``weight``/``bias`` as its trainable parameters and uses ``W * s``
            at each call; the BatchNorm's place keeps the frozen statistics. Gradients,
            state dict keys and values are the unfolded model's (see ``policy``).
        shift: where the per-channel shift goes in inference mode: ``"conv_bias"`` (the
            default) or ``"bn"``, a shift-only frozen BatchNorm at the BatchNorm's place
            that :func:`fuse` merges with the next activation (on GPUs, a conv bias costs
            its own pass). Training mode always keeps it at the BatchNorm's place.
        policy: which pairs a training-mode fold folds (inference mode folds every pair).
            ``"all"`` (the default): every pair, the scale always in the weight and the
            shift at the BatchNorm's place (what quantization-aware training wants: the
            conv sees ``W * s``). ``"auto"``, the fastest with :func:`fuse`: only the pairs
            where folding saves work. A BatchNorm that computes an
            activation or a residual add in its own pass, or that :func:`fuse` will make
            compute one (``BN -> ReLU``, ``BN -> add -> ReLU``), costs no pass over memory
            beyond the activation's, which folding would not remove, and stays as it is;
            the report says so. The other pairs fold whole, the shift into the conv's
            bias, and each call picks the cheaper of scaling the weight and one pass over
            the conv's output (:class:`FoldedConv2d`), so the BatchNorm costs at most the
            smaller of the two.
        inplace: change ``module`` itself (and return it); the default folds a deep copy.
        leaf_modules, tracer_class: as in :func:`fuse`.
        report: also return a :class:`FoldReport`.

    Example::

        model = frozennorm.convert_frozen_bn(torchvision.models.resnet50(weights="DEFAULT"))
        deploy = frozennorm.fold_frozen_bn(model.eval())               # inference
        train = frozennorm.fuse(frozennorm.fold_frozen_bn(model, "training", policy="auto"))
    """
    if mode not in ("inference", "training"):
        raise ValueError(f"mode must be 'inference' or 'training', got {mode!r}")
    if shift not in (None, "conv_bias", "bn"):
        raise ValueError(f"shift must be 'conv_bias' or 'bn', got {shift!r}")
    if policy not in ("auto", "all"):
        raise ValueError(f"policy must be 'auto' or 'all', got {policy!r}")
    if mode == "training" and shift == "conv_bias":
        raise ValueError("fold_frozen_bn(mode='training') keeps the shift at the BatchNorm's "
                         "place, which holds the statistics: shift='conv_bias' is for inference")
    root = prepare(module, inplace)
    rep = FoldReport(mode)
    parts, rep.untraced = traceable_parts(root, "", "fold_frozen_bn", leaf_modules, tracer_class)
    seen: Set[int] = set()
    auto = mode == "training" and policy == "auto"
    pairs = [_find_pairs(part, rep, seen, auto) for part in parts]
    skipped, missed = _not_seen(root, parts, seen)
    rep.unfolded += skipped
    for part, part_pairs in zip(parts, pairs):
        _fold_part(part, part_pairs, mode, shift or "conv_bias", rep)
    if missed:
        warnings.warn(
            f"fold_frozen_bn: {len(missed)} frozen BatchNorm layer(s) are called from a "
            f"forward torch.fx cannot trace and were not folded ({', '.join(missed[:4])}"
            f"{', ...' if len(missed) > 4 else ''}):\n" + "\n".join(str(e) for e in rep.untraced),
            FrozenNormWarning, stacklevel=2)
    return (root, rep) if report else root
