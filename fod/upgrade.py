"""``fod checkpoint upgrade OLD NEW --trust``: convert a checkpoint of an earlier fod version (v1, v2: a
``torch.save`` pickle) to the current format (fod.checkpoint, docs/SECURITY.md).

This is the only place where fod unpickles a file in full, and only when the user says ``--trust``: a pickle
runs whatever code it names while it is read, and a checksum inside it proves nothing against that (whoever
wrote the file wrote the checksum). The converted file holds the same values (tensors bit for bit); v1
checkpoints get the preprocessing they were trained with written out (bilinear resizing, ImageNet mean and
std). v2's checksum is verified (it detects damage, not tampering).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from . import checkpoint
from .data import IMAGENET_MEAN, IMAGENET_STD


def _hash(h, obj):
    """The checksum of format v2 (over the values: tensors by dtype, shape and bytes)."""
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


def v2_digest(ck: dict) -> str:
    """Format v2's SHA-256 over every value of the checkpoint except its ``sha256`` entry."""
    h = hashlib.sha256()
    _hash(h, {k: v for k, v in ck.items() if k != "sha256"})
    return h.hexdigest()


def _weights(obj, old: Path, new: Path, log) -> Path:
    """A pickled backbone weights file (not a fod checkpoint): its state dict as ``new`` (.safetensors)."""
    from safetensors.torch import save

    from .backbone import WeightsError, state_dict_of
    from .files import atomic_write
    if new.suffix != ".safetensors":
        raise ValueError(f"{old} is not a checkpoint of an earlier fod version; converted as backbone weights, it "
                         f"is written as safetensors: give NEW a .safetensors name (not {new.name})")
    try:
        sd, notes = state_dict_of(obj, old)
    except WeightsError as exc:
        raise ValueError(f"{old} is neither a checkpoint of an earlier fod version nor backbone weights ({exc})") \
            from None
    raw = save({k: v.detach().cpu().contiguous().clone() for k, v in sd.items()})
    atomic_write(new, lambda f: f.write(raw))
    if log:
        log(f"fod checkpoint: wrote the {len(sd)} tensors of {old} to {new}" + (f" ({'; '.join(notes)})"
                                                                                  if notes else ""))
    return new


def upgrade(old, new, *, trust: bool = False, log=None) -> Path:
    """Convert the pickled checkpoint ``old`` into ``new`` (current format), or the pickled backbone weights
    ``old`` (e.g. a training script's checkpoint holding its options) into ``new`` (.safetensors, tensors only);
    refuses unless ``trust``."""
    old, new = Path(old), Path(new)
    if not old.is_file():
        raise FileNotFoundError(f"checkpoint not found: {old}")
    raw = old.read_bytes()
    if raw.startswith(f"{checkpoint.CHECKPOINT_FORMAT} ".encode()):
        raise ValueError(f"{old} is already a {checkpoint.CHECKPOINT_FORMAT} checkpoint: nothing to convert")
    if not (raw[:2] == b"PK" or raw[:1] == b"\x80"):
        raise ValueError(f"{old} is not a pickle (a torch.save file): there is nothing to convert")
    if new.exists() or new.is_symlink():
        raise FileExistsError(f"{new} already exists; choose another NEW file (nothing is overwritten)")
    if not trust:
        raise ValueError(f"converting {old} unpickles it, which runs any code it holds: pass --trust only if you "
                         "trust where the file came from")
    if not new.parent.is_dir():
        raise FileNotFoundError(f"folder not found: {new.parent}")
    try:
        ck = torch.load(old, map_location="cpu", weights_only=False)  # --trust: the user vouches for the file
    except Exception as exc:
        raise checkpoint.CheckpointError(f"cannot read checkpoint {old}: it is truncated, damaged or not a PyTorch "
                                         f"file ({checkpoint._first_line(exc)})") from None
    fmt = ck.get("format") if isinstance(ck, dict) else None
    if fmt not in checkpoint.PICKLED_FORMATS:
        return _weights(ck, old, new, log)
    if fmt == "fod-checkpoint-v2":
        try:
            ok = v2_digest(ck) == ck.get("sha256")
        except Exception:
            ok = False
        if not ok:
            raise checkpoint.CheckpointError(f"checkpoint {old} is damaged: its content does not match its SHA-256 "
                                             "checksum")
    else:  # v1: trained with bilinear resizing and ImageNet normalisation
        ck["config"] = {"interpolation": "bilinear", **ck["config"]}
        ck.setdefault("preprocess", {"interpolation": "bilinear", "mean": IMAGENET_MEAN.tolist(),
                                     "std": IMAGENET_STD.tolist()})
    ck["format"] = checkpoint.CHECKPOINT_FORMAT
    try:
        checkpoint.write(ck, new)
    except TypeError as exc:
        raise checkpoint.CheckpointError(f"{old} holds a value the current format cannot store ({exc})") from None
    try:
        checkpoint.load_raw(new)  # the result reads back, with every check
    except Exception:
        new.unlink()
        raise
    if log:
        log(f"fod checkpoint: converted {old} ({fmt}) to {new} ({checkpoint.CHECKPOINT_FORMAT})")
    return new
