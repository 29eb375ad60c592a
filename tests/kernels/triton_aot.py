"""Ahead-of-time compilation of the Triton kernels for sm_90, without a GPU.

``launch_variants()`` runs the backend's own launcher (fod_kernels.backend_triton.fwd/bwd) on CPU
stand-in tensors with the kernels replaced by a recorder, over every case that changes a compiled
variant (dtype and fp32 precision, head-dim bucket, eps = 0 or not, statistics or not, one branch or
two, batch-shared or per-image memory; and head dim 1 with one strided branch, where some strides are
compile-time constants in one branch only), and turns each recorded launch into the signature,
specialisation and options that ``triton.jit`` would compile for it on a GPU (the same
``native_specialize_impl`` call, so integers equal to 1 become constants and 16-divisible
pointers/integers get the divisibility attribute, except where the kernel opts out).
``compile_variant()`` lowers one to a cubin and reads its resource usage (registers, stack frame,
local memory) with the cuobjdump that ships with triton. A stack frame > 0 means register spills.

Must run with TRITON_INTERPRET=0 (the interpreter replaces the kernels at import time):

    TRITON_INTERPRET=0 python3 tests/kernels/triton_aot.py     # table of every variant
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ARCH = 90


@dataclass(frozen=True)
class Variant:
    kernel: str
    signature: tuple   # ((name, type), ...)
    attrs: tuple       # ((index, ((attr, value), ...)), ...)
    constexprs: tuple  # ((name, value), ...)
    num_warps: int
    num_stages: int

    def label(self) -> str:
        c = dict(self.constexprs)
        keep = ("STATS", "EPS_ZERO", "PREC", "EXT", "BLOCK_M", "BLOCK_N", "BLOCK_D")
        ptr = next(t for n, t in self.signature if n.startswith("Q") or n.startswith("SG"))
        return (f"{self.kernel} {ptr[1:]} " + " ".join(f"{k}={c[k]}" for k in keep if k in c)
                + f" warps={self.num_warps} stages={self.num_stages}")


def _cases():
    import torch

    for dtype, prec in ((torch.float32, "ieee"), (torch.float32, "tf32"), (torch.bfloat16, "ieee"),
                        (torch.float16, "ieee")):
        for D in (16, 32, 64, 128):
            for eps in (1e-4, 0.0):
                for need in ((True, True), (False, False)):
                    for shared in ((False, True), (True,)):
                        for ext in (False, True):  # ext: key_padding_masks and a memory of 2 images
                            yield dtype, prec, D, eps, need[:len(shared)], shared, False, ext
    # Head dim 1, the intra branch a (B, L, H, 1)-strided view, the inter one contiguous: some strides are 1
    # (compile-time constants) in one branch only, which the kernels' branch selection must join.
    yield torch.float32, "ieee", 1, 1e-4, (True, True), (False, True), True, False


def launch_variants(cases=None) -> list[Variant]:
    """The distinct compiled variants behind the launcher's launches for ``cases`` (default: all)."""
    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run with TRITON_INTERPRET=0"
    import torch
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    from fod_kernels import backend_triton as bt

    backend = make_backend(GPUTarget("cuda", ARCH, 32))
    seen: dict[Variant, None] = {}

    class Recorder:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            def record(*args, **kwargs):
                seen.setdefault(_variant(self.fn, args, kwargs), None)
            return record

    def _variant(fn, args, kwargs):
        sig, attrs, consts = [], [], []
        for i, p in enumerate(fn.params):
            if p.is_constexpr:
                consts.append((p.name, kwargs[p.name]))
                continue
            ty, spec = native_specialize_impl(type(backend), args[i], False, not p.do_not_specialize,
                                              not p.do_not_specialize_on_alignment)
            if ty == "constexpr":  # an integer equal to 1
                consts.append((p.name, args[i]))
            elif spec:
                attrs.append((i, tuple(tuple(a) for a in backend.parse_attr(spec))))
            sig.append((p.name, ty))
        return Variant(fn.__name__, tuple(sig), tuple(attrs), tuple(consts), kwargs.get("num_warps", 4),
                       kwargs.get("num_stages", 3))  # triton's defaults on CUDA

    saved = {n: getattr(bt._tk, n) for n in ("fwd_kernel", "logz_kernel", "bwd_dkdv_kernel", "bwd_dq_kernel")}
    saved_supports = bt.supports_device
    saved_prec = bt.get_fp32_precision()
    try:
        for n, fn in saved.items():
            setattr(bt._tk, n, Recorder(fn))
        bt.supports_device = lambda device: (True, "")  # CPU tensors stand in; nothing is launched
        for dtype, prec, D, eps, need, shared, strided, ext in (cases or _cases()):
            bt.set_fp32_precision(prec)
            B, H, rows, cols = 2, 2, 32, 32
            L = rows * cols

            def mk(i, b, d):  # branch i's (b, H, L, d) tensor; branch 0 (B, L, H, d)-strided if asked
                if strided and i == 0:
                    return torch.empty(b, L, H, d, dtype=dtype).transpose(1, 2)
                return torch.empty(b, H, L, d, dtype=dtype)

            qs = [mk(i, B, D) for i in range(len(shared))]
            ks = [mk(i, 1 if sh else B, D) for i, sh in enumerate(shared)]
            vs = [mk(i, 1 if sh else B, D) for i, sh in enumerate(shared)]
            masks = None
            if ext:  # the last branch reads 2 images; every branch masked
                ks[-1], vs[-1] = (torch.cat([t, t], dim=2) for t in (ks[-1], vs[-1]))
                masks = [torch.zeros(B, k.shape[2], dtype=torch.bool) for k in ks]
            sigmas = [mk(i, B, 2) for i in range(len(shared))]
            bt.fwd(qs, ks, vs, sigmas, rows, cols, D ** -0.5, eps, list(need), masks)
            rowv = [torch.empty(B, H, L) for _ in shared]
            bt.bwd([mk(i, B, D) for i in range(len(shared))], rowv, rowv, rowv, rowv, qs, ks, vs, sigmas, rowv,
                   rows, cols, D ** -0.5, eps, masks)
    finally:
        for n, fn in saved.items():
            setattr(bt._tk, n, fn)
        bt.supports_device = saved_supports
        bt.set_fp32_precision(saved_prec)
    return list(seen)


def _tool(name: str) -> str:
    import triton
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{name} not found at {path}")
    return str(path)


def compile_variant(v: Variant) -> dict:
    """Lower one variant to sm_90 machine code; returns its resource usage and shared memory."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fod_kernels import triton_kernels as tk

    fn = getattr(tk, v.kernel)
    src = ASTSource(fn, dict(v.signature), constexprs=dict(v.constexprs),
                    attrs={(i,): [list(a) for a in spec] for i, spec in v.attrs})
    k = triton.compile(src, target=GPUTarget("cuda", ARCH, 32),
                       options=dict(num_warps=v.num_warps, num_stages=v.num_stages))
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(k.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True,
                               check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage)
    if m is None:
        raise RuntimeError(f"cannot read the resource usage of {v.label()}:\n{usage}")
    regs, stack, local = map(int, m.groups())
    return dict(regs=regs, stack=stack, local=local, shared=k.metadata.shared)


def compile_all(variants=None, workers: int | None = None) -> list[tuple[Variant, dict]]:
    """compile_variant over every launch variant, in parallel processes (compilation is single-threaded)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    variants = launch_variants() if variants is None else variants
    workers = workers or min(len(variants), os.cpu_count() or 1)
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as ex:
        return list(zip(variants, ex.map(compile_variant, variants)))


def main() -> int:
    results = compile_all()
    bad = 0
    for v, r in results:
        bad += r["stack"] > 0 or r["local"] > 0
        print(f"{v.label():90s} regs {r['regs']:3d} stack {r['stack']:5d} local {r['local']:5d} "
              f"smem {r['shared']:6d}", flush=True)
    print(f"{bad} of {len(results)} variants spill")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(Path(__file__).resolve().parent),
                                                os.environ.get("PYTHONPATH", "")])
    raise SystemExit(main())
