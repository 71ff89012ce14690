"""Registers, shared memory, local memory (spills) and dot instructions of every kernel configuration,
compiled ahead of time for sm_90 / sm_80 (no GPU needed).

    python bench/kernel_resources.py [--select groups|all] [--arch 90 --arch 80] [--dtype fp32 ...]
                                     [--mode LSTM ...] [--set plain|variants|layernorm ...] [--jobs N]
                                     [--json out.json] [--compare before.json]

Configurations come from fusedrnn.kernels.aot (the launchers' own code on meta tensors: the plain
scan kernels, the scan kernels with zoneout / reset, the LayerNorm kernels); resource
usage from the cuobjdump inside the Triton wheel (triton/backends/nvidia/bin). Spills show as STACK
(the per-thread stack frame in local memory; these kernels have no stack arrays, so any STACK is
spilled registers) or LOCAL. "shared" is Triton's dynamic shared memory (cuobjdump only sees the
1 KiB static part). "dot" says which instruction the tl.dot calls became: wgmma (Hopper
warpgroup MMA), mma (mma.sync tensor cores) or fma (CUDA cores); "-" for the barrier-only kernel
(kernels/barrier.py, dtype "i32"), which has none.

--json writes the raw results; --compare reads such a file and lists every configuration whose
registers, spills or dot instructions differ, and exits 1 if any spills more than it did there
(or no longer uses its tensor-core instruction).
"""
import argparse
import datetime
import json
import os
import sys

if os.environ.get("TRITON_INTERPRET") == "1":
    del os.environ["TRITON_INTERPRET"]  # the interpreter replaces @triton.jit functions

from fusedrnn.kernels import aot  # noqa: E402


def _spill(r):
    u = r.get("usage") or {}
    return (u.get("stack") or 0) + (u.get("local") or 0)


def _dot(r):
    return " ".join(r["mma_ops"]) if r["mma_ops"] else "-" if r["label"].startswith("BARRIER") else "fma"


def _key(r):
    return (r["arch"], r["kernel"], r["label"])


def compare(results, baseline):
    """Lines describing each difference from `baseline` (the last one counts the baseline's
    configurations not compiled now), and whether any is a regression."""
    before = {_key(r): r for r in baseline if r.get("ok")}
    lines, worse = [], False
    for r in sorted(results, key=_key):
        b = before.get(_key(r))
        if not r.get("ok") or b is None:
            lines.append(f"sm_{r['arch']} {r['kernel']} {r['label']}: "
                         + ("FAILED" if not r.get("ok") else "not in the baseline"))
            worse = worse or not r.get("ok")
            continue
        reg, breg = (r.get("usage") or {}).get("reg"), (b.get("usage") or {}).get("reg")
        if (reg, _spill(r), _dot(r)) != (breg, _spill(b), _dot(b)):
            bad = _spill(r) > _spill(b) or (_dot(b) != "fma" and _dot(r) == "fma")
            worse = worse or bad
            lines.append(f"sm_{r['arch']} {r['kernel']} {r['label']}: regs {breg} -> {reg}, spill "
                         f"{_spill(b)} -> {_spill(r)} B, dot {_dot(b)} -> {_dot(r)}{'  WORSE' if bad else ''}")
    missing = set(before) - {_key(r) for r in results}
    if missing:
        lines.append(f"{len(missing)} configurations of the baseline not compiled now (filtered out, or gone)")
    return lines, worse


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, action="append", help="compute capability (repeatable; default 90)")
    ap.add_argument("--select", default="groups", choices=["groups", "all"])
    ap.add_argument("--dtype", action="append", help="only these dtypes (fp32, fp16, bf16, fp64)")
    ap.add_argument("--mode", action="append", help="only these modes")
    ap.add_argument("--set", action="append", choices=aot.SETS,
                    help="only these configuration sets (repeatable; default all: plain, variants, layernorm)")
    ap.add_argument("--jobs", type=int, default=None)
    ap.add_argument("--json", help="write the raw results here")
    ap.add_argument("--compare", help="a --json file of an earlier run: list differences, exit 1 on more spills")
    args = ap.parse_args(argv)
    if aot.cuobjdump_path() is None:
        sys.exit("cuobjdump not found (looked in the Triton wheel and on PATH)")
    archs = tuple(args.arch or [90])
    configs = aot.select(aot.kernel_configs(sets=tuple(args.set or aot.SETS)), args.select)
    if args.dtype:
        configs = [c for c in configs if c.dtype in args.dtype]
    if args.mode:
        configs = [c for c in configs if c.mode in args.mode]
    results = aot.compile_many(configs, archs, args.jobs, resources=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=0)
    print(f"{', '.join(f'sm_{a}' for a in archs)}, Triton {aot.triton.__version__}, "
          f"{datetime.date.today().isoformat()}; flags: B bias, L lengths, J projection, S save, "
          "P persistent, X grid barrier, z1 / z2 zoneout (eval probability / training mask), r reset\n")
    print("| arch | kernel | config (mode/dtype/flags/precision/blocks/warps) | regs | shared B | "
          "spill (stack+local) B | dot |")
    print("|---|---|---|---|---|---|---|")
    failed = 0
    for r in sorted(results, key=_key):
        if not r["ok"]:
            failed += 1
            print(f"| {r['arch']} | {r['kernel']} | {r['label']} | FAILED: {r['error'][:120]} | | | |")
            continue
        u = r.get("usage") or {}
        print(f"| {r['arch']} | {r['kernel']} | {r['label']} | {u.get('reg')} | {r['shared_triton']} | "
              f"{_spill(r)} | {_dot(r)} |")
    spills = [r for r in results if r["ok"] and _spill(r)]
    print(f"\n{len(results)} configurations, {failed} failed, {len(spills)} spill registers")
    status = 1 if failed else 0
    if args.compare:
        with open(args.compare) as f:
            lines, worse = compare(results, json.load(f))
        n = sum(1 for line in lines if line.startswith("sm_"))
        print(f"\ncompared with {args.compare}: {n} configurations differ" + (", WORSE" if worse else ""))
        for line in lines:
            print("  " + line)
        status = status or int(worse)
    return status


if __name__ == "__main__":
    sys.exit(main())
