"""Helpers shared by the model tests: random statistics, stochastic layers off, and a
comparison relative to each output's scale."""
import copy
from typing import Any, Callable, Optional

import torch
from torch import nn


def _set_norm_layers_(model: nn.Module, seed: int, fill: Callable) -> nn.Module:
    """``fill(m, mean, var, weight, bias, generator)`` on every BatchNorm-like layer (live or
    frozen, any library: whatever holds running_mean and running_var tensors; weight and bias
    None where it has none), one generator seeded with ``seed``; ``num_batches_tracked`` 7."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            mean, var = getattr(m, "running_mean", None), getattr(m, "running_var", None)
            if not (isinstance(mean, torch.Tensor) and isinstance(var, torch.Tensor)):
                continue
            w, b = getattr(m, "weight", None), getattr(m, "bias", None)
            fill(m, mean, var, w if isinstance(w, torch.Tensor) else None,
                 b if isinstance(b, torch.Tensor) else None, g)
            nbt = getattr(m, "num_batches_tracked", None)
            if isinstance(nbt, torch.Tensor):
                nbt.fill_(7)
    return model


def randomize_norm_stats_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random running statistics, weight and bias in every BatchNorm-like layer (live or
    frozen, any library), so that freezing them really matters; ``num_batches_tracked`` 7.

    Variances are log-uniform over [1e-6, 2], so that eps (1e-5, 1e-3) decides the scale of
    many channels; means have random signs and magnitudes log-uniform over [0.01, 100]; the
    weight is sqrt(var + eps) times +-[0.3, 1], so that each layer's gain stays below one and
    deep models keep finite, comparable outputs (scale = weight / sqrt(var + eps))."""
    def fill(m, mean, var, w, b, g):
        c = mean.numel()
        sign = lambda: torch.where(torch.rand(c, generator=g) < 0.5, -1.0, 1.0)  # noqa: E731
        mean.copy_(sign() * 10 ** torch.empty(c).uniform_(-2, 2, generator=g))
        var.copy_(10 ** torch.empty(c, dtype=torch.float64).uniform_(-6, 0.3, generator=g))
        if w is not None:
            eps = float(getattr(m, "eps", 1e-5))
            gain = torch.empty(c, dtype=torch.float64).uniform_(0.3, 1.0, generator=g)
            w.copy_(sign().double() * gain * torch.sqrt(var.double() + eps))
        if b is not None:
            b.copy_(torch.randn(c, generator=g) * 0.2)
    return _set_norm_layers_(model, seed, fill)


def tame_norm_stats_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Trained-looking statistics of order one (means N(0, 0.5), variances in [0.5, 2],
    weights in [0.5, 1.5], biases N(0, 0.2)), for tests that train several SGD steps:
    randomize_norm_stats_'s variances down to 1e-6 normalise inputs to ~1e3, and the
    weights' gradients then blow a few steps up to inf."""
    def fill(m, mean, var, w, b, g):
        mean.normal_(0, 0.5, generator=g)
        var.uniform_(0.5, 2.0, generator=g)
        if w is not None:
            w.uniform_(0.5, 1.5, generator=g)
        if b is not None:
            b.normal_(0, 0.2, generator=g)
    return _set_norm_layers_(model, seed, fill)


_STOCHASTIC_NAMES = {"StochasticDepth", "DropPath", "DropBlock2d"}


def train_without_dropout(model: nn.Module) -> nn.Module:
    """``model.train()``, then dropout-like layers back to eval, so that a forward in train
    mode is deterministic and differs from eval mode only in the normalisation layers."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) or type(m).__name__ in _STOCHASTIC_NAMES:
            m.eval()
    return model


def _tensor_pairs(actual: Any, expected: Any, what: str):
    """(name, actual, expected) for each tensor of two nested dicts/lists/tuples."""
    if isinstance(expected, dict):
        assert list(actual.keys()) == list(expected.keys()), what
        for k in expected:
            yield from _tensor_pairs(actual[k], expected[k], f"{what}[{k!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), what
        for i, (a, e) in enumerate(zip(actual, expected)):
            yield from _tensor_pairs(a, e, f"{what}[{i}]")
    else:
        assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
        yield what, actual.detach(), expected.detach()


def assert_close_rel(actual: Any, expected: Any, rtol: float = 1e-4, what: str = "output") -> None:
    """Tensors (or nested dicts/lists/tuples of them) equal up to ``rtol`` relative to the
    largest |expected| of each tensor: deep nets add up float32 rounding differences."""
    for name, a, e in _tensor_pairs(actual, expected, what):
        assert a.dtype == e.dtype, name
        scale = e.abs().max().item() if e.numel() else 1.0
        torch.testing.assert_close(a, e, rtol=rtol, atol=rtol * max(scale, 1e-6),
                                   msg=lambda m: f"{name}: {m}")


def float64_reference(model: nn.Module, *inputs: torch.Tensor,
                      forward: Optional[Callable[..., Any]] = None) -> Any:
    """``forward(model, *inputs)`` (default: ``model(*inputs)``) of a float64 copy of
    ``model`` on the inputs in float64, without gradients."""
    forward = forward or (lambda m, *xs: m(*xs))
    with torch.no_grad():
        return forward(copy.deepcopy(model).double(), *(x.double() for x in inputs))


def assert_matches_float64(actual: Any, reference: Any, rtol: float = 1e-5,
                           what: str = "output") -> None:
    """Each element of ``actual`` within ``rtol * (|ref| + rms(ref))`` of a float64
    reference (the same model computed in float64), where ``ref`` is that element's reference
    value and ``rms(ref)`` the root mean square of its tensor (elements near 0, where a deep
    net's float32 rounding does not shrink with the value).

    (nn.BatchNorm's float32 eval models meet this with rtol 2e-6 on the zoos of the model
    tests with randomize_norm_stats_'s statistics.)"""
    for name, a, e in _tensor_pairs(actual, reference, what):
        assert e.dtype == torch.float64, f"{name}: the reference must be float64, got {e.dtype}"
        a = a.double()
        finite = torch.isfinite(e)
        assert torch.equal(torch.isfinite(a), finite), f"{name}: finite/non-finite pattern differs"
        if not finite.any():
            continue
        a, e = a[finite], e[finite]
        bound = rtol * (e.abs() + e.pow(2).mean().sqrt())
        ratio = (a - e).abs() / bound
        i = int(ratio.argmax())
        assert ratio[i] <= 1, (
            f"{name}: {a[i].item():.9g} against {e[i].item():.9g} (float64), "
            f"{ratio[i].item():.3g} times the bound (rtol {rtol}); "
            f"{int((ratio > 1).sum())} of {ratio.numel()} elements past it")
