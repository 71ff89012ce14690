"""GRU: the pointwise cell update and its gradient.

Shape legend: every argument is a (BLOCK_H, BLOCK_B) tile [units, batch], float32 (float64 for
float64 layers). Gate order r, z, n as torch.nn.GRU; hh_n = W_hn h + b_hn is kept separate from x_n
because n = tanh(x_n + r * hh_n), and it is saved for the backward (dr needs it).
"""
import triton
import triton.language as tl  # noqa: F401  (the interpreter requires it in a jit function's globals)

from .activations import sigmoid, tanh


@triton.jit
def gru_fwd(x_r, x_z, x_n, hh_r, hh_z, hh_n, h_prev):
    r = sigmoid(x_r + hh_r)
    z = sigmoid(x_z + hh_z)
    n = tanh(x_n + r * hh_n)
    h = (1.0 - z) * n + z * h_prev
    return h, r, z, n


@triton.jit
def gru_bwd(dh, r, z, n, hh_n, h_prev):
    """Returns the input-side pre-activation gradients (r, z, n), the hidden-side n gradient
    (dn * r: hh_n enters n scaled by r) and the direct term dh * z that reaches h_{t-1} without
    going through W_hh."""
    d_n = dh * (1.0 - z) * (1.0 - n * n)
    d_z = dh * (h_prev - n) * z * (1.0 - z)
    d_r = d_n * hh_n * r * (1.0 - r)
    return d_r, d_z, d_n, d_n * r, dh * z
