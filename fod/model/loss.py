"""The FOD loss (docs/I2CORRELATION.md sections 2 and 5): the reconstruction loss and the minimax as one scalar."""
from __future__ import annotations

import torch


def reconstruction_loss(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """MSE(out, x) + mean(1 - cos(out, x)), cosine over channels."""
    return torch.mean((out - x) ** 2) + torch.mean(1 - torch.cosine_similarity(out, x, dim=-1))


def _mean_stat(stats, field):
    return torch.stack([getattr(s, field).mean() for s in stats]).mean()


def fod_loss(out, x, intra, inter, lambda1: float = 0.5, lambda2: float = 0.5):
    """The official two-backward minimax as ONE scalar (spec sections 2 and 5).

    loss1 (sigma only) + loss2 (q, k only) =
    2 rec + l1 K_intra|prior - l1 K_inter|prior - l1 K_intra|attn - l2 E_intra + l1 K_inter|attn + l2 E_inter,
    with K, E averaged over layers, heads, batch and tokens. Returns (loss, parts dict of floats).
    A branch that is not trained (its stats None) drops its terms, as the official code's with_intra /
    with_inter; with neither, the official code takes one backward of rec: the loss is rec, and the
    parts of a missing branch are NaN.
    """
    rec = reconstruction_loss(out, x)
    nan = torch.tensor(float("nan"))
    parts = {"rec": rec.detach(), "k_intra": nan, "k_inter": nan, "e_intra": nan, "e_inter": nan}
    if intra is None and inter is None:
        return rec, parts
    loss = 2 * rec
    if intra is not None:
        ki_a, ki_p, ei = (_mean_stat(intra, f) for f in ("kl_attn", "kl_prior", "entropy"))
        loss = loss + lambda1 * ki_p - lambda1 * ki_a - lambda2 * ei
        parts["k_intra"], parts["e_intra"] = ki_a.detach(), ei.detach()
    if inter is not None:
        ke_a, ke_p, ee = (_mean_stat(inter, f) for f in ("kl_attn", "kl_prior", "entropy"))
        loss = loss - lambda1 * ke_p + lambda1 * ke_a + lambda2 * ee
        parts["k_inter"], parts["e_inter"] = ke_a.detach(), ee.detach()
    return loss, parts
