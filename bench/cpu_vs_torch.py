"""fusedrnn's default CPU path vs torch.nn on the CPU, as a markdown table.

    python bench/cpu_vs_torch.py                       # writes bench/results/cpu-<date>.md (+ .json)
    python bench/cpu_vs_torch.py --threads 1 --seconds 5 --out my.md

Providers: `fusedrnn-auto` (a fusedrnn module with its default backend="auto": on CPU that is
torch's own fused RNN ops behind fusedrnn's module code) and `torch-cpu` (torch.nn). Shapes: the
issue's T=100,B=64,H=256 and T=500,B=1,H=64 (input size = H), for lstm, gru and rnn_tanh, in
inference (no_grad) and training (forward+backward). Target: fusedrnn within 1.1x of torch.nn.

Timing is fusedrnn.tools.sweep's CPU method: warm-up, providers interleaved call by call (rotating who
goes first), median with p20/p80. The same numbers come from
    fusedrnn bench --device cpu --cell lstm,gru,rnn_tanh --pass inference,fwdbwd \\
        --providers fusedrnn-auto,torch-cpu    (its default CPU shapes are these two)
The load average is recorded: on a shared machine the absolute times move, the ratio less so.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

SHAPES = [(100, 64, 256), (500, 1, 64)]
CELLS = ("lstm", "gru", "rnn_tanh")
PASSES = ("inference", "fwdbwd")
TARGET = 1.1


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="markdown file (default bench/results/cpu-<date>.md)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--seconds", type=float, default=3.0,
                    help="timing budget per provider and point (default 3)")
    ap.add_argument("--cell", default=",".join(CELLS))
    args = ap.parse_args(argv)

    import torch

    from fusedrnn.tools.report import markdown_table
    from fusedrnn.tools.roofline import Problem
    from fusedrnn.tools.sweep import environment, run_sweep

    if args.threads:
        torch.set_num_threads(args.threads)
    date = datetime.date.today().isoformat()
    out = args.out or os.path.join(HERE, "results", f"cpu-{date}.md")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    problems = [Problem(cell=c, seq=T, batch=B, input=H, hidden=H, dtype="fp32", pass_=m)
                for c in args.cell.split(",") for (T, B, H) in SHAPES for m in PASSES]
    load0 = os.getloadavg()
    env = environment("cpu")
    records = run_sweep(problems, ["fusedrnn-auto", "torch-cpu"], "cpu", None,
                        rep_ms=args.seconds * 1e3, progress=True)
    load1 = os.getloadavg()

    rows, worst = [], 0.0
    by = {}
    for r in records:
        by.setdefault((r["cell"], r["seq"], r["batch"], r["hidden"], r["pass"]), {})[
            r["provider"]] = r
    for (cell, T, B, H, pass_), d in by.items():
        f, t = d.get("fusedrnn-auto"), d.get("torch-cpu")
        if not (f and t and f["median_ms"] and t["median_ms"]):
            rows.append((cell, T, B, H, pass_, "-", "-", "-", "error"))
            continue
        ratio = f["median_ms"] / t["median_ms"]
        worst = max(worst, ratio)
        rows.append((cell, T, B, H, "training" if pass_ == "fwdbwd" else pass_,
                     f"{f['median_ms']:.3f} ({f['p20_ms']:.3f}-{f['p80_ms']:.3f})",
                     f"{t['median_ms']:.3f} ({t['p20_ms']:.3f}-{t['p80_ms']:.3f})",
                     f"{ratio:.3f}", "ok" if ratio <= TARGET else f"> {TARGET}x"))
    text = "\n".join([
        f"# fusedrnn CPU path vs torch.nn ({date})", "",
        f"- machine: {env['cpu']}, torch {env['torch']}, {torch.get_num_threads()} torch threads, "
        f"python {env['python']}",
        f"- git {env['git_commit']}{' (dirty tree)' if env['git_dirty'] else ''}, "
        f"{env['timestamp']}",
        f"- load average before/after: {load0[0]:.2f} / {load1[0]:.2f} (a shared machine: "
        "absolute times are noisy; providers are interleaved so the ratio is fairer)",
        "- fusedrnn-auto: fusedrnn module, backend='auto' (torch's fused ops on CPU); "
        "torch-cpu: torch.nn. fp32, input size = H, one layer, unidirectional.",
        "- ms: median (p20-p80) per call; training = forward + backward; ratio = fusedrnn / torch "
        f"(target <= {TARGET})",
        f"- command: python bench/cpu_vs_torch.py {' '.join(argv if argv is not None else sys.argv[1:])}",
        "",
        markdown_table(("cell", "T", "B", "H", "pass", "fusedrnn ms", "torch.nn ms", "ratio", ""),
                       rows),
        "",
        f"worst ratio: {worst:.3f}", ""])
    with open(out, "w") as fh:
        fh.write(text)
    with open(os.path.splitext(out)[0] + ".json", "w") as fh:
        json.dump({"environment": env, "load": [load0, load1], "records": records}, fh, indent=1)
    print(text)
    print(f"wrote {out} and {os.path.splitext(out)[0]}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
