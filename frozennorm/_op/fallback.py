"""The pure-PyTorch implementation of the frozennorm ops and its autograd.

It serves every device without a compiled kernel, and CPU/CUDA when the package was
installed without its compiled extension (or ``FROZENNORM_BACKEND=fallback``). Its kernels
are plain elementwise ATen ops with the arithmetic of the compiled ones; its autograd
computes the formulas of csrc/autograd.cpp, which the compiled extension registers in C++
instead: that costs about half as much per call (measured: frozen_bn forward + backward on
1x64x1x1, 1 thread, 24 us against 48 us through torch.library.register_autograd).
"""
from __future__ import annotations

import warnings
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _loader
from .rules import (IDENTITY, RELU, RELU6, SILU, activation_code, as_dtype, channel_view,
                    check_act, check_act_backward, check_affine_backward, check_backward,
                    check_forward, is_dense, reduce_dims)

_fallback_warned = False
_compiled = False  # set by register()


def _warn_fallback() -> None:
    global _fallback_warned
    if not _fallback_warned and not _compiled and _loader.requested_backend() == "auto":
        _fallback_warned = True
        warnings.warn(
            "frozennorm: running the pure-PyTorch fallback (the kernels' formula, slower, "
            "without their fused multiply-add: results can differ from theirs by a rounding), "
            "not the compiled C++/CUDA kernels: " + _loader.fallback_reason(),
            RuntimeWarning, stacklevel=3)


def channel_scale(weight: Optional[Tensor], running_var: Tensor, eps: float,
                  dtype: torch.dtype) -> Tensor:
    """weight / sqrt(running_var + eps) in ``dtype`` (differentiable)."""
    std = torch.sqrt(as_dtype(running_var, dtype) + eps)
    if weight is None:
        return std.reciprocal()
    return as_dtype(weight, dtype) / std


def affine(x: Tensor, mean: Optional[Tensor], scale: Tensor, shift: Optional[Tensor],
            acc: torch.dtype) -> Tensor:
    """(x - mean) * scale + shift (or x * scale) in ``acc``, cast back to x's dtype.

    Plain elementwise ATen ops: what torch.compile fuses with its neighbours and what
    exporters turn into standard operators.
    """
    y = as_dtype(x, acc)
    if mean is not None:
        y = y - channel_view(as_dtype(mean, acc), x.dim())
    y = y * channel_view(scale, x.dim())
    if shift is not None:
        y = y + channel_view(as_dtype(shift, acc), x.dim())
    return as_dtype(y, x.dtype)


def affine_reference(x: Tensor, mean: Optional[Tensor], scale: Tensor,
                      shift: Optional[Tensor], acc: torch.dtype) -> Tensor:
    """:func:`affine` with the kernels' output layout (empty_like(x)), for the fallback."""
    return torch.empty_like(x).copy_(affine(x, mean, scale, shift, acc))


def frozen_bn_fallback(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                       running_mean: Tensor, running_var: Tensor,
                       eps: float) -> Tuple[Tensor, Tensor]:
    """Pure-PyTorch implementation of ``frozen_bn`` (same arithmetic as the kernels)."""
    acc = check_forward(input, weight, bias, running_mean, running_var)
    _warn_fallback()
    scale = channel_scale(weight, running_var, eps, acc)
    return affine_reference(input, running_mean, scale, bias, acc), scale


def frozen_bn_backward_fallback(grad_output: Tensor, scale: Tensor) -> Tensor:
    """Pure-PyTorch implementation of ``frozen_bn_backward``."""
    acc = check_backward(grad_output, scale)
    _warn_fallback()
    return affine_reference(grad_output, None, scale.to(acc), None, acc)


def apply_activation(a: Tensor, activation: int) -> Tensor:
    """The activation of code ``activation`` (also compiled by TorchScript, which takes no
    global ints: the codes come from activation_code)."""
    if activation == activation_code("relu"):
        return torch.relu(a)
    if activation == activation_code("relu6"):
        return torch.nn.functional.relu6(a)
    if activation == activation_code("silu"):
        return torch.nn.functional.silu(a)
    return a


def activation_grad(grad: Tensor, saved: Tensor, activation: int) -> Tensor:
    """grad * act'(saved) (saved: the output for ReLU/ReLU6, the pre-activation for SiLU)."""
    if activation == RELU:
        return torch.where(saved <= 0, torch.zeros_like(grad), grad)
    if activation == RELU6:
        return torch.where((saved <= 0) | (saved >= 6), torch.zeros_like(grad), grad)
    if activation == SILU:
        return torch.ops.aten.silu_backward(grad, saved)
    return grad


def _preactivation(input: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
                   bias: Optional[Tensor], running_mean: Tensor, running_var: Tensor,
                   eps: float) -> Tuple[Tensor, Tensor]:
    """``frozen_bn(input) [+ residual]`` (what the activation is applied to) and the scale."""
    out, scale = frozen_bn_fallback(input, weight, bias, running_mean, running_var, eps)
    return (out + residual if residual is not None else out), scale


def frozen_bn_act_fallback(input: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
                           bias: Optional[Tensor], running_mean: Tensor, running_var: Tensor,
                           eps: float, activation: int,
                           save_preact: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """Pure-PyTorch implementation of ``frozen_bn_act`` (the unfused sequence)."""
    check_act(input, residual, activation)
    out, scale = _preactivation(input, residual, weight, bias, running_mean, running_var, eps)
    keep = save_preact and activation == SILU
    preact = out.clone() if keep else input.new_empty((0,))
    return torch.empty_like(out).copy_(apply_activation(out, activation)), scale, preact


def frozen_bn_affine_backward_fallback(grad_output: Tensor, input: Tensor, saved: Optional[Tensor],
                                      running_mean: Tensor, scale: Tensor, activation: int,
                                      input_grad: bool, residual_grad: bool
                                      ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Pure-PyTorch implementation of ``frozen_bn_affine_backward`` (unfused: the sums by
    ATen's reductions, whose order may depend on the thread count)."""
    acc = check_affine_backward(grad_output, input, saved, running_mean, scale, activation)
    _warn_fallback()
    like = input if is_dense(input) else input.contiguous()
    ga = grad_output if activation == IDENTITY else activation_grad(grad_output, saved, activation)
    dims = reduce_dims(input.dim())
    g = ga.to(acc)
    sum_grad = g.sum(dims)
    centered = as_dtype(input, acc) - channel_view(as_dtype(running_mean, acc), input.dim())
    sum_centered = (g * centered).sum(dims)
    grad_input = (torch.empty_like(like).copy_(affine(ga, None, scale.to(acc), None, acc))
                  if input_grad else grad_output.new_empty((0,)))
    grad_residual = (torch.empty_like(like).copy_(ga) if residual_grad
                     else grad_output.new_empty((0,)))  # (outputs never alias)
    return grad_input, grad_residual, sum_grad, sum_centered


def frozen_bn_act_backward_fallback(grad_output: Tensor, saved: Tensor, scale: Tensor,
                                    activation: int, residual_grad: bool) -> Tuple[Tensor, Tensor]:
    """Pure-PyTorch implementation of ``frozen_bn_act_backward``."""
    check_act_backward(grad_output, saved, scale, activation)
    ga = activation_grad(grad_output, saved, activation)
    grad_residual = ga.clone() if residual_grad else grad_output.new_empty((0,))
    return frozen_bn_backward_fallback(ga, scale), grad_residual


# --------------------------------------------------------------------------------------
# Autograd (the formulas of csrc/autograd.cpp): the input gradient needs only the
# per-channel scale the forward returned (nothing of activation size, never the caller's
# statistics tensors, which DDP overwrites in place between forwards); gradients for the
# statistics are computed too when they require grad, and only then is the input saved.
# --------------------------------------------------------------------------------------

def _save_statistics(ctx, scale, saved, input, weight, bias, running_mean, running_var, eps):
    """What a backward needs when statistics require grad (the forward's input then too);
    returns whether they do."""
    ctx.stats_grad = any(t is not None and t.requires_grad
                         for t in (weight, bias, running_mean, running_var))
    ctx.eps = eps
    if ctx.stats_grad:
        ctx.bias_dtype = bias.dtype if bias is not None else None
        # (copies of the running statistics unless they require grad: DDP overwrites module
        # buffers in place between forwards)
        kept = [t if t.requires_grad else t.detach().clone() for t in (running_mean, running_var)]
        ctx.save_for_backward(scale, saved, input, weight, *kept)
    else:
        ctx.save_for_backward(scale, saved)
    return ctx.stats_grad


def statistics_grads(needs, sum_grad, sum_centered, scale, weight, bias_dtype, mean, var, eps):
    """The gradients of weight, bias, running_mean, running_var from the per-channel sums of
    the BatchNorm output's gradient g and of g * (input - mean) (the formulas of
    csrc/autograd.cpp, and its rule for 1 / sqrt(var + eps): at::rsqrt): ``needs`` says which
    (in that order)."""
    invstd = torch.rsqrt(var.to(scale.dtype) + eps)
    grad_weight = (sum_centered * invstd).to(weight.dtype) if needs[0] else None
    grad_bias = sum_grad.to(bias_dtype) if needs[1] else None
    grad_mean = (-sum_grad * scale).to(mean.dtype) if needs[2] else None
    grad_var = (sum_centered * scale * invstd * invstd * -0.5).to(var.dtype) if needs[3] else None
    return grad_weight, grad_bias, grad_mean, grad_var


def _frozen_bn_setup_context(ctx, inputs, output):
    input, weight, bias, running_mean, running_var, eps = inputs
    _, scale = output
    ctx.mark_non_differentiable(scale)
    ctx.set_materialize_grads(False)  # no zeros for the scale's (never used) gradient
    _save_statistics(ctx, scale, None, input, weight, bias, running_mean, running_var, eps)


def _frozen_bn_backward_formula(ctx, grad_output, _grad_scale):
    if grad_output is None:  # the output took no part in the loss
        return None, None, None, None, None, None
    needs = ctx.needs_input_grad
    if not ctx.stats_grad:
        scale, _ = ctx.saved_tensors
        grad_input = torch.ops.frozennorm.frozen_bn_backward(grad_output, scale) if needs[0] else None
        return grad_input, None, None, None, None, None

    forward_scale, _, input, weight, mean, var = ctx.saved_tensors
    acc = forward_scale.dtype
    if not torch.is_grad_enabled():  # one fused pass
        grad_input, _, g_sum, g_xc = torch.ops.frozennorm.frozen_bn_affine_backward(
            grad_output, input, None, mean, forward_scale, IDENTITY, needs[0], False)
        return ((grad_input if needs[0] else None,)
                + statistics_grads(needs[1:5], g_sum, g_xc, forward_scale, weight,
                                   ctx.bias_dtype, mean, var, ctx.eps) + (None,))
    # A double backward: differentiable ATen formulas. One rule for the scale: the forward's
    # value, with the formula's derivative (csrc/autograd.cpp says why this is exact).
    formula = channel_scale(weight, var, ctx.eps, acc)
    scale = formula + (forward_scale - formula.detach())
    grad_input = torch.ops.frozennorm.frozen_bn_backward(grad_output, scale) if needs[0] else None
    dims = reduce_dims(input.dim())
    g = grad_output.to(acc)
    g_sum = g.sum(dims)
    g_xc = (g * (input.to(acc) - channel_view(mean.to(acc), input.dim()))).sum(dims)
    return ((grad_input,) + statistics_grads(needs[1:5], g_sum, g_xc, scale, weight,
                                            ctx.bias_dtype, mean, var, ctx.eps) + (None,))


def _frozen_bn_backward_setup_context(ctx, inputs, output):
    grad_output, scale = inputs
    ctx.save_for_backward(scale, grad_output if scale.requires_grad else None)


def _frozen_bn_backward_backward(ctx, grad):
    scale, grad_output = ctx.saved_tensors
    grad_grad_output = grad_scale = None
    if ctx.needs_input_grad[0]:
        grad_grad_output = torch.ops.frozennorm.frozen_bn_backward(grad, scale)
    if ctx.needs_input_grad[1]:
        dims = reduce_dims(grad.dim())
        grad_scale = (grad.to(scale.dtype) * grad_output.to(scale.dtype)).sum(dims)
    return grad_grad_output, grad_scale


def _frozen_bn_act_setup_context(ctx, inputs, output):
    input, residual, weight, bias, running_mean, running_var, eps, activation, _ = inputs
    out, scale, preact = output
    ctx.mark_non_differentiable(scale, preact)
    ctx.set_materialize_grads(False)
    ctx.activation = activation
    if activation == SILU and preact.numel() != out.numel():
        # not written by the forward (asked not to: a torch.jit.trace records no grad mode)
        with torch.no_grad():
            preact, _ = _preactivation(input, residual, weight, bias, running_mean, running_var,
                                       eps)
    saved = None if activation == IDENTITY else (preact if activation == SILU else out)
    _save_statistics(ctx, scale, saved, input, weight, bias, running_mean, running_var, eps)


def _frozen_bn_act_backward_formula(ctx, grad_output, _grad_scale, _grad_preact):
    if torch.is_grad_enabled():
        raise RuntimeError(
            "frozen_bn_act does not support double backward; use frozen_bn followed by the "
            "activation where second derivatives are needed")
    if grad_output is None:  # the output took no part in the loss
        return None, None, None, None, None, None, None, None, None
    needs = ctx.needs_input_grad
    need_input, need_residual = needs[0], needs[1]
    if ctx.stats_grad:
        scale, saved, input, weight, mean, var = ctx.saved_tensors
        grad_input, grad_residual, g_sum, g_xc = torch.ops.frozennorm.frozen_bn_affine_backward(
            grad_output, input, saved, mean, scale, ctx.activation, need_input, need_residual)
        return ((grad_input if need_input else None, grad_residual if need_residual else None)
                + statistics_grads(needs[2:6], g_sum, g_xc, scale, weight, ctx.bias_dtype, mean,
                                   var, ctx.eps) + (None, None, None))
    scale, saved = ctx.saved_tensors
    if ctx.activation == IDENTITY:
        grad_input = torch.ops.frozennorm.frozen_bn_backward(grad_output, scale) if need_input else None
        grad_residual = grad_output if need_residual else None
    else:
        grad_input, grad_residual = torch.ops.frozennorm.frozen_bn_act_backward(
            grad_output, saved, scale, ctx.activation, need_residual)
        grad_residual = grad_residual if need_residual else None
    return grad_input, grad_residual, None, None, None, None, None, None, None


def register(lib: torch.library.Library, compiled: bool) -> None:
    """Registers the kernels for every device without its own (after the fake kernels,
    which keep the Meta key) and, when the compiled extension (with its C++ autograd) is
    not loaded, their autograd."""
    global _compiled
    _compiled = compiled
    lib.impl("frozen_bn", frozen_bn_fallback, "CompositeExplicitAutograd")
    lib.impl("frozen_bn_backward", frozen_bn_backward_fallback, "CompositeExplicitAutograd")
    lib.impl("frozen_bn_act", frozen_bn_act_fallback, "CompositeExplicitAutograd")
    lib.impl("frozen_bn_act_backward", frozen_bn_act_backward_fallback,
             "CompositeExplicitAutograd")
    lib.impl("frozen_bn_affine_backward", frozen_bn_affine_backward_fallback,
             "CompositeExplicitAutograd")
    if compiled:
        return
    torch.library.register_autograd(
        "frozennorm::frozen_bn_act", _frozen_bn_act_backward_formula,
        setup_context=_frozen_bn_act_setup_context)
    torch.library.register_autograd(
        "frozennorm::frozen_bn", _frozen_bn_backward_formula,
        setup_context=_frozen_bn_setup_context)
    torch.library.register_autograd(
        "frozennorm::frozen_bn_backward", _frozen_bn_backward_backward,
        setup_context=_frozen_bn_backward_setup_context)
