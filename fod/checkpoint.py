"""The checkpoint: format, atomic save, load with checks, and the random-number state for exact resumes.

A checkpoint (``checkpoint.pt``) holds everything needed to resume training bit for bit or to score
images: the configuration, the level models, the reference memories, the backbone (name, levels,
weights and where they came from), the preprocessing (interpolation, mean, std), the optimiser, every
RNG state, the history and timings, the decision thresholds (``calibration``: see fod.calibrate; None
when none were set), the number of processes and the global batch it was trained with (``world_size``,
``global_batch_size``: nothing else in it depends on the number of processes, and --resume continues it on
any number that keeps the global batch), and a SHA-256 of all of it (``sha256``, over the values: tensors
by dtype, shape and bytes) that is verified on load. Non-finite weights are never saved and refused on
load. Format v1 (no checksum, no preprocessing entry: bilinear resize, ImageNet normalisation) is still
read, with a note.
"""
from __future__ import annotations

import hashlib
import random
import warnings
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .backbone import Backbone
from .config import Config, from_dict, to_dict
from .data import IMAGENET_MEAN, IMAGENET_STD
from .files import atomic_save
from .model import FOD

CHECKPOINT_FORMAT = "fod-checkpoint-v2"
OLD_FORMATS = ("fod-checkpoint-v1",)
# what scoring needs; resuming also needs the optimiser and RNG states
REQUIRED = ("config", "epoch", "grids", "models", "memory", "backbone", "history")
REQUIRED_FOR_RESUME = ("optimizer", "rng", "train_seconds")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, empty, truncated, damaged, foreign or of another version."""


class NonFiniteError(RuntimeError):
    """Weights or losses that are NaN or infinite."""


def rng_state(gen: torch.Generator) -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "shuffle": gen.get_state()}


def set_rng_state(st: dict, gen: torch.Generator):
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if st.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])
    gen.set_state(st["shuffle"])


def seed_all(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _hash(h, obj):
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, np.ndarray):
        h.update(f"A{obj.dtype.str}{obj.shape}".encode())
        h.update(np.ascontiguousarray(obj).tobytes())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for k in sorted(obj, key=repr):
            h.update(repr(k).encode())
            _hash(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(f"{type(obj).__name__[0]}{len(obj)}".encode())
        for x in obj:
            _hash(h, x)
    elif obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        h.update(f"{type(obj).__name__}:{obj!r};".encode())
    else:
        raise TypeError(f"cannot checksum a {type(obj).__name__} in a checkpoint")


def digest(ck: dict) -> str:
    """SHA-256 over every value of the checkpoint except its ``sha256`` entry."""
    h = hashlib.sha256()
    _hash(h, {k: v for k, v in ck.items() if k != "sha256"})
    return h.hexdigest()


def nonfinite(tensors: dict) -> list[str]:
    """Names of the floating-point tensors that hold NaN or inf."""
    return [k for k, t in tensors.items()
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all()]


def save(path: Path, *, cfg: Config, fod: FOD, optimizer, gen: torch.Generator, epoch: int, history: list,
         train_seconds: float, compat: dict, extra: Optional[dict] = None):
    """Write the checkpoint atomically (the previous one stays whole until the new one is complete).
    Refuses (NonFiniteError) to write non-finite weights."""
    bb = fod.backbone
    models = fod.models.state_dict()
    bad = nonfinite(models) + [f"memory[{i}]" for i, m in enumerate(fod.memories) if not torch.isfinite(m).all()]
    if bad:
        raise NonFiniteError(f"the model holds NaN or infinite weights ({', '.join(bad[:5])}); not saved over "
                             f"{path}")
    ck = {"format": CHECKPOINT_FORMAT, "config": to_dict(cfg), "epoch": epoch,
          "grids": fod.grids, "models": models,
          "memory": [m.cpu() for m in fod.memories], "optimizer": optimizer.state_dict(),
          "backbone": {"name": bb.name, "levels": bb.levels, "weights_source": bb.weights_source,
                       "state_dict": bb.net.state_dict()},
          "preprocess": {"interpolation": cfg.interpolation, "mean": list(bb.mean), "std": list(bb.std)},
          "rng": rng_state(gen), "history": history, "train_seconds": train_seconds,
          "compat": compat, **(extra or {})}
    ck["sha256"] = digest(ck)
    atomic_save(ck, path)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def load_raw(path, *, resume: bool = False, log: Optional[Callable[[str], None]] = None) -> dict:
    """The checkpoint's dict, after checking that it is a complete, undamaged FOD checkpoint with finite
    weights. Every problem is a CheckpointError (or FileNotFoundError) naming the file."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder; give the checkpoint.pt file in it")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: it is truncated, damaged or not a PyTorch file "
                              f"({_first_line(exc)})") from None
    fmt = ck.get("format") if isinstance(ck, dict) else None
    if fmt != CHECKPOINT_FORMAT and fmt not in OLD_FORMATS:
        if isinstance(fmt, str) and fmt.startswith("fod-checkpoint-"):
            raise CheckpointError(f"checkpoint {path} has format {fmt!r}, which this version of fod does not read "
                                  f"(it reads {', '.join((CHECKPOINT_FORMAT, *OLD_FORMATS))}); use the fod "
                                  "version that wrote it")
        raise CheckpointError(f"{path} is not a FOD checkpoint (no format entry {CHECKPOINT_FORMAT!r}; "
                              "it holds " + (f"a dict with keys {', '.join(map(str, list(ck)[:8]))}"
                                             if isinstance(ck, dict) else f"a {type(ck).__name__}") + ")")
    missing = [k for k in REQUIRED + (REQUIRED_FOR_RESUME if resume else ()) if k not in ck]
    if fmt == CHECKPOINT_FORMAT:
        if "sha256" not in ck:
            missing.append("sha256")
        if missing:
            raise CheckpointError(f"checkpoint {path} is damaged: it lacks {', '.join(missing)}")
        try:
            ok = digest(ck) == ck["sha256"]
        except Exception:
            ok = False
        if not ok:
            raise CheckpointError(f"checkpoint {path} is damaged: its content does not match its SHA-256 checksum")
    else:
        if missing:
            raise CheckpointError(f"checkpoint {path} is damaged: it lacks {', '.join(missing)}")
        if log:
            log(f"fod: {path} is an old checkpoint ({fmt}): it has no checksum (not verified) and was trained with "
                "bilinear resizing and ImageNet normalisation, which are used for it")
    try:
        tensors = dict(ck["models"])
        tensors.update({f"memory[{i}]": m for i, m in enumerate(ck["memory"])})
        tensors.update({f"backbone.{k}": v for k, v in ck["backbone"]["state_dict"].items()})
        bad = nonfinite(tensors)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} is damaged ({_first_line(exc)})") from None
    if bad:
        raise CheckpointError(f"checkpoint {path} holds NaN or infinite weights: {', '.join(bad[:5])}")
    return ck


def config_of(ck: dict, path="checkpoint") -> Config:
    # checkpoints written before the embedding bias became an option had embeddings without one; those written
    # before calibration trained on every training image
    d = {"embed_bias": False, "val_fraction": 0.0, **ck["config"]}
    if "preprocess" not in ck:  # format v1: trained with bilinear resizing
        d.setdefault("interpolation", "bilinear")
    return from_dict(d, where=str(path))


def backbone_from_checkpoint(ck: dict, path="checkpoint") -> Backbone:
    info = ck["backbone"]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            bb = Backbone(info["name"], info["levels"], pretrained=False)
        bb.net.load_state_dict(info["state_dict"])
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path}: its backbone cannot be rebuilt ({_first_line(exc)})") from None
    bb.weights_source = info["weights_source"]
    pre = ck.get("preprocess") or {"mean": IMAGENET_MEAN.tolist(), "std": IMAGENET_STD.tolist()}
    bb.mean, bb.std = tuple(float(x) for x in pre["mean"]), tuple(float(x) for x in pre["std"])
    return bb


def load(path, device: str = "cpu", backend: Optional[str] = None, *, log=None) -> FOD:
    """The trained FOD bundle of a checkpoint, on ``device`` with ``backend`` (default: the saved one)."""
    ck = load_raw(path, log=log)
    cfg = config_of(ck, path)
    cfg.device = device
    if backend is not None:
        cfg.backend = backend
    bb = backbone_from_checkpoint(ck, path)
    try:
        fod = FOD(cfg, bb, ck["grids"], [m for m in ck["memory"]])
        fod.models.load_state_dict(ck["models"])
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path}: its model cannot be rebuilt ({_first_line(exc)})") from None
    fod.checkpoint = ck
    return fod.to_device(device)


def calibration_of(ck: dict) -> Optional[dict]:
    """The checkpoint's decision thresholds and normal score statistics (fod.calibrate), or None: trained with
    --val-fraction 0, or before thresholds existed."""
    return ck.get("calibration")
