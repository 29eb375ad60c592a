"""``I2Correlation``: the drop-in layer (projections + both branches + fusion)."""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn
from torch.nn import functional as F

from ._validate import parse_grid
from .functional import correlation_attention, i2correlation


def sigma_from_logits(z: torch.Tensor, sigma_max: float = 2.0) -> torch.Tensor:
    """Prior widths in tokens from unbounded logits: sigma = (1 + sigma_max) ** (sigmoid(5 z) + 1e-5) - 1.

    With the default sigma_max = 2 this is the reference parametrisation 3 ** (sigmoid(5 z) + 1e-5) - 1,
    bit for bit. sigma is increasing in z, from (1 + sigma_max) ** 1e-5 - 1 (about 1e-5 * ln(1 + sigma_max)
    tokens: a one-hot prior) to (1 + sigma_max) ** 1.00001 - 1 (sigma_max, exceeded by less than 5e-5
    relative up to sigma_max = 100); z = 0 gives (1 + sigma_max) ** 0.50001 - 1 (0.73 tokens at the
    default). Compute it in float32: in bfloat16, 3 ** 1e-5 rounds to 1 and sigma to 0.
    """
    return torch.pow(1.0 + sigma_max, torch.sigmoid(5.0 * z) + 1e-5) - 1.0


class I2Correlation(nn.Module):
    """Intra- and inter-correlation with Gaussian priors, fused as ``intra - inter``.

    The layer of FOD (Yao et al., ICCV 2023) as a drop-in module: x attends to
    itself (intra) and to a reference memory (inter), each attention row is
    compared with a Gaussian prior centred on the query's own grid position,
    and the output is ``intra_out - inter_out``. See :meth:`forward` for the
    inputs and outputs, :func:`fod_kernels.correlation_attention` for the
    formulas.

    Arguments: ``grid`` (rows, cols) of ints, the token grid (tokens row-major:
    token i at row i // cols, column i % cols, as a (B, C, rows, cols) feature
    map's ``flatten(2).transpose(1, 2)``); ``d_head`` (default d_model //
    n_heads); ``sigma_max`` the widest prior in tokens (default 2, the
    reference's: a standard deviation of at most 2 tokens, along each axis 95% of the prior
    within +-4 tokens of the query on any grid; raise it for priors that should
    reach further); ``eps`` the smoothing
    inside the KL's logs; ``backend`` (see ``fod_kernels.available_backends()``);
    ``out_proj=False`` reproduces the public FOD code, which computes each
    branch's output projection and then discards it (spec section 6);
    ``check_values=False`` skips the NaN/inf/sigma scans of the inputs (each
    costs a device sync on GPU); shapes, dtypes and devices are always checked.

    Mixed precision: the widths sigma are always computed in float32 (their
    logits too), also in a ``.bfloat16()``/``.half()`` module and under
    ``torch.autocast``; q, k, v and the output take the module's (or
    autocast's) dtype, the statistics are float32.

    ``branches`` selects the branches, as the public code's ``with_intra`` /
    ``with_inter``: with both, ``h = intra - inter`` (the paper's
    ``(x + intra) - (x + inter)``); with one, that code's residual form
    ``h = x + branch`` (``ref`` may then be None without "inter"), only that
    branch's projections exist and the other branch's stats are None.
    """

    def __init__(self, d_model: int, n_heads: int, grid, *, d_head: int | None = None, eps: float = 1e-4,
                 backend: str = "auto", out_proj: bool = True, bias: bool = True, check_values: bool = True,
                 sigma_max: float = 2.0, branches=("intra", "inter")):
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
        if not (isinstance(sigma_max, (int, float)) and math.isfinite(sigma_max) and sigma_max > 0):
            raise ValueError(f"sigma_max must be a finite number of tokens > 0, got {sigma_max!r}")
        self.d_model, self.n_heads, self.d_head = d_model, n_heads, d_head
        self.grid = parse_grid(grid)
        self.eps, self.backend, self.use_out_proj = eps, backend, out_proj
        self.sigma_max = float(sigma_max)
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

    def _sigma(self, lin: nn.Linear, x: torch.Tensor) -> torch.Tensor:  # (B, H, L, 2), float32 (float64 in float64)
        B, L, _ = x.shape
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        no_autocast = torch.autocast(x.device.type, enabled=False) if torch.amp.is_autocast_available(
            x.device.type) else contextlib.nullcontext()  # meta tensors: no autocast exists
        with no_autocast:
            z = F.linear(x.to(dt), lin.weight.to(dt), None if lin.bias is None else lin.bias.to(dt))
        return sigma_from_logits(z, self.sigma_max).view(B, L, self.n_heads, 2).transpose(1, 2)

    def _merge(self, o: torch.Tensor) -> torch.Tensor:  # (B, H, L, Dh) -> (B, L, H*Dh)
        B, H, L, Dh = o.shape
        return o.transpose(1, 2).reshape(B, L, H * Dh)

    def forward(self, x: torch.Tensor, ref: torch.Tensor | None, need_stats=(True, True), *,
                key_padding_mask: torch.Tensor | None = None, key_padding_mask_ref: torch.Tensor | None = None):
        """``(h, intra_stats, inter_stats) = layer(x, ref)``.

        x (B, L, d_model): the image's tokens, L = rows * cols, row-major on
        the grid. ref (1 or B, S, d_model): the embedded reference memory,
        S = m * L for m reference images on the same grid (m = 1 usual); a
        batch-1 memory is shared by the whole batch without copying.

        Returns h (B, L, d_model) = intra_out - inter_out, and for each branch
        a :class:`~fod_kernels.CorrelationStats` of (B, H, L) float32 tensors
        (None for a branch whose ``need_stats`` entry is False, the inference
        path): ``kl_attn`` and ``kl_prior`` hold the same symmetric KL K
        between the attention rows and the Gaussian priors, with gradients to
        the attention (q, k projections) only and to the widths (sigma
        projection) only respectively; ``entropy`` is the attention rows'
        entropy. ``kl_attn + kl_prior - kl_attn.detach()`` is K with its full
        gradient. FOD's loss (per branch, means over batch and tokens) is
        ``rec + l1 * (K_intra.kl_prior - K_inter.kl_prior)
        - l1 * (K_intra.kl_attn - K_inter.kl_attn) - l2 * (E_intra - E_inter)``:
        a minimax that is right for FOD's anomaly scores, not a regulariser
        for any model (see the README).

        ``key_padding_mask`` (1 or B, L) and ``key_padding_mask_ref`` (1 or B,
        S), bool, True = ignore that key, mask the intra and inter branch's
        keys (every backend: functional.EXTENDED_BACKENDS).

        With one branch (``branches``), h = x + branch_out and ``ref`` may be
        None when that branch is "intra".
        """
        if ref is None and "inter" not in self.branches:
            ref = x  # unused without the inter branch; lets the checks below stay as they are
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must be (B, L, {self.d_model}), got {tuple(x.shape)}")
        if ref.dim() != 3 or ref.shape[-1] != self.d_model or (ref.shape[0] != 1 and ref.shape[0] != x.shape[0]):
            raise ValueError(f"ref must be (1 or {x.shape[0]}, S, {self.d_model}), got {tuple(ref.shape)}")
        L = self.grid[0] * self.grid[1]
        if x.shape[1] != L or ref.shape[1] % L != 0:
            raise ValueError(f"grid (rows, cols) = {self.grid} has {L} tokens (row-major); x must have L={L} "
                             f"tokens and ref a multiple of {L} (m images on the grid); x has {x.shape[1]}, "
                             f"ref has {ref.shape[1]}")
        if len(self.branches) == 1:
            return self._one_branch(x, ref, need_stats, key_padding_mask, key_padding_mask_ref)
        oi, oe, si, se = i2correlation(
            self._heads(self.intra_q(x)), self._heads(self.intra_k(x)), self._heads(self.intra_v(x)),
            self._sigma(self.intra_sigma, x),
            self._heads(self.inter_q(x)), self._heads(self.inter_k(ref)), self._heads(self.inter_v(ref)),
            self._sigma(self.inter_sigma, x),
            self.grid, eps=self.eps, backend=self.backend, need_stats=need_stats, check_values=self.check_values,
            key_padding_mask=key_padding_mask, key_padding_mask_ref=key_padding_mask_ref)
        oi, oe = self._merge(oi), self._merge(oe)
        if self.use_out_proj:
            oi, oe = self.intra_out(oi), self.inter_out(oe)
        return oi - oe, si, se

    def _one_branch(self, x, ref, need_stats, key_padding_mask, key_padding_mask_ref):
        b = self.branches[0]
        src = x if b == "intra" else ref
        o, st = correlation_attention(
            self._heads(getattr(self, f"{b}_q")(x)), self._heads(getattr(self, f"{b}_k")(src)),
            self._heads(getattr(self, f"{b}_v")(src)), self._sigma(getattr(self, f"{b}_sigma"), x),
            self.grid, eps=self.eps, backend=self.backend, need_stats=need_stats[b == "inter"],
            check_values=self.check_values, key_padding_mask=key_padding_mask if b == "intra" else key_padding_mask_ref)
        o = self._merge(o)
        if self.use_out_proj:
            o = getattr(self, f"{b}_out")(o)
        return x + o, (st if b == "intra" else None), (st if b == "inter" else None)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, d_head={self.d_head}, grid={self.grid}, "
                f"sigma_max={self.sigma_max}, eps={self.eps}, backend={self.backend!r}, out_proj={self.use_out_proj}, "
                f"branches={self.branches}")
