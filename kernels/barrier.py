"""A kernel that does nothing but the persistent kernels' step barrier: the cost of one empty
barrier, for the issue's "time per step vs one empty grid barrier" target (fusedrnn bench
--barrier times it; fusedrnn/roofline.py takes the result as its barrier floor).

Shape legend:
    D directions (program rows)  n programs per direction  grid = (D, 1, n)
    sync (D + 1,) int32: sync[d] the monotonic arrive counter of direction d, sync[D] the error
    flag; the layout, barrier call and targets are those of scan_fwd_kernel / scan_bwd_kernel.
Usage:
    sync = grid_barrier(n_programs, n_steps, "cuda")    # n_steps barriers of all n_programs
    sync[:D] == n * n_steps (GRID_SYNC) or 0 (CTA barrier only), sync[D] == 0
Every program must be resident at once (n_programs <= the device's SMs). The Triton interpreter
runs programs one after another, so there it takes one program per direction.
"""
import torch
import triton
import triton.language as tl

from .common import MAX_SPIN, step_barrier
from .launch import Launch, interpreted, run
from .plan import device_limits


# n_steps = 1 and 1024 must run the same binary for their difference to be the barrier's cost
# (Triton would otherwise specialize the 1 into a constant).
@triton.jit(do_not_specialize=["n_steps"])
def grid_barrier_kernel(p_sync, n_steps, D, GRID_SYNC: tl.constexpr, MAX_SPIN: tl.constexpr):
    """n_steps calls of step_barrier, exactly as the persistent scan kernels make them."""
    pid_d = tl.program_id(0)
    n_prog = tl.num_programs(1) * tl.num_programs(2)
    ok = pid_d * 0 + 1
    n_sync = pid_d * 0
    for s in range(0, n_steps):
        n_sync += 1
        ok = step_barrier(p_sync, pid_d, D, n_prog, n_sync, ok, GRID_SYNC, MAX_SPIN)


def _int_arg(name, value, lo, hi=None):
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {type(value).__name__}")
    if value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be {bound}, got {value}")


def barrier_launch(n_programs, n_steps, device, directions=1, grid_sync=True, num_warps=8):
    """Validate and allocate; returns (sync, Launch) without launching. device "meta" lists the
    configuration for kernels/aot.py (an sm_90-sized device: 132 SMs)."""
    _int_arg("directions", directions, 1, 2)
    _int_arg("n_programs", n_programs, directions)
    _int_arg("n_steps", n_steps, 1)
    if num_warps not in (1, 2, 4, 8, 16, 32):
        raise ValueError(f"num_warps must be a power of two in [1, 32], got {num_warps!r}")
    if not isinstance(grid_sync, bool):
        raise ValueError(f"grid_sync must be a bool, got {type(grid_sync).__name__}")
    if n_programs % directions:
        raise ValueError(f"n_programs must be a multiple of directions={directions}, got {n_programs}")
    per_dir = n_programs // directions
    if per_dir * n_steps >= 2 ** 31:
        raise ValueError(f"n_programs / directions * n_steps must stay below 2**31 (int32 arrive "
                         f"counter), got {per_dir} * {n_steps}")
    device = torch.device(device)
    if device.type == "cpu":
        if not interpreted():
            raise ValueError("device is cpu: the barrier kernel needs CUDA (or TRITON_INTERPRET=1, "
                             "one program per direction)")
        if per_dir != 1:
            raise ValueError(f"n_programs must be {directions} (one program per direction) under the "
                             f"Triton interpreter, which runs programs one after another (any grid "
                             f"barrier between them would spin forever), got {n_programs}")
    elif device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device is cuda but CUDA is not available")
        num_sms = device_limits(device)[0]
        if n_programs > num_sms:
            raise ValueError(f"n_programs must be <= {num_sms} (the device's multiprocessors, so that "
                             f"every program is resident), got {n_programs}")
    elif device.type == "meta":
        num_sms = device_limits(device)[0]
        if n_programs > num_sms:
            raise ValueError(f"n_programs must be <= {num_sms} on meta (sm_90-sized), got {n_programs}")
    else:
        raise ValueError(f"device must be cuda (or cpu with TRITON_INTERPRET=1), got {device}")
    sync = torch.zeros(directions + 1, dtype=torch.int32, device=device)
    launch = Launch(grid_barrier_kernel, (directions, 1, per_dir),
                    dict(p_sync=sync, n_steps=n_steps, D=directions, GRID_SYNC=grid_sync,
                         MAX_SPIN=int(MAX_SPIN.value)), num_warps)
    return sync, launch


def check_barrier(sync, directions):
    """Raise RuntimeError if a barrier of the launch that used `sync` timed out (reads the flag:
    synchronizes with the device)."""
    if int(sync[directions].item()) != 0:
        raise RuntimeError("grid_barrier_kernel: the grid barrier timed out (programs not co-resident: "
                           "another process on the GPU, or more programs than fit at once?)")


def grid_barrier(n_programs, n_steps, device="cuda", *, directions=1, grid_sync=True, num_warps=8,
                 check=True):
    """Launch grid_barrier_kernel on grid (directions, 1, n_programs / directions): n_steps barriers,
    grid-wide per direction if grid_sync, else CTA-only (what single-program plans run). Returns
    the (directions + 1,) int32 sync tensor. check=False skips the flag read (no host sync; for
    timing) and leaves check_barrier to the caller."""
    sync, launch = barrier_launch(n_programs, n_steps, device, directions, grid_sync, num_warps)
    run([launch])
    if check:
        check_barrier(sync, directions)
    return sync
