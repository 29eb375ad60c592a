"""Heat-map overlays and the one-page run summary (matplotlib, Agg backend)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from scipy import ndimage  # noqa: E402

_CMAP = matplotlib.colormaps["jet"]
CONTOUR = np.array([0.1, 1.0, 0.1])


def _contour(mask: np.ndarray) -> np.ndarray:
    mask = mask.astype(bool)
    return mask & ~ndimage.binary_erosion(mask, structure=np.ones((3, 3)), border_value=0)


def overlay(image: np.ndarray, amap: np.ndarray, mask=None, vmin: float = None, vmax: float = None) -> np.ndarray:
    """[image with ground-truth contour | image blended with the anomaly map (jet) and the contour], uint8."""
    vmin = float(amap.min()) if vmin is None else vmin
    vmax = float(amap.max()) if vmax is None else vmax
    norm = np.clip((amap - vmin) / max(vmax - vmin, 1e-12), 0, 1)
    heat = _CMAP(norm)[..., :3]
    left, right = image.copy(), 0.5 * image + 0.5 * heat
    if mask is not None and mask.any():
        c = _contour(mask)
        left[c], right[c] = CONTOUR, CONTOUR
    gap = np.ones((image.shape[0], 4, 3))
    return np.round(np.concatenate([left, gap, right], axis=1) * 255).astype(np.uint8)


def save_overlay(path, image, amap, mask=None, vmin=None, vmax=None):
    Image.fromarray(overlay(image, amap, mask, vmin, vmax)).save(path)


def summary_page(path, *, title: str, lines: list[str], history: list[dict], labels, image_scores, masks=None,
                 maps=None, examples=(), pixel_sample: int = 200_000, seed: int = 0, image_threshold=None):
    """One A4-portrait PNG: run facts, training loss, ROC curves, PRO curve, score histogram, examples.

    examples: up to 4 (caption, overlay uint8 image) pairs. image_threshold: drawn on the histogram when given.
    """
    from .metrics import pro_curve, roc_curve
    labels = np.asarray(labels).astype(int)
    fig = plt.figure(figsize=(8.27, 11.69), dpi=110)
    fig.suptitle(title, fontsize=12, fontweight="bold")
    gs = fig.add_gridspec(4, 3, height_ratios=[1.15, 1, 1, 1.1], hspace=0.55, wspace=0.35,
                          left=0.08, right=0.97, top=0.94, bottom=0.03)
    ax = fig.add_subplot(gs[0, :])
    ax.axis("off")
    ax.text(0, 1, "\n".join(lines), va="top", ha="left", family="monospace", fontsize=7.2)

    ax = fig.add_subplot(gs[1, 0])
    if history:
        ep = [h["epoch"] for h in history]
        ax.plot(ep, [h["loss"] for h in history], "o-", label="loss")
        ax.plot(ep, [h["rec"] for h in history], "s--", label="rec")
        ax.legend(fontsize=7)
    ax.set_title("training loss", fontsize=9)
    ax.set_xlabel("epoch", fontsize=8)

    ax = fig.add_subplot(gs[1, 1])
    if len(set(labels.tolist())) == 2:
        fpr, tpr = roc_curve(labels, image_scores)
        ax.plot(fpr, tpr, label="image")
    if masks is not None and masks.any() and (~masks).any():
        rng = np.random.default_rng(seed)
        flat_m, flat_s = masks.ravel(), maps.ravel()
        if flat_m.size > pixel_sample:
            idx = rng.choice(flat_m.size, pixel_sample, replace=False)
            flat_m, flat_s = flat_m[idx], flat_s[idx]
        fpr, tpr = roc_curve(flat_m, flat_s)
        ax.plot(fpr, tpr, label="pixel (sampled)")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_title("ROC", fontsize=9)
    ax.set_xlabel("FPR", fontsize=8)
    ax.legend(fontsize=7)

    ax = fig.add_subplot(gs[1, 2])
    if masks is not None and masks.any():
        fpr, pro = pro_curve(masks, maps)
        keep = fpr <= 0.3
        ax.plot(fpr[keep], pro[keep])
        ax.set_xlim(0, 0.3)
        ax.set_ylim(0, 1.02)
    ax.set_title("PRO up to FPR 0.3", fontsize=9)
    ax.set_xlabel("FPR", fontsize=8)

    ax = fig.add_subplot(gs[2, :])
    scores = np.asarray(image_scores)
    lo, hi = scores.min(), scores.max()
    if image_threshold is not None:
        lo, hi = min(lo, image_threshold), max(hi, image_threshold)
    bins = np.linspace(lo, hi + 1e-12, 30)
    for lab, name, col in ((0, "normal", "tab:green"), (1, "defective", "tab:red")):
        if (labels == lab).any():
            ax.hist(scores[labels == lab], bins=bins, alpha=0.6, label=name, color=col)
    if image_threshold is not None:
        ax.axvline(image_threshold, color="black", ls="--", lw=1,
                   label=f"calibrated threshold {image_threshold:.4g} (anomalous above)")
    ax.set_title("image scores (max of the sigma-4 filtered map)", fontsize=9)
    ax.legend(fontsize=7)

    sub = gs[3, :].subgridspec(1, max(1, len(examples)), wspace=0.05)
    for i, (caption, img) in enumerate(examples):
        ax = fig.add_subplot(sub[0, i])
        ax.imshow(img)
        ax.set_title(caption, fontsize=7)
        ax.axis("off")
    for a in fig.axes:
        a.tick_params(labelsize=7)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
