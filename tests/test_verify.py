"""fusedrnn.verify: the comparison machinery passes correct models and catches broken ones.

Most tests route backend="triton" through the fusedrnn::layer op but replace the Triton scan with
its PyTorch twin (fusedrnn/loop.py), optionally corrupted, so they test verify itself (fast,
independent of the kernels' correctness). One test runs the real kernels (interpreter on CPU).
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fusedrnn
from fusedrnn.tools import models
from fusedrnn.tools import verify as V


def _lstm_case():
    torch.manual_seed(0)
    m = nn.LSTM(5, 7, num_layers=2, bidirectional=True, proj_size=3)
    x = torch.randn(4, 3, 5, requires_grad=True)
    return m, x


def test_verify_is_exported_and_callable():
    assert callable(fusedrnn.verify) and fusedrnn.verify is V.verify
    m, x = _lstm_case()
    rep = fusedrnn.verify(m, x, backend="torch", full=True)
    assert isinstance(rep, V.VerifyReport)


def test_torch_backend_passes_with_table_and_errors():
    m, x = _lstm_case()
    rep = V.verify(m, x, backend="torch", full=True)
    assert rep.passed, str(rep)
    text = str(rep)
    assert "rel err" in text and "tol" in text and "PASSED" in text
    names = set(rep.errors)
    # every output, the input gradient and every parameter's gradient
    assert {"out[0]", "out[1][0]", "out[1][1]", "grad in[0]"} <= names
    for n, _ in m.named_parameters():
        assert f"grad {n}" in names
    assert all(e.error < 1e-5 for e in rep.entries)
    d = rep.to_dict()
    assert d["passed"] and len(d["entries"]) == len(rep.entries)


@pytest.fixture
def perturb_tested_copy(monkeypatch):
    """Make the converted copy under test carry slightly perturbed weights."""
    orig = models.convert_copy

    def convert_copy(module, backend, kernel=None):
        m = orig(module, backend, kernel)
        if backend == "torch" and getattr(convert_copy, "target", None) == "torch":
            with torch.no_grad():
                for p in m.parameters():
                    p.mul_(1 + 1e-3)
        return m

    monkeypatch.setattr(V, "convert_copy", convert_copy)  # verify's own reference to it
    return convert_copy


def test_perturbed_weights_fail(perturb_tested_copy):
    m, x = _lstm_case()
    perturb_tested_copy.target = "torch"
    rep = V.verify(m, x, backend="torch", full=True)
    assert not rep.passed
    assert "FAILED" in str(rep) and "FAIL" in str(rep)
    failed = {e.name for e in rep.entries if not e.passed}
    assert "out[0]" in failed and "grad in[0]" in failed
    assert max(rep.errors.values()) > 1e-4


def test_cell_and_dtype_and_h0_grads():
    torch.manual_seed(0)
    cell = nn.GRUCell(6, 5)
    x = torch.randn(3, 6, requires_grad=True)
    h = torch.randn(3, 5, requires_grad=True)
    rep = V.verify(cell, x, h, backend="torch", dtype=torch.float64, input_names=("x", "h"),
                   full=True)
    assert rep.passed, str(rep)
    assert rep.dtype == torch.float64
    assert {"grad x", "grad h", "grad weight_hh"} <= set(rep.errors)
    assert all(e.tol == 1e-10 for e in rep.entries)


class _Tagger(nn.Module):
    """Nested outputs: a dict holding a PackedSequence and a tuple, from a packed input."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(4, 6, bidirectional=True)
        self.head = nn.Linear(12, 3)

    def forward(self, packed):
        out, h = self.rnn(packed)
        return {"seq": out, "more": (h, self.head(out.data))}


def test_nested_outputs_packed_sequence():
    torch.manual_seed(0)
    x = torch.randn(5, 3, 4, requires_grad=True)
    packed = nn.utils.rnn.pack_padded_sequence(x, torch.tensor([5, 2, 4]), enforce_sorted=False)
    rep = V.verify(_Tagger(), packed, backend="torch", full=True)
    assert rep.passed, str(rep)
    assert {"out['seq'].data", "out['more'][0]", "out['more'][1]", "grad in[0].data",
            "grad head.weight"} <= set(rep.errors)


def test_low_precision_tolerance_is_relative_to_torch():
    assert V.tolerance(torch.float32, None) == 1e-5
    assert V.tolerance(torch.float32, 1e-6) == 1e-5
    assert V.tolerance(torch.float32, 1e-4) == 2e-4
    assert V.tolerance(torch.float64, 1e-17) == 1e-10
    assert V.tolerance(torch.bfloat16, 4e-3) == pytest.approx(8e-3 + 2 ** -9)
    assert V.tolerance(torch.float16, None) == V.LOWP_FALLBACK[torch.float16]
    e = V.Entry("x", "output", 1e-2, 4e-3, V.tolerance(torch.bfloat16, 4e-3))
    assert not e.passed
    assert not V.Entry("x", "output", math.nan, None, 1.0).passed


def test_bf16_against_torch_passes():
    m, x = _lstm_case()
    rep = V.verify(m, x, backend="reference", dtype="bf16", full=True)
    assert rep.dtype == torch.bfloat16
    # the reference in bf16 rounds each step like torch.nn does: within 2x torch + 1 ulp
    assert all(e.torch_error is not None for e in rep.entries), str(rep)
    assert rep.passed, str(rep)


# ---------------------------------------------------------------------------------------------
# backend="triton" with the scan replaced: exercises the op, dispatch and verify together


def _kernels_or_skip():
    from fusedrnn import dispatch

    problem = dispatch.triton_problem(torch.device("cpu"))
    if problem is not None:
        pytest.skip(f"backend='triton' cannot run on CPU here: {problem}")
    return dispatch.kernels()


def _patch_scan(monkeypatch, k, fwd_scale=1.0, bwd_scale=1.0):
    from fusedrnn import loop

    def scan_forward(*args, **kwargs):
        y, hn, cn, hp, gates, cs = loop.scan_forward(*args)
        return y * fwd_scale, hn, cn, hp, gates, cs

    def scan_backward(*args, **kwargs):
        dxg, dgh, dh0, dc0, dhp = loop.scan_backward(*args)
        if dgh is dxg:
            dxg = dgh = dxg * bwd_scale
        else:
            dxg = dxg * bwd_scale
        return dxg, dgh, dh0, dc0, dhp

    monkeypatch.setattr(k, "scan_forward", scan_forward)
    monkeypatch.setattr(k, "scan_backward", scan_backward)


@pytest.mark.parametrize("fwd_scale,bwd_scale,expect", [
    (1.0, 1.0, "pass"), (1.0 + 1e-3, 1.0, "fail-forward"), (1.0, 1.0 + 1e-3, "fail-grad")])
def test_triton_route_with_corrupted_scan(monkeypatch, fwd_scale, bwd_scale, expect):
    k = _kernels_or_skip()
    _patch_scan(monkeypatch, k, fwd_scale, bwd_scale)
    torch.manual_seed(0)
    m = nn.GRU(5, 7, num_layers=2, bidirectional=True)
    x = torch.randn(4, 3, 5, requires_grad=True)
    rep = V.verify(m, x, backend="triton", full=True)
    assert rep.error is None, rep.error
    assert any(r.startswith("triton") for r in rep.routes), rep.routes
    if expect == "pass":
        assert rep.passed, str(rep)
        return
    assert not rep.passed
    bad = {e.name for e in rep.entries if not e.passed}
    if expect == "fail-forward":
        assert "out[0]" in bad
    else:
        assert not any(e.kind == "output" for e in rep.entries if not e.passed)
        assert "grad weight_ih_l0" in bad


def test_exception_in_backend_is_a_failure(monkeypatch):
    k = _kernels_or_skip()

    def boom(*a, **kw):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(k, "scan_forward", boom)
    m, x = _lstm_case()
    rep = V.verify(m, x, backend="triton", full=True)
    assert not rep.passed and "kernel exploded" in rep.error
    assert "ERROR" in str(rep)


@pytest.mark.triton
def test_real_triton_kernels_tiny():
    _kernels_or_skip()
    torch.manual_seed(0)
    m = nn.LSTM(5, 7, bidirectional=True)
    x = torch.randn(3, 2, 5, requires_grad=True)
    rep = V.verify(m, x, backend="triton", full=True)
    assert rep.passed, str(rep)
