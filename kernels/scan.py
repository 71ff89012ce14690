"""The recurrent scan: the step kernels of every mode (constexpr MODE) and their launchers.

Shape legend:
    D directions (d = 1 runs backwards in time)  T steps  B batch  H hidden  P state (proj or H)
    G gates (LSTM 4, GRU 3, RNN 1)  GH = G * H  W saved gate width (4H LSTM/GRU, H RNN)
    xg (D, T, B, GH)  w_hh (D, GH, P)  b_hh (D, GH)  w_hr (D, P, H)  h0 (D, B, P)  c0 (D, B, H)
    y (T, B, D*P)  hp (D, T, B, P)  gates (D, T, B, W)  cs (D, T, B, H)
    hst (2, D, B, P) / cst (2, D, B, H)    ping-pong state: step s reads slot s%2, writes (s+1)%2
    dghbuf (2, D, B, GH) / carry (2, D, B, P) / dcst (2, D, B, H)   the same for the backward
    hraw (D, B, H) / dhtot (D, B, P)        the two sides of the LSTM projection within a step
    sync (D + 1,) int32                     grid barrier counters (kernels/common.py: step_barrier)
Every tile in a kernel is [units, batch] (BLOCK_H, BLOCK_B): gates^T = W_hh h^T puts the weight
rows on the M side of the dot, which the tensor cores need to be >= 16 (wgmma: 64) even at batch 1.

One step kernel serves both kernels of the scan. "stepwise": the launcher loops over s and each
launch runs one iteration of the in-kernel time loop. "persistent" (PERSISTENT): one launch runs
the whole loop, the weight tiles of the program's units are loaded once before it, and
step_barrier separates the steps. Ping-pong buffers (not in-place state) because other programs,
or other warps of this one, may still read slot s%2 while this step writes.

Absent tensors are passed as None; @triton.heuristics turns them into the constexpr flags
(HAS_BIAS, HAS_LEN, HAS_PROJ, SAVE, GRID_SYNC, and the variants' ZONEOUT, RESET), and G follows
from MODE.

Variants (issue 12; fusedrnn/reference.py defines them), pointwise additions:
    ZONEOUT (2: mask zm (D, T, B, P) bool, training; 1: eval probability zp (1,); 0: off)
        forward h_t = z h_{t-1} + (1 - z) h~_t (y and the carried state); backward: (1 - z) dh
        enters the cell, z dh joins the direct term that reaches h_{t-1} (the carry).
    RESET (reset (D, T, B) bool): where set, h0 / c0 replace h_prev / c_prev (the dot operand
        too) before the step, and hp / cs save them. Backward: the gradient reaching the state
        that entered a restarted step goes to dh0acc / dc0acc (D, B, P) / (D, B, H) (work dtype,
        zeroed; each element has one owning program, so no atomics) instead of the carry, and
        dh0 / dc0 = the carry through step 0 + the accumulators. Arguments that change from
launch to launch (the step range) are do_not_specialize: otherwise the JIT would compile, and
choose per launch among, separate binaries for a bound equal to 1 or divisible by 16.
"""
import torch
import triton
import triton.language as tl

from fusedrnn.spec import GATES, MODES, TRITON_KERNELS, check_choice, saved_widths, work_dtype

from .common import (MAX_SPIN, bwd_dh_carry, carry_dc, divert_restart, dot_gates, load_gate_weights, load_gates,
                     mdot, restart_rows, row_time, step_barrier, store_gate_grads, store_gates, store_live_gates, stream_dot_gates,
                     unit_tile, wload, zoneout_weight)
from .gru import gru_bwd, gru_fwd
from .launch import Launch, check_float, check_tensor, new, resolve, run
from .lstm import lstm_bwd, lstm_fwd, lstm_proj_bwd_step, lstm_proj_fwd_step
from .plan import dot_precision, plan_for, proj_config, step_config
from .rnn import rnn_bwd, rnn_fwd


def _gates(args):
    return GATES[args["MODE"]]


def _given(name):
    return lambda args: args[name] is not None


def _zoneout(args):
    return 2 if args["p_zm"] is not None else (1 if args["p_zp"] is not None else 0)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------

@triton.heuristics({"G": _gates, "HAS_BIAS": _given("p_bhh"), "HAS_LEN": _given("p_len"),
                    "HAS_PROJ": _given("p_whr"), "SAVE": _given("p_hp"), "GRID_SYNC": _given("p_sync"),
                    "ZONEOUT": _zoneout, "RESET": _given("p_reset")})
@triton.jit(do_not_specialize=["s_begin", "s_end"])
def scan_fwd_kernel(
    p_xg, p_whh, p_bhh, p_whr, p_h0, p_c0, p_len, p_zm, p_zp, p_reset,
    p_y, p_hn, p_cn, p_hp, p_gates, p_cs,
    p_hst, p_cst, p_hraw, p_sync,
    s_begin, s_end, T, B, H, P, D,
    MODE: tl.constexpr, PERSISTENT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr,
    G: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LEN: tl.constexpr, HAS_PROJ: tl.constexpr,
    SAVE: tl.constexpr, GRID_SYNC: tl.constexpr, ZONEOUT: tl.constexpr, RESET: tl.constexpr,
):
    """Forward steps s_begin .. s_end - 1 of every direction (grid axis 0), for BLOCK_B rows (axis
    1) and all gates of BLOCK_H hidden units (axis 2), so the cell update needs no exchange."""
    tl.static_assert(BLOCK_B >= 16 and BLOCK_H >= 16 and BLOCK_K >= 16, "tl.dot needs tiles >= 16")
    tl.static_assert(G == 4 or not HAS_PROJ, "the projection is LSTM-only")
    tl.static_assert(PERSISTENT or not GRID_SYNC, "the grid barrier belongs to the persistent kernel")
    tl.static_assert(ZONEOUT == 0 or not HAS_PROJ, "zoneout of a projected state is not implemented")
    CDT = p_hst.dtype.element_ty
    # Exchanged state must bypass L1 when other SMs write it (GRID_SYNC).
    CACHE: tl.constexpr = ".cg" if GRID_SYNC else ""
    NW: tl.constexpr = 4 if G > 1 else 1  # saved gate tiles (W = NW * H)
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1)
    pid_h = tl.program_id(2)
    GH = G * H
    W = NW * H
    offs_j, offs_b, offs_k, mask_j, mask_b, mask_jb = unit_tile(B, H, BLOCK_B, BLOCK_H, BLOCK_K)
    p_w = p_whh + pid_d * GH * P
    o_w = offs_j[:, None] * P + offs_k[None, :]
    if PERSISTENT:
        # The whole K = P fits one chunk (persistent_plan: BLOCK_K >= P), so this program's weights
        # stay on chip for the whole sequence (registers; for a wgmma the compiler moves them to
        # shared memory once, before the loop).
        tl.device_assert(P <= BLOCK_K, "persistent: BLOCK_K must cover P")
        w_0, w_1, w_2, w_3 = load_gate_weights(p_w, H, P, o_w, mask_j[:, None] & (offs_k[None, :] < P),
                                               G, CDT, PREC)
    if HAS_BIAS:
        bias_0, bias_1, bias_2, bias_3 = load_gates(p_bhh + pid_d * GH + offs_j, H, mask_j, G, CDT)
    n_prog = tl.num_programs(1) * tl.num_programs(2)
    ok = pid_d * 0 + 1
    n_sync = pid_d * 0

    for s in range(s_begin, s_end):
        t, live = row_time(s, T, offs_b, mask_b, p_len, pid_d == 1, HAS_LEN)
        live2 = live[None, :]
        if RESET:
            rst2 = restart_rows(p_reset, pid_d, t, live, offs_b, T, B)[None, :]
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
                if RESET:
                    b_h0 = tl.load(p_h0 + pid_d * B * P + o_h, mask=mask_kb & rst2, other=0.0).to(CDT)
                    b_h = tl.where(rst2, b_h0, b_h)
            if SAVE:
                # hp (state entering each step) is written once, by the programs of hidden tile 0.
                p_hpt = p_hp + ((pid_d * T + t[None, :]) * B + offs_b[None, :]) * P + kk[:, None]
                if pid_h == 0:
                    tl.store(p_hpt, b_h, mask=mask_kb)
            if PERSISTENT:
                acc_0, acc_1, acc_2, acc_3 = dot_gates(w_0, w_1, w_2, w_3, b_h, acc_0, acc_1, acc_2, acc_3,
                                                       G, PREC)
            else:
                acc_0, acc_1, acc_2, acc_3 = stream_dot_gates(p_w, H, P, o_w, k0, mask_j[:, None] & mask_k[None, :],
                                                              b_h, acc_0, acc_1, acc_2, acc_3, G, CDT, PREC)
        if HAS_BIAS:
            # (the tiles of gates a cell does not have are never read)
            acc_0 += bias_0[:, None]
            acc_1 += bias_1[:, None]
            acc_2 += bias_2[:, None]
            acc_3 += bias_3[:, None]

        # input side: each row reads its own time index t_b
        p_x = p_xg + ((pid_d * T + t[None, :]) * B + offs_b[None, :]) * GH + offs_j[:, None]
        x_0, x_1, x_2, x_3 = load_gates(p_x, H, mask_jb, G, CDT)

        o_own = offs_b[None, :] * P + offs_j[:, None]
        if s == 0:
            h_prev = tl.load(p_h0 + pid_d * B * P + o_own, mask=mask_jb, other=0.0).to(CDT)
        else:
            h_prev = tl.load(p_hcur + o_own, mask=mask_jb, other=0.0, cache_modifier=CACHE)
            if RESET:
                h_init = tl.load(p_h0 + pid_d * B * P + o_own, mask=mask_jb & rst2, other=0.0).to(CDT)
                h_prev = tl.where(rst2, h_init, h_prev)

        if SAVE:
            p_sv = p_gates + ((pid_d * T + t[None, :]) * B + offs_b[None, :]) * W + offs_j[:, None]
        if MODE == "LSTM":
            o_c = offs_b[None, :] * H + offs_j[:, None]
            if s == 0:
                c_prev = tl.load(p_c0 + pid_d * B * H + o_c, mask=mask_jb, other=0.0).to(CDT)
            else:
                c_prev = tl.load(p_cst + (cur * D + pid_d) * B * H + o_c, mask=mask_jb, other=0.0)
                if RESET:
                    c_init = tl.load(p_c0 + pid_d * B * H + o_c, mask=mask_jb & rst2, other=0.0).to(CDT)
                    c_prev = tl.where(rst2, c_init, c_prev)
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
            s_3 = acc_2  # W_hn h + b_hn, for dr
        else:
            h_new = rnn_fwd(x_0 + acc_0, MODE == "RNN_RELU")
            s_0, s_1, s_2, s_3 = h_new, h_new, h_new, h_new
        if SAVE:
            store_gates(p_sv, H, mask_jb, NW, s_0, s_1, s_2, s_3)
        if ZONEOUT > 0:
            # (after the save: RNN's backward needs the cell's own h~)
            z = zoneout_weight(p_zm, p_zp, pid_d, t, offs_b, offs_j, mask_jb, T, B, P, ZONEOUT, CDT,
                               BLOCK_H, BLOCK_B)
            h_new = z * h_prev + (1.0 - z) * h_new

        if HAS_PROJ:
            # o * tanh(c) of these units; the projection needs all H of them (next launch, or
            # after the barrier when persistent). Dead rows' values are never used.
            tl.store(p_hraw + pid_d * B * H + offs_b[None, :] * H + offs_j[:, None], h_new, mask=mask_jb)
            if PERSISTENT:
                n_sync += 1
                ok = step_barrier(p_sync, pid_d, D, n_prog, n_sync, ok, GRID_SYNC, MAX_SPIN)
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
            ok = step_barrier(p_sync, pid_d, D, n_prog, n_sync, ok, GRID_SYNC, MAX_SPIN)


@triton.heuristics({"G": _gates, "HAS_LEN": _given("p_len"), "HAS_PROJ": _given("p_whr"),
                    "GRID_SYNC": _given("p_sync"), "ZONEOUT": _zoneout, "RESET": _given("p_reset")})
@triton.jit(do_not_specialize=["i_begin", "i_end"])
def scan_bwd_kernel(
    p_dy, p_dhn, p_dcn, p_whh, p_whr, p_len, p_hp, p_gates, p_cs, p_zm, p_zp, p_reset,
    p_dxg, p_dgh, p_dh0, p_dc0, p_dhp,
    p_dghbuf, p_carry, p_dcst, p_dhtot, p_dh0acc, p_dc0acc, p_sync,
    i_begin, i_end, T, B, H, P, D,
    MODE: tl.constexpr, PERSISTENT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr,
    G: tl.constexpr, HAS_LEN: tl.constexpr, HAS_PROJ: tl.constexpr, GRID_SYNC: tl.constexpr,
    ZONEOUT: tl.constexpr, RESET: tl.constexpr,
):
    """Backward iterations i_begin .. i_end - 1; iteration i handles step s = T - 1 - i and the
    last one (s = -1) only forms dh0. Tiles as in scan_fwd_kernel."""
    tl.static_assert(BLOCK_B >= 16 and BLOCK_H >= 16 and BLOCK_K >= 16, "tl.dot needs tiles >= 16")
    tl.static_assert(G == 4 or not HAS_PROJ, "the projection is LSTM-only")
    tl.static_assert(PERSISTENT or not GRID_SYNC, "the grid barrier belongs to the persistent kernel")
    tl.static_assert(ZONEOUT == 0 or not HAS_PROJ, "zoneout of a projected state is not implemented")
    CDT = p_hp.dtype.element_ty
    CACHE: tl.constexpr = ".cg" if GRID_SYNC else ""
    NW: tl.constexpr = 4 if G > 1 else 1
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1)
    pid_h = tl.program_id(2)
    GH = G * H
    W = NW * H
    offs_j, offs_b, offs_k, mask_j, mask_b, mask_jb = unit_tile(B, H, BLOCK_B, BLOCK_H, BLOCK_K)
    o_own = offs_b[None, :] * P + offs_j[:, None]
    o_c = offs_b[None, :] * H + offs_j[:, None]
    HOIST: tl.constexpr = PERSISTENT and not HAS_PROJ
    if HOIST:
        # W_hh[g*H + k, j] for k < H (BLOCK_K >= H) and units j (P = H without a projection; with
        # one, dh is formed over P units by lstm_proj_bwd_step, which streams W_hh instead).
        tl.device_assert(H <= BLOCK_K, "persistent: BLOCK_K must cover H")
        p_w = p_whh + pid_d * GH * P
        o_w = offs_k[None, :] * P + offs_j[:, None]
        w_0, w_1, w_2, w_3 = load_gate_weights(p_w, H, P, o_w,
                                               mask_j[:, None] & (offs_k[None, :] < H), G, CDT, PREC)
    else:
        w_0, w_1, w_2, w_3 = None, None, None, None
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
                                       p_reset, p_dh0acc,
                                       HAS_LEN, RESET, BLOCK_B, BLOCK_K, BLOCK_H, PREC, CACHE)
                    n_sync += 1
                    ok = step_barrier(p_sync, pid_d, D, n_prog, n_sync, ok, GRID_SYNC, MAX_SPIN)
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
                if RESET:
                    dh = divert_restart(dh, s, pid_d, offs_b, mask_b, mask_jb, o_own, T, B, p_len, p_reset,
                                        p_dh0acc + pid_d * B * P, HAS_LEN)
                p_dyt = p_dy + (t[None, :] * B + offs_b[None, :]) * (D * P) + pid_d * P + offs_j[:, None]
                dh += tl.load(p_dyt, mask=mask_jb & live2, other=0.0).to(CDT)

            # dh_tot: the whole gradient of h_t; zoneout lets (1 - z) of it into the cell
            dh_tot = dh
            if ZONEOUT > 0:
                z = zoneout_weight(p_zm, p_zp, pid_d, t, offs_b, offs_j, mask_jb, T, B, P, ZONEOUT, CDT,
                                   BLOCK_H, BLOCK_B)
                dh = (1.0 - z) * dh_tot
            p_sv = p_gates + ((pid_d * T + t[None, :]) * B + offs_b[None, :]) * W + offs_j[:, None]
            sv_0, sv_1, sv_2, sv_3 = load_gates(p_sv, H, mask_jb, NW, CDT)
            # d_g: input-side pre-activation gradients (dxg); e_g: hidden-side ones (dgh), which
            # differ only in GRU's n gate; direct: the part of dh_{t-1} that bypasses W_hh.
            if MODE == "LSTM":
                if s == T - 1:
                    dc = tl.load(p_dcn + pid_d * B * H + o_c, mask=mask_jb, other=0.0).to(CDT)
                else:
                    dc = tl.load(p_dcst + (((s + 1) % 2) * D + pid_d) * B * H + o_c, mask=mask_jb, other=0.0)
                p_cst_t = p_cs + ((pid_d * T + t[None, :]) * B + offs_b[None, :]) * H + offs_j[:, None]
                c_prev = tl.load(p_cst_t, mask=mask_jb, other=0.0)
                d_0, d_1, d_2, d_3, dc_prev = lstm_bwd(dh, dc, sv_0, sv_1, sv_2, sv_3, c_prev)
                carry_dc(dc_prev, dc, s, t, live, live2, pid_d, offs_b, o_c, mask_jb, T, B, D, H, p_reset,
                         p_dc0acc, p_dcst, p_dc0, RESET)
                e_0, e_1, e_2, e_3 = d_0, d_1, d_2, d_3
                direct = tl.zeros((BLOCK_H, BLOCK_B), dtype=CDT)
            elif MODE == "GRU":
                p_hpt = p_hp + ((pid_d * T + t[None, :]) * B + offs_b[None, :]) * P + offs_j[:, None]
                h_prev = tl.load(p_hpt, mask=mask_jb, other=0.0)
                d_0, d_1, d_2, e_2, direct = gru_bwd(dh, sv_0, sv_1, sv_2, sv_3, h_prev)
                d_3 = d_0
                e_0, e_1, e_3 = d_0, d_1, d_0
            else:
                d_0 = rnn_bwd(dh, sv_0, MODE == "RNN_RELU")
                d_1, d_2, d_3 = d_0, d_0, d_0
                e_0, e_1, e_2, e_3 = d_0, d_0, d_0, d_0
                direct = tl.zeros((BLOCK_H, BLOCK_B), dtype=CDT)

            # dxg (and GRU's separate dgh) in the output dtype; the work-dtype dgh ping-pong feeds
            # the next step's dh. Dead rows write zeros everywhere.
            p_dx = p_dxg + ((pid_d * T + t[None, :]) * B + offs_b[None, :]) * GH + offs_j[:, None]
            p_gb = p_dghbuf + ((s % 2) * D + pid_d) * B * GH + offs_b[None, :] * GH + offs_j[:, None]
            store_gate_grads(p_dx, p_gb, H, mask_jb, live2, G, d_0, d_1, d_2, d_3, e_0, e_1, e_2, e_3)
            if MODE == "GRU":
                p_dg = p_dgh + ((pid_d * T + t[None, :]) * B + offs_b[None, :]) * GH + offs_j[:, None]
                store_live_gates(p_dg, H, mask_jb, live2, G, d_0, d_1, e_2, e_3)
            if not HAS_PROJ:
                if ZONEOUT > 0:
                    direct += z * dh_tot
                tl.store(p_carry + ((s % 2) * D + pid_d) * B * P + o_own, tl.where(live2, direct, dh_tot),
                         mask=mask_jb)
        else:
            if HAS_PROJ:
                if PERSISTENT:
                    lstm_proj_bwd_step(s, pid_d, pid_b, pid_h, T, B, H, P, D,
                                       p_dy, p_dhn, p_whh, p_len, p_dghbuf, p_carry, p_dhtot, p_dhp, p_dh0,
                                       p_reset, p_dh0acc,
                                       HAS_LEN, RESET, BLOCK_B, BLOCK_K, BLOCK_H, PREC, CACHE)
            else:
                dh = bwd_dh_carry(s, pid_d, offs_j, mask_j, offs_b, mask_b, T, B, H, P, D, G,
                                  p_dhn, p_whh, p_dghbuf, p_carry, w_0, w_1, w_2, w_3,
                                  HOIST, BLOCK_K, PREC, CACHE)
                if RESET:
                    dh += tl.load(p_dh0acc + pid_d * B * P + o_own, mask=mask_jb, other=0.0)
                tl.store(p_dh0 + pid_d * B * P + o_own, dh.to(p_dh0.dtype.element_ty), mask=mask_jb)
        if PERSISTENT:
            n_sync += 1
            ok = step_barrier(p_sync, pid_d, D, n_prog, n_sync, ok, GRID_SYNC, MAX_SPIN)


@triton.heuristics({"HAS_LEN": _given("p_len")})
@triton.jit(do_not_specialize=["s"])
def lstm_proj_fwd_kernel(
    p_hraw, p_whr, p_h0, p_hst, p_y, p_hn, p_len,
    s, T, B, H, P, D,
    BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr,
    HAS_LEN: tl.constexpr,
):
    """Stepwise LSTM projection, forward step s: h = hraw W_hr^T (kernels/lstm.py), grid
    (D, B tiles, P tiles)."""
    tl.static_assert(BLOCK_B >= 16 and BLOCK_P >= 16 and BLOCK_K >= 16, "tl.dot needs tiles >= 16")
    lstm_proj_fwd_step(s, tl.program_id(0), tl.program_id(1), tl.program_id(2), T, B, H, P, D,
                       p_hraw, p_whr, p_h0, p_hst, p_y, p_hn, p_len,
                       HAS_LEN, BLOCK_B, BLOCK_P, BLOCK_K, PREC, "")


@triton.heuristics({"HAS_LEN": _given("p_len"), "RESET": _given("p_reset")})
@triton.jit(do_not_specialize=["s"])
def lstm_proj_bwd_kernel(
    p_dy, p_dhn, p_whh, p_len, p_dghbuf, p_carry, p_dhtot, p_dhp, p_dh0, p_reset, p_dh0acc,
    s, T, B, H, P, D,
    BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr,
    HAS_LEN: tl.constexpr, RESET: tl.constexpr,
):
    """Stepwise LSTM projection, backward step s (s = -1: dh0): the total dh over the P units."""
    tl.static_assert(BLOCK_B >= 16 and BLOCK_P >= 16 and BLOCK_K >= 16, "tl.dot needs tiles >= 16")
    lstm_proj_bwd_step(s, tl.program_id(0), tl.program_id(1), tl.program_id(2), T, B, H, P, D,
                       p_dy, p_dhn, p_whh, p_len, p_dghbuf, p_carry, p_dhtot, p_dhp, p_dh0, p_reset, p_dh0acc,
                       HAS_LEN, RESET, BLOCK_B, BLOCK_P, BLOCK_K, PREC, "")


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

def _tiles(kernel, mode, D, B, H, P, dtype, device, zoneout=False, reset=False):
    """The plan (persistent) or StepConfig (stepwise) the launch uses; ValueError if the
    persistent kernel cannot hold the layer. zoneout / reset: whether the launch runs with those
    variants; the persistent plan counts their tiles (plan_for, as fusedrnn.dispatch asks it), so
    the plan launched is the plan the dispatch chose the kernel by."""
    if kernel == "stepwise":
        return step_config(mode, B, H, P, dtype)
    plan = plan_for(mode, D, B, H, P, dtype, device, zoneout=zoneout, reset=reset)
    if plan is None:
        variants = "".join(f", {n}" for n, on in (("zoneout", zoneout), ("reset", reset)) if on)
        raise ValueError(f"kernel='persistent' cannot hold this layer ({mode}, D={D}, B={B}, H={H}, "
                         f"P={P}, {dtype}{variants}): plan_for returned None; use kernel='stepwise'")
    return plan


def _variant_flags(zoneout, zoneout_p, reset):
    """(zoneout on, reset on) as the plans take them."""
    return dict(zoneout=zoneout is not None or zoneout_p > 0, reset=reset is not None)


def _sync(tiles, D, device):
    """Grid barrier counters (zeroed: the arrive counters are monotonic), or None."""
    if getattr(tiles, "grid_sync", False):
        return torch.zeros(D + 1, dtype=torch.int32, device=device)
    return None


def _check_sync(sync, D):
    if sync is not None and int(sync[D].item()) != 0:
        raise RuntimeError("persistent kernel: the grid barrier timed out (programs not co-resident?); "
                           "the outputs are invalid. Unset FUSEDRNN_GRID_BARRIER to use single-program plans.")


def _variant_args(zoneout, zoneout_p, reset, D, T, B, P, wdt, dev, proj):
    """Check the variants' arguments; the kernels' p_zm, p_zp, p_reset (None when off)."""
    check_tensor("zoneout", zoneout, (D, T, B, P), torch.bool, dev, optional=True)
    check_tensor("reset", reset, (D, T, B), torch.bool, dev, optional=True)
    if not 0 <= zoneout_p < 1:
        raise ValueError(f"zoneout_p must be in [0, 1), got {zoneout_p}")
    if proj and (zoneout is not None or zoneout_p > 0):
        raise ValueError("zoneout with a projection (w_hr) is not implemented")
    zp = None
    if zoneout is None and zoneout_p > 0:
        zp = torch.full((1,), zoneout_p, dtype=wdt, device=dev)
    return dict(p_zm=zoneout, p_zp=zp, p_reset=reset)


def forward_launches(mode, xg, w_hh, b_hh, w_hr, h0, c0, lengths, save, kernel, allow_tf32, zoneout=None,
                     zoneout_p=0.0, reset=None):
    """Check, allocate, and list the launches of scan_forward. Returns (outputs, launches, sync);
    the launches are a generator, so the stepwise loop builds them one at a time."""
    check_choice(mode, MODES, "mode")
    check_choice(kernel, TRITON_KERNELS, "kernel")
    check_float("xg", xg, 4)
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
    lstm = mode == "LSTM"
    check_tensor("w_hh", w_hh, (D, GH, P), dt, dev)
    check_tensor("b_hh", b_hh, (D, GH), dt, dev, optional=True)
    if w_hr is not None and not lstm:
        raise ValueError(f"w_hr (projection) is only supported for LSTM, got mode {mode}")
    check_tensor("w_hr", w_hr, (D, P, H), dt, dev, optional=True)
    if w_hr is None and P != H:
        raise ValueError(f"w_hh.shape[2] must equal H={H} without a projection, got {P}")
    check_tensor("h0", h0, (D, B, P), dt, dev)
    if lstm:
        check_tensor("c0", c0, (D, B, H), dt, dev)
    check_tensor("lengths", lengths, (B,), torch.int64, dev, optional=True)

    wdt = work_dtype(dt)
    W, C = saved_widths(mode, H)
    y = new((T, B, D * P), dt, dev)
    hn = new((D, B, P), dt, dev)
    cn = new((D, B, H), dt, dev) if lstm else xg.new_empty(0)
    if save:
        hp, gates, cs = new((D, T, B, P), wdt, dev), new((D, T, B, W), wdt, dev), new((D, T, B, C), wdt, dev)
    else:
        hp, gates, cs = (xg.new_empty(0, dtype=wdt) for _ in range(3))  # distinct: op outputs may not alias
    variants = _variant_args(zoneout, zoneout_p, reset, D, T, B, P, wdt, dev, w_hr is not None)
    tiles = _tiles(kernel, mode, D, B, H, P, dt, dev, **_variant_flags(zoneout, zoneout_p, reset))
    sync = _sync(tiles, D, dev)
    prec = dot_precision(dt, allow_tf32, dev)
    args = dict(
        p_xg=xg, p_whh=w_hh, p_bhh=b_hh, p_whr=w_hr, p_h0=h0, p_c0=c0 if lstm else None, p_len=lengths,
        **variants,
        p_y=y, p_hn=hn, p_cn=cn if lstm else None, p_hp=hp if save else None,
        p_gates=gates if save else None, p_cs=cs if save and lstm else None,
        p_hst=new((2, D, B, P), wdt, dev), p_cst=new((2, D, B, H), wdt, dev) if lstm else None,
        p_hraw=new((D, B, H), wdt, dev) if w_hr is not None else None, p_sync=sync,
        T=T, B=B, H=H, P=P, D=D, MODE=mode, PERSISTENT=kernel == "persistent",
        BLOCK_B=tiles.BLOCK_B, BLOCK_H=tiles.BLOCK_H, BLOCK_K=tiles.BLOCK_K, PREC=prec)
    cell, args = resolve(scan_fwd_kernel, args)

    def launches():
        if kernel == "persistent":
            yield Launch(cell, tiles.grid, dict(args, s_begin=0, s_end=T), tiles.num_warps)
            return
        grid = (D, triton.cdiv(B, tiles.BLOCK_B), triton.cdiv(H, tiles.BLOCK_H))
        pcfg = proj_config(B, H, P, dt)
        pgrid = (D, triton.cdiv(B, pcfg.BLOCK_B), triton.cdiv(P, pcfg.BLOCK_H))
        proj, pargs = resolve(lstm_proj_fwd_kernel, dict(
            p_hraw=args["p_hraw"], p_whr=w_hr, p_h0=h0, p_hst=args["p_hst"], p_y=y, p_hn=hn, p_len=lengths,
            T=T, B=B, H=H, P=P, D=D, BLOCK_B=pcfg.BLOCK_B, BLOCK_P=pcfg.BLOCK_H, BLOCK_K=pcfg.BLOCK_K, PREC=prec))
        for s in range(T):
            yield Launch(cell, grid, dict(args, s_begin=s, s_end=s + 1), tiles.num_warps)
            if w_hr is not None:
                yield Launch(proj, pgrid, dict(pargs, s=s), pcfg.num_warps)

    return (y, hn, cn, hp, gates, cs), launches(), sync


def backward_launches(mode, dy, dhn, dcn, w_hh, w_hr, lengths, hp, gates, cs, kernel, allow_tf32,
                      zoneout=None, zoneout_p=0.0, reset=None):
    """Check, allocate, and list the launches of scan_backward (see forward_launches)."""
    check_choice(mode, MODES, "mode")
    check_choice(kernel, TRITON_KERNELS, "kernel")
    check_float("dy", dy, 3)
    G = GATES[mode]
    dt, dev = dy.dtype, dy.device
    wdt = work_dtype(dt)
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
    W, C = saved_widths(mode, H)
    lstm = mode == "LSTM"
    check_tensor("dy", dy, (T, B, D * P), dt, dev)
    check_tensor("dhn", dhn, (D, B, P), dt, dev)
    if lstm:
        check_tensor("dcn", dcn, (D, B, H), dt, dev)
    check_tensor("w_hh", w_hh, (D, GH, P), dt, dev)
    if w_hr is not None and not lstm:
        raise ValueError(f"w_hr (projection) is only supported for LSTM, got mode {mode}")
    check_tensor("w_hr", w_hr, (D, P, H), dt, dev, optional=True)
    if w_hr is None and P != H:
        raise ValueError(f"hp.shape[3] must equal H={H} without a projection, got {P}")
    check_tensor("lengths", lengths, (B,), torch.int64, dev, optional=True)
    check_tensor("hp", hp, (D, T, B, P), wdt, dev)
    check_tensor("gates", gates, (D, T, B, W), wdt, dev)
    check_tensor("cs", cs, (D, T, B, C), wdt, dev)

    proj = w_hr is not None
    dxg = new((D, T, B, GH), dt, dev)
    dgh = new((D, T, B, GH), dt, dev) if mode == "GRU" else dxg
    dh0 = new((D, B, P), dt, dev)
    dc0 = new((D, B, H), dt, dev) if lstm else dy.new_empty(0)
    dhp = new((D, T, B, P), dt, dev) if proj else None
    variants = _variant_args(zoneout, zoneout_p, reset, D, T, B, P, wdt, dev, proj)
    tiles = _tiles(kernel, mode, D, B, H, P, dt, dev, **_variant_flags(zoneout, zoneout_p, reset))
    sync = _sync(tiles, D, dev)
    prec = dot_precision(dt, allow_tf32, dev)
    # the dh0 / dc0 accumulators of the restarts: zeroed, never poisoned
    dh0acc = torch.zeros((D, B, P), dtype=wdt, device=dev) if reset is not None else None
    dc0acc = torch.zeros((D, B, H), dtype=wdt, device=dev) if reset is not None and lstm else None
    args = dict(
        p_dy=dy, p_dhn=dhn, p_dcn=dcn if lstm else None, p_whh=w_hh, p_whr=w_hr, p_len=lengths,
        p_hp=hp, p_gates=gates, p_cs=cs if lstm else None,
        **variants,
        p_dh0acc=dh0acc, p_dc0acc=dc0acc,
        p_dxg=dxg, p_dgh=dgh if mode == "GRU" else None, p_dh0=dh0, p_dc0=dc0 if lstm else None, p_dhp=dhp,
        p_dghbuf=new((2, D, B, GH), wdt, dev), p_carry=new((2, D, B, P), wdt, dev),
        p_dcst=new((2, D, B, H), wdt, dev) if lstm else None,
        p_dhtot=new((D, B, P), wdt, dev) if proj else None, p_sync=sync,
        T=T, B=B, H=H, P=P, D=D, MODE=mode, PERSISTENT=kernel == "persistent",
        BLOCK_B=tiles.BLOCK_B, BLOCK_H=tiles.BLOCK_H, BLOCK_K=tiles.BLOCK_K, PREC=prec)
    cell, args = resolve(scan_bwd_kernel, args)

    def launches():
        if kernel == "persistent":
            yield Launch(cell, tiles.grid, dict(args, i_begin=0, i_end=T + 1), tiles.num_warps)
            return
        grid = (D, triton.cdiv(B, tiles.BLOCK_B), triton.cdiv(H, tiles.BLOCK_H))
        pcfg = proj_config(B, H, P, dt)
        pgrid = (D, triton.cdiv(B, pcfg.BLOCK_B), triton.cdiv(P, pcfg.BLOCK_H))
        dh_kernel, pargs = resolve(lstm_proj_bwd_kernel, dict(
            p_dy=dy, p_dhn=dhn, p_whh=w_hh, p_len=lengths, p_dghbuf=args["p_dghbuf"], p_carry=args["p_carry"],
            p_dhtot=args["p_dhtot"], p_dhp=dhp, p_dh0=dh0, p_reset=reset, p_dh0acc=dh0acc, T=T, B=B, H=H, P=P, D=D, BLOCK_B=pcfg.BLOCK_B,
            BLOCK_P=pcfg.BLOCK_H, BLOCK_K=pcfg.BLOCK_K, PREC=prec))
        # iteration i is step s = T - 1 - i; i = T (s = -1) forms dh0
        for i in range(T + 1):
            if proj:
                yield Launch(dh_kernel, pgrid, dict(pargs, s=T - 1 - i), pcfg.num_warps)
                if i == T:
                    break
            yield Launch(cell, grid, dict(args, i_begin=i, i_end=i + 1), tiles.num_warps)

    return (dxg, dgh, dh0, dc0, dhp), launches(), sync


def scan_forward(mode, xg, w_hh, b_hh, w_hr, h0, c0, lengths, save, *, kernel="stepwise", allow_tf32=False,
                 zoneout=None, zoneout_p=0.0, reset=None):
    """The scan contract's forward (docs/design.md), with the variants (module docstring).
    Returns (y, hn, cn, hp, gates, cs)."""
    outs, launches, sync = forward_launches(mode, xg, w_hh, b_hh, w_hr, h0, c0, lengths, save, kernel,
                                            allow_tf32, zoneout, zoneout_p, reset)
    run(launches)
    _check_sync(sync, xg.shape[0])
    return outs


def scan_backward(mode, dy, dhn, dcn, w_hh, w_hr, lengths, hp, gates, cs, *, kernel="stepwise",
                  allow_tf32=False, zoneout=None, zoneout_p=0.0, reset=None):
    """The scan contract's backward (docs/design.md), with the variants. Returns (dxg, dgh, dh0,
    dc0, dhp)."""
    outs, launches, sync = backward_launches(mode, dy, dhn, dcn, w_hh, w_hr, lengths, hp, gates, cs, kernel,
                                             allow_tf32, zoneout, zoneout_p, reset)
    run(launches)
    _check_sync(sync, hp.shape[0])
    return outs
