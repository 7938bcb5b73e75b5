"""FrozenBatchNorm1d/2d/3d: BatchNorm with frozen statistics, as buffers, on the fused op."""

from typing import Callable, Optional, Set, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .ops import frozen_batch_norm, frozen_batch_norm_act

__all__ = ["FrozenBatchNorm", "FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)

# torch.fx.symbolic_trace (and what builds on it: torchvision's create_feature_extractor, FX
# quantization) traces through these modules, which are not torch.nn leaves: each forward is
# then one call of the functional op in the graph, its statistics get_attr nodes.
torch.fx.wrap("frozen_batch_norm")
torch.fx.wrap("frozen_batch_norm_act")


def _drops_below_fp32(old: Tensor, new: Tensor) -> bool:
    """Would ``old -> new`` cast full-precision statistics to fewer than 32 bits?"""
    return (old.is_floating_point() and new.is_floating_point()
            and old.dtype not in _LOW_PRECISION and torch.finfo(new.dtype).bits < 32)


def own_eps(module: nn.Module) -> Optional[float]:
    """``module``'s ``eps`` attribute, where it has a number there (None: the eps its forward
    uses is unknown, e.g. HF's DETR-style layers, which hard-code it)."""
    eps = getattr(module, "eps", None)
    return float(eps) if isinstance(eps, (int, float)) and not isinstance(eps, bool) else None


def check_trainable_affine(value: object, allowed: Tuple[object, ...]) -> None:
    """Raises for a ``trainable_affine`` that is not one of ``allowed`` (among None, False,
    True and "source") by type as well as value: ``1`` or ``"false"`` would otherwise pass
    as True or as "source" and give another variant than the one meant."""
    def same(a: object, b: object) -> bool:
        return a is b if not isinstance(b, str) else (isinstance(a, str) and a == b)
    if not any(same(value, a) for a in allowed):
        names = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"trainable_affine must be one of {names}, got {value!r} "
                         f"({type(value).__name__})")


class FrozenBatchNorm(nn.Module):
    """BatchNorm with frozen statistics and affine parameters, for inputs ``(N, C, *)``.

    ``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias`` per channel,
    exactly what ``nn.BatchNorm*d`` computes in ``eval()`` mode, in one fused kernel
    forward and one backward.

    By default all four tensors are buffers, not parameters: nothing here is trained,
    ``train()`` and ``eval()`` change nothing, an optimizer never sees them, and gradients
    flow to the input only. With ``trainable_affine=True`` (mmdet's default recipe:
    ``norm_eval=True`` with ``requires_grad=True``) ``weight`` and ``bias`` are
    ``nn.Parameter`` objects, trained by the optimizer, while the running statistics stay
    buffers that nothing updates; the backward then also returns their gradients, in the
    same single pass. It is not a ``_BatchNorm`` subclass, so
    ``nn.SyncBatchNorm.convert_sync_batchnorm``, apex and mmdet's ``norm_eval`` leave it
    alone.

    The statistics stay float32 when the module is cast with ``.half()``/``.bfloat16()``
    (the output follows the input's dtype; float16 statistics would lose the mean);
    ``.double()`` makes them float64. Loads ``nn.BatchNorm*d`` state dicts with
    ``strict=True`` (``num_batches_tracked`` is dropped) and torchvision's/detectron2's
    ``FrozenBatchNorm2d`` ones.

    This class accepts any rank >= 2 (what ``nn.SyncBatchNorm`` is fed);
    :class:`FrozenBatchNorm1d`/``2d``/``3d`` check the rank like their BatchNorm twins.
    """

    __jit_unused_properties__ = ["trainable_affine"]

    _version = 2
    #: input ranks accepted, (lowest, highest)
    _input_dims: Tuple[int, int] = (2, 2**31 - 1)

    weight: Tensor
    bias: Tensor
    running_mean: Tensor
    running_var: Tensor

    def __init__(self, num_features: int, eps: float = 1e-5, *, trainable_affine: bool = False,
                 device: Optional[torch.device] = None,
                 dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        check_trainable_affine(trainable_affine, (False, True))
        if num_features <= 0:
            raise ValueError(f"num_features must be positive, got {num_features}")
        self.num_features = int(num_features)
        self.eps = float(eps)
        # plain attributes, so that the checks below also compile with torch.jit.script
        self._dims: Tuple[int, int] = type(self)._input_dims
        self._name: str = type(self).__name__
        if dtype is None:  # torch's default, as nn.BatchNorm*d's, but never below float32
            dtype = torch.get_default_dtype()
            dtype = torch.float32 if dtype in _LOW_PRECISION else dtype
        kw = {"device": device, "dtype": dtype}
        weight, bias = torch.ones(num_features, **kw), torch.zeros(num_features, **kw)
        if trainable_affine:
            self.weight, self.bias = nn.Parameter(weight), nn.Parameter(bias)
        else:
            self.register_buffer("weight", weight)
            self.register_buffer("bias", bias)
        self.register_buffer("running_mean", torch.zeros(num_features, **kw))
        self.register_buffer("running_var", torch.ones(num_features, **kw))

    def reset_running_stats(self) -> None:
        """Running mean 0 and variance 1, as ``nn.BatchNorm*d.reset_running_stats`` (only
        ever called explicitly: meta-device initialisation, e.g. after ``to_empty``)."""
        with torch.no_grad():
            self.running_mean.zero_()
            self.running_var.fill_(1.0)

    def reset_parameters(self) -> None:
        """The identity layer, as ``nn.BatchNorm*d.reset_parameters``: statistics reset and
        weight 1, bias 0 (what Lightning/FSDP call on modules materialised from meta)."""
        self.reset_running_stats()
        with torch.no_grad():
            self.weight.fill_(1.0)
            self.bias.zero_()

    @property
    def trainable_affine(self) -> bool:
        """Whether weight or bias is an ``nn.Parameter`` (else both are frozen buffers)."""
        return "weight" in self._parameters or "bias" in self._parameters

    def forward(self, input: Tensor, residual: Optional[Tensor] = None,
                activation: str = "identity", inplace_add: bool = False) -> Tensor:
        """``bn(input)``; with a ``residual`` and/or an ``activation`` ("relu", "relu6",
        "silu"), ``act(bn(input) + residual)`` in the same single pass (how the forwards
        :func:`frozennorm.fuse` rewrites call it; ``inplace_add``: the add was ``+=``, see
        :func:`frozennorm.frozen_batch_norm_act`)."""
        return self._normalize(input, residual, activation, inplace_add)

    def _normalize(self, input: Tensor, residual: Optional[Tensor] = None,
                   activation: str = "identity", inplace_add: bool = False) -> Tensor:
        """What :meth:`forward` computes (subclasses' forwards call it, also scripted)."""
        self._check_input(input)
        weight, bias, mean, var = self._stats(input)
        if residual is None and activation == "identity":
            return frozen_batch_norm(input, mean, var, weight, bias, self.eps)
        return frozen_batch_norm_act(input, mean, var, weight, bias, self.eps, activation,
                                     residual, inplace_add)

    def _stats(self, input: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """(weight, bias, running_mean, running_var) for this call.

        In eager mode read straight from the buffer dict: ``nn.Module.__getattr__`` costs
        ~1 us a buffer, as much as the op itself on a small map (the launch-bound case on a
        GPU). Attribute access everywhere else: TorchScript, dynamo, torch.fx symbolic
        tracing (its input is a Proxy, and it records buffers through ``__getattr__``), and
        a buffer turned into a Parameter or a parametrized property.
        """
        if not torch.jit.is_scripting():
            if isinstance(input, Tensor) and not torch.compiler.is_compiling():
                b, p = self._buffers, self._parameters
                w, bias, mean, var = (b.get("weight"), b.get("bias"), b.get("running_mean"),
                                      b.get("running_var"))
                if w is None:  # trainable affine parameters
                    w, bias = p.get("weight"), p.get("bias")
                if w is not None and bias is not None and mean is not None and var is not None:
                    return w, bias, mean, var
        return self.weight, self.bias, self.running_mean, self.running_var

    def _check_input(self, input: Tensor) -> None:
        if not isinstance(input, Tensor):
            # a torch.fx Proxy: no shape to check (the op checks the traced graph's input)
            if not torch.jit.is_scripting():
                _check_traced(self, input)
            return
        lo, hi = self._dims
        ndim = input.dim()
        if ndim < lo or ndim > hi:
            if lo == hi:
                want = f"{lo}D"
            elif hi == lo + 1:
                want = f"{lo}D or {hi}D"
            else:
                want = f"at least {lo}D (N, C, *)"
            raise ValueError(f"{self._name}: expected {want} input, got {ndim}D input of "
                             f"shape {list(input.shape)}")
        if input.shape[1] != self.num_features:
            raise ValueError(f"{self._name}: input has {input.shape[1]} channels (dim 1 of "
                             f"shape {list(input.shape)}) but the module has "
                             f"num_features={self.num_features}")

    @classmethod
    def from_batchnorm(cls, bn: nn.Module, eps: Optional[float] = None,
                       trainable_affine: Union[bool, str] = False) -> "FrozenBatchNorm":
        """A frozen copy of any BatchNorm-like module (statistics copied, not aliased).

        Accepts ``nn.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm``, their subclasses and any
        module with ``running_mean``/``running_var`` (and optionally ``weight``/``bias``),
        such as torchvision's or detectron2's ``FrozenBatchNorm2d``. Device and dtype are
        kept; ``affine=False`` gives weight 1 and bias 0. ``eps`` is the module's ``eps``
        attribute unless given; a module without one (HF's ``DetrFrozenBatchNorm2d``
        hard-codes 1e-5 in its forward, maskrcnn-benchmark's uses none) needs it given.

        ``trainable_affine``: ``False``, weight and bias become frozen buffers (copies);
        ``True``, trainable Parameters — the source's own Parameter objects where it has
        them (an optimizer that holds them keeps working), made to require grad; ``"source"``,
        the source's own Parameters as they are (their ``requires_grad`` kept: mmdet's
        ``requires_grad`` and ``frozen_stages``), and frozen buffers where it has none.
        """
        check_trainable_affine(trainable_affine, (False, True, "source"))
        mean = getattr(bn, "running_mean", None)
        var = getattr(bn, "running_var", None)
        if mean is None or var is None:
            raise ValueError(
                f"{type(bn).__name__} has no running statistics (track_running_stats=False "
                f"normalises with batch statistics): there is nothing to freeze")
        if eps is None:
            eps = own_eps(bn)
            if eps is None:
                raise ValueError(
                    f"{type(bn).__name__} has no eps attribute, so its eps (the one its forward "
                    f"uses: 1e-5 hard-coded in DETR-style layers, none in others) is unknown: "
                    f"give it, {cls.__name__}.from_batchnorm(bn, eps=...)")
        frozen = cls(mean.numel(), eps=float(eps), device=mean.device, dtype=mean.dtype)
        with torch.no_grad():
            frozen.running_mean = mean.detach().clone()
            frozen.running_var = var.detach().clone()
            for name, fill in (("weight", 1.0), ("bias", 0.0)):
                source = getattr(bn, name, None)
                if trainable_affine and isinstance(source, nn.Parameter):
                    if trainable_affine is True:
                        source.requires_grad_(True)
                    delattr(frozen, name)
                    frozen.register_parameter(name, source)
                    continue
                value = (source.detach().clone() if isinstance(source, Tensor)
                         else torch.full_like(frozen.running_mean, fill))
                if trainable_affine is True:
                    delattr(frozen, name)
                    frozen.register_parameter(name, nn.Parameter(value))
                else:
                    setattr(frozen, name, value)
        return frozen

    def extra_repr(self) -> str:
        trainable = ", trainable_affine=True" if self.trainable_affine else ""
        return f"{self.num_features}, eps={self.eps}{trainable}"

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        # Cast like nn.Module, except that the statistics (and trainable weight and bias)
        # never drop below float32.
        if recurse:
            for module in self.children():
                module._apply(fn)

        def keep_precision(t: Tensor) -> Tensor:
            new = fn(t)
            return t.to(device=new.device, dtype=torch.float32) if _drops_below_fp32(t, new) else new
        # (nn.Module's, named: fold.py's FoldedFrozenBatchNorm borrows this method)
        return nn.Module._apply(self, keep_precision, recurse=False)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs):
        # nn.BatchNorm*d checkpoints carry a step counter a frozen layer has no use for.
        state_dict.pop(prefix + "num_batches_tracked", None)
        version = local_metadata.get("version", None)
        mean_key, var_key = prefix + "running_mean", prefix + "running_var"
        weight_key, bias_key = prefix + "weight", prefix + "bias"
        # Two kinds of checkpoint lack tensors this layer has, and mean their identity
        # values. They are read so only where this layer holds those values already (as
        # built, or on the meta device): a partial state dict (trainable parameters only,
        # buffers only) never resets what the layer holds, its keys are reported missing.
        if (mean_key in state_dict and weight_key not in state_dict
                and bias_key not in state_dict and self._holds_identity(self.weight, 1.0)
                and self._holds_identity(self.bias, 0.0)):
            # an nn.BatchNorm*d(affine=False) checkpoint: it normalised with weight 1, bias 0
            state_dict[weight_key] = torch.ones_like(state_dict[mean_key])
            state_dict[bias_key] = torch.zeros_like(state_dict[mean_key])
        if ((version is None or version < 2) and mean_key not in state_dict
                and var_key not in state_dict and weight_key in state_dict
                and self._holds_identity(self.running_mean, 0.0)):
            # detectron2 checkpoints converted from Caffe2 hold only weight and bias, with
            # the statistics already folded in: the identity statistics keep them exact.
            # (A layer as built holds mean 0; its variance may be detectron2's 1 - eps.)
            state_dict[mean_key] = torch.zeros_like(state_dict[weight_key])
            state_dict[var_key] = torch.ones_like(state_dict[weight_key])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)

    @staticmethod
    def _holds_identity(t: Tensor, value: float) -> bool:
        """Whether ``t`` is all ``value``, or has no values yet (the meta device)."""
        return t.is_meta or bool((t == value).all())


class FrozenBatchNorm1d(FrozenBatchNorm):
    """Frozen ``nn.BatchNorm1d``: inputs ``(N, C)`` or ``(N, C, L)``."""

    _input_dims = (2, 3)


class FrozenBatchNorm2d(FrozenBatchNorm):
    """Frozen ``nn.BatchNorm2d``: inputs ``(N, C, H, W)``, any memory format."""

    _input_dims = (4, 4)


class FrozenBatchNorm3d(FrozenBatchNorm):
    """Frozen ``nn.BatchNorm3d``: inputs ``(N, C, D, H, W)``, any memory format."""

    _input_dims = (5, 5)


def _check_traced(module: nn.Module, proxy: object) -> None:
    """What a frozen module checks when torch.fx traces through it (quantization.py)."""
    from .quantization import check_not_quantization_tracing
    check_not_quantization_tracing(module, proxy)


def looks_frozen(module: nn.Module) -> bool:
    """A frozen BatchNorm by its looks: the name says so and the statistics are buffers."""
    return ("FrozenBatchNorm" in type(module).__name__
            and isinstance(getattr(module, "running_mean", None), torch.Tensor)
            and isinstance(getattr(module, "running_var", None), torch.Tensor))


def is_frozen_batchnorm(module: nn.Module) -> bool:
    """Whether ``module`` is a frozen BatchNorm (frozennorm's, folded or not, or another
    library's)."""
    if isinstance(module, FrozenBatchNorm) or getattr(type(module), "frozen_statistics", False):
        return True
    return not isinstance(module, _BatchNorm) and looks_frozen(module)


# Forwards that take ``(input, residual=None, activation="identity")`` and compute
# ``act(bn(input) + residual)`` in one pass: frozennorm.fuse rewrites calls of the modules
# whose class has one of them (a subclass with a forward of its own is not one).
_FUSABLE_FORWARDS: Set[Callable] = {FrozenBatchNorm.forward}


def register_fusable_forward(forward: Callable) -> Callable:
    _FUSABLE_FORWARDS.add(forward)
    return forward


def is_fusable_forward(forward: Callable) -> bool:
    return forward in _FUSABLE_FORWARDS
