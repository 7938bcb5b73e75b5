"""The rules of the frozennorm ops on the Python side: argument checks, the compute dtype,
the activation codes. The compiled kernels apply the same rules in csrc/rules.h and
csrc/common.cpp; tests/test_op.py checks that both agree (errors and dtypes)."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def activation_code(activation: str) -> int:
    """The fused ops' code for an activation name: the one definition of the codes, which
    csrc/rules.h's ``enum class Activation`` mirrors. (Literals: TorchScript, which
    compiles this, takes no global ints.)"""
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


#: Activation codes of the fused ops, by name.
ACTIVATIONS = {name: activation_code(name) for name in ("identity", "relu", "relu6", "silu")}
IDENTITY, RELU, RELU6, SILU = ACTIVATIONS.values()


def check_data(t: Tensor, name: str, op: str) -> None:
    if t.dim() < 2:
        raise RuntimeError(
            f"{op}: expected {name} of shape (N, C, *) with at least 2 dimensions, got a "
            f"{t.dim()}-D tensor of shape {list(t.shape)}")
    if t.dtype not in _FLOATING:
        raise RuntimeError(
            f"{op}: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def check_per_channel(t: Tensor, name: str, data: Tensor, data_name: str, op: str,
                      dtypes: Tuple[torch.dtype, ...], what_dtype: str, move: str) -> None:
    """``t``: one value per channel of ``data``, on its device, of one of ``dtypes``."""
    if t.device != data.device:
        raise RuntimeError(f"{op}: {name} is on {t.device} but the {data_name} is on "
                           f"{data.device}{move}")
    if t.dtype not in dtypes:
        raise RuntimeError(f"{op}: {name} must be {what_dtype}, got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != data.shape[1]:
        raise RuntimeError(
            f"{op}: {name} must be a 1-D tensor with one value per channel "
            f"({data.shape[1]} channels, {data_name}.shape[1]), got shape {list(t.shape)}")


def check_stat(t: Tensor, name: str, input: Tensor, op: str) -> None:
    check_per_channel(t, name, input, "input", op, _FLOATING,
                      "a floating-point tensor (float16, bfloat16, float32 or float64)",
                      "; move the statistics to the input's device")


def promote_floating(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """torch.promote_types for floating dtypes, in plain Python (invisible to tracers)."""
    if a == b:
        return a
    if torch.float64 in (a, b):
        return torch.float64
    return torch.float32  # float32 with anything narrower, or float16 with bfloat16


def stats_dtype(*stats: Optional[Tensor]) -> torch.dtype:
    dtype = None
    for t in stats:
        if t is not None:
            dtype = t.dtype if dtype is None else promote_floating(dtype, t.dtype)
    return dtype


def compute_dtype(data: torch.dtype, stats: torch.dtype) -> torch.dtype:
    """float64 for float64 data, or float32 data with float64 statistics; else float32."""
    if data == torch.float64 or (data == torch.float32 and stats == torch.float64):
        return torch.float64
    return torch.float32


def check_forward(input, weight, bias, running_mean, running_var) -> torch.dtype:
    op = "frozen_bn"
    check_data(input, "input", op)
    for t, name in ((running_mean, "running_mean"), (running_var, "running_var"),
                    (weight, "weight"), (bias, "bias")):
        if t is not None:
            check_stat(t, name, input, op)
    return compute_dtype(input.dtype, stats_dtype(weight, bias, running_mean, running_var))


def check_backward(grad_output: Tensor, scale: Tensor) -> torch.dtype:
    op = "frozen_bn_backward"
    check_data(grad_output, "grad_output", op)
    check_per_channel(scale, "scale", grad_output, "grad_output", op,
                      (torch.float32, torch.float64),
                      "float32 or float64 (the per-channel scale frozen_bn returns)", "")
    return compute_dtype(grad_output.dtype, scale.dtype)


def as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t in dtype, without a (traced) conversion when it already is."""
    return t if t.dtype == dtype else t.to(dtype)


def check_act(input: Tensor, residual: Optional[Tensor], activation: int) -> None:
    op = "frozen_bn_act"
    if activation not in (IDENTITY, RELU, RELU6, SILU):
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


def residual_fits(input: Tensor, residual: Tensor) -> bool:
    """A residual the fused op adds as it is: the input's shape, dtype and device."""
    return (residual.dtype == input.dtype and residual.device == input.device
            and residual.shape == input.shape)


def broadcasts_to(input: Tensor, residual: Tensor) -> bool:
    """A residual of the input's dtype and device whose sum with the input has the input's
    shape: expanded, the fused op adds it with the same result as the unfused add."""
    if residual.dtype != input.dtype or residual.device != input.device:
        return False
    if residual.dim() > input.dim():
        return False
    offset = input.dim() - residual.dim()
    for i in range(residual.dim()):
        if residual.shape[i] != 1 and residual.shape[i] != input.shape[offset + i]:
            return False
    return True


def check_act_backward(grad_output: Tensor, saved: Tensor, scale: Tensor,
                        activation: int) -> torch.dtype:
    acc = check_backward(grad_output, scale)
    if activation not in (IDENTITY, RELU, RELU6, SILU):
        raise RuntimeError(f"frozen_bn_act_backward: activation must be 0..3, got {activation}")
    if activation != IDENTITY and (saved.shape != grad_output.shape or saved.dtype != grad_output.dtype
                                    or saved.device != grad_output.device):
        raise RuntimeError(
            "frozen_bn_act_backward: saved must be the forward's output (ReLU/ReLU6) or "
            "pre-activation (SiLU), with grad_output's shape, dtype and device")
    return acc


def check_affine_backward(grad_output: Tensor, input: Tensor, saved: Optional[Tensor],
                          running_mean: Tensor, scale: Tensor, activation: int) -> torch.dtype:
    op = "frozen_bn_affine_backward"
    acc = check_backward(grad_output, scale)
    if activation not in (IDENTITY, RELU, RELU6, SILU):
        raise RuntimeError(f"{op}: activation must be 0..3, got {activation}")
    for t, name in ((input, "input"), (saved, "saved")):
        if t is None:
            continue
        if t.shape != grad_output.shape or t.dtype != grad_output.dtype or t.device != grad_output.device:
            raise RuntimeError(
                f"{op}: {name} must have grad_output's shape {list(grad_output.shape)}, dtype "
                f"{grad_output.dtype} and device {grad_output.device}; got "
                f"{list(t.shape)} {t.dtype} on {t.device}")
    if activation != IDENTITY and saved is None:
        raise RuntimeError(f"{op}: saved (the forward's output, or pre-activation for SiLU) is "
                           f"needed for activation {activation}")
    check_stat(running_mean, "running_mean", grad_output, op)
    return acc


def channel_view(t: Tensor, ndim: int) -> Tensor:
    return t.view([1, -1] + [1] * (ndim - 2))


def reduce_dims(ndim: int) -> List[int]:
    return [0] + list(range(2, ndim))


def is_dense(t: Tensor) -> bool:
    """Non-overlapping and dense (the fused kernels' requirement), from sizes and strides."""
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True
