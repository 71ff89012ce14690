"""fusedrnn under torch's program transforms: torch.func (grad, jacrev, jvp, functional_call, vmap,
per-sample gradients, ensembles), double backward, torch.export with dynamic sizes, TorchScript.

Each test runs on the default backend (CPU: torch's op, or the fusedrnn::layer op with the loop
kernel where torch's op cannot go) and on backend="triton" (the kernels, through the interpreter
on CPU: tiny shapes). Expected values come from backend="reference" (plain PyTorch and autograd)
or from plain loops, in float64.
"""
from __future__ import annotations

import io

import pytest
import torch
from torch.func import functional_call, grad, jacrev, jvp, stack_module_state, vmap

import fusedrnn
import fusedrnn.ops
from conftest import assert_close_rel as _assert_close_rel

F64 = torch.float64
TOL = 1e-9


@pytest.fixture(params=["auto", "triton"])
def backend(request):
    if request.param == "triton":
        request.getfixturevalue("triton_device")
    return request.param


def twins(cls, backend, *args, **kwargs):
    """(module on `backend`, the same module on backend='reference'), float64, same weights."""
    ref = cls(*args, backend="reference", **kwargs).to(F64)
    mod = cls(*args, backend=backend, **kwargs).to(F64)
    mod.load_state_dict(ref.state_dict())
    return mod, ref


def assert_close_rel(actual, expected, tol, name):
    """conftest's check, also for dicts of tensors (gradients by parameter name)."""
    if isinstance(expected, dict):
        assert sorted(actual) == sorted(expected), name
        actual, expected = [actual[k] for k in sorted(expected)], [expected[k] for k in sorted(expected)]
    _assert_close_rel(actual, expected, tol, name)


def params(module):
    return {k: v.detach() for k, v in module.named_parameters()}


def loss_fn(module):
    def loss(p, x):
        out = functional_call(module, p, (x,))
        out = out[0] if isinstance(out, tuple) else out
        return (out ** 2).sum()
    return loss


# ----------------------------------------------------------------------------------- torch.func
def test_grad_and_jacrev(backend):
    mod, ref = twins(fusedrnn.LSTM, backend, 2, 3, bidirectional=True)
    x = torch.randn(3, 2, 2, dtype=F64)
    assert_close_rel(grad(loss_fn(mod))(params(mod), x), grad(loss_fn(ref))(params(ref), x), TOL,
                     "grad")
    # of h_n (12 elements: jacrev vmaps the backward over them)
    jac = jacrev(lambda x: functional_call(mod, params(mod), (x,))[1][0])(x)
    jac_ref = jacrev(lambda x: functional_call(ref, params(ref), (x,))[1][0])(x)
    assert_close_rel(jac, jac_ref, TOL, "jacrev")


def test_jvp(backend):
    mod, ref = twins(fusedrnn.GRU, backend, 2, 3)
    x, t = torch.randn(3, 2, 2, dtype=F64), torch.randn(3, 2, 2, dtype=F64)
    out = jvp(lambda x: mod(x)[0], (x,), (t,))
    assert_close_rel(out, jvp(lambda x: ref(x)[0], (x,), (t,)), TOL, "jvp")


def test_vmap_folds_unbatched_inputs_into_the_batch(backend, monkeypatch):
    """vmap over unbatched sequences (and cell inputs) equals a loop, and runs one op call per
    layer over the whole vmapped batch (the fallback loop of the batching rule is not taken)."""
    def no_loop(*args):
        raise AssertionError("input-only vmap took the loop fallback")
    monkeypatch.setattr(fusedrnn.ops, "_loop_rule", no_loop)
    layer, _ = twins(fusedrnn.LSTM, backend, 2, 3)
    cell, _ = twins(fusedrnn.GRUCell, backend, 2, 3)
    xs = torch.randn(4, 3, 2, dtype=F64)  # 4 unbatched sequences of T=3
    y = vmap(lambda x: layer(x)[0])(xs)
    assert layer.last_backend == ("triton" if backend == "triton" else "loop")
    assert_close_rel(y, torch.stack([layer(x)[0] for x in xs]), TOL, "layer")
    h = vmap(cell)(xs[:, 0])
    assert_close_rel(h, torch.stack([cell(x) for x in xs[:, 0]]), TOL, "cell")


def test_vmap_ensemble(backend):
    models = [fusedrnn.GRU(2, 3, backend=backend).to(F64) for _ in range(2)]
    p, b = stack_module_state(models)
    x = torch.randn(2, 2, 2, dtype=F64)
    y = vmap(lambda p, b, x: functional_call(models[0], (p, b), (x,))[0], in_dims=(0, 0, None))(p, b, x)
    assert_close_rel(y, torch.stack([m(x)[0] for m in models]), TOL, "ensemble")
    # Training the stacked parameters with plain autograd (vmap inside, .backward outside).
    leaves = {k: v.detach().requires_grad_() for k, v in p.items()}
    y = vmap(lambda p, b, x: functional_call(models[0], (p, b), (x,))[0], in_dims=(0, 0, None))(leaves, b, x)
    grads = torch.autograd.grad(y.square().sum(), list(leaves.values()))
    loop = [torch.autograd.grad(m(x)[0].square().sum(), [dict(m.named_parameters())[k] for k in leaves])
            for m in models]
    assert_close_rel(grads, [torch.stack([g[i] for g in loop]) for i in range(len(leaves))], TOL,
                     "ensemble gradients")


def test_per_sample_gradients_equal_a_loop(backend):
    """vmap(grad(...)) as DP-SGD computes it: one gradient per sample, equal to the gradient of
    each sample alone, and to the reference backend's."""
    mod, ref = twins(fusedrnn.LSTM, backend, 2, 3, proj_size=2)
    xs = torch.randn(3, 2, 2, dtype=F64)  # 3 samples, each an unbatched sequence of T=2
    per_sample = vmap(grad(loss_fn(mod)), in_dims=(None, 0))(params(mod), xs)
    loop = [grad(loss_fn(mod))(params(mod), x) for x in xs]
    expected = {k: torch.stack([g[k] for g in loop]) for k in per_sample}
    assert_close_rel(per_sample, expected, TOL, "per-sample vs loop")
    assert_close_rel(per_sample, vmap(grad(loss_fn(ref)), in_dims=(None, 0))(params(ref), xs), TOL,
                     "per-sample vs reference")


# ------------------------------------------------------------------------------ double backward
def test_gradient_penalty(backend):
    """A gradient penalty through an LSTM (double backward) equals the reference backend's."""
    mod, ref = twins(fusedrnn.LSTM, backend, 2, 3, batch_first=True)
    x = torch.randn(2, 3, 2, dtype=F64)

    def penalty_grads(m):
        xx = x.clone().requires_grad_()
        g, = torch.autograd.grad(m(xx)[0].pow(2).sum(), xx, create_graph=True)
        return torch.autograd.grad(g.pow(2).sum(), list(m.parameters()))

    assert_close_rel(penalty_grads(mod), penalty_grads(ref), TOL, "penalty")
    p = params(mod)
    x0 = x[0]
    gg = grad(lambda x: grad(loss_fn(mod), argnums=1)(p, x).pow(2).sum())(x0)
    gg_ref = grad(lambda x: grad(loss_fn(ref), argnums=1)(params(ref), x).pow(2).sum())(x0)
    assert_close_rel(gg, gg_ref, TOL, "grad of grad")


@pytest.mark.parametrize("mode,kernel", [("LSTM", "stepwise"), ("GRU", "persistent")])
def test_gradgradcheck_through_the_op(mode, kernel, triton_device):
    """gradgradcheck in float64 of fusedrnn::layer with a Triton kernel (first order by the
    backward kernel, second order by the reference recomputation) and with the loop kernel. One
    Triton kernel per mode: each costs ~10 s through the interpreter."""
    G = {"LSTM": 4, "GRU": 3}[mode]
    I, H, T, B = 2, 2, 2, 1
    w_ih = torch.randn(1, G * H, I, dtype=F64)
    b_ih, b_hh = torch.randn(1, G * H, dtype=F64), torch.randn(1, G * H, dtype=F64)
    x = torch.randn(T, B, I, dtype=F64, requires_grad=True)
    h0 = torch.randn(1, B, H, dtype=F64, requires_grad=True)
    w_hh = torch.randn(1, G * H, H, dtype=F64, requires_grad=True)
    c0 = torch.randn(1, B, H, dtype=F64) if mode == "LSTM" else None
    for kernel in ("loop", kernel):
        def f(x, h0, w_hh):
            y, hn, cn, *_ = torch.ops.fusedrnn.layer(x, w_ih, b_ih, w_hh, b_hh, None, h0, c0, None,
                                                     mode, kernel, True, False)
            return y, hn
        # fast_mode (random projections of the Jacobians): the interpreter costs ~0.05 s a launch
        assert torch.autograd.gradgradcheck(f, (x, h0, w_hh), fast_mode=kernel != "loop"), kernel


# --------------------------------------------------------------------------------- torch.export
def test_export_dynamic_batch_and_length(backend):
    mod = fusedrnn.LSTM(2, 3, num_layers=2, backend=backend).eval()
    x = torch.randn(3, 2, 2)
    dims = {"input": {0: torch.export.Dim("T", min=2, max=64), 1: torch.export.Dim("B", min=2, max=64)}}
    ep = torch.export.export(mod, (x,), dynamic_shapes=dims)
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "fusedrnn.layer.default" in targets
    x2 = torch.randn(5, 4, 2)
    with torch.no_grad():
        assert_close_rel(ep.module()(x2), mod(x2), 1e-5, "exported")


# ---------------------------------------------------------------------------------- TorchScript
class _Model(torch.nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.rnn = fusedrnn.LSTM(2, 3, bidirectional=True, batch_first=True, backend=backend)
        self.cell = fusedrnn.GRUCell(6, 3, backend=backend)

    def forward(self, x):
        y, _ = self.rnn(x)
        return self.cell(y[:, -1])


def test_jit_script(backend):
    model = _Model(backend)
    x = torch.randn(2, 3, 2)
    expected = model(x)
    scripted = torch.jit.script(model)
    assert_close_rel(scripted(x), expected, 1e-5, "scripted")
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    buf.seek(0)
    assert_close_rel(torch.jit.load(buf)(x), expected, 1e-5, "saved and loaded")
    # The eager model still runs fusedrnn on its backend, with the same Parameters.
    assert_close_rel(model(x), expected, 0.0, "eager after scripting")
    assert model.rnn.backend == backend and model.rnn.last_backend is not None
    with torch.no_grad():
        model.rnn.weight_hh_l0.add_(0.5)
    assert_close_rel(scripted(x), model(x), 1e-5, "shared parameters")
    # A fusedrnn module scripted on its own works too.
    cell = fusedrnn.LSTMCell(2, 3, backend=backend)
    h = torch.randn(4, 3)
    assert_close_rel(torch.jit.script(cell)(x[:, 0].repeat(2, 1), (h, h)),
                     cell(x[:, 0].repeat(2, 1), (h, h)), 1e-5, "cell")


def test_jit_trace(backend):
    model = _Model(backend)
    x = torch.randn(2, 3, 2)
    traced = torch.jit.trace(model, (x,))
    assert "aten::lstm" in str(traced.rnn.graph)
    x2 = torch.randn(2, 3, 2)
    assert_close_rel(traced(x2), model(x2), 1e-5, "traced")
    assert model.rnn.last_backend == ("triton" if backend == "triton" else "torch")
