"""fusedrnn.convert: swap torch.nn's RNN modules for their fusedrnn twins in an existing model."""
from __future__ import annotations

import warnings

from torch import nn

from . import modules
from .spec import BACKENDS, check_choice

# Exact types only: a subclass may override forward, and replacing it would change behaviour.
TWINS = {
    nn.LSTM: modules.LSTM,
    nn.GRU: modules.GRU,
    nn.RNN: modules.RNN,
    nn.LSTMCell: modules.LSTMCell,
    nn.GRUCell: modules.GRUCell,
    nn.RNNCell: modules.RNNCell,
}


def _twin(module, backend):
    """The fusedrnn twin of `module`, sharing its very Parameter objects, hooks and state."""
    twin = TWINS[type(module)].__new__(TWINS[type(module)])
    # Module state (parameters, buffers, hooks, training flag, flat-weight bookkeeping) lives in
    # __dict__ and is shared as is: the twin holds the very same Parameter objects (existing
    # optimizers keep working) and the very same hook dicts (handles taken before converting
    # still remove their hooks).
    twin.__dict__.update(module.__dict__)
    twin._init_backend(backend)
    return twin


def convert(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Replace every torch.nn LSTM/GRU/RNN/LSTMCell/GRUCell/RNNCell (exact type) in `model` by its
    fusedrnn twin, in place, and return the model (a bare module returns its twin).

    The twins hold the same Parameter objects, so an optimizer created before converting keeps
    training the model; mode (train/eval), device, dtype and hooks carry over. Subclasses of those
    torch.nn classes are left alone, with a warning naming them. Converting twice changes nothing.
    """
    check_choice(backend, BACKENDS, "backend")
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be a torch.nn.Module, got {type(model).__name__}")
    if type(model) in TWINS:
        return _twin(model, backend)
    skipped = []
    for parent_name, parent in model.named_modules():
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            if type(child) in TWINS:
                parent._modules[name] = _twin(child, backend)
            elif isinstance(child, tuple(TWINS)) and not isinstance(child, (modules._FusedRNNBase, modules._FusedCell)):
                skipped.append(f"{parent_name + '.' if parent_name else ''}{name} ({type(child).__name__})")
    if isinstance(model, tuple(TWINS)) and not isinstance(model, (modules._FusedRNNBase, modules._FusedCell)):
        skipped.insert(0, f"<root> ({type(model).__name__})")
    if skipped:
        warnings.warn("fusedrnn.convert left these subclasses of torch.nn RNN modules unchanged "
                      f"(they may override forward): {', '.join(skipped)}", stacklevel=2)
    return model
