"""The contract every kernel backend implements, and its torch.library ops.

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

``make_kernel_op`` registers them as ``torch.library.custom_op``s with fake
kernels (``torch.compile``, ``torch.export``), vmap rules that fold the
vmapped dimension into the batch, and an autograd formula (the ``_bwd`` op),
which torch.compile uses. Eager calls go through two
``torch.autograd.Function``s written with ``setup_context`` (so ``torch.func``
transforms see them) around the same two ops: forward-mode AD (jvp) and a
second backward raise an error that names ``backend="reference"``, which
supports them, instead of PyTorch's silent zero tangent (custom ops have no jvp).

Layouts: the inputs reach the backend as the caller made them (e.g. (B, L, H, D) projections
viewed as (B, H, L, D)); each backend copies only what its kernels cannot address in place. Every
output (out, the statistics, the gradients) is contiguous, whatever the inputs' layout.
"""
from __future__ import annotations

from typing import Callable

import torch

N_FWD = 6  # out, lse, kl, ent, r1, r2 per branch (kernel side)
N_OUT = 7  # out, kl_attn, kl_prior, ent, lse, r1, r2 per branch (op side)
N_BWD = 4  # dq, dk, dv, dsigma per branch


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake_fwd(qs, ks, vs, sigmas, need_stats):
    res = []
    for q, need in zip(qs, need_stats):
        B, H, L, _ = q.shape
        sd = stats_dtype(q.dtype)
        stat = (lambda: q.new_empty((B, H, L), dtype=sd)) if need else (lambda: q.new_empty((0,), dtype=sd))
        res += [q.new_empty(q.shape), stat(), stat(), stat(), q.new_empty((B, H, L), dtype=sd), stat(), stat()]
    return res


def _split(tensors, n: int, parts: int):
    return [list(tensors[j * n:(j + 1) * n]) for j in range(parts)]


# vmap: the vmapped dimension (size V) is folded into the batch, (V, B, ...) -> (V*B, ...).
def _front(x, d, V):
    return x.movedim(d, 0) if d is not None else x.expand(V, *x.shape)


def _fold(x, d, V, B):
    x = _front(x, d, V)
    return x.expand(V, B, *x.shape[2:]).reshape(V * B, *x.shape[2:])  # a batch-shared (1, ...) is expanded to B


def _unfold(x, V):
    return x.view(V, x.shape[0] // V, *x.shape[1:])


def _refused(name: str, what: str) -> RuntimeError:
    return RuntimeError(f"{what} is not supported by the fused {name!r} backend of fod_kernels (its kernels give "
                        f"first-order reverse-mode gradients only); use backend=\"reference\", the pure-PyTorch "
                        f"backend, which supports it")


def _no_mask(q: torch.Tensor) -> torch.Tensor:
    """The op's stand-in for "no key_padding_mask": an empty bool tensor (the schema has no optional lists)."""
    return torch.empty((0,), dtype=torch.bool, device=q.device)


def _masks_or_none(masks):
    return [m if m.numel() else None for m in masks]


def _fold_mask(m, d, V, B):
    """A (1 or B, S) mask under vmap: folded like the batch; an unbatched shared (1, S) mask or no mask stays."""
    if d is None and (m.numel() == 0 or m.shape[0] == 1):
        return m
    return _fold(m, d, V, B)


def make_kernel_op(name: str, fwd: Callable, bwd: Callable):
    """Register ``fod_kernels::<name>_fwd`` and ``<name>_bwd``; returns ``run``.

    ``run(branches, rows, cols, scale, eps, need_stats, masks=None)`` takes a list of
    (q, k, v, sigma) and, optionally, one key_padding_mask (or None) per branch, and returns,
    per branch, (out, kl_attn, kl_prior, entropy) with the gradient routes of spec section 2
    (None stats where not needed).
    """
    jvp_msg = "forward-mode AD (torch.func.jvp, jacfwd, hessian, torch.autograd.forward_ad)"
    dbl_msg = ("double backward (a gradient of a gradient: create_graph=True then backward again, "
               "torch.func.grad of grad, hessian)")

    @torch.library.custom_op(f"fod_kernels::{name}_fwd", mutates_args=())
    def fwd_op(qs: list[torch.Tensor], ks: list[torch.Tensor], vs: list[torch.Tensor],
               sigmas: list[torch.Tensor], rows: int, cols: int, scale: float, eps: float,
               need_stats: list[int], masks: list[torch.Tensor]) -> list[torch.Tensor]:
        raw = fwd(qs, ks, vs, sigmas, rows, cols, scale, eps, [bool(x) for x in need_stats], _masks_or_none(masks))
        res = []
        for i, q in enumerate(qs):
            out, lse, kl, ent, r1, r2 = raw[N_FWD * i:N_FWD * (i + 1)]
            sd = stats_dtype(q.dtype)
            kl, ent, lse, r1, r2 = (t.to(sd) for t in (kl, ent, lse, r1, r2))
            res += [out.to(q.dtype), kl, kl.clone(), ent, lse, r1, r2]
        return res

    @fwd_op.register_fake
    def _(qs, ks, vs, sigmas, rows, cols, scale, eps, need_stats, masks):
        return _fake_fwd(qs, ks, vs, sigmas, need_stats)

    @torch.library.custom_op(f"fod_kernels::{name}_bwd", mutates_args=())
    def bwd_op(g_outs: list[torch.Tensor], g_kl_attns: list[torch.Tensor], g_kl_priors: list[torch.Tensor],
               g_ents: list[torch.Tensor], dfulls: list[torch.Tensor], qs: list[torch.Tensor],
               ks: list[torch.Tensor], vs: list[torch.Tensor], sigmas: list[torch.Tensor],
               lses: list[torch.Tensor], rows: int, cols: int, scale: float,
               eps: float, masks: list[torch.Tensor]) -> list[torch.Tensor]:
        res = list(bwd(g_outs, g_kl_attns, g_kl_priors, g_ents, dfulls, qs, ks, vs, sigmas, lses, rows, cols, scale,
                       eps, _masks_or_none(masks)))
        like = [t for i in range(len(qs)) for t in (qs[i], ks[i], vs[i], sigmas[i])]
        return [r.to(x.dtype) for r, x in zip(res, like)]  # dsigma in sigma's dtype (float32 with bf16 q)

    @bwd_op.register_fake
    def _(g_outs, g_kl_attns, g_kl_priors, g_ents, dfulls, qs, ks, vs, sigmas, lses, rows, cols, scale, eps, masks):
        res = []
        for q, k, v, s in zip(qs, ks, vs, sigmas):
            res += [q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), s.new_empty(s.shape)]
        return res

    @fwd_op.register_vmap
    def _(info, in_dims, qs, ks, vs, sigmas, rows, cols, scale, eps, need_stats, masks):
        V = info.batch_size
        dq, dk, dv, ds = in_dims[:4]
        dm = in_dims[9]
        fq, fks, fvs, fs, fm = [], [], [], [], []
        for i, q in enumerate(qs):
            B = _front(q, dq[i], V).shape[1]
            fq.append(_fold(q, dq[i], V, B))
            fs.append(_fold(sigmas[i], ds[i], V, B))
            shared = dk[i] is None and dv[i] is None and ks[i].shape[0] == 1  # an unbatched memory stays shared
            fks.append(ks[i] if shared else _fold(ks[i], dk[i], V, B))
            fvs.append(vs[i] if shared else _fold(vs[i], dv[i], V, B))
            fm.append(_fold_mask(masks[i], dm[i], V, B))
        res = fwd_op(fq, fks, fvs, fs, rows, cols, scale, eps, need_stats, fm)
        return [_unfold(r, V) if r.dim() > 1 else r for r in res], [0 if r.dim() > 1 else None for r in res]

    @bwd_op.register_vmap
    def _(info, in_dims, g_outs, g_kl_attn, g_kl_prior, g_ents, dfulls, qs, ks, vs, sigmas, lses, rows, cols,
          scale, eps, masks):
        V = info.batch_size
        lists = (g_outs, g_kl_attn, g_kl_prior, g_ents, dfulls, qs, ks, vs, sigmas, lses)
        Bs = [_front(q, in_dims[5][i], V).shape[1] for i, q in enumerate(qs)]
        folded = [[_fold(t, d, V, B) for t, d, B in zip(ts, ds, Bs)] for ts, ds in zip(lists, in_dims[:10])]
        fm = [_fold_mask(m, d, V, B) for m, d, B in zip(masks, in_dims[14], Bs)]
        res = bwd_op(*folded, rows, cols, scale, eps, fm)
        out = []
        for i in range(len(qs)):
            dq, dk, dv, dsig = (_unfold(r, V) for r in res[N_BWD * i:N_BWD * (i + 1)])
            if _front(ks[i], in_dims[6][i], V).shape[1] == 1:  # batch-shared memory: sum its gradient over B
                dk, dv = dk.sum(1, keepdim=True), dv.sum(1, keepdim=True)
            out += [dq, dk, dv, dsig]
        return out, [0] * len(out)

    def save(ctx, n, rows, cols, scale, eps, need_stats, tensors, output):
        lses, r1s, r2s = output[4::N_OUT], output[5::N_OUT], output[6::N_OUT]
        ctx.save_for_backward(*tensors, *output[0::N_OUT], *lses, *r1s, *r2s)  # tensors: q, k, v, sigma, mask
        ctx.meta = (n, rows, cols, scale, eps, need_stats)

    def backward_args(ctx, grads):
        """The flat argument list of the _bwd op: upstream gradients (zeros for unused outputs), dfull, inputs,
        lse; then the masks."""
        n, rows, cols, scale, eps, need_stats = ctx.meta
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

    # Eager: two autograd.Functions with setup_context (torch.func sees them), refusing what the kernels lack.
    class Backward(torch.autograd.Function):
        """The _bwd op, differentiable once more only to say that it is not."""
        generate_vmap_rule = True

        @staticmethod
        def forward(n, rows, cols, scale, eps, *tensors):
            *groups, masks = _split(tensors, n, 11)
            return tuple(bwd_op(*groups, rows, cols, scale, eps, masks))

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def backward(ctx, *grads):
            raise _refused(name, dbl_msg)

        @staticmethod
        def jvp(ctx, *tangents):
            raise _refused(name, jvp_msg)

    class Forward(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(n, rows, cols, scale, eps, need_stats, *tensors):
            return tuple(fwd_op(*_split(tensors, n, 4), rows, cols, scale, eps, need_stats, list(tensors[4 * n:])))

        @staticmethod
        def setup_context(ctx, inputs, output):
            n, rows, cols, scale, eps, need_stats, *tensors = inputs
            ctx.mark_non_differentiable(*output[4::N_OUT], *output[5::N_OUT], *output[6::N_OUT])  # lse, r1, r2
            ctx.set_materialize_grads(False)
            save(ctx, n, rows, cols, scale, eps, need_stats, tensors, output)

        @staticmethod
        def backward(ctx, *grads):
            n, rows, cols, scale, eps, _ = ctx.meta
            res = Backward.apply(n, rows, cols, scale, eps, *backward_args(ctx, grads))
            return (None,) * 6 + tuple(res[N_BWD * i + j] for j in range(N_BWD) for i in range(n)) + (None,) * n

        @staticmethod
        def jvp(ctx, *tangents):
            raise _refused(name, jvp_msg)

    # torch.compile (Dynamo refuses an autograd.Function with a jvp) and torch.jit.trace (which would record the
    # autograd.Function as an unsaveable Python call): the op's own autograd formula.
    def op_setup_context(ctx, inputs, output):
        qs, ks, vs, sigmas, rows, cols, scale, eps, need_stats, masks = inputs
        save(ctx, len(qs), rows, cols, scale, eps, list(need_stats), [*qs, *ks, *vs, *sigmas, *masks], output)

    def op_backward(ctx, grads):
        n, rows, cols, scale, eps, _ = ctx.meta
        *groups, masks = _split(backward_args(ctx, grads), n, 11)
        res = bwd_op(*groups, rows, cols, scale, eps, masks)
        return res[0::N_BWD], res[1::N_BWD], res[2::N_BWD], res[3::N_BWD], None, None, None, None, None, [None] * n

    fwd_op.register_autograd(op_backward, setup_context=op_setup_context)

    def run(branches, rows, cols, scale, eps, need_stats, masks=None):
        qs, ks, vs, sigmas = ([b[j] for b in branches] for j in range(4))  # no copies: each backend decides
        masks = [_no_mask(q) if m is None else m for q, m in zip(qs, masks or [None] * len(qs))]
        args = (int(rows), int(cols), float(scale), float(eps), [int(bool(x)) for x in need_stats])
        if torch.compiler.is_compiling() or torch.jit.is_tracing():  # the op itself, with its autograd formula
            res = fwd_op(qs, ks, vs, sigmas, *args, masks)
        else:
            res = Forward.apply(len(branches), *args, *qs, *ks, *vs, *sigmas, *masks)
        outs = []
        for i, need in enumerate(need_stats):
            out, kl_attn, kl_prior, ent = res[N_OUT * i:N_OUT * i + 4]
            outs.append((out, kl_attn, kl_prior, ent) if need else (out, None, None, None))
        return outs

    run.fwd_op = fwd_op
    run.bwd_op = bwd_op
    run.autograd_function = Forward
    return run
