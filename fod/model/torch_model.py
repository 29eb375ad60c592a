"""The torch model (docs/I2CORRELATION.md section 5): one reconstruction transformer per feature level
(``LevelModel``) and the ``FOD`` bundle (backbone + level models + reference memories). The loss is in
``fod.model.loss``, the token scores in ``fod.model.anomaly_map``, the reference memory in ``fod.model.memory``.

Tokens: the backbone's (C, Hg, Wg) feature map flattened row-major to
(L = Hg*Wg, C). Both the image tokens and the reference memory are embedded by
a 1x1 projection (kaiming-normal, fan-in, leaky-relu gain; with a bias as the
official Conv1d unless ``embed_bias=False``) plus a fixed 2-D sine-cosine
position embedding. Each encoder layer is

    h = intra - inter                 (fod_kernels.I2Correlation)
    y = x = norm1(h)
    out = norm2(x + mlp(y))           (mlp: d -> 4d -> d, GELU)

and the encoder ends with a LayerNorm and a Linear back to C channels.

Branch ablations (``--no-intra`` / ``--no-inter``, the official code's with_intra / with_inter):
with one branch a layer is ``h = x + branch`` and only that branch's loss terms are trained; the
token score is rec * inter_score with the inter branch, rec * softmax_L(-K_intra) with the intra
branch only (the official code's choice), and rec alone with neither branch (then each layer is
plain self-attention, ``h = x + attention``, as in the official code).
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from fod_kernels import I2Correlation

from ..backbone import Backbone
from ..config import Config
from ..data import Preprocess
from .anomaly_map import SCORES, inter_score, intra_score, rec_score, token_scores


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
    def __init__(self, in_ch: int, d_model: int, grid, bias: bool = True):
        super().__init__()
        self.proj = nn.Linear(in_ch, d_model, bias=bias)  # the 1x1 projection (official: Conv1d with a bias)
        nn.init.kaiming_normal_(self.proj.weight, mode="fan_in", nonlinearity="leaky_relu")
        self.register_buffer("pos", sincos_2d(d_model, *grid), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, C) -> (B, L, d)
        return self.proj(x) + self.pos.to(x.dtype)


class EncoderLayer(nn.Module):
    def __init__(self, d_model: int, n_heads: int, grid, *, backend: str, out_proj: bool, eps: float = 1e-4,
                 branches=("intra", "inter")):
        super().__init__()
        self.attn = I2Correlation(d_model, n_heads, grid, eps=eps, backend=backend, out_proj=out_proj,
                                  branches=branches or ("intra",))  # no branch: plain self-attention
        self.norm1 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, x, ref, need_stats=(True, True)):
        h, si, se = self.attn(x, ref, need_stats=need_stats)
        x = self.norm1(h)  # the paper's (x + intra) - (x + inter)
        return self.norm2(x + self.mlp(x)), si, se


class LevelModel(nn.Module):
    """``forward(feat (B,L,C), memory (L,C)) -> (recon (B,L,C), [intra stats], [inter stats])`` per layer.

    ``branches``: the trained correlation branches (a subset of ("intra", "inter")); the stats list of a
    branch that is not trained is None. Without "inter" there is no reference embedding and ``memory``
    is not used."""

    def __init__(self, in_ch: int, grid, d_model: int = 256, n_heads: int = 8, n_layers: int = 3, *,
                 backend: str = "auto", out_proj: bool = True, eps: float = 1e-4, branches=("intra", "inter"),
                 embed_bias: bool = True):
        super().__init__()
        self.grid = (int(grid[0]), int(grid[1]))
        self.branches = tuple(branches)
        self.embed = Embedding(in_ch, d_model, self.grid, embed_bias)
        if "inter" in self.branches:
            self.embed_ref = Embedding(in_ch, d_model, self.grid, embed_bias)
        self.layers = nn.ModuleList(EncoderLayer(d_model, n_heads, self.grid, backend=backend, out_proj=out_proj,
                                                 eps=eps, branches=self.branches) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, in_ch)

    def set_backend(self, backend: str):
        for layer in self.layers:
            layer.attn.backend = backend

    @property
    def score_stats(self) -> tuple:
        """need_stats for scoring: the inter stats if there is that branch, else the intra stats if any."""
        return ("inter" not in self.branches and "intra" in self.branches, "inter" in self.branches)

    def forward(self, feat: torch.Tensor, memory: torch.Tensor, need_stats=(True, True)):
        need = (need_stats[0] and "intra" in self.branches, need_stats[1] and "inter" in self.branches)
        x = self.embed(feat)
        ref = None
        if "inter" in self.branches:
            if memory.dim() == 2:
                memory = memory.unsqueeze(0)  # a batch-1 memory, shared by the batch without copying
            ref = self.embed_ref(memory)
        intra, inter = [], []
        for layer in self.layers:
            x, si, se = layer(x, ref, need)
            intra.append(si)
            inter.append(se)
        return self.head(self.norm(x)), intra if need[0] else None, inter if need[1] else None


def default_d_model(L: int) -> int:
    """The reference's widths: 256 for the 32x32 level, 512 for the 16x16 level."""
    return 256 if L >= 1024 else 512


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
        self.branches = tuple(b for b, on in (("intra", cfg.with_intra), ("inter", cfg.with_inter)) if on)
        self.models = nn.ModuleList(
            LevelModel(c, g, d, cfg.n_heads, cfg.n_layers, backend=cfg.backend, out_proj=not cfg.compat_official,
                       eps=cfg.eps, branches=self.branches, embed_bias=cfg.embed_bias)
            for c, g, d in zip(backbone.channels, self.grids, dms))
        self.memories = list(memories) if memories is not None else None

    def set_backend(self, name: str):
        for m in self.models:
            m.set_backend(name)

    def preprocess(self):
        """The image preprocessing this model was trained with (size, resize, interpolation, normalisation)."""
        c = self.cfg
        return Preprocess(c.image_size, c.resize, c.interpolation, self.backbone.mean, self.backbone.std)

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

    @property
    def score_description(self) -> str:
        return SCORES[self.branches]

    @torch.no_grad()
    def score_parts(self, feats, amp: bool = False) -> list[dict]:
        """Per level, the token-level parts of the score, each (B, L): "rec", "inter" or "intra" (the
        branch that scores), and "score" (their product, token_scores)."""
        parts = []
        for feat, model, mem in zip(feats, self.models, self.memories):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                out, intra, inter = model(feat, mem, need_stats=model.score_stats)
            intra, inter = ([type(t)(*(x.float() for x in t)) for t in st] if st is not None else None
                            for st in (intra, inter))
            out = out.float()
            p = {"rec": rec_score(out, feat), "score": token_scores(out, feat, inter, intra)}
            if inter is not None:
                p["inter"] = inter_score(inter)
            elif intra is not None:
                p["intra"] = intra_score(intra)
            parts.append(p)
        return parts

    def upsample_mean(self, level_scores, size) -> torch.Tensor:
        """(B, S, S): token scores [(B, L)] per level upsampled bilinearly (align_corners) and averaged."""
        return torch.stack([F.interpolate(s.reshape(-1, 1, *g), size=size, mode="bilinear", align_corners=True)[:, 0]
                            for s, g in zip(level_scores, self.grids)]).mean(0)

    @torch.no_grad()
    def anomaly_maps(self, images: torch.Tensor, amp: bool = False) -> torch.Tensor:
        """(B, S, S) anomaly maps: per level the token score (rec_score * inter_score), upsampled, averaged."""
        parts = self.score_parts(self.tokens(images), amp)
        return self.upsample_mean([p["score"] for p in parts], images.shape[-2:])
