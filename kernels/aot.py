"""Ahead-of-time compilation of every kernel configuration the launchers can pick (no GPU needed).

The configurations come from the launchers themselves: forward_launches / backward_launches run on
meta tensors (planned as an sm_90, kernels/plan.py: device_limits) of a few shapes chosen to reach
every block-size clamp, so this list cannot drift from the launch code. The scan kernels are
listed plain and with the variants (VARIANTS: zoneout's eval probability or training mask, reset),
each shape only where the plan admits it with those variants on; the LayerNorm kernels come from
kernels/layernorm.py's own listing (aot_configs, which runs its launchers the same way), plain
and with the same variants, each persistent shape only where ln_plan admits it with them; the
barrier-only kernel (kernels/barrier.py) is listed once, from its own launcher, with the grid
barrier on and one program per SM. A launch's keyword arguments become a signature the way
Triton's JIT sees them: heuristics applied, None arguments constexpr, bool tensors (the zoneout
and reset masks) pointers to Triton's 1-bit type. Used by tests/test_kernels_compile.py and
bench/kernel_resources.py. Must run without TRITON_INTERPRET (which turns @triton.jit functions
into interpreter objects).

    python -m fusedrnn.kernels.aot [--arch 90] [--select groups|all] [--set plain|variants|layernorm] ...
                                                                          JSON lines, one per compile
    python -m fusedrnn.kernels.aot --toolchain [--arch 90]                 {"problem": null | "why not"}
"""
import itertools
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import triton
from triton.runtime.autotuner import Heuristics

from fusedrnn.spec import DTYPE_NAMES, GATES, MODES

from .barrier import barrier_launch
from .launch import resolve
from .plan import device_limits, plan_for
from .scan import backward_launches, forward_launches

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _bool_type():
    """Triton's name of a bool (the element type of a bool tensor's pointer): "u1" since Triton
    canonicalizes bools as unsigned, "i1" before."""
    try:
        from triton._utils import canonicalize_dtype
        return canonicalize_dtype(torch.bool)
    except (ImportError, KeyError):
        return "i1"


_SIG = {**DTYPE_NAMES, torch.int64: "i64", torch.int32: "i32", torch.bool: _bool_type()}
_META = torch.device("meta")
# (B, H, P_proj): reach every clamp of step_config / proj_config, the largest single-program
# persistent plans (B = 64; H = 32 gated, 64 RNN; half precision at B = 16: H = 64 gated, 128 RNN)
# and layers that need the grid barrier. Shapes a plan cannot hold for some mode / dtype are
# skipped there.
STEP_SHAPES = ((3, 5, 3), (20, 24, 16), (64, 256, 128))
PERSISTENT_SHAPES = ((3, 5, 3), (3, 32, 16), (16, 32, 16), (32, 32, None), (64, 16, 8), (32, 64, None),
                     (16, 64, None), (16, 128, None))
GRID_SYNC_SHAPES = ((8, 32, 16), (8, 64, 32), (8, 128, 64), (32, 64, 32), (32, 128, 64))
# (ZONEOUT, RESET) of the variant listings, besides the plain (0, False): ZONEOUT 1 the eval
# probability, 2 the training mask (kernels/scan.py). The plan counts zoneout and reset
# (kernels/plan.py: persistent_plan), so their largest plans are smaller: PERSISTENT_SHAPES reach
# them, with VARIANT_SHAPES (B = 32 at H = 16: the largest float32 LSTM plan with a variant).
VARIANTS = ((1, False), (2, False), (0, True), (2, True))
VARIANT_SHAPES = ((32, 16, None),)
_GATE_MODES = {4: "LSTM", 3: "GRU", 1: "RNN"}


@dataclass(frozen=True)
class KernelConfig:
    kernel: object        # the @triton.jit function (heuristics already applied to constexprs)
    signature: tuple      # ((arg name, type string), ...) in argument order
    constexprs: tuple     # ((name, value), ...): constexpr parameters and None arguments
    num_warps: int
    dtype: str

    @property
    def name(self):
        return self.kernel.__name__

    @property
    def mode(self):
        """MODE, or the mode its gate count names (the LayerNorm h W_hh kernel); the LSTM
        projection kernels have neither: LSTM."""
        c = dict(self.constexprs)
        return c.get("MODE") or _GATE_MODES.get(c.get("G"), "LSTM")

    @property
    def label(self):
        """mode/dtype/flags/precision/blocks/warps. Flags: B bias (the LayerNorm kernels' hidden
        bias too), L lengths, J projection, S save, P persistent, X grid barrier, then, only when
        on, the variants: z1 / z2 zoneout (eval probability / training mask), r reset."""
        c = dict(self.constexprs)
        if "PREC" not in c:  # grid_barrier_kernel: no mode, dtype or tiles
            return f"BARRIER/{'X' if c.get('GRID_SYNC') else '-'}/w{self.num_warps}"
        flags = "".join(k if any(c.get(n) for n in names) else "-" for k, names in (
            ("B", ("HAS_BIAS", "HAS_HB")), ("L", ("HAS_LEN",)), ("J", ("HAS_PROJ",)), ("S", ("SAVE",)),
            ("P", ("PERSISTENT",)), ("X", ("GRID_SYNC",))))
        flags += (f"z{c['ZONEOUT']}" if c.get("ZONEOUT") else "") + ("r" if c.get("RESET") else "")
        units = c.get("BLOCK_H", c.get("BLOCK_P", c.get("BLOCK_M")))
        return (f"{self.mode}/{self.dtype}/{flags}/{c['PREC']}/"
                f"B{c['BLOCK_B']}.H{units}.K{c['BLOCK_K']}/w{self.num_warps}")


def jit_function(kernel):
    """The @triton.jit function under any @triton.heuristics wrappers."""
    while isinstance(kernel, Heuristics):
        kernel = kernel.fn
    return kernel


def specialize(kernel, args):
    """(jit function, signature, constexprs) of a keyword launch, as Triton's JIT specializes it:
    each heuristic adds its constexpr, and a None argument is a constexpr None."""
    kernel, args = resolve(kernel, args)
    sig, const = [], {}
    for p in kernel.params:
        if p.name not in args:
            raise KeyError(f"{kernel.__name__}: no value for {p.name}")
        a = args[p.name]
        if p.is_constexpr or a is None:
            sig.append((p.name, "constexpr"))
            const[p.name] = a
        elif isinstance(a, torch.Tensor):
            sig.append((p.name, "*" + _SIG[a.dtype]))
        elif isinstance(a, bool):
            sig.append((p.name, _SIG[torch.bool]))
        else:
            sig.append((p.name, "i32"))
    unknown = set(args) - {p.name for p in kernel.params}
    if unknown:
        raise KeyError(f"{kernel.__name__}: no parameter {sorted(unknown)}")
    return kernel, tuple(sig), tuple(sorted(const.items()))


@contextmanager
def _env(name, value):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def _layer(mode, dtype, B, H, P, proj, bias, lens, D=2, T=1):
    G = GATES[mode]
    m = dict(device="meta", dtype=dtype)
    return dict(
        xg=torch.empty(D, T, B, G * H, **m), w_hh=torch.empty(D, G * H, P, **m),
        b_hh=torch.empty(D, G * H, **m) if bias else None, w_hr=torch.empty(D, P, H, **m) if proj else None,
        h0=torch.empty(D, B, P, **m), c0=torch.empty(D, B, H, **m) if mode == "LSTM" else None,
        lengths=torch.empty(B, dtype=torch.int64, device="meta") if lens else None)


def _variant_kw(zoneout, reset, D, T, B, P):
    """The launchers' variant arguments: zoneout 0 off, 1 the eval probability, 2 the training
    mask (D, T, B, P) bool; reset (D, T, B) bool."""
    m = dict(device="meta", dtype=torch.bool)
    return dict(zoneout=torch.empty(D, T, B, P, **m) if zoneout == 2 else None,
                zoneout_p=0.25 if zoneout == 1 else 0.0, reset=torch.empty(D, T, B, **m) if reset else None)


def _launches_of(mode, dtype, kernel, B, H, Pp, bias, lens, save, tf32, zoneout=0, reset=False):
    proj = Pp is not None and mode == "LSTM"
    P = Pp if proj else H
    L = _layer(mode, dtype, B, H, P, proj, bias, lens)
    var = _variant_kw(zoneout, reset, L["xg"].shape[0], L["xg"].shape[1], B, P)
    outs, fwd, _ = forward_launches(mode, L["xg"], L["w_hh"], L["b_hh"], L["w_hr"], L["h0"], L["c0"],
                                    L["lengths"], save, kernel, tf32, **var)
    fwd = list(fwd)
    bwd = []
    if save:
        y, hn, cn, hp, gates, cs = outs
        _, it, _ = backward_launches(mode, y, hn, cn if mode == "LSTM" else None, L["w_hh"], L["w_hr"],
                                     L["lengths"], hp, gates, cs, kernel, tf32, **var)
        bwd = list(it)
    return fwd + bwd


SETS = ("plain", "variants", "layernorm")


def kernel_configs(modes=MODES, dtypes=_DTYPES, sets=SETS, variants=VARIANTS):
    """Every distinct (kernel, signature, constexprs, num_warps) the launchers produce, from the
    sets named in `sets`: "plain" the scan kernels without variants and the barrier-only kernel,
    "variants" the scan kernels with each (zoneout, reset) of `variants`, "layernorm" the
    LayerNorm kernels plain and with the variants (kernels/layernorm.py: aot_configs,
    AOT_VARIANTS)."""
    unknown = set(sets) - set(SETS)
    if unknown:
        raise ValueError(f"unknown configuration sets {sorted(unknown)}; choose from {SETS}")
    combos = ((((0, False),) if "plain" in sets else ()) + (tuple(variants) if "variants" in sets else ()))
    seen = {}

    def add(launches, dtype):
        for ln in launches:
            fn, sig, const = specialize(ln.kernel, ln.args)
            cfg = KernelConfig(fn, sig, const, ln.num_warps, _SIG[dtype])
            seen.setdefault((cfg.name, cfg.signature, cfg.constexprs, cfg.num_warps), cfg)

    def persistent(mode, dtype, B, H, Pp, P, grid_sync, *features, zoneout, reset):
        """The launches of this shape where the plan with these variants admits it with this
        grid_sync (the launchers plan with the variants they run with, kernels/scan.py: _tiles,
        so a grid-barrier plan that the variants shrink is listed shrunk)."""
        plan = plan_for(mode, 2, B, H, P, dtype, _META, zoneout=zoneout > 0, reset=reset)
        if plan is None or plan.grid_sync != grid_sync:
            return []
        launches = _launches_of(mode, dtype, "persistent", B, H, Pp, *features, zoneout=zoneout, reset=reset)
        cells = [ln.args for ln in launches if "PERSISTENT" in ln.args]
        if any((a["BLOCK_H"], a["p_sync"] is not None) != (plan.BLOCK_H, plan.grid_sync) for a in cells):
            raise RuntimeError(f"{mode} {dtype} B={B} H={H} P={P} zoneout={zoneout} reset={reset}: the "
                               "launchers' blocks are not plan_for's")
        return launches

    for mode, dtype, (zoneout, reset) in itertools.product(modes, dtypes, combos):
        tf32s = (False,) if dtype == torch.float64 else (False, True)
        # zoneout of a projected state is not implemented (the launchers refuse it)
        projs_of = (None, "p") if mode == "LSTM" and not zoneout else (None,)
        var = dict(zoneout=zoneout, reset=reset)
        for features in itertools.product((False, True), (False, True), (False, True), tf32s):
            for projs in projs_of:
                for B, H, Pp in STEP_SHAPES:
                    add(_launches_of(mode, dtype, "stepwise", B, H, Pp if projs else None, *features, **var),
                        dtype)
                with _env("FUSEDRNN_GRID_BARRIER", "0"):
                    for B, H, Pp in PERSISTENT_SHAPES + (VARIANT_SHAPES if zoneout or reset else ()):
                        if projs and Pp is None:
                            continue
                        P = Pp if projs else H
                        add(persistent(mode, dtype, B, H, Pp if projs else None, P, False, *features, **var),
                            dtype)
                with _env("FUSEDRNN_GRID_BARRIER", "1"):
                    for B, H, Pp in GRID_SYNC_SHAPES:
                        P = Pp if projs and mode == "LSTM" else H
                        add(persistent(mode, dtype, B, H, Pp if projs else None, P, True, *features, **var),
                            dtype)
    if "layernorm" in sets:
        from .layernorm import AOT_VARIANTS, aot_configs
        for cfg in aot_configs(tuple(dtypes), variants=AOT_VARIANTS):
            if cfg.mode in modes:
                seen.setdefault((cfg.name, cfg.signature, cfg.constexprs, cfg.num_warps), cfg)
    if "plain" in sets:
        _, barrier = barrier_launch(device_limits(_META)[0], 1024, "meta", grid_sync=True)
        add([barrier], torch.int32)
    return list(seen.values())


def compile_config(cfg, arch=90):
    """Compile one configuration for sm_<arch>; returns Triton's CompiledKernel (asm: ptx, cubin)."""
    from triton.backends.compiler import GPUTarget
    src = triton.compiler.ASTSource(fn=cfg.kernel, signature=dict(cfg.signature),
                                    constexprs=dict(cfg.constexprs))
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": cfg.num_warps})


def toolchain_problem(arch=90):
    """None when this Triton can compile for sm_<arch>, else why not: no NVIDIA backend in the
    installation, or no ptxas for the arch. Any other failure raises (it is not a missing
    toolchain, and a test must not skip on it)."""
    import importlib.util
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        return "this Triton has no NVIDIA backend (triton.backends.nvidia)"
    from triton.backends.nvidia.compiler import get_ptxas
    try:
        path = get_ptxas(arch).path
    except RuntimeError as e:  # knobs.NvidiaTool: "Cannot find ptxas..."
        if "Cannot find" in str(e):
            return f"no ptxas for sm_{arch}: {e}"
        raise
    return None if os.path.exists(path) else f"ptxas for sm_{arch} not found at {path}"


def select(configs, how="groups"):
    """"all", or "groups": one configuration per (kernel, mode, dtype, persistent, grid sync,
    projection, for stepwise LSTM the dot precision, and which variants are on: none, or for the
    single-program persistent kernels, whose plans count them, zoneout / reset / both, for the
    others any),
    the one with the most optional features on (bias, lengths, save; then zoneout's training mask
    over its eval probability, reset) and the largest blocks, which is the heaviest of its group."""
    if how == "all":
        return list(configs)
    best = {}
    for c in configs:
        d = dict(c.constexprs)
        variants = (bool(d.get("ZONEOUT")), bool(d.get("RESET")))
        if (not d.get("PERSISTENT") or d.get("GRID_SYNC")) and any(variants):
            # stepwise tiles do not depend on the variants (both on is the heaviest), and the
            # opt-in grid-barrier plans get one group
            variants = True
        key = (c.name, c.mode, c.dtype, d.get("PERSISTENT"), d.get("GRID_SYNC"), d.get("HAS_PROJ"),
               d.get("PREC") if c.mode == "LSTM" and not d.get("PERSISTENT") else None, variants)
        units = d.get("BLOCK_H", d.get("BLOCK_P", d.get("BLOCK_M", 0)))
        score = (sum(bool(d.get(k)) for k in ("HAS_BIAS", "HAS_HB", "HAS_LEN", "SAVE")),
                 d.get("ZONEOUT") or 0, bool(d.get("RESET")), d.get("BLOCK_K", 0) * units * d.get("BLOCK_B", 0))
        if key not in best or score > best[key][0]:
            best[key] = (score, c)
    return [c for _, c in best.values()]


def cuobjdump_path():
    """cuobjdump shipped inside the Triton wheel (triton/backends/nvidia/bin), else on PATH."""
    import shutil
    p = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return p if os.path.exists(p) else shutil.which("cuobjdump")


def resource_usage(cubin):
    """REG / SHARED / LOCAL / STACK of the kernel in a cubin, from cuobjdump --dump-resource-usage."""
    import subprocess
    import tempfile
    tool = cuobjdump_path()
    if tool is None:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    usage = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        m = re.search(rf"\b{key}:(\d+)", out)
        usage[key.lower()] = int(m.group(1)) if m else None
    return usage


_SELECTED = []


def _compile_index(job):
    i, arch, resources = job
    cfg = _SELECTED[i]
    res = dict(kernel=cfg.name, label=cfg.label, arch=arch, ok=False)
    try:
        k = compile_config(cfg, arch)
        ptx = k.asm.get("ptx", "")
        ttir = k.asm.get("ttir", "")
        mma = sorted(set(re.findall(r"\b(w?gmma\.\S+|mma\.sync\.aligned\.\S+)", ptx)))
        # memory-ordered global accesses (the grid barrier's release arrive / acquire polls)
        ordered = sorted(set(re.findall(r"\b((?:red|atom|ld|st)\.global\.\S*(?:release|acquire|acq_rel)\S*)",
                                        ptx)))
        # every atomic: PTX atom / red instructions, and the TTIR atomics with their element type
        atomics_ptx = sorted(set(re.findall(r"\b((?:atom|red)\.[\w.]+)", ptx)))
        atomics_ttir = sorted(set(f"{op} {ty}" for op, ty in re.findall(
            r"\b(tt\.atomic_(?:rmw|cas))\b[^\n]*?:\s*\(\s*!tt\.ptr<(\w+)>", ttir)))
        res.update(ok=True, has_ptx=bool(ptx), has_cubin=bool(k.asm.get("cubin")),
                   mma="mma.sync" in ptx, wgmma="wgmma" in ptx, mma_ops=mma, ordered_ops=ordered,
                   atomics_ptx=atomics_ptx, atomics_ttir=atomics_ttir,
                   shared_triton=int(k.metadata.shared))
        if resources:
            res["usage"] = resource_usage(k.asm["cubin"])
    except Exception as e:  # reported, not raised: the caller lists every failure at once
        res["error"] = f"{type(e).__name__}: {str(e)[-2000:]}"
    return res


def compile_many(configs, archs=(90,), jobs=None, resources=False):
    """Compile configs for each arch in `jobs` forked worker processes; returns result dicts."""
    import multiprocessing
    _SELECTED[:] = configs
    work = [(i, a, resources) for a in archs for i in range(len(configs))]
    jobs = jobs or os.cpu_count() or 1
    if jobs == 1:
        return [_compile_index(w) for w in work]
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        return pool.map(_compile_index, work, chunksize=1)


def main(argv=None):
    import argparse
    import json
    ap = argparse.ArgumentParser(description="Compile the kernel configurations ahead of time (JSON lines out).")
    ap.add_argument("--arch", type=int, action="append", help="compute capability, e.g. 90 (repeatable)")
    ap.add_argument("--select", default="groups", choices=["groups", "all"])
    ap.add_argument("--set", action="append", choices=SETS,
                    help="only these configuration sets (repeatable; default all): plain scan kernels and "
                         "the barrier kernel, the scan kernels with zoneout / reset, the LayerNorm kernels")
    ap.add_argument("--dtype", action="append", help="only these dtypes (fp32, fp16, bf16, fp64)")
    ap.add_argument("--kernel", action="append", help="only these kernels (e.g. grid_barrier_kernel)")
    ap.add_argument("--sample", type=int, default=None, help="about this many, evenly spread")
    ap.add_argument("--jobs", type=int, default=None)
    ap.add_argument("--toolchain", action="store_true",
                    help="only say whether sm_<arch> can be compiled for: {\"problem\": null or the reason}")
    args = ap.parse_args(argv)
    if args.toolchain:
        print(json.dumps({"problem": toolchain_problem((args.arch or [90])[0])}), flush=True)
        return
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter replaces @triton.jit functions")
    configs = select(kernel_configs(sets=tuple(args.set or SETS)), args.select)
    if args.dtype:
        configs = [c for c in configs if c.dtype in args.dtype]
    if args.kernel:
        configs = [c for c in configs if c.name in args.kernel]
    if args.sample and len(configs) > args.sample:
        configs = sorted(configs, key=lambda c: (c.name, c.label))
        step = len(configs) / args.sample
        configs = [configs[int(i * step)] for i in range(args.sample)]
    for r in compile_many(configs, tuple(args.arch or [90]), args.jobs):
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
