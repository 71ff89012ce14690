"""The scan contract in plain PyTorch, with a hand-written backward: the "loop" kernel.

This is what the Triton kernels compute (``fusedrnn.kernels.scan_forward`` / ``scan_backward`` follow
the same contract, documented in docs/design.md), written as a step loop over time. It serves as the
CPU implementation of the ``fusedrnn::layer`` custom op (what runs under ``torch.compile`` on CPU),
and its backward is checked against autograd of ``fusedrnn.reference``.

Shapes:
    D directions (d = 1 runs backwards in time)   T steps   B batch   H hidden   P state (proj or H)
    G gates (LSTM 4, GRU 3, RNN 1), GH = G * H
    xg     (D, T, B, GH)  input projection x_t W_ih^T + b_ih, indexed by time
    w_hh   (D, GH, P)     b_hh (D, GH) or None     w_hr (D, P, H) or None
    h0     (D, B, P)      c0 (D, B, H) (LSTM only)
    lengths (B,) int64 or None; position t of sequence b is live when t < lengths[b]
Saved for backward (float32, float64 for float64 inputs), indexed by time:
    hp     (D, T, B, P)   state h entering the step at time t
    gates  (D, T, B, W)   LSTM: i, f, g, o after activation (W = 4H)
                          GRU:  r, z, n, W_hn h + b_hn     (W = 4H)
                          RNN:  h_t                        (W = H)
    cs     (D, T, B, C)   LSTM: c entering the step (C = H); others C = 0
"""
from __future__ import annotations

import torch

from .spec import GATES, saved_widths, work_dtype


def step_schedule(lengths, T, B, s, reverse, device):
    """Time index of each row at step s, and whether the row is live.

    Dead rows (s >= length) point at the padded position t = s, which no live step touches, so every
    (t, b) is visited exactly once per direction.
    """
    s_t = torch.full((B,), s, dtype=torch.long, device=device)
    if lengths is None:
        alive = torch.ones(B, dtype=torch.bool, device=device)
        return (T - 1 - s_t if reverse else s_t), alive
    alive = s_t < lengths
    if reverse:
        return torch.where(alive, lengths - 1 - s_t, s_t), alive
    return s_t, alive


def scan_forward(mode, xg, w_hh, b_hh, w_hr, h0, c0, lengths, save):
    D, T, B, GH = xg.shape
    P = w_hh.shape[2]
    H = GH // GATES[mode]
    dt, wdt = xg.dtype, work_dtype(xg.dtype)
    rows = torch.arange(B, device=xg.device)
    y = xg.new_empty(T, B, D * P)
    hn = xg.new_empty(D, B, P)
    cn = xg.new_empty(D, B, H) if mode == "LSTM" else xg.new_empty(0)
    W, C = saved_widths(mode, H)
    if save:
        hp = torch.empty(D, T, B, P, dtype=wdt, device=xg.device)
        gates = torch.empty(D, T, B, W, dtype=wdt, device=xg.device)
        cs = torch.empty(D, T, B, C, dtype=wdt, device=xg.device)
    else:
        hp, gates, cs = (xg.new_empty(0, dtype=wdt) for _ in range(3))
    for d in range(D):
        h = h0[d].to(wdt)
        c = c0[d].to(wdt) if mode == "LSTM" else None
        whh = w_hh[d].to(wdt)
        bhh = b_hh[d].to(wdt) if b_hh is not None else torch.zeros(GH, dtype=wdt, device=xg.device)
        for s in range(T):
            t, alive = step_schedule(lengths, T, B, s, d == 1, xg.device)
            a = alive[:, None]
            xt = xg[d, t, rows].to(wdt)
            hh = h @ whh.T + bhh
            if mode == "LSTM":
                pre = xt + hh
                i, f, g, o = pre.chunk(4, dim=-1)
                i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
                c_new = f * c + i * g
                h_new = o * torch.tanh(c_new)
                if w_hr is not None:
                    h_new = h_new @ w_hr[d].to(wdt).T
                saved = torch.cat([i, f, g, o], dim=-1)
            elif mode == "GRU":
                x_r, x_z, x_n = xt.chunk(3, dim=-1)
                h_r, h_z, h_n = hh.chunk(3, dim=-1)
                r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
                n = torch.tanh(x_n + r * h_n)
                h_new = (1 - z) * n + z * h
                saved = torch.cat([r, z, n, h_n], dim=-1)
            else:
                pre = xt + hh
                h_new = torch.tanh(pre) if mode == "RNN_TANH" else torch.relu(pre)
                saved = h_new
            if save:
                hp[d, t, rows] = h
                gates[d, t, rows] = saved
                if mode == "LSTM":
                    cs[d, t, rows] = c
            y[t, rows, d * P:(d + 1) * P] = torch.where(a, h_new, 0).to(dt)
            h = torch.where(a, h_new, h)
            if mode == "LSTM":
                c = torch.where(a, c_new, c)
        hn[d] = h.to(dt)
        if mode == "LSTM":
            cn[d] = c.to(dt)
    return y, hn, cn, hp, gates, cs


def scan_backward(mode, dy, dhn, dcn, w_hh, w_hr, lengths, hp, gates, cs):
    """Reverse loop. Returns dxg (grad of xg), dgh (grad of the hidden-side pre-activations
    h W_hh^T + b_hh; the same tensor as dxg except for GRU), dh0, dc0 and, with a projection,
    dhp (D, T, B, P): the gradient reaching the projected state at each time (for dW_hr)."""
    D, T, B, P = hp.shape
    GH = w_hh.shape[1]
    H = GH // GATES[mode]
    dt, wdt = dy.dtype, hp.dtype
    rows = torch.arange(B, device=dy.device)
    dxg = torch.zeros(D, T, B, GH, dtype=dt, device=dy.device)
    dgh = torch.zeros_like(dxg) if mode == "GRU" else dxg
    dhp = torch.zeros(D, T, B, P, dtype=dt, device=dy.device) if w_hr is not None else None
    dh0 = dy.new_empty(D, B, P)
    dc0 = dy.new_empty(D, B, H) if mode == "LSTM" else dy.new_empty(0)
    for d in range(D):
        whh = w_hh[d].to(wdt)
        dh = dhn[d].to(wdt)
        dc = dcn[d].to(wdt) if mode == "LSTM" else None
        for s in reversed(range(T)):
            t, alive = step_schedule(lengths, T, B, s, d == 1, dy.device)
            a = alive[:, None]
            dh_t = dh + torch.where(a, dy[t, rows, d * P:(d + 1) * P].to(wdt), 0)
            saved = gates[d, t, rows]
            h_prev = hp[d, t, rows]
            if mode == "LSTM":
                i, f, g, o = saved.chunk(4, dim=-1)
                c_prev = cs[d, t, rows]
                tc = torch.tanh(f * c_prev + i * g)
                if w_hr is not None:
                    dhp[d, t, rows] = torch.where(a, dh_t, 0).to(dt)
                    dh_raw = dh_t @ w_hr[d].to(wdt)
                else:
                    dh_raw = dh_t
                dc_t = dc + dh_raw * o * (1 - tc * tc)
                d_pre = torch.cat([dc_t * g * i * (1 - i),
                                   dc_t * c_prev * f * (1 - f),
                                   dc_t * i * (1 - g * g),
                                   dh_raw * tc * o * (1 - o)], dim=-1)
                d_pre = torch.where(a, d_pre, 0)
                d_hid = d_pre
                dh_prev = d_pre @ whh
                dc = torch.where(a, dc_t * f, dc)
            elif mode == "GRU":
                r, z, n, h_lin = saved.chunk(4, dim=-1)
                dn_pre = dh_t * (1 - z) * (1 - n * n)
                dz_pre = dh_t * (h_prev - n) * z * (1 - z)
                dr_pre = dn_pre * h_lin * r * (1 - r)
                d_pre = torch.where(a, torch.cat([dr_pre, dz_pre, dn_pre], dim=-1), 0)
                d_hid = torch.where(a, torch.cat([dr_pre, dz_pre, dn_pre * r], dim=-1), 0)
                dh_prev = dh_t * z + d_hid @ whh
            else:
                h_cur = saved
                act_grad = (1 - h_cur * h_cur) if mode == "RNN_TANH" else (h_cur > 0).to(wdt)
                d_pre = torch.where(a, dh_t * act_grad, 0)
                d_hid = d_pre
                dh_prev = d_pre @ whh
            dxg[d, t, rows] = d_pre.to(dt)
            if mode == "GRU":
                dgh[d, t, rows] = d_hid.to(dt)
            dh = torch.where(a, dh_prev, dh_t)
        dh0[d] = dh.to(dt)
        if mode == "LSTM":
            dc0[d] = dc.to(dt)
    return dxg, dgh, dh0, dc0, dhp
