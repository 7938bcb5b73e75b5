"""A digest of the C++/CUDA sources (``csrc/``): setup.py records the one the extension was
built from (``_build_info.json``), and the benchmarks compare it with the checkout's, so that
numbers are never credited to sources the library was not built from. Standard library only:
setup.py runs this file by path, before anything is built."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional, Union

SOURCE_SUFFIXES = (".h", ".cpp", ".cu", ".cuh")


def sources_digest(root: Union[str, Path]) -> Optional[str]:
    """SHA-256 (16 hex digits) of the names and contents of ``root/csrc``'s C++/CUDA files;
    None where there is no ``csrc`` (an installed package)."""
    csrc = Path(root) / "csrc"
    if not csrc.is_dir():
        return None
    h = hashlib.sha256()
    for path in sorted(p for p in csrc.rglob("*") if p.suffix in SOURCE_SUFFIXES and p.is_file()):
        h.update(path.relative_to(csrc).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]
