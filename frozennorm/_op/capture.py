"""When the fused ops must give way to plain elementwise ops.

The frozennorm ops are opaque kernels with a C++ autograd in eager mode and under
``torch.jit.trace``. Some tools need to see through them; while one of them is at work, the
functional forms write the same arithmetic as plain elementwise ATen ops instead:

* dynamo (``torch.compile``, ``torch.export``, the dynamo-based ONNX exporter) and the
  TorchScript-based ONNX exporter capture a graph: elementwise ops are what Inductor fuses
  with its neighbours and what exported files hold as standard operators;
* ``torch.func`` transforms (``grad``, ``vjp``, ``jacrev``, ``jacfwd``, ``jvp``, ``vmap``,
  ``hessian``) refuse C++ autograd functions, and forward-mode AD
  (``torch.autograd.forward_ad``) has no formula for them: ATen's ops have every rule.

Asked on every eager forward, so each check is cheap and the ONNX ones come last.
"""
from __future__ import annotations

import sys

import torch
import torch.autograd.forward_ad as _forward_ad

# torch >= 2.0 has both (the supported ones: >= 2.4); the forward-AD level is a module
# global that dual_level() sets, read on each call.
_functorch_active = torch._C._are_functorch_transforms_active
_is_compiling = torch.compiler.is_compiling


def use_composite() -> bool:
    """True while a graph is captured (dynamo, an ONNX exporter; not plain jit.trace), a
    ``torch.func`` transform runs, or a forward-mode AD level is open."""
    if _is_compiling() or _functorch_active() or _forward_ad._current_level >= 0:
        return True
    if torch.jit.is_tracing():  # jit.trace itself, or the TorchScript-based ONNX exporter
        return torch.onnx.is_in_onnx_export()
    return dynamo_onnx_exporting()


def dynamo_onnx_exporting() -> bool:
    """The dynamo-based ONNX exporter's own flag (torch >= 2.6), for torch releases where
    ``torch.compiler.is_compiling()`` does not report its non-strict export.

    Private torch API, read in this one place; there is no public one: calling
    ``torch.onnx.is_in_onnx_export()`` on every eager forward would import two modules per
    call (~3 us). ``tests/test_graph_capture.py`` fails loudly if the flag moves while
    ``torch.compiler.is_compiling()`` does not cover the exporter.
    """
    flags = sys.modules.get("torch.onnx._internal.exporter._flags")
    return bool(getattr(flags, "_is_onnx_exporting", False))
