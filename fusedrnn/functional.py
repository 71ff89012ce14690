"""The multi-layer stack over padded, time-major sequences, for the "reference" backend and for the
``fusedrnn::layer`` op (Triton kernels, or their PyTorch implementation under torch.compile).

Shapes: x (T, B, I) time-major and zero-padded; lengths (B,) int64 on x's device or None;
hx = (h0,) or (h0, c0) with h0 (L*D, B, P), c0 (L*D, B, H).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from . import reference
from .dispatch import choose_kernel
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


def _stack(tensors):
    if tensors[0] is None:
        return None
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


def run_layers(mode, x, lengths, hx, weights, *, num_layers, bidirectional, dropout, training,
               route, kernel="auto", last_kernels=None):
    """Run the stack on `route` (fusedrnn.dispatch): "reference", "triton" or "loop".

    Returns y (T, B, D*P) and a tuple of final states shaped like hx. `last_kernels`, when a list,
    receives the kernel chosen for each layer.
    """
    if route == "reference":
        y, state = reference.rnn(mode, x, hx, weights, num_layers, bidirectional, lengths, dropout,
                                 training)
        return y, (state if mode == "LSTM" else (state,))
    D = 2 if bidirectional else 1
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
                               w_hh.shape[2], layer_in.dtype, layer_in.device)
        if last_kernels is not None:
            last_kernels.append(chosen)
        if not torch.compiler.is_compiling():
            log.debug("fusedrnn: %s layer %d runs kernel %s", mode, layer, chosen)
        y, hn, cn, *_ = torch.ops.fusedrnn.layer(layer_in, w_ih, b_ih, w_hh, b_hh, w_hr, h0, c0,
                                                 lengths, mode, chosen, save, allow_tf32)
        finals[0].append(hn)
        if mode == "LSTM":
            finals[1].append(cn)
        layer_in = y
        if dropout > 0 and training and layer < num_layers - 1:
            layer_in = F.dropout(layer_in, dropout, training=True)
    return layer_in, tuple(torch.cat(f) for f in finals)
