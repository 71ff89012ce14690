"""fusedrnn.convert: swap torch.nn recurrent modules for their twins inside existing models.

Outputs and gradients of a converted model are compared with a deep copy of the original
(float64, tolerance 1e-12: same math, only summation order differs; see test_modules.py).
"""
from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
import torch.nn as nn

import fusedrnn
from conftest import assert_close_rel
from models import (CELL_NAMES, LAYER_NAMES, RECURRENT_TYPES, MyLSTM, Nested, PackedBiLSTMTagger,
                    Seq2Seq, TiedLSTMLanguageModel, WithSubclass, recurrent_modules)

TOL64 = 1e-12
FUSED_TYPES = tuple(getattr(fusedrnn, n) for n in LAYER_NAMES + CELL_NAMES)


def _inputs(model):
    """Example inputs for each model in models.py (float64 where floating)."""
    if isinstance(model, TiedLSTMLanguageModel):
        return (torch.randint(0, 11, (3, 5)),)
    if isinstance(model, PackedBiLSTMTagger):
        return torch.randint(1, 13, (3, 5)), torch.tensor([2, 5, 3])
    if isinstance(model, Seq2Seq):
        return torch.randn(4, 2, 3, dtype=torch.float64), torch.randn(3, 2, 4, dtype=torch.float64)
    if isinstance(model, (Nested, WithSubclass)):
        return (torch.randn(4, 2, 3, dtype=torch.float64),)
    raise AssertionError(f"no inputs for {type(model).__name__}")


def _flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in _flat(o)]


def outputs_and_grads(model, inputs):
    leaves = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    model.zero_grad(set_to_none=True)
    outs = _flat(model(*leaves))
    gen = torch.Generator().manual_seed(99)
    sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() for o in outs).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return outs, [x.grad for x in leaves if x.requires_grad], grads


def assert_same_model_results(got, ref, inputs, what):
    g_out, g_in, g_p = outputs_and_grads(got, inputs)
    r_out, r_in, r_p = outputs_and_grads(ref, inputs)
    assert_close_rel(g_out, r_out, TOL64, f"{what}: outputs")
    assert_close_rel(g_in, r_in, TOL64, f"{what}: input grads")
    assert list(g_p) == list(r_p), f"{what}: parameter names differ"
    for n in r_p:
        assert_close_rel(g_p[n], r_p[n], TOL64, f"{what}: grad of {n}")


def assert_all_converted(model):
    for name, m in recurrent_modules(model):
        assert type(m) in FUSED_TYPES, f"{name} is still {type(m).__name__}"


MODEL_FACTORIES = {
    "tied_lm": TiedLSTMLanguageModel,
    "packed_tagger": PackedBiLSTMTagger,
    "seq2seq": Seq2Seq,
    "nested": Nested,
}


# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", LAYER_NAMES + CELL_NAMES)
def test_bare_module_converts_to_twin(name):
    ref = getattr(nn, name)(3, 4, dtype=torch.float64)
    params = dict(ref.named_parameters())
    shape = (5, 2, 3) if name in LAYER_NAMES else (2, 3)
    x = torch.randn(shape, dtype=torch.float64)
    expected = _flat(ref(x))
    got = fusedrnn.convert(ref)
    assert type(got) is getattr(fusedrnn, name)
    for n, p in got.named_parameters():
        assert p is params[n], f"{n} is not the same Parameter object"
    assert list(dict(got.named_parameters())) == list(params)
    assert_close_rel(_flat(got(x)), expected, TOL64, name)
    assert repr(got) == repr(ref)


@pytest.mark.parametrize("model_name", MODEL_FACTORIES)
@pytest.mark.parametrize("backend", ["auto", "torch", "reference"])
def test_converted_model_matches_original(model_name, backend):
    model = MODEL_FACTORIES[model_name]().double()
    original = copy.deepcopy(model)
    before = {n: p for n, p in model.named_parameters()}
    others = {n: m for n, m in model.named_modules() if not isinstance(m, RECURRENT_TYPES)}
    converted = fusedrnn.convert(model, backend=backend)
    assert converted is model, "convert works in place and returns the model"
    assert_all_converted(converted)
    for n, m in recurrent_modules(converted):
        assert m.backend == backend, f"{n}.backend = {m.backend!r}"
    # every other module, and every parameter, is the very same object
    for n, m in converted.named_modules():
        if n in others:
            assert m is others[n], f"{n} was replaced"
    after = dict(converted.named_parameters())
    assert list(after) == list(before)
    for n, p in after.items():
        assert p is before[n], f"{n} is not the same Parameter object"
        assert p.dtype == torch.float64
    assert_same_model_results(converted, original, _inputs(model), model_name)


def test_tied_weights_stay_tied():
    model = fusedrnn.convert(TiedLSTMLanguageModel())
    assert model.decoder.weight is model.embed.weight
    assert type(model.rnn) is fusedrnn.LSTM


def test_optimizer_created_before_convert_keeps_training():
    model = TiedLSTMLanguageModel().double()
    twin_of_original = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    opt_ref = torch.optim.SGD(twin_of_original.parameters(), lr=0.5)
    fusedrnn.convert(model)
    tokens = _inputs(model)[0]
    out_before = model(tokens)[0].detach().clone()
    for m, o in ((model, opt), (twin_of_original, opt_ref)):
        o.zero_grad()
        m(tokens)[0].square().mean().backward()
        o.step()
    out_after = model(tokens)[0].detach()
    assert not torch.allclose(out_after, out_before), "the optimizer step did not change the model"
    assert_close_rel(out_after, twin_of_original(tokens)[0].detach(), TOL64,
                     "after one SGD step: converted vs torch.nn")


def test_mode_device_dtype_preserved():
    model = Nested().double()
    model.eval()
    model.dict["gru"].train()          # mixed modes must survive per module
    modes = {n: m.training for n, m in model.named_modules()}
    fusedrnn.convert(model)
    for n, m in model.named_modules():
        assert m.training == modes[n], f"{n}: training={m.training}, was {modes[n]}"
    for n, p in model.named_parameters():
        assert p.dtype == torch.float64 and p.device.type == "cpu", n
    model.float()                      # conversions after convert act on the twins
    for n, p in model.named_parameters():
        assert p.dtype == torch.float32, n
    model(torch.randn(4, 2, 3))


def test_hooks_preserved():
    model = Seq2Seq().double()
    calls = []
    model.encoder.register_forward_pre_hook(lambda m, args: calls.append(("pre", type(m))))
    model.encoder.register_forward_hook(lambda m, args, out: calls.append(("post", type(m))))
    # a hook that changes the output must keep changing it
    model.decoder.register_forward_hook(lambda m, args, out: (out[0] * 0, out[1]))
    original = copy.deepcopy(model)
    fusedrnn.convert(model)
    inputs = _inputs(model)
    got = model(*inputs)
    assert calls == [("pre", fusedrnn.GRU), ("post", fusedrnn.GRU)]
    assert_close_rel(got, original(*inputs), TOL64, "with an output-changing hook")


def test_hook_handle_removes_hook_after_convert():
    """A RemovableHandle taken before converting still removes the hook from the converted model."""
    model = Seq2Seq().double()
    calls = []
    handle = model.encoder.register_forward_hook(lambda m, a, o: calls.append(1))
    fusedrnn.convert(model)
    handle.remove()
    model(*_inputs(model))
    assert calls == [], "the hook still fires after handle.remove()"


def test_subclass_left_alone_with_warning():
    model = WithSubclass()
    custom = model.custom
    with pytest.warns(UserWarning, match="custom"):
        fusedrnn.convert(model)
    assert model.custom is custom and type(model.custom) is MyLSTM
    assert type(model.plain) is fusedrnn.GRU
    # a bare subclass: returned unchanged, with a warning
    bare = MyLSTM(3, 4)
    with pytest.warns(UserWarning, match="MyLSTM"):
        assert fusedrnn.convert(bare) is bare


def test_convert_twice_changes_nothing():
    model = fusedrnn.convert(Nested().double())
    mods = dict(model.named_modules())
    x = _inputs(model)[0]
    expected = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")     # nothing to warn about either
        again = fusedrnn.convert(model)
    assert again is model
    for n, m in again.named_modules():
        assert m is mods[n], f"{n} was replaced on the second convert"
    assert_close_rel(again(x), expected, 0.0, "second convert")
    lstm = fusedrnn.LSTM(3, 4)
    assert fusedrnn.convert(lstm) is lstm


@pytest.mark.parametrize("model_name", MODEL_FACTORIES)
def test_pickle_and_torch_save(model_name):
    model = fusedrnn.convert(MODEL_FACTORIES[model_name]().double())
    inputs = _inputs(model)
    expected = _flat(model(*inputs))
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for clone in (pickle.loads(pickle.dumps(model)), torch.load(buf, weights_only=False)):
        assert_all_converted(clone)
        assert_close_rel(_flat(clone(*inputs)), expected, 0.0, f"{model_name} reloaded")


@pytest.mark.parametrize("model_name", MODEL_FACTORIES)
def test_state_dict_both_directions(model_name):
    torch.manual_seed(1)
    plain = MODEL_FACTORIES[model_name]().double()
    torch.manual_seed(2)
    converted = fusedrnn.convert(MODEL_FACTORIES[model_name]().double())
    converted.load_state_dict(plain.state_dict(), strict=True)
    inputs = _inputs(plain)
    assert_close_rel(_flat(converted(*inputs)), _flat(plain(*inputs)), TOL64, "plain -> converted")
    torch.manual_seed(3)
    plain2 = MODEL_FACTORIES[model_name]().double()
    plain2.load_state_dict(converted.state_dict(), strict=True)
    assert_close_rel(_flat(plain2(*inputs)), _flat(plain(*inputs)), 0.0, "converted -> plain")


def test_convert_rejects_non_module():
    with pytest.raises(TypeError):
        fusedrnn.convert([nn.LSTM(3, 4)])
