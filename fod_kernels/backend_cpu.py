"""Backend "cpu": the fused C++ kernels of csrc/cpu (float32 and float64 natively).

bfloat16/float16 inputs are computed in float32 (the CPU has no fast low-precision
path worth the accuracy loss) and the results cast back to the input dtype.
"""
from __future__ import annotations

import torch

from . import _ext
from ._custom_op import register_backend

NATIVE = (torch.float32, torch.float64)


def status():
    mod, why = _ext.load("_C")
    return (True, "fused C++ kernels, float32/float64 (bf16/fp16 computed in float32)") if mod else (False, why)


def supports_device(device: torch.device):
    if device.type not in ("cpu", "meta"):  # meta: the op's meta kernel gives the shapes
        return False, f"the cpu backend takes CPU tensors, got {device}"
    return True, ""


def _ext_mod():
    return _ext.require("_C")


def _compute_dtype(dtype):
    return dtype if dtype in NATIVE else torch.float32


def _masks(masks, qs):
    """The extension's masks: contiguous bool (1 or B, S), or an empty tensor for none."""
    masks = masks or [None] * len(qs)
    return [torch.empty((0,), dtype=torch.bool) if m is None else m.contiguous() for m in masks]


def fwd(qs, ks, vs, sigmas, rows, cols, scale, eps, need_stats, masks=None):
    dt = qs[0].dtype
    cd = _compute_dtype(dt)
    cast = lambda ts: [t.to(cd).contiguous() for t in ts]  # noqa: E731
    res = _ext_mod().forward(cast(qs), cast(ks), cast(vs), cast(sigmas), rows, cols, scale, eps, list(need_stats),
                             _masks(masks, qs))
    if cd != dt:
        res = [r.to(dt) if i % 6 == 0 else r for i, r in enumerate(res)]
    return res


def bwd(g_outs, g_kl_attns, g_kl_priors, g_ents, dfulls, qs, ks, vs, sigmas, lses, rows, cols, scale, eps,
        masks=None):
    dt = qs[0].dtype
    cd = _compute_dtype(dt)
    cast = lambda ts: [t.to(cd).contiguous() for t in ts]  # noqa: E731
    res = _ext_mod().backward(cast(g_outs), cast(g_kl_attns), cast(g_kl_priors), cast(g_ents), cast(dfulls), cast(qs),
                              cast(ks), cast(vs), cast(sigmas), cast(lses), rows, cols, scale, eps, _masks(masks, qs))
    if cd != dt:  # dq, dk, dv back to the inputs' dtype; dsigma stays in sigma's (float32), computed there
        res = [r.to(dt) if i % 4 != 3 else r.to(sigmas[i // 4].dtype) for i, r in enumerate(res)]
    return res


run = register_backend("cpu", fwd, bwd)
