"""Registers, shared memory, local memory (spills) and dot instructions of every kernel configuration,
compiled ahead of time for sm_90 (no GPU needed).

    python bench/kernel_resources.py [--select groups|all] [--dtype fp32 ...] [--arch 90] [--jobs N]

Configurations come from fusedrnn.kernels.aot (the launchers' own dispatch on meta tensors);
resource usage from the cuobjdump inside the Triton wheel (triton/backends/nvidia/bin). Spills show
as STACK (the per-thread stack frame in local memory; these kernels have no stack arrays, so any
STACK is spilled registers) or LOCAL. "shared" is Triton's dynamic shared memory (cuobjdump only
sees the 1 KiB static part). "dot" says which instruction the tl.dot
calls became: wgmma (Hopper warpgroup MMA), mma (mma.sync tensor cores) or fma (CUDA cores); "-"
for the barrier-only kernel (kernels/barrier.py, dtype "i32"), which has none.
"""
import argparse
import os
import sys

if os.environ.get("TRITON_INTERPRET") == "1":
    del os.environ["TRITON_INTERPRET"]  # the interpreter replaces @triton.jit functions

from fusedrnn.kernels import aot  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--select", default="groups", choices=["groups", "all"])
    ap.add_argument("--dtype", action="append", help="only these dtypes (fp32, fp16, bf16, fp64)")
    ap.add_argument("--mode", action="append", help="only these modes")
    ap.add_argument("--jobs", type=int, default=None)
    args = ap.parse_args(argv)
    if aot.cuobjdump_path() is None:
        sys.exit("cuobjdump not found (looked in the Triton wheel and on PATH)")
    configs = aot.select(aot.kernel_configs(), args.select)
    if args.dtype:
        configs = [c for c in configs if c.dtype in args.dtype]
    if args.mode:
        configs = [c for c in configs if dict(c.constexprs).get("MODE", "LSTM") in args.mode]
    results = aot.compile_many(configs, (args.arch,), args.jobs, resources=True)
    head = "| kernel | config (mode/dtype/flags/precision/blocks/warps) | regs | shared B | spill (stack+local) B | dot |"
    print(f"sm_{args.arch}, Triton {aot.triton.__version__}; flags: B bias, L lengths, J projection, S save, "
          "P persistent, X grid barrier\n")
    print(head)
    print("|---|---|---|---|---|---|")
    failed = 0
    for r in sorted(results, key=lambda r: (r["kernel"], r["label"])):
        if not r["ok"]:
            failed += 1
            print(f"| {r['kernel']} | {r['label']} | FAILED: {r['error'][:120]} | | | |")
            continue
        u = r.get("usage") or {}
        dot = " ".join(r["mma_ops"]) if r["mma_ops"] else "-" if r["label"].startswith("BARRIER") else "fma"
        spill = (u.get("stack") or 0) + (u.get("local") or 0)
        print(f"| {r['kernel']} | {r['label']} | {u.get('reg')} | {r['shared_triton']} | {spill} | {dot} |")
    spills = [r for r in results if r["ok"] and ((r.get("usage") or {}).get("stack") or (r.get("usage") or {}).get("local"))]
    print(f"\n{len(results)} configurations, {failed} failed, {len(spills)} spill registers")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
