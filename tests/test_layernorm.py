"""LayerNormLSTM / LayerNormGRU (layers and cells): every route against the float64 reference.

Routes: "loop" (the CPU default: fusedrnn/layernorm.py's PyTorch scan with its hand-written
backward), "triton" (kernels/layernorm.py through the interpreter, stepwise and persistent, with
NaN-poisoned allocations) and "reference" (the oracle, plain step loop with autograd). Tolerances
(relative norm, outputs and every gradient): float64 1e-12 for the loop, 1e-10 for the kernels;
float32 1e-5; float16 / bfloat16 no worse than the reference run in that dtype (x1.5 + 2 eps).
Sizes are tiny and not multiples of any block (H = 5, B = 3, I = 3; T = 4).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence

import fusedrnn
from conftest import assert_close_rel, rel_err
from fusedrnn import layernorm as L
from fusedrnn.errors import BadInputError

I, H, B, T = 3, 5, 3, 4
LENGTHS = torch.tensor([4, 1, 3])          # unsorted, one row dies after a single step
CLASSES = {"LSTM": fusedrnn.LayerNormLSTM, "GRU": fusedrnn.LayerNormGRU}
CELLS = {"LSTM": fusedrnn.LayerNormLSTMCell, "GRU": fusedrnn.LayerNormGRUCell}


def _make(mode, dtype=torch.float64, **kw):
    torch.manual_seed(1)
    m = CLASSES[mode](I, H, dtype=torch.float64, **kw)
    with torch.no_grad():
        for p in m.parameters():  # gains and LN biases away from 1 / 0, so every parameter matters
            p.uniform_(-0.8, 0.8)
    return m.to(dtype)


def _twin(m, dtype=torch.float64, backend="reference"):
    """A module of the same class and configuration with `m`'s parameters, in `dtype`."""
    kw = dict(num_layers=m.num_layers, bias=m.bias, batch_first=m.batch_first, bidirectional=m.bidirectional,
              zoneout=m.zoneout, weight_drop=m.weight_drop)
    twin = type(m)(m.input_size, m.hidden_size, dtype=dtype, backend=backend, **kw)
    twin.load_state_dict({k: v.to(dtype) for k, v in m.state_dict().items()})
    return twin


def _run(m, x, packed=False, hx=None):
    """Outputs and gradients of a fixed random projection of (y, h_n[, c_n]) w.r.t. x, h0 and every
    parameter."""
    dtype = m.weight_ih_l0.dtype
    x = x.to(dtype).requires_grad_()
    hx = None if hx is None else tuple(h.to(dtype).requires_grad_() for h in hx)
    inp = pack_padded_sequence(x, LENGTHS, enforce_sorted=False) if packed else x
    y, h = m(inp, None if hx is None else (hx if m.mode == "LSTM" else hx[0]))
    y = y.data if packed else y
    outs = [y] + (list(h) if m.mode == "LSTM" else [h])
    gen = torch.Generator().manual_seed(0)
    loss = sum((o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64)).sum() for o in outs)
    leaves = [x] + list(hx or []) + list(m.parameters())
    grads = torch.autograd.grad(loss, leaves)
    return outs + list(grads)


def _names(m, hx=True):
    return ["y", "h_n"] + (["c_n"] if m.mode == "LSTM" else []) + ["d_input"] + (
        ["d_h0", "d_c0"][:2 if m.mode == "LSTM" else 1] if hx else []) + [f"d_{n}" for n, _ in m.named_parameters()]


def _hx(mode, n):
    return tuple(torch.randn(n, B, H, dtype=torch.float64) for _ in range(2 if mode == "LSTM" else 1))


def _compare(got, ref, names, tol, what):
    for g, r, n in zip(got, ref, names):
        assert_close_rel(g.double(), r.double(), tol, f"{what}: {n}")


# ------------------------------------------------------------------------------- the CPU route
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
@pytest.mark.parametrize("bidirectional,num_layers,packed", [(False, 1, False), (True, 2, True), (True, 1, False),
                                                             (False, 2, True)])
def test_loop_matches_reference_float64(mode, bidirectional, num_layers, packed):
    m = _make(mode, num_layers=num_layers, bidirectional=bidirectional)
    D = 2 if bidirectional else 1
    x, hx = torch.randn(T, B, I, dtype=torch.float64), _hx(mode, num_layers * D)
    got = _run(m, x, packed, hx)
    assert m.last_backend == "loop" and m.last_kernels == ["loop"] * num_layers
    _compare(got, _run(_twin(m), x, packed, hx), _names(m), 1e-12, "loop fp64")


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_loop_float32_and_batch_first_unbatched(mode):
    m = _make(mode, torch.float32, bidirectional=True, batch_first=True)
    ref = _twin(m)
    x = torch.randn(B, T, I, dtype=torch.float64)
    _compare(_run(m, x), _run(ref, x), _names(m, hx=False), 1e-5, "loop fp32 batch_first")
    xu = torch.randn(T, I)
    yu, hu = m(xu)
    yr, hr = ref(xu.double())
    assert yu.shape == (T, 2 * H)
    assert_close_rel(yu.double(), yr, 1e-5, "unbatched y")
    assert_close_rel((hu[0] if mode == "LSTM" else hu).double(), hr[0] if mode == "LSTM" else hr, 1e-5, "h_n")


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_cells_match_reference(mode, triton_device):
    torch.manual_seed(2)
    cell = CELLS[mode](I, H, dtype=torch.float64)
    with torch.no_grad():
        for p in cell.parameters():
            p.uniform_(-0.8, 0.8)
    x = torch.randn(B, I, dtype=torch.float64)
    hx = _hx(mode, 1)
    hx = tuple(h[0] for h in hx)

    def run(backend):
        cell.backend = backend
        xx = x.clone().requires_grad_()
        hh = tuple(h.clone().requires_grad_() for h in hx)
        out = cell(xx, hh if mode == "LSTM" else hh[0])
        outs = list(out) if mode == "LSTM" else [out]
        loss = sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view(o.shape)).sum() for o in outs)
        return outs + list(torch.autograd.grad(loss, [xx, *hh, *cell.parameters()]))

    ref = run("reference")
    for backend, tol in (("auto", 1e-12), ("triton", 1e-10)):
        got = run(backend)
        assert cell.last_backend == ("loop" if backend == "auto" else "triton")
        for i, (g, r) in enumerate(zip(got, ref)):
            assert_close_rel(g, r, tol, f"{mode} cell {backend} [{i}]")
    # unbatched input and no state
    cell.backend = "auto"
    y = cell(x[0])
    yr = L.ln_cell_step(mode, x[:1], tuple(torch.zeros(1, H, dtype=torch.float64) for _ in hx),
                        (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh, cell.ln_ih_weight,
                         cell.ln_hh_weight, getattr(cell, "ln_c_weight", None), getattr(cell, "ln_c_bias", None)))
    assert_close_rel((y[0] if mode == "LSTM" else y), yr[0][0], 1e-12, "unbatched cell")


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_gradcheck_float64(mode, triton_device):
    """Every parameter on the CPU route (bidirectional); on the kernels (stepwise, one direction,
    T = 2: each numerical derivative is two interpreted runs) the input and the parameters that
    enter through the recurrence only."""
    torch.manual_seed(3)
    for backend, bidirectional, T_, only in (("auto", True, 3, None),
                                             ("triton", False, 2, ("weight_hh", "ln_hh", "ln_c", "bias_hh"))):
        m = CLASSES[mode](2, 3, bidirectional=bidirectional, dtype=torch.float64, backend=backend, kernel="stepwise")
        names = [n for n, _ in m.named_parameters() if only is None or n.startswith(only)]
        x = torch.randn(T_, 2, 2, dtype=torch.float64, requires_grad=True)

        def f(x, *ps):
            with torch.nn.utils.stateless._reparametrize_module(m, dict(zip(names, ps))):
                y, h = m(x)
            return (y, *h) if mode == "LSTM" else (y, h)

        assert torch.autograd.gradcheck(f, (x, *(getattr(m, n) for n in names)), eps=1e-6, atol=1e-7,
                                        fast_mode=True)


# ------------------------------------------------------------------------- the Triton kernels
@pytest.fixture
def poisoned():
    from fusedrnn import kernels
    kernels.set_poison(True)
    yield
    kernels.set_poison(False)


KERNEL_CASES = [  # (bidirectional, num_layers, packed)
    (True, 2, True),
    (False, 1, False),
]


@pytest.mark.triton
@pytest.mark.parametrize("kernel", ["stepwise", "persistent"])
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
@pytest.mark.parametrize("case", KERNEL_CASES)
def test_kernels_float64(mode, kernel, case, triton_device, poisoned):
    bidirectional, num_layers, packed = case
    m = _make(mode, num_layers=num_layers, bidirectional=bidirectional, backend="triton", kernel=kernel)
    D = 2 if bidirectional else 1
    x, hx = torch.randn(T, B, I, dtype=torch.float64), _hx(mode, num_layers * D)
    got = _run(m, x, packed, hx)
    assert m.last_backend == "triton" and m.last_kernels == [kernel] * num_layers
    _compare(got, _run(_twin(m), x, packed, hx), _names(m), 1e-10, f"triton {kernel} fp64")


@pytest.mark.triton
@pytest.mark.parametrize("kernel", ["stepwise", "persistent"])
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_kernels_float32(mode, kernel, triton_device, poisoned):
    m = _make(mode, torch.float32, bidirectional=True, backend="triton", kernel=kernel)
    x = torch.randn(T, B, I, dtype=torch.float64)
    _compare(_run(m, x, packed=True), _run(_twin(m), x, packed=True), _names(m, hx=False), 1e-5,
             f"triton {kernel} fp32")


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kernel", ["stepwise", "persistent"])
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_kernels_half_no_worse_than_reference_in_that_dtype(mode, kernel, dtype, triton_device, poisoned):
    m = _make(mode, dtype, backend="triton", kernel=kernel)
    x = torch.randn(T, B, I, dtype=torch.float64)
    exact = _run(_twin(m), x, packed=True)
    got = _run(m, x, packed=True)
    base = _run(_twin(m, dtype), x, packed=True)   # the reference computed in `dtype`
    eps = torch.finfo(dtype).eps
    for g, b, e, n in zip(got, base, exact, _names(m, hx=False)):
        assert g.dtype == dtype
        assert rel_err(g, e) <= 1.5 * rel_err(b, e) + 2 * eps, (
            f"{kernel} {dtype} {n}: {rel_err(g, e):.2e} vs the reference in {dtype} {rel_err(b, e):.2e}")


@pytest.mark.triton
def test_kernel_launch_counts_and_plans(triton_device):
    from fusedrnn import kernels
    K = L.triton_kernels()
    assert K.ln_plan("LSTM", 2, 3, 5, torch.float32, "cpu") is not None
    assert K.ln_plan("LSTM", 2, 64, 512, torch.bfloat16, "cpu") is None
    m = _make("GRU", backend="triton", kernel="stepwise")
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    n0 = kernels.launch_count()
    y, h = m(x)
    assert kernels.launch_count() - n0 == 2 * T            # h W_hh^T + row kernel per step
    (y.sum() + h.sum()).backward()
    assert kernels.launch_count() - n0 == 2 * T + 2 * T + 1
    m.kernel = "persistent"
    n0 = kernels.launch_count()
    y, h = m(x)
    (y.sum() + h.sum()).backward()
    assert kernels.launch_count() - n0 == 2


# ------------------------------------------------------------------------- parameters and I/O
def test_parameters_names_shapes_init():
    m = fusedrnn.LayerNormLSTM(I, H, num_layers=2, bidirectional=True)
    shapes = {n: tuple(p.shape) for n, p in m.named_parameters()}
    assert shapes["weight_ih_l0"] == (4 * H, I) and shapes["weight_hh_l1_reverse"] == (4 * H, H)
    assert shapes["ln_ih_weight_l0"] == (4 * H,) and shapes["ln_hh_weight_l1_reverse"] == (4 * H,)
    assert shapes["ln_c_weight_l1"] == (H,) and shapes["ln_c_bias_l0_reverse"] == (H,)
    for n, p in m.named_parameters():
        if n.startswith("ln_"):
            assert torch.all(p == (0.0 if "_bias" in n else 1.0)), n
        else:
            assert p.abs().max() <= H ** -0.5 and p.std() > 0, n
    g = fusedrnn.LayerNormGRU(I, H)
    assert sorted(n for n, _ in g.named_parameters() if n.startswith("ln_")) == ["ln_hh_weight_l0", "ln_ih_weight_l0"]
    assert tuple(g.ln_ih_weight_l0.shape) == (3 * H,)
    c = fusedrnn.LayerNormLSTMCell(I, H)
    assert sorted(n for n, _ in c.named_parameters()) == sorted(
        ["weight_ih", "weight_hh", "bias_ih", "bias_hh", "ln_ih_weight", "ln_hh_weight", "ln_c_weight", "ln_c_bias"])
    with torch.no_grad():
        m.ln_c_bias_l0.fill_(3.0)
    m.reset_parameters()
    assert torch.all(m.ln_c_bias_l0 == 0) and torch.all(m.ln_ih_weight_l0 == 1)


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_loads_torch_nn_weights_and_state_dict_round_trip(mode):
    torch_cls = nn.LSTM if mode == "LSTM" else nn.GRU
    t = torch_cls(I, H, num_layers=2, bidirectional=True)
    m = CLASSES[mode](I, H, num_layers=2, bidirectional=True)
    result = m.load_state_dict(t.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert sorted(result.missing_keys) == sorted(n for n, _ in m.named_parameters() if n.startswith("ln_"))
    for n, p in t.named_parameters():
        assert torch.equal(getattr(m, n), p)
    m2 = CLASSES[mode](I, H, num_layers=2, bidirectional=True)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1)
    m2.load_state_dict(m.state_dict())
    x = torch.randn(T, B, I)
    assert torch.equal(m(x)[0], m2(x)[0])


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match="proj_size"):
        fusedrnn.LayerNormLSTM(I, H, proj_size=2)
    with pytest.raises(ValueError, match="backend"):
        fusedrnn.LayerNormGRU(I, H, backend="cudnn")
    with pytest.raises(ValueError, match="hidden_size"):
        fusedrnn.LayerNormLSTM(I, 0)
    with pytest.raises(ValueError, match="hidden_size"):
        fusedrnn.LayerNormGRUCell(I, -1)
    m = fusedrnn.LayerNormLSTM(I, H)
    x = torch.randn(T, B, I)
    with pytest.raises(BadInputError, match="h_0"):
        m(x, (torch.zeros(1, B, H + 1), torch.zeros(1, B, H)))
    with pytest.raises(BadInputError, match="c_0"):
        m(x, (torch.zeros(1, B, H), torch.zeros(2, B, H)))
    with pytest.raises(BadInputError, match="input_size"):
        m(torch.randn(T, B, I + 1))
    with pytest.raises(BadInputError, match="h_0, c_0"):
        m(x, torch.zeros(1, B, H))
    with pytest.raises(BadInputError, match="h_0"):
        fusedrnn.LayerNormGRU(I, H)(x, torch.zeros(1, B + 1, H))
    with pytest.raises(BadInputError, match="dtype"):
        m(x.double())
    with pytest.raises(BadInputError, match="h_0"):
        fusedrnn.LayerNormGRUCell(I, H)(torch.randn(B, I), torch.zeros(B, H + 2))


def test_dropout_between_layers_and_eval_determinism():
    m = fusedrnn.LayerNormGRU(I, H, num_layers=2, dropout=0.5)
    x = torch.randn(T, B, I)
    m.eval()
    assert torch.equal(m(x)[0], m(x)[0])
    m.train()
    torch.manual_seed(5)
    a = m(x)[0]
    torch.manual_seed(5)
    b = m(x)[0]
    assert torch.equal(a, b)
    m.dropout = 0.0
    assert not torch.equal(a, m(x)[0])


# ----------------------------------------------------------------------------- torch.compile
def test_compile_fullgraph_one_op_per_layer():
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func
    fw, bw = [], []
    backend = aot_autograd(fw_compiler=lambda gm, _: (fw.append(gm), make_boxed_func(gm.forward))[1],
                           bw_compiler=lambda gm, _: (bw.append(gm), make_boxed_func(gm.forward))[1])

    def count(graphs, name):
        return sum(1 for g in graphs for n in g.graph.nodes if n.op == "call_function" and name in str(n.target))

    torch._dynamo.reset()
    try:
        m = _make("LSTM", num_layers=2, bidirectional=True)
        cell = fusedrnn.LayerNormGRUCell(2 * H, H, dtype=torch.float64)

        def f(x):
            y, (h, c) = m(x)
            return y, h, c, cell(y[-1])

        x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
        got = torch.compile(f, backend=backend, fullgraph=True)(x)
        ref = f(x)
        for g, r in zip(got, ref):
            assert_close_rel(g, r, 1e-12, "compiled")
        sum(o.sum() for o in got).backward()
        assert count(fw, "fusedrnn.ln_layer.") == 3
        assert count(bw, "fusedrnn.ln_layer_backward.") == 3
    finally:
        torch._dynamo.reset()


# -------------------------------------------------------- variants: zoneout, weight_drop, reset
from fusedrnn.errors import BackendUnavailableError  # noqa: E402

RESET = torch.tensor([[0, 0, 0], [1, 0, 1], [0, 0, 1], [0, 1, 0]], dtype=torch.bool)   # (T, B)
VARIANTS = {  # name: (constructor kwargs, training, reset)
    "zoneout_train": (dict(zoneout=0.3), True, None),
    "zoneout_eval": (dict(zoneout=0.3), False, None),
    "weight_drop": (dict(weight_drop=0.4), True, None),
    "reset": (dict(), False, RESET),
    "all": (dict(zoneout=0.25, weight_drop=0.3), True, RESET),
}


def _run_v(m, x, packed=False, hx=None, reset=None, seed=7):
    """_run with a reset mask and a fixed seed right before the call (the masks of zoneout and
    weight_drop are drawn inside it)."""
    dtype = m.weight_ih_l0.dtype
    x = x.to(dtype).requires_grad_()
    hx = None if hx is None else tuple(h.to(dtype).requires_grad_() for h in hx)
    inp = pack_padded_sequence(x, LENGTHS, enforce_sorted=False) if packed else x
    torch.manual_seed(seed)
    y, h = m(inp, None if hx is None else (hx if m.mode == "LSTM" else hx[0]), reset=reset)
    y = y.data if packed else y
    outs = [y] + (list(h) if m.mode == "LSTM" else [h])
    gen = torch.Generator().manual_seed(0)
    loss = sum((o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64)).sum() for o in outs)
    grads = torch.autograd.grad(loss, [x] + list(hx or []) + list(m.parameters()))
    return outs + list(grads)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
@pytest.mark.parametrize("bidirectional,num_layers,packed", [(True, 2, True), (False, 1, False)])
def test_variants_loop_matches_reference_float64(mode, variant, bidirectional, num_layers, packed):
    kw, training, reset = VARIANTS[variant]
    m = _make(mode, num_layers=num_layers, bidirectional=bidirectional, **kw).train(training)
    ref = _twin(m).train(training)
    D = 2 if bidirectional else 1
    x, hx = torch.randn(T, B, I, dtype=torch.float64), _hx(mode, num_layers * D)
    got = _run_v(m, x, packed, hx, reset)
    assert m.last_backend == "loop"
    _compare(got, _run_v(ref, x, packed, hx, reset), _names(m), 1e-12, f"loop fp64 {variant}")


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_variants_loop_float32_batch_first(mode):
    m = _make(mode, torch.float32, bidirectional=True, batch_first=True, zoneout=0.3)
    ref = _twin(m)
    x = torch.randn(B, T, I, dtype=torch.float64)
    reset = RESET.t().contiguous()   # (B, T) with batch_first
    _compare(_run_v(m, x, reset=reset), _run_v(ref, x, reset=reset), _names(m, hx=False), 1e-5,
             "loop fp32 zoneout + reset")


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_variants_gradcheck_float64(mode):
    torch.manual_seed(3)
    m = CLASSES[mode](2, 3, bidirectional=True, dtype=torch.float64, zoneout=0.3).eval()
    reset = torch.tensor([[0, 0], [1, 0], [0, 1]], dtype=torch.bool)
    x = torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 2, 3, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in m.named_parameters()]

    def f(x, h0, *ps):
        with torch.nn.utils.stateless._reparametrize_module(m, dict(zip(names, ps))):
            y, h = m(x, (h0, h0 * 0.5) if mode == "LSTM" else h0, reset=reset)
        return (y, *h) if mode == "LSTM" else (y, h)

    assert torch.autograd.gradcheck(f, (x, h0, *m.parameters()), eps=1e-6, atol=1e-7, fast_mode=True)


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_reset_equals_running_episodes_separately(mode):
    """Row 0 restarts at t = 2: both directions see episodes [0, 2) and [2, 4) as separate runs
    from h0/c0, and no gradient crosses the reset."""
    m = _make(mode, num_layers=2, bidirectional=True).eval()
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    hx = _hx(mode, 4)
    state = hx if mode == "LSTM" else hx[0]
    reset = torch.zeros(T, B, dtype=torch.bool)
    reset[2, 0] = True
    y, h = m(x, state, reset=reset)
    one = lambda s: tuple(t[:, :1] for t in s) if mode == "LSTM" else s[:, :1]  # noqa: E731
    y1, h1 = m(x[:2, :1], one(state))
    y2, h2 = m(x[2:, :1], one(state))
    assert_close_rel(y[:2, :1], y1, 1e-12, "first episode")
    assert_close_rel(y[2:, :1], y2, 1e-12, "second episode")
    # h_n: the forward direction ends with the second episode, the reverse one with the first
    hs = (h, h1, h2) if mode == "GRU" else (h[0], h1[0], h2[0])
    assert_close_rel(hs[0][0::2, :1], hs[2][0::2], 1e-12, "h_n forward")
    assert_close_rel(hs[0][1::2, :1], hs[1][1::2], 1e-12, "h_n reverse")
    # rows without a reset are untouched
    y0, _ = m(x[:, 1:], tuple(t[:, 1:] for t in state) if mode == "LSTM" else state[:, 1:])
    assert_close_rel(y[:, 1:], y0, 1e-12, "other rows")
    # no gradient across the reset: the second episode's forward half does not see the first's input
    g, = torch.autograd.grad(y[2:, 0, :H].sum(), x)
    assert torch.all(g[:2, 0] == 0) and g[2:, 0].abs().sum() > 0


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_zoneout_eval_equals_the_expectation_formula(mode):
    p = 0.3
    m = _make(mode, zoneout=p).eval()
    x = torch.randn(T, B, I, dtype=torch.float64)
    hx = tuple(s[0] for s in _hx(mode, 1))
    y, _ = m(x, tuple(s[None] for s in hx) if mode == "LSTM" else hx[0][None])
    w = (m.weight_ih_l0, m.weight_hh_l0, m.bias_ih_l0, m.bias_hh_l0, m.ln_ih_weight_l0, m.ln_hh_weight_l0,
         getattr(m, "ln_c_weight_l0", None), getattr(m, "ln_c_bias_l0", None))
    state = hx
    with torch.no_grad():
        for t in range(T):
            new = L.ln_cell_step(mode, x[t], state, w)
            state = (p * state[0] + (1 - p) * new[0],) + tuple(new[1:])   # LSTM: c un-blended
            assert_close_rel(y[t], state[0], 1e-12, f"step {t}")
    cell = CELLS[mode](I, H, dtype=torch.float64, zoneout=p).eval()
    plain = CELLS[mode](I, H, dtype=torch.float64)
    plain.load_state_dict(cell.state_dict())
    s = hx if mode == "LSTM" else hx[0]
    got, new = cell(x[0], s), plain(x[0], s)
    got, new = (got[0], new[0]) if mode == "LSTM" else (got, new)
    assert_close_rel(got, p * hx[0] + (1 - p) * new, 1e-12, "cell")


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_fixed_seed_gives_bitwise_identical_results(mode):
    m = _make(mode, torch.float32, num_layers=2, bidirectional=True, zoneout=0.3, weight_drop=0.4)
    x = torch.randn(T, B, I, dtype=torch.float64)
    a, b, c = _run_v(m, x, seed=11), _run_v(m, x, seed=11), _run_v(m, x, seed=12)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], c[0])
    cell = CELLS[mode](I, H, zoneout=0.3, weight_drop=0.4)
    xc = torch.randn(B, I)
    torch.manual_seed(4)
    u = cell(xc)
    torch.manual_seed(4)
    v = cell(xc)
    assert all(torch.equal(s, t) for s, t in zip(u, v)) if mode == "LSTM" else torch.equal(u, v)


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_weight_drop_reaches_raw_weights_training_only(mode):
    m = _make(mode, weight_drop=0.5)
    x = torch.randn(T, B, I, dtype=torch.float64)
    torch.manual_seed(0)
    y, _ = m(x)
    y.sum().backward()
    g = m.weight_hh_l0.grad
    assert g is not None and g.abs().sum() > 0
    assert (g == 0).any()   # the dropped weights get no gradient
    plain = _twin(m, backend="auto")
    plain.weight_drop = 0.0
    m.eval()
    plain.eval()
    assert torch.equal(m(x)[0], plain(x)[0])   # eval: no DropConnect
    cell = CELLS[mode](I, H, dtype=torch.float64, weight_drop=0.5)
    torch.manual_seed(0)
    out = cell(torch.randn(B, I, dtype=torch.float64), tuple(s[0] for s in _hx(mode, 1)) if mode == "LSTM"
               else _hx(mode, 1)[0][0])
    (out[0] if mode == "LSTM" else out).sum().backward()
    assert cell.weight_hh.grad.abs().sum() > 0 and (cell.weight_hh.grad == 0).any()


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_cell_variants_match_the_plain_cells_definition(mode):
    """Cells: reset zeroes those rows' state (no gradient to the hx they replace); zoneout in
    training keeps h_prev where the mask is set, drawn like the plain cells' mask."""
    torch.manual_seed(2)
    cell = CELLS[mode](I, H, dtype=torch.float64, zoneout=0.4)
    plain = CELLS[mode](I, H, dtype=torch.float64)
    plain.load_state_dict(cell.state_dict())
    x = torch.randn(B, I, dtype=torch.float64)
    hx = tuple(s[0].requires_grad_() for s in _hx(mode, 1))
    reset = torch.tensor([True, False, True])
    s = hx if mode == "LSTM" else hx[0]
    torch.manual_seed(9)
    got = cell(x, s, reset=reset)
    zeroed = tuple(torch.where(reset[:, None], 0, t) for t in hx)
    new = plain(x, zeroed if mode == "LSTM" else zeroed[0])
    torch.manual_seed(9)
    keep = fusedrnn.functional.zoneout_mask(0.4, (B, H), x.device)
    h_got, h_new = (got[0], new[0]) if mode == "LSTM" else (got, new)
    assert torch.equal(h_got, torch.where(keep, zeroed[0], h_new))
    if mode == "LSTM":
        assert torch.equal(got[1], new[1])
    g, = torch.autograd.grad(h_got.sum(), hx[0])
    assert torch.all(g[reset] == 0) and g[~reset].abs().sum() > 0


def test_variant_arguments_and_repr():
    m = fusedrnn.LayerNormLSTM(I, H, zoneout=0.1, weight_drop=0.2, backend="torch")
    assert (m.zoneout, m.weight_drop) == (0.1, 0.2)
    assert "zoneout=0.1, weight_drop=0.2" in repr(m)
    assert "zoneout=0.5" in repr(fusedrnn.LayerNormGRUCell(I, H, zoneout=0.5))
    assert "zoneout" not in repr(fusedrnn.LayerNormGRU(I, H))


def _error(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001
        return type(exc), str(exc)
    return None


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_variant_bad_input_raises_like_the_plain_layers(mode):
    plain_cls = {"LSTM": fusedrnn.LSTM, "GRU": fusedrnn.GRU}[mode]
    plain_cell = {"LSTM": fusedrnn.LSTMCell, "GRU": fusedrnn.GRUCell}[mode]
    for arg in ("zoneout", "weight_drop"):
        for bad in (1.0, -0.1, True, "0.1", None):
            ours = _error(lambda: CLASSES[mode](I, H, **{arg: bad}))
            assert ours is not None and ours[0] is ValueError and arg in ours[1]
            assert ours == _error(lambda: plain_cls(I, H, **{arg: bad}))
            assert _error(lambda: CELLS[mode](I, H, **{arg: bad})) == _error(lambda: plain_cell(I, H, **{arg: bad}))
    x = torch.randn(T, B, I)
    for batch_first in (False, True):
        good = (B, T) if batch_first else (T, B)
        bads = [torch.zeros(good[0], good[1] + 1, dtype=torch.bool), torch.zeros(good[::-1], dtype=torch.bool),
                torch.zeros(good), torch.zeros(good, dtype=torch.bool, device="meta"), [[False] * good[1]] * good[0]]
        m, p = CLASSES[mode](I, H, batch_first=batch_first), plain_cls(I, H, batch_first=batch_first)
        xx = x.transpose(0, 1) if batch_first else x
        for bad in bads:
            ours = _error(lambda: m(xx, reset=bad))
            assert ours is not None and issubclass(ours[0], BadInputError) and "reset" in ours[1]
            assert ours == _error(lambda: p(xx, reset=bad)), (bad, ours)
    c, pc = CELLS[mode](I, H), plain_cell(I, H)
    for bad in (torch.zeros(B + 1, dtype=torch.bool), torch.zeros(B), torch.zeros(B, 1, dtype=torch.bool)):
        ours = _error(lambda: c(torch.randn(B, I), reset=bad))
        assert ours is not None and "reset" in ours[1] and ours == _error(lambda: pc(torch.randn(B, I), reset=bad))
    # unbatched input: reset (T,)
    y, _ = CLASSES[mode](I, H)(x[:, 0], reset=torch.zeros(T, dtype=torch.bool))
    assert y.shape == (T, H)


KERNEL_VARIANT_CASES = [  # (variant, bidirectional, num_layers, packed)
    ("all", True, 2, True),            # zoneout (training masks) + weight_drop + reset
    ("zoneout_eval_reset", False, 1, False),
]
VARIANTS["zoneout_eval_reset"] = (dict(zoneout=0.3), False, RESET)
VARIANTS["zoneout_train_reset"] = (dict(zoneout=0.3), True, RESET)


@pytest.mark.triton
@pytest.mark.parametrize("kernel", ["stepwise", "persistent"])
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
@pytest.mark.parametrize("case", KERNEL_VARIANT_CASES, ids=lambda c: c[0])
def test_variants_on_the_kernels_float64(mode, kernel, case, triton_device, poisoned):
    """zoneout (training masks, fixed seed; eval expectation), reset and weight_drop on
    kernels/layernorm.py against the reference: outputs and every gradient, 1e-10."""
    variant, bidirectional, num_layers, packed = case
    kw, training, reset = VARIANTS[variant]
    m = _make(mode, num_layers=num_layers, bidirectional=bidirectional, backend="triton", kernel=kernel,
              **kw).train(training)
    D = 2 if bidirectional else 1
    x, hx = torch.randn(T, B, I, dtype=torch.float64), _hx(mode, num_layers * D)
    got = _run_v(m, x, packed, hx, reset)
    assert m.last_backend == "triton" and m.last_kernels == [kernel] * num_layers
    want = _run_v(_twin(m).train(training), x, packed, hx, reset)
    _compare(got, want, _names(m), 1e-10, f"triton {kernel} fp64 {variant}")


@pytest.mark.triton
@pytest.mark.parametrize("kernel", ["stepwise", "persistent"])
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_variants_on_the_kernels_float32_and_half(mode, kernel, triton_device, poisoned):
    """zoneout + reset, bidirectional, packed: float32 within 1e-5 of the float64 reference;
    float16 / bfloat16 no worse than the reference computed in that dtype (x1.5 + 2 eps)."""
    x, hx = torch.randn(T, B, I, dtype=torch.float64), _hx(mode, 2)
    for dtype, variant in ((torch.float32, "zoneout_train_reset"), (torch.float16, "zoneout_eval_reset"),
                           (torch.bfloat16, "zoneout_train_reset")):
        kw, training, reset = VARIANTS[variant]
        m = _make(mode, dtype, bidirectional=True, backend="triton", kernel=kernel, **kw).train(training)
        got = _run_v(m, x, True, hx, reset)
        assert m.last_backend == "triton" and m.last_kernels == [kernel]
        exact = _run_v(_twin(m).train(training), x, True, hx, reset)
        what = f"triton {kernel} {dtype} {variant}"
        if dtype == torch.float32:
            _compare(got, exact, _names(m), 1e-5, what)
            continue
        base = _run_v(_twin(m, dtype).train(training), x, True, hx, reset)
        eps = torch.finfo(dtype).eps
        for g, b, e, n in zip(got, base, exact, _names(m)):
            assert g.dtype == dtype
            assert rel_err(g, e) <= 1.5 * rel_err(b, e) + 2 * eps, (
                f"{what} {n}: {rel_err(g, e):.2e} vs the reference in {dtype} {rel_err(b, e):.2e}")


@pytest.mark.triton
@pytest.mark.parametrize("kernel", ["stepwise", "persistent"])
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_weight_drop_on_the_kernels_float32(mode, kernel, triton_device, poisoned):
    """weight_drop on the kernels in float32 (float64: the "all" case above), 1e-5 against a
    float64 copy of the weights with the float32-drawn DropConnect masks applied."""
    m = _make(mode, torch.float32, bidirectional=True, backend="triton", kernel=kernel, weight_drop=0.4)
    x = torch.randn(T, B, I, dtype=torch.float64)
    got = _run_v(m, x)
    assert m.last_backend == "triton" and m.last_kernels == [kernel]
    ref64 = _twin(_twin(m, torch.float32))   # DropConnect's mask is drawn in the weights' dtype
    torch.manual_seed(7)
    masks = [fusedrnn.functional.drop_weight(torch.ones(4 * H if mode == "LSTM" else 3 * H, H), 0.4)
             for _ in range(2)]
    ref64.weight_drop = 0.0
    with torch.no_grad():
        ref64.weight_hh_l0.mul_(masks[0].double())
        ref64.weight_hh_l0_reverse.mul_(masks[1].double())
    want = _run_v(ref64, x)[:3 if mode == "LSTM" else 2]
    _compare(got[:len(want)], want, _names(m, hx=False), 1e-5, f"triton {kernel} fp32 weight_drop")


@pytest.mark.triton
def test_variants_run_on_the_kernels_and_bad_variant_arguments_raise(triton_device, monkeypatch):
    """backend="triton" runs zoneout and reset (no BackendUnavailableError), and so does "auto"
    where it resolves to the kernels (CUDA; here the resolution is patched); what the kernels
    cannot take still raises a clear error."""
    x = torch.randn(T, B, I)
    for backend in ("triton", "auto"):
        if backend == "auto":
            monkeypatch.setattr(L, "resolve", lambda backend, device, compiling=False: "triton")
        for kw, reset in ((dict(zoneout=0.2), None), ({}, RESET)):
            m = CLASSES["GRU"](I, H, backend=backend, kernel="stepwise", **kw)
            y, _ = m(x, reset=reset)
            assert m.last_backend == "triton" and m.last_kernels == ["stepwise"] and torch.isfinite(y).all()
    with pytest.raises(BackendUnavailableError, match="persistent"):
        CLASSES["LSTM"](I, 512, backend="triton", kernel="persistent", zoneout=0.2)(x, reset=RESET)
    K = L.triton_kernels()
    D, G = 1, 3
    args = ("GRU", torch.randn(D, T, B, G * H), torch.randn(D, G * H, H), torch.ones(D, G * H), None, None, None,
            torch.zeros(D, B, H), None, None, False)
    with pytest.raises(ValueError, match="zoneout"):
        K.ln_scan_forward(*args, zoneout=torch.zeros(D, T, B, H + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="zoneout_p"):
        K.ln_scan_forward(*args, zoneout_p=1.0)
    with pytest.raises(ValueError, match="reset"):
        K.ln_scan_forward(*args, reset=torch.zeros(D, T, B))


def test_ln_plan_budget_counts_the_rows_and_the_variants():
    """kernels/layernorm.py: ln_plan admits a persistent program only where the rows the
    LayerNorm kernels hold (LN_TILES, the variants' tiles, the two-pass dot's operand tiles) stay
    within LN_ROW_VALUES, calibrated on sm_90 compiles: float32 H <= 32, float64 H <= 16, half
    precision LSTM H <= 16 and GRU H <= 32 (B = 16 per program), each with zoneout and reset on
    or off; half-precision LSTM H = 32 and H = 64 (which ran out of registers) are refused. The
    stepwise row tiles hold 512 (LSTM) / 1024 (GRU) float32-sized values."""
    K = L.triton_kernels()
    meta = torch.device("meta")
    largest = {(torch.float32, "LSTM"): 32, (torch.float32, "GRU"): 32, (torch.float64, "LSTM"): 16,
               (torch.float64, "GRU"): 16, (torch.bfloat16, "LSTM"): 16, (torch.float16, "LSTM"): 16,
               (torch.bfloat16, "GRU"): 32, (torch.float16, "GRU"): 32}
    for (dtype, mode), top in largest.items():
        for zoneout, reset in ((False, False), (True, False), (False, True), (True, True)):
            got = {H: K.ln_plan(mode, 2, 64, H, dtype, meta, zoneout=zoneout, reset=reset) for H in (16, 32, 64)}
            assert [H for H, c in got.items() if c is not None] == [H for H in (16, 32, 64) if H <= top], (
                dtype, mode, zoneout, reset)
            c = got[top]
            assert (c.BLOCK_B, c.BLOCK_H, c.BLOCK_K, c.num_warps) == (16, top, top, 8)
    # the edge: float32 LSTM H = 32 with both variants holds exactly LN_ROW_VALUES, so one tile
    # more refuses it with the variants on and keeps it without
    assert K.ln_row_values("LSTM", 32, 16, torch.float32, True, True) == K.LN_ROW_VALUES
    assert K.ln_row_values("LSTM", 32, 16, torch.float32) < K.ln_row_values("LSTM", 32, 16, torch.float32, True)
    # stepwise at H = 512: LSTM one row of 8 warps, GRU two (float64 one, 8 warps)
    steps = [K.ln_step_config(mode, 64, 512, dtype) for mode in ("LSTM", "GRU") for dtype in (torch.float32,
                                                                                               torch.float64)]
    assert [(c.BLOCK_B, c.num_warps) for c in steps] == [(1, 8), (1, 8), (2, 8), (1, 8)]


def test_ln_plan_refuses_with_the_variants_at_the_edge(monkeypatch):
    """With one more variant tile than calibrated, the edge layer (float32 LSTM H = 32, B = 16)
    is refused only with the variants on, alike by the dispatch (BackendUnavailableError naming
    them; "auto" takes "stepwise") and by the launchers (ValueError before any launch); the plan
    both use is the same."""
    K = L.triton_kernels()
    monkeypatch.setattr(K, "LN_ZONEOUT_TILES", K.LN_ZONEOUT_TILES + 1)
    meta = torch.device("meta")
    D, T_, B_, H_ = 2, 2, 16, 32
    args = ("triton", "persistent", "LSTM", D, B_, H_, torch.float32, meta)
    assert K.ln_plan("LSTM", D, B_, H_, torch.float32, meta, zoneout=True) is not None
    assert K.ln_plan("LSTM", D, B_, H_, torch.float32, meta, zoneout=True, reset=True) is None
    with pytest.raises(BackendUnavailableError, match="zoneout, reset"):
        L.choose_kernel(*args, zoneout=True, reset=True)
    assert L.choose_kernel("triton", "auto", *args[2:], zoneout=True, reset=True) == "stepwise"
    e = lambda *s, d=torch.float32: torch.empty(*s, dtype=d, device=meta)  # noqa: E731
    var = dict(zoneout=e(D, T_, B_, H_, d=torch.bool), reset=e(D, T_, B_, d=torch.bool))
    fwd = ("LSTM", e(D, T_, B_, 4 * H_), e(D, 4 * H_, H_), e(D, 4 * H_), None, e(D, H_), e(D, H_), e(D, B_, H_),
           e(D, B_, H_), None, True, "persistent", False)
    with pytest.raises(ValueError, match="zoneout, reset\\): ln_plan returned None"):
        K.forward_launches(*fwd, **var)
    ws = (e(D, T_, B_, H_), e(D, T_, B_, 4 * H_), e(D, T_, B_, 4), e(D, T_, B_, 4 * H_), e(D, T_, B_, H_))
    bwd = ("LSTM", e(T_, B_, D * H_), e(D, B_, H_), e(D, B_, H_), e(D, 4 * H_, H_), e(D, 4 * H_), None, e(D, H_),
           e(D, H_), None, *ws, "persistent", False)
    with pytest.raises(ValueError, match="zoneout, reset\\): ln_plan returned None"):
        K.backward_launches(*bwd, **var)
    # zoneout alone: admitted, and both launches run ln_plan's configuration
    plan = K.ln_plan("LSTM", D, B_, H_, torch.float32, meta, zoneout=True)
    assert L.choose_kernel(*args, zoneout=True) == "persistent"
    var = dict(zoneout=var["zoneout"])
    launches = list(K.forward_launches(*fwd, **var)[1]) + list(K.backward_launches(*bwd, **var)[1])
    assert len(launches) == 2
    for ln in launches:
        assert (ln.args["BLOCK_B"], ln.args["BLOCK_H"], ln.args["BLOCK_K"], ln.num_warps, ln.args["PERSISTENT"]) == (
            plan.BLOCK_B, plan.BLOCK_H, plan.BLOCK_K, plan.num_warps, True)


@pytest.mark.triton
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_cell_variants_on_the_kernels(mode, triton_device, poisoned):
    """Cells apply zoneout and reset around the cell op, so they run on the kernels too."""
    torch.manual_seed(2)
    cell = CELLS[mode](I, H, dtype=torch.float64, zoneout=0.3, weight_drop=0.3, backend="triton")
    ref = CELLS[mode](I, H, dtype=torch.float64, zoneout=0.3, weight_drop=0.3, backend="reference")
    ref.load_state_dict(cell.state_dict())
    x = torch.randn(B, I, dtype=torch.float64)
    hx = tuple(s[0] for s in _hx(mode, 1))
    reset = torch.tensor([False, True, False])

    def run(c):
        xx = x.clone().requires_grad_()
        hh = tuple(h.clone().requires_grad_() for h in hx)
        torch.manual_seed(5)
        out = c(xx, hh if mode == "LSTM" else hh[0], reset=reset)
        outs = list(out) if mode == "LSTM" else [out]
        loss = sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view(o.shape)).sum() for o in outs)
        return outs + list(torch.autograd.grad(loss, [xx, *hh, *c.parameters()]))

    got = run(cell)
    assert cell.last_backend == "triton"
    for i, (g, r) in enumerate(zip(got, run(ref))):
        assert_close_rel(g, r, 1e-10, f"{mode} cell triton variants [{i}]")


def test_variants_compile_fullgraph_one_op_per_layer():
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func
    fw, bw = [], []
    backend = aot_autograd(fw_compiler=lambda gm, _: (fw.append(gm), make_boxed_func(gm.forward))[1],
                           bw_compiler=lambda gm, _: (bw.append(gm), make_boxed_func(gm.forward))[1])
    torch._dynamo.reset()
    try:
        m = _make("LSTM", num_layers=2, bidirectional=True, zoneout=0.3, weight_drop=0.2).eval()

        def f(x):
            y, (h, c) = m(x, reset=RESET)
            return y, h, c

        x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
        got = torch.compile(f, backend=backend, fullgraph=True)(x)
        for g, r in zip(got, f(x)):
            assert_close_rel(g, r, 1e-12, "compiled variants")
        sum(o.sum() for o in got).backward()
        count = lambda gs, n: sum(1 for g in gs for nd in g.graph.nodes  # noqa: E731
                                  if nd.op == "call_function" and n in str(nd.target))
        assert count(fw, "fusedrnn.ln_layer.") == 2 and count(bw, "fusedrnn.ln_layer_backward.") == 2
    finally:
        torch._dynamo.reset()


@pytest.mark.slow
def test_kernels_with_zoneout_and_reset_compile_for_sm90():
    """The LayerNorm kernels with ZONEOUT (training mask) and RESET on (kernels/layernorm.py:
    aot_configs), bfloat16, stepwise and persistent, both modes, build for sm_90 and use no
    atomics (the restarts' dh0 / dc0 accumulators have one owner per element). In a subprocess
    without TRITON_INTERPRET (~1 min on 2 cores); skips only on the toolchain's own reason."""
    code = ("import json, re, torch\n"
            "from fusedrnn.kernels import aot, layernorm\n"
            "problem = aot.toolchain_problem(90)\n"
            "out = []\n"
            "for c in [] if problem else layernorm.aot_configs((torch.bfloat16,), variants=((2, True),),\n"
            "                                                  shapes=((3, 5),)):\n"
            "    d = dict(c.constexprs)\n"
            "    ptx = aot.compile_config(c, 90).asm['ptx']\n"
            "    out.append([c.name, d.get('MODE'), bool(d.get('PERSISTENT')), d.get('ZONEOUT'), d['RESET'],\n"
            "                re.findall(r'\\b(?:atom|red)\\.\\S+', ptx)])\n"
            "print(json.dumps(dict(problem=problem, configs=out)))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    if got["problem"]:
        pytest.skip(got["problem"])
    configs = got["configs"]
    assert {"ln_hw_kernel", "ln_fwd_kernel", "ln_dh_kernel", "ln_bwd_kernel"} == {c[0] for c in configs}
    for mode in ("LSTM", "GRU"):
        for persistent in (False, True):
            for name in ("ln_fwd_kernel", "ln_bwd_kernel"):
                assert [name, mode, persistent, 2, True] in [c[:5] for c in configs], (name, mode, persistent)
    assert all(c[4] for c in configs) and not any(c[5] for c in configs), configs
