"""Device functions shared by the kernels: gate tiles, the dots, row liveness, the step barrier.

Shape legend:
    D directions  T steps  B batch  H hidden  P state (proj_size, or H)  G gates  GH = G * H
    offs_b / mask_b (BLOCK_B,) batch rows of this program; offs_u / mask_u (BLOCK_U,) its units
    t (BLOCK_B,) int64 time index of each row at step s; live (BLOCK_B,) row s < lengths[b]
    gate tiles x0..x3: tile g of a gate-blocked tensor sits at p + g * stride (stride H for the
                   activations and the workspace; W_hh's at p + g * H * P + offs from the
                   direction's base pointer p); a cell with N < 4 tiles
                   gets tile 0 again in the unused slots, which no cell reads (the compiler
                   drops them), so every cell handles its gates through the same four names
    dghbuf (2, D, B, GH)  ping-pong: hidden-side pre-activation gradients of the last step
    carry  (2, D, B, P)   ping-pong: the part of dh_{t-1} that does not go through W_hh
    sync   (D + 1,) int32 grid barrier: arrive counter per direction, then the error flag
    reset  (D, T, B) bool     variants (issue 12): restart from h0 / c0 at time t, per direction
    zm     (D, T, B, P) bool  zoneout's training mask (True keeps h_{t-1}); zp (1,) its eval p
"""
import triton
import triton.language as tl

# Bounded spin of the grid barrier: ~1e8 polls is seconds, far beyond any real step.
MAX_SPIN = tl.constexpr(100_000_000)


@triton.jit
def wload(p, mask, CDT: tl.constexpr, PREC: tl.constexpr):
    """A weight tile: kept in its storage dtype (float16 / bfloat16) for the split dot, otherwise
    converted to the compute dtype."""
    b_w = tl.load(p, mask=mask, other=0.0)
    if PREC != "x2" and PREC != "x2emu":
        b_w = b_w.to(CDT)
    return b_w


@triton.jit
def mdot(b_w, b_x, acc, PREC: tl.constexpr):
    """acc + b_w @ b_x in the accumulator's dtype. b_w: a weight tile (M side, from wload), b_x: a
    float32 / float64 state or gradient tile.

    PREC "ieee" / "tf32": one dot at that precision. "x2" (float16 / bfloat16 weights): b_x is split
    into a high and a low half-precision part, x = hi + lo to ~2^-16 (bfloat16) or ~2^-22 (float16)
    relative, and both products go through the tensor cores against the exact half-precision
    weights into a float32 accumulator. Rounding the state to half precision for a single dot would add a half-precision-sized error
    at every step; two dots keep the recurrence close to float32 accuracy. "x2emu" (the
    interpreter, whose bfloat16 dot is wrong): the same two products with the operands upcast to
    float32 first; each product of two half-precision values is exact in float32 either way."""
    if PREC == "x2" or PREC == "x2emu":
        x_hi = b_x.to(b_w.dtype)
        x_lo = (b_x - x_hi.to(b_x.dtype)).to(b_w.dtype)
        if PREC == "x2emu":
            b_w32 = b_w.to(acc.dtype)
            acc = tl.dot(b_w32, x_hi.to(acc.dtype), acc, input_precision="ieee", out_dtype=acc.dtype)
            acc = tl.dot(b_w32, x_lo.to(acc.dtype), acc, input_precision="ieee", out_dtype=acc.dtype)
        else:
            acc = tl.dot(b_w, x_hi, acc, out_dtype=acc.dtype)
            acc = tl.dot(b_w, x_lo, acc, out_dtype=acc.dtype)
    else:
        acc = tl.dot(b_w, b_x, acc, input_precision=PREC, out_dtype=acc.dtype)
    return acc


@triton.jit
def load_gates(p, stride, mask, N: tl.constexpr, CDT: tl.constexpr):
    """The N (1, 3 or 4) gate tiles at p + g * stride, converted to CDT."""
    x0 = tl.load(p, mask=mask, other=0.0).to(CDT)
    x1 = x0
    x2 = x0
    x3 = x0
    if N > 1:
        x1 = tl.load(p + stride, mask=mask, other=0.0).to(CDT)
        x2 = tl.load(p + 2 * stride, mask=mask, other=0.0).to(CDT)
    if N > 3:
        x3 = tl.load(p + 3 * stride, mask=mask, other=0.0).to(CDT)
    return x0, x1, x2, x3


@triton.jit
def load_gate_weights(p, H, P, offs, mask, N: tl.constexpr, CDT: tl.constexpr, PREC: tl.constexpr):
    """The N weight tiles of W_hh (D, GH, P) at p + g * H * P + offs (p this direction's base,
    offs the tile's offsets within a gate block), as wload keeps them."""
    w0 = wload(p + offs, mask, CDT, PREC)
    w1 = w0
    w2 = w0
    w3 = w0
    if N > 1:
        w1 = wload(p + H * P + offs, mask, CDT, PREC)
        w2 = wload(p + 2 * H * P + offs, mask, CDT, PREC)
    if N > 3:
        w3 = wload(p + 3 * H * P + offs, mask, CDT, PREC)
    return w0, w1, w2, w3


@triton.jit
def dot_gates(w0, w1, w2, w3, b_x, a0, a1, a2, a3, N: tl.constexpr, PREC: tl.constexpr):
    """a_g + w_g @ b_x for the N gates (mdot)."""
    a0 = mdot(w0, b_x, a0, PREC)
    if N > 1:
        a1 = mdot(w1, b_x, a1, PREC)
        a2 = mdot(w2, b_x, a2, PREC)
    if N > 3:
        a3 = mdot(w3, b_x, a3, PREC)
    return a0, a1, a2, a3


@triton.jit
def stream_dot_gates(p, H, P, offs, k0, mask, b_x, a0, a1, a2, a3, N: tl.constexpr, CDT: tl.constexpr,
                     PREC: tl.constexpr):
    """dot_gates over the K chunk at k0 of the W_hh tiles addressed as in load_gate_weights, each
    loaded next to its dot, so fewer of them are live at once (stepwise)."""
    a0 = mdot(wload(p + offs + k0, mask, CDT, PREC), b_x, a0, PREC)
    if N > 1:
        w1 = wload(p + H * P + offs + k0, mask, CDT, PREC)
        w2 = wload(p + 2 * H * P + offs + k0, mask, CDT, PREC)
        a1 = mdot(w1, b_x, a1, PREC)
        a2 = mdot(w2, b_x, a2, PREC)
    if N > 3:
        a3 = mdot(wload(p + 3 * H * P + offs + k0, mask, CDT, PREC), b_x, a3, PREC)
    return a0, a1, a2, a3


@triton.jit
def store_gates(p, stride, mask, N: tl.constexpr, x0, x1, x2, x3):
    """Store the N gate tiles at p + g * stride in p's element type."""
    ODT = p.dtype.element_ty
    tl.store(p, x0.to(ODT), mask=mask)
    if N > 1:
        tl.store(p + stride, x1.to(ODT), mask=mask)
        tl.store(p + 2 * stride, x2.to(ODT), mask=mask)
    if N > 3:
        tl.store(p + 3 * stride, x3.to(ODT), mask=mask)


@triton.jit
def store_live_gates(p, stride, mask, live, N: tl.constexpr, x0, x1, x2, x3):
    """store_gates with zeros where `live` is false (dead rows, padded positions)."""
    store_gates(p, stride, mask, N, tl.where(live, x0, 0.0), tl.where(live, x1, 0.0),
                tl.where(live, x2, 0.0), tl.where(live, x3, 0.0))


@triton.jit
def store_gate_grads(p_dx, p_gb, stride, mask, live, N: tl.constexpr, d0, d1, d2, d3, e0, e1, e2, e3):
    """The backward's per-gate outputs, zero for dead rows: d_g (input-side pre-activation
    gradients) at p_dx + g * stride in its element type, e_g (hidden-side, for the next step's dh)
    at p_gb + g * stride. Each gate's two stores are adjacent, so its tiles die early."""
    ODT = p_dx.dtype.element_ty
    tl.store(p_dx, tl.where(live, d0, 0.0).to(ODT), mask=mask)
    tl.store(p_gb, tl.where(live, e0, 0.0), mask=mask)
    if N > 1:
        tl.store(p_dx + stride, tl.where(live, d1, 0.0).to(ODT), mask=mask)
        tl.store(p_dx + 2 * stride, tl.where(live, d2, 0.0).to(ODT), mask=mask)
        tl.store(p_gb + stride, tl.where(live, e1, 0.0), mask=mask)
        tl.store(p_gb + 2 * stride, tl.where(live, e2, 0.0), mask=mask)
    if N > 3:
        tl.store(p_dx + 3 * stride, tl.where(live, d3, 0.0).to(ODT), mask=mask)
        tl.store(p_gb + 3 * stride, tl.where(live, e3, 0.0), mask=mask)


@triton.jit
def row_time(s, T, offs_b, mask_b, p_len, REVERSE, HAS_LEN: tl.constexpr):
    """Each row's time index at step s. The reverse direction walks each sequence backwards within
    its own length; a dead row (s >= length) points at the padded position t = s, so every (t, b)
    is written exactly once per direction and padded positions get their zeros for free."""
    if HAS_LEN:
        # Clamped to [0, T]: an out-of-range length must not turn into an out-of-bounds write (the
        # launchers do not read lengths back to the host to check them).
        L = tl.minimum(tl.maximum(tl.load(p_len + offs_b, mask=mask_b, other=0).to(tl.int64), 0), T)
    else:
        L = tl.zeros_like(offs_b).to(tl.int64) + T
    live = (s < L) & mask_b
    t = tl.where(live & REVERSE, L - 1 - s, s)
    return t.to(tl.int64), live


@triton.jit
def unit_tile(B, H, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """This program's hidden units (program axis 2) and batch rows (axis 1), with their masks."""
    offs_j = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_k = tl.arange(0, BLOCK_K)
    mask_j = offs_j < H
    mask_b = offs_b < B
    return offs_j, offs_b, offs_k, mask_j, mask_b, mask_j[:, None] & mask_b[None, :]


@triton.jit
def bwd_dh_carry(
    s, pid_d, offs_u, mask_u, offs_b, mask_b, T, B, H, P, D, G: tl.constexpr,
    p_dhn, p_whh, p_dghbuf, p_carry, w0, w1, w2, w3,
    HOIST: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr, CACHE: tl.constexpr,
):
    """dh reaching h_s from step s + 1 (units offs_u, all batch rows of the tile), without dy:
    carry_{s+1} + dgh_{s+1} W_hh[:, u]. Dead rows of step s+1 wrote dgh = 0 and carry = dh, so the
    same formula passes their gradient through. Reduces over all GH rows in BLOCK_K chunks per
    gate; when HOIST the per-gate (BLOCK_U, BLOCK_K >= H) weight tiles w0..w3 are already in
    registers (otherwise they are None and the weights stream from p_whh). No atomics: each
    output element is owned by exactly one program."""
    CDT = p_carry.dtype.element_ty
    o_state = offs_b[None, :] * P + offs_u[:, None]
    mask_ub = mask_u[:, None] & mask_b[None, :]
    if s == T - 1:
        dh = tl.load(p_dhn + pid_d * B * P + o_state, mask=mask_ub, other=0.0).to(CDT)
    else:
        nxt = (s + 1) % 2
        dh = tl.load(p_carry + (nxt * D + pid_d) * B * P + o_state, mask=mask_ub, other=0.0,
                     cache_modifier=CACHE)
        GH = G * H
        p_w = p_whh + pid_d * GH * P
        p_g = p_dghbuf + (nxt * D + pid_d) * B * GH
        offs_k = tl.arange(0, BLOCK_K)
        for g in tl.static_range(G):
            for k0 in range(0, H, BLOCK_K):
                kk = k0 + offs_k
                mask_k = kk < H
                if HOIST:
                    if g == 0:
                        b_w = w0
                    elif g == 1:
                        b_w = w1
                    elif g == 2:
                        b_w = w2
                    else:
                        b_w = w3
                else:
                    b_w = wload(p_w + (g * H + kk)[None, :] * P + offs_u[:, None],
                                mask_u[:, None] & mask_k[None, :], CDT, PREC)
                b_g = tl.load(p_g + offs_b[None, :] * GH + g * H + kk[:, None],
                              mask=mask_k[:, None] & mask_b[None, :], other=0.0, cache_modifier=CACHE)
                dh = mdot(b_w, b_g, dh, PREC)
    return dh


@triton.jit
def step_barrier(p_sync, pid_d, D, n_prog, n_sync, ok, GRID_SYNC: tl.constexpr, MAX_SPIN: tl.constexpr):
    """End of the n_sync-th persistent step barrier. One program per direction: a CTA barrier makes
    this program's global writes visible to its own threads (a no-op in the interpreter, which
    runs threads in lock step); p_sync may be None. Several programs (GRID_SYNC): a grid barrier on
    direction pid_d's monotonic arrive counter p_sync[pid_d], which must reach n_prog * n_sync
    (every program's arrivals so far). The spin is bounded: on timeout it raises the error flag
    p_sync[D] and stops waiting for the rest of the launch (ok = 0), so a broken co-residency
    never hangs the GPU; the launcher checks the flag and raises."""
    if GRID_SYNC:
        p_count = p_sync + pid_d
        p_err = p_sync + D
    target = n_prog * n_sync
    tl.debug_barrier()
    if GRID_SYNC:
        if ok != 0:
            # Release publishes the whole CTA's writes: the debug_barrier above ordered them before
            # this (scalar, single-thread) atomic.
            tl.atomic_add(p_count, 1, sem="release")
            seen = tl.atomic_add(p_count, 0, sem="acquire")
            spins = 0
            while (seen < target) & (spins < MAX_SPIN):
                seen = tl.atomic_add(p_count, 0, sem="acquire")
                spins += 1
            if seen < target:
                tl.atomic_xchg(p_err, 1)
                ok = ok * 0
        tl.debug_barrier()
    return ok


@triton.jit
def restart_rows(p_reset, pid_d, t, live, offs_b, T, B):
    """(BLOCK_B,) bool: the live rows that restart from h0 / c0 before their step at time t
    (reset: (D, T, B) bool, per direction and indexed by time; fusedrnn/reference.py)."""
    r = tl.load(p_reset + (pid_d * T + t) * B + offs_b, mask=live, other=0)
    return (r != 0) & live


@triton.jit
def zoneout_weight(p_zm, p_zp, pid_d, t, offs_b, offs_j, mask_jb, T, B, P, ZONEOUT: tl.constexpr,
                   CDT: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_B: tl.constexpr):
    """z (BLOCK_H, BLOCK_B): the weight of h_{t-1} in h_t = z h_{t-1} + (1 - z) h~_t. ZONEOUT 2: the
    training mask zm (D, T, B, P) bool at each row's time (0 or 1, so the blend is exact); 1: the
    eval probability, one value at p_zp."""
    if ZONEOUT == 2:
        p = p_zm + ((pid_d * T + t[None, :]) * B + offs_b[None, :]) * P + offs_j[:, None]
        z = tl.load(p, mask=mask_jb, other=0).to(CDT)
    else:
        z = tl.zeros((BLOCK_H, BLOCK_B), dtype=CDT) + tl.load(p_zp).to(CDT)
    return z


@triton.jit
def divert_restart(dh, s, pid_d, offs_b, mask_b, mask_ub, o_state, T, B, p_len, p_reset, p_acc,
                   HAS_LEN: tl.constexpr):
    """dh: the gradient reaching the state that entered step s + 1 (a (BLOCK_U, BLOCK_B) tile at
    o_state of a (B, ·) layout). Rows that restarted at step s + 1 took h0 / c0 there, not the
    state after step s: their gradient is added to the accumulator of dh0 / dc0 (p_acc: this
    direction's (B, ·) block) and nothing continues to step s. Each accumulator element belongs to
    one program, which reads and writes it (no atomics)."""
    if s + 1 < T:
        t1, live1 = row_time(s + 1, T, offs_b, mask_b, p_len, pid_d == 1, HAS_LEN)
        rst = restart_rows(p_reset, pid_d, t1, live1, offs_b, T, B)[None, :]
        p_a = p_acc + o_state
        acc = tl.load(p_a, mask=mask_ub & rst, other=0.0)
        tl.store(p_a, acc + dh, mask=mask_ub & rst)
        dh = tl.where(rst, 0.0, dh)
    return dh


@triton.jit
def carry_dc(dc_prev, dc, s, t, live, live2, pid_d, offs_b, o_c, mask_jb, T, B, D, H, p_reset, p_dc0acc,
             p_dcst, p_dc0, RESET: tl.constexpr):
    """The LSTM's dc leaving step s backwards (dc_prev = dc_t f, (BLOCK_H, BLOCK_B) at o_c of a (B, H)
    layout): rows that restarted at step s took c0, so theirs is added to the dc0 accumulator
    (p_dc0acc) and nothing reaches step s - 1; dead rows keep dc. Stored to the ping-pong slot s % 2
    (p_dcst: (2, D, B, H)) and, at s = 0, with the accumulated restarts to dc0."""
    if RESET:
        rst2 = restart_rows(p_reset, pid_d, t, live, offs_b, T, B)[None, :]
        p_ca = p_dc0acc + pid_d * B * H + o_c
        acc_c = tl.load(p_ca, mask=mask_jb, other=0.0) + tl.where(rst2, dc_prev, 0.0)
        tl.store(p_ca, acc_c, mask=mask_jb & rst2)
        dc_prev = tl.where(rst2, 0.0, dc_prev)
    dc_keep = tl.where(live2, dc_prev, dc)
    tl.store(p_dcst + ((s % 2) * D + pid_d) * B * H + o_c, dc_keep, mask=mask_jb)
    if s == 0:
        if RESET:
            dc_keep += acc_c
        tl.store(p_dc0 + pid_d * B * H + o_c, dc_keep.to(p_dc0.dtype.element_ty), mask=mask_jb)
