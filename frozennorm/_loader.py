"""Loads the compiled ops (``frozennorm._C``), says what they were built for, and when they
cannot be used, why and what to do.

``FROZENNORM_BACKEND`` chooses the implementation:

* ``auto`` (default): the compiled ops when they load, else the pure-PyTorch fallback
  with a one-time warning naming the cause and the fix (see :func:`load_problem`);
* ``compiled``: the compiled ops, or an ImportError naming the cause and the fix;
* ``fallback``: the pure-PyTorch fallback, even when the compiled ops are installed.

The causes told apart: no extension was built into the imported tree; a source tree
without one shadows a compiled install; the extension was built for another torch; the
build is incomplete (one of frozennorm's own symbols is undefined); any other load error.
"""
from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

BACKEND_ENV = "FROZENNORM_BACKEND"
_PACKAGE_DIR = Path(__file__).resolve().parent


@dataclass
class LoadProblem:
    """Why the compiled ops are not in use: ``kind`` is one of ``not built``, ``shadowed``,
    ``torch mismatch``, ``broken build``, ``load failed``."""

    kind: str
    cause: str
    fix: str

    def __str__(self) -> str:
        return f"{self.cause} {self.fix}"


_problem: Optional[LoadProblem] = None


def load_problem() -> Optional[LoadProblem]:
    """Why the compiled ops are not in use (None when they are, or the fallback was asked for)."""
    return _problem


def fallback_reason() -> str:
    """What the fallback warning says: the cause and what to do."""
    return str(_problem) if _problem else "the compiled extension is not loaded."


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
    """Loads ``frozennorm._C`` (which registers the ops). False, with :func:`load_problem`
    saying why, when they cannot be used; with ``FROZENNORM_BACKEND=compiled`` that is an
    ImportError instead."""
    global _problem
    choice = requested_backend()
    if choice == "fallback":
        return False
    _problem = _load()
    if _problem is None:
        return True
    if choice == "compiled":
        raise ImportError(f"{BACKEND_ENV}=compiled, but the compiled ops cannot be used: "
                          f"{_problem}")
    return False


def _load() -> Optional[LoadProblem]:
    info = build_info()
    built_for = (info or {}).get("torch_version")
    if built_for and built_for != torch.__version__:
        return LoadProblem(
            "torch mismatch",
            f"frozennorm's compiled extension in {_PACKAGE_DIR} was built for torch "
            f"{built_for}, but torch {torch.__version__} is installed.",
            rebuild_hint(built_for))
    try:
        importlib.import_module("frozennorm._C")
    except ModuleNotFoundError as exc:
        if exc.name != "frozennorm._C":
            raise
        return _not_built()
    except (ImportError, OSError) as exc:
        return _diagnose(str(exc), built_for)
    return None


def _not_built() -> LoadProblem:
    elsewhere = compiled_elsewhere()
    if elsewhere is not None:
        return LoadProblem(
            "shadowed",
            f"frozennorm was imported from {_PACKAGE_DIR}, a source tree without the compiled "
            f"extension (_C), while a compiled frozennorm is installed in {elsewhere}: Python "
            f"found this tree first (the current directory or PYTHONPATH comes before "
            f"site-packages).",
            f"Build this tree in place (cd {_PACKAGE_DIR.parent} && pip install "
            f"--no-build-isolation -e .), or run from another directory to use the installed "
            f"build.")
    return LoadProblem(
        "not built",
        f"there is no compiled extension (_C) in {_PACKAGE_DIR}: frozennorm was installed or "
        f"checked out without building it.", rebuild_hint())


def _diagnose(message: str, built_for: Optional[str]) -> LoadProblem:
    """What a failed load of the extension means, from the loader's message."""
    where = f"frozennorm's compiled extension in {_PACKAGE_DIR}"
    undefined = re.search(r"undefined symbol: (\S+)", message)
    if undefined:
        symbol = undefined.group(1)
        name = demangle(symbol)
        if is_own_symbol(symbol):
            return LoadProblem(
                "broken build",
                f"{where} is incomplete: it calls {name}, one of frozennorm's own functions, "
                f"which the build left out (undefined symbol {symbol}). This is a bug in the "
                f"build, not a torch mismatch; please report it with the output of "
                f"`python -m frozennorm.info`.", rebuild_hint())
        if _is_torch_symbol(name):
            return LoadProblem(
                "torch mismatch",
                f"{where} needs {name} from torch, which the installed torch "
                f"{torch.__version__} ({Path(torch.__file__).parent}) does not have: it was "
                f"built against a different torch"
                + (f" (another build of {built_for})." if built_for else "."),
                rebuild_hint(built_for))
    missing_lib = re.search(r"(lib[\w.+-]*\.so[\d.]*): cannot open shared object file", message)
    if missing_lib and re.match(r"lib(torch|c10)", missing_lib.group(1)):
        return LoadProblem(
            "torch mismatch",
            f"{where} needs {missing_lib.group(1)}, which the installed torch "
            f"{torch.__version__} does not ship (a CUDA build of frozennorm with a CPU-only "
            f"torch?).", rebuild_hint(built_for))
    return LoadProblem("load failed", f"{where} failed to load: {message}.", rebuild_hint())


def is_own_symbol(symbol: str) -> bool:
    """A (mangled) symbol in frozennorm's own namespace."""
    return "10frozennorm" in symbol or symbol.startswith("frozennorm")


def _is_torch_symbol(name: str) -> bool:
    return re.match(r"(\W*\w+\s+)?(c10|at|torch|caffe2)::", name) is not None


def demangle(symbol: str) -> str:
    """The C++ name of a mangled symbol (the symbol itself without c++filt)."""
    tool = shutil.which("c++filt")
    if tool is None or not symbol.startswith("_Z"):
        return symbol
    try:
        out = subprocess.run([tool, symbol], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return symbol
    return out.stdout.strip() or symbol


def compiled_elsewhere() -> Optional[Path]:
    """Another frozennorm package with a compiled extension that this import shadows: on
    sys.path, or the checkout an editable install points to."""
    candidates: List[Path] = [Path(entry or os.getcwd()) / "frozennorm" for entry in sys.path]
    source = _installed_source()
    if source and source.get("editable") and source.get("path"):
        candidates.append(Path(source["path"]) / "frozennorm")
    for package in candidates:
        try:
            if package.resolve() == _PACKAGE_DIR or not package.is_dir():
                continue
        except OSError:
            continue
        if any((package / f"_C{suffix}").exists() for suffix in EXTENSION_SUFFIXES):
            return package.resolve()
    return None


def checkout_root() -> Optional[Path]:
    """The source checkout (or unpacked sdist) the imported package lives in, if it does."""
    root = _PACKAGE_DIR.parent
    return root if (root / "setup.py").is_file() and (root / "csrc").is_dir() else None


def install_source() -> Optional[Dict[str, Any]]:
    """Where the imported frozennorm was installed from (pip's direct_url.json): ``url``,
    ``kind`` (wheel, archive, directory or vcs), ``editable``, ``path``; None when unknown
    (an index, no record, or the installed distribution is not the imported package)."""
    source = _installed_source()
    if source is None or source["package"] != _PACKAGE_DIR:
        return None
    return source


def _installed_source() -> Optional[Dict[str, Any]]:
    """install_source() of the installed frozennorm distribution, with the ``package``
    folder it installed (whether or not that is the one imported)."""
    from importlib import metadata

    try:
        dist = metadata.distribution("frozennorm")
        text = dist.read_text("direct_url.json")
        record = json.loads(text) if text else None
    except (metadata.PackageNotFoundError, OSError, ValueError):
        return None
    if not record or "url" not in record:
        return None
    url = record["url"]
    path = url[len("file://"):] if url.startswith("file://") else None
    editable = bool(record.get("dir_info", {}).get("editable"))
    try:
        package = Path(path if editable and path else dist.locate_file(""), "frozennorm").resolve()
    except (OSError, TypeError):
        package = None
    source = {"kind": "directory", "url": url, "editable": editable, "path": path,
              "package": package}
    if "vcs_info" in record:
        vcs = record["vcs_info"]
        commit = vcs.get("commit_id")
        source.update(kind="vcs", url=f"{vcs.get('vcs', 'git')}+{url}"
                      + (f"@{commit}" if commit else ""), path=None)
    elif "archive_info" in record:
        source.update(kind="wheel" if url.endswith(".whl") else "archive")
    return source


def rebuild_hint(built_for: Optional[str] = None) -> str:
    """A command that rebuilds the extension against the installed torch, for where this
    frozennorm came from (a checkout, a directory, an sdist, a git URL, a wheel)."""
    reinstall = "pip install --no-build-isolation --no-deps --force-reinstall"
    checkout = checkout_root()
    if checkout is not None:
        return (f"Rebuild it against the installed torch: cd {checkout} && pip install "
                f"--no-build-isolation -e .")
    source = install_source()
    if source and source["kind"] == "wheel":
        return (f"This frozennorm came from the wheel {source['url']}"
                + (f", built for torch {built_for}: install that torch (pip install "
                   f"torch=={built_for.split('+')[0]}) or a frozennorm wheel built for yours."
                   if built_for else ": install a frozennorm wheel built for your torch."))
    if source and source.get("path") and not Path(source["path"]).exists():
        source = None  # a temporary file or folder pip installed from, long gone
    if source:
        return f"Rebuild it against the installed torch: {reinstall} {source['url']}"
    return (f"Rebuild it against the installed torch from its source (a checkout, an sdist "
            f"or a git URL): {reinstall} <source>")
