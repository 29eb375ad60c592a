"""``I2Correlation``: the drop-in layer (projections + both branches + fusion)."""
from __future__ import annotations

import math

import torch
from torch import nn

from .functional import correlation_attention, i2correlation


def sigma_from_logits(z: torch.Tensor) -> torch.Tensor:
    """The reference parametrisation: sigma = 3 ** (sigmoid(5 z) + 1e-5) - 1, in (0, 2]."""
    return torch.pow(3.0, torch.sigmoid(5.0 * z) + 1e-5) - 1.0


class I2Correlation(nn.Module):
    """Intra- and inter-correlation with Gaussian priors, fused as ``intra - inter``.

    ``forward(x, ref)``: x (B, L, d_model) image tokens on the ``grid``;
    ref (1 or B, L, d_model) the embedded reference memory (batch 1 is shared
    by the whole batch without copying). Returns ``(h, intra_stats, inter_stats)``
    with h (B, L, d_model) and per-branch :class:`~fod_kernels.CorrelationStats`
    of shape (B, H, L).

    ``check_values=False`` skips the NaN/inf/sigma scans of the inputs (each costs a device
    sync on GPU); shapes, dtypes and devices are always checked.

    ``out_proj=False`` reproduces the public FOD code, which computes each
    branch's output projection and then discards it (spec section 6).

    ``branches`` selects the branches, as the public code's ``with_intra`` /
    ``with_inter``: with both, ``h = intra - inter`` (the paper's
    ``(x + intra) - (x + inter)``); with one, that code's residual form
    ``h = x + branch`` (``ref`` may then be None without "inter"), only that
    branch's projections exist and the other branch's stats are None.
    """

    def __init__(self, d_model: int, n_heads: int, grid, *, d_head: int | None = None, eps: float = 1e-4,
                 backend: str = "auto", out_proj: bool = True, bias: bool = True, check_values: bool = True,
                 branches=("intra", "inter")):
        super().__init__()
        self.branches = tuple(branches)
        if not self.branches or len(set(self.branches)) != len(self.branches) or \
                set(self.branches) - {"intra", "inter"}:
            raise ValueError(f"branches must be one or both of 'intra', 'inter', got {branches!r}")
        if d_model <= 0 or n_heads <= 0:
            raise ValueError(f"d_model and n_heads must be positive, got {d_model}, {n_heads}")
        if d_head is None:
            if d_model % n_heads:
                raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}; pass d_head")
            d_head = d_model // n_heads
        self.d_model, self.n_heads, self.d_head = d_model, n_heads, d_head
        self.grid = (int(grid[0]), int(grid[1]))
        self.eps, self.backend, self.use_out_proj = eps, backend, out_proj
        self.check_values = check_values  # NaN/inf and sigma > 0 scans: one device sync per tensor
        inner = n_heads * d_head
        self.intra_q = nn.Linear(d_model, inner, bias=bias)
        self.intra_k = nn.Linear(d_model, inner, bias=bias)
        self.intra_v = nn.Linear(d_model, inner, bias=bias)
        self.intra_sigma = nn.Linear(d_model, 2 * n_heads, bias=bias)
        self.inter_q = nn.Linear(d_model, inner, bias=bias)
        self.inter_k = nn.Linear(d_model, inner, bias=bias)
        self.inter_v = nn.Linear(d_model, inner, bias=bias)
        self.inter_sigma = nn.Linear(d_model, 2 * n_heads, bias=bias)
        if out_proj:
            self.intra_out = nn.Linear(inner, d_model, bias=bias)
            self.inter_out = nn.Linear(inner, d_model, bias=bias)
        elif inner != d_model:
            raise ValueError("out_proj=False needs n_heads * d_head == d_model")
        for b in {"intra", "inter"} - set(self.branches):  # built above as the official code does (same random
            for part in ("q", "k", "v", "sigma", "out"):  # init of the kept branch), then dropped
                if hasattr(self, f"{b}_{part}"):
                    delattr(self, f"{b}_{part}")

    def _heads(self, t: torch.Tensor) -> torch.Tensor:  # (B, L, H*Dh) -> (B, H, L, Dh)
        B, L, _ = t.shape
        return t.view(B, L, self.n_heads, self.d_head).transpose(1, 2)

    def _sigma(self, lin: nn.Linear, x: torch.Tensor) -> torch.Tensor:  # (B, H, L, 2)
        B, L, _ = x.shape
        return sigma_from_logits(lin(x)).view(B, L, self.n_heads, 2).transpose(1, 2)

    def _merge(self, o: torch.Tensor) -> torch.Tensor:  # (B, H, L, Dh) -> (B, L, H*Dh)
        B, H, L, Dh = o.shape
        return o.transpose(1, 2).reshape(B, L, H * Dh)

    def forward(self, x: torch.Tensor, ref: torch.Tensor | None, need_stats=(True, True)):
        if ref is None and "inter" not in self.branches:
            ref = x  # unused without the inter branch; lets the checks below stay as they are
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must be (B, L, {self.d_model}), got {tuple(x.shape)}")
        if ref.dim() != 3 or ref.shape[-1] != self.d_model or ref.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"ref must be (1 or {x.shape[0]}, L, {self.d_model}), got {tuple(ref.shape)}")
        L = self.grid[0] * self.grid[1]
        if x.shape[1] != L or ref.shape[1] != L:
            raise ValueError(f"grid {self.grid} has {L} tokens; x has {x.shape[1]}, ref has {ref.shape[1]}")
        if len(self.branches) == 1:
            return self._one_branch(x, ref, need_stats)
        oi, oe, si, se = i2correlation(
            self._heads(self.intra_q(x)), self._heads(self.intra_k(x)), self._heads(self.intra_v(x)),
            self._sigma(self.intra_sigma, x),
            self._heads(self.inter_q(x)), self._heads(self.inter_k(ref)), self._heads(self.inter_v(ref)),
            self._sigma(self.inter_sigma, x),
            self.grid, eps=self.eps, backend=self.backend, need_stats=need_stats, check_values=self.check_values)
        oi, oe = self._merge(oi), self._merge(oe)
        if self.use_out_proj:
            oi, oe = self.intra_out(oi), self.inter_out(oe)
        return oi - oe, si, se

    def _one_branch(self, x, ref, need_stats):
        b = self.branches[0]
        src = x if b == "intra" else ref
        o, st = correlation_attention(
            self._heads(getattr(self, f"{b}_q")(x)), self._heads(getattr(self, f"{b}_k")(src)),
            self._heads(getattr(self, f"{b}_v")(src)), self._sigma(getattr(self, f"{b}_sigma"), x),
            self.grid, eps=self.eps, backend=self.backend, need_stats=need_stats[b == "inter"],
            check_values=self.check_values)
        o = self._merge(o)
        if self.use_out_proj:
            o = getattr(self, f"{b}_out")(o)
        return x + o, (st if b == "intra" else None), (st if b == "inter" else None)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, d_head={self.d_head}, grid={self.grid}, "
                f"eps={self.eps}, backend={self.backend!r}, out_proj={self.use_out_proj}, branches={self.branches}")
