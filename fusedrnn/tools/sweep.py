"""The timing sweep behind `fusedrnn bench`: benchmark points, providers, building the timed
callables, timing them and collecting records; plus the environment a result was taken in.

Providers (each gets the same weights and inputs):
    fusedrnn       fusedrnn module, backend="triton" (on CPU: the Triton interpreter, tiny shapes only)
    fusedrnn-auto  fusedrnn module, backend="auto" (its default: Triton on CUDA, torch's fused ops on CPU)
    fusedrnn-stepwise / fusedrnn-persistent   backend="triton" with that kernel forced (the
                   persistent one is skipped where fusedrnn.kernels.plan_for holds no plan)
    cudnn          torch.nn on the GPU (cuDNN)
    torch-cpu      torch.nn on the CPU
    reference      fusedrnn module, backend="reference" (the PyTorch step loop)
    compile        torch.compile of the reference module (only for T <= 128: compile unrolls the loop)
Passes (fusedrnn.spec.PASSES): forward (with autograd recording), backward (backward only, on a
retained graph), fwdbwd (forward + backward), inference (torch.no_grad()).

Timing. GPU: triton.testing.do_bench (CUDA events, L2 flushed between calls) after two warm-up
calls, so compilation and autotuning stay out; median, p20 and p80. CPU: each call timed after two
warm-up calls, providers interleaved call by call (rotating who goes first) so that drifts in clock
or load hit all of them alike; repetitions from a time budget. The CPU clock is the calling thread's
CPU time (time.thread_time) when torch runs one thread (the default: a shared machine's other
processes then cost waiting time, not measured time), wall time otherwise. Reported: the median,
p20 and p80 of the uncontended calls, those within FAST_BAND of the fastest call (see there), with
the median of all calls and the kept fraction beside them. The 1-minute load average and the timed
calls' wall/CPU ratio are watched at every point: a noisy point is measured again (each provider
keeps the lowest of its tries' medians: a disturbance only adds time), and marked "noisy" if it
stays so.
Reported per record: ms, tokens/s (T·B per second), achieved TFLOP/s (roofline.flops), peak memory
(GPU: torch.cuda.max_memory_allocated after a reset, for one call), time ratio to the baseline
(cudnn on GPU, torch-cpu on CPU; < 1 is faster), and the roofline floors (fusedrnn/tools/roofline.py)
with efficiency = floor / measured.
"""
from __future__ import annotations

import datetime
import itertools
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass

from fusedrnn.spec import dtype_name, parse_dtype

from .models import build_torch_module, convert_copy
from .roofline import Problem, floors
from .roofline import flops as count_flops

PROVIDERS = ("fusedrnn", "fusedrnn-auto", "fusedrnn-stepwise", "fusedrnn-persistent", "cudnn",
             "reference", "torch-cpu", "compile")
BACKEND_OF = {"fusedrnn": "triton", "fusedrnn-auto": "auto", "fusedrnn-stepwise": "triton",
              "fusedrnn-persistent": "triton", "reference": "reference", "compile": "reference"}
KERNEL_OF = {"fusedrnn-stepwise": "stepwise", "fusedrnn-persistent": "persistent"}
# The interpreter costs ~0.05 s per launch: fusedrnn on CPU only below this many serial steps.
INTERPRETER_MAX_STEPS = 16
INTERPRETER_MAX_BH = 64 * 64
COMPILE_MAX_T = 128

# Standard shapes: GPU sweep and CPU comparison.
GPU_SWEEP = dict(batch=[1, 8, 16, 64, 256], hidden=[128, 256, 512, 1024], seq=[1024])
GPU_QUICK = dict(batch=[8, 64], hidden=[256, 1024], seq=[256])
CPU_STANDARD = [dict(seq=100, batch=64, hidden=256), dict(seq=500, batch=1, hidden=64)]
CPU_QUICK = [dict(seq=8, batch=4, hidden=16)]


# ----------------------------------------------------------------------------------------------
# the points


class NoPointsError(ValueError):
    """The flags of a sweep combine into no benchmark point; the message says why."""


def sweep_problems(cells=None, dtypes=None, passes=None, batch=None, hidden=None, input=None,
                   seq=None, layers=None, bidirectional=None, proj=None, quick=False, cuda=False):
    """([Problem], [why a combination was dropped]) for comma-list flags (a cartesian product),
    with the device's default shapes for what is not given. Raises NoPointsError, saying why, when
    no combination is a valid point."""
    cells = cells or ["lstm"]
    dtypes = [dtype_name(d) for d in (dtypes or (["bf16"] if cuda else ["fp32"]))]
    passes = passes or ["fwdbwd", "inference"]
    layers = layers or [1]
    bidis = bidirectional or [False]
    projs = proj or [0]
    if batch or hidden or seq or input:
        if cuda:
            base = GPU_QUICK if quick else GPU_SWEEP
        else:
            base = {k: [v] for k, v in (CPU_QUICK[0] if quick else CPU_STANDARD[0]).items()}
        shapes = [dict(seq=t, batch=b, hidden=h)
                  for t in (seq or base["seq"]) for b in (batch or base["batch"])
                  for h in (hidden or base["hidden"])]
    elif cuda:
        base = GPU_QUICK if quick else GPU_SWEEP
        shapes = [dict(seq=t, batch=b, hidden=h)
                  for t in base["seq"] for b in base["batch"] for h in base["hidden"]]
    else:
        shapes = CPU_QUICK if quick else CPU_STANDARD
    inputs = input or [None]
    out, dropped = [], []
    for cell, dt, L, bi, pj, shp, inp, pass_ in itertools.product(
            cells, dtypes, layers, bidis, projs, shapes, inputs, passes):
        if pj and cell != "lstm":
            why = f"--proj {pj} applies to cell lstm only, not {cell}"
            if why not in dropped:
                dropped.append(why)
            continue
        if pj and pj >= shp["hidden"]:
            why = f"--proj {pj} must be smaller than --hidden {shp['hidden']} (torch.nn's proj_size < hidden_size)"
            if why not in dropped:
                dropped.append(why)
            continue
        p = Problem(cell=cell, seq=shp["seq"], batch=shp["batch"], input=inp or shp["hidden"],
                    hidden=shp["hidden"], layers=L, bidirectional=bi, proj_size=pj, dtype=dt,
                    pass_=pass_)
        if p.is_cell:  # one step of one cell: sequence length, layers and directions do not apply
            p = Problem(cell=cell, seq=1, batch=p.batch, input=p.input, hidden=p.hidden,
                        dtype=dt, pass_=pass_)
        if p not in out:
            out.append(p)
    if not out:
        raise NoPointsError("these flags combine into no benchmark point: " + "; ".join(dropped))
    return out, dropped


def default_providers(device, quick):
    if device == "cuda":
        return ["fusedrnn", "cudnn"]
    # The interpreter ("fusedrnn" on CPU) is left out: its time measures numpy's emulation of the
    # kernels, not the kernels, and its calls are too long to time reproducibly (FAST_BAND).
    return ["fusedrnn-auto", "torch-cpu"] + (["reference"] if quick else [])


# ----------------------------------------------------------------------------------------------
# building one provider


def skip_reason(provider, p, device):
    if provider == "cudnn" and device != "cuda":
        return "needs CUDA"
    if provider == "fusedrnn-persistent":
        reason = no_persistent_plan(p, device)
        if reason:
            return reason
    if BACKEND_OF.get(provider) == "triton" and device != "cuda":
        steps = p.num_layers * p.steps * p.dirs
        if steps > INTERPRETER_MAX_STEPS or p.batch * max(p.hidden, p.input) > INTERPRETER_MAX_BH:
            return ("Triton interpreter on CPU (~0.05 s per launch): only tiny shapes; "
                    "see fusedrnn-auto for fusedrnn's CPU path")
    if provider == "compile" and p.pass_ == "backward":
        return ("a compiled backward cannot run twice on a retained graph: see the compile "
                "fwdbwd record")
    if provider == "compile" and p.steps > COMPILE_MAX_T:
        return f"torch.compile unrolls the step loop: skipped for T > {COMPILE_MAX_T}"
    return None


def no_persistent_plan(p, device):
    """Why kernel="persistent" cannot hold the layers of p on this device, or None. Every layer
    has the same plan inputs (directions, batch, hidden, state; not the input size)."""
    import torch

    from fusedrnn import kernels

    if kernels.plan_for(p.mode, p.dirs, p.batch, p.hidden, p.state, parse_dtype(p.dtype),
                        torch.device(device)) is None:
        return (f"no persistent plan holds {p.mode} D={p.dirs} B={p.batch} H={p.hidden} "
                f"P={p.state} {p.dtype} on {device} (fusedrnn.kernels.plan_for)")
    return None


def tuning_ms(model):
    """Milliseconds backend="auto" spent choosing (fusedrnn.tune) in the model's last call, summed
    over its recurrent modules; None when nothing was tuned."""
    total = None
    for m in model.modules():
        d = getattr(m, "last_tuning", None)
        if d is not None and d.source == "tuned":
            total = (total or 0.0) + d.tuning_ms
    return total


def build(provider, p, device, seed=0):
    """(callable fn, tensors whose .grad to reset) for one provider, problem and pass. For
    "fusedrnn-auto", `fn.model` is the model, so the sweep can report what its first call spent
    tuning."""
    import torch

    torch.manual_seed(seed)
    base = build_torch_module(p.cell, p.input, p.hidden, p.num_layers, p.bidirectional,
                              p.proj_size)
    dev = "cpu" if provider == "torch-cpu" else device
    dt = parse_dtype(p.dtype)
    if provider in ("cudnn", "torch-cpu"):
        model = base
    else:
        model = convert_copy(base, BACKEND_OF[provider], KERNEL_OF.get(provider))
    model = model.to(device=dev, dtype=dt)
    if provider == "compile":
        model = torch.compile(model)
    gen = torch.Generator().manual_seed(seed + 1)
    shape = (p.batch, p.input) if p.is_cell else (p.steps, p.batch, p.input)
    train = p.pass_ != "inference"
    x = torch.randn(shape, generator=gen).to(device=dev, dtype=dt).requires_grad_(train)
    params = list(model.parameters())

    def first(out):
        return out[0] if isinstance(out, tuple) else out

    if p.pass_ == "inference":
        def fn():
            with torch.no_grad():
                model(x)
        fn.model = model
        return fn, []
    if p.pass_ == "forward":
        def fn():
            model(x)
        return fn, []
    y_shape = (p.batch, p.hidden) if p.is_cell else (p.steps, p.batch, p.dirs * p.state)
    gy = torch.randn(y_shape, generator=gen).to(device=dev, dtype=dt)
    if p.pass_ == "fwdbwd":
        def fn():
            first(model(x)).backward(gy)
        fn.model = model
        return fn, [x] + params
    y = first(model(x))

    def fn():
        y.backward(gy, retain_graph=True)
    return fn, [x] + params


def _clear(tensors):
    for t in tensors:
        t.grad = None


# ----------------------------------------------------------------------------------------------
# timing


def time_cuda(fn, grad_to_none, rep_ms):
    import torch
    from triton.testing import do_bench

    for _ in range(2):  # compilation, autotuning, cuDNN plan selection
        fn()
        _clear(grad_to_none)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2 ** 20
    _clear(grad_to_none)
    q = do_bench(fn, warmup=max(1, int(rep_ms // 4)), rep=max(1, int(rep_ms)),
                 grad_to_none=grad_to_none, quantiles=[0.5, 0.2, 0.8])
    return [float(v) for v in q], peak


# A virtual machine's core may be shared with another guest (its SMT sibling): on the 2-core VM
# this project is built on, a fixed piece of work runs alternately at full speed and at about half
# of it (1.8-2.2x slower), in stretches of milliseconds, in a mix that changes from minute to minute
# (measured with a fixed pure-Python loop: 35% of the time fast one minute, under 10% the next).
# The median of all calls then measures the neighbours, and two runs disagree by up to 60%. The
# calls within FAST_BAND of the fastest call of their provider ran uncontended, and their median
# measures the code: it is what the CPU table reports. The band is narrow because calls that
# overlap part of a slow stretch take any time between 1x and 2x: at 1.3x they made up most of the
# kept calls when the fast share was small, and three runs of the quick sweep spread by 22%; at
# 1.1x they stay out while every run still keeps tens of calls. On a machine without such
# contention most calls are within the band and the reported median sits a few percent under the
# all-call one. Calls much longer than the stretches (the Triton interpreter's, 0.2-0.8 s) are
# always a mix: no statistic of them reproduces on such a machine.
FAST_BAND = 1.1
# Timing budget per provider and point on CPU, seconds (the quick sweep's too): about a thousand
# calls of a few milliseconds, so that tens of them fall within the band even when the machine
# runs uncontended only a few percent of the time.
CPU_BUDGET_S = 3.0


@dataclass
class CpuTiming:
    """How CPU points are timed (see the module docstring); recorded in the result."""
    clock: str = "cpu"          # "cpu": time.thread_time of the calling thread; "wall": perf_counter
    budget_s: float = CPU_BUDGET_S  # per provider and point
    min_reps: int = 5
    max_reps: int = 5000
    retries: int = 2            # extra measurements of a noisy point
    max_load: float | None = None   # 1-minute load average above which a point is noisy (default: cpus)
    max_stretch: float = 1.5    # wall time / CPU time of the timed calls above which a point is noisy
    band: float | None = FAST_BAND  # keep the calls within band x the fastest; None: all calls

    def __post_init__(self):
        if self.clock not in ("cpu", "wall"):
            raise ValueError(f"clock must be 'cpu' or 'wall', got {self.clock!r}")
        if not self.budget_s > 0:
            raise ValueError(f"budget_s must be > 0, got {self.budget_s!r}")
        if self.band is not None and not self.band > 1:
            raise ValueError(f"band must be > 1 or None, got {self.band!r}")
        if self.max_load is None:
            self.max_load = float(os.cpu_count() or 1)

    def describe(self, threads):
        text = ("CPU time of the calling thread (time.thread_time)" if self.clock == "cpu"
                else "wall time (time.perf_counter)")
        return {"clock": self.clock, "clock_text": text, "threads": threads,
                "budget_s": self.budget_s, "min_reps": self.min_reps, "max_reps": self.max_reps,
                "retries": self.retries, "max_load": self.max_load,
                "max_stretch": self.max_stretch, "band": self.band}


def _load():
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def summarize(times_ms, band):
    """{median, p20, p80} of the calls within band x the fastest (all calls when band is None),
    plus all_median (every call) and kept (the fraction of calls inside the band); ms."""
    import numpy as np

    ts = np.asarray(times_ms, dtype=float)
    kept = ts if band is None else ts[ts <= band * ts.min()]
    q = [float(np.percentile(kept, p)) for p in (50, 20, 80)]
    return {"median": q[0], "p20": q[1], "p80": q[2], "all_median": float(np.median(ts)),
            "kept": len(kept) / len(ts)}


def time_cpu_interleaved(runs, timing):
    """runs: {name: (fn, grad_to_none)}; timing: CpuTiming. Two warm-up calls each, then providers
    interleaved round by round. Returns ({name: summarize(...)}, {name: error message},
    stretch = total wall / total CPU time of the timed calls)."""
    clock = time.thread_time if timing.clock == "cpu" else time.perf_counter
    est, times, errors = {}, {}, {}
    for name, (fn, g) in runs.items():
        try:
            for _ in range(2):
                _clear(g)
                t0 = clock()
                fn()
                est[name] = clock() - t0
        except Exception as exc:  # noqa: BLE001 - this provider fails; the others still run
            errors[name] = f"{type(exc).__name__}: {exc}"[:300]
            continue
        times[name] = []
    # Slow providers (the interpreter) get at least 3 reps, the others min_reps or more.
    reps = {n: int(min(timing.max_reps, max(3 if e > 0.5 else timing.min_reps,
                                            timing.budget_s / max(e, 1e-6))))
            for n, e in est.items() if n in times}
    names = list(times)
    wall_total = cpu_total = 0.0
    for r in range(max(reps.values(), default=0)):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            if r >= reps[name] or name in errors:
                continue
            fn, g = runs[name]
            _clear(g)
            try:
                w0, c0 = time.perf_counter(), time.thread_time()
                fn()
                c1, w1 = time.thread_time(), time.perf_counter()
            except Exception as exc:  # noqa: BLE001
                errors[name] = f"{type(exc).__name__}: {exc}"[:300]
                continue
            wall_total += w1 - w0
            cpu_total += c1 - c0
            times[name].append(((c1 - c0) if timing.clock == "cpu" else (w1 - w0)) * 1e3)
    res = {n: summarize(ts, timing.band) for n, ts in times.items() if n not in errors and ts}
    stretch = wall_total / cpu_total if cpu_total > 0 else None
    return res, errors, stretch


def time_cpu_point(runs, timing):
    """time_cpu_interleaved with the load watched: measured again (up to timing.retries times)
    while the load average or the wall/CPU stretch says the point was disturbed. A disturbance
    only ever adds time (another process on the core or its SMT sibling, evicted caches), so each
    provider keeps the lowest of its tries' medians (with that try's p20/p80). Returns (results,
    errors, watch) where watch = {"load": max load seen, "stretch": max wall/CPU ratio, "tries": n,
    "noisy": whether the last try was still disturbed}."""
    best, errors, loads, stretches = {}, {}, [], []
    noisy = False
    tries = 0
    for _ in range(1 + max(0, timing.retries)):
        tries += 1
        l0 = _load()
        res, errs, stretch = time_cpu_interleaved(runs, timing)
        l1 = _load()
        errors.update(errs)
        for name, q in res.items():
            if name not in best or q["median"] < best[name]["median"]:
                best[name] = q
        here = [v for v in (l0, l1) if v is not None]
        loads += here
        if stretch is not None:
            stretches.append(stretch)
        noisy = ((bool(here) and max(here) > timing.max_load)
                 or (stretch is not None and stretch > timing.max_stretch))
        if not noisy or errors:
            break
    best = {n: q for n, q in best.items() if n not in errors}
    watch = {"load": max(loads) if loads else None,
             "stretch": max(stretches) if stretches else None, "tries": tries, "noisy": noisy}
    return best, errors, watch


# ----------------------------------------------------------------------------------------------


def environment(device):
    import torch

    env = {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu": _cpu_name(),
        "torch_threads": torch.get_num_threads(),
        "argv": sys.argv,
    }
    try:
        import triton
        env["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        env["triton"] = None
    if device == "cuda":
        env["device_name"] = torch.cuda.get_device_name()
        env["cudnn"] = torch.backends.cudnn.version()
        env["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
        env["matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    else:
        env["device_name"] = env["cpu"]
    env["git_commit"], env["git_dirty"] = _git()
    try:
        env["loadavg"] = os.getloadavg()[0]
    except OSError:
        env["loadavg"] = None
    env["interpreter"] = os.environ.get("TRITON_INTERPRET") == "1"
    return env



def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cpus)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git():
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                    cwd=here, capture_output=True, text=True,
                                    timeout=10).stdout.strip())
        return commit, dirty
    except Exception:  # noqa: BLE001 - no git, not a checkout
        return None, None




def _record(provider, p, device):
    return {"provider": provider, "cell": p.cell, "seq": p.steps, "batch": p.batch,
            "input": p.input, "hidden": p.hidden, "layers": p.num_layers,
            "bidirectional": bool(p.bidirectional and not p.is_cell), "proj_size": p.proj_size,
            "dtype": p.dtype, "pass": p.pass_, "device": "cpu" if provider == "torch-cpu" else device,
            "status": "skipped", "note": None, "median_ms": None, "p20_ms": None, "p80_ms": None,
            "all_median_ms": None, "kept": None, "tokens_per_s": None, "tflops": None, "peak_mem_mb": None, "flops": count_flops(p),
            "floors": None, "efficiency": None, "baseline": None, "vs_baseline": None,
            "speedup": None, "watch": None}


def run_sweep(problems, providers, device, spec, rep_ms=None, budget_s=None, progress=True,
              quick=False, cpu_timing=None):
    """Time every provider at every problem; returns the records (see _record).

    rep_ms: the timing budget per measurement (GPU: do_bench's rep; CPU: per provider and point,
    overriding cpu_timing.budget_s). budget_s: start no new point after this many seconds.
    cpu_timing: a CpuTiming (default: CPU clock with one torch thread, else wall clock)."""
    import torch

    if cpu_timing is None:
        cpu_timing = CpuTiming(clock="cpu" if torch.get_num_threads() == 1 else "wall",
                               budget_s=CPU_BUDGET_S)
    if rep_ms is not None:
        cpu_timing = CpuTiming(**{**cpu_timing.__dict__, "budget_s": rep_ms / 1e3})
    baseline = "cudnn" if device == "cuda" else "torch-cpu"
    records = []
    bar = None
    if progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=len(problems) * len(providers), unit="run", dynamic_ncols=True,
                       file=sys.stderr)
        except ImportError:
            bar = None
    t_start = time.perf_counter()
    for p in problems:
        recs = {prov: _record(prov, p, device) for prov in providers}
        over = budget_s is not None and time.perf_counter() - t_start > budget_s
        runs = {}
        for prov in providers:
            r = recs[prov]
            r["floors"] = floors(p, spec) if r["device"] == device else None
            reason = "time budget exhausted" if over else skip_reason(prov, p, device)
            if reason:
                r["note"] = reason
                continue
            try:
                runs[prov] = build(prov, p, device)
                if prov == "fusedrnn-auto" and device == "cuda":
                    # the first call tunes (once per key); its cost is reported beside the time
                    runs[prov][0]()
                    r["tuning_ms"] = tuning_ms(runs[prov][0].model)
            except Exception as exc:  # noqa: BLE001 - recorded; the other providers still run
                r["status"], r["note"] = "error", f"{type(exc).__name__}: {exc}"[:300]
        n_timed = len(runs)
        cuda_runs = {k: v for k, v in runs.items() if recs[k]["device"] == "cuda"}
        cpu_runs = {k: v for k, v in runs.items() if recs[k]["device"] == "cpu"}
        for prov, (fn, g) in cuda_runs.items():
            r = recs[prov]
            if bar is not None:
                bar.set_description(f"{p.cell} {p.dtype} {p.pass_} T{p.steps} B{p.batch} "
                                    f"H{p.hidden} {prov}")
            try:
                q, peak = time_cuda(fn, g, rep_ms or (40 if quick else 100))
                r.update(status="ok", peak_mem_mb=peak)
                r["median_ms"], r["p20_ms"], r["p80_ms"] = q
            except Exception as exc:  # noqa: BLE001 - OOM, compile failure: record, go on
                r["status"], r["note"] = "error", f"{type(exc).__name__}: {exc}"[:300]
                torch.cuda.empty_cache()
            if bar is not None:
                bar.update(1)
        if cpu_runs:
            if bar is not None:
                bar.set_description(f"{p.cell} {p.dtype} {p.pass_} T{p.steps} B{p.batch} H{p.hidden}")
            res, errors, watch = time_cpu_point(cpu_runs, cpu_timing)
            for prov, q in res.items():
                recs[prov]["status"] = "ok"
                for k in ("median", "p20", "p80", "all_median"):
                    recs[prov][f"{k}_ms"] = q[k]
                recs[prov]["kept"] = q["kept"]
                recs[prov]["watch"] = watch
                if watch["noisy"]:
                    load = "-" if watch["load"] is None else f"{watch['load']:.1f}"
                    stretch = "-" if watch["stretch"] is None else f"{watch['stretch']:.2f}"
                    recs[prov]["note"] = (f"noisy after {watch['tries']} tries (load {load}, "
                                          f"wall/cpu {stretch})")
            for prov, msg in errors.items():
                recs[prov]["status"], recs[prov]["note"] = "error", msg
            if bar is not None:
                bar.update(len(cpu_runs))
        runs.clear()
        if cuda_runs:
            torch.cuda.empty_cache()
        if bar is not None:
            bar.update(len(providers) - n_timed)
        base_ms = recs[baseline]["median_ms"] if baseline in recs else None
        for prov, r in recs.items():
            ms = r["median_ms"]
            if ms:
                r["tokens_per_s"] = p.steps * p.batch / (ms / 1e3)
                r["tflops"] = r["flops"] / (ms / 1e3) / 1e12
                if r["floors"]:
                    r["efficiency"] = r["floors"]["floor_ms"] / ms
                if base_ms:
                    r["baseline"] = baseline
                    r["vs_baseline"] = ms / base_ms
                    r["speedup"] = base_ms / ms
            records.append(r)
    if bar is not None:
        bar.close()
    return records
