"""The `fusedrnn` command: `fusedrnn verify` and `fusedrnn bench` (also `python -m fusedrnn ...`).

    fusedrnn verify [--quick | --full] [--cell lstm,gru] [--dtype fp32,bf16] [--device cpu|cuda]
                    [--backend auto,triton]
    fusedrnn bench  [--quick] [--cell lstm] [--batch 1,8,64] [--hidden 256] [--seq 1024]
                    [--pass fwdbwd,inference] [--dtype bf16] [--providers fusedrnn,cudnn]
                    [--threads 1] [--out results.json] [--plot results.png] [--md results.md]
    fusedrnn bench --roofline H200 [shape flags]    print the floors only; runs nothing
    fusedrnn bench --barrier [--out barrier.json] [--md barrier.md]
                    time one empty grid barrier (CUDA; kernels/barrier.py)
    --barrier-us US|barrier.json   a measured barrier cost for the floors (--roofline or a sweep)

Without CUDA (or with --device cpu) the Triton kernels run through the Triton interpreter, which
must be switched on before the kernels are imported: main() sets TRITON_INTERPRET=1 first thing,
before anything that could import fusedrnn.kernels.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from fusedrnn.spec import BACKENDS, CELLS, DTYPE_CHOICES, KERNEL_CHOICES, PASSES

# (none of these import fusedrnn.kernels: TRITON_INTERPRET can still be set after them)
from . import tune_cli
from .sweep import PROVIDERS


def _csv(kind, allowed=None):
    def parse(text):
        items = [s.strip() for s in str(text).split(",") if s.strip()]
        if not items:
            raise argparse.ArgumentTypeError("empty list")
        out = []
        for s in items:
            if kind is int:
                try:
                    v = int(s)
                except ValueError:
                    raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None
                if v <= 0:
                    raise argparse.ArgumentTypeError(f"{s!r} must be positive")
                out.append(v)
            elif kind == "bool":
                low = s.lower()
                if low in ("1", "true", "yes", "on", "bi"):
                    out.append(True)
                elif low in ("0", "false", "no", "off", "uni"):
                    out.append(False)
                else:
                    raise argparse.ArgumentTypeError(f"{s!r} is not a boolean (0/1)")
            else:
                low = s.lower()
                if allowed is not None and low not in allowed:
                    raise argparse.ArgumentTypeError(
                        f"invalid choice {s!r} (choose from {', '.join(allowed)})")
                out.append(low)
        return out
    parse.__name__ = "list"
    return parse


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Shows "(default: X)" for every option with a fixed default; device-dependent defaults are
    spelled out in the option's own help."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" not in text and action.default not in (None, False, argparse.SUPPRESS) \
                and action.option_strings:
            text += " (default: %(default)s)"
        return text


def _one_of(choices):
    return "comma list of " + ", ".join(choices)


def build_parser():
    from fusedrnn import __version__

    p = argparse.ArgumentParser(prog="fusedrnn", formatter_class=_Formatter,
                                description="fusedrnn: check and time the fused RNN kernels.")
    p.add_argument("--version", action="version", version=f"fusedrnn {__version__}")
    sub = p.add_subparsers(dest="command", metavar="{verify,bench,tune}")
    sub.required = True

    v = sub.add_parser("verify", formatter_class=_Formatter,
                       help="fusedrnn vs the float64 reference: errors per quantity",
                       description="Run fusedrnn's backends against the float64 reference over a "
                                   "grid of cells, shapes and options; exit 1 on any failure.")
    v.add_argument("--cell", type=_csv(str, CELLS), default=None,
                   help=_one_of(CELLS) + " (default: all)")
    v.add_argument("--dtype", type=_csv(str, DTYPE_CHOICES), default=None,
                   help=_one_of(DTYPE_CHOICES) + " (default: fp32,bf16,fp64,fp16; the quick grid: "
                        "fp32,fp64)")
    v.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda if available, else cpu (Triton interpreter)")
    size = v.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="the quick grid: tiny shapes, few configurations (the default on cpu)")
    size.add_argument("--full", action="store_true",
                      help="the full grid (the default on cuda; on cpu minutes to hours)")
    v.add_argument("--shape", type=_csv(int), default=None, metavar="T,B,I,H",
                   help="override the grid's sizes (default 37,13,29,47; quick grid 3,3,5,7)")
    v.add_argument("--backend", type=_csv(str, BACKENDS), default=None,
                   help=_one_of(BACKENDS) + " (default: cuda: triton; cpu: auto,triton, i.e. what "
                        "runs by default there, torch's fused ops, and the Triton kernels through "
                        "the interpreter)")
    v.add_argument("--kernel", default=None, choices=KERNEL_CHOICES,
                   help="force a Triton kernel (default: the module's choice)")
    v.add_argument("--verbose", "-v", action="store_true", help="print every entry of every case")
    v.add_argument("--json", metavar="FILE", help="write every report as JSON")
    v.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                   help="start no new case after this many seconds (the rest: not run; exit "
                        "status 0 only if every case that ran passed; default: no limit)")

    tune_cli.add_parser(sub)
    b = sub.add_parser("bench", formatter_class=_Formatter, help="time providers side by side",
                       description="Time fusedrnn against cuDNN / torch.nn / the reference. "
                                   "List-valued flags take comma lists and form a sweep "
                                   "(cartesian product); a combination that is no valid point "
                                   "(e.g. --proj with gru, or --proj >= --hidden) is dropped, and "
                                   "flags that leave no point at all are an error.")
    b.add_argument("--cell", type=_csv(str, CELLS), default=None,
                   help=_one_of(CELLS) + " (default: lstm)")
    b.add_argument("--batch", type=_csv(int), default=None,
                   help="batch sizes (default: cuda 1,8,16,64,256, quick 8,64; cpu 64, quick 4)")
    b.add_argument("--hidden", type=_csv(int), default=None,
                   help="hidden sizes (default: cuda 128,256,512,1024, quick 256,1024; cpu 256, "
                        "quick 16)")
    b.add_argument("--input", type=_csv(int), default=None, help="input sizes (default: = hidden)")
    b.add_argument("--seq", type=_csv(int), default=None,
                   help="sequence lengths (default: cuda 1024, quick 256; cpu 100, quick 8)")
    b.add_argument("--layers", type=_csv(int), default=None, help="layer counts (default: 1)")
    b.add_argument("--bidirectional", type=_csv("bool"), default=None,
                   help="0/1 (comma list to sweep; default: 0)")
    b.add_argument("--proj", type=_csv(int), default=None,
                   help="LSTM proj_size, < hidden (default: none)")
    b.add_argument("--dtype", type=_csv(str, DTYPE_CHOICES), default=None,
                   help=_one_of(DTYPE_CHOICES) + " (default: bf16 on cuda, fp32 on cpu)")
    b.add_argument("--pass", "--mode", dest="passes", type=_csv(str, PASSES), default=None,
                   help=_one_of(PASSES) + " (default: fwdbwd,inference); --mode is an alias")
    b.add_argument("--providers", type=_csv(str, PROVIDERS), default=None,
                   help=_one_of(PROVIDERS) +
                        " (default: cuda: fusedrnn,cudnn; cpu: fusedrnn-auto,torch-cpu, quick "
                        "also reference,fusedrnn)")
    b.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda if available, else cpu")
    b.add_argument("--quick", action="store_true", help="small default sweep, short timings")
    b.add_argument("--out", metavar="FILE.json", help="write every record as JSON")
    b.add_argument("--plot", metavar="FILE.png", help="plot speedup (or time) across the sweep")
    b.add_argument("--md", metavar="FILE.md", help="write the result table as markdown")
    b.add_argument("--roofline", metavar="GPU", help="print the floors on GPU (H100, H200, A100) "
                                                      "for the requested shapes; runs nothing")
    b.add_argument("--barrier", action="store_true",
                   help="time one empty grid barrier instead of a sweep (needs CUDA: "
                        "kernels/barrier.py at every SM and at 2 programs); --out/--md write it")
    b.add_argument("--barrier-us", metavar="US|FILE.json",
                   help="grid-barrier cost for the floors, in us or the JSON of `bench --barrier "
                        "--out` (default: the GPU table's estimate)")
    b.add_argument("--gpu-spec", metavar="GPU", help="roofline table entry to use for the floors "
                                                      "(default: detected from the device name)")
    b.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                   help="stop timing new points after this many seconds (remaining: skipped; "
                        "default: no limit)")
    b.add_argument("--rep", type=float, default=None, metavar="MS",
                   help="timing budget per measurement in ms (cuda: do_bench rep, default 100, "
                        "quick 40; cpu: per provider and point, default 3000, quick too)")
    b.add_argument("--threads", type=int, default=None,
                   help="torch threads for CPU timing (default: 1, pinned, on cpu; torch's "
                        "default on cuda)")
    b.add_argument("--clock", choices=("cpu", "wall"), default=None,
                   help="CPU timing clock: cpu = the calling thread's CPU time (needs --threads "
                        "1), wall = elapsed time (default: cpu with one thread, else wall)")
    b.add_argument("--retries", type=int, default=2,
                   help="CPU: extra measurements of a point the load disturbed")
    b.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return p


def _pick_device(requested):
    """Resolve the device and switch the Triton interpreter on for CPU, before kernels load."""
    if requested == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
        return "cpu"
    import torch  # importing torch does not import fusedrnn.kernels

    if requested == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("fusedrnn: --device cuda requested but CUDA is not available")
        return "cuda"
    if torch.cuda.is_available():
        return "cuda"
    os.environ["TRITON_INTERPRET"] = "1"
    return "cpu"


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "tune":
        return tune_cli.cmd_tune(args)
    if args.command == "bench":
        if args.barrier and args.roofline:
            parser.error("--barrier measures on the device; --roofline runs nothing: pick one")
        if args.threads is not None and args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        if args.clock == "cpu" and args.threads not in (None, 1):
            parser.error(f"--clock cpu times the calling thread only: it needs --threads 1, got "
                         f"--threads {args.threads}")
        if args.retries < 0:
            parser.error(f"--retries must be >= 0, got {args.retries}")
    if args.command == "verify" and args.shape is not None and len(args.shape) != 4:
        parser.error(f"--shape takes four integers T,B,I,H, got {len(args.shape)}")
    roofline_only = args.command == "bench" and args.roofline
    device = None if roofline_only else _pick_device(args.device)
    if device == "cpu" and "fusedrnn.kernels" in sys.modules:
        print("fusedrnn: warning: fusedrnn.kernels was imported before TRITON_INTERPRET=1 was set",
              file=sys.stderr)
    if args.command == "verify":
        return cmd_verify(args, device)
    return cmd_bench(args, device, parser)


# ----------------------------------------------------------------------------------------------
# fusedrnn verify


def cmd_verify(args, device):
    from . import verify as V
    from .report import text_table

    quick = args.quick or (device == "cpu" and not args.full)
    cells = args.cell or list(V.CELLS)
    dtypes = args.dtype or (["fp32", "fp64"] if quick else ["fp32", "bf16", "fp64", "fp16"])
    backends = args.backend or (["triton"] if device == "cuda" else ["auto", "triton"])
    cases = [(b, c) for b in backends for c in V.grid(cells, dtypes, quick=quick, shape=args.shape)]
    where = "CUDA" if device == "cuda" else "CPU (Triton kernels through the interpreter)"
    print(f"fusedrnn verify on {where}: backends {', '.join(backends)}; {len(cases)} cases "
          f"({'quick grid' if quick else 'full grid'}); "
          f"relative error norms ||ours - ref|| / ||ref|| vs the float64 reference; torch err = "
          f"torch.nn in the same dtype; tol: fp64 1e-10, fp32 1e-5 (or 2x torch), bf16/fp16 2x "
          f"torch + 1 ulp", flush=True)
    t0 = time.perf_counter()
    progress = V.Progress(sum(V.case_units(c) for _, c in cases), enabled=False)
    rows, reports, failed, not_run = [], [], [], []
    for i, (backend, case) in enumerate(cases):
        if args.budget is not None and time.perf_counter() - t0 > args.budget:
            not_run = cases[i:]
            break
        label = f"{backend}: {case.label}" if len(backends) > 1 else case.label
        try:
            rep = V.verify_case(case, device=device, backend=backend, kernel=args.kernel)
        except Exception as exc:  # noqa: BLE001 - e.g. the oracle itself failed: a failed case
            rep = V.VerifyReport(backend=backend, dtype=case.dtype, label=case.label,
                                 error=f"{type(exc).__name__}: {exc}")
        rep.label = label
        progress.advance(V.case_units(case))
        left = progress.left()
        status = "ok" if rep.passed else "FAIL"
        print(f"  [{i + 1}/{len(cases)}] {label}: {status} ({rep.seconds:.1f} s; "
              f"{time.perf_counter() - t0:.0f} s so far, about {left:.0f} s left)"
              + (f" {rep.error.splitlines()[0][:200]}" if rep.error else ""), flush=True)
        reports.append(rep)
        rows += [(label,) + r[1:] for r in V.summary_rows(case, rep)]
        if not rep.passed:
            failed.append(rep)
        if args.verbose:
            print(rep)
    print()
    print(text_table(("case", "quantity", "rel err", "torch err", "tol", ""), rows, left=(0, 1)))
    for rep in failed:
        print()
        print(rep)
    n_ok = len(reports) - len(failed)
    print(f"\n{'PASSED' if not failed else 'FAILED'}: {n_ok}/{len(reports)} cases within tolerance "
          f"in {time.perf_counter() - t0:.1f} s")
    if quick and device == "cpu" and not args.quick:
        print("(the quick grid, the default on CPU; --full runs the full grid)")
    if not_run:
        print(f"INCOMPLETE: {len(not_run)} cases not run (--budget {args.budget:g} s): "
              + ", ".join(c.label for _, c in not_run[:8]) + (" ..." if len(not_run) > 8 else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "backends": backends, "passed": not failed,
                       "not_run": [c.label for _, c in not_run],
                       "cases": [r.to_dict() for r in reports]}, f, indent=1)
        print(f"wrote {args.json}")
    return 0 if not failed else 1


# ----------------------------------------------------------------------------------------------
# fusedrnn bench


def _barrier_arg(args):
    """(barrier_us or None, error message or None) from --barrier-us."""
    from .roofline import load_barrier_us

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


def _mkdir(path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)


def cmd_bench(args, device, parser=None):
    from . import report, sweep
    from .roofline import GPUS, gpu_spec, with_barrier

    if getattr(args, "barrier", False):
        return cmd_barrier(args, device)
    barrier_us, err = _barrier_arg(args)
    if err:
        print(f"fusedrnn bench: {err}", file=sys.stderr)
        return 2
    cuda = device == "cuda" or (device is None and args.roofline)
    try:
        problems, dropped = sweep.sweep_problems(
            cells=args.cell, dtypes=args.dtype, passes=args.passes, batch=args.batch,
            hidden=args.hidden, input=args.input, seq=args.seq, layers=args.layers,
            bidirectional=args.bidirectional, proj=args.proj, quick=args.quick, cuda=cuda)
    except sweep.NoPointsError as exc:
        if parser is not None:
            parser.error(str(exc))  # exit status 2
        print(f"fusedrnn bench: {exc}", file=sys.stderr)
        return 2
    for why in dropped:
        print(f"fusedrnn bench: note: some combinations dropped: {why}", file=sys.stderr)
    if args.roofline:
        if gpu_spec(args.roofline) is None:
            print(f"fusedrnn bench: unknown GPU {args.roofline!r} for --roofline; known: "
                  f"{', '.join(GPUS)}", file=sys.stderr)
            return 2
        print(report.format_roofline(problems, args.roofline, barrier_us))
        return 0
    import torch

    providers = args.providers or sweep.default_providers(device, args.quick)
    threads = args.threads or (1 if device == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    clock = args.clock or ("cpu" if torch.get_num_threads() == 1 else "wall")
    timing = sweep.CpuTiming(clock=clock, budget_s=(args.rep / 1e3 if args.rep else
                                                    sweep.CPU_BUDGET_S),
                             retries=args.retries)
    spec = None
    env = sweep.environment(device)
    if args.gpu_spec:
        spec = gpu_spec(args.gpu_spec)
        if spec is None:
            print(f"fusedrnn bench: unknown --gpu-spec {args.gpu_spec!r}; known: {', '.join(GPUS)}",
                  file=sys.stderr)
            return 2
    elif device == "cuda":
        spec = gpu_spec(env.get("device_name"))
    spec = with_barrier(spec, barrier_us)
    env["floors_gpu"] = spec["name"] if spec else None
    env["barrier_us"] = spec["barrier_us"] if spec else None
    env["barrier_source"] = spec.get("barrier_source", "estimate") if spec else None
    if device == "cuda":
        env["method"] = {"clock": "cuda-events", "rep_ms": args.rep or (40 if args.quick else 100)}
    else:
        env["method"] = timing.describe(torch.get_num_threads())
    print(f"fusedrnn bench on {env['device_name']}: {len(problems)} points x "
          f"{len(providers)} providers ({', '.join(providers)})", flush=True)
    for line in report.method_lines(env):
        print(line[2:], flush=True)
    t0 = time.perf_counter()
    records = sweep.run_sweep(problems, providers, device, spec, rep_ms=args.rep,
                              budget_s=args.budget, progress=not args.no_progress,
                              quick=args.quick, cpu_timing=timing)
    env["seconds"] = time.perf_counter() - t0
    print(report.text_table(report.HEADER, report.table_rows(records)))
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
            f.write(report.markdown(records, env))
        print(f"wrote {args.md}")
    if args.plot:
        _mkdir(args.plot)
        why = report.plot(records, args.plot)
        print(why if why else f"wrote {args.plot}")
    n_err = sum(r["status"] == "error" for r in records)
    n_noisy = sum(bool(r["watch"] and r["watch"]["noisy"]) for r in records)
    print(f"{len(records)} records, {n_err} errors, {n_noisy} marked noisy, {env['seconds']:.1f} s")
    return 0


# ----------------------------------------------------------------------------------------------
# fusedrnn bench --barrier


def cmd_barrier(args, device):
    """`fusedrnn bench --barrier`: measure_barrier on CUDA; without CUDA a clear message, one
    interpreter run of the kernel (1 program) as a check, and outputs saying nothing was measured."""
    from . import barrier_bench, report, sweep

    env = sweep.environment(device)
    result = {"environment": env, "steps": None, "barrier_us": None, "barrier_source": None,
              "records": [], "note": None}
    if device != "cuda":
        print(f"fusedrnn bench --barrier: {barrier_bench.NOT_ON_CPU}")
        check = barrier_bench.interpreter_check()
        rc = 0 if check == "ok" else 1
        result["note"] = (f"{barrier_bench.NOT_ON_CPU}; interpreter check of the kernel (1 program, "
                          f"5 barriers): {check}")
        print(f"interpreter check of grid_barrier_kernel (1 program, 5 barriers): {check}")
    else:
        import torch
        num_sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
        print(f"fusedrnn bench --barrier on {env['device_name']} ({num_sms} SMs)", flush=True)
        t0 = time.perf_counter()
        records, us = barrier_bench.measure_barrier(num_sms, barrier_bench.BARRIER_STEPS,
                                                    args.rep or 50)
        env["seconds"] = time.perf_counter() - t0
        result.update(steps=barrier_bench.BARRIER_STEPS, records=records, barrier_us=us,
                      barrier_source="measured" if us is not None else None)
        print(report.text_table(report.BARRIER_HEADER, report.barrier_rows(records), left=(7, 8)))
        print(f"barrier_us = {report.fmt(us, '.3f')} (grid barrier across {num_sms} programs)")
        rc = 0 if all(r["status"] == "ok" for r in records) else 1
    if args.out:
        _mkdir(args.out)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")
    if args.md:
        _mkdir(args.md)
        with open(args.md, "w") as f:
            f.write(report.barrier_markdown(result))
        print(f"wrote {args.md}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
