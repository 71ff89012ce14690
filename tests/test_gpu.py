"""The fused Triton kernels on CUDA at real sizes vs the float64 reference (skipped without CUDA).

Every cell, every dtype, bidirectional, multi-layer, proj_size and packed sequences, at
T=64..256, B=8..64, H=128..512 (some sizes deliberately not multiples of 16). Uses
fusedrnn.verify (the same comparison and tolerances as `fusedrnn verify`): float32 1e-5 relative
error norm, float64 1e-10, bf16/fp16 at most 2x torch.nn's (cuDNN's) own error + 1 ulp.
Run: `pytest -m gpu tests` (bench/gpu_check.sh does, with a timeout).
"""
from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

from fusedrnn.tools import verify as V  # noqa: E402
SEQ = ("lstm", "gru", "rnn_tanh", "rnn_relu")


def check(case, kernel=None):
    m, inputs = V.case_inputs(case, "cuda")
    rep = V.verify(m, *inputs, backend="triton", dtype=case.dtype, kernel=kernel,
                   label=case.label, input_names=("x", "hx"), full=True, progress=False)
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
@pytest.mark.parametrize("cell, dtype, H", [("lstm", "fp32", 32), ("gru", "fp32", 32), ("rnn_tanh", "fp32", 64),
                                            ("lstm", "bf16", 64), ("gru", "fp16", 64), ("rnn_relu", "bf16", 128)])
def test_forced_kernel(cell, dtype, H, kernel):
    """Both Triton schedules on layers a single-program persistent plan holds (the largest of each
    family and dtype; H not always a multiple of the block), bidirectional and packed, T = 128."""
    case = C(cell, dtype, 128, 16, 96, H - 3, bidirectional=True, packed=True, seed=7)
    rep = check(case, kernel=kernel)
    assert any(r.endswith(kernel) for r in rep.routes), rep.routes


@pytest.mark.parametrize("cell, H", [("lstm", 64), ("gru", 64), ("rnn_tanh", 128)])
def test_grid_barrier(cell, H, monkeypatch):
    """The opt-in multi-program persistent path (FUSEDRNN_GRID_BARRIER=1): several programs per
    direction exchange h through global memory and meet at a grid barrier every step. Never run
    before a GPU was available; a co-residency failure raises (bounded spin) instead of hanging."""
    monkeypatch.setenv("FUSEDRNN_GRID_BARRIER", "1")
    from fusedrnn import kernels as K
    props = torch.cuda.get_device_properties(0)
    smem = getattr(props, "shared_memory_per_block_optin", 0) or 48 * 1024
    mode = {"lstm": "LSTM", "gru": "GRU", "rnn_tanh": "RNN_TANH"}[cell]
    plan = K.persistent_plan(mode, 2, 8, H, H, torch.float32, props.multi_processor_count, smem)
    assert plan is not None and plan.grid_sync and plan.grid[2] > 1, plan
    rep = check(C(cell, "fp32", 300, 8, 64, H, bidirectional=True, packed=True, seed=8),
                kernel="persistent")
    assert any(r.endswith("persistent") for r in rep.routes), rep.routes
