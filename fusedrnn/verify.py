"""Check the fused kernels against the float64 reference: `fusedrnn.verify` and `fusedrnn verify`.

`verify(model, *inputs)` runs a user's own model three ways on the same inputs and compares every
output and every gradient (of the floating inputs that require grad and of every parameter):

* the model under test: a deep copy converted to `backend` (default "triton"), in `dtype`;
* the oracle: a deep copy converted to backend "reference" (a plain PyTorch step loop with
  autograd) in float64, holding the same (dtype-rounded) weights and inputs;
* torch.nn itself (backend "torch") in `dtype`, for context and for the low-precision tolerance.

Errors are relative error norms ||ours - oracle|| / ||oracle|| (Frobenius norm over the whole
tensor). `verify_grid` sweeps cells, shapes and options for the `fusedrnn verify` command.

Nothing here imports the Triton kernels at import time: `import fusedrnn.verify` is cheap and does
not fix TRITON_INTERPRET.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

DTYPES = {
    "fp64": torch.float64, "float64": torch.float64, "double": torch.float64,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
}
DTYPE_NAMES = {torch.float64: "fp64", torch.float32: "fp32", torch.bfloat16: "bf16",
               torch.float16: "fp16"}

# Tolerances on the relative error norm against the float64 oracle.
# float64 and float32: fixed bounds (float32 ~1e-5 as the issue asks), raised to 2x torch.nn's own
# error in that dtype in the rare case torch.nn itself is worse (long sequences, large sums).
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


def parse_dtype(name):
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of fp64, fp32, bf16, fp16") from None


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


# ----------------------------------------------------------------------------------------------
# converting copies


class _Holder(nn.Module):
    """Lets fusedrnn.convert replace the root module too (convert replaces children in place)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner


def convert_copy(module, backend, kernel=None):
    """A deep copy of `module` with every RNN module running `backend` (and `kernel`, if given)."""
    import fusedrnn

    holder = _Holder(copy.deepcopy(module))
    fusedrnn.convert(holder, backend=backend)
    m = holder.inner
    for sub in m.modules():
        if type(sub).__module__.startswith("fusedrnn") and hasattr(sub, "backend"):
            sub.backend = backend
            if kernel is not None and hasattr(sub, "kernel"):
                sub.kernel = kernel
    return m


def _routes(model):
    """The backends (and kernels) fusedrnn modules actually used in their last call."""
    out = set()
    for sub in model.modules():
        route = getattr(sub, "last_backend", None)
        if route is not None:
            kernels = getattr(sub, "last_kernels", None)
            out.add(f"{route}" + (f"/{'+'.join(sorted(set(kernels)))}" if kernels else ""))
    return sorted(out)


# ----------------------------------------------------------------------------------------------
# the report


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
        from .roofline import text_table

        head = (f"fusedrnn.verify: backend={self.backend} dtype={DTYPE_NAMES.get(self.dtype, self.dtype)}"
                f" vs float64 reference{' [' + self.label + ']' if self.label else ''}"
                f"{' routes=' + ','.join(self.routes) if self.routes else ''}")
        lines = [head]
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
# running one model


def _run(model, inputs, cotangents, cot_dtype, names=None):
    """Forward, then gradients of sum(<output, cotangent>) w.r.t. inputs and parameters.

    Returns ({name: output}, {name: grad}); cotangents (float64, by output name) are generated
    when empty (from the first run, the oracle) and reused for the others, rounded to cot_dtype.
    """
    out = model(*inputs)
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


def verify(model, *example_inputs, backend="triton", dtype=None, kernel=None, label="",
           input_names=None, no_grad=True):
    """Compare `model` converted to `backend` against the float64 reference on `example_inputs`.

    model: any nn.Module containing torch.nn (or fusedrnn) LSTM/GRU/RNN/*Cell modules; it is not
    modified (deep copies are converted). example_inputs: the positional arguments of
    model.forward; floating tensors (also inside tuples, lists, dicts and PackedSequence) are cast
    to `dtype` (default: the dtype of the model's parameters), and those with requires_grad=True
    get their gradients checked, along with every parameter's, for a fixed random cotangent.
    kernel: force "stepwise" or "persistent" Triton kernels (default: the module's choice).
    input_names: names for the positional inputs in the report (default in[0], in[1], ...).
    no_grad: also run the model under test inside torch.no_grad() (inference takes its own path)
    and check those outputs ("no_grad out..." entries).

    Returns a VerifyReport: print it for a table; `.passed`, `.errors`, `.entries`.
    """
    t0 = time.perf_counter()
    if dtype is None:
        p = next((p for p in model.parameters() if p.is_floating_point()), None)
        dtype = p.dtype if p is not None else torch.float32
    dtype = parse_dtype(dtype)
    report = VerifyReport(backend=backend, dtype=dtype, label=label)
    base = copy.deepcopy(model).to(dtype)
    if _dropout_note(base):
        for sub in base.modules():
            if isinstance(sub, nn.RNNBase):
                sub.eval()
        report.notes.append("RNN dropout is random: RNN modules compared in eval mode")

    cot = {}
    ref_model = convert_copy(base, "reference").double()
    ref_out, ref_grad = _run(ref_model, _map(_map(example_inputs, _cast_input(dtype)),
                                             _cast_input(torch.float64)), cot, dtype, input_names)

    torch_out = torch_grad = None
    if backend != "torch":
        try:
            with _no_tf32():
                torch_out, torch_grad = _run(convert_copy(base, "torch"),
                                             _map(example_inputs, _cast_input(dtype)), cot, dtype,
                                             input_names)
        except Exception as exc:  # noqa: BLE001 - torch.nn may not support this dtype/device
            report.notes.append(f"torch.nn could not run for comparison: {type(exc).__name__}: "
                                f"{str(exc).splitlines()[0] if str(exc) else ''}")

    try:
        test_model = convert_copy(base, backend, kernel)
        with _no_tf32():
            out, grad = _run(test_model, _map(example_inputs, _cast_input(dtype)), cot, dtype,
                                             input_names)
        report.routes = _routes(test_model)
    except Exception as exc:  # noqa: BLE001 - reported as a failure, not raised
        report.error = f"{type(exc).__name__}: {exc}"
        report.seconds = time.perf_counter() - t0
        return report

    # Inference (torch.no_grad()) takes its own path in the layers (no workspace saved): check
    # its outputs too, against the same oracle.
    nograd_out = {}
    if no_grad:
        try:
            with _no_tf32(), torch.no_grad():
                o = test_model(*_map(example_inputs, _cast_input(dtype)))
            nograd_out = {f"no_grad {n}": t for n, t in _leaves(o, "out")}
        except Exception as exc:  # noqa: BLE001
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
            report.notes.append(f"{name}: produced by {backend} but not by the reference")
    report.seconds = time.perf_counter() - t0
    return report


class _no_tf32:
    """float32 means float32: no TF32 in cuBLAS or cuDNN while comparing (restored afterwards)."""

    def __enter__(self):
        self.saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved
        return False


# ----------------------------------------------------------------------------------------------
# the grid behind `fusedrnn verify`

SEQ_CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")
STEP_CELLS = ("lstmcell", "grucell", "rnncell")
CELLS = SEQ_CELLS + STEP_CELLS


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


def build_torch_module(cell, I, H, layers=1, bidirectional=False, proj_size=0, bias=True,
                       batch_first=False):
    """The plain torch.nn module for a cell name (parameters in float32, on the CPU)."""
    if cell == "lstm":
        return nn.LSTM(I, H, layers, bias=bias, batch_first=batch_first,
                       bidirectional=bidirectional, proj_size=proj_size)
    if cell == "gru":
        return nn.GRU(I, H, layers, bias=bias, batch_first=batch_first,
                      bidirectional=bidirectional)
    if cell in ("rnn_tanh", "rnn_relu"):
        return nn.RNN(I, H, layers, nonlinearity=cell[4:], bias=bias, batch_first=batch_first,
                      bidirectional=bidirectional)
    if cell == "lstmcell":
        return nn.LSTMCell(I, H, bias=bias)
    if cell == "grucell":
        return nn.GRUCell(I, H, bias=bias)
    if cell in ("rnncell", "rnncell_relu"):
        return nn.RNNCell(I, H, bias=bias, nonlinearity="relu" if cell.endswith("relu") else "tanh")
    raise ValueError(f"unknown cell {cell!r}; use one of {', '.join(CELLS)}")


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


def grid(cells=CELLS, dtypes=("fp32", "bf16", "fp64", "fp16"), quick=False, shape=None):
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
        if cell not in CELLS:
            raise ValueError(f"unknown cell {cell!r}; use one of {', '.join(CELLS)}")
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


def verify_grid(cases, device="cpu", backend="triton", kernel=None, progress=None):
    """Run verify() on every case; yields (case, report)."""
    for case in cases:
        m, inputs = case_inputs(case, device)
        rep = verify(m, *inputs, backend=backend, dtype=case.dtype, kernel=kernel,
                     label=case.label, input_names=("x", "hx"))
        if progress is not None:
            progress(case, rep)
        yield case, rep


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
