"""The frozennorm ops: schemas, loading, and the functional form.

``torch.ops.frozennorm.frozen_bn(input, weight, bias, running_mean, running_var, eps)``
returns ``(output, scale)``: ``output = (input - running_mean) * scale + bias`` per channel
(dim 1) with ``scale = weight / sqrt(running_var + eps)``, computed in float32 (float64 for
float64 data, or float32 data with float64 statistics) and rounded once to the input's
dtype, in the input's memory format. ``scale`` (one value per channel) is what the
backward, ``torch.ops.frozennorm.frozen_bn_backward(grad_output, scale)``, needs.
``frozen_bn_act`` / ``frozen_bn_act_backward`` add a residual and an activation in the
same pass.

The CPU and CUDA kernels and their autograd are compiled C++/CUDA (csrc/, which defines
the schemas below); the pure-PyTorch implementation (``_op/fallback.py``) serves every
other device, and CPU/CUDA too when the package was installed without its compiled
extension. The fake kernels are in ``_op/fake.py``, the argument checks and dtype rules in
``_op/rules.py``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _loader
from ._op import fallback
from ._op.capture import use_composite
from ._op.rules import (ACTIVATIONS, activation_code, broadcasts_to, check_forward,
                        compute_dtype, residual_fits)
from ._op.fallback import apply_activation, affine, channel_scale

__all__ = ["frozen_batch_norm", "frozen_batch_norm_act", "ACTIVATIONS", "COMPILED",
           "compute_dtype", "channel_scale"]

#: The schemas (csrc/frozen_bn.cpp defines the same ones when the extension is compiled;
#: tests/test_op.py compares them).
SCHEMAS = {
    "frozen_bn": "frozen_bn(Tensor input, Tensor? weight, Tensor? bias, Tensor running_mean, "
                 "Tensor running_var, float eps) -> (Tensor, Tensor)",
    "frozen_bn_backward": "frozen_bn_backward(Tensor grad_output, Tensor scale) -> Tensor",
    "frozen_bn_act": "frozen_bn_act(Tensor input, Tensor? residual, Tensor? weight, "
                     "Tensor? bias, Tensor running_mean, Tensor running_var, float eps, "
                     "int activation, bool save_preact) -> (Tensor, Tensor, Tensor)",
    "frozen_bn_act_backward": "frozen_bn_act_backward(Tensor grad_output, Tensor saved, "
                              "Tensor scale, int activation, bool residual_grad) "
                              "-> (Tensor, Tensor)",
    "frozen_bn_affine_backward": "frozen_bn_affine_backward(Tensor grad_output, Tensor input, "
                                 "Tensor? saved, Tensor running_mean, Tensor scale, "
                                 "int activation, bool input_grad, bool residual_grad) "
                                 "-> (Tensor, Tensor, Tensor, Tensor)",
}

#: True when the compiled C++/CUDA kernels are registered.
COMPILED: bool = _loader.load_compiled()

if COMPILED:
    _lib = torch.library.Library("frozennorm", "FRAGMENT")
else:
    _lib = torch.library.Library("frozennorm", "DEF")
    for _schema in SCHEMAS.values():
        _lib.define(_schema)

from ._op import fake  # noqa: E402,F401  (registers the fake kernels)

fallback.register(_lib, COMPILED)

_FROZEN_BN = torch.ops.frozennorm.frozen_bn.default
_FROZEN_BN_ACT = torch.ops.frozennorm.frozen_bn_act.default


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
    is captured for ``torch.compile``/``torch.export`` or an ONNX exporter, under
    ``torch.func`` transforms and forward-mode AD, the same arithmetic is written as plain
    elementwise ops instead (``_op/capture.py``): Inductor fuses them with their
    neighbours, exported graphs hold only standard operators, and every transform has its
    rules.
    """
    if not torch.jit.is_scripting():
        if use_composite():
            acc = check_forward(input, weight, bias, running_mean, running_var)
            return affine(input, running_mean, channel_scale(weight, running_var, eps, acc),
                          bias, acc)
        return _FROZEN_BN(input, weight, bias, running_mean, running_var, eps)[0]
    return torch.ops.frozennorm.frozen_bn(input, weight, bias, running_mean, running_var, eps)[0]


def frozen_batch_norm_act(input: Tensor, running_mean: Tensor, running_var: Tensor,
                          weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                          eps: float = 1e-5, activation: str = "relu",
                          residual: Optional[Tensor] = None, inplace_add: bool = False) -> Tensor:
    """``act(frozen_batch_norm(input, ...) [+ residual])`` as one fused op.

    ``activation`` is "relu", "relu6", "silu" or "identity"; ``residual`` is added before
    it — the ``bn3 -> + identity -> relu`` tail of a ResNet bottleneck. The result equals
    that unfused sequence exactly (each intermediate rounded to ``input.dtype`` where the
    sequence would store it), in one pass over memory forward and one backward; the
    backward saves what the sequence would (the output for ReLU/ReLU6, the pre-activation
    for SiLU, nothing for identity). Differentiable with respect to ``input`` and
    ``residual``.

    A residual of the input's shape and dtype is added in the same pass; one that
    broadcasts to it is expanded first. Any other residual (one the sum broadcasts to, of
    another dtype or device, a number) is added as torch adds it — ``y + residual``, or
    ``y += residual`` with ``inplace_add`` (the sum then keeps ``y``'s dtype) — after the
    fused BatchNorm, then the activation: never an error where the unfused sequence runs.
    """
    code = activation_code(activation)
    if residual is not None and not (isinstance(residual, Tensor)
                                     and residual_fits(input, residual)):
        if isinstance(residual, Tensor) and broadcasts_to(input, residual):
            residual = residual.expand_as(input)
        else:
            y = frozen_batch_norm(input, running_mean, running_var, weight, bias, eps)
            y = y.add_(residual) if inplace_add else y + residual
            return apply_activation(y, code)
    # Whether the forward writes SiLU's pre-activation for the backward: the compiled
    # autograd decides that by itself; the fallback's needs it said. Not in a torch.jit.trace:
    # the graph it records must not depend on the grad mode it was traced in (its checker
    # reruns under no_grad); the fallback's autograd then computes the pre-activation itself.
    keep = activation == "silu" and torch.is_grad_enabled() and not torch.jit.is_tracing()
    if not torch.jit.is_scripting():
        if use_composite():
            y = frozen_batch_norm(input, running_mean, running_var, weight, bias, eps)
            if residual is not None:
                y = y + residual
            return apply_activation(y, code)
        return _FROZEN_BN_ACT(input, residual, weight, bias, running_mean, running_var, eps,
                              code, keep)[0]
    return torch.ops.frozennorm.frozen_bn_act(input, residual, weight, bias, running_mean,
                                              running_var, eps, code, keep)[0]
