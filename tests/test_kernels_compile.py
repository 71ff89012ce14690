"""Ahead-of-time compilation of the Triton kernels for sm_90 and sm_80 (no GPU needed).

The configurations come from fusedrnn.kernels.aot.kernel_configs, which runs the launchers' own
dispatch on meta tensors, so this test follows any change of block sizes or flags. Compilation
runs in a subprocess without TRITON_INTERPRET (the interpreter, which tests/conftest.py enables on
machines without CUDA, replaces @triton.jit functions and cannot compile them). sm_90: one
configuration of every (kernel, mode, dtype, variant, grid barrier, projection; for stepwise LSTM
also tf32 / ieee) group, the one with every optional feature on, plus the barrier-only kernel
(kernels/barrier.py), whose sm_90 PTX must order the grid barrier with release / acquire atomics;
sm_80: 12 of those, evenly spread.
About 3 minutes on 2 cores with an empty Triton cache.
"""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def _ptxas():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "from fusedrnn.kernels.aot import ptxas_path; print(ptxas_path() or '')"
    try:
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    except Exception:
        return None
    path = out.stdout.strip()
    return path if path and os.path.exists(path) else None


def _compile(*extra):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "fusedrnn.kernels.aot", *extra], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def ptxas():
    path = _ptxas()
    if path is None:
        pytest.skip("the CUDA backend's ptxas was not found (Triton wheel without NVIDIA backend?)")
    return path


def _check(results):
    assert results, "nothing compiled"
    failed = [f"{r['arch']} {r['kernel']} {r['label']}: {r.get('error', '')[-600:]}" for r in results if not r["ok"]]
    assert not failed, "\n".join(failed)
    for r in results:
        assert r["has_ptx"] and r["has_cubin"], r


def test_compile_sm90(ptxas):
    results = _compile("--arch", "90")
    _check(results)
    # every mode x dtype x variant (stepwise / persistent / persistent with grid barrier) compiled
    seen = {(r["label"].split("/")[0], r["label"].split("/")[1], "P" in r["label"].split("/")[2],
             "X" in r["label"].split("/")[2]) for r in results if r["kernel"].startswith("scan_")}
    for mode in ("LSTM", "GRU", "RNN_TANH", "RNN_RELU"):
        for dt in ("fp32", "fp16", "bf16", "fp64"):
            for variant in ((False, False), (True, False), (True, True)):
                assert (mode, dt, *variant) in seen, (mode, dt, variant)
    assert {"lstm_proj_fwd_kernel", "lstm_proj_bwd_kernel", "grid_barrier_kernel"} <= {r["kernel"] for r in results}
    # half precision runs its recurrent dots on tensor cores (the two-pass "x2" dot): mma.sync,
    # or wgmma where the persistent weight tile has the 64 rows a warpgroup needs
    for r in results:
        if r["label"].split("/")[1] in ("fp16", "bf16"):
            assert r["mma"] or r["wgmma"], f"{r['kernel']} {r['label']}: no tensor-core instruction"
    assert any(r["wgmma"] for r in results if "P" in r["label"].split("/")[2]), "no persistent wgmma"


def test_compile_barrier_sm90_release_acquire(ptxas):
    """The barrier-only kernel alone (seconds): its grid barrier arrives with a release reduction
    and polls with acquire loads (or acquire atomics), the ordering the persistent scan relies on."""
    results = _compile("--arch", "90", "--kernel", "grid_barrier_kernel")
    _check(results)
    assert [r["label"] for r in results] == ["BARRIER/X/w8"]
    ops = results[0]["ordered_ops"]
    assert any(op.startswith(("red.global.gpu.release", "atom.global.gpu.release")) for op in ops), ops
    assert any(op.startswith(("ld.global.gpu.acquire", "atom.global.gpu.acquire")) for op in ops), ops


def test_compile_sm80(ptxas):
    _check(_compile("--arch", "80", "--sample", "12"))


def test_step_index_arguments_are_not_specialized():
    """The arguments that change from one launch to the next (the step range, the barrier count)
    must not be specialized by the JIT, or a stepwise layer would compile and choose among
    variants for a step of 1 / a multiple of 16, and the barrier benchmark's n_steps = 1 launch
    would run a different binary than its n_steps = 1024 launch."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import json\n"
            "from fusedrnn.kernels import scan, lstm, barrier\n"
            "ks = (scan.scan_fwd_kernel, scan.scan_bwd_kernel, lstm.lstm_proj_fwd_kernel,\n"
            "      lstm.lstm_proj_bwd_kernel, barrier.grid_barrier_kernel)\n"
            "print(json.dumps({k.__name__: [p.name for p in k.params if p.do_not_specialize] for k in ks}))\n")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == {"scan_fwd_kernel": ["s_begin", "s_end"], "scan_bwd_kernel": ["i_begin", "i_end"],
                   "lstm_proj_fwd_kernel": ["s"], "lstm_proj_bwd_kernel": ["s"],
                   "grid_barrier_kernel": ["n_steps"]}, got
