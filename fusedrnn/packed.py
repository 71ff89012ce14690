"""PackedSequence on CPU at the cost of a padded batch: torch's padded op over a few segments.

torch's own packed path (``_VF.lstm(data, batch_sizes, ...)``) steps one time step at a time on CPU
and its cost grows faster than linearly with T when training, while the padded op over the same
batch is fast (one input projection for the whole sequence, oneDNN for fp32 LSTM). `run_packed`
computes exactly what the packed op computes by calling the padded op, one layer and one direction
at a time, over a handful of time segments.

Shape legend:
    T  time steps (len(batch_sizes));  B  rows (batch_sizes[0]);  N  packed rows (sum(batch_sizes))
    I  input size;  H  hidden size;  P  size of h (proj_size if > 0, else H);  D  1 or 2 directions
    L  layers;  G  gates per hidden unit (spec.GATES)
    data (N, I) packed, time-major, at each step the live rows first; rows are sorted by length,
    longest first, so the live rows at step t are the prefix [0, batch_sizes[t]).
    hx: h0 (L*D, B, P) [, c0 (L*D, B, H)], rows in that sorted order.
    Returns output (N, D*P) packed like data, h_n (L*D, B, P) [, c_n (L*D, B, H)].

How one direction of one layer runs (`_run_direction`):
    * The time axis is cut at some of the steps where the batch size drops. A segment [t0, t1) runs
      as one padded call with the batch of its first step, bs = batch_sizes[t0], starting from the
      state of those rows; rows still live at t1 (a prefix) carry their state into the next segment.
    * A segment whose batch size is constant is a plain view of `data`. A segment that spans
      several batch sizes ("merged") is zero-padded; rows that end inside it keep computing past
      their end, and those outputs are thrown away. Merging trades wasted steps for fewer calls
      (each call costs about one step of overhead); `_plan` picks the cut by dynamic programming.
    * Final states: h of every row is the output at its own last step (a gather). For LSTM the
      cell state is not in the output, so in a merged segment the input gets one extra column, 1 at
      padded positions, whose weights push the input gate to exactly 0 and the forget gate to
      exactly 1 (sigmoid saturates in floating point): c stays frozen at the row's last value and
      the segment's c_n holds it, with zero gradient flowing through the frozen steps.
    * The reverse direction starts at each row's own last element: each row is reversed within
      its length (one gather on packed data, an involution), run forward, and reversed back. Its
      final state (at the row's first element) is then the row's last step, like the forward one.

Layers are chained like torch's packed path: the output of layer l (both directions
concatenated) is the input of layer l+1, with dropout on it (packed positions only) when training.
"""
from __future__ import annotations

import contextlib
import warnings

import torch
from torch import _VF

from .spec import GATES, MODES

_VF_LAYER = {"LSTM": _VF.lstm, "GRU": _VF.gru, "RNN_TANH": _VF.rnn_tanh, "RNN_RELU": _VF.rnn_relu}

# Cost model of `_plan`, in units of one full-batch step of the padded op: a call costs about
# CALL_COST steps of overhead (measured on CPU: a 1-step call is ~2x a step inside a long call),
# a step costs STEP_FIXED plus the rest in proportion to its batch, and zero-padding a merged
# segment (copies, LSTM's extra column) costs MERGE_COST.
CALL_COST = 1.0
STEP_FIXED = 0.2
MERGE_COST = 0.5
# The dynamic programme looks this many distinct batch sizes back (bounds its cost for huge B).
PLAN_WINDOW = 64


def _freeze_value(dtype):
    """A pre-activation offset that saturates sigmoid to exactly 0/1 in `dtype`, with headroom."""
    return 1e4 if dtype in (torch.float16, torch.bfloat16) else 1e15


class _Layout:
    """Index bookkeeping of one batch_sizes, computed once per call and shared by every layer and
    direction: host ints for the plan, small int64 index tensors on the data's device."""

    def __init__(self, batch_sizes, device, N):
        bs = batch_sizes.tolist()
        # pack_padded_sequence guarantees this; a hand-made PackedSequence may not, and torch's
        # packed op then silently computes something else. Refuse instead of indexing garbage.
        if not bs or bs[-1] < 1 or any(a < b for a, b in zip(bs, bs[1:])) or sum(bs) != N:
            shown = f"{bs[:8]}{'...' if len(bs) > 8 else ''}"
            raise ValueError("batch_sizes must be a non-empty, non-increasing sequence of positive "
                             f"sizes summing to the {N} rows of data, got {shown}")
        self.bs, self.T, self.B, self.device = bs, len(bs), bs[0], device
        self.offsets = [0]
        for b in bs:
            self.offsets.append(self.offsets[-1] + b)
        self.N = N
        starts = [0] + [t for t in range(1, self.T) if bs[t] != bs[t - 1]]
        self.segments = _plan(starts + [self.T], [bs[s] for s in starts], self.B)
        # Rows ending at step t are [bs[t+1], bs[t]): their last packed position is offsets[t] + b.
        last = [0] * self.B
        for t in range(self.T):
            after = bs[t + 1] if t + 1 < self.T else 0
            for b in range(after, bs[t]):
                last[b] = self.offsets[t] + b
        self.last = torch.tensor(last, dtype=torch.int64, device=device)              # (B,)
        self._rev = None
        self._pos = {}
        self._flag = {}

    def reverse(self):
        """(N,) permutation: packed position of (t, b) <- position of (len_b - 1 - t, b)."""
        if self._rev is None:
            bs_t = torch.tensor(self.bs)
            lengths = (bs_t[None, :] > torch.arange(self.B)[:, None]).sum(1)          # (B,)
            offsets = torch.tensor(self.offsets[:-1])                                 # (T,)
            t = torch.repeat_interleave(torch.arange(self.T), bs_t)                  # (N,)
            b = torch.arange(self.N) - offsets[t]
            self._rev = (offsets[lengths[b] - 1 - t] + b).to(self.device)
        return self._rev

    def positions(self, t0, t1):
        """Positions of the packed rows of [t0, t1) in the flattened (t1 - t0, bs[t0]) segment."""
        if (t0, t1) not in self._pos:
            b0 = self.bs[t0]
            pos = [k * b0 + b for k, n in enumerate(self.bs[t0:t1]) for b in range(n)]
            self._pos[t0, t1] = torch.tensor(pos, dtype=torch.int64, device=self.device)
        return self._pos[t0, t1]

    def flag(self, t0, t1, dtype):
        """(rows, 1) LSTM freeze column of a merged segment: 1 at padded positions, 0 at packed ones."""
        if (t0, t1, dtype) not in self._flag:
            rows = (t1 - t0) * self.bs[t0]
            col = torch.ones(rows, 1, dtype=dtype, device=self.device)
            self._flag[t0, t1, dtype] = col.index_fill_(0, self.positions(t0, t1), 0)
        return self._flag[t0, t1, dtype]


def _plan(bounds, sizes, B):
    """Cut points minimising the modelled cost; bounds[k]..bounds[k+1] has batch size sizes[k]."""
    S = len(sizes)
    best = [0.0] + [float("inf")] * S
    prev = [0] * (S + 1)
    for j in range(1, S + 1):
        for i in range(max(0, j - PLAN_WINDOW), j):
            steps = bounds[j] - bounds[i]
            cost = best[i] + CALL_COST + steps * (STEP_FIXED + (1 - STEP_FIXED) * sizes[i] / B)
            if j - i > 1:
                cost += MERGE_COST
            if cost < best[j]:
                best[j], prev[j] = cost, i
    cuts, j = [], S
    while j > 0:
        cuts.append((bounds[prev[j]], bounds[j]))
        j = prev[j]
    return cuts[::-1]


@contextlib.contextmanager
def _quiet_proj(has_proj, dtype):
    """torch's padded LSTM warns that oneDNN has no projections (fp32/half) and falls back; the
    packed path the caller asked for never uses oneDNN, so the warning would only confuse."""
    if not has_proj or dtype == torch.float64:
        yield
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LSTM with projections is not supported with oneDNN")
        yield


def _run_direction(mode, layout, x, h0, c0, weights, has_bias, training):
    """One layer, one direction, left-aligned: x (N, I) packed; h0 (1, B, P), c0 (1, B, H) or None.

    Returns out (N, P) packed, h_n (1, B, P), c_n (1, B, H) or None.
    """
    fn = _VF_LAYER[mode]
    lstm = mode == "LSTM"
    bs, off, T = layout.bs, layout.offsets, layout.T
    w_aug = None
    outs, c_done = [], []
    h, c = h0, c0
    for t0, t1 in layout.segments:
        n, b0 = t1 - t0, bs[t0]
        b1 = bs[t1] if t1 < T else 0                 # rows still live after the segment
        xs = x[off[t0]:off[t1]]
        merged = bs[t1 - 1] != b0
        w = weights
        if merged:
            pos = layout.positions(t0, t1)
            xs = x.new_zeros(n * b0, x.shape[1]).index_copy(0, pos, xs)
            if lstm:
                if w_aug is None:
                    # The freeze column's weights: i gate far negative, f gate far positive.
                    Hc = weights[1].shape[0] // GATES[mode]
                    col = x.new_zeros(GATES[mode] * Hc, 1)
                    col[:Hc] = -_freeze_value(x.dtype)
                    col[Hc:2 * Hc] = _freeze_value(x.dtype)
                    w_aug = torch.cat([weights[0], col], 1)
                xs = torch.cat([xs, layout.flag(t0, t1, x.dtype)], 1)
                w = [w_aug] + weights[1:]
        xs = xs.reshape(n, b0, -1)              # a view unless data is non-contiguous
        if lstm:
            y, h, c = fn(xs, (h[:, :b0], c[:, :b0]), w, has_bias, 1, 0.0, training, False, False)
            c_done.append(c[:, b1:])                  # rows that end in this segment (frozen c)
        else:
            y, h = fn(xs, h[:, :b0], w, has_bias, 1, 0.0, training, False, False)
        y = y.view(n * b0, -1)
        outs.append(y.index_select(0, pos) if merged else y)
    out = torch.cat(outs) if len(outs) > 1 else outs[0]
    # Each row's h_n is its output at its own last step (in a merged segment it kept running).
    h_n = out.index_select(0, layout.last).unsqueeze(0)
    c_n = None
    if lstm:
        c_n = torch.cat(c_done[::-1], 1) if len(c_done) > 1 else c_done[0]
    return out, h_n, c_n


def run_packed(mode, data, batch_sizes, hx, flat_weights, has_bias, num_layers, dropout, training,
               bidirectional):
    """What ``_VF.<mode>(data, batch_sizes, hx, flat_weights, ...)`` returns, computed with the
    padded op over segments (see the module docstring for shapes and the method).

    mode: one of spec.MODES. hx: (h0, c0) for LSTM, h0 otherwise, rows in sorted order.
    flat_weights: per layer, per direction: w_ih, w_hh[, b_ih, b_hh][, w_hr]. batch_sizes: the
    PackedSequence's (T,) int64 CPU tensor. Returns (output, h_n, c_n) for LSTM, else (output, h_n).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    lstm = mode == "LSTM"
    D = 2 if bidirectional else 1
    h0, c0 = (hx[0], hx[1]) if lstm else (hx, None)
    per = len(flat_weights) // (num_layers * D)
    layout = _Layout(batch_sizes, data.device, data.shape[0])
    layer_in = data
    h_n, c_n = [], []
    for layer in range(num_layers):
        outs = []
        for d in range(D):
            k = layer * D + d
            w = list(flat_weights[k * per:(k + 1) * per])
            h0k = h0[k:k + 1]
            c0k = c0[k:k + 1] if lstm else None
            x = layer_in if d == 0 else layer_in.index_select(0, layout.reverse())
            with _quiet_proj(per > 2 + 2 * has_bias, data.dtype):
                y, hk, ck = _run_direction(mode, layout, x, h0k, c0k, w, has_bias, training)
            outs.append(y if d == 0 else y.index_select(0, layout.reverse()))
            h_n.append(hk)
            if lstm:
                c_n.append(ck)
        layer_in = torch.cat(outs, 1) if D == 2 else outs[0]
        if dropout > 0 and training and layer < num_layers - 1:
            # torch's packed path drops out the packed layer output the same way (same RNG draws).
            layer_in = torch.dropout(layer_in, dropout, True)
    h_n = torch.cat(h_n) if len(h_n) > 1 else h_n[0]
    if lstm:
        return layer_in, h_n, (torch.cat(c_n) if len(c_n) > 1 else c_n[0])
    return layer_in, h_n
