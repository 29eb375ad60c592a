"""Shared test helpers: random inputs, the float64 oracle, and FlashAttention's tolerance rule.

Every backend test imports these, so that all backends are held to one standard:
a backend's error against the float64 reference may be at most ``MULT`` times
the error of the same-precision PyTorch reference, plus a floor of a few ulps
of the quantity's magnitude (for quantities the reference happens to get exact).
"""
from __future__ import annotations

import torch

import fod_kernels as fk
from fod_kernels.reference import correlation_reference

MULT = 5.0
NAMES = ("out", "kl", "ent", "dq", "dk", "dv", "dsigma")


def make_branch(B, H, L, D, Bk, *, dtype=torch.float32, device="cpu", seed=0, sigma_lo=0.1, sigma_hi=2.0,
                logit_scale=1.0):
    """(q, k, v, sigma) with k, v of batch Bk; sigma log-uniform in [sigma_lo, sigma_hi]."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, L, D, generator=g, dtype=torch.float64) * logit_scale
    k = torch.randn(Bk, H, L, D, generator=g, dtype=torch.float64)
    v = torch.randn(Bk, H, L, D, generator=g, dtype=torch.float64)
    lo, hi = torch.log(torch.tensor(sigma_lo, dtype=torch.float64)), torch.log(torch.tensor(sigma_hi, dtype=torch.float64))
    sigma = torch.exp(lo + (hi - lo) * torch.rand(B, H, L, 2, generator=g, dtype=torch.float64))
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v, sigma))


def upstream(q, seed=1):
    """Random upstream gradients (g_out, a, b, e) in float64 on q's device."""
    g = torch.Generator().manual_seed(seed)
    B, H, L, D = q.shape
    g_out = torch.randn(B, H, L, D, generator=g, dtype=torch.float64)
    a, b, e = (torch.randn(B, H, L, generator=g, dtype=torch.float64) for _ in range(3))
    return tuple(t.to(q.device) for t in (g_out, a, b, e))


def values_and_grads(fn, branch, ups):
    """fn(q, k, v, sigma) -> (out, kl_attn, kl_prior, ent); returns dict of values and grads (float64)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in branch]
    out, kla, klp, ent = fn(*leaves)
    g_out, a, b, e = ups
    loss = ((out.double() * g_out).sum() + (kla.double() * a).sum() + (klp.double() * b).sum()
            + (ent.double() * e).sum())
    grads = torch.autograd.grad(loss, leaves)
    res = {"out": out, "kl": kla, "kl_prior": klp, "ent": ent}
    res.update(dict(zip(("dq", "dk", "dv", "dsigma"), grads)))
    return {k_: v_.detach().double().cpu() for k_, v_ in res.items()}


def reference_fn(grid, eps, scale=None):
    return lambda q, k, v, s: correlation_reference(q, k, v, s, grid, scale=scale, eps=eps)


def backend_fn(backend, grid, eps, scale=None):
    def fn(q, k, v, s):
        out, st = fk.correlation_attention(q, k, v, s, grid, scale=scale, eps=eps, backend=backend)
        return out, st.kl_attn, st.kl_prior, st.entropy
    return fn


def max_err(a, b):
    return (a - b).abs().max().item() if a.numel() else 0.0


def assert_fa_rule(got: dict, ref_lp: dict, ref64: dict, dtype, names=NAMES, mult=MULT, floor_ulps=32.0, label=""):
    """err(got, ref64) <= mult * err(ref_lp, ref64) + floor_ulps * eps(dtype) * max(1, max|ref64|)."""
    ulp = torch.finfo(dtype).eps
    if dtype == torch.float64:
        # The same-precision reference *is* the oracle (its error is 0): allow for a different, equally
        # valid summation order, amplified by the conditioning of the gradients (about 2e-12 relative).
        floor_ulps = max(floor_ulps, 1e4)
    failures = []
    for n in names:
        x64 = ref64[n]
        scale = max(1.0, x64.abs().max().item()) if x64.numel() else 1.0
        e_got, e_ref = max_err(got[n], x64), max_err(ref_lp[n], x64)
        bound = mult * e_ref + floor_ulps * ulp * scale
        if not (e_got <= bound):  # also catches NaN
            failures.append(f"{n}: err {e_got:.3e} > bound {bound:.3e} (reference {dtype} err {e_ref:.3e}, "
                            f"scale {scale:.3g})")
    assert not failures, f"{label} " + "; ".join(failures)


def check_backend(backend, branch, grid, eps, *, dtype=torch.float32, scale=None, seed=1, mult=MULT,
                  floor_ulps=32.0, label=""):
    """Compare `backend` in `dtype` with the float64 reference, values and all four gradients."""
    ups = upstream(branch[0], seed)
    b64 = tuple(t.double() for t in branch)
    blp = tuple(t.to(dtype) for t in branch)
    ref64 = values_and_grads(reference_fn(grid, eps, scale), b64, ups)
    ref_lp = values_and_grads(reference_fn(grid, eps, scale), blp, ups)
    got = values_and_grads(backend_fn(backend, grid, eps, scale), blp, ups)
    assert torch.equal(got["kl"], got["kl_prior"]), "kl_attn and kl_prior must hold the same value"
    assert_fa_rule(got, ref_lp, ref64, dtype, mult=mult, floor_ulps=floor_ulps, label=label)
    return got, ref64
