"""Formatting for the tools: plain-text and markdown tables, the sweep's table and markdown, the
roofline table, the barrier benchmark's tables, and the sweep's plot. Nothing here measures."""
from __future__ import annotations

from .roofline import GPUS, barrier_cost, floors, gpu_spec

# ----------------------------------------------------------------------------------------------
# generic tables


def fmt(v, spec):
    """format(v, spec), or "-" for None."""
    return "-" if v is None else format(v, spec)


def text_table(header, rows, left=()):
    """A plain-text table; columns whose index is in `left` are left-aligned."""
    rows = [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(header)]
    line = "  ".join(("{:<%d}" if i in left else "{:>%d}") % w for i, w in enumerate(widths))
    out = [line.format(*header), line.format(*("-" * w for w in widths))]
    out += [line.format(*r) for r in rows]
    return "\n".join(out)


def markdown_table(header, rows):
    out = ["| " + " | ".join(str(h) for h in header) + " |",
           "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------
# the sweep (`fusedrnn bench`)

HEADER = ("cell", "dtype", "pass", "T", "B", "I", "H", "L", "D", "provider", "ms", "p20-p80",
          "tok/s", "TFLOP/s", "mem MB", "x base", "floor ms", "eff", "note")


def table_rows(records):
    rows = []
    for r in records:
        fl = r["floors"]
        note = r["note"] or ""
        if r["status"] == "error":
            note = "ERROR " + note
        if r.get("kept") is not None and r["kept"] < 1:
            # how much of the run the band dropped: a low fraction says the machine was contended
            note = (f"kept {r['kept']:.0%} (all {r['all_median_ms']:.3g} ms)"
                    + (f"; {note}" if note else ""))
        if r.get("tuning_ms") is not None:
            note = f"tuned in {r['tuning_ms']:.0f} ms" + (f"; {note}" if note else "")
        rows.append((r["cell"], r["dtype"], r["pass"], r["seq"], r["batch"], r["input"],
                     r["hidden"], r["layers"], 2 if r["bidirectional"] else 1, r["provider"],
                     fmt(r["median_ms"], ".3f"),
                     "-" if r["p20_ms"] is None else f"{r['p20_ms']:.3f}-{r['p80_ms']:.3f}",
                     fmt(r["tokens_per_s"], ".3g"), fmt(r["tflops"], ".3g"),
                     fmt(r["peak_mem_mb"], ".0f"), fmt(r["vs_baseline"], ".2f"),
                     fmt(fl["floor_ms"] if fl else None, ".3f"), fmt(r["efficiency"], ".2f"),
                     note[:70]))
    return rows


def method_lines(env):
    """How the numbers were taken, one line each (the sweep's JSON `environment["method"]`)."""
    m = env.get("method") or {}
    if not m:
        return []
    if m.get("clock") == "cuda-events":
        return [f"- timing: triton.testing.do_bench (CUDA events), {m.get('rep_ms')} ms per "
                "measurement after 2 warm-up calls (compilation excluded); median, p20, p80"]
    band = m.get("band")
    kept = ("median, p20, p80 of every call" if band is None else
            f"median, p20, p80 of the uncontended calls, those within {band:g}x the provider's "
            "fastest call (on a VM sharing its cores with other guests, calls alternate between full "
            "speed and about half of it; the median of all calls and the kept fraction are in the "
            "JSON)")
    lines = [f"- timing: {m.get('clock_text')}; {m.get('threads')} torch thread(s); providers "
             f"interleaved call by call (rotating who goes first); repetitions from a budget of "
             f"{m.get('budget_s'):g} s per provider and point (min {m.get('min_reps')}, max "
             f"{m.get('max_reps')}) after 2 warm-up calls; {kept}"]
    lines.append(f"- load watched per point: a point is measured again (up to {m.get('retries')} "
                 f"times) while the 1-minute load average exceeds {m.get('max_load'):g} or the timed "
                 f"calls' wall time exceeds {m.get('max_stretch'):g}x their CPU time, and each "
                 "provider keeps the lowest of its tries' medians (a disturbance only adds time); "
                 "still disturbed at the last try: marked 'noisy' in the note")
    return lines


def markdown(records, env, title="fusedrnn bench"):
    lines = [f"# {title}", "",
             f"- device: {env.get('device_name')} ({env['device']}), torch {env['torch']}, "
             f"triton {env.get('triton')}, CUDA {env.get('cuda')}",
             f"- git {env.get('git_commit')}{' (dirty)' if env.get('git_dirty') else ''}, "
             f"{env['timestamp']}"]
    lines += method_lines(env)
    lines += ["- ms: median (p20-p80); x base: time / baseline time (cudnn on GPU, torch-cpu on "
              "CPU), < 1 is faster; floor: max(compute, memory, grid-barrier) lower bound "
              "(fusedrnn/tools/roofline.py), eff = floor / ms" + barrier_note(env), ""]
    lines.append(markdown_table(HEADER, table_rows(records)))
    return "\n".join(lines) + "\n"


def barrier_note(env):
    if env.get("barrier_us") is None:
        return ""
    return f"; grid barrier {env['barrier_us']:.3g} us ({env.get('barrier_source')})"


def plot(records, path):
    """Speedup vs the baseline (or time, without one) across the sweep; one panel per
    (cell, dtype, pass). Returns None, or why nothing was written."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # noqa: BLE001 - matplotlib is optional: say why there is no plot
        return f"matplotlib unavailable ({exc}): no plot"
    groups = {}
    for r in records:
        groups.setdefault((r["cell"], r["dtype"], r["pass"]), []).append(r)
    n = len(groups)
    cols = min(n, 2)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(7 * cols, 4 * rows), squeeze=False)

    def key(r):
        return (r["seq"], r["batch"], r["input"], r["hidden"], r["layers"], r["bidirectional"])

    for ax, ((cell, dt, pass_), recs) in zip(axes.flat, groups.items()):
        shapes = []
        for r in recs:
            if key(r) not in shapes:
                shapes.append(key(r))
        labels = [f"T{s[0]} B{s[1]} H{s[3]}" + (f" L{s[4]}" if s[4] > 1 else "")
                  + (" bi" if s[5] else "") for s in shapes]
        has_base = any(r["speedup"] is not None for r in recs)
        for prov in sorted({r["provider"] for r in recs}):
            ys = []
            for s in shapes:
                r = next((r for r in recs if r["provider"] == prov and key(r) == s), None)
                v = None if r is None else (r["speedup"] if has_base else r["median_ms"])
                ys.append(float("nan") if v is None else v)
            if has_base and prov == recs[0].get("baseline") or all(y != y for y in ys):
                continue
            ax.plot(range(len(shapes)), ys, marker="o", label=prov)
        if has_base:
            ax.axhline(1.0, color="gray", lw=1, ls="--")
            base = next(r["baseline"] for r in recs if r["baseline"])
            ax.set_ylabel(f"speedup vs {base} (higher is better)")
        else:
            ax.set_ylabel("median ms")
        ax.set_yscale("log")
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
        ax.set_title(f"{cell} {dt} {pass_}")
        ax.grid(True, alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# ----------------------------------------------------------------------------------------------
# the roofline (`fusedrnn bench --roofline GPU`)


def format_roofline(problems, gpu_key, barrier_us=None):
    """A text table of the floors for each problem; barrier_us: a measured grid-barrier cost
    instead of the table's estimate."""
    spec = gpu_spec(gpu_key)
    if spec is None:
        raise ValueError(f"unknown GPU {gpu_key!r}; known: {', '.join(GPUS)}")
    b_us, b_source = barrier_cost(spec, barrier_us)
    barrier = f"~{b_us:g} us (estimate)" if b_source == "estimate" else f"{b_us:.3g} us ({b_source})"
    lines = [
        f"Roofline floors on {spec['name']}: matmul {spec['bf16']} TFLOP/s bf16/fp16 dense, "
        f"{spec['fp32']} fp32 (no TF32), {spec['fp64']} fp64; HBM {spec['hbm_tbs']} TB/s; "
        f"launch ~{spec['launch_us']} us (estimate), grid barrier {barrier}.",
        "floor = max(compute, memory, barrier); stepwise kernels also pay the launch floor.",
    ]
    hdr = ("cell", "dtype", "pass", "T", "B", "I", "H", "L", "D", "GFLOP", "MB",
           "compute ms", "memory ms", "launch ms", "barrier ms", "floor ms")
    rows = []
    for p in problems:
        fl = floors(p, spec, barrier_us)
        rows.append((p.cell, p.dtype, p.pass_, p.steps, p.batch, p.input, p.hidden, p.num_layers,
                     p.dirs, f"{fl['flops'] / 1e9:.2f}", f"{fl['bytes'] / 1e6:.1f}",
                     f"{fl['compute_ms']:.4f}", f"{fl['memory_ms']:.4f}",
                     f"{fl['launch_ms']:.3f}", f"{fl['barrier_ms']:.3f}",
                     f"{fl['floor_ms']:.4f}"))
    lines.append(text_table(hdr, rows))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# the barrier benchmark (`fusedrnn bench --barrier`)

BARRIER_HEADER = ("programs", "D", "grid sync", "t(N) ms", "t(1) ms", "us / barrier", "launch us",
                  "what", "note")


def barrier_rows(records):
    rows = []
    for r in records:
        t = r["t_steps_ms"]
        rows.append((r["programs"], r["directions"], "yes" if r["grid_sync"] else "no",
                     "-" if t is None else f"{t[0]:.4f}", fmt(r["t1_ms"] and r["t1_ms"][0], ".4f"),
                     fmt(r["barrier_us"], ".3f"), fmt(r["launch_us"], ".2f"), r["what"],
                     ("ERROR " + r["note"]) if r["status"] == "error" else (r["note"] or "")))
    return rows


def barrier_markdown(result):
    env = result["environment"]
    lines = ["# fusedrnn bench --barrier: one empty grid barrier", "",
             f"- device: {env.get('device_name')} ({env['device']}), torch {env['torch']}, "
             f"triton {env.get('triton')}, CUDA {env.get('cuda')}",
             f"- git {env.get('git_commit')}{' (dirty)' if env.get('git_dirty') else ''}, "
             f"{env['timestamp']}"]
    if result["note"]:
        lines.append(f"- {result['note']}")
    if result["records"]:
        n = result["steps"]
        lines += [f"- grid_barrier_kernel (kernels/barrier.py: the persistent kernels' step_barrier and "
                  f"nothing else), one launch with N = {n} barriers and one with 1 (do_bench medians, "
                  f"p20-p80 in the JSON): us / barrier = (t(N) - t(1)) / (N - 1); launch us = t(1), "
                  f"allocating + zeroing the counters + one launch",
                  f"- barrier_us = {fmt(result['barrier_us'], '.3f')} (first row), the roofline's "
                  f"barrier floor with `--barrier-us barrier.json`", "",
                  markdown_table(BARRIER_HEADER, barrier_rows(result["records"]))]
    return "\n".join(lines) + "\n"
