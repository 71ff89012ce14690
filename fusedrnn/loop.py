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
Variants (fusedrnn/reference.py defines them):
    zoneout   (D, T, B, P) bool mask (training; True keeps h_{t-1}) or None
    zoneout_p float, the eval blend weight of h_{t-1} (used when zoneout is None; 0: off)
    reset     (D, T, B) bool or None: direction d restarts from h0/c0 before its step at time t
              (already shifted for the reverse direction: reference.reset_for_direction)
    hp and cs hold the state actually entering the step (h0/c0 at a reset), RNN's `gates` the
    cell's own h~ (before the zoneout blend).
Two implementations of each direction: without lengths (_forward_dense / _backward_dense, the CPU
default's case and the one that has to be fast: per-step views made once, every step's results
written into preallocated storage by out= / in-place ops, so a step costs its cell's ops and no
allocation) and with lengths (_forward_gathered / _backward_gathered: each row's time index
gathered per step). They compute the same formulas; results agree to rounding (the dense path
applies each activation to its gate's slice, so a few elements differ by an ulp).
"""
from __future__ import annotations

import torch

from .spec import GATES, saved_widths, work_dtype


class _Steps:
    """Reads and writes at the time index of each row at step s of direction d (the gathered
    paths; without lengths every row is at the same time and the dense paths index by t)."""

    def __init__(self, lengths, T, B, device):
        self.lengths, self.T = lengths, T
        self.rows = torch.arange(B, device=device) if lengths is not None else None

    def at(self, s, reverse):
        """(index, alive): alive is None when every row is live. Dead rows (s >= length) point at
        the padded position t = s, which no live step touches, so every (t, b) is visited exactly
        once per direction."""
        if self.lengths is None:
            return (self.T - 1 - s if reverse else s), None
        s_t = torch.full_like(self.lengths, s)
        alive = s_t < self.lengths
        t = torch.where(alive, self.lengths - 1 - s_t, s_t) if reverse else s_t
        return (t, self.rows), alive[:, None]


def zoneout_split(dh, keep, p):
    """Zoneout's backward: the gradient reaching a step's output h_t = z h_{t-1} + (1 - z) h~_t,
    split into (the part through the cell, the part straight to h_{t-1}); the second is None
    without zoneout. keep: the training mask (True keeps h_{t-1}) or None; p: the eval weight."""
    if keep is not None:
        return torch.where(keep, 0, dh), torch.where(keep, dh, 0)
    if p > 0:
        return (1 - p) * dh, p * dh
    return dh, None


def divert_restart(restart, dh_prev, dc_prev, dh_reset, dc_reset):
    """Rows that restarted at this step took h0 / c0, not the previous step's state: their
    gradient (dh_prev, dc_prev: reaching the state that entered the step) is added to the
    accumulators of dh0 / dc0 and zeroed in place, so nothing crosses the reset. dc_prev is None
    except for the LSTM."""
    dh_reset.add_(torch.where(restart, dh_prev, 0))
    dh_prev.masked_fill_(restart, 0)
    if dc_prev is not None:
        dc_reset.add_(torch.where(restart, dc_prev, 0))
        dc_prev.masked_fill_(restart, 0)


def _get(a, d, idx):
    """a[d, t_b, b] for every row b (a: (D, T, B, ...))."""
    return a[d, idx] if isinstance(idx, int) else a[d, idx[0], idx[1]]


def _put(a, d, idx, value):
    if isinstance(idx, int):
        a[d, idx] = value
    else:
        a[d, idx[0], idx[1]] = value


def _where(alive, a, b):
    return a if alive is None else torch.where(alive, a, b)


def _restart(reset, d, idx, alive):
    """(B, 1) bool: rows that restart from the initial state at this step (live rows only)."""
    r = _get(reset, d, idx)[:, None]
    return r if alive is None else r & alive


def scan_forward(mode, xg, w_hh, b_hh, w_hr, h0, c0, lengths, save, zoneout=None, zoneout_p=0.0,
                 reset=None):
    if lengths is None:
        with torch.no_grad():
            return _forward_dense(mode, xg, w_hh, b_hh, w_hr, h0, c0, save, zoneout, zoneout_p, reset)
    return _forward_gathered(mode, xg, w_hh, b_hh, w_hr, h0, c0, lengths, save, zoneout, zoneout_p, reset)


def _forward_dense(mode, xg, w_hh, b_hh, w_hr, h0, c0, save, zoneout, zoneout_p, reset):
    """scan_forward without lengths: every row is at the same time, so each step's operands are
    views made once before the loop (unbind), and each step writes into preallocated storage with
    out= / in-place ops: the saved workspace itself in training, one reused buffer in inference, and
    the output y directly when it has the work dtype. Per step that is the cell's own ops and
    nothing else (a small layer's time is its per-step op count; a large one's is not spent
    allocating). Computes exactly what _forward_gathered computes, operation for operation."""
    D, T, B, GH = xg.shape
    P = w_hh.shape[2]
    H = GH // GATES[mode]
    dt, wdt = xg.dtype, work_dtype(xg.dtype)
    dev = xg.device
    lstm, gru = mode == "LSTM", mode == "GRU"
    same = dt == wdt
    y = xg.new_empty(T, B, D * P)
    hn = xg.new_empty(D, B, P)
    cn = xg.new_empty(D, B, H) if lstm else xg.new_empty(0)
    W, C = saved_widths(mode, H)
    if save:
        hp = torch.empty(D, T, B, P, dtype=wdt, device=dev)
        gates = torch.empty(D, T, B, W, dtype=wdt, device=dev)
        cs = torch.empty(D, T, B, C, dtype=wdt, device=dev)
    else:
        hp, gates, cs = (xg.new_empty(0, dtype=wdt) for _ in range(3))

    def buf(*shape):
        return torch.empty(*shape, dtype=wdt, device=dev)

    def rows(a):
        """a (T or 1, ...) -> its T per-step views (one view repeated: a reused buffer)."""
        v = a.unbind(0)
        return v if a.shape[0] == T else v * T

    blend = zoneout is None and zoneout_p > 0
    zoned = zoneout is not None or blend
    proj = w_hr is not None
    for d in range(D):
        h_init = h0[d].to(wdt)
        c_init = c0[d].to(wdt) if lstm else None
        whh_t = w_hh[d].to(wdt).T
        whr_t = w_hr[d].to(wdt).T if proj else None
        bhh = b_hh[d].to(wdt) if b_hh is not None else None
        xs = xg[d].unbind(0)
        ys = y[:, :, d * P:(d + 1) * P].unbind(0)
        G = gates[d] if save else buf(1, B, W)
        pre = rows(G)
        if save:
            hps = hp[d].unbind(0)
            css = cs[d].unbind(0) if lstm else None
        if zoneout is not None:
            zs = zoneout[d].unbind(0)
        if reset is not None:
            restart = reset[d].unsqueeze(-1).unbind(0)
            any_restart = reset[d].any(-1).tolist()
        # storage of the new h: y itself (same dtype) or a work-dtype buffer copied into y
        h_buf = None if same else buf(B, P)
        # the cell's own new h where it is not the step's result (zoneout blends it; projection)
        h_cell_buf = buf(B, P) if zoned else None
        if lstm:
            sig_if, g_, o_ = rows(G[..., :2 * H]), rows(G[..., 2 * H:3 * H]), rows(G[..., 3 * H:])
            i_, f_ = rows(G[..., :H]), rows(G[..., H:2 * H])
            c_buf, tc = buf(B, H), buf(B, H)
            h_raw = buf(B, H) if proj else None
            c = c_init
        elif gru:
            if bhh is None:
                bhh = torch.zeros(GH, dtype=wdt, device=dev)
            hg = buf(B, GH)
            hg_rz, hg_n = hg[:, :2 * H], hg[:, 2 * H:]
            x_rz, x_n = rows(xg[d, :, :, :2 * H]), rows(xg[d, :, :, 2 * H:])
            rz_, r_, z_ = rows(G[..., :2 * H]), rows(G[..., :H]), rows(G[..., H:2 * H])
            n_, hn_ = rows(G[..., 2 * H:3 * H]), rows(G[..., 3 * H:])
        h = h_init
        for t in (range(T - 1, -1, -1) if d == 1 else range(T)):
            if reset is not None and any_restart[t]:
                h = torch.where(restart[t], h_init, h)
                if lstm:
                    c = torch.where(restart[t], c_init, c, out=c_buf)
            if save:
                hps[t].copy_(h)
                if lstm:
                    css[t].copy_(c)
            out = ys[t] if same else h_buf
            cell_out = h_cell_buf if zoned else out
            if not gru:
                # the pre-activations x W_ih^T + b_ih + b_hh + h W_hh^T, in the step's gate storage
                p_ = pre[t]
                if bhh is not None:
                    torch.add(xs[t], bhh, out=p_)
                else:
                    p_.copy_(xs[t])
                p_.addmm_(h, whh_t)
            if lstm:
                sig_if[t].sigmoid_()
                g_[t].tanh_()
                o_[t].sigmoid_()
                c = torch.mul(f_[t], c, out=c_buf)
                c.addcmul_(i_[t], g_[t])
                torch.tanh(c, out=tc)
                if proj:
                    torch.mm(torch.mul(o_[t], tc, out=h_raw), whr_t, out=cell_out)
                else:
                    torch.mul(o_[t], tc, out=cell_out)
            elif gru:
                torch.addmm(bhh, h, whh_t, out=hg)
                rz = torch.add(x_rz[t], hg_rz, out=rz_[t])
                rz.sigmoid_()
                n = torch.mul(r_[t], hg_n, out=n_[t])
                n.add_(x_n[t])
                n.tanh_()
                if save:
                    hn_[t].copy_(hg_n)
                torch.lerp(n, h, z_[t], out=cell_out)  # (1 - z) n + z h, as torch's GRU cell
            else:
                p_.tanh_() if mode == "RNN_TANH" else p_.relu_()
                cell_out.copy_(p_)
            if zoneout is not None:
                torch.where(zs[t], h, cell_out, out=out)
            elif blend:
                torch.lerp(cell_out, h, zoneout_p, out=out)  # p h + (1 - p) h~ in one op
            if not same:
                ys[t].copy_(out)
            h = out
        hn[d].copy_(h)
        if lstm:
            cn[d].copy_(c)
    return y, hn, cn, hp, gates, cs


def _forward_gathered(mode, xg, w_hh, b_hh, w_hr, h0, c0, lengths, save, zoneout, zoneout_p, reset):
    """scan_forward with lengths: each row's time index is gathered per step."""
    D, T, B, GH = xg.shape
    P = w_hh.shape[2]
    H = GH // GATES[mode]
    dt, wdt = xg.dtype, work_dtype(xg.dtype)
    lstm = mode == "LSTM"
    steps = _Steps(lengths, T, B, xg.device)
    y = xg.new_empty(T, B, D * P)
    hn = xg.new_empty(D, B, P)
    cn = xg.new_empty(D, B, H) if lstm else xg.new_empty(0)
    W, C = saved_widths(mode, H)
    if save:
        hp = torch.empty(D, T, B, P, dtype=wdt, device=xg.device)
        gates = torch.empty(D, T, B, W, dtype=wdt, device=xg.device)
        cs = torch.empty(D, T, B, C, dtype=wdt, device=xg.device)
    else:
        hp, gates, cs = (xg.new_empty(0, dtype=wdt) for _ in range(3))
    zoned = zoneout is not None or zoneout_p > 0
    for d in range(D):
        h_init = h0[d].to(wdt)
        c_init = c0[d].to(wdt) if lstm else None
        h, c = h_init, c_init
        whh_t = w_hh[d].to(wdt).T
        bhh = b_hh[d].to(wdt) if b_hh is not None else torch.zeros(GH, dtype=wdt, device=xg.device)
        y_d = y[:, :, d * P:(d + 1) * P]
        # LSTM / RNN add both biases to the same pre-activation: fold b_hh into the input side once,
        # so that each step is one addmm (per-step op count is what a small layer's time is)
        x_d = (xg[d].to(wdt) + bhh).unsqueeze(0) if mode != "GRU" else xg
        for s in range(T):
            idx, alive = steps.at(s, d == 1)
            if reset is not None:
                restart = _restart(reset, d, idx, alive)
                h = torch.where(restart, h_init, h)
                if lstm:
                    c = torch.where(restart, c_init, c)
            if lstm:
                pre = torch.addmm(_get(x_d, 0, idx), h, whh_t)
                i, f, _, o = torch.sigmoid(pre).chunk(4, dim=-1)
                g = torch.tanh(pre[:, 2 * H:3 * H])
                c_new = torch.addcmul(f * c, i, g)
                h_new = o * torch.tanh(c_new)
                if w_hr is not None:
                    h_new = h_new @ w_hr[d].to(wdt).T
                saved = (i, f, g, o)
            elif mode == "GRU":
                x_r, x_z, x_n = _get(xg, d, idx).to(wdt).chunk(3, dim=-1)
                h_r, h_z, h_n = torch.addmm(bhh, h, whh_t).chunk(3, dim=-1)
                r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
                n = torch.tanh(x_n + r * h_n)
                h_new = (1 - z) * n + z * h
                saved = (r, z, n, h_n)
            else:
                pre = torch.addmm(_get(x_d, 0, idx), h, whh_t)
                h_new = torch.tanh(pre) if mode == "RNN_TANH" else torch.relu(pre)
                saved = (h_new,)
            if save:
                _put(hp, d, idx, h)
                _put(gates, d, idx, torch.cat(saved, dim=-1) if len(saved) > 1 else saved[0])
                if lstm:
                    _put(cs, d, idx, c)
            if zoneout is not None:
                h_new = torch.where(_get(zoneout, d, idx), h, h_new)
            elif zoned:
                h_new = zoneout_p * h + (1 - zoneout_p) * h_new
            if alive is None:
                y_d[idx] = h_new.to(dt)
            else:
                _put(y_d.unsqueeze(0), 0, idx, torch.where(alive, h_new, 0).to(dt))
            h = _where(alive, h_new, h)
            if lstm:
                c = _where(alive, c_new, c)
        hn[d] = h.to(dt)
        if lstm:
            cn[d] = c.to(dt)
    return y, hn, cn, hp, gates, cs


def scan_backward(mode, dy, dhn, dcn, w_hh, w_hr, lengths, hp, gates, cs, zoneout=None, zoneout_p=0.0,
                  reset=None):
    """Reverse loop. Returns dxg (grad of xg), dgh (grad of the hidden-side pre-activations
    h W_hh^T + b_hh; the same tensor as dxg except for GRU), dh0, dc0 and, with a projection,
    dhp (D, T, B, P): the gradient reaching the projected state at each time (for dW_hr).

    Zoneout splits the gradient of h_t: (1 - z) of it enters the cell, z of it goes straight to
    h_{t-1}. At a reset the gradient of the state entering the step belongs to h0/c0 (collected
    in dh0/dc0 over every reset step), and nothing reaches the step before."""
    if lengths is None:
        with torch.no_grad():
            return _backward_dense(mode, dy, dhn, dcn, w_hh, w_hr, hp, gates, cs, zoneout, zoneout_p, reset)
    return _backward_gathered(mode, dy, dhn, dcn, w_hh, w_hr, lengths, hp, gates, cs, zoneout, zoneout_p,
                              reset)


def _backward_dense(mode, dy, dhn, dcn, w_hh, w_hr, hp, gates, cs, zoneout, zoneout_p, reset):
    """scan_backward without lengths, built as _forward_dense: per-step views made once, results
    written straight into dxg / dgh (or a work-dtype buffer copied there), state gradients in
    reused buffers. The same formulas as _backward_gathered, grouped into fewer ops: the sigmoid
    derivative s (1 - s) of all four LSTM gates in one pass, the products by dc_t of three gates
    in one broadcast multiply."""
    D, T, B, P = hp.shape
    GH = w_hh.shape[1]
    H = GH // GATES[mode]
    dt, wdt = dy.dtype, hp.dtype
    dev = dy.device
    lstm, gru = mode == "LSTM", mode == "GRU"
    same = dt == wdt
    dxg = torch.empty(D, T, B, GH, dtype=dt, device=dev)
    dgh = torch.empty_like(dxg) if gru else dxg
    proj = w_hr is not None
    dhp = torch.empty(D, T, B, P, dtype=dt, device=dev) if proj else None
    dh0 = dy.new_empty(D, B, P)
    dc0 = dy.new_empty(D, B, H) if lstm else dy.new_empty(0)
    one = torch.ones((), dtype=wdt, device=dev)

    def buf(*shape):
        return torch.empty(*shape, dtype=wdt, device=dev)

    for d in range(D):
        whh = w_hh[d].to(wdt)
        whr = w_hr[d].to(wdt) if proj else None
        dh = dhn[d].to(wdt)
        dc = dcn[d].to(wdt) if lstm else None
        dys = dy[:, :, d * P:(d + 1) * P].unbind(0)
        hps = hp[d].unbind(0)
        G = gates[d]
        gs = G.unbind(0)
        dX = dxg[d] if same else buf(1, B, GH).expand(T, B, GH)  # a work buffer: the same view each step
        dxs = dX.unbind(0)
        if not same:
            dx_out = dxg[d].unbind(0)
        if proj:
            dhps = dhp[d].unbind(0)
            dh_raw = buf(B, H)
        if zoneout is not None:
            zs = zoneout[d].unbind(0)
        if reset is not None:
            restart = reset[d].unsqueeze(-1).unbind(0)
            any_restart = reset[d].any(-1).tolist()
            dh_reset = torch.zeros(B, P, dtype=wdt, device=dev)
            dc_reset = torch.zeros(B, H, dtype=wdt, device=dev) if lstm else None
        dh_t, dh_b = buf(B, P), buf(B, P)
        if lstm:
            i_, f_, g_, o_ = (G[..., k * H:(k + 1) * H].unbind(0) for k in range(4))
            css = cs[d].unbind(0)
            dI, dF, dG, dO = (dX[..., k * H:(k + 1) * H].unbind(0) for k in range(4))
            dIFG = dX[..., :3 * H].unflatten(-1, (3, H)).unbind(0)
            tc, dc_t, dc_b = buf(B, H), buf(B, H), buf(B, H)
            dc_t3 = dc_t.unsqueeze(1)
        elif gru:
            r_, z_, n_, hl_ = (G[..., k * H:(k + 1) * H].unbind(0) for k in range(4))
            dR, dZ, dN = (dX[..., k * H:(k + 1) * H].unbind(0) for k in range(3))
            dRZ = dX[..., :2 * H].unbind(0)
            dHid = dgh[d] if same else buf(1, B, GH).expand(T, B, GH)
            dhs = dHid.unbind(0)
            dhRZ, dhN = dHid[..., :2 * H].unbind(0), dHid[..., 2 * H:].unbind(0)
            if not same:
                dh_out = dgh[d].unbind(0)
            omz = buf(B, H)
        for t in (range(T) if d == 1 else range(T - 1, -1, -1)):
            torch.add(dh, dys[t], out=dh_t)
            dh_cell, dh_direct = zoneout_split(dh_t, zs[t] if zoneout is not None else None, zoneout_p)
            h_prev = hps[t]
            dx = dxs[t]
            if lstm:
                i, f, g, o, c_prev = i_[t], f_[t], g_[t], o_[t], css[t]
                torch.mul(f, c_prev, out=tc).addcmul_(i, g).tanh_()  # tanh(c_t), as the forward
                if proj:
                    dhps[t].copy_(dh_cell)
                    torch.mm(dh_cell, whr, out=dh_raw)
                    dhr = dh_raw
                else:
                    dhr = dh_cell
                torch.addcmul(one, tc, tc, value=-1, out=dc_t).mul_(o).mul_(dhr).add_(dc)
                torch.neg(gs[t], out=dx).add_(1).mul_(gs[t])  # s (1 - s); the g slot is replaced:
                torch.addcmul(one, g, g, value=-1, out=dG[t])  # 1 - g^2
                dI[t].mul_(g)
                dF[t].mul_(c_prev)
                dG[t].mul_(i)
                dO[t].mul_(tc).mul_(dhr)
                dIFG[t].mul_(dc_t3)
                dh_prev = torch.mm(dx, whh, out=dh_b)
                dc_prev = torch.mul(dc_t, f, out=dc_b)
            elif gru:
                r, z, n, hl = r_[t], z_[t], n_[t], hl_[t]
                torch.neg(z, out=omz).add_(1)
                dn = torch.addcmul(one, n, n, value=-1, out=dN[t]).mul_(dh_cell).mul_(omz)
                torch.sub(h_prev, n, out=dZ[t]).mul_(dh_cell).mul_(z).mul_(omz)
                torch.neg(r, out=dR[t]).add_(1).mul_(r).mul_(hl).mul_(dn)
                dhRZ[t].copy_(dRZ[t])
                torch.mul(dn, r, out=dhN[t])
                dh_prev = torch.mul(dh_cell, z, out=dh_b).addmm_(dhs[t], whh)
            else:
                hc = gs[t]
                if mode == "RNN_TANH":
                    torch.addcmul(one, hc, hc, value=-1, out=dx).mul_(dh_cell)
                else:
                    torch.mul(dh_cell, hc > 0, out=dx)
                dh_prev = torch.mm(dx, whh, out=dh_b)
            if dh_direct is not None:
                dh_prev.add_(dh_direct)
            if reset is not None and any_restart[t]:
                divert_restart(restart[t], dh_prev, dc_prev if lstm else None, dh_reset, dc_reset)
            if not same:
                dx_out[t].copy_(dx)
                if gru:
                    dh_out[t].copy_(dhs[t])
            dh = dh_prev
            if lstm:
                dc = dc_prev
        dh0[d].copy_(dh if reset is None else dh + dh_reset)
        if lstm:
            dc0[d].copy_(dc if reset is None else dc + dc_reset)
    return dxg, dgh, dh0, dc0, dhp


def _backward_gathered(mode, dy, dhn, dcn, w_hh, w_hr, lengths, hp, gates, cs, zoneout, zoneout_p, reset):
    """scan_backward with lengths: each row's time index is gathered per step."""
    D, T, B, P = hp.shape
    GH = w_hh.shape[1]
    H = GH // GATES[mode]
    dt, wdt = dy.dtype, hp.dtype
    lstm = mode == "LSTM"
    steps = _Steps(lengths, T, B, dy.device)
    dxg = torch.empty(D, T, B, GH, dtype=dt, device=dy.device)
    if lengths is not None:
        dxg.zero_()  # padded positions are never visited by a live step
    dgh = torch.zeros_like(dxg) if mode == "GRU" else dxg
    dhp = torch.zeros(D, T, B, P, dtype=dt, device=dy.device) if w_hr is not None else None
    dh0 = dy.new_empty(D, B, P)
    dc0 = dy.new_empty(D, B, H) if lstm else dy.new_empty(0)
    for d in range(D):
        whh = w_hh[d].to(wdt)
        dh = dhn[d].to(wdt)
        dc = dcn[d].to(wdt) if lstm else None
        dh_reset = torch.zeros_like(dh) if reset is not None else None
        dc_reset = torch.zeros_like(dc) if reset is not None and lstm else None
        for s in reversed(range(T)):
            idx, alive = steps.at(s, d == 1)
            dy_t = _get(dy.unsqueeze(0), 0, idx)[:, d * P:(d + 1) * P].to(wdt)
            dh_t = dh + (dy_t if alive is None else torch.where(alive, dy_t, 0))
            dh_cell, dh_direct = zoneout_split(dh_t, _get(zoneout, d, idx) if zoneout is not None else None,
                                               zoneout_p)
            saved = _get(gates, d, idx)
            h_prev = _get(hp, d, idx)
            if lstm:
                i, f, g, o = saved.chunk(4, dim=-1)
                c_prev = _get(cs, d, idx)
                tc = torch.tanh(f * c_prev + i * g)
                if w_hr is not None:
                    _put(dhp, d, idx, _where(alive, dh_cell, 0).to(dt))
                    dh_raw = dh_cell @ w_hr[d].to(wdt)
                else:
                    dh_raw = dh_cell
                dc_t = dc + dh_raw * o * (1 - tc * tc)
                d_pre = torch.cat([dc_t * g * i * (1 - i),
                                   dc_t * c_prev * f * (1 - f),
                                   dc_t * i * (1 - g * g),
                                   dh_raw * tc * o * (1 - o)], dim=-1)
                d_pre = _where(alive, d_pre, 0)
                d_hid = d_pre
                dh_prev = d_pre @ whh
                dc_prev = dc_t * f
            elif mode == "GRU":
                r, z, n, h_lin = saved.chunk(4, dim=-1)
                dn_pre = dh_cell * (1 - z) * (1 - n * n)
                dz_pre = dh_cell * (h_prev - n) * z * (1 - z)
                dr_pre = dn_pre * h_lin * r * (1 - r)
                d_pre = _where(alive, torch.cat([dr_pre, dz_pre, dn_pre], dim=-1), 0)
                d_hid = _where(alive, torch.cat([dr_pre, dz_pre, dn_pre * r], dim=-1), 0)
                dh_prev = torch.addmm(dh_cell * z, d_hid, whh)
            else:
                h_cur = saved
                act_grad = (1 - h_cur * h_cur) if mode == "RNN_TANH" else (h_cur > 0).to(wdt)
                d_pre = _where(alive, dh_cell * act_grad, 0)
                d_hid = d_pre
                dh_prev = d_pre @ whh
            if dh_direct is not None:
                dh_prev = dh_prev + dh_direct
            if reset is not None:
                divert_restart(_restart(reset, d, idx, alive), dh_prev, dc_prev if lstm else None, dh_reset,
                               dc_reset)
            _put(dxg, d, idx, d_pre.to(dt))
            if mode == "GRU":
                _put(dgh, d, idx, d_hid.to(dt))
            dh = _where(alive, dh_prev, dh_t)
            if lstm:
                dc = _where(alive, dc_prev, dc)
        dh0[d] = (dh if dh_reset is None else dh + dh_reset).to(dt)
        if lstm:
            dc0[d] = (dc if dc_reset is None else dc + dc_reset).to(dt)
    return dxg, dgh, dh0, dc0, dhp
