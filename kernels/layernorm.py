"""LayerNorm LSTM / GRU scan (fusedrnn.layernorm's contract): kernels and launchers.

Shape legend:
    D directions (d = 1 runs backwards in time)  T steps  B batch  H hidden  G gates (LSTM 4, GRU 3)
    GH = G * H  S stats per (t, b): LSTM 4 (mean, rstd of the hidden LN, then of LN(c)), GRU 2
    xg (D, T, B, GH)  LN(x W_ih^T) γ_ih + b, work dtype      w_hh (D, GH, H)
    g_h (D, GH) γ_hh  b_h (D, GH) GRU's b_hh  g_c, b_c (D, H) LSTM's γ_c, β_c    h0, c0 (D, B, H)
    y (T, B, D*H)   hp (D, T, B, H)   hw (D, T, B, GH) h W_hh^T before LN   stats (D, T, B, S)
    gates (D, T, B, 4H) LSTM i, f, g, o / GRU r, z, n, h_n     cs (D, T, B, H) LSTM c entering
    hwbuf (D, B, GH)  this step's h W_hh^T (stepwise)     hst / cst (2, D, B, H) ping-pong state
    dhtot (D, B, H)   dh reaching the step's output (stepwise)
    dghbuf (2, D, B, GH) / carry (2, D, B, H) / dcst (2, D, B, H)   the backward's ping-pong
    dg_h, db_h (D, B, GH) / dg_c, db_c (D, B, H)   per-row sums over time of the LN parameters'
                                                   gradients (each row owned by one program)
    zm (D, T, B, H) bool zoneout's training mask / zp (1,) its eval p    reset (D, T, B) bool
    dh0acc / dc0acc (D, B, H)   zeroed: the gradients of the states restarted from h0 / c0
Tiles are [units, batch]: BLOCK_H >= H covers every unit of a row (the LayerNorms reduce over all
G*H gate pre-activations, and over the H cell values), BLOCK_B rows per program.

Stepwise: per step one launch for h W_hh^T (ln_hw_kernel: M = GH weight rows x batch tiles, K = H
chunks; into hwbuf, float32) then one over batch tiles holding whole rows (ln_fwd_kernel: both
LayerNorms, gates, cell update, workspace). Backward: ln_dh_kernel (dh = carry + dhw_{s+1} W_hh +
dy, kernels/common.py: bwd_dh_carry) then ln_bwd_kernel (LN(c), gate and hidden-LN gradients).
Persistent: ln_fwd_kernel / ln_bwd_kernel with PERSISTENT, one program per (direction, batch
tile) keeping all of W_hh in registers and the whole time loop inside: rows are independent, so
programs never exchange anything (a CTA barrier between steps, no grid barrier).

Variants (fusedrnn/layernorm.py's scan_forward / scan_backward define them; the flags and device
functions are the plain kernels', kernels/scan.py and kernels/common.py): ZONEOUT (2 mask, 1 eval
p) blends h (not the LSTM's c) with h_prev after the cell and splits dh between the cell and the
carry; RESET takes h0 / c0 as the state entering a restarted step (ln_hw_kernel's dot operand too;
hp / cs save it) and diverts the gradient reaching it into dh0acc / dc0acc, added to dh0 / dc0 at
the end (stepwise: ln_dh_kernel owns dh0acc, ln_bwd_kernel dc0acc).

State, statistics and workspace are float32 (float64 for float64 layers); half-precision inputs
are upcast before any arithmetic; the recurrent dots use kernels/common.py's mdot (two-pass for
float16 / bfloat16). No libdevice: tanh = 2 sigmoid(2x) - 1 (kernels/activations.py).
"""
import itertools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fusedrnn.spec import GATES, HALF_DTYPES, TRITON_KERNELS, check_choice, work_dtype

from .activations import sigmoid, tanh
from .common import (bwd_dh_carry, carry_dc, divert_restart, dot_gates, load_gate_weights, load_gates, mdot,
                     restart_rows, row_time, store_gates, unit_tile, wload, zoneout_weight)
from .gru import gru_bwd, gru_fwd
from .launch import Launch, check_float, check_tensor, new, resolve, run
from .plan import _clamp_block, _np2, device_limits, dot_precision, persistent_plan
from .scan import _variant_args, _variant_flags, _zoneout

LN_EPS = tl.constexpr(1e-5)
LN_MODES = ("LSTM", "GRU")


def _gates(args):
    return GATES[args["MODE"]]


def _given(name):
    return lambda args: args[name] is not None


# ----------------------------------------------------------------------------------------------
# Device functions
# ----------------------------------------------------------------------------------------------

@triton.jit
def row_moments(a0, a1, a2, a3, mask, N: tl.constexpr, n):
    """Mean and 1/sqrt(var + eps) over the units (axis 0) of the N gate tiles, per batch column:
    the LayerNorm statistics of rows of n = N * H values. Masked units do not count."""
    s = tl.sum(tl.where(mask, a0, 0.0), axis=0)
    if N > 1:
        s += tl.sum(tl.where(mask, a1, 0.0), axis=0)
        s += tl.sum(tl.where(mask, a2, 0.0), axis=0)
    if N > 3:
        s += tl.sum(tl.where(mask, a3, 0.0), axis=0)
    mean = s / n
    d = tl.where(mask, a0 - mean[None, :], 0.0)
    v = tl.sum(d * d, axis=0)
    if N > 1:
        d = tl.where(mask, a1 - mean[None, :], 0.0)
        v += tl.sum(d * d, axis=0)
        d = tl.where(mask, a2 - mean[None, :], 0.0)
        v += tl.sum(d * d, axis=0)
    if N > 3:
        d = tl.where(mask, a3 - mean[None, :], 0.0)
        v += tl.sum(d * d, axis=0)
    rstd = 1.0 / tl.sqrt(v / n + LN_EPS)
    return mean, rstd


@triton.jit
def ln_bwd_rows(d0, d1, d2, d3, x0, x1, x2, x3, rstd, mask, N: tl.constexpr, n):
    """LayerNorm backward over rows of n = N * H values: dx = rstd (d - mean(d) - x̂ mean(d x̂)),
    d the gradient of the normalized values times the gain, x̂ the normalized values."""
    m1 = tl.sum(tl.where(mask, d0, 0.0), axis=0)
    m2 = tl.sum(tl.where(mask, d0 * x0, 0.0), axis=0)
    if N > 1:
        m1 += tl.sum(tl.where(mask, d1, 0.0), axis=0) + tl.sum(tl.where(mask, d2, 0.0), axis=0)
        m2 += tl.sum(tl.where(mask, d1 * x1, 0.0), axis=0) + tl.sum(tl.where(mask, d2 * x2, 0.0), axis=0)
    if N > 3:
        m1 += tl.sum(tl.where(mask, d3, 0.0), axis=0)
        m2 += tl.sum(tl.where(mask, d3 * x3, 0.0), axis=0)
    m1 = (m1 / n)[None, :]
    m2 = (m2 / n)[None, :]
    r = rstd[None, :]
    return r * (d0 - m1 - x0 * m2), r * (d1 - m1 - x1 * m2), r * (d2 - m1 - x2 * m2), r * (d3 - m1 - x3 * m2)


@triton.jit
def accumulate(p, mask, first, v):
    """p += v (p = v when first): per-row sums over time, each element owned by one program."""
    if first:
        tl.store(p, v, mask=mask)
    else:
        tl.store(p, tl.load(p, mask=mask, other=0.0) + v, mask=mask)


@triton.jit
def state_in(p_init, p_cur, o, mask, s, rst2, RESET: tl.constexpr, CDT: tl.constexpr):
    """The state entering step s at offsets o: the initial one (p_init, the layer's dtype) at s = 0
    and in the rows that restart here (rst2, RESET), else the carried one (p_cur, work dtype)."""
    if s == 0:
        v = tl.load(p_init + o, mask=mask, other=0.0).to(CDT)
    else:
        v = tl.load(p_cur + o, mask=mask, other=0.0)
        if RESET:
            v = tl.where(rst2, tl.load(p_init + o, mask=mask & rst2, other=0.0).to(CDT), v)
    return v


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------

@triton.heuristics({"HAS_LEN": _given("p_len"), "RESET": _given("p_reset")})
@triton.jit(do_not_specialize=["s"])
def ln_hw_kernel(
    p_h0, p_hst, p_whh, p_hwbuf, p_len, p_reset,
    s, T, B, H, D,
    G: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    PREC: tl.constexpr, HAS_LEN: tl.constexpr, RESET: tl.constexpr,
):
    """Stepwise forward, step s: hwbuf = h_s W_hh^T for BLOCK_M of the GH weight rows and BLOCK_B
    rows (grid (D, B tiles, GH tiles)); h_s is h0 at s = 0 and in restarting rows, else the state
    slot s % 2. p_len only serves RESET (row times)."""
    tl.static_assert(BLOCK_B >= 16 and BLOCK_M >= 16 and BLOCK_K >= 16, "tl.dot needs tiles >= 16")
    CDT = p_hwbuf.dtype.element_ty
    pid_d = tl.program_id(0)
    GH = G * H
    offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < GH
    mask_b = offs_b < B
    rst2 = None
    if RESET:
        t, live = row_time(s, T, offs_b, mask_b, p_len, pid_d == 1, HAS_LEN)
        rst2 = restart_rows(p_reset, pid_d, t, live, offs_b, T, B)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_B), dtype=CDT)
    p_w = p_whh + pid_d * GH * H
    for k0 in range(0, H, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < H
        mask_kb = mask_k[:, None] & mask_b[None, :]
        b_h = state_in(p_h0 + pid_d * B * H, p_hst + ((s % 2) * D + pid_d) * B * H, offs_b[None, :] * H + kk[:, None],
                       mask_kb, s, rst2, RESET, CDT)
        b_w = wload(p_w + offs_m[:, None] * H + kk[None, :], mask_m[:, None] & mask_k[None, :], CDT, PREC)
        acc = mdot(b_w, b_h, acc, PREC)
    tl.store(p_hwbuf + pid_d * B * GH + offs_b[None, :] * GH + offs_m[:, None], acc,
             mask=mask_m[:, None] & mask_b[None, :])


@triton.heuristics({"G": _gates, "HAS_HB": _given("p_bh"), "HAS_LEN": _given("p_len"), "SAVE": _given("p_hp"),
                    "ZONEOUT": _zoneout, "RESET": _given("p_reset")})
@triton.jit(do_not_specialize=["s_begin", "s_end"])
def ln_fwd_kernel(
    p_xg, p_whh, p_gh, p_bh, p_gc, p_bc, p_h0, p_c0, p_len, p_zm, p_zp, p_reset,
    p_y, p_hn, p_cn, p_hp, p_hw, p_stats, p_gates, p_cs,
    p_hwbuf, p_hst, p_cst,
    s_begin, s_end, T, B, H, D,
    MODE: tl.constexpr, PERSISTENT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr,
    G: tl.constexpr, HAS_HB: tl.constexpr, HAS_LEN: tl.constexpr, SAVE: tl.constexpr,
    ZONEOUT: tl.constexpr, RESET: tl.constexpr,
):
    """Forward steps s_begin .. s_end - 1 for BLOCK_B rows (grid axis 1) and every unit of them
    (BLOCK_H >= H), each direction on grid axis 0. Stepwise: h W_hh^T comes from hwbuf (the
    launch before); PERSISTENT: computed here from register-resident weights (BLOCK_K >= H)."""
    tl.static_assert(not PERSISTENT or (BLOCK_B >= 16 and BLOCK_H >= 16 and BLOCK_K >= 16),
                     "tl.dot needs tiles >= 16")
    CDT = p_hst.dtype.element_ty
    LSTM: tl.constexpr = MODE == "LSTM"
    S: tl.constexpr = 4 if MODE == "LSTM" else 2
    pid_d = tl.program_id(0)
    GH = G * H
    # the grid has no unit axis (program_id(2) = 0): BLOCK_H >= H covers every unit of a row
    offs_j, offs_b, _, mask_j, mask_b, mask_jb = unit_tile(B, H, BLOCK_B, BLOCK_H, BLOCK_K)
    o_own = offs_b[None, :] * H + offs_j[:, None]
    gh_0, gh_1, gh_2, gh_3 = load_gates(p_gh + pid_d * GH + offs_j, H, mask_j, G, CDT)
    if HAS_HB:
        bh_0, bh_1, bh_2, bh_3 = load_gates(p_bh + pid_d * GH + offs_j, H, mask_j, G, CDT)
    if LSTM:
        gc = tl.load(p_gc + pid_d * H + offs_j, mask=mask_j, other=0.0).to(CDT)[:, None]
        bc = tl.load(p_bc + pid_d * H + offs_j, mask=mask_j, other=0.0).to(CDT)[:, None]
    if PERSISTENT:
        offs_k = tl.arange(0, BLOCK_K)
        mask_kb = (offs_k < H)[:, None] & mask_b[None, :]
        o_h = offs_b[None, :] * H + offs_k[:, None]
        w_0, w_1, w_2, w_3 = load_gate_weights(p_whh + pid_d * GH * H, H, H, offs_j[:, None] * H + offs_k[None, :],
                                               mask_j[:, None] & (offs_k[None, :] < H), G, CDT, PREC)

    for s in range(s_begin, s_end):
        t, live = row_time(s, T, offs_b, mask_b, p_len, pid_d == 1, HAS_LEN)
        live2 = live[None, :]
        rst2 = None
        if RESET:
            rst2 = restart_rows(p_reset, pid_d, t, live, offs_b, T, B)[None, :]
        cur = s % 2
        p_hcur = p_hst + (cur * D + pid_d) * B * H
        h_prev = state_in(p_h0 + pid_d * B * H, p_hcur, o_own, mask_jb, s, rst2, RESET, CDT)
        if PERSISTENT:
            b_h = state_in(p_h0 + pid_d * B * H, p_hcur, o_h, mask_kb, s, rst2, RESET, CDT)
            zero = tl.zeros((BLOCK_H, BLOCK_B), dtype=CDT)
            a_0, a_1, a_2, a_3 = dot_gates(w_0, w_1, w_2, w_3, b_h, zero, zero, zero, zero, G, PREC)
        else:
            a_0, a_1, a_2, a_3 = load_gates(p_hwbuf + pid_d * B * GH + offs_b[None, :] * GH + offs_j[:, None], H,
                                            mask_jb, G, CDT)
        # hidden side: LN(h W_hh^T; γ_hh) (+ b_hh for GRU)
        mean_h, rstd_h = row_moments(a_0, a_1, a_2, a_3, mask_jb, G, GH)
        m = mean_h[None, :]
        r = rstd_h[None, :]
        hh_0 = (a_0 - m) * r * gh_0[:, None]
        hh_1 = (a_1 - m) * r * gh_1[:, None]
        hh_2 = (a_2 - m) * r * gh_2[:, None]
        hh_3 = (a_3 - m) * r * gh_3[:, None]
        if HAS_HB:
            hh_0 += bh_0[:, None]
            hh_1 += bh_1[:, None]
            hh_2 += bh_2[:, None]
        base = (pid_d * T + t) * B + offs_b          # (BLOCK_B,) row index into (D, T, B, ...)
        x_0, x_1, x_2, x_3 = load_gates(p_xg + base[None, :] * GH + offs_j[:, None], H, mask_jb, G, CDT)
        if LSTM:
            c_prev = state_in(p_c0 + pid_d * B * H, p_cst + (cur * D + pid_d) * B * H, o_own, mask_jb, s, rst2,
                              RESET, CDT)
            s_0 = sigmoid(x_0 + hh_0)
            s_1 = sigmoid(x_1 + hh_1)
            s_2 = tanh(x_2 + hh_2)
            s_3 = sigmoid(x_3 + hh_3)
            c_new = s_1 * c_prev + s_0 * s_2
            mean_c, rstd_c = row_moments(c_new, c_new, c_new, c_new, mask_jb, 1, H)
            h_new = s_3 * tanh((c_new - mean_c[None, :]) * rstd_c[None, :] * gc + bc)
            c_keep = tl.where(live2, c_new, c_prev)
            tl.store(p_cst + ((1 - cur) * D + pid_d) * B * H + o_own, c_keep, mask=mask_jb)
            if s == T - 1:
                tl.store(p_cn + pid_d * B * H + o_own, c_keep.to(p_cn.dtype.element_ty), mask=mask_jb)
        else:
            h_new, s_0, s_1, s_2 = gru_fwd(x_0, x_1, x_2, hh_0, hh_1, hh_2, h_prev)
            s_3 = hh_2
        if ZONEOUT > 0:
            # h only: the LSTM's c is carried un-blended (fusedrnn.reference)
            z = zoneout_weight(p_zm, p_zp, pid_d, t, offs_b, offs_j, mask_jb, T, B, H, ZONEOUT, CDT,
                               BLOCK_H, BLOCK_B)
            h_new = z * h_prev + (1.0 - z) * h_new
        h_keep = tl.where(live2, h_new, h_prev)
        tl.store(p_hst + ((1 - cur) * D + pid_d) * B * H + o_own, h_keep, mask=mask_jb)
        p_yt = p_y + (t[None, :] * B + offs_b[None, :]) * (D * H) + pid_d * H + offs_j[:, None]
        tl.store(p_yt, tl.where(live2, h_new, 0.0).to(p_y.dtype.element_ty), mask=mask_jb)
        if s == T - 1:
            tl.store(p_hn + pid_d * B * H + o_own, h_keep.to(p_hn.dtype.element_ty), mask=mask_jb)
        if SAVE:
            tl.store(p_hp + base[None, :] * H + offs_j[:, None], h_prev, mask=mask_jb)
            store_gates(p_hw + base[None, :] * GH + offs_j[:, None], H, mask_jb, G, a_0, a_1, a_2, a_3)
            store_gates(p_gates + base[None, :] * (4 * H) + offs_j[:, None], H, mask_jb, 4, s_0, s_1, s_2, s_3)
            tl.store(p_stats + base * S, mean_h, mask=mask_b)
            tl.store(p_stats + base * S + 1, rstd_h, mask=mask_b)
            if LSTM:
                tl.store(p_stats + base * S + 2, mean_c, mask=mask_b)
                tl.store(p_stats + base * S + 3, rstd_c, mask=mask_b)
                tl.store(p_cs + base[None, :] * H + offs_j[:, None], c_prev, mask=mask_jb)
        if PERSISTENT:
            # this program's state writes must be visible to all its threads before the next step
            tl.debug_barrier()


@triton.heuristics({"G": _gates, "HAS_LEN": _given("p_len"), "RESET": _given("p_reset")})
@triton.jit(do_not_specialize=["s"])
def ln_dh_kernel(
    p_dy, p_dhn, p_whh, p_len, p_reset, p_dghbuf, p_carry, p_dhtot, p_dh0, p_dh0acc,
    s, T, B, H, D,
    MODE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    PREC: tl.constexpr, G: tl.constexpr, HAS_LEN: tl.constexpr, RESET: tl.constexpr,
):
    """Stepwise backward, step s (s = -1: dh0): the gradient reaching h after step s, carry_{s+1} +
    dhw_{s+1} W_hh + dy_t (live rows), for BLOCK_H units and BLOCK_B rows (grid (D, B tiles, H
    tiles)); the reduction over GH streams W_hh in BLOCK_K chunks. RESET: the part of it that
    reached a state restarted at step s + 1 goes to dh0acc instead, and dh0 adds dh0acc."""
    tl.static_assert(BLOCK_B >= 16 and BLOCK_H >= 16 and BLOCK_K >= 16, "tl.dot needs tiles >= 16")
    CDT = p_dhtot.dtype.element_ty
    pid_d = tl.program_id(0)
    offs_u = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_u = offs_u < H
    mask_b = offs_b < B
    mask_ub = mask_u[:, None] & mask_b[None, :]
    o = offs_b[None, :] * H + offs_u[:, None]
    dh = bwd_dh_carry(s, pid_d, offs_u, mask_u, offs_b, mask_b, T, B, H, H, D, G,
                      p_dhn, p_whh, p_dghbuf, p_carry, None, None, None, None, False, BLOCK_K, PREC, "")
    if s >= 0:
        t, live = row_time(s, T, offs_b, mask_b, p_len, pid_d == 1, HAS_LEN)
        if RESET:
            dh = divert_restart(dh, s, pid_d, offs_b, mask_b, mask_ub, o, T, B, p_len, p_reset,
                                p_dh0acc + pid_d * B * H, HAS_LEN)
        p_dyt = p_dy + (t[None, :] * B + offs_b[None, :]) * (D * H) + pid_d * H + offs_u[:, None]
        dh += tl.load(p_dyt, mask=mask_ub & live[None, :], other=0.0).to(CDT)
        tl.store(p_dhtot + pid_d * B * H + o, dh, mask=mask_ub)
    else:
        if RESET:
            dh += tl.load(p_dh0acc + pid_d * B * H + o, mask=mask_ub, other=0.0)
        tl.store(p_dh0 + pid_d * B * H + o, dh.to(p_dh0.dtype.element_ty), mask=mask_ub)


@triton.heuristics({"G": _gates, "HAS_HB": _given("p_dbh"), "HAS_LEN": _given("p_len"), "ZONEOUT": _zoneout,
                    "RESET": _given("p_reset")})
@triton.jit(do_not_specialize=["i_begin", "i_end"])
def ln_bwd_kernel(
    p_dy, p_dhn, p_dcn, p_whh, p_gh, p_gc, p_bc, p_len, p_zm, p_zp, p_reset,
    p_hp, p_hw, p_stats, p_gates, p_cs,
    p_dxg, p_dhw, p_dh0, p_dc0, p_dgh, p_dbh, p_dgc, p_dbc,
    p_dhtot, p_dghbuf, p_carry, p_dcst, p_dh0acc, p_dc0acc,
    i_begin, i_end, T, B, H, D,
    MODE: tl.constexpr, PERSISTENT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr,
    G: tl.constexpr, HAS_HB: tl.constexpr, HAS_LEN: tl.constexpr, ZONEOUT: tl.constexpr, RESET: tl.constexpr,
):
    """Backward iterations i_begin .. i_end - 1 (step s = T - 1 - i; s = -1 only forms dh0, and
    only when PERSISTENT: stepwise, ln_dh_kernel does it, dh0acc included) for BLOCK_B rows and
    all their units."""
    tl.static_assert(not PERSISTENT or (BLOCK_B >= 16 and BLOCK_H >= 16 and BLOCK_K >= 16),
                     "tl.dot needs tiles >= 16")
    CDT = p_hp.dtype.element_ty
    LSTM: tl.constexpr = MODE == "LSTM"
    S: tl.constexpr = 4 if MODE == "LSTM" else 2
    pid_d = tl.program_id(0)
    GH = G * H
    # the grid has no unit axis (program_id(2) = 0): BLOCK_H >= H covers every unit of a row
    offs_j, offs_b, _, mask_j, mask_b, mask_jb = unit_tile(B, H, BLOCK_B, BLOCK_H, BLOCK_K)
    o_own = offs_b[None, :] * H + offs_j[:, None]
    o_row = offs_b[None, :] * GH + offs_j[:, None]
    gh_0, gh_1, gh_2, gh_3 = load_gates(p_gh + pid_d * GH + offs_j, H, mask_j, G, CDT)
    if LSTM:
        gc = tl.load(p_gc + pid_d * H + offs_j, mask=mask_j, other=0.0).to(CDT)[:, None]
        bc = tl.load(p_bc + pid_d * H + offs_j, mask=mask_j, other=0.0).to(CDT)[:, None]
    if PERSISTENT:
        # W_hh[g*H + k, j] for all k (BLOCK_K >= H), units j: dh = dhw W_hh without streaming
        offs_k = tl.arange(0, BLOCK_K)
        w_0, w_1, w_2, w_3 = load_gate_weights(p_whh + pid_d * GH * H, H, H, offs_k[None, :] * H + offs_j[:, None],
                                               mask_j[:, None] & (offs_k[None, :] < H), G, CDT, PREC)
    else:
        w_0, w_1, w_2, w_3 = None, None, None, None

    for i in range(i_begin, i_end):
        s = T - 1 - i
        if PERSISTENT:
            dh = bwd_dh_carry(s, pid_d, offs_j, mask_j, offs_b, mask_b, T, B, H, H, D, G,
                              p_dhn, p_whh, p_dghbuf, p_carry, w_0, w_1, w_2, w_3, True, BLOCK_K, PREC, "")
        if s >= 0:
            t, live = row_time(s, T, offs_b, mask_b, p_len, pid_d == 1, HAS_LEN)
            live2 = live[None, :]
            if PERSISTENT:
                if RESET:
                    dh = divert_restart(dh, s, pid_d, offs_b, mask_b, mask_jb, o_own, T, B, p_len, p_reset,
                                        p_dh0acc + pid_d * B * H, HAS_LEN)
                p_dyt = p_dy + (t[None, :] * B + offs_b[None, :]) * (D * H) + pid_d * H + offs_j[:, None]
                dh += tl.load(p_dyt, mask=mask_jb & live2, other=0.0).to(CDT)
            else:
                dh = tl.load(p_dhtot + pid_d * B * H + o_own, mask=mask_jb, other=0.0)
            dhl = tl.where(live2, dh, 0.0)
            if ZONEOUT > 0:
                # z of the gradient of h_t reaches h_{t-1} directly (the carry); 1 - z enters the cell
                z = zoneout_weight(p_zm, p_zp, pid_d, t, offs_b, offs_j, mask_jb, T, B, H, ZONEOUT, CDT,
                                   BLOCK_H, BLOCK_B)
                dh_zone = z * dhl
                dhl = dhl - dh_zone
            first = s == T - 1
            base = (pid_d * T + t) * B + offs_b
            mean_h = tl.load(p_stats + base * S, mask=mask_b, other=0.0)[None, :]
            rstd_h = tl.load(p_stats + base * S + 1, mask=mask_b, other=0.0)
            sv_0, sv_1, sv_2, sv_3 = load_gates(p_gates + base[None, :] * (4 * H) + offs_j[:, None], H, mask_jb, 4,
                                                CDT)
            if LSTM:
                if s == T - 1:
                    dc = tl.load(p_dcn + pid_d * B * H + o_own, mask=mask_jb, other=0.0).to(CDT)
                else:
                    dc = tl.load(p_dcst + (((s + 1) % 2) * D + pid_d) * B * H + o_own, mask=mask_jb, other=0.0)
                c_prev = tl.load(p_cs + base[None, :] * H + offs_j[:, None], mask=mask_jb, other=0.0)
                mean_c = tl.load(p_stats + base * S + 2, mask=mask_b, other=0.0)[None, :]
                rstd_c = tl.load(p_stats + base * S + 3, mask=mask_b, other=0.0)
                c_new = sv_1 * c_prev + sv_0 * sv_2
                c_hat = tl.where(mask_jb, (c_new - mean_c) * rstd_c[None, :], 0.0)
                tc = tanh(c_hat * gc + bc)
                dcn = dhl * sv_3 * (1.0 - tc * tc)
                accumulate(p_dgc + pid_d * B * H + o_own, mask_jb, first, dcn * c_hat)
                accumulate(p_dbc + pid_d * B * H + o_own, mask_jb, first, dcn)
                dcnew, _u1, _u2, _u3 = ln_bwd_rows(dcn * gc, dcn, dcn, dcn, c_hat, c_hat, c_hat, c_hat, rstd_c,
                                                   mask_jb, 1, H)
                dc_t = dc + dcnew
                d_0 = tl.where(live2, dc_t * sv_2 * sv_0 * (1.0 - sv_0), 0.0)
                d_1 = tl.where(live2, dc_t * c_prev * sv_1 * (1.0 - sv_1), 0.0)
                d_2 = tl.where(live2, dc_t * sv_0 * (1.0 - sv_2 * sv_2), 0.0)
                d_3 = tl.where(live2, dhl * tc * sv_3 * (1.0 - sv_3), 0.0)
                e_0, e_1, e_2, e_3 = d_0, d_1, d_2, d_3
                carry_dc(dc_t * sv_1, dc, s, t, live, live2, pid_d, offs_b, o_own, mask_jb, T, B, D, H, p_reset,
                         p_dc0acc, p_dcst, p_dc0, RESET)
                direct = tl.zeros((BLOCK_H, BLOCK_B), dtype=CDT)
            else:
                h_prev = tl.load(p_hp + base[None, :] * H + offs_j[:, None], mask=mask_jb, other=0.0)
                d_0, d_1, d_2, e_2, direct = gru_bwd(dhl, sv_0, sv_1, sv_2, sv_3, h_prev)
                d_3 = d_0
                e_0, e_1, e_3 = d_0, d_1, d_0
            if ZONEOUT > 0:
                direct += dh_zone
            # hidden-side LayerNorm backward: e = gradient of LN(h W_hh^T) γ_hh (+ b_hh)
            a_0, a_1, a_2, a_3 = load_gates(p_hw + base[None, :] * GH + offs_j[:, None], H, mask_jb, G, CDT)
            r2 = rstd_h[None, :]
            xh_0 = tl.where(mask_jb, (a_0 - mean_h) * r2, 0.0)
            xh_1 = tl.where(mask_jb, (a_1 - mean_h) * r2, 0.0)
            xh_2 = tl.where(mask_jb, (a_2 - mean_h) * r2, 0.0)
            xh_3 = tl.where(mask_jb, (a_3 - mean_h) * r2, 0.0)
            p_acc = pid_d * B * GH + o_row
            accumulate(p_dgh + p_acc, mask_jb, first, e_0 * xh_0)
            if G > 1:
                accumulate(p_dgh + p_acc + H, mask_jb, first, e_1 * xh_1)
                accumulate(p_dgh + p_acc + 2 * H, mask_jb, first, e_2 * xh_2)
            if G > 3:
                accumulate(p_dgh + p_acc + 3 * H, mask_jb, first, e_3 * xh_3)
            if HAS_HB:
                accumulate(p_dbh + p_acc, mask_jb, first, e_0)
                accumulate(p_dbh + p_acc + H, mask_jb, first, e_1)
                accumulate(p_dbh + p_acc + 2 * H, mask_jb, first, e_2)
            f_0, f_1, f_2, f_3 = ln_bwd_rows(e_0 * gh_0[:, None], e_1 * gh_1[:, None], e_2 * gh_2[:, None],
                                             e_3 * gh_3[:, None], xh_0, xh_1, xh_2, xh_3, rstd_h, mask_jb, G, GH)
            store_gates(p_dxg + base[None, :] * GH + offs_j[:, None], H, mask_jb, G, d_0, d_1, d_2, d_3)
            store_gates(p_dhw + base[None, :] * GH + offs_j[:, None], H, mask_jb, G, f_0, f_1, f_2, f_3)
            store_gates(p_dghbuf + ((s % 2) * D + pid_d) * B * GH + o_row, H, mask_jb, G, f_0, f_1, f_2, f_3)
            tl.store(p_carry + ((s % 2) * D + pid_d) * B * H + o_own, tl.where(live2, direct, dh), mask=mask_jb)
        else:
            if PERSISTENT:
                if RESET:
                    dh += tl.load(p_dh0acc + pid_d * B * H + o_own, mask=mask_jb, other=0.0)
                tl.store(p_dh0 + pid_d * B * H + o_own, dh.to(p_dh0.dtype.element_ty), mask=mask_jb)
        if PERSISTENT:
            tl.debug_barrier()


# ----------------------------------------------------------------------------------------------
# Plans
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LNConfig:
    """Tiles of the LayerNorm scan: the row kernels (ln_fwd_kernel / ln_bwd_kernel: BLOCK_B rows x
    all BLOCK_H >= H units, grid (D, B / BLOCK_B)), and, stepwise, the matmul launches
    (ln_hw_kernel: MM_M weight rows x MM_B rows, K chunks MM_K; ln_dh_kernel: MM_M units)."""
    persistent: bool
    BLOCK_B: int
    BLOCK_H: int
    BLOCK_K: int
    num_warps: int
    MM_B: int = 16
    MM_M: int = 16
    MM_K: int = 16
    mm_warps: int = 4


# Stepwise row kernels: float32-sized values (float64 counts twice) of one [units, batch] tile,
# per mode. The LSTM kernels keep more such tiles live than the GRU ones: at H = 512 (sm_90) the
# LSTM at 1024 (BLOCK_B = 2, 8 warps) spilled 8 B per thread at 255 registers (float64 at 4 warps
# 32-208 B), while 512 (BLOCK_B = 1, 8 warps) uses 91-201 registers, zoneout and reset on or
# off; the GRU at 1024 uses at most 186 (float64 at 8 warps 126).
ROW_TILE_VALUES = {"LSTM": 512, "GRU": 1024}
ROW_WARPS_FROM = 512   # tiles of this many values or more take 8 warps, smaller ones 4
# Persistent: rows are independent, so batch tiles of this size run as separate programs.
PERSISTENT_BLOCK_B = 16
# Persistent: what one program's registers hold per thread (8 warps), in float32-sized values
# (float64 counts twice), besides the weights and accumulators the plain kernels' single-program
# budget counts (kernels/plan.py: persistent_plan). Every program holds whole rows, as
# [BLOCK_H, BLOCK_B] tiles: the G pre-activations (the row reduction's input, kept for the
# save), the G input-side and the G normalized gate tiles, the row statistics broadcast over the
# tile, and the states (h_prev, h_new; LSTM also c_prev, c_new): LN_TILES; the variants' tiles
# (zoneout the blend weight; reset the restarted state and its gradient accumulator); and with
# the two-pass half-precision dot ("x2") the h_hi / h_lo operand tiles in the blocked and the dot
# layouts. Calibrated on sm_90 compiles (bench/kernel_resources.py --set layernorm): 40 holds
# float32 LSTM H = 32 and float64 LSTM H = 16 with both variants (40; at most 176 / 246
# registers), half-precision GRU H = 32 with both (38; 242); half-precision LSTM H = 32 (42)
# ran out of registers (8-24 B at 255) with or without variants, and H = 64 (64-96) by
# 48-272 B.
LN_TILES = {"LSTM": 3 * 4 + 5, "GRU": 3 * 3 + 3}
LN_ZONEOUT_TILES = 1
LN_RESET_TILES = 2
LN_X2_TILES = 4
LN_ROW_VALUES = 40


def ln_row_values(mode, BLOCK_H, BLOCK_B, dtype, zoneout=False, reset=False, num_warps=8):
    """The persistent LayerNorm kernels' row values per thread (LN_TILES and the tiles above)."""
    tiles = LN_TILES[mode] + LN_ZONEOUT_TILES * bool(zoneout) + LN_RESET_TILES * bool(reset)
    tiles += LN_X2_TILES if dtype in HALF_DTYPES else 0
    return tiles * BLOCK_H * BLOCK_B * (2 if dtype == torch.float64 else 1) / (32 * num_warps)


def ln_plan(mode, D, B, H, dtype, device, zoneout=False, reset=False):
    """The persistent configuration, or None when one program cannot hold the layer: every
    unit's weights within the plain kernels' single-program budget (kernels/plan.py:
    persistent_plan) at a batch tile of 16 rows (no grid barrier: programs of different batch
    tiles share nothing), and the rows the LayerNorm kernels hold, with the variants the layer
    runs with (zoneout, reset), within LN_ROW_VALUES."""
    check_choice(mode, LN_MODES, "mode")
    plan = persistent_plan(mode, D, min(B, PERSISTENT_BLOCK_B), H, H, dtype, *device_limits(device))
    if plan is None or plan.grid_sync or plan.grid[2] != 1:
        return None
    if ln_row_values(mode, plan.BLOCK_H, plan.BLOCK_B, dtype, zoneout, reset, plan.num_warps) > LN_ROW_VALUES:
        return None
    return LNConfig(True, plan.BLOCK_B, plan.BLOCK_H, plan.BLOCK_K, plan.num_warps)


def ln_step_config(mode, B, H, dtype):
    """The stepwise configuration: row kernels of BLOCK_B whole rows within ROW_TILE_VALUES (the
    variants fit in it too), and the matmul launches' tiles."""
    block_h = _np2(H)
    wide = 2 if dtype == torch.float64 else 1
    block_b = max(1, min(_np2(B), ROW_TILE_VALUES[mode] // wide // block_h))
    return LNConfig(False, block_b, block_h, 16, 8 if block_h * block_b * wide >= ROW_WARPS_FROM else 4,
                    MM_B=_clamp_block(B, 32), MM_M=32,
                    MM_K=_clamp_block(H, 16 if dtype == torch.float64 else 32), mm_warps=4)


def _config(kernel, mode, D, B, H, dtype, device, zoneout=False, reset=False):
    """The LNConfig the launch uses, planned with the variants it runs with (as
    fusedrnn.layernorm.choose_kernel asks ln_plan); ValueError if the persistent kernels cannot
    hold the layer."""
    if kernel == "stepwise":
        return ln_step_config(mode, B, H, dtype)
    cfg = ln_plan(mode, D, B, H, dtype, device, zoneout=zoneout, reset=reset)
    if cfg is None:
        variants = "".join(f", {n}" for n, on in (("zoneout", zoneout), ("reset", reset)) if on)
        raise ValueError(f"kernel='persistent' cannot hold this LayerNorm layer ({mode}, D={D}, B={B}, H={H}, "
                         f"{dtype}{variants}): ln_plan returned None; use kernel='stepwise'")
    return cfg


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

def _check_mode(mode, kernel):
    check_choice(mode, LN_MODES, "mode")
    check_choice(kernel, TRITON_KERNELS, "kernel")


def forward_launches(mode, xg, w_hh, g_h, b_h, g_c, b_c, h0, c0, lengths, save, kernel, allow_tf32, zoneout=None,
                     zoneout_p=0.0, reset=None):
    """Check, allocate, list the launches of ln_scan_forward: (outputs, launch generator)."""
    _check_mode(mode, kernel)
    check_float("h0", h0, 3)
    check_float("xg", xg, 4)
    D, B, H = h0.shape
    dt, dev = h0.dtype, h0.device
    wdt = work_dtype(dt)
    G = GATES[mode]
    GH = G * H
    lstm = mode == "LSTM"
    T = xg.shape[1]
    if D not in (1, 2) or T < 1 or B < 1:
        raise ValueError(f"need 1 or 2 directions, T >= 1, B >= 1; got xg {tuple(xg.shape)}, h0 {tuple(h0.shape)}")
    check_tensor("xg", xg, (D, T, B, GH), wdt, dev)
    check_tensor("w_hh", w_hh, (D, GH, H), dt, dev)
    check_tensor("g_h", g_h, (D, GH), dt, dev)
    if lstm:
        if b_h is not None:
            raise ValueError("b_h must be None for LSTM (its bias is shared and added to xg)")
        check_tensor("g_c", g_c, (D, H), dt, dev)
        check_tensor("b_c", b_c, (D, H), dt, dev)
        check_tensor("c0", c0, (D, B, H), dt, dev)
    else:
        check_tensor("b_h", b_h, (D, GH), dt, dev, optional=True)
    check_tensor("lengths", lengths, (B,), torch.int64, dev, optional=True)
    variants = _variant_args(zoneout, zoneout_p, reset, D, T, B, H, wdt, dev, False)

    S = 4 if lstm else 2
    y = new((T, B, D * H), dt, dev)
    hn = new((D, B, H), dt, dev)
    cn = new((D, B, H), dt, dev) if lstm else h0.new_empty(0)
    if save:
        ws = (new((D, T, B, H), wdt, dev), new((D, T, B, GH), wdt, dev), new((D, T, B, S), wdt, dev),
              new((D, T, B, 4 * H), wdt, dev), new((D, T, B, H if lstm else 0), wdt, dev))
    else:
        ws = tuple(h0.new_empty(0, dtype=wdt) for _ in range(5))
    hp, hw, stats, gates, cs = ws
    cfg = _config(kernel, mode, D, B, H, dt, dev, **_variant_flags(zoneout, zoneout_p, reset))
    prec = dot_precision(dt, allow_tf32, dev)
    hst = new((2, D, B, H), wdt, dev)
    hwbuf = None if cfg.persistent else new((D, B, GH), wdt, dev)
    args = dict(
        p_xg=xg, p_whh=w_hh, p_gh=g_h, p_bh=b_h, p_gc=g_c if lstm else None, p_bc=b_c if lstm else None,
        p_h0=h0, p_c0=c0 if lstm else None, p_len=lengths, **variants, p_y=y, p_hn=hn, p_cn=cn if lstm else None,
        p_hp=hp if save else None, p_hw=hw if save else None, p_stats=stats if save else None,
        p_gates=gates if save else None, p_cs=cs if save and lstm else None,
        p_hwbuf=hwbuf, p_hst=hst, p_cst=new((2, D, B, H), wdt, dev) if lstm else None,
        T=T, B=B, H=H, D=D, MODE=mode, PERSISTENT=cfg.persistent,
        BLOCK_B=cfg.BLOCK_B, BLOCK_H=cfg.BLOCK_H, BLOCK_K=cfg.BLOCK_K, PREC=prec)
    cell, args = resolve(ln_fwd_kernel, args)
    grid = (D, triton.cdiv(B, cfg.BLOCK_B))

    def launches():
        if cfg.persistent:
            yield Launch(cell, grid, dict(args, s_begin=0, s_end=T), cfg.num_warps)
            return
        # lengths only matter to the restarts' row times
        mm_kernel, mm_args = resolve(ln_hw_kernel, dict(
            p_h0=h0, p_hst=hst, p_whh=w_hh, p_hwbuf=hwbuf, p_len=lengths if reset is not None else None,
            p_reset=reset, T=T, B=B, H=H, D=D, G=G, BLOCK_B=cfg.MM_B, BLOCK_M=cfg.MM_M, BLOCK_K=cfg.MM_K, PREC=prec))
        mm_grid = (D, triton.cdiv(B, cfg.MM_B), triton.cdiv(GH, cfg.MM_M))
        for s in range(T):
            yield Launch(mm_kernel, mm_grid, dict(mm_args, s=s), cfg.mm_warps)
            yield Launch(cell, grid, dict(args, s_begin=s, s_end=s + 1), cfg.num_warps)

    return (y, hn, cn, hp, hw, stats, gates, cs), launches()


def backward_launches(mode, dy, dhn, dcn, w_hh, g_h, b_h, g_c, b_c, lengths, hp, hw, stats, gates, cs, kernel,
                      allow_tf32, zoneout=None, zoneout_p=0.0, reset=None):
    """Check, allocate, list the launches of ln_scan_backward: (outputs, launch generator)."""
    _check_mode(mode, kernel)
    check_float("dy", dy, 3)
    if not isinstance(hp, torch.Tensor) or hp.dim() != 4:
        raise ValueError("hp must be a 4-d tensor (D, T, B, H): the forward's workspace (save=True)")
    D, T, B, H = hp.shape
    dt, dev = dy.dtype, dy.device
    wdt = work_dtype(dt)
    G = GATES[mode]
    GH = G * H
    lstm = mode == "LSTM"
    S = 4 if lstm else 2
    check_tensor("dy", dy, (T, B, D * H), dt, dev)
    check_tensor("dhn", dhn, (D, B, H), dt, dev)
    check_tensor("w_hh", w_hh, (D, GH, H), dt, dev)
    check_tensor("g_h", g_h, (D, GH), dt, dev)
    if lstm:
        check_tensor("dcn", dcn, (D, B, H), dt, dev)
        check_tensor("g_c", g_c, (D, H), dt, dev)
        check_tensor("b_c", b_c, (D, H), dt, dev)
    else:
        check_tensor("b_h", b_h, (D, GH), dt, dev, optional=True)
    check_tensor("lengths", lengths, (B,), torch.int64, dev, optional=True)
    check_tensor("hp", hp, (D, T, B, H), wdt, dev)
    check_tensor("hw", hw, (D, T, B, GH), wdt, dev)
    check_tensor("stats", stats, (D, T, B, S), wdt, dev)
    check_tensor("gates", gates, (D, T, B, 4 * H), wdt, dev)
    check_tensor("cs", cs, (D, T, B, H if lstm else 0), wdt, dev)
    variants = _variant_args(zoneout, zoneout_p, reset, D, T, B, H, wdt, dev, False)

    has_hb = not lstm and b_h is not None
    dxg, dhw = new((D, T, B, GH), wdt, dev), new((D, T, B, GH), wdt, dev)
    dh0 = new((D, B, H), wdt, dev)
    dc0 = new((D, B, H), wdt, dev) if lstm else hp.new_empty(0)
    dg_h = new((D, B, GH), wdt, dev)
    db_h = new((D, B, GH), wdt, dev) if has_hb else hp.new_empty(0)
    dg_c, db_c = (new((D, B, H), wdt, dev), new((D, B, H), wdt, dev)) if lstm else (hp.new_empty(0), hp.new_empty(0))
    cfg = _config(kernel, mode, D, B, H, dt, dev, **_variant_flags(zoneout, zoneout_p, reset))
    prec = dot_precision(dt, allow_tf32, dev)
    dghbuf, carry = new((2, D, B, GH), wdt, dev), new((2, D, B, H), wdt, dev)
    dhtot = None if cfg.persistent else new((D, B, H), wdt, dev)
    # the dh0 / dc0 accumulators of the restarts: zeroed, never poisoned
    dh0acc = torch.zeros((D, B, H), dtype=wdt, device=dev) if reset is not None else None
    dc0acc = torch.zeros((D, B, H), dtype=wdt, device=dev) if reset is not None and lstm else None
    args = dict(
        p_dy=dy, p_dhn=dhn, p_dcn=dcn if lstm else None, p_whh=w_hh, p_gh=g_h,
        p_gc=g_c if lstm else None, p_bc=b_c if lstm else None, p_len=lengths, **variants,
        p_hp=hp, p_hw=hw, p_stats=stats, p_gates=gates, p_cs=cs if lstm else None,
        p_dxg=dxg, p_dhw=dhw, p_dh0=dh0, p_dc0=dc0 if lstm else None, p_dgh=dg_h, p_dbh=db_h if has_hb else None,
        p_dgc=dg_c if lstm else None, p_dbc=db_c if lstm else None,
        p_dhtot=dhtot, p_dghbuf=dghbuf, p_carry=carry, p_dcst=new((2, D, B, H), wdt, dev) if lstm else None,
        p_dh0acc=dh0acc, p_dc0acc=dc0acc, T=T, B=B, H=H, D=D, MODE=mode, PERSISTENT=cfg.persistent,
        BLOCK_B=cfg.BLOCK_B, BLOCK_H=cfg.BLOCK_H, BLOCK_K=cfg.BLOCK_K, PREC=prec)
    cell, args = resolve(ln_bwd_kernel, args)
    grid = (D, triton.cdiv(B, cfg.BLOCK_B))

    def launches():
        if cfg.persistent:
            yield Launch(cell, grid, dict(args, i_begin=0, i_end=T + 1), cfg.num_warps)
            return
        dh_kernel, dh_args = resolve(ln_dh_kernel, dict(
            p_dy=dy, p_dhn=dhn, p_whh=w_hh, p_len=lengths, p_reset=reset, p_dghbuf=dghbuf, p_carry=carry,
            p_dhtot=dhtot, p_dh0=dh0, p_dh0acc=dh0acc, T=T, B=B, H=H, D=D, MODE=mode, BLOCK_B=cfg.MM_B,
            BLOCK_H=_clamp_block(H, 32), BLOCK_K=cfg.MM_K, PREC=prec))
        dh_grid = (D, triton.cdiv(B, cfg.MM_B), triton.cdiv(H, _clamp_block(H, 32)))
        for i in range(T + 1):
            yield Launch(dh_kernel, dh_grid, dict(dh_args, s=T - 1 - i), cfg.mm_warps)
            if i < T:
                yield Launch(cell, grid, dict(args, i_begin=i, i_end=i + 1), cfg.num_warps)

    return (dxg, dhw, dh0, dc0, dg_h, db_h, dg_c, db_c), launches()


def ln_scan_forward(mode, xg, w_hh, g_h, b_h, g_c, b_c, h0, c0, lengths, save, *, kernel="stepwise",
                    allow_tf32=False, zoneout=None, zoneout_p=0.0, reset=None):
    """fusedrnn.layernorm's scan_forward on the Triton kernels, variants included: (y, hn, cn, hp,
    hw, stats, gates, cs)."""
    outs, launches = forward_launches(mode, xg, w_hh, g_h, b_h, g_c, b_c, h0, c0, lengths, save, kernel,
                                      allow_tf32, zoneout, zoneout_p, reset)
    run(launches)
    return outs


def ln_scan_backward(mode, dy, dhn, dcn, w_hh, g_h, b_h, g_c, b_c, lengths, hp, hw, stats, gates, cs, *,
                     kernel="stepwise", allow_tf32=False, zoneout=None, zoneout_p=0.0, reset=None):
    """fusedrnn.layernorm's scan_backward on the Triton kernels: (dxg, dhw, dh0, dc0, dg_h, db_h, dg_c,
    db_c), the parameter sums per row (D, B, ...)."""
    outs, launches = backward_launches(mode, dy, dhn, dcn, w_hh, g_h, b_h, g_c, b_c, lengths, hp, hw, stats,
                                       gates, cs, kernel, allow_tf32, zoneout, zoneout_p, reset)
    run(launches)
    return outs


# ----------------------------------------------------------------------------------------------
# Ahead-of-time configurations (kernels/aot.py, bench/layernorm_bench.py --resources; no GPU needed)
# ----------------------------------------------------------------------------------------------

# (B, H): a tiny layer (masks everywhere), the GPU target's stepwise shape, and the largest
# persistent layers (ln_plan at B = 16: float32 H = 32, float64 and half-precision LSTM H = 16,
# half-precision GRU H = 32).
AOT_SHAPES = ((3, 5), (64, 512), (16, 16), (16, 32))


# (zoneout, reset) of the listings, as kernels/aot.py's VARIANTS (0 off, 1 eval p, 2 mask) with
# the plain (0, False) first: kernels/aot.py lists them all (--set layernorm).
AOT_VARIANTS = ((0, False), (1, False), (2, False), (0, True), (2, True))


def aot_configs(dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64), variants=((0, False),),
                shapes=AOT_SHAPES):
    """Every distinct kernel configuration the launchers pick for `shapes` (all features on:
    lengths, save, GRU's hidden bias) with each (zoneout, reset) of `variants` (AOT_VARIANTS: all
    of them), as fusedrnn.kernels.aot.KernelConfig, planned on meta tensors as an sm_90; a
    persistent configuration only where ln_plan admits the shape with those variants."""
    from .aot import _SIG, KernelConfig, specialize
    meta = torch.device("meta")
    seen = {}
    for mode in LN_MODES:
        G = GATES[mode]
        lstm = mode == "LSTM"
        for dt in dtypes:
            wdt = work_dtype(dt)
            for (B, H), (zoneout, reset) in itertools.product(shapes, variants):
                for kernel in TRITON_KERNELS:
                    if kernel == "persistent" and ln_plan(mode, 2, B, H, dt, meta, zoneout=zoneout > 0,
                                                          reset=reset) is None:
                        continue
                    D, T = 2, 1
                    e = lambda *s, d=dt: torch.empty(*s, dtype=d, device=meta)  # noqa: E731
                    var = dict(zoneout=e(D, T, B, H, d=torch.bool) if zoneout == 2 else None,
                               zoneout_p=0.5 if zoneout == 1 else 0.0,
                               reset=e(D, T, B, d=torch.bool) if reset else None)
                    outs, fwd = forward_launches(mode, e(D, T, B, G * H, d=wdt), e(D, G * H, H), e(D, G * H),
                                                 None if lstm else e(D, G * H), e(D, H) if lstm else None,
                                                 e(D, H) if lstm else None, e(D, B, H), e(D, B, H) if lstm else None,
                                                 e(B, d=torch.int64), True, kernel, False, **var)
                    y, hn, cn, hp, hw, stats, gates, cs = outs
                    _, bwd = backward_launches(mode, y, hn, cn if lstm else None, e(D, G * H, H), e(D, G * H),
                                               None if lstm else e(D, G * H), e(D, H) if lstm else None,
                                               e(D, H) if lstm else None, e(B, d=torch.int64), hp, hw, stats,
                                               gates, cs, kernel, False, **var)
                    for ln in list(fwd) + list(bwd):
                        fn, sig, const = specialize(ln.kernel, ln.args)
                        cfg = KernelConfig(fn, sig, const, ln.num_warps, _SIG[dt])
                        seen.setdefault((cfg.name, cfg.signature, cfg.constexprs, cfg.num_warps), cfg)
    return list(seen.values())
