"""fusedrnn.kernels (Triton) against fusedrnn.loop, the same scan contract in PyTorch.

Without CUDA the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1
before anything imports them): every program runs in Python, ~0.05-0.3 s per launch, so shapes are
tiny (T <= 4, B <= 3, H <= 5 except where a test needs more) and the dtype matrix is sampled: the
full mode x direction x lengths x save x kernel matrix in float64 and float32, a subset in
float16 / bfloat16.
"""
import os

import pytest
import torch

import fusedrnn.kernels as K
from fusedrnn import loop
from fusedrnn.kernels import plan as kplan
from fusedrnn.kernels import scan as kscan
from fusedrnn.spec import GATES

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.triton

T, B, H, P_PROJ = 4, 3, 5, 3
LENGTHS = [4, 1, 3]  # unsorted, one row dead after the first step, one full
CELLS = [("LSTM", False), ("LSTM", True), ("GRU", False), ("RNN_TANH", False), ("RNN_RELU", False)]
CELL_IDS = ["LSTM", "LSTM-proj", "GRU", "RNN_TANH", "RNN_RELU"]
# Relative error norms vs the float64 reference. float64: the kernels do the same operations as
# loop in a different order (blocked dots, sigmoid via exp), ~1e-16 per op over a few steps.
# float32: state and dots in float32 (ieee, not tf32), ~1e-7 per op, a few dozen ops deep.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


@pytest.fixture(autouse=True)
def _poison():
    """Every tensor the launchers allocate starts as NaN: an element a kernel fails to write shows."""
    K.set_poison(True)
    yield
    K.set_poison(False)


def rel_err(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_layer(mode, proj, D, dtype, lengths=None, scale=1.0, T=T, B=B, H=H, seed=0):
    """Inputs in `dtype`, drawn in float64 so every dtype sees the same values (up to rounding)."""
    g = torch.Generator().manual_seed(seed)
    G = GATES[mode]
    P = P_PROJ if proj else H

    def r(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(dtype).to(DEVICE)

    return dict(
        xg=r(D, T, B, G * H, s=scale), w_hh=r(D, G * H, P, s=0.5), b_hh=r(D, G * H, s=0.5),
        w_hr=r(D, P, H, s=0.5) if proj else None, h0=r(D, B, P), c0=r(D, B, H) if mode == "LSTM" else None,
        lengths=torch.tensor(lengths, dtype=torch.int64, device=DEVICE) if lengths else None)


def grads_for(mode, y, hn, cn, seed=1):
    g = torch.Generator().manual_seed(seed)

    def r(t):
        return torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype).to(t.device)

    return r(y), r(hn), (r(cn) if mode == "LSTM" else None)


def as64(layer):
    return {k: (v.double() if v is not None and v.is_floating_point() else v) for k, v in layer.items()}


def fwd(impl, mode, L, save, **kw):
    return impl.scan_forward(mode, L["xg"], L["w_hh"], L["b_hh"], L["w_hr"], L["h0"], L["c0"], L["lengths"],
                             save, **kw)


def bwd(impl, mode, L, grads, ws, **kw):
    dy, dhn, dcn = grads
    return impl.scan_backward(mode, dy, dhn, dcn, L["w_hh"], L["w_hr"], L["lengths"], *ws, **kw)


FWD_NAMES = ("y", "hn", "cn", "hp", "gates", "cs")
BWD_NAMES = ("dxg", "dgh", "dh0", "dc0", "dhp")


def check_finite(names, outs):
    for name, o in zip(names, outs):
        if o is not None:
            assert not torch.isnan(o).any(), f"{name} has unwritten (NaN-poisoned) elements"


# ----------------------------------------------------------------------------------------------
# float64 / float32: the full matrix, against loop in float64
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kernel", ["stepwise", "persistent"])
@pytest.mark.parametrize("save", [True, False], ids=["save", "nosave"])
@pytest.mark.parametrize("lengths", [None, LENGTHS], ids=["full", "lengths"])
@pytest.mark.parametrize("D", [1, 2])
@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_forward_workspace_and_backward_match_float64_loop(dtype, cell, D, lengths, save, kernel):
    mode, proj = cell
    L = make_layer(mode, proj, D, dtype, lengths)
    L64 = as64(L)
    n0 = K.launch_count()
    out = fwd(K, mode, L, save, kernel=kernel)
    assert K.launch_count() > n0, "no kernel ran"
    ref = fwd(loop, mode, L64, True)
    check_finite(FWD_NAMES, out)
    tol = TOL[dtype]
    wdt = torch.float64 if dtype == torch.float64 else torch.float32
    for name, o, r in zip(FWD_NAMES[:3], out, ref):
        assert o.dtype == dtype and o.shape == r.shape, name
        if o.numel():
            assert rel_err(o, r) < tol, f"{name}: {rel_err(o, r):.2e}"
    if not save:
        assert all(o.numel() == 0 for o in out[3:]), "save=False must allocate no workspace"
        return
    for name, o, r in zip(FWD_NAMES[3:], out[3:], ref[3:]):
        assert o.dtype == wdt and o.shape == r.shape, name
        if o.numel():
            assert rel_err(o, r) < tol, f"{name}: {rel_err(o, r):.2e}"

    grads = grads_for(mode, *out[:3])
    n0 = K.launch_count()
    g = bwd(K, mode, L, grads, out[3:], kernel=kernel)
    assert K.launch_count() > n0, "no kernel ran"
    # the reference backward runs on the reference workspace: the comparison is end to end
    gref = bwd(loop, mode, L64, tuple(x.double() if x is not None else None for x in grads), ref[3:])
    check_finite(BWD_NAMES, g)
    assert (g[1] is g[0]) == (mode != "GRU"), "dgh is dxg itself except for GRU"
    assert (g[4] is None) == (not proj)
    for name, o, r in zip(BWD_NAMES, g, gref):
        if o is None:
            continue
        assert o.dtype == dtype and o.shape == r.shape, name
        if o.numel():
            assert rel_err(o, r) < tol, f"{name}: {rel_err(o, r):.2e}"


# ----------------------------------------------------------------------------------------------
# float16 / bfloat16: a subset, judged against torch's own error in the same dtype
# ----------------------------------------------------------------------------------------------

def baseline_err(torch_out, r64):
    """torch's own error in this dtype. The interpreter's float32 -> bfloat16 cast truncates
    (triton/runtime/interpreter.py: cast_impl -> _convert_float with no rounding mode) where the GPU
    rounds to nearest (cvt.rn), which alone doubles the RMS rounding error; there the baseline is
    the error of truncating the float64 result instead, so the 1.5x margin still means something."""
    err = rel_err(torch_out, r64)
    if torch_out.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        bits = r64.float().contiguous().view(torch.int32) & ~0xFFFF
        err = max(err, rel_err(bits.view(torch.float32).to(torch.bfloat16), r64))
    return err


@pytest.mark.parametrize("kernel", ["stepwise", "persistent"])
@pytest.mark.parametrize("cell", CELLS[:4], ids=CELL_IDS[:4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_half_precision_error_within_torch_own_rounding(dtype, cell, kernel):
    """Inputs and outputs in half precision, state and dots in float32 (as loop). The
    reference is the float64 scan of the same (rounded) inputs; loop run in `dtype` shows
    what rounding the outputs alone costs. Our error may exceed it by 1.5x (summation order and
    exp implementation move values across rounding boundaries) plus a floor of a tenth of the
    dtype's epsilon for outputs that torch happens to round almost exactly."""
    mode, proj = cell
    D = 2
    L = make_layer(mode, proj, D, dtype, LENGTHS)
    L64 = as64(L)
    out = fwd(K, mode, L, True, kernel=kernel)
    check_finite(FWD_NAMES, out)
    ref64 = fwd(loop, mode, L64, True)
    ref_dt = fwd(loop, mode, L, True)
    floor = 0.1 * torch.finfo(dtype).eps
    for name, o, r64, rdt in zip(FWD_NAMES[:3], out, ref64, ref_dt):
        if o.numel():
            assert o.dtype == dtype
            base = baseline_err(rdt, r64)
            assert rel_err(o, r64) <= 1.5 * base + floor, f"{name}: ours {rel_err(o, r64):.2e} torch {base:.2e}"
    grads = grads_for(mode, *out[:3])
    g = bwd(K, mode, L, grads, out[3:], kernel=kernel)
    check_finite(BWD_NAMES, g)
    g64 = bwd(loop, mode, L64, tuple(x.double() if x is not None else None for x in grads), ref64[3:])
    gdt = bwd(loop, mode, L, grads, ref_dt[3:])
    for name, o, r64, rdt in zip(BWD_NAMES, g, g64, gdt):
        if o is not None and o.numel():
            assert o.dtype == dtype
            base = baseline_err(rdt, r64)
            assert rel_err(o, r64) <= 1.5 * base + floor, f"{name}: ours {rel_err(o, r64):.2e} torch {base:.2e}"


@pytest.mark.parametrize("kernel", ["stepwise", "persistent"])
@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_half_precision_state_stays_float32_accurate(dtype, cell, kernel):
    """Half-precision layers run their recurrent dots on tensor cores as two products (state split
    into hi + lo halves, kernels/common.py: mdot), so the float32 state and workspace must track
    the float64 scan of the same inputs to ~eps^2, not eps: a kernel that rounded the state to
    half precision once per step would be off by ~eps/8 (bfloat16 ~1e-3, float16 ~1e-4). Bound:
    4 eps^2 (hi + lo represents the state to ~eps^2, two truncation ulps under the interpreter),
    bfloat16 2.4e-4, float16 3.8e-6; measured ~3e-5 and ~2e-7 at this size.
    The backward's outputs are stored in `dtype`, so their error must be that of rounding the
    exact gradient (the float64 backward on the kernel's own workspace) once: at most 1.1x it
    (measured 1.00-1.02x); split-free half-precision dots would add errors of the same size."""
    mode, proj = cell
    assert kplan.dot_precision(dtype, False, DEVICE) in ("x2", "x2emu")
    check_half_state(dtype, mode, proj, kernel, H=20)


@pytest.mark.parametrize("mode, H", [("LSTM", 50), ("GRU", 50), ("RNN_TANH", 100)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_persistent_half_precision_wide_single_program(dtype, mode, H):
    """float16 / bfloat16 layers without a projection get one persistent program per direction up
    to 32 KiB of half-precision weights at B <= 16 (LSTM / GRU H <= 64, RNN H <= 128; float32
    stops at 32 / 64): same checks as above at those widths (not multiples of 16)."""
    plan = K.persistent_plan(mode, 2, 3, H, H, dtype, 1, 1 << 20)
    assert plan is not None and plan.grid == (2, 1, 1) and plan.BLOCK_H >= H and not plan.grid_sync
    assert K.persistent_plan(mode, 2, 3, H, H, torch.float32, 1, 1 << 20) is None
    assert K.persistent_plan(mode, 2, 17, H, H, dtype, 1, 1 << 20) is None, "B > 16 spills (table)"
    check_half_state(dtype, mode, False, "persistent", H=H)


def check_half_state(dtype, mode, proj, kernel, H):
    L = make_layer(mode, proj, 2, dtype, LENGTHS, T=6, B=3, H=H)
    n0 = K.launch_count()
    out = fwd(K, mode, L, True, kernel=kernel)
    assert K.launch_count() > n0, "no kernel ran"
    ref = fwd(loop, mode, as64(L), True)
    bound = 4 * torch.finfo(dtype).eps ** 2
    for name, o, r in zip(FWD_NAMES[3:], out[3:], ref[3:]):
        if o.numel():
            assert o.dtype == torch.float32
            assert rel_err(o, r) < bound, f"{name}: {rel_err(o, r):.2e} >= {bound:.1e}"
    grads = grads_for(mode, *out[:3])
    g = bwd(K, mode, L, grads, out[3:], kernel=kernel)
    check_finite(BWD_NAMES, g)
    g64 = bwd(loop, mode, as64(L), tuple(x.double() if x is not None else None for x in grads),
              tuple(w.double() for w in out[3:]))
    for name, o, r in zip(BWD_NAMES, g, g64):
        if o is not None and o.numel():
            base = rounding_err(r, dtype)
            assert rel_err(o, r) <= 1.1 * base, f"{name}: {rel_err(o, r):.2e} vs rounding {base:.2e}"


def rounding_err(r64, dtype):
    """The error of storing r64 in `dtype` the way the kernels' final cast does: round to nearest
    on the GPU, truncation for bfloat16 under the interpreter (see baseline_err)."""
    if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        bits = r64.float().contiguous().view(torch.int32) & ~0xFFFF
        return rel_err(bits.view(torch.float32), r64)
    return rel_err(r64.to(dtype), r64)


# ----------------------------------------------------------------------------------------------
# Behaviour
# ----------------------------------------------------------------------------------------------

# exp(-x) overflowing to inf is the intended path (sigmoid -> 1 / inf = 0); numpy warns about it.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("cell", [("LSTM", False), ("RNN_TANH", False)], ids=["LSTM", "RNN_TANH"])
def test_saturated_activations(cell):
    """|pre-activation| ~ 100: tanh as a ratio of exponentials would give inf/inf = NaN."""
    mode, proj = cell
    L = make_layer(mode, proj, 1, torch.float32, scale=100.0, T=2)
    out = fwd(K, mode, L, True)
    check_finite(FWD_NAMES, out)
    ref = fwd(loop, mode, as64(L), True)
    assert rel_err(out[0], ref[0]) < 1e-5


@pytest.mark.parametrize("kernel", ["stepwise", "persistent"])
def test_zero_length_row(kernel):
    """A row of length 0 is never live: hn = h0, cn = c0, y all zeros, dh0 = dhn, dc0 = dcn."""
    L = make_layer("LSTM", True, 2, torch.float64, [3, 0, 2], T=3)
    out = fwd(K, "LSTM", L, True, kernel=kernel)
    check_finite(FWD_NAMES, out)
    ref = fwd(loop, "LSTM", L, True)
    for o, r in zip(out, ref):
        assert rel_err(o, r) < 1e-10
    assert torch.equal(out[1][:, 1], L["h0"][:, 1]) and torch.equal(out[0][:, 1], torch.zeros_like(out[0][:, 1]))
    grads = grads_for("LSTM", *out[:3])
    g = bwd(K, "LSTM", L, grads, out[3:], kernel=kernel)
    check_finite(BWD_NAMES, g)
    for o, r in zip(g, bwd(loop, "LSTM", L, grads, ref[3:])):
        assert rel_err(o, r) < 1e-10
    assert torch.equal(g[2][:, 1], grads[1][:, 1]) and torch.equal(g[3][:, 1], grads[2][:, 1])


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["stepwise", "persistent"])
@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
def test_two_runs_are_bitwise_equal_on_gpu(cell, kernel):
    """Forward and backward twice on the GPU, bitwise equal (the interpreter runs programs one after
    another, so there this would hold trivially). tests/test_kernels_compile.py proves the cause
    for every compiled configuration: no floating-point atomics."""
    mode, proj = cell
    L = make_layer(mode, proj, 2, torch.float32, LENGTHS)
    runs = []
    for _ in range(2):
        out = fwd(K, mode, L, True, kernel=kernel)
        g = bwd(K, mode, L, grads_for(mode, *out[:3]), out[3:], kernel=kernel)
        runs.append([x for x in (*out, *g) if x is not None])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kernel", ["stepwise", "persistent"])
def test_allow_tf32(kernel):
    """allow_tf32 selects tf32 dots (10-bit mantissa inputs, ~1e-3 relative per dot on the GPU; the
    interpreter computes them in float32), so only a loose tolerance holds."""
    L = make_layer("LSTM", False, 2, torch.float32, LENGTHS)
    out = fwd(K, "LSTM", L, True, kernel=kernel, allow_tf32=True)
    ref = fwd(loop, "LSTM", as64(L), True)
    assert rel_err(out[0], ref[0]) < 1e-2
    grads = grads_for("LSTM", *out[:3])
    g = bwd(K, "LSTM", L, grads, out[3:], kernel=kernel, allow_tf32=True)
    gref = bwd(loop, "LSTM", as64(L), tuple(x.double() for x in grads), ref[3:])
    assert rel_err(g[0], gref[0]) < 1e-2


def test_persistent_launches_do_not_grow_with_T():
    """The persistent kernel runs the time loop inside the kernel: T=4 and T=12 make the same number
    of launches, for the forward and for forward + backward."""
    counts = []
    for steps in (4, 12):
        L = make_layer("RNN_TANH", False, 1, torch.float32, T=steps, B=2, H=3)
        n0 = K.launch_count()
        out = fwd(K, "RNN_TANH", L, True, kernel="persistent")
        n1 = K.launch_count()
        bwd(K, "RNN_TANH", L, grads_for("RNN_TANH", *out[:3]), out[3:], kernel="persistent")
        counts.append((n1 - n0, K.launch_count() - n0))
    assert counts[0] == counts[1], counts
    assert counts[0] == (1, 2)


@pytest.mark.parametrize("kernel", ["stepwise", "persistent"])
@pytest.mark.parametrize("mode, proj", [("LSTM", False), ("LSTM", True), ("GRU", False)])
def test_inference_memory_does_not_grow_with_T(mode, proj, kernel):
    """save=False (no_grad / inference) allocates the outputs and T-independent state buffers
    only: at T = 10,000 every tensor the launcher allocates, except y (T, B, D*P), has the same
    size as at T = 10. Meta tensors: the launcher's own allocations, nothing runs."""
    def allocated(T):
        G, D, B, Hh, P = GATES[mode], 2, 8, 32, 16 if proj else 32
        m = dict(device="meta", dtype=torch.bfloat16)
        xg, w_hh = torch.empty(D, T, B, G * Hh, **m), torch.empty(D, G * Hh, P, **m)
        w_hr = torch.empty(D, P, Hh, **m) if proj else None
        h0, c0 = torch.empty(D, B, P, **m), torch.empty(D, B, Hh, **m) if mode == "LSTM" else None
        outs, launches, _ = kscan.forward_launches(mode, xg, w_hh, None, w_hr, h0, c0, None, False,
                                                   kernel, False)
        inputs = {id(t) for t in (xg, w_hh, w_hr, h0, c0) if t is not None}
        seen = {}
        for ln in launches:
            for a in ln.args.values():
                if isinstance(a, torch.Tensor) and id(a) not in inputs:
                    seen[id(a)] = a
            break  # the stepwise launches differ only in the step index
        y = outs[0]
        return y.numel(), sorted(a.numel() * a.element_size() for a in seen.values() if a is not y)

    (y10, other10), (y10k, other10k) = allocated(10), allocated(10_000)
    assert y10k == 1000 * y10
    assert other10k == other10, "an allocation besides y grows with T under save=False"


def test_stepwise_launches_once_per_step_and_projection():
    L = make_layer("LSTM", True, 2, torch.float32, T=2)
    n0 = K.launch_count()
    out = fwd(K, "LSTM", L, True)
    assert K.launch_count() - n0 == 2 * 2  # cell + projection per step
    n0 = K.launch_count()
    bwd(K, "LSTM", L, grads_for("LSTM", *out[:3]), out[3:])
    assert K.launch_count() - n0 == 2 * 2 + 1  # projection-side dh + cell per step, then dh0


def test_persistent_plan_limits():
    # one program per direction when all weights fit its register budget
    plan = K.persistent_plan("LSTM", 2, 3, 32, 32, torch.float32, 132, 227 * 1024)
    assert plan is not None and plan.grid == (2, 1, 1) and not plan.grid_sync
    assert plan.BLOCK_B >= 3 and plan.BLOCK_H >= 32 and plan.BLOCK_K >= 32
    # too big for one CTA: None unless the (GPU-only, untested here) grid barrier is enabled
    old = os.environ.pop("FUSEDRNN_GRID_BARRIER", None)
    try:
        assert K.persistent_plan("LSTM", 2, 8, 64, 64, torch.float32, 132, 227 * 1024) is None
        os.environ["FUSEDRNN_GRID_BARRIER"] = "1"
        plan = K.persistent_plan("LSTM", 2, 8, 64, 64, torch.float32, 132, 227 * 1024)
        assert plan is not None and plan.grid_sync and 2 * plan.grid[2] <= 132
        # every program must be resident at once
        assert K.persistent_plan("LSTM", 2, 8, 64, 64, torch.float32, 4, 227 * 1024) is None
        # never with a projection
        assert K.persistent_plan("LSTM", 2, 8, 64, 32, torch.float32, 132, 227 * 1024) is None
        assert K.persistent_plan("LSTM", 1, 8, 4096, 4096, torch.float32, 132, 227 * 1024) is None
        assert K.persistent_plan("GRU", 1, 500, 16, 16, torch.float32, 132, 227 * 1024) is None
    finally:
        os.environ.pop("FUSEDRNN_GRID_BARRIER", None)
        if old is not None:
            os.environ["FUSEDRNN_GRID_BARRIER"] = old
    with pytest.raises(ValueError, match="persistent"):
        L = make_layer("RNN_TANH", False, 1, torch.float32, B=2, H=300, T=1)
        fwd(K, "RNN_TANH", L, False, kernel="persistent")


def test_device_limits_have_one_definition_and_keep_the_plans():
    """kernels/plan.py is the one place that knows device limits: meta plans for an sm_90, the
    interpreter (cpu) for one SM of it. The shared-memory value cannot change a single-program
    plan (they stage at most 64 KiB), so the CPU plans equal those of any larger limit."""
    assert K.device_limits("meta") == (132, 227 * 1024)
    assert K.device_limits("cpu") == (1, 227 * 1024)
    old = os.environ.pop("FUSEDRNN_GRID_BARRIER", None)
    try:
        for mode in ("LSTM", "GRU", "RNN_TANH"):
            for dtype in (torch.float32, torch.float64, torch.bfloat16):
                for B in (1, 16, 17, 64, 65):
                    for H in (5, 16, 32, 50, 64, 100, 128, 129):
                        for P in ({H, 8} if mode == "LSTM" else {H}):
                            want = K.persistent_plan(mode, 2, B, H, P, dtype, 1, 1 << 20)
                            assert K.plan_for(mode, 2, B, H, P, dtype, "cpu") == want
                            assert K.persistent_plan(mode, 2, B, H, P, dtype, 1, 64 * 1024) == want
                            single = K.plan_for(mode, 2, B, H, P, dtype, "meta")
                            assert single == want, "without the grid barrier, meta plans single programs"
    finally:
        if old is not None:
            os.environ["FUSEDRNN_GRID_BARRIER"] = old


def test_tiles_below_16_fail_the_static_assert():
    """tl.dot needs every tile dimension >= 16: the kernels static_assert it (at compile time on
    the GPU, at launch under the interpreter) instead of trusting the plan."""
    L = make_layer("RNN_TANH", False, 1, torch.float32, T=1, B=2, H=3)
    _, launches, _ = kscan.forward_launches("RNN_TANH", L["xg"], L["w_hh"], L["b_hh"], None, L["h0"], None,
                                            None, False, "stepwise", False)
    launch = next(iter(launches))
    assert launch.args["BLOCK_B"] == 16 and launch.args["p_whr"] is None and launch.args["p_hp"] is None
    with pytest.raises(Exception, match="tiles >= 16"):
        launch.kernel[launch.grid](**dict(launch.args, BLOCK_B=8), num_warps=launch.num_warps)


def _misuse_cases():
    def base(**kw):
        L = make_layer("LSTM", False, 2, torch.float32, LENGTHS)
        L.update(kw)
        return L
    good = base()
    other = "meta"
    return [
        ("xg", dict(xg=good["xg"][0]), "xg must have 4 dimensions"),
        ("w_hh", dict(w_hh=good["w_hh"][:, :-1]), "w_hh must have shape"),
        ("h0", dict(h0=good["h0"][:, :2]), "h0 must have shape"),
        ("c0-missing", dict(c0=None), "c0 must be a tensor"),
        ("int-dtype", dict(xg=good["xg"].to(torch.int32)), "xg must be float16"),
        ("dtype-mix", dict(h0=good["h0"].double()), "h0 must have dtype"),
        ("lengths-int32", dict(lengths=good["lengths"].int()), "lengths must have dtype"),
        ("device", dict(h0=good["h0"].to(other)), "h0 is on meta"),
        ("strided", dict(w_hh=good["w_hh"].transpose(1, 2).contiguous().transpose(1, 2)), "w_hh must be contiguous"),
        ("proj-non-lstm", dict(w_hr=torch.zeros(2, H, H, device=DEVICE)), None),
    ], base


def test_misuse_raises_value_error_before_launch():
    cases, base = _misuse_cases()
    for name, kw, msg in cases:
        L = base(**kw)
        mode = "GRU" if name == "proj-non-lstm" else "LSTM"
        if mode == "GRU":
            L = make_layer("GRU", False, 2, torch.float32)
            L["w_hr"] = kw["w_hr"]
        n0 = K.launch_count()
        with pytest.raises(ValueError, match=msg):
            fwd(K, mode, L, True)
        assert K.launch_count() == n0, name
    L = base()
    with pytest.raises(ValueError, match="mode"):
        fwd(K, "LSTMX", L, True)
    with pytest.raises(ValueError, match="kernel must be one of"):
        fwd(K, "LSTM", L, True, kernel="fast")
    # backward: a workspace from save=False, and wrong-dtype gradients
    out = fwd(K, "LSTM", L, False)
    grads = grads_for("LSTM", *out[:3])
    n0 = K.launch_count()
    with pytest.raises(ValueError, match="hp"):
        bwd(K, "LSTM", L, grads, out[3:])
    out = fwd(K, "LSTM", L, True)
    n0 = K.launch_count()
    with pytest.raises(ValueError, match="dy must have"):
        bwd(K, "LSTM", L, (grads[0][:2], grads[1], grads[2]), out[3:])
    with pytest.raises(ValueError, match="dhn must have dtype"):
        bwd(K, "LSTM", L, (grads[0], grads[1].double(), grads[2]), out[3:])
    with pytest.raises(ValueError, match="gates must have dtype"):
        bwd(K, "LSTM", L, grads, (out[3], out[4].double(), out[5]))
    assert K.launch_count() == n0


def test_launches_run_on_their_tensors_device(monkeypatch):
    """Triton launches on torch's current device: every launch must enter its tensors' device
    (a layer on cuda:1 must not launch on device 0). Checked without a GPU: fake cuda:1 tensors,
    a recording torch.cuda.device and a stand-in kernel."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from fusedrnn.kernels import launch as L

    with FakeTensorMode():
        x = torch.empty(2, device="cuda:1")
    entered, calls = [], []

    class Recorder:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(torch.device(self.device))

        def __exit__(self, *exc):
            entered.append(None)

    class Kernel:
        def __getitem__(self, grid):
            return lambda **kw: calls.append(list(entered))

    monkeypatch.setattr(torch.cuda, "device", Recorder)
    L.run([L.Launch(Kernel(), (1,), dict(p_x=x, n=3), 4)] * 2)
    assert calls == [[torch.device("cuda", 1)], [torch.device("cuda", 1), None, torch.device("cuda", 1)]]
