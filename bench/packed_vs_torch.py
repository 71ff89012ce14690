"""PackedSequence on CPU: fusedrnn.packed.run_packed vs torch.nn packed vs torch.nn padded (issue 13).

    python bench/packed_vs_torch.py                   # full sweep, writes results/packed-cpu-<date>.{json,md}
    python bench/packed_vs_torch.py --quick           # a few points, about a minute
    python bench/packed_vs_torch.py --threads 1 --out bench/results

Points: one layer and two-layer bidirectional, T in {100, 1000}, B in {16, 64}, H in {128, 256}
(input size = H), fp32, lengths uniform in [T/2, T] (the longest is T), rows in random order
(pack_padded_sequence(..., enforce_sorted=False)); training (forward + backward of
output.sum() + h_n.sum()) and inference (no_grad). Providers:
    fused   run_packed on the module's own weights, plus what a module does around it (zero states,
            final states back to the caller's row order)
    packed  torch.nn module on the PackedSequence
    padded  torch.nn module on the same batch padded to T (time-major)
Targets: fused <= 1.3x padded in training, <= 1.2x padded in inference.

Timing: one warm-up call each (none at T >= --slow-T, where one-time costs are small), then rounds
in which every provider runs once (rotating who goes first) until the per-point budget is spent and
each has --min-reps; medians with p20/p80.
torch.nn's packed training is super-linear in T (tens of seconds per call at T=1000): where T >= --slow-T
it runs alone in a subprocess, --slow-reps calls under a --slow-cap seconds timeout; a point that
times out is reported as a lower bound ("> cap"), and larger points of the same layout and pass are
then skipped with the same lower bound (more work cannot take less time).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence  # noqa: E402

from fusedrnn.packed import run_packed  # noqa: E402

LAYOUTS = {"1L": (1, False), "2L-bi": (2, True)}
TARGETS = {"training": 1.3, "inference": 1.2}
PROVIDERS = ("fused", "packed", "padded")
MODULES = {"LSTM": torch.nn.LSTM, "GRU": torch.nn.GRU, "RNN_TANH": torch.nn.RNN}


def make_case(mode, layout, T, B, H, seed=0):
    layers, bi = LAYOUTS[layout]
    torch.manual_seed(seed)
    module = MODULES[mode](H, H, num_layers=layers, bidirectional=bi)
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    lengths[torch.randint(0, B, (1,), generator=g)] = T
    x = torch.randn(T, B, H, generator=g)
    return module, x, pack_padded_sequence(x, lengths, enforce_sorted=False)


def fused_call(module, pk):
    """What fusedrnn's module would do for a PackedSequence with hx=None, around run_packed."""
    D = 2 if module.bidirectional else 1
    B = pk.sorted_indices.numel()
    P = module.proj_size if getattr(module, "proj_size", 0) else module.hidden_size
    lstm = module.mode == "LSTM"
    h0 = pk.data.new_zeros(module.num_layers * D, B, P)
    hx = (h0, pk.data.new_zeros(module.num_layers * D, B, module.hidden_size)) if lstm else h0
    out, *finals = run_packed(module.mode, pk.data, pk.batch_sizes, hx, module._flat_weights,
                              module.bias, module.num_layers, float(module.dropout), module.training,
                              module.bidirectional)
    finals = [f.index_select(1, pk.unsorted_indices) for f in finals]
    return PackedSequence(out, pk.batch_sizes, pk.sorted_indices, pk.unsorted_indices), finals


def provider_fn(name, module, x, pk, passname):
    def forward():
        if name == "fused":
            out, finals = fused_call(module, pk)
        else:
            out, st = module(pk if name == "packed" else x)
            finals = list(st) if isinstance(st, tuple) else [st]
        y = out.data if isinstance(out, PackedSequence) else out
        return y.sum() + finals[0].sum()

    def train():
        module.zero_grad(set_to_none=True)
        forward().backward()

    def infer():
        with torch.no_grad():
            forward()

    return train if passname == "training" else infer


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def summary(times):
    if not times:
        return None
    s = sorted(times)
    q = statistics.quantiles(s, n=5) if len(s) >= 2 else [s[0]] * 4
    return {"median_ms": statistics.median(s) * 1e3, "p20_ms": q[0] * 1e3, "p80_ms": q[3] * 1e3,
            "reps": len(s)}


def run_slow(args, point):
    """torch.nn packed alone in a subprocess under a timeout: its times, or None if it timed out."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(point),
           "--reps", str(args.slow_reps)] + (["--threads", str(args.threads)] if args.threads else [])
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.slow_cap, check=True)
    except subprocess.TimeoutExpired:
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])


def bench_point(args, point, run_packed_provider):
    module, x, pk = make_case(args.mode, point["layout"], point["T"], point["B"], point["H"])
    names = [p for p in PROVIDERS if p != "packed" or run_packed_provider]
    fns = {p: provider_fn(p, module, x, pk, point["pass"]) for p in names}
    if point["T"] < args.slow_T:                     # warm-up (allocator, oneDNN primitives); at
        for p in names:                              # long T one-time costs are noise in a median
            fns[p]()
    times = {p: [] for p in names}
    start, k = time.perf_counter(), 0
    while True:
        order = names[k % len(names):] + names[:k % len(names)]
        for p in order:
            if len(times[p]) < args.max_reps:
                times[p].append(timed(fns[p]))
        k += 1
        spent = time.perf_counter() - start
        if all(len(t) >= args.min_reps for t in times.values()) and spent > args.seconds:
            break
        if all(len(t) >= args.max_reps for t in times.values()):
            break
    return {p: summary(t) for p, t in times.items()}


def points(args):
    if args.quick:
        grid = [(lay, T, 16, 128) for lay in LAYOUTS for T in (100, 1000)] + [("1L", 100, 64, 256)]
    else:
        grid = [(lay, T, B, H) for lay in args.layouts.split(",") for T in _ints(args.T)
                for B in _ints(args.B) for H in _ints(args.H)]
    return [{"layout": lay, "T": T, "B": B, "H": H, "pass": ps} for (lay, T, B, H) in grid
            for ps in args.passes.split(",")]


def _ints(text):
    return [int(v) for v in text.split(",")]


def fmt(s):
    if s is None:
        return "-"
    if "lower_bound_ms" in s:
        return f"> {s['lower_bound_ms'] / 1e3:.0f} s"
    return f"{s['median_ms']:.1f} ({s['p20_ms']:.1f}-{s['p80_ms']:.1f})"


def markdown(meta, rows):
    lines = [f"# PackedSequence on CPU: fusedrnn.packed vs torch.nn ({meta['date']})", "",
             f"- machine: {meta['machine']}, torch {meta['torch']}, {meta['threads']} torch threads",
             f"- git {meta['git']}; command: `{meta['command']}`",
             f"- load average before/after: {meta['load_before']:.2f} / {meta['load_after']:.2f} "
             "(a 2-core machine shared with other jobs: absolute times are noisy; fused and padded are "
             "interleaved call by call, so their ratio is fairer than the times)",
             f"- {meta['mode']}, fp32, input size = H, lengths uniform in [T/2, T]; ms per call: median "
             "(p20-p80); training = forward + backward",
             "- fused/padded: target <= 1.3 (training), <= 1.2 (inference); packed/fused: speed-up over "
             "torch.nn's packed path",
             f"- torch.nn packed at T >= {meta['slow_T']} in training: {meta['slow_reps']} call(s) in a "
             f"subprocess, cap {meta['slow_cap']:.0f} s (\"> cap\": timed out or skipped as larger than a "
             "point that timed out)", "",
             "| layers | T | B | H | pass | fused ms | torch packed ms | torch padded ms | fused/padded "
             "| packed/fused | target |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f, pk, pd = r["fused"], r["packed"], r["padded"]
        ratio = f["median_ms"] / pd["median_ms"]
        if pk is None:
            speed = "-"
        elif "lower_bound_ms" in pk:
            speed = f"> {pk['lower_bound_ms'] / f['median_ms']:.1f}"
        else:
            speed = f"{pk['median_ms'] / f['median_ms']:.1f}"
        ok = "ok" if ratio <= TARGETS[r["pass"]] else f"MISS (> {TARGETS[r['pass']]})"
        lines.append(f"| {r['layout']} | {r['T']} | {r['B']} | {r['H']} | {r['pass']} | {fmt(f)} | "
                     f"{fmt(pk)} | {fmt(pd)} | {ratio:.2f} | {speed} | {ok} |")
    worst = {ps: max((r["fused"]["median_ms"] / r["padded"]["median_ms"] for r in rows if r["pass"] == ps),
                     default=float("nan")) for ps in TARGETS}
    lines += ["", "worst fused/padded: " + ", ".join(f"{k} {v:.2f}" for k, v in worst.items()), ""]
    return "\n".join(lines)


def git_rev():
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return rev + (" (dirty tree)" if dirty else "")
    except OSError:
        return "unknown"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "results"), help="output folder (default results/)")
    ap.add_argument("--quick", action="store_true", help="a few small points, short budgets")
    ap.add_argument("--mode", default="LSTM", choices=sorted(MODULES))
    ap.add_argument("--layouts", default=",".join(LAYOUTS), help="subset of 1L,2L-bi (not with --quick)")
    ap.add_argument("--T", default="100,1000", help="comma-separated (not with --quick)")
    ap.add_argument("--B", default="16,64")
    ap.add_argument("--H", default="128,256")
    ap.add_argument("--passes", default="training,inference")
    ap.add_argument("--tag", default="", help="suffix of the output files: packed-cpu-<date><tag>.*")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--seconds", type=float, default=None, help="budget per point (default 3; quick 1)")
    ap.add_argument("--min-reps", type=int, default=None, help="default 3 (quick 2)")
    ap.add_argument("--max-reps", type=int, default=15)
    ap.add_argument("--slow-T", type=int, default=500)
    ap.add_argument("--slow-reps", type=int, default=1)
    ap.add_argument("--slow-cap", type=float, default=None, help="seconds (default 60; quick 30)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--reps", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.worker:                                   # subprocess: torch.nn packed alone
        point = json.loads(args.worker)
        module, x, pk = make_case(args.mode, point["layout"], point["T"], point["B"], point["H"])
        fn = provider_fn("packed", module, x, pk, point["pass"])
        print(json.dumps([timed(fn) for _ in range(args.reps)]))
        return 0

    args.seconds = args.seconds if args.seconds is not None else (1.0 if args.quick else 3.0)
    args.min_reps = args.min_reps if args.min_reps is not None else (2 if args.quick else 3)
    args.slow_cap = args.slow_cap if args.slow_cap is not None else (30.0 if args.quick else 60.0)
    date = datetime.date.today().isoformat()
    meta = {"date": date, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": f"{platform.processor() or platform.machine()} ({os.cpu_count()} cpus)",
            "git": git_rev(), "command": "python bench/packed_vs_torch.py " + " ".join(argv or sys.argv[1:]),
            "mode": args.mode, "slow_T": args.slow_T, "slow_reps": args.slow_reps,
            "slow_cap": args.slow_cap, "seconds": args.seconds, "min_reps": args.min_reps,
            "load_before": os.getloadavg()[0]}
    rows, timed_out = [], []
    t_all = time.perf_counter()
    for pt in points(args):
        slow = pt["pass"] == "training" and pt["T"] >= args.slow_T
        res = bench_point(args, pt, run_packed_provider=not slow)
        if slow:
            bigger_than = [q for q in timed_out if q["layout"] == pt["layout"] and q["T"] == pt["T"]
                           and q["B"] <= pt["B"] and q["H"] <= pt["H"]]
            t = None if bigger_than else run_slow(args, pt)
            if t is None:
                res["packed"] = {"lower_bound_ms": args.slow_cap * 1e3, "reps": 0,
                                 "skipped": bool(bigger_than)}
                timed_out.append(pt)
            else:
                res["packed"] = summary(t)
        row = dict(pt, **res)
        rows.append(row)
        ratio = res["fused"]["median_ms"] / res["padded"]["median_ms"]
        print(f"{pt['layout']:6s} T={pt['T']:5d} B={pt['B']:3d} H={pt['H']:3d} {pt['pass']:9s} "
              f"fused {fmt(res['fused']):>28s}  packed {fmt(res['packed']):>28s}  "
              f"padded {fmt(res['padded']):>28s}  fused/padded {ratio:.2f}", flush=True)
    meta["load_after"] = os.getloadavg()[0]
    meta["wall_s"] = time.perf_counter() - t_all
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"packed-cpu-{date}{args.tag}")
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    md = markdown(meta, rows)
    with open(stem + ".md", "w") as f:
        f.write(md)
    print(md)
    print(f"wrote {stem}.json and {stem}.md ({meta['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
