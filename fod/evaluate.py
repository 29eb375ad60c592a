"""Scoring a test set: the anomaly maps of every image and all metrics (``evaluate``).

The commands that write run folders from it (``fod test``, ``fod predict``) are in ``fod.commands``."""
from __future__ import annotations

import time
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from . import distributed
from .config import Config
from .data import loader
from .metrics import evaluate_maps
from .model import FOD


@torch.no_grad()
def evaluate(fod: FOD, ds, cfg: Config, device: str, desc: str = "evaluate") -> Optional[dict]:
    """Maps for the whole test set and all metrics. Returns a dict with the arrays too.

    Several processes (fod.distributed): each scores its contiguous shard of ``ds``; rank 0 gathers the maps
    in the dataset's order and computes the metrics; the other processes return None."""
    ctx = distributed.current()
    fod.eval()
    maps, masks, labels, defects, paths = [], [], [], [], []
    t0 = time.perf_counter()
    n = 0
    bar = tqdm(loader(distributed.shard_of(ds), cfg, cfg.batch_size), desc=desc, unit="batch", leave=False)
    for batch in bar:
        m = fod.anomaly_maps(batch["image"].to(device), amp=cfg.amp)
        maps.append(m.float().cpu().numpy())
        masks.append(batch["mask"].numpy())
        labels += batch["label"].tolist()
        defects += list(batch["defect"])
        paths += list(batch["path"])
        n += m.shape[0]
        bar.set_postfix(img_per_s=f"{n / (time.perf_counter() - t0):.2f}")
    if ctx.distributed:
        got = _gather(maps, masks, labels, defects, paths, cfg.image_size)
        if got is None:
            return None
        maps, masks, labels, defects, paths = got
        n = len(labels)
    seconds = time.perf_counter() - t0
    maps, masks = np.concatenate(maps), np.concatenate(masks)
    res = evaluate_maps(maps, masks, labels, defects)
    res.update(maps=maps, masks=masks, labels=np.array(labels), defects=defects, paths=paths,
               eval_seconds=seconds, eval_images_per_second=n / seconds)
    return res


def _gather(maps, masks, labels, defects, paths, size: int):
    """This process's maps and labels of its shard -> all of them in the dataset's order on rank 0 (else None)."""
    def rows(arrays, dtype):
        return torch.from_numpy(np.concatenate(arrays)) if arrays else torch.zeros((0, size, size), dtype=dtype)
    maps = distributed.gather_rows(rows(maps, torch.float32), "gathering the anomaly maps")
    masks = distributed.gather_rows(rows(masks, torch.bool).to(torch.uint8), "gathering the masks")  # gloo: no bool
    meta = distributed.gather_objects((labels, defects, paths), "gathering the labels")
    if meta is None:
        return None
    labels, defects, paths = ([x for m in meta for x in m[i]] for i in range(3))
    return [maps.numpy()], [masks.numpy().astype(bool)], labels, defects, paths  # as the lists of batches


def public_metrics(res: dict) -> dict:
    keys = ("image_auroc", "pixel_auroc", "aupro", "aupro_fpr_limit", "per_type_image_auroc",
            "eval_seconds", "eval_images_per_second")
    return {k: res[k] for k in keys}
