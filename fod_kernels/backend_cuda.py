"""Backend "cuda": the fused CUDA C++ kernels of csrc/cuda (extension fod_kernels._C_cuda).

float32, bfloat16 and float16 inputs; every product and sum is float32 (SIMT kernels, no tensor
cores), the statistics are float32, out and the gradients come back in the input dtype (contiguous).
Strided inputs (contiguous last dimension) are read in place. key_padding_mask ((1 or B, S) bool) and a
memory of several images (S = m * L) run in the kernels' extended variant. float64
is refused by the extension with an error that names the backends that take it.
"""
from __future__ import annotations

import torch

from . import _ext
from ._custom_op import register_backend


def status():
    mod, why = _ext.load("_C_cuda")
    if mod is None:
        return False, why
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        return False, "fod_kernels._C_cuda is built but no CUDA device: not runnable here"
    return True, "fused CUDA kernels, float32/bfloat16/float16 with float32 accumulation"


def supports_device(device: torch.device):
    if torch.device(device).type not in ("cuda", "meta"):  # meta: the op's meta kernel gives the shapes
        return False, f"the cuda backend takes only CUDA tensors, got {device}"
    return True, ""


def _ext_mod():
    return _ext.require("_C_cuda")


def _inner(t):
    """t with a contiguous last dimension (the kernels take any (batch, head, row) strides, so the
    module's (B, L, H, D) projections viewed as (B, H, L, D) are used in place)."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _masks(masks, qs):
    """The extension's masks: contiguous bool (1 or B, S), or an empty tensor for none."""
    masks = masks or [None] * len(qs)
    return [torch.empty((0,), dtype=torch.bool, device=q.device) if m is None else m.contiguous()
            for m, q in zip(masks, qs)]


def fwd(qs, ks, vs, sigmas, rows, cols, scale, eps, need_stats, masks=None):
    qs, ks, vs, sigmas = ([_inner(t) for t in ts] for ts in (qs, ks, vs, sigmas))
    return _ext_mod().forward(qs, ks, vs, sigmas, rows, cols, scale, eps, list(need_stats), _masks(masks, qs))


def bwd(g_outs, g_kl_attns, g_kl_priors, g_ents, dfulls, qs, ks, vs, sigmas, lses, rows, cols, scale, eps,
        masks=None):
    g_outs = [_inner(g.to(q.dtype)) for g, q in zip(g_outs, qs)]  # .to: a no-op unless a caller mixes dtypes
    qs, ks, vs, sigmas = ([_inner(t) for t in ts] for ts in (qs, ks, vs, sigmas))
    rowv = lambda ts: [t.float().contiguous() for t in ts]  # noqa: E731  (B, H, L) float32 row vectors
    return _ext_mod().backward(g_outs, rowv(g_kl_attns), rowv(g_kl_priors), rowv(g_ents), rowv(dfulls), qs, ks, vs,
                               sigmas, rowv(lses), rows, cols, scale, eps, _masks(masks, qs))


run = register_backend("cuda", fwd, bwd)
