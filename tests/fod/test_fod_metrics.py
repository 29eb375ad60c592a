"""fod.metrics against scikit-learn (AUROC) and an independent slow AUPRO."""
import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from fod import metrics as M


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.random(500) < 0.3
    s = np.round(rng.random(500) + 0.4 * y, 1)  # coarse rounding: many ties
    assert M.auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_auroc_extremes_and_errors():
    assert M.auroc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == pytest.approx(1.0)
    assert M.auroc([0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1]) == pytest.approx(0.0)
    assert M.auroc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="both classes"):
        M.auroc([1, 1], [0.1, 0.2])


def test_image_scores_are_max_of_gaussian_filtered_map():
    rng = np.random.default_rng(0)
    maps = rng.random((3, 20, 20))
    maps[1, 5, 5] = 50.0  # an isolated spike is smoothed, not taken raw
    got = M.image_scores(maps, sigma=4)
    want = [ndimage.gaussian_filter(m, 4).max() for m in maps]
    np.testing.assert_allclose(got, want)
    assert got[1] < 50.0


def _components(mask):
    """8-connected components by an explicit flood fill (independent of scipy.ndimage.label)."""
    seen = np.zeros_like(mask, bool)
    regions = []
    H, W = mask.shape
    for y in range(H):
        for x in range(W):
            if mask[y, x] and not seen[y, x]:
                stack, reg = [(y, x)], []
                seen[y, x] = True
                while stack:
                    cy, cx = stack.pop()
                    reg.append((cy, cx))
                    for dy in (-1, 0, 1):
                        for dx in (-1, 0, 1):
                            ny, nx = cy + dy, cx + dx
                            if 0 <= ny < H and 0 <= nx < W and mask[ny, nx] and not seen[ny, nx]:
                                seen[ny, nx] = True
                                stack.append((ny, nx))
                regions.append(reg)
    return regions


def slow_aupro(masks, maps, limit=0.3):
    """Threshold by threshold: mean per-region overlap vs FPR, then the area up to ``limit`` / limit."""
    regions = [(i, r) for i, m in enumerate(masks) for r in _components(m)]
    normal = ~masks
    pts = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        above = maps >= t
        fpr = (above & normal).sum() / normal.sum()
        pro = np.mean([np.mean([above[i, y, x] for y, x in r]) for i, r in regions])
        pts.append((fpr, pro))
    f, p = np.array(pts).T
    if f[-1] > limit:
        cut = np.searchsorted(f, limit, side="right")
        p_lim = np.interp(limit, f[cut - 1:cut + 1], p[cut - 1:cut + 1])
        f, p = np.r_[f[:cut], limit], np.r_[p[:cut], p_lim]
    return np.sum((f[1:] - f[:-1]) * (p[1:] + p[:-1]) / 2) / limit


@pytest.mark.parametrize("seed", range(4))
def test_aupro_matches_slow_implementation(seed):
    rng = np.random.default_rng(seed)
    masks = np.zeros((4, 16, 16), bool)
    masks[0, 2:5, 2:6] = True
    masks[0, 10:14, 9:11] = True        # two regions of different sizes in one image
    masks[1, 7, 7] = masks[1, 8, 8] = True  # diagonal neighbours: one 8-connected region
    masks[2, 0:3, 13:16] = True
    maps = rng.random(masks.shape) + 0.6 * masks
    maps = np.round(maps, 2)  # ties across pixels
    for limit in (0.3, 0.05, 1.0):
        assert M.aupro(masks, maps, limit) == pytest.approx(slow_aupro(masks, maps, limit), abs=1e-10)


def test_aupro_perfect_and_region_weighting():
    masks = np.zeros((2, 10, 10), bool)
    masks[0, :5, :5] = True   # big region
    masks[1, 0, 0] = True     # one-pixel region: counts as much as the big one
    perfect = masks.astype(float)
    assert M.aupro(masks, perfect) == pytest.approx(1.0)
    # only the big region detected: PRO is 0.5 over the whole range
    half = np.zeros_like(perfect)
    half[0, :5, :5] = 1.0
    half[1] = np.linspace(0, 0.5, 100).reshape(10, 10)
    half[1, 0, 0] = 0.0
    assert M.aupro(masks, half, 0.01) == pytest.approx(0.5, abs=0.02)


def test_evaluate_maps_per_type():
    rng = np.random.default_rng(0)
    masks = np.zeros((6, 8, 8), bool)
    for i in range(3, 6):
        masks[i, 2:5, 2:5] = True
    maps = rng.random(masks.shape) * 0.1 + masks
    maps[5] = rng.random((8, 8)) * 0.1  # one defect image missed entirely
    labels = [0, 0, 0, 1, 1, 1]
    defects = ["good"] * 3 + ["a", "a", "b"]
    r = M.evaluate_maps(maps, masks, labels, defects)
    assert r["per_type_image_auroc"]["a"] == pytest.approx(1.0)
    assert r["per_type_image_auroc"]["b"] < 1.0
    assert r["image_auroc"] == pytest.approx(roc_auc_score(labels, r["image_scores"]))
    assert r["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()))
