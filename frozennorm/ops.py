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

import warnings
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _loader

__all__ = ["frozen_batch_norm", "COMPILED"]

FORWARD_SCHEMA = (
    "frozen_bn(Tensor input, Tensor? weight, Tensor? bias, Tensor running_mean, "
    "Tensor running_var, float eps) -> (Tensor, Tensor)")
BACKWARD_SCHEMA = "frozen_bn_backward(Tensor grad_output, Tensor scale) -> Tensor"

#: True when the compiled C++/CUDA kernels are registered.
COMPILED: bool = _loader.load_compiled()

if COMPILED:
    _lib = torch.library.Library("frozennorm", "FRAGMENT")
else:
    _lib = torch.library.Library("frozennorm", "DEF")
    _lib.define(FORWARD_SCHEMA)
    _lib.define(BACKWARD_SCHEMA)

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


def _stats_dtype(*stats: Optional[Tensor]) -> torch.dtype:
    dtype = None
    for t in stats:
        if t is not None:
            dtype = t.dtype if dtype is None else torch.promote_types(dtype, t.dtype)
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
            "frozennorm: the compiled C++/CUDA extension is not installed; using the "
            "pure-PyTorch fallback (same results, slower). " + _loader.REBUILD_HINT,
            RuntimeWarning, stacklevel=3)


def channel_scale(weight: Optional[Tensor], running_var: Tensor, eps: float,
                  dtype: torch.dtype) -> Tensor:
    """weight / sqrt(running_var + eps) in ``dtype`` (differentiable)."""
    std = torch.sqrt(running_var.to(dtype) + eps)
    if weight is None:
        return std.reciprocal()
    return weight.to(dtype) / std


def _affine_reference(x: Tensor, mean: Optional[Tensor], scale: Tensor,
                      shift: Optional[Tensor], acc: torch.dtype) -> Tensor:
    """(x - mean) * scale + shift (or x * scale) in ``acc``, rounded once, x's layout."""
    y = x.to(acc)
    if mean is not None:
        y = y - _channel_view(mean.to(acc), x.dim())
    y = y * _channel_view(scale, x.dim())
    if shift is not None:
        y = y + _channel_view(shift.to(acc), x.dim())
    return torch.empty_like(x).copy_(y)


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


# The pure-PyTorch kernels serve every device without a compiled kernel (registered after
# the fake kernels, which keep the Meta key).
_lib.impl("frozen_bn", frozen_bn_fallback, "CompositeExplicitAutograd")
_lib.impl("frozen_bn_backward", frozen_bn_backward_fallback, "CompositeExplicitAutograd")


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


if not COMPILED:
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
    """
    return _FROZEN_BN(input, weight, bias, running_mean, running_var, eps)[0]


_FROZEN_BN = torch.ops.frozennorm.frozen_bn.default
