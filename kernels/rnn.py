"""Elman RNN (tanh / relu): the pointwise cell update and its gradient.

Shape legend: every argument is a (BLOCK_H, BLOCK_B) tile [units, batch], float32 (float64 for
float64 layers). The backward needs only h_t (saved as the single `gates` column block).
"""
import triton
import triton.language as tl

from .activations import tanh


@triton.jit
def rnn_fwd(pre, RELU: tl.constexpr):
    if RELU:
        h = tl.maximum(pre, 0.0)
    else:
        h = tanh(pre)
    return h


@triton.jit
def rnn_bwd(dh, h, RELU: tl.constexpr):
    if RELU:
        d = tl.where(h > 0.0, dh, 0.0)
    else:
        d = dh * (1.0 - h * h)
    return d
