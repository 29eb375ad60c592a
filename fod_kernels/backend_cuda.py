"""Backend "cuda": the fused CUDA C++ kernels of csrc/cuda (extension fod_kernels._C_cuda).

float32, bfloat16 and float16 inputs; every product and sum is float32 (SIMT kernels, no tensor
cores), the statistics are float32, out and the gradients come back in the input dtype. float64
is refused by the extension with an error that names the backends that take it.
"""
from __future__ import annotations

import torch

from . import _ext
from ._custom_op import make_kernel_op


def status():
    mod, why = _ext.load("_C_cuda")
    if mod is None:
        return False, why
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        return False, "fod_kernels._C_cuda is built but no CUDA device: not runnable here"
    return True, "fused CUDA kernels, float32/bfloat16/float16 with float32 accumulation"


def supports_device(device: torch.device):
    if torch.device(device).type != "cuda":
        return False, f"the cuda backend takes only CUDA tensors, got {device}"
    return True, ""


def _ext_mod():
    return _ext.require("_C_cuda")


def fwd(qs, ks, vs, sigmas, rows, cols, scale, eps, need_stats):
    return _ext_mod().forward(list(qs), list(ks), list(vs), list(sigmas), rows, cols, scale, eps, list(need_stats))


def bwd(g_outs, g_kla, g_klp, g_ents, dfulls, qs, ks, vs, sigmas, lses, rows, cols, scale, eps):
    g_outs = [g.to(q.dtype).contiguous() for g, q in zip(g_outs, qs)]  # no-ops unless a caller mixes dtypes
    f32 = lambda ts: [t.float().contiguous() for t in ts]  # noqa: E731
    return _ext_mod().backward(g_outs, f32(g_kla), f32(g_klp), f32(g_ents), f32(dfulls), list(qs), list(ks),
                               list(vs), list(sigmas), f32(lses), rows, cols, scale, eps)


run = make_kernel_op("cuda", fwd, bwd)
