"""Is a graph being captured? The frozennorm ops are opaque kernels in eager mode and under
``torch.jit.trace``; while dynamo (``torch.compile``, ``torch.export``, the dynamo-based ONNX
exporter) or the TorchScript-based ONNX exporter captures a graph, the functional form
writes the same arithmetic as plain elementwise ops instead (fusable by Inductor, standard
operators in exported files).

Asked on every eager forward, so each check is cheap and the ONNX ones come last.
"""
from __future__ import annotations

import sys

import torch


def capturing_graph() -> bool:
    """True while dynamo or an ONNX exporter captures a graph (not under plain jit.trace)."""
    if torch.compiler.is_compiling():
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
