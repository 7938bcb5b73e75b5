"""``python -m frozennorm.info``: what frozennorm was built with, what runs here, and when
the compiled kernels cannot be used, why and what to do. It never fails on a bad build: it
is the command to run when something is wrong."""
from __future__ import annotations

import platform
import sys
from typing import Any, Callable, Dict

import torch


def _safe(get: Callable[[], Any]) -> Any:
    """A value, or the error that getting it raised (info must print, not fail)."""
    try:
        return get()
    except Exception as exc:  # noqa: BLE001 - reported as the value
        return f"unknown ({type(exc).__name__}: {exc})"


def collect() -> Dict[str, Any]:
    """Build configuration, active backend, load problem and GPU availability, as a dict."""
    from . import __version__, _loader
    from . import ops

    info = _loader.build_info() or {}
    problem = _loader.load_problem()
    gpu = _safe(torch.cuda.is_available) is True
    with_cuda = bool(info.get("with_cuda")) and ops.COMPILED
    if not ops.COMPILED:
        backend = "fallback (pure PyTorch)"
    elif gpu and with_cuda:
        backend = "compiled CUDA (and compiled CPU)"
    else:
        backend = "compiled CPU" + (" (CUDA kernels built, no usable GPU)" if with_cuda else "")
    out = {
        "frozennorm": __version__,
        "imported from": str(_loader._PACKAGE_DIR),
        "backend": backend,
        "requested backend": _safe(_loader.requested_backend),
    }
    if problem is not None:
        out["why not compiled"] = f"{problem.kind}: {problem.cause}"
        out["what to do"] = problem.fix
    out.update({
        "built for torch": info.get("torch_version", "n/a (not compiled)"),
        "built with CUDA kernels": _cuda_kernels(info),
        "built with nvcc": info.get("nvcc_version") or "n/a",
        "built for CUDA archs": info.get("cuda_arch_list") or "n/a",
        "torch": torch.__version__,
        "torch CUDA": torch.version.cuda or "none (CPU build)",
        "GPU usable": gpu,
        "GPU": _safe(lambda: torch.cuda.get_device_name(0)) if gpu else "none",
        "CPU threads": torch.get_num_threads(),
        "CPU kernels' threads": _safe(_cpu_kernel_threads),
        "CPU capability": _safe(torch.backends.cpu.get_cpu_capability),
        "CPU kernels' build": _safe(lambda: torch.ops.frozennorm._cpu_capability()) if ops.COMPILED else "n/a",
        "python": platform.python_version(),
        "platform": platform.platform(),
    })
    return out


def _cuda_kernels(info: Dict[str, Any]) -> str:
    if not info:
        return "n/a (not compiled)"
    if info.get("with_cuda"):
        return "yes"
    reason = info.get("cuda_reason")
    return f"no ({reason})" if reason else "no"


def _cpu_kernel_threads() -> Any:
    """Threads the compiled CPU kernels' parallel loops actually use (n/a without them)."""
    from . import ops

    if not ops.COMPILED:
        return "n/a"
    from . import _C

    workers = getattr(_C, "parallel_workers", None)
    if workers is None:
        return "unknown (older build)"
    used = workers(1 << 20)
    wanted = torch.get_num_threads()
    return used if used == wanted else f"{used} of {wanted}: rebuild (the parallel backend's flags were missing)"


def main(argv=None) -> int:
    info = collect()
    width = max(len(k) for k in info)
    for key, value in info.items():
        print(f"{key:<{width}} : {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
