"""Datasets in the MVTec AD, BTAD, MVTec 3D-AD (RGB) and VisA (split CSV) layouts (listed through the registry
of ``fod.layouts``), the preprocessing of images and masks, and the evaluation-order ``loader``.

Each dataset lists (image path, defect type, mask path or None) triples at
construction, so a missing mask or an empty split fails at once with the file
or directory named; images are read lazily and an unreadable one fails naming
the file (``check_split`` reads a whole split up front).

Preprocessing (``Preprocess``): the shorter side is resized to ``resize``
keeping the aspect ratio (Lanczos by default, as the authors' code; bilinear or
bicubic on request), then the centre ``image_size`` x ``image_size`` is cut
out, and the pixels in 0..1 are normalised with the backbone's mean and std.
Pixels are read at their true depth: 8-bit (grey, RGB(A), palette) as /255,
16-bit grey (``I;16``, ``I;16B``, ``I``) as /65535, float grey (``F``) as
given (it must lie in 0..1); 48-bit RGB is read by Pillow at 8-bit precision;
grey images are repeated to three channels. Masks follow the same geometry
(nearest neighbour), must have their image's size, and any non-zero pixel is
a defect pixel (0/1 and 0/255 masks are the same mask). Images and masks are read as viewers show them, their
EXIF orientation applied; an image larger than ``max_pixels()`` (--max-pixels, by default Pillow's
decompression-bomb limit) is refused from its header, before it is decoded.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from .config import INTERPOLATIONS
from .layouts import list_samples

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
LOSSY_EXTS = (".jpg", ".jpeg")
RESAMPLE = {name: getattr(Image, name.upper()) for name in INTERPOLATIONS}  # the PIL filter of each name

MAX_PIXELS_ENV = "FOD_MAX_PIXELS"  # set by --max-pixels; read in DataLoader worker processes too
TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def max_pixels() -> int:
    """The largest image (width x height) fod opens: --max-pixels, by default Pillow's decompression-bomb limit."""
    return int(os.environ.get(MAX_PIXELS_ENV) or Image.MAX_IMAGE_PIXELS)


def _open_checked(path: Path) -> Image.Image:
    """Image.open with fod's own pixel limit, checked from the header before any pixel is decoded, and one clear
    error instead of Pillow's DecompressionBombWarning (printed raw) or DecompressionBombError."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            im = Image.open(path)
        except Exception as exc:
            raise ValueError(f"cannot read image {path}: {exc}") from exc
        finally:
            Image.MAX_IMAGE_PIXELS = saved
    w, h = im.size
    if w * h > max_pixels():
        im.close()
        raise ValueError(f"image {path} has {w} x {h} = {w * h} pixels, more than the limit of {max_pixels()} "
                         "(a decompression bomb?); if you trust it, raise --max-pixels")
    return im


def _open(path: Path) -> Image.Image:
    """The image as viewers show it: its EXIF orientation applied (a phone photo stored sideways is upright)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder, not an image file")
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    im = _open_checked(path)
    try:
        with im:
            im.load()
            return ImageOps.exif_transpose(im)
    except Exception as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from exc


def image_size_of(path) -> tuple[int, int]:
    """(width, height) as viewers show it (EXIF orientation applied), from the file's header; an unreadable or
    too large file is an error naming it."""
    im = _open_checked(path)
    with im:
        w, h = im.size
        try:
            turned = im.getexif().get(0x0112) in TRANSPOSED  # 0x0112: the Orientation tag
        except Exception:
            turned = False
        return (h, w) if turned else (w, h)


def _pixels(im: Image.Image, path) -> Image.Image:
    """An 8-bit "RGB" image, or for 16-bit and float grey images an "F" image with values in 0..1."""
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(im)
        lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
        if lo < 0 or hi > 65535:
            raise ValueError(f"cannot read image {path}: {mode} pixels in [{lo}, {hi}]; integer grey images are read "
                             "as 16-bit (0..65535)")
        return Image.fromarray(arr.astype(np.float32) / 65535.0, mode="F")
    if mode == "F":
        arr = np.asarray(im, np.float32)
        if not np.isfinite(arr).all() or (arr.size and (arr.min() < 0 or arr.max() > 1)):
            raise ValueError(f"cannot read image {path}: float pixels must be finite and in 0..1, got "
                             f"[{np.nanmin(arr)}, {np.nanmax(arr)}]")
        return im
    return im.convert("RGB")


def _mask_pixels(im: Image.Image, path) -> np.ndarray:
    """bool (H, W): any non-zero pixel (any colour channel; alpha ignored) is a defect pixel."""
    if Path(path).suffix.lower() in LOSSY_EXTS:
        raise ValueError(f"mask {path} is a JPEG: lossy compression smears the defect boundary into "
                         "non-zero noise; store masks losslessly (PNG, BMP or TIFF)")
    mode = im.mode
    if mode in ("1", "L", "I", "F") or mode.startswith("I;16"):
        arr = np.asarray(im)
        if mode == "F" and not np.isfinite(arr).all():
            raise ValueError(f"mask {path} holds NaN or infinite values")
        return arr != 0
    if mode in ("LA", "La"):
        return np.asarray(im.convert("L")) != 0
    return (np.asarray(im.convert("RGB")) != 0).any(axis=-1)


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side to ``resize`` (default ``image_size``) keeping the aspect ratio, cut out the
    centre ``image_size`` x ``image_size``, normalise with ``mean`` and ``std``."""
    image_size: int = 256
    resize: Optional[int] = None
    interpolation: str = "lanczos"
    mean: tuple = tuple(float(x) for x in IMAGENET_MEAN)
    std: tuple = tuple(float(x) for x in IMAGENET_STD)

    def __post_init__(self):
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"unknown interpolation {self.interpolation!r}; choose one of {tuple(INTERPOLATIONS)}")
        if self.resize is None:
            object.__setattr__(self, "resize", self.image_size)
        if self.resize < self.image_size:
            raise ValueError(f"resize ({self.resize}) must be >= image_size ({self.image_size})")
        object.__setattr__(self, "mean", tuple(float(x) for x in self.mean))
        object.__setattr__(self, "std", tuple(float(x) for x in self.std))

    def describe(self) -> str:
        s = self.image_size
        return (f"shorter side resized to {self.resize} px keeping the aspect ratio ({self.interpolation}), "
                f"centre {s}x{s} crop, normalised with mean {tuple(round(x, 4) for x in self.mean)} "
                f"std {tuple(round(x, 4) for x in self.std)}")

    def _geometry(self, im: Image.Image, resample) -> Image.Image:
        w, h = im.size
        r, c = self.resize, self.image_size
        size = (r, int(r * h / w)) if w <= h else (int(r * w / h), r)  # the shorter side becomes r
        im = im.resize(size, resample)
        x0, y0 = (size[0] - c) // 2, (size[1] - c) // 2
        return im.crop((x0, y0, x0 + c, y0 + c))

    def _normalize(self, im: Image.Image) -> torch.Tensor:
        if im.mode == "F":
            grey = np.clip(np.asarray(im, np.float32), 0, 1)
            arr = np.repeat(grey[..., None], 3, axis=2)
        else:
            arr = np.asarray(im, np.float32) / 255.0
        arr = (arr - np.array(self.mean, np.float32)) / np.array(self.std, np.float32)
        return torch.from_numpy(arr.transpose(2, 0, 1).copy())

    def image(self, path) -> torch.Tensor:
        """One image as a normalised float tensor (3, image_size, image_size)."""
        path = Path(path)
        return self._normalize(self._geometry(_pixels(_open(path), path), RESAMPLE[self.interpolation]))

    def mask(self, path, image_size: Optional[tuple] = None) -> torch.Tensor:
        """A mask as bool (image_size, image_size); ``image_size`` (w, h) of its image, checked if given."""
        path = Path(path)
        im = _open(path)
        if image_size is not None and im.size != tuple(image_size):
            raise ValueError(f"mask {path} is {im.size[0]}x{im.size[1]} pixels but its image is "
                             f"{image_size[0]}x{image_size[1]}: a mask must have its image's size")
        m = Image.fromarray(_mask_pixels(im, path).astype(np.uint8) * 255)
        return torch.from_numpy(np.asarray(self._geometry(m, Image.NEAREST)) > 0)

    def image_and_mask(self, path, mask_path) -> tuple[torch.Tensor, torch.Tensor]:
        path = Path(path)
        im = _open(path)
        img = self._normalize(self._geometry(_pixels(im, path), RESAMPLE[self.interpolation]))
        return img, self.mask(mask_path, im.size)

    def denormalize(self, img: torch.Tensor) -> np.ndarray:
        """(3, H, W) normalised tensor -> (H, W, 3) float array in [0, 1]."""
        arr = img.detach().cpu().numpy().transpose(1, 2, 0) * np.array(self.std, np.float32) \
            + np.array(self.mean, np.float32)
        return np.clip(arr, 0, 1)


def load_image(path, image_size: int = 256, resize: Optional[int] = None, *, interpolation: str = "lanczos",
               mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """One image as a normalised float tensor (3, image_size, image_size)."""
    return Preprocess(image_size, resize, interpolation, tuple(mean), tuple(std)).image(path)


def load_mask(path, image_size: int = 256, resize: Optional[int] = None) -> torch.Tensor:
    return Preprocess(image_size, resize).mask(path)


def denormalize(img: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """(3, H, W) normalised tensor -> (H, W, 3) float array in [0, 1]."""
    arr = img.detach().cpu().numpy().transpose(1, 2, 0) * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
    return np.clip(arr, 0, 1)


class AnomalyDataset(Dataset):
    """Items: dict(image (3,S,S) float, mask (S,S) bool, label 0/1, defect str, path str)."""

    def __init__(self, root, split: str, layout: str = "mvtec", image_size: int = 256,
                 resize: Optional[int] = None, *, interpolation: str = "lanczos", mean=IMAGENET_MEAN,
                 std=IMAGENET_STD, pre: Optional[Preprocess] = None):
        self.samples = list_samples(root, split, layout)
        self.root, self.split = Path(root), split
        self.pre = pre or Preprocess(image_size, resize, interpolation, tuple(mean), tuple(std))
        self.image_size, self.resize = self.pre.image_size, self.pre.resize

    def __len__(self):
        return len(self.samples)

    def image(self, i: int) -> torch.Tensor:
        return self.pre.image(self.samples[i].image)

    def __getitem__(self, i):
        s = self.samples[i]
        if s.mask is None:
            img = self.pre.image(s.image)
            mask = torch.zeros(self.image_size, self.image_size, dtype=torch.bool)
        else:
            img, mask = self.pre.image_and_mask(s.image, s.mask)
        return {"image": img, "mask": mask, "label": int(s.defect != "good"), "defect": s.defect,
                "path": str(s.image)}


def scan_sizes(ds: AnomalyDataset) -> int:
    """Read every image's header (an unreadable file fails naming it); returns how many are not square."""
    n = 0
    for s in ds.samples:
        w, h = image_size_of(s.image)
        n += w != h
    return n


def check_split(ds: AnomalyDataset, need_both_classes: bool = True) -> None:
    """Read every image and mask of a split (errors name the file); with ``need_both_classes``, require
    normal and defective images and at least one defect pixel after the crop (AUROC and AUPRO need them)."""
    labels, defect_pixels = set(), 0
    for i in range(len(ds)):
        item = ds[i]
        labels.add(item["label"])
        defect_pixels += int(item["mask"].sum())
    if need_both_classes:
        if labels != {0, 1}:
            have = "only normal" if labels == {0} else "only defective"
            raise ValueError(f"the {ds.split} split of {ds.root} holds {have} images; image AUROC needs both "
                             "normal and defective test images")
        if defect_pixels == 0:
            raise ValueError(f"no mask of the {ds.split} split of {ds.root} has a defect pixel inside the centre crop; "
                             "pixel AUROC and AUPRO need some")


def loader(ds, cfg, batch_size: int):
    """The evaluation-order (unshuffled) DataLoader of a dataset."""
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=cfg.num_workers)
