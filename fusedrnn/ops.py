"""One custom op per layer: ``fusedrnn::layer`` and its backward ``fusedrnn::layer_backward``.

Registered with torch.library so that torch.compile sees one opaque node per layer whatever the
sequence length (a Python time loop would be unrolled: compile time would grow with T, and torch's
own RNN ops cannot be traced at all). The ops are ``custom_op``s rather than ``triton_op``s on
purpose: a triton_op's body is traced by the compiler, and the stepwise kernel's T launches would
then be unrolled into the graph.

The ``kernel`` argument picks the implementation of the scan contract (docs/design.md):
"stepwise" / "persistent" run the Triton kernels, "loop" runs fusedrnn/loop.py (the PyTorch step
loop, used under torch.compile on CPU). The input projection before the scan and
the weight/input gradients after it are large matmuls done by torch (cuBLAS on GPU).

Shapes: x (T, B, I); w_ih (D, GH, I); b_ih, b_hh (D, GH); w_hh (D, GH, P); w_hr (D, P, H);
h0 (D, B, P); c0 (D, B, H); lengths (B,) int64.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import loop
from .dispatch import kernels
from .spec import GATES, LOOP_KERNEL, saved_widths, work_dtype


def _empty(like, dtype=None):
    return like.new_empty(0, dtype=dtype)


def _scan(kernel, allow_tf32):
    """(forward, backward, keyword arguments) of the scan implementation named by `kernel`."""
    if kernel == LOOP_KERNEL:
        return loop.scan_forward, loop.scan_backward, {}
    k = kernels()
    return k.scan_forward, k.scan_backward, {"kernel": kernel, "allow_tf32": allow_tf32}


def _input_projection(x, w_ih, b_ih):
    T, B, I = x.shape
    D, GH, _ = w_ih.shape
    x2 = x.reshape(1, T * B, I).expand(D, T * B, I)
    if b_ih is None:
        xg = torch.bmm(x2, w_ih.transpose(1, 2))
    else:
        xg = torch.baddbmm(b_ih.unsqueeze(1), x2, w_ih.transpose(1, 2))
    return xg.view(D, T, B, GH)


@torch.library.custom_op("fusedrnn::layer", mutates_args=())
def layer(x: Tensor, w_ih: Tensor, b_ih: Optional[Tensor], w_hh: Tensor, b_hh: Optional[Tensor],
          w_hr: Optional[Tensor], h0: Tensor, c0: Optional[Tensor], lengths: Optional[Tensor],
          mode: str, kernel: str, save: bool, allow_tf32: bool
          ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One layer, all directions: returns y, hn, cn, and the workspace hp, gates, cs."""
    forward, _, kw = _scan(kernel, allow_tf32)
    xg = _input_projection(x, w_ih, b_ih)
    return tuple(forward(mode, xg, w_hh.contiguous(), b_hh, w_hr, h0.contiguous(),
                         None if c0 is None else c0.contiguous(), lengths, save, **kw))


@layer.register_fake
def _layer_fake(x, w_ih, b_ih, w_hh, b_hh, w_hr, h0, c0, lengths, mode, kernel, save, allow_tf32):
    T, B, _ = x.shape
    D, GH, P = w_hh.shape
    H = GH // GATES[mode]
    wdt = work_dtype(x.dtype)
    y = x.new_empty(T, B, D * P)
    hn = x.new_empty(D, B, P)
    cn = x.new_empty(D, B, H) if mode == "LSTM" else _empty(x)
    if not save:
        return y, hn, cn, _empty(x, wdt), _empty(x, wdt), _empty(x, wdt)
    W, C = saved_widths(mode, H)
    return (y, hn, cn, x.new_empty(D, T, B, P, dtype=wdt), x.new_empty(D, T, B, W, dtype=wdt),
            x.new_empty(D, T, B, C, dtype=wdt))


@torch.library.custom_op("fusedrnn::layer_backward", mutates_args=())
def layer_backward(dy: Tensor, dhn: Tensor, dcn: Optional[Tensor], x: Tensor, w_ih: Tensor,
                   w_hh: Tensor, w_hr: Optional[Tensor], lengths: Optional[Tensor], hp: Tensor,
                   gates: Tensor, cs: Tensor, mode: str, kernel: str, has_bias: bool,
                   allow_tf32: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of `layer`: dx, dw_ih, db_ih, dw_hh, db_hh, dw_hr, dh0, dc0 (empty when absent)."""
    _, backward, kw = _scan(kernel, allow_tf32)
    dxg, dgh, dh0, dc0, dhp = backward(mode, dy.contiguous(), dhn.contiguous(),
                                       None if dcn is None else dcn.contiguous(),
                                       w_hh.contiguous(), w_hr, lengths, hp, gates, cs, **kw)
    T, B, I = x.shape
    D, GH, P = w_hh.shape
    dt = x.dtype
    dxg2 = dxg.reshape(D, T * B, GH)
    dgh2 = dgh.reshape(D, T * B, GH)
    dx = torch.bmm(dxg2, w_ih).sum(0).view(T, B, I)
    dw_ih = torch.bmm(dxg2.transpose(1, 2), x.reshape(1, T * B, I).expand(D, T * B, I))
    dw_hh = torch.bmm(dgh2.transpose(1, 2), hp.reshape(D, T * B, P).to(dt))
    if has_bias:
        db_ih = dxg2.sum(1, dtype=hp.dtype).to(dt)
        db_hh = dgh2.sum(1, dtype=hp.dtype).to(dt)
    else:
        db_ih, db_hh = _empty(x), _empty(x)
    if w_hr is not None:
        i, f, g, o = gates.chunk(4, dim=-1)
        h_raw = (o * torch.tanh(f * cs + i * g)).to(dt)
        dw_hr = torch.bmm(dhp.reshape(D, T * B, P).transpose(1, 2), h_raw.reshape(D, T * B, -1))
    else:
        dw_hr = _empty(x)
    return dx, dw_ih, db_ih, dw_hh, db_hh, dw_hr, dh0, dc0


@layer_backward.register_fake
def _layer_backward_fake(dy, dhn, dcn, x, w_ih, w_hh, w_hr, lengths, hp, gates, cs, mode, kernel,
                         has_bias, allow_tf32):
    D, GH, P = w_hh.shape
    H = GH // GATES[mode]
    B = x.shape[1]
    db = x.new_empty(D, GH) if has_bias else _empty(x)
    # new_empty, not empty_like: the real outputs are contiguous whatever the inputs' strides
    # (a batch_first layer passes a transposed x), and inductor asserts the fake strides.
    return (x.new_empty(x.shape), x.new_empty(w_ih.shape), db, x.new_empty(w_hh.shape), db.clone(),
            x.new_empty(w_hr.shape) if w_hr is not None else _empty(x), x.new_empty(D, B, P),
            x.new_empty(D, B, H) if mode == "LSTM" else _empty(x))


def _setup_context(ctx, inputs, output):
    x, w_ih, b_ih, w_hh, b_hh, w_hr, h0, c0, lengths, mode, kernel, save, allow_tf32 = inputs
    _, hn, cn, hp, gates, cs = output
    ctx.save_for_backward(x, w_ih, w_hh, w_hr, lengths, hp, gates, cs)
    ctx.config = (mode, kernel, save, allow_tf32, b_ih is not None)
    ctx.state_shapes = (hn.shape, cn.shape)


def _backward(ctx, dy, dhn, dcn, *_workspace_grads):
    mode, kernel, save, allow_tf32, has_bias = ctx.config
    if not save:
        raise RuntimeError("fusedrnn: this layer ran without saving activations for backward "
                           "(save=False); run it with gradients enabled to differentiate it")
    x, w_ih, w_hh, w_hr, lengths, hp, gates, cs = ctx.saved_tensors
    if dy is None:
        dy = x.new_zeros(x.shape[0], x.shape[1], w_hh.shape[0] * w_hh.shape[2])
    if dhn is None:
        dhn = x.new_zeros(ctx.state_shapes[0])
    if mode == "LSTM" and dcn is None:
        dcn = x.new_zeros(ctx.state_shapes[1])
    if mode != "LSTM":
        dcn = None
    dx, dw_ih, db_ih, dw_hh, db_hh, dw_hr, dh0, dc0 = layer_backward(
        dy, dhn, dcn, x, w_ih, w_hh, w_hr, lengths, hp, gates, cs, mode, kernel, has_bias, allow_tf32)
    return (dx, dw_ih, db_ih if has_bias else None, dw_hh, db_hh if has_bias else None,
            dw_hr if w_hr is not None else None, dh0, dc0 if mode == "LSTM" else None,
            None, None, None, None, None)


torch.library.register_autograd("fusedrnn::layer", _backward, setup_context=_setup_context)
