"""fusedrnn.packed.run_packed against torch's own packed op and torch.nn's PackedSequence path.

Every case compares outputs, final states and the gradients of data, h0, c0 and every weight. The
segment plan is forced three ways: "auto" (the cost model), "merged" (one padded call over all of
T: every row but the longest ends inside it, LSTM uses the freeze column) and "split" (one call per
distinct batch size: only views, no padding).
"""
from __future__ import annotations

import pytest
import torch
from torch import _VF
from torch.nn.utils.rnn import pack_padded_sequence

from fusedrnn import packed
from fusedrnn.packed import run_packed

VF = {"LSTM": _VF.lstm, "GRU": _VF.gru, "RNN_TANH": _VF.rnn_tanh, "RNN_RELU": _VF.rnn_relu}
G = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
# "LSTMP" is LSTM with proj_size.
CASES = ("LSTM", "LSTMP", "GRU", "RNN_TANH", "RNN_RELU")
TIES = [9, 7, 7, 4, 2, 1, 1]
LENGTHS = {"ties": TIES, "equal": [5, 5, 5], "B1": [6], "T_to_1": [6, 5, 4, 3, 2, 1]}


@pytest.fixture(params=["auto", "merged", "split"])
def plan(request, monkeypatch):
    if request.param == "merged":       # calls so costly that one padded call over T wins
        monkeypatch.setattr(packed, "CALL_COST", 1e9)
    elif request.param == "split":      # calls free, merging costly: one call per batch size
        monkeypatch.setattr(packed, "CALL_COST", 0.0)
        monkeypatch.setattr(packed, "MERGE_COST", 1e9)
    return request.param


def make(case, lengths, D, L, dtype, I=3, H=5, bias=True, seed=0):
    """Weights, packed data (sorted rows), batch_sizes and hx for one case; all leaves need grad."""
    mode = "LSTM" if case == "LSTMP" else case
    P = 2 if case == "LSTMP" else H
    g = torch.Generator().manual_seed(seed)
    # Elman-ReLU blows up with unit-scale weights; keep everything moderate.
    scale = 0.4 if mode == "RNN_RELU" else 0.8

    def rnd(*shape):
        return (torch.randn(*shape, generator=g, dtype=dtype) * scale).requires_grad_()

    weights = []
    for layer in range(L):
        for _ in range(D):
            weights += [rnd(G[mode] * H, I if layer == 0 else D * P), rnd(G[mode] * H, P)]
            if bias:
                weights += [rnd(G[mode] * H), rnd(G[mode] * H)]
            if case == "LSTMP":
                weights.append(rnd(P, H))
    lengths = torch.tensor(sorted(lengths, reverse=True))
    x = torch.randn(int(lengths[0]), len(lengths), I, generator=g, dtype=dtype)
    pk = pack_padded_sequence(x, lengths)
    data = pk.data.clone().requires_grad_()
    h0 = rnd(L * D, len(lengths), P)
    hx = (h0, rnd(L * D, len(lengths), H)) if mode == "LSTM" else h0
    return mode, data, pk.batch_sizes, hx, weights


def compare(case, lengths, D, L, dtype, dropout=0.0, training=True, bias=True, tol=None, seed=0):
    mode, data, batch_sizes, hx, weights = make(case, lengths, D, L, dtype, bias=bias, seed=seed)
    args = (weights, bias, L, dropout, training, D == 2)
    torch.manual_seed(1234)
    want = VF[mode](data, batch_sizes, hx, *args)
    torch.manual_seed(1234)
    got = run_packed(mode, data, batch_sizes, hx, *args)
    assert len(got) == len(want)
    leaves = [data] + (list(hx) if mode == "LSTM" else [hx]) + weights
    cot = [torch.randn_like(w) for w in want]
    g_want = torch.autograd.grad(want, leaves, cot)
    g_got = torch.autograd.grad(got, leaves, cot)
    tol = tol or (1e-12 if dtype == torch.float64 else 1e-5)
    for what, a, b in [("output/state", w, o) for w, o in zip(want, got)] + \
                      [("grad", w, o) for w, o in zip(g_want, g_got)]:
        assert a.shape == b.shape, what
        err = (a - b).norm() / a.norm().clamp_min(1e-30)
        assert err <= tol, f"{what}: relative error {err:.2e}"


@pytest.mark.parametrize("L", [1, 2, 3])
@pytest.mark.parametrize("D", [1, 2])
@pytest.mark.parametrize("case", CASES)
def test_matches_vf_packed(case, D, L, plan):
    compare(case, TIES, D, L, torch.float64)


@pytest.mark.parametrize("lengths", list(LENGTHS), ids=list(LENGTHS))
@pytest.mark.parametrize("case", CASES)
def test_length_patterns(case, lengths, plan):
    compare(case, LENGTHS[lengths], 2, 2, torch.float64)


@pytest.mark.parametrize("D", [1, 2])
@pytest.mark.parametrize("case", CASES)
def test_float32(case, D, plan):
    compare(case, [20, 17, 17, 12, 9, 9, 3, 1], D, 2, torch.float32)


@pytest.mark.parametrize("case", ["LSTM", "GRU"])
def test_no_bias(case, plan):
    compare(case, TIES, 2, 2, torch.float64, bias=False)


@pytest.mark.parametrize("case", CASES)
def test_dropout_eval_is_deterministic(case):
    compare(case, TIES, 2, 3, torch.float64, dropout=0.5, training=False)


@pytest.mark.parametrize("case", ["LSTM", "GRU"])
def test_dropout_training_same_rng_draws(case):
    # torch drops out the packed layer output with one draw per layer; so does run_packed.
    compare(case, TIES, 2, 3, torch.float64, dropout=0.5, training=True)


@pytest.mark.parametrize("D", [1, 2])
@pytest.mark.parametrize("case", CASES)
def test_matches_torch_nn_unsorted(case, D):
    """The full module path: enforce_sorted=False, hx in the caller's row order."""
    mode = "LSTM" if case == "LSTMP" else case
    kw = {"proj_size": 3} if case == "LSTMP" else {}
    if mode.startswith("RNN"):
        kw["nonlinearity"] = mode[4:].lower()
    cls = {"LSTM": torch.nn.LSTM, "GRU": torch.nn.GRU}.get(mode, torch.nn.RNN)
    torch.manual_seed(0)
    m = cls(4, 6, num_layers=2, bidirectional=D == 2, dropout=0.3, **kw).double().eval()
    B, T = 5, 8
    lengths = torch.tensor([3, 8, 1, 8, 5])
    x = torch.randn(T, B, 4, dtype=torch.float64, requires_grad=True)
    P = kw.get("proj_size", 6)
    h0 = torch.randn(2 * D, B, P, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(2 * D, B, 6, dtype=torch.float64, requires_grad=True)
    hx = (h0, c0) if mode == "LSTM" else h0
    pk = pack_padded_sequence(x, lengths, enforce_sorted=False)

    out_t, st_t = m(pk, hx)
    st_t = list(st_t) if mode == "LSTM" else [st_t]
    sorted_hx = tuple(s.index_select(1, pk.sorted_indices) for s in (hx if mode == "LSTM" else [hx]))
    out_f, *st_f = run_packed(mode, pk.data, pk.batch_sizes, sorted_hx if mode == "LSTM" else sorted_hx[0],
                              m._flat_weights, m.bias, m.num_layers, m.dropout, m.training, m.bidirectional)
    st_f = [s.index_select(1, pk.unsorted_indices) for s in st_f]

    leaves = [x, h0] + ([c0] if mode == "LSTM" else []) + list(m.parameters())
    outs_t, outs_f = [out_t.data] + st_t, [out_f] + st_f
    cot = [torch.randn_like(o) for o in outs_t]
    for a, b in zip(outs_t, outs_f):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    # Both graphs share pack_padded_sequence's: keep it for the second pass.
    g_t = torch.autograd.grad(outs_t, leaves, cot, retain_graph=True)
    for a, b in zip(g_t, torch.autograd.grad(outs_f, leaves, cot)):
        torch.testing.assert_close(b, a, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("case, plan, L", [("LSTMP", "merged", 1), ("LSTM", "split", 1), ("GRU", "merged", 1),
                                           ("RNN_TANH", "auto", 2)], indirect=["plan"])
def test_gradcheck(case, plan, L):
    mode, data, batch_sizes, hx, weights = make(case, [4, 3, 3, 1], 2, L, torch.float64, I=2, H=3)
    hxs = list(hx) if mode == "LSTM" else [hx]

    def f(data, *rest):
        states, ws = rest[:len(hxs)], rest[len(hxs):]
        return run_packed(mode, data, batch_sizes, tuple(states) if mode == "LSTM" else states[0],
                          list(ws), True, L, 0.0, True, True)

    assert torch.autograd.gradcheck(f, (data, *hxs, *weights))


def test_plan_covers_time_and_cuts_at_batch_changes():
    bounds, sizes = [0, 50, 51, 53, 60, 100], [16, 12, 9, 5, 2]
    for cost in (0.0, 1.0, 1e9):
        old = packed.CALL_COST
        packed.CALL_COST = cost
        try:
            segs = packed._plan(bounds, sizes, 16)
        finally:
            packed.CALL_COST = old
        assert segs[0][0] == 0 and segs[-1][1] == 100
        assert all(a[1] == b[0] for a, b in zip(segs, segs[1:]))
        assert {t for s in segs for t in s} <= set(bounds)
    assert packed._plan(bounds, sizes, 16)[0][1] >= 50       # the full-batch prefix is never cut


def test_freeze_column_keeps_cell_state_exact_in_float32(monkeypatch):
    """Rows ending inside a merged segment: c_n is their c at their own last step in float32 too
    (the frozen steps multiply by exactly 1 and add exactly 0; only the input GEMM's rounding moves)."""
    monkeypatch.setattr(packed, "CALL_COST", 1e9)
    mode, data, batch_sizes, hx, weights = make("LSTM", [12, 7, 3, 1], 1, 1, torch.float32, H=8)
    with torch.no_grad():
        _, _, c_n = run_packed(mode, data, batch_sizes, hx, weights, True, 1, 0.0, False, False)
        monkeypatch.setattr(packed, "CALL_COST", 0.0)
        monkeypatch.setattr(packed, "MERGE_COST", 1e9)
        _, _, c_ref = run_packed(mode, data, batch_sizes, hx, weights, True, 1, 0.0, False, False)
    torch.testing.assert_close(c_n, c_ref, rtol=1e-6, atol=1e-6)


def test_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode"):
        run_packed("LSTMX", torch.zeros(1, 1), torch.tensor([1]), torch.zeros(1, 1, 1), [], False, 1,
                   0.0, False, False)


@pytest.mark.parametrize("batch_sizes, N", [([1, 2], 3), ([2, 0], 2), ([2, 1], 4), ([], 0)])
def test_rejects_malformed_batch_sizes(batch_sizes, N):
    w = list(torch.nn.GRU(2, 3)._flat_weights)
    with pytest.raises(ValueError, match="batch_sizes"):
        run_packed("GRU", torch.zeros(N, 2), torch.tensor(batch_sizes, dtype=torch.int64),
                   torch.zeros(1, 2, 3), w, True, 1, 0.0, False, False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_forward(dtype, plan):
    """Half precision (the LSTM freeze column uses a smaller offset there); forward only."""
    torch.manual_seed(0)
    m = torch.nn.LSTM(4, 6, num_layers=2, bidirectional=True).to(dtype)
    pk = pack_padded_sequence(torch.randn(9, 5, 4, dtype=dtype), torch.tensor([9, 7, 7, 3, 1]))
    hx = (torch.randn(4, 5, 6, dtype=dtype), torch.randn(4, 5, 6, dtype=dtype))
    args = (m._flat_weights, True, 2, 0.0, False, True)
    with torch.no_grad():
        want = _VF.lstm(pk.data, pk.batch_sizes, hx, *args)
        got = run_packed("LSTM", pk.data, pk.batch_sizes, hx, *args)
    for a, b in zip(want, got):
        torch.testing.assert_close(b.float(), a.float(), rtol=2e-2, atol=2e-2)
