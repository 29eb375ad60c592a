"""The reference itself against the specification: explicit formulas in float64."""
import math

import pytest
import torch

from fod_kernels.reference import correlation_reference, prior_log_weights
from helpers import make_branch, upstream



def explicit(q, k, v, sigma, grid, eps):
    """Spec section 1, written out with the reference's own 1/(2 pi sy sx) constant and row normalisation."""
    rows, cols = grid
    B, H, L, D = q.shape
    s = q @ k.transpose(-1, -2) / math.sqrt(D)
    p = torch.exp(s - torch.logsumexp(s, -1, keepdim=True))
    idx = torch.arange(L)
    dy = (idx // cols)[:, None] - (idx // cols)[None, :]
    dx = (idx % cols)[:, None] - (idx % cols)[None, :]
    sy, sx = sigma[..., 0:1], sigma[..., 1:2]
    g = 1 / (2 * math.pi * sy * sx) * torch.exp(-dy ** 2 / (2 * sy ** 2) - dx ** 2 / (2 * sx ** 2))
    t = g / g.sum(-1, keepdim=True)
    A = (p * (torch.log(p + eps) - torch.log(t + eps))).sum(-1)
    C = (t * (torch.log(t + eps) - torch.log(p + eps))).sum(-1)
    E = -(p * torch.log(p + eps)).sum(-1)
    return p @ v, A + C, E, p, t


@pytest.mark.parametrize("Bk", [1, 2])
def test_forward_matches_spec_formulas(Bk):
    q, k, v, sigma = make_branch(2, 3, 12, 8, Bk, dtype=torch.float64, seed=5, sigma_lo=0.3)
    out, kla, klp, ent = correlation_reference(q, k, v, sigma, (3, 4), eps=1e-4)
    out_e, K_e, E_e, _, _ = explicit(q, k, v, sigma, (3, 4), 1e-4)
    torch.testing.assert_close(out, out_e)
    torch.testing.assert_close(kla, K_e)
    torch.testing.assert_close(klp, K_e)
    torch.testing.assert_close(ent, E_e)


def test_separable_normaliser():
    _, _, _, sigma = make_branch(1, 2, 20, 4, 1, dtype=torch.float64, seed=2)
    l = prior_log_weights(sigma, 4, 5)
    rows, cols = 4, 5
    i = torch.arange(20)
    r, c = (i // cols).double(), (i % cols).double()
    zy = torch.exp(-(r[:, None] - torch.arange(rows)[None, :]) ** 2 / (2 * sigma[..., 0:1] ** 2)).sum(-1)
    zx = torch.exp(-(c[:, None] - torch.arange(cols)[None, :]) ** 2 / (2 * sigma[..., 1:2] ** 2)).sum(-1)
    torch.testing.assert_close(torch.logsumexp(l, -1), torch.log(zy) + torch.log(zx))


@pytest.mark.parametrize("eps", [1e-4, 0.0])
def test_backward_formulas_of_spec_section_3(eps):
    """The spec's closed-form gradients (section 3) equal autograd through the reference."""
    q, k, v, sigma = make_branch(2, 2, 12, 8, 2, dtype=torch.float64, seed=7, sigma_lo=0.3)
    g_out, a, b, e = upstream(q, seed=3)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, sigma)]
    out, kla, klp, ent = correlation_reference(*leaves, (3, 4), eps=eps)
    loss = (out * g_out).sum() + (kla * a).sum() + (klp * b).sum() + (ent * e).sum()
    dq, dk, dv, dsig = torch.autograd.grad(loss, leaves)

    scale = 8 ** -0.5
    _, _, _, p, t = explicit(q, k, v, sigma, (3, 4), eps)
    if eps == 0:
        lp, lt = torch.log(p), torch.log(t)
        pe = te = torch.ones_like(p)
    else:
        lp, lt, pe, te = torch.log(p + eps), torch.log(t + eps), p / (p + eps), t / (t + eps)
    a_, b_, e_ = a[..., None], b[..., None], e[..., None]
    u = g_out @ v.transpose(-1, -2) + a_ * (lp + pe - lt - t / (p + eps)) + e_ * (-lp - pe)
    ds = p * (u - (p * u).sum(-1, keepdim=True))
    torch.testing.assert_close(dq, scale * ds @ k)
    torch.testing.assert_close(dk, scale * ds.transpose(-1, -2) @ q)
    torch.testing.assert_close(dv, p.transpose(-1, -2) @ g_out)
    w = b_ * (-p / (t + eps) + lt + te - lp)
    W = (t * w).sum(-1)
    idx = torch.arange(12)
    dy2 = (((idx // 4)[:, None] - (idx // 4)[None, :]) ** 2).double()
    dx2 = (((idx % 4)[:, None] - (idx % 4)[None, :]) ** 2).double()
    sy, sx = sigma[..., 0], sigma[..., 1]
    dsy = ((t * w * dy2).sum(-1) - W * (t * dy2).sum(-1)) / sy ** 3
    dsx = ((t * w * dx2).sum(-1) - W * (t * dx2).sum(-1)) / sx ** 3
    torch.testing.assert_close(dsig, torch.stack([dsy, dsx], -1))


def test_gradient_routes():
    q, k, v, sigma = make_branch(1, 2, 12, 8, 1, dtype=torch.float64, seed=1)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, sigma)]
    out, kla, klp, ent = correlation_reference(*leaves, (3, 4))
    for value, reaches in ((kla, (0, 1)), (klp, (3,)), (ent, (0, 1)), (out, (0, 1, 2))):
        grads = torch.autograd.grad(value.sum(), leaves, retain_graph=True, allow_unused=True)
        for i, g in enumerate(grads):
            nonzero = g is not None and g.abs().max() > 0
            assert nonzero == (i in reaches), f"input {i}: reached={nonzero}, expected {i in reaches}"
