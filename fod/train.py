"""Training FOD (docs/I2CORRELATION.md sections 5-6): the epoch loop and the run around it.

Honest protocol by default: train the configured epochs, evaluate the final model once.
``compat_official`` reproduces the public code instead (output projection discarded, test-set
evaluation after every epoch, best image and best pixel AUROC reported from possibly different
epochs) and says so.
"""
from __future__ import annotations

import time

import torch
from tqdm import tqdm

from . import checkpoint as C
from . import report as R
from .backbone import build_backbone
from .config import Config, resume_differences, to_dict, to_toml
from .data import AnomalyDataset
from .evaluate import evaluate, public_metrics
from .files import atomic_write_text, prepare_output
from .model import FOD, extract_features, fod_loss, reference_memory, resolve_backend

TRAIN_PRODUCTS = ("checkpoint.pt", "metrics.json", "summary.png")


def train_epoch(fod: FOD, opt: torch.optim.Optimizer, cfg: Config, gen: torch.Generator, n: int, *, cached=None,
                train_ds=None, desc: str = "epoch") -> dict:
    """One pass over the ``n`` training images in the order drawn from ``gen``: sample-weighted means of
    the loss and its parts ({"loss", "rec", "k_intra", "k_inter"})."""
    device = cfg.device
    fod.models.train()
    perm = torch.randperm(n, generator=gen)
    sums = {"loss": 0.0, "rec": 0.0, "k_intra": 0.0, "k_inter": 0.0}
    bar = tqdm(perm.split(cfg.batch_size), desc=desc, unit="batch", leave=False)
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
    return sums


def train(cfg: Config, output, *, resume: bool = False, overwrite: bool = False, log=R.say) -> dict:
    """Train, evaluate once (or per epoch with compat_official), write all outputs; return metrics."""
    cfg.check()
    out = prepare_output(output, resume=resume, overwrite=overwrite, products=TRAIN_PRODUCTS)
    ck_path = out / "checkpoint.pt"
    ck = None
    if resume:
        if not ck_path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint to resume from at {ck_path}")
        ck = C.load_raw(ck_path)
        diff = resume_differences(C.config_of(ck, ck_path), cfg)
        if diff:
            raise ValueError(f"--resume with a different configuration than {ck_path}: "
                             + ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items()))
    if cfg.compat_official:
        R.banner(R.COMPAT_WARNING)
    device = cfg.device
    C.seed_all(cfg.seed)
    train_ds = AnomalyDataset(cfg.data, "train", cfg.dataset, cfg.image_size, cfg.resize)
    test_ds = AnomalyDataset(cfg.data, "test", cfg.dataset, cfg.image_size, cfg.resize)
    backbone = C.backbone_from_checkpoint(ck) if ck else build_backbone(cfg)
    backbone.to(device)
    grids = backbone.grids(cfg.image_size)
    fod = FOD(cfg, backbone, grids)
    backend = resolve_backend(cfg.backend, torch.device(device))
    fod.to(device)
    fod.set_backend(backend)
    atomic_write_text(out / "config.toml", to_toml(cfg))
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
        C.set_rng_state(ck["rng"], gen)
        start, history, train_seconds = ck["epoch"], ck["history"], ck["train_seconds"]
        compat = ck.get("compat", compat)
        log(f"fod: resuming {ck_path} after epoch {start}")

    def save(epoch, extra=None):
        C.save(ck_path, cfg=cfg, fod=fod, optimizer=opt, gen=gen, epoch=epoch, history=history,
               train_seconds=train_seconds, compat=compat, extra=extra)

    n = len(train_ds)
    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        sums = train_epoch(fod, opt, cfg, gen, n, cached=cached, train_ds=train_ds,
                           desc=f"epoch {epoch + 1}/{cfg.epochs}")
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
        save(epoch + 1)

    log("fod: evaluating the final model on the test set")
    res = evaluate(fod, test_ds, cfg, device)
    scale = R.map_scale(res)
    save(max(cfg.epochs, start), {"map_scale": scale})
    metrics = public_metrics(res)
    metrics.update(protocol="honest: trained the configured epochs, final model evaluated once",
                   epochs=cfg.epochs, train_seconds=train_seconds,
                   train_seconds_per_epoch=train_seconds / max(1, len(history)) if history else None,
                   weights=backbone.weights_source, backend=backend, config=to_dict(cfg), score=fod.score_description,
                   versions=R.versions(backend), history=history)
    if cfg.compat_official and compat["epochs"]:
        bi = max(compat["epochs"], key=lambda e: e["image_auroc"])
        bp = max(compat["epochs"], key=lambda e: e["pixel_auroc"])
        metrics.update(protocol="COMPAT-OFFICIAL (test-set model selection; see warning)", warning=R.COMPAT_WARNING,
                       final_epoch={k: metrics[k] for k in ("image_auroc", "pixel_auroc", "aupro")},
                       image_auroc=bi["image_auroc"], image_auroc_epoch=bi["epoch"],
                       pixel_auroc=bp["pixel_auroc"], pixel_auroc_epoch=bp["epoch"],
                       aupro=bp["aupro"], per_epoch=compat["epochs"])
    R.write_outputs(out, cfg=cfg, ds=test_ds, res=res, metrics=metrics, history=history, scale=scale,
                    heatmaps=cfg.heatmaps, products="metrics.json, checkpoint.pt, config.toml, heatmaps/, summary.png",
                    log=log)
    return metrics
