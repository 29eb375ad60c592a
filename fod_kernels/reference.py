"""Pure-PyTorch reference of one I2Correlation branch (spec sections 1-2).

It materialises the (L, S) matrices and lets PyTorch's autograd do the
backward. It is the oracle that every kernel backend is tested against, so it
follows the specification to the letter, eps inside the logs included. Any
floating dtype works; the tests run it in float64. Its formulation of the
``key_padding_mask`` and of a memory of several images (S = m * L) is the
definition the kernels follow.
"""
from __future__ import annotations

import torch

from ._validate import SIGMA_MIN

__all__ = ["prior_log_weights", "correlation_reference"]


def grid_coordinates(rows: int, cols: int, device=None, dtype=torch.float32):
    """Row and column of each of the rows*cols tokens, row-major."""
    idx = torch.arange(rows * cols, device=device)
    return (idx // cols).to(dtype), (idx % cols).to(dtype)


def prior_log_weights(sigma: torch.Tensor, rows: int, cols: int, n_images: int = 1) -> torch.Tensor:
    """l_ij = -dy^2 / (2 sy_i^2) - dx^2 / (2 sx_i^2), shape (B, H, L, n_images * L).

    Key j sits at position j % L of image j // L (each image on the queries' grid, row-major).
    """
    r, c = grid_coordinates(rows, cols, sigma.device, sigma.dtype)
    dy2 = (r[:, None] - r.repeat(n_images)[None, :]) ** 2
    dx2 = (c[:, None] - c.repeat(n_images)[None, :]) ** 2
    sy = sigma[..., 0:1]
    sx = sigma[..., 1:2]
    return -dy2 / (2 * sy * sy) - dx2 / (2 * sx * sx)


def correlation_reference(q, k, v, sigma, grid, scale=None, eps=1e-4, key_padding_mask=None):
    """One branch, materialised. Returns (out, kl_attn, kl_prior, entropy).

    kl_attn and kl_prior hold the same value K = KL(P||T) + KL(T||P); the
    gradient of kl_attn reaches q, k only (T detached), that of kl_prior
    reaches sigma only (P detached). entropy's gradient reaches q, k.

    k, v may hold S = m * L keys (m images on the queries' grid); the prior
    weighs key j by its position j % L in its own image and is normalised over
    all S keys. ``key_padding_mask`` (1 or B, S), bool, True = ignore: masked keys
    get p = t = 0 (both softmaxes run over the unmasked keys only) and add
    nothing to K and E; a row must keep at least one key.
    """
    rows, cols = grid
    sigma = sigma.clamp_min(SIGMA_MIN)  # as every kernel does (max(sigma, SIGMA_MIN), clamp_min's gradient)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    s = scale * torch.matmul(q, k.transpose(-1, -2))  # k broadcasts when Bk = 1
    l = prior_log_weights(sigma, rows, cols, k.shape[-2] // (rows * cols))  # noqa: E741
    drop = None
    if key_padding_mask is not None:
        drop = key_padding_mask[:, None, None, :]  # (1 or B, 1, 1, S)
        s = s.masked_fill(drop, float("-inf"))
        l = l.masked_fill(drop, float("-inf"))  # noqa: E741
    p = torch.softmax(s, dim=-1)
    t = torch.softmax(l, dim=-1)
    out = torch.matmul(p, v)
    if eps == 0:
        logp = torch.log_softmax(s, dim=-1)
        logt = torch.log_softmax(l, dim=-1)
    else:
        logp = torch.log(p + eps)
        logt = torch.log(t + eps)
    if drop is not None:  # p = t = 0 there: the terms are 0 (and log 0 must not meet 0 * inf)
        logp = logp.masked_fill(drop, 0.0)
        logt = logt.masked_fill(drop, 0.0)

    def sym_kl(p_, logp_, t_, logt_):
        return (p_ * (logp_ - logt_)).sum(-1) + (t_ * (logt_ - logp_)).sum(-1)

    kl_attn = sym_kl(p, logp, t.detach(), logt.detach())
    kl_prior = sym_kl(p.detach(), logp.detach(), t, logt)
    entropy = -(p * logp).sum(-1).to(kl_attn.dtype)  # the statistics' dtype (sigma's) also for bf16/fp16 q
    return out, kl_attn, kl_prior, entropy
