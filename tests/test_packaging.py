"""Packaging: what the build needs and produces (sdist contents, build isolation, the
library's glibc needs, license metadata)."""
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from frozennorm import _loader, ops

ROOT = Path(__file__).resolve().parents[1]
in_checkout = pytest.mark.skipif(
    not (ROOT / "setup.py").is_file() or not (ROOT / ".git").exists(),
    reason="needs the source checkout")


def _tracked(*folders):
    out = subprocess.run(["git", "-C", str(ROOT), "ls-files", *folders], capture_output=True,
                         text=True, check=True).stdout
    return set(out.split())


@in_checkout
def test_sdist_holds_every_source_and_test_file(tmp_path):
    """The sdist builds and tests anywhere: every header, CUDA source and test helper is in
    it, whatever the machine that made it can build."""
    pytest.importorskip("setuptools")
    r = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, USE_CUDA="0", FORCE_CUDA="0"))
    assert r.returncode == 0, r.stderr[-3000:]
    (sdist,) = tmp_path.glob("frozennorm-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    wanted = _tracked("csrc", "tests", "frozennorm", "examples") | {
        "LICENSE", "README.md", "pyproject.toml", "setup.py", "MANIFEST.in"}
    assert not wanted - names, sorted(wanted - names)
    assert not {n for n in names if n.endswith((".so", ".pyc", "_build_info.json"))}


@in_checkout
def test_build_without_the_users_torch_stops_at_once():
    """An isolated build (pip's default) cannot import the user's torch: setup.py stops before
    anything is compiled or fetched, saying to use --no-build-isolation."""
    code = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = ['setup.py', 'egg_info']; "
            "runpy.run_path('setup.py', run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0
    assert "pip install --no-build-isolation" in r.stderr and "isolated" in r.stderr
    assert "Traceback" not in r.stderr


@in_checkout
def test_torch_is_not_a_build_requirement():
    """Listing torch in build-system.requires makes pip's isolated build fetch the newest
    torch and install an extension that cannot load with the user's."""
    try:
        import tomllib
    except ImportError:
        pytest.skip("tomllib needs Python 3.11")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert not [r for r in project["build-system"]["requires"] if r.startswith("torch")]
    assert project["project"]["license"] == "BSD-3-Clause"
    assert "Copyright (c) 2026, frozennorm contributors" in (ROOT / "LICENSE").read_text()


def _needed(library):
    """The shared libraries ``library`` names (DT_NEEDED)."""
    out = subprocess.run(["objdump", "-p", str(library)], capture_output=True, text=True,
                         check=True).stdout
    return re.findall(r"^\s*NEEDED\s+(\S+)", out, re.MULTILINE)


needs_objdump = pytest.mark.skipif(
    not sys.platform.startswith("linux") or shutil.which("objdump") is None,
    reason="needs objdump on Linux")


def _max_version(library, family):
    out = subprocess.run(["objdump", "-T", str(library)], capture_output=True, text=True,
                         check=True).stdout
    versions = re.findall(rf"\b{family}_([0-9.]+)", out)
    return max((tuple(int(p) for p in v.split(".")) for v in versions), default=())


@needs_objdump
def test_library_needs_no_newer_glibc_than_torch():
    """Whatever glibc builds it, the extension needs no symbol version newer than torch's
    own library does (e.g. exp@GLIBC_2.29, __libc_single_threaded@GLIBC_2.32): it runs
    wherever torch does, and a release wheel keeps the manylinux tag of torch's wheel."""
    if not ops.COMPILED:
        pytest.skip("the compiled extension is not installed")
    (library,) = _loader._PACKAGE_DIR.glob("_C*.so")
    torch_lib = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    for family in ("GLIBC", "GLIBCXX", "CXXABI", "GCC"):
        assert _max_version(library, family) <= _max_version(torch_lib, family), family


# What a manylinux wheel may leave to the system (PEP 600: the C and C++ runtimes), besides
# what the torch wheel brings; auditwheel would copy anything else into a release wheel.
SYSTEM_LIBRARIES = {"libc.so.6", "libm.so.6", "libdl.so.2", "librt.so.1", "libpthread.so.0",
                    "libstdc++.so.6", "libgcc_s.so.1"}


@needs_objdump
def test_library_needs_only_the_system_runtime_and_torchs_libraries():
    """Every shared library the extension links is the C/C++ runtime, or one that the torch
    wheel ships (torch/lib, torch.libs) or depends on (the nvidia-* wheels, e.g. libcudart):
    a release wheel then carries the extension alone (.ci/build_wheel.sh refuses to copy
    libraries in)."""
    if not ops.COMPILED:
        pytest.skip("the compiled extension is not installed")
    (library,) = _loader._PACKAGE_DIR.glob("_C*.so")
    needed = _needed(library)
    site = Path(torch.__file__).parent.parent
    torchs = {n for n in needed if [p for folder in ("torch/lib", "torch.libs", "nvidia/*/lib")
                                    for p in site.glob(f"{folder}/{n}")]}
    others = set(needed) - torchs - SYSTEM_LIBRARIES
    others = {n for n in others if not n.startswith("ld-linux")}
    assert not others, f"{library.name} needs {sorted(others)}, neither the system's nor torch's"
    assert {"libc10.so", "libtorch_cpu.so"} <= torchs, needed


@needs_objdump
def test_library_shares_torchs_openmp_runtime():
    """The CPU kernels' at::parallel_for runs on the OpenMP runtime torch has loaded, whose
    threads torch.set_num_threads sets: the library links the libgomp torch's libtorch_cpu
    links, by its name (libgomp-<hash>.so.1.0.0 in torch's aarch64 wheels), not the compiler's
    libgomp.so.1 (a second runtime from the system, if there is one)."""
    if not ops.COMPILED:
        pytest.skip("the compiled extension is not installed")
    (library,) = _loader._PACKAGE_DIR.glob("_C*.so")
    torch_lib = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    mine = {n for n in _needed(library) if "omp" in n}
    assert mine <= {n for n in _needed(torch_lib) if "omp" in n}, mine
