"""Detection and segmentation metrics: AUROC, AUPRO (up to a false-positive rate), image scores."""
from __future__ import annotations

import numpy as np
from scipy import ndimage


def roc_curve(labels, scores):
    """(fpr, tpr) at every distinct threshold, highest score first, starting at (0, 0)."""
    y = np.asarray(labels).ravel().astype(bool)
    s = np.asarray(scores, dtype=np.float64).ravel()
    npos, nneg = int(y.sum()), int((~y).sum())
    if npos == 0 or nneg == 0:
        raise ValueError(f"AUROC needs both classes, got {npos} positives and {nneg} negatives")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]  # last index of each run of equal scores
    tp = np.cumsum(y)[last]
    fp = (last + 1) - tp
    return np.r_[0.0, fp / nneg], np.r_[0.0, tp / npos]


def auroc(labels, scores) -> float:
    fpr, tpr = roc_curve(labels, scores)
    return float(np.trapezoid(tpr, fpr))


def image_scores(maps: np.ndarray, sigma: float = 4.0) -> np.ndarray:
    """Image score = max of the anomaly map after a Gaussian filter (per image; maps (N, H, W))."""
    return np.array([ndimage.gaussian_filter(m.astype(np.float64), sigma=sigma).max() for m in maps])


_EIGHT = np.ones((3, 3), dtype=int)  # 8-connectivity, as the MVTec AD evaluation code


def pro_curve(masks: np.ndarray, maps: np.ndarray):
    """(fpr, pro) at every distinct threshold, highest first, starting at (0, 0).

    PRO = the mean, over all connected ground-truth regions of all images, of
    the fraction of the region above the threshold; FPR over all normal pixels.
    Computed exactly by sorting: each region pixel carries weight 1/(|region| * n_regions),
    each normal pixel 1/n_normal, and the curves are cumulative sums.
    """
    masks = np.asarray(masks).astype(bool)
    maps = np.asarray(maps, dtype=np.float64)
    if masks.shape != maps.shape:
        raise ValueError(f"masks {masks.shape} and maps {maps.shape} differ in shape")
    weights = np.zeros(maps.shape, dtype=np.float64)
    n_regions = 0
    for i, m in enumerate(masks):
        lab, n = ndimage.label(m, structure=_EIGHT)
        if n:
            sizes = np.bincount(lab.ravel())
            w = np.zeros(n + 1)
            w[1:] = 1.0 / sizes[1:]
            weights[i] = w[lab]
            n_regions += n
    n_normal = int((~masks).sum())
    if n_regions == 0 or n_normal == 0:
        raise ValueError("AUPRO needs at least one defect region and one normal pixel")
    weights /= n_regions
    s = maps.ravel()
    order = np.argsort(-s, kind="mergesort")
    s = s[order]
    last = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]
    pro = np.cumsum(weights.ravel()[order])[last]
    fp = np.cumsum(~masks.ravel()[order])[last] / n_normal
    return np.r_[0.0, fp], np.r_[0.0, pro]


def area_under_limit(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Area under the piecewise-linear curve y(x) (x non-decreasing) from 0 to ``limit``, over ``limit``."""
    keep = x <= limit
    xs, ys = x[keep], y[keep]
    if xs[-1] < limit and keep.sum() < x.size:  # interpolate the point at the limit
        j = int(keep.sum())
        x0, x1, y0, y1 = x[j - 1], x[j], y[j - 1], y[j]
        yl = y0 + (y1 - y0) * (limit - x0) / (x1 - x0) if x1 > x0 else y1
        xs, ys = np.r_[xs, limit], np.r_[ys, yl]
    return float(np.trapezoid(ys, xs) / limit)


def aupro(masks, maps, fpr_limit: float = 0.3) -> float:
    """Normalised area under the PRO curve up to ``fpr_limit`` (1.0 is perfect)."""
    fpr, pro = pro_curve(masks, maps)
    return area_under_limit(fpr, pro, fpr_limit)


def evaluate_maps(maps: np.ndarray, masks: np.ndarray, labels, defects, *, sigma: float = 4.0,
                  fpr_limit: float = 0.3) -> dict:
    """All metrics of a test set. maps (N,H,W) float, masks (N,H,W) bool, labels (N,) 0/1, defects (N,) str."""
    labels = np.asarray(labels).astype(int)
    defects = np.asarray(defects)
    img = image_scores(maps, sigma)
    res = {"image_auroc": auroc(labels, img), "pixel_auroc": auroc(masks, maps),
           "aupro": aupro(masks, maps, fpr_limit), "aupro_fpr_limit": fpr_limit}
    per_type = {}
    for t in sorted(set(defects[labels == 1].tolist())):
        sel = (labels == 0) | (defects == t)
        per_type[t] = auroc(labels[sel], img[sel])
    res["per_type_image_auroc"] = per_type
    res["image_scores"] = img
    return res
