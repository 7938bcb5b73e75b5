"""Training with trainable affine parameters (CPU, or CUDA with --device cuda): a frozen BatchNorm whose weight and
bias require grad (mmdet's ``norm_eval=True, requires_grad=True``), forward + backward to
the input, weight and bias, side by side with the only peer and with the fully frozen op:

    affine     frozennorm.frozen_batch_norm(x, mean, var, weight, bias), weight and bias
               nn.Parameters: the fused forward, then frozen_bn_affine_backward (one pass
               for the input's gradient and the per-channel sums of weight's and bias's)
    batchnorm  nn.BatchNorm2d in eval() with trainable weight and bias (float32 parameters,
               the input in its dtype, as under autocast)
    frozen     the same frozen_batch_norm with weight and bias plain tensors: the fully
               frozen module's forward + backward to the input alone

Each is ``torch.autograd.grad`` of the output (with a random gradient in the input's layout)
to everything that requires grad, timed in interleaved rounds with the benchmark's timer,
heap setting and busy-machine retries, in --passes sweeps over all cases (each case's
figures: the medians over the sweeps). Targets (issue 24): affine at or below batchnorm on
every shape, and within 1.5x of frozen.

    python benchmarks/affine_backward.py --out benchmarks/results/cpu/affine
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from collections import defaultdict
from statistics import median
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

import frozennorm
from frozennorm.bench.cases import DTYPES, LAYOUTS, SHAPES, shape_str
from frozennorm.bench.memory import forward_footprint
from frozennorm.bench.report import (check_provenance, fmt_ratio, fmt_time, geomean, load_average,
                                     metadata, provenance_note, table)
from frozennorm.bench.timing import BUSY_LOAD, configure_cpu_malloc, make_timer, timed_rounds

#: the benchmark's presets of at least 1 MB in float16/bfloat16 (as benchmarks/cpu_kernels.py)
DEFAULT_SHAPES = [n for n, s in SHAPES.items() if math.prod(s) * 2 >= 1 << 20]
CONTENDERS = ("affine", "batchnorm", "frozen")
#: affine / batchnorm at most 1, affine / frozen at most 1.5
TARGETS = {"batchnorm": 1.0, "frozen": 1.5}


def prepare(shape, dtype: str, layout: str, device: str = "cpu") -> Dict[str, Tuple[Callable, Callable]]:
    """The three contenders' (forward, training call: forward + backward) on one input."""
    gen = torch.Generator().manual_seed(0)
    C = shape[1]
    x = torch.randn(shape, generator=gen).to(device, DTYPES[dtype]).contiguous(
        memory_format=LAYOUTS[layout]).requires_grad_()
    g = torch.randn(shape, generator=gen).to(device, DTYPES[dtype]).contiguous(
        memory_format=LAYOUTS[layout])
    bn = torch.nn.BatchNorm2d(C).eval()
    with torch.no_grad():
        bn.weight.normal_(generator=gen)
        bn.bias.normal_(generator=gen)
        bn.running_mean.normal_(generator=gen)
        bn.running_var.uniform_(0.5, 2.0, generator=gen)
    bn.to(device)
    mean, var = bn.running_mean.clone(), bn.running_var.clone()
    weight = torch.nn.Parameter(bn.weight.detach().clone())
    bias = torch.nn.Parameter(bn.bias.detach().clone())
    w0, b0 = weight.detach().clone(), bias.detach().clone()
    forwards = {
        "affine": (lambda: frozennorm.frozen_batch_norm(x, mean, var, weight, bias),
                   (x, weight, bias)),
        "batchnorm": (lambda: bn(x), (x, bn.weight, bn.bias)),
        "frozen": (lambda: frozennorm.frozen_batch_norm(x, mean, var, w0, b0), (x,)),
    }
    return {name: (forward, lambda f=forward, i=inputs: torch.autograd.grad(f(), i, g))
            for name, (forward, inputs) in forwards.items()}


def time_case(name: str, dtype: str, layout: str, rounds: int, timer, retries: int,
              device: str) -> Dict:
    """One case timed once: each contender's statistics over interleaved rounds, the ratios
    from them, and the bytes each forward keeps for its backward."""
    calls = prepare(SHAPES[name], dtype, layout, device)
    saved = {k: forward_footprint(forward)[0] for k, (forward, _) in calls.items()}
    stats, load = timed_rounds({k: timer.prepare(step) for k, (_, step) in calls.items()},
                               rounds, retries)
    return {**{k: stats[k].as_dict() for k in calls}, "saved_bytes": saved,
            **{f"vs_{peer}": stats["affine"].median / stats[peer].median for peer in TARGETS},
            "foreign_load": load, "busy": load is not None and load > BUSY_LOAD}


def combine(name: str, dtype: str, layout: str, timings: Sequence[Dict]) -> Dict:
    """A case over its passes: the medians over the passes not timed while busy (all of them
    if every pass was) of each contender's median and of each ratio, the ratios' range over
    those passes, and every pass as measured."""
    quiet = [t for t in timings if not t["busy"]] or list(timings)
    row = {"shape_name": name, "shape": list(SHAPES[name]), "dtype": dtype, "layout": layout}
    for k in CONTENDERS:
        row[k] = {"median": median([t[k]["median"] for t in quiet])}
    for peer in TARGETS:
        ratios = [t[f"vs_{peer}"] for t in quiet]
        row[f"vs_{peer}"] = median(ratios)
        row[f"vs_{peer}_range"] = [min(ratios), max(ratios)]
    row["saved_bytes"] = timings[0]["saved_bytes"]
    row["busy"] = all(t["busy"] for t in timings)
    row["passes_used"] = len(quiet)
    row["passes"] = list(timings)
    return row


def run(shapes: Sequence[str], dtypes: Sequence[str], layouts: Sequence[str], rounds: int,
        min_run_time: float, retries: int, device: str = "cpu", passes: int = 3) -> List[Dict]:
    """Every case timed in each of `passes` sweeps over all cases (so that a case's timings
    come from minutes apart, not from one window of a second: on a shared VM the ratios
    themselves move with the memory bandwidth left to it), then combined per case."""
    timer = make_timer(device, min_run_time)
    cases = [(s, d, l) for s in shapes for d in dtypes for l in layouts]
    timings: Dict[tuple, List[Dict]] = defaultdict(list)
    for sweep in range(passes):
        for i, case in enumerate(cases):
            t = time_case(*case, rounds, timer, retries, device)
            timings[case].append(t)
            print(f"[pass {sweep + 1}/{passes}, {i + 1}/{len(cases)}] {' '.join(case)}: affine "
                  f"{fmt_time(t['affine']['median'])}, x batchnorm {fmt_ratio(t['vs_batchnorm'])}, "
                  f"x frozen {fmt_ratio(t['vs_frozen'])}{busy_mark(t)}", file=sys.stderr,
                  flush=True)
    return [combine(*case, timings[case]) for case in cases]


def busy_mark(row: Dict) -> str:
    """" (busy)" after the figures of a case timed while other processes kept the CPU busy."""
    return " (busy)" if row["busy"] else ""


def ratio_cell(row: Dict, peer: str) -> str:
    """The median ratio to `peer`, with its range over the passes used where there were
    several."""
    low, high = row[f"vs_{peer}_range"]
    spread = f" ({low:.2f}-{high:.2f})" if row["passes_used"] > 1 else ""
    return fmt_ratio(row[f"vs_{peer}"]) + spread + busy_mark(row)


def summarize(rows: Sequence[Dict]) -> List[List[str]]:
    """Per dtype and layout: geometric means over shapes of affine / batchnorm and affine /
    frozen (range), and the shapes that miss a target; busy cases left out."""
    groups: Dict[tuple, List[Dict]] = defaultdict(list)
    for r in rows:
        if not r["busy"]:
            groups[(r["dtype"], r["layout"])].append(r)
    out = []
    for (dtype, layout), rs in groups.items():
        cells = [dtype, layout, str(len(rs))]
        for peer, target in TARGETS.items():
            ratios = [r[f"vs_{peer}"] for r in rs]
            missed = [r["shape_name"] for r in rs if r[f"vs_{peer}"] > target]
            cells += [fmt_ratio(geomean(ratios)), f"{min(ratios):.2f}-{max(ratios):.2f}",
                      ", ".join(missed) or "none"]
        out.append(cells)
    return out


SUMMARY_HEADERS = ["dtype", "layout", "shapes", "affine / batchnorm", "range",
                   "above 1.0x", "affine / frozen", "range", "above 1.5x"]


def busy_note(rows: Sequence[Dict]) -> str:
    busy = sum(r["busy"] for r in rows)
    return (f"{busy} of {len(rows)} cases were timed while other processes kept the CPU busy: "
            "left out of the summary, marked (busy) case by case." if busy else "")


def write(out_dir, meta: Dict, rows: Sequence[Dict]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "affine.json").write_text(json.dumps({"metadata": meta, "cases": rows},
                                                    indent=1) + "\n")
    per_case = table(["shape", "dtype", "layout", "affine", "batchnorm", "frozen",
                      "affine / batchnorm", "affine / frozen",
                      "saved for backward (MB): affine / batchnorm / frozen"],
                     [[f"{r['shape_name']} {shape_str(r['shape'])}", r["dtype"], r["layout"],
                       fmt_time(r["affine"]["median"]), fmt_time(r["batchnorm"]["median"]),
                       fmt_time(r["frozen"]["median"]),
                       ratio_cell(r, "batchnorm"), ratio_cell(r, "frozen"),
                       " / ".join(f"{r['saved_bytes'][k] / 1e6:.1f}" for k in CONTENDERS)]
                      for r in rows], markdown=True)
    load = meta["load_average"], meta["load_average_end"]
    (out_dir / "affine.md").write_text(
        "# Trainable affine, frozen statistics: forward + backward on "
        f"{'the CPU' if meta['device'] == 'cpu' else meta['device_name']}\n\n"
        + (f"{provenance_note(meta)}\n\n" if provenance_note(meta) else "")
        + f"{meta['cpu_model']}, {meta['torch_threads']} torch threads, torch {meta['torch']}, "
        f"CPU kernels' capability {meta['capability']}; {meta['date']}; load average "
        f"{load[0]} at the start, {load[1]} at the end; {meta['elapsed_s']} s.\n\n"
        f"`{meta['command']}`\n\n"
        "Each contender: `torch.autograd.grad` of its output to everything that requires grad. "
        "affine: `frozennorm.frozen_batch_norm` with weight and bias `nn.Parameter`s (grads "
        "of x, weight, bias); batchnorm: `nn.BatchNorm2d` in `eval()` with trainable weight "
        "and bias (same grads); frozen: `frozen_batch_norm` with plain tensors (grad of x "
        "alone). Medians of interleaved rounds; with several passes (sweeps over all cases, "
        "minutes apart), times and ratios are the medians over the passes, each ratio with "
        "its range over them. Saved for backward: the tensors each forward "
        "keeps for its backward (`torch.autograd.graph.saved_tensors_hooks`, once per "
        "storage). Targets: affine / batchnorm <= 1, "
        "affine / frozen <= 1.5.\n\n"
        f"## Summary (geometric mean over shapes)\n\n"
        f"{table(SUMMARY_HEADERS, summarize(rows), markdown=True)}\n\n"
        + (f"{busy_note(rows)}\n\n" if busy_note(rows) else "")
        + f"## Per case\n\n{per_case}\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    from pathlib import Path

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default=",".join(DEFAULT_SHAPES),
                   help=f"comma list of presets (default: {','.join(DEFAULT_SHAPES)})")
    p.add_argument("--dtype", default="float32,bfloat16,float16")
    p.add_argument("--layout", default="nchw,channels_last")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--passes", type=int, default=3,
                   help="sweeps over all cases; each case's figures: medians over them")
    p.add_argument("--min-run-time", type=float, default=0.05)
    p.add_argument("--busy-retries", type=int, default=2)
    p.add_argument("--threads", type=int)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--out", type=Path)
    p.add_argument("--allow-dirty", action="store_true",
                   help="write into benchmarks/results/ from uncommitted changes (marked so)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    split = lambda s: [t for t in s.split(",") if t]  # noqa: E731
    start = time.monotonic()
    settings = {"cpu_malloc": configure_cpu_malloc("keep"), "rounds": args.repeat,
                "min_run_time": args.min_run_time, "busy_retries": args.busy_retries,
                "passes": args.passes}
    argv_used = list(sys.argv[1:] if argv is None else argv)
    meta = metadata(args.device, "python benchmarks/affine_backward.py " + shlex.join(argv_used),
                    settings)
    meta["capability"] = torch.ops.frozennorm._cpu_capability()
    if args.out:
        check_provenance(meta, args.out, args.allow_dirty)
    rows = run(split(args.shape), split(args.dtype), split(args.layout), args.repeat,
               args.min_run_time, args.busy_retries, args.device, args.passes)
    meta["elapsed_s"] = round(time.monotonic() - start, 1)
    meta["load_average_end"] = load_average()
    print(table(SUMMARY_HEADERS, summarize(rows)))
    if busy_note(rows):
        print(busy_note(rows))
    if args.out:
        write(args.out, meta, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
