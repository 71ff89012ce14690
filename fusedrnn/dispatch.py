"""Which implementation runs a layer: backend names, the FUSEDRNN_BACKEND override, and the
choice between the stepwise and the persistent Triton kernels.

Rules (also in docs/design.md):
- backend "auto" (the default) is replaced by $FUSEDRNN_BACKEND when that is set.
- "auto" then means: Triton kernels for CUDA tensors when Triton imports, otherwise "torch".
- "torch" is torch's own fused RNN ops (what torch.nn runs). torch.compile cannot trace them, so
  "auto" on a non-CUDA device compiles to the fusedrnn::layer op with its PyTorch implementation,
  while an explicit "torch" under torch.compile raises.
- An explicitly requested backend that cannot run raises; nothing falls back silently.
- Triton kernel: "persistent" when fusedrnn.kernels.persistent_plan() can hold the layer on this
  device, else "stepwise"; $FUSEDRNN_KERNEL (stepwise|persistent) or the module attribute `kernel`
  overrides the choice, and an impossible override raises.
Nothing here touches the device at import time.
"""
from __future__ import annotations

import functools
import importlib
import logging
import os

import torch

BACKENDS = ("auto", "torch", "reference", "triton")
KERNELS = ("auto", "stepwise", "persistent")
log = logging.getLogger("fusedrnn")


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here."""


def check_choice(value, choices, name):
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def requested_backend(backend):
    """The module's backend with the environment override applied to "auto"."""
    if backend == "auto":
        env = os.environ.get("FUSEDRNN_BACKEND", "").strip()
        if env:
            return check_choice(env, BACKENDS, "FUSEDRNN_BACKEND")
    return backend


@functools.lru_cache(maxsize=None)
def _import_kernels():
    """Import the Triton kernels once; returns (module, interpreted, error message or None)."""
    interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"
    try:
        try:
            module = importlib.import_module("fusedrnn.kernels")
        except ModuleNotFoundError as exc:
            if exc.name != "fusedrnn.kernels":
                raise
            module = _import_kernels_from_checkout()
    except Exception as exc:  # noqa: BLE001 - any import failure means "Triton unusable", with why
        return None, interpreted, f"{type(exc).__name__}: {exc}"
    return module, interpreted, None


def _import_kernels_from_checkout():
    """A source checkout used without `pip install` (PYTHONPATH=.): kernels/ sits beside fusedrnn/."""
    import importlib.util
    import sys
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
    init = os.path.join(path, "__init__.py")
    if not os.path.exists(init):
        raise ModuleNotFoundError("fusedrnn.kernels is not installed and no kernels/ directory "
                                  "was found beside the fusedrnn package", name="fusedrnn.kernels")
    spec = importlib.util.spec_from_file_location("fusedrnn.kernels", init,
                                                  submodule_search_locations=[path])
    module = importlib.util.module_from_spec(spec)
    sys.modules["fusedrnn.kernels"] = module
    spec.loader.exec_module(module)
    return module


def kernels():
    """The fusedrnn.kernels module, or a BackendUnavailableError saying why not."""
    module, _, error = _import_kernels()
    if module is None:
        raise BackendUnavailableError(f"backend='triton' needs Triton, which failed to import ({error})")
    return module


def triton_problem(device):
    """None when the Triton kernels can run on `device`, else the reason they cannot."""
    module, interpreted, error = _import_kernels()
    if module is None:
        return f"Triton failed to import ({error})"
    if device.type == "cuda":
        if interpreted:
            return "TRITON_INTERPRET=1 was set when the kernels were imported; they run on CPU tensors only"
        return None
    if device.type == "cpu":
        if interpreted:
            return None
        return ("CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 before fusedrnn's "
                "kernels are first used (or move the module to a CUDA device)")
    return f"Triton kernels do not support device type {device.type!r}"


def resolve(backend, device):
    """Map a module's backend to the one that runs now: "torch", "reference" or "triton"."""
    backend = requested_backend(backend)
    if backend == "auto":
        if device.type == "cuda" and triton_problem(device) is None:
            return "triton"
        return "torch"
    if backend == "triton":
        problem = triton_problem(device)
        if problem is not None:
            raise BackendUnavailableError(f"backend='triton' cannot run: {problem}")
    return backend


def choose_kernel(kernel, mode, D, B, H, P, dtype, device):
    """Pick "stepwise" or "persistent" for one layer; see the module docstring."""
    env = os.environ.get("FUSEDRNN_KERNEL", "").strip()
    if kernel == "auto" and env:
        kernel = check_choice(env, KERNELS, "FUSEDRNN_KERNEL")
    if kernel == "stepwise":
        return kernel
    num_sms, smem = _device_limits(device)
    plan = kernels().persistent_plan(mode, D, B, H, P, dtype, num_sms, smem)
    if plan is not None:
        return "persistent"
    if kernel == "persistent":
        raise BackendUnavailableError(
            f"kernel='persistent' cannot hold this layer (mode={mode}, directions={D}, batch={B}, "
            f"hidden={H}, proj={P if P != H else 0}, dtype={dtype}) on {device}; use kernel='stepwise'")
    return "stepwise"


def _device_limits(device):
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        smem = getattr(props, "shared_memory_per_block_optin", 0) or 48 * 1024
        return props.multi_processor_count, smem
    # The interpreter runs programs one after another: a single program must cover a layer.
    return 1, 228 * 1024
