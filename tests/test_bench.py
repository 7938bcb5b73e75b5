"""``python -m frozennorm.bench``: a smoke run for a handful of iterations, asserting the
structure of what it reports, never its speed."""
import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import frozennorm
import frozennorm.bench
from frozennorm.bench import cases, report, timing
from frozennorm.bench.contenders import CONTENDERS, PEERS

from conftest import requires_cuda

# every eager contender (torch.compile's takes an Inductor compile: test_compiled_contender)
EAGER = [c for c in CONTENDERS if c not in ("clone", "compiled_tv")]
SMOKE = ["--shape", "tiny", "--dtype", "fp32", "--layout", "nchw", "--repeat", "1",
         "--min-run-time", "0.001", "--e2e-size", "1x32x32", "--no-progress",
         "--contenders", ",".join(EAGER),
         # (a training step of the R50-FPN backbone takes seconds on 2 cores at any input
         # size, its weights' gradients dominate: training end to end is a slow test)
         "--e2e-mode", "inference",
         "--cpu-malloc", "system"]  # leave this process's heap as it is


ROOT = Path(__file__).resolve().parent.parent


def checkout_env():
    """The environment of a script run from benchmarks/: this checkout's frozennorm first
    (python puts the script's own folder first on sys.path, not the checkout)."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


def _forbidden(*args, **kwargs):
    raise AssertionError("the CPU benchmark called a CUDA API")


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    """One CPU smoke run with every CUDA entry point the benchmark uses disabled."""
    out = tmp_path_factory.mktemp("bench")
    with pytest.MonkeyPatch.context() as mp:
        for name in ("synchronize", "Event", "max_memory_allocated", "memory_allocated",
                     "reset_peak_memory_stats", "get_device_properties", "get_device_name"):
            mp.setattr(torch.cuda, name, _forbidden)
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = frozennorm.bench.main(SMOKE + ["--device", "cpu", "--out", str(out)])
    assert rc == 0, err.getvalue()[-4000:]  # main prints the error it returns 2 for
    return out, json.loads((out / "results.json").read_text())


def test_results_json(cpu_run):
    _, doc = cpu_run
    meta = doc["metadata"]
    for key in ("device_name", "torch", "torchvision", "cuda", "torch_threads", "frozennorm",
                "frozennorm_backend", "command", "date", "memory_method", "timer"):
        assert key in meta
    assert meta["device"] == "cpu"
    rows = doc["op_level"]
    assert {(r["mode"], r["contender"]) for r in rows} == {
        (m, c) for m in cases.MODES for c in ["clone"] + EAGER}, [
        (r["mode"], r["contender"], r["status"], r.get("error")) for r in rows]
    by = {(r["mode"], r["contender"]): r for r in rows}
    for mode in cases.MODES:
        for name in ("clone", "frozennorm", "bn_eval", "torchvision", "detectron2"):
            row = by[(mode, name)]
            assert row["status"] == "ok", row["error"]
            assert row["time"]["median"] > 0 and row["gbps"] > 0 and row["x_floor"] > 0
            assert row["launches"] is None
        assert by[(mode, "clone")]["x_floor"] == 1.0
    channels = cases.SHAPES["tiny"][1]
    assert by[("training", "frozennorm")]["saved_bytes"] == channels * 4  # the fp32 scale only
    assert by[("training", "bn_eval")]["saved_bytes"] >= 64 * 7 * 7 * 4  # the input
    assert by[("inference", "frozennorm")]["saved_bytes"] is None
    e2e = doc["end_to_end"]
    assert {(r["model"], r["mode"], r["variant"]) for r in e2e} == {
        ("fpn", "inference", v)
        for v in ("bn_eval", "torchvision", "frozennorm", "frozennorm_fold", "identity")}
    for r in e2e:
        assert r["status"] == "ok", r["error"]
        assert r["time"]["median"] > 0 and r["bn_share"] is not None
    assert doc["summary_large"] == []  # the smoke shape is far below 16 MiB
    summary = {(s["dtype"], s["layout"], s["mode"]): s for s in doc["summary"]}
    assert set(summary) == {("float32", "nchw", m) for m in cases.MODES}
    assert all(p in summary[("float32", "nchw", "inference")] for p in PEERS[:-1])


@pytest.mark.slow
def test_compiled_contender(tmp_path):
    """torch.compile of torchvision's module, timed like the others (an Inductor compile
    per case); a failure to compile (no compiler) is recorded, not fatal."""
    argv = SMOKE[:SMOKE.index("--contenders")] + [
        "--contenders", "compiled_tv", "--ops-only", "--cpu-malloc", "system", "--device",
        "cpu", "--out", str(tmp_path), "--no-plots"]
    assert frozennorm.bench.main(argv) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["op_level"]
    compiled = [r for r in rows if r["contender"] == "compiled_tv"]
    assert len(compiled) == len(cases.MODES)
    assert all(r["status"] == "ok" or r["error"] for r in compiled)


def test_markdown_and_plots(cpu_run):
    out, _ = cpu_run
    md = (out / "results.md").read_text()
    assert "## Headline" in md and "## End to end" in md and "| tiny 1x64x7x7 |" in md
    pytest.importorskip("matplotlib")
    for name in ("op_level_float32.png", "end_to_end.png"):
        assert (out / name).stat().st_size > 1000
        assert f"]({name})" in md


def test_render_from_json(cpu_run, tmp_path):
    out, doc = cpu_run
    assert frozennorm.bench.main(["--from-json", str(out / "results.json"), "--out",
                                  str(tmp_path), "--no-plots"]) == 0
    again = json.loads((tmp_path / "results.json").read_text())
    assert again == doc  # the JSON round-trips: nothing lost, nothing re-measured
    assert (tmp_path / "results.md").read_text().startswith("# frozennorm benchmark")


def _faked_load_run(tmp_path, monkeypatch, loads, extra=()):
    """A small CPU run (two op-level cases, one end-to-end configuration) with the load probe
    faked: the i-th timed case reports ``loads[i]`` CPU cores kept busy by other processes."""
    probes = iter(loads)
    monkeypatch.setattr(timing, "foreign_load", lambda work: (work(), next(probes)))
    out = tmp_path / "run"
    err, std = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(std):
        rc = frozennorm.bench.main(
            ["--shape", "tiny", "--dtype", "fp32", "--layout", "nchw", "--repeat", "1",
             "--min-run-time", "0.001", "--contenders", "frozennorm,bn_eval", "--e2e-size",
             "1x32x32", "--e2e-mode", "inference", "--e2e-variants", "frozennorm",
             "--no-progress", "--cpu-malloc", "system", "--device", "cpu", "--out", str(out),
             *extra])
    assert rc == 0, err.getvalue()[-4000:]
    assert next(probes, None) is None, "a timed case did not probe the load"
    return out, json.loads((out / "results.json").read_text()), std.getvalue(), err.getvalue()


def _rendered(out):
    """results.md, and the plots when matplotlib is there, were written."""
    md = (out / "results.md").read_text()
    assert "## Headline" in md and "## End to end" in md
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return md
    for name in ("op_level_float32.png", "end_to_end.png"):
        assert (out / name).stat().st_size > 1000 and f"]({name})" in md
    return md


def test_all_busy_run_reports_everything_marked(tmp_path, monkeypatch):
    """Every case timed on a busy machine: the summary keeps them (marked), the plots and
    files are written, and the run succeeds."""
    out, doc, stdout, stderr = _faked_load_run(tmp_path, monkeypatch, [1.5, 1.5, 1.5])
    assert all(r["foreign_load"] == 1.5 for r in doc["op_level"] + doc["end_to_end"])
    summary = {s["mode"]: s for s in doc["summary"]}
    assert set(summary) == {"inference", "training"}
    for row in summary.values():
        assert row["busy"] == row["shapes"] == 1 and row["x_floor"]["geomean"] > 0
        assert row["bn_eval"]["geomean"] > 0
    assert "1 of 1 shapes" in stdout and "(busy)" in stdout
    assert "marked (busy)" in stderr
    md = _rendered(out)
    assert "(busy)" in md and "timed busy" in md
    rerendered = tmp_path / "again"
    assert frozennorm.bench.main(["--from-json", str(out / "results.json"), "--out",
                                  str(rerendered)]) == 0
    _rendered(rerendered)


def test_partly_busy_run_marks_only_the_busy_cases(tmp_path, monkeypatch):
    out, doc, stdout, _ = _faked_load_run(tmp_path, monkeypatch, [1.0, 0.0, 0.0])
    busy = {(r["mode"], r["contender"]): r["foreign_load"] > timing.BUSY_LOAD
            for r in doc["op_level"]}
    assert busy == {("inference", c): True for c in ("clone", "frozennorm", "bn_eval")} | {
        ("training", c): False for c in ("clone", "frozennorm", "bn_eval")}
    summary = {s["mode"]: s for s in doc["summary"]}
    assert summary["inference"]["busy"] == 1 and summary["training"]["busy"] == 0
    assert not any(r["foreign_load"] > timing.BUSY_LOAD for r in doc["end_to_end"])
    _rendered(out)


def test_from_json_renders_every_committed_result(tmp_path):
    """--from-json renders any results.json the tool wrote, older formats included."""
    committed = sorted((ROOT / "benchmarks" / "results")
                       .glob("**/results.json"))
    if not committed:
        pytest.skip("no committed results (not a checkout)")
    for path in committed:
        out = tmp_path / path.parent.name
        with contextlib.redirect_stdout(io.StringIO()):
            assert frozennorm.bench.main(["--from-json", str(path), "--out", str(out)]) == 0
        assert (out / "results.md").read_text().startswith("# frozennorm benchmark")


def test_default_run_writes_to_a_folder_it_names(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert frozennorm.bench.main(
        ["--ops-only", "--shape", "tiny", "--dtype", "fp32", "--layout", "nchw", "--mode",
         "inference", "--contenders", "frozennorm", "--repeat", "1", "--min-run-time", "0.001",
         "--no-progress", "--cpu-malloc", "system", "--device", "cpu", "--no-plots"]) == 0
    folders = list((tmp_path / "bench-results").iterdir())
    assert len(folders) == 1 and folders[0].name.startswith("cpu-quick-")
    out = capsys.readouterr().out
    relative = folders[0].relative_to(tmp_path)
    assert f"results go to {relative}/" in out and str(relative / "results.json") in out


def test_filters():
    assert cases.parse_shapes(["det-c4", "small", "2x3x4x5", "tiny"]) == [
        ("det-c4", (2, 1024, 50, 76)), ("small-c2", (1, 256, 56, 56)),
        ("small-c5", (1, 2048, 7, 7)), ("tiny", (1, 64, 7, 7)), ("2x3x4x5", (2, 3, 4, 5))]
    assert cases.parse_dtypes(["bf16", "fp32", "float32"]) == ["bfloat16", "float32"]
    assert cases.parse_layouts(["cl", "NCHW"]) == ["channels_last", "nchw"]
    assert cases.parse_modes(["train"]) == ["training"]
    for bad in (lambda: cases.parse_shapes(["2x3x4"]), lambda: cases.parse_dtypes(["int8"]),
                lambda: cases.parse_dims("2x0x4", 3)):
        with pytest.raises(ValueError):
            bad()
    c = cases.Case("x", (2, 3, 4, 5), "bfloat16", "channels_last", "training")
    assert c.ideal_bytes == 4 * 120 * 2  # 4 passes of 120 bf16 values
    assert c.make_input("cpu").is_contiguous(memory_format=torch.channels_last)


def test_bad_filter_exits_2(capsys):
    assert frozennorm.bench.main(["--shape", "nonsense", "--no-progress"]) == 2
    assert "unknown shape" in capsys.readouterr().err
    assert frozennorm.bench.main(["--e2e-variants", "frozennorm,magic", "--no-progress"]) == 2
    assert "unknown --e2e-variants magic" in capsys.readouterr().err
    assert frozennorm.bench.main(["--e2e-model", "vgg", "--no-progress"]) == 2
    assert "unknown --e2e-model vgg" in capsys.readouterr().err


@pytest.mark.slow
def test_e2e_resnet50_variants(tmp_path):
    """The ResNet-50 body end to end, variants picked by name; identity always runs."""
    argv = ["--e2e-only", "--e2e-model", "resnet50", "--e2e-size", "1x32x32", "--e2e-mode",
            "training", "--e2e-variants", "torchvision,frozennorm_fold", "--repeat", "1",
            "--min-run-time", "0.001", "--no-progress", "--device", "cpu", "--out",
            str(tmp_path), "--no-plots"]
    assert frozennorm.bench.main(argv) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["end_to_end"]
    assert [(r["model"], r["variant"], r["status"]) for r in rows] == [
        ("resnet50", v, "ok") for v in ("torchvision", "frozennorm_fold", "identity")]


def test_e2e_variants_compute_the_same():
    """Every eager variant of the benchmark's models computes what BatchNorm in eval does."""
    from frozennorm.bench import end_to_end as e2e

    torch.manual_seed(0)
    base = e2e.randomize_bn(e2e.resnet50_body()).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        want = base(x)
        for variant in ("torchvision", "frozennorm", "frozennorm_fold"):
            for mode in ("training", "inference"):
                model = e2e.make_variant(base, variant, mode)
                e2e.set_mode(model, variant, mode)
                torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_stats_and_interleave():
    s = timing.Stats.of([1.0, 2.0, 3.0, 4.0, 100.0], [2.0])
    assert s.median == 3.0 and s.min == 1.0 and s.max == 100.0 and s.samples == 5
    calls = []
    got = timing.interleave({"a": lambda: calls.append("a") or [1.0],
                             "b": lambda: calls.append("b") or [2.0]}, rounds=2)
    assert calls == ["a", "b", "b", "a"] and got["b"].median == 2.0


def test_foreign_load():
    value, load = timing.foreign_load(lambda: sum(range(100000)))
    assert value == sum(range(100000))
    assert load is None or load >= 0.0


def test_table_formatting():
    text = report.table(["name", "time"], [["a", "1.5 ms"], ["bb", "12 us"]])
    assert text.splitlines()[0].startswith("name") and len(text.splitlines()) == 4
    assert report.fmt_time(1.5e-3) == "1.5 ms" and report.fmt_bytes(2048) == "2 KiB"


def test_python_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "frozennorm.bench", "--list-shapes"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "det-c4" in out.stdout


def test_cpu_malloc_keep(tmp_path):
    """The default CPU heap setting, in a process of its own (it lasts for the process)."""
    out = subprocess.run([sys.executable, "-m", "frozennorm.bench", "--device", "cpu", "--ops-only",
                          "--shape", "tiny", "--dtype", "fp32", "--layout", "nchw", "--mode",
                          "inference", "--repeat", "1", "--min-run-time", "0.001", "--no-progress",
                          "--out", str(tmp_path), "--no-plots"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    meta = json.loads((tmp_path / "results.json").read_text())["metadata"]
    malloc = meta["settings"]["cpu_malloc"]
    if sys.platform.startswith("linux") and "glibc" in " ".join(__import__("platform").libc_ver()):
        assert malloc == timing.CPU_MALLOC["keep"]
    assert "CPU heap:" in (tmp_path / "results.md").read_text()
    with pytest.raises(ValueError, match="unknown --cpu-malloc"):
        timing.configure_cpu_malloc("magic")


@requires_cuda
@pytest.mark.cuda
def test_cuda_smoke(tmp_path):
    assert frozennorm.bench.main(SMOKE + ["--device", "cuda", "--ops-only", "--out",
                                          str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["op_level"]
    fn = [r for r in rows if r["contender"] == "frozennorm"]
    assert fn and all(r["launches"] and r["memory_bytes"] is not None for r in fn)


@pytest.mark.skipif(not frozennorm.ops.COMPILED, reason="times the compiled CPU kernels")
def test_cpu_kernels_script(tmp_path):
    """benchmarks/cpu_kernels.py (fused epilogues, strided views and training steps against
    x.clone()): one small case of each kind, the files written, every case in the summary or
    marked busy, a training step with its parts."""
    script = ROOT / "benchmarks" / "cpu_kernels.py"
    out = tmp_path / "kernels"
    proc = subprocess.run(
        [sys.executable, str(script), "--shape", "tiny", "--dtype", "bfloat16",
         "--layout", "channels_last", "--views", "nchw_channel_slice",
         "--kinds", "bn,bn+silu+residual", "--repeat", "1", "--min-run-time", "0.001",
         "--busy-retries", "0", "--out", str(out)],
        capture_output=True, text=True, timeout=300, env=checkout_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((out / "kernels.json").read_text())["cases"]
    assert {(r["kind"], r["layout"], r["pass_"]) for r in rows} == {
        (k, l, p) for p in ("forward", "backward")
        for k, l in (("bn", "channels_last"), ("bn+silu+residual", "channels_last"),
                     ("bn", "nchw_channel_slice"))} | {("bn", "channels_last", "step")}
    assert all(r["x_floor"] > 0 for r in rows)
    step, = [r for r in rows if r["pass_"] == "step"]
    assert step["floor"]["median"] > 0 and step["kernels_x_floor"] > 0
    assert step["engine"]["median"] > 0 and "engine_s" in step
    md = (out / "kernels.md").read_text()
    assert "## Summary" in md and "## Training steps and their parts" in md
    # cases timed on a busy machine: left out of the summary, which says so, and marked
    spec = importlib.util.spec_from_file_location("cpu_kernels", script)
    kernels = importlib.util.module_from_spec(spec)
    sys.modules["cpu_kernels"] = kernels  # (its dataclass looks its module up there)
    try:
        spec.loader.exec_module(kernels)
    finally:
        del sys.modules["cpu_kernels"]
    busy_rows = [{**r, "busy": True} for r in rows]
    assert kernels.summarize(busy_rows) == []
    assert kernels.busy_note(busy_rows).startswith(f"{len(rows)} of {len(rows)} cases")
    assert (kernels.busy_note(rows) == "") == (not any(r["busy"] for r in rows))
    assert kernels.step_table(busy_rows).count("(busy)") == 3



def test_affine_backward_script(tmp_path):
    """benchmarks/affine_backward.py (trainable affine against nn.BatchNorm2d eval with
    trainable weight/bias and the fully frozen op): one small case, the files written, the
    ratios and the bytes each forward keeps for its backward (the trainable variants keep
    the input, the frozen op one value per channel)."""
    script = ROOT / "benchmarks" / "affine_backward.py"
    out = tmp_path / "affine"
    proc = subprocess.run(
        [sys.executable, str(script), "--shape", "small-c2", "--dtype", "bfloat16",
         "--layout", "channels_last", "--repeat", "1", "--min-run-time", "0.001",
         "--busy-retries", "0", "--passes", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=300, env=checkout_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    row, = json.loads((out / "affine.json").read_text())["cases"]
    assert (row["shape_name"], row["dtype"], row["layout"]) == ("small-c2", "bfloat16",
                                                                 "channels_last")
    assert row["vs_batchnorm"] > 0 and row["vs_frozen"] > 0
    assert len(row["passes"]) == 2
    low, high = row["vs_frozen_range"]
    assert low <= row["vs_frozen"] <= high
    input_bytes = 256 * 56 * 56 * 2
    assert row["saved_bytes"]["affine"] >= input_bytes
    assert row["saved_bytes"]["frozen"] < input_bytes // 100
    md = (out / "affine.md").read_text()
    assert "## Summary" in md and "saved for backward" in md


def test_forward_footprint_keeps_nothing_alive():
    """forward_footprint's hook sees every saved tensor; it must not keep them: a pack hook
    that returns an output of the forward as it is (frozennorm's ops save their scale, an
    output) makes a cycle through the autograd graph that Python's collector cannot see, so
    the forward's input and parameters lived on: 7.3 GB more per sweep of
    affine_backward.py, which its committed five-sweep command ran out of memory on."""
    import gc
    import weakref

    from frozennorm.bench.memory import forward_footprint

    for forward in (lambda x, w: frozennorm.frozen_batch_norm(x, w * 0, w * 0 + 1, w, w),
                    lambda x, w: frozennorm.frozen_batch_norm(x, w * 0, w * 0 + 1, w.detach(),
                                                              w.detach()),
                    lambda x, w: x.exp()):
        x = torch.randn(2, 4, 3, 3, requires_grad=True)
        w = torch.nn.Parameter(torch.randn(4))
        saved, held = forward_footprint(lambda: forward(x, w))
        assert saved > 0 and held >= saved
        refs = [weakref.ref(x), weakref.ref(w)]
        del x, w
        gc.collect()
        assert all(r() is None for r in refs)


def test_affine_backward_combines_passes():
    """A case's figures over several passes: medians over the passes not timed while busy,
    the ratios' range over those, busy only when every pass was."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import affine_backward as ab
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
        sys.modules.pop("affine_backward", None)

    def timing(affine, batchnorm, frozen, busy=False):
        return {"affine": {"median": affine}, "batchnorm": {"median": batchnorm},
                "frozen": {"median": frozen}, "vs_batchnorm": affine / batchnorm,
                "vs_frozen": affine / frozen, "saved_bytes": {}, "busy": busy}

    passes = [timing(3.0, 6.0, 2.0), timing(4.0, 5.0, 2.0), timing(9.0, 1.0, 1.0, busy=True),
              timing(5.0, 5.0, 2.5)]
    row = ab.combine("small-c2", "float32", "nchw", passes)
    assert row["affine"]["median"] == 4.0 and row["frozen"]["median"] == 2.0
    assert row["vs_frozen"] == 2.0 and row["vs_frozen_range"] == [1.5, 2.0]
    assert row["vs_batchnorm"] == 0.8 and row["vs_batchnorm_range"] == [0.5, 1.0]
    assert not row["busy"] and row["passes_used"] == 3 and len(row["passes"]) == 4
    assert "(0.50-1.00)" in ab.ratio_cell(row, "batchnorm")
    all_busy = ab.combine("small-c2", "float32", "nchw", [dict(p, busy=True) for p in passes])
    assert all_busy["busy"] and all_busy["passes_used"] == 4
    assert ab.ratio_cell(all_busy, "frozen").endswith("(busy)")


def test_sources_digest_follows_every_csrc_file(tmp_path):
    from frozennorm._sources import sources_digest

    assert sources_digest(tmp_path) is None  # no csrc/: an installed package
    (tmp_path / "csrc" / "cpu").mkdir(parents=True)
    (tmp_path / "csrc" / "cpu" / "k.h").write_text("int a;")
    (tmp_path / "csrc" / "notes.txt").write_text("not a source")
    first = sources_digest(tmp_path)
    (tmp_path / "csrc" / "notes.txt").write_text("changed, still not a source")
    assert sources_digest(tmp_path) == first
    (tmp_path / "csrc" / "cpu" / "k.h").write_text("int b;")
    assert sources_digest(tmp_path) != first


def test_results_say_where_they_come_from(cpu_run, tmp_path, monkeypatch, capsys):
    """Results record the commit; a dirty checkout or a stale build is refused under
    benchmarks/results/ (the committed results) and marked anywhere else."""
    _, doc = cpu_run
    assert "git" in doc["metadata"] and "provenance_problems" in doc["metadata"]
    # a stale build: the checkout's csrc/ is not what the extension was built from
    monkeypatch.setattr(report._loader, "build_info", lambda: {"sources_digest": "0" * 16})
    state = report.source_state()
    if report.sources_digest(ROOT) is not None and state["extension_built"]:
        assert any("other csrc/ sources" in p for p in state["provenance_problems"])
    meta = dict(doc["metadata"], git="abc1234-dirty",
                provenance_problems=["the checkout has uncommitted changes"])
    committed = ROOT / "benchmarks" / "results" / "cpu"
    with pytest.raises(SystemExit, match="refusing to write results into .*uncommitted"):
        report.check_provenance(meta, committed / "quick", allow=False)
    report.check_provenance(meta, committed / "quick", allow=True)
    report.check_provenance(meta, tmp_path, allow=False)
    assert capsys.readouterr().err.count("NOT FROM A CLEAN BUILD OF A COMMIT** (abc1234-dirty)") == 2
    report.check_provenance(dict(meta, provenance_problems=[]), committed, allow=False)
    # the markdown says so first
    path = tmp_path / "results.json"
    path.write_text(json.dumps(dict(doc, metadata=meta)))
    with contextlib.redirect_stdout(io.StringIO()):
        assert frozennorm.bench.main(["--from-json", str(path), "--no-plots"]) == 0
    md = (tmp_path / "results.md").read_text().splitlines()
    assert md[2].startswith("**NOT FROM A CLEAN BUILD OF A COMMIT** (abc1234-dirty)")
    assert "commit abc1234-dirty" in md[4]


def test_peer_numerics_script(tmp_path):
    """benchmarks/peer_numerics.py: the error of each way of freezing BN in the tests' metric
    and the ops of each forward; frozennorm within the op tests' bound where |mean| >> std,
    torchvision's x * scale + shift far outside it, 7 elementwise ops against one."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "peer_numerics.py"),
                           "--seeds", "2", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env=checkout_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "peers.json").read_text())
    err = {(r["regime"], r["input"], r["contender"]): r for r in doc["errors"]}
    assert err[("mean_gg_std", "float32", "frozennorm")]["max_ulps"] <= 4  # test_op's bound
    if ("mean_gg_std", "float32", "torchvision FrozenBatchNorm2d") in err:
        assert err[("mean_gg_std", "float32", "torchvision FrozenBatchNorm2d")]["min_ulps"] > 100
        assert err[("typical", "float16", "torchvision FrozenBatchNorm2d")]["output"] == "float32"
    ops = {(r["input"], r["requires_grad"], r["contender"]): r for r in doc["ops"]}
    assert ops[("float32", True, "frozennorm")]["sequence"] == ["frozen_bn"]
    if ("float32", True, "torchvision FrozenBatchNorm2d") in ops:
        tv = ops[("float32", True, "torchvision FrozenBatchNorm2d")]
        assert tv["elementwise"] == 7 and tv["full_size"] == 2
    assert "## Ops per forward" in (tmp_path / "peers.md").read_text()
