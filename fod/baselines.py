"""Baselines and FOD's own ablations, on the same frozen backbone features in the same run (no extra training).

Every method gives a token score (B, L) per feature level, turned into an anomaly map exactly like FOD's:
upsampled bilinearly (align_corners=True) to the input size and averaged over the levels; the image score is
the maximum of the sigma-4 Gaussian-filtered map (``fod.metrics``).

- ``knn``: PatchCore-style: the Euclidean distance of each test token to its nearest neighbour in a memory
  bank of all training tokens of that level (the same pooled backbone features FOD sees); optionally a
  greedy coreset of the bank (``coreset`` < 1, k-center selection on a random projection, as PatchCore).
- ``memory_distance``: the Euclidean distance of each token to FOD's reference memory (the per-position mean
  of the training tokens) at the same position.
- FOD's ablations from the trained model: ``rec`` (reconstruction score only), ``inter`` (the inter-correlation
  score only; ``intra`` for a model trained without the inter branch) and their product ``rec_x_inter``,
  which is FOD's own score: its metrics equal the run's main result.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
from tqdm import tqdm

from .metrics import evaluate_maps
from .config import Config
from .data import loader
from .model import FOD, extract_features

DESCRIPTIONS = {
    "knn": "PatchCore-style nearest-neighbour distance to all training tokens of the level",
    "memory_distance": "distance to the reference memory's token at the same position",
    "rec": "FOD ablation: reconstruction score only",
    "inter": "FOD ablation: inter-correlation score only",
    "intra": "FOD ablation: intra-correlation score only",
    "rec_x_inter": "FOD's score (rec x inter); equals the main result",
    "rec_x_intra": "FOD's score of a model without the inter branch (rec x intra); equals the main result",
}


def nn_distance(queries: torch.Tensor, bank: torch.Tensor, q_chunk: int = 1024, b_chunk: int = 16384) -> torch.Tensor:
    """(Q,): the Euclidean distance of each query (Q, C) to its nearest row of ``bank`` (N, C).

    The nearest row is found with the ||q||^2 - 2 q.b + ||b||^2 expansion in chunks (no Q x N matrix), and
    its distance is then computed directly, so it is exact up to rounding for the chosen neighbour."""
    if bank.shape[0] == 0:
        raise ValueError("the memory bank is empty")
    if queries.shape[-1] != bank.shape[-1]:
        raise ValueError(f"queries have {queries.shape[-1]} channels, the bank {bank.shape[-1]}")
    bank_sq = (bank * bank).sum(1)
    out = torch.empty(queries.shape[0], dtype=queries.dtype, device=queries.device)
    for i in range(0, queries.shape[0], q_chunk):
        q = queries[i:i + q_chunk]
        q_sq = (q * q).sum(1, keepdim=True)
        best = torch.full((q.shape[0],), math.inf, dtype=q.dtype, device=q.device)
        arg = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        for j in range(0, bank.shape[0], b_chunk):
            d = q_sq - 2 * q @ bank[j:j + b_chunk].T + bank_sq[j:j + b_chunk]
            v, a = d.min(1)
            better = v < best
            best = torch.where(better, v, best)
            arg = torch.where(better, a + j, arg)
        out[i:i + q_chunk] = torch.linalg.vector_norm(q - bank[arg], dim=1)
    return out


def greedy_coreset(x: torch.Tensor, n: int, *, proj_dim: int = 128, seed: int = 0) -> torch.Tensor:
    """Indices (n,) of a greedy k-center coreset of the rows of ``x`` (N, C), as PatchCore's: start from a
    random row, then repeatedly take the row farthest from those taken, distances measured after a random
    Gaussian projection to ``proj_dim`` channels (none if C <= proj_dim)."""
    N, C = x.shape
    if not 1 <= n <= N:
        raise ValueError(f"coreset size must be in [1, {N}], got {n}")
    gen = torch.Generator().manual_seed(seed)
    z = x.float()
    if C > proj_dim:
        z = z @ (torch.randn(C, proj_dim, generator=gen) / math.sqrt(proj_dim)).to(z.device)
    idx = torch.empty(n, dtype=torch.long)
    idx[0] = int(torch.randint(N, (1,), generator=gen))
    min_d = ((z - z[idx[0]]) ** 2).sum(1)
    for i in range(1, n):
        idx[i] = int(torch.argmax(min_d))
        min_d = torch.minimum(min_d, ((z - z[idx[i]]) ** 2).sum(1))
    return idx.to(x.device)


def memory_distance(feat: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """(B, L): Euclidean distance of each token (B, L, C) to the memory's token (L, C) at the same position."""
    return torch.linalg.vector_norm(feat - memory.to(feat.dtype), dim=-1)


def coreset_size(n: int, ratio: float) -> int:
    if not 0 < ratio <= 1:
        raise ValueError(f"--knn-coreset must be in (0, 1], got {ratio}")
    return max(1, math.ceil(ratio * n))


def method_names(fod: FOD) -> list[str]:
    """The methods computed for ``fod``: the baselines, then FOD's ablations for its trained branches."""
    branch = "inter" if "inter" in fod.branches else "intra" if "intra" in fod.branches else None
    return ["knn", "memory_distance", "rec"] + ([branch, f"rec_x_{branch}"] if branch else [])


@torch.no_grad()
def compute(fod: FOD, train_ds, test_ds, cfg: Config, device: str, *, coreset: float = 1.0, log=None) -> dict:
    """Every method's metrics on ``test_ds``: {"methods": {name: {image_auroc, pixel_auroc, aupro, seconds}},
    "knn_bank": [rows per level], "knn_bank_full": [...], "coreset": ratio, "maps": {name: (N, S, S)}}.
    The backbone runs once per test batch for all methods; "seconds" is each method's own scoring time."""
    fod.eval()
    t0 = time.perf_counter()
    train_feats = extract_features(fod, train_ds, cfg, device, "knn bank")
    banks, full = [], []
    for f in train_feats:
        b = f.reshape(-1, f.shape[-1]).to(device)
        full.append(b.shape[0])
        if coreset < 1:
            b = b[greedy_coreset(b, coreset_size(b.shape[0], coreset), seed=cfg.seed)]
        banks.append(b)
    bank_seconds = time.perf_counter() - t0
    if log:
        log(f"fod baselines: knn bank {full} tokens per level" +
            (f", coreset {coreset:g} -> {[b.shape[0] for b in banks]}" if coreset < 1 else "") +
            f" ({bank_seconds:.1f} s)")
    names = method_names(fod)
    key = {"rec_x_inter": "score", "rec_x_intra": "score"}
    maps = {n: [] for n in names}
    secs = dict.fromkeys(names, 0.0)
    secs["knn"] = bank_seconds
    masks, labels, defects = [], [], []
    for batch in tqdm(loader(test_ds, cfg, cfg.batch_size), desc="baselines", unit="batch", leave=False):
        images = batch["image"].to(device)
        size = images.shape[-2:]
        feats = fod.tokens(images)
        t = time.perf_counter()
        parts = fod.score_parts(feats, amp=cfg.amp)
        fod_s = time.perf_counter() - t
        level = {n: [p[key.get(n, n)] for p in parts] for n in names if n not in ("knn", "memory_distance")}
        t = time.perf_counter()
        level["memory_distance"] = [memory_distance(f, m) for f, m in zip(feats, fod.memories)]
        md_s = time.perf_counter() - t
        t = time.perf_counter()
        level["knn"] = [nn_distance(f.reshape(-1, f.shape[-1]), b).view(f.shape[:2]) for f, b in zip(feats, banks)]
        secs["knn"] += time.perf_counter() - t
        secs["memory_distance"] += md_s
        for n in names:
            if n not in ("knn", "memory_distance"):
                secs[n] += fod_s
            maps[n].append(fod.upsample_mean(level[n], size).float().cpu().numpy())
        masks.append(batch["mask"].numpy())
        labels += batch["label"].tolist()
        defects += list(batch["defect"])
    masks = np.concatenate(masks)
    out = {"methods": {}, "knn_bank": [b.shape[0] for b in banks], "knn_bank_full": full, "coreset": coreset,
           "maps": {}}
    for n in names:
        m = np.concatenate(maps[n])
        r = evaluate_maps(m, masks, labels, defects)
        out["methods"][n] = {"image_auroc": r["image_auroc"], "pixel_auroc": r["pixel_auroc"], "aupro": r["aupro"],
                             "seconds": secs[n], "description": DESCRIPTIONS[n]}
        out["maps"][n] = m
    return out
