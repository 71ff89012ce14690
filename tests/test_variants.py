"""Issue 12's variants of the plain layers and cells: zoneout, weight_drop (DropConnect on W_hh) and
the per-step state reset. Every route against fusedrnn/reference.py (the oracle), the reference
against the definitions written out independently (episodes run separately, the eval expectation,
the training mask's two choices, AWD-LSTM's dropped weights through torch.nn), reproducibility
under a seed, the defaults bit-identical to torch.nn, gradcheck, and the argument errors.
Triton kernels run through the interpreter at tiny sizes (H = 5, B = 3, T = 5: no tile multiple)."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fusedrnn
from conftest import assert_close_rel, rel_err
from fusedrnn import reference
from fusedrnn.errors import BackendUnavailableError, DtypeMismatchError, InputShapeError
from fusedrnn.functional import zoneout_mask

MODES = ("LSTM", "GRU", "RNN_TANH", "RNN_RELU")
T, B, I, H = 5, 3, 3, 5
LENGTHS = [5, 2, 4]  # unsorted, one row ends early


def make(mode, *, D=1, L=1, zoneout=0.0, weight_drop=0.0, dropout=0.0, dtype=torch.float64,
         backend="auto", kernel="auto", batch_first=False, seed=123):
    torch.manual_seed(seed)
    kw = dict(num_layers=L, bidirectional=D == 2, zoneout=zoneout, weight_drop=weight_drop,
              dropout=dropout, backend=backend, batch_first=batch_first)
    if mode == "LSTM":
        m = fusedrnn.LSTM(I, H, **kw)
    elif mode == "GRU":
        m = fusedrnn.GRU(I, H, **kw)
    else:
        m = fusedrnn.RNN(I, H, nonlinearity="tanh" if mode == "RNN_TANH" else "relu", **kw)
    if kernel != "auto":
        m.kernel = kernel
    return m.to(dtype)


def inputs(mode, module, dtype=torch.float64, seed=5):
    g = torch.Generator().manual_seed(seed)
    D = 2 if module.bidirectional else 1
    n = module.num_layers * D
    x = torch.randn(T, B, I, generator=g, dtype=torch.float64).to(dtype)
    hx = [torch.randn(n, B, H, generator=g, dtype=torch.float64).to(dtype) * 0.5]
    if mode == "LSTM":
        hx.append(torch.randn(n, B, H, generator=g, dtype=torch.float64).to(dtype) * 0.5)
    reset = torch.rand(T, B, generator=g) < 0.35
    reset[2, 0] = reset[3, 0] = True  # two restarts in a row
    reset[0, 1] = True                # a restart at the first step (no effect)
    reset[3, 1] = True                # past row 1's packed length 2 (ignored)
    return x, hx, reset


def run(module, x, hx, reset=None, lengths=None, seed=7, device="cpu"):
    """Outputs and every gradient (input, states, parameters) of one forward + backward, with the
    module's random draws seeded."""
    params = [p for p in module.parameters()]
    x = x.detach().to(device).requires_grad_()
    hx = [h.detach().to(device).requires_grad_() for h in hx]
    state = tuple(hx) if len(hx) == 2 else hx[0]
    inp = x if lengths is None else pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False)
    torch.manual_seed(seed)
    out, fin = module(inp, state, reset=None if reset is None else reset.to(device))
    if lengths is not None:
        out = pad_packed_sequence(out, total_length=T)[0]
    outs = [out] + (list(fin) if isinstance(fin, tuple) else [fin])
    g = torch.Generator().manual_seed(11)
    cots = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype).to(device) for o in outs]
    grads = torch.autograd.grad(outs, [x, *hx, *params], cots, allow_unused=True)
    return [o.detach().cpu() for o in outs], [None if gr is None else gr.cpu() for gr in grads]


VARIANTS = {
    # name: (module keyword arguments, training, reset given)
    "zoneout": (dict(zoneout=0.4), True, False),
    "zoneout_eval": (dict(zoneout=0.4), False, False),
    "reset": (dict(), True, True),
    "all": (dict(zoneout=0.3, weight_drop=0.3), True, True),
}


def compare(mode, variant, D, L, packed, route_kw, dtype=torch.float64, device="cpu"):
    kw, training, with_reset = VARIANTS[variant]
    ref = make(mode, D=D, L=L, backend="reference", **kw)
    other = make(mode, D=D, L=L, dtype=dtype, **kw, **route_kw).to(device)
    ref.train(training)
    other.train(training)
    x, hx, reset = inputs(mode, ref)
    lengths = LENGTHS if packed else None
    r = reset if with_reset else None
    want = run(ref, x, hx, r, lengths)
    got = run(other, x.to(dtype), [h.to(dtype) for h in hx], r, lengths, device=device)
    return want, got, other


# ------------------------------------------------------------------------------ loop (CPU default)
@pytest.mark.parametrize("mode,variant,DL,packed", list(itertools.product(
    MODES, VARIANTS, [(1, 1), (2, 2)], [False, True])))
def test_cpu_default_matches_reference_float64(mode, variant, DL, packed):
    D, L = DL
    want, got, module = compare(mode, variant, D, L, packed, {})
    # zoneout / reset: fusedrnn's own loop; weight_drop alone would stay on torch's op
    assert module.last_backend == "loop"
    assert_close_rel(got[0], want[0], 1e-12, "outputs")
    assert_close_rel(got[1], want[1], 1e-12, "grads")


@pytest.mark.parametrize("mode", MODES)
def test_cpu_default_float32_against_float64_reference(mode):
    want, got, _ = compare(mode, "all", 2, 2, True, {}, dtype=torch.float32)
    assert_close_rel([o.double() for o in got[0]], want[0], 1e-5, "outputs")
    assert_close_rel([g.double() for g in got[1]], want[1], 1e-5, "grads")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_default_half_no_worse_than_reference_in_same_dtype(dtype):
    exact, got, _ = compare("LSTM", "all", 2, 1, False, {}, dtype=dtype)
    _, ref_same, _ = compare("LSTM", "all", 2, 1, False, {"backend": "reference"}, dtype=dtype)
    _no_worse(got, ref_same, exact)


def _no_worse(got, ref_same, exact):
    """got's error against the float64 result is no worse than the reference's in the same dtype:
    in total over outputs and gradients, and within 2x for each tensor (on 15-element tensors one
    rounding more or less moves the relative error of either by ~2^-9)."""
    mine = [rel_err(a, e) for a, e in zip(got[0] + got[1], exact[0] + exact[1]) if e is not None]
    theirs = [rel_err(r, e) for r, e in zip(ref_same[0] + ref_same[1], exact[0] + exact[1]) if e is not None]
    assert sum(mine) <= sum(theirs), (mine, theirs)
    for i, (a, r) in enumerate(zip(mine, theirs)):
        assert a <= 2 * r + 1e-6, (i, a, r)


# ------------------------------------------------------------ the definitions, written out again
@pytest.mark.parametrize("mode,backend,D", [(m, b, d) for m in MODES for b in ("reference", "auto")
                                            for d in (1, 2)])
def test_reset_equals_running_the_episodes_separately(mode, backend, D):
    m = make(mode, D=D, L=2, backend=backend)
    x, hx, _ = inputs(mode, m)
    starts = {0: [0, 2, 3], 1: [0], 2: [0, 4]}  # row -> episode starts
    reset = torch.zeros(T, B, dtype=torch.bool)
    for b, st in starts.items():
        reset[st, b] = True
    x = x.requires_grad_()
    hx = [h.requires_grad_() for h in hx]
    state = tuple(hx) if mode == "LSTM" else hx[0]
    y, fin = m(x, state, reset=reset)
    fin = fin if mode == "LSTM" else (fin,)
    loss = (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum() + sum(f.sum() for f in fin)
    gx, *gh = torch.autograd.grad(loss, [x, *hx])
    for b, st in starts.items():
        bounds = st + [T]
        gx_b, gh_b = torch.zeros_like(x[:, b]), [torch.zeros_like(h[:, b]) for h in hx]
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            xe = x.detach()[lo:hi, b:b + 1].clone().requires_grad_()
            he = [h.detach()[:, b:b + 1].clone().requires_grad_() for h in hx]
            ye, fe = m(xe, tuple(he) if mode == "LSTM" else he[0])
            fe = fe if mode == "LSTM" else (fe,)
            assert_close_rel(y[lo:hi, b:b + 1], ye, 1e-12, f"row {b} episode {lo}:{hi}")
            w = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)[lo:hi, b:b + 1]
            # the final state of a forward direction is the last episode's, of a reverse one
            # (which ends at t = 0) the first episode's
            ends = (torch.arange(fe[0].shape[0]) % D == 1) if D == 2 else torch.zeros(fe[0].shape[0], dtype=torch.bool)
            own = (ends & (lo == 0)) | (~ends & (hi == T))
            loss_e = (ye * w).sum() + sum(f[own].sum() for f in fe)
            for f_all, f_e in zip(fin, fe):
                if bool(own.any()):
                    assert_close_rel(f_all[own, b:b + 1], f_e[own], 1e-12, f"row {b} final state")
            g = torch.autograd.grad(loss_e, [xe, *he], allow_unused=True)
            gx_b[lo:hi] += g[0][:, 0]
            for acc, gi in zip(gh_b, g[1:]):
                if gi is not None:
                    acc += gi[:, 0]
        assert_close_rel(gx[:, b], gx_b, 1e-12, f"row {b} input grad")
        # h0 / c0 collect the gradient of every episode
        for i, (g_all, g_e) in enumerate(zip(gh, gh_b)):
            assert_close_rel(g_all[:, b], g_e, 1e-12, f"row {b} state {i} grad")


@pytest.mark.parametrize("mode,backend", [(m, b) for m in MODES for b in ("reference", "auto")])
def test_zoneout_eval_is_the_expectation_and_training_picks_one_of_two(mode, backend):
    p = 0.4
    m = make(mode, zoneout=p, backend=backend)
    cell = {"LSTM": nn.LSTMCell, "GRU": nn.GRUCell}.get(mode)
    cell = cell(I, H) if cell else nn.RNNCell(I, H, nonlinearity="tanh" if mode == "RNN_TANH" else "relu")
    cell = cell.double()
    for a, b in (("weight_ih", "weight_ih_l0"), ("weight_hh", "weight_hh_l0"), ("bias_ih", "bias_ih_l0"),
                 ("bias_hh", "bias_hh_l0")):
        getattr(cell, a).data.copy_(getattr(m, b).data)
    x, hx, _ = inputs(mode, m)
    state = tuple(h[0] for h in hx)

    def step(x_t, st):
        out = cell(x_t, st if mode == "LSTM" else st[0])
        return out if mode == "LSTM" else (out,)

    with torch.no_grad():
        m.eval()
        y, _ = m(x, tuple(hx) if mode == "LSTM" else hx[0])
        st = state
        for t in range(T):
            new = step(x[t], st)
            st = (p * st[0] + (1 - p) * new[0],) + tuple(new[1:])
            assert_close_rel(y[t], st[0], 1e-12, f"eval step {t}")
        m.train()
        y, _ = m(x.repeat(1, 40, 1), tuple(h.repeat(1, 40, 1) for h in hx) if mode == "LSTM"
                 else hx[0].repeat(1, 40, 1))
        kept = 0
        prev = state[0].repeat(40, 1)
        c = state[1].repeat(40, 1) if mode == "LSTM" else None
        for t in range(T):
            new = step(x[t].repeat(40, 1), (prev, c) if mode == "LSTM" else (prev,))
            keep = (y[t] == prev)
            took = (y[t] - new[0]).abs() < 1e-12
            assert bool((keep | took).all()), f"step {t}: an element is neither h_prev nor the new h"
            kept += int((keep & ~took).sum())
            prev, c = y[t], (new[1] if mode == "LSTM" else None)
        frac = kept / (T * 40 * B * H)
        assert 0.3 < frac < 0.5, f"fraction kept {frac:.3f} for p = {p}"


def test_weight_drop_is_awd_dropconnect_through_torch_nn():
    """weight_drop equals torch.nn.LSTM run on F.dropout(W_hh) (one mask per W_hh per call, drawn
    first), and the gradients reach the raw weights through the mask."""
    p = 0.5
    m = make("LSTM", D=2, L=2, weight_drop=p)
    t = nn.LSTM(I, H, num_layers=2, bidirectional=True).double()
    t.load_state_dict(m.state_dict())
    x, hx, _ = inputs("LSTM", m)
    torch.manual_seed(3)
    y, (hn, cn) = m(x, tuple(hx))
    assert m.last_backend == "torch"  # weight_drop alone keeps torch's op
    loss = y.sum() + hn.sum() + cn.sum()
    loss.backward()
    torch.manual_seed(3)
    names = [n for n in t._flat_weights_names]
    dropped = {n: F.dropout(getattr(t, n), p, training=True) for n in names if n.startswith("weight_hh")}
    flat = [dropped.get(n, getattr(t, n)) for n in names]
    y2, hn2, cn2 = torch._VF.lstm(x, tuple(hx), flat, True, 2, 0.0, True, True, False)
    (y2.sum() + hn2.sum() + cn2.sum()).backward()
    assert torch.equal(y, y2)
    for n in names:
        assert torch.allclose(getattr(m, n).grad, getattr(t, n).grad, rtol=1e-12, atol=1e-14), n
    g = m.weight_hh_l0.grad
    assert bool((g == 0).any()) and bool((g != 0).any())  # dropped weights get no gradient
    # eval: no mask at all, torch.nn exactly
    m.eval()
    t.eval()
    with torch.no_grad():
        assert torch.equal(m(x, tuple(hx))[0], t(x, tuple(hx))[0])


@pytest.mark.parametrize("cls", [fusedrnn.LSTM, fusedrnn.GRU, fusedrnn.RNN])
def test_defaults_are_bit_identical_to_torch_nn(cls):
    m = cls(I, H, num_layers=2, bidirectional=True).double()
    t = {fusedrnn.LSTM: nn.LSTM, fusedrnn.GRU: nn.GRU, fusedrnn.RNN: nn.RNN}[cls](
        I, H, num_layers=2, bidirectional=True).double()
    t.load_state_dict(m.state_dict())
    x = torch.randn(T, B, I, dtype=torch.float64)
    for module in (m, cls(I, H, num_layers=2, bidirectional=True, zoneout=0.0, weight_drop=0.3).double()):
        module.load_state_dict(t.state_dict())
        module.eval()
        t.eval()
        ya, ha = module(x, reset=None)
        yb, hb = t(x)
        assert module.last_backend == "torch"
        assert torch.equal(ya, yb)


def test_fixed_seed_gives_bitwise_identical_masks_and_results():
    torch.manual_seed(9)
    a = zoneout_mask(0.3, (2, T, B, H), torch.device("cpu"))
    torch.manual_seed(9)
    b = zoneout_mask(0.3, (2, T, B, H), torch.device("cpu"))
    assert torch.equal(a, b) and 0 < int(a.sum()) < a.numel()
    for backend in ("auto", "reference"):
        m = make("GRU", D=2, L=2, zoneout=0.3, weight_drop=0.3, dropout=0.2, backend=backend)
        x, hx, reset = inputs("GRU", m)
        first = run(m, x, hx, reset, seed=4)
        second = run(m, x, hx, reset, seed=4)
        other = run(m, x, hx, reset, seed=5)
        for u, v in zip(first[0] + first[1], second[0] + second[1]):
            assert torch.equal(u, v)
        assert not torch.equal(first[0][0], other[0][0])


# ----------------------------------------------------------------------------------------- cells
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("training", [True, False])
def test_cells_match_the_reference(mode, training):
    kw = dict(zoneout=0.4, weight_drop=0.3)
    if mode == "LSTM":
        cell = fusedrnn.LSTMCell(I, H, **kw)
    elif mode == "GRU":
        cell = fusedrnn.GRUCell(I, H, **kw)
    else:
        cell = fusedrnn.RNNCell(I, H, nonlinearity="tanh" if mode == "RNN_TANH" else "relu", **kw)
    cell = cell.double().train(training)
    x = torch.randn(B, I, dtype=torch.float64)
    st = tuple(torch.randn(B, H, dtype=torch.float64) for _ in range(2 if mode == "LSTM" else 1))
    reset = torch.tensor([True, False, True])
    torch.manual_seed(2)
    out = cell(x, st if mode == "LSTM" else st[0], reset=reset)
    out = out if mode == "LSTM" else (out,)
    # the same draws in the same order: W_hh's mask, then zoneout's
    torch.manual_seed(2)
    w_hh = F.dropout(cell.weight_hh, 0.3) if training else cell.weight_hh
    z = zoneout_mask(0.4, (B, H), x.device) if training else 0.4
    want = reference.cell_variants(mode, x, st, (cell.weight_ih, w_hh, cell.bias_ih, cell.bias_hh, None),
                                   zoneout=z, reset=reset)
    assert_close_rel(out, want, 1e-12, "cell outputs")
    # reset rows equal a call with the zero state
    zero = tuple(torch.zeros_like(s) for s in st)
    cell.eval()
    r1 = cell(x, st if mode == "LSTM" else st[0], reset=reset)
    r0 = cell(x, zero if mode == "LSTM" else zero[0])
    r1, r0 = (r1, r0) if mode == "LSTM" else ((r1,), (r0,))
    for a, b in zip(r1, r0):
        assert torch.equal(a[reset], b[reset])
    # unbatched: a scalar reset
    u = cell(x[0], tuple(s[0] for s in st) if mode == "LSTM" else st[0][0], reset=torch.tensor(True))
    u0 = cell(x[0])
    assert torch.equal(u[0] if mode == "LSTM" else u, u0[0] if mode == "LSTM" else u0)


# -------------------------------------------------------------------------------------- gradcheck
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_gradcheck_float64(mode, backend):
    m = make(mode, D=2, zoneout=0.3, weight_drop=0.3, backend=backend)
    if mode == "RNN_RELU":
        with torch.no_grad():
            m.bias_ih_l0.add_(2.0)  # keep pre-activations away from relu's kink
            m.bias_ih_l0_reverse.add_(2.0)
    x, hx, reset = inputs(mode, m)
    names = [n for n, _ in m.named_parameters()]

    def f(x, *rest):
        hs, ps = rest[:len(hx)], rest[len(hx):]
        torch.manual_seed(1)  # the same masks at every evaluation
        out, fin = torch.func.functional_call(m, dict(zip(names, ps)), (x, tuple(hs) if mode == "LSTM"
                                                                        else hs[0]), {"reset": reset})
        return (out,) + (fin if isinstance(fin, tuple) else (fin,))

    args = [x.requires_grad_()] + [h.requires_grad_() for h in hx] + [p.detach().requires_grad_()
                                                                      for p in m.parameters()]
    assert torch.autograd.gradcheck(f, args, atol=1e-7, fast_mode=True)


# ----------------------------------------------------------------------------------------- errors
def test_bad_arguments_raise_clear_errors():
    for name in ("zoneout", "weight_drop"):
        for bad in (-0.1, 1.0, 1.5, True, "0.1"):
            with pytest.raises(ValueError, match=f"{name} must be a probability in \\[0, 1\\), got"):
                fusedrnn.GRU(I, H, **{name: bad})
            with pytest.raises(ValueError, match=name):
                fusedrnn.LSTMCell(I, H, **{name: bad})
    with pytest.raises(ValueError, match="zoneout=0.2 cannot be combined with proj_size=2"):
        fusedrnn.LSTM(I, H, proj_size=2, zoneout=0.2)
    with pytest.raises(BackendUnavailableError, match="zoneout=0.2 needs fusedrnn's own scan"):
        fusedrnn.LSTM(I, H, zoneout=0.2, backend="torch")
    m = fusedrnn.GRU(I, H, backend="torch")
    x = torch.randn(T, B, I)
    with pytest.raises(BackendUnavailableError, match="reset needs fusedrnn's own scan"):
        m(x, reset=torch.zeros(T, B, dtype=torch.bool))
    m = fusedrnn.GRU(I, H)
    with pytest.raises(InputShapeError, match=r"reset must have shape \(5, 3\) \(time, batch\), got \(3, 5\)"):
        m(x, reset=torch.zeros(B, T, dtype=torch.bool))
    with pytest.raises(DtypeMismatchError, match="reset must have dtype torch.bool, got torch.int64"):
        m(x, reset=torch.zeros(T, B, dtype=torch.long))
    with pytest.raises(InputShapeError, match="reset must be on the same device as input"):
        m(x, reset=torch.zeros(T, B, dtype=torch.bool, device="meta"))
    with pytest.raises(InputShapeError, match="reset must be a bool Tensor"):
        m(x, reset=[[True]])
    mb = fusedrnn.GRU(I, H, batch_first=True)
    with pytest.raises(InputShapeError, match=r"\(3, 5\) \(batch, time: batch_first\)"):
        mb(x.transpose(0, 1), reset=torch.zeros(T, B, dtype=torch.bool))
    with pytest.raises(InputShapeError, match=r"reset must have shape \(5,\)"):
        m(x[:, 0], reset=torch.zeros(T, B, dtype=torch.bool))
    cell = fusedrnn.GRUCell(I, H)
    with pytest.raises(InputShapeError, match=r"reset must have shape \(3,\)"):
        cell(torch.randn(B, I), reset=torch.zeros(T, dtype=torch.bool))


def test_environment_backend_torch_refuses_variants(monkeypatch):
    monkeypatch.setenv("FUSEDRNN_BACKEND", "torch")
    m = fusedrnn.LSTM(I, H, zoneout=0.1)
    with pytest.raises(BackendUnavailableError, match="zoneout=0.1"):
        m(torch.randn(T, B, I))


def test_reset_with_projection_matches_reference():
    """reset on an LSTM with proj_size (zoneout is refused there): the CPU default."""
    _check_projection_reset({})


def _check_projection_reset(route_kw, device="cpu"):
    torch.manual_seed(123)
    ref = fusedrnn.LSTM(I, H, num_layers=2, bidirectional=True, proj_size=2, backend="reference",
                        weight_drop=0.2).double()
    other = fusedrnn.LSTM(I, H, num_layers=2, bidirectional=True, proj_size=2, weight_drop=0.2,
                          **route_kw).double()
    other.load_state_dict(ref.state_dict())
    other = other.to(device)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(T, B, I, generator=g, dtype=torch.float64)
    hx = [torch.randn(4, B, 2, generator=g, dtype=torch.float64), torch.randn(4, B, H, generator=g,
                                                                                dtype=torch.float64)]
    reset = torch.rand(T, B, generator=g) < 0.4
    for lengths in (None, LENGTHS):
        want = run(ref, x, hx, reset, lengths)
        got = run(other, x, hx, reset, lengths, device=device)
        assert_close_rel(got[0], want[0], 1e-12, "outputs")
        assert_close_rel(got[1], want[1], 1e-12, "grads")


# ------------------------------------------------- Triton kernels (interpreter on CPU, tiny sizes)
@pytest.fixture
def poisoned(triton_device):
    """Fresh kernel outputs NaN-filled, so an element a kernel fails to write shows up."""
    from fusedrnn import kernels
    kernels.set_poison(True)
    yield triton_device
    kernels.set_poison(False)


_SHAPES = [(1, 1, False), (2, 1, True), (1, 2, True), (2, 2, False)]
KERNEL_CASES = [(m, v, k, _SHAPES[n % 4]) for n, (m, v, k) in enumerate(itertools.product(
    MODES, ("zoneout", "reset", "all"), ("stepwise", "persistent")))]
KERNEL_CASES += [(m, "zoneout_eval", k, (2, 1, True)) for m, k in zip(MODES, ("stepwise", "persistent") * 2)]


@pytest.mark.triton
@pytest.mark.parametrize("mode,variant,kernel,shape", KERNEL_CASES,
                         ids=lambda v: "-".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_kernels_match_reference_float64(poisoned, mode, variant, kernel, shape):
    D, L, packed = shape
    want, got, module = compare(mode, variant, D, L, packed, {"backend": "triton", "kernel": kernel},
                                device=poisoned)
    assert module.last_kernels == [kernel] * L
    assert_close_rel(got[0], want[0], 1e-12, "outputs")
    assert_close_rel(got[1], want[1], 1e-12, "grads")


@pytest.mark.triton
@pytest.mark.parametrize("kernel", ["stepwise", "persistent"])
def test_kernels_reset_with_projection(poisoned, kernel):
    _check_projection_reset({"backend": "triton", "kernel": kernel}, device=poisoned)


@pytest.mark.triton
@pytest.mark.parametrize("mode,kernel", [("LSTM", "stepwise"), ("GRU", "persistent"), ("RNN_TANH", "stepwise")])
def test_kernels_float32_against_float64_reference(poisoned, mode, kernel):
    want, got, _ = compare(mode, "all", 2, 1, True, {"backend": "triton", "kernel": kernel},
                           dtype=torch.float32, device=poisoned)
    assert_close_rel([o.double() for o in got[0]], want[0], 1e-5, "outputs")
    assert_close_rel([g.double() for g in got[1]], want[1], 1e-5, "grads")


@pytest.mark.triton
@pytest.mark.parametrize("dtype,mode,kernel", [(torch.bfloat16, "LSTM", "stepwise"), (torch.float16, "GRU", "persistent"),
                                               (torch.bfloat16, "GRU", "persistent"), (torch.float16, "LSTM", "stepwise")])
def test_kernels_half_no_worse_than_reference_in_same_dtype(poisoned, dtype, mode, kernel):
    exact, got, _ = compare(mode, "all", 1, 1, False, {"backend": "triton", "kernel": kernel}, dtype=dtype,
                            device=poisoned)
    _, ref_same, _ = compare(mode, "all", 1, 1, False, {"backend": "reference"}, dtype=dtype)
    _no_worse(got, ref_same, exact)


@pytest.mark.triton
def test_kernels_gradcheck_float64(poisoned):
    m = make("GRU", zoneout=0.3, weight_drop=0.3, backend="triton", kernel="stepwise")
    x, hx, reset = inputs("GRU", m)
    x, h0, reset = x[:3, :2], hx[0][:, :2], reset[:3, :2]
    names = [n for n, _ in m.named_parameters()]

    def f(x, h, *ps):
        torch.manual_seed(1)
        return torch.func.functional_call(m, dict(zip(names, ps)), (x, h), {"reset": reset})

    args = [x.requires_grad_(), h0.requires_grad_()] + [p.detach().requires_grad_() for p in m.parameters()]
    assert torch.autograd.gradcheck(f, args, atol=1e-7, fast_mode=True)


# ----------------------------------------------------------------------------------- torch.compile
def test_compile_fullgraph_keeps_one_op_per_layer():
    targets = []

    def backend(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    m = make("GRU", D=2, L=2, zoneout=0.3, weight_drop=0.2)
    x, hx, reset = inputs("GRU", m)
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True, backend=backend)
    y, h = compiled(x, hx[0], reset=reset)
    assert sum("fusedrnn.layer" in t for t in targets) == 2, targets
    assert y.shape == (T, B, 2 * H) and torch.isfinite(y).all()
    torch._dynamo.reset()
