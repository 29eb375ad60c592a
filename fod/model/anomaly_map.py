"""Token scores (docs/I2CORRELATION.md section 5): the reconstruction score times the discrepancy score of the
branch that scores, per token; ``FOD.anomaly_maps`` upsamples and averages them into the anomaly map."""
from __future__ import annotations

import torch


def rec_score(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B, L): mean_c (out - x)^2 + 1 - cos(out, x)."""
    return torch.mean((out - x) ** 2, dim=-1) + 1 - torch.cosine_similarity(out, x, dim=-1)


def _softmax_neg_k(stats) -> torch.Tensor:
    k = torch.stack([s.kl_attn for s in stats]).mean(dim=(0, 2))  # mean over layers and heads -> (B, L)
    return torch.softmax(-k, dim=-1)


def inter_score(inter) -> torch.Tensor:
    """(B, L): max - softmax over the tokens of -K_inter (high where the image departs from the memory)."""
    att = _softmax_neg_k(inter)
    return att.max(dim=-1, keepdim=True).values - att


def intra_score(intra) -> torch.Tensor:
    """(B, L): softmax over the tokens of -K_intra (the official code's score without the inter branch)."""
    return _softmax_neg_k(intra)


def token_scores(out: torch.Tensor, x: torch.Tensor, inter, intra=None) -> torch.Tensor:
    """Per-token anomaly score (B, L): rec_score * inter_score (spec section 5); without inter stats,
    rec_score * intra_score if intra stats are given, else rec_score alone."""
    rec = rec_score(out, x)
    if inter is not None:
        return rec * inter_score(inter)
    if intra is not None:
        return rec * intra_score(intra)
    return rec


SCORES = {("intra", "inter"): "rec x inter: rec_score * (max - softmax_L(-K_inter))",
          ("inter",): "rec x inter: rec_score * (max - softmax_L(-K_inter)) (no intra branch)",
          ("intra",): "rec x intra: rec_score * softmax_L(-K_intra) (no inter branch; the official code's score)",
          (): "rec only: rec_score (neither branch)"}
