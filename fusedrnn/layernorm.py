"""LayerNorm LSTM and GRU (Ba et al. 2016, in the formulation haste uses): layers, cells, the
readable reference, the PyTorch scan with a hand-written backward, and the custom ops.

Equations (gate order and plain parameters as torch.nn; LN(v; γ, β) = γ·(v − mean v)/sqrt(var v +
1e-5) + β over the last dimension, biased variance, as torch.nn.functional.layer_norm):

    LSTM   gates = LN(W_ih x; γ_ih) + LN(W_hh h; γ_hh) + b_ih + b_hh        (4H: i, f, g, o)
           i, f, o = σ(·), g = tanh(·)
           c' = f·c + i·g                                                  (carried un-normalized)
           h' = o·tanh(LN(c'; γ_c, β_c))
    GRU    x_r, x_z, x_n = LN(W_ih x; γ_ih) + b_ih                          (3H: r, z, n)
           h_r, h_z, h_n = LN(W_hh h; γ_hh) + b_hh
           r = σ(x_r + h_r), z = σ(x_z + h_z), n = tanh(x_n + r·h_n)
           h' = (1 − z)·n + z·h

The LSTM's two biases are one shared bias (only their sum matters); both are kept so that an
nn.LSTM's state_dict loads unchanged. The LayerNorm gains/biases are extra parameters:
``ln_ih_weight_l{k}`` (γ_ih, G·H), ``ln_hh_weight_l{k}`` (γ_hh, G·H), and for the LSTM
``ln_c_weight_l{k}`` (γ_c, H), ``ln_c_bias_l{k}`` (β_c, H), ``_reverse`` for the second direction
(cells: the same names without the layer suffix). Gains start at 1, LN biases at 0, the plain
weights as torch.nn (uniform(−1/√H, 1/√H)).

Variants (issue 12), with the plain layers' semantics and checks (fusedrnn/modules.py's docstring;
the helpers of fusedrnn.functional): ``zoneout=p`` (LSTM: h only; training: a Bernoulli(p) mask per
(t, b, unit), every layer's drawn before the first layer runs; eval: p·h_prev + (1 − p)·h_new),
``weight_drop=p`` (one DropConnect mask per W_hh per call, training only; every route) and
``forward(..., reset=mask)`` ((T, B), (B, T) with batch_first; the row restarts from h0/c0 before
the step, no gradient across; the reverse direction restarts at each episode's last step). Cells:
zoneout and reset (B,) (zeroes those rows' state) around the cell op, on every backend. Layers: zoneout and
reset run on every route (the reference, the PyTorch scan, and the Triton LayerNorm kernels, which
carry them as constexpr ZONEOUT / RESET paths like the plain kernels).

Where each piece runs:
    reference    ln_cell_step / ln_rnn (fusedrnn.reference's loop with this cell), autograd backward
                 (the oracle; run in float64 by the tests)
    "loop"       scan_forward / scan_backward below: the scan contract in PyTorch, hand-written
                 backward; the CPU default (backend "auto" / "torch" on CPU) and what torch.compile
                 runs on CPU
    "stepwise" / "persistent"   fusedrnn.kernels.layernorm (Triton), the same contract

The scan contract (both implementations), shapes as in docs/design.md plus:
    xg     (D, T, B, GH)  LN(x W_ih^T; γ_ih) + b (LSTM: b_ih + b_hh; GRU: b_ih), work dtype
    g_h    (D, GH)  γ_hh      b_h (D, GH) GRU's b_hh or None      g_c, b_c (D, H) LSTM's γ_c, β_c
    workspace (when save; work dtype, indexed by time like the plain contract):
    hp     (D, T, B, H)   h entering the step
    hw     (D, T, B, GH)  h W_hh^T before its LayerNorm
    stats  (D, T, B, S)   mean and rstd of that LayerNorm; LSTM also of LN(c') (S = 4, else 2)
    gates  (D, T, B, 4H)  LSTM i, f, g, o; GRU r, z, n, h_n (= LN(W_hn h) γ + b_hn)
    cs     (D, T, B, C)   LSTM c entering the step (C = H), else C = 0
scan_forward(mode, xg, w_hh, g_h, b_h, g_c, b_c, h0, c0, lengths, save[, zoneout, zoneout_p, reset])
    -> y, hn, cn, hp, hw, stats, gates, cs
scan_backward(mode, dy, dhn, dcn, w_hh, g_h, b_h, g_c, b_c, lengths, hp, hw, stats, gates, cs[, zoneout,
              zoneout_p, reset])
    -> dxg (D, T, B, GH), dhw (D, T, B, GH) (grad of h W_hh^T, before LN), dh0, dc0,
       dg_h (D, R, GH), db_h (D, R, GH) (GRU, else empty), dg_c (D, R, H), db_c (D, R, H) (LSTM,
       else empty): partial sums over time (and over groups of rows: R is any size, the caller
       sums dimension 1).
"""
from __future__ import annotations

import importlib
import logging
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import reference
from .dispatch import kernels as _triton_package
from .dispatch import resolve
from .errors import BackendUnavailableError
from .functional import cell_zoneout, drop_weight, from_padded, to_padded, zoneout_mask
from .loop import divert_restart, zoneout_split
from .modules import (_FusedRNNBase, _Backend, _autocast_on, _cast_weights, _cell_states, _compute_dtype,
                      _layer_states, _no_autocast, _pack_output, _prepare_input, _sequence_shape,
                      _unpack_cell_input, _unpack_input)
from .spec import BACKENDS, GATES, KERNEL_CHOICES, LOOP_KERNEL, check_choice, work_dtype

log = logging.getLogger("fusedrnn")

EPS = 1e-5
LN_MODES = ("LSTM", "GRU")


# =============================================================================== the reference
def ln_lstm_cell(x, h, c, w_ih, w_hh, b_ih, b_hh, g_ih, g_hh, g_c, b_c, eps=EPS):
    """One LayerNorm LSTM step. x (B, I), h (B, H), c (B, H) -> (h', c')."""
    GH = w_hh.shape[0]
    gates = (F.layer_norm(F.linear(x, w_ih), (GH,), g_ih, None, eps)
             + F.layer_norm(F.linear(h, w_hh), (GH,), g_hh, None, eps))
    if b_ih is not None:
        gates = gates + b_ih + b_hh
    i, f, g, o = gates.chunk(4, dim=-1)
    i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
    c_new = f * c + i * g
    h_new = o * torch.tanh(F.layer_norm(c_new, (c.shape[-1],), g_c, b_c, eps))
    return h_new, c_new


def ln_gru_cell(x, h, w_ih, w_hh, b_ih, b_hh, g_ih, g_hh, eps=EPS):
    """One LayerNorm GRU step (r multiplies the normalized h_n, as torch.nn.GRU's r multiplies
    W_hn h + b_hn). x (B, I), h (B, H) -> h'."""
    GH = w_hh.shape[0]
    x_r, x_z, x_n = F.layer_norm(F.linear(x, w_ih), (GH,), g_ih, b_ih, eps).chunk(3, dim=-1)
    h_r, h_z, h_n = F.layer_norm(F.linear(h, w_hh), (GH,), g_hh, b_hh, eps).chunk(3, dim=-1)
    r = torch.sigmoid(x_r + h_r)
    z = torch.sigmoid(x_z + h_z)
    n = torch.tanh(x_n + r * h_n)
    return (1 - z) * n + z * h


def ln_cell_step(mode, x, state, weights):
    """One step. state (h,) or (h, c); weights (w_ih, w_hh, b_ih, b_hh, g_ih, g_hh, g_c, b_c)."""
    w_ih, w_hh, b_ih, b_hh, g_ih, g_hh, g_c, b_c = weights
    if mode == "LSTM":
        return ln_lstm_cell(x, state[0], state[1], w_ih, w_hh, b_ih, b_hh, g_ih, g_hh, g_c, b_c)
    return (ln_gru_cell(x, state[0], w_ih, w_hh, b_ih, b_hh, g_ih, g_hh),)


def ln_rnn(mode, x, hx, layer_weights, num_layers, bidirectional, lengths=None, dropout=0.0, training=False,
           zoneout=None, reset=None):
    """The whole stack, time-major: x (T, B, I), hx (h0,) or (h0, c0) of (L*D, B, H), layer_weights
    one 8-tuple per (layer, direction). zoneout: None or per layer None, the eval p or a (D, T, B, H)
    mask; reset: None or the user's (T, B) mask. The plain reference's stack and length / variant
    semantics (fusedrnn.reference.rnn) with the LayerNorm cell. Returns y (T, B, D*H) and the
    tuple of final states."""
    y, finals = reference.rnn(mode, x, hx, layer_weights, num_layers, bidirectional, lengths, dropout,
                              training, zoneout=zoneout, reset=reset, step=ln_cell_step)
    return y, (finals if isinstance(finals, tuple) else (finals,))


# ====================================================== the scan in PyTorch (hand-written backward)
_ln_bwd = torch.ops.aten.native_layer_norm_backward.default


def stats_width(mode):
    return 4 if mode == "LSTM" else 2


def _to_steps(lengths, T, reverse):
    """How a direction's steps map to time: None (step s is time s), "flip" (time T-1-s for every
    row) or a (T, B) index that reverses each row within its length (its own inverse: dead rows
    map to themselves)."""
    if not reverse:
        return None
    return "flip" if lengths is None else reference.reverse_index(lengths, T)


def _reorder(a, order):
    """a (T, B, ...) between time order and step order (the map is an involution)."""
    if order is None:
        return a
    if isinstance(order, str):
        return a.flip(0)
    return a.gather(0, order.view(*order.shape, *([1] * (a.dim() - 2))).expand_as(a))


def _variant_steps(zoneout, reset, alive, d, order, T):
    """Per step of direction d (step order): the zoneout keep masks (B, H) and the restart masks
    (B, 1) (live rows only), each None when absent."""
    zs = None if zoneout is None else _reorder(zoneout[d], order).unbind(0)
    rs = None
    if reset is not None:
        r = _reorder(reset[d], order).unsqueeze(-1)
        rs = (r if alive is None else r & alive).unbind(0)
    return zs, rs


def scan_forward(mode, xg, w_hh, g_h, b_h, g_c, b_c, h0, c0, lengths, save, zoneout=None, zoneout_p=0.0,
                 reset=None):
    """Without lengths: _forward_dense. With lengths the step loop works in step order: per
    direction, the inputs are reordered once (reverse direction), the per-step results are kept
    in lists and stacked (and reordered) once at the end: no indexing inside the loop. Variants
    as fusedrnn/loop.py: zoneout (D, T, B, H) bool keep-mask or None, zoneout_p the eval blend
    weight, reset (D, T, B) bool (per direction, indexed by time); hp / cs hold the state
    actually entering the step (h0 / c0 at a restart)."""
    if lengths is None:
        with torch.no_grad():
            return _forward_dense(mode, xg, w_hh, g_h, b_h, g_c, b_c, h0, c0, save, zoneout, zoneout_p, reset)
    D, T, B, GH = xg.shape
    H = w_hh.shape[2]
    lstm = mode == "LSTM"
    dt, dev = h0.dtype, xg.device
    wdt = work_dtype(dt)
    alive = None if lengths is None else (torch.arange(T, device=dev)[:, None] < lengths[None, :]).unsqueeze(-1)
    ys, hns, cns, ws = [], [], [], []
    for d in range(D):
        order = _to_steps(lengths, T, d == 1)
        xs = _reorder(xg[d], order).to(wdt).unbind(0)
        h = h_init = h0[d].to(wdt)
        c = c_init = c0[d].to(wdt) if lstm else None
        zs, rs = _variant_steps(zoneout, reset, alive, d, order, T)
        w_t = w_hh[d].to(wdt).t()
        gh = g_h[d].to(wdt)
        bh = b_h[d].to(wdt) if b_h is not None else None
        gc, bc = (g_c[d].to(wdt), b_c[d].to(wdt)) if lstm else (None, None)
        y_s, hp_s, hw_s, st_s, sv_s, cs_s = [], [], [], [], [], []
        for s in range(T):
            xt = xs[s]
            if rs is not None:
                h = torch.where(rs[s], h_init, h)
                if lstm:
                    c = torch.where(rs[s], c_init, c)
            hw_t = h @ w_t
            hh, mu_h, r_h = torch.native_layer_norm(hw_t, (GH,), gh, bh, EPS)
            if lstm:
                pre = xt + hh
                sv = torch.sigmoid(pre)
                sv[:, 2 * H:3 * H] = torch.tanh(pre[:, 2 * H:3 * H])
                i, f, g, o = sv.chunk(4, dim=-1)
                c_new = torch.addcmul(f * c, i, g)
                cnorm, mu_c, r_c = torch.native_layer_norm(c_new, (H,), gc, bc, EPS)
                h_new = o * torch.tanh(cnorm)
                stats = (mu_h, r_h, mu_c, r_c)
            else:
                rz = torch.sigmoid(xt[:, :2 * H] + hh[:, :2 * H])
                r, z = rz[:, :H], rz[:, H:]
                hh_n = hh[:, 2 * H:]
                n = torch.tanh(torch.addcmul(xt[:, 2 * H:], r, hh_n))
                h_new = torch.addcmul(n, z, h - n)
                sv = torch.cat([rz, n, hh_n], dim=-1)
                stats = (mu_h, r_h)
            if save:
                hp_s.append(h)
                hw_s.append(hw_t)
                st_s.append(torch.cat(stats, dim=-1))
                sv_s.append(sv)
                if lstm:
                    cs_s.append(c)
            if zs is not None:
                h_new = torch.where(zs[s], h, h_new)
            elif zoneout_p > 0:
                h_new = zoneout_p * h + (1 - zoneout_p) * h_new
            if alive is None:
                y_s.append(h_new)
                h = h_new
                if lstm:
                    c = c_new
            else:
                a = alive[s]
                y_s.append(torch.where(a, h_new, 0))
                h = torch.where(a, h_new, h)
                if lstm:
                    c = torch.where(a, c_new, c)
        ys.append(_reorder(torch.stack(y_s), order).to(dt))
        hns.append(h.to(dt))
        if lstm:
            cns.append(c.to(dt))
        if save:
            ws.append([_reorder(torch.stack(v), order) for v in (hp_s, hw_s, st_s, sv_s)]
                      + [_reorder(torch.stack(cs_s), order) if lstm else xg.new_empty(T, B, 0, dtype=wdt)])
    y = torch.cat(ys, dim=-1)
    hn = torch.stack(hns)
    cn = torch.stack(cns) if lstm else h0.new_empty(0)
    if save:
        hp, hw, stats, gates, cs = (torch.stack([w[k] for w in ws]) for k in range(5))
    else:
        hp, hw, stats, gates, cs = (h0.new_empty(0, dtype=wdt) for _ in range(5))
    return y, hn, cn, hp, hw, stats, gates, cs


def scan_backward(mode, dy, dhn, dcn, w_hh, g_h, b_h, g_c, b_c, lengths, hp, hw, stats, gates, cs, zoneout=None,
                  zoneout_p=0.0, reset=None):
    """Without lengths: _backward_dense. With lengths, the reverse step loop in step order (see
    scan_forward). LN(c)'s statistics are recomputed by
    one fused native_layer_norm per step (they equal the saved ones up to rounding). Zoneout
    splits the gradient of h_t between the cell (1 - z) and h_{t-1} (z); at a restart the gradient
    of the state entering the step goes to dh0 / dc0 and nothing reaches the step before."""
    if lengths is None:
        with torch.no_grad():
            return _backward_dense(mode, dy, dhn, dcn, w_hh, g_h, b_h, g_c, b_c, hp, hw, stats, gates, cs, zoneout,
                                   zoneout_p, reset)
    D, T, B, H = hp.shape
    GH = w_hh.shape[1]
    lstm = mode == "LSTM"
    wdt, dev = hp.dtype, hp.device
    alive = None if lengths is None else (torch.arange(T, device=dev)[:, None] < lengths[None, :]).unsqueeze(-1)
    dxgs, dhws, dh0s, dc0s = [], [], [], []
    dg_h = torch.zeros(D, 1, GH, dtype=wdt, device=dev)
    db_h = torch.zeros(D, 1, GH, dtype=wdt, device=dev) if not lstm and b_h is not None else hp.new_empty(0)
    dg_c = torch.zeros(D, 1, H, dtype=wdt, device=dev) if lstm else hp.new_empty(0)
    db_c = torch.zeros(D, 1, H, dtype=wdt, device=dev) if lstm else hp.new_empty(0)
    for d in range(D):
        order = _to_steps(lengths, T, d == 1)
        whh = w_hh[d].to(wdt)
        gh = g_h[d].to(wdt)
        bh = b_h[d].to(wdt) if b_h is not None and not lstm else None
        gc, bc = (g_c[d].to(wdt), b_c[d].to(wdt)) if lstm else (None, None)
        dys = _reorder(dy[:, :, d * H:(d + 1) * H], order).to(wdt)
        if alive is not None:
            dys = torch.where(alive, dys, 0)
        dys = dys.unbind(0)
        hw_s = _reorder(hw[d], order).unbind(0)
        st = _reorder(stats[d], order)
        mu_s, r_s = st[..., 0:1].contiguous().unbind(0), st[..., 1:2].contiguous().unbind(0)
        sv_s = _reorder(gates[d], order).unbind(0)
        other_s = _reorder(cs[d] if lstm else hp[d], order).unbind(0)
        dh = dhn[d].to(wdt)
        dc = dcn[d].to(wdt) if lstm else None
        zs, rs = _variant_steps(zoneout, reset, alive, d, order, T)
        dh_reset = torch.zeros_like(dh) if rs is not None else None
        dc_reset = torch.zeros_like(dc) if rs is not None and lstm else None
        dxg_s, dhw_s = [None] * T, [None] * T
        for s in reversed(range(T)):
            a = None if alive is None else alive[s]
            dh_t = dh + dys[s]
            dhl = dh_t if a is None else torch.where(a, dh_t, 0)
            dhl, dh_direct = zoneout_split(dhl, zs[s] if zs is not None else None, zoneout_p)
            sv = sv_s[s]
            if lstm:
                i, f, g, o = sv.chunk(4, dim=-1)
                c_prev = other_s[s]
                c_new = torch.addcmul(f * c_prev, i, g)
                cnorm, mu_c, r_c = torch.native_layer_norm(c_new, (H,), gc, bc, EPS)
                tc = torch.tanh(cnorm)
                dcnorm = dhl * o * (1 - tc * tc)
                dcnew, dgc, dbc = _ln_bwd(dcnorm, c_new, (H,), mu_c, r_c, gc, bc, [True, True, True])
                dg_c[d, 0] += dgc
                db_c[d, 0] += dbc
                dc_t = dc + dcnew
                # activation derivatives of i, f, g, o in one tensor, then the four products
                dact = sv * (1 - sv)
                dact[:, 2 * H:3 * H] = 1 - g * g
                dpre = torch.cat([dc_t * g, dc_t * c_prev, dc_t * i, dhl * tc], dim=-1) * dact
                if a is not None:
                    dpre = torch.where(a, dpre, 0)
                dhh = dpre
            else:
                r, z, n, hh_n = sv.chunk(4, dim=-1)
                h_prev = other_s[s]
                dn = dhl * (1 - z) * (1 - n * n)
                dz = dhl * (h_prev - n) * z * (1 - z)
                dr = dn * hh_n * r * (1 - r)
                dpre = torch.cat([dr, dz, dn], dim=-1)
                dhh = torch.cat([dr, dz, dn * r], dim=-1)
            dxg_s[s] = dpre
            dhw_t, dgh, dbh = _ln_bwd(dhh, hw_s[s], (GH,), mu_s[s], r_s[s], gh, bh, [True, True, bh is not None])
            dhw_s[s] = dhw_t
            dg_h[d, 0] += dgh
            if bh is not None:
                db_h[d, 0] += dbh
            dh_prev = dhw_t @ whh
            if not lstm:
                dh_prev = torch.addcmul(dh_prev, dhl, z)
            if dh_direct is not None:
                dh_prev = dh_prev + dh_direct
            dc_prev = dc_t * f if lstm else None
            if rs is not None:
                divert_restart(rs[s], dh_prev, dc_prev, dh_reset, dc_reset)
            if a is None:
                dh = dh_prev
                if lstm:
                    dc = dc_prev
            else:
                dh = torch.where(a, dh_prev, dh_t)
                if lstm:
                    dc = torch.where(a, dc_prev, dc)
        dxgs.append(_reorder(torch.stack(dxg_s), order))
        dhws.append(_reorder(torch.stack(dhw_s), order))
        dh0s.append(dh if dh_reset is None else dh + dh_reset)
        if lstm:
            dc0s.append(dc if dc_reset is None else dc + dc_reset)
    return (torch.stack(dxgs), torch.stack(dhws), torch.stack(dh0s), torch.stack(dc0s) if lstm else hp.new_empty(0),
            dg_h, db_h, dg_c, db_c)


def _forward_dense(mode, xg, w_hh, g_h, b_h, g_c, b_c, h0, c0, save, zoneout, zoneout_p, reset):
    """scan_forward without lengths, built as fusedrnn/loop.py's dense forward: per-direction views
    made once, the reverse direction walks time backwards (no reordered copies), every per-step
    result written straight into preallocated storage (the saved workspace in training, y, hn, cn)
    instead of lists stacked at the end, the state reset only at steps where some row restarts.
    The same ops as the gathered path, so the same rounding."""
    D, T, B, GH = xg.shape
    H = w_hh.shape[2]
    lstm = mode == "LSTM"
    dt, dev = h0.dtype, xg.device
    wdt = work_dtype(dt)
    y = torch.empty(T, B, D * H, dtype=dt, device=dev)
    hn = torch.empty(D, B, H, dtype=dt, device=dev)
    cn = torch.empty(D, B, H, dtype=dt, device=dev) if lstm else h0.new_empty(0)
    if save:
        hp = torch.empty(D, T, B, H, dtype=wdt, device=dev)
        hw = torch.empty(D, T, B, GH, dtype=wdt, device=dev)
        stats = torch.empty(D, T, B, stats_width(mode), dtype=wdt, device=dev)
        gates = torch.empty(D, T, B, 4 * H, dtype=wdt, device=dev)
        cs = torch.empty(D, T, B, H if lstm else 0, dtype=wdt, device=dev)
    else:
        hp, hw, stats, gates, cs = (h0.new_empty(0, dtype=wdt) for _ in range(5))
        # inference: one reused buffer per kind (the same view every step)
        hw_b = torch.empty(B, GH, dtype=wdt, device=dev)
        sv_b = torch.empty(B, 4 * H, dtype=wdt, device=dev)
    for d in range(D):
        steps = range(T - 1, -1, -1) if d == 1 else range(T)
        xs = xg[d].to(wdt).unbind(0)
        h = h_init = h0[d].to(wdt)
        c = c_init = c0[d].to(wdt) if lstm else None
        w_t = w_hh[d].to(wdt).t()
        gh = g_h[d].to(wdt)
        bh = b_h[d].to(wdt) if b_h is not None else None
        gc, bc = (g_c[d].to(wdt), b_c[d].to(wdt)) if lstm else (None, None)
        ys = y[:, :, d * H:(d + 1) * H].unbind(0)
        if save:
            hps, hws, sts, svs = hp[d].unbind(0), hw[d].unbind(0), stats[d].unbind(0), gates[d].unbind(0)
            css = cs[d].unbind(0) if lstm else None
        zs = zoneout[d].unbind(0) if zoneout is not None else None
        if reset is not None:
            restart = reset[d].unsqueeze(-1).unbind(0)
            any_restart = reset[d].any(-1).tolist()
        for t in steps:
            xt = xs[t]
            if reset is not None and any_restart[t]:
                h = torch.where(restart[t], h_init, h)
                if lstm:
                    c = torch.where(restart[t], c_init, c)
            if save:
                hps[t].copy_(h)
                if lstm:
                    css[t].copy_(c)
                hw_t, sv = hws[t], svs[t]
            else:
                hw_t, sv = hw_b, sv_b
            torch.mm(h, w_t, out=hw_t)
            hh, mu_h, r_h = torch.native_layer_norm(hw_t, (GH,), gh, bh, EPS)
            if lstm:
                torch.add(xt, hh, out=sv)
                sv[:, :2 * H].sigmoid_()
                sv[:, 2 * H:3 * H].tanh_()
                sv[:, 3 * H:].sigmoid_()
                i, f, g, o = sv.chunk(4, dim=-1)
                c_new = torch.mul(f, c).addcmul_(i, g)
                cnorm, mu_c, r_c = torch.native_layer_norm(c_new, (H,), gc, bc, EPS)
                h_new = cnorm.tanh_().mul_(o)
                if save:
                    torch.cat((mu_h, r_h, mu_c, r_c), dim=-1, out=sts[t])
            else:
                rz = torch.add(xt[:, :2 * H], hh[:, :2 * H], out=sv[:, :2 * H]).sigmoid_()
                r, z = rz[:, :H], rz[:, H:]
                hh_n = hh[:, 2 * H:]
                n = torch.addcmul(xt[:, 2 * H:], r, hh_n, out=sv[:, 2 * H:3 * H]).tanh_()
                h_new = torch.addcmul(n, z, h - n)
                if save:
                    sv[:, 3 * H:].copy_(hh_n)
                    torch.cat((mu_h, r_h), dim=-1, out=sts[t])
            if zs is not None:
                h_new = torch.where(zs[t], h, h_new)
            elif zoneout_p > 0:
                h_new = zoneout_p * h + (1 - zoneout_p) * h_new
            ys[t].copy_(h_new)
            h = h_new
            if lstm:
                c = c_new
        hn[d].copy_(h)
        if lstm:
            cn[d].copy_(c)
    return y, hn, cn, hp, hw, stats, gates, cs


def _backward_dense(mode, dy, dhn, dcn, w_hh, g_h, b_h, g_c, b_c, hp, hw, stats, gates, cs, zoneout, zoneout_p,
                    reset):
    """scan_backward without lengths, built as _forward_dense: views made once, the results
    written straight into dxg / dhw, the products of the LSTM gate derivatives in place in dxg's
    step slice (s - s^2 of the four gates in one op, the g slot replaced by 1 - g^2), the
    reset handled only at steps where some row restarts."""
    D, T, B, H = hp.shape
    GH = w_hh.shape[1]
    lstm = mode == "LSTM"
    wdt, dev = hp.dtype, hp.device
    dxg = torch.empty(D, T, B, GH, dtype=wdt, device=dev)
    dhw = torch.empty(D, T, B, GH, dtype=wdt, device=dev)
    dh0 = torch.empty(D, B, H, dtype=wdt, device=dev)
    dc0 = torch.empty(D, B, H, dtype=wdt, device=dev) if lstm else hp.new_empty(0)
    dg_h = torch.zeros(D, 1, GH, dtype=wdt, device=dev)
    db_h = torch.zeros(D, 1, GH, dtype=wdt, device=dev) if not lstm and b_h is not None else hp.new_empty(0)
    dg_c = torch.zeros(D, 1, H, dtype=wdt, device=dev) if lstm else hp.new_empty(0)
    db_c = torch.zeros(D, 1, H, dtype=wdt, device=dev) if lstm else hp.new_empty(0)
    one = torch.ones((), dtype=wdt, device=dev)
    for d in range(D):
        steps = range(T) if d == 1 else range(T - 1, -1, -1)
        whh = w_hh[d].to(wdt)
        gh = g_h[d].to(wdt)
        bh = b_h[d].to(wdt) if b_h is not None and not lstm else None
        gc, bc = (g_c[d].to(wdt), b_c[d].to(wdt)) if lstm else (None, None)
        dys = dy[:, :, d * H:(d + 1) * H].unbind(0)
        hws, svs, dxs, dhws = hw[d].unbind(0), gates[d].unbind(0), dxg[d].unbind(0), dhw[d].unbind(0)
        st = stats[d]
        mus, rss = st[..., 0:1].contiguous().unbind(0), st[..., 1:2].contiguous().unbind(0)
        others = (cs[d] if lstm else hp[d]).unbind(0)
        dgh_d, dbh_d = dg_h[d, 0], (db_h[d, 0] if bh is not None else None)
        if lstm:
            dgc_d, dbc_d = dg_c[d, 0], db_c[d, 0]
            dIFG = dxg[d][..., :3 * H].unflatten(-1, (3, H)).unbind(0)
        else:
            dhh = torch.empty(B, GH, dtype=wdt, device=dev)
        dh = dhn[d].to(wdt)
        dc = dcn[d].to(wdt) if lstm else None
        zs = zoneout[d].unbind(0) if zoneout is not None else None
        if reset is not None:
            restart = reset[d].unsqueeze(-1).unbind(0)
            any_restart = reset[d].any(-1).tolist()
            dh_reset = torch.zeros_like(dh)
            dc_reset = torch.zeros_like(dc) if lstm else None
        for t in steps:
            dhl = dh + dys[t]
            dhl, dh_direct = zoneout_split(dhl, zs[t] if zs is not None else None, zoneout_p)
            sv, dx = svs[t], dxs[t]
            if lstm:
                i, f, g, o = sv.chunk(4, dim=-1)
                c_prev = others[t]
                c_new = torch.mul(f, c_prev).addcmul_(i, g)
                cnorm, mu_c, r_c = torch.native_layer_norm(c_new, (H,), gc, bc, EPS)
                tc = cnorm.tanh_()
                dcnorm = torch.addcmul(one, tc, tc, value=-1).mul_(o).mul_(dhl)
                dcnew, dgc, dbc = _ln_bwd(dcnorm, c_new, (H,), mu_c, r_c, gc, bc, [True, True, True])
                dgc_d += dgc
                dbc_d += dbc
                dc_t = dcnew.add_(dc)
                # s - s^2 of the four gates in one op (the g slot then replaced by 1 - g^2),
                # times (g, c_prev, i) dc_t and tc dh, in place in dxg's step slice
                torch.addcmul(sv, sv, sv, value=-1, out=dx)
                torch.addcmul(one, g, g, value=-1, out=dx[:, 2 * H:3 * H])
                dx[:, :H].mul_(g)
                dx[:, H:2 * H].mul_(c_prev)
                dx[:, 2 * H:3 * H].mul_(i)
                dx[:, 3 * H:].mul_(tc).mul_(dhl)
                dIFG[t].mul_(dc_t.unsqueeze(1))
                dhh = dx
            else:
                r, z, n, hh_n = sv.chunk(4, dim=-1)
                h_prev = others[t]
                dn = torch.addcmul(one, n, n, value=-1, out=dx[:, 2 * H:]).mul_(dhl).mul_(1 - z)
                torch.sub(h_prev, n, out=dx[:, H:2 * H]).mul_(dhl).mul_(z).mul_(1 - z)
                torch.mul(dn, hh_n, out=dx[:, :H]).mul_(r).mul_(1 - r)
                dhh[:, :2 * H].copy_(dx[:, :2 * H])
                torch.mul(dn, r, out=dhh[:, 2 * H:])
            dhw_t, dgh, dbh = _ln_bwd(dhh, hws[t], (GH,), mus[t], rss[t], gh, bh, [True, True, bh is not None])
            dhws[t].copy_(dhw_t)
            dgh_d += dgh
            if bh is not None:
                dbh_d += dbh
            dh_prev = torch.mm(dhw_t, whh)
            if not lstm:
                dh_prev.addcmul_(dhl, z)
            if dh_direct is not None:
                dh_prev += dh_direct
            dc_prev = dc_t * f if lstm else None
            if reset is not None and any_restart[t]:
                divert_restart(restart[t], dh_prev, dc_prev, dh_reset, dc_reset)
            dh = dh_prev
            if lstm:
                dc = dc_prev
        dh0[d].copy_(dh if reset is None else dh + dh_reset)
        if lstm:
            dc0[d].copy_(dc if reset is None else dc + dc_reset)
    return dxg, dhw, dh0, dc0, dg_h, db_h, dg_c, db_c

# ================================================================================ the custom ops
_KERNELS = []


def triton_kernels():
    """fusedrnn.kernels.layernorm (imported on first use, like fusedrnn.kernels)."""
    if not _KERNELS:
        _triton_package()  # raises BackendUnavailableError with the reason when Triton cannot load
        _KERNELS.append(importlib.import_module("fusedrnn.kernels.layernorm"))
    return _KERNELS[0]


def choose_kernel(route, kernel, mode, D, B, H, dtype, device, zoneout=False, reset=False):
    """The scan implementation of one layer: "loop" on the loop route; on the triton route
    "persistent" when fusedrnn.kernels.layernorm.ln_plan holds the layer on this device with the
    variants it runs with (zoneout, reset: their tiles count), else "stepwise"; an explicit
    kernel wins ("persistent" that cannot be planned raises). Under torch.compile the op
    resolves "auto" itself from the concrete sizes."""
    if route == "loop":
        return LOOP_KERNEL
    if kernel == "stepwise":
        return kernel
    if torch.compiler.is_compiling():
        return kernel
    if triton_kernels().ln_plan(mode, D, B, H, dtype, device, zoneout=zoneout, reset=reset) is not None:
        return "persistent"
    if kernel == "persistent":
        variants = "".join(f", {n}" for n, on in (("zoneout", zoneout), ("reset", reset)) if on)
        raise BackendUnavailableError(
            f"kernel='persistent' cannot hold this LayerNorm layer (mode={mode}, directions={D}, "
            f"batch={B}, hidden={H}, dtype={dtype}{variants}) on {device}; use kernel='stepwise'")
    return "stepwise"


def _variant_kwargs(zoneout, zoneout_p, reset):
    """The variant arguments of the scan (none when every variant is off)."""
    if zoneout is None and not zoneout_p and reset is None:
        return {}
    return {"zoneout": zoneout, "zoneout_p": zoneout_p, "reset": reset}


def _scan(kernel, allow_tf32, mode, x, w_hh, variants=None):
    if kernel == LOOP_KERNEL:
        return scan_forward, scan_backward, dict(variants or {})
    if kernel == "auto":
        D, GH, H = w_hh.shape
        v = variants or {}
        kernel = choose_kernel("triton", "auto", mode, D, x.shape[1], H, x.dtype, x.device,
                               zoneout=v.get("zoneout") is not None or (v.get("zoneout_p") or 0.0) > 0,
                               reset=v.get("reset") is not None)
    k = triton_kernels()
    return k.ln_scan_forward, k.ln_scan_backward, {"kernel": kernel, "allow_tf32": allow_tf32, **(variants or {})}


def _input_side(x, w_ih):
    """x W_ih^T for every direction: (D, T*B, GH) in the work dtype. One mm per direction (a bmm
    over an expanded x and transposed weights took 5-10x longer on CPU)."""
    T, B, I = x.shape
    x2 = x.reshape(T * B, I)
    return _stack([x2 @ w_ih[d].t() for d in range(w_ih.shape[0])]).to(work_dtype(x.dtype))


def _vec(t, d, wdt):
    return None if t is None else t[d].to(wdt)


@torch.library.custom_op("fusedrnn::ln_layer", mutates_args=())
def ln_layer(x: Tensor, w_ih: Tensor, w_hh: Tensor, b_x: Optional[Tensor], b_h: Optional[Tensor],
             g_x: Tensor, g_h: Tensor, g_c: Optional[Tensor], b_c: Optional[Tensor], h0: Tensor,
             c0: Optional[Tensor], lengths: Optional[Tensor], mode: str, kernel: str, save: bool,
             allow_tf32: bool, zoneout: Optional[Tensor] = None, zoneout_p: float = 0.0,
             reset: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One LayerNorm layer, all directions: y, hn, cn and the workspace hp, hw, stats, gates, cs.
    The input side (x W_ih^T, its LayerNorm, the bias b_x) is one batched matmul and one fused
    LayerNorm over all steps; the scan does the rest. Variants: zoneout (D, T, B, H) bool keep-mask
    (training) or None, zoneout_p the eval blend weight, reset (D, T, B) bool per direction."""
    forward, _, kw = _scan(kernel, allow_tf32, mode, x, w_hh, _variant_kwargs(zoneout, zoneout_p, reset))
    T, B, _ = x.shape
    D, GH, _ = w_ih.shape
    wdt = work_dtype(x.dtype)
    xw = _input_side(x, w_ih)
    xg = _stack([F.layer_norm(xw[d], (GH,), g_x[d].to(wdt), _vec(b_x, d, wdt), EPS) for d in range(D)])
    return tuple(forward(mode, xg.view(D, T, B, GH), w_hh.contiguous(), g_h.contiguous(),
                         None if b_h is None else b_h.contiguous(), g_c, b_c, h0.contiguous(),
                         None if c0 is None else c0.contiguous(), lengths, save, **kw))


@ln_layer.register_fake
def _ln_layer_fake(x, w_ih, w_hh, b_x, b_h, g_x, g_h, g_c, b_c, h0, c0, lengths, mode, kernel, save,
                   allow_tf32, zoneout=None, zoneout_p=0.0, reset=None):
    T, B, _ = x.shape
    D, GH, H = w_hh.shape
    wdt = work_dtype(x.dtype)
    lstm = mode == "LSTM"
    y, hn = x.new_empty(T, B, D * H), x.new_empty(D, B, H)
    cn = x.new_empty(D, B, H) if lstm else x.new_empty(0)
    if not save:
        return (y, hn, cn) + tuple(x.new_empty(0, dtype=wdt) for _ in range(5))
    return (y, hn, cn, x.new_empty(D, T, B, H, dtype=wdt), x.new_empty(D, T, B, GH, dtype=wdt),
            x.new_empty(D, T, B, stats_width(mode), dtype=wdt), x.new_empty(D, T, B, 4 * H, dtype=wdt),
            x.new_empty(D, T, B, H if lstm else 0, dtype=wdt))


@torch.library.custom_op("fusedrnn::ln_layer_backward", mutates_args=())
def ln_layer_backward(dy: Tensor, dhn: Tensor, dcn: Optional[Tensor], x: Tensor, w_ih: Tensor, w_hh: Tensor,
                      b_x: Optional[Tensor], b_h: Optional[Tensor], g_x: Tensor, g_h: Tensor,
                      g_c: Optional[Tensor], b_c: Optional[Tensor], lengths: Optional[Tensor], hp: Tensor,
                      hw: Tensor, stats: Tensor, gates: Tensor, cs: Tensor, mode: str, kernel: str,
                      allow_tf32: bool, zoneout: Optional[Tensor] = None, zoneout_p: float = 0.0,
                      reset: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                                               Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of ln_layer: dx, dw_ih, dw_hh, db_x, db_h, dg_x, dg_h, dg_c, db_c, dh0, dc0
    (empty tensors for absent inputs). The input side's LayerNorm is recomputed from x W_ih^T
    (one batched matmul) rather than saved."""
    _, backward, kw = _scan(kernel, allow_tf32, mode, x, w_hh, _variant_kwargs(zoneout, zoneout_p, reset))
    lstm = mode == "LSTM"
    dxg, dhw, dh0, dc0, dg_h, db_h, dg_c, db_c = backward(
        mode, dy.contiguous(), dhn.contiguous(), None if dcn is None else dcn.contiguous(), w_hh.contiguous(),
        g_h.contiguous(), None if b_h is None else b_h.contiguous(), g_c, b_c, lengths, hp, hw, stats, gates,
        cs, **kw)
    T, B, I = x.shape
    D, GH, H = w_hh.shape
    dt, wdt = x.dtype, hp.dtype
    xw = _input_side(x, w_ih)
    dxw, dgx, dbx = [], [], []
    for d in range(D):
        g, b = g_x[d].to(wdt), _vec(b_x, d, wdt)
        _, mean, rstd = torch.native_layer_norm(xw[d], (GH,), g, b, EPS)
        dx_d, dg_d, db_d = _ln_bwd(dxg[d].reshape(T * B, GH), xw[d], (GH,), mean, rstd, g, b,
                                   [True, True, b is not None])
        dxw.append(dx_d.to(dt))
        dgx.append(dg_d)
        dbx.append(db_d)
    dxw = _stack(dxw)
    empty = lambda: x.new_empty(0)  # noqa: E731 (a fresh one each: op outputs may not alias)
    x2 = x.reshape(T * B, I)
    dx = sum(dxw[d] @ w_ih[d] for d in range(D)).view(T, B, I)
    dw_ih = _stack([dxw[d].t() @ x2 for d in range(D)])
    dhw, hp = dhw.to(dt), hp.to(dt)
    dw_hh = _stack([dhw[d].reshape(T * B, GH).t() @ hp[d].reshape(T * B, H) for d in range(D)])
    return (dx, dw_ih, dw_hh,
            torch.stack(dbx).to(dt) if b_x is not None else empty(),
            db_h.sum(1).to(dt) if b_h is not None else empty(),
            torch.stack(dgx).to(dt), dg_h.sum(1).to(dt),
            dg_c.sum(1).to(dt) if lstm else empty(), db_c.sum(1).to(dt) if lstm else empty(),
            dh0.to(dt), dc0.to(dt) if lstm else empty())


@ln_layer_backward.register_fake
def _ln_layer_backward_fake(dy, dhn, dcn, x, w_ih, w_hh, b_x, b_h, g_x, g_h, g_c, b_c, lengths, hp, hw,
                            stats, gates, cs, mode, kernel, allow_tf32, zoneout=None, zoneout_p=0.0, reset=None):
    D, GH, H = w_hh.shape
    B = x.shape[1]
    lstm = mode == "LSTM"
    e = lambda: x.new_empty(0)  # noqa: E731
    return (x.new_empty(x.shape), x.new_empty(w_ih.shape), x.new_empty(w_hh.shape),
            x.new_empty(D, GH) if b_x is not None else e(), x.new_empty(D, GH) if b_h is not None else e(),
            x.new_empty(D, GH), x.new_empty(D, GH), x.new_empty(D, H) if lstm else e(),
            x.new_empty(D, H) if lstm else e(), x.new_empty(D, B, H), x.new_empty(D, B, H) if lstm else e())


def _setup_context(ctx, inputs, output):
    (x, w_ih, w_hh, b_x, b_h, g_x, g_h, g_c, b_c, h0, c0, lengths, mode, kernel, save, allow_tf32,
     zoneout, zoneout_p, reset) = inputs
    _, _, _, hp, hw, stats, gates, cs = output
    ctx.save_for_backward(x, w_ih, w_hh, b_x, b_h, g_x, g_h, g_c, b_c, h0, c0, lengths, hp, hw, stats, gates, cs,
                          zoneout, reset)
    ctx.config = (mode, kernel, save, allow_tf32, zoneout_p)
    ctx.mark_non_differentiable(hp, hw, stats, gates, cs)


def _backward(ctx, dy, dhn, dcn, *_workspace):
    mode, kernel, save, allow_tf32, zoneout_p = ctx.config
    if not save:
        raise RuntimeError("fusedrnn: this LayerNorm layer ran without saving activations for backward "
                           "(save=False); run it with gradients enabled to differentiate it")
    (x, w_ih, w_hh, b_x, b_h, g_x, g_h, g_c, b_c, h0, c0, lengths, hp, hw, stats, gates, cs, zoneout,
     reset) = ctx.saved_tensors
    lstm = mode == "LSTM"
    if dy is None:
        dy = x.new_zeros(x.shape[0], x.shape[1], w_hh.shape[0] * w_hh.shape[2])
    if dhn is None:
        dhn = torch.zeros_like(h0)
    if lstm and dcn is None:
        dcn = torch.zeros_like(c0)
    if not lstm:
        dcn = None
    (dx, dw_ih, dw_hh, db_x, db_h, dg_x, dg_h, dg_c, db_c, dh0, dc0) = torch.ops.fusedrnn.ln_layer_backward(
        dy, dhn, dcn, x, w_ih, w_hh, b_x, b_h, g_x, g_h, g_c, b_c, lengths, hp, hw, stats, gates, cs, mode,
        kernel, allow_tf32, zoneout, zoneout_p, reset)
    return (dx, dw_ih, dw_hh, db_x if b_x is not None else None, db_h if b_h is not None else None, dg_x, dg_h,
            dg_c if lstm else None, db_c if lstm else None, dh0, dc0 if lstm else None,
            None, None, None, None, None, None, None, None)


torch.library.register_autograd("fusedrnn::ln_layer", _backward, setup_context=_setup_context)


# ========================================================================= the stack of layers
def _stack(ts):
    if ts[0] is None:
        return None
    return ts[0].unsqueeze(0) if len(ts) == 1 else torch.stack(ts)


def run_ln_layers(mode, x, lengths, hx, weights, *, num_layers, bidirectional, dropout, training, route,
                  kernel="auto", last_kernels=None, zoneout=0.0, reset=None):
    """The stack on `route`: "reference", "loop" (PyTorch scan) or "triton". x (T, B, I) padded,
    time-major; weights one 8-tuple per (layer, direction). zoneout: the probability p (training:
    every layer's (D, T, B, H) mask drawn here before the first layer runs, as
    fusedrnn.functional.run_layers, so every route consumes the random stream alike; eval: the
    expectation); reset: None or the (T, B) bool mask, time-major. Returns y (T, B, D*H), final
    states."""
    D = 2 if bidirectional else 1
    T, B = x.shape[0], x.shape[1]
    zoneouts = [None] * num_layers
    if zoneout > 0:
        zoneouts = ([zoneout_mask(zoneout, (D, T, B, hx[0].shape[-1]), x.device) for _ in range(num_layers)]
                    if training else [zoneout] * num_layers)
    if route == "reference":
        return ln_rnn(mode, x, hx, weights, num_layers, bidirectional, lengths, dropout, training,
                      zoneout=zoneouts if zoneout > 0 else None, reset=reset)
    resets = None
    if reset is not None:
        resets = torch.stack([reference.reset_for_direction(reset, lengths, d == 1) for d in range(D)])
    lstm = mode == "LSTM"
    allow_tf32 = bool(torch.backends.cuda.matmul.allow_tf32)
    finals = [[] for _ in hx]
    layer_in = x
    for layer in range(num_layers):
        ws = weights[layer * D:(layer + 1) * D]
        w_ih, w_hh, b_ih, b_hh, g_x, g_h, g_c, b_c = (_stack([w[i] for w in ws]) for i in range(8))
        if lstm:
            b_x, b_h = (b_ih + b_hh if b_ih is not None else None), None
        else:
            b_x, b_h = b_ih, b_hh
        h0 = hx[0][layer * D:(layer + 1) * D]
        c0 = hx[1][layer * D:(layer + 1) * D] if lstm else None
        save = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (layer_in, w_ih, w_hh, b_x, b_h, g_x, g_h, g_c, b_c, h0, c0))
        chosen = choose_kernel(route, kernel, mode, D, layer_in.shape[1], w_hh.shape[2], layer_in.dtype,
                               layer_in.device, zoneout=zoneout > 0, reset=resets is not None)
        if last_kernels is not None:
            last_kernels.append(chosen)
        if not torch.compiler.is_compiling():
            log.debug("fusedrnn: LayerNorm %s layer %d runs kernel %s", mode, layer, chosen)
        args = (layer_in, w_ih, w_hh, b_x, b_h, g_x, g_h, g_c, b_c, h0, c0, lengths, mode, chosen, save, allow_tf32)
        if zoneout > 0 or resets is not None:
            z = zoneouts[layer]
            args += (z, 0.0, resets) if isinstance(z, Tensor) else (None, z or 0.0, resets)
        y, hn, cn, *_ = torch.ops.fusedrnn.ln_layer(*args)
        finals[0].append(hn)
        if lstm:
            finals[1].append(cn)
        layer_in = y
        if dropout > 0 and training and layer < num_layers - 1:
            layer_in = F.dropout(layer_in, dropout, training=True)
    return layer_in, tuple(torch.cat(f) for f in finals)


def _route(backend, device):
    """"reference", "triton" or "loop" (the PyTorch scan: what "auto" and "torch" mean on CPU, and
    under torch.compile / vmap / tracing). There is no torch.nn op to fall back on."""
    route = resolve(backend, device, False)
    return "loop" if route in ("torch", "loop") else route


def _reject_proj_size(cls, proj_size):
    if proj_size != 0:
        raise ValueError(f"{cls}: proj_size is not supported (LayerNorm layers have no projection), got "
                         f"proj_size={proj_size!r}")


def _ln_param_shapes(mode, H):
    G = GATES[mode]
    shapes = [("ln_ih_weight", G * H, 1.0), ("ln_hh_weight", G * H, 1.0)]
    if mode == "LSTM":
        shapes += [("ln_c_weight", H, 1.0), ("ln_c_bias", H, 0.0)]
    return shapes


# ======================================================================================= layers
class _LayerNormRNNBase(_FusedRNNBase):
    """Shared by LayerNormLSTM and LayerNormGRU: torch.nn.RNNBase's parameters (torch.nn's names,
    shapes, gate order and initialization) plus the LayerNorm gains/biases."""

    def __init__(self, mode, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, proj_size=0, device=None, dtype=None, *,
                 backend="auto", kernel="auto", zoneout=0.0, weight_drop=0.0):
        _reject_proj_size(type(self).__name__, proj_size)
        super().__init__(mode, input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, 0, device, dtype, backend=backend, kernel=kernel)
        # layer=False: backend="torch" is the PyTorch scan here, which runs zoneout and reset
        self._init_variants(zoneout, weight_drop, layer=False)
        factory = {"device": device, "dtype": dtype}
        D = 2 if bidirectional else 1
        names = []
        for layer in range(num_layers):
            for d in range(D):
                sfx = f"_l{layer}" + ("_reverse" if d == 1 else "")
                for base, n, _ in _ln_param_shapes(mode, hidden_size):
                    setattr(self, base + sfx, nn.Parameter(torch.empty(n, **factory)))
                    names.append(base + sfx)
        self._ln_names = names
        self._reset_ln()

    def _reset_ln(self):
        with torch.no_grad():
            for name in getattr(self, "_ln_names", ()):
                value = 0.0 if "_bias" in name else 1.0
                getattr(self, name).fill_(value)

    def reset_parameters(self):
        """torch.nn's initialization of the plain weights; LayerNorm gains 1, LN biases 0."""
        super().reset_parameters()
        self._reset_ln()

    def __prepare_scriptable__(self):
        raise RuntimeError(f"fusedrnn: torch.jit.script cannot script {type(self).__name__}: there is no "
                           "torch.nn module with LayerNorm inside the recurrence to stand in for it")

    def _tune(self, *args, **kwargs):
        return None

    def _layer_weights(self, dtype):
        D = 2 if self.bidirectional else 1
        out = []
        for layer in range(self.num_layers):
            for d in range(D):
                sfx = f"_l{layer}" + ("_reverse" if d == 1 else "")
                get = lambda n: getattr(self, n + sfx)  # noqa: E731
                w = [get("weight_ih"), get("weight_hh"), get("bias_ih") if self.bias else None,
                     get("bias_hh") if self.bias else None, get("ln_ih_weight"), get("ln_hh_weight")]
                w += [get("ln_c_weight"), get("ln_c_bias")] if self.mode == "LSTM" else [None, None]
                out.append(tuple(_cast_weights(w, dtype)))
        return out

    def forward(self, input, hx=None, *, reset=None):
        name = type(self).__name__
        D = 2 if self.bidirectional else 1
        H = self.hidden_size
        lstm = self.mode == "LSTM"
        weight_dtype = self.weight_ih_l0.dtype
        x, batch_sizes, sorted_indices, unsorted_indices, is_batched = _unpack_input(name, input,
                                                                                     self.batch_first)
        packed = batch_sizes is not None
        route = _route(self.backend, x.device)
        dtype = _compute_dtype(x, hx, weight_dtype, self.mode) if _autocast_on(x) else weight_dtype
        x = _prepare_input(x, dtype, weight_dtype, self.input_size)
        T, B = _sequence_shape(name, x, batch_sizes, sorted_indices, self.batch_first)
        shapes = [(self.num_layers * D, B, H)] * (2 if lstm else 1)
        states = _layer_states(name, hx, x, dtype, shapes, is_batched, sorted_indices)
        if reset is not None:
            reset = self._reset_mask(reset, T, B, packed, is_batched, x.device, sorted_indices)
        weights = self._layer_weights(dtype)
        if self.weight_drop > 0 and self.training:
            # one DropConnect mask per W_hh per call (in the order of drop_recurrent_weights)
            weights = [(w[0], drop_weight(w[1], self.weight_drop)) + tuple(w[2:]) for w in weights]
        with _no_autocast(x):
            x, lengths, rows = to_padded(x, batch_sizes, B, T, self.batch_first)
            kernels = []
            run = "reference" if not packed and B == 0 else route
            y, finals = run_ln_layers(self.mode, x, lengths, tuple(states), weights, num_layers=self.num_layers,
                                      bidirectional=self.bidirectional, dropout=self.dropout,
                                      training=self.training, route=run, kernel=self.kernel, last_kernels=kernels,
                                      zoneout=self.zoneout, reset=reset)
            y = from_padded(y, rows, self.batch_first)
        self._record(route, kernels)
        return _pack_output(y, finals, batch_sizes, sorted_indices, unsorted_indices, is_batched,
                            self.batch_first, lstm)


_LAYER_DOC = """

    Arguments as torch.nn.{base} (input_size, hidden_size, num_layers, bias, batch_first, dropout
    between layers, bidirectional, device, dtype; proj_size only 0), plus ``backend`` ("auto",
    "torch" = the PyTorch scan, "reference", "triton") and ``kernel`` ("auto", "stepwise",
    "persistent"), and the variants ``zoneout`` and ``weight_drop`` (probabilities in [0, 1),
    default 0). Forward as torch.nn.{base}: batched or unbatched input, optional initial
    state{state}, PackedSequence (sorted or not), plus the keyword ``reset`` ((T, B) bool, (B, T)
    with batch_first): the row restarts from its initial state before that step. zoneout and reset
    run on every route, the Triton kernels included (module docstring).

    Parameters per layer k (``_reverse`` suffix for the second direction), G = {G}:
        weight_ih_l{{k}} (G·H, I)   weight_hh_l{{k}} (G·H, H)   bias_ih_l{{k}}, bias_hh_l{{k}} (G·H)
            torch.nn's names, shapes, gate order ({order}) and init U(−1/√H, 1/√H)
        ln_ih_weight_l{{k}} (G·H) = γ_ih, ln_hh_weight_l{{k}} (G·H) = γ_hh    init 1{extra}
    An nn.{base}'s weights load with ``load_state_dict(nn_{lower}.state_dict(), strict=False)``: the
    LayerNorm parameters are then the missing keys and keep their init (gains 1, biases 0).
    """


class LayerNormLSTM(_LayerNormRNNBase):
    """LSTM with LayerNorm inside the recurrence (Ba et al. 2016, haste's formulation):

        gates = LN(W_ih x; γ_ih) + LN(W_hh h; γ_hh) + b_ih + b_hh     (i, f, g, o; gain-only LNs)
        c' = σ(f)·c + σ(i)·tanh(g)                                     (c carried un-normalized)
        h' = σ(o)·tanh(LN(c'; γ_c, β_c))

    LN over the last dimension with eps 1e-5 and biased variance. b_ih + b_hh is one shared bias
    (kept as two parameters so that nn.LSTM's weights load unchanged)."""
    __doc__ += _LAYER_DOC.format(base="LSTM", lower="lstm", G=4, order="i, f, g, o", state=" (h_0, c_0)",
                                 extra="; ln_c_weight_l{k} (H) = γ_c init 1, ln_c_bias_l{k} (H) = β_c init 0")

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, proj_size=0, device=None, dtype=None, *, backend="auto", kernel="auto",
                 zoneout=0.0, weight_drop=0.0):
        super().__init__("LSTM", input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         proj_size, device, dtype, backend=backend, kernel=kernel, zoneout=zoneout,
                         weight_drop=weight_drop)


class LayerNormGRU(_LayerNormRNNBase):
    """GRU with LayerNorm inside the recurrence (Ba et al. 2016, haste's formulation):

        x_r, x_z, x_n = LN(W_ih x; γ_ih) + b_ih        h_r, h_z, h_n = LN(W_hh h; γ_hh) + b_hh
        r = σ(x_r + h_r)   z = σ(x_z + h_z)   n = tanh(x_n + r·h_n)   h' = (1 − z)·n + z·h

    (r applied after the recurrent matmul, as in torch.nn.GRU; gain-only LNs, eps 1e-5)."""
    __doc__ += _LAYER_DOC.format(base="GRU", lower="gru", G=3, order="r, z, n", state=" h_0", extra="")

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, proj_size=0, device=None, dtype=None, *, backend="auto", kernel="auto",
                 zoneout=0.0, weight_drop=0.0):
        super().__init__("GRU", input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         proj_size, device, dtype, backend=backend, kernel=kernel, zoneout=zoneout,
                         weight_drop=weight_drop)


# ======================================================================================== cells
class _LayerNormCell(_Backend, nn.RNNCellBase):
    _mode = None

    def __init__(self, input_size, hidden_size, bias=True, device=None, dtype=None, *, backend="auto",
                 kernel="auto", zoneout=0.0, weight_drop=0.0):
        check_choice(backend, BACKENDS, "backend")
        check_choice(kernel, KERNEL_CHOICES, "kernel")
        for n, v in (("input_size", input_size), ("hidden_size", hidden_size)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{type(self).__name__}: {n} must be a positive int, got {v!r}")
        if not isinstance(bias, bool):
            raise TypeError(f"{type(self).__name__}: bias should be of type bool, got: {type(bias).__name__}")
        super().__init__(input_size, hidden_size, bias, num_chunks=GATES[self._mode], device=device, dtype=dtype)
        for base, n, _ in _ln_param_shapes(self._mode, hidden_size):
            setattr(self, base, nn.Parameter(torch.empty(n, device=device, dtype=dtype)))
        self._ln_names = [base for base, _, _ in _ln_param_shapes(self._mode, hidden_size)]
        self._reset_ln()
        self._init_backend(backend, kernel)
        self._init_variants(zoneout, weight_drop, layer=False)

    _reset_ln = _LayerNormRNNBase._reset_ln

    def reset_parameters(self):
        super().reset_parameters()
        self._reset_ln()

    def __prepare_scriptable__(self):
        raise RuntimeError(f"fusedrnn: torch.jit.script cannot script {type(self).__name__}")

    @property
    def _torch_name(self):
        return type(self).__name__

    def extra_repr(self):
        s = super().extra_repr() + self._variants_repr()
        return s if self.backend == "auto" else s + f", backend={self.backend!r}"

    def forward(self, input, hx=None, *, reset=None):
        name = type(self).__name__
        lstm = self._mode == "LSTM"
        x, is_batched = _unpack_cell_input(name, input)
        weight_dtype = self.weight_ih.dtype
        route = _route(self.backend, x.device)
        dtype = _compute_dtype(x, hx, weight_dtype, self._mode) if _autocast_on(x) else weight_dtype
        x = _prepare_input(x, dtype, weight_dtype, self.input_size)
        B = x.shape[0]
        states = _cell_states(name, hx, x, dtype, self.hidden_size, 2 if lstm else 1, is_batched, reset)
        w = [self.weight_ih, self.weight_hh, self.bias_ih if self.bias else None,
             self.bias_hh if self.bias else None, self.ln_ih_weight, self.ln_hh_weight]
        w += [self.ln_c_weight, self.ln_c_bias] if lstm else [None, None]
        w = tuple(_cast_weights(w, dtype))
        if self.weight_drop > 0 and self.training:
            w = (w[0], drop_weight(w[1], self.weight_drop)) + w[2:]
        kernels = []
        with _no_autocast(x):
            if route == "reference" or B == 0:
                out = ln_cell_step(self._mode, x, tuple(states), w)
            else:
                out = run_ln_layers(self._mode, x.unsqueeze(0), None, tuple(s.unsqueeze(0) for s in states), [w],
                                    num_layers=1, bidirectional=False, dropout=0.0, training=self.training,
                                    route=route, kernel=self.kernel, last_kernels=kernels)[1]
                out = tuple(o.squeeze(0) for o in out)
            if self.zoneout > 0:  # around the cell op, on every backend
                out = cell_zoneout(self.zoneout, self.training, states[0], out)
        self._record(route, kernels)
        if not is_batched:
            out = tuple(o.squeeze(0) for o in out)
        return out if lstm else out[0]


_CELL_DOC = """

    Arguments: input_size, hidden_size, bias, device, dtype as torch.nn.{base}, plus ``backend`` and
    ``kernel`` as the layers, ``zoneout`` / ``weight_drop`` (default 0). Forward as torch.nn.{base}:
    input (B, I) or (I,), state{state}, plus the keyword ``reset`` ((B,) bool, a scalar for
    unbatched input): those rows start from the zero state.
    Parameters: weight_ih (G·H, I), weight_hh (G·H, H), bias_ih, bias_hh (G·H): torch.nn's names,
    gate order ({order}) and init; ln_ih_weight (G·H) = γ_ih, ln_hh_weight (G·H) = γ_hh init 1{extra}.
    """


class LayerNormLSTMCell(_LayerNormCell):
    """One LayerNorm LSTM step (equations of LayerNormLSTM)."""
    __doc__ += _CELL_DOC.format(base="LSTMCell", order="i, f, g, o", state=" (h, c)",
                                extra="; ln_c_weight (H) = γ_c init 1, ln_c_bias (H) = β_c init 0")
    _mode = "LSTM"


class LayerNormGRUCell(_LayerNormCell):
    """One LayerNorm GRU step (equations of LayerNormGRU)."""
    __doc__ += _CELL_DOC.format(base="GRUCell", order="r, z, n", state=" h", extra="")
    _mode = "GRU"


__all__ = ["LayerNormLSTM", "LayerNormGRU", "LayerNormLSTMCell", "LayerNormGRUCell", "ln_rnn", "ln_cell_step",
           "scan_forward", "scan_backward", "run_ln_layers"]
