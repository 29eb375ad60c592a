"""The contract every kernel backend implements, and the torch.library ops all of them run through.

A kernel backend supplies two plain functions over *lists of branches* (one
branch for ``correlation_attention``, two for the fused ``i2correlation``):

``fwd(qs, ks, vs, sigmas, rows, cols, scale, eps, need_stats, masks=None) -> list[Tensor]``
    For each branch, six tensors: ``out`` (B,H,L,D, dtype of q), then
    ``lse``, ``kl``, ``ent``, ``r1``, ``r2`` (B,H,L) in the statistics dtype
    (float64 for float64 inputs, else float32). ``kl`` is K = KL(P||T) + KL(T||P),
    ``ent`` is E, ``lse`` the softmax log-normaliser of the scaled scores, and
    ``r1``/``r2`` the row sums of spec section 3. Where ``need_stats[i]`` is
    False the branch returns ``out`` and ``lse`` and four empty tensors
    (``need_stats`` is a list of bools here; the op schema carries it as
    list[int], which torch.jit.trace can record). ``sigma`` is in the
    statistics dtype (float32 while q, k, v are bfloat16/float16), as the caller
    passed it: the kernels read max(sigma, SIGMA_MIN). k, v hold S = m * L keys
    (m images on the grid); ``masks[i]`` is branch i's key_padding_mask, (1 or B, S)
    bool, True = ignore the key, or an empty tensor for none (None: no masks).

``bwd(g_outs, g_kl_attns, g_kl_priors, g_ents, dfulls, qs, ks, vs, sigmas, lses,
rows, cols, scale, eps, masks=None) -> list[Tensor]``
    For each branch ``dq, dk, dv, dsigma`` (dk, dv shaped like k, v: summed
    over the batch when the memory is batch-shared; dsigma in sigma's dtype and
    0 where sigma < SIGMA_MIN, the gradient of the clamp). ``dfull`` is
    <g_out, out> + g_kl_attn * r1 + g_ent * r2, precomputed here.

A backend registers them with ``register_backend(name, fwd, bwd)``, which returns its
:class:`KernelRunner`. Every backend runs through the same two ``torch.library.custom_op``s,
``fod_kernels::i2corr_fwd`` and ``fod_kernels::i2corr_bwd``, whose first argument names the backend
(as Liger-Kernel's ``ops/*.py`` keep one op per kernel family at module level). They have fake (meta)
kernels (``torch.compile``, ``torch.export``, meta tensors), vmap rules that fold the vmapped dimension
into the batch, and an autograd formula (the ``_bwd`` op), which torch.compile uses. Eager calls go
through two ``torch.autograd.Function``s written with ``setup_context`` (so ``torch.func`` transforms see
them) around the same two ops: forward-mode AD (jvp) and a second backward raise an error that names
``backend="reference"``, which supports them, instead of PyTorch's silent zero tangent (custom ops have
no jvp).

``requires_grad`` of the results follows the formulas, as plain autograd has it in the reference: out
needs q, k or v; kl_attn and entropy need q or k; kl_prior needs sigma (``_mark_constant_results``).

Layouts: the inputs reach the backend as the caller made them (e.g. (B, L, H, D) projections
viewed as (B, H, L, D)); each backend copies only what its kernels cannot address in place. Every
output (out, the statistics, the gradients) is contiguous, whatever the inputs' layout.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

N_FWD = 6  # out, lse, kl, ent, r1, r2 per branch (kernel side)
N_OUT = 7  # out, kl_attn, kl_prior, ent, lse, r1, r2 per branch (op side)
N_BWD = 4  # dq, dk, dv, dsigma per branch
JVP = "forward-mode AD (torch.func.jvp, jacfwd, hessian, torch.autograd.forward_ad)"
DOUBLE_BACKWARD = ("double backward (a gradient of a gradient: create_graph=True then backward again, "
                   "torch.func.grad of grad, hessian)")


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class Kernels(NamedTuple):
    fwd: Callable
    bwd: Callable


_KERNELS: dict[str, Kernels] = {}  # backend name -> its kernel functions (register_backend)


def _kernels(backend: str) -> Kernels:
    if backend not in _KERNELS:
        raise RuntimeError(f"fod_kernels: no kernels registered under the name {backend!r} (registered: "
                           f"{sorted(_KERNELS)}); import its backend module first")
    return _KERNELS[backend]


def _split(tensors, n: int, parts: int):
    return [list(tensors[j * n:(j + 1) * n]) for j in range(parts)]


def _refused(backend: str, what: str) -> RuntimeError:
    return RuntimeError(f"{what} is not supported by the fused {backend!r} backend of fod_kernels (its kernels give "
                        f"first-order reverse-mode gradients only); use backend=\"reference\", the pure-PyTorch "
                        f"backend, which supports it")


def _no_mask(q: torch.Tensor) -> torch.Tensor:
    """The op's stand-in for "no key_padding_mask": an empty bool tensor (the schema has no optional lists)."""
    return torch.empty((0,), dtype=torch.bool, device=q.device)


def _masks_or_none(masks):
    return [m if m.numel() else None for m in masks]


# ---------------------------------------------------------------------------------------------------- the ops
@torch.library.custom_op("fod_kernels::i2corr_fwd", mutates_args=())
def fwd_op(backend: str, qs: list[torch.Tensor], ks: list[torch.Tensor], vs: list[torch.Tensor],
           sigmas: list[torch.Tensor], rows: int, cols: int, scale: float, eps: float,
           need_stats: list[int], masks: list[torch.Tensor]) -> list[torch.Tensor]:
    raw = _kernels(backend).fwd(qs, ks, vs, sigmas, rows, cols, scale, eps, [bool(x) for x in need_stats],
                                _masks_or_none(masks))
    res = []
    for i, q in enumerate(qs):
        out, lse, kl, ent, r1, r2 = raw[N_FWD * i:N_FWD * (i + 1)]
        sd = stats_dtype(q.dtype)
        kl, ent, lse, r1, r2 = (t.to(sd) for t in (kl, ent, lse, r1, r2))
        res += [out.to(q.dtype), kl, kl.clone(), ent, lse, r1, r2]
    return res


@fwd_op.register_fake
def _fwd_fake(backend, qs, ks, vs, sigmas, rows, cols, scale, eps, need_stats, masks):
    res = []
    for q, need in zip(qs, need_stats):
        B, H, L, _ = q.shape
        sd = stats_dtype(q.dtype)
        stat = (lambda: q.new_empty((B, H, L), dtype=sd)) if need else (lambda: q.new_empty((0,), dtype=sd))
        res += [q.new_empty(q.shape), stat(), stat(), stat(), q.new_empty((B, H, L), dtype=sd), stat(), stat()]
    return res


@torch.library.custom_op("fod_kernels::i2corr_bwd", mutates_args=())
def bwd_op(backend: str, g_outs: list[torch.Tensor], g_kl_attns: list[torch.Tensor],
           g_kl_priors: list[torch.Tensor], g_ents: list[torch.Tensor], dfulls: list[torch.Tensor],
           qs: list[torch.Tensor], ks: list[torch.Tensor], vs: list[torch.Tensor], sigmas: list[torch.Tensor],
           lses: list[torch.Tensor], rows: int, cols: int, scale: float, eps: float,
           masks: list[torch.Tensor]) -> list[torch.Tensor]:
    res = list(_kernels(backend).bwd(g_outs, g_kl_attns, g_kl_priors, g_ents, dfulls, qs, ks, vs, sigmas, lses,
                                     rows, cols, scale, eps, _masks_or_none(masks)))
    like = [t for i in range(len(qs)) for t in (qs[i], ks[i], vs[i], sigmas[i])]
    return [r.to(x.dtype) for r, x in zip(res, like)]  # dsigma in sigma's dtype (float32 with bf16 q)


@bwd_op.register_fake
def _bwd_fake(backend, g_outs, g_kl_attns, g_kl_priors, g_ents, dfulls, qs, ks, vs, sigmas, lses, rows, cols, scale,
              eps, masks):
    res = []
    for q, k, v, s in zip(qs, ks, vs, sigmas):
        res += [q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), s.new_empty(s.shape)]
    return res


# ---------------------------------------------------------------------------------------------------- vmap rules
# The vmapped dimension (size V) is folded into the batch, (V, B, ...) -> (V*B, ...).
def _front(x, d, V):
    return x.movedim(d, 0) if d is not None else x.expand(V, *x.shape)


def _fold(x, d, V, B):
    x = _front(x, d, V)
    return x.expand(V, B, *x.shape[2:]).reshape(V * B, *x.shape[2:])  # a batch-shared (1, ...) is expanded to B


def _unfold(x, V):
    return x.view(V, x.shape[0] // V, *x.shape[1:])


def _fold_mask(m, d, V, B):
    """A (1 or B, S) mask under vmap: folded like the batch; an unbatched shared (1, S) mask or no mask stays."""
    if d is None and (m.numel() == 0 or m.shape[0] == 1):
        return m
    return _fold(m, d, V, B)


@fwd_op.register_vmap
def _fwd_vmap(info, in_dims, backend, qs, ks, vs, sigmas, rows, cols, scale, eps, need_stats, masks):
    V = info.batch_size
    dq, dk, dv, ds = in_dims[1:5]
    dm = in_dims[10]
    fq, fks, fvs, fs, fm = [], [], [], [], []
    for i, q in enumerate(qs):
        B = _front(q, dq[i], V).shape[1]
        fq.append(_fold(q, dq[i], V, B))
        fs.append(_fold(sigmas[i], ds[i], V, B))
        shared = dk[i] is None and dv[i] is None and ks[i].shape[0] == 1  # an unbatched memory stays shared
        fks.append(ks[i] if shared else _fold(ks[i], dk[i], V, B))
        fvs.append(vs[i] if shared else _fold(vs[i], dv[i], V, B))
        fm.append(_fold_mask(masks[i], dm[i], V, B))
    res = fwd_op(backend, fq, fks, fvs, fs, rows, cols, scale, eps, need_stats, fm)
    return [_unfold(r, V) if r.dim() > 1 else r for r in res], [0 if r.dim() > 1 else None for r in res]


@bwd_op.register_vmap
def _bwd_vmap(info, in_dims, backend, g_outs, g_kl_attn, g_kl_prior, g_ents, dfulls, qs, ks, vs, sigmas, lses, rows,
              cols, scale, eps, masks):
    V = info.batch_size
    lists = (g_outs, g_kl_attn, g_kl_prior, g_ents, dfulls, qs, ks, vs, sigmas, lses)
    dims = in_dims[1:11]
    Bs = [_front(q, dims[5][i], V).shape[1] for i, q in enumerate(qs)]
    folded = [[_fold(t, d, V, B) for t, d, B in zip(ts, ds, Bs)] for ts, ds in zip(lists, dims)]
    fm = [_fold_mask(m, d, V, B) for m, d, B in zip(masks, in_dims[15], Bs)]
    res = bwd_op(backend, *folded, rows, cols, scale, eps, fm)
    out = []
    for i in range(len(qs)):
        dq, dk, dv, dsig = (_unfold(r, V) for r in res[N_BWD * i:N_BWD * (i + 1)])
        if _front(ks[i], dims[6][i], V).shape[1] == 1:  # batch-shared memory: sum its gradient over B
            dk, dv = dk.sum(1, keepdim=True), dv.sum(1, keepdim=True)
        out += [dq, dk, dv, dsig]
    return out, [0] * len(out)


# ---------------------------------------------------------------------------------------------------- autograd
def _mark_constant_results(ctx, n, tensors, output):
    """Results that depend on no input requiring grad are constants (requires_grad False), as in the reference:
    out needs q, k or v; kl_attn and entropy q or k; kl_prior sigma. lse, r1, r2 are never differentiable."""
    needs = [t.requires_grad for t in tensors[:4 * n]]
    q, k, v, s = _split(needs, n, 4)
    const = [*output[4::N_OUT], *output[5::N_OUT], *output[6::N_OUT]]
    for i in range(n):
        out, kl_attn, kl_prior, ent = output[N_OUT * i:N_OUT * i + 4]
        const += ([] if q[i] or k[i] or v[i] else [out]) + ([] if q[i] or k[i] else [kl_attn, ent]) + \
            ([] if s[i] else [kl_prior])
    ctx.mark_non_differentiable(*const)


def _save(ctx, backend, n, rows, cols, scale, eps, need_stats, tensors, output):
    """tensors: the flat inputs q, k, v, sigma, mask (n of each)."""
    _mark_constant_results(ctx, n, tensors, output)
    lses, r1s, r2s = output[4::N_OUT], output[5::N_OUT], output[6::N_OUT]
    ctx.save_for_backward(*tensors, *output[0::N_OUT], *lses, *r1s, *r2s)
    ctx.meta = (backend, n, rows, cols, scale, eps, need_stats)


def _backward_args(ctx, grads):
    """The flat tensor arguments of the _bwd op: upstream gradients (zeros for unused outputs), dfull, inputs,
    lse; then the masks."""
    _, n, rows, cols, scale, eps, need_stats = ctx.meta
    qs, ks, vs, sigmas, masks, outs, lses, r1s, r2s = _split(ctx.saved_tensors, n, 9)
    g_outs, g_kl_attns, g_kl_priors, g_ents, dfulls = [], [], [], [], []
    for i in range(n):
        g_out, g_kl_attn, g_kl_prior, g_ent = grads[N_OUT * i:N_OUT * i + 4]
        sd, shape = lses[i].dtype, lses[i].shape
        zero = lambda: torch.zeros(shape, dtype=sd, device=outs[i].device)  # noqa: E731
        g_out = torch.zeros_like(outs[i]) if g_out is None else g_out  # any layout: the backend decides
        if need_stats[i]:
            g_kl_attn, g_kl_prior, g_ent = (zero() if x is None else x.to(sd).contiguous()
                                            for x in (g_kl_attn, g_kl_prior, g_ent))
            dfull = (g_out.to(sd) * outs[i].to(sd)).sum(-1) + g_kl_attn * r1s[i] + g_ent * r2s[i]
        else:
            g_kl_attn, g_kl_prior, g_ent = zero(), zero(), zero()
            dfull = (g_out.to(sd) * outs[i].to(sd)).sum(-1)
        g_outs.append(g_out)
        g_kl_attns.append(g_kl_attn)
        g_kl_priors.append(g_kl_prior)
        g_ents.append(g_ent)
        dfulls.append(dfull.contiguous())
    return [*g_outs, *g_kl_attns, *g_kl_priors, *g_ents, *dfulls, *qs, *ks, *vs, *sigmas, *lses, *masks]


class I2CorrBackward(torch.autograd.Function):
    """The _bwd op (eager), differentiable once more only to say that it is not."""
    generate_vmap_rule = True

    @staticmethod
    def forward(backend, n, rows, cols, scale, eps, *tensors):
        *groups, masks = _split(tensors, n, 11)
        return tuple(bwd_op(backend, *groups, rows, cols, scale, eps, masks))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.backend = inputs[0]

    @staticmethod
    def backward(ctx, *grads):
        raise _refused(ctx.backend, DOUBLE_BACKWARD)

    @staticmethod
    def jvp(ctx, *tangents):
        raise _refused(ctx.backend, JVP)


class I2CorrForward(torch.autograd.Function):
    """The _fwd op (eager), with the _bwd op as its backward; refuses forward-mode AD."""
    generate_vmap_rule = True

    @staticmethod
    def forward(backend, n, rows, cols, scale, eps, need_stats, *tensors):
        return tuple(fwd_op(backend, *_split(tensors, n, 4), rows, cols, scale, eps, need_stats,
                            list(tensors[4 * n:])))

    @staticmethod
    def setup_context(ctx, inputs, output):
        backend, n, rows, cols, scale, eps, need_stats, *tensors = inputs
        ctx.set_materialize_grads(False)
        _save(ctx, backend, n, rows, cols, scale, eps, need_stats, tensors, output)

    @staticmethod
    def backward(ctx, *grads):
        backend, n, rows, cols, scale, eps, _ = ctx.meta
        res = I2CorrBackward.apply(backend, n, rows, cols, scale, eps, *_backward_args(ctx, grads))
        return (None,) * 7 + tuple(res[N_BWD * i + j] for j in range(N_BWD) for i in range(n)) + (None,) * n

    @staticmethod
    def jvp(ctx, *tangents):
        raise _refused(ctx.meta[0], JVP)


# torch.compile (Dynamo refuses an autograd.Function with a jvp) and torch.jit.trace (which would record the
# autograd.Function as an unsaveable Python call) use the op's own autograd formula.
def _op_setup_context(ctx, inputs, output):
    backend, qs, ks, vs, sigmas, rows, cols, scale, eps, need_stats, masks = inputs
    _save(ctx, backend, len(qs), rows, cols, scale, eps, list(need_stats), [*qs, *ks, *vs, *sigmas, *masks], output)


def _op_backward(ctx, grads):
    backend, n, rows, cols, scale, eps, _ = ctx.meta
    *groups, masks = _split(_backward_args(ctx, grads), n, 11)
    res = bwd_op(backend, *groups, rows, cols, scale, eps, masks)
    return (None, res[0::N_BWD], res[1::N_BWD], res[2::N_BWD], res[3::N_BWD], None, None, None, None, None,
            [None] * n)


fwd_op.register_autograd(_op_backward, setup_context=_op_setup_context)


# ---------------------------------------------------------------------------------------------------- entry point
def run(backend: str, branches, rows, cols, scale, eps, need_stats, masks=None):
    """``branches``: a list of (q, k, v, sigma); ``masks``: one key_padding_mask (or None) per branch, or None.
    Returns, per branch, (out, kl_attn, kl_prior, entropy) with the gradient routes of spec section 2 (None
    stats where not needed)."""
    qs, ks, vs, sigmas = ([b[j] for b in branches] for j in range(4))  # no copies: each backend decides
    masks = [_no_mask(q) if m is None else m for q, m in zip(qs, masks or [None] * len(qs))]
    args = (int(rows), int(cols), float(scale), float(eps), [int(bool(x)) for x in need_stats])
    if torch.compiler.is_compiling() or torch.jit.is_tracing():  # the op itself, with its autograd formula
        res = fwd_op(backend, qs, ks, vs, sigmas, *args, masks)
    else:
        res = I2CorrForward.apply(backend, len(branches), *args, *qs, *ks, *vs, *sigmas, *masks)
    outs = []
    for i, need in enumerate(need_stats):
        out, kl_attn, kl_prior, ent = res[N_OUT * i:N_OUT * i + 4]
        outs.append((out, kl_attn, kl_prior, ent) if need else (out, None, None, None))
    return outs


class KernelRunner:
    """A kernel backend's entry point: ``runner(branches, rows, cols, scale, eps, need_stats, masks=None)`` is
    :func:`run` with this backend's kernels. ``fwd_op``/``bwd_op`` are the shared ops (their first argument is
    ``name``)."""
    fwd_op = fwd_op
    bwd_op = bwd_op

    def __init__(self, name: str):
        self.name = name

    def __call__(self, branches, rows, cols, scale, eps, need_stats, masks=None):
        return run(self.name, branches, rows, cols, scale, eps, need_stats, masks)


def register_backend(name: str, fwd: Callable, bwd: Callable) -> KernelRunner:
    """Make ``fwd``/``bwd`` (the contract above) the kernels of backend ``name``; returns its runner."""
    _KERNELS[name] = Kernels(fwd, bwd)
    return KernelRunner(name)
