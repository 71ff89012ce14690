"""The recurrent scan: generic step kernels (constexpr MODE) and their launchers.

Shape legend:
    D directions (d = 1 runs backwards in time)  T steps  B batch  H hidden  P state (proj or H)
    G gates (LSTM 4, GRU 3, RNN 1)  GH = G * H  W saved gate width (4H LSTM/GRU, H RNN)
    xg (D, T, B, GH)  w_hh (D, GH, P)  b_hh (D, GH)  w_hr (D, P, H)  h0 (D, B, P)  c0 (D, B, H)
    y (T, B, D*P)  hp (D, T, B, P)  gates (D, T, B, W)  cs (D, T, B, H)
    hst (2, D, B, P) / cst (2, D, B, H)    ping-pong state: step s reads slot s%2, writes (s+1)%2
    dghbuf (2, D, B, GH) / carry (2, D, B, P) / dcst (2, D, B, H)   the same for the backward
Every tile in a kernel is [units, batch] (BLOCK_H, BLOCK_B): gates^T = W_hh h^T puts the weight
rows on the M side of the dot, which the tensor cores need to be >= 16 (wgmma: 64) even at batch 1.

One step kernel serves both variants. Stepwise: the launcher loops over s and each launch runs one
iteration of the in-kernel time loop. Persistent (PERSISTENT): one launch runs the whole loop, the
weight tiles of the program's units are loaded into registers once before it, and step_barrier
separates the steps. Ping-pong buffers (not in-place state) because other programs, or other warps
of this one, may still read slot s%2 while this step writes.
"""
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .common import bwd_dh_carry, mdot, row_time, step_barrier, unit_tile, wload
from .gru import gru_bwd, gru_fwd
from .lstm import (lstm_bwd, lstm_fwd, lstm_proj_bwd_kernel, lstm_proj_bwd_step, lstm_proj_fwd_kernel,
                   lstm_proj_fwd_step)
from .rnn import rnn_bwd, rnn_fwd

MODES = ("LSTM", "GRU", "RNN_TANH", "RNN_RELU")
GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
VARIANTS = ("stepwise", "persistent")
# Bounded spin of the grid barrier: ~1e8 polls is seconds, far beyond any real step.
MAX_SPIN = tl.constexpr(100_000_000)


# The step range changes every stepwise launch: without do_not_specialize, Triton would compile
# separate variants for a bound equal to 1 or divisible by 16 (and pick among them per launch).
@triton.jit(do_not_specialize=["s_begin", "s_end"])
def scan_fwd_kernel(
    p_xg, p_whh, p_bhh, p_h0, p_c0, p_len,
    p_hst, p_cst, p_hraw, p_whr,
    p_y, p_hn, p_cn, p_hp, p_gates, p_cs, p_sync,
    s_begin, s_end, T, B, H, P, D,
    MODE: tl.constexpr, G: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LEN: tl.constexpr,
    HAS_PROJ: tl.constexpr, SAVE: tl.constexpr, PERSISTENT: tl.constexpr, GRID_SYNC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr,
):
    CDT = p_hst.dtype.element_ty
    # Exchanged state must bypass L1 when other SMs write it (GRID_SYNC).
    CACHE: tl.constexpr = ".cg" if GRID_SYNC else ""
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1)
    pid_h = tl.program_id(2)
    GH = G * H
    W = 4 * H if G > 1 else H
    offs_j, offs_b, offs_k, mask_j, mask_b, mask_jb = unit_tile(B, H, BLOCK_B, BLOCK_H, BLOCK_K)
    p_w = p_whh + pid_d * GH * P
    o_w = offs_j[:, None] * P + offs_k[None, :]
    if PERSISTENT:
        # The whole K = P fits one chunk (persistent_plan guarantees BLOCK_K >= P): this program's
        # weights stay on chip for the whole sequence (registers; for a wgmma the compiler moves
        # them to shared memory once, before the loop).
        mask_w = mask_j[:, None] & (offs_k[None, :] < P)
        w_0 = wload(p_w + o_w, mask_w, CDT, PREC)
        if G > 1:
            w_1 = wload(p_w + H * P + o_w, mask_w, CDT, PREC)
            w_2 = wload(p_w + 2 * H * P + o_w, mask_w, CDT, PREC)
        if G > 3:
            w_3 = wload(p_w + 3 * H * P + o_w, mask_w, CDT, PREC)
    if HAS_BIAS:
        p_bias = p_bhh + pid_d * GH + offs_j
        bias_0 = tl.load(p_bias, mask=mask_j, other=0.0).to(CDT)
        if G > 1:
            bias_1 = tl.load(p_bias + H, mask=mask_j, other=0.0).to(CDT)
            bias_2 = tl.load(p_bias + 2 * H, mask=mask_j, other=0.0).to(CDT)
        if G > 3:
            bias_3 = tl.load(p_bias + 3 * H, mask=mask_j, other=0.0).to(CDT)
    n_prog = tl.num_programs(1) * tl.num_programs(2)
    ok = pid_d * 0 + 1
    n_sync = pid_d * 0

    for s in range(s_begin, s_end):
        t, live = row_time(s, T, offs_b, mask_b, p_len, pid_d == 1, HAS_LEN)
        live2 = live[None, :]
        cur = s % 2
        p_hcur = p_hst + (cur * D + pid_d) * B * P
        p_hnxt = p_hst + ((1 - cur) * D + pid_d) * B * P

        # hidden-side pre-activations hh_g^T = W_hh[g*H + j, :] h_prev^T, all gates of units j
        acc_0 = tl.zeros((BLOCK_H, BLOCK_B), dtype=CDT)
        acc_1 = tl.zeros((BLOCK_H, BLOCK_B), dtype=CDT)
        acc_2 = tl.zeros((BLOCK_H, BLOCK_B), dtype=CDT)
        acc_3 = tl.zeros((BLOCK_H, BLOCK_B), dtype=CDT)
        for k0 in range(0, P, BLOCK_K):
            kk = k0 + offs_k
            mask_k = kk < P
            mask_kb = mask_k[:, None] & mask_b[None, :]
            o_h = offs_b[None, :] * P + kk[:, None]
            if s == 0:
                b_h = tl.load(p_h0 + pid_d * B * P + o_h, mask=mask_kb, other=0.0).to(CDT)
            else:
                b_h = tl.load(p_hcur + o_h, mask=mask_kb, other=0.0, cache_modifier=CACHE)
            if SAVE:
                # hp (state entering each step) is written once, by the programs of hidden tile 0.
                p_hpt = p_hp + ((pid_d * T + t[None, :]) * B + offs_b[None, :]) * P + kk[:, None]
                if pid_h == 0:
                    tl.store(p_hpt, b_h, mask=mask_kb)
            if PERSISTENT:
                b_w0 = w_0
            else:
                mask_w = mask_j[:, None] & mask_k[None, :]
                b_w0 = wload(p_w + o_w + k0, mask_w, CDT, PREC)
            acc_0 = mdot(b_w0, b_h, acc_0, PREC)
            if G > 1:
                if PERSISTENT:
                    b_w1 = w_1
                    b_w2 = w_2
                else:
                    b_w1 = wload(p_w + H * P + o_w + k0, mask_w, CDT, PREC)
                    b_w2 = wload(p_w + 2 * H * P + o_w + k0, mask_w, CDT, PREC)
                acc_1 = mdot(b_w1, b_h, acc_1, PREC)
                acc_2 = mdot(b_w2, b_h, acc_2, PREC)
            if G > 3:
                if PERSISTENT:
                    b_w3 = w_3
                else:
                    b_w3 = wload(p_w + 3 * H * P + o_w + k0, mask_w, CDT, PREC)
                acc_3 = mdot(b_w3, b_h, acc_3, PREC)
        if HAS_BIAS:
            acc_0 += bias_0[:, None]
            if G > 1:
                acc_1 += bias_1[:, None]
                acc_2 += bias_2[:, None]
            if G > 3:
                acc_3 += bias_3[:, None]

        # input side: each row reads its own time index t_b
        p_x = p_xg + ((pid_d * T + t[None, :]) * B + offs_b[None, :]) * GH + offs_j[:, None]
        x_0 = tl.load(p_x, mask=mask_jb, other=0.0).to(CDT)
        if G > 1:
            x_1 = tl.load(p_x + H, mask=mask_jb, other=0.0).to(CDT)
            x_2 = tl.load(p_x + 2 * H, mask=mask_jb, other=0.0).to(CDT)
        if G > 3:
            x_3 = tl.load(p_x + 3 * H, mask=mask_jb, other=0.0).to(CDT)

        o_own = offs_b[None, :] * P + offs_j[:, None]
        if s == 0:
            h_prev = tl.load(p_h0 + pid_d * B * P + o_own, mask=mask_jb, other=0.0).to(CDT)
        else:
            h_prev = tl.load(p_hcur + o_own, mask=mask_jb, other=0.0, cache_modifier=CACHE)

        p_sv = p_gates + ((pid_d * T + t[None, :]) * B + offs_b[None, :]) * W + offs_j[:, None]
        if MODE == "LSTM":
            o_c = offs_b[None, :] * H + offs_j[:, None]
            if s == 0:
                c_prev = tl.load(p_c0 + pid_d * B * H + o_c, mask=mask_jb, other=0.0).to(CDT)
            else:
                c_prev = tl.load(p_cst + (cur * D + pid_d) * B * H + o_c, mask=mask_jb, other=0.0)
            h_new, c_new, s_0, s_1, s_2, s_3 = lstm_fwd(x_0, x_1, x_2, x_3, acc_0, acc_1, acc_2, acc_3,
                                                        c_prev)
            c_keep = tl.where(live2, c_new, c_prev)
            tl.store(p_cst + ((1 - cur) * D + pid_d) * B * H + o_c, c_keep, mask=mask_jb)
            if s == T - 1:
                tl.store(p_cn + pid_d * B * H + o_c, c_keep.to(p_cn.dtype.element_ty), mask=mask_jb)
            if SAVE:
                p_cst_t = p_cs + ((pid_d * T + t[None, :]) * B + offs_b[None, :]) * H + offs_j[:, None]
                tl.store(p_cst_t, c_prev, mask=mask_jb)
        elif MODE == "GRU":
            h_new, s_0, s_1, s_2 = gru_fwd(x_0, x_1, x_2, acc_0, acc_1, acc_2, h_prev)
            s_3 = acc_2
        else:
            h_new = rnn_fwd(x_0 + acc_0, MODE == "RNN_RELU")
            s_0 = h_new
        if SAVE:
            tl.store(p_sv, s_0, mask=mask_jb)
            if G > 1:
                tl.store(p_sv + H, s_1, mask=mask_jb)
                tl.store(p_sv + 2 * H, s_2, mask=mask_jb)
                tl.store(p_sv + 3 * H, s_3, mask=mask_jb)

        if HAS_PROJ:
            # o * tanh(c) of these units; the projection needs all H of them (next launch, or
            # after the barrier when persistent). Dead rows' values are never used.
            tl.store(p_hraw + pid_d * B * H + offs_b[None, :] * H + offs_j[:, None], h_new, mask=mask_jb)
            if PERSISTENT:
                n_sync += 1
                ok = step_barrier(p_sync + pid_d, p_sync + D, n_prog * n_sync, ok, GRID_SYNC, MAX_SPIN)
                # BLOCK_K >= P here, so program (pid_b, 0) projects all P units of its rows.
                lstm_proj_fwd_step(s, pid_d, pid_b, pid_h, T, B, H, P, D,
                                   p_hraw, p_whr, p_h0, p_hst, p_y, p_hn, p_len,
                                   HAS_LEN, BLOCK_B, BLOCK_K, BLOCK_H, PREC, CACHE)
        else:
            h_keep = tl.where(live2, h_new, h_prev)
            tl.store(p_hnxt + o_own, h_keep, mask=mask_jb)
            p_yt = p_y + (t[None, :] * B + offs_b[None, :]) * (D * P) + pid_d * P + offs_j[:, None]
            tl.store(p_yt, tl.where(live2, h_new, 0.0).to(p_y.dtype.element_ty), mask=mask_jb)
            if s == T - 1:
                tl.store(p_hn + pid_d * B * P + o_own, h_keep.to(p_hn.dtype.element_ty), mask=mask_jb)
        if PERSISTENT:
            n_sync += 1
            ok = step_barrier(p_sync + pid_d, p_sync + D, n_prog * n_sync, ok, GRID_SYNC, MAX_SPIN)


@triton.jit(do_not_specialize=["i_begin", "i_end"])
def scan_bwd_kernel(
    p_dy, p_dhn, p_dcn, p_whh, p_whr, p_len, p_hp, p_gates, p_cs,
    p_dghbuf, p_carry, p_dcst, p_dhtot,
    p_dxg, p_dgh, p_dh0, p_dc0, p_dhp, p_sync,
    i_begin, i_end, T, B, H, P, D,
    MODE: tl.constexpr, G: tl.constexpr, HAS_LEN: tl.constexpr, HAS_PROJ: tl.constexpr,
    PERSISTENT: tl.constexpr, GRID_SYNC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr,
):
    """Iteration i handles step s = T - 1 - i; the last iteration (s = -1) only forms dh0."""
    CDT = p_hp.dtype.element_ty
    CACHE: tl.constexpr = ".cg" if GRID_SYNC else ""
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1)
    pid_h = tl.program_id(2)
    GH = G * H
    W = 4 * H if G > 1 else H
    offs_j, offs_b, offs_k, mask_j, mask_b, mask_jb = unit_tile(B, H, BLOCK_B, BLOCK_H, BLOCK_K)
    o_own = offs_b[None, :] * P + offs_j[:, None]
    o_c = offs_b[None, :] * H + offs_j[:, None]
    HOIST: tl.constexpr = PERSISTENT and not HAS_PROJ
    if HOIST:
        # W_hh[g*H + k, j] for k < H (BLOCK_K >= H) and units j (P = H without a projection; with
        # one, dh is formed over P units by lstm_proj_bwd_step, which streams W_hh instead).
        p_w = p_whh + pid_d * GH * P
        o_w = offs_k[None, :] * P + offs_j[:, None]
        mask_w = mask_j[:, None] & (offs_k[None, :] < H)
        w_0 = wload(p_w + o_w, mask_w, CDT, PREC)
        w_1 = w_0
        w_2 = w_0
        w_3 = w_0
        if G > 1:
            w_1 = wload(p_w + H * P + o_w, mask_w, CDT, PREC)
            w_2 = wload(p_w + 2 * H * P + o_w, mask_w, CDT, PREC)
        if G > 3:
            w_3 = wload(p_w + 3 * H * P + o_w, mask_w, CDT, PREC)
    else:
        # placeholders: bwd_dh_carry takes the four tiles either way and ignores them unless HOIST
        w_0 = p_whh
        w_1 = p_whh
        w_2 = p_whh
        w_3 = p_whh
    n_prog = tl.num_programs(1) * tl.num_programs(2)
    ok = pid_d * 0 + 1
    n_sync = pid_d * 0

    for i in range(i_begin, i_end):
        s = T - 1 - i
        if s >= 0:
            t, live = row_time(s, T, offs_b, mask_b, p_len, pid_d == 1, HAS_LEN)
            live2 = live[None, :]
            if HAS_PROJ:
                # dh over the P units (stepwise: the launch before this one) then back through
                # the projection: dh_raw = dh W_hr[:, j].
                if PERSISTENT:
                    # BLOCK_K >= P: program (pid_b, 0) forms dh for all P units of its rows.
                    lstm_proj_bwd_step(s, pid_d, pid_b, pid_h, T, B, H, P, D,
                                       p_dy, p_dhn, p_whh, p_len, p_dghbuf, p_carry, p_dhtot, p_dhp, p_dh0,
                                       HAS_LEN, BLOCK_B, BLOCK_K, BLOCK_H, PREC, CACHE)
                    n_sync += 1
                    ok = step_barrier(p_sync + pid_d, p_sync + D, n_prog * n_sync, ok, GRID_SYNC, MAX_SPIN)
                p_r = p_whr + pid_d * P * H
                p_dt = p_dhtot + pid_d * B * P
                dh = tl.zeros((BLOCK_H, BLOCK_B), dtype=CDT)
                for k0 in range(0, P, BLOCK_K):
                    kk = k0 + offs_k
                    mask_k = kk < P
                    b_r = wload(p_r + kk[None, :] * H + offs_j[:, None], mask_j[:, None] & mask_k[None, :],
                                CDT, PREC)
                    b_d = tl.load(p_dt + offs_b[None, :] * P + kk[:, None],
                                  mask=mask_k[:, None] & mask_b[None, :], other=0.0, cache_modifier=CACHE)
                    dh = mdot(b_r, b_d, dh, PREC)
            else:
                dh = bwd_dh_carry(s, pid_d, offs_j, mask_j, offs_b, mask_b, T, B, H, P, D, G,
                                  p_dhn, p_whh, p_dghbuf, p_carry, w_0, w_1, w_2, w_3,
                                  HOIST, BLOCK_K, PREC, CACHE)
                p_dyt = p_dy + (t[None, :] * B + offs_b[None, :]) * (D * P) + pid_d * P + offs_j[:, None]
                dh += tl.load(p_dyt, mask=mask_jb & live2, other=0.0).to(CDT)

            p_sv = p_gates + ((pid_d * T + t[None, :]) * B + offs_b[None, :]) * W + offs_j[:, None]
            sv_0 = tl.load(p_sv, mask=mask_jb, other=0.0)
            if G > 1:
                sv_1 = tl.load(p_sv + H, mask=mask_jb, other=0.0)
                sv_2 = tl.load(p_sv + 2 * H, mask=mask_jb, other=0.0)
                sv_3 = tl.load(p_sv + 3 * H, mask=mask_jb, other=0.0)
            if MODE == "LSTM":
                if s == T - 1:
                    dc = tl.load(p_dcn + pid_d * B * H + o_c, mask=mask_jb, other=0.0).to(CDT)
                else:
                    dc = tl.load(p_dcst + (((s + 1) % 2) * D + pid_d) * B * H + o_c, mask=mask_jb, other=0.0)
                p_cst_t = p_cs + ((pid_d * T + t[None, :]) * B + offs_b[None, :]) * H + offs_j[:, None]
                c_prev = tl.load(p_cst_t, mask=mask_jb, other=0.0)
                d_0, d_1, d_2, d_3, dc_prev = lstm_bwd(dh, dc, sv_0, sv_1, sv_2, sv_3, c_prev)
                dc_keep = tl.where(live2, dc_prev, dc)
                tl.store(p_dcst + ((s % 2) * D + pid_d) * B * H + o_c, dc_keep, mask=mask_jb)
                if s == 0:
                    tl.store(p_dc0 + pid_d * B * H + o_c, dc_keep.to(p_dc0.dtype.element_ty), mask=mask_jb)
                e_0 = d_0
                e_1 = d_1
                e_2 = d_2
                e_3 = d_3
                direct = tl.zeros((BLOCK_H, BLOCK_B), dtype=CDT)
            elif MODE == "GRU":
                p_hpt = p_hp + ((pid_d * T + t[None, :]) * B + offs_b[None, :]) * P + offs_j[:, None]
                h_prev = tl.load(p_hpt, mask=mask_jb, other=0.0)
                d_0, d_1, d_2, e_2, direct = gru_bwd(dh, sv_0, sv_1, sv_2, sv_3, h_prev)
                e_0 = d_0
                e_1 = d_1
            else:
                d_0 = rnn_bwd(dh, sv_0, MODE == "RNN_RELU")
                e_0 = d_0
                direct = tl.zeros((BLOCK_H, BLOCK_B), dtype=CDT)

            # dxg (and GRU's separate dgh) in the output dtype; the fp32 dgh ping-pong feeds the
            # next step's dh. Dead rows write zeros everywhere.
            ODT = p_dxg.dtype.element_ty
            p_dx = p_dxg + ((pid_d * T + t[None, :]) * B + offs_b[None, :]) * GH + offs_j[:, None]
            p_gb = p_dghbuf + ((s % 2) * D + pid_d) * B * GH + offs_b[None, :] * GH + offs_j[:, None]
            tl.store(p_dx, tl.where(live2, d_0, 0.0).to(ODT), mask=mask_jb)
            tl.store(p_gb, tl.where(live2, e_0, 0.0), mask=mask_jb)
            if G > 1:
                tl.store(p_dx + H, tl.where(live2, d_1, 0.0).to(ODT), mask=mask_jb)
                tl.store(p_dx + 2 * H, tl.where(live2, d_2, 0.0).to(ODT), mask=mask_jb)
                tl.store(p_gb + H, tl.where(live2, e_1, 0.0), mask=mask_jb)
                tl.store(p_gb + 2 * H, tl.where(live2, e_2, 0.0), mask=mask_jb)
            if G > 3:
                tl.store(p_dx + 3 * H, tl.where(live2, d_3, 0.0).to(ODT), mask=mask_jb)
                tl.store(p_gb + 3 * H, tl.where(live2, e_3, 0.0), mask=mask_jb)
            if MODE == "GRU":
                p_dg = p_dgh + ((pid_d * T + t[None, :]) * B + offs_b[None, :]) * GH + offs_j[:, None]
                tl.store(p_dg, tl.where(live2, d_0, 0.0).to(ODT), mask=mask_jb)
                tl.store(p_dg + H, tl.where(live2, d_1, 0.0).to(ODT), mask=mask_jb)
                tl.store(p_dg + 2 * H, tl.where(live2, e_2, 0.0).to(ODT), mask=mask_jb)
            if not HAS_PROJ:
                tl.store(p_carry + ((s % 2) * D + pid_d) * B * P + o_own, tl.where(live2, direct, dh),
                         mask=mask_jb)
        else:
            if HAS_PROJ:
                if PERSISTENT:
                    lstm_proj_bwd_step(s, pid_d, pid_b, pid_h, T, B, H, P, D,
                                       p_dy, p_dhn, p_whh, p_len, p_dghbuf, p_carry, p_dhtot, p_dhp, p_dh0,
                                       HAS_LEN, BLOCK_B, BLOCK_K, BLOCK_H, PREC, CACHE)
            else:
                dh = bwd_dh_carry(s, pid_d, offs_j, mask_j, offs_b, mask_b, T, B, H, P, D, G,
                                  p_dhn, p_whh, p_dghbuf, p_carry, w_0, w_1, w_2, w_3,
                                  HOIST, BLOCK_K, PREC, CACHE)
                tl.store(p_dh0 + pid_d * B * P + o_own, dh.to(p_dh0.dtype.element_ty), mask=mask_jb)
        if PERSISTENT:
            n_sync += 1
            ok = step_barrier(p_sync + pid_d, p_sync + D, n_prog * n_sync, ok, GRID_SYNC, MAX_SPIN)


# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------

def _np2(n):
    return triton.next_power_of_2(max(int(n), 1))


def _clamp_block(n, cap):
    # tl.dot needs every dimension >= 16 on the GPU; masks cover the padding.
    return max(16, min(_np2(n), cap))


@dataclass(frozen=True)
class StepConfig:
    """Tiles of one stepwise launch: BLOCK_H units (M side) x BLOCK_B rows (N side), K in BLOCK_K
    chunks. Sized from the sm_90 resource table (bench/kernel_resources.py, docs/design.md): the
    float32 ieee dots run on FMA units, where each thread holds whole K-rows of its operands, so K
    is chunked by 16; with 4 gate accumulators, 32 x 16 tiles at 8 warps are the largest without
    spills (32 x 32 spilled hundreds of bytes)."""
    BLOCK_B: int
    BLOCK_H: int
    BLOCK_K: int
    num_warps: int


def step_config(mode, B, H, P, dtype):
    G = GATES[mode]
    block_b, block_h = _clamp_block(B, 32 if G == 1 else 16), _clamp_block(H, 32)
    # 4 warps spilled 16 B in the RNN backward at 32 x 32 tiles
    return StepConfig(BLOCK_B=block_b, BLOCK_H=block_h, BLOCK_K=16,
                      num_warps=8 if G > 1 or block_b * block_h >= 1024 else 4)


def proj_config(B, H, P, dtype):
    """LSTM projection launches: BLOCK_H here tiles the P state units, BLOCK_K chunks H. One dot
    per chunk (not four), so larger tiles than step_config stay spill-free."""
    return StepConfig(BLOCK_B=_clamp_block(B, 32), BLOCK_H=_clamp_block(P, 32),
                      BLOCK_K=_clamp_block(H, 32 if dtype != torch.float64 else 16), num_warps=4)


@dataclass(frozen=True)
class PersistentPlan:
    """Launch configuration of the persistent kernels. grid = (D, 1, programs per direction);
    BLOCK_B >= B and BLOCK_K >= max(H, P), so each program keeps all gates of its BLOCK_H units
    (G * BLOCK_H * BLOCK_K weights) in registers for the whole sequence."""
    grid: tuple
    BLOCK_B: int
    BLOCK_H: int
    BLOCK_K: int
    num_warps: int
    grid_sync: bool


# Register budget of one persistent CTA (8 warps), in float32-sized values per thread: resident
# weights + gate accumulators + the h operand tile, float64 counting twice. Calibrated on the sm_90
# resource table: 26 (LSTM H=32, B=16) compiles with at most 32 B of spills, 44 and above spilled
# 40-1700 B (GRU/LSTM B=64, RNN H=64 B=64).
REG_BUDGET = 32
PERSISTENT_WARPS = 8
MAX_PERSISTENT_B = 64
# Half precision (the "x2" tensor-core dots) has its own single-program rule, calibrated on the
# sm_90 and sm_80 tables: the weights stay in half precision and feed the tensor cores directly
# (wgmma reads them from shared memory), so what limits a program is the float32 accumulators and
# the split h tiles, i.e. the batch tile. At BLOCK_B = 16 a program holds 32 KiB of weights with at
# most 24 B of spills (LSTM / GRU H = 64, RNN H = 128; sm_80: none); BLOCK_B = 32 spilled 56-576 B,
# and so did a projection (192 B), which therefore stays on the general rule.
HALF_WEIGHT_BYTES = 32 * 1024
HALF_MAX_BLOCK_B = 16


def persistent_plan(mode, D, B, H, P, dtype, num_sms, smem_per_block):
    """Launch config of the persistent kernels for this layer, or None if they cannot hold it.

    Single program per direction (no grid barrier; directions are independent) when every weight
    of a direction fits one CTA's register budget (float16 / bfloat16 without a projection: up to
    32 KiB of weights at B <= 16, see HALF_WEIGHT_BYTES). Otherwise, only when FUSEDRNN_GRID_BARRIER=1,
    several programs per direction that exchange h through global memory and meet at a grid
    barrier every step; all of them must be resident at once, hence D * programs <= num_sms. That
    path has never run (no GPU was available to test it), so it is opt-in."""
    if mode not in GATES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    G = GATES[mode]
    elem = 8 if dtype == torch.float64 else 4
    BLOCK_B = _clamp_block(B, 1 << 30)
    BLOCK_K = _clamp_block(max(H, P), 1 << 30)
    if B > MAX_PERSISTENT_B:
        return None

    def fits(block_h):
        values = G * block_h * BLOCK_K + G * block_h * BLOCK_B + BLOCK_K * BLOCK_B
        per_thread = values * (elem // 4) / (32 * PERSISTENT_WARPS)
        # the dot stages one weight tile and h through shared memory
        smem = (block_h * BLOCK_K + BLOCK_K * BLOCK_B) * elem
        return per_thread <= REG_BUDGET and smem <= smem_per_block

    def plan(block_h, grid_sync):
        return PersistentPlan(grid=(D, 1, triton.cdiv(H, block_h)), BLOCK_B=BLOCK_B, BLOCK_H=block_h,
                              BLOCK_K=BLOCK_K, num_warps=PERSISTENT_WARPS, grid_sync=grid_sync)

    def fits_half(block_h):
        weights = G * block_h * BLOCK_K * 2
        # weights staged for the tensor cores, plus h / hi / lo tiles
        smem = weights + 4 * BLOCK_K * BLOCK_B * 4
        return (dtype in (torch.float16, torch.bfloat16) and P == H and BLOCK_B <= HALF_MAX_BLOCK_B
                and weights <= HALF_WEIGHT_BYTES and smem <= smem_per_block)

    single = _clamp_block(H, 1 << 30)
    if fits(single) or fits_half(single):
        return plan(single, False)
    if os.environ.get("FUSEDRNN_GRID_BARRIER") != "1" or P != H:
        # With a projection the P-side step runs in one program anyway (BLOCK_K >= P), so several
        # programs buy little, and that configuration spilled 700 B/thread (resource table).
        return None
    block_h = single // 2
    while block_h >= 16:
        if fits(block_h) and D * triton.cdiv(H, block_h) <= num_sms:
            return plan(block_h, True)
        block_h //= 2
    return None


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

_LAUNCHES = 0
_POISON = False
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def launch_count():
    """Total Triton kernel launches made by this module so far."""
    return _LAUNCHES


def set_poison(flag):
    """Test hook: fill every tensor the launchers allocate with NaN (ints with -1) before the
    kernels run, so a test sees any element a kernel failed to write."""
    global _POISON
    _POISON = bool(flag)


def _new(shape, dtype, device):
    out = torch.empty(shape, dtype=dtype, device=device)
    if _POISON and out.numel():
        out.fill_(float("nan") if out.is_floating_point() else -1)
    return out


@dataclass(frozen=True)
class Launch:
    kernel: object
    grid: tuple
    args: tuple
    constexprs: dict
    num_warps: int


def _run(launches):
    global _LAUNCHES
    for launch in launches:
        launch.kernel[launch.grid](*launch.args, **launch.constexprs, num_warps=launch.num_warps)
        _LAUNCHES += 1


def _work_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_device(name, t):
    if t.device.type in ("cuda", "meta"):  # meta: kernels/aot.py lists configurations, never launches
        return
    if t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return
    raise ValueError(f"{name} is on {t.device}: the Triton kernels need CUDA tensors "
                     "(or CPU tensors with TRITON_INTERPRET=1)")


def _check(name, t, shape, dtype, device, optional=False):
    if t is None:
        if optional:
            return
        raise ValueError(f"{name} must be a tensor, got None")
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise ValueError(f"{name} must have dtype {dtype}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _check_common(mode, variant, name, x, ndim):
    if mode not in GATES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    _check_device(name, x)


def _precision(dtype, allow_tf32, device):
    """The PREC of the dots (kernels/common.py: mdot): half-precision weights take the two-pass
    tensor-core dot ("x2emu" under the interpreter, whose bfloat16 dot is wrong); float32 follows
    allow_tf32; float64 is always exact."""
    if dtype in (torch.float16, torch.bfloat16):
        return "x2emu" if dtype == torch.bfloat16 and device.type == "cpu" else "x2"
    return "tf32" if allow_tf32 and dtype == torch.float32 else "ieee"


def _device_limits(device):
    if device.type == "meta":
        # Listing configurations for ahead-of-time compilation: an sm_90-sized device.
        return 132, 227 * 1024
    if device.type != "cuda":
        # The interpreter runs programs one after another: only single-program plans can work.
        return 1, 1 << 20
    props = torch.cuda.get_device_properties(device)
    smem = getattr(props, "shared_memory_per_block_optin", 0) or 48 * 1024
    return props.multi_processor_count, smem


def _plan_for(mode, D, B, H, P, dtype, device):
    plan = persistent_plan(mode, D, B, H, P, dtype, *_device_limits(device))
    if plan is None:
        raise ValueError(f"variant='persistent' cannot hold this layer ({mode}, D={D}, B={B}, H={H}, "
                         f"P={P}, {dtype}): persistent_plan returned None; use variant='stepwise'")
    return plan


def forward_launches(mode, xg, w_hh, b_hh, w_hr, h0, c0, lengths, save, variant, allow_tf32):
    """Validate, allocate, and list the launches of scan_forward. Returns (outputs, launches,
    sync); the launches are a generator so the stepwise loop builds them lazily."""
    _check_common(mode, variant, "xg", xg, 4)
    D, T, B, GH = xg.shape
    G = GATES[mode]
    dt, dev = xg.dtype, xg.device
    if D not in (1, 2):
        raise ValueError(f"xg.shape[0] (directions) must be 1 or 2, got {D}")
    if T < 1 or B < 1:
        raise ValueError(f"xg must have T >= 1 and B >= 1, got shape {tuple(xg.shape)}")
    if GH % G:
        raise ValueError(f"xg.shape[3] must be a multiple of {G} gates for {mode}, got {GH}")
    H = GH // G
    if not isinstance(w_hh, torch.Tensor) or w_hh.dim() != 3:
        raise ValueError("w_hh must be a 3-d tensor (D, G*H, P)")
    P = w_hh.shape[2]
    _check("w_hh", w_hh, (D, GH, P), dt, dev)
    _check("b_hh", b_hh, (D, GH), dt, dev, optional=True)
    if w_hr is not None and mode != "LSTM":
        raise ValueError(f"w_hr (projection) is only supported for LSTM, got mode {mode}")
    _check("w_hr", w_hr, (D, P, H), dt, dev, optional=True)
    if w_hr is None and P != H:
        raise ValueError(f"w_hh.shape[2] must equal H={H} without a projection, got {P}")
    _check("h0", h0, (D, B, P), dt, dev)
    if mode == "LSTM":
        _check("c0", c0, (D, B, H), dt, dev)
    _check("lengths", lengths, (B,), torch.int64, dev, optional=True)

    wdt = _work_dtype(dt)
    W = 4 * H if G > 1 else H
    y = _new((T, B, D * P), dt, dev)
    hn = _new((D, B, P), dt, dev)
    cn = _new((D, B, H), dt, dev) if mode == "LSTM" else xg.new_empty(0)
    if save:
        hp = _new((D, T, B, P), wdt, dev)
        gates = _new((D, T, B, W), wdt, dev)
        cs = _new((D, T, B, H if mode == "LSTM" else 0), wdt, dev)
    else:
        hp, gates, cs = (xg.new_empty(0, dtype=wdt) for _ in range(3))  # distinct: op outputs may not alias
    hst = _new((2, D, B, P), wdt, dev)
    cst = _new((2, D, B, H), wdt, dev) if mode == "LSTM" else hst
    hraw = _new((D, B, H), wdt, dev) if w_hr is not None else hst
    persistent = variant == "persistent"
    plan = _plan_for(mode, D, B, H, P, dt, dev) if persistent else None
    # arrive counter per direction, then the error flag; counters must start at zero.
    sync = torch.zeros(D + 1, dtype=torch.int32, device=dev) if persistent else hst
    cfg = plan if persistent else step_config(mode, B, H, P, dt)
    prec = _precision(dt, allow_tf32, dev)
    ptrs = (xg, w_hh, b_hh if b_hh is not None else xg, h0, c0 if mode == "LSTM" else h0,
            lengths if lengths is not None else xg, hst, cst, hraw, w_hr if w_hr is not None else xg,
            y, hn, cn if mode == "LSTM" else hn, hp if save else hst, gates if save else hst,
            cs if save and mode == "LSTM" else hst, sync)
    constexprs = dict(MODE=mode, G=G, HAS_BIAS=b_hh is not None, HAS_LEN=lengths is not None,
                      HAS_PROJ=w_hr is not None, SAVE=bool(save), PERSISTENT=persistent,
                      GRID_SYNC=bool(persistent and plan.grid_sync), BLOCK_B=cfg.BLOCK_B,
                      BLOCK_H=cfg.BLOCK_H, BLOCK_K=cfg.BLOCK_K, PREC=prec)

    def launches():
        if persistent:
            yield Launch(scan_fwd_kernel, plan.grid, ptrs + (0, T, T, B, H, P, D), constexprs, plan.num_warps)
            return
        grid = (D, triton.cdiv(B, cfg.BLOCK_B), triton.cdiv(H, cfg.BLOCK_H))
        pcfg = proj_config(B, H, P, dt)
        pgrid = (D, triton.cdiv(B, pcfg.BLOCK_B), triton.cdiv(P, pcfg.BLOCK_H))
        for s in range(T):
            yield Launch(scan_fwd_kernel, grid, ptrs + (s, s + 1, T, B, H, P, D), constexprs, cfg.num_warps)
            if w_hr is not None:
                yield Launch(lstm_proj_fwd_kernel, pgrid,
                             (hraw, w_hr, h0, hst, y, hn, lengths if lengths is not None else xg,
                              s, T, B, H, P, D),
                             dict(HAS_LEN=lengths is not None, BLOCK_B=pcfg.BLOCK_B, BLOCK_P=pcfg.BLOCK_H,
                                  BLOCK_K=pcfg.BLOCK_K, PREC=prec), pcfg.num_warps)

    return (y, hn, cn, hp, gates, cs), launches(), (sync if persistent and plan.grid_sync else None)


def backward_launches(mode, dy, dhn, dcn, w_hh, w_hr, lengths, hp, gates, cs, variant, allow_tf32):
    """Validate, allocate, and list the launches of scan_backward (see forward_launches)."""
    _check_common(mode, variant, "dy", dy, 3)
    G = GATES[mode]
    dt, dev = dy.dtype, dy.device
    wdt = _work_dtype(dt)
    if not isinstance(hp, torch.Tensor) or hp.dim() != 4:
        raise ValueError("hp must be a 4-d tensor (D, T, B, P): the forward's saved workspace (save=True)")
    if not isinstance(w_hh, torch.Tensor) or w_hh.dim() != 3:
        raise ValueError("w_hh must be a 3-d tensor (D, G*H, P)")
    D, T, B, P = hp.shape
    GH = w_hh.shape[1]
    if D not in (1, 2) or T < 1 or B < 1:
        raise ValueError(f"hp must have D in (1, 2), T >= 1, B >= 1, got shape {tuple(hp.shape)}")
    if GH % G:
        raise ValueError(f"w_hh.shape[1] must be a multiple of {G} gates for {mode}, got {GH}")
    H = GH // G
    W = 4 * H if G > 1 else H
    _check("dy", dy, (T, B, D * P), dt, dev)
    _check("dhn", dhn, (D, B, P), dt, dev)
    if mode == "LSTM":
        _check("dcn", dcn, (D, B, H), dt, dev)
    _check("w_hh", w_hh, (D, GH, P), dt, dev)
    if w_hr is not None and mode != "LSTM":
        raise ValueError(f"w_hr (projection) is only supported for LSTM, got mode {mode}")
    _check("w_hr", w_hr, (D, P, H), dt, dev, optional=True)
    if w_hr is None and P != H:
        raise ValueError(f"hp.shape[3] must equal H={H} without a projection, got {P}")
    _check("lengths", lengths, (B,), torch.int64, dev, optional=True)
    _check("hp", hp, (D, T, B, P), wdt, dev)
    _check("gates", gates, (D, T, B, W), wdt, dev)
    _check("cs", cs, (D, T, B, H if mode == "LSTM" else 0), wdt, dev)

    dxg = _new((D, T, B, GH), dt, dev)
    dgh = _new((D, T, B, GH), dt, dev) if mode == "GRU" else dxg
    dh0 = _new((D, B, P), dt, dev)
    dc0 = _new((D, B, H), dt, dev) if mode == "LSTM" else dy.new_empty(0)
    dhp = _new((D, T, B, P), dt, dev) if w_hr is not None else None
    dghbuf = _new((2, D, B, GH), wdt, dev)
    carry = _new((2, D, B, P), wdt, dev)
    dcst = _new((2, D, B, H), wdt, dev) if mode == "LSTM" else carry
    dhtot = _new((D, B, P), wdt, dev) if w_hr is not None else carry
    persistent = variant == "persistent"
    plan = _plan_for(mode, D, B, H, P, dt, dev) if persistent else None
    sync = torch.zeros(D + 1, dtype=torch.int32, device=dev) if persistent else carry
    cfg = plan if persistent else step_config(mode, B, H, P, dt)
    prec = _precision(dt, allow_tf32, dev)
    len_ptr = lengths if lengths is not None else dy
    ptrs = (dy, dhn, dcn if mode == "LSTM" else dhn, w_hh, w_hr if w_hr is not None else w_hh, len_ptr,
            hp, gates, cs if mode == "LSTM" else hp, dghbuf, carry, dcst, dhtot,
            dxg, dgh, dh0, dc0 if mode == "LSTM" else dh0, dhp if dhp is not None else dh0, sync)
    constexprs = dict(MODE=mode, G=G, HAS_LEN=lengths is not None, HAS_PROJ=w_hr is not None,
                      PERSISTENT=persistent, GRID_SYNC=bool(persistent and plan.grid_sync),
                      BLOCK_B=cfg.BLOCK_B, BLOCK_H=cfg.BLOCK_H, BLOCK_K=cfg.BLOCK_K, PREC=prec)

    def launches():
        if persistent:
            yield Launch(scan_bwd_kernel, plan.grid, ptrs + (0, T + 1, T, B, H, P, D), constexprs,
                         plan.num_warps)
            return
        grid = (D, triton.cdiv(B, cfg.BLOCK_B), triton.cdiv(H, cfg.BLOCK_H))
        pcfg = proj_config(B, H, P, dt)
        pgrid = (D, triton.cdiv(B, pcfg.BLOCK_B), triton.cdiv(P, pcfg.BLOCK_H))
        # iteration i is step s = T - 1 - i; i = T (s = -1) forms dh0
        for i in range(T + 1):
            if w_hr is not None:
                yield Launch(lstm_proj_bwd_kernel, pgrid,
                             (dy, dhn, w_hh, len_ptr, dghbuf, carry, dhtot, dhp, dh0,
                              T - 1 - i, T, B, H, P, D),
                             dict(HAS_LEN=lengths is not None, BLOCK_B=pcfg.BLOCK_B, BLOCK_P=pcfg.BLOCK_H,
                                  BLOCK_K=pcfg.BLOCK_K, PREC=prec), pcfg.num_warps)
                if i == T:
                    break
            yield Launch(scan_bwd_kernel, grid, ptrs + (i, i + 1, T, B, H, P, D), constexprs, cfg.num_warps)

    return (dxg, dgh, dh0, dc0, dhp), launches(), (sync if persistent and plan.grid_sync else None)


def _check_sync(sync, D):
    if sync is not None and int(sync[D].item()) != 0:
        raise RuntimeError("persistent kernel: the grid barrier timed out (programs not co-resident?); "
                           "the outputs are invalid. Unset FUSEDRNN_GRID_BARRIER to use single-program plans.")


def scan_forward(mode, xg, w_hh, b_hh, w_hr, h0, c0, lengths, save, *, variant="stepwise", allow_tf32=False):
    """The scan contract's forward (docs/design.md). Returns (y, hn, cn, hp, gates, cs)."""
    outs, launches, sync = forward_launches(mode, xg, w_hh, b_hh, w_hr, h0, c0, lengths, save, variant,
                                            allow_tf32)
    _run(launches)
    _check_sync(sync, xg.shape[0])
    return outs


def scan_backward(mode, dy, dhn, dcn, w_hh, w_hr, lengths, hp, gates, cs, *, variant="stepwise",
                  allow_tf32=False):
    """The scan contract's backward (docs/design.md). Returns (dxg, dgh, dh0, dc0, dhp)."""
    outs, launches, sync = backward_launches(mode, dy, dhn, dcn, w_hh, w_hr, lengths, hp, gates, cs, variant,
                                             allow_tf32)
    _run(launches)
    _check_sync(sync, hp.shape[0])
    return outs
