"""Build of frozennorm's C++ (CPU) and CUDA extension, ``frozennorm._C``.

Install with ``pip install --no-build-isolation -e .`` (or without ``-e``) after torch: the
extension is compiled against the torch you have. (pip's default build isolation would hide
it, so the build stops at once, saying so, when it cannot import torch.)

What is built, torchvision's convention:
  * the C++ CPU kernels, always;
  * the CUDA kernels when torch is a CUDA build, a CUDA toolkit is found, and either a GPU
    is visible (built for its architecture) or they are asked for (FORCE_CUDA=1 or
    TORCH_CUDA_ARCH_LIST). Otherwise a CPU-only build, and one line says how to get them.

Environment switches:
  FORCE_CUDA=1            build the CUDA kernels even without a GPU (for the archs of
                          TORCH_CUDA_ARCH_LIST, else current ones), or fail saying why not
  TORCH_CUDA_ARCH_LIST    archs to compile for, e.g. "9.0" or "8.0;9.0+PTX" (also asks for
                          the CUDA kernels); default: the visible GPUs'
  USE_CUDA=0              no CUDA kernels
  MAX_JOBS                parallel compile jobs (with ninja)
  CUDA_HOME               the toolkit to use (found automatically otherwise, also when
                          `nvcc` on PATH is a wrapper script)
  DEBUG=1                 -O0 -g
  FROZENNORM_MAX_CPU_CAPABILITY=default|avx2|avx512|avx512_bf16
                          compile the CPU loops up to this capability only (default: every
                          build of the target; `default`: the baseline alone, a faster build)
Release wheels (.ci/build_wheel.sh sets these):
  FROZENNORM_LOCAL_VERSION  a local version label, e.g. pt2141cu130 -> 0.1.0+pt2141cu130
  FROZENNORM_PIN_TORCH=1    require exactly the torch the extension is compiled against

Object files are kept in build/ (also for editable installs), so a reinstall compiles only
what changed.
"""
import glob
import json
import os
import platform
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CUDA_LIBRARY_HEADERS = ("cublas_v2.h", "cusparse.h", "cusolverDn.h", "cufft.h", "curand.h")
MIN_SETUPTOOLS = 77  # SPDX license expressions in pyproject.toml
TORCH_REQUIREMENT = "torch>=2.4"


def log(msg):
    print(f"[frozennorm build] {msg}", file=sys.stderr, flush=True)


def env_flag(name):
    value = os.environ.get(name)
    if value is None:
        return None
    return value.strip().lower() not in ("0", "false", "no", "off", "")


def read_version():
    with open(os.path.join(ROOT, "frozennorm", "version.py")) as f:
        return re.search(r'__version__\s*=\s*"([^"]+)"', f.read()).group(1)


def sources_digest():
    """frozennorm/_sources.py's digest of csrc/, run by path (the package imports torch)."""
    import runpy

    return runpy.run_path(os.path.join(ROOT, "frozennorm", "_sources.py"))["sources_digest"](ROOT)


def full_version():
    """The package version, with FROZENNORM_LOCAL_VERSION as its local label (+...)."""
    label = os.environ.get("FROZENNORM_LOCAL_VERSION", "").strip()
    if label and not re.fullmatch(r"[a-z0-9]+(\.[a-z0-9]+)*", label):
        raise SystemExit(f"FROZENNORM_LOCAL_VERSION={label!r} is not a local version label "
                         f"(lowercase letters and digits, dot-separated)")
    return read_version() + (f"+{label}" if label else "")


def check_setuptools():
    import setuptools

    major = int(re.match(r"\d+", setuptools.__version__).group())
    if major < MIN_SETUPTOOLS:
        raise SystemExit(
            f"frozennorm's build needs setuptools >= {MIN_SETUPTOOLS} (this environment has "
            f"{setuptools.__version__}): pip install -U 'setuptools>={MIN_SETUPTOOLS}'")


ISOLATED_BUILD = """\
frozennorm is compiled against the torch you will run it with, and this build cannot see it
({detail}).
pip builds in an isolated environment by default, which hides the torch you installed.
Install torch first, then build without isolation:

    pip install --no-build-isolation -e .          (in a checkout of frozennorm)
    pip install --no-build-isolation <sdist or URL>
"""


def import_torch():
    """The installed torch; stops at once when the build cannot see the user's torch (an
    isolated build would compile against another one and install a broken extension)."""
    try:
        import torch
    except ImportError as exc:
        raise SystemExit(ISOLATED_BUILD.format(detail=f"import torch: {exc}"))
    where = os.path.dirname(os.path.abspath(torch.__file__))
    if "pip-build-env-" in where:  # torch fetched into pip's isolated build environment
        raise SystemExit(ISOLATED_BUILD.format(
            detail=f"it sees only the torch pip fetched into an isolated environment, {where}"))
    return torch


def is_elf(path):
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def nvcc_behind(path):
    """The real nvcc a wrapper script execs, or ``path`` itself when it is the binary."""
    path = os.path.realpath(path)
    if is_elf(path):
        return path
    try:
        with open(path, errors="ignore") as f:
            text = f.read(65536)
    except OSError:
        return None
    for candidate in re.findall(r"(/[^\s\"'$;|&]*?/bin/nvcc)\b", text):
        candidate = os.path.realpath(candidate)
        if candidate != path and is_elf(candidate):
            return candidate
    return None


def toolkit_ok(home):
    return bool(home) and is_elf(os.path.join(home, "bin", "nvcc")) and os.path.isfile(
        os.path.join(home, "include", "cuda_runtime.h"))


def find_cuda_home(torch_cuda):
    """A CUDA toolkit with a real nvcc binary and the runtime headers, or None."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    which = shutil.which("nvcc")
    if which:
        real = nvcc_behind(which)
        if real:
            candidates.append(os.path.dirname(os.path.dirname(real)))
    if torch_cuda:
        candidates.append(f"/usr/local/cuda-{torch_cuda}")
    candidates += ["/usr/local/cuda", "/opt/cuda", "/usr/lib/cuda"]
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for home in candidates:
        if home and toolkit_ok(os.path.realpath(home)):
            return os.path.realpath(home)
    return None


def nvcc_version(home):
    out = subprocess.run([os.path.join(home, "bin", "nvcc"), "--version"],
                         capture_output=True, text=True).stdout
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else "unknown"


def extra_cuda_includes(home):
    """Include dirs for CUDA library headers torch's headers use but the toolkit lacks.

    Slim toolkits (e.g. only nvcc + cudart) miss cuBLAS/cuSPARSE/... headers, which the
    ``nvidia-*`` wheels torch depends on ship under site-packages/nvidia/<lib>/include or
    site-packages/nvidia/cu<major>/include.
    """
    missing = [h for h in CUDA_LIBRARY_HEADERS
               if not os.path.isfile(os.path.join(home, "include", h))]
    if not missing:
        return []
    roots = []
    for path in sys.path:
        nvidia = os.path.join(path, "nvidia")
        if os.path.isdir(nvidia):
            roots.append(nvidia)
    dirs = []
    for header in missing:
        for root in roots:
            hits = sorted(glob.glob(os.path.join(root, "*", "include", header)))
            if hits:
                include = os.path.dirname(hits[0])
                if include not in dirs:
                    dirs.append(include)
                break
        else:
            log(f"warning: {header} is neither in {home}/include nor in an nvidia wheel")
    return dirs


def default_arch_list(nvcc_release):
    """Archs for a build without a visible GPU: current architectures nvcc supports."""
    major = int(nvcc_release.split(".")[0]) if nvcc_release[0].isdigit() else 12
    if major >= 13:
        return "7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX"
    return "7.0;7.5;8.0;8.6;8.9;9.0+PTX"


def parallel_backend(torch):
    """torch's ATen parallel backend (OpenMP, Native, ...), as its headers define it: the
    inline at::parallel_for compiled into this library follows those macros."""
    config = os.path.join(os.path.dirname(torch.__file__), "include", "ATen", "Config.h")
    try:
        with open(config) as f:
            text = f.read()
    except OSError:
        return "OpenMP" if torch._C.has_openmp else "unknown"
    for name, macro in (("OpenMP", "AT_PARALLEL_OPENMP"), ("Native", "AT_PARALLEL_NATIVE")):
        if re.search(rf"#define\s+{macro}\s+1\b", text):
            return name
    return "unknown"


def plan_cuda(torch):
    """(toolkit or None, why): whether the CUDA kernels are built, torchvision's way — when
    a GPU is visible or when asked for (FORCE_CUDA=1, TORCH_CUDA_ARCH_LIST)."""
    force = env_flag("FORCE_CUDA")
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if env_flag("USE_CUDA") is False:
        off = "USE_CUDA=0"
    elif torch.version.cuda is None:
        off = f"torch {torch.__version__} is a CPU-only build"
    elif (home := find_cuda_home(torch.version.cuda)) is None:
        off = "no CUDA toolkit found (set CUDA_HOME to one with bin/nvcc)"
    elif force:
        return home, "FORCE_CUDA=1"
    elif arch_list:
        return home, f"TORCH_CUDA_ARCH_LIST={arch_list}"
    elif torch.cuda.is_available():
        return home, f"GPU visible: {torch.cuda.get_device_name(0)}"
    else:
        off = ("no GPU visible; to build them for a GPU elsewhere: FORCE_CUDA=1 "
               "TORCH_CUDA_ARCH_LIST=\"<its arch, e.g. 9.0>\" pip install --no-build-isolation ...")
    if force:
        raise SystemExit(f"FORCE_CUDA=1 but the CUDA kernels cannot be built: {off}")
    return None, off


def cuda_arch_list(torch, nvcc_release):
    """The archs the CUDA kernels are compiled for (setting TORCH_CUDA_ARCH_LIST, which
    torch's build reads, when neither the user nor a visible GPU says)."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip():
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i)
                       for i in range(torch.cuda.device_count())})
        return ";".join(f"{major}.{minor}" for major, minor in caps) + " (the visible GPUs)"
    os.environ["TORCH_CUDA_ARCH_LIST"] = default_arch_list(nvcc_release)
    log(f"no GPU visible and TORCH_CUDA_ARCH_LIST unset: building for "
        f"{os.environ['TORCH_CUDA_ARCH_LIST']}")
    return os.environ["TORCH_CUDA_ARCH_LIST"]


def glibc_compat_flags():
    """Compiler flags that keep the library's glibc requirement at torch's (2.28) when it is
    built on a newer glibc: csrc/glibc_compat/ holds a force-included header that
    binds exp/log/pow to their pre-2.29 symbol versions, and a <sys/single_threaded.h> that
    stops libstdc++'s headers from reading ``__libc_single_threaded`` (GLIBC_2.32)."""
    if not sys.platform.startswith("linux"):
        return []
    compat = os.path.join(ROOT, "csrc", "glibc_compat")
    return ["-isystem", compat, "-include", os.path.join(compat, "glibc_compat.h")]


def import_cpp_extension(cuda_home):
    """torch.utils.cpp_extension, pointed at the CUDA toolkit to build with (if any): it reads
    CUDA_HOME when it is imported."""
    if cuda_home is not None:
        os.environ["CUDA_HOME"] = cuda_home
    from torch.utils import cpp_extension

    if cuda_home is not None:
        cpp_extension.CUDA_HOME = cuda_home
    return cpp_extension


def optimization(debug):
    """The optimisation flags of every compiler (DEBUG=1: none, with debug info)."""
    return ["-O0", "-g"] if debug else ["-O3"]


def cxx_flags(debug, openmp, openmp_runtime=None):
    """The C++ compiler and linker flags of every source (``openmp_runtime``: the OpenMP
    runtime library to link, see torch_openmp_runtime; else the compiler's)."""
    cxx = optimization(debug) + ["-Wall", "-Wno-unknown-pragmas"]
    link = []
    if not debug and sys.platform != "win32":
        # Python's CFLAGS carry -g: debug info makes the library ten times larger and the
        # build a quarter slower (DEBUG=1 keeps it)
        cxx.append("-g0")
    if sys.platform != "win32":
        # nothing reads errno: lets the per-channel sqrt of the scale vectorize
        cxx.append("-fno-math-errno")
    cxx += glibc_compat_flags()
    if openmp:
        cxx.append("/openmp" if sys.platform == "win32" else "-fopenmp")
        if openmp_runtime:
            link += ["-L" + os.path.dirname(openmp_runtime),
                     "-l:" + os.path.basename(openmp_runtime)]
        elif sys.platform != "win32":
            link.append("-fopenmp")
    return cxx, link


def uses_openmp(parallel):
    """at::parallel_for is inline code that follows torch's parallel backend: with OpenMP
    (torch's Linux builds) it is a `#pragma omp parallel`, which a compiler without -fopenmp
    ignores, and every CPU kernel would run on one thread. The library then uses the OpenMP
    runtime torch has already loaded (torch_openmp_runtime)."""
    return parallel == "OpenMP" and sys.platform != "darwin"  # Apple clang has no -fopenmp


def torch_openmp_runtime(torch):
    """The OpenMP runtime torch's wheel ships, or None: torch/lib/libgomp.so.1 (x86-64), or
    torch.libs/libgomp-<hash>.so.1.0.0 where auditwheel renamed it (aarch64). Linked by that
    name, the library shares the runtime torch has loaded, whose threads torch.set_num_threads
    sets; linked as the compiler's libgomp.so.1 it would need a second runtime from the
    system, with its own thread count (or, where the system has none, fail to load)."""
    package = os.path.dirname(os.path.abspath(torch.__file__))
    found = sorted(glob.glob(os.path.join(package, "lib", "libgomp*.so*"))
                   + glob.glob(os.path.join(os.path.dirname(package), "torch.libs", "libgomp*.so*")))
    return found[0] if found else None


def sources_in(folder, pattern):
    return [os.path.relpath(p, ROOT)
            for p in sorted(glob.glob(os.path.join(ROOT, "csrc", folder, pattern)))]


def cpu_capability_builds():
    """The builds of csrc/cpu/*_kernel.cpp besides the baseline, as (name, compiler flags): on
    x86-64 with GCC or Clang, ATen's AVX2 and AVX512 (the same instruction sets) and AVX512
    with AVX512-BF16; none elsewhere (aarch64 runs the baseline build: NEON)."""
    if platform.machine().lower() not in ("x86_64", "amd64") or sys.platform == "win32":
        return []
    avx2 = ["-mavx2", "-mfma", "-mf16c"]
    # GCC 12 warns about its own AVX-512 intrinsics (bug 105593); the baseline and AVX2
    # builds of the same sources keep those warnings for frozennorm's code.
    avx512 = avx2 + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
                     "-Wno-uninitialized", "-Wno-maybe-uninitialized"]
    builds = [("AVX2", ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"] + avx2),
              ("AVX512", ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"] + avx512),
              ("AVX512_BF16", ["-DCPU_CAPABILITY=AVX512_BF16", "-DCPU_CAPABILITY_AVX512"]
               + avx512 + ["-mavx512bf16"])]
    limit = os.environ.get("FROZENNORM_MAX_CPU_CAPABILITY", "").strip().upper()
    names = ["DEFAULT"] + [name for name, _ in builds]
    if not limit:
        return builds
    if limit not in names:
        raise SystemExit(f"FROZENNORM_MAX_CPU_CAPABILITY={limit.lower()}: choose from "
                         f"{', '.join(n.lower() for n in names)}")
    return builds[:names.index(limit)]


def build_ext_class(cpp_extension, info):
    """The build_ext command: compiles the CPU capability builds too, records ``info`` beside
    the library, and keeps its objects in build/ (also for editable installs)."""

    class BuildExt(cpp_extension.BuildExtension):
        def finalize_options(self):
            super().finalize_options()
            # setuptools gives editable installs a temporary folder: with build/, reinstalling
            # compiles only what changed
            self.build_temp = os.path.join(ROOT, "build", f"temp-{sys.implementation.cache_tag}")

        def build_extension(self, ext):
            self._compile_capability_sources(ext)
            super().build_extension(ext)
            self._write_info(os.path.dirname(self.get_ext_fullpath(ext.name)))

        def copy_extensions_to_source(self):
            # In-place builds happen in build/ and then copy the library alone.
            super().copy_extensions_to_source()
            self._write_info(os.path.join(ROOT, "frozennorm"))

        @staticmethod
        def _write_info(directory):
            with open(os.path.join(directory, "_build_info.json"), "w") as f:
                json.dump(info, f, indent=2, sort_keys=True)
                f.write("\n")

        def _compile_capability_sources(self, ext):
            """Compiles csrc/cpu/*_kernel.cpp once more per CPU capability of this target,
            with that capability's instructions enabled for those files alone (their plain
            compile among the sources is the baseline build; csrc/cpu/dispatch.h chooses
            among the builds at run time, so any subset links and loads)."""
            kernels = [s for s in ext.sources if s.endswith("_kernel.cpp")]
            builds = cpu_capability_builds() if kernels else []
            log("CPU loops built for: " + ", ".join(["DEFAULT"] + [name for name, _ in builds]))
            cflags = ext.extra_compile_args
            cflags = list(cflags["cxx"] if isinstance(cflags, dict) else cflags)
            for name, flags in builds:
                objects = self.compiler.compile(
                    kernels, output_dir=os.path.join(self.build_temp, name.lower()),
                    include_dirs=ext.include_dirs, extra_postargs=cflags + flags)
                ext.extra_objects = list(ext.extra_objects or []) + objects

    return BuildExt


def torch_requirement():
    """What the package requires of torch: the supported range, or (FROZENNORM_PIN_TORCH=1,
    release wheels) exactly the torch it was built against."""
    if not env_flag("FROZENNORM_PIN_TORCH"):
        return TORCH_REQUIREMENT
    from importlib.metadata import version

    requires = f"torch=={version('torch')}"
    log(f"release build: requires {requires}")
    return requires


def configure():
    """Decides what to build; returns (ext_modules, cmdclass, install_requires)."""
    check_setuptools()
    torch = import_torch()
    cuda_home, cuda_why = plan_cuda(torch)
    cpp_extension = import_cpp_extension(cuda_home)
    debug = env_flag("DEBUG")
    parallel = parallel_backend(torch)
    openmp = uses_openmp(parallel)
    openmp_runtime = torch_openmp_runtime(torch) if openmp else None
    cxx, link_args = cxx_flags(debug, openmp, openmp_runtime)
    sources = sources_in("", "*.cpp") + sources_in("cpu", "*.cpp")
    include_dirs = [os.path.join(ROOT, "csrc")]
    info = {
        "version": full_version(),
        "torch_version": torch.__version__,
        "torch_cuda_version": torch.version.cuda,
        "with_cuda": cuda_home is not None,
        "cuda_reason": cuda_why,
        "cuda_home": cuda_home,
        "nvcc_version": None,
        "cuda_arch_list": None,
        "python": sys.version.split()[0],
        "parallel_backend": parallel,
        "sources_digest": sources_digest(),
    }
    log(f"torch {torch.__version__} (CUDA {torch.version.cuda}) at "
        f"{os.path.dirname(torch.__file__)}, python {info['python']}")
    extra = {"cxx": cxx}
    if cuda_home is not None:
        nvcc_release = nvcc_version(cuda_home)
        if torch.version.cuda.split(".")[0] != nvcc_release.split(".")[0]:
            log(f"warning: nvcc {nvcc_release} differs in major version from torch's CUDA "
                f"{torch.version.cuda}; torch may refuse to build")
        sources += sources_in("cuda", "*.cu")
        include_dirs += extra_cuda_includes(cuda_home)
        extra["nvcc"] = (optimization(debug) + ["-lineinfo", "--expt-relaxed-constexpr"]
                         + glibc_compat_flags())
        info.update(nvcc_version=nvcc_release, cuda_arch_list=cuda_arch_list(torch, nvcc_release))
        log(f"CUDA kernels: ON  ({cuda_why}; toolkit {cuda_home}, nvcc {nvcc_release}, "
            f"archs {info['cuda_arch_list']})")
        if include_dirs[1:]:
            log(f"CUDA library headers from: {', '.join(include_dirs[1:])}")
    else:
        log(f"CUDA kernels: OFF ({cuda_why})")
    log(f"CPU kernels: torch's parallel backend {parallel}"
        + (f" (compiled with OpenMP, linking {openmp_runtime or 'the compiler runtime'})"
           if openmp else
           " (not compiled with OpenMP: the CPU kernels run on one thread)"
           if parallel == "OpenMP" else ""))
    log(f"MAX_JOBS={os.environ.get('MAX_JOBS', 'default')}, debug={bool(debug)}")

    ext_cls = cpp_extension.CUDAExtension if cuda_home is not None else cpp_extension.CppExtension
    ext = ext_cls(name="frozennorm._C", sources=sources, include_dirs=include_dirs,
                  extra_compile_args=extra, extra_link_args=link_args)
    return [ext], {"build_ext": build_ext_class(cpp_extension, info)}, [torch_requirement()]


ext_modules, cmdclass, install_requires = configure()

setup(
    version=full_version(),
    packages=find_packages(include=["frozennorm", "frozennorm.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=install_requires,
)
