"""The shared vocabulary: one definition of each name every part of fusedrnn uses.

Imports torch only (no Triton, no other fusedrnn module), so the kernels, the runtime and the
tools can all depend on it without cycles.

Words:
    mode      the recurrence a layer computes: "LSTM", "GRU", "RNN_TANH", "RNN_RELU" (torch.nn's own
              names, as in nn.RNNBase.mode)
    cell      a command-line name of a module: "lstm", "gru", "rnn_tanh", "rnn_relu" (layers) and
              "lstmcell", "grucell", "rnncell" (single-step cells)
    backend   who runs a module: "auto", "torch" (torch's fused ops), "reference", "triton"
    kernel    which implementation runs the scan of one layer inside the fusedrnn::layer op:
              "stepwise" / "persistent" (Triton) or "loop" (the PyTorch step loop, fusedrnn/loop.py)
    pass      what a benchmark times: "forward", "backward", "fwdbwd", "inference"
    dtype name   "fp64", "fp32", "bf16", "fp16" (aliases: "float64", "double", "float32", ...)
"""
from __future__ import annotations

import torch

MODES = ("LSTM", "GRU", "RNN_TANH", "RNN_RELU")
# Gates per hidden unit: LSTM i, f, g, o; GRU r, z, n; Elman one pre-activation.
GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}

BACKENDS = ("auto", "torch", "reference", "triton")
TRITON_KERNELS = ("stepwise", "persistent")
LOOP_KERNEL = "loop"
# What a module's `kernel=` attribute (and $FUSEDRNN_KERNEL) may request.
KERNEL_CHOICES = ("auto",) + TRITON_KERNELS

LAYER_CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")
STEP_CELLS = ("lstmcell", "grucell", "rnncell")
CELLS = LAYER_CELLS + STEP_CELLS
CELL_MODE = {"lstm": "LSTM", "gru": "GRU", "rnn_tanh": "RNN_TANH", "rnn_relu": "RNN_RELU",
             "lstmcell": "LSTM", "grucell": "GRU", "rnncell": "RNN_TANH"}

PASSES = ("forward", "backward", "fwdbwd", "inference")

DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_ALIASES = {"float64": "fp64", "double": "fp64", "float32": "fp32", "float": "fp32",
                 "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
DTYPE_CHOICES = tuple(DTYPES) + tuple(DTYPE_ALIASES)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
HALF_DTYPES = (torch.float16, torch.bfloat16)


def dtype_name(name):
    """The canonical dtype name ("fp32", ...) of a name, an alias or a torch.dtype."""
    if isinstance(name, torch.dtype):
        if name not in DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {', '.join(map(str, DTYPES.values()))}, got {name}")
        return DTYPE_NAMES[name]
    key = str(name).strip().lower()
    key = DTYPE_ALIASES.get(key, key)
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return key


def parse_dtype(name):
    """The torch.dtype of a dtype name, alias or torch.dtype."""
    return DTYPES[dtype_name(name)]


def work_dtype(dtype):
    """dtype of the recurrent state and the saved workspace: float32, float64 for float64 layers."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def saved_widths(mode, H):
    """Widths (W, C) of the saved workspace `gates` (D, T, B, W) and `cs` (D, T, B, C):
    LSTM saves i, f, g, o and c_prev; GRU r, z, n and W_hn h + b_hn; Elman only h_t."""
    if mode == "LSTM":
        return 4 * H, H
    if mode == "GRU":
        return 4 * H, 0
    return H, 0


def check_choice(value, choices, name):
    """value if it is one of choices, else a ValueError naming the argument and what was got."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value
