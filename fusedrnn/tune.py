"""Measured choice between implementations of one RNN call: the tuner behind backend="auto" on CUDA.

The first call with a new `TuneKey` (layer shape, dtype, options, device, versions) runs every
candidate implementation ("cudnn" = torch's own fused op, "stepwise" / "persistent" = fusedrnn's
Triton kernels, ...) on the call's own inputs, compares each one's outputs, and in training the
gradients of one backward, against an oracle, times the ones that agreed, and keeps the fastest.
The decision is cached in memory and on disk (JSON under $FUSEDRNN_CACHE_DIR), so later calls and
later processes only look it up.

Guarantees:
* a candidate whose results differ from the oracle by more than the dtype's tolerance, or that
  raises, is excluded for that key and never chosen; one `TuningWarning` per key says which
  candidate failed, on which layer shape, and why;
* tuning never runs while a CUDA graph is being captured, while torch.compile / torch.export /
  jit / fx trace, or on fake / meta tensors (`can_tune`): there only the cache or the static rule
  decides;
* $FUSEDRNN_TUNE=0 or `set_enabled(False)` turns tuning and the cache off: the static rule decides;
* the global random state is the same after tuning as before it (candidates may draw random
  numbers, e.g. dropout masks, and the user's random stream must not depend on whether a call
  happened to be the one that tuned).

The candidate contract (see `CallInputs`, which builds such callables): a candidate is a callable
taking no arguments that runs the whole call and returns a flat tuple of tensors, the outputs and,
when gradients are needed, the gradients of one backward with respect to the inputs that require
them. Every candidate of a key returns the same structure, so the tuples are compared position by
position.

Imports torch, the standard library and fusedrnn.spec only; never the kernels.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import statistics
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Mapping, Optional

import torch

from .spec import MODES, dtype_name

try:  # POSIX advisory locks; elsewhere the cache is written without a lock (see _locked)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = [
    "TuneKey", "Decision", "Timing", "Tuner", "TuneCache", "CallInputs", "TuningWarning",
    "make_key", "call_key", "seq_bucket", "tolerance", "compare", "can_tune", "enabled", "set_enabled",
    "get_tuner", "reset", "show_cache", "clear_cache", "cache_dir", "cache_file", "perf_clock",
    "cuda_clock", "cached_choice", "TOLERANCE", "TF32_TOLERANCE",
]

# ------------------------------------------------------------------------------------ constants

# Relative error norm ||candidate - oracle|| / ||oracle|| allowed per dtype. This is the runtime's
# single definition; the verify tool should import it from here (its fixed fallbacks for bf16/fp16
# are these numbers). fp64 and fp32 are the bounds `fusedrnn verify` checks against the float64
# reference; bf16 and fp16 are dominated by rounding of the stored values (unit roundoff 2^-9 and
# 2^-12), which grows with the problem, so they are loose enough for two independent roundings of
# a long recurrence and still far below what a wrong kernel produces (errors of order 1).
TOLERANCE = {"fp64": 1e-10, "fp32": 1e-5, "bf16": 2e-2, "fp16": 3e-3}
# fp32 compared with TF32 arithmetic on either side (torch.backends.cudnn.allow_tf32 is on by
# default, so cuDNN's fp32 RNNs multiply in TF32): TF32 keeps 10 mantissa bits like fp16, but the
# values stay in fp32, so fp16's bound with some room for long recurrences.
TF32_TOLERANCE = 5e-3

# Timing budget of one key, in milliseconds as the clock measures them (CUDA events in production).
# Each candidate first runs once to produce the results that are checked; that call also compiles
# kernels and fills caches, so its time is recorded (Timing.first_ms) but not charged. Then come
# WARMUP_CALLS warm-up calls and the timed repetitions, charged to the candidate's share:
# min(CANDIDATE_BUDGET_MS, what is left of KEY_CEILING_MS / candidates left). Repetitions stop
# when the next one would overrun the share, after at least MIN_REPS and at most MAX_REPS. So the
# charged time of a key stays within KEY_CEILING_MS, except that every candidate always gets its
# warm-up and MIN_REPS timed calls (one very slow call cannot be split).
WARMUP_CALLS = 1
MIN_REPS = 2
MAX_REPS = 25
CANDIDATE_BUDGET_MS = 200.0
KEY_CEILING_MS = 1000.0

# The candidate that serves as the oracle when it is present and no reference is given: torch's
# own op is what a drop-in replacement must agree with.
ORACLE = "cudnn"

# Bump when the file layout or the meaning of a key field changes: older files are then ignored.
CACHE_FORMAT = 1
CACHE_FILE = "tune.json"

# Seed of the random output gradients that CallInputs feeds every candidate's backward.
GRAD_SEED = 1234

SOURCES = ("tuned", "cached", "static")


class TuningWarning(UserWarning):
    """A candidate was excluded while tuning, or the tuning cache could not be used."""


# ---------------------------------------------------------------------------------------- control

_ENABLED: Optional[bool] = None  # None: follow $FUSEDRNN_TUNE


def set_enabled(flag):
    """Turn tuning on or off for this process (None: follow $FUSEDRNN_TUNE again).

    Off means the static rule decides every call: no tuning and no cache lookup.
    """
    global _ENABLED
    if flag is not None and not isinstance(flag, bool):
        raise TypeError(f"set_enabled(flag): flag must be True, False or None, got {flag!r}")
    _ENABLED = flag


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def enabled():
    """Whether tuning is on: set_enabled() if it was called, else $FUSEDRNN_TUNE (default on)."""
    if _ENABLED is not None:
        return _ENABLED
    env = os.environ.get("FUSEDRNN_TUNE", "").strip().lower()
    if env == "" or env in _TRUE:
        return True
    if env in _FALSE:
        return False
    raise ValueError(f"FUSEDRNN_TUNE must be 0 or 1 (also true/false, yes/no, on/off), got "
                     f"{os.environ['FUSEDRNN_TUNE']!r}")


def _tracing_reason():
    """Why Python code is being traced rather than run (torch.compile, export, jit, fx), or None."""
    if torch.compiler.is_compiling():
        return "tracing under torch.compile / torch.export"
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    if is_exporting is not None and is_exporting():
        return "tracing under torch.export"
    if torch.jit.is_scripting() or torch.jit.is_tracing():
        return "tracing under torch.jit"
    # The flag itself: is_fx_tracing() logs a deprecation warning on first use.
    if getattr(torch.fx._symbolic_trace, "_is_fx_tracing_flag", False):
        return "tracing under torch.fx"
    # Dispatch modes that turn every new tensor into a fake or proxy one (FakeTensorMode, make_fx):
    # candidates run there would measure nothing and their "outputs" hold no values.
    try:
        keys = torch._C._TorchDispatchModeKey
        for key, what in ((keys.FAKE, "fake"), (keys.PROXY, "proxy")):
            if torch._C._get_dispatch_mode(key) is not None:
                return f"a {what} tensor mode is active"
    except AttributeError:  # pragma: no cover - private API moved: the other checks remain
        pass
    return None


def _tensor_reason(tensors):
    try:
        from torch._subclasses.fake_tensor import is_fake
    except ImportError:  # pragma: no cover
        is_fake = None
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        if t.device.type == "meta":
            return "meta tensors"
        if is_fake is not None and is_fake(t):
            return "fake tensors"
    return None


def _capture_reason():
    # Only an initialized CUDA context can be capturing; asking earlier would initialize it.
    if torch.cuda.is_available() and torch.cuda.is_initialized() \
            and torch.cuda.is_current_stream_capturing():
        return "a CUDA graph is being captured"
    return None


def cannot_tune_reason(tensors=()):
    """Why tuning cannot run now on `tensors` (a reason string), or None when it can."""
    return _capture_reason() or _tracing_reason() or _tensor_reason(tensors)


def can_tune(tensors=()):
    """False while a CUDA graph is captured, while tracing (compile, export, jit, fx), or when any
    of `tensors` is fake or meta: running candidates there is impossible or meaningless, so only
    the cache or the static rule may decide."""
    return cannot_tune_reason(tensors) is None


# -------------------------------------------------------------------------------------------- key


def seq_bucket(seq_len):
    """The sequence length rounded up to a power of two (1, 2, 4, 8, ...): nearby lengths share a
    decision, since time per step, not the number of steps, is what differs between candidates."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    return 1 << (seq_len - 1).bit_length()


def _dist_version(*names):
    from importlib import metadata
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


@functools.lru_cache(maxsize=None)
def versions():
    """{"torch", "triton", "cudnn", "fusedrnn"}: versions a decision depends on, as strings.

    Taken on first use, from package metadata: Triton is not imported ("none" when absent)."""
    triton = _dist_version("triton", "pytorch-triton", "pytorch-triton-rocm")
    if triton is None:
        mod = sys.modules.get("triton")
        triton = getattr(mod, "__version__", None) if mod is not None else None
    fusedrnn = getattr(sys.modules.get("fusedrnn"), "__version__", None) or _dist_version("fusedrnn")
    try:
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    except Exception:  # noqa: BLE001 - a broken cuDNN install: no cuDNN to compare with anyway
        cudnn = None
    return {"torch": str(torch.__version__), "triton": str(triton or "none"),
            "cudnn": str(cudnn or "none"), "fusedrnn": str(fusedrnn or "unknown")}


@functools.lru_cache(maxsize=None)
def _device_info(device_type, index):
    if device_type == "cuda":
        props = torch.cuda.get_device_properties(index)
        return props.name, f"{props.major}.{props.minor}", int(props.multi_processor_count)
    # CPU (the test-only tuning on CPU tensors) and anything else: no capability, cores as units.
    return device_type, "", int(os.cpu_count() or 1)


def device_info(device):
    """(name, capability "major.minor", SM count) of a device; for CPU ("cpu", "", cores)."""
    device = torch.device(device)
    index = device.index
    if device.type == "cuda" and index is None:
        index = torch.cuda.current_device()
    return _device_info(device.type, index)


@dataclass(frozen=True)
class TuneKey:
    """Everything that changes which implementation is fastest, or whether it runs at all, for one
    call of a (multi-layer) RNN module. Hashable; `to_dict` / `from_dict` round-trip through JSON."""
    mode: str
    directions: int
    input_size: int
    hidden_size: int
    proj_size: int
    num_layers: int
    batch: int
    seq_bucket: int
    dtype: str
    bias: bool
    batch_first: bool
    packed: bool
    training: bool          # forward + one backward (gradients needed), else forward only
    cudnn_tf32: bool        # fp32 only: torch.backends.cudnn.allow_tf32 (cuDNN's arithmetic)
    matmul_tf32: bool       # fp32 only: torch.backends.cuda.matmul.allow_tf32 (fusedrnn's)
    device: str             # device name, e.g. "NVIDIA H200"; "cpu"
    capability: str         # "9.0"; "" off CUDA
    sm_count: int
    torch: str
    triton: str
    cudnn: str
    fusedrnn: str

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        """The key of a dict written by to_dict; ValueError when a field is missing or ill-typed."""
        if not isinstance(d, dict):
            raise ValueError(f"a key must be a JSON object, got {type(d).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in d]
        extra = [n for n in d if n not in names]
        if missing or extra:
            raise ValueError(f"key fields differ: missing {missing}, unexpected {extra}")
        for f in dataclasses.fields(cls):
            want = {"int": int, "bool": bool, "str": str}[f.type]
            v = d[f.name]
            if type(v) is not want:
                raise ValueError(f"key field {f.name} must be {f.type}, got {v!r}")
        return cls(**{n: d[n] for n in names})

    def id(self):
        """A canonical string (compact JSON, sorted): the key's name in the cache file."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def describe(self):
        """The layer shape in words, for warnings and `fusedrnn tune --show`."""
        parts = [self.mode, f"I={self.input_size}", f"H={self.hidden_size}"]
        if self.proj_size:
            parts.append(f"P={self.proj_size}")
        parts += [f"layers={self.num_layers}", "bidirectional" if self.directions == 2 else "uni",
                  f"B={self.batch}", f"T<={self.seq_bucket}", self.dtype]
        if self.dtype == "fp32" and (self.cudnn_tf32 or self.matmul_tf32):
            parts.append("tf32(" + ",".join(n for n, on in (("cudnn", self.cudnn_tf32),
                                                           ("matmul", self.matmul_tf32)) if on) + ")")
        parts.append("bias" if self.bias else "no-bias")
        if self.batch_first:
            parts.append("batch_first")
        if self.packed:
            parts.append("packed")
        parts.append("train" if self.training else "inference")
        where = self.device + (f" sm_{self.capability.replace('.', '')}" if self.capability else "")
        return " ".join(parts) + f" on {where}"


def _positive_int(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _flag(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def make_key(mode, *, input_size, hidden_size, proj_size=0, num_layers=1, bidirectional=False,
             batch, seq_len, dtype, bias=True, batch_first=False, packed=False, training,
             device, cudnn_tf32=None, matmul_tf32=None):
    """The TuneKey of one call, from plain values.

    `training` means the call needs gradients (forward + backward are timed); `seq_len` is bucketed
    to the next power of two; `device` is a torch.device or string. The TF32 flags default to
    torch.backends' current settings and only count for fp32 on CUDA.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    dt = dtype_name(dtype)
    _positive_int("input_size", input_size)
    _positive_int("hidden_size", hidden_size)
    _positive_int("proj_size", proj_size, 0)
    _positive_int("num_layers", num_layers)
    _positive_int("batch", batch, 0)
    for name, value in (("bidirectional", bidirectional), ("bias", bias), ("batch_first", batch_first),
                        ("packed", packed), ("training", training)):
        _flag(name, value)
    if proj_size and (mode != "LSTM" or proj_size >= hidden_size):
        raise ValueError(f"proj_size must be 0, or less than hidden_size for LSTM, got {proj_size}")
    # TF32 exists on CUDA only; elsewhere the flags change nothing and must not split keys.
    fp32 = dt == "fp32" and torch.device(device).type == "cuda"
    cudnn_tf32 = bool(torch.backends.cudnn.allow_tf32 if cudnn_tf32 is None else cudnn_tf32) and fp32
    matmul_tf32 = bool(torch.backends.cuda.matmul.allow_tf32 if matmul_tf32 is None else matmul_tf32) \
        and fp32
    name, capability, sms = device_info(device)
    v = versions()
    return TuneKey(mode=mode, directions=2 if bidirectional else 1, input_size=input_size,
                   hidden_size=hidden_size, proj_size=proj_size, num_layers=num_layers, batch=batch,
                   seq_bucket=seq_bucket(seq_len), dtype=dt, bias=bias, batch_first=batch_first,
                   packed=packed, training=training, cudnn_tf32=cudnn_tf32, matmul_tf32=matmul_tf32,
                   device=name, capability=capability, sm_count=sms, torch=v["torch"],
                   triton=v["triton"], cudnn=v["cudnn"], fusedrnn=v["fusedrnn"])


@functools.lru_cache(maxsize=4096)
def _memo_key(mode, items):
    return make_key(mode, **dict(items))


def call_key(mode, **fields):
    """make_key for a layer call, memoized on its arguments (the TF32 flags read now, so a change
    of them still makes a new key): a layer asks for its key on every call, and building and
    validating a TuneKey costs tens of microseconds. Pass the fields in a fixed order."""
    if "cudnn_tf32" not in fields:
        fields["cudnn_tf32"] = torch.backends.cudnn.allow_tf32
    if "matmul_tf32" not in fields:
        fields["matmul_tf32"] = torch.backends.cuda.matmul.allow_tf32
    return _memo_key(mode, tuple(fields.items()))


# ------------------------------------------------------------------------------------- decision


@dataclass(frozen=True)
class Timing:
    """One candidate's measurement: median of `reps` timed calls, and its first (checked) call."""
    ms: float
    reps: int
    first_ms: float

    def to_dict(self):
        return {"ms": self.ms, "reps": self.reps, "first_ms": self.first_ms}


@dataclass(frozen=True)
class Decision:
    """What the tuner decided for one key.

    chosen     the candidate to run, or None: the static rule decides (tuning off, not possible
               here, or no candidate could be checked)
    source     "tuned" (measured by this call), "cached" (memory or disk), "static"
    timings    name -> Timing of the candidates that agreed with the oracle
    excluded   name -> why it was excluded (the error found, or the exception raised)
    errors     name -> relative error norm against the oracle (worst tensor)
    oracle     what the candidates were compared against: a candidate's name or "reference"
    tuning_ms  wall time the tuning took (all calls, checks included), for reports
    reason     for source "static": why no measured choice applies
    """
    chosen: Optional[str]
    source: str
    timings: dict = field(default_factory=dict)
    excluded: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)
    oracle: Optional[str] = None
    tuning_ms: float = 0.0
    reason: str = ""

    def to_dict(self):
        return {"chosen": self.chosen, "timings": {k: t.to_dict() for k, t in self.timings.items()},
                "excluded": dict(self.excluded), "errors": dict(self.errors), "oracle": self.oracle,
                "tuning_ms": self.tuning_ms}

    @classmethod
    def from_dict(cls, d, source="cached"):
        """A decision read back from the cache file; ValueError when it is malformed."""
        try:
            timings = {str(k): Timing(float(t["ms"]), int(t["reps"]), float(t["first_ms"]))
                       for k, t in d["timings"].items()}
            chosen = d["chosen"]
            if chosen is not None and not isinstance(chosen, str):
                raise TypeError("chosen must be a string or null")
            return cls(chosen=chosen, source=source, timings=timings,
                       excluded={str(k): str(v) for k, v in d["excluded"].items()},
                       errors={str(k): float(v) for k, v in d["errors"].items()},
                       oracle=d.get("oracle"), tuning_ms=float(d.get("tuning_ms", 0.0)))
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise ValueError(f"malformed decision: {type(exc).__name__}: {exc}") from None

    @classmethod
    def static(cls, reason):
        return cls(chosen=None, source="static", reason=reason)


# ----------------------------------------------------------------------------------- comparison


def tolerance(dtype, *, tf32=False):
    """Allowed relative error norm for results in `dtype` (a torch.dtype or name); `tf32` when
    either side multiplied fp32 values in TF32."""
    name = dtype_name(dtype)
    if name == "fp32" and tf32:
        return TF32_TOLERANCE
    return TOLERANCE[name]


def _rel_error(actual, expected):
    """(error, problem): the relative error norm over the finite entries, in float64 on the
    tensors' device (absolute when `expected` is zero), and a description of a structural mismatch
    (shape, NaN / inf positions) or None."""
    if actual.shape != expected.shape:
        return math.inf, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(device=a.device, dtype=torch.float64)
    a_nan, e_nan = torch.isnan(a), torch.isnan(e)
    if not torch.equal(a_nan, e_nan):
        return math.inf, f"NaN in {int(a_nan.sum())} entries, expected {int(e_nan.sum())}"
    a_inf, e_inf = torch.isinf(a), torch.isinf(e)
    if not torch.equal(a_inf, e_inf) or not torch.equal(a[a_inf], e[e_inf]):
        return math.inf, "infinities differ"
    finite = ~(a_nan | a_inf)
    a, e = a[finite], e[finite]
    denom = float(torch.linalg.vector_norm(e)) if e.numel() else 0.0
    num = float(torch.linalg.vector_norm(a - e)) if e.numel() else 0.0
    return (num / denom if denom > 0 else num), None


def compare(actual, expected, *, tol=None, tf32=False, labels=None, same_dtype=True):
    """Compare two flat tuples of tensors position by position.

    Returns (worst relative error, None) when every tensor agrees within its tolerance (`tol`, else
    tolerance(dtype of the actual tensor, tf32=tf32)), else (error, message naming the tensor).
    `same_dtype` requires equal dtypes (against an oracle candidate; not against a float64
    reference). None entries must be None on both sides.
    """
    actual, expected = tuple(actual), tuple(expected)
    if len(actual) != len(expected):
        return math.inf, f"returned {len(actual)} tensors, the oracle {len(expected)}"
    worst = 0.0
    for i, (a, e) in enumerate(zip(actual, expected)):
        name = labels[i] if labels is not None and i < len(labels) else f"result {i}"
        if a is None or e is None:
            if a is not e:
                return math.inf, f"{name}: {'None' if a is None else 'a tensor'} where the oracle " \
                                 f"has {'None' if e is None else 'a tensor'}"
            continue
        if not isinstance(a, torch.Tensor) or not isinstance(e, torch.Tensor):
            return math.inf, f"{name}: not a tensor ({type(a).__name__} vs {type(e).__name__})"
        if same_dtype and a.dtype != e.dtype:
            return math.inf, f"{name}: dtype {a.dtype} != the oracle's {e.dtype}"
        if not a.is_floating_point():
            if not torch.equal(a.cpu(), e.to(a.dtype).cpu()):
                return math.inf, f"{name}: integer values differ"
            continue
        err, problem = _rel_error(a, e)
        if problem is not None:
            return math.inf, f"{name}: {problem}"
        limit = tol if tol is not None else tolerance(a.dtype, tf32=tf32)
        if not err <= limit:
            return err, f"{name}: relative error {err:.3e} > tolerance {limit:.1e}"
        worst = max(worst, err)
    return worst, None


# ----------------------------------------------------------------------------------- candidates


class CallInputs:
    """The inputs of one call, shared by all candidates of a key; builds candidate callables.

    `tensors` are the call's tensors (input, initial states, flat weights, ...); each keeps its
    own requires_grad flag, which says whether its gradient is computed and compared. With
    `needs_grad`, a candidate built by `candidate(forward)` runs forward(*fresh leaves) under
    enable_grad, then one backward with the same random output gradients for every candidate
    (torch.autograd.grad, so no .grad attribute is touched), and returns
    outputs + gradients (zeros for an input an output does not depend on). Without, it runs
    forward under no_grad and returns the outputs. `forward` returns a tensor or a flat sequence
    of tensors (None allowed).
    """

    def __init__(self, tensors, *, needs_grad, names=None, seed=GRAD_SEED):
        self.needs_grad = _flag("needs_grad", needs_grad)
        self.tensors = tuple(tensors)
        for i, t in enumerate(self.tensors):
            if t is not None and not isinstance(t, torch.Tensor):
                raise TypeError(f"tensors[{i}] must be a Tensor or None, got {type(t).__name__}")
        if names is not None and len(names) != len(self.tensors):
            raise ValueError(f"names must name each of the {len(self.tensors)} tensors, got "
                             f"{len(names)} names")
        self.names = tuple(names) if names is not None else tuple(f"tensors[{i}]" for i in
                                                                    range(len(self.tensors)))
        self.requires_grad = tuple(t is not None and t.requires_grad and t.is_floating_point()
                                   for t in self.tensors)
        self.seed = seed
        self._grad_outputs = {}

    def labels(self, outputs):
        """Names of a candidate's results, for Tuner.choose(labels=...): the given output names,
        then "grad <name>" for each tensor whose gradient is returned."""
        grads = tuple(f"grad {n}" for n, rg in zip(self.names, self.requires_grad) if rg) \
            if self.needs_grad else ()
        return tuple(outputs) + grads

    def _grad_output(self, i, out):
        key = (i, tuple(out.shape), out.dtype, out.device)
        g = self._grad_outputs.get(key)
        if g is None:
            gen = torch.Generator(device=out.device)
            gen.manual_seed(self.seed + i)
            g = torch.randn(out.shape, dtype=out.dtype, device=out.device, generator=gen)
            self._grad_outputs[key] = g
        return g

    def candidate(self, forward):
        """A zero-argument callable running `forward` on these inputs (see the class doc)."""
        if not callable(forward):
            raise TypeError(f"forward must be callable, got {type(forward).__name__}")

        def run():
            if not self.needs_grad:
                with torch.no_grad():
                    return _flat(forward(*self.tensors))
            leaves = tuple(None if t is None else t.detach().requires_grad_(rg)
                           for t, rg in zip(self.tensors, self.requires_grad))
            with torch.enable_grad():
                outs = _flat(forward(*leaves))
                wrt = [t for t, rg in zip(leaves, self.requires_grad) if rg]
                diff = [(i, o) for i, o in enumerate(outs)
                        if o is not None and o.requires_grad and o.is_floating_point()]
                if wrt and diff:
                    grads = torch.autograd.grad([o for _, o in diff], wrt,
                                                [self._grad_output(i, o) for i, o in diff],
                                                allow_unused=True, materialize_grads=True)
                else:
                    grads = tuple(torch.zeros_like(t) for t in wrt)
            return tuple(None if o is None else o.detach() for o in outs) + tuple(grads)
        return run


def _flat(out):
    if isinstance(out, torch.Tensor) or out is None:
        return (out,)
    return tuple(out)


# --------------------------------------------------------------------------------------- clocks


def perf_clock(fn):
    """Run fn and return (its result, wall milliseconds): for synchronous (CPU) work."""
    t0 = time.perf_counter()
    result = fn()
    return result, (time.perf_counter() - t0) * 1e3


def cuda_clock(device):
    """A clock timing fn on `device`'s current stream with CUDA events: the GPU time from before
    the first kernel fn queues to after the last, host gaps in between included (launch overhead
    is part of what differs between candidates)."""
    device = torch.device(device)

    def clock(fn):
        with torch.cuda.device(device):
            stream = torch.cuda.current_stream(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            stream.synchronize()
            start.record(stream)
            result = fn()
            end.record(stream)
            end.synchronize()
            return result, start.elapsed_time(end)
    return clock


def _clock_for(outputs):
    """The default clock for a candidate whose first call returned `outputs`."""
    for t in outputs:
        if isinstance(t, torch.Tensor) and t.device.type == "cuda":
            return cuda_clock(t.device)
    return perf_clock


def _synchronize(outputs):
    for t in outputs:
        if isinstance(t, torch.Tensor) and t.device.type == "cuda":
            torch.cuda.synchronize(t.device)
            return


# ----------------------------------------------------------------------------------------- cache


def cache_dir():
    """$FUSEDRNN_CACHE_DIR, else $XDG_CACHE_HOME/fusedrnn, else ~/.cache/fusedrnn."""
    env = os.environ
    return _cache_dir(env.get("FUSEDRNN_CACHE_DIR"), env.get("XDG_CACHE_HOME"), env.get("HOME"))


@functools.lru_cache(maxsize=64)
def _cache_dir(fusedrnn_cache_dir, xdg_cache_home, home):
    # keyed on every variable the path depends on: get_tuner asks on every tuned call
    env = (fusedrnn_cache_dir or "").strip()
    if env:
        return os.path.abspath(os.path.expanduser(env))
    base = (xdg_cache_home or "").strip() or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fusedrnn")


def cache_file():
    """The tuning cache file: cache_dir()/tune.json."""
    return os.path.join(cache_dir(), CACHE_FILE)


def _header():
    return {"format": CACHE_FORMAT, **versions()}


class TuneCache:
    """Decisions in memory, and on disk as one JSON file:

        {"header": {"format": 1, "torch": ..., "triton": ..., "cudnn": ..., "fusedrnn": ...},
         "entries": [{"key": {...TuneKey fields}, "decision": {...}}, ...]}

    Writers take an exclusive lock (`<file>.lock`, fcntl.flock) around read, merge, write to a
    temporary file and os.replace, so readers never see a partial file and concurrent writers
    (DDP ranks) lose no entry. A file that does not parse, or whose header names other versions,
    is ignored with one TuningWarning and replaced on the next write. A directory that cannot be
    written leaves the cache in memory only (one warning).
    """

    def __init__(self, path=None):
        self.path = os.path.abspath(path) if path is not None else cache_file()
        self._memory = {}       # TuneKey -> Decision (source "cached")
        self._loaded = False
        self._warned = set()    # what was warned about: one warning each per process
        self._lock = threading.Lock()

    # -- reading ---------------------------------------------------------------------------------
    def _warn_once(self, what, message):
        if what not in self._warned:
            self._warned.add(what)
            warnings.warn(f"fusedrnn tune: {message}", TuningWarning, stacklevel=4)

    def _read_file(self):
        """{key id: (TuneKey, entry dict)} of the file; {} (and one warning) when it is missing,
        corrupt or from other versions."""
        try:
            with open(self.path, encoding="utf-8") as f:
                text = f.read()
        except (FileNotFoundError, NotADirectoryError):  # nothing cached yet (or no such dir)
            return {}
        except OSError as exc:
            self._warn_once(("read", self.path), f"cannot read the cache file {self.path} ({exc}); "
                                                 f"tuning results stay in memory")
            return {}
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or not isinstance(data.get("header"), dict) \
                    or not isinstance(data.get("entries"), list):
                raise ValueError("not a fusedrnn tuning cache (no header / entries)")
        except ValueError as exc:
            self._warn_once(("corrupt", self.path),
                            f"ignoring the corrupt cache file {self.path} ({exc}); it will be rewritten")
            return {}
        header, current = data["header"], _header()
        if header != current:
            diff = ", ".join(f"{k} {header.get(k)!r} (now {v!r})" for k, v in current.items()
                             if header.get(k) != v)
            self._warn_once(("versions", self.path),
                            f"ignoring the cache file {self.path}, written with other versions: "
                            f"{diff}; it will be rewritten")
            return {}
        entries = {}
        try:
            for e in data["entries"]:
                key = TuneKey.from_dict(e["key"])
                Decision.from_dict(e["decision"])  # validates; kept as the dict for rewriting
                entries[key.id()] = (key, e["decision"])
        except (ValueError, TypeError, KeyError) as exc:
            self._warn_once(("corrupt", self.path),
                            f"ignoring the corrupt cache file {self.path} ({type(exc).__name__}: "
                            f"{exc}); it will be rewritten")
            return {}
        return entries

    def _load(self):
        for key, d in self._read_file().values():
            self._memory.setdefault(key, Decision.from_dict(d, source="cached"))
        self._loaded = True

    def get(self, key, *, reload=False):
        """The cached decision of `key` (source "cached") or None. The disk file is read on the
        first lookup, and again on a miss with `reload` (another process may have tuned it)."""
        d = self._memory.get(key)
        if d is not None:
            return d
        with self._lock:
            if not self._loaded or reload:
                self._load()
        return self._memory.get(key)

    # -- writing ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self):
        """An exclusive lock across processes on `<file>.lock` (none where fcntl is missing)."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path + ".lock", "a+") as lock:
            if fcntl is not None:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                if fcntl is not None:
                    fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def _write(self, entries):
        data = {"header": _header(),
                "entries": [{"key": k.to_dict(), "decision": d} for k, d in entries.values()]}
        fd, tmp = tempfile.mkstemp(prefix=".tune-", suffix=".tmp", dir=os.path.dirname(self.path))
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)  # atomic: readers see the old file or the new one
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def put(self, key, decision, *, persist=True):
        """Remember `decision` for `key` in memory and, with `persist`, in the file (merged with
        what other processes wrote meanwhile)."""
        if not isinstance(key, TuneKey):
            raise TypeError(f"key must be a TuneKey, got {type(key).__name__}")
        if not isinstance(decision, Decision):
            raise TypeError(f"decision must be a Decision, got {type(decision).__name__}")
        stored = dataclasses.replace(decision, source="cached")
        with self._lock:
            self._memory[key] = stored
            if not persist:
                return
            try:
                with self._locked():
                    entries = self._read_file()
                    entries[key.id()] = (key, stored.to_dict())
                    self._write(entries)
            except OSError as exc:
                self._warn_once(("write", self.path),
                                f"cannot write the cache file {self.path} ({exc}); tuning results "
                                f"stay in memory for this process")

    def entries(self):
        """[(TuneKey, Decision)] of the file and of memory (memory wins), sorted by description."""
        with self._lock:
            merged = {key: Decision.from_dict(d) for key, d in self._read_file().values()}
            merged.update(self._memory)
        return sorted(merged.items(), key=lambda kd: kd[0].describe())

    def clear(self):
        """Forget every decision, in memory and on disk; returns how many were removed."""
        with self._lock:
            n = 0
            try:
                with self._locked():
                    keys = {k for k, _ in self._read_file().values()}
                    n = len(keys | set(self._memory))
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(self.path)
            except OSError as exc:
                self._warn_once(("write", self.path), f"cannot clear {self.path} ({exc})")
                n = len(self._memory)
            self._memory.clear()
            self._loaded = False
            return n


# ----------------------------------------------------------------------------------------- tuner


class Tuner:
    """Chooses, per TuneKey, the fastest candidate that agrees with the oracle; see the module doc."""

    def __init__(self, cache=None):
        if cache is not None and not isinstance(cache, TuneCache):
            raise TypeError(f"cache must be a TuneCache or None, got {type(cache).__name__}")
        self.cache = cache if cache is not None else TuneCache()
        self._warned_keys = set()

    def lookup(self, key):
        """The cached decision of `key`, or None (no tuning; also used where can_tune is False)."""
        if not isinstance(key, TuneKey):
            raise TypeError(f"key must be a TuneKey, got {type(key).__name__}")
        return self.cache.get(key)

    def choose(self, key, candidates, *, reference=None, oracle=ORACLE, checks=None, needs_grad,
               clock=None, tol=None, tf32=None, labels=None, tensors=()):
        """The Decision for `key`: cached if known, else tuned now (and cached).

        candidates  ordered mapping name -> zero-argument callable returning a flat tuple of
                    tensors (see CallInputs); or a zero-argument callable returning that mapping,
                    so nothing is built on a cache hit. Order breaks ties: put the preferred first.
        reference   zero-argument callable returning the tuple to compare against (e.g. the
                    float64 reference); when None, the candidate named `oracle` provides it
        checks      optional mapping name -> callable whose results are compared instead of the
                    timed callable's (e.g. at a reduced size for the float64 reference, or with
                    dropout off); must name every candidate
        needs_grad  whether the call needs gradients: must match key.training
        clock       clock(fn) -> (fn(), milliseconds); default CUDA events for CUDA results,
                    time.perf_counter otherwise
        tol         one tolerance for every tensor (default: per dtype, `tolerance`)
        tf32        compare fp32 with the TF32 tolerance (default: either TF32 flag of the key)
        labels      names of the tuple's positions, for messages ("output", "h_n", "grad input", ...);
                    or a zero-argument callable returning them (called only when tuning)
        tensors     the call's tensors, for can_tune

        Returns a Decision with source "static" and chosen None when tuning is off
        ($FUSEDRNN_TUNE=0, set_enabled(False)) or cannot run here (can_tune) and nothing is cached.
        """
        if not enabled():
            return _DISABLED
        if not isinstance(key, TuneKey):
            raise TypeError(f"key must be a TuneKey, got {type(key).__name__}")
        _flag("needs_grad", needs_grad)
        if needs_grad != key.training:
            raise ValueError(f"needs_grad={needs_grad} contradicts key.training={key.training}")
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        reason = cannot_tune_reason(tensors)
        if reason is not None:
            return Decision.static(f"not tuned: {reason}")
        hit = self.cache.get(key, reload=True)  # another process may have tuned it meanwhile
        if hit is not None:
            return hit
        if callable(candidates) and not isinstance(candidates, Mapping):
            candidates = candidates()
        if callable(checks) and not isinstance(checks, Mapping):
            checks = checks()
        if callable(labels):
            labels = labels()
        _check_candidates(candidates, checks, reference, oracle)
        decision, persist = self._tune(key, candidates, reference=reference, oracle=oracle,
                                       checks=checks, clock=clock, tol=tol,
                                       tf32=(key.cudnn_tf32 or key.matmul_tf32) if tf32 is None else tf32,
                                       labels=labels)
        self.cache.put(key, decision, persist=persist)
        return decision

    # -- measuring -------------------------------------------------------------------------------
    def _tune(self, key, candidates, *, reference, oracle, checks, clock, tol, tf32, labels):
        """(Decision, persist): run, check and time every candidate."""
        t_start = time.perf_counter()
        excluded, errors, timings = {}, {}, {}
        firsts = {}  # name -> (clock, ms of the first call), so the check call is not repeated

        def results_of(name):
            """What is compared for candidate `name`: its first call, or its `checks` callable."""
            if checks is not None:
                return _flat(checks[name]())
            outputs, ms = self._first_call(candidates[name], clock)
            firsts[name] = (clock or _clock_for(outputs), ms)
            return outputs

        # The user's random stream must not depend on whether this call tuned (module doc).
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() \
            and torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=devices):
            # 1. what to compare against
            basis_name = "reference" if reference is not None else oracle
            try:
                basis = _flat(reference()) if reference is not None else results_of(oracle)
            except Exception as exc:  # noqa: BLE001 - nothing to check against: static rule
                if reference is not None:  # our own bug, maybe fixed by the next version: no file
                    return self._give_up(key, f"the reference raised {_exc(exc)}", t_start), False
                excluded[oracle] = f"raised {_exc(exc)}"
                return self._give_up(key, f"the oracle '{oracle}' failed, so nothing could be "
                                          f"checked", t_start, excluded), True
            # 2. check every candidate against it
            for name in candidates:
                if reference is None and name == oracle:
                    errors[name] = 0.0
                    continue
                try:
                    err, problem = compare(results_of(name), basis, tol=tol, tf32=tf32,
                                           labels=labels, same_dtype=reference is None)
                except Exception as exc:  # noqa: BLE001 - a failing candidate is excluded, not fatal
                    excluded[name] = f"raised {_exc(exc)}"
                    continue
                if math.isfinite(err):
                    errors[name] = err
                if problem is not None:
                    excluded[name] = f"disagrees with {basis_name}: {problem}"
            del basis
            # 3. time the ones that agreed, each within its share of the key's ceiling
            agreed = [n for n in candidates if n not in excluded]
            spent = 0.0
            for i, name in enumerate(agreed):
                fn = candidates[name]
                try:
                    if name not in firsts:  # checked through `checks`: the first call is still due
                        outputs, ms = self._first_call(fn, clock)
                        firsts[name] = (clock or _clock_for(outputs), ms)
                        del outputs
                    timer, first_ms = firsts[name]
                    share = min(CANDIDATE_BUDGET_MS, (KEY_CEILING_MS - spent) / (len(agreed) - i))
                    timing, used = _measure(fn, timer, share, first_ms)
                except Exception as exc:  # noqa: BLE001
                    excluded[name] = f"raised {_exc(exc)}"
                    continue
                spent += used
                timings[name] = timing
        chosen = None
        if timings:
            order = list(candidates)
            chosen = min(timings, key=lambda n: (timings[n].ms, order.index(n)))
        decision = Decision(chosen=chosen, source="tuned", timings=timings, excluded=excluded,
                            errors=errors, oracle=basis_name,
                            tuning_ms=(time.perf_counter() - t_start) * 1e3,
                            reason="" if chosen else "no candidate agreed with the oracle")
        if excluded:
            self._warn(key, decision)
        return decision, True

    @staticmethod
    def _first_call(fn, clock):
        """(outputs, ms) of a candidate's first call, synchronized so errors surface here."""
        if clock is not None:
            outputs, ms = clock(fn)
            return _flat(outputs), float(ms)
        t0 = time.perf_counter()
        outputs = _flat(fn())
        _synchronize(outputs)
        return outputs, (time.perf_counter() - t0) * 1e3

    def _give_up(self, key, why, t_start, excluded=None):
        decision = Decision(chosen=None, source="tuned", excluded=dict(excluded or {}),
                            tuning_ms=(time.perf_counter() - t_start) * 1e3,
                            reason=f"{why}; the static rule decides")
        self._warn(key, decision)
        return decision

    def _warn(self, key, decision):
        if key in self._warned_keys:
            return
        self._warned_keys.add(key)
        what = "; ".join(f"'{n}' excluded: {r}" for n, r in decision.excluded.items())
        if decision.reason and not decision.chosen:
            what = f"{what}; {decision.reason}" if what else decision.reason
        chosen = f"; running '{decision.chosen}'" if decision.chosen else ""
        warnings.warn(f"fusedrnn tune: {key.describe()}: {what}{chosen}", TuningWarning, stacklevel=4)


_DISABLED = Decision.static("tuning is off ($FUSEDRNN_TUNE=0 or fusedrnn.tune.set_enabled(False))")


def _exc(exc):
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


def _check_candidates(candidates, checks, reference, oracle):
    if not isinstance(candidates, Mapping) or not candidates:
        raise ValueError("candidates must be a non-empty mapping name -> callable")
    for name, fn in candidates.items():
        if not isinstance(name, str) or not callable(fn):
            raise TypeError(f"candidates[{name!r}] must map a str to a callable, got {type(fn).__name__}")
    if checks is not None:
        if not isinstance(checks, Mapping) or set(checks) != set(candidates):
            raise ValueError(f"checks must name exactly the candidates {list(candidates)}, got "
                             f"{list(checks) if isinstance(checks, Mapping) else checks!r}")
    if reference is not None and not callable(reference):
        raise TypeError(f"reference must be callable, got {type(reference).__name__}")
    if reference is None and oracle not in candidates:
        raise ValueError(f"no reference given and the oracle {oracle!r} is not among the candidates "
                         f"{list(candidates)}: nothing to check them against")


def _measure(fn, clock, share_ms, first_ms):
    """(Timing, charged ms): WARMUP_CALLS warm-up calls, then repetitions within `share_ms`."""
    used = 0.0
    for _ in range(WARMUP_CALLS):
        used += float(clock(fn)[1])
    times = []
    while len(times) < MAX_REPS:
        if len(times) >= MIN_REPS and used + statistics.median(times) > share_ms:
            break
        ms = float(clock(fn)[1])
        times.append(ms)
        used += ms
    return Timing(ms=statistics.median(times), reps=len(times), first_ms=first_ms), used


# ---------------------------------------------------------------------------------- global tuner

_TUNER: Optional[Tuner] = None
_TUNER_LOCK = threading.Lock()


def get_tuner():
    """The process-wide Tuner, on cache_file(); a new one when $FUSEDRNN_CACHE_DIR changed."""
    global _TUNER
    tuner = _TUNER
    if tuner is not None and tuner.cache.path == cache_file():
        return tuner
    with _TUNER_LOCK:
        if _TUNER is None or _TUNER.cache.path != cache_file():
            _TUNER = Tuner(TuneCache())
        return _TUNER


def reset():
    """Forget the process-wide tuner (its memory cache and warnings); the file stays."""
    global _TUNER
    with _TUNER_LOCK:
        _TUNER = None


def _constant_result(fn):
    """torch.compiler.assume_constant_result without its cost: torch.compile then runs `fn` once
    while tracing and bakes its result into the graph. The public decorator imports torch._dynamo
    (seconds, and Triton with it) only to set this one attribute, which `import fusedrnn` must not
    pay; test_tune's compile test fails if the convention changes."""
    fn._dynamo_marked_constant = True
    return fn


@_constant_result
def cached_choice(mode, **fields):
    """The cached choice for the call described by make_key(mode, **fields), or None (static
    rule): lookup only, never tuning. Safe to call while torch.compile traces (make_key and the
    file read cannot be traced): it runs once at trace time and the answer is a constant of the
    compiled graph, so a later tuning does not change graphs already compiled."""
    if not enabled():
        return None
    decision = get_tuner().lookup(make_key(mode, **fields))
    return decision.chosen if decision is not None else None


SHOW_HEADER = ("layer", "chosen", "ms (median, reps) per candidate", "excluded")


def show_cache(tuner=None):
    """Rows (SHOW_HEADER) describing every cached decision, for `fusedrnn tune --show`."""
    tuner = tuner or get_tuner()
    rows = []
    for key, d in tuner.cache.entries():
        times = ", ".join(f"{n} {t.ms:.3f} ({t.reps})" for n, t in
                          sorted(d.timings.items(), key=lambda nt: nt[1].ms))
        excluded = "; ".join(f"{n}: {r}" for n, r in d.excluded.items())
        rows.append((key.describe(), d.chosen or "(static rule)", times or "-", excluded or "-"))
    return rows


def clear_cache(tuner=None):
    """Remove every cached decision (memory and file); returns how many were removed."""
    return (tuner or get_tuner()).cache.clear()
