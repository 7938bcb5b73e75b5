"""The command line: what to run (quick default, ``--full``, filters), then the report."""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

from . import end_to_end, op_level, report
from .cases import (GROUPS, LAYOUTS, MODES, Case, QUICK_DTYPES, QUICK_SHAPES, SHAPES, make_cases,
                    parse_dims, parse_dtypes, parse_layouts, parse_modes, parse_shapes, shape_str)
from .contenders import CONTENDERS
from .timing import BUSY_LOAD, configure_cpu_malloc

EPILOG = """\
examples:
  python -m frozennorm.bench                         quick default (a few minutes on 2 CPU cores)
  python -m frozennorm.bench --full --out results/   the whole sweep, JSON + markdown + PNG plots
  python -m frozennorm.bench --shape det --dtype bf16 --layout channels_last --mode training
  python -m frozennorm.bench --e2e-only --e2e-size 2x800x1216
  python -m frozennorm.bench --e2e-only --e2e-model resnet50 --e2e-variants frozennorm,compiled_tv
"""


@dataclass
class Defaults:
    """What a run measures when no filter says otherwise."""

    shapes: List[str]
    dtypes: List[str]
    rounds: int
    min_run_time: float
    e2e_size: Tuple[int, int, int]
    e2e_dtypes: List[str]
    e2e_models: List[str]
    e2e_variants: List[str]


def defaults(full: bool, cuda: bool) -> Defaults:
    if full:
        return Defaults(shapes=["all"], dtypes=["float32", "bfloat16", "float16"], rounds=5,
                        min_run_time=0.1, e2e_size=(2, 800, 1216) if cuda else (1, 512, 512),
                        e2e_dtypes=["float32", "bfloat16"] if cuda else ["float32"],
                        e2e_models=list(end_to_end.MODELS), e2e_variants=list(end_to_end.VARIANTS))
    return Defaults(shapes=QUICK_SHAPES, dtypes=QUICK_DTYPES, rounds=3,
                    min_run_time=0.05 if cuda else 0.02,
                    e2e_size=(2, 800, 1216) if cuda else (1, 224, 224),
                    e2e_dtypes=["float32", "bfloat16"] if cuda else ["float32"],
                    e2e_models=["fpn"], e2e_variants=list(end_to_end.QUICK_VARIANTS))


def _csv(text: Optional[str]) -> Optional[List[str]]:
    return None if text is None else [t for t in text.split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m frozennorm.bench", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="frozennorm against nn.BatchNorm2d (eval), torchvision's FrozenBatchNorm2d, "
                    "the detectron2 way and torch.compile, with x.clone() as the floor; op level "
                    "and a ResNet-50-FPN backbone end to end. CUDA when present, else CPU.")
    p.add_argument("--full", action="store_true",
                   help="sweep every shape, dtype, layout and mode (default: a quick subset)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--dtype", help="comma list of float32, bfloat16, float16 (fp32, bf16, fp16)")
    p.add_argument("--layout", help="comma list of nchw, channels_last")
    p.add_argument("--shape", help="comma list of presets, groups (det, cls, small, all) or "
                                   "NxCxHxW; see --list-shapes")
    p.add_argument("--mode", help="comma list of inference (forward, no grad), training "
                                  "(forward + backward)")
    p.add_argument("--contenders", help=f"comma list of {', '.join(CONTENDERS)} (the floor, "
                                        "clone, is always measured)")
    only = p.add_mutually_exclusive_group()
    only.add_argument("--ops-only", action="store_true", help="skip the end-to-end benchmark")
    only.add_argument("--e2e-only", action="store_true", help="skip the op-level benchmark")
    p.add_argument("--e2e-size", help="end-to-end input NxHxW (default: 1x224x224 on CPU, "
                                      "1x512x512 with --full; 2x800x1216 on CUDA)")
    p.add_argument("--e2e-dtype", help="end-to-end dtypes (half ones by autocast; default "
                                       "float32 on CPU, float32,bfloat16 on CUDA)")
    p.add_argument("--e2e-layout", help="end-to-end layouts (default nchw)")
    p.add_argument("--e2e-mode", help="end-to-end modes (default: training,inference)")
    p.add_argument("--e2e-model", help="end-to-end models: fpn (Faster R-CNN ResNet-50-FPN "
                                       "backbone), resnet50 (ResNet-50 body) (default: fpn; "
                                       "both with --full)")
    p.add_argument("--e2e-variants",
                   help=f"end-to-end variants, comma list of {', '.join(end_to_end.VARIANTS)} "
                        f"(default: all but the torch.compile ones, which take minutes to "
                        f"compile on a small CPU; all with --full)")
    p.add_argument("--repeat", type=int,
                   help="interleaved rounds per case (default 3, 5 with --full)")
    p.add_argument("--min-run-time", type=float,
                   help="seconds per contender per round (default 0.02 on CPU, 0.05 on CUDA, "
                        "0.1 with --full)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--cpu-malloc", choices=["keep", "system"], default="keep",
                   help="CPU: keep (default: glibc keeps freed memory, so outputs reuse warm "
                        "pages and timings measure the kernels) or system (the default heap: "
                        "large-tensor timings include page faults)")
    p.add_argument("--busy-retries", type=int, default=0,
                   help="retake a case's timings up to N times while other processes keep "
                        "the CPU busy (Linux; default 0: only flag such cases)")
    p.add_argument("--out", type=Path,
                   help="write results.json, results.md and PNG plots here (default: a new "
                        "folder bench-results/DEVICE-quick|full-DATE-TIME)")
    p.add_argument("--allow-dirty", action="store_true",
                   help="write into benchmarks/results/ even from uncommitted changes or a "
                        "stale build (refused otherwise; the results say so at the top)")
    p.add_argument("--no-plots", action="store_true", help="no PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--list-shapes", action="store_true", help="list shape presets and groups")
    p.add_argument("--from-json", type=Path, metavar="RESULTS_JSON",
                   help="measure nothing: re-render the tables, results.md and plots of an "
                        "earlier results.json (into --out, default its folder)")
    return p


def pick_device(choice: str) -> str:
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {choice}: no usable CUDA device "
                         "(torch.cuda.is_available() is False)")
    return choice


def list_shapes() -> str:
    lines = [f"  {name:<10} {shape_str(shape)}" for name, shape in SHAPES.items()]
    lines += [f"  {name:<10} {', '.join(members)}" for name, members in GROUPS.items()]
    return ("presets and groups:\n" + "\n".join(lines)
            + f"\nquick default: {', '.join(QUICK_SHAPES)}")


def rough_minutes(cases: Sequence[Case], n_contenders: int, rounds: int, min_run_time: float,
                  cuda: bool) -> float:
    """A rough time estimate: per case a compilation, then per contender three untimed calls
    (warm-up, probes, calibration) and the rounds; a call's time guessed from its bytes."""
    bandwidth = 1e12 if cuda else 1.5e9  # effective bytes/s of a slow contender
    seconds = sum(1.0 + n_contenders * (3 * c.ideal_bytes / bandwidth
                                        + rounds * max(min_run_time, c.ideal_bytes / bandwidth))
                  for c in cases)
    return seconds / 60


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list_shapes:
        print(list_shapes())
        return 0
    if args.from_json:
        return _render(args.from_json, args.out or args.from_json.parent, not args.no_plots)
    try:
        plan = _plan(args)
    except ValueError as exc:  # a bad filter: say which
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return _run(args, plan, list(sys.argv[1:] if argv is None else argv))


@dataclass
class Plan:
    """What a run measures, from the command line and the defaults."""

    device: str
    rounds: int
    min_run_time: float
    contenders: List[str]
    cases: List[Case]
    e2e_cases: List[end_to_end.E2ECase]
    e2e_variants: List[str]

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")


def _plan(args: argparse.Namespace) -> Plan:
    """The run the arguments ask for; ValueError names a bad filter."""
    device = pick_device(args.device)
    d = defaults(args.full, device.startswith("cuda"))
    cases = [] if args.e2e_only else make_cases(
        parse_shapes(_csv(args.shape) or d.shapes), parse_dtypes(_csv(args.dtype) or d.dtypes),
        parse_layouts(_csv(args.layout) or list(LAYOUTS)),
        parse_modes(_csv(args.mode) or list(MODES)))
    return Plan(device=device, rounds=args.repeat or d.rounds,
                min_run_time=args.min_run_time if args.min_run_time is not None
                else d.min_run_time,
                contenders=_contenders(args.contenders), cases=cases,
                e2e_cases=[] if args.ops_only else _e2e_cases(args, d),
                e2e_variants=_e2e_variants(args.e2e_variants, d))


def default_out(device: str, full: bool) -> Path:
    """Where a run without --out writes: a new folder per run under ./bench-results/."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("bench-results") / f"{device.replace(':', '')}-{'full' if full else 'quick'}-{stamp}"


def _run(args: argparse.Namespace, plan: Plan, argv: List[str]) -> int:
    start = time.monotonic()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or default_out(plan.device, args.full)
    settings = {"full": args.full, "rounds": plan.rounds, "min_run_time": plan.min_run_time,
                "contenders": plan.contenders, "op_cases": len(plan.cases),
                "e2e_cases": len(plan.e2e_cases), "e2e_variants": plan.e2e_variants}
    if not plan.cuda:
        settings["cpu_malloc"] = configure_cpu_malloc(args.cpu_malloc)
    meta = report.metadata(plan.device, "python -m frozennorm.bench " + shlex.join(argv),
                           settings)
    print(f"frozennorm.bench: {report.meta_line(meta)}")
    report.check_provenance(meta, out, args.allow_dirty)
    _warn_fallback()
    load = meta["load_average"]
    if not plan.cuda and load and load[0] > 0.5 * (os.cpu_count() or 1):
        print(f"warning: the machine is busy (load average {load[0]} on {os.cpu_count()} CPUs): "
              f"CPU timings will be slow and noisy; cases timed while other processes keep "
              f"the CPU busy are marked (busy)", file=sys.stderr)
    minutes = rough_minutes(plan.cases, len(plan.contenders), plan.rounds, plan.min_run_time,
                            plan.cuda)
    print(f"{len(plan.cases)} op-level cases x {len(plan.contenders)} contenders, "
          f"{len(plan.e2e_cases)} end-to-end configurations; {plan.rounds} interleaved rounds "
          f"of >= {plan.min_run_time:g} s (rough estimate: {minutes:.0f} min for the op level); "
          f"results go to {out}/", flush=True)

    progress, retries = not args.no_progress, args.busy_retries
    ops = op_level.run(plan.cases, plan.device, plan.rounds, plan.min_run_time,
                       plan.contenders, progress, retries) if plan.cases else []
    e2e = end_to_end.run(plan.e2e_cases, plan.device, plan.rounds, plan.min_run_time,
                         plan.e2e_variants, progress=progress,
                         retries=retries) if plan.e2e_cases else []
    _print_tables(ops, e2e, plan.cuda)
    _warn_busy(ops, e2e)
    meta["elapsed_s"] = round(time.monotonic() - start, 1)
    meta["load_average_end"] = report.load_average()
    _write(out, meta, ops, e2e, plots=not args.no_plots)
    print(f"\nfinished in {meta['elapsed_s']:.0f} s")
    return 0


def _warn_fallback() -> None:
    """Says loudly when the numbers will not be the compiled kernels'."""
    from .. import _loader, ops

    if not ops.COMPILED:
        print(f"warning: frozennorm runs its pure-PyTorch fallback here, not the compiled "
              f"kernels, so its numbers below are the fallback's: {_loader.fallback_reason()}",
              file=sys.stderr, flush=True)


def _render(path: Path, out: Path, plots: bool) -> int:
    meta, ops, e2e = report.read_json(path)
    _print_tables(ops, e2e, str(meta["device"]).startswith("cuda"))
    _write(out, meta, ops, e2e, plots)
    return 0


def _print_tables(ops, e2e, cuda: bool) -> None:
    if ops:
        print("\nOp level (x floor: time / x.clone(); saved for bwd: bytes autograd keeps)")
        print(report.table(report.OP_HEADERS, report.op_rows(ops, cuda)), flush=True)
    if e2e:
        print("\nEnd to end (x identity: time / time with BN removed; BN share = "
              "(t - t_identity) / t)")
        print(report.table(report.E2E_HEADERS, report.e2e_rows(e2e)))
    if ops:
        print("\nSummary: frozennorm x floor, and time of each peer / time of frozennorm "
              "(geometric mean over shapes, min-max)")
        print(report.table(report.SUMMARY_HEADERS, report.summary_rows(report.summary(ops))))
        large = report.summary(ops, report.LARGE_BYTES)
        if large:
            print(f"\nThe same over inputs of {report.LARGE_BYTES >> 20} MiB and more")
            print(report.table(report.SUMMARY_HEADERS, report.summary_rows(large)))


def _warn_busy(ops, e2e) -> None:
    busy = {r.case for r in [*ops, *e2e] if r.busy}
    if busy:
        print(f"\nwarning: other processes kept the CPU busy while {len(busy)} case(s) were "
              f"timed (foreign_load > {BUSY_LOAD} cores in results.json); their timings are "
              f"suspect: marked (busy) in the tables and counted in the summary's 'timed busy' "
              f"column (--busy-retries N retakes them)", file=sys.stderr)


def _contenders(text: Optional[str]) -> List[str]:
    """The requested contenders, the floor first (always measured)."""
    names = ["clone"] + [c for c in (_csv(text) or CONTENDERS) if c != "clone"]
    unknown = [c for c in names if c not in CONTENDERS]
    if unknown:
        raise ValueError(f"unknown contender(s) {', '.join(unknown)}: choose from "
                         f"{', '.join(CONTENDERS)}")
    return names


def _e2e_cases(args: argparse.Namespace, d: Defaults) -> List[end_to_end.E2ECase]:
    batch, height, width = parse_dims(args.e2e_size, ndim=3) if args.e2e_size else d.e2e_size
    dtypes = parse_dtypes(_csv(args.e2e_dtype) or d.e2e_dtypes)
    layouts = parse_layouts(_csv(args.e2e_layout) or ["nchw"])
    modes = parse_modes(_csv(args.e2e_mode) or ["training", "inference"])
    models = _csv(args.e2e_model) or d.e2e_models
    unknown = [m for m in models if m not in end_to_end.MODELS]
    if unknown:
        raise ValueError(f"unknown --e2e-model {', '.join(unknown)}: choose from "
                         f"{', '.join(end_to_end.MODELS)}")
    return [end_to_end.E2ECase(batch, height, width, dt, lay, mode, model)
            for model in models for dt in dtypes for lay in layouts for mode in modes]


def _e2e_variants(text: Optional[str], d: Defaults) -> List[str]:
    """The end-to-end variants, in table order; the lower bound (identity) always runs."""
    asked = set(_csv(text) or d.e2e_variants) | {"identity"}
    unknown = sorted(asked - set(end_to_end.VARIANTS))
    if unknown:
        raise ValueError(f"unknown --e2e-variants {', '.join(unknown)}: choose from "
                         f"{', '.join(end_to_end.VARIANTS)}")
    return [v for v in end_to_end.VARIANTS if v in asked]


def _write(out: Path, meta, ops, e2e, plots: bool) -> None:
    """results.json first (the measurements are never lost), then the plots, each of which
    may fail on its own without stopping the rest, then results.md."""
    out.mkdir(parents=True, exist_ok=True)
    report.write_json(out / "results.json", meta, ops, e2e)
    files = []
    if plots:
        try:
            files = report.write_plots(out, ops, e2e, str(meta["device_name"]))
        except Exception as exc:  # noqa: BLE001 - a drawing problem must not lose the results
            print(f"warning: the plots could not be drawn ({type(exc).__name__}: {exc}); the "
                  f"tables are in results.md", file=sys.stderr)
        else:
            if not files:
                print("(no plots: matplotlib is not installed; pip install 'frozennorm[bench]')")
    report.write_markdown(out / "results.md", meta, ops, e2e, files)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}"
          + "".join(f", {out / f}" for f in files))
