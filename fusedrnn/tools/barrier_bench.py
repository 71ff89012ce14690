"""The empty grid barrier benchmark (`fusedrnn bench --barrier`): kernels/barrier.py timed on CUDA.

Per barrier = (t(N) - t(1)) / (N - 1) of one launch with N barriers and one with 1, at every SM
(the headline `barrier_us`, which the roofline's barrier floor can use via `--barrier-us`), at 2
programs, and without the grid sync (the CTA barrier of single-program plans). Without CUDA there
is nothing to time (the interpreter runs programs one after another): one interpreter run checks
the kernel instead. Tables: fusedrnn.tools.report.
"""
from __future__ import annotations

BARRIER_STEPS = 1024


def barrier_configs(num_sms):
    """(programs, directions, grid_sync, what) timed by measure_barrier; the first one's cost is
    the headline barrier_us (a grid barrier across every SM: "one empty grid barrier")."""
    out = [(num_sms, 1, True, "grid barrier, one program per SM"),
           (2, 1, True, "grid barrier, 2 programs"),
           (2, 2, False, "CTA barrier only (single-program plans, D=2)")]
    seen, res = set(), []
    for c in out:
        if c[0] <= num_sms and c[:3] not in seen:
            seen.add(c[:3])
            res.append(c)
    return res


def time_barrier(programs, directions, grid_sync, steps, rep_ms):
    """[median, p20, p80] ms of one grid_barrier launch with `steps` barriers (CUDA events via
    do_bench). Each timed call allocates and zeroes its counters and launches, as the persistent
    launchers do, but reads no flag (no host sync); the flags and counters of every timed call are
    checked afterwards."""
    import torch
    from triton.testing import do_bench

    from fusedrnn.kernels import grid_barrier

    for _ in range(2):  # compilation; a barrier that times out raises here, before any timing
        grid_barrier(programs, steps, "cuda", directions=directions, grid_sync=grid_sync)
    syncs = []

    def fn():
        syncs.append(grid_barrier(programs, steps, "cuda", directions=directions, grid_sync=grid_sync,
                                  check=False))

    q = do_bench(fn, warmup=max(1, int(rep_ms // 4)), rep=max(1, int(rep_ms)), quantiles=[0.5, 0.2, 0.8])
    got = torch.stack(syncs).cpu()
    want = programs // directions * steps if grid_sync else 0
    if bool((got[:, directions] != 0).any()):
        raise RuntimeError("grid barrier timed out during timing (programs not co-resident?)")
    if bool((got[:, :directions] != want).any()):
        raise RuntimeError(f"arrive counters {got[0, :directions].tolist()} != {want} after a launch")
    return [float(v) for v in q]


def measure_barrier(num_sms, steps=BARRIER_STEPS, rep_ms=50):
    """Time the empty barrier on CUDA for each of barrier_configs(num_sms): t(steps) and t(1), one
    launch each; per barrier = (t(steps) - t(1)) / (steps - 1) (medians), launch = t(1), which
    includes allocating and zeroing the counters. Returns (records, barrier_us of the first)."""
    if steps < 2:
        raise ValueError(f"steps must be >= 2 (the cost is a difference to one barrier), got {steps}")
    records = []
    for programs, directions, grid_sync, what in barrier_configs(num_sms):
        r = {"programs": programs, "directions": directions, "grid_sync": grid_sync, "what": what,
             "steps": steps, "status": "ok", "note": None, "t_steps_ms": None, "t1_ms": None,
             "barrier_us": None, "launch_us": None}
        try:
            r["t_steps_ms"] = time_barrier(programs, directions, grid_sync, steps, rep_ms)
            r["t1_ms"] = time_barrier(programs, directions, grid_sync, 1, rep_ms)
            r["barrier_us"] = (r["t_steps_ms"][0] - r["t1_ms"][0]) / (steps - 1) * 1e3
            r["launch_us"] = r["t1_ms"][0] * 1e3
        except Exception as exc:  # noqa: BLE001 - recorded; the other configurations still run
            r["status"], r["note"] = "error", f"{type(exc).__name__}: {exc}"[:300]
        records.append(r)
    return records, records[0]["barrier_us"] if records else None


NOT_ON_CPU = ("not measured: timing the grid barrier needs CUDA (the Triton interpreter runs "
              "programs one after another, so there is no grid barrier to time on CPU)")


def interpreter_check():
    """One interpreter run of the barrier kernel (1 program, 5 barriers): "ok" or what failed."""
    from fusedrnn.kernels import grid_barrier

    try:
        sync = grid_barrier(1, 5, "cpu")
    except Exception as exc:  # noqa: BLE001 - reported as the check's result
        return f"FAILED ({type(exc).__name__}: {exc})"[:300]
    return "ok" if sync.tolist() == [5, 0] else f"FAILED (counters {sync.tolist()}, want [5, 0])"
