"""torch.autograd.gradcheck on fusedrnn modules (float64, tiny shapes).

Checks the analytical gradients with respect to the input, h0, c0 and every parameter against
finite differences. fast_mode=True (random projections) keeps the many-parameter cases cheap; a
few single-layer cases run the full Jacobian check.
"""
from __future__ import annotations

import itertools

import pytest
import torch
from torch.func import functional_call
from torch.nn.utils.rnn import pack_padded_sequence

import fusedrnn

T, B, I, H = 3, 2, 2, 3

LAYERS = {
    "LSTM": ("LSTM", {}),
    "LSTM_proj": ("LSTM", {"proj_size": 2}),
    "GRU": ("GRU", {}),
    "RNN_TANH": ("RNN", {"nonlinearity": "tanh"}),
    "RNN_RELU": ("RNN", {"nonlinearity": "relu"}),
}
CELLS = {
    "LSTMCell": ("LSTMCell", {}),
    "GRUCell": ("GRUCell", {}),
    "RNNCell_tanh": ("RNNCell", {"nonlinearity": "tanh"}),
    "RNNCell_relu": ("RNNCell", {"nonlinearity": "relu"}),
}


def _shift_away_from_relu_kink(module):
    """Finite differences across ReLU's kink at 0 are wrong by construction; positive biases keep
    pre-activations away from 0 for these tiny random inputs."""
    with torch.no_grad():
        for n, p in module.named_parameters():
            if "bias" in n:
                p.add_(0.5)


def _layer_fn(module, names, packed_lengths, has_c0):
    def f(x, h0, *rest):
        c0 = rest[0] if has_c0 else None
        params = dict(zip(names, rest[1:] if has_c0 else rest))
        hx = (h0, c0) if has_c0 else h0
        inp = pack_padded_sequence(x, packed_lengths, enforce_sorted=False) \
            if packed_lengths is not None else x
        out, state = functional_call(module, params, (inp, hx))
        y = out.data if packed_lengths is not None else out
        return (y,) + (tuple(state) if isinstance(state, tuple) else (state,))
    return f


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("kind", LAYERS)
def test_layer_gradcheck(kind, bidirectional, packed, backend):
    name, kw = LAYERS[kind]
    m = getattr(fusedrnn, name)(I, H, num_layers=2, bidirectional=bidirectional,
                                dtype=torch.float64, backend=backend, **kw)
    if kind == "RNN_RELU":
        _shift_away_from_relu_kink(m)
    D = 2 if bidirectional else 1
    P = kw.get("proj_size", 0) or H
    names = [n for n, _ in m.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in m.parameters()]
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2 * D, B, P, dtype=torch.float64, requires_grad=True)
    extra = [torch.randn(2 * D, B, H, dtype=torch.float64, requires_grad=True)] if name == "LSTM" else []
    lengths = torch.tensor([2, 3]) if packed else None
    f = _layer_fn(m, names, lengths, bool(extra))
    assert torch.autograd.gradcheck(f, (x, h0, *extra, *params), fast_mode=True)


@pytest.mark.parametrize("kind", LAYERS)
def test_layer_gradcheck_full_jacobian(kind):
    """Slow-mode gradcheck (every Jacobian entry), one layer, w.r.t. input and states only."""
    name, kw = LAYERS[kind]
    m = getattr(fusedrnn, name)(I, H, dtype=torch.float64, backend="reference", **kw)
    if kind == "RNN_RELU":
        _shift_away_from_relu_kink(m)
    P = kw.get("proj_size", 0) or H
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(1, B, P, dtype=torch.float64, requires_grad=True)
    if name == "LSTM":
        c0 = torch.randn(1, B, H, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x, h, c: tuple(_flatten(m(x, (h, c)))), (x, h0, c0))
    else:
        assert torch.autograd.gradcheck(lambda x, h: tuple(_flatten(m(x, h))), (x, h0))


def _flatten(out):
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in _flatten(o)]


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("kind", CELLS)
def test_cell_gradcheck(kind, batched, backend):
    name, kw = CELLS[kind]
    m = getattr(fusedrnn, name)(I, H, dtype=torch.float64, backend=backend, **kw)
    if kind == "RNNCell_relu":
        _shift_away_from_relu_kink(m)
    names = [n for n, _ in m.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in m.parameters()]
    lead = (B,) if batched else ()
    x = torch.randn(lead + (I,), dtype=torch.float64, requires_grad=True)
    states = [torch.randn(lead + (H,), dtype=torch.float64, requires_grad=True)
              for _ in range(2 if name == "LSTMCell" else 1)]

    def f(x, *rest):
        st, ps = rest[:len(states)], rest[len(states):]
        hx = tuple(st) if name == "LSTMCell" else st[0]
        return tuple(_flatten(functional_call(m, dict(zip(names, ps)), (x, hx))))

    assert torch.autograd.gradcheck(f, (x, *states, *params))


@pytest.mark.parametrize("kind,batch_first", list(itertools.product(["LSTM", "GRU"], [False, True])))
def test_gradgradcheck_reference(kind, batch_first):
    """Double backward through the reference backend (plain autograd), as torch.nn supports."""
    m = getattr(fusedrnn, kind)(I, H, batch_first=batch_first, dtype=torch.float64,
                                backend="reference")
    x = torch.randn((B, T, I) if batch_first else (T, B, I), dtype=torch.float64,
                    requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x: m(x)[0], (x,))
