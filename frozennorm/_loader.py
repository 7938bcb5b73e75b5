"""Loads the compiled ops (``frozennorm._C``) and says what they were built for.

``FROZENNORM_BACKEND`` chooses the implementation:

* ``auto`` (default): the compiled ops when the package was built with them, else the
  pure-PyTorch fallback with a one-time warning;
* ``compiled``: the compiled ops, or an ImportError saying why they are missing;
* ``fallback``: the pure-PyTorch fallback, even when the compiled ops are installed.
"""
from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any, Dict, Optional

import torch

BACKEND_ENV = "FROZENNORM_BACKEND"
_PACKAGE_DIR = Path(__file__).resolve().parent

REBUILD_HINT = (
    "Rebuild frozennorm against the installed torch: in a source checkout run "
    "`pip install --no-build-isolation -e .`, otherwise "
    "`pip install --no-build-isolation --no-deps --force-reinstall frozennorm` "
    "(--no-build-isolation makes the build use the torch you have)."
)


def build_info() -> Optional[Dict[str, Any]]:
    """What the compiled extension was built with (written by setup.py), or None."""
    path = _PACKAGE_DIR / "_build_info.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def requested_backend() -> str:
    choice = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if choice not in ("auto", "compiled", "fallback"):
        raise ImportError(
            f"{BACKEND_ENV}={choice!r} is not one of 'auto', 'compiled', 'fallback'")
    return choice


def load_compiled() -> bool:
    """Loads ``frozennorm._C`` (which registers the ops); False if it was not built.

    Raises ImportError, with what to do, when the extension exists but was built for
    another torch or fails to load.
    """
    choice = requested_backend()
    if choice == "fallback":
        return False
    info = build_info()
    if info is not None and info.get("torch_version") != torch.__version__:
        raise ImportError(
            f"frozennorm's compiled extension was built for torch {info.get('torch_version')}, "
            f"but torch {torch.__version__} is installed. {REBUILD_HINT} "
            f"(Or set {BACKEND_ENV}=fallback to run the pure-PyTorch implementation.)")
    try:
        importlib.import_module("frozennorm._C")
    except ModuleNotFoundError as e:
        if e.name != "frozennorm._C":
            raise
        if choice == "compiled":
            raise ImportError(
                f"{BACKEND_ENV}=compiled, but frozennorm was installed without its compiled "
                f"extension. {REBUILD_HINT}") from e
        return False
    except (ImportError, OSError) as e:
        raise ImportError(
            f"frozennorm's compiled extension failed to load: {e}. This usually means it was "
            f"built against a different torch than the installed {torch.__version__}. "
            f"{REBUILD_HINT}") from e
    return True
