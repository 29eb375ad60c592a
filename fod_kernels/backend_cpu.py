"""Backend "cpu": the fused C++ kernels of csrc/cpu (float32 and float64 natively).

bfloat16/float16 inputs are computed in float32 (the CPU has no fast low-precision
path worth the accuracy loss) and the results cast back to the input dtype.

The kernels are built once per instruction-set variant (_build_flags.CPU_VARIANTS: default, avx2, avx512)
and one is chosen at load, as ATen chooses its kernels: the widest the CPU runs (cpuid, asked of the portable
module) among those built, or the one FOD_CPU_CAPABILITY names (default, avx2 or avx512; refused when the CPU
cannot run it or it is not built). available_backends()["cpu"] and variant() say which runs.
"""
from __future__ import annotations

import os

import torch

from . import _ext
from ._build_flags import CPU_VARIANTS
from ._custom_op import register_backend

NATIVE = (torch.float32, torch.float64)
ENV = "FOD_CPU_CAPABILITY"
_selected: dict = {}  # FOD_CPU_CAPABILITY's value -> (variant, module, note)


def runnable_variants() -> list[str]:
    """The variants this CPU runs, narrowest first (whether built or not)."""
    order = list(CPU_VARIANTS)
    widest = _ext.require("_C").cpu_capability()
    return order[: order.index(widest) + 1] if widest in order else order[:1]


def _import(variant: str):
    mod, why = _ext.load(CPU_VARIANTS[variant][0])
    if mod is not None and mod.VARIANT != variant:
        raise RuntimeError(f"fod_kernels.{CPU_VARIANTS[variant][0]} holds the {mod.VARIANT!r} variant, not "
                           f"{variant!r}: a stale build; rebuild the extensions")
    return mod, why


def _select(want: str | None):
    runs = runnable_variants()
    if want is not None:
        want = want.strip().lower()
        if want not in CPU_VARIANTS:
            raise RuntimeError(f"{ENV}={want!r}: choose one of {', '.join(CPU_VARIANTS)}")
        if want not in runs:
            raise RuntimeError(f"{ENV}={want}: this CPU cannot run that variant (it runs {', '.join(runs)})")
        mod, why = _import(want)
        if mod is None:
            raise RuntimeError(f"{ENV}={want}: {why}")
        return want, mod, f"{ENV}={want}"
    missing = []
    for v in reversed(runs):
        mod, why = _import(v)
        if mod is not None:
            note = f"the widest this CPU runs is {runs[-1]}; not built: {'; '.join(missing)}" if missing else \
                "the widest this CPU runs"
            return v, mod, note
        missing.append(f"{v} ({why})")
    raise RuntimeError("; ".join(missing))


def selected():
    """(variant, extension module, why that one) of the kernels that run; RuntimeError when none can."""
    want = os.environ.get(ENV) or None
    if want not in _selected:
        _selected[want] = _select(want)
    return _selected[want]


def variant() -> str:
    """The instruction-set variant of the CPU kernels that run here: default, avx2 or avx512."""
    return selected()[0]


def status():
    try:
        v, _, note = selected()
    except RuntimeError as exc:
        return False, str(exc)
    return True, f"fused C++ kernels, variant {v} ({note}), float32/float64 (bf16/fp16 computed in float32)"


def supports_device(device: torch.device):
    if device.type not in ("cpu", "meta"):  # meta: the op's meta kernel gives the shapes
        return False, f"the cpu backend takes CPU tensors, got {device}"
    return True, ""


def _ext_mod():
    return selected()[1]


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
