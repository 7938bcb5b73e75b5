"""Plants plausible bugs in a copy of the package and checks that the tests catch each one.

A test suite that passes says little until it is shown to fail on wrong code. Each mutant
below is a bug that once got past the tests (an op that ignores eps, a fold computed in
float32, ...): the script copies the working tree (committed or not, as `git ls-files`
lists it) to a temporary folder, builds it there with the baseline CPU loops alone (no
CUDA, no AVX builds: the mutants live in code every build shares; torch's kernels are
capped to their baseline too, ATEN_CPU_CAPABILITY=default), runs the tests that
must catch the mutants on the unmutated copy (they must pass), then plants each mutant in
turn, rebuilds when it touches csrc/, and runs its tests: every test named for a mutant must
fail. A mutant whose text is no longer in the source fails the check too (update it here
with the code it stands for).

    python .ci/mutation_check.py              # every mutant (.ci/run runs this)
    python .ci/mutation_check.py --list       # what the mutants are
    python .ci/mutation_check.py eps fold_fp32   # some of them
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Sequence, Set, Tuple

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    what: str
    #: (file, text, replacement): the text must occur exactly once in the file
    edits: Tuple[Tuple[str, str, str], ...]
    #: pytest node ids: each must fail
    must_fail: Tuple[str, ...]

    @property
    def needs_build(self) -> bool:
        return any(path.startswith("csrc/") for path, _, _ in self.edits)


OP, ACT, MOD = "tests/test_op.py::", "tests/test_act_op.py::", "tests/test_modules.py::"
FOLD = "tests/test_fold.py::"
DTYPES = ("float16", "bfloat16", "float32", "float64")
MUTANTS = [
    Mutant(
        "eps", "the op ignores eps (scale = weight / sqrt(var))",
        (("csrc/cpu/frozen_bn_cpu.cpp",
          "out[c] = wc / std::sqrt(static_cast<acc_t>(v[c]) + e);",
          "out[c] = wc / std::sqrt(static_cast<acc_t>(v[c])); (void)e;"),),
        ("tests/test_models.py::test_torchvision_classification[resnet18]",
         "tests/test_models.py::test_timm[efficientnet_b0]",
         "tests/test_models.py::test_timm[dla34]",
         f"{FOLD}test_inference_shift_on_bn_fuses",
         f"{FOLD}test_timm_models",
         f"{FOLD}test_fold_after_fuse",
         f"{FOLD}test_inference_fold_survives_a_duck_typed_fuser",
         *(f"{OP}test_matches_batchnorm_eval[{d}-cpu]" for d in DTYPES),
         f"{MOD}test_16_bit_inputs_match_batchnorm_rounded_once"
         "[FrozenBatchNorm2d-BatchNorm2d-shape2-float16]")),
    Mutant(
        "fold_fp32", "fold_frozen_bn's inference fold computed in float32, not float64",
        (("frozennorm/fold.py",
          """    s = channel_scale(stats["weight"].detach(), stats["running_var"].detach(), stats["eps"],
                      torch.float64)
    weight = _times_channel(conv.weight.detach().double(), s)
    conv_bias = conv.bias.detach().double() if conv.bias is not None else 0.0
    shift = ((conv_bias - stats["running_mean"].detach().double()) * s
             + stats["bias"].detach().double())""",
          """    s = channel_scale(stats["weight"].detach(), stats["running_var"].detach(), stats["eps"],
                      torch.float32)
    weight = _times_channel(conv.weight.detach().float(), s)
    conv_bias = conv.bias.detach().float() if conv.bias is not None else 0.0
    shift = ((conv_bias - stats["running_mean"].detach().float()) * s
             + stats["bias"].detach().float())"""),),
        (f"{FOLD}test_inference_shift_on_bn_fuses",
         f"{FOLD}test_timm_models",
         f"{FOLD}test_fold_after_fuse",
         f"{FOLD}test_inference_fold_survives_a_duck_typed_fuser",
         f"{FOLD}test_training_fold_refuses_a_duck_typed_fuser_then_folds_for_inference",
         f"{FOLD}test_conv_variants[float32-inference]",
         f"{FOLD}test_conv_variants[float64-inference]")),
    Mutant(
        "chunk_channel", "the CPU loops restart the channel index at each parallel chunk",
        (("csrc/cpu/channel_walk.h",
          "int64_t c = inner == 1 ? begin % C : q % C;",
          "int64_t c = 0;"),),
        (*(f"{OP}test_forward_backward_match_oracle[{d}-cpu]" for d in DTYPES),
         f"{OP}test_parallel_chunks_cpu[shape0-contiguous-float32-3]",
         f"{OP}test_parallel_chunks_cpu[shape2-channels_last-bfloat16-2]",
         f"{OP}test_parallel_chunks_cpu[shape3-contiguous-float16-2]",
         f"{ACT}test_parallel_chunks_cpu[channels_last-relu-bfloat16]",
         f"{ACT}test_parallel_chunks_cpu[contiguous-silu-float32]")),
    Mutant(
        "round16", "float16/bfloat16 results truncated instead of rounded to nearest even",
        (("csrc/cpu/channel_walk.h",
          "    const auto v = from_float<T>(in[0], in[1]);",
          "    const AccVec cut(c10::bit_cast<float>(\n"
          "        std::is_same_v<T, at::BFloat16> ? 0xFFFF0000u : 0xFFFFE000u));\n"
          "    const auto v = from_float<T>(in[0] & cut, in[1] & cut);"),),
        (f"{OP}test_matches_batchnorm_eval[float16-cpu]",
         f"{OP}test_matches_batchnorm_eval[bfloat16-cpu]",
         *(f"{MOD}test_16_bit_inputs_match_batchnorm_rounded_once"
           f"[FrozenBatchNorm2d-BatchNorm2d-shape2-{d}]" for d in DTYPES[:2]),
         *(f"{OP}test_forward_backward_match_oracle[{d}-cpu]" for d in DTYPES[:2]))),
    Mutant(
        "residual_dropped",
        "FrozenBatchNorm.forward(x, residual, activation='identity') drops the residual",
        (("frozennorm/modules.py",
          """        if residual is None and activation == "identity":
            return frozen_batch_norm(input, mean, var, weight, bias, self.eps)""",
          """        if activation == "identity":
            return frozen_batch_norm(input, mean, var, weight, bias, self.eps)"""),),
        tuple(f"{MOD}test_forward_with_residual_and_activation[True-{d}-identity]"
              for d in DTYPES)),
    Mutant(
        "relu6_unclamped", "ReLU6's clamp at 6 left out (max(x, 0) only)",
        (("csrc/rules.h",
          "return M::clamp(a, T(0), T(6));",
          "return M::clamp_min(a, T(0));"),),
        (f"{ACT}test_matches_unfused_sequence[contiguous-False-relu6-float32-cpu]",
         f"{ACT}test_matches_unfused_sequence[channels_last-True-relu6-bfloat16-cpu]",
         f"{ACT}test_parallel_chunks_cpu[contiguous-relu6-float16]",
         "tests/test_fuse.py::test_patterns",
         f"{MOD}test_forward_with_residual_and_activation[False-float32-relu6]",
         f"{MOD}test_forward_with_residual_and_activation[True-bfloat16-relu6]")),
    Mutant(
        "revert_fp32", "revert_frozen_bn casts the statistics to float32",
        (("frozennorm/convert.py",
          """        bn.running_mean = mean.detach().clone()
        bn.running_var = var.detach().clone()""",
          """        bn.running_mean = mean.detach().clone().float()
        bn.running_var = var.detach().clone().float()"""),),
        tuple(f"tests/test_convert.py::test_revert_keeps_the_statistics_dtype[{d}]"
              for d in ("float64", "float16", "bfloat16"))),
]


def log(msg: str) -> None:
    print(f"[mutation check] {msg}", flush=True)


def copy_tree(dest: Path) -> None:
    """The working tree's files as git sees them (tracked and untracked, not ignored)."""
    listed = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        check=True, capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def build_env() -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("FORCE_CUDA", "TORCH_CUDA_ARCH_LIST", "FROZENNORM_BACKEND")}
    # torch's own kernels on their baseline too: the fused ops equal torch's unfused
    # sequence bit for bit when both run the same vector code (SiLU's exp differs by an ulp
    # between at::vec's baseline and AVX-512 builds)
    env.update(USE_CUDA="0", FROZENNORM_MAX_CPU_CAPABILITY="default",
               ATEN_CPU_CAPABILITY="default", MAX_JOBS=env.get("MAX_JOBS", "2"))
    return env


def build(copy: Path) -> float:
    start = time.monotonic()
    r = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=copy,
                       env=build_env(), capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"build of the copy failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    return time.monotonic() - start


def failed_tests(copy: Path, tests: Sequence[str]) -> Tuple[Set[str], str]:
    """Runs ``tests`` (pytest node ids) in the copy: the ids that failed or errored, and
    pytest's summary line."""
    env = build_env()
    env["PYTHONPATH"] = str(copy)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE",
                        "-m", "slow or not slow", *sorted(set(tests))],
                       cwd=copy, env=env, capture_output=True, text=True)
    lines = r.stdout.splitlines()
    failed = {line.split()[1] for line in lines if line.startswith(("FAILED ", "ERROR "))}
    summary = lines[-1].strip("= ") if lines else ""
    if r.returncode not in (0, 1) or not summary or "deselected" in summary:
        sys.exit(f"pytest did not run the tests as named ({r.returncode}):\n"
                 f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return failed, summary


def check_imports_copy(copy: Path) -> None:
    code = "import frozennorm, sys; print(frozennorm.__file__); assert frozennorm.ops.COMPILED"
    env = build_env()
    env["PYTHONPATH"] = str(copy)
    r = subprocess.run([sys.executable, "-c", code], cwd=copy, env=env, capture_output=True,
                       text=True)
    if r.returncode != 0 or not r.stdout.strip().startswith(str(copy)):
        sys.exit(f"the copy's compiled frozennorm is not the one imported: {r.stdout}{r.stderr}")


def apply(copy: Path, mutant: Mutant) -> Dict[Path, str]:
    originals: Dict[Path, str] = {}
    for rel, old, new in mutant.edits:
        path = copy / rel
        current = path.read_text()
        originals.setdefault(path, current)
        if current.count(old) != 1:
            sys.exit(f"mutant {mutant.name}: its text occurs {current.count(old)} times in "
                     f"{rel}, not once: update .ci/mutation_check.py with the code it stands for")
        path.write_text(current.replace(old, new))
    return originals


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = parser.parse_args(argv)
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:18} {m.what}")
        return 0
    unknown = set(args.names) - {m.name for m in MUTANTS}
    if unknown:
        parser.error(f"unknown mutants: {', '.join(sorted(unknown))}")
    # the Python mutants first, on the unmutated build; then one build per C++ mutant
    mutants = sorted((m for m in MUTANTS if not args.names or m.name in args.names),
                     key=lambda m: m.needs_build)
    start = time.monotonic()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the copy is removed on the way out
    with tempfile.TemporaryDirectory(prefix="frozennorm-mutants-") as tmp:
        copy = Path(tmp) / "frozennorm"
        copy_tree(copy)
        log(f"copy of {ROOT} in {copy}; building the baseline CPU loops alone")
        log(f"build: {build(copy):.0f} s")
        check_imports_copy(copy)
        everything = [t for m in mutants for t in m.must_fail]
        failed, summary = failed_tests(copy, everything)
        if failed:
            log("the unmutated copy fails tests (they must pass before they can catch anything):")
            for f in sorted(failed):
                log(f"  {f}")
            return 1
        log(f"unmutated: {summary} ({time.monotonic() - start:.0f} s so far)")
        survivors = []
        for m in mutants:
            t0 = time.monotonic()
            originals = apply(copy, m)
            took = f"rebuilt in {build(copy):.0f} s, " if m.needs_build else ""
            failed, summary = failed_tests(copy, m.must_fail)
            missed = [t for t in m.must_fail if t not in failed]
            log(f"{m.name} ({m.what}): {took}{summary} ({time.monotonic() - t0:.0f} s)")
            for f in sorted(failed):
                log(f"    failed: {f}")
            for t in missed:
                log(f"    NOT CAUGHT by {t} (it passed)")
            if missed:
                survivors.append(m.name)
            for path, text in originals.items():
                path.write_text(text)
    log(f"{len(mutants) - len(survivors)} of {len(mutants)} mutants caught by every test named "
        f"for them, in {time.monotonic() - start:.0f} s")
    if survivors:
        log(f"survived (some named test passed): {', '.join(survivors)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
