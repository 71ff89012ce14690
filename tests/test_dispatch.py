"""The dispatch rules (fusedrnn/dispatch.py, docs/design.md "Dispatch"): which route runs a call
and which kernel runs a layer, the environment overrides, and the errors an impossible explicit
choice raises before anything runs."""
from __future__ import annotations

import pytest
import torch

import fusedrnn
from fusedrnn import dispatch
from fusedrnn.errors import BackendUnavailableError

CPU = torch.device("cpu")
CUDA = torch.device("cuda")
META = torch.device("meta")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv("FUSEDRNN_BACKEND", raising=False)
    monkeypatch.delenv("FUSEDRNN_KERNEL", raising=False)


@pytest.mark.parametrize("backend,compiling,route", [
    ("auto", False, "torch"), ("torch", False, "torch"), ("reference", False, "reference"),
    ("auto", True, "loop"), ("reference", True, "reference")])
def test_route_on_cpu(backend, compiling, route):
    assert dispatch.resolve(backend, CPU, compiling) == route


def test_explicit_torch_under_compile_raises():
    with pytest.raises(BackendUnavailableError, match="torch.compile cannot trace"):
        dispatch.resolve("torch", CPU, compiling=True)


def test_triton_on_cpu_runs_only_through_the_interpreter(triton_device):
    if triton_device != "cpu":
        pytest.skip("CUDA session: the kernels were not imported under the interpreter")
    assert dispatch.triton_problem(CPU) is None
    assert dispatch.resolve("triton", CPU) == "triton"
    # kernels imported for the interpreter cannot launch on a GPU
    assert "TRITON_INTERPRET=1" in dispatch.triton_problem(CUDA)


def test_auto_on_cuda_without_usable_triton_is_torch(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_problem", lambda device: "Triton failed to import (test)")
    assert dispatch.resolve("auto", CUDA) == "torch"
    with pytest.raises(BackendUnavailableError, match="Triton failed to import"):
        dispatch.resolve("triton", CUDA)


def test_auto_on_cuda_with_usable_triton_is_triton(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_problem", lambda device: None)
    assert dispatch.resolve("auto", CUDA) == "triton"


def test_unsupported_device_type_is_named():
    problem = dispatch.triton_problem(META)
    assert problem is not None and "meta" in problem


@pytest.mark.parametrize("env,route", [("reference", "reference"), ("torch", "torch"), ("auto", "torch")])
def test_backend_env_replaces_auto_only(monkeypatch, env, route):
    monkeypatch.setenv("FUSEDRNN_BACKEND", env)
    assert dispatch.resolve("auto", CPU) == route
    assert dispatch.resolve("reference", CPU) == "reference"
    assert dispatch.resolve("torch", CPU) == "torch"


def test_backend_env_invalid_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("FUSEDRNN_BACKEND", "cudnn")
    with pytest.raises(ValueError, match="FUSEDRNN_BACKEND must be one of .* got 'cudnn'"):
        dispatch.resolve("auto", CPU)


def test_loop_route_always_runs_the_loop_kernel(monkeypatch):
    monkeypatch.setenv("FUSEDRNN_KERNEL", "persistent")
    assert dispatch.choose_kernel("loop", "stepwise", "LSTM", 1, 3, 5, 5, torch.float32, CPU) == "loop"


# Kernel choice on the Triton route. On CPU (interpreter) a plan is a single program per direction,
# so a tiny layer has a persistent plan and a large one does not.
SMALL = dict(mode="LSTM", D=1, B=3, H=5, P=5, dtype=torch.float32)
LARGE = dict(mode="LSTM", D=1, B=3, H=1024, P=1024, dtype=torch.float32)


def _choose(kernel, shape, device):
    return dispatch.choose_kernel("triton", kernel, shape["mode"], shape["D"], shape["B"], shape["H"],
                                  shape["P"], shape["dtype"], device)


@pytest.mark.triton
def test_auto_kernel_is_persistent_when_a_plan_holds_the_layer(triton_device):
    device = torch.device(triton_device)
    assert _choose("auto", SMALL, device) == "persistent"
    assert _choose("auto", LARGE, device) == "stepwise"
    assert _choose("stepwise", SMALL, device) == "stepwise"


@pytest.mark.triton
def test_impossible_persistent_request_raises_with_the_layer(triton_device):
    with pytest.raises(BackendUnavailableError, match="kernel='persistent' cannot hold this layer.*hidden=1024"):
        _choose("persistent", LARGE, torch.device(triton_device))


@pytest.mark.triton
@pytest.mark.parametrize("env,expected_small,expected_large", [
    ("stepwise", "stepwise", "stepwise"), ("persistent", "persistent", None), ("auto", "persistent", "stepwise")])
def test_kernel_env_applies_to_auto_only(monkeypatch, triton_device, env, expected_small, expected_large):
    device = torch.device(triton_device)
    monkeypatch.setenv("FUSEDRNN_KERNEL", env)
    assert _choose("auto", SMALL, device) == expected_small
    if expected_large is None:
        with pytest.raises(BackendUnavailableError, match="cannot hold this layer"):
            _choose("auto", LARGE, device)
    else:
        assert _choose("auto", LARGE, device) == expected_large
    # an explicit module setting wins over the environment
    assert _choose("stepwise", SMALL, device) == "stepwise"


def test_kernel_env_invalid_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("FUSEDRNN_KERNEL", "fast")
    with pytest.raises(ValueError, match="FUSEDRNN_KERNEL must be one of .* got 'fast'"):
        dispatch.choose_kernel("triton", "auto", "LSTM", 1, 3, 5, 5, torch.float32, CPU)


@pytest.mark.triton
def test_impossible_explicit_kernel_raises_before_any_launch(triton_device):
    """A module forced to a persistent kernel that cannot hold it raises, launches nothing and stays
    usable once the choice is changed."""
    from fusedrnn import kernels
    m = fusedrnn.GRU(4, 300, backend="triton", kernel="persistent").to(triton_device)
    x = torch.randn(2, 1, 4, device=triton_device)
    before = kernels.launch_count()
    with pytest.raises(BackendUnavailableError, match="cannot hold this layer"):
        m(x)
    assert kernels.launch_count() == before
    m.kernel = "stepwise"
    y, _ = m(x[:1])
    assert m.last_kernels == ["stepwise"] and torch.isfinite(y).all()


def test_module_records_route_and_kernels():
    m = fusedrnn.LSTM(3, 4, num_layers=2)
    m(torch.randn(2, 1, 3))
    assert m.last_backend == "torch" and m.last_kernels == []
    r = fusedrnn.LSTM(3, 4, num_layers=2, backend="reference")
    r(torch.randn(2, 1, 3))
    assert r.last_backend == "reference"


@pytest.mark.parametrize("name,value", [("backend", "cudnn"), ("kernel", "fast")])
def test_constructor_rejects_unknown_choices(name, value):
    with pytest.raises(ValueError, match=f"{name} must be one of .* got '{value}'"):
        fusedrnn.LSTM(3, 4, **{name: value})
