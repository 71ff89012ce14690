"""fusedrnn modules under exporters that know torch's RNN ops and not fusedrnn's: ONNX and TorchScript.

- ONNX (``torch.onnx.export``, both the dynamo-based and the TorchScript-based exporter) and
  ``torch.jit.trace``: while they record, every module takes the "torch" route whatever its
  backend (fusedrnn.dispatch.resolve), so the graph holds torch's own RNN op, which both exporters
  translate to ONNX's LSTM / GRU / RNN operators (cells to Gemm and pointwise ops) exactly as for
  torch.nn. What ONNX cannot express raises here, before the exporter sees it
  (``check_onnx_exportable``).
- ``torch.jit.script`` compiles a module's ``forward`` from source, and fusedrnn's forward is not
  TorchScript. ``torch.jit.script`` first calls ``__prepare_scriptable__()`` on every module and
  scripts what it returns: fusedrnn modules return ``scriptable_twin(self)``, a torch.nn module
  of the same configuration holding the *same* Parameter objects. TorchScript puts that twin in
  place of the fusedrnn module inside the parent module it scripts (torch's mechanism,
  ``torch.jit._script.call_prepare_scriptable_func_impl``, replaces nested modules in the parent);
  so that the user's eager model keeps running fusedrnn afterwards, a twin's Python call is the
  fusedrnn module's call, and attributes the twin lacks (``backend``, ``last_backend``, ...) are
  the fusedrnn module's.
- ``torch.export`` is not one of these: it keeps fusedrnn's own ``fusedrnn::layer`` op.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

# What torch does for its own modules (torch.jit.TracerWarning.ignore_lib_warnings): the checks of
# sizes in fusedrnn's forward (input_size, T > 0) are constants of a trace by design, not a hazard
# to warn the user about on every torch.jit.trace.
warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module=r"fusedrnn(\.|$)")

_TORCH_LAYERS = {"LSTM": nn.LSTM, "GRU": nn.GRU, "RNN_TANH": nn.RNN, "RNN_RELU": nn.RNN}
_TORCH_CELLS = {"LSTM": nn.LSTMCell, "GRU": nn.GRUCell, "RNN_TANH": nn.RNNCell, "RNN_RELU": nn.RNNCell}


def check_onnx_exportable(module):
    """Raise a clear error for what ONNX's RNN operators cannot express (while exporting)."""
    if getattr(module, "proj_size", 0) > 0:
        # The TorchScript-based exporter refuses it; the dynamo-based one (torch 2.13, onnxscript
        # 0.7) silently writes an LSTM node without the projection, which onnxruntime rejects
        # or, worse, runs with other numbers. Refuse in both.
        raise RuntimeError(
            f"fusedrnn: {type(module).__name__} with proj_size={module.proj_size} cannot be exported "
            "to ONNX: ONNX's LSTM operator has no projection (torch.nn.LSTM cannot be exported "
            "with one either). Export a model without proj_size, or use torch.export / "
            "torch.jit.script, which keep it.")


class _Source:
    """Holds the fusedrnn module behind a twin without making it a submodule (TorchScript would
    try to script it, and state_dict would list its parameters twice)."""

    def __init__(self, module):
        self.module = module


def _itself(module):
    return module


class _TwinMixin:
    """The Python side of a twin: calls and missing attributes go to the fusedrnn module, so a
    model scripted with torch.jit.script keeps computing through fusedrnn in eager mode. TorchScript
    compiles the torch.nn class's forward and never calls these."""

    __jit_ignored_attributes__ = ["_fusedrnn_source"]

    def __call__(self, *args, **kwargs):
        return self.__dict__["_fusedrnn_source"].module(*args, **kwargs)

    def __reduce_ex__(self, protocol):
        # Pickled (torch.save of the whole model, copy.deepcopy) as the fusedrnn module it stands
        # for: the twin class is not importable under its torch.nn name.
        return _itself, (self.__dict__["_fusedrnn_source"].module,)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            source = self.__dict__.get("_fusedrnn_source")
            if source is None:
                raise
            return getattr(source.module, name)


_TWIN_CLASSES = {}


def _twin_class(base):
    if base not in _TWIN_CLASSES:
        # Named and placed like the torch.nn class: TorchScript finds the overloads of
        # nn.LSTM.forward (Tensor or PackedSequence input) by the class's __name__, and checks that
        # they lie within the class's source, which it looks up by module and qualified name.
        _TWIN_CLASSES[base] = type(base.__name__, (_TwinMixin, base),
                                   {"__module__": base.__module__, "__qualname__": base.__qualname__})
    return _TWIN_CLASSES[base]


def scriptable_twin(module):
    """A torch.nn module equivalent to fusedrnn `module`, sharing its Parameter objects (see the
    module docstring); what torch.jit.script compiles in its place."""
    from .modules import _FusedRNNBase  # noqa: PLC0415 (modules imports this module)

    if isinstance(module, _FusedRNNBase):
        kwargs = dict(num_layers=module.num_layers, bias=module.bias, batch_first=module.batch_first,
                      dropout=module.dropout, bidirectional=module.bidirectional)
        if module.mode == "LSTM":
            kwargs["proj_size"] = module.proj_size
        if module.mode.startswith("RNN"):
            kwargs["nonlinearity"] = module.nonlinearity
        base = _TORCH_LAYERS[module.mode]
        names = [n for n in module._flat_weights_names]
    else:
        kwargs = dict(bias=module.bias)
        if module._mode.startswith("RNN"):
            kwargs["nonlinearity"] = module.nonlinearity
        base = _TORCH_CELLS[module._mode]
        names = [n for n, _ in module.named_parameters(recurse=False)]
    missing = [n for n in names if n not in module._parameters]
    if missing:
        raise RuntimeError(
            f"fusedrnn: torch.jit.script cannot script {type(module).__name__} with "
            f"parametrized weights ({', '.join(missing)}): TorchScript does not support "
            "torch.nn.utils.parametrize (nor does it for torch.nn's modules)")
    # Built on the meta device (nothing allocated), then given the fusedrnn module's Parameters.
    twin = _twin_class(base)(module.input_size, module.hidden_size, device="meta", **kwargs)
    for name in names:
        setattr(twin, name, module._parameters[name])
    if isinstance(twin, nn.RNNBase):
        twin._init_flat_weights()
    twin.train(module.training)
    twin.__dict__["_fusedrnn_source"] = _Source(module)
    return twin
