"""The `fusedrnn` command line: verify, bench, --roofline and argument errors.

The end-to-end runs go through `python -m fusedrnn` in a subprocess with TRITON_INTERPRET=1 (the
way a user without a GPU runs them); the exit-status test runs main() in-process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, timeout=240):
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "fusedrnn", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.triton
def test_verify_quick_cpu_passes_and_prints_table():
    r = run_cli("verify", "--quick", "--device", "cpu")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    out = r.stdout
    assert "rel err" in out and "torch err" in out and "tol" in out
    # by default on CPU: what runs there by default (auto: torch's fused ops) and the Triton
    # kernels through the interpreter, on the quick grid
    assert "backends auto, triton" in out and "quick grid" in out
    for backend in ("auto", "triton"):
        for cell in ("lstm", "gru", "rnn_tanh", "rnn_relu", "lstmcell", "grucell", "rnncell"):
            assert f"\n{backend}: {cell} " in out
    assert "PASSED" in out and "FAIL " not in out


def test_verify_exit_status_1_on_failure(monkeypatch, capsys):
    """A broken backend (weights perturbed in the copy under test) makes the command exit 1."""
    from fusedrnn.tools import cli
    from fusedrnn.tools import verify as V

    orig = V.convert_copy

    def broken(module, backend, kernel=None):
        m = orig(module, backend, kernel)
        if backend == "reference" and broken.calls % 2 == 1:  # the copy under test, not the oracle
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(1e-3)
        if backend == "reference":
            broken.calls += 1
        return m

    broken.calls = 0
    monkeypatch.setattr(V, "convert_copy", broken)
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "1"))
    rc = cli.main(["verify", "--quick", "--device", "cpu", "--cell", "rnn_tanh,grucell",
                   "--dtype", "fp32", "--backend", "reference"])
    out = capsys.readouterr().out
    assert rc == 1, out
    assert "FAILED" in out and "FAIL" in out


def test_verify_exit_status_0_same_path(monkeypatch, capsys):
    from fusedrnn.tools import cli

    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "1"))
    rc = cli.main(["verify", "--quick", "--device", "cpu", "--cell", "rnn_tanh,grucell",
                   "--dtype", "fp32", "--backend", "reference"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "PASSED: 3/3" in out and "about" in out and "s left" in out


RECORD_FIELDS = {"provider", "cell", "seq", "batch", "input", "hidden", "layers", "bidirectional",
                 "dtype", "pass", "status", "watch", "median_ms", "p20_ms", "p80_ms", "tokens_per_s",
                 "tflops", "peak_mem_mb", "flops", "floors", "efficiency", "vs_baseline"}
ENV_FIELDS = {"device_name", "torch", "triton", "cuda", "git_commit", "timestamp"}


def test_bench_quick_cpu_json_and_png(tmp_path):
    out, png, md = tmp_path / "x.json", tmp_path / "x.png", tmp_path / "x.md"
    r = run_cli("bench", "--quick", "--device", "cpu", "--out", str(out), "--plot", str(png),
                "--md", str(md), "--rep", "100")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    data = json.loads(out.read_text())
    assert ENV_FIELDS <= set(data["environment"])
    recs = data["records"]
    assert recs and all(RECORD_FIELDS <= set(rec) for rec in recs)
    provs = {rec["provider"] for rec in recs}
    # the interpreter's time is not a speed measure: only on request
    assert provs == {"fusedrnn-auto", "torch-cpu", "reference"}
    assert {rec["pass"] for rec in recs} == {"fwdbwd", "inference"}
    method = data["environment"]["method"]
    assert method["clock"] == "cpu" and method["threads"] == 1  # pinned by default on CPU
    for rec in recs:
        if rec["provider"] in ("fusedrnn-auto", "torch-cpu", "reference"):
            assert rec["status"] == "ok", rec
            assert rec["p20_ms"] <= rec["median_ms"] <= rec["p80_ms"]
            assert rec["median_ms"] <= rec["all_median_ms"] and 0 < rec["kept"] <= 1
            assert rec["tokens_per_s"] > 0 and rec["tflops"] > 0
        if rec["provider"] == "torch-cpu":
            assert rec["vs_baseline"] == 1.0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| provider |" in md.read_text() and "CPU time of the calling thread" in md.read_text()
    assert "fusedrnn-auto" in r.stdout and "wrote" in r.stdout


def test_bench_roofline_prints_floors_without_running():
    r = run_cli("bench", "--roofline", "H200", "--batch", "1,64", "--hidden", "256",
                "--seq", "1024", "--pass", "fwdbwd", timeout=60)
    assert r.returncode == 0, r.stderr
    assert "H200" in r.stdout and "floor ms" in r.stdout and "barrier ms" in r.stdout
    lines = [ln for ln in r.stdout.splitlines() if ln.strip().startswith("lstm")]
    assert len(lines) == 2
    assert "median" not in r.stdout and "wrote" not in r.stdout


def test_roofline_flop_count():
    from fusedrnn.tools.roofline import Problem, flops, floors, gpu_spec

    p = Problem(cell="lstm", seq=10, batch=2, input=3, hidden=5, pass_="forward", dtype="fp32")
    assert flops(p) == 2 * 10 * 2 * 4 * 5 * (3 + 5)
    p2 = Problem(cell="lstm", seq=10, batch=2, input=3, hidden=5, layers=2, bidirectional=True,
                 proj_size=4, pass_="fwdbwd", dtype="bf16")
    per_dir0 = 2 * 10 * 2 * 20 * (3 + 4) + 2 * 10 * 2 * 4 * 5
    per_dir1 = 2 * 10 * 2 * 20 * (8 + 4) + 2 * 10 * 2 * 4 * 5
    assert flops(p2) == 3 * 2 * (per_dir0 + per_dir1)
    fl = floors(p2, gpu_spec("NVIDIA H200"))
    assert fl["floor_ms"] >= fl["compute_ms"] and fl["serial_steps"] == 2 * 2 * 10
    assert gpu_spec("nope") is None


@pytest.mark.parametrize("args,msg", [
    (("bench", "--batch", "x"), "not an integer"),
    (("bench", "--batch", "0"), "must be positive"),
    (("bench", "--mode", "sideways"), "invalid choice"),
    (("bench", "--pass", "sideways"), "invalid choice"),
    (("bench", "--clock", "sundial"), "invalid choice"),
    (("bench", "--providers", "cudnn,magic"), "invalid choice"),
    (("verify", "--cell", "transformer"), "invalid choice"),
    (("verify", "--device", "tpu"), "invalid choice"),
    (("frobnicate",), "invalid choice"),
    ((), "required"),
])
def test_bad_flags_clear_error(args, msg, capsys):
    from fusedrnn.tools import cli

    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(list(args))
    assert e.value.code == 2
    assert msg in capsys.readouterr().err


def test_bad_flags_message_from_command_line():
    r = run_cli("bench", "--batch", "8,x", timeout=60)
    assert r.returncode == 2 and "not an integer" in r.stderr
    r = run_cli("bench", "--roofline", "Z80", timeout=60)
    assert r.returncode == 2 and "unknown GPU" in r.stderr


def test_bench_gpu_bookkeeping_with_mocked_timer(monkeypatch, tmp_path):
    """The CUDA branch of the sweep (records, floors, ratio to cudnn, plot), with the timer and
    the models mocked so that it runs without a GPU."""
    from fusedrnn.tools import report, sweep

    def fake_build(provider, p, device):
        def fn():
            pass
        fn.ms = {"cudnn": 2.0, "fusedrnn": 1.0}[provider]
        return fn, []

    def fake_time_cuda(fn, grads, rep_ms):
        return [fn.ms, 0.9 * fn.ms, 1.1 * fn.ms], 123.0

    monkeypatch.setattr(sweep, "build", fake_build)
    monkeypatch.setattr(sweep, "time_cuda", fake_time_cuda)
    from fusedrnn.tools.roofline import Problem, gpu_spec

    problems = [Problem(cell="lstm", seq=1024, batch=b, input=256, hidden=256, dtype="bf16",
                        pass_=m) for b in (8, 64) for m in ("fwdbwd", "inference")]
    recs = sweep.run_sweep(problems, ["fusedrnn", "cudnn"], "cuda", gpu_spec("NVIDIA H200"),
                           progress=False)
    assert len(recs) == 8 and all(r["status"] == "ok" for r in recs)
    for r in recs:
        assert r["peak_mem_mb"] == 123.0 and r["baseline"] == "cudnn"
        assert r["floors"]["gpu"].startswith("NVIDIA H200")
        assert r["efficiency"] == pytest.approx(r["floors"]["floor_ms"] / r["median_ms"])
        if r["provider"] == "fusedrnn":
            assert r["vs_baseline"] == 0.5 and r["speedup"] == 2.0
    png = tmp_path / "gpu.png"
    assert report.plot(recs, str(png)) is None and png.stat().st_size > 1000
    md = report.markdown(recs, {"device": "cuda", "device_name": "NVIDIA H200", "torch": "x",
                               "triton": "y", "cuda": "z", "git_commit": "c", "git_dirty": False,
                               "timestamp": "t"})
    assert md.count("| lstm |") == 8


@pytest.mark.triton
def test_bench_kernel_providers_force_the_kernel():
    """fusedrnn-stepwise / fusedrnn-persistent run the Triton backend with that kernel forced (the
    modules' last_kernels say so), and the persistent one is skipped with the plan's reason where
    no persistent plan holds the layer (float32 LSTM H = 80), never silently run stepwise."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no CUDA and TRITON_INTERPRET is not 1")
    from fusedrnn.tools import sweep
    from fusedrnn.tools.roofline import Problem

    small = Problem(cell="lstm", seq=2, batch=3, input=6, hidden=20, dtype="bf16", pass_="fwdbwd")
    for provider, kernel in (("fusedrnn-stepwise", "stepwise"), ("fusedrnn-persistent", "persistent")):
        assert sweep.skip_reason(provider, small, device) is None
        fn, grads = sweep.build(provider, small, device)
        fn()
        assert grads and all(t.grad is not None for t in grads)
        model = fn.__closure__[fn.__code__.co_freevars.index("model")].cell_contents
        assert set(model.last_kernels) == {kernel}, model.last_kernels
    wide = Problem(cell="lstm", seq=2, batch=3, input=80, hidden=80, dtype="fp32", pass_="fwdbwd")
    assert "no persistent plan" in sweep.skip_reason("fusedrnn-persistent", wide, device)
    assert sweep.skip_reason("fusedrnn-stepwise", wide, device) is None


# ---------------------------------------------------------------------------------------------
# flags that yield nothing, --version, --help


@pytest.mark.parametrize("args,why", [
    (("bench", "--cell", "gru", "--proj", "5"), "--proj 5 applies to cell lstm only, not gru"),
    (("bench", "--proj", "64", "--hidden", "32"), "--proj 64 must be smaller than --hidden 32"),
    (("bench", "--cell", "grucell,rnn_tanh", "--proj", "8", "--hidden", "16"),
     "--proj 8 applies to cell lstm only, not grucell"),
])
def test_flags_with_no_point_are_an_error_naming_why(args, why, capsys):
    from fusedrnn.tools import cli

    with pytest.raises(SystemExit) as e:
        cli.main(list(args) + ["--device", "cpu"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "no benchmark point" in err and why in err


def test_partly_invalid_sweep_runs_the_valid_points_and_says_what_was_dropped(capsys):
    from fusedrnn.tools import sweep

    problems, dropped = sweep.sweep_problems(cells=["lstm", "gru"], proj=[8], hidden=[16])
    assert [p.cell for p in problems] == ["lstm", "lstm"]  # fwdbwd and inference
    assert dropped == ["--proj 8 applies to cell lstm only, not gru"]


def test_clock_cpu_needs_one_thread(capsys):
    from fusedrnn.tools import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--device", "cpu", "--threads", "2", "--clock", "cpu"])
    assert e.value.code == 2 and "needs --threads 1" in capsys.readouterr().err


def test_version(capsys):
    import fusedrnn
    from fusedrnn.tools import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"fusedrnn {fusedrnn.__version__}"


def test_help_lists_choices_and_defaults(capsys):
    from fusedrnn.spec import CELLS, PASSES
    from fusedrnn.tools import cli, sweep

    for command in ("bench", "verify"):
        with pytest.raises(SystemExit) as e:
            cli.main([command, "--help"])
        assert e.value.code == 0
        text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
        for cell in CELLS:
            assert cell in text
        assert "(default: all)" in text or "(default: lstm)" in text
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split()).replace("- ", "-")
    for name in PASSES + sweep.PROVIDERS:
        assert name in text
    assert "(default: 2)" in text and "(default: fwdbwd,inference)" in text


def test_one_definition_of_the_providers():
    from fusedrnn.tools import cli, sweep

    assert cli.PROVIDERS is sweep.PROVIDERS
    assert set(sweep.BACKEND_OF) | {"cudnn", "torch-cpu"} == set(sweep.PROVIDERS)


def test_cpu_timing_marks_a_disturbed_point_noisy(monkeypatch):
    """The load is watched at every point: a point measured under a load above the limit is
    measured again (retries) and, still disturbed, marked noisy in its record."""
    from fusedrnn.tools import sweep
    from fusedrnn.tools.roofline import Problem

    loads = iter([9.0] * 20)
    monkeypatch.setattr(sweep, "_load", lambda: next(loads))
    p = Problem(cell="lstm", seq=2, batch=2, input=4, hidden=4, dtype="fp32", pass_="inference")
    timing = sweep.CpuTiming(clock="cpu", budget_s=0.01, retries=1, max_load=2.0)
    recs = sweep.run_sweep([p], ["torch-cpu"], "cpu", None, progress=False, cpu_timing=timing)
    (r,) = recs
    assert r["status"] == "ok" and r["watch"]["noisy"] and r["watch"]["tries"] == 2
    assert r["note"].startswith("noisy after 2 tries (load 9.0")
    with pytest.raises(ValueError, match="clock must be 'cpu' or 'wall', got 'sundial'"):
        sweep.CpuTiming(clock="sundial")


def test_cpu_timing_reports_the_uncontended_calls():
    """Calls at full speed and at half of it (a VM's shared core): the reported median is that of
    the calls within the band of the fastest, whatever their share; band=None keeps every call."""
    from fusedrnn.tools import sweep

    for fast_share in (0.1, 0.5, 0.9):
        n_fast = int(1000 * fast_share)
        times = [1.0 + 0.001 * (i % 50) for i in range(n_fast)] + [2.0] * (1000 - n_fast)
        s = sweep.summarize(times, sweep.FAST_BAND)
        assert 1.0 <= s["p20"] <= s["median"] <= s["p80"] < 1.05
        assert s["kept"] == pytest.approx(fast_share)
        assert s["all_median"] == (2.0 if fast_share < 0.5 else pytest.approx(s["all_median"]))
    s = sweep.summarize([1.0, 1.0, 2.0, 2.0, 2.0], None)
    assert s["median"] == 2.0 and s["kept"] == 1.0
    with pytest.raises(ValueError, match="band must be > 1 or None, got 1.0"):
        sweep.CpuTiming(band=1.0)


def test_runtime_never_imports_the_tools():
    """The runtime (every module of fusedrnn/ but the package's lazy `verify` attribute and the
    `python -m fusedrnn` entry) has no import of fusedrnn.tools, statically or at run time."""
    import ast

    pkg = os.path.join(ROOT, "fusedrnn")
    for name in sorted(os.listdir(pkg)):
        if not name.endswith(".py") or name in ("__main__.py",):
            continue
        tree = ast.parse(open(os.path.join(pkg, name), encoding="utf-8").read())
        lazy = {id(n) for f in tree.body if name == "__init__.py" and isinstance(f, ast.FunctionDef)
                and f.name == "__getattr__" for n in ast.walk(f)}
        for node in ast.walk(tree):
            if id(node) in lazy:
                continue
            if isinstance(node, ast.ImportFrom):
                target = ("." * node.level) + (node.module or "")
                bad = "tools" in target.split(".") or (
                    target.strip(".") in ("", "fusedrnn") and any(a.name == "tools" for a in node.names))
            elif isinstance(node, ast.Import):
                bad = any(a.name.startswith("fusedrnn.tools") for a in node.names)
            else:
                continue
            assert not bad, f"fusedrnn/{name}:{node.lineno} imports the tools"
    code = ("import sys, torch, fusedrnn\n"
            "m = fusedrnn.LSTM(3, 4, num_layers=2, bidirectional=True)\n"
            "y, _ = m(torch.randn(5, 2, 3)); y.sum().backward()\n"
            "c = fusedrnn.GRUCell(3, 4); c(torch.randn(2, 3))\n"
            "fusedrnn.convert(torch.nn.Sequential(torch.nn.RNN(3, 4)))\n"
            "print(sorted(k for k in sys.modules if k.startswith('fusedrnn.tools')))\n")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "[]", r.stdout


def test_tune_command_shows_and_clears_the_cache(tmp_path, monkeypatch, capsys):
    from fusedrnn import tune
    from fusedrnn.tools import cli
    monkeypatch.setenv("FUSEDRNN_CACHE_DIR", str(tmp_path))
    tune.reset()
    key = tune.make_key("GRU", input_size=3, hidden_size=4, batch=2, seq_len=5, dtype="fp32",
                        training=False, device="cpu")
    tune.get_tuner().cache.put(key, tune.Decision.static("test entry"))
    assert cli.main(["tune", "--show"]) == 0
    assert "GRU I=3 H=4" in capsys.readouterr().out
    assert cli.main(["tune", "--clear"]) == 0
    assert "removed 1" in capsys.readouterr().out
    assert tune.get_tuner().cache.entries() == []
    tune.reset()
