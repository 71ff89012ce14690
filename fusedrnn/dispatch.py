"""Which implementation runs a layer. The rules (docs/design.md, "Dispatch"):

Route (what runs a module call; recorded as ``module.last_backend``):
- The module's ``backend`` "auto" (the default) is replaced by $FUSEDRNN_BACKEND when that is set.
- "auto" means "triton" for CUDA tensors when the Triton kernels can run there, else "torch".
- "torch" runs torch's own fused RNN ops (what torch.nn runs: cuDNN on a GPU). torch.compile cannot
  trace them, so under torch.compile "auto" becomes "loop": the fusedrnn::layer op with its PyTorch
  step loop (fusedrnn/loop.py); an explicit "torch" raises there.
- "reference" runs fusedrnn/reference.py with autograd; "triton" the fusedrnn::layer op with a
  Triton kernel.
- An explicitly requested backend that cannot run raises BackendUnavailableError; nothing falls
  back silently.
- Under torch.func.vmap "auto" that would be "torch" becomes "loop" too (torch's RNN ops have no
  batching rule; the fusedrnn::layer op has one); an explicit "torch" raises there.
- While torch.jit.trace or an ONNX exporter records, every backend takes the "torch" route: the
  graph holds torch's own RNN op, which those exporters know (fusedrnn/export.py).

Kernel (which implementation of the scan runs inside the fusedrnn::layer op; ``last_kernels``):
- "loop" for the "loop" route; on the "triton" route "persistent" when
  fusedrnn.kernels.plan_for() can hold the layer on this device with the variants it runs with
  (zoneout, reset: their tiles count), else "stepwise".
- The module's ``kernel`` attribute, or $FUSEDRNN_KERNEL when that is "auto", forces "stepwise" or
  "persistent"; a persistent kernel that cannot hold the layer raises.
- While torch.compile / torch.export trace, the choice is left to the op ("auto", resolved inside
  it from the concrete sizes), so that a traced graph does not specialize on the batch size.

Nothing here touches a device or imports Triton at import time.
"""
from __future__ import annotations

import functools
import os
import warnings

import torch

from .errors import BackendUnavailableError
from .spec import BACKENDS, KERNEL_CHOICES, LOOP_KERNEL, check_choice

ROUTES = ("torch", "reference", "triton", "loop")


def requested_backend(backend):
    """The module's backend with the $FUSEDRNN_BACKEND override applied to "auto"."""
    if backend == "auto":
        env = os.environ.get("FUSEDRNN_BACKEND", "").strip()
        if env:
            return check_choice(env, BACKENDS, "FUSEDRNN_BACKEND")
    return backend


def interpreted():
    """Whether Triton runs kernels through its interpreter (decided when the kernels are defined)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _load_kernels():
    """Import the Triton kernels once: (module, TRITON_INTERPRET at import, error or None)."""
    at_import = interpreted()
    try:
        from . import kernels as module
    except Exception as exc:  # noqa: BLE001 - any import failure means "Triton unusable", with why
        return None, at_import, f"{type(exc).__name__}: {exc}"
    return module, at_import, None


def kernels():
    """The fusedrnn.kernels package, or a BackendUnavailableError saying why it cannot load."""
    module, _, error = _load_kernels()
    if module is None:
        raise BackendUnavailableError(f"backend='triton' needs Triton, which failed to import ({error})")
    return module


def triton_problem(device):
    """None when the Triton kernels can run on `device`, else the reason they cannot."""
    module, at_import, error = _load_kernels()
    if module is None:
        return f"Triton failed to import ({error})"
    if device.type == "cuda":
        if at_import:
            return "TRITON_INTERPRET=1 was set when the kernels were imported; they run on CPU tensors only"
        return None
    if device.type == "cpu":
        if at_import:
            return None
        return ("CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 before fusedrnn's "
                "kernels are first used (or move the module to a CUDA device)")
    return f"Triton kernels do not support device type {device.type!r}"


@torch.compiler.assume_constant_result
def onnx_exporting():
    """torch.onnx.is_in_onnx_export(), also when read inside a graph that dynamo traces (the
    dynamo-based ONNX exporter's strict strategy): dynamo folds that call to False, while an
    assume_constant_result function is run at trace time and its value kept."""
    return torch.onnx.is_in_onnx_export()


def exporting_torch_ops(compiling):
    """Whether the call is being recorded by an exporter that knows torch's RNN ops and not
    fusedrnn's: torch.jit.trace (which the TorchScript-based ONNX exporter runs) or the dynamo-based
    ONNX exporter (which runs torch.export, so `compiling` is true: only then is the ONNX flag,
    ~4 us a read, worth reading)."""
    # torch.jit.is_tracing, not the faster torch._C._is_tracing: dynamo folds only the former.
    return torch.jit.is_tracing() or (compiling and onnx_exporting())


def vmapping():
    """Whether a torch.func.vmap is active (torch's RNN ops have no batching rule)."""
    if not torch._C._are_functorch_transforms_active():
        return False
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
    from torch._C._functorch import TransformType
    return any(i.key() == TransformType.Vmap for i in retrieve_all_functorch_interpreters())


_WARNED = set()


def _warn_once(message):
    """A RuntimeWarning the first time this process meets `message` (auto's fallback to torch's op
    on a GPU is a choice the user should hear about, once, not on every call)."""
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def resolve(backend, device, compiling=False):
    """The route of one call: "torch", "reference", "triton" or "loop" (see the module docstring)."""
    if exporting_torch_ops(compiling):
        # Export must not depend on the kernels: ONNX and TorchScript record torch's own RNN op.
        return "torch"
    requested = requested_backend(backend)
    route = requested
    if requested == "auto":
        route = "torch"
        if device.type == "cuda":
            problem = triton_problem(device)
            if problem is None:
                route = "triton"
            else:
                _warn_once(f"fusedrnn: backend='auto' runs torch's own RNN op on {device.type}: the "
                           f"Triton kernels cannot run there ({problem})")
    elif requested == "triton":
        problem = triton_problem(device)
        if problem is not None:
            raise BackendUnavailableError(f"backend='triton' cannot run: {problem}")
    if compiling and route == "torch":
        if requested == "torch":
            raise BackendUnavailableError(
                "backend='torch' calls torch's fused RNN ops, which torch.compile cannot trace; "
                "use backend='auto' (it compiles to the fusedrnn::layer op) or 'reference'")
        return "loop"
    if route == "torch" and vmapping():
        if requested == "torch":
            raise BackendUnavailableError(
                "backend='torch' calls torch's fused RNN ops, which have no torch.func.vmap batching "
                "rule; use backend='auto' (it runs the fusedrnn::layer op, which has one) or 'reference'")
        return "loop"
    return route


def choose_kernel(route, kernel, mode, D, B, H, P, dtype, device, zoneout=False, reset=False):
    """The kernel of one layer on `route` ("triton" or "loop"); see the module docstring. zoneout /
    reset: whether the layer runs with those variants (the persistent plan counts their tiles)."""
    if route == "loop":
        return LOOP_KERNEL
    env = os.environ.get("FUSEDRNN_KERNEL", "").strip()
    if kernel == "auto" and env:
        kernel = check_choice(env, KERNEL_CHOICES, "FUSEDRNN_KERNEL")
    if kernel == "stepwise":
        return kernel
    if torch.compiler.is_compiling():
        # A traced graph (torch.compile, torch.export) must not read the batch size here: the
        # op resolves "auto" itself from the concrete sizes (fusedrnn/ops.py).
        return kernel
    if kernels().plan_for(mode, D, B, H, P, dtype, device, zoneout=zoneout, reset=reset) is not None:
        return "persistent"
    if kernel == "persistent":
        variants = "".join(f", {n}" for n, on in (("zoneout", zoneout), ("reset", reset)) if on)
        raise BackendUnavailableError(
            f"kernel='persistent' cannot hold this layer (mode={mode}, directions={D}, batch={B}, "
            f"hidden={H}, proj={P if P != H else 0}, dtype={dtype}{variants}) on {device}; use kernel='stepwise'")
    return "stepwise"
