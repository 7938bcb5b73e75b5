"""The frozennorm ops: registration, fake kernels, autograd, fallback, functional form.

``torch.ops.frozennorm.frozen_bn(input, weight, bias, running_mean, running_var, eps)``
returns ``(output, scale)``: ``output = (input - running_mean) * scale + bias`` per channel
(dim 1) with ``scale = weight / sqrt(running_var + eps)``, computed in float32 (float64 for
float64 data, or float32 data with float64 statistics) and rounded once to the input's
dtype, in the input's memory format. ``scale`` (one value per channel) is what the
backward, ``torch.ops.frozennorm.frozen_bn_backward(grad_output, scale)``, needs.

The CPU and CUDA kernels are compiled C++/CUDA (csrc/). The pure-PyTorch implementation
below is registered for every other device, and for CPU/CUDA too when the package was
installed without its compiled extension.
"""
from __future__ import annotations

import sys
import warnings
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import _loader

__all__ = ["frozen_batch_norm", "frozen_batch_norm_act", "ACTIVATIONS", "COMPILED"]

FORWARD_SCHEMA = (
    "frozen_bn(Tensor input, Tensor? weight, Tensor? bias, Tensor running_mean, "
    "Tensor running_var, float eps) -> (Tensor, Tensor)")
BACKWARD_SCHEMA = "frozen_bn_backward(Tensor grad_output, Tensor scale) -> Tensor"
ACT_SCHEMA = (
    "frozen_bn_act(Tensor input, Tensor? residual, Tensor? weight, Tensor? bias, "
    "Tensor running_mean, Tensor running_var, float eps, int activation, bool save_preact) "
    "-> (Tensor, Tensor, Tensor)")
ACT_BACKWARD_SCHEMA = (
    "frozen_bn_act_backward(Tensor grad_output, Tensor saved, Tensor scale, int activation, "
    "bool residual_grad) -> (Tensor, Tensor)")

#: Activation codes of the fused ops.
ACTIVATIONS = {"identity": 0, "relu": 1, "relu6": 2, "silu": 3}
_IDENTITY, _RELU, _RELU6, _SILU = 0, 1, 2, 3

#: True when the compiled C++/CUDA kernels are registered.
COMPILED: bool = _loader.load_compiled()

if COMPILED:
    _lib = torch.library.Library("frozennorm", "FRAGMENT")
else:
    _lib = torch.library.Library("frozennorm", "DEF")
    for _schema in (FORWARD_SCHEMA, BACKWARD_SCHEMA, ACT_SCHEMA, ACT_BACKWARD_SCHEMA):
        _lib.define(_schema)

_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------------------
# Argument checks and dtype rules (the compiled kernels apply the same, in csrc/frozen_bn.cpp)
# --------------------------------------------------------------------------------------

def _check_data(t: Tensor, name: str, op: str) -> None:
    if t.dim() < 2:
        raise RuntimeError(
            f"{op}: expected {name} of shape (N, C, *) with at least 2 dimensions, got a "
            f"{t.dim()}-D tensor of shape {list(t.shape)}")
    if t.dtype not in _FLOATING:
        raise RuntimeError(
            f"{op}: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def _check_stat(t: Tensor, name: str, input: Tensor, op: str) -> None:
    if t.device != input.device:
        raise RuntimeError(
            f"{op}: {name} is on {t.device} but the input is on {input.device}; move the "
            f"statistics to the input's device")
    if t.dtype not in _FLOATING:
        raise RuntimeError(
            f"{op}: {name} must be a floating-point tensor (float16, bfloat16, float32 or "
            f"float64), got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != input.shape[1]:
        raise RuntimeError(
            f"{op}: {name} must be a 1-D tensor with one value per channel "
            f"({input.shape[1]} channels, input.shape[1]), got shape {list(t.shape)}")


def _promote_floating(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """torch.promote_types for floating dtypes, in plain Python (invisible to tracers)."""
    if a == b:
        return a
    if torch.float64 in (a, b):
        return torch.float64
    return torch.float32  # float32 with anything narrower, or float16 with bfloat16


def _stats_dtype(*stats: Optional[Tensor]) -> torch.dtype:
    dtype = None
    for t in stats:
        if t is not None:
            dtype = t.dtype if dtype is None else _promote_floating(dtype, t.dtype)
    return dtype


def compute_dtype(data: torch.dtype, stats: torch.dtype) -> torch.dtype:
    """float64 for float64 data, or float32 data with float64 statistics; else float32."""
    if data == torch.float64 or (data == torch.float32 and stats == torch.float64):
        return torch.float64
    return torch.float32


def _check_forward(input, weight, bias, running_mean, running_var) -> torch.dtype:
    op = "frozen_bn"
    _check_data(input, "input", op)
    for t, name in ((running_mean, "running_mean"), (running_var, "running_var"),
                    (weight, "weight"), (bias, "bias")):
        if t is not None:
            _check_stat(t, name, input, op)
    return compute_dtype(input.dtype, _stats_dtype(weight, bias, running_mean, running_var))


def _check_backward(grad_output: Tensor, scale: Tensor) -> torch.dtype:
    op = "frozen_bn_backward"
    _check_data(grad_output, "grad_output", op)
    if scale.device != grad_output.device:
        raise RuntimeError(
            f"{op}: scale is on {scale.device} but grad_output is on {grad_output.device}")
    if scale.dtype not in (torch.float32, torch.float64):
        raise RuntimeError(
            f"{op}: scale must be float32 or float64 (the per-channel scale frozen_bn "
            f"returns), got {scale.dtype}")
    if scale.dim() != 1 or scale.shape[0] != grad_output.shape[1]:
        raise RuntimeError(
            f"{op}: scale must be a 1-D tensor with one value per channel "
            f"({grad_output.shape[1]} channels), got shape {list(scale.shape)}")
    return compute_dtype(grad_output.dtype, scale.dtype)


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t in dtype, without a (traced) conversion when it already is."""
    return t if t.dtype == dtype else t.to(dtype)


def _check_act(input: Tensor, residual: Optional[Tensor], activation: int) -> None:
    op = "frozen_bn_act"
    if activation not in (_IDENTITY, _RELU, _RELU6, _SILU):
        raise RuntimeError(
            f"{op}: activation must be 0 (identity), 1 (relu), 2 (relu6) or 3 (silu), got "
            f"{activation}")
    if residual is None:
        return
    if residual.device != input.device:
        raise RuntimeError(
            f"{op}: residual is on {residual.device} but the input is on {input.device}")
    if residual.dtype != input.dtype:
        raise RuntimeError(
            f"{op}: residual must have the input's dtype {input.dtype}, got {residual.dtype}")
    if residual.shape != input.shape:
        raise RuntimeError(
            f"{op}: residual must have the input's shape {list(input.shape)}, got "
            f"{list(residual.shape)}")


def _check_act_backward(grad_output: Tensor, saved: Tensor, scale: Tensor,
                        activation: int) -> torch.dtype:
    acc = _check_backward(grad_output, scale)
    if activation not in (_IDENTITY, _RELU, _RELU6, _SILU):
        raise RuntimeError(f"frozen_bn_act_backward: activation must be 0..3, got {activation}")
    if activation != _IDENTITY and (saved.shape != grad_output.shape or saved.dtype != grad_output.dtype
                                    or saved.device != grad_output.device):
        raise RuntimeError(
            "frozen_bn_act_backward: saved must be the forward's output (ReLU/ReLU6) or "
            "pre-activation (SiLU), with grad_output's shape, dtype and device")
    return acc


def _channel_view(t: Tensor, ndim: int) -> Tensor:
    return t.view([1, -1] + [1] * (ndim - 2))


def _reduce_dims(ndim: int) -> List[int]:
    return [0] + list(range(2, ndim))


# --------------------------------------------------------------------------------------
# Pure-PyTorch kernels: other devices always; CPU/CUDA when not compiled
# --------------------------------------------------------------------------------------

_fallback_warned = False


def _warn_fallback() -> None:
    global _fallback_warned
    if not _fallback_warned and not COMPILED and _loader.requested_backend() == "auto":
        _fallback_warned = True
        warnings.warn(
            "frozennorm: running the pure-PyTorch fallback (same results, slower), not the "
            "compiled C++/CUDA kernels: " + _loader.fallback_reason(),
            RuntimeWarning, stacklevel=3)


def channel_scale(weight: Optional[Tensor], running_var: Tensor, eps: float,
                  dtype: torch.dtype) -> Tensor:
    """weight / sqrt(running_var + eps) in ``dtype`` (differentiable)."""
    std = torch.sqrt(_as(running_var, dtype) + eps)
    if weight is None:
        return std.reciprocal()
    return _as(weight, dtype) / std


def _affine(x: Tensor, mean: Optional[Tensor], scale: Tensor, shift: Optional[Tensor],
            acc: torch.dtype) -> Tensor:
    """(x - mean) * scale + shift (or x * scale) in ``acc``, cast back to x's dtype.

    Plain elementwise ATen ops: what torch.compile fuses with its neighbours and what
    exporters turn into standard operators.
    """
    y = _as(x, acc)
    if mean is not None:
        y = y - _channel_view(_as(mean, acc), x.dim())
    y = y * _channel_view(scale, x.dim())
    if shift is not None:
        y = y + _channel_view(_as(shift, acc), x.dim())
    return _as(y, x.dtype)


def _affine_reference(x: Tensor, mean: Optional[Tensor], scale: Tensor,
                      shift: Optional[Tensor], acc: torch.dtype) -> Tensor:
    """:func:`_affine` with the kernels' output layout (empty_like(x)), for the fallback."""
    return torch.empty_like(x).copy_(_affine(x, mean, scale, shift, acc))


def frozen_bn_fallback(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                       running_mean: Tensor, running_var: Tensor,
                       eps: float) -> Tuple[Tensor, Tensor]:
    """Pure-PyTorch implementation of ``frozen_bn`` (same arithmetic as the kernels)."""
    acc = _check_forward(input, weight, bias, running_mean, running_var)
    _warn_fallback()
    scale = channel_scale(weight, running_var, eps, acc)
    return _affine_reference(input, running_mean, scale, bias, acc), scale


def frozen_bn_backward_fallback(grad_output: Tensor, scale: Tensor) -> Tensor:
    """Pure-PyTorch implementation of ``frozen_bn_backward``."""
    acc = _check_backward(grad_output, scale)
    _warn_fallback()
    return _affine_reference(grad_output, None, scale.to(acc), None, acc)




def _activation(a: Tensor, activation: int) -> Tensor:
    if activation == _RELU:
        return torch.relu(a)
    if activation == _RELU6:
        return torch.nn.functional.relu6(a)
    if activation == _SILU:
        return torch.nn.functional.silu(a)
    return a


def _activation_grad(grad: Tensor, saved: Tensor, activation: int) -> Tensor:
    """grad * act'(saved) (saved: the output for ReLU/ReLU6, the pre-activation for SiLU)."""
    if activation == _RELU:
        return torch.where(saved <= 0, torch.zeros_like(grad), grad)
    if activation == _RELU6:
        return torch.where((saved <= 0) | (saved >= 6), torch.zeros_like(grad), grad)
    if activation == _SILU:
        return torch.ops.aten.silu_backward(grad, saved)
    return grad


def frozen_bn_act_fallback(input: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
                           bias: Optional[Tensor], running_mean: Tensor, running_var: Tensor,
                           eps: float, activation: int,
                           save_preact: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """Pure-PyTorch implementation of ``frozen_bn_act`` (the unfused sequence)."""
    _check_act(input, residual, activation)
    out, scale = frozen_bn_fallback(input, weight, bias, running_mean, running_var, eps)
    if residual is not None:
        out = out + residual
    keep = save_preact and activation == _SILU
    preact = out.clone() if keep else input.new_empty((0,))
    return torch.empty_like(out).copy_(_activation(out, activation)), scale, preact


def frozen_bn_act_backward_fallback(grad_output: Tensor, saved: Tensor, scale: Tensor,
                                    activation: int, residual_grad: bool) -> Tuple[Tensor, Tensor]:
    """Pure-PyTorch implementation of ``frozen_bn_act_backward``."""
    _check_act_backward(grad_output, saved, scale, activation)
    ga = _activation_grad(grad_output, saved, activation)
    grad_residual = ga.clone() if residual_grad else grad_output.new_empty((0,))
    return frozen_bn_backward_fallback(ga, scale), grad_residual


# --------------------------------------------------------------------------------------
# Fake kernels: shapes, dtypes and strides exactly as the real kernels produce them
# --------------------------------------------------------------------------------------

@torch.library.register_fake("frozennorm::frozen_bn")
def _frozen_bn_fake(input, weight, bias, running_mean, running_var, eps):
    acc = _check_forward(input, weight, bias, running_mean, running_var)
    return torch.empty_like(input), input.new_empty((input.shape[1],), dtype=acc)


@torch.library.register_fake("frozennorm::frozen_bn_backward")
def _frozen_bn_backward_fake(grad_output, scale):
    _check_backward(grad_output, scale)
    return torch.empty_like(grad_output)


@torch.library.register_fake("frozennorm::frozen_bn_act")
def _frozen_bn_act_fake(input, residual, weight, bias, running_mean, running_var, eps,
                        activation, save_preact):
    acc = _check_forward(input, weight, bias, running_mean, running_var)
    _check_act(input, residual, activation)
    if activation == _IDENTITY and residual is None:
        out = torch.empty_like(input)  # frozen_bn's layout
    else:
        out = torch.empty_like(input if _is_dense(input) else input.contiguous())
    keep = save_preact and activation == _SILU
    return (out, input.new_empty((input.shape[1],), dtype=acc),
            torch.empty_like(out) if keep else input.new_empty((0,)))


@torch.library.register_fake("frozennorm::frozen_bn_act_backward")
def _frozen_bn_act_backward_fake(grad_output, saved, scale, activation, residual_grad):
    _check_act_backward(grad_output, saved, scale, activation)
    if activation == _IDENTITY:
        like = torch.empty_like(grad_output)
        return like, (torch.empty_like(grad_output) if residual_grad else grad_output.new_empty((0,)))
    like = saved if _is_dense(saved) else saved.contiguous()
    return (torch.empty_like(like),
            torch.empty_like(like) if residual_grad else grad_output.new_empty((0,)))


def _is_dense(t: Tensor) -> bool:
    """Non-overlapping and dense (the fused kernels' requirement), from sizes and strides."""
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


# The pure-PyTorch kernels serve every device without a compiled kernel (registered after
# the fake kernels, which keep the Meta key).
_lib.impl("frozen_bn", frozen_bn_fallback, "CompositeExplicitAutograd")
_lib.impl("frozen_bn_backward", frozen_bn_backward_fallback, "CompositeExplicitAutograd")
_lib.impl("frozen_bn_act", frozen_bn_act_fallback, "CompositeExplicitAutograd")
_lib.impl("frozen_bn_act_backward", frozen_bn_act_backward_fallback, "CompositeExplicitAutograd")


# --------------------------------------------------------------------------------------
# Autograd of the fallback. The compiled extension registers the same formulas in C++
# (csrc/autograd.cpp), which costs microseconds less per call: the input gradient needs only
# the per-channel scale the forward returned (nothing of activation size, never the caller's
# statistics tensors, which DDP overwrites in place between forwards); gradients for the
# statistics are computed too when they require grad, and only then is the input saved.
# --------------------------------------------------------------------------------------

def _frozen_bn_setup_context(ctx, inputs, output):
    input, weight, bias, running_mean, running_var, eps = inputs
    _, scale = output
    ctx.mark_non_differentiable(scale)
    ctx.eps = eps
    ctx.stats_grad = any(t is not None and t.requires_grad
                         for t in (weight, bias, running_mean, running_var))
    if ctx.stats_grad:
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.save_for_backward(input, weight, running_mean, running_var)
    else:
        ctx.save_for_backward(scale)


def _frozen_bn_backward_formula(ctx, grad_output, _grad_scale):
    needs = ctx.needs_input_grad
    if not ctx.stats_grad:
        (scale,) = ctx.saved_tensors
        grad_input = torch.ops.frozennorm.frozen_bn_backward(grad_output, scale) if needs[0] else None
        return grad_input, None, None, None, None, None

    input, weight, mean, var = ctx.saved_tensors
    acc = compute_dtype(input.dtype, _stats_dtype(weight, mean, var))
    invstd = torch.sqrt(var.to(acc) + ctx.eps).reciprocal()
    scale = invstd * weight.to(acc) if weight is not None else invstd
    grad_input = torch.ops.frozennorm.frozen_bn_backward(grad_output, scale) if needs[0] else None
    dims = _reduce_dims(input.dim())
    g = grad_output.to(acc)
    g_sum = g.sum(dims) if (needs[2] or needs[3]) else None
    g_xc = None
    if needs[1] or needs[4]:
        g_xc = (g * (input.to(acc) - _channel_view(mean.to(acc), input.dim()))).sum(dims)
    grad_weight = (g_xc * invstd).to(weight.dtype) if needs[1] else None
    grad_bias = g_sum.to(ctx.bias_dtype) if needs[2] else None
    grad_mean = (-g_sum * scale).to(mean.dtype) if needs[3] else None
    grad_var = None
    if needs[4]:
        grad_var = (g_xc * scale * invstd * invstd * -0.5).to(var.dtype)
    return grad_input, grad_weight, grad_bias, grad_mean, grad_var, None


def _frozen_bn_backward_setup_context(ctx, inputs, output):
    grad_output, scale = inputs
    ctx.save_for_backward(scale, grad_output if scale.requires_grad else None)


def _frozen_bn_backward_backward(ctx, grad):
    scale, grad_output = ctx.saved_tensors
    grad_grad_output = grad_scale = None
    if ctx.needs_input_grad[0]:
        grad_grad_output = torch.ops.frozennorm.frozen_bn_backward(grad, scale)
    if ctx.needs_input_grad[1]:
        dims = _reduce_dims(grad.dim())
        grad_scale = (grad.to(scale.dtype) * grad_output.to(scale.dtype)).sum(dims)
    return grad_grad_output, grad_scale


def _frozen_bn_act_setup_context(ctx, inputs, output):
    input, residual, weight, bias, running_mean, running_var, eps, activation, _ = inputs
    if any(t is not None and t.requires_grad for t in (weight, bias, running_mean, running_var)):
        raise RuntimeError(
            "frozen_bn_act differentiates the input and the residual only; for gradients of "
            "the statistics use frozen_bn followed by the activation")
    out, scale, preact = output
    ctx.mark_non_differentiable(scale, preact)
    ctx.activation = activation
    saved = None if activation == _IDENTITY else (preact if activation == _SILU else out)
    ctx.save_for_backward(scale, saved)


def _frozen_bn_act_backward_formula(ctx, grad_output, _grad_scale, _grad_preact):
    if torch.is_grad_enabled():
        raise RuntimeError(
            "frozen_bn_act does not support double backward; use frozen_bn followed by the "
            "activation where second derivatives are needed")
    scale, saved = ctx.saved_tensors
    need_input, need_residual = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if ctx.activation == _IDENTITY:
        grad_input = torch.ops.frozennorm.frozen_bn_backward(grad_output, scale) if need_input else None
        grad_residual = grad_output if need_residual else None
    else:
        grad_input, grad_residual = torch.ops.frozennorm.frozen_bn_act_backward(
            grad_output, saved, scale, ctx.activation, need_residual)
        grad_residual = grad_residual if need_residual else None
    return grad_input, grad_residual, None, None, None, None, None, None, None


if not COMPILED:
    torch.library.register_autograd(
        "frozennorm::frozen_bn_act", _frozen_bn_act_backward_formula,
        setup_context=_frozen_bn_act_setup_context)
    torch.library.register_autograd(
        "frozennorm::frozen_bn", _frozen_bn_backward_formula,
        setup_context=_frozen_bn_setup_context)
    torch.library.register_autograd(
        "frozennorm::frozen_bn_backward", _frozen_bn_backward_backward,
        setup_context=_frozen_bn_backward_setup_context)


# --------------------------------------------------------------------------------------
# Functional form
# --------------------------------------------------------------------------------------

def frozen_batch_norm(input: Tensor, running_mean: Tensor, running_var: Tensor,
                      weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                      eps: float = 1e-5) -> Tensor:
    """BatchNorm in inference mode with frozen statistics, as one fused op.

    Arguments follow :func:`torch.nn.functional.batch_norm`. Equals
    ``(input - running_mean) / sqrt(running_var + eps) * weight + bias`` per channel (dim
    1), computed in float32 (float64 for float64 input) and rounded once to
    ``input.dtype``; the result keeps the input's memory format. Statistics may have any
    floating dtype. Differentiable with respect to ``input`` (and to the statistics, should
    they require grad).

    Eager mode, ``torch.jit.trace`` and ``torch.jit.script`` call the fused op. While a graph
    is captured for ``torch.compile``/``torch.export`` or the TorchScript-based ONNX
    exporter, the same arithmetic is written as plain elementwise ops instead, so that
    Inductor fuses it with its neighbours and exported graphs hold only standard operators.
    """
    if not torch.jit.is_scripting():
        if _capturing_graph():
            acc = _check_forward(input, weight, bias, running_mean, running_var)
            return _affine(input, running_mean, channel_scale(weight, running_var, eps, acc),
                           bias, acc)
        return _FROZEN_BN(input, weight, bias, running_mean, running_var, eps)[0]
    return torch.ops.frozennorm.frozen_bn(input, weight, bias, running_mean, running_var, eps)[0]


_FROZEN_BN = torch.ops.frozennorm.frozen_bn.default
_FROZEN_BN_ACT = torch.ops.frozennorm.frozen_bn_act.default


def _activation_code(activation: str) -> int:
    """The op's code for an activation name (written so that TorchScript compiles it)."""
    if activation == "identity":
        return 0
    if activation == "relu":
        return 1
    if activation == "relu6":
        return 2
    if activation == "silu":
        return 3
    raise ValueError("activation must be one of 'identity', 'relu', 'relu6', 'silu', got '"
                     + activation + "'")


def frozen_batch_norm_act(input: Tensor, running_mean: Tensor, running_var: Tensor,
                          weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                          eps: float = 1e-5, activation: str = "relu",
                          residual: Optional[Tensor] = None) -> Tensor:
    """``act(frozen_batch_norm(input, ...) [+ residual])`` as one fused op.

    ``activation`` is "relu", "relu6", "silu" or "identity"; ``residual`` (same shape and
    dtype as ``input``) is added before it — the ``bn3 -> + identity -> relu`` tail of a
    ResNet bottleneck. The result equals that unfused sequence exactly (each intermediate
    rounded to ``input.dtype`` where the sequence would store it), in one pass over memory
    forward and one backward; the backward saves what the sequence would (the output for
    ReLU/ReLU6, the pre-activation for SiLU, nothing for identity). Differentiable with
    respect to ``input`` and ``residual``.
    """
    code = _activation_code(activation)
    if not torch.jit.is_scripting():
        if _capturing_graph():
            y = frozen_batch_norm(input, running_mean, running_var, weight, bias, eps)
            if residual is not None:
                y = y + residual
            return _activation(y, code)
        # (the compiled autograd decides by itself what to keep; the fallback's needs this)
        keep = code == _SILU and torch.is_grad_enabled()
        return _FROZEN_BN_ACT(input, residual, weight, bias, running_mean, running_var, eps,
                              code, keep)[0]
    return torch.ops.frozennorm.frozen_bn_act(input, residual, weight, bias, running_mean,
                                              running_var, eps, code, code == 3)[0]


def _capturing_graph() -> bool:
    """True while dynamo (torch.compile, torch.export) or an ONNX exporter traces.

    Called on every eager forward, so it answers "no" cheaply: ``torch.onnx.is_in_onnx_export``
    imports two modules per call (~3 us, as much as the op on a small map) and is asked only
    while the JIT tracer runs (the TorchScript-based exporter traces with it) or the
    dynamo-based exporter's flag is up.
    """
    if torch.compiler.is_compiling():
        return True
    onnx = sys.modules.get("torch.onnx")
    if onnx is None:
        return False
    if torch._C._get_tracing_state() is None:
        flags = sys.modules.get("torch.onnx._internal.exporter._flags")  # torch >= 2.6
        if not getattr(flags, "_is_onnx_exporting", False):
            return False
    return onnx.is_in_onnx_export()
