"""One custom op per layer: ``fusedrnn::layer`` and its backward ``fusedrnn::layer_backward``.

Registered with torch.library so that torch.compile sees one opaque node per layer whatever the
sequence length (a Python time loop would be unrolled: compile time would grow with T, and torch's
own RNN ops cannot be traced at all). The ops are ``custom_op``s rather than ``triton_op``s on
purpose: a triton_op's body is traced by the compiler, and the stepwise kernel's T launches would
then be unrolled into the graph.

The ``kernel`` argument picks the implementation of the scan contract (docs/design.md):
"stepwise" / "persistent" run the Triton kernels, "loop" runs fusedrnn/loop.py (the PyTorch step
loop, used under torch.compile on CPU), "auto" picks stepwise or persistent inside the op from the
concrete sizes (what a traced graph holds, so that torch.compile / torch.export do not specialize
on the batch size). The input projection before the scan and the weight/input gradients after it
are large matmuls done by torch (cuBLAS on GPU).

What runs where, under each kind of differentiation (said here once, tested in
tests/test_transforms.py):

- first-order gradients (``.backward()``, ``torch.autograd.grad``, ``torch.func.grad`` / ``vjp`` /
  ``jacrev``): ``layer_backward``, i.e. the backward kernels (or loop.py for kernel="loop");
- second-order gradients (double backward, gradgradcheck, a gradient penalty, ``grad(grad(...))``):
  the first-order gradients still come from ``layer_backward``; differentiating *them* recomputes
  the layer with fusedrnn/reference.py (plain PyTorch) and differentiates that twice with
  ``torch.func.vjp``, so second-order terms cost a reference forward plus two reference backwards;
- forward mode (``torch.func.jvp``, ``jacfwd``, ``torch.autograd.forward_ad``): the tangents are
  those of fusedrnn/reference.py (``torch.func.jvp`` of it); the primal outputs still come from
  the kernels;
- ``torch.func.vmap``: batching rules fold the vmapped dimension into the layer's batch (one kernel
  call over N * B rows, weight gradients kept per sample through ``groups``); only vmapped weights
  (an ensemble from ``stack_module_state``) fall back to a loop over the vmapped dimension.

Why the torch.func transforms need more than ``register_autograd``: the autograd.Function that
torch.library generates for it has no ``setup_context`` (pytorch/pytorch#170834), which every
torch.func transform requires. So each op also gets a kernel at functorch's front dispatch key
that hands the call to an autograd.Function of ours (``_LayerFunction``,
``_LayerBackwardFunction``) with setup_context, backward, jvp and vmap; outside torch.func
transforms that key is never reached and nothing changes.

Shapes: x (T, B, I); w_ih (D, GH, I); b_ih, b_hh (D, GH); w_hh (D, GH, P); w_hr (D, P, H);
h0 (D, B, P); c0 (D, B, H); lengths (B,) int64.

Variants (issue 12; fusedrnn/reference.py defines them), trailing arguments of both ops with
defaults that turn them off: zoneout (D, T, B, P) bool mask (training) or None, zoneout_p the eval
blend weight (float, 0: off), reset (D, T, B) bool or None (per direction, indexed by time, the
reverse direction's already shifted by reference.reset_for_direction).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import loop, reference
from .dispatch import choose_kernel, kernels
from .spec import GATES, LOOP_KERNEL, saved_widths, work_dtype


def _empty(like, dtype=None):
    return like.new_empty(0, dtype=dtype)


def _variant_kw(zoneout, zoneout_p, reset):
    """The scan implementations' keyword arguments for the variants that are on (none: the plain
    call, so the scan contract without variants is unchanged)."""
    kw = {}
    if zoneout is not None:
        kw["zoneout"] = zoneout
    elif zoneout_p > 0:
        kw["zoneout_p"] = zoneout_p
    if reset is not None:
        kw["reset"] = reset
    return kw


def _scan(kernel, allow_tf32, mode, x, w_hh, zoneout=None, zoneout_p=0.0, reset=None):
    """(forward, backward, keyword arguments) of the scan implementation named by `kernel`;
    "auto" is resolved here from the concrete sizes of the layer (x (T, B, I), w_hh (D, GH, P))
    and the variants it runs with."""
    if kernel == LOOP_KERNEL:
        return loop.scan_forward, loop.scan_backward, {}
    if kernel == "auto":
        D, GH, P = w_hh.shape
        kernel = choose_kernel("triton", "auto", mode, D, x.shape[1], GH // GATES[mode], P, x.dtype,
                               x.device, zoneout=zoneout is not None or zoneout_p > 0, reset=reset is not None)
    k = kernels()
    return k.scan_forward, k.scan_backward, {"kernel": kernel, "allow_tf32": allow_tf32}


def _input_projection(x, w_ih, b_ih):
    T, B, I = x.shape
    D, GH, _ = w_ih.shape
    x2 = x.reshape(1, T * B, I).expand(D, T * B, I)
    if b_ih is None:
        xg = torch.bmm(x2, w_ih.transpose(1, 2))
    else:
        xg = torch.baddbmm(b_ih.unsqueeze(1), x2, w_ih.transpose(1, 2))
    return xg.view(D, T, B, GH)


@torch.library.custom_op("fusedrnn::layer", mutates_args=())
def layer(x: Tensor, w_ih: Tensor, b_ih: Optional[Tensor], w_hh: Tensor, b_hh: Optional[Tensor],
          w_hr: Optional[Tensor], h0: Tensor, c0: Optional[Tensor], lengths: Optional[Tensor],
          mode: str, kernel: str, save: bool, allow_tf32: bool, zoneout: Optional[Tensor] = None,
          zoneout_p: float = 0.0, reset: Optional[Tensor] = None
          ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One layer, all directions: returns y, hn, cn, and the workspace hp, gates, cs."""
    forward, _, kw = _scan(kernel, allow_tf32, mode, x, w_hh, zoneout, zoneout_p, reset)
    xg = _input_projection(x, w_ih, b_ih)
    return tuple(forward(mode, xg, w_hh.contiguous(), b_hh, w_hr, h0.contiguous(),
                         None if c0 is None else c0.contiguous(), lengths, save, **kw,
                         **_variant_kw(zoneout, zoneout_p, reset)))


@layer.register_fake
def _layer_fake(x, w_ih, b_ih, w_hh, b_hh, w_hr, h0, c0, lengths, mode, kernel, save, allow_tf32,
                zoneout=None, zoneout_p=0.0, reset=None):
    T, B, _ = x.shape
    D, GH, P = w_hh.shape
    H = GH // GATES[mode]
    wdt = work_dtype(x.dtype)
    y = x.new_empty(T, B, D * P)
    hn = x.new_empty(D, B, P)
    cn = x.new_empty(D, B, H) if mode == "LSTM" else _empty(x)
    if not save:
        return y, hn, cn, _empty(x, wdt), _empty(x, wdt), _empty(x, wdt)
    W, C = saved_widths(mode, H)
    return (y, hn, cn, x.new_empty(D, T, B, P, dtype=wdt), x.new_empty(D, T, B, W, dtype=wdt),
            x.new_empty(D, T, B, C, dtype=wdt))


def _per_group(a, b, groups):
    """Σ over time and rows of aᵀ b, per group of rows: a (D, T, B, M), b (D or 1, T, B, K) ->
    (D, M, K) when groups == 1, else (groups, D, M, K) (rows are `groups` blocks of B / groups)."""
    D, T, B, M = a.shape
    K = b.shape[-1]
    if groups == 1:
        return torch.bmm(a.reshape(D, T * B, M).transpose(1, 2),
                         b.expand(D, T, B, K).reshape(D, T * B, K))
    a = a.reshape(D, T, groups, B // groups, M)
    b = b.expand(D, T, B, K).reshape(D, T, groups, B // groups, K)
    return torch.einsum("dtgbm,dtgbk->gdmk", a, b)


def _bias_grad(a, groups, acc_dtype):
    D, T, B, M = a.shape
    if groups == 1:
        return a.reshape(D, T * B, M).sum(1, dtype=acc_dtype).to(a.dtype)
    return a.reshape(D, T, groups, B // groups, M).sum((1, 3), dtype=acc_dtype).to(a.dtype).transpose(0, 1)


@torch.library.custom_op("fusedrnn::layer_backward", mutates_args=())
def layer_backward(dy: Tensor, dhn: Tensor, dcn: Optional[Tensor], x: Tensor, w_ih: Tensor,
                   b_ih: Optional[Tensor], w_hh: Tensor, b_hh: Optional[Tensor], w_hr: Optional[Tensor],
                   h0: Tensor, c0: Optional[Tensor], lengths: Optional[Tensor], hp: Tensor,
                   gates: Tensor, cs: Tensor, mode: str, kernel: str, allow_tf32: bool, groups: int,
                   zoneout: Optional[Tensor] = None, zoneout_p: float = 0.0, reset: Optional[Tensor] = None
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of `layer`: dx, dw_ih, db_ih, dw_hh, db_hh, dw_hr, dh0, dc0 (empty when absent).

    b_ih, b_hh, h0 and c0 are not needed by the first-order formulas (the workspace hp, gates, cs
    holds what they contributed); they are arguments so that the second-order formula can
    recompute the layer from its inputs. With groups > 1 the batch is `groups` blocks of rows and
    the weight and bias gradients are per block, with a leading dimension of size `groups` (what
    the vmap rule uses for per-sample gradients)."""
    D, GH, P = w_hh.shape
    _, backward, kw = _scan(kernel, allow_tf32, mode, x, w_hh, zoneout, zoneout_p, reset)
    dxg, dgh, dh0, dc0, dhp = backward(mode, dy.contiguous(), dhn.contiguous(),
                                       None if dcn is None else dcn.contiguous(),
                                       w_hh.contiguous(), w_hr, lengths, hp, gates, cs, **kw,
                                       **_variant_kw(zoneout, zoneout_p, reset))
    T, B, I = x.shape
    dt = x.dtype
    dx = torch.bmm(dxg.reshape(D, T * B, GH), w_ih).sum(0).view(T, B, I)
    dw_ih = _per_group(dxg, x.unsqueeze(0), groups)
    dw_hh = _per_group(dgh, hp.to(dt), groups)
    if b_ih is not None:
        db_ih, db_hh = _bias_grad(dxg, groups, hp.dtype), _bias_grad(dgh, groups, hp.dtype)
    else:
        db_ih, db_hh = _empty(x), _empty(x)
    if w_hr is not None:
        i, f, g, o = gates.chunk(4, dim=-1)
        h_raw = (o * torch.tanh(f * cs + i * g)).to(dt)
        dw_hr = _per_group(dhp, h_raw, groups)
    else:
        dw_hr = _empty(x)
    return dx, dw_ih, db_ih, dw_hh, db_hh, dw_hr, dh0, dc0


@layer_backward.register_fake
def _layer_backward_fake(dy, dhn, dcn, x, w_ih, b_ih, w_hh, b_hh, w_hr, h0, c0, lengths, hp, gates,
                         cs, mode, kernel, allow_tf32, groups, zoneout=None, zoneout_p=0.0, reset=None):
    D, GH, P = w_hh.shape
    H = GH // GATES[mode]
    B = x.shape[1]
    lead = () if groups == 1 else (groups,)
    db = x.new_empty(lead + (D, GH)) if b_ih is not None else _empty(x)
    # new_empty, not empty_like: the real outputs are contiguous whatever the inputs' strides
    # (a batch_first layer passes a transposed x), and inductor asserts the fake strides.
    return (x.new_empty(x.shape), x.new_empty(lead + tuple(w_ih.shape)), db,
            x.new_empty(lead + tuple(w_hh.shape)), db.clone(),
            x.new_empty(lead + tuple(w_hr.shape)) if w_hr is not None else _empty(x),
            x.new_empty(D, B, P), x.new_empty(D, B, H) if mode == "LSTM" else _empty(x))


# --------------------------------------------------------------------------- first-order autograd
# The layer's tensor inputs, in schema order, and those that can receive a gradient.
_LAYER_TENSORS = ("x", "w_ih", "b_ih", "w_hh", "b_hh", "w_hr", "h0", "c0", "lengths")
_PRIMALS = ("x", "w_ih", "b_ih", "w_hh", "b_hh", "w_hr", "h0", "c0")
# The variant arguments, which follow the configuration (mode, kernel, ...) in both ops.
_VARIANTS = ("zoneout", "zoneout_p", "reset")


def _variants_of(inputs, n_before):
    """{name: value} of the variant arguments, which start at inputs[n_before] (defaults when
    the call left them out)."""
    given = dict(zip(_VARIANTS, inputs[n_before:]))
    return {"zoneout": given.get("zoneout"), "zoneout_p": float(given.get("zoneout_p", 0.0)),
            "reset": given.get("reset")}


def _setup_context(ctx, inputs, output):
    x, w_ih, b_ih, w_hh, b_hh, w_hr, h0, c0, lengths, mode, kernel, save, allow_tf32 = inputs[:13]
    variants = _variants_of(inputs, 13)
    _, hn, cn, hp, gates, cs = output
    ctx.save_for_backward(x, w_ih, b_ih, w_hh, b_hh, w_hr, h0, c0, lengths, hp, gates, cs,
                          variants["zoneout"], variants["reset"])
    ctx.config = (mode, kernel, save, allow_tf32)
    ctx.zoneout_p = variants["zoneout_p"]
    ctx.n_inputs = len(inputs)
    ctx.mark_non_differentiable(hp, gates, cs)


def _backward(ctx, dy, dhn, dcn, *_workspace_grads):
    mode, kernel, save, allow_tf32 = ctx.config
    if not save:
        raise RuntimeError("fusedrnn: this layer ran without saving activations for backward "
                           "(save=False); run it with gradients enabled to differentiate it")
    x, w_ih, b_ih, w_hh, b_hh, w_hr, h0, c0, lengths, hp, gates, cs, zoneout, reset = ctx.saved_tensors
    if dy is None:
        dy = x.new_zeros(x.shape[0], x.shape[1], w_hh.shape[0] * w_hh.shape[2])
    if dhn is None:
        dhn = torch.zeros_like(h0)
    if mode == "LSTM" and dcn is None:
        dcn = torch.zeros_like(c0)
    if mode != "LSTM":
        dcn = None
    dx, dw_ih, db_ih, dw_hh, db_hh, dw_hr, dh0, dc0 = torch.ops.fusedrnn.layer_backward(
        dy, dhn, dcn, x, w_ih, b_ih, w_hh, b_hh, w_hr, h0, c0, lengths, hp, gates, cs, mode, kernel,
        allow_tf32, 1, zoneout, ctx.zoneout_p, reset)
    has_bias = b_ih is not None
    return (dx, dw_ih, db_ih if has_bias else None, dw_hh, db_hh if has_bias else None,
            dw_hr if w_hr is not None else None, dh0, dc0 if mode == "LSTM" else None,
            None, None, None, None, None, None, None, None)[:ctx.n_inputs]


torch.library.register_autograd("fusedrnn::layer", _backward, setup_context=_setup_context)


# ----------------------------------------------- the differentiable recomputation (reference.py)
def _reference_layer(mode, x, w_ih, b_ih, w_hh, b_hh, w_hr, h0, c0, lengths, variants=None):
    """(y, hn, cn) of one layer by fusedrnn/reference.py, in the work dtype the kernels use; plain
    PyTorch, so autograd, forward AD and vmap all go through it. variants: {zoneout, zoneout_p,
    reset} as the op takes them, or None."""
    variants = variants or {}
    zoneout, reset = variants.get("zoneout"), variants.get("reset")
    zoneout_p = variants.get("zoneout_p", 0.0)
    dt, wdt = x.dtype, work_dtype(x.dtype)
    cast = (lambda t: t if t is None else t.to(wdt)) if wdt != dt else (lambda t: t)
    x, w_ih, b_ih, w_hh, b_hh, w_hr, h0, c0 = map(cast, (x, w_ih, b_ih, w_hh, b_hh, w_hr, h0, c0))
    pick = lambda t, d: None if t is None else t[d]  # noqa: E731
    ys, hns, cns = [], [], []
    for d in range(w_hh.shape[0]):
        state = (h0[d], c0[d]) if mode == "LSTM" else (h0[d],)
        weights = (w_ih[d], w_hh[d], pick(b_ih, d), pick(b_hh, d), pick(w_hr, d))
        z = zoneout[d] if zoneout is not None else (zoneout_p if zoneout_p > 0 else None)
        y, final = reference.layer_direction(mode, x, state, weights, lengths, reverse=d == 1, zoneout=z,
                                             reset=None if reset is None else reset[d])
        ys.append(y)
        hns.append(final[0])
        if mode == "LSTM":
            cns.append(final[1])
    y, hn = torch.cat(ys, -1).to(dt), torch.stack(hns).to(dt)
    cn = torch.stack(cns).to(dt) if mode == "LSTM" else None
    return y, hn, cn


def _present(values, names):
    """The names whose value is a tensor (absent optional inputs are None)."""
    return [n for n in names if values[n] is not None]


def _reference_grads(mode, lengths, primals, cotangents, variants=None):
    """First-order gradients of the layer by reference.py: {name: grad} for the primals present.
    primals: {name in _PRIMALS: tensor or None}; cotangents: (dy, dhn[, dcn])."""
    names = _present(primals, _PRIMALS)

    def outputs(*tensors):
        values = dict(primals, **dict(zip(names, tensors)))
        y, hn, cn = _reference_layer(mode, *(values[n] for n in _PRIMALS), lengths, variants)
        return (y, hn, cn) if mode == "LSTM" else (y, hn)

    _, vjp = torch.func.vjp(outputs, *(primals[n] for n in names))
    return dict(zip(names, vjp(tuple(cotangents))))


# layer_backward's outputs, named by the primal each is the gradient of.
_GRAD_OUTPUTS = ("x", "w_ih", "b_ih", "w_hh", "b_hh", "w_hr", "h0", "c0")


def _reference_second_order(mode, lengths, primals, cotangents, grad_outputs, variants=None):
    """The vjp of the first-order gradients: gradients with respect to (primals, cotangents) given
    grad_outputs, {name: tensor or None} for each of layer_backward's outputs."""
    p_names = _present(primals, _PRIMALS)
    c_list = [c for c in cotangents if c is not None]
    g_names = [n for n in p_names if grad_outputs.get(n) is not None]

    def first_order(*tensors):
        p = dict(primals, **dict(zip(p_names, tensors[:len(p_names)])))
        grads = _reference_grads(mode, lengths, p, tensors[len(p_names):], variants)
        return tuple(grads[n] for n in g_names)

    if not g_names:
        return {n: None for n in p_names}, [None] * len(c_list)
    _, vjp = torch.func.vjp(first_order, *(primals[n] for n in p_names), *c_list)
    result = vjp(tuple(grad_outputs[n] for n in g_names))
    return dict(zip(p_names, result[:len(p_names)])), list(result[len(p_names):])


_LB_TENSORS = ("dy", "dhn", "dcn") + _PRIMALS + ("lengths", "hp", "gates", "cs")


_LB_CONFIG = 4  # mode, kernel, allow_tf32, groups


def _lb_setup_context(ctx, inputs, output):
    n = len(_LB_TENSORS)
    ctx.variants = _variants_of(inputs, n + _LB_CONFIG)
    ctx.save_for_backward(*inputs[:n], ctx.variants["zoneout"], ctx.variants["reset"])
    ctx.mode, ctx.groups = inputs[n], inputs[n + 3]
    ctx.n_inputs = len(inputs)


def _lb_saved(ctx):
    """(saved tensors by name, variants with the saved masks)."""
    saved = list(ctx.saved_tensors)
    variants = dict(ctx.variants, zoneout=saved[-2], reset=saved[-1])
    return dict(zip(_LB_TENSORS, saved[:-2])), variants


def _lb_backward(ctx, *grads):
    """Second order: differentiate the first-order gradients by recomputing them with reference.py."""
    if ctx.groups != 1:
        raise RuntimeError("fusedrnn: differentiating per-group (vmapped) weight gradients is not "
                           "supported")
    saved, variants = _lb_saved(ctx)
    primals = {n: saved[n] for n in _PRIMALS}
    cotangents = (saved["dy"], saved["dhn"], saved["dcn"])
    grad_outputs = {n: (g if primals[n] is not None else None) for n, g in zip(_GRAD_OUTPUTS, grads)}
    d_primals, d_cot = _reference_second_order(ctx.mode, saved["lengths"], primals, cotangents,
                                               grad_outputs, variants)
    d_cot = d_cot + [None] * (3 - len(d_cot))
    # no gradient for lengths, the workspace, the configuration and the variants
    grads = (*d_cot, *(d_primals.get(n) for n in _PRIMALS)) + (None,) * (4 + _LB_CONFIG + len(_VARIANTS))
    return grads[:ctx.n_inputs]


torch.library.register_autograd("fusedrnn::layer_backward", _lb_backward, setup_context=_lb_setup_context)


# ----------------------------------------------------------------------------- vmap batching rules
# Where each tensor argument keeps its batch dimension (None: no batch dimension: a weight).
_LAYER_BATCH_POS = {"x": 1, "w_ih": None, "b_ih": None, "w_hh": None, "b_hh": None, "w_hr": None,
                    "h0": 1, "c0": 1, "lengths": 0}
_LB_BATCH_POS = dict(_LAYER_BATCH_POS, dy=1, dhn=1, dcn=1, hp=2, gates=2, cs=2)
# The variants' masks, (D, T, B, P) and (D, T, B): batch at dimension 2.
_VARIANT_BATCH_POS = {"zoneout": 2, "zoneout_p": None, "reset": 2}


def _fold_variants(tail, tail_dims, n_config, n):
    """The configuration and variant arguments (after the tensors) with the variants' masks
    folded like the other per-row tensors."""
    out = list(tail[:n_config])
    for name, a, d in zip(_VARIANTS, tail[n_config:], tail_dims[n_config:]):
        pos = _VARIANT_BATCH_POS[name]
        out.append(_fold(a, d, pos, n) if pos is not None and a is not None else a)
    return out



def _fold(t, bdim, pos, n):
    """t with its vmapped dimension (at bdim; None: not vmapped, so expanded) merged into its batch
    dimension at `pos`, vmapped index outermost: (..., B, ...) -> (..., n * B, ...)."""
    if t is None or t.numel() == 0 and t.dim() - (bdim is not None) == 1:
        # absent, or an empty placeholder (cs of a GRU): nothing per row
        return t if bdim is None or t is None else t.select(bdim, 0)
    t = t.unsqueeze(pos).expand(*t.shape[:pos], n, *t.shape[pos:]) if bdim is None else t.movedim(bdim, pos)
    return t.reshape(*t.shape[:pos], t.shape[pos] * t.shape[pos + 1], *t.shape[pos + 2:])


def _unfold(t, pos, n):
    """Undo _fold on an output: (..., n * B, ...) -> (..., n, B, ...), out_dim pos; empty
    placeholders are not per sample (out_dim None)."""
    if t.dim() == 1 and t.numel() == 0:
        return t, None
    return t.unflatten(pos, (n, t.shape[pos] // n)), pos


def _loop_rule(op, n, in_dims, args):
    """The batching rule of last resort: one call per vmapped index, outputs stacked (used when
    weights are vmapped, e.g. an ensemble; their per-member weights cannot share one kernel call)."""
    outs = []
    for i in range(n):
        outs.append(op(*(a.select(d, i) if d is not None else a for a, d in zip(args, in_dims))))
    return tuple(torch.stack([o[k] for o in outs]) for k in range(len(outs[0]))), (0,) * len(outs[0])


def _weights_vmapped(names, in_dims, positions):
    return any(d is not None and positions.get(name, 0) is None for name, d in zip(names, in_dims))


def _layer_vmap(info, in_dims, *args):
    n = info.batch_size
    names = _LAYER_TENSORS
    # The caller decided `save` from the vmapped tensors, whose requires_grad does not say whether
    # the tensors under them require grad (vmap over stacked parameters, then .backward()): decide
    # again here, from the tensors the op will see.
    save_at = len(names) + 2
    if not args[save_at] and torch.is_grad_enabled() and any(
            isinstance(a, Tensor) and a.requires_grad for a in args[:len(names)]):
        args = args[:save_at] + (True,) + args[save_at + 1:]
    if _weights_vmapped(names, in_dims, _LAYER_BATCH_POS):
        return _loop_rule(torch.ops.fusedrnn.layer, n, in_dims, args)
    folded = [_fold(a, d, _LAYER_BATCH_POS[name], n) if _LAYER_BATCH_POS[name] is not None else a
              for name, a, d in zip(names, args, in_dims)]
    mode, kernel, save, allow_tf32, *variants = _fold_variants(args[len(names):], in_dims[len(names):], 4, n)
    # The kernel was chosen for the per-sample batch; the folded batch is n times larger.
    kernel = "auto" if kernel == "persistent" else kernel
    out = torch.ops.fusedrnn.layer(*folded, mode, kernel, save, allow_tf32, *variants)
    res = [_unfold(t, pos, n) for t, pos in zip(out, (1, 1, 1, 2, 2, 2))]
    return tuple(r[0] for r in res), tuple(r[1] for r in res)


def _layer_backward_vmap(info, in_dims, *args):
    n = info.batch_size
    names = _LB_TENSORS
    if _weights_vmapped(names, in_dims, _LB_BATCH_POS):
        return _loop_rule(torch.ops.fusedrnn.layer_backward, n, in_dims, args)
    folded = [_fold(a, d, _LB_BATCH_POS[name], n) if _LB_BATCH_POS[name] is not None else a
              for name, a, d in zip(names, args, in_dims)]
    mode, kernel, allow_tf32, groups, *variants = _fold_variants(args[len(names):], in_dims[len(names):],
                                                                 _LB_CONFIG, n)
    kernel = "auto" if kernel == "persistent" else kernel
    out = torch.ops.fusedrnn.layer_backward(*folded, mode, kernel, allow_tf32, groups * n, *variants)
    res = []
    for k, t in enumerate(out):
        if t.dim() == 1 and t.numel() == 0:
            res.append((t, None))
        elif k in (0, 6, 7):  # dx, dh0, dc0: per row
            res.append(_unfold(t, 1, n))
        else:  # weight and bias gradients: per group, vmapped index outermost
            res.append((t if groups == 1 else t.unflatten(0, (n, groups)), 0))
    return tuple(r[0] for r in res), tuple(r[1] for r in res)


# ------------------------------------------------------------------ torch.func (functorch) support
class _LayerFunction(torch.autograd.Function):
    """fusedrnn::layer for torch.func transforms: same forward and backward as the op's registered
    autograd, plus setup_context (required by torch.func), forward mode and a batching rule."""

    @staticmethod
    def forward(*args):
        return torch.ops.fusedrnn.layer(*args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs, output)
        ctx.save_for_forward(*inputs[:len(_LAYER_TENSORS)])
        ctx.mode = inputs[len(_LAYER_TENSORS)]
        ctx.variants = _variants_of(inputs, len(_LAYER_TENSORS) + 4)

    @staticmethod
    def backward(ctx, *grads):
        return _backward(ctx, *grads)

    @staticmethod
    def jvp(ctx, *tangents):
        values = dict(zip(_LAYER_TENSORS, ctx.saved_tensors))
        names = _present(values, _PRIMALS)
        primals = tuple(values[n] for n in names)
        tangents = dict(zip(_LAYER_TENSORS, tangents))
        tangents = tuple(tangents[n] if tangents[n] is not None else torch.zeros_like(values[n])
                         for n in names)

        def outputs(*tensors):
            v = dict(values, **dict(zip(names, tensors)))
            y, hn, cn = _reference_layer(ctx.mode, *(v[n] for n in _PRIMALS), values["lengths"],
                                         ctx.variants)
            return (y, hn, cn) if ctx.mode == "LSTM" else (y, hn)

        out = torch.func.jvp(outputs, primals, tangents)[1]
        ty, thn = out[0], out[1]
        tcn = out[2] if ctx.mode == "LSTM" else ty.new_zeros(0)
        return ty, thn, tcn, None, None, None

    @staticmethod
    def vmap(info, in_dims, *args):
        return _layer_vmap(info, in_dims, *args)


class _LayerBackwardFunction(torch.autograd.Function):
    """fusedrnn::layer_backward for torch.func transforms (second order, per-sample gradients)."""

    @staticmethod
    def forward(*args):
        return torch.ops.fusedrnn.layer_backward(*args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _lb_setup_context(ctx, inputs, output)
        ctx.save_for_forward(*inputs[:len(_LB_TENSORS)])
        ctx.fwd_variants = ctx.variants

    @staticmethod
    def backward(ctx, *grads):
        return _lb_backward(ctx, *grads)

    @staticmethod
    def jvp(ctx, *tangents):
        # forward-over-reverse (Hessian-vector products): the tangent of the first-order gradients,
        # by reference.py
        saved = dict(zip(_LB_TENSORS, ctx.saved_tensors))
        variants = ctx.fwd_variants
        tangents = dict(zip(_LB_TENSORS, tangents))
        names = [n for n in ("dy", "dhn", "dcn") + _PRIMALS if saved[n] is not None]
        base = {n: saved[n] for n in _PRIMALS}
        order = [n for n in _GRAD_OUTPUTS if saved[n] is not None]

        def first_order(*tensors):
            v = dict(saved, **dict(zip(names, tensors)))
            grads = _reference_grads(ctx.mode, saved["lengths"], {n: v[n] for n in _PRIMALS},
                                     tuple(v[c] for c in ("dy", "dhn", "dcn") if v[c] is not None), variants)
            return tuple(grads[n] for n in order)

        t_in = tuple(tangents[n] if tangents[n] is not None else torch.zeros_like(saved[n]) for n in names)
        t_out = dict(zip(order, torch.func.jvp(first_order, tuple(saved[n] for n in names), t_in)[1]))
        del base
        return tuple(t_out.get(n) if saved[n] is not None else None for n in _GRAD_OUTPUTS)

    @staticmethod
    def vmap(info, in_dims, *args):
        return _layer_backward_vmap(info, in_dims, *args)


# functorch's front key is reached only while a torch.func transform is active.
_lib = torch.library.Library("fusedrnn", "FRAGMENT")
_lib.impl("layer", lambda *args: _LayerFunction.apply(*args), "FuncTorchDynamicLayerFrontMode")
_lib.impl("layer_backward", lambda *args: _LayerBackwardFunction.apply(*args),
          "FuncTorchDynamicLayerFrontMode")
