"""Plants bugs in a copy of the CUDA code and checks that the emulation tests catch each one.

    python tests/cuda_emulation/mutations.py [--only NAME] [--jobs N] [--keep]

For each mutation below: csrc/, tests/ and pyproject.toml are copied to a temporary folder,
one snippet of the copy is replaced (it must occur exactly once), the emulation is rebuilt
from the copy (torch's JIT build, -O0: the selected tests are small) and the selected tests of
tests/test_cuda_emulation.py run against it with the installed frozennorm as the CPU
reference. The mutation counts as caught when pytest reports failed tests whose output
matches the check the mutation targets. Exits non-zero if any mutation is not caught (or
its snippet is gone: update the table when the code changes). CI runs it (.ci/run).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclasses.dataclass
class Mutation:
    name: str
    what: str      # the bug, and the check that must catch it
    path: str      # relative to the checkout
    old: str
    new: str
    select: str    # pytest -k expression
    expect: str    # regex the failure output must match
    needs_fma: bool = False


MUTATIONS = [
    Mutation(
        "no-fma",
        "the forward rounds (x - mean) * scale before adding the shift instead of one FMA: "
        "the bit-equality check with the CPU kernel",
        "csrc/cuda/affine_kernels.cuh",
        "r.y.v[j] = static_cast<scalar_t>(fma_rn(v - p.mean, p.scale, p.shift));",
        "r.y.v[j] = static_cast<scalar_t>((v - p.mean) * p.scale + p.shift);",
        "test_emulated_layouts and float32 and contiguous",
        r"not bit-identical to the CPU kernel", needs_fma=True),
    Mutation(
        "row-stride",
        "the rows kernel steps C + 1 elements from row to row: the bounds and store-count checks",
        "csrc/cuda/affine_kernels.cuh",
        "return row * C + first;",
        "return row * (C + 1) + first;",
        "test_emulated_layouts and channels_last",
        r"outside every tensor of the op|stored twice|stored 0 times"),
    Mutation(
        "straddle",
        "a vector whose last element starts the next plane is taken for one inside the plane "
        "(off by one): that element gets its neighbour's channel, the bit-equality and oracle checks",
        "csrc/cuda/affine_kernels.cuh",
        "if (pos + N <= plane.d) {",
        "if (pos + N <= plane.d + 1) {",
        "test_emulated_layouts and contiguous",
        r"not bit-identical to the CPU kernel|exceeds the bound"),
    Mutation(
        "misaligned",
        "the vector width ignores the pointers' alignment: 16-byte accesses at 2-byte-aligned "
        "addresses, the alignment check (x86 would not fault, a GPU does)",
        "csrc/cuda/launch.h",
        "for (const void* p : ptrs) ok &= reinterpret_cast<uintptr_t>(p) % (vec * elem_size) == 0;",
        "for (const void* p : ptrs) (void)p;",
        "test_emulated_misaligned",
        r"misaligned \d+-byte (load|store)"),
    Mutation(
        "unwritten-table",
        "the forward's first launch writes the scales but not the parameter table the second "
        "reads: without the NaN pre-fill a recycled allocation could hold the right values",
        "csrc/cuda/frozen_bn_cuda_impl.h",
        "mutable_data_of<acc_t>(scale), entries, C);",
        "mutable_data_of<acc_t>(scale), nullptr, C);",
        "test_emulated_layouts and float16 and contiguous",
        r"NaN in different places|finite/non-finite pattern differs"),
    Mutation(
        "grid-stride",
        "the planes kernel's grid-stride loop skips every other step: elements never written, "
        "visible only on a device too small for one pass (the one-block emulated device)",
        "csrc/cuda/affine_kernels.cuh",
        "for (index_t base = static_cast<index_t>(t.block.x) * threads * UNROLL + t.thread.x; base < nvec;\n"
        "         base += step) {",
        "for (index_t base = static_cast<index_t>(t.block.x) * threads * UNROLL + t.thread.x; base < nvec;\n"
        "         base += 2 * step) {",
        "test_emulated_layouts and 2x8x33x17",
        r"stored 0 times"),
    Mutation(
        "sum-dropped-partial",
        "the affine backward's reduction skips each channel's last row of partials (one chunk "
        "of the data never summed): the exact sums on exact values",
        "csrc/cuda/affine_backward_kernels.cuh",
        "for (int64_t r = t.thread.x; r < rows; r += t.block_dim.x) {",
        "for (int64_t r = t.thread.x; r + 1 < rows; r += t.block_dim.x) {",
        "test_emulated_affine_exact_sums",
        r"AssertionError: sum_(grad|centered)|exceeds the bound"),
    Mutation(
        "sum-channel-offset",
        "a planes block files its partials under the next channel (each partial still stored "
        "once, so only the values show it): the exact sums and the oracle's bounds",
        "csrc/cuda/affine_backward_kernels.cuh",
        "      store1(row + c, sum_g);\n      store1(row + C + c, sum_gx);",
        "      store1(row + (c + 1) % C, sum_g);\n      store1(row + C + (c + 1) % C, sum_gx);",
        "test_emulated_affine_exact_sums and contiguous",
        r"AssertionError: sum_(grad|centered)|exceeds the bound"),
]


def cpu_uses_fma() -> bool:
    out = subprocess.run([sys.executable, "-c", "import torch, frozennorm; "
                          "print(torch.ops.frozennorm._cpu_capability())"],
                         cwd=ROOT, capture_output=True, text=True)
    return out.returncode == 0 and out.stdout.strip().startswith("AVX")


def plant(m: Mutation, work: Path) -> None:
    for name in ("csrc", "tests"):
        shutil.copytree(ROOT / name, work / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", work / "pyproject.toml")
    target = work / m.path
    text = target.read_text()
    count = text.count(m.old)
    if count != 1:
        raise RuntimeError(f"{m.name}: the snippet occurs {count} times in {m.path} (expected once)")
    target.write_text(text.replace(m.old, m.new))


def run(m: Mutation, keep: bool) -> tuple[bool, str]:
    work = Path(tempfile.mkdtemp(prefix=f"frozennorm-mutation-{m.name}-"))
    try:
        plant(m, work)
        env = dict(os.environ, PYTHONPATH=str(ROOT), FROZENNORM_EMULATION_CFLAGS="-O0",
                   TORCH_EXTENSIONS_DIR=str(work / "torch_extensions"), HYPOTHESIS_PROFILE="ci")
        start = time.time()
        out = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
             "tests/test_cuda_emulation.py", "-k", m.select],
            cwd=work, env=env, capture_output=True, text=True)
        log = out.stdout + out.stderr
        took = f"{time.time() - start:.0f} s"
        if out.returncode == 1 and re.search(m.expect, log):
            hits = [line for line in log.splitlines() if re.search(m.expect, line)]
            first = next((line for line in hits if line.startswith("E ")), hits[0])
            return True, f"caught ({took}): {first.strip()[:200]}"
        return False, f"NOT CAUGHT (pytest exit {out.returncode}, {took}); output tail:\n{log[-3000:]}"
    except Exception as e:  # noqa: BLE001  (a snippet gone, a copy failed: reported, not raised)
        return False, f"could not run: {e}"
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", action="append", help="run this mutation (repeatable)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--keep", action="store_true", help="keep the mutated copies")
    args = parser.parse_args(argv)
    todo = [m for m in MUTATIONS if not args.only or m.name in args.only]
    fma = cpu_uses_fma()
    results = {}
    for m in todo:
        if m.needs_fma and not fma:
            results[m.name] = (True, "skipped: the CPU kernels of this build round without FMA, "
                                     "so the bit-equality check does not run")
    runnable = [m for m in todo if m.name not in results]
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for m, result in zip(runnable, pool.map(lambda m: run(m, args.keep), runnable)):
            results[m.name] = result
    failed = 0
    for m in todo:
        ok, detail = results[m.name]
        failed += not ok
        print(f"[{'ok' if ok else 'FAIL'}] {m.name}: {m.what}\n       {detail}")
    print(f"{len(todo) - failed} of {len(todo)} mutations caught" if not failed
          else f"{failed} of {len(todo)} mutations NOT caught")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
