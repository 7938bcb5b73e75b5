"""fuse: frozen ``BatchNorm -> [add ->] activation`` chains computed in one pass.

``fuse(model)`` looks at the forward of each module that calls frozen BatchNorm layers (a
torch.fx trace of that forward alone, every submodule a leaf) and finds the chains

* frozen BN -> ``ReLU``/``ReLU6``/``SiLU`` (modules, ``F.relu``/``torch.relu``/``F.relu6``/
  ``F.silu``/``x.relu()``, in-place variants included), and
* frozen BN -> add (``+``, ``+=``, ``torch.add``, ``x.add(...)``, either operand order) ->
  activation, or -> add alone (the ResNet bottleneck's ``out += identity; out = relu(out)``),

``nn.Identity`` modules in between (timm's disabled DropPath/DropBlock) passed over. A
chain is taken where each value it removes has no other user. That module then runs the
rewritten trace as its forward, which calls the BatchNorm as
``bn(input, residual, activation=...)``: one pass over memory forward and one backward
instead of two or three, with the same results.

Nothing else changes: every module keeps its class, attributes, submodules and state dict,
and the BatchNorm layers stay plain frozen BatchNorm layers. Whatever reads the model
without calling its forward (a framework's own conv+BN fuser, ``torch.jit.script``,
``torch.fx.symbolic_trace``) sees the unfused model, which computes the same. A framework
that replaces a module's forward or its submodules later (Ultralytics' ``fuse()``) keeps
working, since each rewritten forward calls only its own module's children.

The tracing helpers here (:class:`UntraceableError`, :func:`traced_parts`) serve
:func:`frozennorm.fold_frozen_bn` too.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import linecache
import operator
from typing import (Callable, Dict, Iterator, List, Literal, Optional, Set, Tuple, Type,
                    Union, overload)

import torch
import torch.nn.functional as F
from torch import fx, nn

from .act import activation_of_module, has_hooks, own_activation
from .modules import is_frozen_batchnorm, is_fusable_forward

__all__ = ["fuse", "FuseReport", "FusedSite", "SkippedLayer", "UntraceableError"]

_ACTIVATION_FUNCTIONS: Dict[Callable, str] = {
    F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu6: "relu6", F.silu: "silu"}
_ACTIVATION_METHODS = {"relu": "relu", "relu_": "relu"}
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = ("add", "add_")
# In-place adds write to their first operand: only a BN output may be that operand.
_INPLACE_ADDS = (operator.iadd, "add_")


class UntraceableError(RuntimeError):
    """``torch.fx`` could not trace a module's forward: which module, and why."""

    def __init__(self, caller: str, path: str, module_type: str, cause: BaseException) -> None:
        #: Qualified name of the module whose forward failed (``""``: the model itself).
        self.path = path
        self.module_type = module_type
        self.cause = cause
        where = f"{path!r} ({module_type})" if path else f"the model ({module_type})"
        super().__init__(f"{caller}: torch.fx cannot trace the forward of {where}: "
                         f"{type(cause).__name__}: {cause}")


# --------------------------------------------------------------------------------------
# Tracing (shared with fold.py)
# --------------------------------------------------------------------------------------

def join_path(prefix: str, name: str) -> str:
    """``prefix.name``, or ``name`` under the root."""
    return f"{prefix}.{name}" if prefix and name else prefix or name


@dataclasses.dataclass
class TracedPart:
    """A module whose forward calls frozen BatchNorm layers, and the graph of that forward."""

    path: str
    module: nn.Module
    graph: fx.Graph
    #: Tensors the graph reads that are not the module's (fx's ``_tensor_constant<i>``).
    constants: Dict[str, torch.Tensor]

    def modules(self) -> Dict[str, nn.Module]:
        return dict(self.module.named_modules())


def _is_plain_sequential(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _is_container(module: nn.Module) -> bool:
    """A ModuleList/ModuleDict without a forward: what it holds, its parent calls."""
    return (isinstance(module, (nn.ModuleList, nn.ModuleDict))
            and type(module).forward is nn.Module.forward)


class _AugmentedProxy(fx.Proxy):
    """A Proxy that records ``x += y`` (``-=``, ``*=``, ...) as the in-place operator.

    A plain Proxy has no ``__iadd__``, so torch.fx records ``x += y`` as ``x + y``: the
    forward generated from the trace would then return a new tensor, of the promoted dtype,
    where the module's own forward wrote into ``x`` and kept its dtype."""


def _record_inplace(op: Callable) -> Callable:
    def method(self: fx.Proxy, other: object) -> fx.Proxy:
        return self.tracer.create_proxy("call_function", op, (self, other), {})
    return method


for _name in ("iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "iand", "ior",
              "ixor", "ilshift", "irshift", "imatmul"):
    setattr(_AugmentedProxy, f"__{_name}__", _record_inplace(getattr(operator, _name)))


def _trace_own_forward(path: str, module: nn.Module,
                       tracer_class: Type[fx.Tracer]) -> TracedPart:
    """``module``'s own (class) forward traced, every submodule called as a leaf but plain
    ``nn.Sequential`` ones, traced through, augmented assignments recorded as the in-place
    operators they are. (fx stores the tensor constants it meets on the module as it
    traces: they are taken off again.)"""

    tracer = tracer_class()
    # (on the instance: the graph records the tracer's class, which must stay picklable)
    tracer.is_leaf_module = (  # type: ignore[method-assign]
        lambda m, module_qualified_name: not _is_plain_sequential(m))
    make_proxy = tracer.proxy

    def proxy(node: fx.Node) -> fx.Proxy:
        p = make_proxy(node)
        if type(p) is fx.Proxy:
            p.__class__ = _AugmentedProxy
        return p

    tracer.proxy = proxy  # type: ignore[method-assign]
    before = set(module.__dict__)
    try:
        graph = tracer.trace(module)
    finally:
        constants = {k: module.__dict__.pop(k) for k in set(module.__dict__) - before}
    return TracedPart(path, module, graph, constants)


def called_directly(module: nn.Module, wanted: Callable[[nn.Module], bool]
                    ) -> Iterator[Tuple[str, nn.Module]]:
    """The ``wanted`` modules ``module``'s own forward may call, as it is traced: its
    children, and those held by its ModuleList/ModuleDict and plain Sequential children
    (by name relative to ``module``)."""
    for name, child in module.named_children():
        if wanted(child):
            yield name, child
        elif _is_container(child) or _is_plain_sequential(child):
            yield from ((join_path(name, n), m) for n, m in called_directly(child, wanted))


def _traced_through(module: nn.Module) -> Iterator[nn.Module]:
    """The plain Sequential modules a trace of ``module``'s forward goes through."""
    for child in module.children():
        if _is_plain_sequential(child):
            yield child
            yield from _traced_through(child)


def traced_parts(root: nn.Module, caller: str, wanted: Callable[[nn.Module], bool],
                 tracer_class: Type[fx.Tracer] = fx.Tracer
                 ) -> Tuple[List[TracedPart], List[UntraceableError]]:
    """Each module of ``root`` that calls a ``wanted`` module from its own forward, with the
    graph of that forward (a plain Sequential in which a traced parent's graph goes is not
    one of them); and the errors of those whose forward does not trace."""
    parts, errors = [], []
    inside: Set[int] = set()
    for path, module in root.named_modules():
        if (_is_container(module) or id(module) in inside
                or next(called_directly(module, wanted), None) is None):
            continue
        try:
            parts.append(_trace_own_forward(path, module, tracer_class))
            inside.update(id(m) for m in _traced_through(module))
        except Exception as e:  # fx raises TraceError, TypeError, AttributeError, ...
            errors.append(UntraceableError(caller, path, type(module).__name__, e))
    return parts, errors


def missed_layers(root: nn.Module, errors: List[UntraceableError],
                  wanted: Callable[[nn.Module], bool], seen: Set[int]) -> List[Tuple[str, str]]:
    """(name, why) of the ``wanted`` layers of ``root`` that no traced forward calls."""
    untraced = {id(m) for e in errors
                for _, m in called_directly(root.get_submodule(e.path), wanted)}
    return [(name, "called from a forward that does not trace" if id(m) in untraced
             else "not called from its parent's forward")
            for name, m in root.named_modules() if wanted(m) and id(m) not in seen]


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


# --------------------------------------------------------------------------------------
# The rewritten forward
# --------------------------------------------------------------------------------------

class FusedForward(functools.partial):
    """The forward :func:`fuse` gives a module: the module's own forward, traced and
    rewritten, bound to the module (a ``functools.partial`` of the generated function).

    It lives in the module's ``__dict__`` (where ``nn.Module.__call__``, ``torch.jit.trace``,
    ``torch.compile``, ``torch.export`` and the ONNX exporters find it); the class and its
    forward are unchanged. Copies, pickles and ``torch.save`` carry it along (it is rebuilt
    from the graph); :func:`unfuse` removes it.
    """

    graph: fx.Graph

    def __new__(cls, module: nn.Module, graph: fx.Graph) -> "FusedForward":
        code = graph.python_code(root_module="self")
        key = f"<frozennorm fused forward of {type(module).__qualname__} {id(graph):x}>"
        linecache.cache[key] = (len(code.src), None, code.src.splitlines(True), key)
        namespace = dict(code.globals)
        exec(compile(code.src, key, "exec"), namespace)  # noqa: S102 (fx's own generated code)
        self = super().__new__(cls, namespace["forward"], module)
        self.graph = graph
        return self

    @property
    def module(self) -> nn.Module:
        return self.args[0]

    @classmethod
    def install(cls, part: TracedPart) -> None:
        """Makes ``part.graph`` the forward of ``part.module``."""
        module = part.module
        for name, value in part.constants.items():  # tensors, not state: moved by .to()
            module.register_buffer(name, value, persistent=False)
        module.__dict__["forward"] = cls(module, part.graph)
        module.__dict__["__prepare_scriptable__"] = functools.partial(_refuse_script, part.path)

    def __reduce__(self):
        return type(self), (self.module, self.graph)

    def stale(self) -> bool:
        """Whether a module it calls with a residual/activation no longer takes them."""
        for node in self.graph.nodes:
            if node.op == "call_module" and "activation" in node.kwargs:
                callee = self.module.get_submodule(node.target)
                if not is_fusable_forward(type(callee).forward):
                    return True
        return False


def _refuse_script(path: str) -> nn.Module:
    """torch.jit.script asks each module for a scriptable version of itself first: it
    compiles class forwards, and cannot compile a forward that lives on the instance."""
    raise TypeError(
        f"torch.jit.script cannot compile the forward frozennorm.fuse gave "
        f"{path or 'the model'!r} (scripting compiles each module's class forward): script "
        f"the model before fusing it (its frozen modules script), remove the fused forwards "
        f"with frozennorm.fuse.unfuse(model), or record the fused model with torch.jit.trace")


def _drop_fused_forward(module: nn.Module) -> None:
    del module.__dict__["forward"], module.__dict__["__prepare_scriptable__"]


def unfuse(module: nn.Module, stale_only: bool = False) -> nn.Module:
    """Removes the forwards :func:`fuse` gave ``module`` and its submodules (in place); with
    ``stale_only``, those that make a fused call of a module that no longer takes one (a
    BatchNorm :func:`~frozennorm.revert_frozen_bn` made live again)."""
    for m in module.modules():
        forward = m.__dict__.get("forward")
        if isinstance(forward, FusedForward) and (not stale_only or forward.stale()):
            _drop_fused_forward(m)
    return module


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class FusedSite:
    """A frozen BatchNorm that now computes ``act(bn(x) [+ residual])`` in one call."""

    #: Qualified name of the BatchNorm in the model given to fuse.
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
    #: Modules that call frozen BatchNorm layers from a forward that does not trace.
    untraced: List[UntraceableError] = dataclasses.field(default_factory=list)

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
        lines += [f"not traced: {e.path or '<root>'} ({e.module_type})" for e in self.untraced]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------
# The rewrite
# --------------------------------------------------------------------------------------

def fusable(module: nn.Module) -> Optional[str]:
    """None if a call of ``module`` can take over an add and an activation (its forward
    is a :func:`~frozennorm.modules.fusable_forward`); else why not."""
    if has_hooks(module):
        return "has hooks (a fused call would change what they see)"
    if not is_fusable_forward(type(module).forward):
        return f"a {type(module).__name__}: its forward computes more than a frozen BatchNorm"
    if hasattr(module, "act") and own_activation(module) != "identity":
        return (f"it runs its own {type(module.act).__name__} (in its pass when it can), "
                f"after its drop {type(module.drop).__name__}")
    return None


class _Rewriter:
    """Finds and rewrites the chains of one traced forward."""

    def __init__(self, part: TracedPart, report: FuseReport, seen: Set[int]):
        self.part, self.graph, self.report, self.seen = part, part.graph, report, seen
        self.modules = part.modules()

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

    def run(self) -> bool:
        """Rewrites the chains; whether there were any."""
        changed = False
        for node in [n for n in self.graph.nodes if n.op == "call_module"]:
            module = self.modules.get(node.target)
            if module is not None and is_frozen_batchnorm(module):
                self.seen.add(id(module))
                changed |= self._fuse(node, module)
        self.graph.lint()
        return changed

    def _unfused(self, node: fx.Node, reason: str) -> bool:
        self.report.unfused.append(SkippedLayer(describe(node, self.part.path), reason))
        return False

    def _fuse(self, node: fx.Node, module: nn.Module) -> bool:
        why = fusable(module)
        if why is not None:
            return self._unfused(node, why)
        if len(node.args) != 1 or node.kwargs:
            return self._unfused(node, "called with more than its input")
        activation, residual, removed = self._chain(node)
        if not removed:
            return self._unfused(node, self._why_alone(node))
        self._rewrite(node, activation, residual, removed)
        return True

    def _why_alone(self, node: fx.Node) -> str:
        users = list(node.users)
        if len(users) != 1:
            return f"its output has {len(users)} users"
        user = users[0]
        if user.op == "call_module" and len(user.args) > 1 and user.args[1] is node:
            return f"it is the residual of {describe(user, self.part.path)}"
        return f"its output goes to {describe(user, self.part.path)}"

    def _chain(self, node: fx.Node) -> Tuple[str, Optional[fx.Node], List[fx.Node]]:
        """What follows ``node``: (activation, residual, nodes to remove)."""
        removed: List[fx.Node] = []
        residual = None
        value, passed = self._skip_identities(node)
        user = only_user(value)
        other = self._residual(user, value) if user is not None else None
        if other is not None:
            residual, value = other, user
            removed += passed + [user]
            value, passed = self._skip_identities(value)
        user = only_user(value)
        activation = self._activation(user, value) if user is not None else None
        if activation is None:
            return "identity", residual, removed
        return activation, residual, removed + passed + [user]

    def _rewrite(self, node: fx.Node, activation: str, residual: Optional[fx.Node],
                 removed: List[fx.Node]) -> None:
        last = removed[-1]
        kwargs = {"activation": activation}
        if any(n.target in _INPLACE_ADDS for n in removed):
            kwargs["inplace_add"] = True  # (with a residual of another dtype: y keeps its own)
        with self.graph.inserting_before(last):
            new = self.graph.call_module(node.target, (node.args[0], residual), kwargs)
        last.replace_all_uses_with(new)
        for n in reversed([node] + removed):
            self.graph.erase_node(n)
        self.report.fused.append(FusedSite(describe(node, self.part.path), activation,
                                           residual is not None,
                                           tuple(describe(n, self.part.path) for n in removed)))


@overload
def fuse(module: nn.Module, *, inplace: bool = ..., tracer_class: Type[fx.Tracer] = ...,
         report: Literal[False] = ...) -> nn.Module: ...


@overload
def fuse(module: nn.Module, *, inplace: bool = ..., tracer_class: Type[fx.Tracer] = ...,
         report: Literal[True]) -> Tuple[nn.Module, FuseReport]: ...


def fuse(module: nn.Module, *, inplace: bool = False, tracer_class: Type[fx.Tracer] = fx.Tracer,
         report: bool = False) -> Union[nn.Module, Tuple[nn.Module, FuseReport]]:
    """Fuse each frozen ``BN -> activation`` and ``BN -> add [-> activation]`` of ``module``.

    Each module whose forward calls frozen BatchNorm layers is traced on its own with
    ``torch.fx`` (its submodules as leaves); where a chain is found, that module's forward
    is replaced (on the instance, see :class:`FusedForward`) by the rewritten trace, in
    which the BatchNorm computes the add and the activation in its own pass. Outputs and
    gradients equal the unfused model's (bit for bit for ReLU/ReLU6, SiLU within an ulp).
    Models that do not trace as a whole (detection models, Ultralytics YOLO) are fused
    wherever their modules' own forwards trace; the report lists the others.

    Every module keeps its class, attributes, submodules, parameters, buffers and state
    dict keys; only forwards change, so a framework's own routing, fusing, exporting and
    checkpointing see the model they built. ``timm``'s BN+activation layers
    (:class:`FrozenBatchNormAct2d`) already compute their ReLU/ReLU6/SiLU in one pass.

    Python control flow in a rewritten forward runs once, while tracing: branches on
    ``self.training`` are fixed in the mode the module is in now (fuse in the mode you
    will run). A fused add takes its other operand in the same pass when it has the
    BatchNorm output's shape and dtype (residual blocks) or broadcasts to it; any other
    (a sum that broadcasts or promotes) is added after the BatchNorm as torch adds it,
    with the same result as the original forward.

    Args:
        module: the model; convert its BatchNorm first (:func:`convert_frozen_bn`).
        inplace: change ``module`` itself (and return it); the default works on a deep
            copy and leaves ``module`` as it is.
        tracer_class: the ``torch.fx.Tracer`` subclass to trace with (its autowrapped
            functions apply; every submodule is a leaf regardless).
        report: also return a :class:`FuseReport` (what was fused, what was not and why).

    Example::

        model = frozennorm.convert_frozen_bn(torchvision.models.resnet50(weights="DEFAULT"))
        model, rep = frozennorm.fuse(model, report=True)   # rep.count() == 49
    """
    root = prepare(module, inplace)
    rep = FuseReport()
    parts, rep.untraced = traced_parts(root, "fuse", is_frozen_batchnorm, tracer_class)
    seen: Set[int] = set()
    for part in parts:
        if _Rewriter(part, rep, seen).run():
            FusedForward.install(part)
    rep.unfused += [SkippedLayer(name, why) for name, why in
                    missed_layers(root, rep.untraced, is_frozen_batchnorm, seen)]
    return (root, rep) if report else root
