"""The `fusedrnn` command: `fusedrnn verify` and `fusedrnn bench` (also `python -m fusedrnn ...`).

    fusedrnn verify [--quick] [--cell lstm,gru] [--dtype fp32,bf16] [--device cpu|cuda]
    fusedrnn bench  [--quick] [--cell lstm] [--batch 1,8,64] [--hidden 256] [--seq 1024]
                    [--mode fwdbwd,inference] [--dtype bf16] [--providers fusedrnn,cudnn]
                    [--out results.json] [--plot results.png] [--md results.md]
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
import os
import sys


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


CELL_NAMES = ("lstm", "gru", "rnn_tanh", "rnn_relu", "lstmcell", "grucell", "rnncell")
DTYPE_CHOICES = ("fp64", "fp32", "bf16", "fp16", "float64", "float32", "bfloat16", "float16",
                 "double", "float", "half")
MODE_NAMES = ("forward", "backward", "fwdbwd", "inference")
PROVIDERS = ("fusedrnn", "fusedrnn-auto", "fusedrnn-stepwise", "fusedrnn-persistent", "cudnn", "reference",
             "torch-cpu", "compile")


def build_parser():
    p = argparse.ArgumentParser(prog="fusedrnn",
                                description="fusedrnn: check and time the fused RNN kernels.")
    sub = p.add_subparsers(dest="command", metavar="{verify,bench}")
    sub.required = True

    v = sub.add_parser("verify", help="fused kernels vs the float64 reference: errors per quantity",
                       description="Run backend='triton' against the float64 reference over a "
                                   "grid of cells, shapes and options; exit 1 on any failure.")
    v.add_argument("--cell", type=_csv(str, CELL_NAMES), default=None,
                   help="comma list of " + ", ".join(CELL_NAMES) + " (default: all)")
    v.add_argument("--dtype", type=_csv(str, DTYPE_CHOICES), default=None,
                   help="comma list of fp32, bf16, fp64, fp16 (default: all; --quick: fp32,fp64)")
    v.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda if available, else cpu (Triton interpreter)")
    v.add_argument("--quick", action="store_true", help="tiny shapes, few configs (seconds)")
    v.add_argument("--shape", type=_csv(int), default=None, metavar="T,B,I,H",
                   help="override the grid's sizes (default 37,13,29,47; --quick 3,3,5,7)")
    v.add_argument("--backend", default="triton", choices=("triton", "torch", "auto", "reference"),
                   help="backend under test (default triton)")
    v.add_argument("--kernel", default=None, choices=("auto", "stepwise", "persistent"),
                   help="force a Triton kernel (default: the module's choice)")
    v.add_argument("--verbose", "-v", action="store_true", help="print every entry of every case")
    v.add_argument("--json", metavar="FILE", help="write every report as JSON")
    v.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                   help="start no new case after this many seconds (the rest: not run; exit "
                        "status 0 only if every case that ran passed)")

    b = sub.add_parser("bench", help="time providers side by side",
                       description="Time fusedrnn against cuDNN / torch.nn / the reference. "
                                   "List-valued flags take comma lists and form a sweep "
                                   "(cartesian product).")
    b.add_argument("--cell", type=_csv(str, CELL_NAMES), default=None, help="default lstm")
    b.add_argument("--batch", type=_csv(int), default=None)
    b.add_argument("--hidden", type=_csv(int), default=None)
    b.add_argument("--input", type=_csv(int), default=None, help="default: = hidden")
    b.add_argument("--seq", type=_csv(int), default=None)
    b.add_argument("--layers", type=_csv(int), default=None, help="default 1")
    b.add_argument("--bidirectional", type=_csv("bool"), default=None, help="0/1 (comma list to sweep); default 0")
    b.add_argument("--proj", type=_csv(int), default=None, help="LSTM proj_size (default none)")
    b.add_argument("--dtype", type=_csv(str, DTYPE_CHOICES), default=None,
                   help="default bf16 on cuda, fp32 on cpu")
    b.add_argument("--mode", type=_csv(str, MODE_NAMES), default=None,
                   help="comma list of " + ", ".join(MODE_NAMES) + " (default fwdbwd,inference)")
    b.add_argument("--providers", type=_csv(str, PROVIDERS), default=None,
                   help="comma list of " + ", ".join(PROVIDERS) +
                        " (default cuda: fusedrnn,cudnn; cpu: fusedrnn-auto,torch-cpu)")
    b.add_argument("--device", choices=("cpu", "cuda"), default=None)
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
                   help="stop timing new points after this many seconds (remaining: skipped)")
    b.add_argument("--rep", type=float, default=None, metavar="MS",
                   help="timing budget per measurement in ms (do_bench rep; CPU: total)")
    b.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for CPU timing (default: torch's default)")
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
    if args.command == "bench" and args.barrier and args.roofline:
        parser.error("--barrier measures on the device; --roofline runs nothing: pick one")
    roofline_only = args.command == "bench" and args.roofline
    device = None if roofline_only else _pick_device(args.device)
    if device == "cpu" and "fusedrnn.kernels" in sys.modules:
        print("fusedrnn: warning: fusedrnn.kernels was imported before TRITON_INTERPRET=1 was set",
              file=sys.stderr)
    if args.command == "verify":
        return cmd_verify(args, device)
    from . import bench

    return bench.cmd_bench(args, device)


def cmd_verify(args, device):
    import importlib
    import json
    import time

    from .roofline import text_table

    # fusedrnn.verify the attribute is the function; the module lives in sys.modules.
    V = importlib.import_module("fusedrnn.verify")

    cells = args.cell or list(V.CELLS)
    dtypes = args.dtype or (["fp32", "fp64"] if args.quick else ["fp32", "bf16", "fp64", "fp16"])
    if args.shape is not None and len(args.shape) != 4:
        print("fusedrnn verify: --shape takes four integers T,B,I,H", file=sys.stderr)
        return 2
    cases = V.grid(cells, dtypes, quick=args.quick, shape=args.shape)
    where = "CUDA" if device == "cuda" else "CPU, Triton interpreter" if args.backend == "triton" \
        else "CPU"
    print(f"fusedrnn verify: backend={args.backend} on {where}: {len(cases)} cases; relative error "
          f"norms ||ours - ref|| / ||ref|| vs the float64 reference; torch err = torch.nn in the "
          f"same dtype; tol: fp64 1e-10, fp32 1e-5 (or 2x torch), bf16/fp16 2x torch + 1 ulp",
          flush=True)
    t0 = time.perf_counter()
    rows, reports, failed = [], [], []
    not_run = []
    for i, case in enumerate(cases):
        if args.budget is not None and time.perf_counter() - t0 > args.budget:
            not_run = cases[i:]
            break
        try:
            _, rep = next(V.verify_grid([case], device=device, backend=args.backend,
                                        kernel=args.kernel))
        except Exception as exc:  # noqa: BLE001 - e.g. the oracle itself failed: a failed case
            rep = V.VerifyReport(backend=args.backend, dtype=case.dtype, label=case.label,
                                 error=f"{type(exc).__name__}: {exc}")
        status = "ok" if rep.passed else "FAIL"
        print(f"  [{i + 1}/{len(cases)}] {case.label}: {status} ({rep.seconds:.1f} s)"
              + (f" {rep.error.splitlines()[0][:200]}" if rep.error else ""), flush=True)
        reports.append(rep)
        rows += V.summary_rows(case, rep)
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
    if not_run:
        print(f"INCOMPLETE: {len(not_run)} cases not run (--budget {args.budget:g} s): "
              + ", ".join(c.label for c in not_run[:8]) + (" ..." if len(not_run) > 8 else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "backend": args.backend, "passed": not failed,
                       "not_run": [c.label for c in not_run],
                       "cases": [r.to_dict() for r in reports]}, f, indent=1)
        print(f"wrote {args.json}")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
