"""The dataset layouts in one registry (as ``fod_kernels.BACKEND_TABLE`` is for the kernels): per layout, how a
category's images and masks are found, its training folder, its standard categories and its validation split.
``fod.data`` lists samples through it, ``fod.config`` takes the ``--dataset`` choices from it, ``fod.calibrate``
its validation split and ``fod.benchmark`` its categories. Listing needs only the file system (no image is read).
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Optional

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class Sample(NamedTuple):
    """One image of a split: its path, its defect type and its mask."""
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
    if d.exists() and not d.is_dir():
        raise NotADirectoryError(f"{what} directory {d} is a file, not a folder")
    if not d.is_dir():
        raise FileNotFoundError(f"{what} directory not found: {d}")
    return d


def _find_mask(gt_dir: Path, img: Path, suffixes=("_mask", "")) -> Path:
    for suf in suffixes:
        for ext in IMAGE_EXTS + tuple(e.upper() for e in IMAGE_EXTS):  # 000_mask.PNG too
            cand = gt_dir / f"{img.stem}{suf}{ext}"
            if cand.is_file():
                return cand
    expected = gt_dir / f"{img.stem}{suffixes[0]}.png"
    raise FileNotFoundError(f"missing ground-truth mask for {img}: expected {expected}")


def _mvtec_samples(root: Path, split: str) -> list[Sample]:
    """MVTec AD: train/good/*; test/<type>/*, masks ground_truth/<type>/<name>_mask.png."""
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


def _btad_samples(root: Path, split: str) -> list[Sample]:
    """BTAD: train/ok/*; test/ok|ko/*, masks ground_truth/ko/<name>.png (defect type "ko")."""
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


def _mvtec3d_samples(root: Path, split: str) -> list[Sample]:
    """MVTec 3D-AD (RGB): <split>/<type>/rgb/*.png, masks in <split>/<type>/gt/<same name>."""
    if split == "train":
        d = _require_dir(root / "train" / "good" / "rgb", "training (train/good/rgb)")
        return _nonempty([Sample(p, "good", None) for p in _images_in(d)], "train", d)
    test = _require_dir(root / "test", "test")
    return _nonempty(_typed_rgb(test), "test", test)


def _typed_rgb(d: Path) -> list[Sample]:
    out = []
    for tdir in sorted(p for p in d.iterdir() if p.is_dir()):
        rgb = _require_dir(tdir / "rgb", "rgb")
        for img in _images_in(rgb):
            mask = None if tdir.name == "good" else _find_mask(tdir / "gt", img, ("", "_mask"))
            out.append(Sample(img, tdir.name, mask))
    return out


def _mvtec3d_validation(d: Path) -> list[Sample]:
    """MVTec 3D-AD's validation split: <type>/rgb/*.png, masks <type>/gt/<name> for the defect types."""
    out = _typed_rgb(d)
    if not out:
        raise FileNotFoundError(f"the validation split {d} holds no images (<type>/rgb/*.png)")
    return out


VISA_SPLIT = Path("split_csv") / "1cls.csv"
VISA_COLUMNS = ("object", "split", "label", "image", "mask")


def _visa_samples(root: Path, split: str) -> list[Sample]:
    """VisA: the category is ``root`` (e.g. VisA/candle); its split is the rows of ROOT/split_csv/1cls.csv
    (columns object,split,label,image,mask; paths relative to ROOT) whose object is the category's name.
    Labels: "normal" or "anomaly" (the defect type is then "anomaly"); anomalies need a mask."""
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


def _visa_objects(root: Path) -> list[str]:
    """The objects of ROOT's split file that have a folder under ROOT."""
    path = root / VISA_SPLIT
    if not path.is_file():
        raise FileNotFoundError(f"VisA split file not found: {path} (the VisA layout needs "
                                f"ROOT/{VISA_SPLIT.as_posix()})")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if "object" not in (reader.fieldnames or []):
            raise ValueError(f"{path} has no 'object' column")
        objects = list(dict.fromkeys(r["object"] for r in reader))
    return [o for o in objects if (root / o).is_dir()]


# ----------------------------------------------------------------------------- the registry

@dataclass(frozen=True)
class Layout:
    """A dataset layout: how a category's samples are found, and what a dataset root holds."""
    name: str
    title: str
    samples: Callable[[Path, str], list]  # (category folder, "train" | "test") -> [Sample]
    train_folder: Optional[str]  # the normal training images in a category; None: the split file lists them
    categories: tuple  # the standard categories, in the paper's order
    validation: Optional[str] = None  # the dataset's own validation split in a category, if it has one
    validation_samples: Optional[Callable[[Path], list]] = None

    def present(self, root: Path) -> list[str]:
        """The categories under a dataset root (sorted; VisA: in the split file's order)."""
        if self.train_folder is None:
            return _visa_objects(root)
        return sorted(d.name for d in root.iterdir() if d.is_dir() and (d / self.train_folder).is_dir())

    def looked_for(self) -> str:
        """What ``present`` looks for, for messages."""
        return "objects of the split file with a folder" if self.train_folder is None else \
            f"sub-folders with {self.train_folder}/"


LAYOUTS = {layout.name: layout for layout in (
    Layout("mvtec", "MVTec AD", _mvtec_samples, "train/good",
           ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill", "screw",
            "tile", "toothbrush", "transistor", "wood", "zipper")),
    Layout("btad", "BTAD", _btad_samples, "train/ok", ("01", "02", "03")),
    Layout("mvtec3d", "MVTec 3D-AD (RGB)", _mvtec3d_samples, "train/good/rgb",
           ("bagel", "cable_gland", "carrot", "cookie", "dowel", "foam", "peach", "potato", "rope", "tire"),
           validation="validation", validation_samples=_mvtec3d_validation),
    Layout("visa", "VisA", _visa_samples, None,
           ("candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1", "pcb2", "pcb3",
            "pcb4", "pipe_fryum")),
)}


def list_samples(root, split: str, layout: str = "mvtec") -> list[Sample]:
    """The (image, defect type, mask) triples of one split ("train" or "test") of a category."""
    root = Path(root)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown dataset layout {layout!r}; choose one of {tuple(LAYOUTS)}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    _require_dir(root, "dataset")
    return LAYOUTS[layout].samples(root, split)
