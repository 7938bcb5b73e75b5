#!/usr/bin/env bash
# GPU verification in one command (an H100/H200 machine with torch, pytest, hypothesis, nvcc,
# compute-sanitizer): build for this GPU, run the CUDA tests, compute-sanitizer memcheck and
# racecheck over every kernel variant, and the benchmark. Everything is logged to OUT.
#
#   bash benchmarks/gpu_check.sh [OUT]        (default OUT: benchmarks/results/gpu)
#
# OUT receives gpu_check.log (device, driver, versions, build, tests, sanitizer) and the
# benchmark's results.json / results.md / plots under OUT/bench (op level + R50-FPN end to
# end), OUT/bench_resnet50 (ResNet-50 body end to end) and OUT/bench_compiled (training
# steps against torch.compile, both models).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/gpu}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
status=0
step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }

step "device"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
python -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
ARCH=$(python -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")

step "build (TORCH_CUDA_ARCH_LIST=$ARCH)"
FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS=$(nproc) \
    python -m pip install --no-deps --no-build-isolation -v -e . > "$OUT/build.txt" 2>&1 \
    || { tail -50 "$OUT/build.txt"; echo "BUILD FAILED"; exit 1; }
grep -F "[frozennorm build]" "$OUT/build.txt"; rm -f "$OUT/build.txt"
python -m frozennorm.info

step "CUDA tests"
python -m pytest tests -m cuda -q -p no:cacheprovider -x || status=1

step "compute-sanitizer memcheck"
compute-sanitizer --tool memcheck --error-exitcode 9 python benchmarks/cuda_kernel_driver.py || status=1
step "compute-sanitizer racecheck"
compute-sanitizer --tool racecheck --error-exitcode 9 python benchmarks/cuda_kernel_driver.py || status=1

step "benchmark"
python -m frozennorm.bench --device cuda --out "$OUT/bench" || status=1
# (separate runs, so that what finished is written even if the time runs out later)
step "benchmark: end to end, ResNet-50 body"
python -m frozennorm.bench --device cuda --e2e-only --e2e-model resnet50 \
    --out "$OUT/bench_resnet50" || status=1
step "benchmark: end to end against torch.compile (training, float32)"
python -m frozennorm.bench --device cuda --e2e-only --e2e-model fpn,resnet50 \
    --e2e-mode training --e2e-dtype float32 \
    --e2e-variants torchvision,frozennorm_fold,compiled_tv,compiled_frozennorm,identity \
    --out "$OUT/bench_compiled" || status=1

step "done: status $status"
exit $status
