"""The barrier-only kernel (kernels/barrier.py), its measurement (`fusedrnn bench --barrier`) and
the measured barrier cost in the roofline floors.

Without CUDA the kernel runs in the Triton interpreter, which runs programs one after another: one
program per direction only (a grid barrier between programs would spin), and the bounded spin's
timeout path is reachable there by launching two programs with a tiny MAX_SPIN.
"""
import json
import os

import pytest
import torch

import fusedrnn.kernels as K
from fusedrnn.kernels.barrier import barrier_launch, check_barrier, grid_barrier_kernel

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.triton
@pytest.mark.parametrize("grid_sync", [True, False], ids=["grid", "cta"])
@pytest.mark.parametrize("n_steps", [1, 5])
@pytest.mark.parametrize("directions", [1, 2])
def test_counters_after_launch(grid_sync, n_steps, directions):
    before = K.launch_count()
    sync = K.grid_barrier(directions, n_steps, DEVICE, directions=directions, grid_sync=grid_sync)
    assert K.launch_count() == before + 1
    assert sync.dtype == torch.int32 and tuple(sync.shape) == (directions + 1,)
    # one program per direction: each arrive counter holds programs * barriers; CTA-only barriers
    # touch no counter
    want = n_steps if grid_sync else 0
    assert sync.tolist() == [want] * directions + [0]


@pytest.mark.triton
@pytest.mark.skipif(not INTERPRETED, reason="the interpreter's sequential programs force the timeout")
def test_timeout_sets_flag_and_raises():
    """Two programs of one direction under the interpreter: the first spins alone, gives up after
    MAX_SPIN polls, raises the flag and stops waiting; the second passes its first barrier (both
    arrived), then times out on the next."""
    sync = torch.zeros(2, dtype=torch.int32)
    grid_barrier_kernel[(1, 1, 2)](sync, 3, 1, GRID_SYNC=True, MAX_SPIN=10)
    assert sync.tolist() == [3, 1]
    with pytest.raises(RuntimeError, match="timed out"):
        check_barrier(sync, 1)


@pytest.mark.parametrize("kwargs,msg", [
    (dict(n_programs=0, n_steps=1), "n_programs must be >= 1, got 0"),
    (dict(n_programs=1, n_steps=0), "n_steps must be >= 1, got 0"),
    (dict(n_programs=1, n_steps=2.0), "n_steps must be an int, got float"),
    (dict(n_programs=True, n_steps=1), "n_programs must be an int, got bool"),
    (dict(n_programs=2, n_steps=1, directions=3), r"directions must be in \[1, 2\], got 3"),
    (dict(n_programs=1, n_steps=1, directions=2), "n_programs must be >= 2, got 1"),
    (dict(n_programs=3, n_steps=1, directions=2), "multiple of directions=2, got 3"),
    (dict(n_programs=1, n_steps=1, num_warps=3), "num_warps must be a power of two"),
    (dict(n_programs=1, n_steps=1, grid_sync=1), "grid_sync must be a bool, got int"),
    (dict(n_programs=1, n_steps=2 ** 31), r"below 2\*\*31"),
])
def test_misuse_raises_before_launch(kwargs, msg):
    before = K.launch_count()
    with pytest.raises(ValueError, match=msg):
        K.grid_barrier(device=DEVICE, **kwargs)
    assert K.launch_count() == before


@pytest.mark.skipif(DEVICE == "cuda", reason="CPU-only rules")
def test_cpu_needs_interpreter_and_one_program_per_direction(monkeypatch):
    before = K.launch_count()
    with pytest.raises(ValueError, match="one program per direction.*got 2"):
        K.grid_barrier(2, 1, "cpu")
    with pytest.raises(ValueError, match="n_programs must be 2 .*got 4"):
        K.grid_barrier(4, 1, "cpu", directions=2)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="needs CUDA"):
        K.grid_barrier(1, 1, "cpu")
    assert K.launch_count() == before


def test_co_residency_limit_on_meta():
    """meta is the ahead-of-time listing device, sized like an sm_90 (132 SMs)."""
    sync, launch = barrier_launch(132, 4, "meta", directions=2)
    assert launch.grid == (2, 1, 66) and sync.shape == (3,) and sync.device.type == "meta"
    assert launch.args["GRID_SYNC"] is True and launch.num_warps == 8
    with pytest.raises(ValueError, match="n_programs must be <= 132"):
        barrier_launch(133, 4, "meta")
    with pytest.raises(ValueError, match="device must be cuda"):
        barrier_launch(1, 1, "xpu" if hasattr(torch, "xpu") else "mps")


@pytest.mark.gpu
@pytest.mark.triton
def test_every_sm_meets_at_the_barrier():
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    sync = K.grid_barrier(sms, 100, "cuda")
    assert sync.tolist() == [sms * 100, 0]
    half = sms // 2
    sync = K.grid_barrier(2 * half, 100, "cuda", directions=2)
    assert sync.tolist() == [half * 100, half * 100, 0]
    with pytest.raises(ValueError, match=f"n_programs must be <= {sms}"):
        K.grid_barrier(sms + 1, 1, "cuda")


# ----------------------------------------------------------------------------------------------
# the measurement and the roofline


def test_measure_barrier_arithmetic_with_mocked_timer(monkeypatch):
    """The CUDA measurement's bookkeeping without a GPU: per barrier = (t(N) - t(1)) / (N - 1)."""
    from fusedrnn.tools import barrier_bench, report

    calls = []

    def fake_time_barrier(programs, directions, grid_sync, steps, rep_ms):
        calls.append((programs, directions, grid_sync, steps))
        per = 1.0 if programs > 2 else 0.5  # us per barrier
        ms = (10.0 + per * (steps - 1)) / 1e3
        return [ms, 0.9 * ms, 1.1 * ms]

    monkeypatch.setattr(barrier_bench, "time_barrier", fake_time_barrier)
    records, us = barrier_bench.measure_barrier(132, steps=1024)
    assert [(r["programs"], r["directions"], r["grid_sync"]) for r in records] == \
        [(132, 1, True), (2, 1, True), (2, 2, False)]
    assert {c[3] for c in calls} == {1, 1024}
    assert us == pytest.approx(1.0) and records[0]["barrier_us"] == pytest.approx(1.0)
    assert records[1]["barrier_us"] == pytest.approx(0.5)
    assert all(r["launch_us"] == pytest.approx(10.0) and r["status"] == "ok" for r in records)
    md = report.barrier_markdown({"environment": {"device": "cuda", "device_name": "NVIDIA H200",
                                                 "torch": "x", "triton": "y", "cuda": "z",
                                                 "git_commit": "c", "timestamp": "t"},
                                 "steps": 1024, "barrier_us": us, "records": records, "note": None})
    assert md.count("| 132 |") == 1 and "barrier_us = 1.000" in md

    def failing(programs, directions, grid_sync, steps, rep_ms):
        raise RuntimeError("grid barrier timed out")

    monkeypatch.setattr(barrier_bench, "time_barrier", failing)
    records, us = barrier_bench.measure_barrier(4, steps=16)
    assert us is None and all(r["status"] == "error" and "timed out" in r["note"] for r in records)
    assert barrier_bench.barrier_configs(2) == [(2, 1, True, "grid barrier, one program per SM"),
                                        (2, 2, False, "CTA barrier only (single-program plans, D=2)")]


def test_cmd_barrier_cuda_branch_with_mocks(monkeypatch, tmp_path, capsys):
    """cmd_barrier's CUDA branch (table, JSON, markdown, exit status) with the device and the timer
    mocked, so that it runs without a GPU."""
    import argparse
    import types

    from fusedrnn.tools import barrier_bench, cli, sweep

    monkeypatch.setattr(sweep, "environment", lambda device: {
        "device": device, "device_name": "NVIDIA H200", "torch": "x", "triton": "y", "cuda": "z",
        "git_commit": "c", "git_dirty": False, "timestamp": "t"})
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: types.SimpleNamespace(multi_processor_count=132))
    monkeypatch.setattr(barrier_bench, "time_barrier",
                        lambda P, D, gs, steps, rep: [(5.0 + 0.8 * (steps - 1)) / 1e3] * 3)
    out, md = tmp_path / "b.json", tmp_path / "b.md"
    args = argparse.Namespace(barrier=True, rep=None, out=str(out), md=str(md))
    assert cli.cmd_barrier(args, "cuda") == 0
    text = capsys.readouterr().out
    assert "barrier_us = 0.800 (grid barrier across 132 programs)" in text
    data = json.loads(out.read_text())
    assert data["barrier_us"] == pytest.approx(0.8) and data["barrier_source"] == "measured"
    assert data["steps"] == barrier_bench.BARRIER_STEPS and len(data["records"]) == 3
    assert "| 132 | 1 | yes |" in md.read_text()
    from fusedrnn.tools.roofline import load_barrier_us
    assert load_barrier_us(str(out)) == pytest.approx(0.8)


def test_cli_barrier_without_cuda_says_so(tmp_path, monkeypatch, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the CLI measures instead")
    from fusedrnn.tools import cli

    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "1"))
    out, md = tmp_path / "barrier.json", tmp_path / "barrier.md"
    rc = cli.main(["bench", "--barrier", "--out", str(out), "--md", str(md)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "needs CUDA" in text and "interpreter check of grid_barrier_kernel (1 program, 5 barriers): ok" in text
    data = json.loads(out.read_text())
    assert data["barrier_us"] is None and data["records"] == [] and "needs CUDA" in data["note"]
    assert "needs CUDA" in md.read_text()
    # a JSON that measured nothing leaves the estimate in place, with a warning
    rc = cli.main(["bench", "--roofline", "H200", "--barrier-us", str(out), "--batch", "1",
                   "--hidden", "256", "--seq", "1024", "--pass", "inference"])
    cap = capsys.readouterr()
    assert rc == 0 and "holds no measured barrier" in cap.err and "~1.5 us (estimate)" in cap.out


def test_roofline_measured_barrier_overrides_estimate(tmp_path, capsys):
    from fusedrnn.tools import cli
    from fusedrnn.tools.report import barrier_note, format_roofline
    from fusedrnn.tools.roofline import Problem, floors, gpu_spec, with_barrier

    p = Problem(cell="lstm", seq=1024, batch=1, input=256, hidden=256, pass_="inference", dtype="bf16")
    spec = gpu_spec("H200")
    est = floors(p, spec)
    assert est["barrier_source"] == "estimate" and est["barrier_ms"] == pytest.approx(1024 * 1.5e-3)
    meas = floors(p, spec, barrier_us=0.6)
    assert meas["barrier_source"] == "measured" and meas["barrier_us"] == 0.6
    assert meas["barrier_ms"] == pytest.approx(1024 * 0.6e-3)
    assert meas["floor_ms"] == pytest.approx(max(meas["compute_ms"], meas["memory_ms"], meas["barrier_ms"]))
    assert floors(p, with_barrier(spec, 0.6)) == meas and spec["barrier_us"] == 1.5  # no mutation
    assert "grid barrier 0.6 us (measured)" in format_roofline([p], "H200", 0.6)
    assert "grid barrier ~1.5 us (estimate)" in format_roofline([p], "H200")
    assert barrier_note({"barrier_us": 0.6, "barrier_source": "measured"}) == "; grid barrier 0.6 us (measured)"

    f = tmp_path / "barrier.json"
    f.write_text(json.dumps({"barrier_us": 2.0, "records": []}))
    for arg, shown, ms in ((str(f), "2 us (measured)", "2.048"), ("0.25", "0.25 us (measured)", "0.256")):
        rc = cli.main(["bench", "--roofline", "H200", "--barrier-us", arg, "--batch", "1",
                       "--hidden", "256", "--seq", "1024", "--pass", "inference"])
        out = capsys.readouterr().out
        assert rc == 0 and shown in out
        row = next(ln for ln in out.splitlines() if ln.strip().startswith("lstm"))
        assert row.split()[-2] == ms, row  # barrier ms column
    for bad in ("-1", "nan", str(tmp_path / "missing.json")):
        rc = cli.main(["bench", "--roofline", "H200", "--barrier-us", bad])
        assert rc == 2 and "--barrier-us" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--roofline", "H200", "--barrier"])
    assert e.value.code == 2 and "pick one" in capsys.readouterr().err
