"""The Python API: ``fod.Detector``.

    from fod import Detector
    det = Detector.fit("mvtec/bottle", output="runs/bottle")   # or Detector.load("runs/bottle/checkpoint.pt")
    for p in det.predict(["a.png", "b.png"]):
        print(p.source, p.score, p.normalized_score, p.anomalous, p.mask.sum())

``Detector.fit(data_dir, output=None, **config)`` trains (``config``: any ``fod.config.Config`` field, e.g.
``epochs=10, backbone="resnet18"``; the same run as ``fod train``) and returns the trained detector; without
``output`` the run folder is temporary and removed (``detector.save(path)`` keeps the checkpoint).
``Detector.load(checkpoint)`` reads a checkpoint. ``detector.predict(images)`` is a generator of
``Prediction`` records, one per image in input order; it holds one batch at a time, so a long list (or any
iterable) costs bounded memory. ``detector.predict_one(image)`` returns one record. An image that cannot be
read: ``errors="raise"`` (default) yields the images before it, then raises naming it; ``errors="skip"`` leaves
it out, warns and lists it in ``detector.skipped``.

Inputs, one image or an iterable of images (mixed kinds allowed):

- a path (str or ``pathlib.Path``): read and preprocessed exactly as ``fod predict`` does;
- a PIL image: the same, from its pixels (its EXIF orientation applied, as for a file);
- a ``torch.Tensor`` (3, H, W) RGB or (1, H, W) grey, channels first, or a batch (N, C, H, W): an *image*,
  not a normalised one: uint8 in 0..255, or floating point in 0..1. It goes through the checkpoint's
  preprocessing (resize of the shorter side, centre crop, normalisation) as a file would; uint8 tensors give
  exactly the results of a PNG with those pixels, float tensors are resized in float precision (PIL "F").
  Values outside the range are an error (an already normalised tensor would be one);
- a ``numpy.ndarray`` (H, W, 3) or (H, W), channels last as PIL's (RGB: convert OpenCV's BGR first), or a
  batch (N, H, W, 3): the same rules;
- with ``preprocessed=True``: float tensors (3, S, S) or (N, 3, S, S), S = the image size, already resized,
  cropped and normalised (``detector.preprocess``; the exported model's input, see fod.export).

Each ``Prediction``: ``source`` (the path, or "<tensor 3>" etc. by position), ``score`` (the image score: max
of the sigma-4 Gaussian-filtered anomaly map), ``normalized_score`` (in [0, 1], 0.5 at the image threshold;
fod.calibrate), ``anomalous`` (score > image threshold), ``anomaly_map`` (S, S) float32, ``mask`` (S, S)
bool (map > pixel threshold). Without thresholds in the checkpoint (trained with ``val_fraction=0``)
``normalized_score``, ``anomalous`` and ``mask`` are None.
"""
from __future__ import annotations

import itertools
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np
import torch
from PIL import Image, ImageOps

from . import calibrate
from .checkpoint import calibration_of
from .checkpoint import load as load_checkpoint
from .checkpoint import write as write_checkpoint
from .config import Config, apply_compat_defaults, check_device, check_run_options, from_dict
from .metrics import image_scores
from .data import RESAMPLE, Preprocess, _pixels

__all__ = ["Detector", "Prediction"]


@dataclass
class Prediction:
    source: str
    score: float
    normalized_score: Optional[float]
    anomalous: Optional[bool]
    anomaly_map: np.ndarray
    mask: Optional[np.ndarray]


def _float_image(arr: np.ndarray, pre: Preprocess) -> torch.Tensor:
    """(H, W, 3) or (H, W) float32 in 0..1 -> normalised (3, S, S), resized per channel as PIL "F" images."""
    resample = RESAMPLE[pre.interpolation]
    chans = [arr] if arr.ndim == 2 else [arr[..., c] for c in range(3)]
    out = [np.asarray(pre._geometry(Image.fromarray(np.ascontiguousarray(c, np.float32), mode="F"), resample),
                      np.float32) for c in chans]
    rgb = np.clip(np.stack(out * 3 if len(out) == 1 else out, axis=-1), 0, 1)
    rgb = (rgb - np.array(pre.mean, np.float32)) / np.array(pre.std, np.float32)
    return torch.from_numpy(rgb.transpose(2, 0, 1).copy())


def _array_image(arr: np.ndarray, source: str, pre: Preprocess) -> torch.Tensor:
    """An image as a channels-last array (H, W[, 1|3]), uint8 0..255 or float 0..1 -> normalised (3, S, S)."""
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] != 3) or 0 in arr.shape:
        raise ValueError(f"{source}: an image must be (H, W, 3) RGB or (H, W) grey (tensors: (3, H, W) or "
                         f"(1, H, W)), got shape {arr.shape}")
    if arr.dtype == np.uint8:
        im = Image.fromarray(np.ascontiguousarray(arr), mode="RGB" if arr.ndim == 3 else "L")
        return pre._normalize(pre._geometry(_pixels(im, source), RESAMPLE[pre.interpolation]))
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{source}: image pixels must be uint8 (0..255) or floating point (0..1), got {arr.dtype}")
    arr = arr.astype(np.float32)
    lo, hi = float(np.min(arr)), float(np.max(arr))
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0 or hi > 1:
        raise ValueError(f"{source}: float pixels must be finite and in 0..1, got [{lo:.4g}, {hi:.4g}] (an image "
                         "is not normalised; for a tensor already resized and normalised pass preprocessed=True)")
    return _float_image(arr, pre)


class Detector:
    """A trained FOD model with its preprocessing and decision thresholds (see the module doc)."""

    def __init__(self, fod, *, batch_size: int = 8, amp: bool = False, num_workers: int = 0,
                 checkpoint_path: Optional[str] = None):
        self.fod = fod.eval()
        self.preprocess: Preprocess = fod.preprocess()
        self.batch_size, self.amp, self.num_workers = batch_size, amp, num_workers
        self.checkpoint_path = checkpoint_path
        self.calibration: Optional[dict] = calibration_of(fod.checkpoint)
        self.metrics: Optional[dict] = None  # fit(): the training run's test-set metrics
        self.skipped: list[tuple[str, str]] = []  # predict(errors="skip"): (source, reason) left out by the last call

    # ------------------------------------------------------------------ construction

    @classmethod
    def load(cls, checkpoint, *, device: str = "cpu", backend: Optional[str] = None, batch_size: int = 8,
             amp: bool = False, num_workers: int = 0, log=None) -> "Detector":
        """The detector of a checkpoint.pt, on ``device`` with the kernel ``backend`` (default: the saved one)."""
        check_run_options(Config(device=device, amp=bool(amp), num_workers=num_workers), batch_size)
        check_device(device)
        fod = load_checkpoint(checkpoint, device, backend, log=log)
        fod.cfg.amp, fod.cfg.num_workers, fod.cfg.batch_size = bool(amp), num_workers, batch_size
        return cls(fod, batch_size=batch_size, amp=bool(amp), num_workers=num_workers,
                   checkpoint_path=str(checkpoint))

    @classmethod
    def fit(cls, data_dir, output=None, *, overwrite: bool = False, resume: bool = False, log=None,
            **config) -> "Detector":
        """Train on ``data_dir`` (a category folder; ``dataset=`` its layout) with ``config`` (Config fields) as
        ``fod train`` does, writing the run into ``output`` (default: a temporary folder, removed afterwards),
        and return the trained detector (``detector.metrics``: the run's test-set metrics)."""
        from .report import say
        from .train import train  # here: fod.train's own imports load only when a Detector trains
        if "data" in config:
            raise ValueError("Detector.fit: give the data folder as the first argument, not data=")
        if output is None and (overwrite or resume):
            raise ValueError("Detector.fit: overwrite/resume need an output folder")
        values = {**config, "data": str(data_dir)}
        apply_compat_defaults(values, set(config))
        cfg = from_dict(values, where="Detector.fit").check()
        log = log or say
        tmp = Path(tempfile.mkdtemp(prefix="fod-fit-")) if output is None else None
        run = tmp / "run" if tmp is not None else Path(output)
        try:
            metrics = train(cfg, run, resume=resume, overwrite=overwrite, log=log)
            det = cls.load(run / "checkpoint.pt", device=cfg.device, backend=cfg.backend, batch_size=cfg.batch_size,
                           amp=cfg.amp, num_workers=cfg.num_workers)
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        if tmp is not None:
            det.checkpoint_path = None
        det.metrics = metrics
        return det

    def save(self, path) -> Path:
        """Write the checkpoint (as trained, checksummed) to ``path`` atomically."""
        path = Path(path)
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a folder; give the checkpoint file name, e.g. {path}/checkpoint.pt")
        write_checkpoint(self.fod.checkpoint, path)
        return path

    # ------------------------------------------------------------------ properties

    @property
    def device(self) -> str:
        return self.fod.cfg.device

    @property
    def image_size(self) -> int:
        return self.preprocess.image_size

    @property
    def image_threshold(self) -> Optional[float]:
        return self.calibration["image_threshold"] if self.calibration else None

    @property
    def pixel_threshold(self) -> Optional[float]:
        return self.calibration["pixel_threshold"] if self.calibration else None

    def normalize(self, scores):
        """Image scores -> normalised scores in [0, 1] (0.5 at the image threshold); None without thresholds."""
        return None if not self.calibration else calibrate.normalize(scores, self.calibration["normalization"])

    # ------------------------------------------------------------------ prediction

    def _check_preprocessed(self, t: torch.Tensor, source: str) -> torch.Tensor:
        S = self.image_size
        if tuple(t.shape) != (3, S, S) or not t.is_floating_point():
            raise ValueError(f"{source}: a preprocessed image is a float tensor (3, {S}, {S}) (this model's image "
                             f"size), got {t.dtype} {tuple(t.shape)}")
        if not torch.isfinite(t).all():
            raise ValueError(f"{source}: the preprocessed tensor holds NaN or infinite values")
        return t.float().cpu()

    def _items(self, images, preprocessed: bool) -> Iterator[tuple[str, object]]:
        """(source, loader) per image; the loader returns the normalised (3, S, S) tensor."""
        pre = self.preprocess
        counter = itertools.count()

        def leaf(x):
            i = next(counter)
            if isinstance(x, torch.Tensor):
                src = f"<tensor {i}>"
                if x.dim() != 3:
                    raise ValueError(f"{src}: a tensor image is (C, H, W) or a batch (N, C, H, W), got shape "
                                     f"{tuple(x.shape)}")
                if preprocessed:
                    return src, lambda: self._check_preprocessed(x, src)
                if x.shape[0] not in (1, 3):
                    raise ValueError(f"{src}: a tensor image has 3 (RGB) or 1 (grey) channels first, got shape "
                                     f"{tuple(x.shape)}")
                return src, lambda: _array_image(x.detach().cpu().permute(1, 2, 0).numpy(), src, pre)
            if preprocessed:
                raise ValueError(f"preprocessed=True takes torch tensors (3, S, S) or (N, 3, S, S) only, got a "
                                 f"{type(x).__name__}")
            if isinstance(x, (str, Path)):
                p = Path(x)
                return str(x), lambda: pre.image(p)
            if isinstance(x, Image.Image):
                src = f"<PIL image {i}>"
                return src, lambda: pre._normalize(pre._geometry(_pixels(ImageOps.exif_transpose(x), src),
                                                                 RESAMPLE[pre.interpolation]))
            src = f"<array {i}>"
            return src, lambda: _array_image(x, src, pre)

        def expand(x, top: bool):
            if isinstance(x, (torch.Tensor, np.ndarray)) and x.ndim == 4:
                yield from (leaf(t) for t in x)
            elif isinstance(x, (str, Path, Image.Image, torch.Tensor, np.ndarray)):
                yield leaf(x)
            elif top and isinstance(x, Iterable):
                for y in x:
                    yield from expand(y, False)
            else:
                raise TypeError(f"cannot predict on a {type(x).__name__}: give image paths, PIL images, tensors "
                                "(C, H, W) / (N, C, H, W) or arrays (H, W, C) / (N, H, W, C), or an iterable of them")
        yield from expand(images, True)

    @torch.no_grad()
    def score_batch(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(anomaly maps (N, S, S) float32, image scores (N,) float64) of a preprocessed batch (N, 3, S, S)."""
        maps = self.fod.anomaly_maps(batch.to(self.device), amp=self.amp).float().cpu().numpy()
        return maps, image_scores(maps)

    def _records(self, sources, batch) -> list[Prediction]:
        maps, scores = self.score_batch(torch.stack(batch))
        cal = self.calibration
        norm = self.normalize(scores)
        return [Prediction(source=s, score=float(scores[i]),
                           normalized_score=None if cal is None else float(norm[i]),
                           anomalous=None if cal is None else bool(scores[i] > cal["image_threshold"]),
                           anomaly_map=maps[i], mask=None if cal is None else maps[i] > cal["pixel_threshold"])
                for i, s in enumerate(sources)]

    def predict(self, images, *, preprocessed: bool = False, batch_size: Optional[int] = None,
                errors: str = "raise") -> Iterator[Prediction]:
        """A generator of one ``Prediction`` per image, in input order, ``batch_size`` images at a time (see the
        module doc for the inputs). Errors name the image (its path, or its position).

        An image that cannot be read or preprocessed (a broken file, pixels out of range): with ``errors="raise"``
        (the default) the images before it are yielded first, then its error is raised; with ``errors="skip"`` it
        is left out (a warning names it, and ``detector.skipped`` lists (source, reason) of this call) and the
        others go on. A wrong kind of input (not an image, a tensor of the wrong shape) raises in both modes."""
        if errors not in ("raise", "skip"):
            raise ValueError(f'errors must be "raise" or "skip", got {errors!r}')
        bs = self.batch_size if batch_size is None else batch_size
        check_run_options(Config(), bs)
        self.skipped = []
        if (self.num_workers and not preprocessed and isinstance(images, (list, tuple))
                and all(isinstance(x, (str, Path)) for x in images)):
            return self._predict(self._worker_items(list(images), bs), bs, errors)
        return self._predict(self._items(images, preprocessed), bs, errors)

    def _predict(self, items, bs: int, errors: str) -> Iterator[Prediction]:
        sources, batch = [], []
        for src, load in items:
            try:
                image = load()
            except (OSError, ValueError) as exc:
                if errors == "raise":
                    if batch:  # the valid images read so far keep their results
                        yield from self._records(sources, batch)
                    raise
                self.skipped.append((src, str(exc)))
                warnings.warn(f"fod: skipped {src}: {exc}", stacklevel=2)
                continue
            sources.append(src)
            batch.append(image)
            if len(batch) == bs:
                yield from self._records(sources, batch)
                sources, batch = [], []
        if batch:
            yield from self._records(sources, batch)

    def _worker_items(self, paths: list, bs: int) -> Iterator[tuple[str, object]]:
        """(source, loader) per path, the images read by ``num_workers`` worker processes (a worker's error is
        raised by the loader, in order)."""
        pre = self.preprocess

        class _Paths(torch.utils.data.Dataset):
            def __len__(self):
                return len(paths)

            def __getitem__(self, i):
                try:
                    return pre.image(paths[i]), None
                except (OSError, ValueError) as exc:
                    return None, f"{exc}"

        def fail(msg):
            raise ValueError(msg)
        dl = torch.utils.data.DataLoader(_Paths(), batch_size=bs, shuffle=False, num_workers=self.num_workers,
                                         collate_fn=list)
        i = 0
        for got in dl:
            for image, err in got:
                yield str(paths[i]), ((lambda m=err: fail(m)) if err is not None else (lambda t=image: t))
                i += 1

    def predict_one(self, image, *, preprocessed: bool = False) -> Prediction:
        """The ``Prediction`` of one image."""
        out = list(self.predict([image], preprocessed=preprocessed, batch_size=1))
        if len(out) != 1:
            raise ValueError(f"predict_one takes one image, got {len(out)}")
        return out[0]
