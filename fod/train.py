"""Training, scoring and evaluation of FOD (spec sections 5-6).

Honest protocol by default: train the configured epochs, evaluate the final
model once. ``compat_official`` reproduces the public code instead (output
projection discarded, test-set evaluation after every epoch, best image and
best pixel AUROC reported from possibly different epochs) and says so.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from . import metrics as M
from . import viz
from .backbone import Backbone
from .data import AnomalyDataset, denormalize, load_image
from .model import LevelModel, default_d_model, fod_loss, token_scores

CHECKPOINT_FORMAT = "fod-checkpoint-v1"
COMPAT_WARNING = ("COMPAT-OFFICIAL PROTOCOL: the output projections are discarded and the model is selected on the "
                  "TEST set after every epoch; the best image AUROC and the best pixel AUROC may come from "
                  "different epochs. These numbers are optimistic and not a valid held-out evaluation.")


@dataclass
class Config:
    data: str = ""
    dataset: str = "mvtec"
    backbone: str = "wide_resnet50_2"
    levels: Optional[list] = None          # None: the backbone's stride-8 and stride-16 levels
    pretrained: bool = True
    weights: Optional[str] = None
    image_size: int = 256
    resize: Optional[int] = None           # None: image_size (resize then centre-crop)
    epochs: int = 100
    batch_size: int = 8
    lr: float = 1e-4
    lambda1: float = 0.5
    lambda2: float = 0.5
    d_model: Optional[list] = None         # per level; None: 256 for L >= 1024, else 512
    n_heads: int = 8
    n_layers: int = 3
    eps: float = 1e-4
    device: str = "cpu"
    backend: str = "auto"
    seed: int = 0
    amp: bool = False                      # bf16 autocast (CUDA only)
    compat_official: bool = False
    cache_features: bool = True
    num_workers: int = 0
    heatmaps: int = -1                     # heat-map PNGs to write (-1: all test images)

    def check(self):
        if self.epochs < 0 or self.batch_size < 1 or self.image_size < 8 or self.lr <= 0:
            raise ValueError(f"invalid config: epochs={self.epochs}, batch_size={self.batch_size}, "
                             f"image_size={self.image_size}, lr={self.lr}")
        if self.amp and not self.device.startswith("cuda"):
            raise ValueError("--amp (bf16 autocast) is for CUDA only")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError("--device cuda was requested but no CUDA device is available")
        if self.weights is not None and not Path(self.weights).is_file():
            raise FileNotFoundError(f"weights file not found: {self.weights}")


# ----------------------------------------------------------------------------- helpers

def say(msg: str):
    tqdm.write(msg, file=sys.stderr)


def banner(msg: str):
    line = "!" * 100
    say(f"{line}\n{msg}\n{line}")


def versions(backend: str) -> dict:
    import fod_kernels
    import scipy
    import timm
    from . import __version__
    return {"fod": __version__, "python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
            "numpy": np.__version__, "scipy": scipy.__version__, "fod_kernels": fod_kernels.__version__,
            "backend": backend, "cuda": torch.version.cuda if torch.cuda.is_available() else None}


def atomic_save(obj, path: Path):
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
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


def resolve_backend_name(backend: str, device: torch.device) -> str:
    from fod_kernels._backends import resolve_backend
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return resolve_backend(backend, device)


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


# ----------------------------------------------------------------------------- the model bundle

class FOD(nn.Module):
    """Backbone + one reconstruction model per level + the reference memories."""

    def __init__(self, cfg: Config, backbone: Backbone, grids, memories=None):
        super().__init__()
        self.cfg, self.backbone, self.grids = cfg, backbone, [tuple(g) for g in grids]
        dms = cfg.d_model or [default_d_model(g[0] * g[1]) for g in self.grids]
        if len(dms) != len(self.grids):
            raise ValueError(f"--d-model gives {len(dms)} widths for {len(self.grids)} levels")
        self.d_models = list(dms)
        self.models = nn.ModuleList(
            LevelModel(c, g, d, cfg.n_heads, cfg.n_layers, backend=cfg.backend, out_proj=not cfg.compat_official,
                       eps=cfg.eps)
            for c, g, d in zip(backbone.channels, self.grids, dms))
        self.memories = list(memories) if memories is not None else None

    def set_backend(self, name: str):
        for m in self.models:
            m.set_backend(name)

    def tokens(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Backbone features as tokens: [(B, L, C)] per level."""
        return [f.flatten(2).transpose(1, 2).contiguous() for f in self.backbone(images)]

    @torch.no_grad()
    def anomaly_maps(self, images: torch.Tensor, amp: bool = False) -> torch.Tensor:
        """(B, S, S) anomaly maps: per level rec_score * inter_score, upsampled, averaged over levels."""
        size = images.shape[-2:]
        maps = []
        for feat, model, mem, g in zip(self.tokens(images), self.models, self.memories, self.grids):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                out, _, inter = model(feat, mem, need_stats=(False, True))
            s = token_scores(out.float(), feat, [type(t)(*(x.float() for x in t)) for t in inter])
            s = s.view(-1, 1, *g)
            maps.append(F.interpolate(s, size=size, mode="bilinear", align_corners=True)[:, 0])
        return torch.stack(maps).mean(0)


def build_backbone(cfg: Config) -> Backbone:
    return Backbone(cfg.backbone, cfg.levels, pretrained=cfg.pretrained, weights=cfg.weights)


def backbone_from_checkpoint(ck: dict) -> Backbone:
    info = ck["backbone"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        bb = Backbone(info["name"], info["levels"], pretrained=False)
    bb.net.load_state_dict(info["state_dict"])
    bb.weights_source = info["weights_source"]
    return bb


def load_checkpoint(path, device: str = "cpu", backend: Optional[str] = None) -> FOD:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ck = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a FOD checkpoint (format {CHECKPOINT_FORMAT})")
    cfg = Config(**ck["config"])
    cfg.device = device
    if backend is not None:
        cfg.backend = backend
    fod = FOD(cfg, backbone_from_checkpoint(ck), ck["grids"], [m for m in ck["memory"]])
    fod.models.load_state_dict(ck["models"])
    fod.checkpoint = ck
    return to_device(fod, device)


def to_device(fod: FOD, device: str) -> FOD:
    fod.to(device)
    fod.memories = [m.to(device) for m in fod.memories]
    fod.set_backend(resolve_backend_name(fod.cfg.backend, torch.device(device)))
    return fod


# ----------------------------------------------------------------------------- features

def _loader(ds, cfg: Config, batch_size: int):
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=cfg.num_workers)


@torch.no_grad()
def extract_features(fod: FOD, ds, cfg: Config, device: str, desc: str) -> list[torch.Tensor]:
    feats = None
    for batch in tqdm(_loader(ds, cfg, cfg.batch_size), desc=desc, unit="batch", leave=False):
        toks = [t.cpu() for t in fod.tokens(batch["image"].to(device))]
        feats = [[t] for t in toks] if feats is None else [f + [t] for f, t in zip(feats, toks)]
    return [torch.cat(f) for f in feats]


@torch.no_grad()
def feature_grids(backbone: Backbone, image_size: int) -> list[tuple]:
    dev = next(backbone.parameters()).device
    return [tuple(f.shape[-2:]) for f in backbone(torch.zeros(1, 3, image_size, image_size, device=dev))]


@torch.no_grad()
def reference_memory(fod: FOD, ds, cfg: Config, device: str, cached=None) -> list[torch.Tensor]:
    """Per-position mean of the training features per level: [(L, C)]."""
    if cached is not None:
        return [f.mean(0) for f in cached]
    sums, n = None, 0
    for batch in tqdm(_loader(ds, cfg, cfg.batch_size), desc="memory", unit="batch", leave=False):
        toks = fod.tokens(batch["image"].to(device))
        sums = [t.sum(0) for t in toks] if sums is None else [s + t.sum(0) for s, t in zip(sums, toks)]
        n += toks[0].shape[0]
    return [(s / n).cpu() for s in sums]


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(fod: FOD, ds, cfg: Config, device: str, desc: str = "evaluate") -> dict:
    """Maps for the whole test set and all metrics. Returns a dict with the arrays too."""
    fod.eval()
    maps, masks, labels, defects, paths, images = [], [], [], [], [], []
    t0 = time.perf_counter()
    n = 0
    bar = tqdm(_loader(ds, cfg, cfg.batch_size), desc=desc, unit="batch", leave=False)
    for batch in bar:
        m = fod.anomaly_maps(batch["image"].to(device), amp=cfg.amp)
        maps.append(m.float().cpu().numpy())
        masks.append(batch["mask"].numpy())
        labels += batch["label"].tolist()
        defects += list(batch["defect"])
        paths += list(batch["path"])
        n += m.shape[0]
        bar.set_postfix(img_per_s=f"{n / (time.perf_counter() - t0):.2f}")
    seconds = time.perf_counter() - t0
    maps, masks = np.concatenate(maps), np.concatenate(masks)
    res = M.evaluate_maps(maps, masks, labels, defects)
    res.update(maps=maps, masks=masks, labels=np.array(labels), defects=defects, paths=paths,
               eval_seconds=seconds, eval_images_per_second=n / seconds)
    return res


def public_metrics(res: dict) -> dict:
    keys = ("image_auroc", "pixel_auroc", "aupro", "aupro_fpr_limit", "per_type_image_auroc",
            "eval_seconds", "eval_images_per_second")
    return {k: res[k] for k in keys}


def write_heatmaps(outdir: Path, ds, res: dict, limit: int = -1):
    hdir = outdir / "heatmaps"
    hdir.mkdir(exist_ok=True)
    vmin, vmax = float(res["maps"].min()), float(np.percentile(res["maps"], 99.9))
    order = range(len(ds)) if limit < 0 else range(min(limit, len(ds)))
    for i in order:
        s = ds.samples[i]
        img = denormalize(load_image(s.image, ds.image_size, ds.resize))
        name = f"{s.defect}_{s.image.stem}.png"
        viz.save_overlay(hdir / name, img, res["maps"][i], res["masks"][i], vmin, vmax)
    return vmin, vmax


def summary_examples(ds, res: dict, vmin, vmax, k: int = 4):
    lab, sc = res["labels"], res["image_scores"]
    picks = []
    bad, good = np.nonzero(lab == 1)[0], np.nonzero(lab == 0)[0]
    if bad.size:
        picks += [("most anomalous defect", bad[np.argmax(sc[bad])]), ("least anomalous defect", bad[np.argmin(sc[bad])])]
    if good.size:
        picks += [("most anomalous normal", good[np.argmax(sc[good])]), ("least anomalous normal", good[np.argmin(sc[good])])]
    out = []
    for cap, i in picks[:k]:
        s = ds.samples[i]
        img = denormalize(load_image(s.image, ds.image_size, ds.resize))
        out.append((f"{cap}\n{s.defect}/{s.image.name} score {sc[i]:.3g}",
                    viz.overlay(img, res["maps"][i], res["masks"][i], vmin, vmax)))
    return out


# ----------------------------------------------------------------------------- training

def train(cfg: Config, output, *, resume: bool = False, overwrite: bool = False, log=say) -> dict:
    """Train, evaluate once (or per epoch with compat_official), write all outputs; return metrics."""
    cfg.check()
    out = prepare_output(output, resume=resume, overwrite=overwrite,
                         products=("checkpoint.pt", "metrics.json", "summary.png"))
    ck_path = out / "checkpoint.pt"
    ck = None
    if resume:
        if not ck_path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint to resume from at {ck_path}")
        ck = torch.load(ck_path, map_location="cpu", weights_only=False)
        saved = Config(**ck["config"])
        # epochs may be raised; the device, backend and worker count may change; the rest must match
        free = {"epochs", "device", "backend", "num_workers", "heatmaps"}
        diff = {k: (getattr(saved, k), getattr(cfg, k)) for k in Config.__dataclass_fields__
                if k not in free and getattr(saved, k) != getattr(cfg, k)}
        if diff:
            raise ValueError(f"--resume with a different configuration than {ck_path}: "
                             + ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items()))
    if cfg.compat_official:
        banner(COMPAT_WARNING)
    device = cfg.device
    seed_all(cfg.seed)
    train_ds = AnomalyDataset(cfg.data, "train", cfg.dataset, cfg.image_size, cfg.resize)
    test_ds = AnomalyDataset(cfg.data, "test", cfg.dataset, cfg.image_size, cfg.resize)
    backbone = backbone_from_checkpoint(ck) if ck else build_backbone(cfg)
    backbone.to(device)
    grids = feature_grids(backbone, cfg.image_size)
    fod = FOD(cfg, backbone, grids)
    backend = resolve_backend_name(cfg.backend, torch.device(device))
    fod.to(device)
    fod.set_backend(backend)
    log(f"fod: {len(train_ds)} training and {len(test_ds)} test images from {cfg.data} ({cfg.dataset} layout)")
    log(f"fod: backbone {cfg.backbone} levels {backbone.levels} (channels {backbone.channels}, grids {grids}), "
        f"weights: {backbone.weights_source}")
    log(f"fod: d_model {fod.d_models}, {cfg.n_heads} heads, {cfg.n_layers} layers, backend {backend!r}, "
        f"device {device}{', bf16 autocast' if cfg.amp else ''}")

    cached = extract_features(fod, train_ds, cfg, device, "features") if cfg.cache_features else None
    if ck:
        fod.memories = [m.to(device) for m in ck["memory"]]
        fod.models.load_state_dict(ck["models"])
    else:
        fod.memories = [m.to(device) for m in reference_memory(fod, train_ds, cfg, device, cached)]
    opt = torch.optim.Adam(fod.models.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    start, history, train_seconds, compat = 0, [], 0.0, {"epochs": []}
    if ck:
        opt.load_state_dict(ck["optimizer"])
        set_rng_state(ck["rng"], gen)
        start, history, train_seconds = ck["epoch"], ck["history"], ck["train_seconds"]
        compat = ck.get("compat", compat)
        log(f"fod: resuming {ck_path} after epoch {start}")

    def checkpoint(epoch, extra=None):
        atomic_save({"format": CHECKPOINT_FORMAT, "config": dataclasses.asdict(cfg), "epoch": epoch,
                     "grids": grids, "models": fod.models.state_dict(),
                     "memory": [m.cpu() for m in fod.memories], "optimizer": opt.state_dict(),
                     "backbone": {"name": backbone.name, "levels": backbone.levels,
                                  "weights_source": backbone.weights_source,
                                  "state_dict": backbone.net.state_dict()},
                     "rng": rng_state(gen), "history": history, "train_seconds": train_seconds,
                     "compat": compat, **(extra or {})}, ck_path)

    n = len(train_ds)
    for epoch in range(start, cfg.epochs):
        fod.models.train()
        t0 = time.perf_counter()
        perm = torch.randperm(n, generator=gen)
        sums = {"loss": 0.0, "rec": 0.0, "k_intra": 0.0, "k_inter": 0.0}
        bar = tqdm(perm.split(cfg.batch_size), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", leave=False)
        for idx in bar:
            if cached is not None:
                feats = [f[idx].to(device) for f in cached]
            else:
                imgs = torch.stack([train_ds[int(i)]["image"] for i in idx]).to(device)
                feats = fod.tokens(imgs)
            loss = 0.0
            parts = {"rec": 0.0, "k_intra": 0.0, "k_inter": 0.0}
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.amp):
                for f, model, mem in zip(feats, fod.models, fod.memories):
                    o, intra, inter = model(f, mem)
                    lv, p = fod_loss(o.float(), f, intra, inter, cfg.lambda1, cfg.lambda2)
                    loss = loss + lv
                    parts = {k: parts[k] + float(p[k]) for k in parts}
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            w = len(idx) / n
            sums["loss"] += float(loss.detach()) * w
            for k in parts:
                sums[k] += parts[k] * w
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}", rec=f"{parts['rec']:.4f}")
        secs = time.perf_counter() - t0
        train_seconds += secs
        history.append({"epoch": epoch + 1, "seconds": secs, **sums})
        log(f"epoch {epoch + 1}/{cfg.epochs}: loss {sums['loss']:.4f} rec {sums['rec']:.4f} "
            f"K_intra {sums['k_intra']:.3f} K_inter {sums['k_inter']:.3f} ({secs:.1f} s, {n / secs:.1f} img/s)")
        if cfg.compat_official:
            r = evaluate(fod, test_ds, cfg, device, desc=f"test-set selection, epoch {epoch + 1}")
            e = {"epoch": epoch + 1, **{k: r[k] for k in ("image_auroc", "pixel_auroc", "aupro")}}
            compat["epochs"].append(e)
            log(f"  [compat-official] test set after epoch {epoch + 1}: image AUROC {e['image_auroc']:.4f} "
                f"pixel AUROC {e['pixel_auroc']:.4f}")
        checkpoint(epoch + 1)

    log("fod: evaluating the final model on the test set")
    res = evaluate(fod, test_ds, cfg, device)
    vmin, vmax = write_heatmaps(out, test_ds, res, cfg.heatmaps)
    checkpoint(max(cfg.epochs, start), {"map_scale": (vmin, vmax)})
    metrics = public_metrics(res)
    metrics.update(protocol="honest: trained the configured epochs, final model evaluated once",
                   epochs=cfg.epochs, train_seconds=train_seconds,
                   train_seconds_per_epoch=train_seconds / max(1, len(history)) if history else None,
                   weights=backbone.weights_source, backend=backend, config=dataclasses.asdict(cfg),
                   versions=versions(backend), history=history)
    if cfg.compat_official and compat["epochs"]:
        bi = max(compat["epochs"], key=lambda e: e["image_auroc"])
        bp = max(compat["epochs"], key=lambda e: e["pixel_auroc"])
        metrics.update(protocol="COMPAT-OFFICIAL (test-set model selection; see warning)", warning=COMPAT_WARNING,
                       final_epoch={k: metrics[k] for k in ("image_auroc", "pixel_auroc", "aupro")},
                       image_auroc=bi["image_auroc"], image_auroc_epoch=bi["epoch"],
                       pixel_auroc=bp["pixel_auroc"], pixel_auroc_epoch=bp["epoch"],
                       aupro=bp["aupro"], per_epoch=compat["epochs"])
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    write_summary(out / "summary.png", cfg, metrics, res, test_ds, vmin, vmax, history)
    report(metrics, out, log)
    return metrics


def write_summary(path, cfg, metrics, res, ds, vmin, vmax, history, title_extra=""):
    tpe = metrics.get("train_seconds_per_epoch")
    lines = [
        f"data      {cfg.data} ({cfg.dataset}), {len(ds)} test images",
        f"protocol  {metrics['protocol']}",
        f"backbone  {cfg.backbone} levels {cfg.levels or 'default'}; weights: {metrics['weights']}",
        f"model     d_model {cfg.d_model or 'default'}, {cfg.n_heads} heads, {cfg.n_layers} layers, "
        f"out_proj {not cfg.compat_official}; backend {metrics['backend']}, device {cfg.device}",
        f"training  {cfg.epochs} epochs, batch {cfg.batch_size}, lr {cfg.lr}, image {cfg.image_size}px, seed {cfg.seed}"
        + (f"; {tpe:.1f} s/epoch" if tpe else ""),
        "",
        f"image AUROC  {metrics['image_auroc']:.4f}" + (f"  (epoch {metrics['image_auroc_epoch']})"
                                                         if "image_auroc_epoch" in metrics else ""),
        f"pixel AUROC  {metrics['pixel_auroc']:.4f}" + (f"  (epoch {metrics['pixel_auroc_epoch']})"
                                                         if "pixel_auroc_epoch" in metrics else ""),
        f"AUPRO@0.3    {metrics['aupro']:.4f}",
        "per type     " + ", ".join(f"{k} {v:.3f}" for k, v in metrics["per_type_image_auroc"].items()),
        f"evaluation   {metrics['eval_images_per_second']:.2f} images/s",
    ]
    if "warning" in metrics:
        lines += ["", "WARNING: test-set model selection (--compat-official);", "numbers are optimistic."]
    viz.summary_page(path, title=f"FOD run summary{title_extra}", lines=lines, history=history,
                     labels=res["labels"], image_scores=res["image_scores"], masks=res["masks"], maps=res["maps"],
                     examples=summary_examples(ds, res, vmin, vmax))


def report(metrics: dict, out: Path, log=say):
    log(f"fod: image AUROC {metrics['image_auroc']:.4f}  pixel AUROC {metrics['pixel_auroc']:.4f}  "
        f"AUPRO@0.3 {metrics['aupro']:.4f}  ({metrics['protocol']})")
    for k, v in metrics["per_type_image_auroc"].items():
        log(f"      {k:>20s}: image AUROC {v:.4f}")
    if "warning" in metrics:
        banner(metrics["warning"])
    log(f"fod: results in {out}/ (metrics.json, checkpoint.pt, heatmaps/, summary.png)")


# ----------------------------------------------------------------------------- test / predict

def test(checkpoint, data, output, *, dataset: Optional[str] = None, device: str = "cpu",
         backend: Optional[str] = None, batch_size: Optional[int] = None, overwrite: bool = False,
         heatmaps: int = -1, log=say) -> dict:
    out = prepare_output(output, overwrite=overwrite, products=("metrics.json", "summary.png"))
    fod = load_checkpoint(checkpoint, device, backend)
    cfg = fod.cfg
    if batch_size:
        cfg.batch_size = batch_size
    ds = AnomalyDataset(data, "test", dataset or cfg.dataset, cfg.image_size, cfg.resize)
    res = evaluate(fod, ds, cfg, device)
    vmin, vmax = write_heatmaps(out, ds, res, heatmaps)
    backend_name = fod.models[0].layers[0].attn.backend
    metrics = public_metrics(res)
    metrics.update(protocol="evaluation of a saved checkpoint", checkpoint=str(checkpoint), data=str(data),
                   weights=fod.backbone.weights_source, backend=backend_name,
                   config=dataclasses.asdict(cfg), versions=versions(backend_name))
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    write_summary(out / "summary.png", cfg, metrics, res, ds, vmin, vmax, fod.checkpoint.get("history", []),
                  " (fod test)")
    report(metrics, out, log)
    return metrics


def predict(checkpoint, images, output, *, device: str = "cpu", backend: Optional[str] = None,
            batch_size: int = 8, overwrite: bool = False, log=say) -> dict:
    """Anomaly maps and image scores of new images: heatmaps/*.png, maps.npz and scores.json."""
    out = prepare_output(output, overwrite=overwrite, products=("scores.json",))
    fod = load_checkpoint(checkpoint, device, backend)
    cfg = fod.cfg
    paths = [Path(p) for p in images]
    if not paths:
        raise ValueError("no images given to predict")
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"image not found: {p}")
    maps = []
    for chunk in tqdm([paths[i:i + batch_size] for i in range(0, len(paths), batch_size)], desc="predict",
                      unit="batch", leave=False):
        imgs = torch.stack([load_image(p, cfg.image_size, cfg.resize) for p in chunk]).to(device)
        maps.append(fod.anomaly_maps(imgs, amp=cfg.amp).float().cpu().numpy())
    maps = np.concatenate(maps)
    scores = M.image_scores(maps)
    scale = fod.checkpoint.get("map_scale")
    vmin, vmax = scale if scale else (float(maps.min()), float(maps.max()))
    hdir = out / "heatmaps"
    hdir.mkdir(exist_ok=True)
    names, result = set(), {}
    for i, p in enumerate(paths):
        name = p.stem
        while name in names:
            name = f"{name}_{i}"
        names.add(name)
        img = denormalize(load_image(p, cfg.image_size, cfg.resize))
        viz.save_overlay(hdir / f"{name}.png", img, maps[i], None, vmin, vmax)
        result[str(p)] = {"score": float(scores[i]), "heatmap": str(hdir / f"{name}.png"), "map_key": name}
    np.savez_compressed(out / "maps.npz", **{r["map_key"]: maps[i] for i, r in enumerate(result.values())})
    atomic_write_text(out / "scores.json", json.dumps(
        {"checkpoint": str(checkpoint), "image_score": "max of the sigma-4 Gaussian-filtered anomaly map",
         "heatmap_scale": [vmin, vmax], "images": result}, indent=2))
    for p, r in result.items():
        log(f"{r['score']:.6g}  {p}")
    log(f"fod: maps and scores of {len(paths)} images in {out}/ (scores.json, maps.npz, heatmaps/)")
    return result
