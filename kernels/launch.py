"""What every launcher shares: argument checks, allocation, and the launch itself (counted).

A launcher (kernels/scan.py, kernels/barrier.py) checks its arguments, allocates its outputs and
lists its launches as `Launch` records (keyword arguments, absent tensors as None); `run` launches
them. kernels/aot.py reads the same records on meta tensors to compile every configuration.
"""
import contextlib
import os
from dataclasses import dataclass

import torch
from triton.runtime.autotuner import Heuristics

from fusedrnn.spec import FLOAT_DTYPES

_LAUNCHES = 0
_POISON = False


@dataclass(frozen=True)
class Launch:
    kernel: object   # a @triton.jit function, possibly wrapped by @triton.heuristics
    grid: tuple
    args: dict       # every argument by name, constexprs included; absent tensors are None
    num_warps: int


def resolve(kernel, args):
    """(the @triton.jit function, args plus the constexprs its @triton.heuristics derive). The
    rules run once per launcher call instead of once per launch: Heuristics.run rebuilds the whole
    argument dict for every rule at every launch (~7 us of host time per stepwise step)."""
    args = dict(args)
    while isinstance(kernel, Heuristics):
        for name, rule in kernel.values.items():
            args[name] = rule(args)
        kernel = kernel.fn
    return kernel, args


def launch_device(launch):
    """The CUDA device of a launch's tensors, or None (CPU under the interpreter, meta)."""
    for value in launch.args.values():
        if isinstance(value, torch.Tensor) and value.is_cuda:
            return value.device
    return None


def run(launches):
    """Launch each record on its tensors' own device and that device's current stream: Triton
    launches on torch's current device, so without the guard a layer on cuda:1 would launch on
    device 0 (and read memory it cannot address)."""
    global _LAUNCHES
    device = None
    for launch in launches:
        if device is None:
            device = launch_device(launch)
        with torch.cuda.device(device) if device is not None else contextlib.nullcontext():
            launch.kernel[launch.grid](**launch.args, num_warps=launch.num_warps)
        _LAUNCHES += 1


def launch_count():
    """Total Triton kernel launches made by the launchers so far."""
    return _LAUNCHES


def set_poison(flag):
    """Test hook: fill every tensor the launchers allocate with NaN (ints with -1) before the
    kernels run, so a test sees any element a kernel failed to write."""
    global _POISON
    _POISON = bool(flag)


def new(shape, dtype, device):
    out = torch.empty(shape, dtype=dtype, device=device)
    if _POISON and out.numel():
        out.fill_(float("nan") if out.is_floating_point() else -1)
    return out


def interpreted():
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_device(name, t):
    if t.device.type in ("cuda", "meta"):  # meta: kernels/aot.py lists configurations, never launches
        return
    if t.device.type == "cpu" and interpreted():
        return
    raise ValueError(f"{name} is on {t.device}: the Triton kernels need CUDA tensors "
                     "(or CPU tensors with TRITON_INTERPRET=1)")


def check_float(name, x, ndim):
    """x is a floating-point tensor of `ndim` dimensions on a device the kernels can run on."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    check_device(name, x)


def check_tensor(name, t, shape, dtype, device, optional=False):
    """t has this shape, dtype and device and is contiguous (or is None, when optional)."""
    if t is None:
        if optional:
            return
        raise ValueError(f"{name} must be a tensor, got None")
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise ValueError(f"{name} must have dtype {dtype}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
