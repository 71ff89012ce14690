"""ONNX export of models holding fusedrnn layers and cells, with both of torch's exporters (the
dynamo-based one and the TorchScript-based one), run by onnxruntime and compared with the eager
model. While exporting, every backend records torch's own RNN op (fusedrnn/export.py), so the
graph holds ONNX's LSTM / GRU / RNN operators, or an equivalent graph where the exporter chooses
one (cells, the dynamo exporter's Elman RNN).

Needs the `onnx` extra (onnx, onnxscript, onnxruntime); skipped only when onnxruntime is missing.
"""
from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import torch

import fusedrnn

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


@pytest.fixture(params=["auto", "triton"])
def backend(request):
    if request.param == "triton":
        request.getfixturevalue("triton_device")
    return request.param


@pytest.fixture(autouse=True)
def _quiet_exporter():
    # The dynamo exporter logs a warning per torchvision op it cannot register.
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


class Wrapper(torch.nn.Module):
    """A model holding the layer or cell, returning its outputs as a flat tuple."""

    def __init__(self, module):
        super().__init__()
        self.inner = module

    def forward(self, x):
        return tuple(torch.utils._pytree.tree_leaves(self.inner(x)))


def export(model, x, dynamo, batch_dim, time_dim=None):
    """The ONNX model as bytes, with a dynamic batch (and, for the TorchScript-based exporter,
    a dynamic sequence length)."""
    if dynamo:
        # Only the batch: torch.export specializes the sequence length of torch's own RNN op
        # (its decomposition loops over time), for torch.nn's modules as for fusedrnn's.
        shapes = ({batch_dim: torch.export.Dim("batch", min=1, max=64)},)
        program = torch.onnx.export(model, (x,), dynamo=True, dynamic_shapes=shapes)
        return program.model_proto.SerializeToString()
    axes = {batch_dim: "batch"}
    if time_dim is not None:
        axes[time_dim] = "time"
    f = io.BytesIO()
    torch.onnx.export(model, (x,), f, dynamo=False, input_names=["x"], dynamic_axes={"x": axes})
    return f.getvalue()


def run_onnx(data, x):
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})


def op_types(data):
    return {n.op_type for n in onnx.load_from_string(data).graph.node}


LAYERS = {
    "lstm": (lambda b: fusedrnn.LSTM(3, 4, num_layers=2, bidirectional=True, batch_first=True, backend=b),
             "LSTM"),
    "gru": (lambda b: fusedrnn.GRU(3, 4, bidirectional=True, backend=b), "GRU"),
    "rnn_relu": (lambda b: fusedrnn.RNN(3, 4, nonlinearity="relu", bias=False, backend=b), None),
    "rnn_tanh": (lambda b: fusedrnn.RNN(3, 4, num_layers=2, batch_first=True, backend=b), None),
}


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_layers(kind, dynamo, backend):
    make, onnx_op = LAYERS[kind]
    module = make(backend).eval()
    model = Wrapper(module).eval()
    batch_dim, time_dim = (0, 1) if module.batch_first else (1, 0)
    x = torch.randn(2, 3, 3) if module.batch_first else torch.randn(3, 2, 3)
    data = export(model, x, dynamo, batch_dim, time_dim)
    if onnx_op is not None:
        assert onnx_op in op_types(data), op_types(data)
    assert not any("fusedrnn" in op for op in op_types(data))
    # Another batch size (and sequence length where the exporter keeps it dynamic).
    shape = list(x.shape)
    shape[batch_dim] = 3
    if not dynamo:
        shape[time_dim] = 5
    x2 = torch.randn(shape)
    with torch.no_grad():
        expected = model(x2)
    assert module.last_backend == ("triton" if backend == "triton" else "torch")
    outputs = run_onnx(data, x2)
    assert len(outputs) == len(expected)
    for out, exp in zip(outputs, expected):
        np.testing.assert_allclose(out, exp.numpy(), rtol=1e-4, atol=1e-5)


CELLS = {"lstmcell": lambda b: fusedrnn.LSTMCell(3, 4, backend=b),
         "grucell": lambda b: fusedrnn.GRUCell(3, 4, backend=b),
         "rnncell": lambda b: fusedrnn.RNNCell(3, 4, nonlinearity="relu", backend=b)}


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("kind", sorted(CELLS))
def test_cells(kind, dynamo, backend):
    model = Wrapper(CELLS[kind](backend)).eval()
    data = export(model, torch.randn(2, 3), dynamo, 0)
    x2 = torch.randn(5, 3)
    with torch.no_grad():
        expected = model(x2)
    for out, exp in zip(run_onnx(data, x2), expected):
        np.testing.assert_allclose(out, exp.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_projection_cannot_be_expressed(dynamo, backend):
    """ONNX's LSTM has no projection: a clear error (the dynamo exporter would otherwise write an
    LSTM node without it)."""
    model = Wrapper(fusedrnn.LSTM(3, 4, proj_size=2, backend=backend)).eval()
    with pytest.raises(Exception) as info:
        export(model, torch.randn(3, 2, 3), dynamo, 1)
    # The exporters wrap the error they met: ours is in the chain of causes.
    messages, exc = [], info.value
    while exc is not None:
        messages.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    assert any("proj_size=2 cannot be exported to ONNX" in m and "no projection" in m
               for m in messages), messages


def test_export_does_not_touch_the_kernels(backend, monkeypatch):
    """While exporting, no fusedrnn op runs (export must not depend on the kernels)."""
    def fail(*args, **kwargs):
        raise AssertionError("the fusedrnn::layer op ran during ONNX export")
    model = Wrapper(fusedrnn.GRU(3, 4, backend=backend)).eval()
    monkeypatch.setattr(fusedrnn.ops, "_scan", fail)
    data = export(model, torch.randn(3, 2, 3), False, 1, 0)
    assert "GRU" in op_types(data)
