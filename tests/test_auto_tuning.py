"""backend="auto"'s measured choice wired into the modules (fusedrnn/tune.py does the choosing and
is tested with fake candidates in test_tune.py): on CPU through the test-only switch
$FUSEDRNN_TUNE_CPU=1, real candidates (torch's op vs the Triton kernels through the interpreter) at
tiny sizes; the fallback warning of auto on a GPU where Triton cannot run."""
from __future__ import annotations

import warnings

import pytest
import torch

import fusedrnn
from fusedrnn import dispatch, tune
from conftest import assert_close_rel


@pytest.fixture
def tuning(monkeypatch, tmp_path, triton_device):
    if triton_device != "cpu":
        pytest.skip("the CPU switch is for interpreter sessions")
    monkeypatch.setenv("FUSEDRNN_TUNE_CPU", "1")
    monkeypatch.setenv("FUSEDRNN_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("FUSEDRNN_TUNE", raising=False)
    monkeypatch.delenv("FUSEDRNN_BACKEND", raising=False)
    monkeypatch.delenv("FUSEDRNN_KERNEL", raising=False)
    tune.reset()
    yield tmp_path
    tune.reset()


def _layer(**kw):
    torch.manual_seed(0)
    return fusedrnn.GRU(3, 4, **kw)


@pytest.mark.triton
def test_first_call_tunes_then_the_cache_decides(tuning):
    m = _layer()
    x = torch.randn(2, 1, 3)
    with torch.no_grad():
        y, h = m(x)
    d = m.last_tuning
    assert d is not None and d.source == "tuned" and not d.excluded
    assert set(d.timings) == {"cudnn", "stepwise", "persistent"}
    assert d.chosen in d.timings
    ref = torch.nn.GRU(3, 4)
    ref.load_state_dict(m.state_dict())
    assert_close_rel([y, h], list(ref(x)), 1e-5, "tuned call")
    with torch.no_grad():
        m(x)
    assert m.last_tuning.source == "cached" and m.last_tuning.chosen == d.chosen
    assert (tuning / tune.CACHE_FILE).exists()


@pytest.mark.triton
def test_a_cache_hit_builds_no_candidates(tuning, monkeypatch):
    """Every call of a tuned layer looks its key up: on a hit nothing of the tuning machinery
    (its inputs, candidates, labels) is built, so the per-call cost stays a lookup."""
    m = _layer()
    x = torch.randn(2, 1, 3)
    with torch.no_grad():
        m(x)

    def no(*args, **kw):
        raise AssertionError("CallInputs built on a cache hit")

    monkeypatch.setattr(tune, "CallInputs", no)
    with torch.no_grad():
        m(x)
    assert m.last_tuning.source == "cached"


@pytest.mark.triton
def test_a_kernel_that_disagrees_is_excluded_and_named_once(tuning, monkeypatch):
    from fusedrnn import kernels
    real = kernels.scan_forward

    def wrong(*args, **kw):
        y, *rest = real(*args, **kw)
        return (y * 1.5, *rest)

    monkeypatch.setattr(kernels, "scan_forward", wrong)
    m = _layer()
    x = torch.randn(2, 1, 3)
    with pytest.warns(tune.TuningWarning, match="stepwise") as record, torch.no_grad():
        m(x)
    assert len([w for w in record if issubclass(w.category, tune.TuningWarning)]) == 1
    d = m.last_tuning
    assert d.chosen == "cudnn" and set(d.excluded) == {"stepwise", "persistent"}
    assert m.last_backend == "torch"


@pytest.mark.triton
@pytest.mark.parametrize("kw", [dict(backend="triton"), dict(kernel="stepwise"), dict(backend="torch")])
def test_an_explicit_choice_is_never_tuned(tuning, kw):
    m = _layer(**kw)
    with torch.no_grad():
        m(torch.randn(2, 1, 3))
    assert m.last_tuning is None


@pytest.mark.triton
def test_tuning_off_keeps_the_static_rule(tuning, monkeypatch):
    monkeypatch.setenv("FUSEDRNN_TUNE", "0")
    m = _layer()
    with torch.no_grad():
        m(torch.randn(2, 1, 3))
    assert m.last_tuning is None and m.last_backend == "torch"


def test_tuned_module_pickles_without_its_decision(tuning):
    m = _layer()
    m.__dict__["last_tuning"] = tune.Decision.static("test")
    assert torch.load(_save(m), weights_only=True).last_tuning is None


def _save(m):
    import io
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    return buf


def test_auto_on_a_gpu_without_usable_triton_warns_once(monkeypatch):
    monkeypatch.delenv("FUSEDRNN_BACKEND", raising=False)
    monkeypatch.setattr(dispatch, "triton_problem", lambda device: "Triton failed to import (test reason)")
    monkeypatch.setattr(dispatch, "_WARNED", set())
    cuda = torch.device("cuda")
    with pytest.warns(RuntimeWarning, match="test reason"):
        assert dispatch.resolve("auto", cuda) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.resolve("auto", cuda) == "torch"  # once per reason
    # an explicit backend still raises instead of falling back
    with pytest.raises(fusedrnn.BackendUnavailableError, match="test reason"):
        dispatch.resolve("triton", cuda)
