"""What a measurement yields, common to the op-level and end-to-end benchmarks."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Dict, Optional

from .timing import BUSY_LOAD, Stats


def status_of(exc: BaseException) -> str:
    """unsupported when the library says it does not implement this, unavailable when a
    package is missing, else error."""
    text = str(exc).lower()
    if isinstance(exc, NotImplementedError) or "not implemented" in text or "unsupported" in text:
        return "unsupported"
    return "unavailable" if isinstance(exc, ImportError) else "error"


@dataclass
class Result:
    """One contender on one case. ``status``: ok, unsupported, unavailable or error (then
    ``error`` says what was raised)."""

    case: Any
    name: str
    status: str = "ok"
    error: Optional[str] = None
    stats: Optional[Stats] = None
    #: CPU cores other processes kept busy while this case was timed (Linux only)
    foreign_load: Optional[float] = None
    #: bytes autograd keeps for the backward (training only)
    saved_bytes: Optional[int] = None
    #: CUDA: peak memory of one call; CPU: output + saved tensors (see memory.py)
    memory_bytes: Optional[int] = None

    #: display names of the contenders, and the JSON key that holds ``name``
    LABELS: ClassVar[Dict[str, str]] = {}
    NAME_KEY: ClassVar[str] = "name"

    @property
    def label(self) -> str:
        return self.LABELS[self.name]

    @property
    def busy(self) -> bool:
        """Timed while other processes kept the CPU busy: suspect, left out of summaries."""
        return self.foreign_load is not None and self.foreign_load > BUSY_LOAD

    def failed(self, exc: BaseException) -> None:
        lines = str(exc).strip().splitlines()
        self.status = status_of(exc)
        self.error = f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]

    def as_dict(self) -> Dict[str, object]:
        out: Dict[str, object] = {self.NAME_KEY: self.name, "label": self.label}
        out.update(asdict(self.case))
        out.update((k, v) for k, v in asdict(self).items() if k not in ("case", "name", "stats"))
        out["time"] = self.stats.as_dict() if self.stats else None
        return out
