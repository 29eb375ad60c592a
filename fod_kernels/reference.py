"""Pure-PyTorch reference of one I2Correlation branch (spec sections 1-2).

It materialises the (L, S) matrices and lets PyTorch's autograd do the
backward. It is the oracle that every kernel backend is tested against, so it
follows ``shared/I2CORRELATION.md`` to the letter, eps inside the logs
included. Any floating dtype works; the tests run it in float64.
"""
from __future__ import annotations

import torch

__all__ = ["prior_log_weights", "correlation_reference"]


def grid_coordinates(rows: int, cols: int, device=None, dtype=torch.float32):
    """Row and column of each of the rows*cols tokens, row-major."""
    idx = torch.arange(rows * cols, device=device)
    return (idx // cols).to(dtype), (idx % cols).to(dtype)


def prior_log_weights(sigma: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """l_ij = -dy^2 / (2 sy_i^2) - dx^2 / (2 sx_i^2), shape (B, H, L, L)."""
    r, c = grid_coordinates(rows, cols, sigma.device, sigma.dtype)
    dy2 = (r[:, None] - r[None, :]) ** 2
    dx2 = (c[:, None] - c[None, :]) ** 2
    sy = sigma[..., 0:1]
    sx = sigma[..., 1:2]
    return -dy2 / (2 * sy * sy) - dx2 / (2 * sx * sx)


def correlation_reference(q, k, v, sigma, grid, scale=None, eps=1e-4):
    """One branch, materialised. Returns (out, kl_attn, kl_prior, entropy).

    kl_attn and kl_prior hold the same value K = KL(P||T) + KL(T||P); the
    gradient of kl_attn reaches q, k only (T detached), that of kl_prior
    reaches sigma only (P detached). entropy's gradient reaches q, k.
    """
    rows, cols = grid
    if scale is None:
        scale = q.shape[-1] ** -0.5
    s = scale * torch.matmul(q, k.transpose(-1, -2))  # k broadcasts when Bk = 1
    p = torch.softmax(s, dim=-1)
    t = torch.softmax(prior_log_weights(sigma, rows, cols), dim=-1)
    out = torch.matmul(p, v)
    if eps == 0:
        logp = torch.log_softmax(s, dim=-1)
        logt = torch.log_softmax(prior_log_weights(sigma, rows, cols), dim=-1)
    else:
        logp = torch.log(p + eps)
        logt = torch.log(t + eps)

    def sym_kl(p_, logp_, t_, logt_):
        return (p_ * (logp_ - logt_)).sum(-1) + (t_ * (logt_ - logp_)).sum(-1)

    kl_attn = sym_kl(p, logp, t.detach(), logt.detach())
    kl_prior = sym_kl(p.detach(), logp.detach(), t, logt)
    entropy = -(p * logp).sum(-1)
    return out, kl_attn, kl_prior, entropy
