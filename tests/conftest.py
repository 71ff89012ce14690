"""Shared test configuration for fusedrnn.

The one place that sets up the Triton interpreter: without CUDA, Triton kernels can only run
through it, so TRITON_INTERPRET=1 is set here at import time, before any test module imports
fusedrnn.kernels (Triton reads the variable when a kernel is defined). A value already present in
the environment wins. Tests that run kernels take the `triton_device` fixture.

Markers:
    gpu     needs CUDA; skipped automatically when it is not available
    triton  runs Triton kernels (on CPU through the interpreter: slow, keep shapes tiny)
    slow    long-running tests
"""
from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# Where the Triton kernels run in this session: CUDA, else CPU tensors through the interpreter.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETED else ("cpu" if INTERPRETED else None)

# Tests use tiny tensors: intra-op threads only add synchronisation (10x slower on a loaded 2-core
# CI machine). FUSEDRNN_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("FUSEDRNN_TEST_THREADS", "1")))

# Test modules import shared helpers (`from conftest import ...`, `import models`) whether or not
# tests/ is a package and whatever pytest's import mode is.
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "triton: runs Triton kernels (interpreter on CPU)")
    config.addinivalue_line("markers", "slow: long-running test")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def triton_device():
    """The device the Triton kernels run on here; skips on the positive sign that they cannot
    (no CUDA and the interpreter switched off by the environment)."""
    if TRITON_DEVICE is None:
        pytest.skip("no CUDA and TRITON_INTERPRET=0 in the environment")
    return TRITON_DEVICE


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state, so failures reproduce."""
    torch.manual_seed(0)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 (absolute error when expected is all zero).

    NaN positions must agree and are excluded; infinities must agree exactly.
    """
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    finite = torch.isfinite(e) & torch.isfinite(a)
    a, e = a[finite], e[finite]
    denom = e.norm().item()
    num = (a - e).norm().item()
    return num / denom if denom > 0 else num


def assert_close_rel(actual, expected, tol: float, name: str = "tensor") -> None:
    """Assert ||actual - expected|| / ||expected|| <= tol, with shape, dtype and NaN/inf agreement.

    `actual` / `expected` may be tensors, None, or (nested) tuples/lists of them.
    """
    if isinstance(expected, (tuple, list)):
        assert isinstance(actual, (tuple, list)), f"{name}: expected a sequence, got {type(actual)}"
        assert len(actual) == len(expected), (
            f"{name}: expected {len(expected)} elements, got {len(actual)}")
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_close_rel(a, e, tol, f"{name}[{i}]")
        return
    if expected is None:
        assert actual is None, f"{name}: expected None, got {type(actual)}"
        return
    assert isinstance(actual, torch.Tensor), f"{name}: expected a Tensor, got {type(actual)}"
    assert actual.shape == expected.shape, (
        f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != expected {expected.dtype}"
    a_nan, e_nan = torch.isnan(actual), torch.isnan(expected)
    assert torch.equal(a_nan, e_nan), (
        f"{name}: NaN positions differ: {int(a_nan.sum())} NaN in actual at "
        f"{a_nan.nonzero().tolist()[:8]}, {int(e_nan.sum())} in expected at "
        f"{e_nan.nonzero().tolist()[:8]}")
    a_inf, e_inf = torch.isinf(actual), torch.isinf(expected)
    assert torch.equal(a_inf, e_inf) and torch.equal(actual[a_inf], expected[e_inf]), (
        f"{name}: +-inf positions differ")
    err = rel_err(actual, expected)
    if err > tol:
        diff = (actual.detach().double() - expected.detach().double()).abs().nan_to_num()
        raise AssertionError(f"{name}: relative error {err:.3e} > tol {tol:.1e} "
                             f"(max abs diff {diff.max().item():.3e}, shape {tuple(actual.shape)})")
