"""The multi-layer stack over padded, time-major sequences, for the "reference" backend and for the
``fusedrnn::layer`` op (Triton kernels, or their PyTorch implementation under torch.compile).

Shapes: x (T, B, I) time-major and zero-padded; lengths (B,) int64 on x's device or None;
hx = (h0,) or (h0, c0) with h0 (L*D, B, P), c0 (L*D, B, H).

Also the argument handling of the variants (zoneout, weight_drop, reset; issue 12), shared by the
modules: checks that name the argument, the masks drawn with torch's RNG, and the dropped weights.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from . import reference
from .dispatch import choose_kernel
from .errors import DtypeMismatchError, InputShapeError
from .spec import GATES

log = logging.getLogger("fusedrnn")


def layer_weights(flat_weights, num_layers, D, has_bias, has_proj):
    """Per (layer, direction): (w_ih, w_hh, b_ih, b_hh, w_hr) with None where absent."""
    per = 2 + 2 * has_bias + has_proj
    out = []
    for k in range(num_layers * D):
        w = flat_weights[k * per:(k + 1) * per]
        b_ih, b_hh = (w[2], w[3]) if has_bias else (None, None)
        out.append((w[0], w[1], b_ih, b_hh, w[-1] if has_proj else None))
    return out


# --------------------------------------------------------------------------------- the variants
def check_probability(name, value):
    """value as a float if it is a number in [0, 1), else a ValueError naming the argument. 1 is
    refused: zoneout=1 would never update the state, and weight_drop=1 would scale by 1/0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a probability in [0, 1), got {value!r}")
    return float(value)


def check_zoneout_proj(zoneout, proj_size):
    if zoneout > 0 and proj_size > 0:
        raise ValueError(f"zoneout={zoneout} cannot be combined with proj_size={proj_size}: zoneout of "
                         "a projected LSTM state is not implemented (use one or the other)")


def check_reset(reset, expected_shape, layout, device):
    """reset: a bool tensor of `expected_shape` on `device` (layout says what the dimensions are,
    for the message), else InputShapeError / DtypeMismatchError naming it. Returns it."""
    if not isinstance(reset, torch.Tensor):
        raise InputShapeError(f"reset must be a bool Tensor of shape {tuple(expected_shape)} ({layout}), "
                              f"got an object of type {type(reset).__name__}")
    if reset.dtype != torch.bool:
        raise DtypeMismatchError(f"reset must have dtype torch.bool, got {reset.dtype}")
    if tuple(reset.shape) != tuple(expected_shape):
        raise InputShapeError(f"reset must have shape {tuple(expected_shape)} ({layout}), got "
                              f"{tuple(reset.shape)}")
    if reset.device != device:
        raise InputShapeError(f"reset must be on the same device as input ({device}), got {reset.device}")
    return reset


def zoneout_mask(p, shape, device):
    """The training mask of zoneout: True (keep h_{t-1}) with probability p per element, drawn from
    torch's default generator of `device` (torch.manual_seed makes it reproducible)."""
    return torch.rand(shape, device=device) < p


def drop_weight(w, p):
    """DropConnect of one recurrent weight (AWD-LSTM's WeightDrop): each element zeroed with
    probability p and the rest scaled by 1 / (1 - p); differentiable, so the gradient reaches the
    raw weight through the same mask."""
    return F.dropout(w, p, training=True)


def drop_recurrent_weights(flat, num_layers, D, has_bias, has_proj, p):
    """The flat weight list of a layer stack with every W_hh replaced by drop_weight(W_hh, p): one
    mask per W_hh per call, shared over time and batch."""
    per = 2 + 2 * has_bias + has_proj
    flat = list(flat)
    for k in range(num_layers * D):
        flat[k * per + 1] = drop_weight(flat[k * per + 1], p)
    return flat


def _stack(tensors):
    if tensors[0] is None:
        return None
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


def run_layers(mode, x, lengths, hx, weights, *, num_layers, bidirectional, dropout, training,
               route, kernel="auto", last_kernels=None, zoneout=0.0, reset=None):
    """Run the stack on `route` (fusedrnn.dispatch): "reference", "triton" or "loop".

    Returns y (T, B, D*P) and a tuple of final states shaped like hx. `last_kernels`, when a list,
    receives the kernel chosen for each layer. zoneout: the probability p (training: masks drawn
    here, every layer's before the first layer runs, so every route consumes the random stream
    alike; eval: the expectation); reset: None or the (T, B) bool mask, time-major.
    """
    D = 2 if bidirectional else 1
    T, B = x.shape[0], x.shape[1]
    zoneouts = [None] * num_layers
    if zoneout > 0:
        P = hx[0].shape[-1]
        zoneouts = ([zoneout_mask(zoneout, (D, T, B, P), x.device) for _ in range(num_layers)]
                    if training else [zoneout] * num_layers)
    if route == "reference":
        y, state = reference.rnn(mode, x, hx, weights, num_layers, bidirectional, lengths, dropout,
                                 training, zoneout=zoneouts if zoneout > 0 else None, reset=reset)
        return y, (state if mode == "LSTM" else (state,))
    resets = None
    if reset is not None:
        # per direction, indexed by time (the reverse direction's shifted: reference.reset_for_direction)
        resets = torch.stack([reference.reset_for_direction(reset, lengths, d == 1) for d in range(D)])
    allow_tf32 = bool(torch.backends.cuda.matmul.allow_tf32)
    finals = [[] for _ in hx]
    layer_in = x
    for layer in range(num_layers):
        ws = weights[layer * D:(layer + 1) * D]
        w_ih, w_hh, b_ih, b_hh, w_hr = (_stack([w[i] for w in ws]) for i in range(5))
        h0 = hx[0][layer * D:(layer + 1) * D]
        c0 = hx[1][layer * D:(layer + 1) * D] if mode == "LSTM" else None
        save = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (layer_in, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0))
        chosen = choose_kernel(route, kernel, mode, D, layer_in.shape[1], w_hh.shape[1] // GATES[mode],
                               w_hh.shape[2], layer_in.dtype, layer_in.device, zoneout=zoneout > 0,
                               reset=resets is not None)
        if last_kernels is not None:
            last_kernels.append(chosen)
        if not torch.compiler.is_compiling():
            log.debug("fusedrnn: %s layer %d runs kernel %s", mode, layer, chosen)
        args = (layer_in, w_ih, b_ih, w_hh, b_hh, w_hr, h0, c0, lengths, mode, chosen, save, allow_tf32)
        if zoneout > 0 or resets is not None:
            z = zoneouts[layer]
            args += (z, 0.0, resets) if isinstance(z, torch.Tensor) else (None, z or 0.0, resets)
        y, hn, cn, *_ = torch.ops.fusedrnn.layer(*args)
        finals[0].append(hn)
        if mode == "LSTM":
            finals[1].append(cn)
        layer_in = y
        if dropout > 0 and training and layer < num_layers - 1:
            layer_in = F.dropout(layer_in, dropout, training=True)
    return layer_in, tuple(torch.cat(f) for f in finals)


def cell_zoneout(p, training, h_prev, out):
    """A cell's outputs with zoneout applied to h (out[0]): h' = z·h_prev + (1 − z)·h~, z a fresh
    Bernoulli(p) mask in training, p in eval (LSTM: h only, c untouched)."""
    h_new = out[0]
    if training:
        h_new = torch.where(zoneout_mask(p, h_new.shape, h_new.device), h_prev, h_new)
    else:
        h_new = p * h_prev + (1 - p) * h_new
    return (h_new,) + tuple(out[1:])


def to_padded(x, batch_sizes, B, T, batch_first):
    """A layer's input as padded time-major (T, B, I), with its lengths and, for packed input, the
    flat positions of the packed rows (for from_padded). Packed data is ordered time-major with the
    live rows of each step first: exactly the order of the True entries of the (T, B) mask below; a
    stable argsort finds their flat positions with a static shape (N = rows of packed data), which
    torch.compile traces."""
    if batch_sizes is None:
        return (x.transpose(0, 1) if batch_first else x), None, None
    mask = (torch.arange(B)[None, :] < batch_sizes[:, None]).to(x.device)
    rows = torch.argsort((~mask).flatten().to(torch.uint8), stable=True)[:x.shape[0]]
    padded = x.new_zeros(T * B, x.shape[-1]).index_copy(0, rows, x).view(T, B, -1)
    return padded, mask.sum(0), rows


def from_padded(y, rows, batch_first):
    """The stack's padded time-major output in the input's layout (inverse of to_padded)."""
    if rows is not None:
        return y.reshape(-1, y.shape[-1]).index_select(0, rows)
    return y.transpose(0, 1) if batch_first else y
