"""Can the main job's CPU numbers be trusted? Two consecutive runs of its quick sweep must agree.

    python bench/reproducibility.py [--runs 2] [--tolerance 0.10] [--out bench/results/reproducibility-cpu-<date>.md]

Runs the bench command of bench/main.sh on a CPU machine (`fusedrnn bench --quick --device cpu
--threads 1`) `--runs` times, one after the other, and compares every provider's median at every
point: the spread (max / min - 1) must stay within the tolerance (10%). Writes a markdown table
(and the runs' JSON beside it) and exits 1 if any median moved more. Any extra arguments after
`--` go to `fusedrnn bench` (e.g. `-- --clock wall` to see how the wall clock fares).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BENCH = ["--quick", "--device", "cpu", "--threads", "1", "--no-progress"]


def key(r):
    return (r["cell"], r["dtype"], r["pass"], r["seq"], r["batch"], r["input"], r["hidden"],
            r["provider"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=2, help="consecutive runs (default 2)")
    ap.add_argument("--tolerance", type=float, default=0.10,
                    help="largest allowed spread of a median, max/min - 1 (default 0.10)")
    date = datetime.date.today().isoformat()
    ap.add_argument("--out", default=os.path.join(HERE, "results", f"reproducibility-cpu-{date}.md"))
    ap.add_argument("extra", nargs="*", help="more `fusedrnn bench` flags (after --)")
    args = ap.parse_args(argv)
    if args.runs < 2:
        ap.error(f"--runs must be >= 2 to compare, got {args.runs}")
    if not 0 < args.tolerance < 1:
        ap.error(f"--tolerance must be in (0, 1), got {args.tolerance}")

    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    runs, tmp = [], tempfile.mkdtemp(prefix="fusedrnn-repro-")
    for i in range(args.runs):
        path = os.path.join(tmp, f"run{i + 1}.json")
        cmd = [sys.executable, "-m", "fusedrnn", "bench", *BENCH, *args.extra, "--out", path]
        print(f"run {i + 1}/{args.runs}: {' '.join(cmd[1:])}", flush=True)
        proc = subprocess.run(cmd, cwd=ROOT, env=env)
        if proc.returncode != 0:
            print(f"run {i + 1} failed (exit status {proc.returncode})", file=sys.stderr)
            return 2
        with open(path) as f:
            runs.append(json.load(f))

    medians, ratios, alls = {}, {}, {}
    for run in runs:
        for r in run["records"]:
            medians.setdefault(key(r), []).append(r["median_ms"])
            alls.setdefault(key(r), []).append(r.get("all_median_ms"))
            ratios.setdefault(key(r), []).append(r["vs_baseline"])
    rows, worst, worst_ratio, bad = [], 0.0, 0.0, 0
    for k, ms in medians.items():
        if any(m is None for m in ms):
            rows.append((*k[:3], f"T{k[3]} B{k[4]} I{k[5]} H{k[6]}", k[7],
                         *["-"] * len(ms), "-", "-", "-", "not timed in every run"))
            continue
        spread = max(ms) / min(ms) - 1
        worst = max(worst, spread)
        xs = ratios[k]
        r_spread = None if any(x is None for x in xs) else max(xs) / min(xs) - 1
        if r_spread is not None and k[7] != runs[0]["records"][0].get("baseline"):
            worst_ratio = max(worst_ratio, r_spread)
        al = alls[k]
        a_spread = None if any(a is None for a in al) else max(al) / min(al) - 1
        ok = spread <= args.tolerance
        bad += not ok
        rows.append((*k[:3], f"T{k[3]} B{k[4]} I{k[5]} H{k[6]}", k[7],
                     *[f"{m:.4g}" for m in ms], f"{100 * spread:.1f}%",
                     "-" if r_spread is None else f"{100 * r_spread:.1f}%",
                     "-" if a_spread is None else f"{100 * a_spread:.1f}%",
                     "ok" if ok else "TOO NOISY"))
    env0 = runs[0]["environment"]
    method = env0.get("method", {})
    from fusedrnn.tools.report import markdown_table, method_lines

    header = ("cell", "dtype", "pass", "shape", "provider",
              *[f"run {i + 1} ms" for i in range(len(runs))], "spread", "x base spread",
              "all-calls spread", "")
    loads = [r["environment"].get("loadavg") for r in runs]
    text = "\n".join([
        f"# Reproducibility of the main job's CPU numbers ({date})", "",
        f"- machine: {env0.get('cpu')}, torch {env0.get('torch')}, triton {env0.get('triton')}, "
        f"python {env0.get('python')}",
        f"- git {env0.get('git_commit')}{' (dirty tree)' if env0.get('git_dirty') else ''}",
        f"- command, run {len(runs)} times in a row: `fusedrnn bench {' '.join(BENCH + args.extra)}` "
        "(the bench step of bench/main.sh on a CPU)",
        *method_lines(env0),
        "- 1-minute load average at the start of each run: "
        + ", ".join("-" if v is None else f"{v:.2f}" for v in loads)
        + f" ({os.cpu_count()} cpus)",
        f"- spread = max / min - 1 of a provider's median over the runs (tolerance "
        f"{100 * args.tolerance:.0f}%); x base spread: the same for its time / torch-cpu's time "
        "within each run; all-calls spread: the same for the median of every call (uncontended or "
        "not)", "",
        markdown_table(header, rows), "",
        f"worst spread {100 * worst:.1f}% (of the ratios to the baseline: {100 * worst_ratio:.1f}%); "
        f"{bad} of {len(rows)} medians outside the tolerance"
        + (f"; clock: {method.get('clock')}" if method else ""), ""])
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump({"tolerance": args.tolerance, "runs": runs}, f, indent=1)
    print(text)
    print(f"wrote {args.out}")
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
