"""The fusedrnn::layer custom op: with its PyTorch step loop (kernel "loop", what runs under
torch.compile on CPU), parity with the float64 reference over the option matrix; for every kernel
(loop, and the Triton stepwise / persistent kernels through the interpreter), the op's registration
(opcheck: schema, fake tensors, autograd); inference saving nothing."""
from __future__ import annotations

import itertools

import pytest
import torch

from conftest import assert_close_rel
from fusedrnn.spec import GATES, MODES
from fusedrnn.functional import run_layers


def make_case(mode, *, proj=0, D=1, L=1, bias=True, lengths=None, T=4, B=3, I=3, H=5,
              dtype=torch.float64):
    G = GATES[mode]
    P = proj or H
    weights = []
    for layer in range(L):
        for _ in range(D):
            in_size = I if layer == 0 else D * P
            w = [torch.randn(G * H, in_size, dtype=dtype) * 0.5, torch.randn(G * H, P, dtype=dtype) * 0.5]
            w += [torch.randn(G * H, dtype=dtype) * 0.5, torch.randn(G * H, dtype=dtype) * 0.5] if bias else [None, None]
            w += [torch.randn(P, H, dtype=dtype) * 0.5 if proj else None]
            weights.append(tuple(t.requires_grad_() if t is not None else None for t in w))
    x = torch.randn(T, B, I, dtype=dtype)
    if lengths is not None:
        lengths = torch.tensor(lengths)
        x = x * (torch.arange(T)[:, None] < lengths)[:, :, None]
    x.requires_grad_()
    hx = (torch.randn(L * D, B, P, dtype=dtype, requires_grad=True),)
    if mode == "LSTM":
        hx += (torch.randn(L * D, B, H, dtype=dtype, requires_grad=True),)
    return x, lengths, hx, weights


def run_and_grad(route, mode, x, lengths, hx, weights, L, D):
    y, finals = run_layers(mode, x, lengths, hx, weights, num_layers=L, bidirectional=D == 2,
                           dropout=0.0, training=False, route=route)
    outs = (y,) + tuple(finals)
    torch.manual_seed(1)
    cots = [torch.randn(o.shape, dtype=torch.float64).to(o.dtype) for o in outs]
    leaves = [x, *hx] + [t for w in weights for t in w if t is not None]
    grads = torch.autograd.grad(outs, leaves, cots)
    return outs, grads


CASES = [
    dict(mode=m, proj=p, D=d, L=l, bias=b, lengths=ln)
    for m, p, d, l, b, ln in itertools.product(MODES, [0, 2], [1, 2], [1, 2], [True, False],
                                               [None, [4, 1, 3]])
    if not (p and m != "LSTM")
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_op_matches_reference_float64(case):
    x, lengths, hx, weights = make_case(**case)
    L, D = case["L"], case["D"]
    ref_outs, ref_grads = run_and_grad("reference", case["mode"], x, lengths, hx, weights, L, D)
    outs, grads = run_and_grad("loop", case["mode"], x, lengths, hx, weights, L, D)
    # float64 against float64: both are exact up to summation order (~1e-16 per op).
    assert_close_rel(outs, ref_outs, 1e-12, "outputs")
    assert_close_rel(grads, ref_grads, 1e-12, "grads")


@pytest.mark.parametrize("mode", MODES)
def test_op_float32_against_float64_reference(mode):
    x, lengths, hx, weights = make_case(mode, D=2, lengths=[4, 2, 3])
    ref_outs, ref_grads = run_and_grad("reference", mode, x, lengths, hx, weights, 1, 2)
    to32 = lambda t: None if t is None else t.detach().float().requires_grad_()  # noqa: E731
    x32, hx32 = to32(x), tuple(map(to32, hx))
    w32 = [tuple(map(to32, w)) for w in weights]
    outs, grads = run_and_grad("loop", mode, x32, lengths, hx32, w32, 1, 2)
    # float32 rounding (6e-8) amplified through a few dozen ops and T=4 steps stays below 1e-5.
    assert_close_rel([o.double() for o in outs], ref_outs, 1e-5, "outputs")
    assert_close_rel([g.double() for g in grads], ref_grads, 1e-5, "grads")


def _op_args(mode, proj=0, lengths=None, save=True, kernel="loop"):
    x, lengths, hx, weights = make_case(mode, proj=proj, D=2, lengths=lengths)
    st = lambda i: None if weights[0][i] is None else torch.stack([w[i] for w in weights]).detach().requires_grad_()  # noqa: E731
    c0 = hx[1].detach().requires_grad_() if mode == "LSTM" else None
    return (x, st(0), st(2), st(1), st(3), st(4), hx[0].detach().requires_grad_(), c0, lengths,
            mode, kernel, save, False)


OPCHECK_CASES = [("LSTM", 0, None), ("LSTM", 2, [4, 1, 3]), ("GRU", 0, [4, 1, 3]), ("RNN_RELU", 0, None)]


@pytest.mark.parametrize("kernel", ["loop", pytest.param("stepwise", marks=pytest.mark.triton),
                                    pytest.param("persistent", marks=pytest.mark.triton)])
@pytest.mark.parametrize("mode,proj,lengths", OPCHECK_CASES)
def test_opcheck(mode, proj, lengths, kernel, request):
    """Schema, fake (meta) implementation, autograd registration and dispatch all agree, for every
    implementation of the op (the Triton kernels on CUDA, else through the interpreter)."""
    device = "cpu" if kernel == "loop" else request.getfixturevalue("triton_device")
    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a
                 for a in _op_args(mode, proj, lengths, kernel=kernel))
    torch.library.opcheck(torch.ops.fusedrnn.layer.default, args)


@pytest.mark.parametrize("mode", MODES)
def test_inference_saves_no_workspace(mode):
    args = _op_args(mode)
    with torch.no_grad():
        y, hn, cn, hp, gates, cs = torch.ops.fusedrnn.layer(*args[:11], False, False)
    assert hp.numel() == gates.numel() == cs.numel() == 0
    assert torch.isfinite(y).all()


def test_backward_without_saved_workspace_raises():
    args = _op_args("GRU")
    y, *_ = torch.ops.fusedrnn.layer(*args[:11], False, False)
    with pytest.raises(RuntimeError, match="without saving activations"):
        y.sum().backward()
