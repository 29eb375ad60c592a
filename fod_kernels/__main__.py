"""`python -m fod_kernels`: the operator on an embedded example.

Prints which backends run here, the statistics of both I2Correlation branches on
a 16x16 grid, and the largest difference of every other available CPU backend
from the float64 reference (values and all four gradients).
"""
from __future__ import annotations

import time

import torch

import fod_kernels as fk


def _example(seed=0, B=2, H=4, rows=16, cols=16, D=32):
    g = torch.Generator().manual_seed(seed)
    L = rows * cols
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    sig = lambda: 0.2 + 1.8 * torch.rand(B, H, L, 2, generator=g)  # noqa: E731
    intra = (r(B, H, L, D), r(B, H, L, D), r(B, H, L, D), sig())
    inter = (r(B, H, L, D), r(1, H, L, D), r(1, H, L, D), sig())
    return intra + inter, (rows, cols)


def _run(backend, args, grid, dtype):
    leaves = [a.to(dtype).requires_grad_() for a in args]
    t0 = time.perf_counter()
    oi, oe, si, se = fk.i2correlation(*leaves, grid, backend=backend)
    loss = (oi.square().sum() + oe.sum() + (si.kl_prior - si.kl_attn - 0.5 * si.entropy).mean()
            + (se.kl_attn - se.kl_prior + 0.5 * se.entropy).mean())
    grads = torch.autograd.grad(loss, leaves)
    dt = time.perf_counter() - t0
    vals = [oi, oe, si.kl_attn, si.entropy, se.kl_attn, se.entropy, *grads]
    return [v.detach().double() for v in vals], (si, se), dt


def main() -> int:
    print("fod_kernels", fk.__version__, "| torch", torch.__version__)
    for name, st in fk.available_backends().items():
        print(f"  backend {name:9s} {'available' if st.available else 'unavailable'}: {st.reason}")
    args, grid = _example()
    B, H, L, D = args[0].shape
    print(f"\nembedded example: B={B} H={H} L={L} ({grid[0]}x{grid[1]} grid) D={D}, inter memory batch 1")
    ref, (si, se), _ = _run("reference", args, grid, torch.float64)
    for label, st in (("intra", si), ("inter", se)):
        print(f"  {label}: K mean {st.kl_attn.mean():.4f} [min {st.kl_attn.min():.4f}, max {st.kl_attn.max():.4f}]"
              f"   entropy mean {st.entropy.mean():.4f} (uniform would be {torch.log(torch.tensor(float(L))):.4f})")
    names = ["out_intra", "out_inter", "K_intra", "E_intra", "K_inter", "E_inter",
             "dq", "dk", "dv", "dsigma", "dq_ref", "dk_ref", "dv_ref", "dsigma_ref"]
    ok = True
    for backend in ("reference", "cpu", "triton"):
        st = fk.available_backends()[backend]
        cpu_ok = backend != "triton" or fk._backends._supports_device("triton", torch.device("cpu"))[0]
        if not st.available or not cpu_ok:
            print(f"\n  {backend}: skipped ({st.reason if not st.available else 'needs TRITON_INTERPRET=1 on CPU'})")
            continue
        got, _, dt = _run(backend, args, grid, torch.float32)
        errs = {n: (g - r).abs().max().item() / max(1.0, r.abs().max().item()) for n, g, r in zip(names, got, ref)}
        worst = max(errs, key=errs.get)
        good = errs[worst] < 1e-3
        ok &= good
        print(f"\n  {backend} (float32) vs float64 reference, forward+backward {dt * 1e3:.1f} ms: "
              f"largest relative error {errs[worst]:.2e} ({worst}) -> {'OK' if good else 'MISMATCH'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
