"""Frozen timm feature extractor: chosen levels, each through AvgPool2d(3, 1, 1).

Weights: ImageNet-pretrained from the timm hub (cache first, then the
network), a local file (``weights=FILE``, for offline machines), or random
initialisation (``pretrained=False``, warned about loudly: the features are
then random projections, and the anomaly maps far weaker than with ImageNet
weights).

A local weights file is loaded strictly for the part of the network the chosen
levels use: every tensor of that part must be in the file with its shape, and
the file may hold nothing the architecture lacks; the rest of a full state dict
(the classifier head, deeper stages) is expected and unused. Accepted layouts:
a plain state dict (timm's, or torchvision's where its names equal timm's, as
for the ResNets), ``{"state_dict": ...}``, ``{"model": ...}``,
``{"model_state_dict": ...}``, ``module.`` / ``_orig_mod.`` prefixes, ``.pth``
/ ``.pt`` / ``.bin`` (torch) or ``.safetensors`` files.

The normalisation the backbone expects (``mean``, ``std``) is taken from the
timm model's pretrained configuration (ImageNet's for the ResNets).
"""
from __future__ import annotations

import pickle
import socket
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn


class WeightsUnavailable(RuntimeError):
    """ImageNet weights could not be loaded (no cached copy and no network)."""


class WeightsError(ValueError):
    """A local weights file cannot be read or does not fit the backbone."""


MIN_GRID = 2  # tokens per side at every level: with one token the inter score (max - softmax) is identically 0

WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")
PREFIXES = ("module.", "_orig_mod.")


def _names(keys, n: int = 8) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" (and {len(keys) - n} more)" if len(keys) > n else "")


def _read_weights_file(path: Path):
    """The object in a weights file, read without running code: safetensors, or torch.load(weights_only=True)
    (tensors and plain containers only). A file that needs a full unpickle is refused, naming the conversion."""
    import torch
    damaged = (f"cannot read weights file {path}: it is truncated, damaged or not a PyTorch or safetensors "
               "state dict")
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"fod-checkpoint-"):
        raise WeightsError(f"weights file {path} is a FOD checkpoint (fod train's checkpoint.pt), not backbone "
                           "weights: score images with fod test/predict --checkpoint, or continue its training with "
                           "fod train --resume")
    if path.suffix == ".safetensors" or head[8:9] == b"{":  # safetensors: an 8-byte length, then a JSON header
        try:
            from safetensors.torch import load_file
            return load_file(str(path))
        except Exception as exc:
            raise WeightsError(f"{damaged} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights_only" not in str(exc).lower().replace(" ", "_"):
            raise WeightsError(f"{damaged} ({str(exc).splitlines()[0][:200]})") from None
        raise WeightsError(f"weights file {path} holds Python objects besides tensors, which fod does not unpickle "
                           "(unpickling can run code); if you trust where it came from, extract its weights once: "
                           f"fod checkpoint upgrade {path} {path.with_suffix('.safetensors')} --trust") from None
    except Exception as exc:
        msg = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise WeightsError(f"{damaged} ({type(exc).__name__}{': ' + msg if msg else ''})") from None


def read_state_dict(path) -> tuple[dict, list[str]]:
    """The state dict in a weights file, unwrapped and without prefixes; and notes on what was done."""
    path = Path(path)
    if path.is_dir():
        raise WeightsError(f"weights file {path} is a folder; give the state-dict file")
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.stat().st_size == 0:
        raise WeightsError(f"weights file {path} is empty (0 bytes)")
    return state_dict_of(_read_weights_file(path), path)


def state_dict_of(obj, path) -> tuple[dict, list[str]]:
    """The state dict in the object ``obj`` read from the weights file ``path`` (unwrapped, prefixes removed)."""
    notes = []
    while isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        key = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if key is None:
            break
        obj = obj[key]
        notes.append(f"took the state dict under the key {key!r}")
    if isinstance(obj, dict) and str(obj.get("format", "")).startswith("fod-checkpoint"):
        raise WeightsError(f"weights file {path} is a FOD checkpoint (fod train's checkpoint.pt), not backbone "
                           "weights: score images with fod test/predict --checkpoint, or continue its training with "
                           "fod train --resume")
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                       for k, v in obj.items()):
        what = (f"a dict with keys {_names(map(str, obj))}" if isinstance(obj, dict) and obj
                else "an empty dict" if isinstance(obj, dict) else f"a {type(obj).__name__}")
        raise WeightsError(f"weights file {path} holds {what}, not a state dict (parameter names -> tensors); "
                           f"accepted: a state dict or a dict with one under {', '.join(map(repr, WRAPPER_KEYS))}")
    changed = True
    while changed:
        changed = False
        for pre in PREFIXES:
            if all(k.startswith(pre) for k in obj):
                obj, changed = {k[len(pre):]: v for k, v in obj.items()}, True
                notes.append(f"removed the prefix {pre!r}")
    return obj, notes


def load_weights(net, name: str, path, state=None) -> str:
    """Load a weights file into the features_only network ``net`` of timm model ``name``, strictly for the
    tensors ``net`` has. Returns a note on what of the file was not needed (the head, deeper stages).
    ``state``: the file's (state dict, notes) if already read."""
    import timm
    import torch
    sd, notes = state if state is not None else read_state_dict(path)
    try:  # only the names and shapes of the full model are needed: no memory, no random init
        with torch.device("meta"):
            full = timm.create_model(name, pretrained=False).state_dict()
    except Exception:
        with torch.random.fork_rng(devices=[]):  # this throw-away model's random init must not shift the seeds
            full = timm.create_model(name, pretrained=False).state_dict()

    def norm(k):
        return k.replace(".", "_")
    by_norm = {norm(k): k for k in full}
    mapping = {}  # key of net -> key of the full model (features_only flattens some module names)
    for k in net.state_dict():
        cands = [k] + ([k[len("model."):]] if k.startswith("model.") else [])
        mk = next((by_norm[norm(c)] for c in cands if norm(c) in by_norm), None)
        if mk is None:
            raise RuntimeError(f"internal error: the features of {name!r} have a tensor {k!r} that the full model "
                               "lacks; please report this")
        mapping[k] = mk
    used = set(mapping.values())
    unexpected = set(sd) - set(full)
    missing = {k for k in used - set(sd) if not k.endswith("num_batches_tracked")}
    shapes = [f"{k} {tuple(sd[k].shape)} (expected {tuple(full[k].shape)})" for k in sorted(used & set(sd))
              if sd[k].shape != full[k].shape]
    if unexpected or missing or shapes:
        parts = ([f"{len(missing)} tensor(s) the backbone needs are missing: {_names(missing)}"] if missing else []) \
            + ([f"{len(unexpected)} tensor(s) {name} does not have: {_names(unexpected)}"] if unexpected else []) \
            + ([f"{len(shapes)} tensor(s) of another shape: {', '.join(shapes[:5])}"
                + (f" (and {len(shapes) - 5} more)" if len(shapes) > 5 else "")] if shapes else [])
        raise WeightsError(f"weights file {path} does not fit backbone {name!r} (is it another architecture's, or "
                           f"not a backbone state dict?): " + "; ".join(parts))
    bad = sorted(k for k in used & set(sd) if sd[k].is_floating_point() and not torch.isfinite(sd[k]).all())
    if bad:
        raise WeightsError(f"weights file {path} holds NaN or infinite values in {_names(bad)}")
    result = net.load_state_dict({k: sd[mk] for k, mk in mapping.items() if mk in sd}, strict=False)
    assert not result.unexpected_keys and all(k.endswith("num_batches_tracked") for k in result.missing_keys)
    unused = set(sd) - used
    if unused:
        heads = sorted({k.split(".")[0] for k in unused})
        notes.append(f"{len(unused)} tensors of the file are not needed by the chosen levels ({', '.join(heads)})")
    return "; ".join(notes)


def _hub_reachable(timeout: float = 3.0) -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _create(name: str, out_indices, pretrained: bool, weights: Optional[str]):
    import timm
    kw = dict(features_only=True, out_indices=tuple(out_indices))
    if not pretrained or weights is not None:
        return timm.create_model(name, pretrained=False, **kw)
    # ImageNet weights: the local cache first (no network traffic), then the hub.
    try:
        import huggingface_hub.constants as hc
        old, hc.HF_HUB_OFFLINE = hc.HF_HUB_OFFLINE, True
        try:
            return timm.create_model(name, pretrained=True, **kw)
        finally:
            hc.HF_HUB_OFFLINE = old
    except Exception:
        pass
    if not _hub_reachable():
        raise WeightsUnavailable(
            f"cannot load ImageNet-pretrained weights for {name!r}: they are not in the local cache and the "
            "model hub (huggingface.co) is unreachable from this machine. Pass --weights FILE with a local "
            "state dict (timm or torchvision format), or --no-pretrained for random initialisation "
            "(much weaker features).")
    try:
        return timm.create_model(name, pretrained=True, **kw)
    except Exception as exc:
        raise WeightsUnavailable(f"downloading ImageNet weights for {name!r} failed: {exc}. Pass --weights FILE "
                                 "or --no-pretrained.") from exc


def check_name(name: str):
    import timm
    if not timm.is_model(name):
        raise ValueError(f"unknown backbone {name!r}: not a timm model name (e.g. wide_resnet50_2, resnet18, "
                         "efficientnet_b6; timm.list_models() lists them)")


def default_levels(name: str) -> list[str]:
    """The feature levels at strides 8 and 16 (layer2 and layer3 for ResNets)."""
    import timm
    check_name(name)
    info = timm.create_model(name, pretrained=False, features_only=True).feature_info
    levels = [m for m, r in zip(info.module_name(), info.reduction()) if r in (8, 16)]
    if len(levels) < 1:
        raise ValueError(f"backbone {name!r} has no feature levels at stride 8 or 16; pass levels explicitly")
    return levels


class Backbone(nn.Module):
    """``forward(images (B,3,S,S)) -> [features (B, C_l, H_l, W_l) per level]``, frozen, no grad."""

    def __init__(self, name: str = "wide_resnet50_2", levels: Optional[Sequence[str]] = None, *,
                 pretrained: bool = True, weights: Optional[str] = None):
        super().__init__()
        import timm
        self.name = name
        check_name(name)
        self.levels = list(levels) if levels else default_levels(name)
        info = timm.create_model(name, pretrained=False, features_only=True).feature_info
        names = info.module_name()
        missing = [lv for lv in self.levels if lv not in names]
        if missing:
            raise ValueError(f"backbone {name!r} has no feature level(s) {missing}; available: {names}")
        idx = [names.index(lv) for lv in self.levels]
        self.channels = [info.channels()[i] for i in idx]
        self.strides = [info.reduction()[i] for i in idx]
        if weights is not None:
            self.weights_source = f"local file {weights}"
        elif pretrained:
            self.weights_source = "ImageNet (timm hub)"
        else:
            self.weights_source = "random init (NOT pretrained)"
            warnings.warn(f"backbone {name!r} is RANDOMLY INITIALISED (--no-pretrained): its features are not "
                          "ImageNet features and the anomaly maps will be much weaker than published numbers",
                          UserWarning, stacklevel=2)
        state = read_state_dict(weights) if weights is not None else None  # a bad file fails before any model
        self.net = _create(name, idx, pretrained, weights)
        self.weights_note = load_weights(self.net, name, weights, state) if weights is not None else ""
        cfg = timm.data.resolve_data_config({}, model=self.net)
        self.mean, self.std = tuple(float(x) for x in cfg["mean"]), tuple(float(x) for x in cfg["std"])
        self.pool = nn.AvgPool2d(3, 1, 1)
        self.net.eval()
        for p in self.net.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True):  # always frozen, BatchNorm in eval mode
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [self.pool(f) for f in self.net(images)]

    @torch.no_grad()
    def grids(self, image_size: int) -> list[tuple]:
        """The (rows, cols) token grid of each level for square inputs of ``image_size``."""
        dev = next(self.parameters()).device
        return [tuple(f.shape[-2:]) for f in self(torch.zeros(1, 3, image_size, image_size, device=dev))]

    def check_image_size(self, image_size: int) -> list[tuple]:
        """The grids at ``image_size``; an error naming the smallest usable size if a level has fewer than
        MIN_GRID x MIN_GRID tokens."""
        grids = self.grids(image_size)
        if min(min(g) for g in grids) >= MIN_GRID:
            return grids
        small = [f"{lv} {g[0]}x{g[1]}" for lv, g in zip(self.levels, grids) if min(g) < MIN_GRID]
        s = image_size + 1
        while min(min(g) for g in self.grids(s)) < MIN_GRID:
            s += 1
        raise ValueError(f"--image-size {image_size} is too small for {self.name} levels {','.join(self.levels)}: "
                         f"token grid {', '.join(small)}; every level needs at least {MIN_GRID}x{MIN_GRID} tokens "
                         f"(with one token the anomaly map is identically 0), so the smallest usable --image-size "
                         f"is {s}")


def build_backbone(cfg) -> Backbone:
    """The backbone a Config asks for."""
    return Backbone(cfg.backbone, cfg.levels, pretrained=cfg.pretrained, weights=cfg.weights)
