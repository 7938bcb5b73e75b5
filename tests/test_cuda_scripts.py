"""The GPU check's scripts run through here too, without a GPU: benchmarks/gpu_check.sh lists
each stage's commands and exits 0; the kernel driver and the kernel benchmark run their
calls on the CPU kernels (their numbers mean nothing there, their code paths are the GPU's)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import frozennorm

ROOT = Path(__file__).resolve().parents[1]
compiled = pytest.mark.skipif(not frozennorm.ops.COMPILED, reason="runs the compiled CPU kernels")


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the script runs for real")
def test_gpu_check_dry_run(tmp_path):
    out = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path)],
                         env=dict(os.environ, PYTHON=sys.executable), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    for stage, command in ((1, "pytest tests -m cuda -x"), (2, "--tool initcheck"), (3, "cuda_kernels.py")):
        log = (tmp_path / f"stage{stage}.log").read_text()
        assert f"stage {stage}: no CUDA GPU visible, skipped" in log and command in log
    assert "racecheck" not in out.stdout


@compiled
def test_kernel_driver_dry_run():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cuda_kernel_driver.py"), "--device", "cpu"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "results, OK" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]


@compiled
def test_cuda_kernels_benchmark_dry_run(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cuda_kernels.py"), "--device", "cpu",
                          "--mib", "1", "--reps", "1", "--rounds", "1", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads((tmp_path / "kernels.json").read_text())["rows"]
    assert len(rows) == 14 and all(r["seconds"] > 0 for r in rows)
    assert (tmp_path / "kernels.md").read_text().count("\n|") == 2 + 14  # header, rule, rows
