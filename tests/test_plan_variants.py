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
from fusedrnn.spec import GATES

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


META = torch.device("meta")


def _meta_launches(mode, dtype, B, H, P, zoneout, reset, D=2, T=2):
    """The persistent launchers' forward and backward launches of this layer on meta tensors
    (planned as an sm_90), with zoneout's training mask / reset on as asked."""
    from fusedrnn.kernels.scan import backward_launches, forward_launches
    G = GATES[mode]
    lstm = mode == "LSTM"
    e = lambda *s, d=dtype: torch.empty(*s, dtype=d, device=META)  # noqa: E731
    w_hh, w_hr = e(D, G * H, P), e(D, P, H) if P != H else None
    var = dict(zoneout=e(D, T, B, P, d=torch.bool) if zoneout else None,
               reset=e(D, T, B, d=torch.bool) if reset else None)
    outs, fwd, _ = forward_launches(mode, e(D, T, B, G * H), w_hh, e(D, G * H), w_hr, e(D, B, P),
                                    e(D, B, H) if lstm else None, None, True, "persistent", False, **var)
    y, hn, cn, hp, gates, cs = outs
    _, bwd, _ = backward_launches(mode, y, hn, cn if lstm else None, w_hh, w_hr, None, hp, gates, cs,
                                  "persistent", False, **var)
    return list(fwd) + list(bwd)


@pytest.mark.parametrize("grid_barrier", ["0", "1"])
def test_launchers_run_the_plan_the_dispatch_chose(monkeypatch, grid_barrier):
    """kernels/scan.py: _tiles plans with the variants the launch runs with, so for every layer
    the dispatch's choice and the launchers agree: where plan_for (with the variants) refuses,
    the dispatch raises BackendUnavailableError for kernel='persistent' and the launchers
    ValueError; where it admits, both launches (forward, backward) run exactly that plan, the
    grid-barrier plans that the variants shrink included."""
    monkeypatch.setenv("FUSEDRNN_GRID_BARRIER", grid_barrier)
    checked = refused = 0
    for mode, dtype in (("LSTM", torch.float32), ("RNN_TANH", torch.float32), ("GRU", torch.bfloat16),
                        ("LSTM", torch.float64)):
        for B, H, P in ((64, 16, 16), (16, 32, 32), (16, 32, 16), (32, 64, 64), (8, 128, 128), (16, 64, 64)):
            if P != H and mode != "LSTM":
                continue
            for zoneout, reset in ((False, False), (True, False), (False, True), (True, True)):
                if zoneout and P != H:
                    continue  # zoneout of a projected state: the launchers refuse it
                want = K.plan_for(mode, 2, B, H, P, dtype, META, zoneout=zoneout, reset=reset)
                args = ("triton", "persistent", mode, 2, B, H, P, dtype, META)
                if want is None:
                    refused += 1
                    with pytest.raises(BackendUnavailableError):
                        dispatch.choose_kernel(*args, zoneout=zoneout, reset=reset)
                    with pytest.raises(ValueError, match="plan_for returned None"):
                        _meta_launches(mode, dtype, B, H, P, zoneout, reset)
                    continue
                checked += 1
                assert dispatch.choose_kernel(*args, zoneout=zoneout, reset=reset) == "persistent"
                cells = [ln for ln in _meta_launches(mode, dtype, B, H, P, zoneout, reset)
                         if "PERSISTENT" in ln.args]
                assert len(cells) == 2
                for ln in cells:
                    got = (tuple(ln.grid), ln.args["BLOCK_B"], ln.args["BLOCK_H"], ln.args["BLOCK_K"],
                           ln.num_warps, ln.args["p_sync"] is not None)
                    assert got == (tuple(want.grid), want.BLOCK_B, want.BLOCK_H, want.BLOCK_K, want.num_warps,
                                   want.grid_sync), (mode, dtype, B, H, P, zoneout, reset)
    assert checked > 20 and refused > 10, (checked, refused)


def test_grid_barrier_launch_shrinks_with_the_variants(monkeypatch):
    """The grid-barrier plan that the variants shrink (test_grid_barrier_plans_shrink_with_the_
    variants) is the one launched: more programs of fewer units than the plain launch."""
    monkeypatch.setenv("FUSEDRNN_GRID_BARRIER", "1")
    plain = [ln for ln in _meta_launches("RNN_TANH", torch.float32, 8, 128, 128, False, False)
             if "PERSISTENT" in ln.args]
    both = [ln for ln in _meta_launches("RNN_TANH", torch.float32, 8, 128, 128, True, True)
            if "PERSISTENT" in ln.args]
    assert {ln.args["BLOCK_H"] for ln in plain} == {plan("RNN_TANH", 8, 128, torch.float32).BLOCK_H}
    assert {ln.args["BLOCK_H"] for ln in both} == {
        plan("RNN_TANH", 8, 128, torch.float32, zoneout=True, reset=True).BLOCK_H}
    assert both[0].grid[2] > plain[0].grid[2]


@pytest.mark.parametrize("variant", ["zoneout", "zoneout_p", "reset"])
def test_direct_persistent_scan_refuses_what_the_variants_plan_refuses(no_grid_barrier, variant):
    """A direct scan_forward / scan_backward(kernel='persistent') with a variant plans with it: a
    layer whose plain plan holds but whose variant plan does not (float32 LSTM H = 16, B = 64)
    raises the launchers' ValueError naming the variant before any launch, as the dispatch
    raises BackendUnavailableError for it; without the variant the same layer is planned."""
    D, T, B, H = 1, 2, 64, 16
    dev = torch.device("cpu")
    kw = {"zoneout": dict(zoneout=torch.zeros(D, T, B, H, dtype=torch.bool)), "zoneout_p": dict(zoneout_p=0.25),
          "reset": dict(reset=torch.zeros(D, T, B, dtype=torch.bool))}[variant]
    flags = dict(zoneout=variant != "reset", reset=variant == "reset")
    name = "reset" if variant == "reset" else "zoneout"
    assert K.plan_for("LSTM", D, B, H, H, torch.float32, dev) is not None
    assert K.plan_for("LSTM", D, B, H, H, torch.float32, dev, **flags) is None
    with pytest.raises(BackendUnavailableError, match=name):
        dispatch.choose_kernel("triton", "persistent", "LSTM", D, B, H, H, torch.float32, dev, **flags)
    z = lambda *s, dt=torch.float32: torch.zeros(*s, dtype=dt)  # noqa: E731
    with pytest.raises(ValueError, match=f"{name}\\): plan_for returned None"):
        K.scan_forward("LSTM", z(D, T, B, 4 * H), z(D, 4 * H, H), None, None, z(D, B, H), z(D, B, H), None, True,
                       kernel="persistent", **kw)
    with pytest.raises(ValueError, match=f"{name}\\): plan_for returned None"):
        K.scan_backward("LSTM", z(T, B, H), z(D, B, H), z(D, B, H), z(D, 4 * H, H), None, None, z(D, T, B, H),
                        z(D, T, B, 4 * H), z(D, T, B, H), kernel="persistent", **kw)
    # the checks up to the plan pass without the variant (nothing launched: the plan is all asked)
    from fusedrnn.kernels.scan import _tiles
    assert _tiles("persistent", "LSTM", D, B, H, H, torch.float32, dev) == K.plan_for(
        "LSTM", D, B, H, H, torch.float32, dev)
