"""Reporting: the stdout tables, results.json, results.md and PNG plots (matplotlib optional)."""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from .. import _loader
from .._sources import sources_digest
from .cases import Case, shape_str
from .contenders import LABELS, PEERS
from .end_to_end import MODELS, VARIANTS, E2ECase, E2EResult
from .memory import CPU_MEMORY_METHOD, CUDA_MEMORY_METHOD
from .op_level import OpResult
from .results import Result
from .timing import Stats

# --------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------


def fmt_time(seconds: Optional[float]) -> str:
    if seconds is None or math.isnan(seconds):
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale or unit == "us":
            value = seconds / scale
            return f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"
    return "-"


def fmt_bytes(n: Optional[int]) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"


def fmt_ratio(r: Optional[float], digits: int = 2) -> str:
    return "-" if r is None or math.isnan(r) else f"{r:.{digits}f}x"


def fmt_pct(p: Optional[float]) -> str:
    return "-" if p is None or math.isnan(p) else f"{100 * p:.0f}%"


def _time_cell(r: Result) -> str:
    """The median, marked when other processes loaded the CPU meanwhile."""
    return fmt_time(r.stats.median if r.stats else None) + (" (busy)" if r.busy else "")


def _spread(stats) -> str:
    return f"±{100 * stats.spread:.0f}%" if stats else "-"


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], markdown: bool = False) -> str:
    """A text table with aligned columns (text left, numbers right), or a markdown table."""
    rows = [list(map(str, r)) for r in rows]
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    numeric = [all(r[i][:1].isdigit() or r[i][:1] in "-±" for r in rows)
               for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if num else c.ljust(w)
                         for c, w, num in zip(cells, widths, numeric)).rstrip()
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


# --------------------------------------------------------------------------------------
# Op-level tables and ratios
# --------------------------------------------------------------------------------------

OP_HEADERS = ["shape", "dtype", "layout", "mode", "contender", "median", "spread", "GB/s",
              "x floor", "saved for bwd", "memory", "launches"]


def op_rows(results: Sequence[OpResult], launches: bool) -> List[List[str]]:
    """Rows of the full op-level table; the case is named on its first row only."""
    rows, last = [], None
    for r in results:
        c = r.case
        key = (c.shape_name, c.dtype, c.layout, c.mode)
        head = [f"{c.shape_name} {shape_str(c.shape)}", c.dtype, c.layout, c.mode] \
            if key != last else ["", "", "", ""]
        last = key
        if r.stats is None:
            rows.append(head + [r.label, r.status, (r.error or "")[:60]] + [""] * 5)
            continue
        count = str(r.launches) if launches and r.launches is not None else "n/a"
        rows.append(head + [r.label, _time_cell(r), _spread(r.stats), f"{r.gbps:.1f}",
                            fmt_ratio(r.x_floor), fmt_bytes(r.saved_bytes),
                            fmt_bytes(r.memory_bytes), count])
    return rows


def by_case(results: Sequence[OpResult]) -> Dict[tuple, Dict[str, OpResult]]:
    out: Dict[tuple, Dict[str, OpResult]] = defaultdict(dict)
    for r in results:
        out[(r.case.shape_name, r.case.dtype, r.case.layout, r.case.mode)][r.name] = r
    return out


def speedup(mine: OpResult, peer: Optional[OpResult]) -> Optional[float]:
    """peer time / frozennorm time: above 1, frozennorm is faster."""
    if peer is None or peer.stats is None or mine.stats is None:
        return None
    return peer.stats.median / mine.stats.median


def geomean(values: Sequence[float]) -> Optional[float]:
    return math.exp(statistics.fmean(math.log(v) for v in values)) if values else None


#: Inputs at least this large are "large tensors": past the caches, bandwidth-bound.
LARGE_BYTES = 16 << 20


def summary(results: Sequence[OpResult], min_bytes: int = 0) -> List[Dict[str, object]]:
    """Per dtype, layout and mode: geometric mean (and range) over shapes (those whose input
    has at least ``min_bytes``) of frozennorm's time relative to the floor and of each
    peer's time relative to frozennorm's; ``busy``: how many of the ``shapes`` were timed
    while other processes kept the CPU busy (kept, and marked in the tables)."""
    groups: Dict[Tuple[str, str, str], Dict[str, List[float]]] = defaultdict(
        lambda: defaultdict(list))
    busy: Dict[Tuple[str, str, str], List[bool]] = defaultdict(list)
    for (_, dtype, layout, mode), rs in by_case(results).items():
        mine = rs.get("frozennorm")
        if mine is None or mine.stats is None or mine.case.tensor_bytes < min_bytes:
            continue
        busy[(dtype, layout, mode)].append(mine.busy)
        g = groups[(dtype, layout, mode)]
        if mine.x_floor:
            g["x_floor"].append(mine.x_floor)
        for peer in PEERS:
            s = speedup(mine, rs.get(peer))
            if s:
                g[peer].append(s)
    out = []
    for (dtype, layout, mode), g in groups.items():
        flags = busy[(dtype, layout, mode)]
        row: Dict[str, object] = {"dtype": dtype, "layout": layout, "mode": mode,
                                  "shapes": len(flags), "busy": sum(flags)}
        for key, vals in g.items():
            row[key] = {"geomean": geomean(vals), "min": min(vals), "max": max(vals),
                        "n": len(vals)}
        out.append(row)
    return out


def _ratio_cell(entry: Optional[Dict[str, float]]) -> str:
    if not entry:
        return "-"
    if entry["n"] == 1:
        return fmt_ratio(entry["geomean"])
    return f"{fmt_ratio(entry['geomean'])} ({entry['min']:.2f}-{entry['max']:.2f})"


SUMMARY_HEADERS = ["dtype", "layout", "mode", "frozennorm x floor"] + [
    f"vs {LABELS[p]}" for p in PEERS] + ["timed busy"]


def _busy_cell(row: Dict[str, object]) -> str:
    """How many shapes of a summary row were timed on a busy machine (older results.json
    files, which left those out, have no count)."""
    if not row.get("busy"):
        return "-"
    return f"{row['busy']} of {row['shapes']} shapes"


def summary_rows(rows: Sequence[Dict[str, object]]) -> List[List[str]]:
    return [[r["dtype"], r["layout"], r["mode"], _ratio_cell(r.get("x_floor"))]
            + [_ratio_cell(r.get(p)) for p in PEERS] + [_busy_cell(r)] for r in rows]


def headline_rows(results: Sequence[OpResult]) -> List[List[str]]:
    """Per case: frozennorm's time, its ratio to the floor, each peer's time / frozennorm's."""
    rows = []
    for (name, dtype, layout, mode), rs in by_case(results).items():
        mine = rs.get("frozennorm")
        if mine is None or mine.stats is None:
            continue
        rows.append([f"{name} {shape_str(mine.case.shape)}", dtype, layout, mode,
                     _time_cell(mine), fmt_ratio(mine.x_floor)]
                    + [fmt_ratio(speedup(mine, rs.get(p))) if rs.get(p) and rs[p].stats
                       else (rs[p].status if p in rs else "-") for p in PEERS])
    return rows


HEADLINE_HEADERS = ["shape", "dtype", "layout", "mode", "frozennorm", "x floor"] + [
    f"vs {LABELS[p]}" for p in PEERS]

# --------------------------------------------------------------------------------------
# End-to-end table
# --------------------------------------------------------------------------------------

E2E_HEADERS = ["model", "input", "dtype", "layout", "mode", "variant", "time/step", "spread",
               "x identity", "BN share", "saved for bwd", "memory"]


def e2e_rows(results: Sequence[E2EResult]) -> List[List[str]]:
    rows = []
    for r in results:
        c = r.case
        head = [MODELS[c.model][0], f"{c.batch}x3x{c.height}x{c.width}", c.dtype, c.layout,
                c.mode, r.label]
        if r.stats is None:
            rows.append(head + [r.status, (r.error or "")[:60]] + [""] * 4)
            continue
        rows.append(head + [_time_cell(r), _spread(r.stats), fmt_ratio(r.x_identity),
                            fmt_pct(r.bn_share) if r.name != "identity" else "-",
                            fmt_bytes(r.saved_bytes), fmt_bytes(r.memory_bytes)])
    return rows


# --------------------------------------------------------------------------------------
# Metadata, JSON, markdown
# --------------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> Optional[List[float]]:
    """1, 5 and 15 minute load averages: other work on the machine skews timings."""
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def _git(where: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True,
                          timeout=10, check=True).stdout.strip()


def source_state() -> Dict[str, object]:
    """The checkout's git commit (with ``-dirty`` when it has local changes), when the
    compiled extension was built, and ``provenance_problems``: why the numbers would not
    belong to that commit (uncommitted changes; an extension built from other ``csrc/``
    sources than the checkout's). An installed package (no checkout) has no commit to check."""
    package = Path(__file__).resolve().parent.parent
    state: Dict[str, object] = {"git": None, "extension_built": None}
    problems: List[str] = []
    try:
        # (the committed results themselves are not sources: one run rewriting them does
        # not make the next one's numbers belong to no commit)
        dirty = _git(package, "status", "--porcelain", "--untracked-files=no", "--", ":(top)",
                     ":(top,exclude)benchmarks/results")
        state["git"] = _git(package, "rev-parse", "--short", "HEAD") + ("-dirty" if dirty else "")
        if dirty:
            problems.append(f"the checkout has uncommitted changes (git status in "
                            f"{package.parent}): the numbers belong to no commit")
    except (OSError, subprocess.SubprocessError):
        pass
    built = sorted(package.glob("_C*.so")) + sorted(package.glob("_C*.pyd"))
    if built:
        stamp = datetime.fromtimestamp(built[0].stat().st_mtime, timezone.utc)
        state["extension_built"] = stamp.isoformat(timespec="seconds")
        recorded = (_loader.build_info() or {}).get("sources_digest")
        current = sources_digest(package.parent)
        if current is not None and recorded != current:
            problems.append(f"the compiled extension was built from other csrc/ sources than "
                            f"the checkout's (built from {recorded or 'an unrecorded state'}, "
                            f"checkout {current}): rebuild it "
                            f"(pip install --no-build-isolation -e .)")
    state["provenance_problems"] = problems
    return state


def provenance_note(meta: Dict[str, object]) -> str:
    """A loud first paragraph for results not made from a clean build of a commit ("" else)."""
    problems = meta.get("provenance_problems") or []
    if not problems:
        return ""
    return ("**NOT FROM A CLEAN BUILD OF A COMMIT** (" + str(meta.get("git")) + "): "
            + "; ".join(str(p) for p in problems) + ".")


def check_provenance(meta: Dict[str, object], out: Path, allow: bool) -> None:
    """Results written under the checkout's benchmarks/results/ (the committed ones) must come
    from a clean build of a commit: SystemExit naming the problems, unless ``allow`` (then,
    as for results written anywhere else, a warning; the results carry the problems in their
    metadata and a note at the top of their markdown)."""
    note = provenance_note(meta)
    if not note:
        return
    committed = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
    target = out.resolve()
    if not allow and (target == committed or committed in target.parents):
        raise SystemExit(
            f"refusing to write results into {committed}: {note} Commit, rebuild and rerun, "
            f"or pass --allow-dirty to write them marked as such.")
    print(f"warning: {note}", file=sys.stderr, flush=True)


def metadata(device: str, command: str, settings: Dict[str, object]) -> Dict[str, object]:
    """Where and with what the numbers were produced."""
    from .. import info

    try:
        import torchvision
        tv_version: Optional[str] = torchvision.__version__
    except ImportError:
        tv_version = None
    cuda = device.startswith("cuda")
    fn_info = info.collect()
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "device": device,
        "device_name": torch.cuda.get_device_name(device) if cuda else cpu_model(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torchvision": tv_version,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "load_average": load_average(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "frozennorm": fn_info["frozennorm"],
        "frozennorm_backend": fn_info["backend"],
        "frozennorm_info": fn_info,
        **source_state(),
        "timer": ("CUDA events around each call, synchronised per round, L2 flushed before "
                  "calls on small tensors" if cuda else
                  "torch.utils.benchmark.Timer.timeit blocks on all torch threads"),
        "memory_method": CUDA_MEMORY_METHOD if cuda else CPU_MEMORY_METHOD,
        "settings": settings,
    }


def write_json(path: Path, meta: Dict[str, object], ops: Sequence[OpResult],
               e2e: Sequence[E2EResult]) -> None:
    doc = {"metadata": meta, "summary": summary(ops), "summary_large": summary(ops, LARGE_BYTES),
           "op_level": [r.as_dict() for r in ops], "end_to_end": [r.as_dict() for r in e2e]}
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")


def _result_from(cls, case, d: Dict[str, object]):
    """A result back from its as_dict() form."""
    own = {f.name for f in dataclasses.fields(cls)} - {"case", "name", "stats"}
    t = d.get("time")
    stats = Stats(**{f.name: t[f.name] for f in dataclasses.fields(Stats)}) if t else None
    return cls(case, d[cls.NAME_KEY], stats=stats, **{k: d[k] for k in own if k in d})


def read_json(path: Path) -> Tuple[Dict[str, object], List[OpResult], List[E2EResult]]:
    """(metadata, op-level results, end-to-end results) of a results.json, to re-render."""
    doc = json.loads(path.read_text())
    ops = [_result_from(OpResult, Case(d["shape_name"], tuple(d["shape"]), d["dtype"],
                                       d["layout"], d["mode"]), d) for d in doc["op_level"]]
    e2e = [_result_from(E2EResult, E2ECase(**{f.name: d[f.name] for f in dataclasses.fields(E2ECase)
                                              if f.name in d}), d)
           for d in doc["end_to_end"]]
    return doc["metadata"], ops, e2e


def meta_line(meta: Dict[str, object]) -> str:
    cuda = f", CUDA {meta['cuda']}" if meta["device"] != "cpu" else ""
    return (f"{meta['device_name']} ({meta['device']}, {meta['torch_threads']} torch threads), "
            f"torch {meta['torch']}{cuda}, torchvision {meta['torchvision']}, frozennorm "
            f"{meta['frozennorm']} ({meta['frozennorm_backend']})")


METHOD_NOTE = """\
- Contenders of one case run interleaved: several rounds, each timing every contender in
  turn (the first one rotating), so drift on a noisy machine hits all alike. Median over
  all samples of all rounds; spread = half the interquartile range / median.
- `x floor`: time / time of `x.clone()` in the same rounds (training: `x.clone()` and
  `grad.clone()`), i.e. one ideal pass over memory. GB/s = bytes of that ideal pass
  (read input + write output, and read grad_output + write grad_input in training) / time.
- `vs X`: time of X / time of frozennorm (above 1: frozennorm is faster). Summary: geometric
  mean over shapes (min-max in brackets).
- training = forward + `torch.autograd.grad` to the input (affine parameters frozen);
  inference = forward under `no_grad`. `saved for bwd`: bytes of the tensors autograd keeps
  for the backward (`saved_tensors_hooks`, per storage).
- End to end: torchvision's Faster R-CNN ResNet-50-FPN backbone (body + FPN, trainable
  layers 3) or ResNet-50 body (stem + 4 stages), random BN statistics; training step =
  forward, sum of means of the output maps, backward, SGD; `x identity` = time / time of
  the same model with BN replaced by `nn.Identity` (the lower bound), BN share =
  (t - t_identity) / t. `frozennorm fuse/fold`: `convert_frozen_bn`, then for training
  `fuse(model)` (BN + activation + residual in one fused op), for inference
  `fold_frozen_bn(model)` (weights rewritten once). `torch.compile(...)`: default mode, compilation excluded (done in the warm-up
  call).
- `foreign_load` in results.json: CPU cores other processes kept busy while a case was
  timed (Linux /proc/stat); CPU timings above 0.25 are suspect: marked `(busy)` in the
  tables, counted in the summary's `timed busy` column and hatched in the plots
  (`--busy-retries N` retakes them)."""


def write_markdown(path: Path, meta: Dict[str, object], ops: Sequence[OpResult],
                   e2e: Sequence[E2EResult], plots: Sequence[str]) -> None:
    parts = [f"# frozennorm benchmark: {meta['device_name']}", ""]
    if provenance_note(meta):
        parts += [provenance_note(meta), ""]
    parts += [f"{meta_line(meta)}; commit {meta.get('git')}; {meta['date']}; load average "
              f"{meta['load_average']} at the start, {meta.get('load_average_end')} at the end; "
              f"{meta.get('elapsed_s')} s.", "", f"`{meta['command']}`", ""]
    if ops:
        parts += ["## Headline: frozennorm against each peer (geometric mean over shapes)", "",
                  table(SUMMARY_HEADERS, summary_rows(summary(ops)), markdown=True), ""]
        large = summary(ops, LARGE_BYTES)
        if large:
            parts += [f"### Large tensors: inputs of {LARGE_BYTES >> 20} MiB and more "
                      f"(bandwidth-bound)", "",
                      table(SUMMARY_HEADERS, summary_rows(large), markdown=True), ""]
    if e2e:
        parts += ["## End to end", "", table(E2E_HEADERS, e2e_rows(e2e), markdown=True), ""]
    if ops:
        parts += ["## Per shape", "", table(HEADLINE_HEADERS, headline_rows(ops), markdown=True),
                  "", "## All op-level measurements", "",
                  table(OP_HEADERS, op_rows(ops, meta["device"] != "cpu"), markdown=True), ""]
    if plots:
        parts += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    parts += ["## Method", "", METHOD_NOTE, "", f"- Timer: {meta['timer']}.",
              f"- Memory: {meta['memory_method']}.", ""]
    malloc = meta.get("settings", {}).get("cpu_malloc")
    if malloc:
        parts.insert(-1, f"- CPU heap: {malloc}.")
    path.write_text("\n".join(parts))


# --------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------

COLORS = {"frozennorm": "#d62728", "bn_eval": "#1f77b4", "torchvision": "#ff7f0e",
          "detectron2": "#2ca02c", "compiled_tv": "#9467bd", "identity": "#7f7f7f",
          "frozennorm_fold": "#8c0000", "compiled_frozennorm": "#e377c2",
          "bn_eval_affine": "#17becf", "frozennorm_affine": "#bcbd22",
          "frozennorm_affine_fuse": "#8c564b"}


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _bars(ax, groups: Sequence[str], series: Dict[str, List[Optional[Result]]],
          value: Callable[[Result], Optional[float]], rotation: int = 30) -> None:
    """Grouped bars: one group per x label, one bar per series (results without a value
    skipped); results timed on a busy machine hatched."""
    width = 0.8 / max(len(series), 1)
    for i, (name, results) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        bars = [(x, value(r), r.busy) for x, r in zip(xs, results)
                if r is not None and value(r) is not None]
        label = LABELS.get(name, VARIANTS.get(name, name))
        for busy in (False, True):
            some = [b for b in bars if b[2] == busy]
            if some:
                ax.bar([b[0] for b in some], [b[1] for b in some], width, color=COLORS.get(name),
                       label=None if busy and len(some) < len(bars) else label,
                       hatch="//" if busy else None, edgecolor="white" if busy else None)
    ax.set_xlim(-0.5, len(groups) - 0.5)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=rotation, ha="right" if rotation else "center",
                       fontsize=8)


def _ratio_ticks(ax) -> None:
    """Readable ticks on a log axis of ratios: 0.5x, 1x, 2x, 5x, ..."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    low, high = ax.get_ylim()
    ticks = [m * 10.0 ** e for e in range(-2, 5) for m in (1, 2, 5) if low <= m * 10.0 ** e <= high]
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _no_bars_note(ax) -> None:
    """Says why a panel is empty (every contender failed) instead of leaving it blank."""
    if not ax.get_legend_handles_labels()[0]:
        ax.text(0.5, 0.5, "no timings: every contender failed", transform=ax.transAxes,
                ha="center", va="center")


def _legend(fig, drawn: Sequence[Result]) -> int:
    """One legend entry per contender with a bar in any panel (plain, whether or not its
    bars are hatched), in rows that fit the figure's width; returns the number of rows."""
    from matplotlib.patches import Patch

    names = [n for n in LABELS if any(r.name == n for r in drawn)]
    if not names:
        return 0
    ncol = max(1, min(len(names), int(fig.get_figwidth() / 1.9)))
    fig.legend(handles=[Patch(facecolor=COLORS.get(n), label=LABELS[n]) for n in names],
               loc="lower center", ncol=ncol, fontsize=8)
    return math.ceil(len(names) / ncol)


def _busy_note(results: Sequence[Result]) -> str:
    return ("\n(hatched: timed while other processes kept the CPU busy, suspect)"
            if any(r.busy for r in results) else "")


def plot_op_level(plt, out_dir: Path, ops: Sequence[OpResult], device_name: str) -> List[str]:
    """One figure per dtype, a panel per mode and layout (side by side for a few shapes,
    stacked for many): time / floor per shape and contender."""
    files = []
    cases = by_case(ops)
    for dtype in dict.fromkeys(r.case.dtype for r in ops):
        mine = [r for r in ops if r.case.dtype == dtype]
        panels = list(itertools.product(dict.fromkeys(r.case.mode for r in mine),
                                        dict.fromkeys(r.case.layout for r in mine)))
        shapes = list(dict.fromkeys(r.case.shape_name for r in mine))
        dims = {r.case.shape_name: r.case.shape for r in mine}
        cols = 2 if len(shapes) <= 4 and len(panels) > 1 else 1
        rows = math.ceil(len(panels) / cols)
        fig, axes = plt.subplots(rows, cols, squeeze=False, sharey=True,
                                 figsize=(max(7.0, 1.1 * len(shapes) * cols + 2), 3.4 * rows + 0.8))
        for k, (mode, layout) in enumerate(panels):
            ax = axes[k // cols][k % cols]
            series = {name: [cases.get((s, dtype, layout, mode), {}).get(name) for s in shapes]
                      for name in LABELS if name != "clone"}
            _bars(ax, [f"{s}\n{shape_str(dims[s])}" for s in shapes], series,
                  lambda r: r.x_floor, rotation=0)
            ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
            _no_bars_note(ax)
            if ax.has_data():
                ax.set_yscale("log")
                _ratio_ticks(ax)
            ax.set_title(f"{mode}, {layout}", fontsize=10)
            ax.grid(axis="y", which="both", alpha=0.3)
            if k % cols == 0:
                ax.set_ylabel("time / x.clone() (lower is better)")
        for k in range(len(panels), rows * cols):
            axes[k // cols][k % cols].set_visible(False)
        legend_rows = _legend(fig, [r for r in mine if r.name != "clone" and
                                    r.x_floor is not None])
        fig.suptitle(f"frozennorm vs peers, {dtype}, {device_name} (dashed: x.clone() floor)"
                     + _busy_note(mine), fontsize=11)
        height = fig.get_figheight()
        title = 0.5 if _busy_note(mine) else 0.3  # inches for the title's lines
        fig.tight_layout(rect=(0, (0.2 + 0.25 * legend_rows) / height, 1, 1 - title / height))
        name = f"op_level_{dtype}.png"
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        files.append(name)
    return files


def plot_end_to_end(plt, out_dir: Path, e2e: Sequence[E2EResult], device_name: str) -> List[str]:
    """Time per step of each variant, one group per configuration and mode."""
    groups = list(dict.fromkeys(r.case.label for r in e2e))
    by = {(r.case.label, r.name): r for r in e2e}
    series = {v: [by.get((g, v)) for g in groups]
              for v in VARIANTS if any(r.name == v for r in e2e)}

    def ms(r: Result) -> Optional[float]:
        return r.stats.median * 1e3 if r.stats else None

    fig, ax = plt.subplots(figsize=(max(6.0, 2.2 * len(groups) + 2), 4.5))
    _bars(ax, groups, series, ms)
    for v_index, (v, results) in enumerate(series.items()):
        for g_index, r in enumerate(results):
            if r is not None and ms(r) is not None and r.bn_share is not None and v != "identity":
                x = g_index + (v_index - (len(series) - 1) / 2) * 0.8 / len(series)
                ax.annotate(f"{100 * r.bn_share:.0f}%", (x, ms(r)), ha="center", va="bottom",
                            fontsize=7)
    ax.set_ylabel("ms per call (lower is better)")
    ax.set_title(f"End to end, {device_name}\n(labels: BN share of the step)"
                 + _busy_note(e2e), fontsize=10)
    _no_bars_note(ax)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "end_to_end.png", dpi=110)
    plt.close(fig)
    return ["end_to_end.png"]


def write_plots(out_dir: Path, ops: Sequence[OpResult], e2e: Sequence[E2EResult],
                device_name: str) -> List[str]:
    """PNG files written (names relative to out_dir); none without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return []
    files = plot_op_level(plt, out_dir, ops, device_name) if ops else []
    if e2e:
        files += plot_end_to_end(plt, out_dir, e2e, device_name)
    return files
