"""The fused Triton kernels on CUDA at real sizes vs the float64 reference (skipped without CUDA).

Every cell, every dtype, bidirectional, multi-layer, proj_size and packed sequences, at
T=64..256, B=8..64, H=128..512 (some sizes deliberately not multiples of 16). Uses
fusedrnn.verify (the same comparison and tolerances as `fusedrnn verify`): float32 1e-5 relative
error norm, float64 1e-10, bf16/fp16 at most 2x torch.nn's (cuDNN's) own error + 1 ulp.
Run: `pytest -m gpu tests` (bench/gpu_check.sh does, with a timeout).
"""
from __future__ import annotations

import importlib

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

V = importlib.import_module("fusedrnn.verify")
SEQ = ("lstm", "gru", "rnn_tanh", "rnn_relu")


def check(case, kernel=None):
    m, inputs = V.case_inputs(case, "cuda")
    rep = V.verify(m, *inputs, backend="triton", dtype=case.dtype, kernel=kernel,
                   label=case.label, input_names=("x", "hx"))
    assert rep.error is None, f"{case.label}: {rep.error}"
    assert any(r.startswith("triton") for r in rep.routes), f"{case.label}: routes {rep.routes}"
    assert rep.passed, str(rep)
    return rep


def C(cell, dtype, T, B, I, H, **kw):
    return V.Case(cell, V.parse_dtype(dtype), T, B, I, H, **kw)


@pytest.mark.parametrize("cell", SEQ)
def test_fp32_one_layer(cell):
    check(C(cell, "fp32", 128, 32, 256, 256))


@pytest.mark.parametrize("cell", SEQ)
def test_fp32_two_layers_bidirectional_packed(cell):
    proj = 96 if cell == "lstm" else 0
    check(C(cell, "fp32", 100, 24, 200, 257, layers=2, bidirectional=True, proj_size=proj,
            packed=True, seed=1))


@pytest.mark.parametrize("cell", SEQ)
def test_bf16_long(cell):
    check(C(cell, "bf16", 256, 64, 512, 512, seed=2))


@pytest.mark.parametrize("cell", SEQ)
def test_fp16_bidirectional(cell):
    check(C(cell, "fp16", 64, 8, 128, 128, bidirectional=True, seed=3))


@pytest.mark.parametrize("cell", SEQ)
def test_fp64_packed(cell):
    check(C(cell, "fp64", 64, 16, 100, 136, layers=2, bidirectional=True, packed=True, seed=4))


def test_lstm_proj_bf16_packed():
    check(C("lstm", "bf16", 200, 48, 384, 512, proj_size=256, packed=True, bidirectional=True,
            seed=5))


@pytest.mark.parametrize("cell", ("lstmcell", "grucell", "rnncell"))
@pytest.mark.parametrize("dtype", ("fp32", "bf16", "fp64"))
def test_cells(cell, dtype):
    check(C(cell, dtype, 1, 64, 384, 512, seed=6))


@pytest.mark.parametrize("kernel", ("stepwise", "persistent"))
@pytest.mark.parametrize("cell", ("lstm", "gru"))
def test_forced_kernel(cell, kernel):
    """Both Triton schedules, where the persistent one can hold the layer."""
    case = C(cell, "fp32", 128, 16, 128, 256, bidirectional=True, seed=7)
    m, inputs = V.case_inputs(case, "cuda")
    rep = V.verify(m, *inputs, backend="triton", dtype=case.dtype, kernel=kernel,
                   label=case.label, input_names=("x", "hx"))
    if rep.error and kernel == "persistent" and "persistent" in rep.error:
        pytest.skip(f"persistent kernel cannot hold this layer here: {rep.error}")
    assert rep.error is None, rep.error
    assert rep.passed, str(rep)
