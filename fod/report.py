"""What a run leaves behind: metrics.json, heat maps, the summary page, and the lines it prints.

``write_outputs`` is the one report path: ``fod train`` and ``fod test`` both call it after
``fod.evaluate.evaluate``.
"""
from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import viz
from .config import Config
from .files import atomic_write_text, write_png, writing
from .version import __version__

COMPAT_WARNING = ("COMPAT-OFFICIAL PROTOCOL: the output projections are discarded and the model is selected on the "
                  "TEST set after every epoch; the best image AUROC and the best pixel AUROC may come from "
                  "different epochs. These numbers are optimistic and not a valid held-out evaluation.")


def say(msg: str):
    tqdm.write(msg, file=sys.stderr)


def banner(msg: str):
    line = "!" * 100
    say(f"{line}\n{msg}\n{line}")


def versions(backend: str) -> dict:
    import fod_kernels
    import scipy
    import timm

    return {"fod": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "timm": timm.__version__,
            "numpy": np.__version__, "scipy": scipy.__version__, "fod_kernels": fod_kernels.__version__,
            "backend": backend, "cuda": torch.version.cuda if torch.cuda.is_available() else None}


def map_scale(res: dict) -> tuple[float, float]:
    """The colour scale of the heat maps: from the smallest map value to the 99.9th percentile."""
    return float(res["maps"].min()), float(np.percentile(res["maps"], 99.9))


def log_preprocessing(pre, nonsquare: int, log=say):
    """The preprocessing, said once per run; and how many images lose a border to the crop."""
    log(f"fod: preprocessing: {pre.describe()}")
    if nonsquare:
        log(f"fod: {nonsquare} image(s) are not square: their aspect ratio is kept and the centre crop cuts off "
            "the ends of their longer side")


def unique_names(stems) -> list[str]:
    """File names for the stems, made unique by appending _1, _2, ... (two inputs may share a stem)."""
    names, out = set(), []
    for stem in stems:
        name, k = stem, 0
        while name in names:
            k += 1
            name = f"{stem}_{k}"
        names.add(name)
        out.append(name)
    return out


def write_heatmaps(outdir: Path, ds, res: dict, vmin: float, vmax: float, limit: int = -1) -> int:
    """Heat-map overlays of the first ``limit`` (-1: all) test images into outdir/heatmaps; returns how many."""
    count = len(ds) if limit < 0 else min(limit, len(ds))
    if count == 0:
        return 0
    hdir = outdir / "heatmaps"
    with writing(hdir):
        hdir.mkdir(exist_ok=True)
    names = unique_names(f"{s.defect}_{s.image.stem}" for s in ds.samples)
    for i in range(count):
        img = ds.pre.denormalize(ds.image(i))
        write_png(hdir / f"{names[i]}.png", viz.overlay(img, res["maps"][i], res["masks"][i], vmin, vmax))
    return count


def summary_examples(ds, res: dict, vmin, vmax, k: int = 4):
    lab, sc = res["labels"], res["image_scores"]
    picks = []
    bad, good = np.nonzero(lab == 1)[0], np.nonzero(lab == 0)[0]
    if bad.size:
        picks += [("most anomalous defect", bad[np.argmax(sc[bad])]),
                  ("least anomalous defect", bad[np.argmin(sc[bad])])]
    if good.size:
        picks += [("most anomalous normal", good[np.argmax(sc[good])]),
                  ("least anomalous normal", good[np.argmin(sc[good])])]
    out = []
    for cap, i in picks[:k]:
        s = ds.samples[i]
        img = ds.pre.denormalize(ds.image(i))
        out.append((f"{cap}\n{s.defect}/{s.image.name} score {sc[i]:.3g}",
                    viz.overlay(img, res["maps"][i], res["masks"][i], vmin, vmax)))
    return out


def write_summary(path, cfg: Config, metrics, res, ds, vmin, vmax, history, title_extra=""):
    tpe = metrics.get("train_seconds_per_epoch")
    lines = [
        f"data      {cfg.data} ({cfg.dataset}), {len(ds)} test images",
        f"protocol  {metrics['protocol']}",
        f"backbone  {cfg.backbone} levels {cfg.levels or 'default'}; weights: {metrics['weights']}",
        f"model     d_model {cfg.d_model or 'default'}, {cfg.n_heads} heads, {cfg.n_layers} layers, "
        f"out_proj {not cfg.compat_official}; backend {metrics['backend']}, device {cfg.device}",
        f"training  {cfg.epochs} epochs, batch {cfg.batch_size}, lr {cfg.lr}, image {cfg.image_size}px, seed {cfg.seed}"
        + (f"; {tpe:.1f} s/epoch" if tpe else ""),
        "",
        f"image AUROC  {metrics['image_auroc']:.4f}" + (f"  (epoch {metrics['image_auroc_epoch']})"
                                                         if "image_auroc_epoch" in metrics else ""),
        f"pixel AUROC  {metrics['pixel_auroc']:.4f}" + (f"  (epoch {metrics['pixel_auroc_epoch']})"
                                                         if "pixel_auroc_epoch" in metrics else ""),
        f"AUPRO@0.3    {metrics['aupro']:.4f}",
        "per type     " + ", ".join(f"{k} {v:.3f}" for k, v in metrics["per_type_image_auroc"].items()),
        f"evaluation   {metrics['eval_images_per_second']:.2f} images/s",
    ]
    th = metrics.get("thresholds") or {}
    if th.get("image"):
        im, px = th["image"], th.get("pixel") or {}
        lines.append(f"thresholds   image {im['threshold']:.4g}: precision {im['precision']:.3f} recall "
                     f"{im['recall']:.3f} F1 {im['f1']:.3f} FPR {im['fpr']:.3f}"
                     + (f"; pixel {px['threshold']:.4g}: F1 {px['f1']:.3f}" if px else ""))
    if "warning" in metrics:
        lines += ["", "WARNING: test-set model selection (--compat-official);", "numbers are optimistic."]
    examples = summary_examples(ds, res, vmin, vmax)
    with writing(path):
        viz.summary_page(path, title=f"FOD run summary{title_extra}", lines=lines, history=history,
                         labels=res["labels"], image_scores=res["image_scores"], masks=res["masks"],
                         maps=res["maps"], examples=examples,
                         image_threshold=th["image"]["threshold"] if th.get("image") else None)


def log_metrics(metrics: dict, out: Path, products: str, log=say):
    log(f"fod: image AUROC {metrics['image_auroc']:.4f}  pixel AUROC {metrics['pixel_auroc']:.4f}  "
        f"AUPRO@0.3 {metrics['aupro']:.4f}  ({metrics['protocol']})")
    for k, v in metrics["per_type_image_auroc"].items():
        log(f"      {k:>20s}: image AUROC {v:.4f}")
    if "warning" in metrics:
        banner(metrics["warning"])
    log(f"fod: results in {out}/ ({products})")


def write_outputs(out: Path, *, cfg: Config, ds, res: dict, metrics: dict, history: list, scale=None,
                  heatmaps: int = -1, title_extra: str = "") -> list[str]:
    """Heat maps, metrics.json and summary.png of an evaluation (``res`` from evaluate.evaluate) into ``out``
    (a staging folder); returns the names of what was written."""
    vmin, vmax = scale if scale is not None else map_scale(res)
    n = write_heatmaps(out, ds, res, vmin, vmax, heatmaps)
    write_summary(out / "summary.png", cfg, metrics, res, ds, vmin, vmax, history, title_extra)
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    return ["metrics.json"] + (["heatmaps/"] if n else []) + ["summary.png"]
