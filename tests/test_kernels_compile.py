"""Ahead-of-time compilation of the Triton kernels for sm_90 and sm_80 (no GPU needed).

The configurations come from fusedrnn.kernels.aot.kernel_configs, which runs the launchers' own
code on meta tensors, so these tests follow any change of block sizes or flags. Compilation runs
in a subprocess without TRITON_INTERPRET (the interpreter, which tests/conftest.py enables on
machines without CUDA, replaces @triton.jit functions and cannot compile them). sm_90: one
configuration of every plain (kernel, mode, dtype, persistent, grid barrier, projection; for
stepwise LSTM also tf32 / ieee) group, the one with every optional feature on, plus the
barrier-only kernel (kernels/barrier.py); the variants (zoneout / reset) and the LayerNorm
kernels: a handful at the plan's edge, with their resources (the whole table of them is
bench/kernel_resources.py); sm_80: 12 configurations of all sets, evenly spread.

The tests skip only when the toolchain says it cannot compile for the arch (no NVIDIA backend in
this Triton, or no ptxas); any other failure, an ImportError in the kernels included, fails.
About 5.5 minutes on 2 shared cores with an empty Triton cache (measured 323 s: the sm_90 plain
groups 243 s, the variant / LayerNorm handful 26 s, the listing 5 s).
"""
import json
import os
import re
import subprocess
import sys
import types

import pytest

pytestmark = pytest.mark.slow

FLOAT_TYPES = ("f16", "bf16", "f32", "f64")


def _env():
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def _aot_process(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "fusedrnn.kernels.aot", *args], env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def _json_lines(proc, what):
    assert proc.returncode == 0, f"{what} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def _toolchain_problem(arch, run=_aot_process):
    """The toolchain's own reason it cannot compile for sm_<arch>, or None. A failing check (the
    kernels do not import, the check crashes) is an error, not a reason to skip."""
    (answer,) = _json_lines(run("--toolchain", "--arch", str(arch), timeout=300), f"toolchain check sm_{arch}")
    return answer["problem"]


def _compile(*extra):
    return _json_lines(_aot_process(*extra), "python -m fusedrnn.kernels.aot " + " ".join(extra))


@pytest.fixture(scope="module")
def toolchain():
    for arch in (90, 80):
        problem = _toolchain_problem(arch)
        if problem:
            pytest.skip(problem)


def _check(results):
    assert results, "nothing compiled"
    failed = [f"{r['arch']} {r['kernel']} {r['label']}: {r.get('error', '')[-600:]}" for r in results if not r["ok"]]
    assert not failed, "\n".join(failed)
    for r in results:
        assert r["has_ptx"] and r["has_cubin"], r


@pytest.fixture(scope="module")
def sm90(toolchain):
    results = _compile("--arch", "90", "--set", "plain")
    _check(results)
    return results


def _flags(r):
    return r["label"].split("/")[2]


def test_toolchain_check_fails_on_errors_and_skips_only_on_its_own_reason():
    """A crash of the check (here: an ImportError in the kernels) must fail the tests, not skip them;
    only the toolchain's own answer ("no NVIDIA backend", "no ptxas") is a reason to skip."""
    def broken(*args, **kw):
        return types.SimpleNamespace(returncode=1, stdout="",
                                     stderr="ImportError: cannot import name 'x' from 'fusedrnn.kernels.scan'")

    with pytest.raises(AssertionError, match="ImportError"):
        _toolchain_problem(90, run=broken)

    def no_ptxas(*args, **kw):
        return types.SimpleNamespace(returncode=0, stdout='{"problem": "no ptxas for sm_90"}\n', stderr="")

    assert _toolchain_problem(90, run=no_ptxas) == "no ptxas for sm_90"


def test_every_kernel_mode_dtype_and_kernel_choice_compiles_for_sm90(sm90):
    seen = {(r["label"].split("/")[0], r["label"].split("/")[1], "P" in _flags(r), "X" in _flags(r))
            for r in sm90 if r["kernel"].startswith("scan_")}
    for mode in ("LSTM", "GRU", "RNN_TANH", "RNN_RELU"):
        for dt in ("fp32", "fp16", "bf16", "fp64"):
            # stepwise, persistent single-program, persistent with the grid barrier
            for choice in ((False, False), (True, False), (True, True)):
                assert (mode, dt, *choice) in seen, (mode, dt, choice)
    assert {"lstm_proj_fwd_kernel", "lstm_proj_bwd_kernel", "grid_barrier_kernel"} <= {r["kernel"] for r in sm90}


def test_half_precision_dots_run_on_tensor_cores(sm90):
    """The two-pass "x2" dot: mma.sync, or wgmma where the persistent weight tile has the 64 rows
    a warpgroup needs."""
    for r in sm90:
        if r["label"].split("/")[1] in ("fp16", "bf16"):
            assert r["mma"] or r["wgmma"], f"{r['kernel']} {r['label']}: no tensor-core instruction"
    assert any(r["wgmma"] for r in sm90 if "P" in _flags(r)), "no persistent wgmma"


def test_no_float_atomics_so_results_are_bitwise_reproducible(sm90):
    """Determinism by construction, for every compiled configuration: no floating-point atomic in
    the TTIR or the PTX (each output element has one owner, reductions run inside the program
    that needs them). The only atomics are the grid barrier's int32 counter and error flag, in the
    grid-barrier configurations and the barrier kernel."""
    for r in sm90:
        where = f"{r['kernel']} {r['label']}"
        floats = [a for a in r["atomics_ptx"] if any(re.search(rf"\.{t}(x2)?\b", a) for t in FLOAT_TYPES)]
        floats += [a for a in r["atomics_ttir"] if a.split()[-1] in FLOAT_TYPES]
        assert not floats, f"{where}: floating-point atomics {floats}"
        if "X" in _flags(r) or r["kernel"] == "grid_barrier_kernel":
            assert set(r["atomics_ttir"]) <= {"tt.atomic_rmw i32"}, (where, r["atomics_ttir"])
        else:
            assert not r["atomics_ttir"] and not r["atomics_ptx"], (where, r["atomics_ttir"], r["atomics_ptx"])


def test_barrier_kernel_arrives_with_release_and_polls_with_acquire(toolchain):
    """The barrier-only kernel alone (seconds): the ordering the persistent scan relies on."""
    results = _compile("--arch", "90", "--kernel", "grid_barrier_kernel")
    _check(results)
    assert [r["label"] for r in results] == ["BARRIER/X/w8"]
    ops = results[0]["ordered_ops"]
    assert any(op.startswith(("red.global.gpu.release", "atom.global.gpu.release")) for op in ops), ops
    assert any(op.startswith(("ld.global.gpu.acquire", "atom.global.gpu.acquire")) for op in ops), ops


def test_sample_compiles_for_sm80(toolchain):
    _check(_compile("--arch", "80", "--sample", "12"))


def test_step_index_arguments_are_not_specialized():
    """The arguments that change from one launch to the next (the step range, the barrier count)
    must not be specialized by the JIT, or a stepwise layer would compile and choose among
    binaries for a step of 1 / a multiple of 16, and the barrier benchmark's n_steps = 1 launch
    would run a different binary than its n_steps = 1024 launch."""
    code = ("import json\n"
            "from fusedrnn.kernels import aot, barrier, scan\n"
            "ks = (scan.scan_fwd_kernel, scan.scan_bwd_kernel, scan.lstm_proj_fwd_kernel,\n"
            "      scan.lstm_proj_bwd_kernel, barrier.grid_barrier_kernel)\n"
            "ks = [aot.jit_function(k) for k in ks]\n"
            "print(json.dumps({k.__name__: [p.name for p in k.params if p.do_not_specialize] for k in ks}))\n")
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == {"scan_fwd_kernel": ["s_begin", "s_end"], "scan_bwd_kernel": ["i_begin", "i_end"],
                   "lstm_proj_fwd_kernel": ["s"], "lstm_proj_bwd_kernel": ["s"],
                   "grid_barrier_kernel": ["n_steps"]}, got


def _listing(code, timeout=600):
    proc = subprocess.run([sys.executable, "-c", "import json, torch\nfrom fusedrnn.kernels import aot\n" + code],
                          env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_aot_lists_the_variant_and_layernorm_configurations():
    """kernels/aot.py lists the scan kernels with zoneout (eval probability z1, training mask z2)
    and reset (r), their bool masks typed as Triton's JIT types a bool tensor, each persistent
    shape only where the plan admits it with those variants, and the LayerNorm kernels. Listing
    only (no compiler), so this runs wherever the kernels import."""
    got = _listing(
        "from triton.runtime.jit import mangle_type\n"
        "cs = aot.kernel_configs(modes=('LSTM', 'GRU'), dtypes=(torch.float32,))\n"
        "out = dict(labels=sorted({(c.name, c.label) for c in cs}),\n"
        "           masks=sorted({t for c in cs for n, t in c.signature\n"
        "                         if n in ('p_zm', 'p_reset') and t != 'constexpr'}),\n"
        "           bool_ptr=mangle_type(torch.empty(1, dtype=torch.bool, device='meta')))\n"
        "print(json.dumps(out))\n")
    labels = [tuple(x) for x in got["labels"]]
    assert got["masks"] == [got["bool_ptr"]], got
    flags = {(name, label.split("/")[0], label.split("/")[2]) for name, label in labels}
    for name in ("scan_fwd_kernel", "scan_bwd_kernel"):
        for mode in ("LSTM", "GRU"):
            for persistent in ("-", "P"):
                for var in ("z1", "z2", "r", "z2r"):
                    assert any(n == name and m == mode and f[4] == persistent and f[6:] == var
                               for n, m, f in flags), (name, mode, persistent, var)
    # zoneout with a projection is refused by the launchers: never listed
    assert not any("J" in f and "z" in f[6:] for _, _, f in flags)
    # a plain plan at the edge (float32 LSTM H = 16, B = 64) is listed plain, not with a variant
    edge = [f for name, label in labels if name == "scan_bwd_kernel" and label.startswith("LSTM/fp32/")
            and "B64.H16.K16" in label for f in [label.split("/")[2]] if "P" in f and "J" not in f]
    assert edge and all(len(f) == 6 for f in edge), edge
    names = {name for name, _ in labels}
    assert {"ln_hw_kernel", "ln_fwd_kernel", "ln_dh_kernel", "ln_bwd_kernel"} <= names, names
    assert any(name == "ln_fwd_kernel" and label.split("/")[2][4] == "P" for name, label in labels)
    # the LayerNorm row kernels with the variants too, stepwise and persistent
    for name in ("ln_fwd_kernel", "ln_bwd_kernel"):
        for mode in ("LSTM", "GRU"):
            for persistent in ("-", "P"):
                for var in ("", "z1", "z2", "r", "z2r"):
                    assert any(n == name and m == mode and f[4] == persistent and f[6:] == var
                               for n, m, f in flags), (name, mode, persistent, var)


def test_layernorm_listing_has_the_variants_where_ln_plan_admits_them():
    """kernels/aot.py --set layernorm lists the LayerNorm kernels plain and with zoneout / reset
    (kernels/layernorm.py: AOT_VARIANTS), each persistent configuration only where ln_plan admits
    it with those variants: in bfloat16 the LSTM at H <= 16 and the GRU at H <= 32, never the
    H = 64 / LSTM H = 32 programs that ran out of registers. Listing only (no compiler)."""
    got = _listing(
        "from fusedrnn.kernels import layernorm\n"
        "meta = torch.device('meta')\n"
        "cs = aot.kernel_configs(modes=('LSTM', 'GRU'), dtypes=(torch.bfloat16,), sets=('layernorm',))\n"
        "out = []\n"
        "for c in cs:\n"
        "    d = dict(c.constexprs)\n"
        "    if d.get('PERSISTENT'):\n"
        "        z, r = bool(d.get('ZONEOUT')), bool(d.get('RESET'))\n"
        "        admitted = layernorm.ln_plan(c.mode, 2, 16, d['BLOCK_H'], torch.bfloat16, meta, zoneout=z, reset=r)\n"
        "        out.append([c.name, c.label, admitted is not None])\n"
        "print(json.dumps(out))\n")
    assert got and all(ok for _, _, ok in got), got
    var = {(name, label.split("/")[0], label.split("/")[2][6:], label.split("/")[4]) for name, label, _ in got}
    for name in ("ln_fwd_kernel", "ln_bwd_kernel"):
        for v in ("", "z1", "z2", "r", "z2r"):
            assert (name, "LSTM", v, "B16.H16.K16") in var and (name, "GRU", v, "B16.H32.K32") in var, (name, v)
    assert not any(b.split(".")[1] in ("H64",) or (m == "LSTM" and b.split(".")[1] == "H32")
                   for _, m, _, b in var), var


def test_variant_configurations_at_the_plan_edge_do_not_run_out_of_registers(toolchain):
    """The largest persistent plans with zoneout (training mask) and reset on, float32 and
    bfloat16 LSTM / RNN, compiled for sm_90, do not run out of registers (the plan counts the
    variants' tiles; kernels/plan.py): no spills at more than 128 registers. Below that, 8-32 B of
    stack come from Triton's ptxas option --regAllocOptLevel=2 (docs/design.md: Resource usage)
    and are allowed. The same for the largest LayerNorm persistent programs with both variants
    (float32 LSTM H = 32, bfloat16 LSTM H = 16; kernels/layernorm.py: ln_plan)."""
    assert aot_cuobjdump(), "cuobjdump (shipped in the Triton wheel) is needed to read spills"
    got = _listing(
        "cs = aot.select(aot.kernel_configs(modes=('LSTM', 'RNN_TANH'), dtypes=(torch.float32, torch.bfloat16),\n"
        "                                   sets=('variants', 'layernorm')))\n"
        "pick = [c for c in cs if dict(c.constexprs).get('PERSISTENT') and not dict(c.constexprs).get('GRID_SYNC')\n"
        "        and dict(c.constexprs).get('ZONEOUT') == 2 and dict(c.constexprs).get('RESET')]\n"
        "print(json.dumps(aot.compile_many(pick, (90,), resources=True)))\n", timeout=900)
    _check(got)
    scan = [r for r in got if r["kernel"].startswith("scan_")]
    assert len(scan) == 8 and len(got) == 12, [(r["kernel"], r["label"]) for r in got]
    spills = [(r["kernel"], r["label"], r["usage"]) for r in got
              if (r["usage"]["stack"] or 0) + (r["usage"]["local"] or 0) and r["usage"]["reg"] > 128]
    assert not spills, spills


def aot_cuobjdump():
    proc = subprocess.run([sys.executable, "-c", "from fusedrnn.kernels import aot; print(aot.cuobjdump_path())"],
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip().splitlines()[-1] != "None"

