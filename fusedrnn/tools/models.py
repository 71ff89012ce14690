"""Model construction shared by verify and the sweep: a torch.nn module from a cell name, and
converted deep copies running a chosen backend and kernel."""
from __future__ import annotations

import copy

from torch import nn

from fusedrnn.spec import BACKENDS, CELLS, KERNEL_CHOICES, check_choice


def build_torch_module(cell, I, H, layers=1, bidirectional=False, proj_size=0, bias=True,
                       batch_first=False):
    """The plain torch.nn module for a cell name (fusedrnn.spec.CELLS; parameters in float32, on
    the CPU). proj_size applies to "lstm" only."""
    check_choice(cell, CELLS, "cell")
    if proj_size and cell != "lstm":
        raise ValueError(f"proj_size applies to cell 'lstm' only, got proj_size={proj_size} for "
                         f"cell {cell!r}")
    if cell == "lstm":
        return nn.LSTM(I, H, layers, bias=bias, batch_first=batch_first,
                       bidirectional=bidirectional, proj_size=proj_size)
    if cell == "gru":
        return nn.GRU(I, H, layers, bias=bias, batch_first=batch_first,
                      bidirectional=bidirectional)
    if cell in ("rnn_tanh", "rnn_relu"):
        return nn.RNN(I, H, layers, nonlinearity=cell[4:], bias=bias, batch_first=batch_first,
                      bidirectional=bidirectional)
    if cell == "lstmcell":
        return nn.LSTMCell(I, H, bias=bias)
    if cell == "grucell":
        return nn.GRUCell(I, H, bias=bias)
    return nn.RNNCell(I, H, bias=bias)


class _Holder(nn.Module):
    """Lets fusedrnn.convert replace the root module too (convert replaces children in place)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner


def is_fusedrnn_module(module):
    """A fusedrnn layer or cell (it has the `backend` attribute fusedrnn's modules carry)."""
    return type(module).__module__.startswith("fusedrnn.") and hasattr(module, "backend")


def convert_copy(module, backend, kernel=None):
    """A deep copy of `module` with every torch.nn RNN module converted to fusedrnn.

    backend: the backend every RNN module runs (fusedrnn.spec.BACKENDS), or None: torch.nn modules
    get the default ("auto") and fusedrnn modules keep their own. kernel: force a Triton kernel
    ("stepwise" / "persistent") on every fusedrnn layer, or None to keep the modules' own."""
    import fusedrnn

    if backend is not None:
        check_choice(backend, BACKENDS, "backend")
    if kernel is not None:
        check_choice(kernel, KERNEL_CHOICES, "kernel")
    holder = _Holder(copy.deepcopy(module))
    fusedrnn.convert(holder, backend=backend or "auto")
    m = holder.inner
    for sub in m.modules():
        if is_fusedrnn_module(sub):
            if backend is not None:
                sub.backend = backend
            if kernel is not None and hasattr(sub, "kernel"):
                sub.kernel = kernel
    return m
