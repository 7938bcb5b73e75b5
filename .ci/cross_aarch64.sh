#!/usr/bin/env bash
# CI: frozennorm's CPU build cross-compiled for aarch64 by setup.py itself (its choice of
# sources, flags and CPU-capability builds for an aarch64 machine), once as a release build
# and once with DEBUG=1 (-O0), each linked into the shared library; fails if that library
# leaves a frozennorm symbol undefined (e.g. a capability's loops referenced but not built),
# which on an aarch64 machine would make `import frozennorm` fail.
#
# Needs a python with torch (its headers; $PYTHON, default python3) and Debian/Ubuntu's
# g++-aarch64-linux-gnu, which it installs (apt, as root or through sudo) when missing and
# then removes again; everything else it writes lives in a temporary folder removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)

PYTHON=${PYTHON:-python3}
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

if ! command -v "$CROSS-g++" >/dev/null; then
    echo "installing g++-$CROSS"
    dpkg-query -W -f='${Package}\n' | sort >"$WORK/before"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        "g++-$CROSS" >/dev/null
    dpkg-query -W -f='${Package}\n' | sort >"$WORK/after"
    installed=$(comm -13 "$WORK/before" "$WORK/after" | tr '\n' ' ')
fi

# The link resolves torch's libraries (-lc10, -ltorch_cpu, ...) against empty aarch64
# stand-ins of the same names: their symbols stay undefined, as torch's do in any build,
# and only frozennorm's own are checked.
stubs=$WORK/stubs
mkdir -p "$stubs"
torch_lib=$("$PYTHON" -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))")
for lib in "$torch_lib"/lib*.so; do
    "$CROSS-gcc" -shared -o "$stubs/$(basename "$lib")" -x c /dev/null
done

# Each build runs in a copy of the sources (what git tracks or would add): setup.py keeps its
# objects in <sources>/build/, and aarch64 objects must not land in the checkout's.
status=0
for mode in release debug; do
    out=$WORK/$mode
    mkdir -p "$out/src"
    git ls-files -z --cached --others --exclude-standard | tar -cf - --null -T - | tar -xf - -C "$out/src"
    echo "== aarch64 $mode build"
    # setup.py decides by platform.machine(); the build runs the cross compiler.
    # (CPU only: whatever the caller asked of CUDA, e.g. CI's FORCE_CUDA=1, is dropped)
    if ! env -u FORCE_CUDA -u TORCH_CUDA_ARCH_LIST CC=$CROSS-gcc CXX=$CROSS-g++ LDFLAGS="-L$stubs" \
            USE_CUDA=0 DEBUG=$([ "$mode" = debug ] && echo 1 || echo 0) MAX_JOBS=${MAX_JOBS:-2} \
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
        echo "FAIL: the aarch64 $mode build did not compile and link"
        status=1
        continue
    fi
    grep -F "[frozennorm build]" "$out/build.log" | sort -u
    so=$(find "$out/lib" -name '_C*.so')
    "$CROSS-readelf" -h "$so" | grep -q "Machine: *AArch64" \
        || { echo "FAIL: $so is not an aarch64 library"; status=1; }
    undefined=$("$CROSS-nm" -D --undefined-only -C "$so" | grep -i frozennorm || true)
    if [ -n "$undefined" ]; then
        echo "FAIL: the aarch64 $mode build leaves frozennorm symbols undefined:"
        echo "$undefined"
        status=1
    else
        echo "ok: $(basename "$so"), $("$CROSS-nm" -D --undefined-only "$so" | wc -l) undefined symbols, none of them frozennorm's"
    fi
done
echo "aarch64 cross check finished in $(( $(date +%s) - start )) s"
exit $status
