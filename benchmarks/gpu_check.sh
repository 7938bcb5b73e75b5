#!/usr/bin/env bash
# The GPU check, in stages of at most 10 minutes each (one command's limit): stages 1 and 3
# fit one 15-minute GPU window with the machine's start-up, stage 2 a second one. On the GPU machine, from the checkout (torch with CUDA,
# nvcc, pytest, hypothesis, torchvision, timm; no network):
#
#   bash benchmarks/gpu_check.sh OUT 1   build for this GPU's arch on all cores, the static
#                                        check of that build, the CUDA tests (-x)   ~4 min
#   bash benchmarks/gpu_check.sh OUT 2   compute-sanitizer memcheck (32- and 64-bit index
#                                        kernels) and initcheck on the kernel driver,
#                                        racecheck and synccheck on its affine part  ~6-7 min
#   bash benchmarks/gpu_check.sh OUT 3   the kernels' bandwidth, the quick op-level benchmark
#                                        (no torch.compile), the trainable-affine op
#                                        against BatchNorm, one end-to-end case       ~3 min
#   bash benchmarks/gpu_check.sh OUT     1, 2 and 3 in turn
#
# The estimates, and what they rest on, are in benchmarks/README.md ("CUDA: the GPU check").
# Each stage appends to OUT/stageN.log as it runs (Python unbuffered), and the benchmarks
# write under OUT/, so a run cut short still leaves what it did. Stage 1 builds in place
# (pip install -e); stages 2 and 3 use that build. Without a GPU each stage says what it
# would run and exits 0 (a dry run: CI runs it so).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/gpu}
STAGES=${2:-1 2 3}
PY=${PYTHON:-python}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

say() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }

has_gpu() { "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; }

# Runs (or, without a GPU, shows) one command of a stage; its status goes into `status`.
run() {
    if [ "$DRY" = 1 ]; then echo "  would run: $*"; return 0; fi
    say "$*"
    "$@" || { echo "FAILED (exit $?): $*"; status=1; }
}

sanitizer() {
    local cs
    cs=$(command -v compute-sanitizer || true)
    [ -z "$cs" ] && [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" ] && cs=${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer
    echo "${cs:-compute-sanitizer}"
}

stage1() {  # build, static check, CUDA tests
    run nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    run "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'cpus', __import__('os').cpu_count())"
    local arch
    arch=$([ "$DRY" = 1 ] && echo 9.0 || "$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
    if [ "$DRY" = 1 ]; then
        echo "  would run: FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=<this GPU's arch> MAX_JOBS=$(nproc) $PY -m pip install --no-deps --no-build-isolation -v -e . > $OUT/build.log"
    else
        say "build for sm_${arch/./} on $(nproc) cores (log: $OUT/build.log)"
        local t0=$SECONDS
        if ! FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=$(nproc) \
                "$PY" -m pip install --no-deps --no-build-isolation -v -e . > "$OUT/build.log" 2>&1; then
            tail -40 "$OUT/build.log"; echo "BUILD FAILED"; status=1; return
        fi
        grep -F "[frozennorm build]" "$OUT/build.log" | sort -u
        grep -iE "warning" "$OUT/build.log" | grep -v "pip\|setuptools\|Deprecat" | head -20
        echo "build took $((SECONDS - t0)) s"
    fi
    run "$PY" -m frozennorm.info
    run "$PY" .ci/cuda_static_check.py
    run "$PY" -m pytest tests -m cuda -x -q -p no:cacheprovider -rs --durations=15 \
        --junitxml="$OUT/cuda_tests.xml"
}

stage2() {  # compute-sanitizer over every kernel variant; racecheck and synccheck over the
            # only kernels with shared memory and barriers (the affine backward's sums)
    local cs
    cs=$(sanitizer)
    run "$cs" --tool memcheck --error-exitcode 9 "$PY" benchmarks/cuda_kernel_driver.py
    run "$cs" --tool memcheck --error-exitcode 9 "$PY" benchmarks/cuda_kernel_driver.py --index64
    run "$cs" --tool initcheck --error-exitcode 9 "$PY" benchmarks/cuda_kernel_driver.py
    run "$cs" --tool racecheck --error-exitcode 9 "$PY" benchmarks/cuda_kernel_driver.py --only-affine
    run "$cs" --tool synccheck --error-exitcode 9 "$PY" benchmarks/cuda_kernel_driver.py --only-affine
}

stage3() {  # the predictions of benchmarks/README.md ("CUDA") against the GPU
    run "$PY" benchmarks/cuda_kernels.py --out "$OUT/kernels"
    run "$PY" -m frozennorm.bench --device cuda --ops-only \
        --contenders clone,frozennorm,bn_eval,torchvision,detectron2 --no-progress --out "$OUT/bench_ops"
    run "$PY" benchmarks/affine_backward.py --device cuda --shape det-c3,cls-c3,cls-c5 \
        --dtype float32,bfloat16 --passes 1 --out "$OUT/affine"
    run "$PY" -m frozennorm.bench --device cuda --e2e-only --e2e-model fpn --e2e-mode training \
        --e2e-dtype bfloat16 --no-progress --out "$OUT/bench_e2e" \
        --e2e-variants bn_eval,torchvision,frozennorm,frozennorm_fold,bn_eval_affine,frozennorm_affine,frozennorm_affine_fuse
}

DRY=0
has_gpu || DRY=1
overall=0
for n in $STAGES; do
    case $n in 1|2|3) ;; *) echo "unknown stage $n (1, 2 or 3)"; exit 2 ;; esac
    status=0
    {
        if [ "$DRY" = 1 ]; then
            echo "stage $n: no CUDA GPU visible, skipped; it would run:"
        else
            say "stage $n on $(hostname)"
        fi
        t0=$SECONDS
        "stage$n"
        [ "$DRY" = 1 ] || say "stage $n done in $((SECONDS - t0)) s: status $status"
        echo "$status" > "$OUT/stage$n.status"
    } 2>&1 | tee -a "$OUT/stage$n.log"
    s=$(cat "$OUT/stage$n.status" 2>/dev/null || echo 1)
    [ "$s" = 0 ] || overall=1
done
exit $overall
