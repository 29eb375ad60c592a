"""The contract every kernel backend implements, and its torch.library ops.

A kernel backend supplies two plain functions over *lists of branches* (one
branch for ``correlation_attention``, two for the fused ``i2correlation``):

``fwd(qs, ks, vs, sigmas, rows, cols, scale, eps, need_stats) -> list[Tensor]``
    For each branch, six tensors: ``out`` (B,H,L,D, dtype of q), then
    ``lse``, ``kl``, ``ent``, ``r1``, ``r2`` (B,H,L) in the statistics dtype
    (float64 for float64 inputs, else float32). ``kl`` is K = KL(P||T) + KL(T||P),
    ``ent`` is E, ``lse`` the softmax log-normaliser of the scaled scores, and
    ``r1``/``r2`` the row sums of spec section 3. Where ``need_stats[i]`` is
    False the branch returns ``out`` and ``lse`` and four empty tensors.

``bwd(g_outs, g_kl_attns, g_kl_priors, g_ents, dfulls, qs, ks, vs, sigmas, lses,
rows, cols, scale, eps) -> list[Tensor]``
    For each branch ``dq, dk, dv, dsigma`` (dk, dv shaped like k, v: summed
    over the batch when the memory is batch-shared). ``dfull`` is
    <g_out, out> + g_kl_attn * r1 + g_ent * r2, precomputed here.

Layouts: the inputs reach the backend as the caller made them (e.g. (B, L, H, D) projections
viewed as (B, H, L, D)); each backend copies only what its kernels cannot address in place. Every
output (out, the statistics, the gradients) is contiguous, whatever the inputs' layout.

``make_kernel_op`` wraps them as ``torch.library.custom_op``s with autograd,
so ``torch.compile`` and the autograd engine see one op per pass.
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


def make_kernel_op(name: str, fwd: Callable, bwd: Callable):
    """Register ``fod_kernels::<name>_fwd`` and ``<name>_bwd``; returns ``run``.

    ``run(branches, rows, cols, scale, eps, need_stats)`` takes a list of
    (q, k, v, sigma) and returns, per branch, (out, kl_attn, kl_prior, entropy)
    with the gradient routes of spec section 2 (None stats where not needed).
    """

    @torch.library.custom_op(f"fod_kernels::{name}_fwd", mutates_args=())
    def fwd_op(qs: list[torch.Tensor], ks: list[torch.Tensor], vs: list[torch.Tensor],
               sigmas: list[torch.Tensor], rows: int, cols: int, scale: float, eps: float,
               need_stats: list[bool]) -> list[torch.Tensor]:
        raw = fwd(qs, ks, vs, sigmas, rows, cols, scale, eps, need_stats)
        res = []
        for i in range(len(qs)):
            out, lse, kl, ent, r1, r2 = raw[N_FWD * i:N_FWD * (i + 1)]
            res += [out, kl, kl.clone(), ent, lse, r1, r2]
        return res

    @fwd_op.register_fake
    def _(qs, ks, vs, sigmas, rows, cols, scale, eps, need_stats):
        return _fake_fwd(qs, ks, vs, sigmas, need_stats)

    @torch.library.custom_op(f"fod_kernels::{name}_bwd", mutates_args=())
    def bwd_op(g_outs: list[torch.Tensor], g_kl_attns: list[torch.Tensor], g_kl_priors: list[torch.Tensor],
               g_ents: list[torch.Tensor], dfulls: list[torch.Tensor], qs: list[torch.Tensor],
               ks: list[torch.Tensor], vs: list[torch.Tensor], sigmas: list[torch.Tensor],
               lses: list[torch.Tensor], rows: int, cols: int, scale: float,
               eps: float) -> list[torch.Tensor]:
        return list(bwd(g_outs, g_kl_attns, g_kl_priors, g_ents, dfulls, qs, ks, vs, sigmas, lses, rows, cols, scale,
                        eps))

    @bwd_op.register_fake
    def _(g_outs, g_kl_attns, g_kl_priors, g_ents, dfulls, qs, ks, vs, sigmas, lses, rows, cols, scale, eps):
        res = []
        for q, k, v, s in zip(qs, ks, vs, sigmas):
            res += [q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), s.new_empty(s.shape)]
        return res

    def setup_context(ctx, inputs, output):
        qs, ks, vs, sigmas, rows, cols, scale, eps, need_stats = inputs
        n = len(qs)
        outs = [output[N_OUT * i] for i in range(n)]
        lses = [output[N_OUT * i + 4] for i in range(n)]
        r1s = [output[N_OUT * i + 5] for i in range(n)]
        r2s = [output[N_OUT * i + 6] for i in range(n)]
        ctx.save_for_backward(*qs, *ks, *vs, *sigmas, *outs, *lses, *r1s, *r2s)
        ctx.meta = (n, rows, cols, scale, eps, list(need_stats))

    def backward(ctx, grads):
        n, rows, cols, scale, eps, need_stats = ctx.meta
        saved = ctx.saved_tensors
        qs, ks, vs, sigmas, outs, lses, r1s, r2s = (list(saved[j * n:(j + 1) * n]) for j in range(8))
        g_outs, g_kl_attns, g_kl_priors, g_ents, dfulls = [], [], [], [], []
        for i in range(n):
            g_out, g_kl_attn, g_kl_prior, g_ent = grads[N_OUT * i:N_OUT * i + 4]
            sd = lses[i].dtype
            shape = lses[i].shape
            g_out = torch.zeros_like(outs[i]) if g_out is None else g_out  # any layout: the backend decides
            if need_stats[i]:
                g_kl_attn, g_kl_prior, g_ent = (
                    (torch.zeros(shape, dtype=sd, device=g_out.device) if x is None else x.to(sd).contiguous())
                    for x in (g_kl_attn, g_kl_prior, g_ent))
                dfull = (g_out.to(sd) * outs[i].to(sd)).sum(-1) + g_kl_attn * r1s[i] + g_ent * r2s[i]
            else:
                g_kl_attn = g_kl_prior = g_ent = torch.zeros(shape, dtype=sd, device=g_out.device)
                dfull = (g_out.to(sd) * outs[i].to(sd)).sum(-1)
            g_outs.append(g_out)
            g_kl_attns.append(g_kl_attn)
            g_kl_priors.append(g_kl_prior)
            g_ents.append(g_ent)
            dfulls.append(dfull.contiguous())
        res = bwd_op(g_outs, g_kl_attns, g_kl_priors, g_ents, dfulls, qs, ks, vs, sigmas, lses, rows, cols, scale, eps)
        return res[0::N_BWD], res[1::N_BWD], res[2::N_BWD], res[3::N_BWD], None, None, None, None, None

    fwd_op.register_autograd(backward, setup_context=setup_context)

    def run(branches, rows, cols, scale, eps, need_stats):
        qs, ks, vs, sigmas = ([b[j] for b in branches] for j in range(4))  # no copies: each backend decides
        res = fwd_op(qs, ks, vs, sigmas, int(rows), int(cols), float(scale), float(eps), [bool(x) for x in need_stats])
        outs = []
        for i, need in enumerate(need_stats):
            out, kl_attn, kl_prior, ent = res[N_OUT * i:N_OUT * i + 4]
            outs.append((out, kl_attn, kl_prior, ent) if need else (out, None, None, None))
        return outs

    run.fwd_op = fwd_op
    run.bwd_op = bwd_op
    return run
