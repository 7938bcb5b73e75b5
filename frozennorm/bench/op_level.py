"""Op level: every contender on each case, interleaved; time, GB/s, ratio to the floor,
bytes saved for backward, memory, and on CUDA the kernels per call."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from .cases import Case
from .contenders import BUILDERS, forward_of, harness, reference_bn
from .contenders import LABELS as CONTENDER_LABELS
from .memory import cuda_launches, cuda_peak_bytes, forward_footprint
from .results import Result
from .timing import Progress, Sampler, Timer, l2_cache_bytes, make_timer, timed_rounds


@dataclass
class OpResult(Result):
    """One contender (``name``) on one op-level case."""

    out_dtype: Optional[str] = None
    launches: Optional[int] = None
    x_floor: Optional[float] = None
    gbps: Optional[float] = None

    LABELS = CONTENDER_LABELS
    NAME_KEY = "contender"

    def as_dict(self) -> Dict[str, object]:
        return {**super().as_dict(), "shape": list(self.case.shape),
                "ideal_bytes": self.case.ideal_bytes}


def _prepare(result: OpResult, x: torch.Tensor, grad: torch.Tensor, device: str,
             timer: Timer, flush: bool) -> Optional[Sampler]:
    """Builds, warms up (compiles) and probes one contender; None if it cannot run."""
    case = result.case
    try:
        module = BUILDERS[result.name](reference_bn(case.shape[1], device))
        call = harness(module, x, grad, case.mode)
        call()
        forward = forward_of(module, x, case.mode)
        result.out_dtype = str(forward().dtype).replace("torch.", "")
        saved, held = forward_footprint(forward)
        result.saved_bytes = saved if case.mode == "training" else None
        result.memory_bytes = held
        if device.startswith("cuda"):
            result.memory_bytes = cuda_peak_bytes(call, device)
            result.launches = cuda_launches(call)
        return timer.prepare(call, flush=flush)
    except Exception as exc:  # record and go on: one contender must not end the sweep
        result.failed(exc)
        return None


def run_case(case: Case, device: str, timer: Timer, rounds: int, contenders: Sequence[str],
             l2_bytes: int = 0, retries: int = 0) -> List[OpResult]:
    """All contenders on one case, timed in the same interleaved rounds (retaken up to
    ``retries`` times while other processes load the CPU)."""
    torch.manual_seed(0)
    x = case.make_input(device)
    grad = torch.randn_like(x)
    if case.mode == "training":
        x.requires_grad_()
    flush = case.ideal_bytes < 4 * l2_bytes
    results = [OpResult(case, name) for name in contenders]
    samplers = {}
    for result in results:
        sampler = _prepare(result, x, grad, device, timer, flush)
        if sampler is not None:
            samplers[result.name] = sampler
    stats, load = timed_rounds(samplers, rounds, retries)
    floor = stats.get("clone")
    for result in results:
        result.foreign_load = load
        st = stats.get(result.name)
        if st is None:
            continue
        result.stats = st
        result.gbps = case.ideal_bytes / st.median / 1e9
        result.x_floor = st.median / floor.median if floor else None
    return results


def run(cases: Sequence[Case], device: str, rounds: int, min_run_time: float,
        contenders: Sequence[str], progress: bool = True, retries: int = 0) -> List[OpResult]:
    """Every case in turn (the contenders of one case interleaved)."""
    timer = make_timer(device, min_run_time)
    l2 = l2_cache_bytes(device) if device.startswith("cuda") else 0
    bar = Progress(len(cases), "op level") if progress else None
    out: List[OpResult] = []
    for case in cases:
        if bar:
            bar.step(case.label)
        out.extend(run_case(case, device, timer, rounds, contenders, l2, retries))
    if bar:
        bar.close()
    return out
