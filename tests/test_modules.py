"""The drop-in contract of fusedrnn's layers and cells, with torch.nn as the oracle.

Every comparison builds the torch.nn module and its fusedrnn twin with the same constructor
arguments, copies the weights, runs the same inputs and compares outputs, final states and the
gradients of a random linear functional of all outputs with respect to the input, h0, c0 and
every parameter.

Tolerances (relative error norm ||a - e|| / ||e||):
  float64: 1e-12. Both sides compute in float64; the only differences are summation order in the
           matmuls (a few ulps, ~1e-16 relative) accumulated over T <= 5 steps and 2 layers.
  float32: 2e-5. Same reasoning with float32 ulps (~6e-8): torch's CPU kernels (oneDNN for LSTM)
           and fusedrnn's split the matmuls differently; 2e-5 leaves > 100x headroom for that, while
           any real bug (wrong gate order, missing bias, wrong direction) gives errors > 1e-2.
"""
from __future__ import annotations

import copy
import itertools
import math
import pickle
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fusedrnn
from conftest import assert_close_rel
from models import make_twin_pair

TOL = {torch.float64: 1e-12, torch.float32: 2e-5}
# On CPU "auto" resolves to "torch" (tested in test_dispatch.py), so it is not repeated here. "torch"
# checks the module wrapper around torch's op (validation, layouts, packing); "reference" and "loop"
# (the fusedrnn::layer op with its PyTorch step loop, forced by models.make_twin_pair) are fusedrnn's
# own math.
CPU_BACKENDS = ("torch", "reference", "loop")

# name, torch.nn class name, extra constructor kwargs, expected `mode`
LAYER_KINDS = {
    "LSTM": ("LSTM", {}, "LSTM"),
    "LSTM_proj": ("LSTM", {"proj_size": 3}, "LSTM"),
    "GRU": ("GRU", {}, "GRU"),
    "RNN_TANH": ("RNN", {"nonlinearity": "tanh"}, "RNN_TANH"),
    "RNN_RELU": ("RNN", {"nonlinearity": "relu"}, "RNN_RELU"),
}
CELL_KINDS = {
    "LSTMCell": ("LSTMCell", {}),
    "GRUCell": ("GRUCell", {}),
    "RNNCell_tanh": ("RNNCell", {"nonlinearity": "tanh"}),
    "RNNCell_relu": ("RNNCell", {"nonlinearity": "relu"}),
}
T, B, I, H = 4, 3, 3, 5
LENGTHS_SORTED = [4, 3, 2]
LENGTHS_UNSORTED = [2, 4, 3]


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

def state_shapes(mod: nn.RNNBase, batch):
    """Shapes of h0 (and c0) for a layer; batch None means unbatched."""
    D = 2 if mod.bidirectional else 1
    P = mod.proj_size if getattr(mod, "proj_size", 0) > 0 else mod.hidden_size
    lead = (mod.num_layers * D,) + (() if batch is None else (batch,))
    shapes = [lead + (P,)]
    if mod.mode == "LSTM":
        shapes.append(lead + (mod.hidden_size,))
    return shapes


def flatten(out):
    """Tensors of a module output: PackedSequence -> its data; nested tuples flattened."""
    if isinstance(out, PackedSequence):
        return [out.data]
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in flatten(o)]


def run_with_grads(module, inputs, make_call, seed=1234):
    """Run `make_call(module, *leaves)` on fresh leaf copies of `inputs` (None entries kept None).

    Returns (outputs flattened, grads of the inputs, grads of the parameters in named order, the
    raw output structure). The loss is a fixed random linear functional of every output tensor,
    so that every output and every path of the graph receives a gradient.
    """
    leaves = [None if x is None else x.detach().clone().requires_grad_(x.is_floating_point())
              for x in inputs]
    module.zero_grad(set_to_none=True)
    raw = make_call(module, *leaves)
    outs = flatten(raw)
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device, o.dtype))
               .sum() for o in outs)
    loss.backward()
    in_grads = [None if x is None or not x.requires_grad else x.grad for x in leaves]
    p_grads = [(n, p.grad) for n, p in module.named_parameters()]
    return outs, in_grads, p_grads, raw


def assert_same_structure(got, ref, what):
    """Same nesting of tuples / PackedSequence (with the same index tensors) / tensors."""
    assert type(got) is type(ref), f"{what}: {type(got).__name__} != {type(ref).__name__}"
    if isinstance(ref, PackedSequence):
        for f in ("batch_sizes", "sorted_indices", "unsorted_indices"):
            a, e = getattr(got, f), getattr(ref, f)
            assert (a is None and e is None) or (a is not None and e is not None
                                                  and torch.equal(a, e)), f"{what}: {f}"
    elif isinstance(ref, (tuple, list)):
        assert len(got) == len(ref), f"{what}: {len(got)} elements != {len(ref)}"
        for i, (a, e) in enumerate(zip(got, ref)):
            assert_same_structure(a, e, f"{what}[{i}]")


def assert_same_results(ref_res, got_res, tol, what):
    (r_out, r_in, r_p, r_raw), (g_out, g_in, g_p, g_raw) = ref_res, got_res
    assert_same_structure(g_raw, r_raw, f"{what}: output structure")
    assert_close_rel(g_out, r_out, tol, f"{what}: outputs")
    assert_close_rel(g_in, r_in, tol, f"{what}: input grads")
    assert [n for n, _ in g_p] == [n for n, _ in r_p], f"{what}: parameter names differ"
    for (n, gp), (_, rp) in zip(g_p, r_p):
        assert_close_rel(gp, rp, tol, f"{what}: grad of {n}")


def layer_call(input_kind, batch_first, lengths):
    """A call `f(module, x, h0, c0)` applying one input convention."""
    def call(mod, x, h0, c0):
        hx = None if h0 is None else ((h0, c0) if c0 is not None else h0)
        if input_kind.startswith("packed"):
            x = pack_padded_sequence(x, torch.tensor(lengths), batch_first=batch_first,
                                     enforce_sorted=input_kind == "packed")
        return mod(x, hx) if hx is not None else mod(x)
    return call


def layer_inputs(mod, input_kind, batch_first, with_hx, dtype, t=T, b=B):
    batch = None if input_kind == "unbatched" else b
    if batch is None:
        x = torch.randn(t, I, dtype=dtype)
    else:
        x = torch.randn((b, t, I) if batch_first else (t, b, I), dtype=dtype)
    states = [torch.randn(s, dtype=dtype) for s in state_shapes(mod, batch)] if with_hx else []
    h0 = states[0] if states else None
    c0 = states[1] if len(states) > 1 else None
    return [x, h0, c0]


# ----------------------------------------------------------------------------------------------
# class hierarchy, constructor, parameters, repr
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_layer_class_and_mode(kind):
    name, kw, mode = LAYER_KINDS[kind]
    m = getattr(fusedrnn, name)(I, H, **kw)
    assert isinstance(m, nn.RNNBase)
    for other in (nn.LSTM, nn.GRU, nn.RNN):
        assert not isinstance(m, other), f"fusedrnn.{name} must not subclass {other.__name__}"
    assert m.mode == mode


@pytest.mark.parametrize("kind", CELL_KINDS)
def test_cell_class(kind):
    name, kw = CELL_KINDS[kind]
    m = getattr(fusedrnn, name)(I, H, **kw)
    assert isinstance(m, getattr(nn, name))
    assert type(m) is not getattr(nn, name)


CTOR_CASES = [
    ("LSTM", (3, 4), {}),
    ("LSTM", (3, 4, 2, False, True, 0.25, True, 2), {}),     # every positional argument
    ("LSTM", (3, 4), dict(num_layers=3, bias=False, batch_first=True, dropout=0.5,
                          bidirectional=True, proj_size=1)),
    ("LSTM", (3, 4), dict(device="cpu", dtype=torch.float64)),
    ("LSTM", (), dict(input_size=3, hidden_size=4, proj_size=2)),      # all by keyword
    ("RNN", (), dict(input_size=3, hidden_size=4, nonlinearity="relu", bias=False)),
    ("GRU", (3,), dict(hidden_size=4, batch_first=True)),
    ("RNNCell", (), dict(input_size=3, hidden_size=4, nonlinearity="relu")),
    ("GRU", (3, 4), {}),
    ("GRU", (3, 4, 2, False, True, 0.5, True), {}),
    ("GRUCell", (3, 4), dict(device=torch.device("cpu"), dtype=torch.float64)),
    ("RNN", (3, 4), {}),
    ("RNN", (3, 4, 2, "relu", False, True, 0.5, True), {}),
    ("RNN", (3, 4), dict(nonlinearity="relu", num_layers=2)),
    ("LSTMCell", (3, 4), {}),
    ("LSTMCell", (3, 4, False), {}),
    ("GRUCell", (3, 4), dict(bias=False)),
    ("RNNCell", (3, 4, True, "relu"), {}),
    ("RNNCell", (3, 4), dict(nonlinearity="relu")),
]


@pytest.mark.parametrize("name,args,kwargs", CTOR_CASES,
                         ids=[f"{n}-{a}-{sorted(k)}" for n, a, k in CTOR_CASES])
def test_constructor_attributes_parameters_and_repr(name, args, kwargs):
    """Same arguments (positional and keyword) and defaults give the same attributes, parameter
    names/shapes/dtypes, the same repr, and (same seed) the very same initial values."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")            # dropout with num_layers=1 warns on both
        torch.manual_seed(7)
        ref = getattr(nn, name)(*args, **kwargs)
        torch.manual_seed(7)
        got = getattr(fusedrnn, name)(*args, **kwargs)
    attrs = ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
             "bidirectional", "proj_size", "mode", "nonlinearity", "_flat_weights_names")
    for a in attrs:
        if hasattr(ref, a):
            assert getattr(got, a) == getattr(ref, a), f"{a}: {getattr(got, a)!r} != {getattr(ref, a)!r}"
    assert repr(got) == repr(ref)
    rp, gp = dict(ref.named_parameters()), dict(got.named_parameters())
    assert list(gp) == list(rp)
    for n in rp:
        assert gp[n].shape == rp[n].shape and gp[n].dtype == rp[n].dtype, n
        assert torch.equal(gp[n], rp[n]), f"{n}: different initial values for the same seed"
    assert list(got.state_dict()) == list(ref.state_dict())


LENIENT_CTOR_CASES = [  # values torch.nn accepts though they are not plain int/float
    pytest.param("GRU", (3, 4), dict(num_layers=np.int64(2)), id="num_layers=np.int64"),
    pytest.param("LSTM", (3, 4), dict(proj_size=np.int64(2)), id="proj_size=np.int64(2)"),
    pytest.param("LSTM", (3, 4), dict(proj_size=np.int64(0)), id="proj_size=np.int64(0)"),
    pytest.param("RNN", (3, 4), dict(num_layers=2, dropout=np.float64(0.5)),
                 id="dropout=np.float64"),
    pytest.param("GRU", (3, True), {}, id="hidden_size=True"),    # bool is an int: 1 unit
]


@pytest.mark.parametrize("name,args,kwargs", LENIENT_CTOR_CASES)
def test_constructor_accepts_what_torch_accepts(name, args, kwargs):
    torch.manual_seed(7)
    ref = getattr(nn, name)(*args, **kwargs)           # torch.nn accepts these
    torch.manual_seed(7)
    got = getattr(fusedrnn, name)(*args, **kwargs)
    assert repr(got) == repr(ref)
    x = torch.randn(T, B, I)
    assert_close_rel(flatten(got.eval()(x)), flatten(ref.eval()(x)), TOL[torch.float32], name)


@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell"])
def test_init_distribution(name):
    """torch.nn initialises every parameter U(-1/sqrt(H), 1/sqrt(H))."""
    hidden = 64
    m = getattr(fusedrnn, name)(8, hidden)
    bound = 1 / math.sqrt(hidden)
    for n, p in m.named_parameters():
        assert p.abs().max() <= bound, f"{n} exceeds the bound {bound}"
        assert p.abs().max() > 0.9 * bound, f"{n} does not span the bound {bound}"
        # U(-b, b): mean 0, std b/sqrt(3); > 64 samples per tensor, so 5 standard errors is loose
        n_el = p.numel()
        assert abs(p.mean().item()) < 5 * bound / math.sqrt(3 * n_el), n
        assert abs(p.std().item() - bound / math.sqrt(3)) < 0.25 * bound / math.sqrt(3), n


@pytest.mark.parametrize("kind", list(LAYER_KINDS) + list(CELL_KINDS))
def test_state_dict_round_trip(kind):
    name, kw = (LAYER_KINDS[kind][:2] if kind in LAYER_KINDS else CELL_KINDS[kind])
    if name in ("LSTM", "GRU", "RNN"):
        kw = dict(kw, num_layers=2, bidirectional=True)
    ref = getattr(nn, name)(I, H, **kw)
    got = getattr(fusedrnn, name)(I, H, **kw)
    got.load_state_dict(ref.state_dict(), strict=True)
    for (n, a), (_, b) in zip(got.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), n
    ref2 = getattr(nn, name)(I, H, **kw)
    ref2.load_state_dict(got.state_dict(), strict=True)
    for (n, a), (_, b) in zip(ref2.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), n


def test_backend_is_keyword_only_and_validated():
    for backend in ("auto", "torch", "reference", "triton"):
        fusedrnn.LSTM(I, H, backend=backend)
        fusedrnn.GRUCell(I, H, backend=backend)
    with pytest.raises(ValueError, match="backend"):
        fusedrnn.LSTM(I, H, backend="cuda-magic")
    with pytest.raises(ValueError, match="backend"):
        fusedrnn.RNNCell(I, H, backend="cuda-magic")


# ----------------------------------------------------------------------------------------------
# layers: outputs and gradients against torch.nn, every combination
# ----------------------------------------------------------------------------------------------

def _layer_id(kind, nl, bidir, bias, bf, inp, hx, dt, backend):
    return (f"{kind}-L{nl}-{'bi' if bidir else 'uni'}-{'bias' if bias else 'nobias'}-"
            f"{'bf' if bf else 'tf'}-{inp}-{'hx' if hx else 'nohx'}-{str(dt)[6:]}-{backend}")


INPUT_KINDS = ("batched", "unbatched", "packed", "packed_unsorted")
# float64: the full cartesian product (batch_first changes nothing for unbatched input in
# torch.nn, but takes another path in fusedrnn, so it is kept).
# float32: every kind x layout x backend, with bias, h0 given (float32 only changes tolerances).
LAYER_GRID = [
    pytest.param(*case, id=_layer_id(*case))
    for case in itertools.product(
        LAYER_KINDS, (1, 2), (False, True), (True, False), (False, True), INPUT_KINDS,
        (False, True), (torch.float64,), CPU_BACKENDS)
] + [
    pytest.param(*case, id=_layer_id(*case))
    for case in (
        (kind, nl, bidir, True, nl == 2, inp, True, torch.float32, be)
        for kind, nl, bidir, inp, be in itertools.product(
            LAYER_KINDS, (1, 2), (False, True), INPUT_KINDS, CPU_BACKENDS))
]


@pytest.mark.parametrize("kind,num_layers,bidirectional,bias,batch_first,input_kind,with_hx,"
                         "dtype,backend", LAYER_GRID)
def test_layer_matches_torch(kind, num_layers, bidirectional, bias, batch_first, input_kind,
                             with_hx, dtype, backend):
    name, kw, _ = LAYER_KINDS[kind]
    ref, got = make_twin_pair(name, I, H, num_layers=num_layers, bidirectional=bidirectional,
                              bias=bias, batch_first=batch_first, backend=backend, dtype=dtype,
                              **kw)
    lengths = LENGTHS_SORTED if input_kind == "packed" else LENGTHS_UNSORTED
    inputs = layer_inputs(ref, input_kind, batch_first, with_hx, dtype)
    call = layer_call(input_kind, batch_first, lengths)
    r = run_with_grads(ref, inputs, call)
    g = run_with_grads(got, inputs, call)
    assert_same_results(r, g, TOL[dtype], f"{kind}/{backend}")


@pytest.mark.parametrize("kind", LAYER_KINDS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_layer_longer_sequence_float32(kind, backend):
    """T=5, B=1, larger H: float32 drift over a longer loop stays within tolerance."""
    name, kw, _ = LAYER_KINDS[kind]
    ref, got = make_twin_pair(name, I, 7, num_layers=2, bidirectional=True, backend=backend,
                              dtype=torch.float32, **kw)
    inputs = layer_inputs(ref, "batched", False, True, torch.float32, t=5, b=1)
    call = layer_call("batched", False, None)
    assert_same_results(run_with_grads(ref, inputs, call), run_with_grads(got, inputs, call),
                        TOL[torch.float32], kind)


# ----------------------------------------------------------------------------------------------
# cells
# ----------------------------------------------------------------------------------------------

CELL_GRID = [
    pytest.param(kind, bias, batched, hx, dt, backend,
                 id=f"{kind}-{'bias' if bias else 'nobias'}-{'batched' if batched else 'unbatched'}"
                    f"-{'hx' if hx else 'nohx'}-{str(dt)[6:]}-{backend}")
    for kind, bias, batched, hx, dt, backend in itertools.product(
        CELL_KINDS, (True, False), (True, False), (False, True),
        (torch.float64, torch.float32), CPU_BACKENDS)
]


def cell_call(mod, x, h, c):
    if h is None:
        return mod(x)
    return mod(x, (h, c)) if c is not None else mod(x, h)


@pytest.mark.parametrize("kind", CELL_KINDS)
def test_cell_fast_path_is_the_validating_path(kind, monkeypatch):
    """Cells take a short path for the common CPU call (batched, valid state, no autocast) and the
    validating path for everything else. Both must give bitwise the same outputs and gradients,
    and every other case must reach the validating path (which raises the clear errors)."""
    name, kw = CELL_KINDS[kind]
    lstm = name == "LSTMCell"
    m = getattr(fusedrnn, name)(I, H, **kw)
    x = torch.randn(B, I, requires_grad=True)
    hx = (torch.randn(B, H), torch.randn(B, H)) if lstm else torch.randn(B, H)
    w = (m.weight_ih, m.weight_hh, m.bias_ih, m.bias_hh)
    for state in (None, hx):
        fast = m._fast_cell(x, state, w)
        assert fast is not None and m.last_backend == "torch"
        slow = m._forward_cell(x, state, w)
        fast, slow = (list(fast), list(slow)) if lstm else ([fast], [slow])
        for a, b in zip(fast, slow):
            assert torch.equal(a, b)
        ga = torch.autograd.grad(sum(t.sum() for t in fast), [x] + list(m.parameters()))
        gb = torch.autograd.grad(sum(t.sum() for t in slow), [x] + list(m.parameters()))
        assert all(torch.equal(a, b) for a, b in zip(ga, gb))
    h2 = (hx[0], hx[1].double()) if lstm else hx.double()
    not_fast = [(x[0], None), (x.double(), None), (x[:, :2], None), (x, h2),
                (x, hx[0] if lstm else (hx, hx)), (x, (hx[0][:2], hx[1]) if lstm else hx[:2])]
    for inp, state in not_fast:
        assert m._fast_cell(inp, state, w) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert m._fast_cell(x, None, w) is None
    monkeypatch.setenv("FUSEDRNN_BACKEND", "reference")
    assert m._fast_cell(x, None, w) is None
    m(x, hx)
    assert m.last_backend == "reference"
    monkeypatch.delenv("FUSEDRNN_BACKEND")
    assert fusedrnn.GRUCell(I, H, backend="reference")._fast_cell(x, None, w) is None


@pytest.mark.parametrize("kind,bias,batched,with_hx,dtype,backend", CELL_GRID)
def test_cell_matches_torch(kind, bias, batched, with_hx, dtype, backend):
    name, kw = CELL_KINDS[kind]
    ref, got = make_twin_pair(name, I, H, bias=bias, backend=backend, dtype=dtype, **kw)
    lead = (B,) if batched else ()
    x = torch.randn(lead + (I,), dtype=dtype)
    h = torch.randn(lead + (H,), dtype=dtype) if with_hx else None
    c = torch.randn(lead + (H,), dtype=dtype) if with_hx and name == "LSTMCell" else None
    r = run_with_grads(ref, [x, h, c], cell_call)
    g = run_with_grads(got, [x, h, c], cell_call)
    assert_same_results(r, g, TOL[dtype], f"{kind}/{backend}")


@pytest.mark.parametrize("kind", CELL_KINDS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cell_loop_matches_torch(kind, backend):
    """A cell applied in a Python loop (state fed back): gradients through the whole loop."""
    name, kw = CELL_KINDS[kind]
    ref, got = make_twin_pair(name, I, H, backend=backend, **kw)
    xs = torch.randn(T, B, I, dtype=torch.float64)

    def loop(mod, xs):
        state = None
        outs = []
        for t in range(xs.shape[0]):
            state = mod(xs[t]) if state is None else mod(xs[t], state)
            outs.append(state[0] if isinstance(state, tuple) else state)
        return torch.stack(outs)

    assert_same_results(run_with_grads(ref, [xs], loop), run_with_grads(got, [xs], loop),
                        TOL[torch.float64], kind)


# ----------------------------------------------------------------------------------------------
# dropout, train/eval, empty batch, NaN/inf
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", LAYER_KINDS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_dropout_one_zeroes_between_layers_only(kind, backend, bidirectional):
    """dropout=1 in training zeroes every layer's input but the first: deterministic, so the
    result must equal torch.nn's exactly (to rounding), gradients included. With one layer
    dropout is never applied (no dropout after the last layer)."""
    name, kw, _ = LAYER_KINDS[kind]
    for num_layers in (1, 3):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref, got = make_twin_pair(name, I, H, num_layers=num_layers, dropout=1.0,
                                      bidirectional=bidirectional, backend=backend, **kw)
        ref.train(), got.train()
        inputs = layer_inputs(ref, "batched", False, True, torch.float64)
        call = layer_call("batched", False, None)
        assert_same_results(run_with_grads(ref, inputs, call), run_with_grads(got, inputs, call),
                            TOL[torch.float64], f"{kind} L{num_layers}")


@pytest.mark.parametrize("kind", LAYER_KINDS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dropout_ignored_in_eval(kind, backend):
    name, kw, _ = LAYER_KINDS[kind]
    ref, got = make_twin_pair(name, I, H, num_layers=2, dropout=0.5, backend=backend, **kw)
    ref.eval(), got.eval()
    inputs = layer_inputs(ref, "batched", False, True, torch.float64)
    call = layer_call("batched", False, None)
    # backward in eval mode works and matches
    assert_same_results(run_with_grads(ref, inputs, call), run_with_grads(got, inputs, call),
                        TOL[torch.float64], kind)


@pytest.mark.parametrize("kind", LAYER_KINDS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dropout_half_in_training(kind, backend):
    """dropout=0.5, training: the output is random (differs from eval, which equals torch.nn's
    eval output), reproducible under the same seed, and one layer is never dropped out."""
    name, kw, _ = LAYER_KINDS[kind]
    ref, got = make_twin_pair(name, I, H, num_layers=2, dropout=0.5, backend=backend, **kw)
    x = torch.randn(T, B, I, dtype=torch.float64)
    got.train()
    torch.manual_seed(3)
    y1 = flatten(got(x))
    torch.manual_seed(3)
    y2 = flatten(got(x))
    assert_close_rel(y2, y1, 0.0, "same seed")
    y3 = flatten(got(x))
    assert not torch.equal(y3[0], y1[0]), "training dropout gave the same output twice"
    got.eval(), ref.eval()
    assert_close_rel(flatten(got(x)), flatten(ref(x)), TOL[torch.float64], "eval")
    assert not torch.allclose(y1[0], flatten(got(x))[0]), "training output equals eval output"
    # last layer's output never dropped: no exact zeros in the top layer output (tanh/sigmoid of
    # random pre-activations); a dropped-out output would have ~50% zeros. ReLU can be 0 exactly.
    if kind != "RNN_RELU":
        assert (y1[0] != 0).all(), "dropout applied after the last layer"


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_dropout_single_layer_warns_like_torch(kind):
    name, kw, _ = LAYER_KINDS[kind]
    with pytest.warns(UserWarning, match="dropout"):
        getattr(nn, name)(I, H, dropout=0.5, **kw)
    with pytest.warns(UserWarning, match="dropout"):
        getattr(fusedrnn, name)(I, H, dropout=0.5, **kw)


@pytest.mark.parametrize("kind", list(LAYER_KINDS))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("batch_first", [False, True])
def test_empty_batch(kind, backend, batch_first):
    name, kw, _ = LAYER_KINDS[kind]
    ref, got = make_twin_pair(name, I, H, num_layers=2, bidirectional=True,
                              batch_first=batch_first, backend=backend, **kw)
    for with_hx in (False, True):
        inputs = layer_inputs(ref, "batched", batch_first, with_hx, torch.float64, b=0)
        call = layer_call("batched", batch_first, None)
        # empty outputs, zero gradients: exact
        assert_same_results(run_with_grads(ref, inputs, call), run_with_grads(got, inputs, call),
                            0.0, f"{kind} B=0 hx={with_hx}")


@pytest.mark.parametrize("kind", CELL_KINDS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cell_empty_batch(kind, backend):
    name, kw = CELL_KINDS[kind]
    ref, got = make_twin_pair(name, I, H, backend=backend, **kw)
    x = torch.randn(0, I, dtype=torch.float64)
    assert_same_results(run_with_grads(ref, [x], lambda m, x: m(x)),
                        run_with_grads(got, [x], lambda m, x: m(x)), 0.0, kind)


@pytest.mark.parametrize("kind", LAYER_KINDS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_inf_propagate_like_torch(kind, backend):
    """NaN and inf in the input: NaN positions in outputs (and states) equal torch.nn's."""
    name, kw, _ = LAYER_KINDS[kind]
    ref, got = make_twin_pair(name, I, H, num_layers=2, bidirectional=True, backend=backend, **kw)
    x = torch.randn(T, B, I, dtype=torch.float64)
    x[1, 0, 1] = float("nan")
    x[0, 1, 2] = float("inf")
    x[2, 2, 0] = -float("inf")
    r_out, g_out = flatten(ref(x)), flatten(got(x))
    assert any(torch.isnan(o).any() for o in r_out), "test input should produce NaN"
    assert_close_rel(g_out, r_out, TOL[torch.float64], f"{kind} with NaN/inf")


@pytest.mark.parametrize("kind", CELL_KINDS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cell_nan_inf_like_torch(kind, backend):
    name, kw = CELL_KINDS[kind]
    ref, got = make_twin_pair(name, I, H, backend=backend, **kw)
    x = torch.randn(B, I, dtype=torch.float64)
    x[0, 1] = float("nan")
    x[1, 2] = float("inf")
    assert_close_rel(flatten(got(x)), flatten(ref(x)), TOL[torch.float64], kind)


# ----------------------------------------------------------------------------------------------
# module plumbing: dtype conversion, copies, pickling, backend selection
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(LAYER_KINDS) + list(CELL_KINDS))
def test_to_dtype_deepcopy_pickle(kind):
    name, kw = (LAYER_KINDS[kind][:2] if kind in LAYER_KINDS else CELL_KINDS[kind])
    ref = getattr(nn, name)(I, H, **kw)
    got = getattr(fusedrnn, name)(I, H, **kw)
    got.load_state_dict(ref.state_dict())
    ref, got = ref.double(), got.double()        # .to(dtype) after construction
    if isinstance(got, nn.RNNBase):
        got.flatten_parameters()
        x = torch.randn(T, B, I, dtype=torch.float64)
    else:
        x = torch.randn(B, I, dtype=torch.float64)
    expected = flatten(ref(x))
    for clone in (got, copy.deepcopy(got), pickle.loads(pickle.dumps(got))):
        assert type(clone) is type(got)
        assert_close_rel(flatten(clone(x)), expected, TOL[torch.float64], kind)


@pytest.mark.parametrize("env", ["reference", "torch", "auto"])
@pytest.mark.parametrize("name", ["GRU", "LSTMCell"])
def test_env_var_overrides_auto_only(monkeypatch, env, name):
    """FUSEDRNN_BACKEND replaces backend="auto" (read at call time); an explicit backend wins.
    `last_backend` records the implementation that ran ("torch" is what "auto" means on CPU)."""
    monkeypatch.setenv("FUSEDRNN_BACKEND", env)
    x = torch.randn(T, B, I) if name == "GRU" else torch.randn(B, I)
    m = getattr(fusedrnn, name)(I, H)
    m(x)
    assert m.last_backend == ("torch" if env == "auto" else env)
    for explicit in ("torch", "reference"):
        m = getattr(fusedrnn, name)(I, H, backend=explicit)
        m(x)
        assert m.last_backend == explicit, f"explicit backend={explicit!r} overridden by {env}"


def test_env_var_invalid_value_is_rejected(monkeypatch):
    monkeypatch.setenv("FUSEDRNN_BACKEND", "gpu-please")
    with pytest.raises(ValueError, match="FUSEDRNN_BACKEND"):
        fusedrnn.GRU(I, H)(torch.randn(T, B, I))


@pytest.mark.parametrize("kind", LAYER_KINDS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_grad_and_inference_mode(kind, backend):
    name, kw, _ = LAYER_KINDS[kind]
    ref, got = make_twin_pair(name, I, H, num_layers=2, bidirectional=True, backend=backend, **kw)
    x = torch.randn(T, B, I, dtype=torch.float64)
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx():
            assert_close_rel(flatten(got(x)), flatten(ref(x)), TOL[torch.float64], ctx.__name__)


@pytest.mark.parametrize("kind", LAYER_KINDS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_weights_changed_after_construction(kind, backend):
    """Reassigned Parameters, in-place updates and parametrizations (weight_norm) are seen by
    the next forward, as in torch.nn."""
    name, kw, _ = LAYER_KINDS[kind]
    ref, got = make_twin_pair(name, I, H, num_layers=2, backend=backend, **kw)
    x = torch.randn(T, B, I, dtype=torch.float64)
    w = torch.randn_like(ref.weight_hh_l0)
    ref.weight_hh_l0, got.weight_hh_l0 = nn.Parameter(w.clone()), nn.Parameter(w.clone())
    assert_close_rel(flatten(got(x)), flatten(ref(x)), TOL[torch.float64], "reassigned")
    with torch.no_grad():
        ref.weight_ih_l1.mul_(2.0), got.weight_ih_l1.mul_(2.0)
    assert_close_rel(flatten(got(x)), flatten(ref(x)), TOL[torch.float64], "in-place")
    for m in (ref, got):
        nn.utils.parametrizations.weight_norm(m, "weight_ih_l0")
    inputs = [x]
    assert_same_results(run_with_grads(ref, inputs, lambda m, x: m(x)),
                        run_with_grads(got, inputs, lambda m, x: m(x)),
                        TOL[torch.float64], "weight_norm")


@pytest.mark.parametrize("kind", LAYER_KINDS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_inputs_and_list_hx(kind, backend):
    name, kw, _ = LAYER_KINDS[kind]
    ref, got = make_twin_pair(name, I, H, bidirectional=True, backend=backend, **kw)
    x = torch.randn(B, T, I, dtype=torch.float64).transpose(0, 1)          # (T, B, I) strided
    states = [torch.randn(s[1], s[0], s[2], dtype=torch.float64).transpose(0, 1)
              for s in state_shapes(ref, B)]
    assert not x.is_contiguous() and not states[0].is_contiguous()

    def call(m, x, *states):
        return m(x, list(states) if len(states) == 2 else states[0])     # a list (h0, c0) too

    assert_same_results(run_with_grads(ref, [x, *states], call),
                        run_with_grads(got, [x, *states], call), TOL[torch.float64], kind)


@pytest.mark.parametrize("kind", list(LAYER_KINDS) + list(CELL_KINDS))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bfloat16_modules(kind, backend):
    """A bfloat16 module on bfloat16 input: same dtypes as torch.nn, values within bf16
    tolerance (8 mantissa bits, eps 7.8e-3; rounding in different places over T=4 steps: 5e-2)."""
    name, kw = (LAYER_KINDS[kind][:2] if kind in LAYER_KINDS else CELL_KINDS[kind])
    ref, got = make_twin_pair(name, I, H, backend=backend, dtype=torch.bfloat16, **kw)
    x = torch.randn((T, B, I) if name in ("LSTM", "GRU", "RNN") else (B, I)).bfloat16()
    exp, out = flatten(ref(x)), flatten(got(x))
    assert [o.dtype for o in out] == [e.dtype for e in exp]
    assert_close_rel([o.float() for o in out], [e.float() for e in exp], 5e-2, kind)


# ----------------------------------------------------------------------------------------------
# autocast
# ----------------------------------------------------------------------------------------------

def _autocast_outputs(module, x, hx):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return flatten(module(x) if hx is None else module(x, hx))


def _autocast_states(name, kw, lead, dtype):
    if dtype is None:
        return None
    P = kw.get("proj_size", 0) or H
    h = torch.randn(lead + (P,)).to(dtype)
    return (h, torch.randn(lead + (H,)).to(dtype)) if name.startswith("LSTM") else h


def _autocast_like_torch(ref, got, x, hx, kind):
    """The twin's outputs under CPU bfloat16 autocast, checked against torch.nn's on this machine:
    the same dtypes and values within bf16 tolerance; where torch.nn's op fails here, the twin
    must still run and give finite outputs."""
    try:
        expected = _autocast_outputs(ref, x, hx)
    except RuntimeError:
        expected = None
    out = _autocast_outputs(got, x, hx)
    if expected is not None:
        assert [o.dtype for o in out] == [e.dtype for e in expected], "output dtypes differ"
        assert_close_rel([o.float() for o in out], [e.float() for e in expected], 5e-2,
                         f"{kind} autocast vs torch.nn")
    else:
        assert all(o.dtype in (torch.float32, torch.bfloat16) and torch.isfinite(o).all() for o in out)
    return out


_AUTOCAST_CASES = [
    pytest.param(k, dt, hd, be, id=f"{k}-{str(dt)[6:]}-hx_{str(hd)[6:] if hd else None}-{be}")
    for k in list(LAYER_KINDS) + list(CELL_KINDS)
    for dt in (torch.float32, torch.bfloat16)
    for hd in (None, torch.float32, torch.bfloat16)
    for be in CPU_BACKENDS]


@pytest.mark.parametrize("kind,input_dtype,hx_dtype,backend", _AUTOCAST_CASES)
def test_autocast_bf16(kind, input_dtype, hx_dtype, backend):
    """Under torch.autocast("cpu", bfloat16) every backend returns the dtypes torch.nn returns on
    this machine (taken from torch.nn at run time: oneDNN's bfloat16 support changes them) and
    values within bf16 tolerance of torch.nn's and of the float32 computation: bf16 has 8 mantissa
    bits (eps 7.8e-3); a few roundings per step over T=4 steps stay below 5e-2 relative.
    Where torch.nn itself fails (oneDNN cannot build its LSTM primitive for float32 input under
    autocast on some CPUs), there is no dtype to compare with: fusedrnn must still run and be
    accurate."""
    name, kw = (LAYER_KINDS[kind][:2] if kind in LAYER_KINDS else CELL_KINDS[kind])
    ref, got = make_twin_pair(name, I, H, dtype=torch.float32, backend=backend, **kw)
    layer = name in ("LSTM", "GRU", "RNN")
    x = torch.randn((T, B, I) if layer else (B, I)).to(input_dtype)
    hx = _autocast_states(name, kw, (1, B) if layer else (B,), hx_dtype)
    out = _autocast_like_torch(ref, got, x, hx, kind)
    hx32 = None if hx is None else (tuple(t.float() for t in hx) if isinstance(hx, tuple)
                                    else hx.float())
    fp32 = flatten(ref(x.float()) if hx32 is None else ref(x.float(), hx32))
    assert_close_rel([o.float() for o in out], fp32, 5e-2, f"{kind} autocast vs float32")
    # backward under autocast works
    x2 = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = sum(o.float().sum() for o in flatten(got(x2) if hx is None else got(x2, hx)))
    loss.backward()
    assert x2.grad is not None and torch.isfinite(x2.grad).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", list(LAYER_KINDS) + list(CELL_KINDS))
def test_autocast_bf16_module_takes_float32_input_and_states(kind, backend):
    """A bfloat16 module given float32 input and states under CPU bfloat16 autocast runs where
    torch.nn runs, with torch.nn's output dtypes and values (the same rounding: torch's op or
    the same casts), and still runs where torch.nn's op fails on this CPU."""
    name, kw = (LAYER_KINDS[kind][:2] if kind in LAYER_KINDS else CELL_KINDS[kind])
    ref, got = make_twin_pair(name, I, H, dtype=torch.bfloat16, backend=backend, **kw)
    layer = name in ("LSTM", "GRU", "RNN")
    x = torch.randn((T, B, I) if layer else (B, I))
    hx = _autocast_states(name, kw, (1, B) if layer else (B,), torch.float32)
    _autocast_like_torch(ref, got, x, hx, kind)


# ----------------------------------------------------------------------------------------------
# Triton backend through the interpreter (tiny)
# ----------------------------------------------------------------------------------------------

TRITON_GRID = [
    pytest.param(kind, bidir, inp, dt, id=f"{kind}-{'bi' if bidir else 'uni'}-{inp}-{str(dt)[6:]}")
    for kind, bidir, inp, dt in itertools.product(
        LAYER_KINDS, (False, True), ("batched", "packed_unsorted"), (torch.float32,))
] + [
    pytest.param("LSTM_proj", True, "unbatched", torch.float32, id="LSTM_proj-unbatched-float32"),
    pytest.param("LSTM_proj", True, "packed_unsorted", torch.float64, id="LSTM_proj-float64"),
    pytest.param("GRU", True, "unbatched", torch.float64, id="GRU-unbatched-float64"),
]


@pytest.mark.triton
@pytest.mark.parametrize("kind,bidirectional,input_kind,dtype", TRITON_GRID)
def test_layer_triton_backend(kind, bidirectional, input_kind, dtype, triton_device):
    name, kw, _ = LAYER_KINDS[kind]
    ref, got = make_twin_pair(name, I, 4, num_layers=2, bidirectional=bidirectional,
                              backend="triton", dtype=dtype, **kw)
    inputs = layer_inputs(ref, input_kind, False, True, dtype, t=3, b=2)
    call = layer_call(input_kind, False, [2, 3])
    assert_same_results(run_with_grads(ref, inputs, call), run_with_grads(got, inputs, call),
                        TOL[dtype], f"{kind}/triton")


@pytest.mark.triton
@pytest.mark.parametrize("kind", CELL_KINDS)
def test_cell_triton_backend(kind, triton_device):
    name, kw = CELL_KINDS[kind]
    ref, got = make_twin_pair(name, I, 4, backend="triton", dtype=torch.float32, **kw)
    x, h = torch.randn(2, I), torch.randn(2, 4)
    c = torch.randn(2, 4) if name == "LSTMCell" else None
    assert_same_results(run_with_grads(ref, [x, h, c], cell_call),
                        run_with_grads(got, [x, h, c], cell_call), TOL[torch.float32], kind)


@pytest.mark.triton
@pytest.mark.parametrize("kind", ["GRU", "RNN_RELU", "LSTM"])
def test_layer_triton_backend_options(kind, triton_device):
    """bias=False, batch_first, no h0, eval-mode backward, dropout=1 between layers."""
    name, kw, _ = LAYER_KINDS[kind]
    ref, got = make_twin_pair(name, I, 4, num_layers=2, bias=False, batch_first=True,
                              dropout=1.0, backend="triton", dtype=torch.float32, **kw)
    inputs = layer_inputs(ref, "batched", True, False, torch.float32, t=3, b=2)
    call = layer_call("batched", True, None)
    for train in (True, False):
        ref.train(train), got.train(train)
        assert_same_results(run_with_grads(ref, inputs, call), run_with_grads(got, inputs, call),
                            TOL[torch.float32], f"{kind}/triton train={train}")


@pytest.mark.triton
def test_triton_backend_saves_nothing_without_grad(monkeypatch, triton_device):
    """Under no_grad / inference_mode, and when nothing requires grad, the layer asks the kernels
    for no per-step workspace (save=False: memory proportional to the output, see
    tests/test_kernels.py::test_inference_memory_does_not_grow_with_T); with grad it saves."""
    import fusedrnn.kernels as K
    saves = []
    real = K.scan_forward

    def spy(*args, **kw):
        saves.append(args[8])  # scan_forward(mode, xg, w_hh, b_hh, w_hr, h0, c0, lengths, save)
        return real(*args, **kw)

    monkeypatch.setattr(K, "scan_forward", spy)
    m = fusedrnn.LSTM(I, 4, num_layers=2, backend="triton")
    x = torch.randn(T, B, I)
    for ctx in (torch.no_grad, torch.inference_mode):
        saves.clear()
        with ctx():
            m(x)
        assert saves == [False, False], (ctx.__name__, saves)
    m.requires_grad_(False)
    saves.clear()
    m(x)
    assert saves == [False, False], saves
    m.requires_grad_(True)
    saves.clear()
    m(x)[0].sum().backward()
    assert saves == [True, True], saves


# ----------------------------------------------------------------------------------------------
# CUDA: the default backend runs the Triton kernels (skipped without a GPU)
# ----------------------------------------------------------------------------------------------

def _to64_cpu(res):
    outs, in_grads, p_grads, _ = res
    conv = (lambda t: None if t is None else t.detach().double().cpu())
    return [conv(o) for o in outs], [conv(g) for g in in_grads], [(n, conv(g)) for n, g in p_grads]


def _assert_cuda_matches_cpu64(ref_res, got_res, what):
    """float32 on the GPU against float64 torch.nn on the CPU: 2e-5 (float32 rounding, TF32 off
    by default for fusedrnn's matmuls)."""
    (r_out, r_in, r_p), (g_out, g_in, g_p) = _to64_cpu(ref_res), _to64_cpu(got_res)
    assert_close_rel(g_out, r_out, 2e-5, f"{what}: outputs")
    assert_close_rel(g_in, r_in, 2e-5, f"{what}: input grads")
    for (n, gp), (_, rp) in zip(g_p, r_p):
        assert_close_rel(gp, rp, 2e-5, f"{what}: grad of {n}")


@pytest.mark.gpu
@pytest.mark.parametrize("input_kind", ["batched", "unbatched", "packed_unsorted"])
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_layer_cuda_default_backend(kind, input_kind):
    name, kw, _ = LAYER_KINDS[kind]
    ref = getattr(nn, name)(I, H, num_layers=2, bidirectional=True, dtype=torch.float64, **kw)
    got = getattr(fusedrnn, name)(I, H, num_layers=2, bidirectional=True, device="cuda", **kw)
    got.load_state_dict(ref.state_dict())
    inputs = layer_inputs(ref, input_kind, False, True, torch.float64)
    call = layer_call(input_kind, False, LENGTHS_UNSORTED)
    r = run_with_grads(ref, inputs, call)
    g = run_with_grads(got, [None if x is None else x.float().cuda() for x in inputs], call)
    assert got.last_backend == "triton"
    _assert_cuda_matches_cpu64(r, g, f"{kind} cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("kind", CELL_KINDS)
def test_cell_cuda_default_backend(kind):
    name, kw = CELL_KINDS[kind]
    ref = getattr(nn, name)(I, H, dtype=torch.float64, **kw)
    got = getattr(fusedrnn, name)(I, H, device="cuda", **kw)
    got.load_state_dict(ref.state_dict())
    x, h = torch.randn(B, I, dtype=torch.float64), torch.randn(B, H, dtype=torch.float64)
    c = torch.randn(B, H, dtype=torch.float64) if name == "LSTMCell" else None
    r = run_with_grads(ref, [x, h, c], cell_call)
    g = run_with_grads(got, [None if t is None else t.float().cuda() for t in (x, h, c)], cell_call)
    _assert_cuda_matches_cpu64(r, g, f"{kind} cuda")


@pytest.mark.triton
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN_TANH", "LSTMCell", "GRUCell"])
def test_autocast_bf16_triton_backend(kind, triton_device):
    """Autocast parity on the Triton kernels (through the interpreter on CPU): torch.nn's output
    dtypes on this machine, values within bf16 tolerance of torch.nn's."""
    name, kw = (LAYER_KINDS[kind][:2] if kind in LAYER_KINDS else CELL_KINDS[kind])
    ref, got = make_twin_pair(name, I, H, dtype=torch.float32, backend="triton", **kw)
    layer = name in ("LSTM", "GRU", "RNN")
    x = torch.randn((T, B, I) if layer else (B, I))
    _autocast_like_torch(ref, got, x, None, kind)
    assert got.last_backend == "triton"
