"""fusedrnn beside the code that surrounds torch.nn's RNNs: a global swap of torch.nn's classes
(patch_torch, or plain assignment), convert() on parametrized and pruned modules, and whole-model
checkpoints under torch.load's default weights_only=True."""
from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.utils.prune as prune
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import orthogonal, spectral_norm, weight_norm

import fusedrnn
from conftest import assert_close_rel

TORCH_LSTM, TORCH_GRUCELL, TORCH_RNNCELL = nn.LSTM, nn.GRUCell, nn.RNNCell
NAMES = ("LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell")


def _call(m, dtype=torch.float64):
    torch.manual_seed(3)
    cell = type(m).__name__.endswith("Cell") or isinstance(m, nn.RNNCellBase)
    x = torch.randn((2, 3) if cell else (4, 2, 3), dtype=dtype, requires_grad=True)
    out = m(x)
    flat = [out] if isinstance(out, torch.Tensor) else [t for o in out for t in
                                                        ((o,) if isinstance(o, torch.Tensor) else o)]
    grads = torch.autograd.grad(sum(t.sum() for t in flat), [x] + list(m.parameters()))
    return flat, grads


@pytest.mark.parametrize("name", NAMES)
def test_patch_torch_context_builds_fusedrnn_modules_and_undoes(name):
    original = getattr(nn, name)
    with fusedrnn.patch_torch() as patch:
        assert patch.active
        m = getattr(nn, name)(3, 4)
        assert type(m) is getattr(fusedrnn, name)
        assert getattr(nn.modules, name) is getattr(fusedrnn, name)
    assert getattr(nn, name) is original and getattr(nn.modules, name) is original
    assert not patch.active
    ref = original(3, 4)
    ref.load_state_dict(m.state_dict())
    assert_close_rel(_call(m.double()), _call(ref.double()), 1e-12, name)


def test_patch_torch_call_and_undo():
    patch = fusedrnn.patch_torch()
    try:
        assert nn.GRU is fusedrnn.GRU
        assert fusedrnn.patch_torch().active  # patching twice is harmless
    finally:
        patch.undo()
    assert nn.GRU is not fusedrnn.GRU and nn.GRU.__module__ == "torch.nn.modules.rnn"


@pytest.mark.parametrize("name", NAMES)
def test_assigning_fusedrnn_classes_to_torch_nn_does_not_recurse(name, monkeypatch):
    """The quick swap `torch.nn.RNNCell = fusedrnn.RNNCell`: constructing and calling works."""
    monkeypatch.setattr(nn, name, getattr(fusedrnn, name))
    m = getattr(nn, name)(3, 4)
    assert type(m) is getattr(fusedrnn, name)
    _call(m.double())


PARAMETRIZATIONS = {"weight_norm": (weight_norm, "weight_hh"), "spectral_norm": (spectral_norm, "weight_ih"),
                    "orthogonal": (orthogonal, "weight_hh")}


@pytest.mark.parametrize("how", PARAMETRIZATIONS)
@pytest.mark.parametrize("name", ["LSTM", "GRU", "GRUCell"])
def test_convert_parametrized_module_keeps_parametrization(name, how):
    apply, tensor = PARAMETRIZATIONS[how]
    tensor += "" if name.endswith("Cell") else "_l0"
    ref = apply(getattr(nn, name)(3, 4, dtype=torch.float64), tensor)
    src = apply(getattr(nn, name)(3, 4, dtype=torch.float64), tensor)
    src.load_state_dict(ref.state_dict())
    twin = fusedrnn.convert(src, backend="reference")
    assert isinstance(twin, getattr(fusedrnn, name))
    assert parametrize.is_parametrized(twin, tensor)
    assert twin.parametrizations is src.parametrizations  # the very same modules
    # training mode: spectral_norm's power iteration advances at each read, so equal results also
    # mean the twin reads each weight as often as torch.nn does
    assert_close_rel(_call(twin), _call(ref), 1e-10, name)
    with torch.no_grad():
        assert_close_rel(getattr(twin, tensor), getattr(ref, tensor), 1e-12, tensor)


@pytest.mark.parametrize("name", ["GRU", "LSTMCell"])
def test_convert_pruned_module_keeps_mask_and_hook(name):
    ref = getattr(nn, name)(3, 4, dtype=torch.float64)
    tensor = "weight_ih_l0" if name == "GRU" else "weight_ih"
    prune.l1_unstructured(ref, tensor, amount=0.4)
    src = getattr(nn, name)(3, 4, dtype=torch.float64)
    prune.l1_unstructured(src, tensor, amount=0.4)
    src.load_state_dict(ref.state_dict())
    twin = fusedrnn.convert(src, backend="reference")
    assert isinstance(twin, getattr(fusedrnn, name)) and prune.is_pruned(twin)
    assert (getattr(twin, tensor) == 0).sum() == (getattr(ref, tensor) == 0).sum() > 0
    assert_close_rel(_call(twin), _call(ref), 1e-10, name)


# ------------------------------------------------------------------------------- checkpoints
class Tagger(nn.Module):
    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        y, _ = self.rnn(x)
        return self.head(y)


@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN"])
def test_whole_model_reloads_with_weights_only_like_torch_nn(name, tmp_path):
    """Published scripts save the whole model and reload it under torch.load's default
    weights_only=True, allowlisting their own classes and torch.nn's; a model holding fusedrnn
    layers reloads the same way."""
    allow = [Tagger, nn.Linear, getattr(nn, name)]
    for rnn in (getattr(nn, name)(3, 8, bidirectional=False), getattr(fusedrnn, name)(3, 8, kernel="stepwise")):
        model = Tagger(rnn).eval()
        path = tmp_path / f"{type(rnn).__module__}.pt"
        torch.save(model, path)
        with torch.serialization.safe_globals(allow):
            loaded = torch.load(path)
        assert type(loaded.rnn) is type(rnn)
        x = torch.randn(5, 2, 3)
        assert torch.equal(loaded(x), model(x))
    assert loaded.rnn.kernel == "stepwise"


def test_weights_only_still_rejects_what_is_not_allowlisted(tmp_path):
    model = Tagger(fusedrnn.GRU(3, 8))
    path = tmp_path / "m.pt"
    torch.save(model, path)
    with pytest.raises(pickle.UnpicklingError, match="Tagger"):
        torch.load(path)  # the user's own class was not allowlisted


@pytest.mark.triton
@pytest.mark.parametrize("name", ["GRU", "LSTMCell"])
def test_convert_parametrized_module_on_the_triton_kernels(name, triton_device):
    """A weight_norm'd module converted to backend="triton" runs the kernels with the
    parametrized weight (read once per call) and matches torch.nn's."""
    tensor = "weight_hh" + ("" if name.endswith("Cell") else "_l0")
    ref = weight_norm(getattr(nn, name)(3, 4, dtype=torch.float64), tensor)
    src = weight_norm(getattr(nn, name)(3, 4, dtype=torch.float64), tensor)
    src.load_state_dict(ref.state_dict())
    twin = fusedrnn.convert(src, backend="triton")
    assert_close_rel(_call(twin), _call(ref), 1e-10, name)
    assert twin.last_backend == "triton" and parametrize.is_parametrized(twin, tensor)
