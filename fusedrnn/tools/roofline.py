"""Lower bounds ("floors") for the time of an RNN layer stack on a given GPU: numbers only (the
table that prints them is fusedrnn.tools.report.format_roofline).

Three floors are computed for every benchmark point:

* compute: FLOPs / the device's dense matmul rate for the dtype;
* memory: the bytes this design must move (see `bytes_moved`) / HBM bandwidth;
* sync: the serial per-time-step cost: T x one kernel launch per step and layer for the stepwise
  kernel (``launch_ms``), or T x one grid-wide barrier for a persistent kernel (``barrier_ms``).
  The barrier cost is the GPU table's estimate unless a measured one is given (``barrier_us``:
  ``fusedrnn bench --barrier`` times kernels/barrier.py on the GPU; ``--barrier-us`` passes it on);
  ``barrier_source`` in the result says which.

``floor_ms`` = max(compute, memory, barrier) is what no implementation of this design can beat on
the device (the barrier floor is used because a persistent kernel is the better of the two
schedules); efficiency = floor_ms / measured. These are bounds, not predictions: the recurrent
matmul per step is small and latency bound, so real times sit well above the FLOP floor at small B.

FLOP counting (matmuls only, elementwise work ignored), per layer and direction:
    forward   2·T·B·G·H·(I_l + P)  (+ 2·T·B·P·H with a projection)
    backward  ≈ 2 x forward (grads of the activations and of the weights)
where I_l is the input size of layer l (I for layer 0, D·P after), P = proj_size or H, G gates.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from fusedrnn.spec import CELL_MODE, GATES, PASSES, STEP_CELLS, check_choice

# Peak dense (no structured sparsity) rates in TFLOP/s and HBM bandwidth in TB/s.
# Sources: NVIDIA H100 Tensor Core GPU datasheet (H100 SXM5: BF16/FP16 989.4, TF32 494.7,
# FP32 66.9, FP64 tensor 66.9 TFLOP/s, HBM3 3.35 TB/s); NVIDIA H200 datasheet (H200 SXM:
# the same GH100 SM configuration and clocks as H100 SXM, HBM3e 4.8 TB/s, 141 GB); NVIDIA A100
# datasheet (A100 SXM4 80GB: BF16/FP16 312, TF32 156, FP32 19.5, FP64 tensor 19.5 TFLOP/s,
# HBM2e 2.039 TB/s).
# float32 uses the non-tensor-core FP32 rate: fusedrnn computes float32 in full precision (no TF32),
# which its 1e-5 tolerance needs. cuDNN may use TF32 for float32 when torch allows it, in which
# case it can beat the float32 "floor" (the TF32 rate is listed for reference).
# launch_us and barrier_us are ESTIMATES, not datasheet numbers: a back-to-back Triton launch
# costs ~4-6 us of CPU+GPU overhead on Hopper, a software grid barrier (atomics in global memory)
# ~1-2 us. Measure on the machine to refine (`fusedrnn bench --barrier` measures the barrier).
GPUS = {
    "H100": dict(name="NVIDIA H100 SXM5 80GB", bf16=989.4, fp16=989.4, tf32=494.7, fp32=66.9,
                 fp64=66.9, hbm_tbs=3.35, launch_us=5.0, barrier_us=1.5),
    "H200": dict(name="NVIDIA H200 SXM 141GB", bf16=989.4, fp16=989.4, tf32=494.7, fp32=66.9,
                 fp64=66.9, hbm_tbs=4.8, launch_us=5.0, barrier_us=1.5),
    "A100": dict(name="NVIDIA A100 SXM4 80GB", bf16=312.0, fp16=312.0, tf32=156.0, fp32=19.5,
                 fp64=19.5, hbm_tbs=2.039, launch_us=5.0, barrier_us=1.5),
}

DTYPE_BYTES = {"fp64": 8, "fp32": 4, "bf16": 2, "fp16": 2}


def gpu_spec(name):
    """The table entry for a GPU given by key ("H200") or device name ("NVIDIA H200"); or None."""
    if not name:
        return None
    up = name.upper()
    if up in GPUS:
        return GPUS[up]
    for key, spec in GPUS.items():
        if key in up:
            return spec
    return None


@dataclass
class Problem:
    """One benchmark point: a module (`cell`, a name of fusedrnn.spec.CELLS), its sizes, a dtype
    name and the pass timed (fusedrnn.spec.PASSES; `pass_` because `pass` is a Python keyword)."""
    cell: str = "lstm"
    seq: int = 1024
    batch: int = 64
    input: int = 256
    hidden: int = 256
    layers: int = 1
    bidirectional: bool = False
    proj_size: int = 0
    dtype: str = "bf16"
    pass_: str = "fwdbwd"

    def __post_init__(self):
        check_choice(self.cell, tuple(CELL_MODE), "cell")
        check_choice(self.pass_, PASSES, "pass_")
        check_choice(self.dtype, tuple(DTYPE_BYTES), "dtype")

    @property
    def mode(self):
        """The recurrence (fusedrnn.spec.MODES) of the cell."""
        return CELL_MODE[self.cell]

    @property
    def gates(self):
        return GATES[self.mode]

    @property
    def is_cell(self):
        return self.cell in STEP_CELLS

    @property
    def steps(self):
        """Time steps actually run: a cell is benchmarked as one step."""
        return 1 if self.is_cell else self.seq

    @property
    def dirs(self):
        return 2 if (self.bidirectional and not self.is_cell) else 1

    @property
    def num_layers(self):
        return 1 if self.is_cell else self.layers

    @property
    def state(self):
        return self.proj_size if self.proj_size else self.hidden

    def layer_inputs(self):
        return [self.input if l == 0 else self.dirs * self.state for l in range(self.num_layers)]


def forward_flops(p: Problem):
    G, T, B, H, P = p.gates, p.steps, p.batch, p.hidden, p.state
    total = 0
    for I_l in p.layer_inputs():
        per_dir = 2 * T * B * G * H * (I_l + P)
        if p.proj_size:
            per_dir += 2 * T * B * P * H
        total += p.dirs * per_dir
    return total


def flops(p: Problem):
    f = forward_flops(p)
    return {"forward": f, "inference": f, "backward": 2 * f, "fwdbwd": 3 * f}[p.pass_]


def bytes_moved(p: Problem):
    """Compulsory HBM traffic of this design (an estimate, see docs/design.md):

    forward, per layer and direction: read x and the weights, write the input projection xg and
    read it back, write y; in training also write the saved workspace (hp, gates, cs; float32, or
    float64 for float64). backward: read the workspace and dy, write dxg (and dgh for GRU), read it
    back twice (dW_ih and dx matmuls) plus x and hp again, write dx and the weight gradients.
    """
    e = DTYPE_BYTES[p.dtype]
    ws = 8 if p.dtype == "fp64" else 4
    G, T, B, H, P = p.gates, p.steps, p.batch, p.hidden, p.state
    GH = G * H
    W = 4 * H if G in (3, 4) else H
    C = H if G == 4 else 0
    fwd = bwd = 0
    for I_l in p.layer_inputs():
        for _ in range(p.dirs):
            wbytes = (GH * (I_l + P) + GH * 2 + (P * H if p.proj_size else 0)) * e
            fwd += T * B * I_l * e + wbytes + 2 * T * B * GH * e + T * B * P * e
            work = T * B * (P + W + C) * ws  # the saved workspace
            if p.pass_ != "inference":
                fwd += work
            bwd += (work + T * B * P * e                        # workspace, dy
                    + T * B * GH * e * (2 if G == 3 else 1)     # write dxg (and dgh)
                    + 2 * T * B * GH * e                        # read dxg for dW_ih and dx
                    + T * B * I_l * e + T * B * P * ws          # x and hp for dW_ih, dW_hh
                    + T * B * I_l * e + 2 * wbytes)             # write dx; weights and grads
    return {"forward": fwd, "inference": fwd, "backward": bwd, "fwdbwd": fwd + bwd}[p.pass_]


def serial_steps(p: Problem):
    """Sequential time steps (one launch or barrier each): per layer, forward T, backward T.
    Both directions of a layer are assumed to run in the same launch."""
    per_pass = p.num_layers * p.steps
    return {"forward": per_pass, "inference": per_pass, "backward": per_pass,
            "fwdbwd": 2 * per_pass}[p.pass_]


def rate_tflops(spec, dtype):
    return spec[dtype]


def barrier_cost(spec, barrier_us=None):
    """(us, source) of one grid barrier: barrier_us if given ("measured"), else the spec's own
    (its "barrier_source", "estimate" for the GPUS table)."""
    if barrier_us is not None:
        return float(barrier_us), "measured"
    return spec["barrier_us"], spec.get("barrier_source", "estimate")


def with_barrier(spec, barrier_us):
    """A copy of spec whose barrier cost is the measured barrier_us (spec itself if None)."""
    if spec is None or barrier_us is None:
        return spec
    return dict(spec, barrier_us=float(barrier_us), barrier_source="measured")


def load_barrier_us(text):
    """The barrier cost a user passed (--barrier-us): a number of microseconds, or the path of a
    `fusedrnn bench --barrier --out` JSON file (its "barrier_us"; None if it measured nothing).
    Raises ValueError for anything else."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = None
    if value is None:
        try:
            with open(text) as f:
                value = json.load(f).get("barrier_us")
        except (OSError, ValueError, AttributeError) as exc:
            raise ValueError(f"--barrier-us takes microseconds or a barrier JSON file from "
                             f"`fusedrnn bench --barrier --out`, got {text!r} ({exc})") from None
        if value is None:
            return None
        value = float(value)
    if not value > 0 or value == float("inf"):
        raise ValueError(f"--barrier-us must be a positive number of microseconds, got {text!r}")
    return value


def floors(p: Problem, spec, barrier_us=None):
    """A dict of floors in ms for problem p on GPU spec (an entry of GPUS), or None without spec.
    barrier_us: a measured grid-barrier cost overriding the spec's (see barrier_cost)."""
    if spec is None:
        return None
    f, b, n = flops(p), bytes_moved(p), serial_steps(p)
    b_us, b_source = barrier_cost(spec, barrier_us)
    compute_ms = f / (rate_tflops(spec, p.dtype) * 1e12) * 1e3
    memory_ms = b / (spec["hbm_tbs"] * 1e12) * 1e3
    launch_ms = n * spec["launch_us"] * 1e-3
    barrier_ms = n * b_us * 1e-3
    return {
        "gpu": spec["name"],
        "flops": f,
        "bytes": b,
        "serial_steps": n,
        "compute_ms": compute_ms,
        "memory_ms": memory_ms,
        "launch_ms": launch_ms,
        "barrier_ms": barrier_ms,
        "barrier_us": b_us,
        "barrier_source": b_source,
        "floor_ms": max(compute_ms, memory_ms, barrier_ms),
    }
