"""Functional API: one branch (``correlation_attention``) or both (``i2correlation``)."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ._backends import get_runner, resolve_backend_name
from ._validate import check_branch, check_scalars
from .reference import correlation_reference


class CorrelationStats(NamedTuple):
    """Per-row statistics of one branch, each (B, H, L).

    kl_attn and kl_prior hold the same symmetric KL K = KL(P||T) + KL(T||P);
    kl_attn's gradient reaches q and k only, kl_prior's reaches sigma only.
    entropy is E = -sum_j p log(p + eps); its gradient reaches q and k.
    """
    kl_attn: torch.Tensor
    kl_prior: torch.Tensor
    entropy: torch.Tensor


def _unbroadcast(k: torch.Tensor) -> torch.Tensor:
    # A memory expanded to the batch (stride 0) is a batch-shared memory: use it without a copy.
    if k.shape[0] > 1 and k.stride(0) == 0:
        return k[:1]
    return k


def _run(branches, grid, scale, eps, backend, need_stats, check_values):
    names = ("intra", "inter") if len(branches) == 2 else ("",)
    check_scalars(scale, eps)
    rows_cols = None
    fixed = []
    for name, (q, k, v, sigma) in zip(names, branches):
        rc = check_branch(q, k, v, sigma, grid, name=name, check_values=check_values)
        if rows_cols is not None and rc != rows_cols:
            raise ValueError(f"both branches must share one grid, got {rows_cols} and {rc}")
        rows_cols = rc
        fixed.append((q, _unbroadcast(k), _unbroadcast(v), sigma))
    if len(fixed) == 2:
        (q0, *_), (q1, *_) = fixed
        if q0.device != q1.device or q0.dtype != q1.dtype:
            raise TypeError(f"intra and inter branches must share device and dtype, got "
                            f"{q0.device}/{q0.dtype} and {q1.device}/{q1.dtype}")
        if q0.shape[:3] != q1.shape[:3]:
            raise ValueError(f"intra and inter queries must share (B, H, L), got {tuple(q0.shape)} and {tuple(q1.shape)}")
    rows, cols = rows_cols
    q0 = fixed[0][0]
    if scale is None:
        scale = q0.shape[-1] ** -0.5
    name = resolve_backend_name(backend, q0.device.type)
    if name == "reference":
        results = [correlation_reference(*br, (rows, cols), scale=scale, eps=eps) for br in fixed]
    else:
        results = get_runner(name)(fixed, rows, cols, scale, eps, need_stats)
    res = []
    for (out, kla, klp, ent), need in zip(results, need_stats):
        res.append((out, CorrelationStats(kla, klp, ent) if need else None))
    return res


def correlation_attention(q, k, v, sigma, grid, *, scale: Optional[float] = None, eps: float = 1e-4,
                          backend: str = "auto", need_stats: bool = True, check_values: bool = True):
    """One correlation branch: softmax attention with a Gaussian distance prior.

    q (B,H,L,D); k, v (Bk,H,S,D) with Bk in {1, B} (1: a batch-shared memory,
    broadcast without copying); sigma (B,H,L,2) > 0; grid (rows, cols) with
    rows*cols = L = S. Returns ``(out, stats)``: out (B,H,L,D) and a
    :class:`CorrelationStats` (None when ``need_stats`` is False, which lets
    kernels skip the statistics for inference). ``check_values`` scans the
    inputs for NaN/inf and non-positive sigma (one device sync per tensor).
    """
    return _run([(q, k, v, sigma)], grid, scale, eps, backend, [need_stats], check_values)[0]


def i2correlation(q, k, v, sigma, q_ref, k_ref, v_ref, sigma_ref, grid, *, scale: Optional[float] = None,
                  eps: float = 1e-4, backend: str = "auto", need_stats=(True, True), check_values: bool = True):
    """Both I2Correlation branches in one fused call.

    Intra: (q, k, v, sigma) from the image's own tokens. Inter: queries and
    widths (q_ref, sigma_ref) from the image, keys/values (k_ref, v_ref) from the
    reference memory, usually with batch 1. Returns
    ``(out_intra, out_inter, intra_stats, inter_stats)``.
    """
    if isinstance(need_stats, bool):
        need_stats = (need_stats, need_stats)
    (oi, si), (oe, se) = _run([(q, k, v, sigma), (q_ref, k_ref, v_ref, sigma_ref)], grid, scale, eps,
                              backend, list(need_stats), check_values)
    return oi, oe, si, se
