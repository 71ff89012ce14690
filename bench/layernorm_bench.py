"""LayerNorm LSTM / GRU: fusedrnn's layers against the plain fused layer and the hand-written
PyTorch step loop a user would write (fusedrnn.layernorm.ln_cell_step per step, autograd backward).

    python bench/layernorm_bench.py [--mode LSTM --mode GRU] [--budget 3] [--md out.md]
    python bench/layernorm_bench.py --gpu        # bench/gpu_check.sh: T=512, B=64, H=512, bf16
    python bench/layernorm_bench.py --resources  # sm_90 registers / spills of the LN kernels

CPU (default): per (mode, T, B, H) and pass ("train" = forward + backward of sum(y), "infer" =
forward under no_grad), the time of
    fused-LN    fusedrnn.LayerNorm{LSTM,GRU}, default backend (CPU: the PyTorch scan with the
                hand-written backward, fusedrnn::ln_layer)
    user-loop   the step loop with autograd, each step's two LayerNorms by F.layer_norm
    plain       fusedrnn.{LSTM,GRU} (torch's own fused op on CPU): what LayerNorm adds
and the ratio user-loop / fused-LN (> 1: fusedrnn faster). Timed as `fusedrnn bench` times CPU
points (fusedrnn/tools/sweep.py: time_cpu_interleaved): one torch thread, CPU time of the calling
thread, the three interleaved call by call after two warm-up calls each, --budget seconds of calls
per candidate and point, and the median of the calls within FAST_BAND of that candidate's
fastest call (the uncontended ones: a core of the shared VM this runs on alternates between full
and about half speed in millisecond stretches). --threads N > 1 times wall clock instead.

GPU (--gpu): the same three at the issue's target shape, forward + backward, CUDA events; the
targets are fused-LN <= 1.3 x plain (Triton) and >= 10 x faster than user-loop.
"""
import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import torch

import fusedrnn
from fusedrnn import layernorm as L
from fusedrnn.tools.sweep import FAST_BAND, CpuTiming, time_cpu_interleaved

CPU_SHAPES = ((100, 64, 256), (100, 16, 128), (500, 1, 64))


def user_loop(mode, m):
    """The straightforward step loop over a fusedrnn LayerNorm module's parameters (one layer,
    one direction): what a user writes without fusedrnn."""
    w = (m.weight_ih_l0, m.weight_hh_l0, m.bias_ih_l0, m.bias_hh_l0, m.ln_ih_weight_l0, m.ln_hh_weight_l0,
         getattr(m, "ln_c_weight_l0", None), getattr(m, "ln_c_bias_l0", None))

    def run(x):
        B = x.shape[1]
        state = tuple(x.new_zeros(B, m.hidden_size) for _ in range(2 if mode == "LSTM" else 1))
        ys = []
        for t in range(x.shape[0]):
            state = L.ln_cell_step(mode, x[t], state, w)
            ys.append(state[0])
        return torch.stack(ys)
    return run


def _time(fn, x, train, repeat, sync=lambda: None):
    def once():
        xx = x.detach().requires_grad_(train)
        sync()
        t0 = time.perf_counter()
        if train:
            fn(xx).sum().backward()
        else:
            with torch.no_grad():
                fn(xx)
        sync()
        return time.perf_counter() - t0
    once()
    return statistics.median(once() for _ in range(repeat))


def _candidates(mode, I, H, device, dtype, backend="auto"):
    ln = (fusedrnn.LayerNormLSTM if mode == "LSTM" else fusedrnn.LayerNormGRU)(I, H, device=device, dtype=dtype,
                                                                              backend=backend)
    plain = (fusedrnn.LSTM if mode == "LSTM" else fusedrnn.GRU)(I, H, device=device, dtype=dtype, backend=backend)
    return {"fused-LN": lambda x: ln(x)[0], "user-loop": user_loop(mode, ln), "plain": lambda x: plain(x)[0],
            "_modules": (ln, plain)}


def _cpu_runs(cands, x, train):
    """{name: (fn, tensors whose .grad is cleared before each call)} for time_cpu_interleaved."""
    def call(f):
        def fn():
            xx = x.detach().requires_grad_(train)
            if train:
                f(xx).sum().backward()
            else:
                with torch.no_grad():
                    f(xx)
        return fn
    params = [p for m in cands["_modules"] for p in m.parameters()]
    return {k: (call(f), params) for k, f in cands.items() if not k.startswith("_")}


def cpu(args):
    torch.set_num_threads(args.threads)
    timing = CpuTiming(clock="cpu" if args.threads == 1 else "wall", budget_s=args.budget)
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rows = []
    for mode in args.mode:
        for T, B, H in CPU_SHAPES:
            torch.manual_seed(0)
            x = torch.randn(T, B, H)
            cands = _candidates(mode, H, H, "cpu", torch.float32)
            for train in (True, False):
                res, errors, stretch = time_cpu_interleaved(_cpu_runs(cands, x, train), timing)
                if errors:
                    raise RuntimeError(errors)
                t = {k: q["median"] for k, q in res.items()}
                kept = {k: q["kept"] for k, q in res.items()}
                rows.append((mode, T, B, H, "train" if train else "infer", t, kept, stretch))
                print(f"{mode:4} T={T:3} B={B:2} H={H:3} {'train' if train else 'infer'}: "
                      + "  ".join(f"{k} {v:8.2f} ms" for k, v in t.items())
                      + f"  user-loop/fused-LN {t['user-loop'] / t['fused-LN']:.2f}x"
                      + f"  fused-LN/plain {t['fused-LN'] / t['plain']:.2f}x"
                      + f"  kept {' / '.join(f'{v:.2f}' for v in kept.values())}  wall/CPU {stretch:.2f}",
                      flush=True)
    if args.md:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        clock = timing.describe(args.threads)["clock_text"]
        with open(args.md, "w") as f:
            f.write(f"# LayerNorm LSTM/GRU on CPU ({datetime.date.today()})\n\n"
                    f"`python bench/layernorm_bench.py --budget {args.budget:g}`; "
                    f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
                    f"{os.cpu_count()} cores, load average {load0:.1f} at the start, {load:.1f} at the end; "
                    f"float32, input_size = H, one layer, one direction. train = forward + backward of sum(y); "
                    f"infer = forward under no_grad.\n\n"
                    f"Timing (fusedrnn/tools/sweep.py's CPU timing, as `fusedrnn bench`): {args.threads} torch "
                    f"thread(s); {clock}; the three candidates interleaved call by call after two warm-up "
                    f"calls each, {timing.budget_s:g} s of calls per candidate and point (at least "
                    f"{timing.min_reps}); ms = the median of the calls within {FAST_BAND}x of that candidate's "
                    f"fastest call (the uncontended ones: this VM's cores alternate between full and about "
                    f"half speed). kept = the fraction of calls inside that band (fused-LN / user-loop / "
                    f"plain); wall / CPU = the timed calls' wall time over their CPU time.\n\n"
                    "fused-LN: fusedrnn.LayerNorm* on its CPU default (the PyTorch scan with the hand-written "
                    "backward, one fusedrnn::ln_layer op per layer); user-loop: the step loop with autograd "
                    "(F.layer_norm per step); plain: fusedrnn.LSTM / GRU (torch's fused op, no LayerNorm).\n\n"
                    "| mode | T | B | H | pass | fused-LN ms | user-loop ms | plain ms | user-loop / fused-LN | "
                    "fused-LN / plain | kept | wall / CPU |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")
            for mode, T, B, H, p, t, kept, stretch in rows:
                f.write(f"| {mode} | {T} | {B} | {H} | {p} | {t['fused-LN']:.2f} | {t['user-loop']:.2f} "
                        f"| {t['plain']:.2f} | {t['user-loop'] / t['fused-LN']:.2f}x | "
                        f"{t['fused-LN'] / t['plain']:.2f}x | {' / '.join(f'{v:.2f}' for v in kept.values())} "
                        f"| {stretch:.2f} |\n")
        print(f"wrote {args.md}")


def gpu(args):
    if not torch.cuda.is_available():
        raise SystemExit("--gpu needs CUDA")
    T, B, H = 512, 64, 512
    dev = torch.device("cuda")
    ok = True
    for mode in args.mode:
        torch.manual_seed(0)
        x = torch.randn(T, B, H, device=dev, dtype=torch.bfloat16)
        cands = _candidates(mode, H, H, dev, torch.bfloat16, backend="triton")
        t = {k: _time(f, x, True, args.repeat, torch.cuda.synchronize) for k, f in cands.items()
             if not k.startswith("_")}
        vs_plain, vs_loop = t["fused-LN"] / t["plain"], t["user-loop"] / t["fused-LN"]
        hit = vs_plain <= 1.3 and vs_loop >= 10
        ok = ok and (hit or mode != "LSTM")
        print(f"{mode} T={T} B={B} H={H} bf16 fwd+bwd: " + "  ".join(f"{k} {v * 1e3:.2f} ms" for k, v in t.items())
              + f"  fused-LN/plain {vs_plain:.2f}x (target <= 1.3)  user-loop/fused-LN {vs_loop:.1f}x (target >= 10)"
              + ("" if hit else "  MISSED"), flush=True)
    return 0 if ok else 1


def resources(args):
    os.environ.pop("TRITON_INTERPRET", None)
    from fusedrnn.kernels import aot
    from fusedrnn.kernels import layernorm as K
    cfgs = K.aot_configs()
    res = aot.compile_many(cfgs, (90,), jobs=args.jobs, resources=True)
    print("| kernel | dtype | mode | P | blocks B.H/M.K | warps | regs | spill B | dot |\n|---|---|---|---|---|---|---|---|---|")
    bad = 0
    for c, r in zip(cfgs, res):
        d = dict(c.constexprs)
        u = r.get("usage") or {}
        if not r["ok"]:
            bad += 1
            print(f"| {c.name} | {c.dtype} | FAILED: {r.get('error', '')[-200:]} |")
            continue
        dot = " ".join(o for o in r["mma_ops"] if "mma" in o and "fence" not in o and "commit" not in o
                       and "wait" not in o) or "-"
        print(f"| {c.name} | {c.dtype} | {d.get('MODE', '-')} | {'P' if d.get('PERSISTENT') else '-'} | "
              f"B{d.get('BLOCK_B')}.{'H' + str(d.get('BLOCK_H')) if d.get('BLOCK_H') else 'M' + str(d.get('BLOCK_M'))}"
              f".K{d.get('BLOCK_K')} | {c.num_warps} | {u.get('reg')} | {(u.get('stack') or 0) + (u.get('local') or 0)} "
              f"| {dot} |", flush=True)
    return 1 if bad else 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", action="append", choices=["LSTM", "GRU"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=5, help="--gpu: timed runs (median)")
    ap.add_argument("--budget", type=float, default=3.0,
                    help="CPU: timing budget per candidate and point, seconds (default 3)")
    ap.add_argument("--md", help="write the CPU table as markdown here")
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--resources", action="store_true")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args(argv)
    args.mode = args.mode or ["LSTM", "GRU"]
    if args.resources:
        return resources(args)
    if args.gpu:
        return gpu(args)
    cpu(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
