"""Anomaly Transformer (Xu et al., "Anomaly Transformer: Time Series Anomaly Detection with Association
Discrepancy", ICLR 2022) with its Anomaly-Attention computed by the fused I2Correlation operator.

The official model (thuml/Anomaly-Transformer) materialises, per layer, the B x H x L x L series
(attention) and prior matrices. Its Anomaly-Attention is one correlation branch on a (1, L) grid:

    series_i = softmax_j(<q_i, k_j> / sqrt(E))          prior_i = softmax_j(-(i - j)^2 / (2 sigma_i^2))
    sigma_i  = 3 ** (sigmoid(5 z_i) + 1e-5) - 1         (z: a linear map of the layer input, one per head)

and its association discrepancy per row is the symmetric KL with 1e-4 inside the logs, which the
operator returns as ``kl_attn`` (gradient to q, k: the official prior is detached) and ``kl_prior``
(gradient to sigma: the series is detached). No L x L tensor exists here: memory is linear in L.

Module and parameter names follow the official code, so its ``state_dict`` loads with ``strict=True``
(including the unused ``attention.norm`` LayerNorm it creates and the 5,000-row positional table).
docs/ANOMALY_TRANSFORMER.md has the correspondence, the loss and the measurements.
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import nn
from torch.nn import functional as F

from ..functional import CorrelationStats, correlation_attention
from ..module import sigma_from_logits

OFFICIAL_MAX_LEN = 5000  # the official positional table's length (its largest window)
KL_EPS = 1e-4            # the official my_kl_loss's smoothing inside the logs


class PositionalEmbedding(nn.Module):
    """The fixed sine-cosine table ``pe`` (1, max_len, d_model): sin at even channels, cos at odd ones."""

    def __init__(self, d_model: int, max_len: int = OFFICIAL_MAX_LEN):
        super().__init__()
        position = torch.arange(max_len, dtype=torch.float32).unsqueeze(1)
        freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * -(math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, d_model)
        pe[:, 0::2] = torch.sin(position * freq)
        pe[:, 1::2] = torch.cos(position * freq[: d_model // 2])
        self.register_buffer("pe", pe.unsqueeze(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pe[:, : x.size(1)]


class TokenEmbedding(nn.Module):
    """A width-3 circular Conv1d over time without bias (Kaiming-normal, fan-in, leaky-ReLU gain)."""

    def __init__(self, c_in: int, d_model: int):
        super().__init__()
        self.tokenConv = nn.Conv1d(c_in, d_model, kernel_size=3, padding=1, padding_mode="circular", bias=False)
        nn.init.kaiming_normal_(self.tokenConv.weight, mode="fan_in", nonlinearity="leaky_relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, C) -> (B, L, d_model)
        return self.tokenConv(x.transpose(1, 2)).transpose(1, 2)


class DataEmbedding(nn.Module):
    def __init__(self, c_in: int, d_model: int, dropout: float = 0.0, max_len: int = OFFICIAL_MAX_LEN):
        super().__init__()
        self.value_embedding = TokenEmbedding(c_in, d_model)
        self.position_embedding = PositionalEmbedding(d_model, max_len)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.value_embedding(x) + self.position_embedding(x))


class AttentionLayer(nn.Module):
    """Projections of one Anomaly-Attention layer; the attention itself is one operator call.

    ``norm`` is never applied: the official layer creates it and leaves it unused; it is kept so that
    official checkpoints load strictly."""

    def __init__(self, d_model: int, n_heads: int, backend: str = "auto"):
        super().__init__()
        d_head = d_model // n_heads
        self.norm = nn.LayerNorm(d_model)
        self.query_projection = nn.Linear(d_model, d_head * n_heads)
        self.key_projection = nn.Linear(d_model, d_head * n_heads)
        self.value_projection = nn.Linear(d_model, d_head * n_heads)
        self.sigma_projection = nn.Linear(d_model, n_heads)
        self.out_projection = nn.Linear(d_head * n_heads, d_model)
        self.n_heads, self.backend = n_heads, backend

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, CorrelationStats]:
        B, L, _ = x.shape
        H = self.n_heads
        q, k, v = (p(x).view(B, L, H, -1).transpose(1, 2) for p in
                   (self.query_projection, self.key_projection, self.value_projection))
        # The official width, one per (head, time step), as the column width of a (1, L) grid; the row width
        # never acts there (every row distance is 0), so it is set to 1.
        z = self.sigma_projection(x)
        z = z if z.dtype in (torch.float32, torch.float64) else z.float()  # 3 ** 1e-5 rounds to 1 in 16 bits
        width = sigma_from_logits(z, 2.0).transpose(1, 2)  # (B, H, L)
        sigma = torch.stack((torch.ones_like(width), width), dim=-1)
        out, stats = correlation_attention(q, k, v, sigma, (1, L), eps=KL_EPS, backend=self.backend)
        return self.out_projection(out.transpose(1, 2).reshape(B, L, -1)), stats


class EncoderLayer(nn.Module):
    def __init__(self, attention: AttentionLayer, d_model: int, d_ff: int, dropout: float, activation: str):
        super().__init__()
        self.attention = attention
        self.conv1 = nn.Conv1d(d_model, d_ff, kernel_size=1)
        self.conv2 = nn.Conv1d(d_ff, d_model, kernel_size=1)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.activation = F.relu if activation == "relu" else F.gelu

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, CorrelationStats]:
        new_x, stats = self.attention(x)
        x = self.norm1(x + self.dropout(new_x))
        y = self.dropout(self.activation(self.conv1(x.transpose(1, 2))))
        y = self.dropout(self.conv2(y).transpose(1, 2))
        return self.norm2(x + y), stats


class Encoder(nn.Module):
    def __init__(self, attn_layers, norm_layer: nn.Module):
        super().__init__()
        self.attn_layers = nn.ModuleList(attn_layers)
        self.norm = norm_layer

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[CorrelationStats]]:
        stats = []
        for layer in self.attn_layers:
            x, st = layer(x)
            stats.append(st)
        return self.norm(x), stats


class AnomalyTransformer(nn.Module):
    """Anomaly Transformer with the official parameter names; ``out, stats = model(x)``.

    x (B, L, enc_in) with L <= the positional table (max(5000, win_size) steps; the official model needs
    L == win_size, this one takes any L up to the table). Returns the reconstruction (B, L, c_out) and one
    :class:`~fod_kernels.CorrelationStats` per layer, each field (B, H, L): ``kl_attn`` and ``kl_prior``
    the association discrepancy (symmetric KL of series and prior rows, 1e-4 in the logs) with the
    gradient routes of the official detaches, ``entropy`` the series rows' entropy (unused by the model).

    ``dropout`` acts where the official code puts it (embedding, attention output, feed-forward) except on
    the attention probabilities, which the fused operator never materialises; the official default, and
    every official script, use dropout = 0, where the two are equal. ``backend``: the operator's backend
    (``fod_kernels.available_backends()``; "auto" picks the fused one of the device).
    """

    def __init__(self, win_size: int, enc_in: int, c_out: int, d_model: int = 512, n_heads: int = 8,
                 e_layers: int = 3, d_ff: int = 512, dropout: float = 0.0, activation: str = "gelu",
                 backend: str = "auto"):
        super().__init__()
        for name, val in (("win_size", win_size), ("enc_in", enc_in), ("c_out", c_out), ("d_model", d_model),
                          ("n_heads", n_heads), ("e_layers", e_layers), ("d_ff", d_ff)):
            if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        if activation not in ("gelu", "relu"):
            raise ValueError(f"activation must be 'gelu' or 'relu', got {activation!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if dropout > 0:
            warnings.warn("AnomalyTransformer: dropout is not applied to the attention probabilities (the official "
                          "code drops them, the fused operator cannot); elsewhere it acts as in the official code",
                          stacklevel=2)
        self.win_size = win_size
        self.embedding = DataEmbedding(enc_in, d_model, dropout, max_len=max(OFFICIAL_MAX_LEN, win_size))
        self.encoder = Encoder([EncoderLayer(AttentionLayer(d_model, n_heads, backend), d_model, d_ff, dropout,
                                             activation) for _ in range(e_layers)], nn.LayerNorm(d_model))
        self.projection = nn.Linear(d_model, c_out)

    def set_backend(self, backend: str) -> None:
        for layer in self.encoder.attn_layers:
            layer.attention.backend = backend

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[CorrelationStats]]:
        if x.dim() != 3:
            raise ValueError(f"x must be (batch, time, channels), got shape {tuple(x.shape)}")
        table = self.embedding.position_embedding.pe.shape[1]
        if x.shape[1] > table:
            raise ValueError(f"a window of {x.shape[1]} steps is longer than the positional table ({table}); "
                             f"build the model with win_size >= {x.shape[1]}")
        h, stats = self.encoder(self.embedding(x))
        return self.projection(h), stats

    def energy(self, x: torch.Tensor, temperature: float = 50.0) -> torch.Tensor:
        """The official anomaly criterion per time step (B, L); see :func:`anomaly_energy`."""
        out, stats = self(x)
        return anomaly_energy(x, out, stats, temperature)


def association_discrepancy(stats: list[CorrelationStats]) -> torch.Tensor:
    """(B, L): the symmetric KL of each time step, averaged over heads and summed over layers (the official
    test code's ``series_loss + prior_loss`` before its temperature)."""
    return sum(s.kl_attn.mean(dim=1) for s in stats)


def anomaly_energy(x: torch.Tensor, out: torch.Tensor, stats: list[CorrelationStats],
                   temperature: float = 50.0) -> torch.Tensor:
    """The official test-time criterion (B, L): softmax over the window of -discrepancy * temperature, times
    each step's mean squared reconstruction error over the channels."""
    mse = (x - out).pow(2).mean(dim=-1)
    return torch.softmax(-association_discrepancy(stats) * temperature, dim=-1) * mse


def anomaly_transformer_loss(x: torch.Tensor, out: torch.Tensor, stats: list[CorrelationStats],
                             k: float = 3.0) -> torch.Tensor:
    """One scalar whose backward gives the official minimax update (both backward passes summed).

    The official step backpropagates loss1 = rec - k * series_loss (prior detached) and then
    loss2 = rec + k * prior_loss (series detached) before one optimiser step, with rec the MSE and
    series_loss, prior_loss the mean symmetric KL over batch, heads, steps and layers. ``kl_attn``
    carries the first route and ``kl_prior`` the second, so loss1 + loss2 (returned) has exactly that
    gradient. Its value is 2 * rec (both discrepancies have the same value); the official training loss
    log, loss1, is ``rec - k * association_discrepancy(stats).mean() / len(stats)``.
    """
    rec = F.mse_loss(out, x)
    series = torch.stack([s.kl_attn.mean() for s in stats]).mean()
    prior = torch.stack([s.kl_prior.mean() for s in stats]).mean()
    return 2 * rec - k * series + k * prior
