"""The readable specification: pure-PyTorch LSTM, GRU and Elman RNN.

Every kernel is tested against these functions (run in float64). They are plain step loops with
autograd doing the backward, written for clarity rather than speed.

Shapes (time-major throughout):
    T  sequence length        B  batch        I  input features
    H  hidden units           P  state size: proj_size if > 0 else H
    G  gates per unit: LSTM 4 (i, f, g, o), GRU 3 (r, z, n), RNN 1

Variants (issue 12), defined here and computed the same way by loop.py and the kernels:
    zoneout   h_t = z * h_{t-1} + (1 - z) * h~_t, where h~_t is the cell's new h (LSTM: only h; c is
              carried as usual). In training z is a Bernoulli(p) mask per (t, b, unit), drawn by the
              caller with torch's RNG (fusedrnn.functional.zoneout_mask); in eval z = p, the
              expectation. `zoneout` is that (T, B, P) mask indexed by time, or the float p.
    reset     a bool (T, B) mask: where reset[t, b] is set, row b's state is replaced by its initial
              state (h0, c0) before the step at time t. No gradient crosses a reset: the gradient of
              the replaced state goes to h0/c0 (which so collect it from every reset step). In the
              reverse direction an episode starts at its last step, so that direction restarts at
              time t when reset[t + 1] is set (reset_for_direction): both directions of a
              bidirectional layer then see each episode exactly as if it ran alone.
    weight_drop  applied to W_hh before any of this (fusedrnn.functional.drop_weights).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def lstm_cell(x, h, c, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None):
    """One LSTM step. x: (B, I), h: (B, P), c: (B, H) -> (h', c')."""
    gates = F.linear(x, w_ih, b_ih) + F.linear(h, w_hh, b_hh)
    i, f, g, o = gates.chunk(4, dim=-1)
    i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
    c_new = f * c + i * g
    h_new = o * torch.tanh(c_new)
    if w_hr is not None:
        h_new = F.linear(h_new, w_hr)
    return h_new, c_new


def gru_cell(x, h, w_ih, w_hh, b_ih=None, b_hh=None):
    """One GRU step; r multiplies (W_hn h + b_hn), as in torch.nn.GRU. x: (B, I), h: (B, H)."""
    x_r, x_z, x_n = F.linear(x, w_ih, b_ih).chunk(3, dim=-1)
    h_r, h_z, h_n = F.linear(h, w_hh, b_hh).chunk(3, dim=-1)
    r = torch.sigmoid(x_r + h_r)
    z = torch.sigmoid(x_z + h_z)
    n = torch.tanh(x_n + r * h_n)
    return (1 - z) * n + z * h


def rnn_cell(x, h, w_ih, w_hh, b_ih=None, b_hh=None, nonlinearity="tanh"):
    """One Elman RNN step: act(W_ih x + b_ih + W_hh h + b_hh)."""
    pre = F.linear(x, w_ih, b_ih) + F.linear(h, w_hh, b_hh)
    return torch.tanh(pre) if nonlinearity == "tanh" else torch.relu(pre)


def cell_step(mode, x, state, weights):
    """One step of any mode. state is (h,) or (h, c); weights is (w_ih, w_hh, b_ih, b_hh, w_hr)."""
    w_ih, w_hh, b_ih, b_hh, w_hr = weights
    if mode == "LSTM":
        return lstm_cell(x, state[0], state[1], w_ih, w_hh, b_ih, b_hh, w_hr)
    if mode == "GRU":
        return (gru_cell(x, state[0], w_ih, w_hh, b_ih, b_hh),)
    nonlinearity = "tanh" if mode == "RNN_TANH" else "relu"
    return (rnn_cell(x, state[0], w_ih, w_hh, b_ih, b_hh, nonlinearity),)


def reverse_index(lengths, T):
    """(T, B) time indices that reverse each sequence within its own length.

    Padded positions (t >= length) map to themselves, so the map is its own inverse.
    """
    t = torch.arange(T, device=lengths.device)[:, None]
    return torch.where(t < lengths[None, :], lengths[None, :] - 1 - t, t)


def reset_for_direction(reset, lengths, reverse):
    """The (T, B) mask of times at which one direction restarts from the initial state, given the
    user's reset mask (T, B) (reset[t, b]: an episode of row b starts at time t). Forward: reset
    itself. Reverse: an episode is visited from its last step, which is the step before the next
    episode's start, so the mask is reset shifted back by one time step, within each length."""
    if not reverse:
        return reset
    T = reset.shape[0]
    shifted = torch.zeros_like(reset)
    shifted[:-1] = reset[1:]
    if lengths is not None:
        shifted &= (torch.arange(T, device=reset.device)[:, None] + 1) < lengths[None, :]
    return shifted


def layer_direction(mode, x, state, weights, lengths=None, reverse=False, zoneout=None, reset=None,
                    step=None):
    """One direction of one layer over a (possibly padded) sequence.

    x: (T, B, I); state: (h0,) or (h0, c0); lengths: (B,) int64 or None (all T).
    A sequence stops at its length: its state is carried unchanged past the end, and its outputs
    there are zero. The reverse direction starts at each sequence's own last element.
    zoneout: None, a float p (eval: the blend weight of h_{t-1}) or a (T, B, P) mask (training),
    indexed by time; reset: None or this direction's (T, B) bool mask (reset_for_direction),
    indexed by time. See the module docstring. step(mode, x_t, state, weights) -> new state tuple
    is the cell (default cell_step; fusedrnn.layernorm passes its LayerNorm cell).
    Returns y: (T, B, P) and the final state tuple.
    """
    step = step or cell_step
    T, B = x.shape[0], x.shape[1]
    if lengths is None:
        lengths = torch.full((B,), T, dtype=torch.long, device=x.device)
    initial = state
    if reverse:
        # Visit each sequence backwards within its length: gather everything indexed by time
        # into the order of the steps.
        idx = reverse_index(lengths, T)
        x = x.gather(0, idx[:, :, None].expand_as(x))
        if isinstance(zoneout, torch.Tensor):
            zoneout = zoneout.gather(0, idx[:, :, None].expand_as(zoneout))
        if reset is not None:
            reset = reset.gather(0, idx)
    ys = []
    for t in range(T):
        alive = (t < lengths)[:, None]
        if reset is not None:
            restart = (reset[t] & (t < lengths))[:, None]
            state = tuple(torch.where(restart, s0, s) for s0, s in zip(initial, state))
        new_state = step(mode, x[t], state, weights)
        if zoneout is not None:
            z = zoneout[t].to(x.dtype) if isinstance(zoneout, torch.Tensor) else zoneout
            h_new = z * state[0] + (1 - z) * new_state[0]
            new_state = (h_new,) + tuple(new_state[1:])
        state = tuple(torch.where(alive, n, s) for n, s in zip(new_state, state))
        ys.append(torch.where(alive, new_state[0], torch.zeros_like(new_state[0])))
    y = torch.stack(ys)
    if reverse:
        y = y.gather(0, idx[:, :, None].expand_as(y))
    return y, state


def rnn(mode, x, hx, layer_weights, num_layers, bidirectional, lengths=None, dropout=0.0,
        training=False, zoneout=None, reset=None, step=None):
    """A whole multi-layer, optionally bidirectional RNN, time-major.

    x: (T, B, I); hx: h0 of shape (L*D, B, P), or (h0, c0) for LSTM with c0 (L*D, B, H);
    layer_weights[l * D + d] = (w_ih, w_hh, b_ih, b_hh, w_hr) with None for absent tensors.
    Dropout is applied to each layer's output except the last, in training only.
    zoneout: None, or per layer (a list of num_layers) None, a float p or a (D, T, B, P) mask;
    reset: None or the user's (T, B) bool mask (every layer restarts from its own h0/c0);
    step: the cell (see layer_direction).
    Returns y: (T, B, D*P) and h_n (or (h_n, c_n)).
    """
    D = 2 if bidirectional else 1
    states = hx if isinstance(hx, (tuple, list)) else (hx,)
    finals = []
    layer_in = x
    for layer in range(num_layers):
        outs = []
        for d in range(D):
            k = layer * D + d
            z = zoneout[layer] if zoneout is not None else None
            z = z[d] if isinstance(z, torch.Tensor) else z
            r = reset_for_direction(reset, lengths, d == 1) if reset is not None else None
            y, final = layer_direction(mode, layer_in, tuple(s[k] for s in states),
                                       layer_weights[k], lengths, reverse=d == 1, zoneout=z, reset=r,
                                       step=step)
            outs.append(y)
            finals.append(final)
        layer_in = torch.cat(outs, dim=-1)
        if dropout > 0 and training and layer < num_layers - 1:
            layer_in = F.dropout(layer_in, dropout, training=True)
    final_states = tuple(torch.stack([f[i] for f in finals]) for i in range(len(states)))
    return layer_in, (final_states if mode == "LSTM" else final_states[0])


def cell_variants(mode, x, state, weights, zoneout=None, reset=None):
    """One step of a cell (nn.LSTMCell / GRUCell / RNNCell) with the variants.

    reset: None or a (B,) bool mask: those rows start from zeros (a cell's hx is the running state,
    so its initial state is the zero state), with no gradient to the hx they replace. zoneout: None,
    a float p (eval) or a (B, H) mask (training): h' = z * h + (1 - z) * h~ (LSTM: h only).
    Returns the new state tuple."""
    if reset is not None:
        state = tuple(torch.where(reset[:, None], torch.zeros_like(s), s) for s in state)
    new_state = cell_step(mode, x, state, weights)
    if zoneout is not None:
        z = zoneout.to(x.dtype) if isinstance(zoneout, torch.Tensor) else zoneout
        new_state = (z * state[0] + (1 - z) * new_state[0],) + tuple(new_state[1:])
    return new_state
