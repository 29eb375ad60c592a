"""Functional API: one branch (``correlation_attention``) or both (``i2correlation``)."""
from __future__ import annotations

import sys
from typing import NamedTuple, Optional

import torch

from ._backends import BACKEND_TABLE, get_runner, resolve_backend_name
from ._custom_op import stats_dtype
from ._validate import check_branch, check_finite_result, check_scalars, scans_enabled
from .reference import correlation_reference

# Backends that take a key_padding_mask and a memory of several images (S = m * L): the table's column.
EXTENDED_BACKENDS = tuple(b.name for b in BACKEND_TABLE if b.extended)


class CorrelationStats(NamedTuple):
    """Per-row statistics of one branch, each (B, H, L).

    kl_attn and kl_prior hold the same symmetric KL K = KL(P||T) + KL(T||P);
    kl_attn's gradient reaches q and k only, kl_prior's reaches sigma only.
    entropy is E = -sum_j p log(p + eps); its gradient reaches q and k.
    ``kl_attn + kl_prior - kl_attn.detach()`` is K with its full gradient.
    """
    kl_attn: torch.Tensor
    kl_prior: torch.Tensor
    entropy: torch.Tensor


class I2CorrelationResult(NamedTuple):
    """What :func:`i2correlation` returns; it unpacks as four, ``oi, oe, si, se = i2correlation(...)``.

    out_intra, out_inter (B, H, L, D) in q's dtype; stats_intra, stats_inter a :class:`CorrelationStats`
    each, or None for a branch whose ``need_stats`` entry is False.
    """
    out_intra: torch.Tensor
    out_inter: torch.Tensor
    stats_intra: Optional[CorrelationStats]
    stats_inter: Optional[CorrelationStats]


def _unbroadcast(k: torch.Tensor) -> torch.Tensor:
    # A memory expanded to the batch (stride 0) is a batch-shared memory: use it without a copy.
    if k.shape[0] > 1 and k.stride(0) == 0:
        return k[:1]
    return k


def _unbroadcast_mask(m: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    # A (1, S) mask expanded to (B, S) (stride 0) is a batch-shared mask: use it as (1, S).
    if m is not None and m.shape[0] > 1 and m.stride(0) == 0:
        return m[:1]
    return m


def _pick_backend(backend: str, device_type: str, extended: list[str]) -> str:
    """The backend for this call; a call with a mask or S != L must go to a backend that implements them."""
    name = resolve_backend_name(backend, device_type)
    if extended and name not in EXTENDED_BACKENDS:  # a guard for a future backend without them
        raise NotImplementedError(f"{' and '.join(extended)} is not implemented by the {name!r} backend; the "
                                  f"backends that support it: {EXTENDED_BACKENDS}")
    return name


def _reentrant_checkpoint_forward() -> bool:
    """Are we inside the first (no-grad) pass of torch.utils.checkpoint(..., use_reentrant=True)?"""
    if torch.is_grad_enabled() or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    from torch.utils import checkpoint
    code = getattr(getattr(checkpoint, "CheckpointFunction", None), "forward", None)
    code = getattr(code, "__code__", None)
    f = sys._getframe(1)
    while f is not None:
        if f.f_code is code:
            return True
        f = f.f_back
    return False


def _run(branches, masks, grid, scale, eps, backend, need_stats, check_values):
    names = ("intra", "inter") if len(branches) == 2 else ("",)
    check_scalars(scale, eps)
    rows_cols = None
    fixed = []
    for name, (q, k, v, sigma), mask in zip(names, branches, masks):
        rc = check_branch(q, k, v, sigma, grid, name=name, check_values=check_values, key_padding_mask=mask)
        if rows_cols is not None and rc != rows_cols:
            raise ValueError(f"both branches must share one grid, got {rows_cols} and {rc}")
        rows_cols = rc
        # The prior is computed in the statistics dtype (float32, or float64 for float64 inputs); sigma is passed
        # as it is when it has that dtype (no copy: the kernels read it in place). Every backend raises it to
        # SIGMA_MIN itself (see _validate.SIGMA_MIN: it changes no value, it removes a NaN).
        fixed.append((q, _unbroadcast(k), _unbroadcast(v), sigma.to(stats_dtype(q.dtype))))
    if len(fixed) == 2:
        (q0, *_), (q1, *_) = fixed
        if q0.device != q1.device or q0.dtype != q1.dtype:
            raise TypeError(f"intra and inter branches must share device and dtype, got "
                            f"{q0.device}/{q0.dtype} and {q1.device}/{q1.dtype}")
        if q0.shape[:3] != q1.shape[:3]:
            raise ValueError(f"intra and inter queries must share (B, H, L), got {tuple(q0.shape)} and "
                             f"{tuple(q1.shape)}")
    if any(need_stats) and _reentrant_checkpoint_forward():
        raise RuntimeError(
            "fod_kernels: statistics requested inside torch.utils.checkpoint(..., use_reentrant=True). Reentrant "
            "checkpointing tracks only the tensors a function returns directly, so the gradients of kl_attn, "
            "kl_prior and entropy (returned inside CorrelationStats tuples) would be silently dropped. Use "
            "checkpoint(..., use_reentrant=False) (exact, and PyTorch's recommended mode), or need_stats=False "
            "inside the checkpointed function if the statistics are not needed")
    rows, cols = rows_cols
    q0 = fixed[0][0]
    if scale is None:
        scale = q0.shape[-1] ** -0.5
    extended = (["key_padding_mask"] if any(m is not None for m in masks) else []) + \
        (["a memory of several images (S = m * L)"] if any(b[1].shape[2] != b[0].shape[2] for b in fixed) else [])
    name = _pick_backend(backend, q0.device.type, extended)
    if name == "reference":
        results = [correlation_reference(*br, (rows, cols), scale=scale, eps=eps, key_padding_mask=m)
                   for br, m in zip(fixed, masks)]
    else:
        results = get_runner(name)(fixed, rows, cols, scale, eps, need_stats, [_unbroadcast_mask(m) for m in masks])
    res = []
    for (out, kla, klp, ent), need, bname in zip(results, need_stats, names):
        if scans_enabled(check_values, out.device):
            check_finite_result(out, q0.dtype, bname)
        res.append((out, CorrelationStats(kla, klp, ent) if need else None))
    return res


def correlation_attention(q, k, v, sigma, grid, *, scale: Optional[float] = None, eps: float = 1e-4,
                          backend: str = "auto", need_stats: bool = True, check_values: bool = True,
                          key_padding_mask: Optional[torch.Tensor] = None):
    """One correlation branch: softmax attention with a Gaussian distance prior.

    Shapes (heads first, like ``scaled_dot_product_attention``): q (B, H, L, D);
    k, v (Bk, H, S, D) with Bk in {1, B} (1: a batch-shared memory, broadcast
    without copying) and S = m * L (m = 1: keys on the queries' grid; m > 1: m
    images on that grid, key j at position j % L of image j // L); sigma
    (B, H, L, 2) > 0, in tokens, float32 or q's dtype; grid (rows, cols) ints
    with rows * cols = L, tokens row-major (token i at row i // cols, column
    i % cols). For each batch b, head h, query i and key j (scale defaults to
    1/sqrt(D))::

        s_ij = scale * <q_i, k_j>                     p_i = softmax_j(s_ij)   (attention)
        l_ij = -dy_ij^2 / (2 sy_i^2) - dx_ij^2 / (2 sx_i^2),  dy = row_i - row_j, dx = col_i - col_j
        t_i  = softmax_j(l_ij)                        (Gaussian prior, normalised over the keys)
        out_i = sum_j p_ij v_j
        K_i = sum_j p (log(p+eps) - log(t+eps)) + sum_j t (log(t+eps) - log(p+eps))   (symmetric KL)
        E_i = -sum_j p log(p+eps)                      (entropy; eps = 0: exact logs)

    with sy, sx = sigma[..., 0], sigma[..., 1] (rows, columns). The prior does
    not enter ``out``: sigma acts only through K. Widths below
    ``SIGMA_MIN`` = 1e-6 tokens are raised to it (the prior is already one-hot
    there; this only removes the NaN of sigma^2 underflowing).

    ``key_padding_mask`` (1 or B, S), bool, True = ignore the key (as in
    ``nn.MultiheadAttention``): masked keys are left out of both softmaxes
    (p_ij = t_ij = 0, the prior renormalised over the unmasked keys) and of K
    and E; every row must keep a key (``check_values`` raises otherwise; without
    the check such a row is NaN). The mask and S != L run on every backend
    (``EXTENDED_BACKENDS``).

    Returns ``(out, stats)``: out (B, H, L, D) in q's dtype and a
    :class:`CorrelationStats` of (B, H, L) tensors in float32 (float64 for
    float64 inputs; None when ``need_stats`` is False, which lets kernels skip
    them). ``stats.kl_attn`` and ``stats.kl_prior`` both hold K: the gradient of
    kl_attn reaches q, k only (prior held constant), that of kl_prior reaches
    sigma only (attention held constant); ``kl_attn + kl_prior - kl_attn.detach()``
    is K with its full gradient. ``check_values`` scans the inputs for NaN/inf,
    sigma <= 0 and fully masked rows, and the output for an overflow of q.k (a
    device sync per tensor; skipped while torch.compile/export/jit.trace trace,
    and on meta tensors). ``out`` requires grad when q, k or v does,
    ``kl_attn`` and ``entropy`` when q or k does, ``kl_prior`` when sigma does,
    on every backend.

    Meta tensors (``device="meta"``: torch.compile's tracing, FSDP's meta-device
    initialisation) give results with the shapes and dtypes above and no data:
    ``backend="auto"`` uses the reference formulation there, and each kernel
    backend's op has a meta kernel.
    """
    return _run([(q, k, v, sigma)], [key_padding_mask], grid, scale, eps, backend, [need_stats], check_values)[0]


def i2correlation(q, k, v, sigma, q_ref, k_ref, v_ref, sigma_ref, grid, *, scale: Optional[float] = None,
                  eps: float = 1e-4, backend: str = "auto", need_stats=(True, True), check_values: bool = True,
                  key_padding_mask: Optional[torch.Tensor] = None, key_padding_mask_ref: Optional[torch.Tensor] = None):
    """Both I2Correlation branches in one fused call (each as :func:`correlation_attention`).

    Intra: (q, k, v, sigma) from the image's own tokens, keys masked by
    ``key_padding_mask``. Inter: queries and widths (q_ref, sigma_ref) from the
    image, keys/values (k_ref, v_ref) from the reference memory, usually with
    batch 1, masked by ``key_padding_mask_ref``. Both branches share device,
    dtype, (B, H, L) and grid; ``need_stats`` is one bool or one per branch.
    Returns an :class:`I2CorrelationResult` ``(out_intra, out_inter,
    stats_intra, stats_inter)``, which unpacks as four.
    """
    if isinstance(need_stats, bool):
        need_stats = (need_stats, need_stats)
    (oi, si), (oe, se) = _run([(q, k, v, sigma), (q_ref, k_ref, v_ref, sigma_ref)],
                              [key_padding_mask, key_padding_mask_ref], grid, scale, eps, backend,
                              [bool(x) for x in need_stats], check_values)
    return I2CorrelationResult(oi, oe, si, se)
