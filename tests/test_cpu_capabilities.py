"""The builds of the CPU loops (one per CPU capability, chosen at run time): which ones this
library has and runs, the ATEN_CPU_CAPABILITY / FROZENNORM_CPU_CAPABILITY overrides, and the
op tests under every build this machine runs (the rest of the suite runs the chosen one)."""

import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import frozennorm  # noqa: F401  (loads the ops)
from frozennorm import ops

pytestmark = pytest.mark.skipif(not ops.COMPILED, reason="needs the compiled ops")

TESTS = Path(__file__).resolve().parent
ORDER = ["DEFAULT", "AVX2", "AVX512", "AVX512_BF16"]
OVERRIDES = ("ATEN_CPU_CAPABILITY", "FROZENNORM_CPU_CAPABILITY")


def runnable():
    return list(torch.ops.frozennorm._cpu_capabilities()) if ops.COMPILED else []


def cpu_flags():
    """The x86 feature flags of /proc/cpuinfo (empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def expected_builds():
    """The builds setup.py makes on this platform that this CPU runs, per /proc/cpuinfo."""
    if platform.machine().lower() not in ("x86_64", "amd64") or sys.platform != "linux":
        return ["DEFAULT"]
    flags = cpu_flags()
    out = ["DEFAULT"]
    if {"avx2", "fma", "f16c"} <= flags:
        out.append("AVX2")
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
            out.append("AVX512")
            if "avx512_bf16" in flags:
                out.append("AVX512_BF16")
    return out


def run_python(code, **env):
    """Runs ``code`` in a fresh interpreter with the overrides cleared, then ``env``."""
    full = {k: v for k, v in os.environ.items() if k not in OVERRIDES}
    # torch's C++ warnings are printed at this level (importing ultralytics, which another
    # test module does, sets TORCH_CPP_LOG_LEVEL=ERROR in this process's environment)
    full["TORCH_CPP_LOG_LEVEL"] = "WARNING"
    full.update(env)
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True,
                          timeout=300)


def chosen(**env):
    proc = run_python("import torch, frozennorm; print(torch.ops.frozennorm._cpu_capability())",
                      **env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()[-1], proc.stderr


def test_builds_match_this_cpu():
    """Every build this platform gets and this CPU runs is in the library and runnable."""
    assert runnable() == expected_builds()


def test_default_choice_is_the_best_build():
    assert chosen()[0] == runnable()[-1]


@pytest.mark.parametrize("aten, want", [("default", "DEFAULT"), ("avx2", "AVX2"),
                                        ("avx512", "AVX512_BF16")])
def test_aten_override_caps_the_choice(aten, want):
    """ATEN_CPU_CAPABILITY as ATen reads it; avx512 allows AVX-512 with BF16, and nothing
    raises the choice above what the CPU runs."""
    best = [c for c in runnable() if ORDER.index(c) <= ORDER.index(want)][-1]
    assert chosen(ATEN_CPU_CAPABILITY=aten)[0] == best


@pytest.mark.parametrize("name", ORDER)
def test_own_override_picks_each_build(name):
    """FROZENNORM_CPU_CAPABILITY takes precedence over ATen's variable."""
    best = [c for c in runnable() if ORDER.index(c) <= ORDER.index(name)][-1]
    assert chosen(FROZENNORM_CPU_CAPABILITY=name.lower(), ATEN_CPU_CAPABILITY="default")[0] == best


def test_invalid_own_override_warns_and_is_ignored():
    got, err = chosen(FROZENNORM_CPU_CAPABILITY="avx1024")
    assert got == runnable()[-1]
    assert "ignoring invalid value for FROZENNORM_CPU_CAPABILITY: avx1024" in err


@pytest.mark.parametrize("name", [c for c in ORDER if c in runnable()[:-1]])
def test_op_tests_pass_under_each_build(name):
    """The op, fused-op and affine-backward tests (but the tracing ones, which run no loop of
    their own) in a process that runs this build; the chosen build is what the rest of the
    suite tests."""
    assert chosen(FROZENNORM_CPU_CAPABILITY=name.lower())[0] == name
    full = {k: v for k, v in os.environ.items() if k not in OVERRIDES}
    full["FROZENNORM_CPU_CAPABILITY"] = name.lower()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
         str(TESTS / "test_op.py"), str(TESTS / "test_act_op.py"),
         str(TESTS / "test_affine_backward.py"),
         "-k", "not opcheck and not compile and not export"],
        env=full, cwd=TESTS.parent, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout


def test_no_capability_instructions_outside_their_builds():
    """Only the capability builds' own code (namespaces AVX2::, AVX512::, AVX512_BF16::) may
    hold AVX instructions: an inline function of a shared header compiled into both a
    capability build and the baseline is linked once, and the baseline must not call a copy
    that a CPU without that capability cannot run."""
    import shutil
    import sysconfig

    flags = " ".join(filter(None, [sysconfig.get_config_var("CFLAGS"), os.environ.get("CFLAGS"),
                                   os.environ.get("CXXFLAGS")]))
    if platform.machine().lower() not in ("x86_64", "amd64") or sys.platform != "linux":
        pytest.skip("x86-64 Linux builds only")
    if "-march" in flags or "-mavx" in flags:
        pytest.skip(f"the baseline itself was compiled for a wider target ({flags})")
    if shutil.which("objdump") is None:
        pytest.skip("needs objdump (binutils)")
    from frozennorm import _C

    out = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", _C.__file__],
                         capture_output=True, text=True, check=True).stdout
    # demangled (AVX2::...) or, in names objdump leaves mangled (OpenMP's outlined
    # functions, "..._omp_fn.0"), their length-prefixed form (4AVX2...)
    CAPABILITY_NAMESPACE = "|".join(rf"\b{c}::|(?<![0-9]){len(c)}{c}"
                                    for c in ORDER[1:])
    offenders, function, own = {}, None, False
    for line in out.splitlines():
        if line.endswith(">:") and " <" in line:
            function = line.split(" <", 1)[1][:-2]
            own = re.search(CAPABILITY_NAMESPACE, function) is not None
        elif not own and function and "\t" in line:
            mnemonic = line.split("\t")[1].split(" ", 1)[0]
            if mnemonic.startswith("v"):
                offenders[function] = mnemonic
    assert not offenders, f"AVX instructions in baseline code: {list(offenders.items())[:10]}"
