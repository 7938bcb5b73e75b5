#!/usr/bin/env bash
# CI: frozennorm on aarch64, without an aarch64 machine.
#
#  1. Cross-compiled: setup.py's CPU build for aarch64 (its choice of sources, flags and
#     CPU-capability builds for an aarch64 machine) against this python's torch, with
#     DEBUG=1 (-O0), linked into the shared library; fails if that library leaves a
#     frozennorm symbol undefined (e.g. a capability's loops referenced but not built, or an
#     inline function only -O0 leaves out of line), which on an aarch64 machine would make
#     `import frozennorm` fail. (The release build is the one step 2 builds, loads and tests.)
#  2. Run: Debian 12's arm64 python 3.11 under qemu-user, with torch $AARCH64_TORCH's
#     aarch64 wheel from PyPI (CPU only, the pre-C++11 ABI) and its torchvision (for the
#     module tests' comparison with torchvision's frozen BN); frozennorm built there by its
#     own setup.py (which then sees an aarch64 machine and that torch), compiling with the
#     cross compiler; then the op, fused-activation and module tests (all but two: see
#     the step below), torch.compile compiling in-process
#     (TORCHINDUCTOR_COMPILE_THREADS=1: its worker processes would be
#     aarch64 programs, which qemu-user cannot start without a binfmt_misc handler; a test
#     that still starts one is reported as skipped, saying so: .ci/qemu_user.py).
#
# Needs a python with torch (its headers) and pip ($PYTHON, default python3), Debian's apt
# (the arm64 packages come from Debian 12 whatever the host runs) and PyPI. It installs
# g++-aarch64-linux-gnu (apt, as root or through sudo) when missing and removes it again on
# exit; the arm64 python, qemu-user-static and the aarch64 wheels are downloaded and
# unpacked into a temporary folder (nothing installed), removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
start=$(date +%s)

PYTHON=${PYTHON:-python3}
AARCH64_TORCH=${AARCH64_TORCH:-2.4.1}
AARCH64_TORCHVISION=${AARCH64_TORCHVISION:-0.19.1}  # the torchvision of that torch
CROSS=aarch64-linux-gnu
WORK=$(mktemp -d)
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
installed=""  # the packages this run installed (removed again on exit)
cleanup() {
    rm -rf "$WORK"
    if [ -n "$installed" ]; then
        # shellcheck disable=SC2086
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get purge -y -qq $installed >/dev/null || true
    fi
}
trap cleanup EXIT
since() { echo "$(( $(date +%s) - $1 )) s"; }

if ! command -v "$CROSS-g++" >/dev/null; then
    echo "installing g++-$CROSS"
    dpkg-query -W -f='${Package}\n' | sort >"$WORK/before"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        "g++-$CROSS" >/dev/null
    dpkg-query -W -f='${Package}\n' | sort >"$WORK/after"
    installed=$(comm -13 "$WORK/before" "$WORK/after" | tr '\n' ' ')
fi

# A copy of the sources (what git tracks or would add) in $1: setup.py keeps its objects in
# <sources>/build/, and aarch64 objects must not land in the checkout's.
copy_sources() {
    mkdir -p "$1"
    git ls-files -z --cached --others --exclude-standard | tar -cf - --null -T - | tar -xf - -C "$1"
}

# ---------------------------------------------------------------- 1. cross-compiled
# The link resolves torch's libraries (-lc10, -ltorch_cpu, -l:libgomp.so.1, ...) against empty aarch64
# stand-ins of the same names: their symbols stay undefined, as torch's do in any build,
# and only frozennorm's own are checked.
stubs=$WORK/stubs
mkdir -p "$stubs"
torch_lib=$("$PYTHON" -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))")
for lib in "$torch_lib"/lib*.so*; do
    "$CROSS-gcc" -shared -o "$stubs/$(basename "$lib")" -x c /dev/null
done

status=0
out=$WORK/debug
copy_sources "$out/src"
echo "== aarch64 DEBUG=1 build"
# setup.py decides by platform.machine(); the build runs the cross compiler.
# (CPU only: whatever the caller asked of CUDA, e.g. CI's FORCE_CUDA=1, is dropped)
if ! env -u FORCE_CUDA -u TORCH_CUDA_ARCH_LIST CC=$CROSS-gcc CXX=$CROSS-g++ LDFLAGS="-L$stubs" \
        USE_CUDA=0 DEBUG=1 MAX_JOBS=${MAX_JOBS:-2} \
        "$PYTHON" - "$out" >"$out/build.log" 2>&1 <<'EOF'
import os, platform, runpy, sys
out = sys.argv[1]
os.chdir(out + "/src")
sys.path.insert(0, out + "/src")
platform.machine = lambda: "aarch64"
sys.argv = ["setup.py", "build_ext", "--build-lib", out + "/lib"]
runpy.run_path("setup.py", run_name="__main__")
EOF
then
    tail -40 "$out/build.log"
    echo "FAIL: the aarch64 DEBUG=1 build did not compile and link"
    status=1
else
    grep -F "[frozennorm build]" "$out/build.log" | sort -u
    so=$(find "$out/lib" -name '_C*.so')
    "$CROSS-readelf" -h "$so" | grep -q "Machine: *AArch64" \
        || { echo "FAIL: $so is not an aarch64 library"; status=1; }
    undefined=$("$CROSS-nm" -D --undefined-only -C "$so" | grep -i frozennorm || true)
    if [ -n "$undefined" ]; then
        echo "FAIL: the aarch64 DEBUG=1 build leaves frozennorm symbols undefined:"
        echo "$undefined"
        status=1
    else
        echo "ok: $(basename "$so"), $("$CROSS-nm" -D --undefined-only "$so" | wc -l) undefined symbols, none of them frozennorm's"
    fi
fi
echo "aarch64 cross-compile check finished at $(since "$start")"

# ---------------------------------------------------------------- 2. run under qemu-user
run_start=$(date +%s)
A64=$WORK/a64
echo "== aarch64 run: Debian 12's arm64 python 3.11 and qemu-user-static"
# apt with a state of its own: Debian 12's arm64 packages (and the amd64 qemu-user-static),
# resolved from nothing installed, downloaded into $A64/debs and unpacked, never installed
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
[ -f "$keyring" ] || { echo "FAIL: $keyring is missing (apt install debian-archive-keyring)"; exit 1; }
mkdir -p "$A64"/lists/partial "$A64"/cache "$A64"/debs/partial "$A64"/root "$A64"/qemu
: >"$A64/status"
cat >"$A64/sources.list" <<EOF
deb [signed-by=$keyring] http://deb.debian.org/debian bookworm main
deb [signed-by=$keyring] http://deb.debian.org/debian bookworm-updates main
deb [signed-by=$keyring] http://deb.debian.org/debian-security bookworm-security main
EOF
apt_a64=(-oAPT::Architecture=arm64 -oAPT::Architectures::=arm64 -oAPT::Architectures::=amd64
         -oDir::Etc::SourceList="$A64/sources.list" -oDir::Etc::SourceParts=/nonexistent
         -oDir::State::Lists="$A64/lists" -oDir::State::status="$A64/status"
         -oDir::Cache="$A64/cache" -oDir::Cache::archives="$A64/debs"
         -oDebug::NoLocking=1 -oAPT::Sandbox::User="$(id -un)")
apt-get "${apt_a64[@]}" update -qq
apt-get "${apt_a64[@]}" install --download-only -y -qq --no-install-recommends \
    python3.11 libpython3.11-dev libstdc++6 qemu-user-static:amd64 >/dev/null
for deb in "$A64"/debs/*_arm64.deb "$A64"/debs/*_all.deb; do dpkg -x "$deb" "$A64/root"; done
dpkg -x "$A64"/debs/qemu-user-static_*_amd64.deb "$A64/qemu"
qemu=$A64/qemu/usr/bin/qemu-aarch64-static
# The arm64 python's headers for the build (its sysconfig names /usr/include/python3.11,
# which the native cross compiler would read from this machine): Python.h, and the
# <aarch64-linux-gnu/python3.11/pyconfig.h> that Debian's pyconfig.h includes
mkdir -p "$A64/include/$CROSS"
ln -s "$A64/root/usr/include/$CROSS/python3.11" "$A64/include/$CROSS/python3.11"
python_includes=$A64/root/usr/include/python3.11:$A64/include
echo "$(ls "$A64"/debs/*.deb | wc -l) packages, $("$qemu" --version | head -1) ($(since "$run_start"))"

echo "== aarch64 run: torch $AARCH64_TORCH's aarch64 wheels and the test requirements (PyPI)"
pip_a64=(--platform manylinux2014_aarch64 --python-version 3.11 --implementation cp
         --abi cp311 --only-binary=:all:)
"$PYTHON" -m pip download -q --no-deps -d "$A64/wheels" "${pip_a64[@]}" \
    "torch==$AARCH64_TORCH" "torchvision==$AARCH64_TORCHVISION"
# Their requirements: pip evaluates environment markers for this (x86-64) machine, so the
# ones with a marker (x86-64's CUDA libraries, extras) are left out by hand, and the wheels
# go in without their dependencies
mapfile -t requires < <("$PYTHON" - "$A64"/wheels/*.whl <<'EOF'
import sys, zipfile
found = set()
for wheel in sys.argv[1:]:
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA")))
    found |= {line.split(":", 1)[1].replace(" ", "") for line in meta.decode().splitlines()
              if line.startswith("Requires-Dist:") and ";" not in line}
print("\n".join(sorted(r for r in found if not r.startswith("torch"))))
EOF
)
"$PYTHON" -m pip install -q --target "$A64/site-torch" --no-deps "${pip_a64[@]}" "$A64"/wheels/*.whl
"$PYTHON" -m pip install -q --target "$A64/site" "${pip_a64[@]}" "${requires[@]}" \
    "setuptools>=77" wheel pytest hypothesis expecttest
echo "$(cd "$A64/wheels" && echo *.whl), requiring ${requires[*]} ($(since "$run_start"))"

# The arm64 python under qemu-user; QEMU_LD_PREFIX makes qemu look up absolute paths in the
# arm64 tree first. Programs it starts run natively (qemu-user passes execve to the kernel):
# the cross compiler and ninja do, an aarch64 program does not (no binfmt_misc handler).
a64python=$A64/python3.11
cat >"$a64python" <<EOF
#!/bin/sh
export QEMU_LD_PREFIX="$A64/root" PYTHONPATH="$A64/site-torch:$A64/site:$ROOT/.ci" PYTHONNOUSERSITE=1
exec "$qemu" "$A64/root/usr/bin/python3.11" "\$@"
EOF
chmod +x "$a64python"

echo "== aarch64 run: frozennorm built by its setup.py on the arm64 python, against torch $AARCH64_TORCH"
copy_sources "$A64/src"
build_start=$(date +%s)
cd "$A64/src"
# (build_ext's include dirs come before the one its sysconfig names)
if ! env -u FORCE_CUDA -u TORCH_CUDA_ARCH_LIST -u DEBUG CC=$CROSS-gcc CXX=$CROSS-g++ \
        USE_CUDA=0 MAX_JOBS=${MAX_JOBS:-2} \
        "$a64python" setup.py build_ext --inplace --include-dirs "$python_includes" \
        >"$A64/build.log" 2>&1; then
    tail -40 "$A64/build.log"
    echo "FAIL: frozennorm did not build on the arm64 python"
    exit 1
fi
grep -F "[frozennorm build]" "$A64/build.log" | sort -u
echo "built in $(since "$build_start")"
# The compiled kernels, not the fallback; on the one OpenMP runtime torch loaded (the arm64
# tree has no libgomp.so.1 of its own), so they follow torch.set_num_threads
"$a64python" -c "
import os, platform, torch, frozennorm
from frozennorm import _C, _loader, ops
assert platform.machine() == 'aarch64', platform.machine()
assert ops.COMPILED, _loader.fallback_reason()
print('frozennorm', frozennorm.__version__, 'compiled, on', platform.machine(), 'with torch',
      torch.__version__, '(C++11 ABI: %s)' % torch._C._GLIBCXX_USE_CXX11_ABI)
frozennorm.FrozenBatchNorm2d(4)(torch.randn(2, 4, 3, 3))
runtimes = sorted({line.split()[-1] for line in open('/proc/self/maps') if 'libgomp' in line})
threads = os.cpu_count() + 1
torch.set_num_threads(threads)
workers = _C.parallel_workers(1 << 16)
print('OpenMP runtime:', *runtimes, '- threads of an at::parallel_for at', threads, 'torch threads:', workers)
assert len(runtimes) == 1 and workers == threads, (runtimes, workers)
"
"$a64python" -m frozennorm.info

echo "== aarch64 run: the op, fused-activation and module tests (and what the library links) under qemu-user"
# Emulation is slow, so two tests are left out: the fused op's opcheck (its registration:
# tests/test_op.py runs the plain op's) and its hypothesis test (random shapes; the
# parametrised tests cover every activation, dtype and layout), the two slowest there.
tests_start=$(date +%s)
TORCHINDUCTOR_COMPILE_THREADS=1 "$a64python" -m pytest -q -p no:cacheprovider -p qemu_user -rs \
    --durations=10 tests/test_op.py tests/test_act_op.py tests/test_modules.py \
    --deselect tests/test_act_op.py::test_opcheck_act \
    --deselect tests/test_act_op.py::test_matches_unfused_sequence_property \
    tests/test_packaging.py::test_library_needs_only_the_system_runtime_and_torchs_libraries \
    tests/test_packaging.py::test_library_shares_torchs_openmp_runtime || status=1
cd "$ROOT"
echo "tests took $(since "$tests_start"); the aarch64 run $(since "$run_start")"
echo "aarch64 check finished in $(since "$start")"
exit $status
