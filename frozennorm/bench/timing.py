"""Timing: contenders interleaved round-robin, ``torch.utils.benchmark`` on CPU, CUDA events
(with warm-up, synchronisation and an L2 flush for small tensors) on GPU."""
from __future__ import annotations

import logging
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Protocol, TextIO, Tuple, TypeVar

import torch


def _import_benchmark():
    """torch.utils.benchmark, without the warning its import of torch.utils.cpp_extension
    logs where a CUDA build of torch has no GPU ("No CUDA runtime is found, using
    CUDA_HOME=..."): it concerns compiling extensions, not this benchmark."""
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils import benchmark as module
    finally:
        log.setLevel(level)
    return module


benchmark = _import_benchmark()

#: Takes the samples of one round: per-call seconds.
Sampler = Callable[[], List[float]]
T = TypeVar("T")


@dataclass
class Stats:
    """Per-call time in seconds over all samples of all rounds."""

    median: float
    p25: float
    p75: float
    min: float
    max: float
    samples: int
    round_medians: List[float]

    @classmethod
    def of(cls, samples: List[float], round_medians: List[float]) -> "Stats":
        qs = statistics.quantiles(samples, n=4, method="inclusive") if len(samples) > 1 \
            else [samples[0]] * 3
        return cls(median=statistics.median(samples), p25=qs[0], p75=qs[2], min=min(samples),
                   max=max(samples), samples=len(samples), round_medians=round_medians)

    @property
    def spread(self) -> float:
        """Half the interquartile range, relative to the median."""
        return (self.p75 - self.p25) / (2 * self.median) if self.median > 0 else math.nan

    def as_dict(self) -> Dict[str, object]:
        return {**asdict(self), "spread": self.spread}


class Timer(Protocol):
    def prepare(self, fn: Callable[[], object], flush: bool = False,
                number: Optional[int] = None) -> Sampler:
        """Warms ``fn`` up and returns what takes one round of its samples."""
        ...


class CpuTimer:
    """Blocks of ``torch.utils.benchmark.Timer`` on all of torch's threads.

    A block runs the call ``number`` times (calibrated once so that a block lasts about
    ``block_time``, at least one call); a round takes blocks until ``min_run_time`` seconds.
    """

    def __init__(self, min_run_time: float, block_time: float = 0.01) -> None:
        self.min_run_time = min_run_time
        self.block_time = block_time

    def prepare(self, fn: Callable[[], object], flush: bool = False,
                number: Optional[int] = None) -> Sampler:
        """``number``: calls per block when known (1 for calls far longer than a block)."""
        del flush  # CPU caches are not flushed: what a layer sees in a real network varies
        timer = benchmark.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        if number is None:
            number = 1
            while True:
                total = _block(timer, number)
                if total >= self.block_time / 10 or number >= 1 << 20:
                    break
                number *= 10
            number = max(1, round(number * self.block_time / total))

        def sample() -> List[float]:
            out: List[float] = []
            spent = 0.0
            while spent < self.min_run_time or not out:
                total = _block(timer, number)
                out.append(total / number)
                spent += total
            return out

        return sample


def _block(timer: benchmark.Timer, number: int) -> float:
    """Seconds for ``number`` calls. (``Timer.timeit`` would first make max(number // 100, 2)
    untimed calls, every block: three calls per sample of a slow op. Contenders are warmed
    up once, before their first block.)"""
    return timer._timeit(number)


class CudaTimer:
    """One CUDA event pair around each call, synchronised once per round.

    Before each timed call of a small workload a 256 MiB buffer is written, so that the
    call does not find its input in the L2 cache left there by the previous call.
    """

    FLUSH_BYTES = 256 * 1024 * 1024

    def __init__(self, min_run_time: float, device: str = "cuda", warmup: int = 3,
                 min_calls: int = 5, max_calls: int = 1000) -> None:
        self.min_run_time = min_run_time
        self.device = device
        self.warmup = warmup
        self.min_calls, self.max_calls = min_calls, max_calls
        self._flush_buf: Optional[torch.Tensor] = None

    def _flush(self) -> None:
        if self._flush_buf is None:
            self._flush_buf = torch.empty(self.FLUSH_BYTES, dtype=torch.uint8, device=self.device)
        self._flush_buf.zero_()

    def _timed(self, fn: Callable[[], object], calls: int, flush: bool) -> List[float]:
        events = []
        for _ in range(calls):
            if flush:
                self._flush()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize(self.device)
        return [start.elapsed_time(end) / 1e3 for start, end in events]

    def prepare(self, fn: Callable[[], object], flush: bool = False,
                number: Optional[int] = None) -> Sampler:
        del number  # each call is timed on its own
        estimate = statistics.median(self._timed(fn, self.warmup, flush))
        wanted = self.min_run_time / max(estimate, 1e-7)
        calls = int(min(self.max_calls, max(self.min_calls, wanted)))
        return lambda: self._timed(fn, calls, flush)


def l2_cache_bytes(device: str) -> int:
    """The GPU's L2 size (50 MB on an H100 when torch does not say)."""
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 50 * 1024 * 1024))


def _cpu_seconds() -> Optional[Tuple[float, float]]:
    """(CPU seconds all processes have been busy, CPU seconds this process has used),
    from Linux's /proc; None elsewhere."""
    try:
        total = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        mine = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, ValueError, IndexError):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    busy = sum(total) - total[3] - total[4]  # all but idle and iowait; steal counts as busy
    return busy / tick, sum(int(v) for v in mine[11:15]) / tick


def foreign_load(work: Callable[[], T]) -> Tuple[T, Optional[float]]:
    """Runs ``work``; also returns how many CPU cores other processes (and the hypervisor)
    kept busy meanwhile, on average (from scheduler ticks: ±0.05 over a second)."""
    before, start = _cpu_seconds(), time.monotonic()
    out = work()
    after, wall = _cpu_seconds(), time.monotonic() - start
    if before is None or after is None or wall <= 0:
        return out, None
    return out, max(0.0, (after[0] - before[0]) - (after[1] - before[1])) / wall


def interleave(samplers: Mapping[str, Sampler], rounds: int) -> Dict[str, Stats]:
    """Round-robin over the contenders, the starting one rotating each round, so that drift
    on a noisy machine hits all of them alike."""
    names = list(samplers)
    samples: Dict[str, List[float]] = {n: [] for n in names}
    medians: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(rounds):
        k = r % len(names) if names else 0
        for name in names[k:] + names[:k]:
            got = samplers[name]()
            samples[name].extend(got)
            medians[name].append(statistics.median(got))
    return {n: Stats.of(samples[n], medians[n]) for n in names}


class Progress:
    """A small progress bar on stderr (one line per step when stderr is not a terminal)."""

    def __init__(self, total: int, title: str, stream: Optional[TextIO] = None) -> None:
        self.total, self.title = total, title
        self.stream = stream or sys.stderr
        self.done = 0
        self.start = time.monotonic()
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def step(self, what: str) -> None:
        """Announces the step about to run."""
        elapsed = time.monotonic() - self.start
        eta = f", ~{elapsed / self.done * (self.total - self.done):.0f}s left" if self.done else ""
        if self.tty:
            width = 24
            filled = width * self.done // max(self.total, 1)
            bar = "#" * filled + "." * (width - filled)
            self.stream.write(f"\r\033[K{self.title} [{bar}] {self.done}/{self.total}{eta} {what}")
        else:
            self.stream.write(f"{self.title} [{self.done + 1}/{self.total}]{eta} {what}\n")
        self.stream.flush()
        self.done += 1

    def close(self) -> None:
        if self.tty:
            self.stream.write(f"\r\033[K{self.title}: {self.total} done in "
                              f"{time.monotonic() - self.start:.0f}s\n")
            self.stream.flush()


def make_timer(device: str, min_run_time: float) -> Timer:
    return CudaTimer(min_run_time, device) if device.startswith("cuda") else CpuTimer(min_run_time)


#: foreign load (CPU cores) above which CPU timings are retaken, when retries are allowed
BUSY_LOAD = 0.25


def timed_rounds(samplers: Mapping[str, Sampler], rounds: int, retries: int = 0
                 ) -> Tuple[Dict[str, Stats], Optional[float]]:
    """``interleave``, retaken (after a pause) up to ``retries`` times while other processes
    keep the CPU busy; returns the statistics and the foreign load of the last take."""
    attempt = 0
    while True:
        stats, load = foreign_load(lambda: interleave(samplers, rounds))
        if load is None or load <= BUSY_LOAD or attempt >= retries:
            return stats, load
        attempt += 1
        time.sleep(5.0 * attempt)


# --------------------------------------------------------------------------------------
# The CPU heap
# --------------------------------------------------------------------------------------

CPU_MALLOC = {
    "keep": "glibc heap told to keep freed memory (mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD "
            "2 GiB): each call's output reuses warm pages, as with a caching allocator "
            "(jemalloc, tcmalloc); timings measure the kernels, not page faults",
    "system": "the C library's default heap: large outputs come from fresh mmap'd pages on "
              "some calls and not on others, so large-tensor timings include page faults "
              "and vary from run to run",
}


def configure_cpu_malloc(mode: str) -> str:
    """Sets how glibc's malloc hands out large blocks (``keep`` or ``system``) and returns
    what the run used. Without glibc (or with another allocator preloaded in its place,
    which ignores ``mallopt``), nothing changes and the answer says so."""
    if mode not in CPU_MALLOC:
        raise ValueError(f"unknown --cpu-malloc {mode!r}: choose from {', '.join(CPU_MALLOC)}")
    if mode == "system":
        return CPU_MALLOC["system"]
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "the C library has no mallopt (not glibc): its default heap"
    m_trim_threshold, m_mmap_max = -1, -4
    ok = mallopt(m_mmap_max, 0) == 1 and mallopt(m_trim_threshold, 2**31 - 1) == 1  # a C int
    return CPU_MALLOC["keep"] if ok else "mallopt refused: the C library's default heap"
