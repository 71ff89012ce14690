"""An ensemble of RNNs: torch.func.vmap over stacked parameters against a Python loop over the models.

    python bench/vmap_ensemble.py [--members 4 16] [--repeat 5] [--backend auto]

Prints one row per (mode, members, pass): the median time of a forward (no grad) or a
forward + backward over the ensemble, for
  loop   a Python loop over the N fusedrnn models (on CPU: torch's own RNN op per member),
  vmap   vmap(functional_call) over torch.func.stack_module_state of the same models.
Small CPU sizes by default. What to expect from the numbers: with vmapped weights the batching
rule of fusedrnn::layer loops over the members itself (fusedrnn/ops.py; members' weights cannot
share one kernel call), so vmap is at best as fast as the loop, and on CPU slower: under vmap the
default backend runs the op's PyTorch step loop (torch's RNN op has no batching rule), while the
plain loop runs torch's fused C++ op. vmap buys a functional, stackable ensemble (one call, one
set of stacked parameters, composable with grad), not speed.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.func import functional_call, stack_module_state, vmap

import fusedrnn

MODES = {"LSTM": fusedrnn.LSTM, "GRU": fusedrnn.GRU}


def timed(fn, repeat):
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(mode, members, args):
    torch.manual_seed(0)
    models = [MODES[mode](args.input, args.hidden, backend=args.backend) for _ in range(members)]
    params, buffers = stack_module_state(models)
    x = torch.randn(args.steps, args.batch, args.input)
    base = models[0]

    def ensemble(p, b, x):
        return functional_call(base, (p, b), (x,))[0]

    def loop_fwd():
        with torch.no_grad():
            return torch.stack([m(x)[0] for m in models])

    def vmap_fwd():
        with torch.no_grad():
            return vmap(ensemble, in_dims=(0, 0, None))(params, buffers, x)

    def loop_train():
        loss = sum(m(x)[0].square().mean() for m in models)
        torch.autograd.grad(loss, [p for m in models for p in m.parameters()])

    leaves = {k: v.detach().requires_grad_() for k, v in params.items()}

    def vmap_train():
        loss = vmap(ensemble, in_dims=(0, 0, None))(leaves, buffers, x).square().mean((1, 2, 3)).sum()
        torch.autograd.grad(loss, list(leaves.values()))

    torch.testing.assert_close(vmap_fwd(), loop_fwd(), rtol=1e-4, atol=1e-5)
    rows = []
    for name, loop_fn, vmap_fn in (("forward", loop_fwd, vmap_fwd), ("fwd+bwd", loop_train, vmap_train)):
        t_loop, t_vmap = timed(loop_fn, args.repeat), timed(vmap_fn, args.repeat)
        rows.append((mode, members, name, t_loop * 1e3, t_vmap * 1e3, t_loop / t_vmap))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--members", type=int, nargs="+", default=[4, 16])
    p.add_argument("--modes", nargs="+", default=sorted(MODES), choices=sorted(MODES))
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--input", type=int, default=32)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--backend", default="auto")
    args = p.parse_args(argv)
    print(f"ensemble of {args.modes} T={args.steps} B={args.batch} I={args.input} H={args.hidden}, "
          f"backend={args.backend}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'mode':<5} {'N':>3} {'pass':<8} {'loop ms':>9} {'vmap ms':>9} {'loop/vmap':>9}")
    for mode in args.modes:
        for n in args.members:
            for row in bench(mode, n, args):
                print("{:<5} {:>3} {:<8} {:>9.2f} {:>9.2f} {:>9.2f}".format(*row))


if __name__ == "__main__":
    main()
