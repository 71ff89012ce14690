"""CPU cost of issue 12's variants (zoneout, reset, weight_drop) against the two things a user
would otherwise run: the plain torch.nn layer (no variant: the floor) and the straightforward
PyTorch step loop over torch.nn's cell with the variant written around it (what the issue asks
fusedrnn's CPU default to match or beat).

    python bench/variants_cpu.py [--threads 1] [--reps 7] [--out bench/results/variants-cpu-DATE.md]

Prints a markdown table: per mode, size, variant and pass, the median time of fusedrnn's default
(backend="auto": fusedrnn/loop.py for zoneout / reset, torch's op for weight_drop), of the
hand-written loop and of the plain torch.nn layer, and the ratio loop / fusedrnn (> 1: fusedrnn is
faster). Passes: "train" = forward + backward in training mode, "infer" = forward under no_grad
in eval mode (zoneout then uses the expectation). One layer, one direction, float32.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import fusedrnn  # noqa: E402

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


def timed(fn, reps):
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_point(mode, T, B, H, variant, training, reps):
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
    with ctx():
        t_fused = timed(run_fused, reps)
        route = fused.last_backend
        t_loop = timed(run_loop, reps)
        t_plain = timed(run_plain, reps)
    return route, t_fused, t_loop, t_plain


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--modes", default="LSTM,GRU")
    ap.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lines = [f"fusedrnn variants on CPU, {datetime.date.today()}, torch {torch.__version__}, "
             f"{args.threads} thread(s), median of {args.reps}, float32, 1 layer, p = {P}, "
             f"reset: 5% of (t, b) set; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores",
             "",
             "| mode | T, B, H | variant | pass | fusedrnn route | fusedrnn ms | user loop ms | torch.nn plain ms "
             "| loop / fusedrnn | fusedrnn / plain |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for mode in args.modes.split(","):
        for T, B, H in SIZES:
            for variant in VARIANTS:
                for training in (True, False):
                    route, tf, tl_, tp = bench_point(mode, T, B, H, variant, training, args.reps)
                    line = (f"| {mode} | {T}, {B}, {H} | {variant} | {'train' if training else 'infer'} | {route} "
                            f"| {tf * 1e3:.2f} | {tl_ * 1e3:.2f} | {tp * 1e3:.2f} | {tl_ / tf:.2f} | {tf / tp:.2f} |")
                    lines.append(line)
                    print(line, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
