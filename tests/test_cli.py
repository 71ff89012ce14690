"""The `fusedrnn` command line: verify, bench, --roofline and argument errors.

The end-to-end runs go through `python -m fusedrnn` in a subprocess with TRITON_INTERPRET=1 (the
way a user without a GPU runs them); the exit-status test runs main() in-process.
"""
from __future__ import annotations

import importlib
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
    for cell in ("lstm", "gru", "rnn_tanh", "rnn_relu", "lstmcell", "grucell", "rnncell"):
        assert f"\n{cell} " in out
    assert "PASSED" in out and "FAIL " not in out


def test_verify_exit_status_1_on_failure(monkeypatch, capsys):
    """A broken backend (weights perturbed in the copy under test) makes the command exit 1."""
    from fusedrnn import cli

    V = importlib.import_module("fusedrnn.verify")
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
    from fusedrnn import cli

    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "1"))
    rc = cli.main(["verify", "--quick", "--device", "cpu", "--cell", "rnn_tanh,grucell",
                   "--dtype", "fp32", "--backend", "reference"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "PASSED: 3/3" in out


RECORD_FIELDS = {"provider", "cell", "seq", "batch", "input", "hidden", "layers", "bidirectional",
                 "dtype", "mode", "status", "median_ms", "p20_ms", "p80_ms", "tokens_per_s",
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
    assert {"fusedrnn-auto", "torch-cpu", "reference", "fusedrnn"} <= provs
    assert {rec["mode"] for rec in recs} == {"fwdbwd", "inference"}
    for rec in recs:
        if rec["provider"] in ("fusedrnn-auto", "torch-cpu", "reference"):
            assert rec["status"] == "ok", rec
            assert rec["p20_ms"] <= rec["median_ms"] <= rec["p80_ms"]
            assert rec["tokens_per_s"] > 0 and rec["tflops"] > 0
        if rec["provider"] == "torch-cpu":
            assert rec["vs_baseline"] == 1.0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| provider |" in md.read_text()
    assert "fusedrnn-auto" in r.stdout and "wrote" in r.stdout


def test_bench_roofline_prints_floors_without_running():
    r = run_cli("bench", "--roofline", "H200", "--batch", "1,64", "--hidden", "256",
                "--seq", "1024", "--mode", "fwdbwd", timeout=60)
    assert r.returncode == 0, r.stderr
    assert "H200" in r.stdout and "floor ms" in r.stdout and "barrier ms" in r.stdout
    lines = [ln for ln in r.stdout.splitlines() if ln.strip().startswith("lstm")]
    assert len(lines) == 2
    assert "median" not in r.stdout and "wrote" not in r.stdout


def test_roofline_flop_count():
    from fusedrnn.roofline import Problem, flops, floors, gpu_spec

    p = Problem(cell="lstm", seq=10, batch=2, input=3, hidden=5, mode="forward", dtype="fp32")
    assert flops(p) == 2 * 10 * 2 * 4 * 5 * (3 + 5)
    p2 = Problem(cell="lstm", seq=10, batch=2, input=3, hidden=5, layers=2, bidirectional=True,
                 proj_size=4, mode="fwdbwd", dtype="bf16")
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
    (("bench", "--providers", "cudnn,magic"), "invalid choice"),
    (("verify", "--cell", "transformer"), "invalid choice"),
    (("verify", "--device", "tpu"), "invalid choice"),
    (("frobnicate",), "invalid choice"),
    ((), "required"),
])
def test_bad_flags_clear_error(args, msg, capsys):
    from fusedrnn import cli

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
    from fusedrnn import bench

    def fake_build(provider, p, device):
        def fn():
            pass
        fn.ms = {"cudnn": 2.0, "fusedrnn": 1.0}[provider]
        return fn, []

    def fake_time_cuda(fn, grads, rep_ms):
        return [fn.ms, 0.9 * fn.ms, 1.1 * fn.ms], 123.0

    monkeypatch.setattr(bench, "build", fake_build)
    monkeypatch.setattr(bench, "time_cuda", fake_time_cuda)
    from fusedrnn.roofline import Problem, gpu_spec

    problems = [Problem(cell="lstm", seq=1024, batch=b, input=256, hidden=256, dtype="bf16",
                        mode=m) for b in (8, 64) for m in ("fwdbwd", "inference")]
    recs = bench.run_sweep(problems, ["fusedrnn", "cudnn"], "cuda", gpu_spec("NVIDIA H200"),
                           progress=False)
    assert len(recs) == 8 and all(r["status"] == "ok" for r in recs)
    for r in recs:
        assert r["peak_mem_mb"] == 123.0 and r["baseline"] == "cudnn"
        assert r["floors"]["gpu"].startswith("NVIDIA H200")
        assert r["efficiency"] == pytest.approx(r["floors"]["floor_ms"] / r["median_ms"])
        if r["provider"] == "fusedrnn":
            assert r["vs_baseline"] == 0.5 and r["speedup"] == 2.0
    png = tmp_path / "gpu.png"
    assert bench.plot(recs, str(png)) is None and png.stat().st_size > 1000
    md = bench.markdown(recs, {"device": "cuda", "device_name": "NVIDIA H200", "torch": "x",
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
    from fusedrnn import bench
    from fusedrnn.roofline import Problem

    small = Problem(cell="lstm", seq=2, batch=3, input=6, hidden=20, dtype="bf16", mode="fwdbwd")
    for provider, kernel in (("fusedrnn-stepwise", "stepwise"), ("fusedrnn-persistent", "persistent")):
        assert bench.skip_reason(provider, small, device) is None
        fn, grads = bench.build(provider, small, device)
        fn()
        assert grads and all(t.grad is not None for t in grads)
        model = fn.__closure__[fn.__code__.co_freevars.index("model")].cell_contents
        assert set(model.last_kernels) == {kernel}, model.last_kernels
    wide = Problem(cell="lstm", seq=2, batch=3, input=80, hidden=80, dtype="fp32", mode="fwdbwd")
    assert "no persistent plan" in bench.skip_reason("fusedrnn-persistent", wide, device)
    assert bench.skip_reason("fusedrnn-stepwise", wide, device) is None
