"""`fusedrnn bench`: time providers side by side over a sweep of shapes.

Providers (each gets the same weights and inputs):
    fusedrnn       fusedrnn module, backend="triton" (on CPU: the Triton interpreter, tiny shapes only)
    fusedrnn-auto  fusedrnn module, backend="auto" (its default: Triton on CUDA, torch's fused ops on CPU)
    fusedrnn-stepwise / fusedrnn-persistent   backend="triton" with that kernel forced (the
                   persistent one is skipped where persistent_plan cannot hold the layer)
    cudnn          torch.nn on the GPU (cuDNN)
    torch-cpu      torch.nn on the CPU
    reference      fusedrnn module, backend="reference" (the PyTorch step loop)
    compile        torch.compile of the reference module (only for T <= 128: compile unrolls the loop)
Modes: forward (with autograd recording), backward (backward only, on a retained graph),
fwdbwd (forward + backward), inference (torch.no_grad()).

Timing. GPU: triton.testing.do_bench (CUDA events, L2 flushed between calls) after two warm-up
calls, so compilation and autotuning stay out; median, p20 and p80. CPU: time.perf_counter around
each call after a warm-up call, providers interleaved round by round (rotating who goes first) so
that drifts in clock or load hit all of them alike; median, p20, p80.
Reported per record: ms, tokens/s (T·B per second), achieved TFLOP/s (roofline.flops), peak memory
(GPU: torch.cuda.max_memory_allocated after a reset, for one call), time ratio to the baseline
(cudnn on GPU, torch-cpu on CPU; < 1 is faster), and the roofline floors (see fusedrnn/roofline.py)
with efficiency = floor / measured.

`fusedrnn bench --barrier` (CUDA) times the empty grid barrier instead (kernels/barrier.py; see
measure_barrier); its JSON can feed the floors (`--barrier-us FILE`) in place of the estimate.
"""
from __future__ import annotations

import copy
import datetime
import itertools
import json
import os
import platform
import subprocess
import sys
import time

from .roofline import (MODES, Problem, floors, format_roofline, gpu_spec, load_barrier_us, markdown_table,
                       text_table, with_barrier)
from .roofline import flops as count_flops

PROVIDERS = ("fusedrnn", "fusedrnn-auto", "fusedrnn-stepwise", "fusedrnn-persistent", "cudnn", "reference",
             "torch-cpu", "compile")
BACKEND_OF = {"fusedrnn": "triton", "fusedrnn-auto": "auto", "fusedrnn-stepwise": "triton",
              "fusedrnn-persistent": "triton", "reference": "reference", "compile": "reference"}
KERNEL_OF = {"fusedrnn-stepwise": "stepwise", "fusedrnn-persistent": "persistent"}
CANON_DTYPE = {"fp64": "fp64", "float64": "fp64", "double": "fp64", "fp32": "fp32",
               "float32": "fp32", "float": "fp32", "bf16": "bf16", "bfloat16": "bf16",
               "fp16": "fp16", "float16": "fp16", "half": "fp16"}
# The interpreter costs ~0.05 s per launch: fusedrnn on CPU only below this many serial steps.
INTERPRETER_MAX_STEPS = 16
INTERPRETER_MAX_BH = 64 * 64
COMPILE_MAX_T = 128

# Standard shapes (the issue's): GPU sweep and CPU comparison.
GPU_SWEEP = dict(batch=[1, 8, 16, 64, 256], hidden=[128, 256, 512, 1024], seq=[1024])
GPU_QUICK = dict(batch=[8, 64], hidden=[256, 1024], seq=[256])
CPU_STANDARD = [dict(seq=100, batch=64, hidden=256), dict(seq=500, batch=1, hidden=64)]
CPU_QUICK = [dict(seq=8, batch=4, hidden=16)]


# ----------------------------------------------------------------------------------------------
# the sweep


def sweep_problems(args, device):
    """[Problem] for the flags (comma lists form a cartesian product), with device defaults."""
    cuda = device == "cuda" or (device is None and args.roofline)
    cells = args.cell or ["lstm"]
    dtypes = [CANON_DTYPE[d] for d in (args.dtype or (["bf16"] if cuda else ["fp32"]))]
    modes = args.mode or (["fwdbwd", "inference"])
    layers = args.layers or [1]
    bidis = args.bidirectional or [False]
    projs = args.proj or [0]
    if args.batch or args.hidden or args.seq or args.input:
        if cuda:
            base = GPU_QUICK if args.quick else GPU_SWEEP
        else:
            base = CPU_QUICK[0] if args.quick else CPU_STANDARD[0]
            base = {k: [v] for k, v in base.items()}
        shapes = [dict(seq=t, batch=b, hidden=h)
                  for t in (args.seq or base["seq"]) for b in (args.batch or base["batch"])
                  for h in (args.hidden or base["hidden"])]
    elif cuda:
        base = GPU_QUICK if args.quick else GPU_SWEEP
        shapes = [dict(seq=t, batch=b, hidden=h)
                  for t in base["seq"] for b in base["batch"] for h in base["hidden"]]
    else:
        shapes = CPU_QUICK if args.quick else CPU_STANDARD
    inputs = args.input or [None]
    out = []
    for cell, dt, L, bi, proj, shp, inp, mode in itertools.product(
            cells, dtypes, layers, bidis, projs, shapes, inputs, modes):
        if proj and cell != "lstm":
            continue
        if proj and proj >= shp["hidden"]:
            continue
        p = Problem(cell=cell, seq=shp["seq"], batch=shp["batch"], input=inp or shp["hidden"],
                    hidden=shp["hidden"], layers=L, bidirectional=bi, proj_size=proj, dtype=dt,
                    mode=mode)
        if p.is_cell:  # one step of one cell: sequence length, layers and directions do not apply
            p = Problem(cell=cell, seq=1, batch=p.batch, input=p.input, hidden=p.hidden,
                        dtype=dt, mode=mode)
        if p not in out:
            out.append(p)
    return out


def default_providers(device, quick):
    if device == "cuda":
        return ["fusedrnn", "cudnn"]
    return ["fusedrnn-auto", "torch-cpu"] + (["reference", "fusedrnn"] if quick else [])


# ----------------------------------------------------------------------------------------------
# building and running one provider


def _torch_dtype(name):
    import torch
    return {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16,
            "fp16": torch.float16}[name]


def skip_reason(provider, p, device):
    if provider == "cudnn" and device != "cuda":
        return "needs CUDA"
    if provider == "fusedrnn-persistent":
        reason = _no_persistent_plan(p, device)
        if reason:
            return reason
    if BACKEND_OF.get(provider) == "triton" and device != "cuda":
        steps = p.num_layers * p.steps * p.dirs
        if steps > INTERPRETER_MAX_STEPS or p.batch * max(p.hidden, p.input) > INTERPRETER_MAX_BH:
            return ("Triton interpreter on CPU (~0.05 s per launch): only tiny shapes; "
                    "see fusedrnn-auto for fusedrnn's CPU path")
    if provider == "compile" and p.mode == "backward":
        return ("a compiled backward cannot run twice on a retained graph: see the compile "
                "fwdbwd record")
    if provider == "compile" and p.steps > COMPILE_MAX_T:
        return f"torch.compile unrolls the step loop: skipped for T > {COMPILE_MAX_T}"
    return None


def _no_persistent_plan(p, device):
    """Why kernel="persistent" cannot hold the layers of p on this device, or None. Every layer
    has the same plan inputs (directions, batch, hidden, state; not the input size)."""
    import torch

    from . import dispatch
    mode = {"lstm": "LSTM", "lstmcell": "LSTM", "gru": "GRU", "grucell": "GRU",
            "rnn_tanh": "RNN_TANH", "rnncell": "RNN_TANH", "rnn_relu": "RNN_RELU",
            "rnncell_relu": "RNN_RELU"}[p.cell]
    try:
        dispatch.choose_kernel("persistent", mode, p.dirs, p.batch, p.hidden, p.state,
                               _torch_dtype(p.dtype), torch.device(device))
    except dispatch.BackendUnavailableError as exc:
        return f"no persistent plan: {exc}"
    return None


def build(provider, p, device, seed=0):
    """(callable fn, tensors whose .grad to reset) for one provider, problem and mode."""
    import torch

    from .verify import build_torch_module, convert_copy

    torch.manual_seed(seed)
    base = build_torch_module(p.cell, p.input, p.hidden, p.num_layers, p.bidirectional,
                              p.proj_size)
    dev = "cpu" if provider == "torch-cpu" else device
    dt = _torch_dtype(p.dtype)
    if provider in ("cudnn", "torch-cpu"):
        model = copy.deepcopy(base)
    else:
        model = convert_copy(base, BACKEND_OF[provider], KERNEL_OF.get(provider))
    model = model.to(device=dev, dtype=dt)
    if provider == "compile":
        model = torch.compile(model)
    gen = torch.Generator().manual_seed(seed + 1)
    shape = (p.batch, p.input) if p.is_cell else (p.steps, p.batch, p.input)
    train = p.mode != "inference"
    x = torch.randn(shape, generator=gen).to(device=dev, dtype=dt).requires_grad_(train)
    params = list(model.parameters())

    def first(out):
        return out[0] if isinstance(out, tuple) else out

    if p.mode == "inference":
        def fn():
            with torch.no_grad():
                model(x)
        return fn, []
    if p.mode == "forward":
        def fn():
            model(x)
        return fn, []
    y_shape = (p.batch, p.hidden) if p.is_cell else (p.steps, p.batch, p.dirs * p.state)
    gy = torch.randn(y_shape, generator=gen).to(device=dev, dtype=dt)
    if p.mode == "fwdbwd":
        def fn():
            first(model(x)).backward(gy)
        return fn, [x] + params
    y = first(model(x))

    def fn():
        y.backward(gy, retain_graph=True)
    return fn, [x] + params


def _clear(tensors):
    for t in tensors:
        t.grad = None


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


def time_cpu_interleaved(runs, budget_s, max_reps=200, min_reps=5):
    """runs: {name: (fn, grad_to_none)}. Two warm-up calls each, then providers interleaved round
    by round. Returns ({name: [median, p20, p80] ms}, {name: error message})."""
    import numpy as np

    est, times, errors = {}, {}, {}
    for name, (fn, g) in runs.items():
        try:
            for _ in range(2):
                _clear(g)
                t0 = time.perf_counter()
                fn()
                est[name] = time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001 - this provider fails; the others still run
            errors[name] = f"{type(exc).__name__}: {exc}"[:300]
            continue
        times[name] = []
    # Slow providers (the interpreter) get at least 3 reps, the others min_reps or more.
    reps = {n: int(min(max_reps, max(3 if e > 0.5 else min_reps, budget_s / max(e, 1e-6))))
            for n, e in est.items() if n in times}
    names = list(times)
    for r in range(max(reps.values(), default=0)):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            if r >= reps[name] or name in errors:
                continue
            fn, g = runs[name]
            _clear(g)
            try:
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1e3)
            except Exception as exc:  # noqa: BLE001
                errors[name] = f"{type(exc).__name__}: {exc}"[:300]
    res = {n: [float(np.percentile(ts, q)) for q in (50, 20, 80)]
           for n, ts in times.items() if n not in errors and ts}
    return res, errors


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
            "dtype": p.dtype, "mode": p.mode, "device": "cpu" if provider == "torch-cpu" else device,
            "status": "skipped", "note": None, "median_ms": None, "p20_ms": None, "p80_ms": None,
            "tokens_per_s": None, "tflops": None, "peak_mem_mb": None, "flops": count_flops(p),
            "floors": None, "efficiency": None, "baseline": None, "vs_baseline": None,
            "speedup": None}


def run_sweep(problems, providers, device, spec, rep_ms=None, budget_s=None, progress=True,
              quick=False):
    import torch

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
            except Exception as exc:  # noqa: BLE001
                r["status"], r["note"] = "error", f"{type(exc).__name__}: {exc}"[:300]
        n_timed = len(runs)
        cuda_runs = {k: v for k, v in runs.items() if recs[k]["device"] == "cuda"}
        cpu_runs = {k: v for k, v in runs.items() if recs[k]["device"] == "cpu"}
        for prov, (fn, g) in cuda_runs.items():
            r = recs[prov]
            if bar is not None:
                bar.set_description(f"{p.cell} {p.dtype} {p.mode} T{p.steps} B{p.batch} "
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
                bar.set_description(f"{p.cell} {p.dtype} {p.mode} T{p.steps} B{p.batch} H{p.hidden}")
            res, errors = time_cpu_interleaved(cpu_runs, (rep_ms or (300 if quick else 3000)) / 1e3)
            for prov, q in res.items():
                recs[prov]["status"] = "ok"
                recs[prov]["median_ms"], recs[prov]["p20_ms"], recs[prov]["p80_ms"] = q
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


# ----------------------------------------------------------------------------------------------
# output

HEADER = ("cell", "dtype", "mode", "T", "B", "I", "H", "L", "D", "provider", "ms", "p20-p80",
          "tok/s", "TFLOP/s", "mem MB", "x base", "floor ms", "eff", "note")


def _g(v, fmt):
    return "-" if v is None else format(v, fmt)


def table_rows(records):
    rows = []
    for r in records:
        fl = r["floors"]
        note = r["note"] or ""
        if r["status"] == "error":
            note = "ERROR " + note
        rows.append((r["cell"], r["dtype"], r["mode"], r["seq"], r["batch"], r["input"],
                     r["hidden"], r["layers"], 2 if r["bidirectional"] else 1, r["provider"],
                     _g(r["median_ms"], ".3f"),
                     "-" if r["p20_ms"] is None else f"{r['p20_ms']:.3f}-{r['p80_ms']:.3f}",
                     _g(r["tokens_per_s"], ".3g"), _g(r["tflops"], ".3g"),
                     _g(r["peak_mem_mb"], ".0f"), _g(r["vs_baseline"], ".2f"),
                     _g(fl["floor_ms"] if fl else None, ".3f"), _g(r["efficiency"], ".2f"),
                     note[:70]))
    return rows


def markdown(records, env, title="fusedrnn bench"):
    lines = [f"# {title}", "",
             f"- device: {env.get('device_name')} ({env['device']}), torch {env['torch']}, "
             f"triton {env.get('triton')}, CUDA {env.get('cuda')}",
             f"- git {env.get('git_commit')}{' (dirty)' if env.get('git_dirty') else ''}, "
             f"{env['timestamp']}",
             "- ms: median (p20-p80); x base: time / baseline time (cudnn on GPU, torch-cpu on "
             "CPU), < 1 is faster; floor: max(compute, memory, grid-barrier) lower bound "
             "(fusedrnn/roofline.py), eff = floor / ms" + _barrier_note(env), ""]
    lines.append(markdown_table(HEADER, table_rows(records)))
    return "\n".join(lines) + "\n"


def _barrier_note(env):
    if env.get("barrier_us") is None:
        return ""
    return f"; grid barrier {env['barrier_us']:.3g} us ({env.get('barrier_source')})"


def plot(records, path):
    """Speedup vs the baseline (or time, without one) across the sweep; one panel per
    (cell, dtype, mode). Returns None, or why nothing was written."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # noqa: BLE001
        return f"matplotlib unavailable ({exc}): no plot"
    groups = {}
    for r in records:
        groups.setdefault((r["cell"], r["dtype"], r["mode"]), []).append(r)
    n = len(groups)
    cols = min(n, 2)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(7 * cols, 4 * rows), squeeze=False)
    for ax, ((cell, dt, mode), recs) in zip(axes.flat, groups.items()):
        shapes = []
        for r in recs:
            key = (r["seq"], r["batch"], r["input"], r["hidden"], r["layers"], r["bidirectional"])
            if key not in shapes:
                shapes.append(key)
        labels = [f"T{s[0]} B{s[1]} H{s[3]}" + (f" L{s[4]}" if s[4] > 1 else "")
                  + (" bi" if s[5] else "") for s in shapes]
        has_base = any(r["speedup"] is not None for r in recs)
        provs = sorted({r["provider"] for r in recs})
        for prov in provs:
            ys = []
            for s in shapes:
                r = next((r for r in recs if r["provider"] == prov and
                          (r["seq"], r["batch"], r["input"], r["hidden"], r["layers"],
                           r["bidirectional"]) == s), None)
                v = None if r is None else (r["speedup"] if has_base else r["median_ms"])
                ys.append(float("nan") if v is None else v)
            if has_base and prov == recs[0].get("baseline") or all(y != y for y in ys):
                continue
            ax.plot(range(len(shapes)), ys, marker="o", label=prov)
        if has_base:
            ax.axhline(1.0, color="gray", lw=1, ls="--")
            base = next(r["baseline"] for r in recs if r["baseline"])
            ax.set_ylabel(f"speedup vs {base} (higher is better)")
        else:
            ax.set_ylabel("median ms")
        ax.set_yscale("log")
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
        ax.set_title(f"{cell} {dt} {mode}")
        ax.grid(True, alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def _barrier_arg(args):
    """(barrier_us or None, error message or None) from --barrier-us."""
    text = getattr(args, "barrier_us", None)
    if text is None:
        return None, None
    try:
        us = load_barrier_us(text)
    except ValueError as exc:
        return None, str(exc)
    if us is None:
        print(f"fusedrnn bench: warning: {text} holds no measured barrier (measured without CUDA?): "
              "the floors use the estimate", file=sys.stderr)
    return us, None


def cmd_bench(args, device):
    if getattr(args, "barrier", False):
        return cmd_barrier(args, device)
    barrier_us, err = _barrier_arg(args)
    if err:
        print(f"fusedrnn bench: {err}", file=sys.stderr)
        return 2
    problems = sweep_problems(args, device)
    if args.roofline:
        if gpu_spec(args.roofline) is None:
            from .roofline import GPUS
            print(f"fusedrnn bench: unknown GPU {args.roofline!r} for --roofline; known: "
                  f"{', '.join(GPUS)}", file=sys.stderr)
            return 2
        print(format_roofline(problems, args.roofline, barrier_us))
        return 0
    providers = args.providers or default_providers(device, args.quick)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    spec = None
    env = environment(device)
    if args.gpu_spec:
        spec = gpu_spec(args.gpu_spec)
        if spec is None:
            print(f"fusedrnn bench: unknown --gpu-spec {args.gpu_spec!r}", file=sys.stderr)
            return 2
    elif device == "cuda":
        spec = gpu_spec(env.get("device_name"))
    spec = with_barrier(spec, barrier_us)
    env["floors_gpu"] = spec["name"] if spec else None
    env["barrier_us"] = spec["barrier_us"] if spec else None
    env["barrier_source"] = spec.get("barrier_source", "estimate") if spec else None
    if env.get("loadavg") and env["loadavg"] > (os.cpu_count() or 1) and device == "cpu":
        print(f"fusedrnn bench: warning: load average {env['loadavg']:.1f} > {os.cpu_count()} "
              f"cpus: CPU timings with {env['torch_threads']} torch threads will be erratic "
              f"(oversubscribed OpenMP); --threads 1 is steadier", file=sys.stderr)
    print(f"fusedrnn bench on {env['device_name']}: {len(problems)} points x "
          f"{len(providers)} providers ({', '.join(providers)})", flush=True)
    t0 = time.perf_counter()
    records = run_sweep(problems, providers, device, spec, rep_ms=args.rep, budget_s=args.budget,
                        progress=not args.no_progress, quick=args.quick)
    env["seconds"] = time.perf_counter() - t0
    print(text_table(HEADER, table_rows(records)))
    notes = sorted({r["note"] for r in records if r["note"] and r["status"] == "skipped"})
    for n in notes:
        print(f"skipped: {n}")
    if args.out:
        _mkdir(args.out)
        with open(args.out, "w") as f:
            json.dump({"environment": env, "providers": providers, "records": records}, f,
                      indent=1)
        print(f"wrote {args.out}")
    if args.md:
        _mkdir(args.md)
        with open(args.md, "w") as f:
            f.write(markdown(records, env))
        print(f"wrote {args.md}")
    if args.plot:
        _mkdir(args.plot)
        why = plot(records, args.plot)
        print(why if why else f"wrote {args.plot}")
    n_err = sum(r["status"] == "error" for r in records)
    print(f"{len(records)} records, {n_err} errors, {env['seconds']:.1f} s")
    return 0


# ----------------------------------------------------------------------------------------------
# the empty grid barrier (kernels/barrier.py): `fusedrnn bench --barrier`

BARRIER_STEPS = 1024
BARRIER_HEADER = ("programs", "D", "grid sync", "t(N) ms", "t(1) ms", "us / barrier", "launch us",
                  "what", "note")


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

    from .kernels import grid_barrier

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


def barrier_rows(records):
    rows = []
    for r in records:
        t = r["t_steps_ms"]
        rows.append((r["programs"], r["directions"], "yes" if r["grid_sync"] else "no",
                     "-" if t is None else f"{t[0]:.4f}", _g(r["t1_ms"] and r["t1_ms"][0], ".4f"),
                     _g(r["barrier_us"], ".3f"), _g(r["launch_us"], ".2f"), r["what"],
                     ("ERROR " + r["note"]) if r["status"] == "error" else (r["note"] or "")))
    return rows


def barrier_markdown(result):
    env = result["environment"]
    lines = ["# fusedrnn bench --barrier: one empty grid barrier", "",
             f"- device: {env.get('device_name')} ({env['device']}), torch {env['torch']}, "
             f"triton {env.get('triton')}, CUDA {env.get('cuda')}",
             f"- git {env.get('git_commit')}{' (dirty)' if env.get('git_dirty') else ''}, "
             f"{env['timestamp']}"]
    if result["note"]:
        lines.append(f"- {result['note']}")
    if result["records"]:
        n = result["steps"]
        lines += [f"- grid_barrier_kernel (kernels/barrier.py: the persistent kernels' step_barrier and "
                  f"nothing else), one launch with N = {n} barriers and one with 1 (do_bench medians, "
                  f"p20-p80 in the JSON): us / barrier = (t(N) - t(1)) / (N - 1); launch us = t(1), "
                  f"allocating + zeroing the counters + one launch",
                  f"- barrier_us = {_g(result['barrier_us'], '.3f')} (first row), the roofline's "
                  f"barrier floor with `--barrier-us barrier.json`", "",
                  markdown_table(BARRIER_HEADER, barrier_rows(result["records"]))]
    return "\n".join(lines) + "\n"


def cmd_barrier(args, device):
    """`fusedrnn bench --barrier`: measure_barrier on CUDA; without CUDA a clear message, one
    interpreter run of the kernel (1 program) as a check, and outputs saying nothing was measured."""
    env = environment(device)
    result = {"environment": env, "steps": None, "barrier_us": None, "barrier_source": None,
              "records": [], "note": None}
    rc = 0
    if device != "cuda":
        note = ("not measured: timing the grid barrier needs CUDA (the Triton interpreter runs "
                "programs one after another, so there is no grid barrier to time on CPU)")
        print(f"fusedrnn bench --barrier: {note}")
        try:
            from .kernels import grid_barrier
            sync = grid_barrier(1, 5, "cpu")
            check = "ok" if sync.tolist() == [5, 0] else f"FAILED (counters {sync.tolist()}, want [5, 0])"
        except Exception as exc:  # noqa: BLE001
            check = f"FAILED ({type(exc).__name__}: {exc})"[:300]
        rc = 0 if check == "ok" else 1
        result["note"] = f"{note}; interpreter check of the kernel (1 program, 5 barriers): {check}"
        print(f"interpreter check of grid_barrier_kernel (1 program, 5 barriers): {check}")
    else:
        import torch
        num_sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
        print(f"fusedrnn bench --barrier on {env['device_name']} ({num_sms} SMs)", flush=True)
        t0 = time.perf_counter()
        records, us = measure_barrier(num_sms, BARRIER_STEPS, args.rep or 50)
        env["seconds"] = time.perf_counter() - t0
        result.update(steps=BARRIER_STEPS, records=records, barrier_us=us,
                      barrier_source="measured" if us is not None else None)
        print(text_table(BARRIER_HEADER, barrier_rows(records), left=(7, 8)))
        print(f"barrier_us = {_g(us, '.3f')} (grid barrier across {num_sms} programs)")
        rc = 0 if all(r["status"] == "ok" for r in records) else 1
    if args.out:
        _mkdir(args.out)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")
    if args.md:
        _mkdir(args.md)
        with open(args.md, "w") as f:
            f.write(barrier_markdown(result))
        print(f"wrote {args.md}")
    return rc


def _mkdir(path):
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)


__all__ = ["run_sweep", "sweep_problems", "cmd_bench", "measure_barrier", "MODES", "PROVIDERS"]
