"""The checkpoint: format, atomic save, load with checks, and the random-number state for exact resumes.

A checkpoint (``checkpoint.pt``) holds everything needed to resume training bit for bit or to score
images: the configuration, the level models, the reference memories, the backbone (name, levels,
weights and where they came from), the optimiser, every RNG state, the history and timings.
"""
from __future__ import annotations

import random
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .backbone import Backbone
from .config import Config, from_dict, to_dict
from .files import atomic_save
from .model import FOD

CHECKPOINT_FORMAT = "fod-checkpoint-v1"


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


def save(path: Path, *, cfg: Config, fod: FOD, optimizer, gen: torch.Generator, epoch: int, history: list,
         train_seconds: float, compat: dict, extra: Optional[dict] = None):
    """Write the checkpoint atomically (the previous one stays whole until the new one is complete)."""
    bb = fod.backbone
    atomic_save({"format": CHECKPOINT_FORMAT, "config": to_dict(cfg), "epoch": epoch,
                 "grids": fod.grids, "models": fod.models.state_dict(),
                 "memory": [m.cpu() for m in fod.memories], "optimizer": optimizer.state_dict(),
                 "backbone": {"name": bb.name, "levels": bb.levels, "weights_source": bb.weights_source,
                              "state_dict": bb.net.state_dict()},
                 "rng": rng_state(gen), "history": history, "train_seconds": train_seconds,
                 "compat": compat, **(extra or {})}, path)


def load_raw(path) -> dict:
    """The checkpoint's dict, after checking that it is one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ck = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a FOD checkpoint (format {CHECKPOINT_FORMAT})")
    return ck


def config_of(ck: dict, path="checkpoint") -> Config:
    # checkpoints written before the embedding bias became an option had embeddings without one
    return from_dict({"embed_bias": False, **ck["config"]}, where=str(path))


def backbone_from_checkpoint(ck: dict) -> Backbone:
    info = ck["backbone"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        bb = Backbone(info["name"], info["levels"], pretrained=False)
    bb.net.load_state_dict(info["state_dict"])
    bb.weights_source = info["weights_source"]
    return bb


def load(path, device: str = "cpu", backend: Optional[str] = None) -> FOD:
    """The trained FOD bundle of a checkpoint, on ``device`` with ``backend`` (default: the saved one)."""
    ck = load_raw(path)
    cfg = config_of(ck, path)
    cfg.device = device
    if backend is not None:
        cfg.backend = backend
    fod = FOD(cfg, backbone_from_checkpoint(ck), ck["grids"], [m for m in ck["memory"]])
    fod.models.load_state_dict(ck["models"])
    fod.checkpoint = ck
    return fod.to_device(device)
