"""Memory and launch probes: bytes saved for backward, memory per call, CUDA kernels per call."""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch

CPU_MEMORY_METHOD = ("held after the forward: output + tensors saved for backward, counted "
                     "once per storage (CPU has no allocator statistics to take a peak from)")
CUDA_MEMORY_METHOD = ("peak: torch.cuda.max_memory_allocated() during one call minus "
                      "memory_allocated() before it")


def _add_storage(seen: Dict[int, int], t: torch.Tensor) -> None:
    storage = t.untyped_storage()
    seen[storage.data_ptr()] = storage.nbytes()


def forward_footprint(forward: Callable[[], object]) -> Tuple[int, int]:
    """(bytes saved for backward, bytes held: saved + outputs) of one forward.

    Saved tensors are seen through ``torch.autograd.graph.saved_tensors_hooks``; every
    count is per storage, so a tensor saved twice, or saved and returned, counts once.
    """
    saved: Dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        _add_storage(saved, t)
        # not `t` itself: a saved output packed as it is holds its own grad_fn, a cycle
        # through the graph that Python's collector cannot see (the forward's tensors lived
        # on); a detached alias keeps the storage without the graph
        return t.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    held = dict(saved)
    if isinstance(out, dict):
        out = list(out.values())
    for t in out if isinstance(out, (tuple, list)) else [out]:
        if isinstance(t, torch.Tensor):
            _add_storage(held, t)
    return sum(saved.values()), sum(held.values())


def cuda_peak_bytes(call: Callable[[], object], device: str) -> int:
    """Extra CUDA memory at the peak of one call."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    call()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def cuda_launches(call: Callable[[], object]) -> int:
    """GPU activities (kernels, memcpys, memsets) of one call, from torch.profiler."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA)
