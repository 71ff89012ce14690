"""Property tests: random shapes and options, fusedrnn against torch.nn.

float64: 1e-12, as in test_modules.py. float32: random shapes include ill-conditioned cases (H=1,
saturated units, gradients that nearly cancel) where torch.nn's own float32 result is 1e-4 away
from the exact one, so no float32 implementation can promise 2e-5 against it there. The float32
check is therefore against a float64 torch.nn oracle: fusedrnn's error may be at most
max(2e-5, 4 x torch.nn's own float32 error), i.e. never meaningfully worse than torch.nn.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.nn.utils.rnn import pack_padded_sequence

from conftest import TRITON_DEVICE, rel_err
from models import make_twin_pair
from test_modules import assert_same_results, assert_same_structure, run_with_grads, state_shapes

TOL = {torch.float64: 1e-12, torch.float32: 2e-5}


def _tensors(res):
    outs, in_grads, p_grads, _ = res
    named = [(f"output {i}", o) for i, o in enumerate(outs)]
    named += [(f"input grad {i}", g) for i, g in enumerate(in_grads) if g is not None]
    return named + [(f"grad of {n}", g) for n, g in p_grads]


def assert_matches_torch(ref, got, dtype, inputs, call, what):
    r, g = run_with_grads(ref, inputs, call), run_with_grads(got, inputs, call)
    if dtype == torch.float64:
        assert_same_results(r, g, TOL[dtype], what)
        return
    assert_same_structure(g[3], r[3], what)
    exact = copy.deepcopy(ref).double()      # the same weights, exactly, in float64
    o = run_with_grads(exact, [None if x is None else x.double() for x in inputs], call)
    for (name, gt), (_, rt), (_, ot) in zip(_tensors(g), _tensors(r), _tensors(o)):
        assert gt.dtype == rt.dtype, f"{what}: {name} dtype {gt.dtype} != {rt.dtype}"
        e_got, e_ref = rel_err(gt, ot), rel_err(rt, ot)
        assert e_got <= max(TOL[dtype], 4 * e_ref), (
            f"{what}: {name}: error {e_got:.2e} vs exact, torch.nn float32 has {e_ref:.2e}")


SETTINGS = settings(max_examples=100, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


@st.composite
def layer_configs(draw):
    name = draw(st.sampled_from(["LSTM", "GRU", "RNN"]))
    kw = dict(num_layers=draw(st.integers(1, 3)), bidirectional=draw(st.booleans()),
              bias=draw(st.booleans()), batch_first=draw(st.booleans()))
    H = draw(st.integers(1, 7))
    if name == "RNN":
        kw["nonlinearity"] = draw(st.sampled_from(["tanh", "relu"]))
    if name == "LSTM" and H > 1 and draw(st.booleans()):
        kw["proj_size"] = draw(st.integers(1, H - 1))
    if kw["num_layers"] > 1 and draw(st.booleans()):
        kw["dropout"] = draw(st.sampled_from([0.3, 1.0]))   # eval mode below, or dropout=1
    T = draw(st.integers(1, 5))
    B = draw(st.integers(1, 3))
    I = draw(st.integers(1, 4))
    layout = draw(st.sampled_from(["batched", "unbatched", "packed", "packed_unsorted"]))
    lengths = None
    if layout.startswith("packed"):
        lengths = draw(st.lists(st.integers(1, T), min_size=B, max_size=B))
        if layout == "packed":
            lengths = sorted(lengths, reverse=True)
    return dict(name=name, kw=kw, H=H, T=T, B=B, I=I, layout=layout, lengths=lengths,
                with_hx=draw(st.booleans()), train=draw(st.booleans()),
                dtype=draw(st.sampled_from([torch.float64, torch.float32])),
                backend=draw(st.sampled_from(["auto", "torch", "reference"])))


@SETTINGS
@given(cfg=layer_configs())
def test_random_layers_match_torch(cfg):
    check_layer(cfg)


@pytest.mark.triton
@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=layer_configs(), kernel=st.sampled_from(["stepwise", "persistent"]))
def test_random_layers_triton_kernels_match_torch(cfg, kernel):
    """The same random layers through the Triton kernels (the interpreter on CPU), each schedule
    forced: tiny sizes are far from every block multiple, and all fit a single-program
    persistent plan."""
    if TRITON_DEVICE is None:
        pytest.skip("no CUDA and TRITON_INTERPRET=0 in the environment")
    got = check_layer(dict(cfg, backend="triton"), kernel=kernel)
    assert got.last_backend == "triton" and set(got.last_kernels) == {kernel}, got.last_kernels


def check_layer(cfg, kernel=None):
    kw, dtype = cfg["kw"], cfg["dtype"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref, got = make_twin_pair(cfg["name"], cfg["I"], cfg["H"], backend=cfg["backend"],
                                  dtype=dtype, **kw)
    if kernel is not None:
        got.kernel = kernel
    # dropout is random unless it is 1 (deterministic zeros) or the modules are in eval mode
    train = cfg["train"] and kw.get("dropout", 0.0) in (0.0, 1.0)
    ref.train(train), got.train(train)
    T, B, I, bf = cfg["T"], cfg["B"], cfg["I"], kw["batch_first"]
    unbatched = cfg["layout"] == "unbatched"
    if unbatched:
        x = torch.randn(T, I, dtype=dtype)
    else:
        x = torch.randn((B, T, I) if bf else (T, B, I), dtype=dtype)
    states = [torch.randn(s, dtype=dtype) for s in state_shapes(ref, None if unbatched else B)]
    if not cfg["with_hx"]:
        states = []
    lengths = cfg["lengths"]

    def call(mod, x, *states):
        inp = x if lengths is None else pack_padded_sequence(
            x, torch.tensor(lengths), batch_first=bf, enforce_sorted=cfg["layout"] == "packed")
        if not states:
            return mod(inp)
        return mod(inp, tuple(states) if len(states) == 2 else states[0])

    assert_matches_torch(ref, got, dtype, [x, *states], call, str(cfg))
    return got


@st.composite
def cell_configs(draw):
    name = draw(st.sampled_from(["LSTMCell", "GRUCell", "RNNCell"]))
    kw = dict(bias=draw(st.booleans()))
    if name == "RNNCell":
        kw["nonlinearity"] = draw(st.sampled_from(["tanh", "relu"]))
    return dict(name=name, kw=kw, I=draw(st.integers(1, 4)), H=draw(st.integers(1, 7)),
                B=draw(st.one_of(st.none(), st.integers(0, 3))), with_hx=draw(st.booleans()),
                steps=draw(st.integers(1, 3)),
                dtype=draw(st.sampled_from([torch.float64, torch.float32])),
                backend=draw(st.sampled_from(["auto", "torch", "reference"])))


@SETTINGS
@given(cfg=cell_configs())
def test_random_cells_match_torch(cfg):
    """A few steps of a cell loop (state fed back), batched (B may be 0) or unbatched."""
    dtype = cfg["dtype"]
    ref, got = make_twin_pair(cfg["name"], cfg["I"], cfg["H"], backend=cfg["backend"],
                              dtype=dtype, **cfg["kw"])
    lead = () if cfg["B"] is None else (cfg["B"],)
    xs = torch.randn((cfg["steps"],) + lead + (cfg["I"],), dtype=dtype)
    n_states = 2 if cfg["name"] == "LSTMCell" else 1
    states = [torch.randn(lead + (cfg["H"],), dtype=dtype) for _ in range(n_states)] \
        if cfg["with_hx"] else []

    def loop(mod, xs, *states):
        state = (tuple(states) if n_states == 2 else states[0]) if states else None
        outs = []
        for t in range(xs.shape[0]):
            state = mod(xs[t]) if state is None else mod(xs[t], state)
            outs.append(state)
        return outs

    assert_matches_torch(ref, got, dtype, [xs, *states], loop, str(cfg))
