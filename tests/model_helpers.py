"""Helpers shared by the model tests: random statistics, stochastic layers off, and a
comparison relative to each output's scale."""
from typing import Any

import torch
from torch import nn


def randomize_norm_stats_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random running statistics, weight and bias in every BatchNorm-like layer (live or
    frozen, any library), so that freezing them really matters; ``num_batches_tracked`` 7."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            mean, var = getattr(m, "running_mean", None), getattr(m, "running_var", None)
            if not (isinstance(mean, torch.Tensor) and isinstance(var, torch.Tensor)):
                continue
            c = mean.numel()
            mean.copy_(torch.randn(c, generator=g) * 0.5)
            var.copy_(torch.empty(c).uniform_(0.5, 2.0, generator=g))
            w, b = getattr(m, "weight", None), getattr(m, "bias", None)
            if isinstance(w, torch.Tensor):
                w.copy_(torch.empty(c).uniform_(0.5, 1.5, generator=g))
            if isinstance(b, torch.Tensor):
                b.copy_(torch.randn(c, generator=g) * 0.2)
            nbt = getattr(m, "num_batches_tracked", None)
            if isinstance(nbt, torch.Tensor):
                nbt.fill_(7)
    return model


_STOCHASTIC_NAMES = {"StochasticDepth", "DropPath", "DropBlock2d"}


def train_without_dropout(model: nn.Module) -> nn.Module:
    """``model.train()``, then dropout-like layers back to eval, so that a forward in train
    mode is deterministic and differs from eval mode only in the normalisation layers."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) or type(m).__name__ in _STOCHASTIC_NAMES:
            m.eval()
    return model


def assert_close_rel(actual: Any, expected: Any, rtol: float = 1e-4, what: str = "output") -> None:
    """Tensors (or nested dicts/lists/tuples of them) equal up to ``rtol`` relative to the
    largest |expected| of each tensor: deep nets add up float32 rounding differences."""
    if isinstance(expected, dict):
        assert list(actual.keys()) == list(expected.keys()), what
        for k in expected:
            assert_close_rel(actual[k], expected[k], rtol, f"{what}[{k!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), what
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_close_rel(a, e, rtol, f"{what}[{i}]")
    else:
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
        scale = expected.detach().abs().max().item() if expected.numel() else 1.0
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * max(scale, 1e-6),
                                   msg=lambda m: f"{what}: {m}")
