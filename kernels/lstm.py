"""LSTM: the pointwise cell update and its gradient, and the projection (proj_size) steps.

Shape legend (all tiles are [units, batch]: hidden units on the M side of every dot, so that the
weight rows fill the tensor-core M dimension even at batch 1):
    D directions  T steps  B batch  H hidden  P state (proj_size, or H)  GH = 4H
    x_*, hh_*, c_prev, dh, dc, i, f, g, o   (BLOCK_H, BLOCK_B) float32 (float64 for float64 layers)
    w_hr (D, P, H)   hraw (D, B, H) = o * tanh(c) before the projection
The projection steps run as their own stepwise launches (kernels/scan.py: lstm_proj_fwd_kernel,
lstm_proj_bwd_kernel) or inside the persistent scan kernels after a barrier.
"""
import triton
import triton.language as tl

from .activations import sigmoid, tanh
from .common import bwd_dh_carry, divert_restart, mdot, row_time, wload


@triton.jit
def lstm_fwd(x_i, x_f, x_g, x_o, hh_i, hh_f, hh_g, hh_o, c_prev):
    i = sigmoid(x_i + hh_i)
    f = sigmoid(x_f + hh_f)
    g = tanh(x_g + hh_g)
    o = sigmoid(x_o + hh_o)
    c = f * c_prev + i * g
    h = o * tanh(c)
    return h, c, i, f, g, o


@triton.jit
def lstm_bwd(dh, dc, i, f, g, o, c_prev):
    """Pre-activation gradients (i, f, g, o) and the cell gradient handed to the previous step.
    tanh(c) is recomputed from the saved gates rather than saved: one fewer (T, B, H) workspace."""
    tc = tanh(f * c_prev + i * g)
    dc_t = dc + dh * o * (1.0 - tc * tc)
    d_i = dc_t * g * i * (1.0 - i)
    d_f = dc_t * c_prev * f * (1.0 - f)
    d_g = dc_t * i * (1.0 - g * g)
    d_o = dh * tc * o * (1.0 - o)
    return d_i, d_f, d_g, d_o, dc_t * f


@triton.jit
def lstm_proj_fwd_step(
    s, pid_d, pid_b, pid_p, T, B, H, P, D,
    p_hraw, p_whr, p_h0, p_hst, p_y, p_hn, p_len,
    HAS_LEN: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
    PREC: tl.constexpr, CACHE: tl.constexpr,
):
    """h = hraw W_hr^T for live rows; dead rows keep their state. Needs every hidden unit of hraw,
    which is why it is a separate launch (or, persistent, after a barrier) from the cell update."""
    CDT = p_hst.dtype.element_ty
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_k = tl.arange(0, BLOCK_K)
    mask_p = offs_p < P
    mask_b = offs_b < B
    mask_pb = mask_p[:, None] & mask_b[None, :]
    t, live = row_time(s, T, offs_b, mask_b, p_len, pid_d == 1, HAS_LEN)

    acc = tl.zeros((BLOCK_P, BLOCK_B), dtype=CDT)
    p_w = p_whr + pid_d * P * H
    p_r = p_hraw + pid_d * B * H
    for k0 in range(0, H, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < H
        b_w = wload(p_w + offs_p[:, None] * H + kk[None, :], mask_p[:, None] & mask_k[None, :], CDT, PREC)
        b_r = tl.load(p_r + offs_b[None, :] * H + kk[:, None], mask=mask_k[:, None] & mask_b[None, :],
                      other=0.0, cache_modifier=CACHE)
        acc = mdot(b_w, b_r, acc, PREC)

    o_state = offs_b[None, :] * P + offs_p[:, None]
    if s == 0:
        b_hprev = tl.load(p_h0 + pid_d * B * P + o_state, mask=mask_pb, other=0.0).to(CDT)
    else:
        b_hprev = tl.load(p_hst + ((s % 2) * D + pid_d) * B * P + o_state, mask=mask_pb, other=0.0,
                          cache_modifier=CACHE)
    live2 = live[None, :]
    b_h = tl.where(live2, acc, b_hprev)
    tl.store(p_hst + (((s + 1) % 2) * D + pid_d) * B * P + o_state, b_h, mask=mask_pb)
    p_yt = p_y + (t[None, :] * B + offs_b[None, :]) * (D * P) + pid_d * P + offs_p[:, None]
    tl.store(p_yt, tl.where(live2, acc, 0.0).to(p_y.dtype.element_ty), mask=mask_pb)
    if s == T - 1:
        tl.store(p_hn + pid_d * B * P + o_state, b_h.to(p_hn.dtype.element_ty), mask=mask_pb)


@triton.jit
def lstm_proj_bwd_step(
    s, pid_d, pid_b, pid_p, T, B, H, P, D,
    p_dy, p_dhn, p_whh, p_len, p_dghbuf, p_carry, p_dhtot, p_dhp, p_dh0, p_reset, p_dh0acc,
    HAS_LEN: tl.constexpr, RESET: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_K: tl.constexpr, PREC: tl.constexpr, CACHE: tl.constexpr,
):
    """Total gradient reaching the projected state h_t (P units): carried + dy. Writes it for the
    cell kernel (which multiplies by W_hr) and as dhp; at s = -1 it is dh0. RESET: the part
    carried from a restarted step s + 1 goes to the dh0 accumulator p_dh0acc (D, B, P) instead
    (kernels/common.py: divert_restart), which dh0 adds at s = -1."""
    CDT = p_dhtot.dtype.element_ty
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_p = offs_p < P
    mask_b = offs_b < B
    mask_pb = mask_p[:, None] & mask_b[None, :]
    o_state = offs_b[None, :] * P + offs_p[:, None]
    dh = bwd_dh_carry(s, pid_d, offs_p, mask_p, offs_b, mask_b, T, B, H, P, D, 4,
                      p_dhn, p_whh, p_dghbuf, p_carry, None, None, None, None,
                      False, BLOCK_K, PREC, CACHE)
    if s >= 0:
        if RESET:
            dh = divert_restart(dh, s, pid_d, offs_b, mask_b, mask_pb, o_state, T, B, p_len, p_reset,
                                p_dh0acc + pid_d * B * P, HAS_LEN)
        t, live = row_time(s, T, offs_b, mask_b, p_len, pid_d == 1, HAS_LEN)
        live2 = live[None, :]
        p_dyt = p_dy + (t[None, :] * B + offs_b[None, :]) * (D * P) + pid_d * P + offs_p[:, None]
        dh += tl.load(p_dyt, mask=mask_pb & live2, other=0.0).to(CDT)
        tl.store(p_dhtot + pid_d * B * P + o_state, dh, mask=mask_pb)
        p_dhpt = p_dhp + ((pid_d * T + t[None, :]) * B + offs_b[None, :]) * P + offs_p[:, None]
        tl.store(p_dhpt, tl.where(live2, dh, 0.0).to(p_dhp.dtype.element_ty), mask=mask_pb)
        # A live LSTM step hands nothing directly to h_{t-1} (it all goes through W_hh); a dead row
        # passes its gradient through unchanged.
        tl.store(p_carry + ((s % 2) * D + pid_d) * B * P + o_state, tl.where(live2, 0.0, dh), mask=mask_pb)
    else:
        if RESET:
            dh += tl.load(p_dh0acc + pid_d * B * P + o_state, mask=mask_pb, other=0.0)
        tl.store(p_dh0 + pid_d * B * P + o_state, dh.to(p_dh0.dtype.element_ty), mask=mask_pb)
