"""fusedrnn.tune: the measured choice behind backend="auto" (issue 11), end to end on CPU with fake
candidates and a fake clock: choice, exclusion, warnings, budget, cache (memory, disk, corrupt,
other versions, two processes), the switches, and no tuning under compile / fake tensors."""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import sys
import warnings

import pytest
import torch

from fusedrnn import tune
from fusedrnn.tune import CallInputs, Decision, TuneCache, Tuner, TuningWarning


# ------------------------------------------------------------------------------------- helpers

class FakeClock:
    """A clock whose time only moves when a fake candidate says it took `cost` ms."""

    def __init__(self):
        self.now = 0.0
        self.calls = 0

    def __call__(self, fn):
        t0 = self.now
        self.calls += 1
        return fn(), self.now - t0


def fake(clock, cost, result, calls=None, name=None):
    """A candidate that takes `cost` fake ms and returns `result` (or raises it, an exception)."""
    def run():
        clock.now += cost
        if calls is not None:
            calls[name] = calls.get(name, 0) + 1
        if isinstance(result, Exception):
            raise result
        return result
    return run


def key(batch=4, **kw):
    args = dict(input_size=3, hidden_size=5, batch=batch, seq_len=7, dtype="fp32", training=False,
                device="cpu")
    args.update(kw)
    return tune.make_key(kw.pop("mode", "LSTM"), **{k: v for k, v in args.items() if k != "mode"})


GOOD = (torch.ones(2, 3), torch.arange(4.0))
WRONG = (torch.ones(2, 3), torch.arange(4.0) + 0.5)


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """No test touches the user's cache or inherits a switch."""
    monkeypatch.setenv("FUSEDRNN_CACHE_DIR", str(tmp_path / "default-cache"))
    monkeypatch.delenv("FUSEDRNN_TUNE", raising=False)
    tune.set_enabled(None)
    tune.reset()
    yield
    tune.set_enabled(None)
    tune.reset()


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "cache" / "tune.json")


@pytest.fixture
def tuner(path):
    return Tuner(TuneCache(path))


def choose(tuner, k, candidates, **kw):
    kw.setdefault("needs_grad", k.training)
    return tuner.choose(k, candidates, **kw)


# ---------------------------------------------------------------------------------------- choice

def test_chooses_the_fastest_candidate_that_agrees(tuner):
    clock = FakeClock()
    cands = {"cudnn": fake(clock, 3.0, GOOD), "stepwise": fake(clock, 2.0, GOOD),
             "persistent": fake(clock, 1.0, WRONG)}
    with pytest.warns(TuningWarning) as rec:
        d = choose(tuner, key(), cands, clock=clock)
    assert d.chosen == "stepwise" and d.source == "tuned" and d.oracle == "cudnn"
    assert set(d.timings) == {"cudnn", "stepwise"}
    assert d.timings["cudnn"].ms == 3.0 and d.timings["stepwise"].ms == 2.0
    assert d.timings["stepwise"].reps >= tune.MIN_REPS
    assert "relative error" in d.excluded["persistent"] and "result 1" in d.excluded["persistent"]
    assert d.errors["cudnn"] == 0.0 and d.errors["stepwise"] == 0.0 and d.errors["persistent"] > 0.1
    assert len(rec) == 1
    msg = str(rec[0].message)
    assert key().describe() in msg and "'persistent'" in msg and "relative error" in msg


def test_disagreeing_even_when_fastest_is_never_chosen_and_labels_name_the_tensor(tuner):
    clock = FakeClock()
    cands = {"cudnn": fake(clock, 5.0, GOOD), "persistent": fake(clock, 0.1, WRONG)}
    with pytest.warns(TuningWarning, match="grad input: relative error"):
        d = choose(tuner, key(), cands, clock=clock, labels=("output", "grad input"))
    assert d.chosen == "cudnn" and "persistent" not in d.timings


def test_a_candidate_that_raises_is_excluded_with_its_error(tuner):
    clock = FakeClock()
    cands = {"cudnn": fake(clock, 3.0, GOOD), "stepwise": fake(clock, 1.0, RuntimeError("boom\nmore")),
             "persistent": fake(clock, 2.0, GOOD)}
    with pytest.warns(TuningWarning, match="'stepwise' excluded: raised RuntimeError: boom"):
        d = choose(tuner, key(), cands, clock=clock)
    assert d.chosen == "persistent"
    assert d.excluded == {"stepwise": "raised RuntimeError: boom"}


def test_one_warning_per_key(tuner):
    clock = FakeClock()
    cands = {"cudnn": fake(clock, 3.0, GOOD), "stepwise": fake(clock, 1.0, WRONG)}
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        choose(tuner, key(), cands, clock=clock)
        tuner.cache.clear()                      # forces a second tuning of the same key
        d = choose(tuner, key(), cands, clock=clock)
        assert d.source == "tuned" and d.chosen == "cudnn"
        choose(tuner, key(batch=8), cands, clock=clock)   # another key warns again
    msgs = [str(w.message) for w in rec if issubclass(w.category, TuningWarning)]
    assert len(msgs) == 2
    assert "B=4 " in msgs[0] and "B=8 " in msgs[1]


def test_ties_go_to_the_first_candidate_and_order_is_respected(tuner):
    clock = FakeClock()
    d = choose(tuner, key(), {"stepwise": fake(clock, 2.0, GOOD), "cudnn": fake(clock, 2.0, GOOD)},
               clock=clock)
    assert d.chosen == "stepwise"


def test_the_budget_bounds_the_repetitions(tuner):
    clock = FakeClock()
    calls = {}
    cands = {"cudnn": fake(clock, 0.5, GOOD, calls, "cudnn"),
             "stepwise": fake(clock, 150.0, GOOD, calls, "stepwise"),
             "persistent": fake(clock, 700.0, GOOD, calls, "persistent")}
    d = choose(tuner, key(), cands, clock=clock)
    t = d.timings
    assert t["cudnn"].reps == tune.MAX_REPS                       # cheap: the rep cap
    assert t["stepwise"].reps == tune.MIN_REPS                    # 150 ms: warm-up + 2 fill 200
    assert t["persistent"].reps == tune.MIN_REPS                  # over its share: the minimum
    for name, timing in t.items():
        # first (checked) call + warm-up + reps, nothing else
        assert calls[name] == 1 + tune.WARMUP_CALLS + timing.reps
    # The stated bound: beyond each candidate's unavoidable minimum, the key stays in its ceiling.
    beyond = sum(c.ms * (c.reps - tune.MIN_REPS) for c in t.values())
    assert 0 < beyond <= tune.KEY_CEILING_MS
    assert d.chosen == "cudnn"


def test_many_mid_sized_candidates_share_the_key_ceiling(tuner):
    clock = FakeClock()
    names = [f"k{i}" for i in range(8)]
    cands = {"cudnn": fake(clock, 20.0, GOOD), **{n: fake(clock, 20.0, GOOD) for n in names}}
    d = choose(tuner, key(), cands, clock=clock)
    charged = sum(c.ms * (tune.WARMUP_CALLS + c.reps) for c in d.timings.values())
    assert charged <= tune.KEY_CEILING_MS
    assert all(c.reps >= tune.MIN_REPS for c in d.timings.values())


def test_a_reference_callable_is_the_oracle_and_dtypes_may_differ(tuner):
    clock = FakeClock()
    ref = lambda: tuple(t.double() for t in GOOD)  # noqa: E731
    cands = {"stepwise": fake(clock, 2.0, GOOD), "persistent": fake(clock, 1.0, WRONG)}
    with pytest.warns(TuningWarning, match="disagrees with reference"):
        d = choose(tuner, key(), cands, reference=ref, clock=clock)
    assert d.chosen == "stepwise" and d.oracle == "reference"


def test_checks_compare_other_callables_than_the_timed_ones(tuner):
    clock = FakeClock()
    cands = {"cudnn": fake(clock, 3.0, WRONG), "stepwise": fake(clock, 1.0, GOOD)}
    checks = {"cudnn": lambda: GOOD, "stepwise": lambda: GOOD}
    d = choose(tuner, key(), cands, checks=checks, clock=clock)
    assert d.chosen == "stepwise" and not d.excluded


def test_a_dtype_mismatch_against_an_oracle_candidate_disagrees(tuner):
    clock = FakeClock()
    cands = {"cudnn": fake(clock, 3.0, GOOD), "stepwise": fake(clock, 1.0, tuple(t.double() for t in GOOD))}
    with pytest.warns(TuningWarning, match="dtype torch.float64"):
        assert choose(tuner, key(), cands, clock=clock).chosen == "cudnn"


def test_a_failing_oracle_leaves_the_static_rule(tuner):
    clock = FakeClock()
    cands = {"cudnn": fake(clock, 3.0, RuntimeError("no cudnn")), "stepwise": fake(clock, 1.0, GOOD)}
    with pytest.warns(TuningWarning, match="oracle 'cudnn' failed"):
        d = choose(tuner, key(), cands, clock=clock)
    assert d.chosen is None and "static rule" in d.reason and "no cudnn" in d.excluded["cudnn"]


def test_bad_arguments_raise_clear_errors(tuner):
    clock = FakeClock()
    with pytest.raises(ValueError, match="oracle 'cudnn' is not among"):
        choose(tuner, key(), {"stepwise": fake(clock, 1.0, GOOD)})
    with pytest.raises(ValueError, match="candidates must be a non-empty"):
        choose(tuner, key(), {})
    with pytest.raises(ValueError, match="needs_grad=True contradicts key.training=False"):
        tuner.choose(key(), {"cudnn": lambda: GOOD}, needs_grad=True)
    with pytest.raises(TypeError, match="key must be a TuneKey"):
        tuner.choose("LSTM", {"cudnn": lambda: GOOD}, needs_grad=False)
    with pytest.raises(ValueError, match="checks must name exactly"):
        choose(tuner, key(), {"cudnn": lambda: GOOD}, checks={"x": lambda: GOOD})
    with pytest.raises(TypeError, match="flag must be True, False or None"):
        tune.set_enabled(1)


def test_candidates_may_be_built_lazily(tuner):
    clock = FakeClock()
    built = []

    def build():
        built.append(1)
        return {"cudnn": fake(clock, 1.0, GOOD)}
    assert choose(tuner, key(), build, clock=clock).chosen == "cudnn"
    assert choose(tuner, key(), build, clock=clock).source == "cached"
    assert built == [1]


def test_tuning_leaves_the_random_state_alone(tuner):
    def draws():
        return (torch.randn(3),)
    torch.manual_seed(7)
    expected = torch.randn(4)
    torch.manual_seed(7)
    choose(tuner, key(), {"cudnn": draws}, checks={"cudnn": draws}, clock=FakeClock())
    assert torch.equal(torch.randn(4), expected)


# -------------------------------------------------------------------- real callables, real clock

class _WrongGrad(torch.autograd.Function):
    """y = x @ w with a backward that is off for w: what a broken kernel looks like."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x @ w

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g @ w.t(), 1.01 * (x.t() @ g)


def test_call_inputs_compare_gradients_of_one_backward(tuner):
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(4, 5, dtype=torch.float64))
    frozen = torch.randn(5, dtype=torch.float64)  # requires no grad: no gradient compared
    call = CallInputs((x, w, frozen), needs_grad=True, names=("x", "w", "b"))
    assert call.labels(("y", "s")) == ("y", "s", "grad x", "grad w")
    cands = {"cudnn": call.candidate(lambda x, w, b: (x @ w + b, (x @ w).sum(0))),
             "stepwise": call.candidate(lambda x, w, b: ((x.unsqueeze(-1) * w).sum(1) + b,
                                                         (x @ w).sum(0))),
             "persistent": call.candidate(lambda x, w, b: (_WrongGrad.apply(x, w) + b,
                                                           (x @ w).sum(0)))}
    out = cands["cudnn"]()
    assert len(out) == 4 and out[2].shape == x.shape and out[3].shape == w.shape
    assert x.grad is None and w.grad is None      # torch.autograd.grad: no .grad touched
    k = key(training=True, dtype="fp64")
    with pytest.warns(TuningWarning, match=r"'persistent'.*grad w: relative error"):
        d = tuner.choose(k, cands, needs_grad=True, labels=call.labels(("y", "s")))
    assert d.chosen in ("cudnn", "stepwise") and set(d.excluded) == {"persistent"}
    assert all(t.ms > 0 for t in d.timings.values())   # the default clock: perf_counter on CPU


def test_call_inputs_without_grad_run_under_no_grad():
    w = torch.nn.Parameter(torch.randn(3, 3))
    call = CallInputs((torch.randn(2, 3), w), needs_grad=False)
    (y,) = call.candidate(lambda x, w: x @ w)()
    assert not y.requires_grad
    with pytest.raises(TypeError, match=r"tensors\[1\] must be a Tensor or None"):
        CallInputs((w, 3), needs_grad=False)
    with pytest.raises(ValueError, match="names must name each of the 2 tensors"):
        CallInputs((w, w), needs_grad=False, names=("w",))
    assert call.labels(("y",)) == ("y",)


def test_compare_rules():
    a = torch.tensor([1.0, float("nan"), 2.0])
    assert tune.compare((a, None), (a.clone(), None)) == (0.0, None)
    assert "NaN" in tune.compare((a,), (torch.tensor([1.0, 1.0, 2.0]),))[1]
    assert "shape" in tune.compare((a,), (a[:2],))[1]
    assert "returned 1 tensors, the oracle 2" in tune.compare((a,), (a, a))[1]
    assert "None" in tune.compare((None,), (a,))[1]
    b = torch.ones(100, dtype=torch.bfloat16)
    assert tune.compare((b * 1.01,), (b,))[1] is None          # within bf16's 2e-2
    assert tune.compare((b.float() * 1.01,), (b.float(),))[1] is not None   # not fp32's 1e-5
    assert tune.tolerance(torch.float32, tf32=True) == tune.TF32_TOLERANCE
    assert tune.tolerance("fp64") == 1e-10 and tune.tolerance("half") == tune.TOLERANCE["fp16"]


# -------------------------------------------------------------------------------------------- key

def test_key_fields_bucketing_and_json_round_trip():
    assert [tune.seq_bucket(t) for t in (1, 2, 3, 5, 8, 9, 1000)] == [1, 2, 4, 8, 8, 16, 1024]
    k = tune.make_key("GRU", input_size=3, hidden_size=5, num_layers=2, bidirectional=True, batch=4,
                      seq_len=100, dtype=torch.bfloat16, bias=False, packed=True, training=True,
                      device="cpu")
    assert (k.seq_bucket, k.directions, k.dtype, k.packed, k.sm_count) == (128, 2, "bf16", True,
                                                                          os.cpu_count())
    assert k.torch == torch.__version__ and k.fusedrnn
    back = tune.TuneKey.from_dict(json.loads(json.dumps(k.to_dict())))
    assert back == k and hash(back) == hash(k) and back.id() == k.id()
    assert key(seq_len=5) == key(seq_len=8) != key(seq_len=9)
    # TF32 only splits fp32 keys on CUDA
    assert not key(cudnn_tf32=True).cudnn_tf32
    with pytest.raises(ValueError, match="key field batch must be int"):
        tune.TuneKey.from_dict({**k.to_dict(), "batch": "4"})


def test_call_key_is_make_key_memoized_and_follows_the_tf32_flags(monkeypatch):
    fields = dict(input_size=3, hidden_size=5, batch=2, seq_len=7, dtype=torch.float32,
                  training=False, device="cpu")
    k = tune.call_key("LSTM", **fields)
    assert k == tune.make_key("LSTM", **fields) and tune.call_key("LSTM", **fields) is k
    seen = []
    real = tune.make_key
    monkeypatch.setattr(tune, "make_key", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    tune.call_key("LSTM", **fields)
    assert not seen  # memoized
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", not torch.backends.cudnn.allow_tf32)
    tune.call_key("LSTM", **fields)
    assert len(seen) == 1  # a changed flag is a new argument, so a new key is built
    with pytest.raises(ValueError, match="hidden_size must be an int >= 1"):
        tune.call_key("LSTM", **{**fields, "hidden_size": 0})


@pytest.mark.parametrize("kw, match", [
    (dict(mode="lstm"), "mode must be one of"),
    (dict(hidden_size=0), "hidden_size must be an int >= 1"),
    (dict(seq_len=0), "seq_len must be a positive int"),
    (dict(dtype="int8"), "unknown dtype"),
    (dict(training=1), "training must be a bool"),
    (dict(mode="GRU", proj_size=2), "proj_size must be 0"),
])
def test_make_key_rejects_bad_values(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        key(**kw)


def test_versions_without_triton_say_none(monkeypatch):
    tune.versions.cache_clear()
    monkeypatch.setattr(tune, "_dist_version", lambda *names: None)
    monkeypatch.setitem(sys.modules, "triton", None)
    try:
        assert tune.versions()["triton"] == "none"
    finally:
        tune.versions.cache_clear()


# ------------------------------------------------------------------------------------------ cache

def test_cache_round_trip_in_memory_and_on_disk(tuner, path):
    clock = FakeClock()
    k = key()
    d = choose(tuner, k, {"cudnn": fake(clock, 2.0, GOOD), "stepwise": fake(clock, 1.0, GOOD)},
               clock=clock)
    assert d.source == "tuned" and d.chosen == "stepwise"
    boom = {"cudnn": fake(clock, 1.0, AssertionError("must not run"))}
    again = choose(tuner, k, boom, clock=clock)                        # memory
    assert again.source == "cached" and again.chosen == "stepwise"
    assert tuner.lookup(k) is again
    fresh = Tuner(TuneCache(path))                                     # disk, as another process
    from_disk = choose(fresh, k, boom, clock=clock)
    assert from_disk.source == "cached" and from_disk.chosen == "stepwise"
    assert from_disk.timings == d.timings and from_disk.errors == d.errors
    data = json.load(open(path))
    assert data["header"] == {"format": tune.CACHE_FORMAT, **tune.versions()}
    assert [e["key"] for e in data["entries"]] == [k.to_dict()]
    assert not [f for f in os.listdir(os.path.dirname(path)) if f.endswith(".tmp")]


def test_a_corrupt_cache_file_is_ignored_once_and_rewritten(tuner, path):
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as f:
        f.write('{"header": {"format": 1}, "entries": [')           # a torn write
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert tuner.lookup(key()) is None
        assert tuner.cache.get(key(batch=9), reload=True) is None
        d = choose(tuner, key(), {"cudnn": fake(FakeClock(), 1.0, GOOD)})
    assert [str(w.message) for w in rec if issubclass(w.category, TuningWarning)] == [
        str(rec[0].message)]
    assert "corrupt cache file" in str(rec[0].message) and path in str(rec[0].message)
    assert Tuner(TuneCache(path)).lookup(key()).chosen == d.chosen == "cudnn"


def test_a_malformed_entry_makes_the_file_corrupt(tuner, path):
    os.makedirs(os.path.dirname(path))
    json.dump({"header": {"format": tune.CACHE_FORMAT, **tune.versions()},
               "entries": [{"key": {"mode": "LSTM"}, "decision": {}}]}, open(path, "w"))
    with pytest.warns(TuningWarning, match="corrupt cache file.*key fields differ"):
        assert tuner.lookup(key()) is None


def test_a_cache_file_from_other_versions_is_ignored_and_rewritten(tuner, path):
    clock = FakeClock()
    old = Tuner(TuneCache(path))
    choose(old, key(batch=1), {"cudnn": fake(clock, 1.0, GOOD)}, clock=clock)
    data = json.load(open(path))
    data["header"]["torch"] = "1.0.0"
    json.dump(data, open(path, "w"))
    with pytest.warns(TuningWarning, match=r"other versions: torch '1.0.0' \(now"):
        assert tuner.lookup(key(batch=1)) is None
    choose(tuner, key(batch=2), {"cudnn": fake(clock, 1.0, GOOD)}, clock=clock)
    data = json.load(open(path))
    assert data["header"]["torch"] == torch.__version__
    assert [e["key"]["batch"] for e in data["entries"]] == [2]


def test_an_unwritable_cache_directory_keeps_decisions_in_memory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    tuner = Tuner(TuneCache(str(blocker / "tune.json")))
    with pytest.warns(TuningWarning, match="cannot write the cache file"):
        d = choose(tuner, key(), {"cudnn": fake(FakeClock(), 1.0, GOOD)})
    assert tuner.lookup(key()) is not None and d.chosen == "cudnn"


def _writer(path, tag, n, barrier):
    """Child process: n decisions written one by one, all starting together."""
    cache = TuneCache(path)
    barrier.wait()
    for i in range(n):
        cache.put(key(batch=1000 * tag + i), Decision(chosen="cudnn", source="tuned"))


def test_two_processes_writing_at_once_lose_nothing(path):
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods()
                                      else "spawn")
    n = 20
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_writer, args=(path, tag, n, barrier)) for tag in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    batches = sorted(k.batch for k, _ in TuneCache(path).entries())
    assert batches == sorted([1000 + i for i in range(n)] + [2000 + i for i in range(n)])


def test_clear_and_show(tuner, path):
    clock = FakeClock()
    choose(tuner, key(), {"cudnn": fake(clock, 2.0, GOOD), "stepwise": fake(clock, 1.0, GOOD)},
           clock=clock)
    rows = tune.show_cache(tuner)
    assert len(rows) == 1 and rows[0][0] == key().describe() and rows[0][1] == "stepwise"
    assert rows[0][2].startswith("stepwise 1.000")
    assert tune.clear_cache(tuner) == 1
    assert not os.path.exists(path) and tune.show_cache(tuner) == []
    assert tuner.lookup(key()) is None


def test_cache_dir_defaults(monkeypatch, tmp_path):
    monkeypatch.delenv("FUSEDRNN_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tune.cache_file() == str(tmp_path / "xdg" / "fusedrnn" / "tune.json")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert tune.cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "fusedrnn")
    monkeypatch.setenv("FUSEDRNN_CACHE_DIR", str(tmp_path / "mine"))
    assert tune.get_tuner().cache.path == str(tmp_path / "mine" / "tune.json")


# --------------------------------------------------------------------------------------- switches

def test_fusedrnn_tune_0_gives_the_static_rule(tuner, monkeypatch):
    calls = {}
    cands = {"cudnn": fake(FakeClock(), 1.0, GOOD, calls, "cudnn")}
    monkeypatch.setenv("FUSEDRNN_TUNE", "0")
    d = choose(tuner, key(), cands)
    assert d.source == "static" and d.chosen is None and "FUSEDRNN_TUNE=0" in d.reason
    monkeypatch.setenv("FUSEDRNN_TUNE", "1")
    tune.set_enabled(False)                       # the global setter wins over the environment
    assert choose(tuner, key(), cands).source == "static"
    assert calls == {}
    tune.set_enabled(None)
    assert choose(tuner, key(), cands).source == "tuned"
    monkeypatch.setenv("FUSEDRNN_TUNE", "0")      # off also hides the cache: the static rule
    assert choose(tuner, key(), cands).source == "static"
    monkeypatch.setenv("FUSEDRNN_TUNE", "maybe")
    with pytest.raises(ValueError, match="FUSEDRNN_TUNE must be 0 or 1"):
        tune.enabled()


def test_no_tuning_on_fake_or_meta_tensors_only_lookup(tuner):
    from torch._subclasses.fake_tensor import FakeTensorMode

    calls = {}
    cands = {"cudnn": fake(FakeClock(), 1.0, GOOD, calls, "cudnn")}
    meta = torch.empty(3, device="meta")
    assert not tune.can_tune([meta]) and tune.can_tune([torch.ones(1), None, 3])
    d = choose(tuner, key(), cands, tensors=[meta])
    assert d.source == "static" and "meta tensors" in d.reason and calls == {}
    with FakeTensorMode() as mode:
        fake_x = mode.from_tensor(torch.ones(2))
        assert not tune.can_tune()                   # the mode itself is active
    assert not tune.can_tune([fake_x])
    assert "fake tensors" in choose(tuner, key(), cands, tensors=[fake_x]).reason
    assert calls == {}
    # what is cached is still used there
    choose(tuner, key(), cands)
    assert choose(tuner, key(), cands, tensors=[fake_x]).source == "cached"


def test_no_tuning_under_torch_compile_or_fx():
    def f(x):
        return x + 1 if tune.can_tune([x]) else x - 1
    compiled = torch.compile(f, backend="eager", fullgraph=True)
    assert torch.equal(compiled(torch.zeros(2)), -torch.ones(2))
    assert torch.equal(f(torch.zeros(2)), torch.ones(2))

    class M(torch.nn.Module):
        def forward(self, x):
            return f(x)
    assert "x - 1" in torch.fx.symbolic_trace(M()).code      # torch.fx symbolic tracing too


def test_cached_choice_looks_up_while_torch_compile_traces():
    def f(x):
        chosen = tune.cached_choice("LSTM", input_size=3, hidden_size=5, batch=x.shape[0],
                                    seq_len=7, dtype=x.dtype, training=False, device=x.device)
        return x + 1 if chosen == "stepwise" else x - 1
    x = torch.zeros(4)
    assert torch.equal(torch.compile(f, backend="eager", fullgraph=True)(x), -torch.ones(4))
    clock = FakeClock()
    choose(tune.get_tuner(), key(), {"cudnn": fake(clock, 2.0, GOOD), "stepwise": fake(clock, 1.0, GOOD)},
           clock=clock)
    torch._dynamo.reset()
    assert torch.equal(torch.compile(f, backend="eager", fullgraph=True)(x), torch.ones(4))
    tune.set_enabled(False)
    assert tune.cached_choice("LSTM", input_size=3, hidden_size=5, batch=4, seq_len=7,
                              dtype="fp32", training=False, device="cpu") is None


def test_no_tuning_while_a_cuda_graph_is_captured(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert tune.cannot_tune_reason() == "a CUDA graph is being captured"
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert tune.can_tune()


# ------------------------------------------------------------------------------------------- CLI

def test_cli_show_and_clear(monkeypatch, tmp_path):
    from fusedrnn.tools import tune_cli

    parser = argparse.ArgumentParser(prog="fusedrnn")
    tune_cli.add_parser(parser.add_subparsers(dest="command"))

    def run(*argv):
        out = io.StringIO()
        return tune_cli.cmd_tune(parser.parse_args(["tune", *argv]), out), out.getvalue()
    assert "no cached decisions" in run("--show")[1]
    choose(tune.get_tuner(), key(), {"cudnn": fake(FakeClock(), 1.0, GOOD)})
    tune.reset()                                  # as a new process: read from the file
    rc, text = run("--show")
    assert rc == 0 and "1 cached decision " in text and key().describe() in text and "cudnn" in text
    assert json.loads(run("--show", "--json")[1])["entries"][0]["decision"]["chosen"] == "cudnn"
    assert "removed 1 cached decision " in run("--clear")[1]
    assert "no cached decisions" in run("--show")[1]
    with pytest.raises(SystemExit):
        parser.parse_args(["tune"])               # --show or --clear is required


def test_importing_the_tuner_loads_neither_triton_nor_dynamo():
    import subprocess

    code = ("import sys, fusedrnn; before = set(sys.modules); import fusedrnn.tune; "
            "new = set(sys.modules) - before; "
            "print(sorted(m for m in new if m.split('.')[0] == 'triton' or "
            "m.startswith(('torch._dynamo', 'fusedrnn.kernels'))))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=root, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
