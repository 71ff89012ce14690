"""CPU cost of issue 12's variants (zoneout, reset, weight_drop) against the two things a user
would otherwise run: the plain torch.nn layer (no variant: the floor) and the straightforward
PyTorch step loop over torch.nn's cell with the variant written around it (what the issue asks
fusedrnn's CPU default to match or beat).

    python bench/variants_cpu.py [--budget 3] [--only LSTM:128,64,256:zoneout:infer]
                                 [--out bench/results/variants-cpu-DATE.md]

Prints a markdown table: per mode, size, variant and pass, the time of fusedrnn's default
(backend="auto": fusedrnn/loop.py for zoneout / reset, torch's op for weight_drop), of the
hand-written loop and of the plain torch.nn layer, and the ratio loop / fusedrnn (> 1: fusedrnn is
faster). Passes: "train" = forward + backward in training mode, "infer" = forward under no_grad
in eval mode (zoneout then uses the expectation). One layer, one direction, float32.

Timing is the project's CPU timing (fusedrnn/tools/sweep.py, `fusedrnn bench`): one torch thread,
CPU time of the calling thread (time.thread_time), the three providers interleaved call by call
after two warm-up calls each, repetitions from a time budget per provider and point, and the
median of the uncontended calls (those within FAST_BAND of the provider's fastest call; a
core of the shared VM this runs on alternates between full and about half speed in millisecond
stretches, and the median of all calls measures that mix, not the code).
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import fusedrnn  # noqa: E402
from fusedrnn.tools.sweep import FAST_BAND, CpuTiming, time_cpu_interleaved  # noqa: E402

SIZES = ((32, 8, 64), (64, 32, 128), (128, 64, 256))  # (T, B, H); input size = H
VARIANTS = ("zoneout", "reset", "weight_drop")
P = 0.25


def user_loop(mode, cell, x, state, *, zoneout=0.0, reset=None, init=None, training=True):
    """The step loop a user writes around torch.nn's cell: reset by torch.where against the
    initial state, zoneout by a fresh Bernoulli mask per step (eval: the expectation)."""
    ys = []
    h, c = state if mode == "LSTM" else (state, None)
    for t in range(x.shape[0]):
        if reset is not None:
            r = reset[t][:, None]
            h = torch.where(r, init[0], h)
            if c is not None:
                c = torch.where(r, init[1], c)
        if mode == "LSTM":
            h_new, c = cell(x[t], (h, c))
        else:
            h_new = cell(x[t], h)
        if zoneout > 0:
            if training:
                h_new = torch.where(torch.rand_like(h_new) < zoneout, h, h_new)
            else:
                h_new = zoneout * h + (1 - zoneout) * h_new
        h = h_new
        ys.append(h)
    return torch.stack(ys), h


def bench_point(mode, T, B, H, variant, training, timing):
    layer_cls = {"LSTM": fusedrnn.LSTM, "GRU": fusedrnn.GRU}[mode]
    kw = {variant: P} if variant != "reset" else {}
    fused = layer_cls(H, H, **kw)
    plain = {"LSTM": nn.LSTM, "GRU": nn.GRU}[mode](H, H)
    cell = {"LSTM": nn.LSTMCell, "GRU": nn.GRUCell}[mode](H, H)
    plain.load_state_dict(fused.state_dict())
    cell.weight_ih.data.copy_(fused.weight_ih_l0.data)
    cell.weight_hh.data.copy_(fused.weight_hh_l0.data)
    cell.bias_ih.data.copy_(fused.bias_ih_l0.data)
    cell.bias_hh.data.copy_(fused.bias_hh_l0.data)
    for m in (fused, plain, cell):
        m.train(training)
    x = torch.randn(T, B, H, requires_grad=training)
    h0 = torch.zeros(1, B, H)
    hx = (h0, torch.zeros(1, B, H)) if mode == "LSTM" else h0
    reset = (torch.rand(T, B) < 0.05) if variant == "reset" else None
    cell_state = (hx[0][0], hx[1][0]) if mode == "LSTM" else hx[0]
    w_hh = cell.weight_hh

    def run_fused():
        y, _ = fused(x, hx, reset=reset)
        if training:
            y.sum().backward()

    def run_plain():
        y, _ = plain(x, hx)
        if training:
            y.sum().backward()

    def run_loop():
        if variant == "weight_drop" and training:
            # AWD-LSTM's WeightDrop by hand: a dropped copy of W_hh swapped in for the call
            dropped = torch.nn.functional.dropout(w_hh, P, training=True)
            del cell.weight_hh
            cell.weight_hh = dropped
        try:
            y, _ = user_loop(mode, cell, x, cell_state, zoneout=P if variant == "zoneout" else 0.0,
                             reset=reset, init=cell_state, training=training)
            if training:
                y.sum().backward()
        finally:
            if variant == "weight_drop" and training:
                del cell.weight_hh
                cell.weight_hh = w_hh

    ctx = torch.enable_grad if training else torch.no_grad

    def under_ctx(fn):
        def call():
            with ctx():
                fn()
        return call

    grads = [x, *fused.parameters(), *plain.parameters(), *cell.parameters()]
    runs = {"fusedrnn": (under_ctx(run_fused), grads), "loop": (under_ctx(run_loop), grads),
            "plain": (under_ctx(run_plain), grads)}
    res, errors, stretch = time_cpu_interleaved(runs, timing)
    if errors:
        raise RuntimeError(errors)
    return fused.last_backend, res, stretch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=3.0,
                    help="timing budget per provider and point, seconds (default 3)")
    ap.add_argument("--modes", default="LSTM,GRU")
    ap.add_argument("--only", action="append", default=None,
                    help="MODE:T,B,H:VARIANT:PASS (repeatable): time only these points")
    ap.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    timing = CpuTiming(budget_s=args.budget)
    points = [(mode, size, variant, training) for mode in args.modes.split(",") for size in SIZES
              for variant in VARIANTS for training in (True, False)]
    if args.only:
        want = {tuple(o.split(":")) for o in args.only}
        points = [p for p in points
                  if (p[0], ",".join(map(str, p[1])), p[2], "train" if p[3] else "infer") in want]
    load0 = os.getloadavg()[0]
    rows = ["| mode | T, B, H | variant | pass | fusedrnn route | fusedrnn ms | user loop ms | torch.nn plain ms "
            "| loop / fusedrnn | fusedrnn / plain | kept f / l / p | wall / CPU |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(rows), flush=True)
    for mode, (T, B, H), variant, training in points:
        route, res, stretch = bench_point(mode, T, B, H, variant, training, timing)
        tf, tl_, tp = (res[n]["median"] for n in ("fusedrnn", "loop", "plain"))
        kept = " / ".join(f"{res[n]['kept']:.2f}" for n in ("fusedrnn", "loop", "plain"))
        line = (f"| {mode} | {T}, {B}, {H} | {variant} | {'train' if training else 'infer'} | {route} "
                f"| {tf:.2f} | {tl_:.2f} | {tp:.2f} | {tl_ / tf:.2f} | {tf / tp:.2f} | {kept} "
                f"| {stretch:.2f} |")
        rows.append(line)
        print(line, flush=True)
    head = [f"fusedrnn variants on CPU, {datetime.date.today()}, torch {torch.__version__}, float32, 1 layer, "
            f"1 direction, input size = H, p = {P}, reset: 5% of (t, b) set; {os.cpu_count()} cores, "
            f"load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end.",
            "",
            f"Timing (fusedrnn/tools/sweep.py's CPU timing, as `fusedrnn bench`): one torch thread; "
            f"{timing.describe(1)['clock_text']}; the three providers interleaved call by call after two "
            f"warm-up calls each, {timing.budget_s:g} s of calls per provider and point (at least "
            f"{timing.min_reps}); ms = the median of the calls within {FAST_BAND}x of that provider's "
            f"fastest call (the uncontended ones: this VM's cores alternate between full and about half "
            f"speed). kept = the fraction of calls inside that band (fusedrnn / loop / plain); wall / CPU "
            f"= the timed calls' wall time over their CPU time (> 1: the thread waited for the core).",
            ""]
    lines = head + rows
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
