"""``python -m frozennorm.info``: what frozennorm was built with and what runs here."""
from __future__ import annotations

import platform
import sys
from typing import Any, Dict

import torch


def collect() -> Dict[str, Any]:
    """Build configuration, active backend and GPU availability, as a dict."""
    from . import __version__, _loader
    from . import ops

    info = _loader.build_info() or {}
    gpu = torch.cuda.is_available()
    with_cuda = bool(info.get("with_cuda")) and ops.COMPILED
    if not ops.COMPILED:
        backend = "fallback (pure PyTorch)"
    elif gpu and with_cuda:
        backend = "compiled CUDA (and compiled CPU)"
    else:
        backend = "compiled CPU" + (" (CUDA kernels built, no usable GPU)" if with_cuda else "")
    return {
        "frozennorm": __version__,
        "backend": backend,
        "requested backend": _loader.requested_backend(),
        "built for torch": info.get("torch_version", "n/a (not compiled)"),
        "built with CUDA kernels": bool(info.get("with_cuda")),
        "built with nvcc": info.get("nvcc_version") or "n/a",
        "built for CUDA archs": info.get("cuda_arch_list") or "n/a",
        "torch": torch.__version__,
        "torch CUDA": torch.version.cuda or "none (CPU build)",
        "GPU usable": gpu,
        "GPU": torch.cuda.get_device_name(0) if gpu else "none",
        "CPU threads": torch.get_num_threads(),
        "CPU kernels' threads": _cpu_kernel_threads(),
        "CPU capability": torch.backends.cpu.get_cpu_capability(),
        "CPU kernels' build": torch.ops.frozennorm._cpu_capability() if ops.COMPILED else "n/a",
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


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
