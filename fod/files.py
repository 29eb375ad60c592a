"""Writing results safely: atomic file replacement and output folders that never lose results."""
from __future__ import annotations

import os
from pathlib import Path

import torch


def atomic_save(obj, path: Path):
    """torch.save to a temporary name, then rename: a reader sees the old file or the new one, never half."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str):
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def prepare_output(output, *, resume: bool = False, overwrite: bool = False, products=()) -> Path:
    """Create the output directory; refuse to replace existing results unless told to."""
    out = Path(output)
    existing = [p for p in products if (out / p).exists()]
    if existing and not (resume or overwrite):
        raise FileExistsError(f"{out} already holds {', '.join(existing)}; pass --resume to continue that run, "
                              "--overwrite to replace it, or choose another --output")
    out.mkdir(parents=True, exist_ok=True)
    return out
