"""fuse: rewrite frozen ``BatchNorm -> [add ->] activation`` chains to one fused module.

``fuse(model)`` traces ``model`` with ``torch.fx`` and replaces each chain

* frozen BN -> ``ReLU``/``ReLU6``/``SiLU`` (modules, ``F.relu``/``torch.relu``/``F.relu6``/
  ``F.silu``/``x.relu()``, in-place variants included), and
* frozen BN -> add (``+``, ``+=``, ``torch.add``, ``x.add(...)``, either operand order) ->
  activation, or -> add alone (the ResNet bottleneck's ``out += identity; out = relu(out)``)

by a :class:`~frozennorm.FusedFrozenBatchNorm` at the BN's qualified name (so the state
dict keys do not change), called as ``bn(input, residual)``: one pass over memory forward
and one backward instead of two or three, with the same results. ``nn.Identity`` modules
in between (timm's disabled DropPath/DropBlock) are passed over. A chain is rewritten only
where each value it removes has no other user. The activation modules stay where they
are: a module shared by several call sites (torchvision's ``self.relu``) keeps working for
the others.

The tracing helpers here (:class:`UntraceableError`, the leaf rules, the walk down to the
traceable parts of a model) serve :func:`frozennorm.fold_frozen_bn` too.
"""
from __future__ import annotations

import copy
import dataclasses
import operator
from typing import (Callable, Dict, List, Literal, Optional, Sequence, Set, Tuple, Type,
                    Union, overload)

import torch
import torch.nn.functional as F
from torch import fx, nn

from .act import FrozenBatchNormAct2d, activation_of_module, has_hooks
from .convert import is_frozen_batchnorm
from .modules import FrozenBatchNorm, FusedFrozenBatchNorm

__all__ = ["fuse", "FuseReport", "FusedSite", "SkippedLayer", "UntraceableError"]

#: Modules that run as one call in a traced graph: a class, or a qualified name (relative
#: to the module that is traced).
LeafModules = Sequence[Union[Type[nn.Module], str]]
#: Qualified names of submodules: one, or several.
Paths = Union[str, Sequence[str]]

_ACTIVATION_FUNCTIONS: Dict[Callable, str] = {
    F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu6: "relu6", F.silu: "silu"}
_ACTIVATION_METHODS = {"relu": "relu", "relu_": "relu"}
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = ("add", "add_")
# In-place adds write to their first operand: only a BN output may be that operand.
_INPLACE_ADDS = (operator.iadd, "add_")


class UntraceableError(RuntimeError):
    """``torch.fx`` could not trace a module: where, why, and what can be traced instead."""

    def __init__(self, caller: str, path: str, module_type: str, cause: BaseException,
                 suggestions: Sequence[str] = ()) -> None:
        #: Qualified name of the module whose forward failed (``""``: the module given).
        self.path = path
        self.module_type = module_type
        self.cause = cause
        #: Largest traceable submodules that hold frozen BatchNorm layers.
        self.suggestions = list(suggestions)
        where = f"{path!r} ({module_type})" if path else f"the module ({module_type})"
        lines = [f"{caller}: torch.fx cannot trace {where}: {type(cause).__name__}: {cause}"]
        if self.suggestions:
            lines.append(f"These parts trace and hold frozen BatchNorm layers: call "
                         f"{caller}(model, submodule={self.suggestions!r}).")
        if path:
            lines.append(f"Or let {path!r} run as one opaque call: leaf_modules=[{path!r}] "
                         f"(nothing inside it is then rewritten).")
        super().__init__("\n".join(lines))


# --------------------------------------------------------------------------------------
# Tracing (shared with fold.py)
# --------------------------------------------------------------------------------------

def make_tracer(leaf_modules: LeafModules = (),
                tracer_class: Type[fx.Tracer] = fx.Tracer) -> fx.Tracer:
    """A ``tracer_class`` instance that keeps frozennorm's modules (and ``leaf_modules``)
    as single calls and records which module's forward failed."""
    leaf_types = tuple(t for t in leaf_modules if isinstance(t, type))
    leaf_names = {t for t in leaf_modules if isinstance(t, str)}

    class _Tracer(tracer_class):  # type: ignore[valid-type, misc]
        failed_at: Optional[str] = None

        def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
            return (type(m).__module__.partition(".")[0] == "frozennorm"
                    or isinstance(m, leaf_types) or module_qualified_name in leaf_names
                    or super().is_leaf_module(m, module_qualified_name))

        def call_module(self, m, forward, args, kwargs):
            try:
                return super().call_module(m, forward, args, kwargs)
            except Exception:
                if self.failed_at is None:  # the innermost module whose forward raised
                    self.failed_at = next(
                        (n for n, sub in self.root.named_modules() if sub is m), "?")
                raise

    return _Tracer()


def trace(module: nn.Module, caller: str, leaf_modules: LeafModules = (),
          tracer_class: Type[fx.Tracer] = fx.Tracer, prefix: str = "") -> fx.Graph:
    """The fx graph of ``module`` (named ``prefix`` in the model), or
    :class:`UntraceableError` naming the module whose forward failed."""
    tracer = make_tracer(leaf_modules, tracer_class)
    try:
        return tracer.trace(module)
    except Exception as e:  # fx raises TraceError, TypeError, AttributeError, ...
        path = tracer.failed_at or ""
        failing = module.get_submodule(path) if path not in ("", "?") else module
        raise UntraceableError(caller, join_path(prefix, path), type(failing).__name__, e) from e


@dataclasses.dataclass
class TracedPart:
    """A submodule that traced: its qualified name, the module and its graph."""

    path: str
    module: nn.Module
    graph: fx.Graph


def traceable_parts(module: nn.Module, prefix: str, caller: str,
                    leaf_modules: LeafModules = (), tracer_class: Type[fx.Tracer] = fx.Tracer
                    ) -> Tuple[List[TracedPart], List[UntraceableError]]:
    """The largest submodules of ``module`` that trace and hold a frozen BatchNorm, and the
    errors of those that did not (outermost first): a walk down from ``module``."""
    if not _holds_frozen_bn(module):
        return [], []
    try:
        graph = trace(module, caller, leaf_modules, tracer_class, prefix)
        return [TracedPart(prefix, module, graph)], []
    except UntraceableError as e:
        errors = [e]
    parts: List[TracedPart] = []
    for name, child in module.named_children():
        if is_frozen_batchnorm(child):
            continue  # called from the untraceable forward itself
        sub_parts, sub_errors = traceable_parts(child, join_path(prefix, name), caller,
                                                leaf_modules, tracer_class)
        parts += sub_parts
        errors += [s for s in sub_errors if all(s.path != e.path for e in errors)]
    return parts, errors


def _holds_frozen_bn(module: nn.Module) -> bool:
    return any(is_frozen_batchnorm(m) for m in module.modules())


def join_path(prefix: str, name: str) -> str:
    """``prefix.name``, or ``name`` under the root."""
    return f"{prefix}.{name}" if prefix and name else prefix or name


def as_paths(paths: Optional[Paths]) -> List[str]:
    if paths is None:
        return [""]
    return [paths] if isinstance(paths, str) else list(paths)


def call_counts(graph: fx.Graph) -> Dict[str, int]:
    """How many call_module nodes call each module."""
    counts: Dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            counts[node.target] = counts.get(node.target, 0) + 1
    return counts


def only_user(node: fx.Node) -> Optional[fx.Node]:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def describe(node: fx.Node, prefix: str) -> str:
    """A graph node, for reports: a module's qualified name, a function's name."""
    if node.op == "call_module":
        return join_path(prefix, str(node.target))
    if node.op == "output":
        return "the output"
    if node.op == "placeholder":
        return f"the input {node.name}"
    return getattr(node.target, "__name__", str(node.target))


def prepare(module: nn.Module, inplace: bool) -> nn.Module:
    return module if inplace else copy.deepcopy(module)


def replace_submodule(root: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """``new`` at ``path`` in ``root`` (the new root when ``path`` is empty)."""
    if not path:
        return new
    root.set_submodule(path, new)
    return root


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class FusedSite:
    """A frozen BatchNorm that now computes ``act(bn(x) [+ residual])`` in one call."""

    #: Qualified name of the BatchNorm (now the fused module) in the model given to fuse.
    name: str
    #: "relu", "relu6", "silu" or "identity".
    activation: str
    #: Whether it adds a residual (an add was fused: the other operand is the residual).
    residual: bool
    #: The graph nodes removed, in order (``"add"``, ``"layer1.0.relu"``, ...).
    removed: Tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class SkippedLayer:
    """A frozen BatchNorm left as it is, and why."""

    name: str
    reason: str


@dataclasses.dataclass
class FuseReport:
    """What :func:`fuse` rewrote."""

    fused: List[FusedSite] = dataclasses.field(default_factory=list)
    unfused: List[SkippedLayer] = dataclasses.field(default_factory=list)

    def count(self, activation: Optional[str] = None, residual: Optional[bool] = None) -> int:
        """Fused sites with this activation and/or residual (None: any)."""
        return sum(1 for s in self.fused
                   if (activation is None or s.activation == activation)
                   and (residual is None or s.residual == residual))

    def __str__(self) -> str:
        kinds: Dict[str, int] = {}
        for s in self.fused:
            key = f"bn{' + add' if s.residual else ''} -> {s.activation}"
            kinds[key] = kinds.get(key, 0) + 1
        lines = [f"fused {len(self.fused)} frozen BatchNorm layer(s)"]
        lines += [f"  {n:4d} x {k}" for k, n in kinds.items()]
        lines.append(f"left {len(self.unfused)} unfused")
        lines += [f"  {s.name}: {s.reason}" for s in self.unfused]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------
# The rewrite
# --------------------------------------------------------------------------------------

_PLAIN, _SETTABLE, _WITH_ACT = "plain", "settable", "with act"


def _kind(module: nn.Module) -> Tuple[Optional[str], str]:
    """How ``module`` fuses: (kind, its activation now), or (None, why not)."""
    cls = type(module)
    if has_hooks(module):
        return None, "has hooks (a fused module would change what they see)"
    if cls.forward is FrozenBatchNorm.forward:
        return _PLAIN, "identity"
    if ((isinstance(module, FusedFrozenBatchNorm) and cls.forward is FusedFrozenBatchNorm.forward)
            or getattr(cls, "fusable_activation", False)):
        # ``activation`` is read at call time and forward takes (input, residual=None)
        return _SETTABLE, module.activation
    act, drop = getattr(module, "act", None), getattr(module, "drop", None)
    if isinstance(act, nn.Module) and isinstance(drop, nn.Module):  # BN -> drop -> act
        kind = activation_of_module(act)
        if (kind is not None and activation_of_module(drop) == "identity"
                and isinstance(module, FrozenBatchNormAct2d)
                and cls.forward is FrozenBatchNormAct2d.forward):
            return _WITH_ACT, kind
        return None, f"{cls.__name__} with act={type(act).__name__}, drop={type(drop).__name__}"
    return None, f"{cls.__name__} has a forward of its own"


class _Rewriter:
    """Finds and rewrites the chains of one traced module."""

    def __init__(self, root: nn.Module, graph: fx.Graph, prefix: str, report: FuseReport):
        self.root, self.graph, self.prefix, self.report = root, graph, prefix, report
        self.modules = dict(root.named_modules())
        self.calls = call_counts(graph)
        self.claimed: Set[fx.Node] = set()  # fusable_tail: nodes an earlier BN would take

    def _skip_identities(self, value: fx.Node) -> Tuple[fx.Node, List[fx.Node]]:
        passed: List[fx.Node] = []
        while True:
            user = only_user(value)
            if not (user is not None and user.op == "call_module" and user.args == (value,)
                    and not user.kwargs
                    and activation_of_module(self.modules.get(user.target)) == "identity"):
                return value, passed
            passed.append(user)
            value = user

    def _residual(self, user: fx.Node, value: fx.Node) -> Optional[fx.Node]:
        """The other operand if ``user`` adds it to ``value``."""
        is_add = ((user.op == "call_function" and user.target in _ADD_FUNCTIONS)
                  or (user.op == "call_method" and user.target in _ADD_METHODS))
        if not is_add or len(user.args) != 2 or any(k != "alpha" for k in user.kwargs):
            return None
        if user.kwargs.get("alpha", 1) != 1:
            return None
        a, b = user.args
        other = b if a is value else a
        if user.target in _INPLACE_ADDS and a is not value:
            return None  # it writes to the other operand, which the fused op would not do
        # a parameter or buffer may broadcast: only activations are taken as residuals
        ok = isinstance(other, fx.Node) and other is not value and other.op != "get_attr"
        return other if ok else None

    def _activation(self, user: fx.Node, value: fx.Node) -> Optional[str]:
        if not user.args or user.args[0] is not value:
            return None
        if user.op == "call_module":
            kind = activation_of_module(self.modules.get(user.target))
            ok = len(user.args) == 1 and not user.kwargs
            return kind if ok and kind != "identity" else None
        if user.op == "call_function":
            kind = _ACTIVATION_FUNCTIONS.get(user.target)  # type: ignore[arg-type]
        elif user.op == "call_method":
            kind = _ACTIVATION_METHODS.get(user.target)  # type: ignore[arg-type]
        else:
            return None
        # extra arguments: only ``inplace``
        ok = (all(isinstance(a, bool) for a in user.args[1:])
              and all(k == "inplace" for k in user.kwargs) and len(user.args) <= 2)
        return kind if ok else None

    def run(self) -> None:
        for node in [n for n in self.graph.nodes if n.op == "call_module"]:
            module = self.modules.get(node.target)
            if module is not None and is_frozen_batchnorm(module):
                self._fuse(node, module)
        self.graph.lint()

    def _unfused(self, node: fx.Node, reason: str) -> None:
        self.report.unfused.append(SkippedLayer(join_path(self.prefix, node.target), reason))

    def _fuse(self, node: fx.Node, module: nn.Module) -> None:
        kind, activation = _kind(module)
        if kind is None:
            return self._unfused(node, activation)
        if self.calls[node.target] > 1:
            return self._unfused(node, f"called at {self.calls[node.target]} places")
        if not node.args:
            return self._unfused(node, "called with keyword arguments")
        if activation != "identity":
            if kind == _WITH_ACT:  # the activation it holds is fused, nothing after it
                return self._rewrite(node, module, kind, activation, None, [])
            return self._unfused(node, f"already fused with {activation}")
        residual = node.args[1] if len(node.args) > 1 else None
        activation, residual, removed = self._chain(node, residual)
        if not removed:
            return self._unfused(node, self._why_alone(node))
        self._rewrite(node, module, kind, activation, residual, removed)

    def fusable_tail(self, node: fx.Node) -> Optional[str]:
        """What the frozen BatchNorm at ``node`` computes, or would compute once fused,
        beyond the affine map in the same pass ("relu", "add", "add -> silu", ...); None
        when nothing: it makes a pass over memory of its own. Changes nothing in the graph;
        asked of the BatchNorm nodes in graph order, it gives what :meth:`run` would do
        (an add two BatchNorms could take goes to the first)."""
        kind, activation = _kind(self.modules[node.target])
        if kind is None or self.calls[node.target] > 1 or not node.args:
            return None
        has_residual = len(node.args) > 1
        if activation == "identity" and not has_residual:
            activation, residual, removed = self._chain(node, None)
            if not removed or self.claimed.intersection(removed):
                return None
            self.claimed.update(removed)
            has_residual = residual is not None
        steps = ["add"] if has_residual else []
        if activation != "identity":
            steps.append(activation)
        return " -> ".join(steps)

    def _why_alone(self, node: fx.Node) -> str:
        users = list(node.users)
        if len(users) != 1:
            return f"its output has {len(users)} users"
        user = users[0]
        if user.op == "call_module" and len(user.args) == 2 and user.args[1] is node:
            return f"it is the residual of {describe(user, self.prefix)}"
        return f"its output goes to {describe(user, self.prefix)}"

    def _chain(self, node: fx.Node, residual: Optional[fx.Node]
               ) -> Tuple[str, Optional[fx.Node], List[fx.Node]]:
        """What follows ``node``: (activation, residual, nodes to remove)."""
        removed: List[fx.Node] = []
        value, passed = self._skip_identities(node)
        user = only_user(value)
        other = self._residual(user, value) if user is not None and residual is None else None
        if other is not None:
            residual, value = other, user
            removed += passed + [user]
            value, passed = self._skip_identities(value)
        user = only_user(value)
        activation = self._activation(user, value) if user is not None else None
        if activation is None:
            return "identity", residual, removed
        return activation, residual, removed + passed + [user]

    def _rewrite(self, node: fx.Node, module: nn.Module, kind: str, activation: str,
                 residual: Optional[fx.Node], removed: List[fx.Node]) -> None:
        last = removed[-1] if removed else node
        args = (node.args[0],) if residual is None else (node.args[0], residual)
        with self.graph.inserting_before(last):
            new = self.graph.call_module(node.target, args)
        last.replace_all_uses_with(new)
        for n in reversed([node] + removed):
            self.graph.erase_node(n)
        if kind == _SETTABLE:
            module.activation = activation  # type: ignore[assignment]
        else:
            fused = FusedFrozenBatchNorm.from_frozen(module, activation)
            fused.train(module.training)
            self.root.set_submodule(node.target, fused)
        self.report.fused.append(FusedSite(join_path(self.prefix, node.target), activation,
                                           residual is not None,
                                           tuple(describe(n, self.prefix) for n in removed)))


def _graph_module(root: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    """A GraphModule running ``graph`` over ``root``'s own module tree: every submodule,
    parameter and buffer of ``root``, in its order, so the state dict keys do not change."""
    gm = fx.GraphModule(root, graph, class_name=type(root).__name__)
    constants = {k: v for k, v in gm._buffers.items() if k not in root._buffers}
    gm._modules.clear()
    gm._modules.update(root._modules)
    gm._parameters.clear()
    gm._parameters.update(root._parameters)
    gm._buffers.clear()
    gm._buffers.update(root._buffers)
    gm._non_persistent_buffers_set = set(root._non_persistent_buffers_set)
    for name, value in constants.items():  # tensors fx found in attributes: not state
        gm.register_buffer(name, value, persistent=False)
    return gm


def _fuse_part(module: nn.Module, path: str, leaf_modules: LeafModules,
               tracer_class: Type[fx.Tracer], report: FuseReport) -> fx.GraphModule:
    try:
        graph = trace(module, "fuse", leaf_modules, tracer_class, path)
    except UntraceableError as e:
        parts, _ = traceable_parts(module, path, "fuse", leaf_modules, tracer_class)
        raise UntraceableError("fuse", e.path, e.module_type, e.cause,
                               [p.path for p in parts]) from e.cause
    _Rewriter(module, graph, path, report).run()
    return _graph_module(module, graph)


@overload
def fuse(module: nn.Module, *, submodule: Optional[Paths] = ..., inplace: bool = ...,
         leaf_modules: LeafModules = ..., tracer_class: Type[fx.Tracer] = ...,
         report: Literal[False] = ...) -> nn.Module: ...


@overload
def fuse(module: nn.Module, *, submodule: Optional[Paths] = ..., inplace: bool = ...,
         leaf_modules: LeafModules = ..., tracer_class: Type[fx.Tracer] = ...,
         report: Literal[True]) -> Tuple[nn.Module, FuseReport]: ...


def fuse(module: nn.Module, *, submodule: Optional[Paths] = None, inplace: bool = False,
         leaf_modules: LeafModules = (), tracer_class: Type[fx.Tracer] = fx.Tracer,
         report: bool = False) -> Union[nn.Module, Tuple[nn.Module, FuseReport]]:
    """Fuse each frozen ``BN -> activation`` and ``BN -> add [-> activation]`` of ``module``.

    Traces ``module`` (or each ``submodule``) with ``torch.fx`` and returns a
    ``torch.fx.GraphModule`` with the same submodules, parameters and buffers (the same
    state dict keys), where each fusable frozen BatchNorm is a
    :class:`FusedFrozenBatchNorm` that also applies the add and the activation. Outputs and
    gradients equal the unfused model's (bit for bit for ReLU/ReLU6, SiLU within an ulp).
    timm's BN+activation layers (:class:`FrozenBatchNormAct2d`) with a ReLU/ReLU6/SiLU/
    identity ``act`` and no ``drop`` become fused modules too; :func:`fold_frozen_bn`'s
    training-mode BatchNorm halves take the activation over.

    Python control flow runs once, while tracing: branches on ``self.training`` are fixed
    in the mode ``module`` is in now (fuse in the mode you will run). An add is fused on
    the assumption that both operands have one shape and dtype (residual blocks); the fused
    op rejects a broadcasting add at run time.

    Args:
        module: a traceable model (torchvision and timm classification models, detection
            backbones); convert its BatchNorm first (:func:`convert_frozen_bn`).
        submodule: qualified name(s) of the part(s) to fuse, for models whose own forward
            does not trace (detection models: ``submodule="backbone"``). Each is replaced
            by its fused GraphModule in the returned model, which otherwise keeps its class.
        inplace: change ``module`` itself (parameters, buffers and the optimizer that holds
            them stay the same objects). Its frozen BatchNorm layers are replaced, so
            without ``submodule`` only the returned GraphModule computes correctly. The
            default works on a deep copy and leaves ``module`` as it is.
        leaf_modules: classes or qualified names (relative to the traced module) to keep
            as single calls; frozennorm's modules always are.
        tracer_class: the ``torch.fx.Tracer`` subclass to trace with (its own leaf rules
            and autowrapped functions apply too).
        report: also return a :class:`FuseReport` (what was fused, what was not and why).

    Raises:
        UntraceableError: tracing failed; it names the innermost module whose forward
            failed and the largest parts that trace (pass them as ``submodule``).

    Example::

        model = frozennorm.convert_frozen_bn(torchvision.models.resnet50(weights="DEFAULT"))
        model, rep = frozennorm.fuse(model, report=True)   # rep.count() == 49
        detector = frozennorm.fuse(detector, submodule="backbone.body")
    """
    root = prepare(module, inplace)
    rep = FuseReport()
    for path in as_paths(submodule):
        part = root.get_submodule(path)
        root = replace_submodule(root, path,
                                 _fuse_part(part, path, leaf_modules, tracer_class, rep))
    return (root, rep) if report else root
