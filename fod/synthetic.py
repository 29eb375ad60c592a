"""The embedded demo data: procedural textures with defects, written in the MVTec AD layout.

``make_dataset(root, ...)`` writes ``root/train/good``, ``root/test/good``,
``root/test/<defect>`` and ``root/ground_truth/<defect>/<name>_mask.png`` for
three defect types:

- ``scratch``: a thin, slightly curved line, lighter or darker than the texture;
- ``spot``: a soft-edged elliptical stain of another colour;
- ``cut``: a short, wide gap through the fabric that shows a dark backing.

The texture is a woven pattern (two orthogonal gratings with a per-image phase
and small orientation jitter) plus smooth noise, so every normal image differs
from every other one but shares the same statistics. Everything is drawn with
numpy from a seed: the same arguments always give the same files.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image

DEFECTS = ("scratch", "spot", "cut")
MANIFEST = ".fod-demo-manifest.json"  # the files make_dataset wrote: the only ones fod demo --overwrite removes


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Value noise in [-1, 1]: a coarse random grid, bilinearly upsampled."""
    coarse = rng.uniform(-1, 1, (cells + 1, cells + 1)).astype(np.float32)
    img = Image.fromarray(coarse, mode="F").resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.float32)


def texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """One normal image, float32 (size, size, 3) in [0, 1]."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    period = 8.0 * size / 128.0
    theta = rng.normal(0.0, 0.03)
    u = xx * math.cos(theta) + yy * math.sin(theta) + rng.uniform(0, period)
    v = -xx * math.sin(theta) + yy * math.cos(theta) + rng.uniform(0, period)
    weave = np.sin(2 * np.pi * u / period) * np.sin(2 * np.pi * v / period)
    g = 0.55 + 0.18 * weave + 0.03 * _smooth_noise(rng, size, 4) + 0.03 * rng.standard_normal((size, size))
    tint = np.array([0.95, 0.82, 0.62], np.float32)  # a beige fabric
    img = g[..., None] * tint + 0.02 * _smooth_noise(rng, size, 3)[..., None]
    return np.clip(img, 0, 1).astype(np.float32)


def _segment_distance(yy, xx, p0, p1):
    """Distance of every pixel to the segment p0-p1 (points as (y, x))."""
    d = np.subtract(p1, p0, dtype=np.float64)
    n2 = max(float(d @ d), 1e-9)
    t = np.clip(((yy - p0[0]) * d[0] + (xx - p0[1]) * d[1]) / n2, 0, 1)
    return np.hypot(yy - (p0[0] + t * d[0]), xx - (p0[1] + t * d[1]))


def _polyline_distance(yy, xx, pts):
    return np.min([_segment_distance(yy, xx, a, b) for a, b in zip(pts[:-1], pts[1:])], axis=0)


def add_defect(rng: np.random.Generator, img: np.ndarray, kind: str):
    """Draw one defect of ``kind`` on a copy of img; return (image, mask bool (H, W))."""
    size = img.shape[0]
    s = size / 128.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    c = rng.uniform(0.25 * size, 0.75 * size, 2)
    out = img.copy()
    if kind == "scratch":
        ang = rng.uniform(0, np.pi)
        length = rng.uniform(35, 60) * s
        bend = rng.normal(0, 5 * s)
        d = np.array([math.sin(ang), math.cos(ang)]) * length / 2
        normal = np.array([d[1], -d[0]]) / (np.linalg.norm(d) + 1e-9)
        pts = [c - d, c + normal * bend, c + d]
        dist = _polyline_distance(yy, xx, pts)
        width = rng.uniform(1.5, 2.5) * s
        alpha = np.clip(width + 0.5 - dist, 0, 1)[..., None]
        colour = 0.97 if rng.random() < 0.5 else 0.12
        out = out * (1 - alpha) + colour * alpha
        mask = dist <= width
    elif kind == "spot":
        ry, rx = rng.uniform(5, 11, 2) * s
        ang = rng.uniform(0, np.pi)
        dy, dx = yy - c[0], xx - c[1]
        u = (dy * math.cos(ang) + dx * math.sin(ang)) / ry
        v = (-dy * math.sin(ang) + dx * math.cos(ang)) / rx
        r = np.sqrt(u * u + v * v) + 0.15 * _smooth_noise(rng, size, 8)
        alpha = np.clip((1.15 - r) / 0.3, 0, 1)[..., None] * 0.9
        colour = np.array(rng.choice([[0.35, 0.12, 0.05], [0.1, 0.2, 0.45], [0.25, 0.25, 0.05]]), np.float32)
        out = out * (1 - alpha) + colour * alpha
        mask = r <= 1.0
    elif kind == "cut":
        ang = rng.uniform(0, np.pi)
        length = rng.uniform(14, 26) * s
        d = np.array([math.sin(ang), math.cos(ang)]) * length / 2
        dist = _segment_distance(yy, xx, c - d, c + d)
        width = rng.uniform(2.5, 4.0) * s
        alpha = np.clip(width + 0.5 - dist, 0, 1)[..., None]
        out = out * (1 - alpha) + 0.06 * alpha
        mask = dist <= width
    else:
        raise ValueError(f"unknown defect kind {kind!r}; choose from {DEFECTS}")
    return np.clip(out, 0, 1).astype(np.float32), mask


def _save(arr: np.ndarray, path: Path):
    from .files import writing
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(arr * 255).astype(np.uint8)).save(path)


def make_dataset(root, *, size: int = 128, n_train: int = 60, n_test_good: int = 12, n_test_defect: int = 8,
                 seed: int = 0, defects=DEFECTS) -> Path:
    """Write a synthetic category in the MVTec AD layout under ``root``; return ``root``.

    Refuses to write into a non-empty directory (it never overwrites data). Lists the files it writes
    in ``root/.fod-demo-manifest.json`` (before writing them), so that ``remove_dataset`` can remove
    exactly those.
    """
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} exists and is not empty; the synthetic dataset is written only "
                              "into a new or empty directory")
    train = [f"train/good/{i:03d}.png" for i in range(n_train)]
    good = [f"test/good/{i:03d}.png" for i in range(n_test_good)]
    bad = [(kind, f"test/{kind}/{i:03d}.png", f"ground_truth/{kind}/{i:03d}_mask.png")
           for kind in defects for i in range(n_test_defect)]
    from .files import writing
    with writing(root / MANIFEST):
        root.mkdir(parents=True, exist_ok=True)
        (root / MANIFEST).write_text(json.dumps({
            "written_by": "fod.synthetic.make_dataset",
            "args": {"size": size, "n_train": n_train, "n_test_good": n_test_good, "n_test_defect": n_test_defect,
                     "seed": seed, "defects": list(defects)},
            "files": train + good + [p for _, img, mask in bad for p in (img, mask)]}, indent=1))
    rng = np.random.default_rng(seed)
    for rel in train + good:
        _save(texture(rng, size), root / rel)
    for kind, img_rel, mask_rel in bad:
        img, mask = add_defect(rng, texture(rng, size), kind)
        _save(img, root / img_rel)
        _save(mask.astype(np.float32), root / mask_rel)
    return root


def demo_files(root) -> list[Path]:
    """The files under ``root`` that make_dataset wrote; an error if ``root`` holds anything else (or has
    no manifest): those files are the user's, and fod demo --overwrite must not remove them."""
    root = Path(root)
    advice = "fod demo --overwrite removes only what it wrote itself: move them away or choose another --output"
    try:
        listed = set(json.loads((root / MANIFEST).read_text())["files"])
    except FileNotFoundError:
        raise FileExistsError(f"{root} was not written by fod demo (it has no {MANIFEST}); {advice}") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FileExistsError(f"{root / MANIFEST} is unreadable ({exc}); {advice}") from None
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if not p.is_dir() or p.is_symlink()}
    foreign = sorted(present - listed - {MANIFEST})
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise FileExistsError(f"{root} holds {len(foreign)} file(s) that fod demo did not write ({shown}); {advice}")
    return [root / p for p in sorted(present & listed)]


def remove_dataset(root):
    """Remove a dataset written by make_dataset: its listed files, then the folders left empty."""
    root = Path(root)
    for p in demo_files(root):
        p.unlink()
    (root / MANIFEST).unlink()
    for d in sorted((p for p in root.rglob("*") if p.is_dir() and not p.is_symlink()), key=lambda p: -len(p.parts)):
        try:
            d.rmdir()
        except OSError:
            pass
    root.rmdir()
