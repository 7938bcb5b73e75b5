"""Loading: compiled vs fallback, build records, the info command."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import frozennorm  # noqa: F401  (registers the ops)
from frozennorm import _loader, ops
from frozennorm._op import fallback

from oracle import DTYPES, compute_eps, fixed_samples, make_sample, oracle_terms, ulp

ROOT = Path(__file__).resolve().parents[1]


def run_python(code, **env):
    """``python -c code`` importing this checkout's frozennorm (whatever else is installed)."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    full_env = dict(os.environ, PYTHONPATH=path, **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=full_env, cwd=str(ROOT / "tests"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_fallback_matches_compiled(dtype, layout):
    """The fallback computes the kernels' formula with torch's ops, without their fused
    multiply-add: its results are the kernels' up to a rounding each of the scale (an ulp
    apart in some channels), of the product (x - mean) * scale and of the result, as the
    fallback's warning says; the backward (one product) is the same."""
    if not ops.COMPILED:
        pytest.skip("the compiled extension is not installed")
    s = make_sample([2, 8, 5, 6], dtype, layout, "mean_gg_std", seed=1)
    y, scale = torch.ops.frozennorm.frozen_bn(*s.args())
    y_ref, scale_ref = fallback.frozen_bn_fallback(*s.args())
    assert y_ref.stride() == y.stride()
    torch.testing.assert_close(scale_ref, scale, rtol=2**-22, atol=0)
    bound = ulp(y.double(), dtype) + 2 * compute_eps(dtype) * oracle_terms(*s.args())
    assert ((y_ref.double() - y.double()).abs() <= bound).all()
    g = torch.randn_like(y)
    gi = torch.ops.frozennorm.frozen_bn_backward(g, scale)
    assert torch.equal(fallback.frozen_bn_backward_fallback(g, scale), gi)  # one product


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
    package = str(ROOT / "frozennorm")
    # the real reason, with the path of the tree that was imported, and a command for a checkout
    assert "pure-PyTorch fallback" in r.stdout and f"no compiled extension (_C) in {package}" in r.stdout
    assert f"cd {ROOT} && pip install --no-build-isolation -e ." in r.stdout


def test_compiled_backend_required_but_missing_says_how_to_build():
    code = ("import sys\nsys.modules['frozennorm._C'] = None\nimport frozennorm\n")
    r = run_python(code, FROZENNORM_BACKEND="compiled")
    assert r.returncode != 0
    assert "FROZENNORM_BACKEND=compiled, but the compiled ops cannot be used" in r.stderr
    assert "no compiled extension (_C)" in r.stderr and "pip install --no-build-isolation" in r.stderr


@pytest.fixture
def loader(monkeypatch):
    """_loader with its recorded problem restored afterwards, a matching build record and
    the backend left to choose."""
    monkeypatch.setattr(_loader, "_problem", _loader.load_problem())
    monkeypatch.setenv(_loader.BACKEND_ENV, "auto")
    monkeypatch.setattr(_loader, "build_info", lambda: {"torch_version": torch.__version__})
    return _loader


def _failing_import(message):
    def fail(name):
        raise ImportError(message)
    return fail


def test_extension_built_for_another_torch_falls_back_saying_so(loader, monkeypatch):
    monkeypatch.setattr(loader, "build_info", lambda: {"torch_version": "1.0.0+cu999"})
    assert loader.load_compiled() is False
    problem = loader.load_problem()
    assert problem.kind == "torch mismatch"
    assert "built for torch 1.0.0+cu999" in problem.cause and torch.__version__ in problem.cause
    assert f"cd {ROOT} && pip install --no-build-isolation -e ." in problem.fix
    monkeypatch.setenv(loader.BACKEND_ENV, "compiled")
    with pytest.raises(ImportError, match="built for torch 1.0.0"):
        loader.load_compiled()


@pytest.mark.parametrize("message,kind,says", [
    ("/x/_C.so: undefined symbol: _ZN10frozennorm3cpu6AVX2_220affine_dense_avx2ERKNS0_7ProblemE",
     "broken build", ["incomplete", "frozennorm's own functions", "not a torch mismatch",
                      "_ZN10frozennorm3cpu6AVX2_220affine_dense_avx2ERKNS0_7ProblemE"]),
    ("/x/_C.so: undefined symbol: _ZN3c1019UndefinedTensorImpl10_singletonE",
     "torch mismatch", ["from torch", "built against a different torch"]),
    ("libc10_cuda.so: cannot open shared object file: No such file or directory",
     "torch mismatch", ["libc10_cuda.so", "CPU-only torch"]),
    ("/lib/libstdc++.so.6: version `GLIBCXX_3.4.32' not found", "load failed",
     ["failed to load", "GLIBCXX_3.4.32"]),
])
def test_load_errors_name_their_cause(loader, monkeypatch, message, kind, says):
    monkeypatch.setattr(loader.importlib, "import_module", _failing_import(message))
    assert loader.load_compiled() is False
    problem = loader.load_problem()
    assert problem.kind == kind, problem
    for text in says:
        assert text in str(problem), problem
    assert "pip install --no-build-isolation" in problem.fix


def test_broken_build_names_the_demangled_symbol(loader, monkeypatch):
    if loader.shutil.which("c++filt") is None:
        pytest.skip("no c++filt")
    symbol = "_ZN10frozennorm3cpu17affine_dense_avx2Ev"
    monkeypatch.setattr(loader.importlib, "import_module",
                        _failing_import(f"/x/_C.so: undefined symbol: {symbol}"))
    loader.load_compiled()
    assert "frozennorm::cpu::affine_dense_avx2()" in loader.load_problem().cause


def test_source_tree_shadowing_a_compiled_install_says_so(loader, monkeypatch, tmp_path):
    site = tmp_path / "site-packages"
    (site / "frozennorm").mkdir(parents=True)
    (site / "frozennorm" / f"_C{loader.EXTENSION_SUFFIXES[0]}").write_bytes(b"")
    monkeypatch.setattr(sys, "path", [str(ROOT), str(site)])
    monkeypatch.setattr(loader, "install_source", lambda: None)
    monkeypatch.setattr(loader.importlib, "import_module", _raise_not_found)
    assert loader.load_compiled() is False
    problem = loader.load_problem()
    assert problem.kind == "shadowed"
    assert str(ROOT / "frozennorm") in problem.cause and str(site / "frozennorm") in problem.cause
    assert "pip install --no-build-isolation -e ." in problem.fix and "another directory" in problem.fix


def _raise_not_found(name):
    raise ModuleNotFoundError(f"No module named {name!r}", name=name)


@pytest.mark.parametrize("source,hint", [
    ({"kind": "wheel", "url": "file:///w/frozennorm-0.1.0+pt2141cu130-cp311-linux_x86_64.whl",
      "editable": False, "path": None},
     "pip install torch==2.14.1) or a frozennorm wheel built for yours"),
    ({"kind": "vcs", "url": "git+https://example.org/frozennorm.git@abc123", "editable": False,
      "path": None},
     "pip install --no-build-isolation --no-deps --force-reinstall "
     "git+https://example.org/frozennorm.git@abc123"),
    ({"kind": "archive", "url": "file:///gone/frozennorm-0.1.0.tar.gz", "editable": False,
      "path": "/gone/frozennorm-0.1.0.tar.gz"},
     "from its source (a checkout, an sdist or a git URL): pip install --no-build-isolation "
     "--no-deps --force-reinstall <source>"),
    (None, "--force-reinstall <source>"),
])
def test_rebuild_hint_outside_a_checkout(monkeypatch, source, hint):
    """Outside a checkout the hint reinstalls from where frozennorm came from (never from an
    index that does not have it)."""
    monkeypatch.setattr(_loader, "checkout_root", lambda: None)
    monkeypatch.setattr(_loader, "install_source", lambda: source)
    assert hint in _loader.rebuild_hint("2.14.1+cu130")


def test_install_source_reads_pips_record(monkeypatch, tmp_path):
    from importlib import metadata

    class Dist:
        def __init__(self, record):
            self.record = record

        def read_text(self, name):
            return self.record if name == "direct_url.json" else None

        def locate_file(self, name):
            return tmp_path / "site-packages" / name

    records = {
        '{"url": "https://example.org/f.git", "vcs_info": {"vcs": "git", "commit_id": "abc"}}':
            ("vcs", "git+https://example.org/f.git@abc", False),
        '{"url": "file:///src/frozennorm", "dir_info": {"editable": true}}':
            ("directory", "file:///src/frozennorm", True),
        '{"url": "file:///d/frozennorm-0.1.0-cp311-linux_x86_64.whl", "archive_info": {}}':
            ("wheel", "file:///d/frozennorm-0.1.0-cp311-linux_x86_64.whl", False),
    }
    monkeypatch.setattr(_loader, "_PACKAGE_DIR", (tmp_path / "site-packages" / "frozennorm").resolve())
    for record, (kind, url, editable) in records.items():
        monkeypatch.setattr(metadata, "distribution", lambda name, r=record: Dist(r))
        got = _loader._installed_source()
        assert (got["kind"], got["url"], got["editable"]) == (kind, url, editable)
        # the record is for the imported package unless it is an editable install elsewhere
        assert (_loader.install_source() is None) == editable


def test_the_compiled_build_is_what_runs():
    """When a compiled frozennorm exists but this process runs the fallback (a source tree
    shadowing it, a build for another torch, a broken build), the suite says so here instead
    of silently testing the fallback."""
    problem = _loader.load_problem()
    if problem is not None and problem.kind != "not built":
        pytest.fail(f"the tests run the pure-PyTorch fallback: {problem}")


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
    assert len(defined) == 5


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


def _package_copy(tmp_path, build_record=None):
    """The Python files of frozennorm in tmp_path/frozennorm (no compiled extension)."""
    package = tmp_path / "frozennorm"
    package.mkdir()
    for source in (ROOT / "frozennorm").rglob("*.py"):
        target = package / source.relative_to(ROOT / "frozennorm")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(source.read_text())
    if build_record is not None:
        (package / "_build_info.json").write_text(json.dumps(build_record))
    return package


def _info_in(directory, **env):
    """`python -m frozennorm.info` run in ``directory`` (which it then imports frozennorm from)."""
    return subprocess.run([sys.executable, "-m", "frozennorm.info"], capture_output=True,
                          text=True, cwd=str(directory), env=dict(os.environ, **env))


def test_info_reports_a_torch_mismatch_instead_of_failing(tmp_path):
    _package_copy(tmp_path, {"torch_version": "1.0.0", "with_cuda": False})
    r = _info_in(tmp_path, FROZENNORM_BACKEND="auto")
    assert r.returncode == 0, r.stderr
    assert "fallback" in r.stdout and "torch mismatch: " in r.stdout and "built for torch 1.0.0" in r.stdout
    assert "what to do" in r.stdout


def test_info_reports_a_broken_build_instead_of_failing(tmp_path):
    """A real library with one of frozennorm's own symbols undefined, as a build that left a
    source file out produces: reported as a broken build naming the symbol."""
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None or not sys.platform.startswith("linux"):
        pytest.skip("needs a C++ compiler on Linux")
    package = _package_copy(tmp_path, {"torch_version": torch.__version__, "with_cuda": False})
    source = tmp_path / "broken.cpp"
    source.write_text("namespace frozennorm { void left_out(); }\n"
                      "extern \"C\" void PyInit__C() { frozennorm::left_out(); }\n")
    library = package / f"_C{_loader.EXTENSION_SUFFIXES[0]}"
    subprocess.run([compiler, "-shared", "-fPIC", str(source), "-o", str(library)], check=True)
    r = _info_in(tmp_path, FROZENNORM_BACKEND="auto")
    assert r.returncode == 0, r.stderr
    assert "broken build: " in r.stdout and "left_out" in r.stdout and "not a torch mismatch" in r.stdout
