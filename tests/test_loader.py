"""Loading: compiled vs fallback, build records, the info command."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import frozennorm  # noqa: F401  (registers the ops)
from frozennorm import _loader, ops
from frozennorm._op import fallback

from oracle import DTYPES, fixed_samples, make_sample

ROOT = Path(__file__).resolve().parents[1]


def run_python(code, **env):
    full_env = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=full_env, cwd=str(ROOT / "tests"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_fallback_matches_compiled(dtype, layout):
    if not ops.COMPILED:
        pytest.skip("the compiled extension is not installed")
    s = make_sample([2, 8, 5, 6], dtype, layout, "mean_gg_std", seed=1)
    y, scale = torch.ops.frozennorm.frozen_bn(*s.args())
    y_ref, scale_ref = fallback.frozen_bn_fallback(*s.args())
    assert y_ref.stride() == y.stride()
    torch.testing.assert_close(scale_ref, scale, rtol=2**-22, atol=0)
    tol = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-6, torch.float64: 1e-14}[dtype]
    torch.testing.assert_close(y_ref.double(), y.double(), rtol=tol, atol=tol)
    g = torch.randn_like(y)
    torch.testing.assert_close(fallback.frozen_bn_backward_fallback(g, scale),
                               torch.ops.frozennorm.frozen_bn_backward(g, scale), rtol=tol, atol=tol)


def test_forced_fallback_backend_runs_and_is_silent():
    code = (
        "import warnings; warnings.simplefilter('error')\n"
        "import torch, frozennorm\n"
        "assert not frozennorm.ops.COMPILED\n"
        "m = frozennorm.FrozenBatchNorm2d(4)\n"
        "x = torch.randn(2, 4, 3, 3, requires_grad=True)\n"
        "m(x).sum().backward()\n"
        "assert torch.allclose(x.grad, torch.full_like(x, (1 + 1e-5) ** -0.5))\n"
        "print('ok')\n")
    r = run_python(code, FROZENNORM_BACKEND="fallback")
    assert r.returncode == 0, r.stderr
    assert "ok" in r.stdout


def test_missing_extension_falls_back_with_one_warning():
    code = (
        "import sys, warnings\n"
        "sys.modules['frozennorm._C'] = None  # as if the package was not compiled\n"
        "import torch, frozennorm\n"
        "assert not frozennorm.ops.COMPILED\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    m = frozennorm.FrozenBatchNorm2d(4)\n"
        "    for _ in range(3): m(torch.randn(2, 4, 3, 3))\n"
        "msgs = [str(x.message) for x in w if 'fallback' in str(x.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "print(msgs[0])\n")
    r = run_python(code, FROZENNORM_BACKEND="auto")
    assert r.returncode == 0, r.stderr
    assert "pure-PyTorch fallback" in r.stdout and "no-build-isolation" in r.stdout


def test_compiled_backend_required_but_missing_says_how_to_build():
    code = ("import sys\nsys.modules['frozennorm._C'] = None\nimport frozennorm\n")
    r = run_python(code, FROZENNORM_BACKEND="compiled")
    assert r.returncode != 0
    assert "installed without its compiled extension" in r.stderr
    assert "pip install --no-build-isolation" in r.stderr


def test_extension_built_for_another_torch_fails_with_rebuild_hint(monkeypatch):
    monkeypatch.setenv(_loader.BACKEND_ENV, "auto")
    monkeypatch.setattr(_loader, "build_info", lambda: {"torch_version": "1.0.0+cu999"})
    with pytest.raises(ImportError) as e:
        _loader.load_compiled()
    msg = str(e.value)
    assert "built for torch 1.0.0+cu999" in msg and torch.__version__ in msg
    assert "pip install --no-build-isolation" in msg


def test_bad_backend_value(monkeypatch):
    monkeypatch.setenv(_loader.BACKEND_ENV, "gpu-please")
    with pytest.raises(ImportError, match="is not one of"):
        _loader.requested_backend()


def test_schemas_of_fallback_match_compiled():
    """Every op: the schema the fallback defines is the one csrc/frozen_bn.cpp defines."""
    if not ops.COMPILED:
        pytest.skip("the compiled extension is not installed")
    defined = {name: str(getattr(torch.ops.frozennorm, name).default._schema)
               for name in ops.SCHEMAS}
    assert defined == {name: "frozennorm::" + schema for name, schema in ops.SCHEMAS.items()}
    assert len(defined) == 4


def test_cpu_kernels_run_on_all_torch_threads():
    """at::parallel_for, as compiled into the extension, uses torch's intra-op threads (a
    build without its parallel backend's flags runs every CPU kernel on one thread)."""
    if not ops.COMPILED:
        pytest.skip("the compiled extension is not installed")
    from frozennorm import _C

    if os.cpu_count() < 2:
        pytest.skip("one CPU")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert _C.parallel_workers(1 << 16) == 2
        torch.set_num_threads(1)
        assert _C.parallel_workers(1 << 16) == 1
    finally:
        torch.set_num_threads(threads)


def test_info_command_reports_build_and_backend():
    r = subprocess.run([sys.executable, "-m", "frozennorm.info"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for key in ("backend", "built for torch", "built with CUDA kernels", "GPU usable", "torch"):
        assert key in out
    if ops.COMPILED:
        info = _loader.build_info()
        assert info["torch_version"] == torch.__version__
        assert "compiled" in out
        if torch.cuda.is_available() and info["with_cuda"]:
            assert "compiled CUDA" in out


def test_other_devices_use_the_pytorch_kernel():
    """Devices without a compiled kernel get the composite one (meta shown here)."""
    s = fixed_samples("cpu")[0]
    y, scale = torch.ops.frozennorm.frozen_bn(*[a.to("meta") if torch.is_tensor(a) else a
                                               for a in s.args()])
    assert y.device.type == "meta" and y.shape == s.x.shape
