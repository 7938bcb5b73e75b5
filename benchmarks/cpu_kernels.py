"""The CPU kernels against the memory floor where ``python -m frozennorm.bench`` does not look:
the fused epilogues (BN + ReLU/ReLU6/SiLU, with and without a residual, forward and backward)
and strided views (forward and backward), op by op through ``torch.ops.frozennorm``; and the
parts of a training step (the benchmark's training mode: the module's forward and the input's
gradient through ``torch.autograd.grad``): the two kernels alone, and the autograd engine.

    python benchmarks/cpu_kernels.py --passes forward,backward --out benchmarks/results/cpu/kernels
    python benchmarks/cpu_kernels.py --views '' --kinds bn --passes step --out benchmarks/results/cpu/steps
    # each writes kernels.json and kernels.md (the commands of the committed results: benchmarks/README.md)

Each case times the op and ``x.clone()`` of the same tensor in interleaved rounds (the
benchmark's own timer, heap setting and busy-machine retries). The floor of an op that moves
more bytes than one copy (a residual to read, a pre-activation or a residual's gradient to
write, a saved tensor to read in the backward) is clone's time scaled by the bytes the op
moves over the bytes clone moves; ``x floor`` = op time / that floor, as in the benchmark.
A training step's floor is the benchmark's: ``(x.clone(), grad.clone())``, two copies, the
first kept while the second is made (as autograd keeps the forward's output through the
backward: four tensors in the caches, not three). Its parts, timed in the same rounds:
``kernels`` (frozen_bn then frozen_bn_backward, called directly, the output kept likewise)
and ``engine``, ``torch.autograd.grad`` through ``x.clone()`` (whose backward does nothing)
less ``x.clone()`` itself: what autograd costs around any one differentiable op.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

import frozennorm  # noqa: F401  (loads the ops)
from frozennorm.bench.cases import DTYPES, SHAPES, shape_str
from frozennorm.bench.report import (check_provenance, fmt_ratio, fmt_time, geomean, load_average,
                                    metadata, provenance_note, table)
from frozennorm.bench.timing import BUSY_LOAD, CpuTimer, configure_cpu_malloc, timed_rounds
from frozennorm.modules import FrozenBatchNorm2d
from frozennorm.ops import ACTIVATIONS

ops = torch.ops.frozennorm
#: the benchmark's presets of at least 1 MB in float16/bfloat16 (the issue's lower bound)
DEFAULT_SHAPES = [n for n, s in SHAPES.items() if math.prod(s) * 2 >= 1 << 20]
VIEWS = ("nchw_channel_slice", "cl_channel_slice", "every_other_column")
PASSES = ("forward", "backward", "step")


@dataclass(frozen=True)
class Case:
    shape_name: str
    shape: Tuple[int, ...]
    dtype: str
    layout: str  # nchw / channels_last, or one of VIEWS
    kind: str    # bn (frozen_bn), or fused: bn+relu, bn+relu6, bn+silu, each also "+residual"
    pass_: str   # forward / backward / step (bn on dense layouts: a training step and its parts)

    @property
    def label(self) -> str:
        return f"{self.shape_name} {self.dtype} {self.layout} {self.kind} {self.pass_}"


def view_of(shape, dtype, layout, gen) -> torch.Tensor:
    """A tensor of `shape` in `layout`: dense NCHW/channels-last, or a view into a larger one."""
    n, c, h, w = shape
    dt = DTYPES[dtype]
    if layout == "nchw":
        return torch.randn(shape, generator=gen).to(dt)
    if layout == "channels_last":
        return torch.randn(shape, generator=gen).to(dt).contiguous(memory_format=torch.channels_last)
    if layout == "nchw_channel_slice":  # x[:, :C] of twice the channels
        return torch.randn(n, 2 * c, h, w, generator=gen).to(dt)[:, :c]
    if layout == "cl_channel_slice":
        big = torch.randn(n, 2 * c, h, w, generator=gen).to(dt)
        return big.contiguous(memory_format=torch.channels_last)[:, :c]
    if layout == "every_other_column":  # x[..., ::2] of twice the width
        return torch.randn(n, c, h, 2 * w, generator=gen).to(dt)[..., ::2]
    raise ValueError(layout)


Call = Callable[[], object]


def prepare(case: Case) -> Tuple[Call, torch.Tensor, float, Dict[str, Call]]:
    """The op's call, the tensor whose clone is the floor, bytes moved / clone's bytes, and
    what is timed beside it: a training step's parts and its own floor ("floor")."""
    gen = torch.Generator().manual_seed(0)
    x = view_of(case.shape, case.dtype, case.layout, gen)
    C = case.shape[1]
    w, b = torch.randn(C, generator=gen), torch.randn(C, generator=gen)
    m, v = torch.randn(C, generator=gen), torch.rand(C, generator=gen) + 0.5
    eps = 1e-5
    if case.pass_ == "step":
        return prepare_step(x, w, b, m, v, eps, gen)
    if case.kind == "bn":
        if case.pass_ == "forward":
            return (lambda: ops.frozen_bn(x, w, b, m, v, eps)), x, 1.0, {}
        scale = ops.frozen_bn(x, w, b, m, v, eps)[1]
        return (lambda: ops.frozen_bn_backward(x, scale)), x, 1.0, {}
    act_name = case.kind.split("+")[1]
    act, residual = ACTIVATIONS[act_name], case.kind.endswith("+residual")
    r = view_of(case.shape, case.dtype, case.layout, gen) if residual else None
    preact = act_name == "silu"  # the training forward keeps what SiLU's backward needs
    if case.pass_ == "forward":
        moved = 2 + residual + preact  # read x (and r), write out (and the pre-activation)
        return (lambda: ops.frozen_bn_act(x, r, w, b, m, v, eps, act, preact)), x, moved / 2, {}
    out, scale, pre = ops.frozen_bn_act(x, r, w, b, m, v, eps, act, preact)
    saved = pre if preact else out
    g = torch.randn(out.shape, generator=gen).to(out.dtype).contiguous(
        memory_format=torch.channels_last if case.layout == "channels_last" else
        torch.contiguous_format)
    moved = 3 + residual  # read grad and saved, write grad_input (and the residual's)
    return (lambda: ops.frozen_bn_act_backward(g, saved, scale, act, residual)), x, moved / 2, {}


def prepare_step(x, w, b, m, v, eps, gen) -> Tuple[Call, torch.Tensor, float, Dict[str, Call]]:
    """A training step as the benchmark times it, its floor (two copies) and its parts."""
    bn = FrozenBatchNorm2d(x.shape[1], eps)
    for name, t in (("weight", w), ("bias", b), ("running_mean", m), ("running_var", v)):
        getattr(bn, name).copy_(t)
    xg = x.detach().clone().requires_grad_()
    g = torch.empty_like(x).normal_(generator=gen)  # in x's layout

    def kernels() -> object:
        out, scale = ops.frozen_bn(x, w, b, m, v, eps)
        return out, ops.frozen_bn_backward(g, scale)
    parts = {"floor": lambda: (x.clone(), g.clone()), "kernels": kernels,
             "engine": lambda: torch.autograd.grad(xg.clone(), xg, g)}
    return (lambda: torch.autograd.grad(bn(xg), xg, g)), x, 2.0, parts


def make_cases(shapes, dtypes, fused_layouts, views, kinds, passes=PASSES) -> List[Case]:
    cases = []
    for name in shapes:
        shape = SHAPES[name]
        for dtype in dtypes:
            for pass_ in passes:
                if pass_ == "step":  # frozen_bn's training step, on the dense layouts
                    if "bn" in kinds:
                        cases += [Case(name, shape, dtype, layout, "bn", pass_)
                                  for layout in fused_layouts]
                    continue
                for layout in fused_layouts:
                    cases += [Case(name, shape, dtype, layout, k, pass_) for k in kinds]
                cases += [Case(name, shape, dtype, view, "bn", pass_) for view in views]
    return cases


def run(cases: Sequence[Case], rounds: int, min_run_time: float, retries: int) -> List[Dict]:
    timer = CpuTimer(min_run_time)
    out = []
    for i, case in enumerate(cases):
        call, x, bytes_ratio, parts = prepare(case)
        samplers = {"clone": timer.prepare(lambda: x.clone()), "op": timer.prepare(call),
                    **{name: timer.prepare(f) for name, f in parts.items()}}
        stats, load = timed_rounds(samplers, rounds, retries)
        floor = stats["floor"].median if "floor" in parts else stats["clone"].median * bytes_ratio
        ratio = stats["op"].median / floor
        row = {**asdict(case), "tensor_bytes": x.numel() * x.element_size(),
               "bytes_vs_clone": bytes_ratio, "op": stats["op"].as_dict(),
               "clone": stats["clone"].as_dict(), "x_floor": ratio, "foreign_load": load,
               "busy": load is not None and load > BUSY_LOAD}
        if parts:
            row.update({name: stats[name].as_dict() for name in parts})
            row["kernels_x_floor"] = stats["kernels"].median / floor
            row["engine_s"] = stats["engine"].median - stats["clone"].median
        out.append(row)
        print(f"[{i + 1}/{len(cases)}] {case.label}: {fmt_ratio(ratio)}{busy_mark(row)}",
              file=sys.stderr, flush=True)
    return out


def summarize(rows: Sequence[Dict]) -> List[List[str]]:
    """Per kind, pass, dtype and layout: geometric mean over shapes of x floor (range, worst
    shape); busy cases left out."""
    groups: Dict[tuple, List[Dict]] = defaultdict(list)
    for r in rows:
        if not r["busy"]:
            groups[(r["kind"], r["pass_"], r["dtype"], r["layout"])].append(r)
    out = []
    for (kind, pass_, dtype, layout), rs in groups.items():
        ratios = [r["x_floor"] for r in rs]
        worst = max(rs, key=lambda r: r["x_floor"])
        out.append([kind, pass_, dtype, layout, fmt_ratio(geomean(ratios)),
                    f"{min(ratios):.2f}-{max(ratios):.2f}", worst["shape_name"],
                    str(sum(ratio > 1.25 for ratio in ratios))])
    return out


def busy_mark(row: Dict) -> str:
    """" (busy)" after the figures of a case timed while other processes kept the CPU busy."""
    return " (busy)" if row["busy"] else ""


def busy_note(rows: Sequence[Dict]) -> str:
    """A line saying how many cases the summary leaves out as timed on a busy machine."""
    busy = sum(r["busy"] for r in rows)
    return (f"{busy} of {len(rows)} cases were timed while other processes kept the CPU busy: "
            "left out of the summary, marked (busy) case by case." if busy else "")


def step_table(rows: Sequence[Dict]) -> str:
    """The training steps and their parts, case by case."""
    return table(["shape", "dtype", "layout", "step", "floor", "x floor",
                  "kernels x floor", "engine", "engine / floor"],
                 [[f"{r['shape_name']} {shape_str(r['shape'])}", r["dtype"], r["layout"],
                   fmt_time(r["op"]["median"]), fmt_time(r["floor"]["median"]),
                   fmt_ratio(r["x_floor"]) + busy_mark(r),
                   fmt_ratio(r["kernels_x_floor"]) + busy_mark(r),
                   fmt_time(r["engine_s"]) + busy_mark(r),
                   f"{r['engine_s'] / r['floor']['median']:.2f}"]
                  for r in rows if r["pass_"] == "step"], markdown=True)


def write(out_dir: Path, meta: Dict, rows: Sequence[Dict]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "kernels.json").write_text(json.dumps({"metadata": meta, "cases": rows},
                                                     indent=1) + "\n")
    summary = table(["kind", "pass", "dtype", "layout", "x floor (geomean)", "range", "worst",
                     "> 1.25x"], summarize(rows), markdown=True)
    per_case = table(["shape", "dtype", "layout", "kind", "pass", "op", "clone", "floor bytes",
                      "x floor"],
                     [[f"{r['shape_name']} {shape_str(r['shape'])}", r["dtype"], r["layout"],
                       r["kind"], r["pass_"], fmt_time(r["op"]["median"]),
                       fmt_time(r["clone"]["median"]), f"{r['bytes_vs_clone']:g}x clone",
                       fmt_ratio(r["x_floor"]) + busy_mark(r)]
                      for r in rows], markdown=True)
    load = meta["load_average"], meta["load_average_end"]
    note = provenance_note(meta)
    (out_dir / "kernels.md").write_text(
        f"# frozennorm CPU kernels: fused epilogues and strided views\n\n"
        + (f"{note}\n\n" if note else "")
        + f"{meta['cpu_model']}, {meta['torch_threads']} torch threads, torch {meta['torch']}, "
        f"CPU kernels' capability {meta['capability']}; commit {meta['git']}; {meta['date']}; "
        f"load average {load[0]} at the start, {load[1]} at the end; {meta['elapsed_s']} s.\n\n"
        f"`{meta['command']}`\n\n"
        "x floor: op time / (x.clone() time x the bytes the op moves over clone's), "
        "timed in the same interleaved rounds. step: a training step (the module's forward and "
        "torch.autograd.grad to the input) against (x.clone(), grad.clone()); kernels: "
        "frozen_bn then frozen_bn_backward called directly, against the same floor; engine: "
        "torch.autograd.grad through x.clone() less x.clone().\n\n"
        f"## Summary (geometric mean over shapes)\n\n{summary}\n\n"
        + (f"{busy_note(rows)}\n\n" if busy_note(rows) else "")
        + f"## Per case\n\n{per_case}\n"
        + (f"\n## Training steps and their parts\n\n{step_table(rows)}\n"
           if any(r["pass_"] == "step" for r in rows) else ""))


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default=",".join(DEFAULT_SHAPES),
                   help=f"comma list of presets (default: {','.join(DEFAULT_SHAPES)})")
    p.add_argument("--dtype", default="float32,bfloat16,float16")
    p.add_argument("--layout", default="nchw,channels_last", help="layouts of the fused cases")
    p.add_argument("--views", default=",".join(VIEWS), help="strided views (frozen_bn), or ''")
    p.add_argument("--kinds", default="bn,bn+relu,bn+relu6,bn+silu,bn+relu+residual,"
                                      "bn+silu+residual",
                   help="cases on the dense layouts: bn (frozen_bn alone) and fused ones, or ''")
    p.add_argument("--passes", default=",".join(PASSES),
                   help="forward, backward, step (a training step of frozen_bn and its parts)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--min-run-time", type=float, default=0.05)
    p.add_argument("--busy-retries", type=int, default=2)
    p.add_argument("--threads", type=int)
    p.add_argument("--out", type=Path)
    p.add_argument("--allow-dirty", action="store_true",
                   help="write into benchmarks/results/ from uncommitted changes or a stale "
                        "build (refused otherwise; the results say so at the top)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    split = lambda s: [t for t in s.split(",") if t]  # noqa: E731
    cases = make_cases(split(args.shape), split(args.dtype), split(args.layout),
                       split(args.views), split(args.kinds), split(args.passes))
    start = time.monotonic()
    settings = {"cpu_malloc": configure_cpu_malloc("keep"), "rounds": args.repeat,
                "min_run_time": args.min_run_time, "busy_retries": args.busy_retries}
    argv_used = list(sys.argv[1:] if argv is None else argv)
    meta = metadata("cpu", "python benchmarks/cpu_kernels.py " + shlex.join(argv_used), settings)
    meta["capability"] = ops._cpu_capability()
    if args.out:
        check_provenance(meta, args.out, args.allow_dirty)
    rows = run(cases, args.repeat, args.min_run_time, args.busy_retries)
    meta["elapsed_s"] = round(time.monotonic() - start, 1)
    meta["load_average_end"] = load_average()
    print(table(["kind", "pass", "dtype", "layout", "x floor", "range", "worst", "> 1.25x"],
                summarize(rows)))
    if busy_note(rows):
        print(busy_note(rows))
    if args.out:
        write(args.out, meta, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
