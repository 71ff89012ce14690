"""Property tests: random shapes and options, fusedrnn against torch.nn (float64, 1e-12; float32,
2e-5: the tolerances of test_modules.py, where they are justified)."""
from __future__ import annotations

import warnings

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.nn.utils.rnn import pack_padded_sequence

from models import make_twin_pair
from test_modules import assert_same_results, run_with_grads, state_shapes

TOL = {torch.float64: 1e-12, torch.float32: 2e-5}
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
    kw, dtype = cfg["kw"], cfg["dtype"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref, got = make_twin_pair(cfg["name"], cfg["I"], cfg["H"], backend=cfg["backend"],
                                  dtype=dtype, **kw)
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

    inputs = [x, *states]
    assert_same_results(run_with_grads(ref, inputs, call), run_with_grads(got, inputs, call),
                        TOL[dtype], str(cfg))


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

    inputs = [xs, *states]
    assert_same_results(run_with_grads(ref, inputs, loop), run_with_grads(got, inputs, loop),
                        TOL[dtype], str(cfg))
