"""Frozen timm feature extractor: chosen levels, each through AvgPool2d(3, 1, 1).

Weights: ImageNet-pretrained from the timm hub (cache first, then the
network), a local file (``weights=FILE``, for offline machines), or random
initialisation (``pretrained=False``, warned about loudly: the features are
then random projections, and the anomaly maps far weaker than with ImageNet
weights).
"""
from __future__ import annotations

import socket
import warnings
from typing import Optional, Sequence

import torch
from torch import nn


class WeightsUnavailable(RuntimeError):
    """ImageNet weights could not be loaded (no cached copy and no network)."""


def _hub_reachable(timeout: float = 3.0) -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _create(name: str, out_indices, pretrained: bool, weights: Optional[str]):
    import timm
    kw = dict(features_only=True, out_indices=tuple(out_indices))
    if weights is not None:
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(weights)}, **kw)
    if not pretrained:
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


def default_levels(name: str) -> list[str]:
    """The feature levels at strides 8 and 16 (layer2 and layer3 for ResNets)."""
    import timm
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
        self.net = _create(name, idx, pretrained, weights)
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


def build_backbone(cfg) -> Backbone:
    """The backbone a Config asks for."""
    return Backbone(cfg.backbone, cfg.levels, pretrained=cfg.pretrained, weights=cfg.weights)
