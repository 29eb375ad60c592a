"""Scoring: anomaly maps of a test set with all metrics (``evaluate``), and of new images (``predict``)."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from . import checkpoint as C
from . import metrics as M
from . import report as R
from . import viz
from .config import Config, to_dict
from .data import AnomalyDataset, denormalize, load_image
from .files import atomic_write_text, prepare_output
from .model import FOD, loader


@torch.no_grad()
def evaluate(fod: FOD, ds, cfg: Config, device: str, desc: str = "evaluate") -> dict:
    """Maps for the whole test set and all metrics. Returns a dict with the arrays too."""
    fod.eval()
    maps, masks, labels, defects, paths = [], [], [], [], []
    t0 = time.perf_counter()
    n = 0
    bar = tqdm(loader(ds, cfg, cfg.batch_size), desc=desc, unit="batch", leave=False)
    for batch in bar:
        m = fod.anomaly_maps(batch["image"].to(device), amp=cfg.amp)
        maps.append(m.float().cpu().numpy())
        masks.append(batch["mask"].numpy())
        labels += batch["label"].tolist()
        defects += list(batch["defect"])
        paths += list(batch["path"])
        n += m.shape[0]
        bar.set_postfix(img_per_s=f"{n / (time.perf_counter() - t0):.2f}")
    seconds = time.perf_counter() - t0
    maps, masks = np.concatenate(maps), np.concatenate(masks)
    res = M.evaluate_maps(maps, masks, labels, defects)
    res.update(maps=maps, masks=masks, labels=np.array(labels), defects=defects, paths=paths,
               eval_seconds=seconds, eval_images_per_second=n / seconds)
    return res


def public_metrics(res: dict) -> dict:
    keys = ("image_auroc", "pixel_auroc", "aupro", "aupro_fpr_limit", "per_type_image_auroc",
            "eval_seconds", "eval_images_per_second")
    return {k: res[k] for k in keys}


def test(checkpoint, data, output, *, dataset: Optional[str] = None, device: str = "cpu",
         backend: Optional[str] = None, batch_size: Optional[int] = None, overwrite: bool = False,
         heatmaps: int = -1, log=R.say) -> dict:
    """Evaluate a saved checkpoint on DATA/test: metrics.json, heatmaps/, summary.png."""
    out = prepare_output(output, overwrite=overwrite, products=("metrics.json", "summary.png"))
    fod = C.load(checkpoint, device, backend)
    cfg = fod.cfg
    if batch_size:
        cfg.batch_size = batch_size
    ds = AnomalyDataset(data, "test", dataset or cfg.dataset, cfg.image_size, cfg.resize)
    res = evaluate(fod, ds, cfg, device)
    metrics = public_metrics(res)
    metrics.update(protocol="evaluation of a saved checkpoint", checkpoint=str(checkpoint), data=str(data),
                   weights=fod.backbone.weights_source, backend=fod.backend, score=fod.score_description,
                   config=to_dict(cfg), versions=R.versions(fod.backend))
    R.write_outputs(out, cfg=cfg, ds=ds, res=res, metrics=metrics, history=fod.checkpoint.get("history", []),
                    heatmaps=heatmaps, title_extra=" (fod test)", log=log)
    return metrics


def predict(checkpoint, images, output, *, device: str = "cpu", backend: Optional[str] = None,
            batch_size: int = 8, overwrite: bool = False, log=R.say) -> dict:
    """Anomaly maps and image scores of new images: heatmaps/*.png, maps.npz and scores.json."""
    out = prepare_output(output, overwrite=overwrite, products=("scores.json",))
    fod = C.load(checkpoint, device, backend)
    cfg = fod.cfg
    paths = [Path(p) for p in images]
    if not paths:
        raise ValueError("no images given to predict")
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"image not found: {p}")
    maps = []
    for chunk in tqdm([paths[i:i + batch_size] for i in range(0, len(paths), batch_size)], desc="predict",
                      unit="batch", leave=False):
        imgs = torch.stack([load_image(p, cfg.image_size, cfg.resize) for p in chunk]).to(device)
        maps.append(fod.anomaly_maps(imgs, amp=cfg.amp).float().cpu().numpy())
    maps = np.concatenate(maps)
    scores = M.image_scores(maps)
    scale = fod.checkpoint.get("map_scale")
    vmin, vmax = scale if scale else (float(maps.min()), float(maps.max()))
    hdir = out / "heatmaps"
    hdir.mkdir(exist_ok=True)
    names, result = set(), {}
    for i, p in enumerate(paths):
        name = p.stem
        while name in names:
            name = f"{name}_{i}"
        names.add(name)
        img = denormalize(load_image(p, cfg.image_size, cfg.resize))
        viz.save_overlay(hdir / f"{name}.png", img, maps[i], None, vmin, vmax)
        result[str(p)] = {"score": float(scores[i]), "heatmap": str(hdir / f"{name}.png"), "map_key": name}
    np.savez_compressed(out / "maps.npz", **{r["map_key"]: maps[i] for i, r in enumerate(result.values())})
    atomic_write_text(out / "scores.json", json.dumps(
        {"checkpoint": str(checkpoint), "image_score": "max of the sigma-4 Gaussian-filtered anomaly map",
         "heatmap_scale": [vmin, vmax], "images": result}, indent=2))
    for p, r in result.items():
        log(f"{r['score']:.6g}  {p}")
    log(f"fod: maps and scores of {len(paths)} images in {out}/ (scores.json, maps.npz, heatmaps/)")
    return result
