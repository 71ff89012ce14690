"""Launch plans: the one place that knows a device's limits and picks tiles, grids and dot precision.

Shape legend:
    D directions  B batch  H hidden  P state (proj_size, or H)  G gates (fusedrnn.spec.GATES)
Tiles are [units, batch]: BLOCK_H hidden units on the M side of every dot, BLOCK_B batch rows on
the N side, the reduction (over P, or H) in BLOCK_K chunks. Every tile dimension is >= 16 (tl.dot
needs it; the kernels static_assert it) and masks cover the padding.

The block sizes and budgets are calibrated on the resource table of bench/kernel_resources.py
(registers and spills of every configuration, compiled for sm_90 / sm_80): see docs/design.md.
"""
import os
from dataclasses import dataclass

import torch
import triton

from fusedrnn.spec import GATES, HALF_DTYPES, MODES, check_choice

# An sm_90 (H100) device: what "meta" tensors plan for (kernels/aot.py lists the configurations
# the launchers pick there) and the per-SM limits the interpreter's single program stands for.
SM90_SMS = 132
SM90_SMEM_PER_BLOCK = 227 * 1024


def device_limits(device):
    """(num_sms, shared memory per block in bytes) that plans may use on `device`.

    cuda: the device's properties. meta: an sm_90. cpu (the Triton interpreter): one SM of an
    sm_90, because the interpreter runs programs one after another, so only single-program plans
    can work (a grid barrier between programs would spin forever). The shared memory value does
    not change any plan there: a single-program plan stages at most 64 KiB (32 KiB under
    REG_BUDGET, 64 KiB under HALF_WEIGHT_BYTES), below every limit in use."""
    device = torch.device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        smem = getattr(props, "shared_memory_per_block_optin", 0) or 48 * 1024
        return props.multi_processor_count, smem
    if device.type == "meta":
        return SM90_SMS, SM90_SMEM_PER_BLOCK
    return 1, SM90_SMEM_PER_BLOCK


def _np2(n):
    return triton.next_power_of_2(max(int(n), 1))


def _clamp_block(n, cap):
    # >= 16 for tl.dot; masks cover what n does not fill.
    return max(16, min(_np2(n), cap))


# ----------------------------------------------------------------------------------------------
# Stepwise: one launch per step
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StepConfig:
    """Tiles of one stepwise launch: BLOCK_H units (M side) x BLOCK_B rows (N side), K in BLOCK_K
    chunks. The float32 ieee dots run on FMA units, where each thread holds whole K-rows of its
    operands, so K is chunked by 16; with 4 gate accumulators, 32 x 16 tiles at 8 warps are the
    largest without spills (32 x 32 spilled hundreds of bytes)."""
    BLOCK_B: int
    BLOCK_H: int
    BLOCK_K: int
    num_warps: int


def step_config(mode, B, H, P, dtype):
    """Tiles of the stepwise cell kernels (scan_fwd_kernel / scan_bwd_kernel)."""
    G = GATES[mode]
    block_b, block_h = _clamp_block(B, 32 if G == 1 else 16), _clamp_block(H, 32)
    # 4 warps spill 16 B in the RNN backward at 32 x 32 tiles.
    return StepConfig(BLOCK_B=block_b, BLOCK_H=block_h, BLOCK_K=16,
                      num_warps=8 if G > 1 or block_b * block_h >= 1024 else 4)


def proj_config(B, H, P, dtype):
    """LSTM projection launches: BLOCK_H tiles the P state units, BLOCK_K chunks H. One dot per
    chunk (not four), so larger tiles than step_config stay spill-free."""
    return StepConfig(BLOCK_B=_clamp_block(B, 32), BLOCK_H=_clamp_block(P, 32),
                      BLOCK_K=_clamp_block(H, 32 if dtype != torch.float64 else 16), num_warps=4)


def dot_precision(dtype, allow_tf32, device):
    """PREC of the recurrent dots (kernels/common.py: mdot). float16 / bfloat16: the two-pass
    tensor-core dot "x2" ("x2emu" for bfloat16 under the interpreter, whose bfloat16 dot is
    wrong); float32: "tf32" if allow_tf32 else "ieee"; float64: "ieee"."""
    if dtype in HALF_DTYPES:
        return "x2emu" if dtype == torch.bfloat16 and torch.device(device).type == "cpu" else "x2"
    return "tf32" if allow_tf32 and dtype == torch.float32 else "ieee"


# ----------------------------------------------------------------------------------------------
# Persistent: one launch per direction and pass, the time loop inside the kernel
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PersistentPlan:
    """Launch configuration of the persistent kernels. grid = (D, 1, programs per direction);
    BLOCK_B >= B and BLOCK_K >= max(H, P), so each program keeps all gates of its BLOCK_H units
    (G * BLOCK_H * BLOCK_K weights) on chip for the whole sequence."""
    grid: tuple
    BLOCK_B: int
    BLOCK_H: int
    BLOCK_K: int
    num_warps: int
    grid_sync: bool


# Register budget of one persistent CTA (8 warps), in float32-sized values per thread: resident
# weights + gate accumulators + the h operand tile, float64 counting twice. 44 and above spill
# 40-1700 B. Within it, the LSTM projection's backward at H = 32 (26) runs out of registers by
# 40 B; other spills of 8-64 B within it come from Triton's ptxas option --regAllocOptLevel=2 at
# 64-128 registers (docs/design.md: Resource usage), which no smaller plan avoids.
REG_BUDGET = 32
PERSISTENT_WARPS = 8
MAX_PERSISTENT_B = 64
# Half precision (the "x2" tensor-core dots) has its own single-program rule: the weights stay in
# half precision and feed the tensor cores directly (wgmma reads them from shared memory), so what
# limits a program is the float32 accumulators and the split h tiles, i.e. the batch tile. At
# BLOCK_B = 16 a program holds 32 KiB of weights with at most 24 B of spills (LSTM / GRU H = 64,
# RNN H = 128); BLOCK_B = 32 spills 56-576 B, and so does a projection (192 B), which therefore
# stays on the general rule.
HALF_WEIGHT_BYTES = 32 * 1024
HALF_MAX_BLOCK_B = 16
# The variants' tiles (kernels/scan.py: ZONEOUT, RESET), in [BLOCK_H, BLOCK_B] tiles besides the
# cell's own. Zoneout: the blend weight z and the h_{t-1} it keeps (backward: z and the whole dh)
# with their masked loads; reset: the initial state as the dot's operand (one [BLOCK_K, BLOCK_B]
# tile more), the unit's own h0 / c0 and, in the backward, the dh0 / dc0 accumulator of the
# restarted rows. Calibrated on sm_90 compiles with the variants on (bench/kernel_resources.py):
# with 3 / 3 no admitted plan runs out of registers, while these did at 243-255 registers:
# zoneout float32 LSTM H = 16 at B = 64 (8 B) and RNN H = 32 at B = 64 (16 B); reset float32
# RNN H = 64 at B = 32 (64 B) and the LSTM projection H = 32 at B = 16 (24 B).
ZONEOUT_TILES = 3
RESET_TILES = 3
# Half precision with a variant: the float32 accumulators plus the variant tiles (zoneout 1,
# reset 2; the weights are in shared memory) must stay within HALF_ACC_VALUES per thread. 16 is
# what the plain rule's largest plan holds (LSTM H = 64 at B = 16), so the plain plans do not
# change; with the variants on, LSTM H = 64 spilled 16-88 B, GRU H = 64 with reset 8-24 B and
# RNN H = 128 with both 24 B (all at 255 registers), while GRU H = 64 / RNN H = 128 with zoneout
# alone did not spill.
HALF_ACC_VALUES = 16
HALF_ZONEOUT_TILES = 1
HALF_RESET_TILES = 2


def persistent_plan(mode, D, B, H, P, dtype, num_sms, smem_per_block, zoneout=False, reset=False):
    """Launch plan of the persistent kernels for this layer, or None if they cannot hold it.

    One program per direction (no grid barrier; directions are independent) when every weight of
    a direction fits one CTA's register budget (float16 / bfloat16 without a projection: up to
    32 KiB of weights at B <= 16, see HALF_WEIGHT_BYTES). Otherwise, only when
    FUSEDRNN_GRID_BARRIER=1, several programs per direction that exchange h through global memory
    and meet at a grid barrier every step; all of them must be resident at once, hence
    D * programs <= num_sms. That path has not run on hardware, so it is opt-in.

    zoneout / reset: the layer runs with those variants, whose tiles count against the budgets
    (ZONEOUT_TILES, RESET_TILES; HALF_*), so a plan with them is the plain plan or smaller (None
    where the plain plan is at the edge). Off, the plan is the plain one."""
    check_choice(mode, MODES, "mode")
    G = GATES[mode]
    elem = 8 if dtype == torch.float64 else 4
    BLOCK_B = _clamp_block(B, 1 << 30)
    BLOCK_K = _clamp_block(max(H, P), 1 << 30)
    if B > MAX_PERSISTENT_B:
        return None
    variant_tiles = ZONEOUT_TILES * bool(zoneout) + RESET_TILES * bool(reset)
    half_variant_tiles = HALF_ZONEOUT_TILES * bool(zoneout) + HALF_RESET_TILES * bool(reset)
    threads = 32 * PERSISTENT_WARPS

    def fits(block_h):
        values = G * block_h * BLOCK_K + G * block_h * BLOCK_B + BLOCK_K * BLOCK_B
        values += variant_tiles * block_h * BLOCK_B + (BLOCK_K * BLOCK_B if reset else 0)
        per_thread = values * (elem // 4) / threads
        # the dot stages one weight tile and h through shared memory
        smem = (block_h * BLOCK_K + BLOCK_K * BLOCK_B) * elem
        return per_thread <= REG_BUDGET and smem <= smem_per_block

    def fits_half(block_h):
        weights = G * block_h * BLOCK_K * 2
        # weights staged for the tensor cores, plus the h / hi / lo tiles
        smem = weights + 4 * BLOCK_K * BLOCK_B * 4
        acc = (G + half_variant_tiles) * block_h * BLOCK_B / threads
        return (dtype in HALF_DTYPES and P == H and BLOCK_B <= HALF_MAX_BLOCK_B
                and weights <= HALF_WEIGHT_BYTES and acc <= HALF_ACC_VALUES and smem <= smem_per_block)

    def plan(block_h, grid_sync):
        return PersistentPlan(grid=(D, 1, triton.cdiv(H, block_h)), BLOCK_B=BLOCK_B, BLOCK_H=block_h,
                              BLOCK_K=BLOCK_K, num_warps=PERSISTENT_WARPS, grid_sync=grid_sync)

    single = _clamp_block(H, 1 << 30)
    if fits(single) or fits_half(single):
        return plan(single, False)
    if os.environ.get("FUSEDRNN_GRID_BARRIER") != "1" or P != H:
        # With a projection the P-side step runs in one program anyway (BLOCK_K >= P), so several
        # programs buy little, and that configuration spills 700 B per thread.
        return None
    block_h = single // 2
    while block_h >= 16:
        if fits(block_h) and D * triton.cdiv(H, block_h) <= num_sms:
            return plan(block_h, True)
        block_h //= 2
    return None


def plan_for(mode, D, B, H, P, dtype, device, zoneout=False, reset=False):
    """persistent_plan with the limits of `device` (device_limits): the plan the persistent
    launchers use, or None when the persistent kernels cannot hold the layer there."""
    return persistent_plan(mode, D, B, H, P, dtype, *device_limits(device), zoneout=zoneout, reset=reset)
