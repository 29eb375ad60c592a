"""The FOD model (docs/I2CORRELATION.md section 5): one reconstruction transformer per feature level,
the loss, the token scores, and the ``FOD`` bundle (backbone + level models + reference memories).

Tokens: the backbone's (C, Hg, Wg) feature map flattened row-major to
(L = Hg*Wg, C). Both the image tokens and the reference memory are embedded by
a 1x1 projection (kaiming-normal, fan-in, leaky-relu gain, no bias) plus a
fixed 2-D sine-cosine position embedding. Each encoder layer is

    h = intra - inter                 (fod_kernels.I2Correlation)
    y = x = norm1(h)
    out = norm2(x + mlp(y))           (mlp: d -> 4d -> d, GELU)

and the encoder ends with a LayerNorm and a Linear back to C channels.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from fod_kernels import I2Correlation

from .backbone import Backbone
from .config import Config


def sincos_2d(d_model: int, rows: int, cols: int) -> torch.Tensor:
    """(rows*cols, d_model): the first half of the channels encodes the column, the second half the row."""
    if d_model % 4:
        raise ValueError(f"d_model must be a multiple of 4 for the 2-D sine-cosine embedding, got {d_model}")
    half = d_model // 2

    def encode(pos):  # (N,) -> (N, half): interleaved sin/cos, as the 1-D transformer embedding
        div = torch.exp(torch.arange(0, half, 2, dtype=torch.float64) * (-math.log(10000.0) / half))
        pe = torch.zeros(pos.numel(), half, dtype=torch.float64)
        pe[:, 0::2] = torch.sin(pos[:, None] * div)
        pe[:, 1::2] = torch.cos(pos[:, None] * div)
        return pe

    idx = torch.arange(rows * cols, dtype=torch.float64)
    row, col = torch.div(idx, cols, rounding_mode="floor"), idx % cols
    return torch.cat([encode(col), encode(row)], dim=1).float()


class Embedding(nn.Module):
    def __init__(self, in_ch: int, d_model: int, grid):
        super().__init__()
        self.proj = nn.Linear(in_ch, d_model, bias=False)  # the 1x1 projection
        nn.init.kaiming_normal_(self.proj.weight, mode="fan_in", nonlinearity="leaky_relu")
        self.register_buffer("pos", sincos_2d(d_model, *grid), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, C) -> (B, L, d)
        return self.proj(x) + self.pos.to(x.dtype)


class EncoderLayer(nn.Module):
    def __init__(self, d_model: int, n_heads: int, grid, *, backend: str, out_proj: bool, eps: float = 1e-4):
        super().__init__()
        self.attn = I2Correlation(d_model, n_heads, grid, eps=eps, backend=backend, out_proj=out_proj)
        self.norm1 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, x, ref, need_stats=(True, True)):
        h, si, se = self.attn(x, ref, need_stats=need_stats)
        x = self.norm1(h)  # the paper's (x + intra) - (x + inter)
        return self.norm2(x + self.mlp(x)), si, se


class LevelModel(nn.Module):
    """``forward(feat (B,L,C), memory (L,C)) -> (recon (B,L,C), [intra stats], [inter stats])`` per layer."""

    def __init__(self, in_ch: int, grid, d_model: int = 256, n_heads: int = 8, n_layers: int = 3, *,
                 backend: str = "auto", out_proj: bool = True, eps: float = 1e-4):
        super().__init__()
        self.grid = (int(grid[0]), int(grid[1]))
        self.embed = Embedding(in_ch, d_model, self.grid)
        self.embed_ref = Embedding(in_ch, d_model, self.grid)
        self.layers = nn.ModuleList(EncoderLayer(d_model, n_heads, self.grid, backend=backend, out_proj=out_proj,
                                                 eps=eps) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, in_ch)

    def set_backend(self, backend: str):
        for layer in self.layers:
            layer.attn.backend = backend

    def forward(self, feat: torch.Tensor, memory: torch.Tensor, need_stats=(True, True)):
        if memory.dim() == 2:
            memory = memory.unsqueeze(0)  # a batch-1 memory, shared by the batch without copying
        x = self.embed(feat)
        ref = self.embed_ref(memory)
        intra, inter = [], []
        for layer in self.layers:
            x, si, se = layer(x, ref, need_stats)
            intra.append(si)
            inter.append(se)
        return self.head(self.norm(x)), intra, inter


def default_d_model(L: int) -> int:
    """The reference's widths: 256 for the 32x32 level, 512 for the 16x16 level."""
    return 256 if L >= 1024 else 512


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
    """
    rec = reconstruction_loss(out, x)
    ki_a, ki_p, ei = (_mean_stat(intra, f) for f in ("kl_attn", "kl_prior", "entropy"))
    ke_a, ke_p, ee = (_mean_stat(inter, f) for f in ("kl_attn", "kl_prior", "entropy"))
    loss = (2 * rec + lambda1 * ki_p - lambda1 * ke_p
            - lambda1 * ki_a - lambda2 * ei + lambda1 * ke_a + lambda2 * ee)
    return loss, {"rec": rec.detach(), "k_intra": ki_a.detach(), "k_inter": ke_a.detach()}


def token_scores(out: torch.Tensor, x: torch.Tensor, inter) -> torch.Tensor:
    """Per-token anomaly score (B, L): rec_score * inter_score (spec section 5)."""
    rec = torch.mean((out - x) ** 2, dim=-1) + 1 - torch.cosine_similarity(out, x, dim=-1)
    k = torch.stack([s.kl_attn for s in inter]).mean(dim=(0, 2))  # mean over layers and heads -> (B, L)
    att = torch.softmax(-k, dim=-1)
    inter_score = att.max(dim=-1, keepdim=True).values - att
    return rec * inter_score


# ----------------------------------------------------------------------------- the model bundle

def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete kernel backend for ``backend`` ("auto" included) on ``device``; raises if it cannot run."""
    from fod_kernels._backends import resolve_backend as _resolve
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return _resolve(backend, device)


class FOD(nn.Module):
    """Backbone + one reconstruction model per level + the reference memories."""

    def __init__(self, cfg: Config, backbone: Backbone, grids, memories=None):
        super().__init__()
        self.cfg, self.backbone, self.grids = cfg, backbone, [tuple(g) for g in grids]
        dms = cfg.d_model or [default_d_model(g[0] * g[1]) for g in self.grids]
        if len(dms) != len(self.grids):
            raise ValueError(f"--d-model gives {len(dms)} widths for {len(self.grids)} levels")
        self.d_models = list(dms)
        self.models = nn.ModuleList(
            LevelModel(c, g, d, cfg.n_heads, cfg.n_layers, backend=cfg.backend, out_proj=not cfg.compat_official,
                       eps=cfg.eps)
            for c, g, d in zip(backbone.channels, self.grids, dms))
        self.memories = list(memories) if memories is not None else None

    def set_backend(self, name: str):
        for m in self.models:
            m.set_backend(name)

    @property
    def backend(self) -> str:
        return self.models[0].layers[0].attn.backend

    def to_device(self, device: str) -> "FOD":
        """Move everything (memories included) to ``device`` and resolve the configured backend there."""
        self.to(device)
        if self.memories is not None:
            self.memories = [m.to(device) for m in self.memories]
        self.set_backend(resolve_backend(self.cfg.backend, torch.device(device)))
        return self

    def tokens(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Backbone features as tokens: [(B, L, C)] per level."""
        return [f.flatten(2).transpose(1, 2).contiguous() for f in self.backbone(images)]

    @torch.no_grad()
    def anomaly_maps(self, images: torch.Tensor, amp: bool = False) -> torch.Tensor:
        """(B, S, S) anomaly maps: per level rec_score * inter_score, upsampled, averaged over levels."""
        size = images.shape[-2:]
        maps = []
        for feat, model, mem, g in zip(self.tokens(images), self.models, self.memories, self.grids):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                out, _, inter = model(feat, mem, need_stats=(False, True))
            s = token_scores(out.float(), feat, [type(t)(*(x.float() for x in t)) for t in inter])
            s = s.view(-1, 1, *g)
            maps.append(F.interpolate(s, size=size, mode="bilinear", align_corners=True)[:, 0])
        return torch.stack(maps).mean(0)


def loader(ds, cfg: Config, batch_size: int):
    """The evaluation-order (unshuffled) DataLoader of a dataset."""
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=cfg.num_workers)


@torch.no_grad()
def extract_features(fod: FOD, ds, cfg: Config, device: str, desc: str) -> list[torch.Tensor]:
    """The tokens of every image of ``ds``, per level: [(N, L, C)] on the CPU."""
    feats = None
    for batch in tqdm(loader(ds, cfg, cfg.batch_size), desc=desc, unit="batch", leave=False):
        toks = [t.cpu() for t in fod.tokens(batch["image"].to(device))]
        feats = [[t] for t in toks] if feats is None else [f + [t] for f, t in zip(feats, toks)]
    return [torch.cat(f) for f in feats]


@torch.no_grad()
def reference_memory(fod: FOD, ds, cfg: Config, device: str, cached=None) -> list[torch.Tensor]:
    """Per-position mean of the training features per level: [(L, C)]."""
    if cached is not None:
        return [f.mean(0) for f in cached]
    sums, n = None, 0
    for batch in tqdm(loader(ds, cfg, cfg.batch_size), desc="memory", unit="batch", leave=False):
        toks = fod.tokens(batch["image"].to(device))
        sums = [t.sum(0) for t in toks] if sums is None else [s + t.sum(0) for s, t in zip(sums, toks)]
        n += toks[0].shape[0]
    return [(s / n).cpu() for s in sums]
