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


# ---------------------------------------------------------------------------------------------
# the default check: what the model runs here, bounded on CPU, with progress


class _Encoder(nn.Module):
    """An RNN inside a model: the bounded check finds it, with the structure it is called with."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.rnn = nn.LSTM(6, 9, num_layers=2, batch_first=True, bidirectional=True)
        self.cell = nn.GRUCell(18, 5)

    def forward(self, tokens):
        y, _ = self.rnn(self.emb(tokens))
        return self.cell(y[:, -1])


def test_default_check_is_bounded_per_rnn_module_on_cpu(capsys):
    torch.manual_seed(0)
    tokens = torch.randint(0, 11, (7, 40))  # B=7, T=40: more than the bounded check runs
    rep = fusedrnn.verify(_Encoder(), tokens)
    assert rep.passed, str(rep)
    assert rep.backend is None and all(r.split(": ")[1] == "torch" for r in rep.routes), rep.routes
    scope = " | ".join(rep.scope)
    assert f"rnn (lstm 6->9, 2 layers, bidirectional): random inputs, T={V.MAX_STEPS} of 40, " \
           f"B={V.MAX_BATCH} of 7" in scope
    assert f"cell (grucell 18->5): random inputs, B={V.MAX_BATCH} of 7" in scope
    assert {"rnn: out[0]", "rnn: grad weight_hh_l1_reverse", "cell: grad x"} <= set(rep.errors)
    assert "full=True" in str(rep) and "checked: rnn (lstm" in str(rep)
    err = capsys.readouterr().err
    assert "fusedrnn.verify: 2 checks, in this process" in err and "s left]" in err
    assert "PASSED in" in err


def test_full_check_runs_the_whole_model_at_full_size():
    torch.manual_seed(0)
    tokens = torch.randint(0, 11, (3, 20))
    rep = fusedrnn.verify(_Encoder(), tokens, full=True, progress=False)
    assert rep.passed, str(rep)
    assert rep.scope == ["the whole model on the inputs given (full size)"]
    assert {"out", "grad rnn.weight_ih_l0"} <= set(rep.errors)
    assert rep.entries[0].shape == (3, 5)


def test_progress_false_prints_nothing(capsys):
    m, x = _lstm_case()
    assert fusedrnn.verify(m, x, progress=False).passed
    assert capsys.readouterr().err == ""


def test_bad_arguments_name_the_argument():
    m, x = _lstm_case()
    with pytest.raises(ValueError, match="backend must be one of .*got 'cuda'"):
        fusedrnn.verify(m, x, backend="cuda")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got function"):
        fusedrnn.verify(lambda t: t, x)
    with pytest.raises(ValueError, match="called no LSTM/GRU/RNN module"):
        fusedrnn.verify(nn.Linear(5, 3), torch.randn(2, 5))


@pytest.mark.triton
def test_bounded_interpreter_check_uses_small_sizes_and_the_full_size_kernel():
    """Triton on CPU in this process (the interpreter is on under the test suite): the layer in
    its own configuration at the interpreter's sizes, with the kernel the full-size layer gets."""
    _kernels_or_skip()
    torch.manual_seed(0)
    m = fusedrnn.LSTM(40, 64, num_layers=2, bidirectional=True, proj_size=24, backend="triton")
    x = torch.randn(9, 5, 40)
    rep = fusedrnn.verify(m, x, progress=False)
    assert rep.passed, str(rep)
    (scope,) = rep.scope
    assert (f"T={V.INTERP_STEPS} of 9, B={V.INTERP_BATCH} of 5, sizes lstm "
            f"{V.INTERP_INPUT}->{V.INTERP_HIDDEN} proj {V.INTERP_HIDDEN // 2}") in scope
    from fusedrnn import kernels
    full = kernels.plan_for("LSTM", 2, 5, 64, 24, torch.float32, torch.device("cpu"))
    want = "persistent" if full is not None else "stepwise"
    assert f"kernel {want} (as at full size)" in scope
    assert rep.routes == [f"triton/{want}"]


CHILD_SCRIPT = """
import torch, fusedrnn
torch.manual_seed(0)
m = fusedrnn.GRU(6, 8, bidirectional=True, backend="triton")
rep = fusedrnn.verify(m, torch.randn(3, 2, 6))
print(rep)
assert rep.passed and rep.routes and rep.routes[0].startswith("triton")
assert any("child process" in n for n in rep.notes)
"""


@pytest.mark.triton
def test_triton_on_cpu_without_the_interpreter_runs_in_a_child_process(tmp_path):
    """A user who set nothing: the parent has no TRITON_INTERPRET, verify runs the kernels through
    the interpreter in a child process, whose progress reaches the parent's stderr."""
    import os
    import subprocess
    import sys

    if torch.cuda.is_available():
        pytest.skip("with CUDA the module's CPU tensors are the only reason for a child")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    script = tmp_path / "child.py"
    script.write_text(CHILD_SCRIPT)
    r = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "PASSED" in r.stdout and "through Triton's interpreter in a child process" in r.stderr
    assert "fusedrnn.verify (interpreter): the modules' own backend: forward took" in r.stderr
