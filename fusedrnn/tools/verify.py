"""Check fusedrnn against the float64 reference: `fusedrnn.verify(model, *inputs)` and the grid
behind `fusedrnn verify`.

A check runs a model three ways on the same inputs and compares every output and every gradient
(of the floating inputs that require grad and of every parameter):

* the model under test: a deep copy whose RNN modules run `backend` (default: what each module runs
  on this machine: its own `backend`, "auto" for torch.nn modules), in `dtype`;
* the oracle: a deep copy on backend "reference" (a plain PyTorch step loop with autograd) in
  float64, holding the same (dtype-rounded) weights and inputs;
* torch.nn itself (backend "torch") in `dtype`, for context and for the low-precision tolerance.

Errors are relative error norms ||ours - oracle|| / ||oracle|| (Frobenius norm over the whole
tensor).

On a CPU, verify() bounds its cost unless full=True: it checks each RNN module of the model in its
own configuration (mode, layers, directions, projection, bias, batch_first, input structure as the
model calls it) on random inputs of at most MAX_STEPS steps and MAX_BATCH sequences; where the
Triton kernels run (through Triton's interpreter, ~0.05 s per launch and far more for wide
layers), also with the sizes cut to INTERP_HIDDEN / INTERP_INPUT and the kernel the full-size layer
would get. The report says what was checked. The Triton interpreter must be switched on before the
kernels are imported: when this process did not, the checks run in a child process with
TRITON_INTERPRET=1 (the model and inputs travel by torch.save).

Nothing here imports the Triton kernels at import time.
"""
from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from fusedrnn.spec import BACKENDS, CELLS, DTYPE_NAMES, DTYPES, STEP_CELLS, check_choice, parse_dtype

from .models import build_torch_module, convert_copy, is_fusedrnn_module
from .report import text_table

# Tolerances on the relative error norm against the float64 oracle.
# float64 and float32: fixed bounds (float32 ~1e-5), raised to 2x torch.nn's own error in that
# dtype in the rare case torch.nn itself is worse (long sequences, large sums).
# bfloat16 and float16: rounding error dominates and grows with the problem, so a fixed number is
# either too loose or flaky. The bar is torch.nn (backend "torch") in the same dtype, measured
# against the same oracle on the same inputs: ours may be at most 2x torch's error (differences in
# summation order and in where intermediate values are rounded cost up to a small factor) plus a
# floor of one unit roundoff (so that an entry torch happens to get exactly right still leaves
# room for one rounding). If torch.nn cannot run in that dtype, the fixed fallback applies.
BASE_TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
LOWP_FLOOR = {torch.bfloat16: 2.0 ** -9, torch.float16: 2.0 ** -12}
LOWP_FALLBACK = {torch.bfloat16: 2e-2, torch.float16: 3e-3}
TORCH_FACTOR = 2.0

# The bounded CPU check (full=False): sequence and batch caps, and where the Triton interpreter
# runs, the size caps (a 512-wide LSTM layer costs minutes per step there).
MAX_STEPS = 16
MAX_BATCH = 4
INTERP_STEPS = 4
INTERP_BATCH = 2
INTERP_HIDDEN = 20
INTERP_INPUT = 12


def tolerance(dtype, torch_error):
    if dtype in BASE_TOL:
        base = BASE_TOL[dtype]
        return base if torch_error is None else max(base, TORCH_FACTOR * torch_error)
    if torch_error is None or not math.isfinite(torch_error):
        return LOWP_FALLBACK[dtype]
    return TORCH_FACTOR * torch_error + LOWP_FLOOR[dtype]


# ----------------------------------------------------------------------------------------------
# nested structures


def _map(obj, fn):
    """Apply fn to every tensor in a nested tuple/list/dict/PackedSequence structure."""
    if isinstance(obj, PackedSequence):
        return PackedSequence(fn(obj.data), obj.batch_sizes, obj.sorted_indices,
                              obj.unsorted_indices)
    if torch.is_tensor(obj):
        return fn(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_map(o, fn) for o in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: _map(v, fn) for k, v in obj.items()}
    return obj


def _leaves(obj, prefix):
    """[(name, tensor)] for the floating tensors of a nested structure, in a fixed order."""
    if isinstance(obj, PackedSequence):
        return _leaves(obj.data, prefix + ".data")
    if torch.is_tensor(obj):
        return [(prefix, obj)] if obj.is_floating_point() else []
    if isinstance(obj, (tuple, list)):
        out = []
        for i, o in enumerate(obj):
            out += _leaves(o, f"{prefix}[{i}]")
        return out
    if isinstance(obj, dict):
        out = []
        for k, v in obj.items():
            out += _leaves(v, f"{prefix}[{k!r}]")
        return out
    return []


def _cast_input(dtype):
    def fn(t):
        if not t.is_floating_point():
            return t
        out = t.detach().to(dtype if dtype is not None else t.dtype).clone()
        return out.requires_grad_(t.requires_grad)
    return fn


@dataclass
class Entry:
    name: str
    kind: str  # "output" or "grad"
    error: float
    torch_error: float | None
    tol: float
    shape: tuple = ()

    @property
    def passed(self):
        return math.isfinite(self.error) and self.error <= self.tol

    @property
    def ratio(self):
        return self.error / self.tol if self.tol > 0 else math.inf


@dataclass
class VerifyReport:
    backend: str
    dtype: torch.dtype
    entries: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    label: str = ""
    seconds: float = 0.0
    routes: list = field(default_factory=list)
    error: str | None = None  # an exception raised while running the model under test
    scope: list = field(default_factory=list)  # what was checked (sizes, modules), one line each

    @property
    def passed(self):
        return self.error is None and bool(self.entries) and all(e.passed for e in self.entries)

    @property
    def errors(self):
        """{entry name: relative error}."""
        return {e.name: e.error for e in self.entries}

    @property
    def worst(self):
        return max(self.entries, key=lambda e: e.ratio) if self.entries else None

    def rows(self):
        return [(e.name, e.kind, _fmt(e.error), _fmt(e.torch_error), _fmt(e.tol),
                 "ok" if e.passed else "FAIL") for e in self.entries]

    def __str__(self):
        backend = self.backend or "each module's own"
        head = (f"fusedrnn.verify: backend={backend} dtype={DTYPE_NAMES.get(self.dtype, self.dtype)}"
                f" vs float64 reference{' [' + self.label + ']' if self.label else ''}"
                f"{' ran: ' + ', '.join(self.routes) if self.routes else ''}")
        lines = [head] + [f"checked: {s}" for s in self.scope]
        if self.error:
            err = self.error if len(self.error) <= 400 else self.error[:400] + " ..."
            lines.append(f"ERROR: {err}")
        if self.entries:
            lines.append(text_table(("quantity", "kind", "rel err", "torch err", "tol", ""),
                                    self.rows(), left=(0, 1)))
        lines += [f"note: {n}" for n in self.notes]
        n_ok = sum(e.passed for e in self.entries)
        lines.append(f"{'PASSED' if self.passed else 'FAILED'}: {n_ok}/{len(self.entries)} within "
                     f"tolerance{', and an error' if self.error else ''} ({self.seconds:.2f} s)")
        return "\n".join(lines)

    __repr__ = __str__

    def to_dict(self):
        return {"label": self.label, "backend": self.backend,
                "dtype": DTYPE_NAMES.get(self.dtype, str(self.dtype)), "passed": self.passed,
                "error": self.error, "notes": self.notes, "routes": self.routes,
                "scope": self.scope,
                "seconds": self.seconds,
                "entries": [{"name": e.name, "kind": e.kind, "error": e.error,
                             "torch_error": e.torch_error, "tol": e.tol, "passed": e.passed,
                             "shape": list(e.shape)} for e in self.entries]}


def _fmt(x):
    if x is None:
        return "-"
    return f"{x:.2e}"


def rel_error(a, ref):
    """||a - ref|| / ||ref|| in float64 (the absolute norm where ref is exactly zero)."""
    if a is None and ref is None:
        return 0.0
    if a is None:
        a = torch.zeros_like(ref)
    if ref is None:
        ref = torch.zeros_like(a, dtype=torch.float64)
    a = a.detach().to(torch.float64)
    ref = ref.detach().to(torch.float64)
    if a.shape != ref.shape:
        return math.inf
    diff = torch.linalg.vector_norm(a - ref).item()
    den = torch.linalg.vector_norm(ref).item()
    if not math.isfinite(diff):
        return math.inf
    return diff / den if den > 0 else diff


# ----------------------------------------------------------------------------------------------
# progress


class Progress:
    """Progress lines on stderr with the time spent and an estimate of the time left.

    Work is counted in units (a check's estimated cost); `advance` marks units done. Between
    checks the estimate is elapsed / units done x units left; within a check, once the forward of
    the model under test has run (time f), the rest of the check is about 2.5 f (backward ~1.5 f,
    the no_grad forward ~f) and the checks after it are scaled from that."""

    def __init__(self, total_units, enabled=True, prefix="fusedrnn.verify", stream=None):
        self.total = max(float(total_units), 1e-9)
        self.done = 0.0
        self.enabled = bool(enabled)
        self.prefix = prefix
        self.stream = stream
        self.t0 = time.perf_counter()

    def left(self, current_left=None, current_units=0.0, current_elapsed=0.0):
        """Seconds left (None: no estimate yet)."""
        rest = self.total - self.done - current_units
        if current_left is not None:
            per_unit = (current_elapsed + current_left) / max(current_units, 1e-9)
            return current_left + per_unit * max(rest, 0.0)
        if self.done <= 0:
            return None
        return (time.perf_counter() - self.t0) / self.done * max(self.total - self.done, 0.0)

    def stage(self, text, left_s=None):
        if not self.enabled:
            return
        if left_s is None:
            left_s = self.left()
        eta = "estimating the time left" if left_s is None else f"about {max(left_s, 0):.0f} s left"
        print(f"{self.prefix}: {text} [{time.perf_counter() - self.t0:.1f} s, {eta}]",
              file=self.stream or sys.stderr, flush=True)

    def advance(self, units):
        self.done += units


# ----------------------------------------------------------------------------------------------
# running one model


def _run(model, inputs, cotangents, cot_dtype, names=None, on_forward=None):
    """Forward, then gradients of sum(<output, cotangent>) w.r.t. inputs and parameters.

    Returns ({name: output}, {name: grad}); cotangents (float64, by output name) are generated
    when empty (from the first run, the oracle) and reused for the others, rounded to cot_dtype.
    on_forward(seconds): called after the forward.
    """
    t0 = time.perf_counter()
    out = model(*inputs)
    if on_forward is not None:
        on_forward(time.perf_counter() - t0)
    outs = _leaves(out, "out")
    in_leaves = []
    for i, a in enumerate(inputs):
        name = names[i] if names and i < len(names) else f"in[{i}]"
        in_leaves += [(n, t) for n, t in _leaves(a, name) if t.requires_grad]
    params = [(f"grad {n}", p) for n, p in model.named_parameters() if p.requires_grad]
    wrt = [(f"grad {n}", t) for n, t in in_leaves] + params
    diff_outs = [(n, o) for n, o in outs if o.requires_grad]
    grads = {}
    if diff_outs and wrt:
        if not cotangents:
            gen = torch.Generator().manual_seed(1234)
            for n, o in diff_outs:
                cotangents[n] = torch.randn(o.shape, generator=gen, dtype=torch.float64)
        gos = [cotangents[n].to(cot_dtype).to(device=o.device, dtype=o.dtype) for n, o in diff_outs]
        gs = torch.autograd.grad([o for _, o in diff_outs], [t for _, t in wrt], gos,
                                 allow_unused=True)
        grads = {n: g for (n, _), g in zip(wrt, gs)}
    return {n: o.detach() for n, o in outs}, grads


def _dropout_note(model):
    for sub in model.modules():
        if isinstance(sub, nn.RNNBase) and sub.dropout > 0 and sub.training:
            return True
    return False


class _no_tf32:
    """float32 means float32: no TF32 in cuBLAS or cuDNN while comparing (restored afterwards)."""

    def __enter__(self):
        self.saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved
        return False


def compare(model, example_inputs, backend=None, dtype=None, kernel=None, label="",
            input_names=None, no_grad=True, progress=None, units=1.0):
    """One check at the given sizes, in this process: `model` with its RNN modules on `backend`
    (None: each module's own) vs the float64 reference and torch.nn. Returns a VerifyReport; an
    exception in the model under test is reported (report.error), not raised.
    progress: a Progress to print the stages on (this check counts `units` of its work), or None."""
    t0 = time.perf_counter()
    if dtype is None:
        p = next((p for p in model.parameters() if p.is_floating_point()), None)
        dtype = p.dtype if p is not None else torch.float32
    dtype = parse_dtype(dtype)
    report = VerifyReport(backend=backend, dtype=dtype, label=label)
    tag = f"{label}: " if label else ""

    def stage(text, current_left=None):
        if progress is not None:
            left = None
            if current_left is not None:
                left = progress.left(current_left, units, time.perf_counter() - t0)
            elif progress.done > 0:
                left = progress.left()
            progress.stage(tag + text, left)

    base = copy.deepcopy(model).to(dtype)
    if _dropout_note(base):
        for sub in base.modules():
            if isinstance(sub, nn.RNNBase):
                sub.eval()
        report.notes.append("RNN dropout is random: RNN modules compared in eval mode")

    cot = {}
    stage("float64 reference (forward + backward)")
    ref_model = convert_copy(base, "reference").double()
    ref_out, ref_grad = _run(ref_model, _map(_map(example_inputs, _cast_input(dtype)),
                                             _cast_input(torch.float64)), cot, dtype, input_names)
    torch_out = torch_grad = None
    if backend != "torch":
        stage(f"torch.nn in {DTYPE_NAMES.get(dtype, dtype)}")
        try:
            with _no_tf32():
                torch_out, torch_grad = _run(convert_copy(base, "torch"),
                                             _map(example_inputs, _cast_input(dtype)), cot, dtype,
                                             input_names)
        except Exception as exc:  # noqa: BLE001 - torch.nn may not support this dtype/device
            report.notes.append(f"torch.nn could not run for comparison: {type(exc).__name__}: "
                                f"{str(exc).splitlines()[0] if str(exc) else ''}")
    under_test = backend or "the modules' own backend"
    stage(f"{under_test}: forward")
    fwd_s = []

    def forward_done(seconds):
        fwd_s.append(seconds)
        stage(f"{under_test}: forward took {seconds:.1f} s; backward",
              (2.5 if no_grad else 1.5) * seconds)

    try:
        test_model = convert_copy(base, backend, kernel)
        with _no_tf32():
            out, grad = _run(test_model, _map(example_inputs, _cast_input(dtype)), cot, dtype,
                             input_names, on_forward=forward_done)
        report.routes = _routes(test_model)
    except Exception as exc:  # noqa: BLE001 - reported as a failure, not raised
        report.error = f"{type(exc).__name__}: {exc}"
        report.seconds = time.perf_counter() - t0
        return report

    # Inference (torch.no_grad()) takes its own path in the layers (no workspace saved): check
    # its outputs too, against the same oracle.
    nograd_out = {}
    if no_grad:
        stage(f"{under_test}: forward under torch.no_grad()", fwd_s[0] if fwd_s else None)
        try:
            with _no_tf32(), torch.no_grad():
                o = test_model(*_map(example_inputs, _cast_input(dtype)))
            nograd_out = {f"no_grad {n}": t for n, t in _leaves(o, "out")}
        except Exception as exc:  # noqa: BLE001 - reported as a failure, not raised
            report.error = f"under torch.no_grad(): {type(exc).__name__}: {exc}"

    ng_ref = {f"no_grad {n}": t for n, t in ref_out.items()} if nograd_out else {}
    ng_torch = ({f"no_grad {n}": t for n, t in torch_out.items()}
                if nograd_out and torch_out is not None else None)
    for kind, mine, ref, theirs in (("output", out, ref_out, torch_out),
                                    ("grad", grad, ref_grad, torch_grad),
                                    ("output", nograd_out, ng_ref, ng_torch)):
        for name in ref:
            err = rel_error(mine.get(name), ref[name])
            terr = rel_error(theirs.get(name), ref[name]) if theirs is not None else None
            shape = tuple(ref[name].shape) if ref[name] is not None else ()
            report.entries.append(Entry(name, kind, err, terr, tolerance(dtype, terr), shape))
        for name in set(mine) - set(ref):
            report.entries.append(Entry(name, kind, math.inf, None, 0.0))
            report.notes.append(f"{name}: produced by {under_test} but not by the reference")
    report.seconds = time.perf_counter() - t0
    return report


def _routes(model):
    """The routes (and kernels) fusedrnn modules actually used in their last call, with the
    measured choice of backend="auto" where one was made."""
    out = set()
    for sub in model.modules():
        route = getattr(sub, "last_backend", None)
        if route is not None:
            kernels = getattr(sub, "last_kernels", None)
            text = f"{route}" + (f"/{'+'.join(sorted(set(kernels)))}" if kernels else "")
            tuning = getattr(sub, "last_tuning", None)
            if tuning is not None and tuning.chosen is not None:
                # backend="auto"'s measured choice, with the kernels it excluded and why
                text += f" ({tuning.source}: {tuning.chosen}"
                text += "".join(f"; excluded {n}: {why}" for n, why in sorted(tuning.excluded.items()))
                text += ")"
            out.add(text)
    return sorted(out)


# ----------------------------------------------------------------------------------------------
# verify(): what the model runs here, at a bounded cost on CPU


@dataclass
class Check:
    """One comparison verify() runs: a model (or one RNN module of it) on given inputs."""
    label: str
    model: nn.Module
    inputs: tuple
    input_names: tuple | None = None
    kernel: str | None = None
    scope: str = ""
    units: float = 1.0


def _device_of(model):
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _module_backend(module, backend):
    """The backend a module of the model runs under verify: `backend`, else its own ("auto" for a
    torch.nn module), with $FUSEDRNN_BACKEND applied to "auto"."""
    from fusedrnn.dispatch import requested_backend

    own = backend or (module.backend if is_fusedrnn_module(module) else "auto")
    return requested_backend(own)


def _runs_triton(module, backend, device):
    b = _module_backend(module, backend)
    if b == "triton":
        return True
    if b == "auto" and device.type == "cuda":
        from fusedrnn.dispatch import triton_problem
        return triton_problem(device) is None
    return False


def _rnn_modules(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.RNNBase, nn.RNNCellBase))]


def _capture_calls(model, example_inputs):
    """{module name: (args, kwargs) of its first call} for every RNN module, from one forward of a
    copy running torch's fused ops (the reference loop where they cannot run) without autograd."""
    for backend in ("torch", "reference"):
        probe = convert_copy(model, backend)
        calls, hooks = {}, []
        for name, m in _rnn_modules(probe):
            def hook(mod, args, kwargs, name=name):
                calls.setdefault(name, (args, kwargs))
            hooks.append(m.register_forward_pre_hook(hook, with_kwargs=True))
        try:
            with torch.no_grad():
                probe(*example_inputs)
            return calls
        except Exception:
            if backend == "reference":
                raise
        finally:
            for h in hooks:
                h.remove()
    return {}


def _config(m):
    """(cell name, input size, hidden size, layers, bidirectional, proj_size, bias, batch_first)."""
    if isinstance(m, nn.RNNCellBase):
        cell = {"LSTMCell": "lstmcell", "GRUCell": "grucell"}.get(
            next(c.__name__ for c in type(m).__mro__ if c.__module__.startswith("torch.nn")), "rnncell")
        if cell == "rnncell" and getattr(m, "nonlinearity", "tanh") == "relu":
            cell = "rnncell_relu"
        return cell, m.input_size, m.hidden_size, 1, False, 0, m.bias, False
    cell = {"LSTM": "lstm", "GRU": "gru", "RNN_TANH": "rnn_tanh", "RNN_RELU": "rnn_relu"}[m.mode]
    return (cell, m.input_size, m.hidden_size, m.num_layers, m.bidirectional, m.proj_size, m.bias,
            m.batch_first)


def _describe(cell, I, H, L, bi, proj):
    if cell in STEP_CELLS or cell == "rnncell_relu":
        return f"{cell} {I}->{H}"
    return (f"{cell} {I}->{H}" + (f" proj {proj}" if proj else "") + f", {L} layer{'s' * (L > 1)}"
            + (", bidirectional" if bi else ""))


def _bounded_check(name, module, call, backend, kernel, interp, gen):
    """A Check of one RNN module in its own configuration on random inputs of bounded size, with
    the structure of its captured call (batched or not, packed or not, hx given or not)."""
    args, kwargs = call
    cell, I, H, L, bi, proj, bias, batch_first = _config(module)
    is_cell = cell in STEP_CELLS or cell == "rnncell_relu"
    x = args[0] if args else kwargs.get("input")
    hx = args[1] if len(args) > 1 else kwargs.get("hx")
    packed = isinstance(x, PackedSequence)
    if packed:
        T, B, batched = len(x.batch_sizes), int(x.batch_sizes[0]), True
    elif is_cell:
        T, batched = 1, x.dim() == 2
        B = x.shape[0] if batched else 1
    else:
        batched = x.dim() == 3
        T = x.shape[1 if batch_first and batched else 0]
        B = x.shape[0 if batch_first else 1] if batched else 1
    max_t, max_b = (INTERP_STEPS, INTERP_BATCH) if interp else (MAX_STEPS, MAX_BATCH)
    T2, B2 = min(T, max_t), min(B, max_b)
    I2, H2, P2 = I, H, proj
    dtype = next(module.parameters()).dtype
    if interp:
        I2, H2 = min(I, INTERP_INPUT), min(H, INTERP_HIDDEN)
        P2 = min(proj, max(1, H2 // 2)) if proj else 0
    own_kernel = getattr(module, "kernel", "auto") if is_fusedrnn_module(module) else "auto"
    use_kernel = kernel
    kernel_note = ""
    if interp and (I2, H2, P2) != (I, H, proj) and kernel is None and own_kernel == "auto" \
            and not is_cell:
        # the kernel the full-size layer gets here, not the one the smaller copy would get
        from fusedrnn import kernels
        mode = {"lstm": "LSTM", "gru": "GRU", "rnn_tanh": "RNN_TANH", "rnn_relu": "RNN_RELU"}[cell]
        full = kernels.plan_for(mode, 2 if bi else 1, B, H, proj or H, dtype, torch.device("cpu"))
        use_kernel = "persistent" if full is not None else "stepwise"
        kernel_note = f", kernel {use_kernel} (as at full size)"
    if (I2, H2, P2) == (I, H, proj):
        m = module
    else:
        base = build_torch_module(cell if cell != "rnncell_relu" else "rnncell", I2, H2, L, bi, P2,
                                  bias, batch_first)
        if cell == "rnncell_relu":
            base.nonlinearity = "relu"
        m = base.to(dtype)
        if is_fusedrnn_module(module):
            m = convert_copy(m, module.backend)
            for sub in m.modules():
                if is_fusedrnn_module(sub) and hasattr(sub, "kernel"):
                    sub.kernel = own_kernel

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()

    D = 2 if bi else 1
    if is_cell:
        xs = rnd(B2, I2) if batched else rnd(I2)
        inputs = [xs]
        if hx is not None:
            hshape = (B2, H2) if batched else (H2,)
            inputs.append((rnd(*hshape), rnd(*hshape)) if cell == "lstmcell" else rnd(*hshape))
    else:
        if packed:
            lengths = torch.randint(1, T2 + 1, (B2,), generator=gen)
            lengths[0] = T2
            xs = nn.utils.rnn.pack_padded_sequence(rnd(T2, B2, I2), lengths, enforce_sorted=False)
        elif batched:
            xs = rnd(B2, T2, I2) if batch_first else rnd(T2, B2, I2)
        else:
            xs = rnd(T2, I2)
        inputs = [xs]
        if hx is not None:
            hb = (B2,) if batched else ()
            h0 = rnd(L * D, *hb, P2 or H2)
            inputs.append((h0, rnd(L * D, *hb, H2)) if cell == "lstm" else h0)
    what = _describe(cell, I, H, L, bi, proj)
    sizes = f"T={T2} of {T}, " if not is_cell else ""
    sizes += f"B={B2} of {B}" if batched else "unbatched"
    if m is not module:
        sizes += f", sizes {_describe(cell, I2, H2, L, bi, P2).split(',')[0]}"
    scope = (f"{name or 'the model'} ({what}): random inputs, {sizes}"
             + (", packed" if packed else "") + kernel_note)
    units = (L * D * T2 * (50 if interp else 1)) + 1
    return Check(name, m, tuple(inputs), ("x", "hx"), use_kernel, scope, units)


def _plan(model, example_inputs, backend, kernel, full, device):
    """[Check] for verify(): the whole model (full, or not on a CPU), else one bounded check per
    RNN module."""
    interp_here = device.type == "cpu"
    if full or device.type != "cpu":
        scope = "the whole model on the inputs given (full size)"
        return [Check("", model, tuple(example_inputs), None, kernel, scope, 1.0)]
    calls = _capture_calls(model, example_inputs)
    gen = torch.Generator().manual_seed(0)
    checks = []
    for name, m in _rnn_modules(model):
        if name not in calls:
            continue
        interp = interp_here and _runs_triton(m, backend, device)
        checks.append(_bounded_check(name, m, calls[name], backend, kernel, interp, gen))
    if not checks:
        raise ValueError("verify: the model called no LSTM/GRU/RNN module on these inputs: "
                         "nothing to check")
    return checks


def _needs_child(checks, backend, device):
    """True when a check runs Triton kernels on CPU but this process has no interpreter."""
    if device.type != "cpu":
        return False
    if not any(_runs_triton(m, backend, device) for c in checks for _, m in _rnn_modules(c.model)):
        return False
    from fusedrnn.dispatch import triton_problem
    return triton_problem(torch.device("cpu")) is not None


def _run_checks(checks, backend, dtype, no_grad, progress):
    reports = []
    for c in checks:
        rep = compare(c.model, c.inputs, backend=backend, dtype=dtype, kernel=c.kernel,
                      label=c.label, input_names=c.input_names, no_grad=no_grad, progress=progress,
                      units=c.units)
        if progress is not None:
            progress.advance(c.units)
        reports.append(rep)
    return reports


def _run_checks_in_child(checks, backend, dtype, no_grad, progress_on):
    """_run_checks in a child Python process with TRITON_INTERPRET=1 (its progress on our stderr)."""
    with tempfile.TemporaryDirectory(prefix="fusedrnn-verify-") as tmp:
        src, dst = os.path.join(tmp, "checks.pt"), os.path.join(tmp, "reports.pt")
        try:
            torch.save({"checks": checks, "backend": backend, "dtype": dtype, "no_grad": no_grad,
                        "progress": progress_on}, src)
        except Exception as exc:  # noqa: BLE001 - say what to do instead
            raise RuntimeError(
                "verify: the Triton kernels on CPU run through Triton's interpreter in a child "
                "process, and this model cannot be pickled for it "
                f"({type(exc).__name__}: {exc}); define the model in an importable module, or set "
                "TRITON_INTERPRET=1 before importing fusedrnn and run verify in this process"
            ) from exc
        env = dict(os.environ, TRITON_INTERPRET="1")
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        # _child_main imported by name, so that the reports it pickles belong to this module
        code = ("import sys; from fusedrnn.tools.verify import _child_main; "
                "sys.exit(_child_main(sys.argv[1], sys.argv[2]))")
        proc = subprocess.run([sys.executable, "-c", code, src, dst], env=env,
                              stdout=subprocess.PIPE, text=True)
        if proc.returncode != 0 or not os.path.exists(dst):
            raise RuntimeError(f"verify: the child process running the Triton interpreter failed "
                               f"(exit status {proc.returncode}): {proc.stdout[-2000:]}")
        return torch.load(dst, weights_only=False)


def verify(model, *example_inputs, backend=None, dtype=None, kernel=None, full=False, label="",
           input_names=None, no_grad=True, progress=True):
    """Compare `model` against the float64 reference (and torch.nn) on `example_inputs`.

    model: any nn.Module containing torch.nn or fusedrnn LSTM/GRU/RNN/*Cell modules; it is not
    modified (deep copies are converted). example_inputs: the positional arguments of
    model.forward; floating tensors (also inside tuples, lists, dicts and PackedSequence) are cast
    to `dtype` (default: the dtype of the model's parameters), and those with requires_grad=True
    get their gradients checked, along with every parameter's, for a fixed random cotangent.
    backend: what the RNN modules run; None (default): what each runs on this machine (its own
    `backend`, "auto" for torch.nn modules: on a CPU torch's fused ops, on CUDA the Triton
    kernels). Triton kernels on CPU run through Triton's interpreter, in a child process when this
    process was not started with TRITON_INTERPRET=1.
    kernel: force "stepwise" or "persistent" Triton kernels (default: the module's choice).
    full: on a CPU, check the whole model at the inputs' full size instead of the bounded check
    (each RNN module in its own configuration at few steps and sequences, and small sizes where
    the interpreter runs; see the module docstring). On CUDA the check is always full size.
    input_names: names for the positional inputs in the report (default in[0], in[1], ...).
    no_grad: also run the model under test inside torch.no_grad() and check those outputs.
    progress: print progress and an estimate of the time left to stderr.

    Returns a VerifyReport: print it for a table; `.passed`, `.errors`, `.entries`, `.scope`.
    """
    if backend is not None:
        check_choice(backend, BACKENDS, "backend")
    if not isinstance(model, nn.Module):
        raise TypeError(f"verify: model must be a torch.nn.Module, got {type(model).__name__}")
    t0 = time.perf_counter()
    device = _device_of(model)
    if dtype is not None:
        dtype = parse_dtype(dtype)
    progress_obj = Progress(1.0, enabled=progress)
    checks = _plan(model, example_inputs, backend, kernel, full, device)
    child = _needs_child(checks, backend, device)
    progress_obj.total = sum(c.units for c in checks)
    if progress:
        where = ("the Triton kernels through Triton's interpreter in a child process "
                 "(TRITON_INTERPRET=1)" if child else "in this process")
        progress_obj.stage(f"{len(checks)} check{'s' * (len(checks) > 1)}, {where}: "
                           + "; ".join(c.scope for c in checks))
    if child:
        if input_names is not None and len(checks) == 1 and not checks[0].label:
            checks[0].input_names = input_names
        reports = _run_checks_in_child(checks, backend, dtype, no_grad, progress)
    else:
        if input_names is not None and len(checks) == 1 and checks[0].input_names is None:
            checks[0].input_names = input_names
        reports = _run_checks(checks, backend, dtype, no_grad, progress_obj if progress else None)
    report = _merge(reports, checks, backend, label, full or device.type != "cpu")
    report.seconds = time.perf_counter() - t0
    if child:
        report.notes.append("ran in a child process with TRITON_INTERPRET=1 (Triton's interpreter)")
    if progress:
        print(f"fusedrnn.verify: {'PASSED' if report.passed else 'FAILED'} in {report.seconds:.1f} s",
              file=sys.stderr, flush=True)
    return report


def _merge(reports, checks, backend, label, full):
    """One VerifyReport of several checks (entry names prefixed with the module's name)."""
    if len(reports) == 1 and not checks[0].label:
        rep = reports[0]
        rep.label = label
    else:
        rep = VerifyReport(backend=backend, dtype=reports[0].dtype, label=label)
        errors = []
        for c, r in zip(checks, reports):
            for e in r.entries:
                e.name = f"{c.label}: {e.name}"
                rep.entries.append(e)
            rep.notes += [f"{c.label}: {n}" for n in r.notes]
            rep.routes += [f"{c.label}: {x}" for x in r.routes]
            if r.error:
                errors.append(f"{c.label}: {r.error}")
        rep.error = "; ".join(errors) or None
    rep.scope = [c.scope for c in checks]
    if not full:
        rep.notes.append("bounded CPU check (see scope); verify(..., full=True) checks the full "
                         "sizes")
    return rep


def _child_main(src, dst):
    """The child process of _run_checks_in_child."""
    job = torch.load(src, weights_only=False)
    checks = job["checks"]
    progress = Progress(sum(c.units for c in checks), enabled=job["progress"],
                        prefix="fusedrnn.verify (interpreter)")
    reports = _run_checks(checks, job["backend"], job["dtype"], job["no_grad"],
                          progress if job["progress"] else None)
    torch.save(reports, dst)
    return 0


# ----------------------------------------------------------------------------------------------
# the grid behind `fusedrnn verify`


@dataclass
class Case:
    cell: str
    dtype: torch.dtype
    T: int
    B: int
    I: int
    H: int
    layers: int = 1
    bidirectional: bool = False
    proj_size: int = 0
    packed: bool = False
    bias: bool = True
    batch_first: bool = False
    seed: int = 0

    @property
    def label(self):
        parts = [self.cell, DTYPE_NAMES[self.dtype]]
        if self.cell in STEP_CELLS:
            parts.append(f"B{self.B} I{self.I} H{self.H}")
        else:
            parts.append(f"T{self.T} B{self.B} I{self.I} H{self.H}")
            parts.append(f"L{self.layers}" + (" bi" if self.bidirectional else ""))
            if self.proj_size:
                parts.append(f"proj{self.proj_size}")
            if self.packed:
                parts.append("packed")
            if self.batch_first:
                parts.append("batch_first")
        if not self.bias:
            parts.append("nobias")
        return " ".join(parts)


def case_inputs(case, device):
    """(module, inputs) for a case, with inputs that require grad (x, h0, c0)."""
    gen = torch.Generator().manual_seed(case.seed)
    torch.manual_seed(case.seed)
    m = build_torch_module(case.cell, case.I, case.H, case.layers, case.bidirectional,
                           case.proj_size, case.bias, case.batch_first).to(device)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device).float() \
            .requires_grad_()

    if case.cell in STEP_CELLS:
        h = rnd(case.B, case.H)
        hx = (h, rnd(case.B, case.H)) if case.cell == "lstmcell" else h
        return m, (rnd(case.B, case.I), hx)
    D = 2 if case.bidirectional else 1
    P = case.proj_size or case.H
    h0 = rnd(case.layers * D, case.B, P)
    hx = (h0, rnd(case.layers * D, case.B, case.H)) if case.cell == "lstm" else h0
    if case.batch_first:
        x = rnd(case.B, case.T, case.I)
    else:
        x = rnd(case.T, case.B, case.I)
    if case.packed:
        lengths = torch.randint(1, case.T + 1, (case.B,), generator=gen)
        lengths[0] = case.T
        x = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=case.batch_first,
                                              enforce_sorted=False)
    return m, (x, hx)


def grid(cells=CELLS, dtypes=tuple(DTYPES), quick=False, shape=None):
    """The cases `fusedrnn verify` runs, dtype by dtype in the order given, then cell by cell.

    Sizes are deliberately not multiples of 16 (masking in the kernels' tiles). Options that do not
    depend on the dtype (layers, directions, packing, projection, bias, batch_first) are covered in
    float32; every other dtype runs the most general case per cell (2 layers, bidirectional,
    packed, and proj_size for LSTM).
    --quick: T=3 and tiny B/I/H so that the Triton interpreter (~0.05 s per launch) stays fast.
    shape: (T, B, I, H) overrides the sizes (proj_size then H // 2).
    """
    dtypes = [parse_dtype(d) for d in dtypes]
    for cell in cells:
        check_choice(cell, CELLS, "cell")
    if quick:
        T, B, I, H, P = 3, 3, 5, 7, 5
    else:
        T, B, I, H, P = 37, 13, 29, 47, 23
    if shape is not None:
        T, B, I, H = shape
        P = max(1, H // 2)
    cases = []
    for dt in dtypes:
        for cell in cells:
            if cell in STEP_CELLS:
                cases.append(Case(cell, dt, 1, B, I, H))
                if dt == torch.float32 and not quick:
                    cases.append(Case(cell, dt, 1, B, I, H, bias=False, seed=1))
                continue
            proj = P if cell == "lstm" else 0
            general = Case(cell, dt, T, B, I, H, layers=2, bidirectional=True, proj_size=proj,
                           packed=True)
            if dt != torch.float32:
                cases.append(general)
                continue
            if quick:
                cases.append(Case(cell, dt, T, B, I, H))
                cases.append(general)
                continue
            cases += [
                Case(cell, dt, T, B, I, H),
                Case(cell, dt, T, B, I, H, layers=2, bidirectional=True),
                Case(cell, dt, T, B, I, H, bidirectional=True, packed=True, seed=1),
                Case(cell, dt, T, B, I, H, bias=False, batch_first=True, seed=2),
                general,
            ]
            if cell == "lstm":
                cases.append(Case(cell, dt, T, B, I, H, proj_size=P, seed=3))
    return cases


def case_units(case):
    """The relative cost of a case (serial steps: layers x directions x T), for the time estimate."""
    return case.layers * (2 if case.bidirectional else 1) * case.T + 1


def verify_case(case, device="cpu", backend="triton", kernel=None, progress=None, units=1.0):
    """compare() for one grid case at its own sizes, in this process."""
    m, inputs = case_inputs(case, device)
    return compare(m, inputs, backend=backend, dtype=case.dtype, kernel=kernel, label=case.label,
                   input_names=("x", "hx"), progress=progress, units=units)


def summary_rows(case, rep):
    """Rows for the CLI table: per case, the worst entry of each group of quantities."""
    groups = {}
    for e in rep.entries:
        if e.kind == "output":
            g = "output"
        elif e.name.startswith(("grad in", "grad x", "grad hx")):
            g = "grad inputs"
        else:
            g = "grad params"
        if g not in groups or e.ratio > groups[g].ratio:
            groups[g] = e
    rows = []
    if rep.error:
        rows.append((case.label, "ERROR", rep.error.splitlines()[0][:60], "-", "-", "FAIL"))
    for g in ("output", "grad inputs", "grad params"):
        if g in groups:
            e = groups[g]
            rows.append((case.label, f"{g} (worst: {e.name})", _fmt(e.error), _fmt(e.torch_error),
                         _fmt(e.tol), "ok" if e.passed else "FAIL"))
    return rows

