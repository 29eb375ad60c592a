"""The checkpoint: format, atomic save, load with checks, and the random-number state for exact resumes.

A checkpoint (``checkpoint.pt``) holds everything needed to resume training bit for bit or to score
images: the configuration, the level models, the reference memories, the backbone (name, levels,
weights and where they came from), the preprocessing (interpolation, mean, std), the optimiser, every
RNG state, the history and timings, the decision thresholds (``calibration``: see fod.calibrate; None
when none were set), the number of processes and the global batch it was trained with (``world_size``,
``global_batch_size``: nothing else in it depends on the number of processes, and --resume continues it on
any number that keeps the global batch). Non-finite weights are never saved and refused on load.

File format (v3, docs/SECURITY.md): fod.safeformat, a first line ``fod-checkpoint-v3 sha256=<digest>`` and a
safetensors payload whose metadata holds the plain data as JSON; reading it runs no unpickler, and the
SHA-256 is verified before any byte of it is parsed. The loaded dict's ``sha256`` is that digest. Checkpoints
of earlier versions (v1, v2: torch.save pickles, which can run code when read) are refused with the command
that converts a trusted one (``fod checkpoint upgrade OLD NEW --trust``, fod.upgrade).
"""
from __future__ import annotations

import dataclasses
import math
import random
import warnings
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from . import safeformat
from .backbone import Backbone
from .config import Config, check_config, from_dict, to_dict
from .files import atomic_write
from .model import FOD

CHECKPOINT_FORMAT = "fod-checkpoint-v3"
PICKLED_FORMATS = ("fod-checkpoint-v1", "fod-checkpoint-v2")  # fod.upgrade converts them
# what scoring needs; resuming also needs the optimiser and RNG states
REQUIRED = ("config", "epoch", "grids", "models", "memory", "backbone", "preprocess", "history")
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
    write(ck, path)


def write(ck: dict, path):
    """Write the checkpoint dict ``ck`` atomically in the current format (its ``sha256`` entry, if any, is
    recomputed: it is the file's digest). Encoded in memory first, so a write fails before the file is touched."""
    raw = safeformat.dumps(CHECKPOINT_FORMAT, {k: v for k, v in ck.items() if k != "sha256"})
    atomic_write(path, lambda f: f.write(raw))


def upgrade_hint(path) -> str:
    return f"fod checkpoint upgrade {path} NEW.pt --trust"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def check_format(raw: bytes, path) -> tuple[str, str]:
    """(format, digest) of a checkpoint file's first line; a CheckpointError naming the file for anything other
    than the current format (a pickle of an earlier version: the conversion command). Parses nothing."""
    head = safeformat.header(raw)
    if head is None:
        if raw[:2] == b"PK" or raw[:1] == b"\x80":  # torch.save's zip, or a raw pickle: never unpickled
            if b"fod-checkpoint-v" in raw:
                raise CheckpointError(
                    f"checkpoint {path} is in the pickle format of an earlier fod version, which can run code when "
                    f"read, and is not loaded; if you trust where it came from, convert it once: "
                    f"{upgrade_hint(path)}")
            raise CheckpointError(f"{path} is not a FOD checkpoint (it is a pickle file, which fod does not read: "
                                  "unpickling can run code)")
        if raw.startswith(b"fod-checkpoint-"):
            raise CheckpointError(f"checkpoint {path} is damaged: its first line is cut or altered")
        raise CheckpointError(f"{path} is not a FOD checkpoint (it does not start with "
                              f"'{CHECKPOINT_FORMAT} sha256=')")
    if head[0] != CHECKPOINT_FORMAT:
        if head[0].startswith("fod-checkpoint-"):
            raise CheckpointError(f"checkpoint {path} has format {head[0]!r}, which this version of fod does not "
                                  f"read (it reads {CHECKPOINT_FORMAT}); use the fod version that wrote it")
        raise CheckpointError(f"{path} is not a FOD checkpoint (it is a {head[0]!r} file)")
    return head


def _tensor_dict(d) -> bool:
    return isinstance(d, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items())


def _numbers(x, n: int) -> bool:
    return isinstance(x, (list, tuple)) and len(x) == n and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in x)


def _malformed(ck: dict) -> Optional[str]:
    """What in a checkpoint's parsed data has the wrong kind (a file with a valid checksum written by other
    code), or None. Shapes against the model are checked when it is rebuilt (restore())."""
    bb, pre = ck["backbone"], ck["preprocess"]
    checks = (
        ("config", isinstance(ck["config"], dict)),
        ("epoch", isinstance(ck["epoch"], int) and not isinstance(ck["epoch"], bool) and ck["epoch"] >= 0),
        ("grids", isinstance(ck["grids"], (list, tuple)) and len(ck["grids"]) > 0 and all(
            _numbers(g, 2) and all(isinstance(v, int) and v > 0 for v in g) for g in ck["grids"])),
        ("models", _tensor_dict(ck["models"])),
        ("memory", isinstance(ck["memory"], (list, tuple)) and all(
            isinstance(m, torch.Tensor) and m.is_floating_point() and m.dim() == 2 for m in ck["memory"])),
        ("backbone", isinstance(bb, dict) and isinstance(bb.get("name"), str) and _tensor_dict(bb.get("state_dict"))
         and isinstance(bb.get("levels"), list) and all(isinstance(v, str) for v in bb["levels"])),
        ("preprocess", isinstance(pre, dict) and _numbers(pre.get("mean"), 3) and _numbers(pre.get("std"), 3)
         and all(v > 0 for v in pre["std"])),
        ("history", isinstance(ck["history"], list) and all(isinstance(h, dict) for h in ck["history"])),
        ("calibration", ck.get("calibration") is None or isinstance(ck["calibration"], dict)),
    )
    bad = [name for name, ok in checks if not ok]
    return f"its {', '.join(bad)} {'is' if len(bad) == 1 else 'are'} not what fod writes" if bad else None


def restore(fod: FOD, ck: dict, path="checkpoint"):
    """Load a checkpoint's level models and reference memories into ``fod`` (built from the checkpoint's
    configuration and backbone); a CheckpointError naming the file for anything that does not fit."""
    expect = [(g[0] * g[1], c) for g, c in zip(fod.grids, fod.backbone.channels)]
    got = [tuple(m.shape) for m in ck["memory"]]
    if got != expect:
        raise CheckpointError(f"checkpoint {path} is damaged: its reference memory has shapes {got}, its model "
                              f"needs {expect}")
    try:
        fod.models.load_state_dict(ck["models"])
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path}: its model cannot be rebuilt ({_first_line(exc)})") from None
    fod.memories = [m.float() for m in ck["memory"]]


def load_raw(path, *, resume: bool = False, log: Optional[Callable[[str], None]] = None) -> dict:
    """The checkpoint's dict, after checking that it is a complete, undamaged FOD checkpoint with finite
    weights. Every problem is a CheckpointError (or FileNotFoundError) naming the file. The file is read once
    into memory; its checksum is verified on those bytes before they are parsed. Nothing in it is unpickled.
    (``log``: for notes on the file; the current format needs none.)"""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder; give the checkpoint.pt file in it")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    raw = path.read_bytes()
    head = check_format(raw, path)
    try:
        ck = safeformat.loads(raw, CHECKPOINT_FORMAT)
    except safeformat.FormatError as exc:
        raise CheckpointError(f"checkpoint {path} is damaged: {exc}") from None
    if not isinstance(ck, dict):
        raise CheckpointError(f"checkpoint {path} is damaged: it holds a {type(ck).__name__}, not a dict")
    ck["format"], ck["sha256"] = head
    missing = [k for k in REQUIRED + (REQUIRED_FOR_RESUME if resume else ()) if k not in ck]
    if missing:
        raise CheckpointError(f"checkpoint {path} is damaged: it lacks {', '.join(missing)}")
    wrong = _malformed(ck)
    if wrong:
        raise CheckpointError(f"checkpoint {path} is damaged: {wrong}")
    tensors = dict(ck["models"])
    tensors.update({f"memory[{i}]": m for i, m in enumerate(ck["memory"])})
    tensors.update({f"backbone.{k}": v for k, v in ck["backbone"]["state_dict"].items()})
    bad = nonfinite(tensors)
    if bad:
        raise CheckpointError(f"checkpoint {path} holds NaN or infinite weights: {', '.join(bad[:5])}")
    return ck


def config_of(ck: dict, path="checkpoint") -> Config:
    """The checkpoint's configuration, its types and values checked (paths it names need not exist here)."""
    # checkpoints written before the embedding bias became an option had embeddings without one; those written
    # before calibration trained on every training image
    d = {"embed_bias": False, "val_fraction": 0.0, **ck["config"]}
    try:
        cfg = from_dict(d, where="its configuration")
        check_config(dataclasses.replace(cfg, weights=None, val=None))
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {path} is damaged: {exc}") from None
    return cfg


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
    pre = ck["preprocess"]
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
        fod = FOD(cfg, bb, ck["grids"])
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path}: its model cannot be rebuilt ({_first_line(exc)})") from None
    restore(fod, ck, path)
    fod.checkpoint = ck
    return fod.to_device(device)


def calibration_of(ck: dict) -> Optional[dict]:
    """The checkpoint's decision thresholds and normal score statistics (fod.calibrate), or None: trained with
    --val-fraction 0, or before thresholds existed."""
    return ck.get("calibration")
