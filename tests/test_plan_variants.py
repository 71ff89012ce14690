"""The persistent plan counts the variants' tiles (kernels/plan.py: persistent_plan's zoneout /
reset): with them on it is the plain plan or smaller, refused at the plain budget's edge, and the
dispatch asks for the plan of the variants a layer runs with. Plan arithmetic only: no kernel runs.
The compiled resources behind the numbers: tests/test_kernels_compile.py and
bench/kernel_resources.py."""
import os

import pytest
import torch

import fusedrnn.kernels as K
from fusedrnn import dispatch, ops
from fusedrnn.errors import BackendUnavailableError

SM90 = (132, 227 * 1024)
VARIANTS = [dict(zoneout=True), dict(reset=True), dict(zoneout=True, reset=True)]
VARIANT_IDS = ["zoneout", "reset", "both"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@pytest.fixture
def no_grid_barrier(monkeypatch):
    monkeypatch.delenv("FUSEDRNN_GRID_BARRIER", raising=False)


def plan(mode, B, H, dtype, P=None, **variants):
    return K.persistent_plan(mode, 2, B, H, H if P is None else P, dtype, *SM90, **variants)


def largest(mode, dtype, **variants):
    """The (BLOCK_B, BLOCK_H) single-program plans no other admitted one contains."""
    ok = [(b, h) for b in (16, 32, 64) for h in (16, 32, 64, 128) if plan(mode, b, h, dtype, **variants)]
    return sorted(c for c in ok if not any(o != c and o[0] >= c[0] and o[1] >= c[1] for o in ok))


def test_plain_plans_are_unchanged(no_grid_barrier):
    """The largest single-program plans without variants, as calibrated before the variants were
    counted (float32 LSTM / GRU H <= 32, RNN H <= 64; half precision LSTM / GRU H <= 64 and RNN
    H <= 128 at B <= 16); False / False is the plain call."""
    assert largest("LSTM", torch.float32) == [(16, 32), (64, 16)]
    assert largest("GRU", torch.float32) == [(32, 32), (64, 16)]
    assert largest("RNN_TANH", torch.float32) == [(32, 64), (64, 32)]
    assert largest("LSTM", torch.bfloat16) == [(16, 64), (64, 16)]
    assert largest("GRU", torch.float16) == [(16, 64), (32, 32), (64, 16)]
    assert largest("RNN_TANH", torch.bfloat16) == [(16, 128), (32, 64), (64, 32)]
    assert largest("LSTM", torch.float64) == [(32, 16)]
    assert largest("RNN_TANH", torch.float64) == [(32, 32), (64, 16)]
    for mode in ("LSTM", "GRU", "RNN_TANH"):
        for dtype in DTYPES:
            for B in (1, 16, 33, 64):
                for H in (5, 32, 64, 128):
                    assert plan(mode, B, H, dtype, zoneout=False, reset=False) == plan(mode, B, H, dtype)


@pytest.mark.parametrize("variants", VARIANTS, ids=VARIANT_IDS)
def test_variant_plans_are_the_plain_plan_or_refused(no_grid_barrier, variants):
    """Single programs hold the whole layer, so a variant can only refuse a plain plan, never
    change it; and with both variants on nothing is admitted that one alone refuses."""
    for mode in ("LSTM", "GRU", "RNN_TANH"):
        for dtype in DTYPES:
            for B in (1, 16, 17, 32, 64):
                for H in (5, 16, 32, 50, 64, 100, 128):
                    for P in ({H, 8} if mode == "LSTM" and "zoneout" not in variants else {H}):
                        got = plan(mode, B, H, dtype, P, **variants)
                        assert got is None or got == plan(mode, B, H, dtype, P), (mode, dtype, B, H, P)
                        if len(variants) == 2 and got is not None:
                            assert plan(mode, B, H, dtype, P, zoneout=True) is not None
                            assert plan(mode, B, H, dtype, P, reset=True) is not None


# (mode, B, H, P, dtype, variant): plain plans that ran out of registers (243-255) with that
# variant on, sm_90 (spills in brackets), and a smaller layer of the same cell that still gets one
# program with it.
EDGES = [("LSTM", 64, 16, 16, torch.float32, "zoneout", (32, 16)),      # 8 B
         ("RNN_TANH", 64, 32, 32, torch.float32, "zoneout", (32, 32)),  # 16 B
         ("RNN_TANH", 32, 64, 64, torch.float32, "reset", (32, 32)),    # 64 B
         ("LSTM", 16, 32, 16, torch.float32, "reset", (16, 16)),        # projection, 24 B
         ("LSTM", 16, 64, 64, torch.bfloat16, "zoneout", (16, 32)),     # 32-56 B
         ("LSTM", 16, 64, 64, torch.float16, "reset", (16, 32)),        # 16-80 B
         ("GRU", 16, 64, 64, torch.bfloat16, "reset", (16, 32))]        # 8 B


@pytest.mark.parametrize("mode, B, H, P, dtype, variant, smaller", EDGES)
def test_variants_refuse_the_plain_edge(no_grid_barrier, mode, B, H, P, dtype, variant, smaller):
    """At the plain budget's edge the variants' tiles ran out of registers (kernels/plan.py:
    ZONEOUT_TILES, RESET_TILES, HALF_*): those plans are refused with that variant on, and a
    smaller layer of the same cell still gets one program."""
    sP = smaller[1] if P == H else P // 2
    assert plan(mode, B, H, dtype, P) is not None
    assert plan(mode, B, H, dtype, P, **{variant: True}) is None
    assert plan(mode, *smaller, dtype, sP, **{variant: True}) == plan(mode, *smaller, dtype, sP)


def test_half_precision_zoneout_alone_keeps_the_widest_gru_and_rnn(no_grid_barrier):
    """GRU H = 64 and RNN H = 128 in half precision compiled without spills with zoneout alone, but
    spilled 8-24 B with reset: the accumulator budget (HALF_ACC_VALUES) tells them apart."""
    for mode, H in (("GRU", 64), ("RNN_TANH", 128)):
        assert plan(mode, 16, H, torch.bfloat16, zoneout=True) == plan(mode, 16, H, torch.bfloat16)
        assert plan(mode, 16, H, torch.bfloat16, reset=True) is None
        assert plan(mode, 16, H, torch.bfloat16, zoneout=True, reset=True) is None


def test_grid_barrier_plans_shrink_with_the_variants(monkeypatch):
    """With several programs per direction the variants make each program's tile smaller (more
    programs) instead of refusing the layer."""
    monkeypatch.setenv("FUSEDRNN_GRID_BARRIER", "1")
    plain = plan("RNN_TANH", 8, 128, torch.float32)
    both = plan("RNN_TANH", 8, 128, torch.float32, zoneout=True, reset=True)
    assert plain.grid_sync and both.grid_sync
    assert both.BLOCK_H < plain.BLOCK_H and both.grid[2] > plain.grid[2]
    assert plan("RNN_TANH", 8, 64, torch.float32).grid_sync is False
    assert plan("RNN_TANH", 8, 64, torch.float32, zoneout=True, reset=True).grid_sync is True


def test_dispatch_plans_with_the_variants_the_layer_runs_with(no_grid_barrier):
    """"auto" takes the persistent kernel only where the plan holds the layer with its variants;
    an explicit "persistent" that the variants push over the budget raises and names them."""
    args = ("triton", "auto", "LSTM", 1, 64, 16, 16, torch.float32, torch.device("cpu"))
    assert dispatch.choose_kernel(*args) == "persistent"
    assert dispatch.choose_kernel(*args, zoneout=True) == "stepwise"
    assert dispatch.choose_kernel(*args, reset=True) == "stepwise"
    with pytest.raises(BackendUnavailableError, match="zoneout, reset"):
        dispatch.choose_kernel("triton", "persistent", *args[2:], zoneout=True, reset=True)
    # the op resolves "auto" with the variants it is given
    x = torch.zeros(2, 64, 3)
    w_hh = torch.zeros(1, 4 * 16, 16)
    assert ops._scan("auto", False, "LSTM", x, w_hh)[2]["kernel"] == "persistent"
    assert ops._scan("auto", False, "LSTM", x, w_hh, None, 0.1, None)[2]["kernel"] == "stepwise"
    reset = torch.zeros(1, 2, 64, dtype=torch.bool)
    assert ops._scan("auto", False, "LSTM", x, w_hh, None, 0.0, reset)[2]["kernel"] == "stepwise"
    assert os.environ.get("FUSEDRNN_GRID_BARRIER") is None
