"""Fake (meta) kernels of the frozennorm ops: shapes, dtypes and strides exactly as the real
kernels produce them (torch.compile, torch.export and opcheck trace with these)."""
import torch

from .rules import (SILU, IDENTITY, check_act, check_act_backward, check_affine_backward,
                    check_backward, check_forward, is_dense)


@torch.library.register_fake("frozennorm::frozen_bn")
def _frozen_bn_fake(input, weight, bias, running_mean, running_var, eps):
    acc = check_forward(input, weight, bias, running_mean, running_var)
    return torch.empty_like(input), input.new_empty((input.shape[1],), dtype=acc)


@torch.library.register_fake("frozennorm::frozen_bn_backward")
def _frozen_bn_backward_fake(grad_output, scale):
    check_backward(grad_output, scale)
    return torch.empty_like(grad_output)


@torch.library.register_fake("frozennorm::frozen_bn_act")
def _frozen_bn_act_fake(input, residual, weight, bias, running_mean, running_var, eps,
                        activation, save_preact):
    acc = check_forward(input, weight, bias, running_mean, running_var)
    check_act(input, residual, activation)
    if activation == IDENTITY and residual is None:
        out = torch.empty_like(input)  # frozen_bn's layout
    else:
        out = torch.empty_like(input if is_dense(input) else input.contiguous())
    keep = save_preact and activation == SILU
    return (out, input.new_empty((input.shape[1],), dtype=acc),
            torch.empty_like(out) if keep else input.new_empty((0,)))


@torch.library.register_fake("frozennorm::frozen_bn_act_backward")
def _frozen_bn_act_backward_fake(grad_output, saved, scale, activation, residual_grad):
    check_act_backward(grad_output, saved, scale, activation)
    if activation == IDENTITY:
        like = torch.empty_like(grad_output)
        return like, (torch.empty_like(grad_output) if residual_grad else grad_output.new_empty((0,)))
    like = saved if is_dense(saved) else saved.contiguous()
    return (torch.empty_like(like),
            torch.empty_like(like) if residual_grad else grad_output.new_empty((0,)))


@torch.library.register_fake("frozennorm::frozen_bn_affine_backward")
def _frozen_bn_affine_backward_fake(grad_output, input, saved, running_mean, scale, activation,
                                    input_grad, residual_grad):
    acc = check_affine_backward(grad_output, input, saved, running_mean, scale, activation)
    like = input if is_dense(input) else input.contiguous()
    empty = grad_output.new_empty((0,))
    C = input.shape[1]
    return (torch.empty_like(like) if input_grad else empty,
            torch.empty_like(like) if residual_grad else empty,
            input.new_empty((C,), dtype=acc), input.new_empty((C,), dtype=acc))
