"""Shared test helpers: an fp64 oracle, the precision standard, and sample inputs."""
from __future__ import annotations

import dataclasses
import math
from typing import List, Optional

import torch
from hypothesis import strategies as st

from frozennorm._op.rules import is_dense  # noqa: F401  (the tests' import)
from frozennorm.ops import compute_dtype

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
LAYOUTS = ["contiguous", "channels_last", "sliced", "permuted", "expanded"]
# "wide": |weight| 2-8, so that many outputs lie beyond +-6 (ReLU6's clamp)
REGIMES = ["typical", "mean_gg_std", "tiny_var", "eps0", "wide"]


def oracle(x, weight, bias, mean, var, eps):
    """(x - mean) / sqrt(var + eps) * weight + bias in float64, from the values as given.

    (F.batch_norm's own float64 path computes x * alpha + beta, which is not exact enough
    to be an oracle when |mean| >> std.)
    """
    shape = [1, -1] + [1] * (x.dim() - 2)
    d = lambda t: t.detach().double().reshape(shape)
    y = (x.detach().double() - d(mean)) / torch.sqrt(d(var) + eps)
    if weight is not None:
        y = y * d(weight)
    if bias is not None:
        y = y + d(bias)
    return y


def oracle_terms(x, weight, bias, mean, var, eps):
    """|(x - mean) * scale| + |bias|: the magnitude the compute-precision error scales with."""
    shape = [1, -1] + [1] * (x.dim() - 2)
    d = lambda t: t.detach().double().reshape(shape)
    scale = 1 / torch.sqrt(d(var) + eps)
    if weight is not None:
        scale = scale * d(weight)
    t = ((x.detach().double() - d(mean)) * scale).abs()
    if bias is not None:
        t = t + d(bias).abs()
    return t


def compute_eps(data_dtype, stats_dtype=torch.float32):
    """The unit roundoff of the dtype the ops compute in (frozennorm's own rule)."""
    wide = compute_dtype(data_dtype, stats_dtype) == torch.float64
    return 2.0 ** -53 if wide else 2.0 ** -24


def ulp(exact: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` at |exact| (float64 tensor)."""
    fi = torch.finfo(dtype)
    a = exact.abs().clamp_min(fi.smallest_normal)
    return torch.exp2(torch.floor(torch.log2(a))) * fi.eps


def assert_close_to_exact(y, exact, terms, cdt_eps, what="output", factor=4.0):
    """|y - exact| <= half an ulp of y's dtype + a few ulps of the compute dtype.

    The first term is the single rounding to the output dtype; the second the arithmetic
    in float32/float64, which scales with |(x - mean) * scale| + |bias| (not with |x|:
    that is what makes |mean| >> std exact).
    """
    assert y.shape == exact.shape
    finite = torch.isfinite(exact)
    yd = y.detach().double()
    assert torch.equal(torch.isfinite(yd), finite), f"{what}: finite/non-finite pattern differs"
    if not finite.any():
        return
    err = (yd - exact).abs()[finite]
    bound = (0.5 * ulp(exact, y.dtype) + factor * cdt_eps * terms)[finite]
    worst = (err / bound).max().item()
    assert worst <= 1.0, (
        f"{what}: error {err.max().item():.3g} exceeds the bound (worst ratio {worst:.3g}) "
        f"for {y.dtype}")


@dataclasses.dataclass
class Sample:
    x: torch.Tensor
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    mean: torch.Tensor
    var: torch.Tensor
    eps: float

    def args(self):
        return (self.x, self.weight, self.bias, self.mean, self.var, self.eps)


def make_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """A tensor equal to x with the given memory layout."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "channels_last":
        if x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        if x.dim() == 5:
            return x.contiguous(memory_format=torch.channels_last_3d)
        return x.transpose(0, 1).contiguous().transpose(0, 1)  # C outermost
    if layout == "sliced":
        # every other element of a twice-as-large last dim: not dense
        big = torch.empty(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
        big[..., ::2] = x
        return big[..., ::2]
    if layout == "permuted":
        # dense, but with the dims stored in reverse order
        dims = list(range(x.dim()))[::-1]
        return x.permute(dims).contiguous().permute(dims)
    if layout == "expanded":
        # stride-0 batch dim (as the gradient of a sum is)
        return x[:1].expand_as(x) if x.shape[0] > 0 else x
    raise ValueError(layout)


def make_sample(shape, dtype, layout="contiguous", regime="typical", affine=True,
                stats_dtype=torch.float32, device="cpu", seed=0) -> Sample:
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    eps = 1e-5
    w = torch.empty(C).uniform_(0.5, 2.0, generator=g) * torch.where(
        torch.rand(C, generator=g) < 0.3, -1.0, 1.0)
    b = torch.randn(C, generator=g)
    if regime == "wide":
        w = w * 4
    if regime == "mean_gg_std":
        mean = 100 + torch.randn(C, generator=g) * 10
        std = torch.empty(C).uniform_(0.05, 0.2, generator=g)
    elif regime == "tiny_var":
        mean = torch.randn(C, generator=g) * 1e-3
        std = torch.empty(C).uniform_(1e-5, 1e-4, generator=g)
    else:
        mean = torch.randn(C, generator=g)
        std = torch.empty(C).uniform_(0.3, 2.0, generator=g)
    var = std * std
    if regime == "eps0":
        eps = 0.0
    z = torch.randn(*shape, generator=g, dtype=torch.float64)
    x = (mean.double().view([1, -1] + [1] * (len(shape) - 2)) + z * std.double().view(
        [1, -1] + [1] * (len(shape) - 2))).to(dtype)
    x = make_layout(x.to(device), layout)
    cast = lambda t: t.to(device=device, dtype=stats_dtype)
    return Sample(x, cast(w) if affine else None, cast(b) if affine else None,
                  cast(mean), cast(var), eps)


# at::internal::GRAIN_SIZE: at::parallel_for splits the CPU loops' flat range into chunks of
# at least this many elements, so only larger tensors run a chunk that starts mid-channel.
PARALLEL_GRAIN = 32768


@dataclasses.dataclass(frozen=True)
class SampleSpec:
    """What make_sample() builds, as plain values (hypothesis draws it; @example names it)."""
    shape: tuple
    dtype: torch.dtype
    layout: str = "contiguous"
    regime: str = "typical"
    affine: bool = True
    stats_dtype: torch.dtype = torch.float32
    seed: int = 0

    def make(self, device="cpu") -> Sample:
        return make_sample(list(self.shape), self.dtype, self.layout, self.regime, self.affine,
                           self.stats_dtype, device, self.seed)


@st.composite
def shapes(draw, min_dims=2, max_dims=5, max_c=40, big=False):
    """(N, C, *spatial): N = 0 (empty) in about one draw in 16; with ``big``, about one
    draw in 5 has 40k-150k elements (past the parallel grain): N or the last dim stretched."""
    ndim = draw(st.integers(min_dims, max_dims))
    n = draw(st.sampled_from([1, 2, 3] * 5 + [0]))
    c = draw(st.one_of(st.integers(1, max_c), st.sampled_from([64, 256])))
    spatial = [draw(st.integers(1, 9)) for _ in range(ndim - 2)]
    shape = [n, c] + spatial
    if big and n > 0 and draw(st.sampled_from([False] * 4 + [True])):
        target = draw(st.integers(40_000, 150_000))
        stretch = 0 if ndim == 2 else -1  # (N, C): more rows; else a longer last dim
        shape[stretch] = -(-target * shape[stretch] // math.prod(shape))
    return shape


@st.composite
def sample_specs(draw, dtypes=DTYPES, layouts=LAYOUTS, big=False):
    return SampleSpec(tuple(draw(shapes(big=big))), draw(st.sampled_from(dtypes)),
                      draw(st.sampled_from(layouts)), draw(st.sampled_from(REGIMES)),
                      draw(st.booleans()),
                      draw(st.sampled_from([torch.float32] * 3 + [torch.float64, torch.float16])),
                      draw(st.integers(0, 2**31 - 1)))


def samples(device="cpu", dtypes=DTYPES, layouts=LAYOUTS):
    return sample_specs(dtypes, layouts).map(lambda spec: spec.make(device))


def fixed_samples(device="cpu", requires_grad=False) -> List[Sample]:
    """A small fixed list covering dtypes, layouts and edge shapes (for opcheck etc.)."""
    out = []
    specs = [
        ([2, 3, 5, 7], torch.float32, "contiguous"),
        ([2, 8, 4, 4], torch.float32, "channels_last"),
        ([2, 8, 4, 4], torch.float16, "channels_last"),
        ([3, 5, 6], torch.bfloat16, "contiguous"),
        ([4, 6], torch.float64, "contiguous"),
        ([2, 4, 3, 3, 3], torch.float32, "channels_last"),
        ([2, 3, 4, 6], torch.float32, "sliced"),
        ([0, 3, 4, 4], torch.float32, "contiguous"),
        ([2, 5, 1, 1], torch.float16, "contiguous"),
    ]
    for i, (shape, dtype, layout) in enumerate(specs):
        s = make_sample(shape, dtype, layout, "typical", affine=i % 3 != 2, device=device, seed=i)
        if requires_grad:
            s.x = s.x.detach().requires_grad_()
        out.append(s)
    return out


