"""The static picture of the CUDA kernels, kept honest: reads the built library's device code
(cuobjdump -res-usage and -sass) and fails unless every kernel uses no local memory (no
register spills, no stack: ptxas' "0 bytes stack frame, 0 bytes spill stores") and at most
MAX_REGISTERS registers.

    python .ci/cuda_static_check.py [LIBRARY]          # default: frozennorm/_C*.so of this checkout
    python .ci/cuda_static_check.py --table [LIBRARY]  # also the per-kernel table of benchmarks/README.md

CI runs it on the FORCE_CUDA=1 sm_90 build it makes (.ci/run); stage 1 of
benchmarks/gpu_check.sh on the GPU's own build. cuobjdump comes from the CUDA toolkit, or else
from triton's bundled copy (torch's Linux wheels depend on triton).

--table: for one kernel of each kind (layout x op x dtype, 32-bit index math unless said, the
widest vector), its registers and, from the SASS, the instructions a thread issues per element
on the shortest path around its main loop that makes the global loads and stores of the
common case (shortest_trip) and those loads and stores.
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# 65536 registers per SM: at <= 96 per thread, at least two blocks of 256 threads stay resident
# (512 threads), and with 64 bytes in flight per thread (launch: four 16-byte vectors) that is
# >= 32 KB per SM, above the ~20 KB an H100 needs in flight (3.35 TB/s x ~0.8 us / 132 SMs).
MAX_REGISTERS = 96


def find_cuobjdump() -> str:
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and os.access(os.path.join(home, "bin", "cuobjdump"), os.X_OK):
            return os.path.join(home, "bin", "cuobjdump")
    if shutil.which("cuobjdump"):
        return shutil.which("cuobjdump")
    try:
        import triton
        bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if bundled.exists():
            return str(bundled)
    except ImportError:
        pass
    raise SystemExit("cuobjdump not found (CUDA_HOME/bin, PATH, or triton's bundled binaries)")


def demangle(names):
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout
    return out.split("\n")[:len(names)]


def short(name: str) -> str:
    s = name.replace("frozennorm::cuda::", "").replace("c10::", "").replace("(frozennorm::Activation)", "A")
    return re.sub(r"^void kernel_entry<(.*)>\(.*$", r"\1", s)


def resource_usage(cuobjdump, lib):
    text = subprocess.run([cuobjdump, "-res-usage", lib], capture_output=True, text=True, check=True).stdout
    arches = sorted(set(re.findall(r"arch = (sm_\d+a?)", text)))
    rows = re.findall(r"Function (\S+):\n\s+REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    return arches, [dict(mangled=m, reg=int(r), stack=int(st), shared=int(sh), local=int(lo))
                    for m, r, st, sh, lo in rows]


def sass_functions(cuobjdump, lib):
    """{mangled name: [(address, instruction text)]}."""
    text = subprocess.run([cuobjdump, "-sass", lib], capture_output=True, text=True, check=True).stdout
    funcs = {}
    for part in re.split(r"\n\s*Function : ", text)[1:]:
        name, body = part.split("\n", 1)
        instrs = [(int(a, 16), ins.strip()) for a, ins in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", body)]
        funcs[name.strip()] = instrs
    return funcs


BRANCH = re.compile(r"\bBRA (?:\S+ )?0x([0-9a-f]+)")


def loops(instrs):
    """(head, tail) addresses of every loop: a backward branch and its target. (A kernel may
    hold several versions of its loop: the compiler unswitches uniform tests, such as whether
    the residual is null.)"""
    out = []
    for a, ins in instrs:
        m = BRANCH.search(ins)
        if m and int(m.group(1), 16) < a:
            out.append((int(m.group(1), 16), a))
    return out


def shortest_trip(instrs, loads, stores):
    """The fewest instructions a thread issues in one trip around a loop of the kernel (head to
    its backward branch) on a path that makes exactly `loads` global loads and `stores` global
    stores: the common case of the kernel's work, whichever way the compiler laid its branches
    out (a vector inside one plane, an element inside the tensor, the residual given or not).
    Predicated-off instructions on the path count: they take issue slots. None if no path."""
    index = {a: i for i, (a, _) in enumerate(instrs)}
    trips = [t for t in (trip(instrs, index, head, tail, loads, stores) for head, tail in loops(instrs))
             if t is not None]
    return min(trips) if trips else None


def trip(instrs, index, head, tail, loads, stores):
    memo = {}

    def cost(i, ld, st):
        key = (i, ld, st)
        if key in memo:
            return memo[key]
        memo[key] = None  # (a cycle: no path)
        a, ins = instrs[i]
        ld -= bool(re.search(r"\bLDG\b", ins))
        st -= bool(re.search(r"\bSTG\b", ins))
        here = 0 if ins.startswith("NOP") else 1
        best = None
        if ld >= 0 and st >= 0 and not ins.startswith("EXIT"):
            m = BRANCH.search(ins)
            if a == tail:
                best = here if ld == st == 0 else None
            else:
                target = int(m.group(1), 16) if m else None
                nexts = [i + 1]
                if target is not None and target > a:  # forward: taken, or (predicated) not
                    nexts = [index[target]] + ([i + 1] if ins.startswith("@") else [])
                rest = [c for c in (cost(n, ld, st) for n in nexts if n < len(instrs)) if c is not None]
                best = here + min(rest) if rest else None
        memo[key] = best
        return best

    return cost(index[head], loads, stores)


# (row, regex on the demangled name, global loads and stores of one trip around the main loop)
TABLE_KERNELS = [
    ("planes forward fp16", r"^PlanesKernel<8, 4, unsigned int, AffineOp<Half, float, true>", (8, 4)),
    ("planes backward fp16", r"^PlanesKernel<8, 4, unsigned int, AffineOp<Half, float, false>", (8, 4)),
    ("planes forward fp32", r"^PlanesKernel<4, 4, unsigned int, AffineOp<float, float, true>", (8, 4)),
    ("planes forward fp16, 8-byte aligned", r"^PlanesKernel<4, 4, unsigned int, AffineOp<Half, float, true>", (8, 4)),
    ("planes forward fp16, 64-bit index", r"^PlanesKernel<8, 4, unsigned long, AffineOp<Half, float, true>", (8, 4)),
    ("rows forward fp16", r"^RowsKernel<8, 4, unsigned int, AffineOp<Half, float, true>", (4, 4)),
    ("rows backward fp16", r"^RowsKernel<8, 4, unsigned int, AffineOp<Half, float, false>", (4, 4)),
    ("rows forward fp16, C % 8 == 4", r"^RowsKernel<4, 4, unsigned int, AffineOp<Half, float, true>", (4, 4)),
    ("rows forward fp32", r"^RowsKernel<4, 4, unsigned int, AffineOp<float, float, true>", (4, 4)),
    ("strided forward fp16, 3 dims", r"^StridedKernel<3, 4, unsigned int, AffineOp<Half, float, true>", (8, 4)),
    ("strided backward fp16, 3 dims", r"^StridedKernel<3, 4, unsigned int, AffineOp<Half, float, false>", (8, 4)),
    ("strided forward fp16, 4 dims", r"^StridedKernel<4, 4, unsigned int, AffineOp<Half, float, true>", (8, 4)),
    ("strided forward fp16, 3 dims, 64-bit index", r"^StridedKernel<3, 4, unsigned long, AffineOp<Half, float, true>", (8, 4)),
    ("planes fused forward fp16 ReLU + residual", r"^PlanesKernel<8, 2, unsigned int, ActForwardOp<Half, float, A1>", (6, 2)),
    ("planes fused backward fp16 ReLU, residual's gradient", r"^PlanesKernel<8, 2, unsigned int, ActBackwardOp<Half, float, A1>", (6, 4)),
    ("rows fused forward fp16 SiLU", r"^RowsKernel<8, 1, unsigned int, ActForwardOp<Half, float, A3>", (1, 1)),
    ("rows fused forward fp16 SiLU + residual", r"^RowsKernel<8, 1, unsigned int, ActForwardOp<Half, float, A3>", (2, 1)),
    ("rows fused forward bf16 ReLU + residual", r"^RowsKernel<8, 2, unsigned int, ActForwardOp<BFloat16, float, A1>", (4, 2)),
]


def elements_per_trip(name):
    m = re.match(r"^(Planes|Rows)Kernel<(\d+), (\d+),", name)
    if m:
        return int(m.group(2)) * int(m.group(3))
    m = re.match(r"^StridedKernel<\d+, (\d+),", name)
    return int(m.group(1)) if m else 1


def main(argv=None):
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 100000))  # shortest_trip's recursion
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("library", nargs="?")
    p.add_argument("--table", action="store_true")
    args = p.parse_args(argv)
    lib = args.library
    if lib is None:
        libs = sorted(glob.glob(str(ROOT / "frozennorm" / "_C*.so")))
        if not libs:
            raise SystemExit("no frozennorm/_C*.so in this checkout: build it first")
        lib = libs[0]
    cuobjdump = find_cuobjdump()
    arches, kernels = resource_usage(cuobjdump, lib)
    if not kernels:
        raise SystemExit(f"{lib} holds no CUDA kernels (a CPU-only build?)")
    names = demangle([k["mangled"] for k in kernels])
    funcs = sass_functions(cuobjdump, lib)
    problems = []
    for k, name in zip(kernels, names):
        k["name"] = short(name)
        local_ops = sum(1 for _, ins in funcs.get(k["mangled"], []) if re.search(r"\b(STL|LDL)\b", ins))
        if k["stack"] or k["local"] or local_ops:
            problems.append(f"local memory: STACK {k['stack']} LOCAL {k['local']} ({local_ops} STL/LDL): {k['name']}")
        if k["reg"] > MAX_REGISTERS:
            problems.append(f"{k['reg']} registers > {MAX_REGISTERS}: {k['name']}")
    regs = sorted(k["reg"] for k in kernels)
    print(f"{lib}: {len(kernels)} kernels for {', '.join(arches)}; registers {regs[0]}-{regs[-1]} "
          f"(median {regs[len(regs) // 2]}, ceiling {MAX_REGISTERS}); "
          f"{sum(1 for k in kernels if k['stack'] or k['local'])} with stack or local memory")
    by_kind = {}
    for k in kernels:
        kind = re.match(r"^(\w+)<", k["name"]).group(1)
        op = re.search(r"(AffineOp|ActForwardOp|ActBackwardOp)", k["name"])
        by_kind.setdefault((kind, op.group(1) if op else ""), []).append(k["reg"])
    for (kind, op), r in sorted(by_kind.items()):
        print(f"  {kind:14s} {op:14s} {len(r):4d} kernels, registers {min(r)}-{max(r)}")
    if args.table:
        print("\n| kernel | registers | SASS instructions per element (per trip) | global loads + stores per element |")
        print("|---|---|---|---|")
        for label, pattern, (loads, stores) in TABLE_KERNELS:
            match = [k for k in kernels if re.search(pattern, k["name"])]
            if not match:
                print(f"| {label} | (not in this build) | | |")
                continue
            k = match[0]
            per = elements_per_trip(k["name"])
            n = shortest_trip(funcs[k["mangled"]], loads, stores)
            trip = f"{n / per:.1f} ({n} per {per})" if n is not None else "no such path"
            print(f"| {label} | {k['reg']} | {trip} | {(loads + stores) / per:.2f} |")
    for line in problems:
        print("FAIL", line)
    if problems:
        print(f"{len(problems)} kernels break the static rules")
        return 1
    print("ok: no kernel spills or uses a stack, none above the register ceiling")
    return 0


if __name__ == "__main__":
    sys.exit(main())
