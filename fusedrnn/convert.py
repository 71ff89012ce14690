"""Swap torch.nn's RNN modules for their fusedrnn twins: `convert` (an existing model, in place)
and `patch_torch` (torch.nn's classes, for code that constructs its modules later)."""
from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn
from torch.nn.utils import parametrize

from . import modules
from .spec import BACKENDS, check_choice

FUSED_CLASSES = {name: getattr(modules, name) for name in modules.TORCH_CLASSES}
# torch.nn class -> fusedrnn class. Exact types only: a subclass may override forward, and
# replacing it would change behaviour (parametrize's generated subclasses are the exception, below).
TWINS = {modules.TORCH_CLASSES[name]: FUSED_CLASSES[name] for name in modules.TORCH_CLASSES}
_FUSED = tuple(FUSED_CLASSES.values())


def _parametrized_base(module):
    """The torch.nn RNN class under a parametrized module's generated class (weight_norm,
    spectral_norm, orthogonal, ...), or None. parametrize gives the module a class of its own that
    only adds one property per parametrized tensor, so the twin can do the same."""
    cls = type(module)
    if parametrize.is_parametrized(module) and len(cls.__bases__) == 1 and cls.__bases__[0] in TWINS:
        return cls.__bases__[0]
    return None


def _twin(module, backend):
    """The fusedrnn twin of `module`, sharing its very Parameter objects, hooks and state."""
    base = _parametrized_base(module)
    fused = TWINS[base or type(module)]
    if base is not None:
        # parametrize's properties (and its __getstate__ / __deepcopy__) over the fusedrnn class
        extra = {k: v for k, v in vars(type(module)).items() if k not in ("__dict__", "__weakref__")}
        fused = type(f"Parametrized{fused.__name__}", (fused,), extra)
    twin = fused.__new__(fused)
    # Module state (parameters, buffers, parametrizations, hooks such as pruning's, training flag,
    # flat-weight bookkeeping) lives in __dict__ and is shared as is: the twin holds the very same
    # Parameter objects (existing optimizers keep working) and the very same hook dicts (handles
    # taken before converting still remove their hooks).
    twin.__dict__.update(module.__dict__)
    twin._init_backend(backend)
    return twin


def _convertible(module):
    return type(module) in TWINS or _parametrized_base(module) is not None


def convert(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Replace every torch.nn LSTM/GRU/RNN/LSTMCell/GRUCell/RNNCell in `model` by its fusedrnn
    twin, in place, and return the model (a bare module returns its twin).

    The twins hold the same Parameter objects, so an optimizer created before converting keeps
    training the model; mode (train/eval), device, dtype, hooks (pruning's included) and
    parametrizations (weight_norm, spectral_norm, orthogonal) carry over. Other subclasses of those
    torch.nn classes are left alone, with a warning naming them. Converting twice changes nothing.
    """
    check_choice(backend, BACKENDS, "backend")
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be a torch.nn.Module, got {type(model).__name__}")
    if _convertible(model):
        return _twin(model, backend)
    skipped = []
    for parent_name, parent in model.named_modules():
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            if _convertible(child):
                parent._modules[name] = _twin(child, backend)
            elif isinstance(child, tuple(TWINS)) and not isinstance(child, _FUSED):
                skipped.append(f"{parent_name + '.' if parent_name else ''}{name} ({type(child).__name__})")
    if isinstance(model, tuple(TWINS)) and not isinstance(model, _FUSED):
        skipped.insert(0, f"<root> ({type(model).__name__})")
    if skipped:
        warnings.warn("fusedrnn.convert left these subclasses of torch.nn RNN modules unchanged "
                      f"(they may override forward): {', '.join(skipped)}", stacklevel=2)
    return model


class TorchPatch(contextlib.ContextDecorator):
    """What patch_torch() replaced; `undo()` (or leaving the `with` block) puts torch's back."""

    def __init__(self):
        self._saved = None

    def apply(self):
        if self._saved is not None:
            return self
        targets = (nn, nn.modules)
        self._saved = [(t, name, getattr(t, name)) for t in targets for name in FUSED_CLASSES]
        for target, name, _ in self._saved:
            setattr(target, name, FUSED_CLASSES[name])
        return self

    def undo(self):
        if self._saved is not None:
            for target, name, original in self._saved:
                setattr(target, name, original)
            self._saved = None

    @property
    def active(self):
        return self._saved is not None

    def __enter__(self):
        return self.apply()

    def __exit__(self, *exc):
        self.undo()
        return False


def patch_torch():
    """Make torch.nn.LSTM / GRU / RNN / LSTMCell / GRUCell / RNNCell the fusedrnn classes, for code
    that builds its modules later (e.g. a library constructing `nn.LSTM(...)` itself). Returns a
    TorchPatch: call `.undo()` to restore torch's classes, or use it as a context manager:

        with fusedrnn.patch_torch():
            model = build_model()      # its nn.LSTM(...) are fusedrnn.LSTM

    Modules built before patching are unchanged (see convert). fusedrnn itself always reaches
    torch's own classes, so patching never recurses."""
    return TorchPatch().apply()


# Whole-model checkpoints: torch.load's default weights_only=True unpickler rebuilds only
# allowlisted classes. fusedrnn's modules hold nothing but what torch.nn's hold (Parameters,
# buffers, hook dicts) plus plain strings and lists, so they are as safe to rebuild as the torch.nn
# classes that users allowlist; nothing else is added.
torch.serialization.add_safe_globals(list(_FUSED))
