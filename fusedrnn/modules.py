"""Drop-in modules: fusedrnn.LSTM / GRU / RNN and the three cells.

The layers subclass torch.nn.RNNBase (parameters, state_dict, repr and flat-weight bookkeeping are
torch's own) but not nn.LSTM/GRU/RNN, because torch.compile refuses to trace subclasses of those
three. The cells subclass nn.LSTMCell / GRUCell / RNNCell. Modules only validate, reshape and
dispatch; the math lives in reference.py, loop.py and the kernels. Layers and cells share one
path for checking and casting input and initial state (`_prepare_input`, `_initial_states`).

Variants (issue 12), opt-in, off by default (then every call is exactly torch.nn's):

- ``zoneout=p`` (constructor): h_t = z * h_{t-1} + (1 - z) * h~_t, h~_t the cell's new h. In
  training z is a Bernoulli(p) mask per (time, row, unit) drawn with torch's RNG; in eval z = p,
  the expectation. LSTM: h only (c is carried as usual); not with proj_size. The output y_t is the
  blended h_t.
- ``weight_drop=p`` (constructor): DropConnect on each W_hh (AWD-LSTM): one mask per W_hh per
  forward call, shared over time and batch, kept weights scaled by 1 / (1 - p), training only;
  gradients reach the raw weights. A cell draws a new mask at every call (every step).
- ``forward(input, hx=None, *, reset=None)``: a bool mask, (T, B) ((B, T) with batch_first, (T,)
  for unbatched input, laid out like the padded input for a PackedSequence, the batch in the
  original order as for h_0). Where reset[t, b] is set, row b restarts from its initial state
  (h_0 / c_0 if given, else zeros) before the step at time t, with no gradient across the reset
  (h_0 / c_0 collect the gradient of every restart). Positions past a packed row's length are
  ignored. The reverse direction of a bidirectional layer restarts at the last step of each
  episode, so each direction sees each episode as if it ran alone. Cells: reset (B,) (a scalar
  for unbatched input) zeroes the state of those rows before the step.

torch's own RNN ops cannot do zoneout or reset: with either, backend="auto" runs fusedrnn's own
scan (the Triton kernels on CUDA, fusedrnn/loop.py on CPU) and backend="torch" raises
BackendUnavailableError. weight_drop only changes the weights passed in, so it runs everywhere.
The cells apply zoneout and reset around the cell op on every backend.
"""
from __future__ import annotations

import contextlib
import numbers
import os

import torch
from torch import Tensor, _VF, nn
from torch.nn.utils.rnn import PackedSequence

from . import ops  # noqa: F401  (registers the fusedrnn:: custom ops)
from . import export, reference, tune
from .dispatch import kernels as triton_kernels
from .dispatch import exporting_torch_ops, onnx_exporting, requested_backend, resolve, triton_problem
from .errors import (BackendUnavailableError, BadInputError, DtypeMismatchError, HiddenStatePairError,
                     InputRankError, InputShapeError, NotATensorError, StateRankError)
from .functional import (cell_zoneout, check_probability, check_reset, check_zoneout_proj, drop_recurrent_weights,
                         drop_weight, from_padded, layer_weights, run_layers, to_padded)
from .packed import run_packed
from .spec import BACKENDS, KERNEL_CHOICES, check_choice


_VF_LAYER = {"LSTM": _VF.lstm, "GRU": _VF.gru, "RNN_TANH": _VF.rnn_tanh, "RNN_RELU": _VF.rnn_relu}
_NAMES = {"LSTM": "LSTM", "GRU": "GRU", "RNN_TANH": "RNN", "RNN_RELU": "RNN"}
# torch.nn's classes as they are when fusedrnn is imported, by fusedrnn class name: later code may
# replace the attributes of torch.nn with fusedrnn's (fusedrnn.patch_torch), and the twins and
# base-class calls below must still reach torch's own.
TORCH_CLASSES = {"LSTM": nn.LSTM, "GRU": nn.GRU, "RNN": nn.RNN, "LSTMCell": nn.LSTMCell,
                 "GRUCell": nn.GRUCell, "RNNCell": nn.RNNCell}


def torch_twin(module):
    """A torch.nn module of the same kind sharing `module`'s state: the same Parameter objects,
    buffers, hooks and flags (the reverse of fusedrnn.convert)."""
    cls = TORCH_CLASSES[module._torch_name]
    twin = cls.__new__(cls)
    twin.__dict__.update(module.__dict__)
    return twin


# Depth of torch_message calls in progress; tests that watch for computation before an error skip
# what torch.nn's own forward does while fusedrnn asks it for its message.
PROBING_TORCH_MESSAGE = 0


def _torch_message(module, args):
    """torch.nn's exception message for the same call (None when torch.nn accepts it). Only called
    once fusedrnn's own checks have rejected the call, so it costs nothing on the normal path; the
    random state is restored, and forward hooks do not run."""
    global PROBING_TORCH_MESSAGE
    PROBING_TORCH_MESSAGE += 1
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch_twin(module).forward(*args)
    except Exception as exc:  # noqa: BLE001 - whatever torch.nn raises is the message wanted
        return str(exc)
    finally:
        PROBING_TORCH_MESSAGE -= 1
    return None


def _with_torch_message(exc, module, args):
    """exc with torch.nn's message for the same call first and fusedrnn's after it, so that code
    matching torch's text keeps working."""
    ours = str(exc)
    theirs = _torch_message(module, args)
    if theirs and theirs not in ours:
        exc.args = (f"{theirs}\nfusedrnn: {ours}",)
    return exc


def _describe(value):
    if isinstance(value, Tensor):
        return f"a {value.dim()}-D Tensor of shape {tuple(value.shape)}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)} elements"
    return f"an object of type {type(value).__name__}"


# Ops that torch's autocast runs in the low-precision dtype. On CUDA every RNN op is; CPU autocast
# lists the LSTM and Elman layers and the Elman cells, not GRU nor the LSTM/GRU cells.
_CPU_AUTOCAST = {"LSTM", "RNN_TANH", "RNN_RELU", "RNNCell"}


def _autocast_on(x):
    return x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type)


def _no_autocast(x):
    """Inputs are already cast: switch autocast off for the ops inside (only when it is on, since
    entering an autocast context costs ~10 us)."""
    return torch.autocast(x.device.type, enabled=False) if _autocast_on(x) else contextlib.nullcontext()


def _compute_dtype(x, hx, weight_dtype, kind):
    """dtype the module runs in: the autocast dtype for ops torch autocasts; under autocast, other
    ops run in the dtype of the given state, else of the input (as torch.nn's do); without
    autocast, the weights' dtype."""
    device_type = x.device.type
    if _autocast_on(x):
        if device_type == "cuda" or kind in _CPU_AUTOCAST:
            return torch.get_autocast_dtype(device_type)
        h0 = hx[0] if isinstance(hx, (tuple, list)) and hx else hx
        for t in (h0, x):
            if isinstance(t, Tensor) and t.is_floating_point():
                return t.dtype
    return weight_dtype


def _check_state(name, value, expected_shape, x, check_dtype=True):
    if not isinstance(value, Tensor):
        raise NotATensorError(f"{name} must be a Tensor, got {_describe(value)}")
    if check_dtype and value.dtype != x.dtype:
        raise DtypeMismatchError(f"{name} must have the same dtype as input ({x.dtype}), got {value.dtype}")
    if value.device != x.device:
        raise InputShapeError(f"{name} must be on the same device as input ({x.device}), got {value.device}")
    if tuple(value.shape) != tuple(expected_shape):
        raise InputShapeError(f"{name} must have shape {tuple(expected_shape)}, got {tuple(value.shape)}")


def _check_input_tensor(x, expected_features, dtype):
    """input: floating point, of the dtype the module runs in, with input_size features."""
    if not x.is_floating_point():
        raise DtypeMismatchError(f"input must be a floating-point tensor (dtype {dtype}, the weights' "
                                 f"dtype), got dtype {x.dtype}")
    if x.dtype != dtype:
        raise DtypeMismatchError(f"input dtype ({x.dtype}) does not match weight dtype ({dtype}). "
                                 f"Convert input: input.to({dtype}), or convert model: model.to({x.dtype})")
    if x.size(-1) != expected_features:
        raise InputShapeError(f"input.size(-1) must be equal to input_size. Expected {expected_features}, "
                           f"got {x.size(-1)}")


def _prepare_input(x, dtype, weight_dtype, input_size):
    """x checked against the module and cast to the call's dtype (None: leave it as given)."""
    _check_input_tensor(x, input_size, x.dtype if _autocast_on(x) else weight_dtype)
    return x.to(dtype) if dtype is not None and x.dtype != dtype else x


def _cast_weights(weights, dtype):
    """The weights in the call's dtype (a new list only under autocast)."""
    if dtype is None or all(w is None or w.dtype == dtype for w in weights):
        return list(weights)
    return [w if w is None else w.to(dtype) for w in weights]


def _initial_states(name, hx, x, dtype, shapes, check_rank, unbatched_dim):
    """The initial states [h_0] or [h_0, c_0] of one call, checked and cast to `dtype`: zeros of
    `shapes` when hx is None. dtype None (torch's op under autocast) keeps the given dtypes, as
    torch.nn does. `check_rank(state_name, tensor)` raises the module's error for a state of the
    wrong rank; unbatched_dim, when not None, is where unbatched states get their batch dimension."""
    if hx is None:
        return [x.new_zeros(s) for s in shapes]
    names = ("h_0", "c_0")[:len(shapes)]
    states = _hx_states(name, hx, len(shapes) == 2)
    for n, s in zip(names, states):
        if not isinstance(s, Tensor):
            raise NotATensorError(f"{name}: {n} must be a Tensor, got {_describe(s)}")
        check_rank(n, s)
    if unbatched_dim is not None:
        states = [s.unsqueeze(unbatched_dim) for s in states]
    if dtype is not None and _autocast_on(x):
        states = [s.to(dtype) if s.is_floating_point() else s for s in states]
    for n, s, shape in zip(names, states, shapes):
        _check_state(n, s, shape, x, check_dtype=dtype is not None)
    return states


def _unpack_input(name, input, batch_first):
    """A layer's input as (x, batch_sizes, sorted_indices, unsorted_indices, is_batched): a
    PackedSequence's fields, or the tensor with unbatched input given its batch dimension."""
    if isinstance(input, PackedSequence):
        x, batch_sizes, sorted_indices, unsorted_indices = input
        if x.dim() != 2:
            raise InputShapeError(f"input.data of a PackedSequence must be 2-D, got {x.dim()}-D")
        return x, batch_sizes, sorted_indices, unsorted_indices, True
    if not isinstance(input, Tensor):
        raise NotATensorError(f"{name}: input must be a Tensor or PackedSequence, got {_describe(input)}")
    if input.dim() not in (2, 3):
        raise InputRankError(f"{name}: Expected input to be 2D or 3D, got {input.dim()}D tensor instead")
    is_batched = input.dim() == 3
    x = input if is_batched else input.unsqueeze(0 if batch_first else 1)
    return x, None, None, None, is_batched


def _sequence_shape(name, x, batch_sizes, sorted_indices, batch_first):
    """(T, B) of a layer call; a sequence length of 0 raises."""
    if batch_sizes is not None:
        # sorted_indices (enforce_sorted=False) gives B without reading batch_sizes' data,
        # which torch.compile could only trace as a data-dependent value.
        T = batch_sizes.numel()
        B = sorted_indices.numel() if sorted_indices is not None else int(batch_sizes[0])
    else:
        T, B = (x.shape[1], x.shape[0]) if batch_first else (x.shape[0], x.shape[1])
    if T == 0:
        raise InputShapeError(f"{name}: input must have a sequence length of at least 1, got 0")
    return T, B


def _layer_states(name, hx, x, dtype, shapes, is_batched, sorted_indices):
    """A layer's initial states (_initial_states with a layer's rank rule), rows in the order the
    layers run (a PackedSequence's sorted order)."""
    state_dim = 3 if is_batched else 2

    def check_rank(n, s):
        if s.dim() != state_dim:
            kind = "batched 3-D" if is_batched else "unbatched 2-D"
            raise StateRankError(f"For {kind} input, {n} should also be {state_dim}-D but got "
                                 f"{s.dim()}-D tensor")

    states = _initial_states(name, hx, x, dtype, shapes, check_rank, None if is_batched else 1)
    if hx is not None and sorted_indices is not None:
        states = [s.index_select(1, sorted_indices) for s in states]
    return states


def _pack_output(out, finals, batch_sizes, sorted_indices, unsorted_indices, is_batched, batch_first,
                 is_lstm):
    """A layer's (output, h_n or (h_n, c_n)) in the caller's form: the inverse of _unpack_input."""
    finals = list(finals)
    if batch_sizes is not None:
        finals = [f.index_select(1, unsorted_indices) if unsorted_indices is not None else f for f in finals]
        output = PackedSequence(out, batch_sizes, sorted_indices, unsorted_indices)
    else:
        output = out
        if not is_batched:
            output = out.squeeze(0 if batch_first else 1)
            finals = [f.squeeze(1) for f in finals]
    return output, (tuple(finals) if is_lstm else finals[0])


def _unpack_cell_input(name, input):
    """A cell's input as (x with a batch dimension, is_batched)."""
    if not isinstance(input, Tensor):
        raise NotATensorError(f"{name}: input must be a Tensor, got {_describe(input)}")
    if input.dim() not in (1, 2):
        raise InputRankError(f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
    is_batched = input.dim() == 2
    return (input if is_batched else input.unsqueeze(0)), is_batched


def _cell_states(name, hx, x, dtype, hidden_size, n, is_batched, reset):
    """A cell's initial states (_initial_states with a cell's rank rule); rows where `reset` is set
    restart from the zero state, with no gradient to the hx they replace."""
    B = x.shape[0]
    input_dim = 2 if is_batched else 1

    def check_rank(name_, s):
        if s.dim() not in (1, 2):
            raise InputRankError(f"{name}: Expected {name_} to be 1D or 2D, got {s.dim()}D instead")
        if s.dim() != input_dim:
            raise InputShapeError(f"{name}: {name_} must be {input_dim}-D like input, got {s.dim()}-D")

    states = _initial_states(name, hx, x, dtype, [(B, hidden_size)] * n, check_rank, None if is_batched else 0)
    if reset is not None:
        restart = check_reset(reset, (B,) if is_batched else (), "batch" if is_batched else "a scalar",
                              x.device).reshape(B, 1)
        states = [torch.where(restart, torch.zeros_like(s), s) for s in states]
    return states


def _given_dtypes(hx, x, n):
    """dtypes of the n given states, for the autocast probe (x's dtype where a state is missing
    or malformed: validation reports those later)."""
    states = list(hx) if isinstance(hx, (tuple, list)) else [hx]
    if len(states) != n:
        states = [None] * n
    return tuple(s.dtype if isinstance(s, Tensor) else x.dtype for s in states)


# Output dtypes of torch's own op under autocast, per (module kind, options, device type, autocast
# dtype, input, state and weight dtypes): found by running the op once on a one-row, one-step
# input. They depend on the machine (on CPU, oneDNN's bfloat16 support changes which
# implementation torch picks), so they are measured, never tabulated.
_AUTOCAST_PROBES = {}


def _hx_states(name, hx, is_lstm):
    """hx as a list of tensors-to-be: [h_0] or [h_0, c_0]; structure errors raise here."""
    if is_lstm:
        if isinstance(hx, (tuple, list)):
            if len(hx) != 2:
                raise HiddenStatePairError(f"{name}: hx must be a tuple (h_0, c_0) of two tensors, "
                                           f"got {_describe(hx)}")
            return list(hx)
        if isinstance(hx, Tensor):
            raise HiddenStatePairError(f"{name}: hx must be a tuple (h_0, c_0) of two tensors, got "
                                       f"{_describe(hx)}")
        raise NotATensorError(f"{name}: hx must be a tuple (h_0, c_0) of two tensors, got {_describe(hx)}")
    if isinstance(hx, (tuple, list)):
        raise NotATensorError(f"{name}: hx must be a Tensor h_0, got {_describe(hx)} "
                              f"(an (h_0, c_0) pair is only for LSTM)")
    return [hx]


def _check_layer_args(mode, input_size, hidden_size, num_layers, bias, batch_first, dropout,
                      proj_size):
    """The constructor checks of nn.RNNBase, with the value that was got in every message."""
    for name, value in (("bias", bias), ("batch_first", batch_first)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} should be of type bool, got: {type(value).__name__}")
    # As lenient as torch.nn: sizes must be int (bool included), layer and projection counts any
    # integral number (numpy integers too).
    for name, value, kind in (("input_size", input_size, int), ("hidden_size", hidden_size, int),
                              ("num_layers", num_layers, numbers.Integral),
                              ("proj_size", proj_size, numbers.Integral)):
        if not isinstance(value, kind):
            # torch.nn's own message first: for the counts it comes from range(), not a check
            lead = ("" if kind is int else
                    f"'{type(value).__name__}' object cannot be interpreted as an integer: ")
            raise TypeError(f"{lead}{name} should be of type int, got: {type(value).__name__} ({value!r})")
    for name, value in (("input_size", input_size), ("hidden_size", hidden_size),
                        ("num_layers", num_layers)):
        if value <= 0:
            raise ValueError(f"{name} must be greater than zero, got {value}")
    if not isinstance(dropout, numbers.Number) or isinstance(dropout, bool) or not 0 <= dropout <= 1:
        raise ValueError("dropout should be a number in range [0, 1] representing the probability "
                         f"of an element being zeroed, got {dropout!r}")
    if proj_size < 0:
        raise ValueError("proj_size should be a positive integer or zero to disable projections, "
                         f"got {proj_size}")
    if proj_size >= hidden_size:
        raise ValueError(f"proj_size has to be smaller than hidden_size ({hidden_size}), got "
                         f"proj_size={proj_size}")


class _Backend:
    """The `backend` and `kernel` attributes shared by layers and cells, and the dtypes of a call."""

    # the variants' defaults (also what a module pickled before they existed gets)
    zoneout = 0.0
    weight_drop = 0.0

    def _init_variants(self, zoneout, weight_drop, proj_size=0, layer=True):
        """Check and set zoneout / weight_drop (see the module docstring)."""
        zoneout = check_probability("zoneout", zoneout)
        weight_drop = check_probability("weight_drop", weight_drop)
        check_zoneout_proj(zoneout, proj_size)
        if layer and zoneout > 0 and self.backend == "torch":
            raise BackendUnavailableError(
                f"zoneout={zoneout} needs fusedrnn's own scan, but backend='torch' runs torch's fused RNN "
                "op, which cannot do zoneout; use backend='auto' (or 'triton' / 'reference')")
        self.zoneout = zoneout
        self.weight_drop = weight_drop

    def _variants_repr(self):
        return "".join(f", {n}={getattr(self, n)}" for n in ("zoneout", "weight_drop") if getattr(self, n))

    def _variants_route(self, route, reset):
        """The route of a layer call with zoneout or reset, which torch's op cannot run: "loop"
        (fusedrnn/loop.py) where the static rule said "torch" through backend="auto";
        BackendUnavailableError for an explicit backend="torch" and while exporting."""
        if route != "torch" or (self.zoneout == 0 and reset is None):
            return route
        what = f"zoneout={self.zoneout}" if self.zoneout > 0 else "reset"
        if exporting_torch_ops(torch.compiler.is_compiling()):
            raise BackendUnavailableError(
                f"{what} cannot be exported: torch.jit.trace / ONNX record torch's own RNN op, which "
                "has no zoneout or reset")
        if requested_backend(self.backend) == "torch":
            raise BackendUnavailableError(
                f"{what} needs fusedrnn's own scan, but backend='torch' runs torch's fused RNN op, which "
                "cannot do zoneout or reset; use backend='auto' (or 'triton' / 'reference')")
        return "loop"

    def _call_dtypes(self, x, hx, route, weights, n_states):
        """(compute dtype, output dtypes) of one call. Without autocast: the weights' dtype, no
        output casts. Under autocast on the torch route: (None, None), torch's op runs under
        autocast on the tensors as given, exactly as in torch.nn. Under autocast on any other route:
        the output dtypes torch.nn's op gives for the same dtypes on this machine, computing in the
        first output's dtype. Where torch's op fails for these dtypes (oneDNN on some CPUs cannot
        build its LSTM for float32 input under bfloat16 autocast), every route casts by the rule
        of _compute_dtype and runs."""
        weight_dtype = weights[0].dtype
        if not _autocast_on(x):
            return weight_dtype, None
        device_type = x.device.type
        given = _given_dtypes(hx, x, n_states)
        key = (self._probe_key(), device_type, torch.get_autocast_dtype(device_type), x.dtype, given,
               weight_dtype)
        if key not in _AUTOCAST_PROBES:
            try:
                with torch.no_grad():
                    _AUTOCAST_PROBES[key] = self._probe_dtypes(x, given, weights)
            except RuntimeError:
                _AUTOCAST_PROBES[key] = None
        out = _AUTOCAST_PROBES[key]
        if out is None:
            return _compute_dtype(x, hx, weight_dtype, self._probe_key()[0]), None
        if route == "torch":
            return None, None
        return out[0], out

    def _init_backend(self, backend, kernel="auto"):
        self.backend = check_choice(backend, BACKENDS, "backend")
        self.kernel = check_choice(kernel, KERNEL_CHOICES, "kernel")
        self.last_backend = None
        self.last_kernels = []
        self.last_tuning = None

    def __getstate__(self):
        # The record of the last call is not part of a module's state (and a tune.Decision is
        # not something torch.load(weights_only=True) should have to rebuild).
        state = dict(super().__getstate__())
        state["last_tuning"] = None
        return state

    def _route(self, device):
        """The route of this call (fusedrnn.dispatch): "torch", "reference", "triton" or "loop"."""
        compiling = torch.compiler.is_compiling()
        route = resolve(self.backend, device, compiling)
        if route == "torch" and exporting_torch_ops(compiling) and onnx_exporting():
            export.check_onnx_exportable(self)
        return route

    def __prepare_scriptable__(self):
        """What torch.jit.script compiles in place of this module: a torch.nn twin sharing its
        Parameters (fusedrnn/export.py)."""
        return export.scriptable_twin(self)

    def _record(self, route, kernels=(), decision=None):
        """last_backend: the route that ran; last_kernels: the kernel of each layer;
        last_tuning: the measured choice behind them (a fusedrnn.tune.Decision: chosen candidate,
        "tuned" or "cached", timings, excluded candidates and why), None under the static rule."""
        if not torch.compiler.is_compiling():
            # Plain attributes: skip nn.Module.__setattr__'s bookkeeping (it costs ~15 us a call,
            # which matters when the default CPU path must cost what torch.nn costs).
            self.__dict__["last_backend"] = route
            self.__dict__["last_kernels"] = list(kernels)
            self.__dict__["last_tuning"] = decision


class _FusedRNNBase(_Backend, nn.RNNBase):
    def __init__(self, mode, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, proj_size=0, device=None, dtype=None, *,
                 backend="auto", kernel="auto", zoneout=0.0, weight_drop=0.0):
        check_choice(backend, BACKENDS, "backend")
        check_choice(kernel, KERNEL_CHOICES, "kernel")
        _check_layer_args(mode, input_size, hidden_size, num_layers, bias, batch_first, dropout,
                          proj_size)
        super().__init__(mode, input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, proj_size, device, dtype)
        self._init_backend(backend, kernel)
        self._init_variants(zoneout, weight_drop, proj_size)

    def extra_repr(self):
        s = super().extra_repr() + self._variants_repr()
        return s if self.backend == "auto" else s + f", backend={self.backend!r}"

    def __setstate__(self, d):
        for key, default in (("backend", "auto"), ("kernel", "auto"), ("last_backend", None),
                             ("last_kernels", []), ("last_tuning", None)):
            d.setdefault(key, default)
        super().__setstate__(d)

    @property
    def _torch_name(self):
        return _NAMES[self.mode]

    def forward(self, input, hx=None, *, reset=None):
        try:
            return self._forward(input, hx, reset)
        except BadInputError as exc:
            raise _with_torch_message(exc, self, (input, hx)) from None

    def _reset_mask(self, reset, T, B, packed, is_batched, device, sorted_indices):
        """The reset argument checked and made time-major (T, B), rows in the order the layers run
        (a PackedSequence's sorted order)."""
        if not is_batched:
            return check_reset(reset, (T,), "time", device).unsqueeze(1)
        if self.batch_first:
            reset = check_reset(reset, (B, T), "batch, time: batch_first", device).transpose(0, 1)
        else:
            reset = check_reset(reset, (T, B), "time, batch", device)
        if packed and sorted_indices is not None:
            reset = reset.index_select(1, sorted_indices)
        return reset

    def _forward(self, input, hx, reset=None):
        self._update_flat_weights()
        name = _NAMES[self.mode]
        D = 2 if self.bidirectional else 1
        P = self.proj_size if self.proj_size > 0 else self.hidden_size
        is_lstm = self.mode == "LSTM"
        weight_dtype = self._flat_weights[0].dtype
        x, batch_sizes, sorted_indices, unsorted_indices, is_batched = _unpack_input(name, input,
                                                                                     self.batch_first)
        packed = batch_sizes is not None
        route = self._variants_route(self._route(x.device), reset)
        dtype, out_dtypes = self._call_dtypes(x, hx, route, self._flat_weights, 2 if is_lstm else 1)
        x = _prepare_input(x, dtype, weight_dtype, self.input_size)
        T, B = _sequence_shape(name, x, batch_sizes, sorted_indices, self.batch_first)
        shapes = [(self.num_layers * D, B, P)] + ([(self.num_layers * D, B, self.hidden_size)] if is_lstm else [])
        states = _layer_states(name, hx, x, dtype, shapes, is_batched, sorted_indices)
        if reset is not None:
            reset = self._reset_mask(reset, T, B, packed, is_batched, x.device, sorted_indices)

        flat = _cast_weights(self._flat_weights, dtype)
        if self.weight_drop > 0 and self.training:
            flat = drop_recurrent_weights(flat, self.num_layers, D, self.bias, self.proj_size > 0,
                                          self.weight_drop)
        with _no_autocast(x) if dtype is not None else contextlib.nullcontext():
            # (zoneout and reset have no torch op to tune against)
            decision = (self._tune(route, x, batch_sizes, states, flat, B, T, dtype)
                        if self.zoneout == 0 and reset is None else None)
            kernel = self.kernel
            if decision is not None and decision.chosen is not None:
                route, kernel = (("torch", None) if decision.chosen == tune.ORACLE
                                 else ("triton", decision.chosen))
            if route == "torch":
                out, *finals = self._run_torch(x, batch_sizes, states, flat)
                kernels = ()
            else:
                out, finals, kernels = self._run_padded(x, batch_sizes, states, flat, route, B, T, kernel,
                                                        reset)
        if out_dtypes is not None:
            out, *finals = (t.to(d) for t, d in zip([out, *finals], out_dtypes))
        self._record(route, kernels, decision)
        return _pack_output(out, finals, batch_sizes, sorted_indices, unsorted_indices, is_batched,
                            self.batch_first, is_lstm)

    def _probe_key(self):
        return (self.mode, self.proj_size > 0)

    def _probe_dtypes(self, x, state_dtypes, flat):
        """Output dtypes of torch's op for these dtypes under the current autocast (see
        _call_dtypes): one step of a one-row batch."""
        D = 2 if self.bidirectional else 1
        P = self.proj_size if self.proj_size > 0 else self.hidden_size
        sizes = (P, self.hidden_size)
        xp = torch.zeros(1, 1, self.input_size, dtype=x.dtype, device=x.device)
        states = [torch.zeros(self.num_layers * D, 1, n, dtype=dt, device=x.device)
                  for n, dt in zip(sizes, state_dtypes)]
        out = self._run_torch(xp, None, states, flat, batch_first=False)
        return tuple(t.dtype for t in out)

    def _run_torch(self, x, batch_sizes, states, flat, batch_first=None):
        hx = tuple(states) if self.mode == "LSTM" else states[0]
        if batch_sizes is not None and x.device.type == "cpu" and not _autocast_on(x):
            # torch's packed op steps one time step at a time on CPU (3-90x the padded cost in
            # training); fusedrnn/packed.py computes the same with the padded op over segments.
            return run_packed(self.mode, x, batch_sizes, hx, flat, self.bias, self.num_layers,
                              self.dropout, self.training, self.bidirectional)
        fn = _VF_LAYER[self.mode]
        if batch_sizes is None:
            return fn(x, hx, flat, self.bias, self.num_layers, self.dropout, self.training,
                      self.bidirectional, self.batch_first if batch_first is None else batch_first)
        return fn(x, batch_sizes, hx, flat, self.bias, self.num_layers, self.dropout, self.training,
                  self.bidirectional)

    def _tune(self, route, x, batch_sizes, states, flat, B, T, dtype):
        """The measured choice of backend="auto" between torch's op (cuDNN) and the Triton kernels
        for this call's key (fusedrnn/tune.py), or None where the static rule decides: an explicit
        backend or kernel, tuning off, a device where Triton cannot run (CPU only under the
        test switch $FUSEDRNN_TUNE_CPU=1 with the interpreter), and calls the oracle cannot check
        (autocast, dropout between layers in training, gradients in eval mode: cuDNN has no
        backward there)."""
        # the device first: on the CPU default path this costs one comparison and one lookup
        device = x.device
        if device.type == "cuda":
            if route != "triton":
                return None
        elif device.type != "cpu" or os.environ.get("FUSEDRNN_TUNE_CPU") != "1":
            return None
        if (requested_backend(self.backend) != "auto" or self.kernel != "auto"
                or os.environ.get("FUSEDRNN_KERNEL", "").strip() not in ("", "auto") or not tune.enabled()):
            return None
        if (triton_problem(device) is not None if device.type == "cpu"
                else not torch.backends.cudnn.is_acceptable(x)):
            return None
        if dtype is None or _autocast_on(x) or (self.dropout > 0 and self.training and self.num_layers > 1):
            return None
        tensors = (x, *states, *flat)
        needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
        if needs_grad and not self.training:
            return None
        fields = dict(input_size=self.input_size, hidden_size=self.hidden_size, proj_size=self.proj_size,
                      num_layers=self.num_layers, bidirectional=self.bidirectional, batch=int(B),
                      seq_len=int(T), dtype=dtype, bias=self.bias, batch_first=self.batch_first,
                      packed=batch_sizes is not None, training=needs_grad, device=device)
        key = tune.call_key(self.mode, **fields)
        n = len(states)
        inputs = []  # the CallInputs, built only when tuning (a cache hit needs none)

        def call():
            if not inputs:
                inputs.append(tune.CallInputs(
                    tensors, needs_grad=needs_grad,
                    names=("input", "h_0", "c_0")[:1 + n] + tuple(self._flat_weights_names)))
            return inputs[0]

        D = 2 if self.bidirectional else 1
        P = self.proj_size if self.proj_size > 0 else self.hidden_size

        def build():
            def torch_op(x, *rest):
                return tuple(self._run_torch(x, batch_sizes, list(rest[:n]), list(rest[n:])))

            def kernel_op(kernel):
                def run(x, *rest):
                    y, finals, _ = self._run_padded(x, batch_sizes, list(rest[:n]), list(rest[n:]),
                                                    "triton", B, T, kernel)
                    return (y, *finals)
                return run

            candidates = {tune.ORACLE: call().candidate(torch_op),
                          "stepwise": call().candidate(kernel_op("stepwise"))}
            if triton_kernels().plan_for(self.mode, D, int(B), self.hidden_size, P, dtype, device) is not None:
                candidates["persistent"] = call().candidate(kernel_op("persistent"))
            return candidates

        return tune.get_tuner().choose(key, build, needs_grad=needs_grad, tensors=tensors,
                                       labels=lambda: call().labels(("output", "h_n", "c_n")[:1 + n]))

    def _run_padded(self, x, batch_sizes, states, flat, route, B, T, kernel="auto", reset=None):
        x, lengths, rows = to_padded(x, batch_sizes, B, T, self.batch_first)
        weights = layer_weights(flat, self.num_layers, 2 if self.bidirectional else 1, self.bias,
                                self.proj_size > 0)
        kernels = []
        # An empty batch has nothing to compute (a packed batch is never empty).
        run = "reference" if batch_sizes is None and B == 0 else route
        y, finals = run_layers(self.mode, x, lengths, tuple(states), weights,
                               num_layers=self.num_layers, bidirectional=self.bidirectional,
                               dropout=self.dropout, training=self.training, route=run,
                               kernel=kernel, last_kernels=kernels, zoneout=self.zoneout, reset=reset)
        return from_padded(y, rows, self.batch_first), list(finals), kernels


def _reject_proj_size(kwargs):
    if "proj_size" in kwargs:
        raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU, got "
                         f"proj_size={kwargs['proj_size']!r}")


class LSTM(_FusedRNNBase):
    """Drop-in torch.nn.LSTM (same arguments, parameters and behaviour) plus `backend`, and the
    opt-in variants `zoneout`, `weight_drop` and forward's `reset` (module docstring)."""

    def __init__(self, *args, backend="auto", **kwargs):
        super().__init__("LSTM", *args, backend=backend, **kwargs)


class GRU(_FusedRNNBase):
    """Drop-in torch.nn.GRU (same arguments, parameters and behaviour) plus `backend`, and the
    opt-in variants `zoneout`, `weight_drop` and forward's `reset` (module docstring)."""

    def __init__(self, *args, backend="auto", **kwargs):
        _reject_proj_size(kwargs)
        super().__init__("GRU", *args, backend=backend, **kwargs)


class RNN(_FusedRNNBase):
    """Drop-in torch.nn.RNN (tanh or relu) plus `backend`, and the opt-in variants `zoneout`,
    `weight_drop` and forward's `reset` (module docstring)."""

    def __init__(self, *args, backend="auto", **kwargs):
        _reject_proj_size(kwargs)
        if len(args) > 3:
            self.nonlinearity = args[3]
            args = args[:3] + args[4:]
        else:
            self.nonlinearity = kwargs.pop("nonlinearity", "tanh")
        if self.nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"Unknown nonlinearity '{self.nonlinearity}'. Select from 'tanh' or 'relu'.")
        mode = "RNN_TANH" if self.nonlinearity == "tanh" else "RNN_RELU"
        super().__init__(mode, *args, backend=backend, **kwargs)


# ---------------------------------------------------------------------------------------- cells
class _FusedCell(_Backend):
    _mode = None  # set per class or instance
    _name = None

    def __init__(self, input_size, hidden_size, bias=True, device=None, dtype=None, *, backend="auto",
                 zoneout=0.0, weight_drop=0.0):
        check_choice(backend, BACKENDS, "backend")
        super().__init__(input_size, hidden_size, bias, device=device, dtype=dtype)
        self._init_backend(backend)
        self._init_variants(zoneout, weight_drop, layer=False)

    @property
    def _torch_name(self):
        return self._name

    def forward(self, input, hx=None, *, reset=None):
        # Each weight is read once per call, as torch.nn's cells do: a parametrized weight
        # (spectral_norm's power iteration, ...) is recomputed at every read.
        w = (self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        if reset is None and not self.zoneout and not (self.weight_drop and self.training):
            fast = self._fast_cell(input, hx, w)
            if fast is not None:
                return fast
        try:
            return self._forward_cell(input, hx, w, reset)
        except BadInputError as exc:
            raise _with_torch_message(exc, self, (input, hx)) from None

    def _fast_cell(self, input, hx, w):
        """The common CPU call, checked in a few comparisons: batched input and state that are
        already valid, no autocast, no compile, a backend that runs torch's own cell op on CPU. It
        computes exactly what _forward_cell would (torch.nn.*Cell's op, no casts); anything else
        returns None and takes the validating path, which raises the clear errors. Per-call
        Python cost matters for cells: at small sizes the op itself takes a few tens of us."""
        if (type(input) is not Tensor or not input.is_cpu or input.dim() != 2
                or input.shape[1] != self.input_size or torch.is_autocast_enabled("cpu")
                or torch.compiler.is_compiling() or requested_backend(self.backend) not in ("auto", "torch")):
            return None
        w_ih = w[0]
        dtype = input.dtype
        if dtype != w_ih.dtype or not w_ih.is_cpu:
            return None
        shape = (input.shape[0], self.hidden_size)
        if hx is None:
            h = input.new_zeros(shape)
            states = (h, input.new_zeros(shape)) if self._mode == "LSTM" else (h,)
        else:
            states = tuple(hx) if self._mode == "LSTM" and isinstance(hx, (tuple, list)) else (hx,)
            if len(states) != (2 if self._mode == "LSTM" else 1) or not all(
                    type(t) is Tensor and t.shape == shape and t.dtype == dtype and t.is_cpu for t in states):
                return None
        out = self._torch_cell(input, states, w)
        self._record("torch")
        return out if self._mode == "LSTM" else out[0]

    def _probe_key(self):
        return (self._name, self._mode)

    def _probe_dtypes(self, x, state_dtypes, w):
        """Output dtypes of torch's cell op for these dtypes under the current autocast."""
        xp = torch.zeros(1, self.input_size, dtype=x.dtype, device=x.device)
        states = [torch.zeros(1, self.hidden_size, dtype=dt, device=x.device) for dt in state_dtypes]
        out = self._torch_cell(xp, states, w)
        return tuple(t.dtype for t in out)

    def _forward_cell(self, input, hx, weights, reset=None):
        name = self._name
        is_lstm = self._mode == "LSTM"
        x, is_batched = _unpack_cell_input(name, input)
        weight_dtype = weights[0].dtype
        route = self._route(x.device)
        dtype, out_dtypes = self._call_dtypes(x, hx, route, weights, 2 if is_lstm else 1)
        x = _prepare_input(x, dtype, weight_dtype, self.input_size)
        B = x.shape[0]
        states = _cell_states(name, hx, x, dtype, self.hidden_size, 2 if is_lstm else 1, is_batched, reset)
        w = tuple(_cast_weights(weights, dtype))
        if self.weight_drop > 0 and self.training:
            w = (w[0], drop_weight(w[1], self.weight_drop)) + w[2:]
        kernels = []
        with _no_autocast(x) if dtype is not None else contextlib.nullcontext():
            if route == "torch":
                out = self._torch_cell(x, states, w)
            elif route == "reference" or B == 0:
                out = reference.cell_step(self._mode, x, tuple(states), w + (None,))
            else:
                out = run_layers(self._mode, x.unsqueeze(0), None, tuple(s.unsqueeze(0) for s in states),
                                 [w + (None,)], num_layers=1, bidirectional=False, dropout=0.0,
                                 training=self.training, route=route, kernel=self.kernel,
                                 last_kernels=kernels)[1]
                out = tuple(o.squeeze(0) for o in out)
            if self.zoneout > 0:  # around the cell op, on every backend
                out = cell_zoneout(self.zoneout, self.training, states[0], out)
        if out_dtypes is not None:
            out = tuple(t.to(d) for t, d in zip(out, out_dtypes))
        self._record(route, kernels)
        if not is_batched:
            out = tuple(o.squeeze(0) for o in out)
        return out if is_lstm else out[0]

    def extra_repr(self):
        s = super().extra_repr() + self._variants_repr()
        return s if self.backend == "auto" else s + f", backend={self.backend!r}"


class LSTMCell(_FusedCell, nn.LSTMCell):
    """Drop-in torch.nn.LSTMCell plus `backend`."""
    _mode, _name = "LSTM", "LSTMCell"

    def _torch_cell(self, x, states, w):
        return _VF.lstm_cell(x, tuple(states), *w)


class GRUCell(_FusedCell, nn.GRUCell):
    """Drop-in torch.nn.GRUCell plus `backend`."""
    _mode, _name = "GRU", "GRUCell"

    def _torch_cell(self, x, states, w):
        return (_VF.gru_cell(x, states[0], *w),)


class RNNCell(_FusedCell, nn.RNNCell):
    """Drop-in torch.nn.RNNCell (tanh or relu) plus `backend`."""
    _name = "RNNCell"

    def __init__(self, input_size, hidden_size, bias=True, nonlinearity="tanh", device=None, dtype=None,
                 *, backend="auto", zoneout=0.0, weight_drop=0.0):
        check_choice(backend, BACKENDS, "backend")
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")
        # nn.RNNCell's own signature (with nonlinearity), past _FusedCell.__init__
        TORCH_CLASSES["RNNCell"].__init__(self, input_size, hidden_size, bias, nonlinearity, device=device,
                                          dtype=dtype)
        self._init_backend(backend)
        self._init_variants(zoneout, weight_drop, layer=False)

    @property
    def _mode(self):
        return "RNN_TANH" if self.nonlinearity == "tanh" else "RNN_RELU"

    def _torch_cell(self, x, states, w):
        fn = _VF.rnn_tanh_cell if self.nonlinearity == "tanh" else _VF.rnn_relu_cell
        return (fn(x, states[0], *w),)
