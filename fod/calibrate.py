"""Decision thresholds: which images calibrate them, how they are set, and how they score on a test set.

Calibration data (``plan``), in this order:

1. ``--val DIR``: the normal images in DIR (not its sub-folders); every training image trains.
2. The dataset's own validation split, where it has one (MVTec 3D-AD ``DATA/validation/<type>/rgb``, masks in
   ``<type>/gt``); every training image trains. Explicit ``--val-fraction F > 0`` holds out training images
   instead (said in the log).
3. Otherwise ``--val-fraction`` (default 0.1) of the normal training images, drawn from ``--seed``
   (``round(F * n)``, at least 1, half rounded up; at least one image must remain to train). The held-out
   images are used neither for training nor for the reference memory.
4. ``--val-fraction 0`` with neither: no calibration; the checkpoint has no thresholds and ``fod predict``
   reports raw scores only.

Thresholds (the rule everywhere: **anomalous iff score > threshold**; image scores are the max of the
sigma-4 Gaussian-filtered map, pixel scores the anomaly map's values):

- Normal images only (the default): the threshold at false-positive rate ``fpr`` is the k-th smallest of the
  n normal scores, k = n - floor(n * fpr): at most floor(n * fpr) calibration scores exceed it (exactly that
  many without ties). When n * fpr < 1 no exceedance is allowed and the threshold is the largest normal score
  (e.g. 6 normal images at fpr 0.01): a new normal image then exceeds it with probability about 1 / (n + 1),
  so an FPR of 0.01 needs about 100 normal images (the log says when n is too small). The pixel threshold is
  the same order statistic over all pixels of the normal images.
- With labelled defects in the calibration data: the F1-optimal threshold over the images (image labels) and
  over the pixels (masks): among the distinct scores, the split with the highest F1, the threshold halfway
  between the lowest score called anomalous and the next lower score. Without a defect pixel, the pixel
  threshold is set at ``fpr`` on the normal pixels (recorded as such).

Normalised score: ``1 / (1 + exp(-(score - t) / w))`` (logistic, strictly increasing, in [0, 1], exactly 0.5 at
the image threshold t), with w = (t - m) / ln 9, m the median normal calibration image score, so that a
median normal image maps to 0.1 and t + (t - m) to 0.9. If t <= m (one calibration image, ties, or an
F1 threshold below the normal median), w is the normal scores' standard deviation, else |t| / 10, else 1
(recorded in ``normalization["width_from"]``).
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from .metrics import image_scores
from .config import Config
from .data import AnomalyDataset, loader
from .layouts import IMAGE_EXTS, LAYOUTS, Sample, _images_in, _require_dir


DEFAULT_VAL_FRACTION = 0.1
RULE = "anomalous iff score > threshold"
NO_THRESHOLDS = ("no thresholds in this checkpoint (trained with --val-fraction 0 and no --val, before thresholds "
                 "existed, or its training did not finish)")
LN9 = math.log(9.0)


# ----------------------------------------------------------------------------- which images calibrate

def validation_split(cfg: Config) -> Optional[Path]:
    """The dataset's own validation folder, if its layout has one and it is there."""
    name = LAYOUTS[cfg.dataset].validation
    if name is not None and (Path(cfg.data) / name).is_dir():
        return Path(cfg.data) / name
    return None


def plan(cfg: Config) -> dict:
    """{"source": "val_dir"|"validation_split"|"holdout"|"none", "fraction": held-out fraction, "path": ...,
    "note": a line for the log}."""
    split = validation_split(cfg)
    if cfg.val is not None:
        return {"source": "val_dir", "fraction": 0.0, "path": str(cfg.val),
                "note": f"calibration on the normal images in --val {cfg.val}; every training image trains"}
    if split is not None and not cfg.val_fraction:
        return {"source": "validation_split", "fraction": 0.0, "path": str(split),
                "note": f"calibration on the dataset's validation split {split}; every training image trains"}
    f = DEFAULT_VAL_FRACTION if cfg.val_fraction is None else float(cfg.val_fraction)
    if f == 0:
        return {"source": "none", "fraction": 0.0, "path": None,
                "note": "no calibration (--val-fraction 0, no --val, no validation split): the checkpoint gets no "
                        "thresholds and fod predict reports raw scores only"}
    note = f"calibration on {f:g} of the training images, held out (drawn from --seed {cfg.seed}): they are used " \
           "neither for training nor for the reference memory"
    if split is not None:
        note += f"; the dataset's validation split {split} is not used (--val-fraction given)"
    return {"source": "holdout", "fraction": f, "path": None, "note": note}


def holdout_count(n: int, fraction: float) -> int:
    """How many of n training images a fraction holds out: round(fraction * n), half up, at least 1."""
    if fraction <= 0:
        return 0
    k = max(1, int(math.floor(fraction * n + 0.5)))
    if k >= n:
        raise ValueError(f"--val-fraction {fraction:g} of {n} training image(s) holds out {k} and leaves none to "
                         "train on; lower --val-fraction, or pass --val-fraction 0 (no thresholds) or --val DIR")
    return k


def split_indices(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(training indices, held-out indices), both ascending; the held-out ones drawn from ``seed`` with numpy's
    own generator (the torch RNG that drives training is not touched)."""
    k = holdout_count(n, fraction)
    held = sorted(np.random.default_rng(seed).permutation(n)[:k].tolist())
    hs = set(held)
    return [i for i in range(n) if i not in hs], held


def subset(ds: AnomalyDataset, indices) -> AnomalyDataset:
    """The dataset restricted to ``indices`` (same preprocessing)."""
    out = copy.copy(ds)
    out.samples = [ds.samples[i] for i in indices]
    return out


def _with_samples(ds: AnomalyDataset, samples: list, root: Path, split: str) -> AnomalyDataset:
    out = copy.copy(ds)
    out.samples, out.root, out.split = samples, Path(root), split
    return out


def folder_samples(d: Path) -> list[Sample]:
    """The normal images of a --val folder."""
    d = _require_dir(Path(d), "--val")
    samples = [Sample(p, "good", None) for p in _images_in(d)]
    if not samples:
        raise FileNotFoundError(f"--val {d} holds no images ({', '.join(IMAGE_EXTS)}); sub-folders are not read")
    return samples


def datasets(cfg: Config, train_ds: AnomalyDataset) -> tuple[AnomalyDataset, Optional[AnomalyDataset], dict]:
    """(the images to train on, the calibration images or None, the plan with the held-out names added).
    Raises before any training if the calibration images cannot be listed."""
    p = plan(cfg)
    if p["source"] == "holdout":
        fit, held = split_indices(len(train_ds), p["fraction"], cfg.seed)
        val = subset(train_ds, held)
        p["held_out"] = [s.image.relative_to(train_ds.root).as_posix() for s in val.samples]
        return subset(train_ds, fit), val, p
    if p["source"] == "val_dir":
        return train_ds, _with_samples(train_ds, folder_samples(Path(p["path"])), Path(p["path"]), "val"), p
    if p["source"] == "validation_split":
        samples = LAYOUTS[cfg.dataset].validation_samples(Path(p["path"]))
        return train_ds, _with_samples(train_ds, samples, Path(p["path"]), "validation"), p
    return train_ds, None, p


# ----------------------------------------------------------------------------- thresholds

def threshold_at_fpr(normal_scores, fpr: float) -> tuple[float, int]:
    """(the k-th smallest of the n scores with k = n - floor(n * fpr), how many scores exceed it)."""
    s = np.asarray(normal_scores, dtype=np.float64).ravel()
    n = s.size
    if n == 0:
        raise ValueError("no normal scores to set a threshold on")
    allowed = int(math.floor(n * fpr + 1e-9))  # 1e-9: n * fpr = 3 must not round down to 2.999...
    k = n - allowed  # 1-based rank
    t = float(np.partition(s, k - 1)[k - 1])
    return t, int((s > t).sum())


def f1_threshold(labels, scores) -> tuple[float, dict]:
    """The F1-optimal threshold of ``scores`` for binary ``labels`` (see the module doc) and its counts."""
    y = np.asarray(labels).ravel().astype(bool)
    s = np.asarray(scores, dtype=np.float64).ravel()
    if not y.any():
        raise ValueError("an F1-optimal threshold needs at least one positive")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]  # the last index of each run of equal scores
    tp = np.cumsum(y)[last]
    fp = (last + 1) - tp
    f1 = 2 * tp / (2 * tp + fp + (y.sum() - tp))
    j = int(np.argmax(f1))  # the first maximum: the highest threshold among equal F1
    low = s[last[j]]
    if last[j] + 1 < s.size:
        nxt = s[last[j] + 1]
        t = (low + nxt) / 2
        if not (nxt <= t < low):  # adjacent floats: the midpoint rounds onto one of them
            t = nxt
    else:
        t = float(np.nextafter(low, -np.inf))
    return float(t), {"tp": int(tp[j]), "fp": int(fp[j]), "f1": float(f1[j])}


def normal_stats(scores) -> dict:
    s = np.asarray(scores, dtype=np.float64).ravel()
    return {"count": int(s.size), "mean": float(s.mean()), "std": float(s.std()), "min": float(s.min()),
            "median": float(np.median(s)), "q90": float(np.quantile(s, 0.9)), "q99": float(np.quantile(s, 0.99)),
            "max": float(s.max())}


def normalization(threshold: float, stats: dict) -> dict:
    """The logistic map's parameters (the module doc); the first width of the list that is a positive normal
    float (a width that underflows, e.g. from scores 1e-320 apart, is passed over)."""
    tiny = np.finfo(np.float64).tiny
    for w, src in (((threshold - stats["median"]) / LN9, "(threshold - median normal score) / ln 9"),
                   (stats["std"], "std of the normal scores (the threshold is not above their median)"),
                   (abs(threshold) / 10, "|threshold| / 10 (the normal scores are all equal)"),
                   (1.0, "1 (threshold 0, all normal scores equal)")):
        if math.isfinite(w) and w >= tiny:
            break
    return {"kind": "logistic", "center": float(threshold), "width": float(w), "width_from": src,
            "formula": "1 / (1 + exp(-(score - center) / width))"}


def normalize(scores, norm: dict) -> np.ndarray:
    """The normalised scores in [0, 1] (0.5 at the image threshold), float64."""
    with np.errstate(over="ignore"):  # far from the threshold: exp overflows to inf and the score is 0 or 1
        z = (np.asarray(scores, dtype=np.float64) - norm["center"]) / norm["width"]
        return 1.0 / (1.0 + np.exp(-z))


@torch.no_grad()
def _maps(fod, ds, cfg: Config, device: str):
    fod.eval()
    maps, masks, labels = [], [], []
    for batch in tqdm(loader(ds, cfg, cfg.batch_size), desc="calibrate", unit="batch", leave=False):
        maps.append(fod.anomaly_maps(batch["image"].to(device), amp=cfg.amp).float().cpu().numpy())
        masks.append(batch["mask"].numpy())
        labels += batch["label"].tolist()
    return np.concatenate(maps), np.concatenate(masks), np.asarray(labels, dtype=int)


def calibrate(fod, ds: AnomalyDataset, cfg: Config, device: str, p: dict, log=None) -> dict:
    """Thresholds and the normal score statistics from the calibration images ``ds`` (see the module doc)."""
    maps, masks, labels = _maps(fod, ds, cfg, device)
    scores = image_scores(maps)
    normal = labels == 0
    n_norm, n_def = int(normal.sum()), int((~normal).sum())
    fpr = float(cfg.fpr)
    out = {"rule": RULE, "source": p["source"], "source_path": p.get("path"), "images": int(labels.size),
           "normal_images": n_norm, "defective_images": n_def, "fpr_target": fpr,
           "image_score": "max of the sigma-4 Gaussian-filtered anomaly map"}
    if p.get("held_out") is not None:
        out.update(held_out_fraction=p["fraction"], held_out=p["held_out"])
    if n_norm == 0:
        raise ValueError(f"the calibration images ({p['source']}: {p.get('path') or 'held out'}) hold no normal "
                         "image; the normalised score needs normal score statistics")
    pixel_normal = maps[~masks]
    if n_def:
        out["image_threshold"], c = f1_threshold(labels, scores)
        out["image_method"] = f"F1-optimal on {labels.size} labelled images (F1 {c['f1']:.4f})"
        if masks.any():
            out["pixel_threshold"], c = f1_threshold(masks, maps)
            out["pixel_method"] = f"F1-optimal on {masks.size} labelled pixels (F1 {c['f1']:.4f})"
        else:
            out["pixel_threshold"], _ = threshold_at_fpr(pixel_normal, fpr)
            out["pixel_method"] = f"at FPR {fpr:g} on the normal pixels (the defective images have no defect pixel)"
    else:
        out["image_threshold"], _ = threshold_at_fpr(scores, fpr)
        out["pixel_threshold"], _ = threshold_at_fpr(pixel_normal, fpr)
        out["image_method"] = f"at FPR {fpr:g} on {n_norm} normal images (k-th smallest score, k = n - floor(n * fpr))"
        out["pixel_method"] = f"at FPR {fpr:g} on {pixel_normal.size} normal pixels (the same order statistic)"
    out["image_fpr_on_calibration"] = float((scores[normal] > out["image_threshold"]).mean())
    out["pixel_fpr_on_calibration"] = float((pixel_normal > out["pixel_threshold"]).mean())
    out["normal_image_scores"] = normal_stats(scores[normal])
    out["normal_pixel_scores"] = normal_stats(pixel_normal)
    out["normalization"] = normalization(out["image_threshold"], out["normal_image_scores"])
    if log:
        log(f"fod: calibration ({p['source']}, {labels.size} images): image threshold {out['image_threshold']:.6g} "
            f"({out['image_method']}), pixel threshold {out['pixel_threshold']:.6g} ({out['pixel_method']})")
        if not n_def and n_norm * fpr < 1:
            why = f"--fpr {fpr:g} needs n * fpr >= 1, n >= {math.ceil(1 / fpr - 1e-9)}" if fpr > 0 else "--fpr 0"
            log(f"fod: calibration: {n_norm} normal images ({why}): the image threshold is the largest normal score; "
                f"new normal images exceed it about 1 / (n + 1) = {1 / (n_norm + 1):.2g} of the time")
    return out


# ----------------------------------------------------------------------------- decisions on a test set

def decision_metrics(labels, scores, threshold: float) -> dict:
    """Precision, recall, F1 and the false-positive rate of ``score > threshold`` (precision 0 when nothing is
    called anomalous, as scikit-learn's zero_division=0), with the counts."""
    y = np.asarray(labels).ravel().astype(bool)
    pred = np.asarray(scores).ravel() > threshold
    tp, fp = int((pred & y).sum()), int((pred & ~y).sum())
    fn, tn = int((~pred & y).sum()), int((~pred & ~y).sum())
    return {"threshold": float(threshold), "precision": tp / (tp + fp) if tp + fp else 0.0,
            "recall": tp / (tp + fn) if tp + fn else 0.0, "f1": 2 * tp / (2 * tp + fp + fn) if tp else 0.0,
            "fpr": fp / (fp + tn) if fp + tn else 0.0, "tp": tp, "fp": fp, "fn": fn, "tn": tn}


def threshold_metrics(res: dict, calib: Optional[dict]) -> Optional[dict]:
    """The calibrated thresholds' decisions on an evaluated test set (``res`` of evaluate.evaluate): image level
    (labels, image scores) and pixel level (masks, maps); None without calibration."""
    if not calib:
        return None
    return {"rule": RULE, "method": calib["image_method"], "pixel_method": calib["pixel_method"],
            "image": decision_metrics(res["labels"], res["image_scores"], calib["image_threshold"]),
            "pixel": decision_metrics(res["masks"], res["maps"], calib["pixel_threshold"])}


def log_threshold_metrics(tm: Optional[dict], log):
    if tm is None:
        log(f"fod: {NO_THRESHOLDS}: no decisions to report")
        return
    for level in ("image", "pixel"):
        m = tm[level]
        log(f"fod: {level} threshold {m['threshold']:.6g}: precision {m['precision']:.4f} recall {m['recall']:.4f} "
            f"F1 {m['f1']:.4f} FPR {m['fpr']:.4f} (TP {m['tp']} FP {m['fp']} FN {m['fn']} TN {m['tn']})")
