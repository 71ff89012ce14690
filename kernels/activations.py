"""Activations shared by the cell functions.

Shape legend: any; the functions are elementwise.

Both work in the dtype of their argument, which the callers make float32 (float64 for float64
layers): half-precision inputs are upcast before they get here, because the interpreter cannot do
bf16 arithmetic and because the state must not be rounded to 8 mantissa bits every step.
No libdevice / inline asm: the interpreter (CPU tests) cannot run them.
"""
import triton
import triton.language as tl


@triton.jit
def sigmoid(x):
    # exp(-x) overflows to inf for x << 0, giving 1 / inf = 0: the right limit, no NaN.
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def tanh(x):
    # 2*sigmoid(2x) - 1 saturates cleanly to +-1; the ratio (e^x - e^-x) / (e^x + e^-x) is inf/inf
    # = NaN once e^|x| overflows (|x| ~ 45 in float32).
    return 2.0 * sigmoid(2.0 * x) - 1.0
