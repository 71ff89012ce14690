"""Bad input: whatever torch.nn rejects, fusedrnn rejects too, with a clear message.

For every case the expected exception type is computed by making the very same call on the
torch.nn module. fusedrnn must raise an instance of that type (a subclass is fine: e.g. an
AttributeError that is also a TypeError), before any computation runs, with a message that names
the offending argument and the value it got. After the failed call the module still works: a good
call gives torch.nn's result.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence
from torch.utils._python_dispatch import TorchDispatchMode

import fusedrnn
from conftest import assert_close_rel

I, H = 3, 4
# float32 modules (the default dtype); outputs are compared to torch.nn after a failed call.
# 2e-5: float32 summation-order differences only (see test_modules.py).
TOL32 = 2e-5
BACKENDS = ("auto", "torch", "reference")

# aten ops that mean computation started (matmuls, fused RNN ops, activations, our custom op)
_COMPUTE = re.compile(r"(mm|matmul|linear|lstm|gru|rnn|sigmoid|tanh|relu|fusedrnn)")


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # torch.nn's own forward, run by fusedrnn only to quote torch's message, is not fusedrnn's
        # computation
        if not fusedrnn.modules.PROBING_TORCH_MESSAGE:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@dataclass
class Case:
    id: str
    name: str                         # torch.nn / fusedrnn class name
    make_args: Callable[[], tuple]    # fresh call arguments
    arg_names: tuple                  # the message must name one of these
    got: str                          # regex for the value that was got
    ctor: dict = field(default_factory=dict)


def _shape_re(*dims):
    return r"[\[(]" + r",\s*".join(map(str, dims)) + r"[\])]"


H0_NAMES = ("h_0", "h0", "hx", "hidden")
C0_NAMES = ("c_0", "c0", "cx", "cell")


def _layer_cases(name, ctor):
    """Cases for one layer type (a function, so that the lambdas bind this `st`)."""
    sfx = name + ("_relu" if ctor else "")
    lstm = name == "LSTM"

    def st(*shape, dtype=torch.float32, c_shape=None):
        """hx argument: a tensor, or an (h, c) pair for LSTM."""
        h = torch.randn(*shape).to(dtype)
        return (h, torch.randn(*(c_shape or shape))) if lstm else h

    cases = [
        Case(f"{sfx}-rank4", name, lambda: (torch.randn(2, 1, 1, I),), ("input",), r"\b4-?D", ctor),
        Case(f"{sfx}-rank1", name, lambda: (torch.randn(I),), ("input",), r"\b1-?D", ctor),
        Case(f"{sfx}-features", name, lambda: (torch.randn(2, 1, 5),), ("input",), r"\b5\b", ctor),
        Case(f"{sfx}-packed-features", name,
             lambda: (pack_padded_sequence(torch.randn(3, 2, 5), [3, 2]),), ("input",), r"\b5\b", ctor),
        Case(f"{sfx}-float64-input", name, lambda: (torch.randn(2, 1, I).double(),), ("input",),
             "float64", ctor),
        Case(f"{sfx}-float16-input", name, lambda: (torch.randn(2, 1, I).half(),), ("input",),
             "float16", ctor),
        Case(f"{sfx}-int-input", name, lambda: (torch.ones(2, 1, I, dtype=torch.long),), ("input",),
             "int64", ctor),
        Case(f"{sfx}-T0", name, lambda: (torch.randn(0, 1, I),), ("input", "sequence length"),
             r"\b0\b", ctor),
        Case(f"{sfx}-T0-batch-first", name, lambda: (torch.randn(2, 0, I),),
             ("input", "sequence length"), r"\b0\b", dict(ctor, batch_first=True)),
        Case(f"{sfx}-T0-unbatched", name, lambda: (torch.randn(0, I),), ("input", "sequence length"),
             r"\b0\b", ctor),
        Case(f"{sfx}-not-a-tensor", name, lambda: ([[1.0, 2.0, 3.0]],), ("input",), "list", ctor),
        Case(f"{sfx}-h0-batch", name, lambda: (torch.randn(2, 1, I), st(1, 2, H)), H0_NAMES,
             _shape_re(1, 2, H), ctor),
        Case(f"{sfx}-h0-hidden", name, lambda: (torch.randn(2, 1, I), st(1, 1, H + 1)), H0_NAMES,
             _shape_re(1, 1, H + 1), ctor),
        Case(f"{sfx}-h0-layers", name, lambda: (torch.randn(2, 1, I), st(2, 1, H)), H0_NAMES,
             _shape_re(2, 1, H), ctor),
        Case(f"{sfx}-h0-bidirectional", name, lambda: (torch.randn(2, 1, I), st(1, 1, H)), H0_NAMES,
             _shape_re(1, 1, H), dict(ctor, bidirectional=True)),
        Case(f"{sfx}-h0-rank-batched", name, lambda: (torch.randn(2, 1, I), st(1, H)), H0_NAMES,
             r"\b2-?D", ctor),
        Case(f"{sfx}-h0-rank-unbatched", name, lambda: (torch.randn(2, I), st(1, 1, H)), H0_NAMES,
             r"\b3-?D", ctor),
        Case(f"{sfx}-packed-h0-batch", name,
             lambda: (pack_padded_sequence(torch.randn(3, 2, I), [3, 2]), st(1, 3, H)), H0_NAMES,
             _shape_re(1, 3, H), ctor),
        Case(f"{sfx}-h0-float64", name, lambda: (torch.randn(2, 1, I), st(1, 1, H, dtype=torch.float64)),
             H0_NAMES, "float64", ctor),
        Case(f"{sfx}-hx-string", name, lambda: (torch.randn(2, 1, I), "h0"), H0_NAMES, "str", ctor),
        Case(f"{sfx}-complex-input", name, lambda: (torch.randn(2, 1, I, dtype=torch.complex64),),
             ("input",), "complex64", ctor),
        Case(f"{sfx}-packed-float64-input", name,
             lambda: (pack_padded_sequence(torch.randn(3, 2, I).double(), [3, 2]),), ("input",),
             "float64", ctor),
        Case(f"{sfx}-packed-h0-rank", name,
             lambda: (pack_padded_sequence(torch.randn(3, 2, I), [3, 2]), st(1, H)), H0_NAMES,
             r"\b2-?D|" + _shape_re(1, H), ctor),
        Case(f"{sfx}-packed-h0-float64", name,
             lambda: (pack_padded_sequence(torch.randn(3, 2, I), [3, 2]),
                      st(1, 2, H, dtype=torch.float64)), H0_NAMES, "float64", ctor),
    ]
    if lstm:
        cases += [
            Case("LSTM-c0-shape", name, lambda: (torch.randn(2, 1, I), st(1, 1, H, c_shape=(1, 1, 5))),
                 C0_NAMES, _shape_re(1, 1, 5)),
            Case("LSTM-c0-batch", name, lambda: (torch.randn(2, 1, I), st(1, 1, H, c_shape=(1, 2, H))),
                 C0_NAMES, _shape_re(1, 2, H)),
            Case("LSTM-c0-float64", name,
                 lambda: (torch.randn(2, 1, I), (torch.randn(1, 1, H), torch.randn(1, 1, H).double())),
                 C0_NAMES, "float64"),
            Case("LSTM-hx-tensor", name, lambda: (torch.randn(2, 1, I), torch.randn(1, 1, H)),
                 ("hx",), "Tensor"),
            Case("LSTM-hx-1-tuple", name, lambda: (torch.randn(2, 1, I), (torch.randn(1, 1, H),)),
                 ("hx",), r"\b1\b"),
            Case("LSTM-hx-3-tuple", name, lambda: (torch.randn(2, 1, I), (torch.randn(1, 1, H),) * 3),
                 ("hx",), r"\b3\b"),
            Case("LSTM-c0-string", name, lambda: (torch.randn(2, 1, I), (torch.randn(1, 1, H), "c0")),
                 C0_NAMES, "str"),
            Case("LSTM-proj-h0-is-H", name, lambda: (torch.randn(2, 1, I), st(1, 1, H)), H0_NAMES,
                 _shape_re(1, 1, H), dict(proj_size=2)),
        ]
    else:
        cases += [
            Case(f"{sfx}-hx-tuple", name,
                 lambda: (torch.randn(2, 1, I), (torch.randn(1, 1, H), torch.randn(1, 1, H))),
                 ("hx", "h_0", "h0"), "tuple", ctor),
        ]
    return cases


def _cell_cases(name, ctor):
    sfx = name + ("_relu" if ctor else "")
    lstm = name == "LSTMCell"

    def st(*shape, dtype=torch.float32):
        h = torch.randn(*shape).to(dtype)
        return (h, torch.randn(*shape)) if lstm else h

    cases = [
        Case(f"{sfx}-rank3", name, lambda: (torch.randn(1, 2, I),), ("input",), r"\b3-?D", ctor),
        Case(f"{sfx}-rank0", name, lambda: (torch.tensor(1.0),), ("input",), r"\b0-?D", ctor),
        Case(f"{sfx}-features", name, lambda: (torch.randn(2, 5),), ("input",), r"\b5\b", ctor),
        Case(f"{sfx}-float64-input", name, lambda: (torch.randn(2, I).double(),), ("input",),
             "float64", ctor),
        Case(f"{sfx}-int-input", name, lambda: (torch.ones(2, I, dtype=torch.long),), ("input",),
             "int64", ctor),
        Case(f"{sfx}-not-a-tensor", name, lambda: ([1.0, 2.0, 3.0],), ("input",), "list", ctor),
        Case(f"{sfx}-h-batch", name, lambda: (torch.randn(2, I), st(1, H)), H0_NAMES + ("hidden",),
             r"\b1\b", ctor),
        Case(f"{sfx}-h-hidden", name, lambda: (torch.randn(2, I), st(2, H + 1)), H0_NAMES,
             r"\b5\b", ctor),
        Case(f"{sfx}-h-rank3", name, lambda: (torch.randn(2, I), st(1, 2, H)), H0_NAMES,
             r"\b3-?D", ctor),
        Case(f"{sfx}-h-2d-unbatched-input", name, lambda: (torch.randn(I), st(1, H)), H0_NAMES,
             r"\b2-?D|" + _shape_re(1, H), ctor),
        Case(f"{sfx}-h-float64", name, lambda: (torch.randn(2, I), st(2, H, dtype=torch.float64)),
             H0_NAMES, "float64", ctor),
        Case(f"{sfx}-B0-h-batch", name, lambda: (torch.randn(0, I), st(1, H)), H0_NAMES,
             r"\b1\b", ctor),
        Case(f"{sfx}-h-int", name, lambda: (torch.randn(2, I), st(2, H, dtype=torch.long)),
             H0_NAMES, "int64", ctor),
    ]
    if lstm:
        cases += [
            Case("LSTMCell-hx-tensor", name, lambda: (torch.randn(2, I), torch.randn(2, H)), ("hx",),
                 "Tensor"),
            Case("LSTMCell-hx-3-tuple", name, lambda: (torch.randn(2, I), (torch.randn(2, H),) * 3),
                 ("hx",), r"\b3\b"),
            Case("LSTMCell-hx-1-tuple", name, lambda: (torch.randn(2, I), (torch.randn(2, H),)),
                 ("hx",), r"\b1\b"),
            Case("LSTMCell-c-batch", name, lambda: (torch.randn(2, I), (torch.randn(2, H), torch.randn(3, H))),
                 C0_NAMES + ("hidden1",), r"\b3\b"),
        ]
    else:
        cases += [
            Case(f"{sfx}-hx-tuple", name, lambda: (torch.randn(2, I), (torch.randn(2, H),) * 2),
                 ("hx", "h_0", "h0"), "tuple", ctor),
        ]
    return cases


LAYER_CASES = [c for n, k in (("LSTM", {}), ("GRU", {}), ("RNN", {}),
                              ("RNN", {"nonlinearity": "relu"})) for c in _layer_cases(n, k)]
CELL_CASES = [c for n, k in (("LSTMCell", {}), ("GRUCell", {}), ("RNNCell", {}),
                             ("RNNCell", {"nonlinearity": "relu"})) for c in _cell_cases(n, k)]


_RANK_LAYER = r"2-?D.{0,8}3-?D"
_RANK_CELL = r"1-?D.{0,8}2-?D"
# What the message must say was expected, by case id without the module prefix.
EXPECTED = {
    "rank4": _RANK_LAYER, "rank1": _RANK_LAYER, "rank3": _RANK_CELL, "rank0": _RANK_CELL,
    "features": rf"\b{I}\b", "packed-features": rf"\b{I}\b",
    "float64-input": "float32", "float16-input": "float32", "int-input": "float32",
    "complex-input": "float32", "packed-float64-input": "float32",
    "T0": r"at least 1|larger than 0|>\s*0", "T0-batch-first": r"at least 1|larger than 0|>\s*0",
    "T0-unbatched": r"at least 1|larger than 0|>\s*0",
    "not-a-tensor": "Tensor", "hx-string": r"Tensor|tuple", "c0-string": "Tensor", "hx-tuple": "Tensor",
    "h0-batch": _shape_re(1, 1, H), "h0-hidden": _shape_re(1, 1, H), "h0-layers": _shape_re(1, 1, H),
    "h0-bidirectional": _shape_re(2, 1, H), "h0-rank-batched": r"3-?D", "h0-rank-unbatched": r"2-?D",
    "packed-h0-batch": _shape_re(1, 2, H), "packed-h0-rank": r"3-?D",
    "h0-float64": "float32", "packed-h0-float64": "float32", "c0-float64": "float32",
    "c0-shape": _shape_re(1, 1, H), "c0-batch": _shape_re(1, 1, H), "proj-h0-is-H": _shape_re(1, 1, 2),
    "hx-tensor": r"tuple|pair", "hx-1-tuple": r"two|\b2\b", "hx-3-tuple": r"two|\b2\b",
    "h-batch": r"\b2\b", "h-hidden": rf"\b{H}\b", "h-rank3": _RANK_CELL + r"|1-?D|2-?D",
    "h-2d-unbatched-input": r"1-?D|" + _shape_re(1, H) + "|" + _shape_re(H),
    "h-float64": "float32", "h-int": "float32", "c-batch": r"\b2\b", "B0-h-batch": _shape_re(0, H),
}


def _expected_re(case):
    key = case.id.split("-", 1)[1]
    assert key in EXPECTED, f"no expected-value pattern for case {case.id}"
    return EXPECTED[key]


def _good_args(name):
    if name.endswith("Cell"):
        return (torch.randn(2, I),)
    return (torch.randn(2, 1, I),)


def _flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if hasattr(out, "data") and hasattr(out, "batch_sizes"):
        return [out.data]
    return [t for o in out for t in _flat(o)]


def _expected_exception(ref, args):
    with pytest.raises(Exception) as info:
        ref(*args)
    return info.value


def check_rejected_like_torch(case: Case, backend: str, follow_up: bool = True):
    ref = getattr(nn, case.name)(I, H, **case.ctor)
    got = getattr(fusedrnn, case.name)(I, H, backend=backend, **case.ctor)
    got.load_state_dict(ref.state_dict())
    torch.manual_seed(5)
    torch_exc = _expected_exception(ref, case.make_args())
    torch.manual_seed(5)
    args = case.make_args()
    recorder = _RecordOps()
    with recorder, pytest.raises(Exception) as info:
        got(*args)
    exc = info.value
    assert isinstance(exc, type(torch_exc)), (
        f"torch.nn raises {type(torch_exc).__name__}({torch_exc}); fusedrnn raises "
        f"{type(exc).__name__}({exc}), not an instance of {type(torch_exc).__name__}")
    msg = str(exc)
    assert str(torch_exc) in msg, f"message does not contain torch.nn's ({torch_exc}): {msg!r}"
    assert any(n.lower() in msg.lower() for n in case.arg_names), (
        f"message does not name the argument (one of {case.arg_names}): {msg!r}")
    assert re.search(case.got, msg), f"message does not say what was got ({case.got!r}): {msg!r}"
    assert re.search(_expected_re(case), msg), (
        f"message does not say what was expected ({_expected_re(case)!r}): {msg!r}")
    computed = [op for op in recorder.ops if _COMPUTE.search(op)]
    assert not computed, f"computation ran before the error was raised: {computed}"
    if follow_up:
        good = _good_args(case.name)
        assert_close_rel(_flat(got(*good)), _flat(ref(*good)), TOL32, "good call after the error")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["LSTM", "GRU", "LSTMCell", "RNNCell"])
def test_op_recorder_sees_computation(name, backend):
    """The 'nothing computed before the error' check is meaningful: a good call is seen."""
    m = getattr(fusedrnn, name)(I, H, backend=backend)
    recorder = _RecordOps()
    with recorder:
        m(*_good_args(name))
    assert any(_COMPUTE.search(op) for op in recorder.ops), recorder.ops


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", LAYER_CASES, ids=lambda c: c.id)
def test_layer_bad_input(case, backend):
    check_rejected_like_torch(case, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CELL_CASES, ids=lambda c: c.id)
def test_cell_bad_input(case, backend):
    check_rejected_like_torch(case, backend)


@pytest.mark.triton
@pytest.mark.parametrize("case", [c for c in LAYER_CASES if c.name == "GRU"] +
                         [c for c in CELL_CASES if c.name == "LSTMCell"], ids=lambda c: c.id)
def test_bad_input_triton_backend(case):
    """Validation happens before dispatch, for the Triton backend too (no kernel runs)."""
    check_rejected_like_torch(case, "triton", follow_up=False)


# ----------------------------------------------------------------------------------------------
# constructor arguments
# ----------------------------------------------------------------------------------------------

CTOR_CASES = [
    pytest.param("LSTM", dict(proj_size=H), "proj_size", rf"\b{H}\b", id="LSTM-proj_size=H"),
    pytest.param("LSTM", dict(proj_size=H + 3), "proj_size", rf"\b{H + 3}\b", id="LSTM-proj_size>H"),
    pytest.param("LSTM", dict(proj_size=-1), "proj_size", r"-1", id="LSTM-proj_size=-1"),
    pytest.param("GRU", dict(proj_size=2), "proj_size", r"\b2\b", id="GRU-proj_size=2"),
    pytest.param("RNN", dict(proj_size=2), "proj_size", r"\b2\b", id="RNN-proj_size=2"),
    pytest.param("GRU", dict(proj_size=0), "proj_size", r"\b0\b", id="GRU-proj_size=0"),
    pytest.param("RNN", dict(nonlinearity="sigmoid"), "nonlinearity", "sigmoid",
                 id="RNN-nonlinearity"),
    pytest.param("LSTM", dict(num_layers=0), "num_layers", r"\b0\b", id="LSTM-num_layers=0"),
    pytest.param("GRU", dict(num_layers=-2), "num_layers", r"-2", id="GRU-num_layers=-2"),
    pytest.param("LSTM", dict(num_layers=1.0), "num_layers", r"float|1\.0", id="LSTM-num_layers=1.0"),
    pytest.param("LSTM", dict(dropout=1.5), "dropout", r"1\.5", id="LSTM-dropout=1.5"),
    pytest.param("RNN", dict(dropout=-0.1), "dropout", r"-0\.1", id="RNN-dropout=-0.1"),
    pytest.param("GRU", dict(dropout=True), "dropout", "True", id="GRU-dropout=True"),
]
SIZE_CASES = [  # (input_size, hidden_size) that torch.nn's layers reject
    pytest.param((I, 0), "hidden_size", r"\b0\b", id="hidden_size=0"),
    pytest.param((I, -1), "hidden_size", r"-1", id="hidden_size=-1"),
    pytest.param((I, 4.0), "hidden_size", r"float|4\.0", id="hidden_size=4.0"),
    pytest.param((0, H), "input_size", r"\b0\b", id="input_size=0"),
    pytest.param((3.0, H), "input_size", r"float|3\.0", id="input_size=3.0"),
]


_CTOR_EXPECTED = {  # what the message must say was expected, by argument
    "proj_size": r"smaller than hidden_size|positive|zero|only supported for LSTM",
    "num_layers": r"greater than zero|int", "hidden_size": r"greater than zero|int",
    "input_size": r"greater than zero|int", "dropout": r"\[0, 1\]",
    "nonlinearity": r"tanh.*relu",
}


def check_ctor_rejected_like_torch(make_ref, make_got, arg, got_re):
    with pytest.raises(Exception) as t_info:
        make_ref()
    with pytest.raises(Exception) as f_info:
        make_got()
    t_exc, f_exc = t_info.value, f_info.value
    assert isinstance(f_exc, type(t_exc)), (
        f"torch.nn raises {type(t_exc).__name__}({t_exc}); fusedrnn raises "
        f"{type(f_exc).__name__}({f_exc})")
    assert arg in str(f_exc), f"message does not name {arg!r}: {str(f_exc)!r}"
    assert str(t_exc) in str(f_exc), f"message does not contain torch.nn's ({t_exc}): {f_exc}"
    assert re.search(got_re, str(f_exc)), f"message does not say what was got ({got_re}): {f_exc}"
    assert re.search(_CTOR_EXPECTED[arg], str(f_exc)), f"message does not say what was expected: {f_exc}"


@pytest.mark.parametrize("name,kwargs,arg,got_re", CTOR_CASES)
def test_bad_constructor_arguments(name, kwargs, arg, got_re):
    check_ctor_rejected_like_torch(lambda: getattr(nn, name)(I, H, **kwargs),
                                   lambda: getattr(fusedrnn, name)(I, H, **kwargs), arg, got_re)


@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("sizes,arg,got_re", SIZE_CASES)
def test_bad_sizes(name, sizes, arg, got_re):
    check_ctor_rejected_like_torch(lambda: getattr(nn, name)(*sizes),
                                   lambda: getattr(fusedrnn, name)(*sizes), arg, got_re)


@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell"])
@pytest.mark.parametrize("backend", ["cuda", "Torch", "", None, 3])
def test_unknown_backend(name, backend):
    with pytest.raises(ValueError) as info:
        getattr(fusedrnn, name)(I, H, backend=backend)
    msg = str(info.value)
    assert "backend" in msg and repr(backend) in msg, msg
    for valid in ("auto", "torch", "reference", "triton"):
        assert valid in msg, f"message should list the valid choices: {msg}"


def test_rnn_cell_unknown_nonlinearity():
    """torch.nn.RNNCell accepts any nonlinearity string and fails at the first forward with
    RuntimeError; fusedrnn may reject it earlier (ValueError at construction) but must reject
    it, naming the argument and the value."""
    with pytest.raises((ValueError, RuntimeError)) as info:
        fusedrnn.RNNCell(I, H, nonlinearity="sigmoid")(torch.randn(2, I))
    assert "nonlinearity" in str(info.value) and "sigmoid" in str(info.value), str(info.value)


def test_convert_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        fusedrnn.convert(nn.LSTM(I, H), backend="fast")
