"""Datasets in the MVTec AD, BTAD, MVTec 3D-AD (RGB) and VisA (split CSV) layouts.

Each dataset lists (image path, defect type, mask path or None) triples at
construction, so a missing mask or an empty split fails at once with the file
or directory named; images are read lazily and an unreadable one fails naming
the file. Images are resized to ``resize`` x ``resize``, centre-cropped to
``image_size`` and normalised with the ImageNet mean and std; grey images are
repeated to three channels. Masks follow the same geometry (nearest neighbour)
and are binary.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
LAYOUTS = ("mvtec", "btad", "mvtec3d", "visa")


class Sample(NamedTuple):
    image: Path
    defect: str          # "good" for normal images
    mask: Optional[Path]  # None for normal images


def _images_in(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def _nonempty(samples: list, what: str, where: Path) -> list:
    if not samples:
        raise FileNotFoundError(f"empty {what} split: no images ({', '.join(IMAGE_EXTS)}) found under {where}")
    return samples


def _require_dir(d: Path, what: str) -> Path:
    if not d.is_dir():
        raise FileNotFoundError(f"{what} directory not found: {d}")
    return d


def _find_mask(gt_dir: Path, img: Path, suffixes=("_mask", "")) -> Path:
    for suf in suffixes:
        for ext in IMAGE_EXTS:
            cand = gt_dir / f"{img.stem}{suf}{ext}"
            if cand.is_file():
                return cand
    expected = gt_dir / f"{img.stem}{suffixes[0]}.png"
    raise FileNotFoundError(f"missing ground-truth mask for {img}: expected {expected}")


def list_samples(root, split: str, layout: str = "mvtec") -> list[Sample]:
    """The (image, defect type, mask) triples of one split ("train" or "test") of a category."""
    root = Path(root)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown dataset layout {layout!r}; choose one of {LAYOUTS}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    _require_dir(root, "dataset")
    if layout == "visa":
        return _visa_samples(root, split)
    if layout == "mvtec":
        if split == "train":
            d = _require_dir(root / "train" / "good", "training (train/good)")
            return _nonempty([Sample(p, "good", None) for p in _images_in(d)], "train", d)
        test = _require_dir(root / "test", "test")
        out = []
        for tdir in sorted(p for p in test.iterdir() if p.is_dir()):
            for img in _images_in(tdir):
                mask = None if tdir.name == "good" else _find_mask(root / "ground_truth" / tdir.name, img)
                out.append(Sample(img, tdir.name, mask))
        return _nonempty(out, "test", test)
    if layout == "btad":
        if split == "train":
            d = _require_dir(root / "train" / "ok", "training (train/ok)")
            return _nonempty([Sample(p, "good", None) for p in _images_in(d)], "train", d)
        out = []
        for name in ("ok", "ko"):
            d = root / "test" / name
            if d.is_dir():
                for img in _images_in(d):
                    mask = None if name == "ok" else _find_mask(root / "ground_truth" / "ko", img, ("", "_mask"))
                    out.append(Sample(img, "good" if name == "ok" else "ko", mask))
        return _nonempty(out, "test", root / "test")
    # mvtec3d: <split>/<type>/rgb/*.png, masks in <split>/<type>/gt/<same name>
    if split == "train":
        d = _require_dir(root / "train" / "good" / "rgb", "training (train/good/rgb)")
        return _nonempty([Sample(p, "good", None) for p in _images_in(d)], "train", d)
    test = _require_dir(root / "test", "test")
    out = []
    for tdir in sorted(p for p in test.iterdir() if p.is_dir()):
        rgb = _require_dir(tdir / "rgb", "rgb")
        for img in _images_in(rgb):
            mask = None if tdir.name == "good" else _find_mask(tdir / "gt", img, ("", "_mask"))
            out.append(Sample(img, tdir.name, mask))
    return _nonempty(out, "test", test)


VISA_SPLIT = Path("split_csv") / "1cls.csv"
VISA_COLUMNS = ("object", "split", "label", "image", "mask")


def _visa_samples(root: Path, split: str) -> list[Sample]:
    """VisA: the category is ``root`` (e.g. VisA/candle); its split is the rows of ROOT/split_csv/1cls.csv
    (columns object,split,label,image,mask; paths relative to ROOT) whose object is the category's name.
    Labels: "normal" or "anomaly" (the defect type is then "anomaly"); anomalies need a mask."""
    import csv
    base, csv_path = root.parent, root.parent / VISA_SPLIT
    if not csv_path.is_file():
        raise FileNotFoundError(f"VisA split file not found: {csv_path} (the VisA layout reads the category's "
                                f"images from ROOT/{VISA_SPLIT.as_posix()}, ROOT being the parent of {root})")
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in VISA_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{csv_path}: missing column(s) {', '.join(missing)}; expected {','.join(VISA_COLUMNS)}")
        rows = [(i, r) for i, r in enumerate(reader, start=2) if r["object"] == root.name and r["split"] == split]
    out = []
    for line, r in rows:
        label = r["label"].strip().lower()
        if label not in ("normal", "anomaly"):
            raise ValueError(f"{csv_path} line {line}: label must be 'normal' or 'anomaly', got {r['label']!r}")
        img = base / r["image"]
        if not img.is_file():
            raise FileNotFoundError(f"{csv_path} line {line}: image not found: {img}")
        mask = None
        if label == "anomaly":
            if not r["mask"].strip():
                raise FileNotFoundError(f"{csv_path} line {line}: missing ground-truth mask for {img}")
            mask = base / r["mask"]
            if not mask.is_file():
                raise FileNotFoundError(f"missing ground-truth mask for {img}: expected {mask}")
        out.append(Sample(img, "good" if label == "normal" else "anomaly", mask))
    return _nonempty(out, split, csv_path)


def _read(path: Path, mode: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            if mode == "L" and im.mode in ("I", "I;16", "I;16B", "F"):
                # 16-bit / float masks: any non-zero pixel is a defect pixel
                return Image.fromarray((np.asarray(im) > 0).astype(np.uint8) * 255)
            return im.convert(mode)
    except Exception as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from exc


def _geometry(im: Image.Image, resize: int, crop: int, resample) -> Image.Image:
    im = im.resize((resize, resize), resample)
    off = (resize - crop) // 2
    return im.crop((off, off, off + crop, off + crop))


def load_image(path, image_size: int = 256, resize: Optional[int] = None) -> torch.Tensor:
    """One image as a normalised float tensor (3, image_size, image_size)."""
    im = _geometry(_read(Path(path), "RGB"), resize or image_size, image_size, Image.BILINEAR)
    arr = (np.asarray(im, np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


def load_mask(path, image_size: int = 256, resize: Optional[int] = None, threshold: int = 127) -> torch.Tensor:
    im = _geometry(_read(Path(path), "L"), resize or image_size, image_size, Image.NEAREST)
    return torch.from_numpy(np.asarray(im) > threshold)


def denormalize(img: torch.Tensor) -> np.ndarray:
    """(3, H, W) normalised tensor -> (H, W, 3) float array in [0, 1]."""
    arr = img.detach().cpu().numpy().transpose(1, 2, 0) * IMAGENET_STD + IMAGENET_MEAN
    return np.clip(arr, 0, 1)


class AnomalyDataset(Dataset):
    """Items: dict(image (3,S,S) float, mask (S,S) bool, label 0/1, defect str, path str)."""

    def __init__(self, root, split: str, layout: str = "mvtec", image_size: int = 256,
                 resize: Optional[int] = None):
        self.samples = list_samples(root, split, layout)
        self.mask_threshold = 0 if layout == "visa" else 127  # VisA's masks hold small labels, not 255
        self.image_size, self.resize = image_size, resize or image_size
        if self.resize < image_size:
            raise ValueError(f"resize ({self.resize}) must be >= image_size ({image_size})")

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        s = self.samples[i]
        img = load_image(s.image, self.image_size, self.resize)
        if s.mask is None:
            mask = torch.zeros(self.image_size, self.image_size, dtype=torch.bool)
        else:
            mask = load_mask(s.mask, self.image_size, self.resize, self.mask_threshold)
        return {"image": img, "mask": mask, "label": int(s.defect != "good"), "defect": s.defect,
                "path": str(s.image)}
