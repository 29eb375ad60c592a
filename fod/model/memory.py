"""The training features of a dataset and the reference memory (their per-position mean per level)."""
from __future__ import annotations

import torch
from tqdm import tqdm

from ..config import Config
from ..data import loader
from .torch_model import FOD


@torch.no_grad()
def extract_features(fod: FOD, ds, cfg: Config, device: str, desc: str) -> list[torch.Tensor]:
    """The tokens of every image of ``ds``, per level: [(N, L, C)] on the CPU."""
    feats = None
    for batch in tqdm(loader(ds, cfg, cfg.batch_size), desc=desc, unit="batch", leave=False):
        toks = [t.cpu() for t in fod.tokens(batch["image"].to(device))]
        feats = [[t] for t in toks] if feats is None else [f + [t] for f, t in zip(feats, toks)]
    return [torch.cat(f) for f in feats]


@torch.no_grad()
def reference_memory(fod: FOD, ds, cfg: Config, device: str, cached=None, reduce=None) -> list[torch.Tensor]:
    """Per-position mean of the training features per level: [(L, C)].

    ``reduce(sums, count) -> (sums, count)`` (several processes: ``ds`` or ``cached`` is this process's
    shard) sums the per-level sums and the image counts over the processes before the division."""
    if cached is not None and reduce is None:
        return [f.mean(0) for f in cached]
    sums, n = None, 0
    if cached is not None:
        sums, n = [f.sum(0) for f in cached], cached[0].shape[0]
    else:
        for batch in tqdm(loader(ds, cfg, cfg.batch_size), desc="memory", unit="batch", leave=False):
            toks = fod.tokens(batch["image"].to(device))
            sums = [t.sum(0) for t in toks] if sums is None else [s + t.sum(0) for s, t in zip(sums, toks)]
            n += toks[0].shape[0]
    if reduce is not None:
        sums, n = reduce(sums, n)
    return [(s / n).cpu() for s in sums]
