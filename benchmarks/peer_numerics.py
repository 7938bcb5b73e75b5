"""What the ways of freezing BatchNorm compute, not how fast: their error against a float64
oracle, in the tests' metric, and the ops each forward runs.

    python benchmarks/peer_numerics.py --out benchmarks/results/cpu/peers

* Error: ``max |y - exact| / max(|exact|, 1)`` in units of the output dtype's eps (for
  float32, 2**-23: "float32 ulps"), ``exact = (x - mean) / sqrt(var + eps) * weight + bias``
  in float64 from the values as given -- the metric of
  ``tests/test_op.py::test_mean_much_larger_than_std_is_exact``. Two regimes of statistics
  (those tests' samples): ``typical`` (mean ~ N(0, 1), std 0.3-2) and ``mean_gg_std``
  (mean ~ 100 + N(0, 10), std 0.05-0.2: a map that sits far from 0, as after a ReLU with a
  large bias); the input is ``mean + std * N(0, 1)`` per channel, shape 4x32x16x16; the
  median and the range over ``--seeds`` draws. Every contender keeps float32 statistics
  (``nn.BatchNorm2d`` takes a 16-bit input against them, as under autocast); the detectron2
  way is measured on both of its paths.
* Ops: the ATen (and frozennorm) operators one forward dispatches, recorded with a
  ``TorchDispatchMode`` (below autograd, so each is one kernel, one launch on a GPU); views,
  reshapes and allocations are not counted. ``elementwise`` counts ops tagged ``pointwise``; ``full
  size`` those whose output has the input's number of elements.

Contenders: torchvision's ``FrozenBatchNorm2d`` (float32 buffers; timm's frozen layers reuse
it), the detectron2 way (``F.batch_norm`` without grad, else ``x * scale + shift`` with
scale/shift cast to the input's dtype; reimplemented as in ``frozennorm.bench``),
``nn.BatchNorm2d`` in eval, and frozennorm's ``FrozenBatchNorm2d``. Writes ``peers.json``
and ``peers.md`` (refused under benchmarks/results/ from uncommitted changes or a stale
build: the results record the commit).
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import frozennorm
from frozennorm.bench.contenders import Detectron2Style
from frozennorm.bench.report import check_provenance, metadata, provenance_note, table

SHAPE = (4, 32, 16, 16)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def statistics_of(regime: str, seed: int) -> Dict[str, torch.Tensor]:
    """Per-channel mean, var, weight, bias of a regime (float32) and an input drawn from
    them (float64)."""
    g = torch.Generator().manual_seed(seed)
    c = SHAPE[1]
    weight = torch.empty(c).uniform_(0.5, 2.0, generator=g) * torch.where(
        torch.rand(c, generator=g) < 0.3, -1.0, 1.0)
    bias = torch.randn(c, generator=g)
    if regime == "mean_gg_std":
        mean = 100 + torch.randn(c, generator=g) * 10
        std = torch.empty(c).uniform_(0.05, 0.2, generator=g)
    else:
        mean = torch.randn(c, generator=g)
        std = torch.empty(c).uniform_(0.3, 2.0, generator=g)
    view = (1, -1, 1, 1)
    x = mean.double().view(view) + torch.randn(SHAPE, generator=g, dtype=torch.float64) * (
        std.double().view(view))
    return {"mean": mean, "var": std * std, "weight": weight, "bias": bias, "x": x}


def batchnorm(s: Dict[str, torch.Tensor]) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(SHAPE[1])
    with torch.no_grad():
        bn.running_mean.copy_(s["mean"])
        bn.running_var.copy_(s["var"])
        bn.weight.copy_(s["weight"])
        bn.bias.copy_(s["bias"])
    return bn.requires_grad_(False).eval()


class _RequiringGrad(nn.Module):
    """``inner`` called on an input that requires grad (detectron2's other path)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.detach().requires_grad_()).detach()


def contenders() -> Dict[str, Callable[[nn.BatchNorm2d], nn.Module]]:
    out: Dict[str, Callable[[nn.BatchNorm2d], nn.Module]] = {}
    try:
        from torchvision.ops.misc import FrozenBatchNorm2d as TorchvisionFrozen

        def torchvision_frozen(bn: nn.BatchNorm2d) -> nn.Module:
            m = TorchvisionFrozen(bn.num_features, eps=bn.eps)
            m.load_state_dict(bn.state_dict(), strict=False)
            return m

        out["torchvision FrozenBatchNorm2d"] = torchvision_frozen
    except ImportError:
        pass
    out["detectron2 way"] = Detectron2Style
    out["detectron2 way, input requires grad"] = lambda bn: _RequiringGrad(Detectron2Style(bn))
    out["nn.BatchNorm2d eval"] = lambda bn: bn
    out["frozennorm"] = frozennorm.FrozenBatchNorm2d.from_batchnorm
    return out


def error_ulps(y: torch.Tensor, x: torch.Tensor, s: Dict[str, torch.Tensor],
               bn: nn.BatchNorm2d) -> float:
    view = (1, -1, 1, 1)
    d = lambda t: t.double().view(view)  # noqa: E731
    exact = (x.double() - d(s["mean"])) / torch.sqrt(d(s["var"]) + bn.eps) * d(s["weight"]) + (
        d(s["bias"]))
    err = ((y.double() - exact).abs() / exact.abs().clamp_min(1)).max().item()
    return err / torch.finfo(y.dtype).eps


def measure_errors(seeds: int) -> List[Dict[str, object]]:
    rows = []
    for regime in ("typical", "mean_gg_std"):
        for dtype_name, dtype in DTYPES.items():
            for name, make in contenders().items():
                errs, out_dtype = [], None
                for seed in range(seeds):
                    s = statistics_of(regime, seed)
                    bn = batchnorm(s)
                    x = s["x"].to(dtype)
                    with torch.no_grad():
                        y = make(bn)(x)
                    out_dtype = str(y.dtype).replace("torch.", "")
                    errs.append(error_ulps(y, x, s, bn))
                rows.append({"regime": regime, "input": dtype_name, "contender": name,
                             "output": out_dtype, "median_ulps": statistics.median(errs),
                             "min_ulps": min(errs), "max_ulps": max(errs), "seeds": seeds})
    return rows


# reshapes and allocations: no arithmetic
_NOT_KERNELS = (torch.ops.aten.reshape, torch.ops.aten._unsafe_view, torch.ops.aten.empty,
                torch.ops.aten.empty_like, torch.ops.aten.empty_strided)


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: List[Dict[str, object]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not (func.is_view or func.overloadpacket in _NOT_KERNELS):
            first = out[0] if isinstance(out, (tuple, list)) else out
            self.calls.append({"op": str(func.overloadpacket.__name__),
                               "elementwise": torch.Tag.pointwise in func.tags,
                               "numel": first.numel() if isinstance(first, torch.Tensor)
                               else None})
        return out


def count_ops() -> List[Dict[str, object]]:
    s = statistics_of("typical", 0)
    rows = []
    for dtype_name in ("float32", "float16"):
        for grad in (False, True):
            for name, make in contenders().items():
                if "requires grad" in name:  # this table has its own column for that
                    continue
                module = make(batchnorm(s))
                x = s["x"].to(DTYPES[dtype_name]).requires_grad_(grad)
                mode = _Ops()
                with torch.set_grad_enabled(grad), mode:
                    module(x)
                calls = mode.calls
                rows.append({
                    "input": dtype_name, "requires_grad": grad, "contender": name,
                    "ops": len(calls), "elementwise": sum(c["elementwise"] for c in calls),
                    "full_size": sum(c["numel"] == x.numel() for c in calls),
                    "sequence": [c["op"] for c in calls]})
    return rows


def fmt(v: float) -> str:
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def write(out: Path, meta: Dict[str, object], errors: Sequence[Dict[str, object]],
          ops: Sequence[Dict[str, object]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "peers.json").write_text(json.dumps(
        {"metadata": meta, "errors": errors, "ops": ops}, indent=1, default=str) + "\n")
    note = provenance_note(meta)
    err_table = table(["regime", "input", "contender", "output", "error (ulps of the output "
                       "dtype), median", "range"],
                      [[r["regime"], r["input"], r["contender"], r["output"],
                        fmt(r["median_ulps"]), f"{fmt(r['min_ulps'])}-{fmt(r['max_ulps'])}"]
                       for r in errors], markdown=True)
    op_table = table(["input", "requires grad", "contender", "ops", "elementwise",
                      "full size", "sequence"],
                     [[r["input"], "yes" if r["requires_grad"] else "no", r["contender"],
                       str(r["ops"]), str(r["elementwise"]), str(r["full_size"]),
                       " ".join(r["sequence"])] for r in ops], markdown=True)
    (out / "peers.md").write_text(
        "# Frozen BatchNorm: error and ops per forward, by contender\n\n"
        + (f"{note}\n\n" if note else "")
        + f"torch {meta['torch']}, torchvision {meta['torchvision']}, frozennorm "
        f"{meta['frozennorm']} ({meta['frozennorm_backend']}); commit {meta['git']}; "
        f"{meta['date']}.\n\n`{meta['command']}`\n\n"
        "## Error against a float64 oracle\n\n"
        "max |y - exact| / max(|exact|, 1) in units of the output dtype's eps (the metric of "
        "tests/test_op.py::test_mean_much_larger_than_std_is_exact); input 4x32x16x16, "
        f"median and range over {errors[0]['seeds']} draws of the statistics.\n\n"
        f"{err_table}\n\n## Ops per forward\n\n"
        "ATen/frozennorm operators dispatched below autograd (one kernel each; views, "
        "reshapes and allocations not counted); elementwise: tagged pointwise; full size: output as large as "
        "the input.\n\n" + op_table + "\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=20, help="draws of the statistics per regime")
    p.add_argument("--out", type=Path)
    p.add_argument("--allow-dirty", action="store_true",
                   help="write into benchmarks/results/ from uncommitted changes or a stale "
                        "build (refused otherwise; the results say so at the top)")
    args = p.parse_args(argv)
    argv_used = list(sys.argv[1:] if argv is None else argv)
    meta = metadata("cpu", "python benchmarks/peer_numerics.py " + shlex.join(argv_used),
                    {"seeds": args.seeds, "shape": list(SHAPE)})
    if args.out:
        check_provenance(meta, args.out, args.allow_dirty)
    errors, ops = measure_errors(args.seeds), count_ops()
    for r in errors:
        print(f"{r['regime']:12} {r['input']:9} {r['contender']:30} -> {r['output']:9} "
              f"{fmt(r['median_ulps']):>6} ulps ({fmt(r['min_ulps'])}-{fmt(r['max_ulps'])})")
    for r in ops:
        print(f"{r['input']:8} grad={r['requires_grad']!s:5} {r['contender']:30} {r['ops']} ops, "
              f"{r['elementwise']} elementwise, {r['full_size']} full size: "
              f"{' '.join(r['sequence'])}")
    if args.out:
        write(args.out, meta, errors, ops)
    return 0


if __name__ == "__main__":
    sys.exit(main())
