"""Training FOD (docs/I2CORRELATION.md sections 5-6): the epoch loop and the run around it.

Honest protocol by default: train the configured epochs, evaluate the final model once.
``compat_official`` reproduces the public code instead (output projection discarded, test-set
evaluation after every epoch, best image and best pixel AUROC reported from possibly different
epochs) and says so.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import time

import torch
from tqdm import tqdm

from . import calibrate as CAL
from . import checkpoint as C
from . import distributed as D
from . import report as R
from .backbone import build_backbone
from .config import Config, check_device, resume_differences, to_dict, to_toml
from .data import AnomalyDataset, Preprocess, check_split, scan_sizes
from .evaluate import evaluate, public_metrics
from .files import OutputFolder, WriteError, atomic_write_text, refuse_inside
from .model import (FOD, default_d_model, extract_features, fod_loss, reconstruction_loss, reference_memory,
                    resolve_backend)

TRAIN_PRODUCTS = ("checkpoint.pt", "metrics.json", "summary.png")
LOSS_TERMS = ("rec", "K_intra", "K_inter", "E_intra", "E_inter")


def _mean(stats, field):
    return torch.stack([getattr(s, field).float().mean() for s in stats]).mean()


def loss_terms(out, x, intra, inter) -> dict:
    """The terms of one level's loss by name (the order in which a non-finite one is reported)."""
    return {"rec": reconstruction_loss(out, x), "K_intra": _mean(intra, "kl_attn"), "K_inter": _mean(inter, "kl_attn"),
            "E_intra": _mean(intra, "entropy"), "E_inter": _mean(inter, "entropy")}


def train_epoch(fod: FOD, opt: torch.optim.Optimizer, cfg: Config, gen: torch.Generator, n: int, *, cached=None,
                train_ds=None, desc: str = "epoch", epoch: int = 0, ddp=None) -> dict:
    """One pass over the ``n`` training images in the order drawn from ``gen``: sample-weighted means of
    the loss and its parts ({"loss", "rec", "k_intra", "k_inter"}). A non-finite loss raises
    C.NonFiniteError naming the first non-finite term, the level, the epoch and the step, before the
    weights are updated.

    With ``ddp`` (DistributedDataParallel over the level models, several processes) each global batch of
    N * batch_size images of the same order is shared out (fod.distributed.batch_share) and the loss and its
    parts are those of the global batch: the step equals the single-process step with batch N * batch_size."""
    device = cfg.device
    fod.models.train()
    perm = torch.randperm(n, generator=gen)
    sums = {"loss": 0.0, "rec": 0.0, "k_intra": 0.0, "k_inter": 0.0}
    world = D.current().world_size if ddp is not None else 1
    bar = tqdm(perm.split(cfg.batch_size * world), desc=desc, unit="batch", leave=False)
    for step, idx in enumerate(bar, 1):
        mine, share = D.batch_share(idx) if ddp is not None else (idx, None)
        if cached is not None:
            feats = [f[mine].to(device) for f in cached]
        else:
            imgs = torch.stack([train_ds[int(i)]["image"] for i in mine]).to(device)
            feats = fod.tokens(imgs)
        loss = 0.0
        parts = {"rec": 0.0, "k_intra": 0.0, "k_inter": 0.0}
        levels = []
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.amp):
            outs = ddp(feats, fod.memories) if ddp is not None else None
            for lv_i, (f, model, mem) in enumerate(zip(feats, fod.models, fod.memories)):
                o, intra, inter = outs[lv_i] if outs is not None else model(f, mem)
                lv, p = fod_loss(o.float(), f, intra, inter, cfg.lambda1, cfg.lambda2)
                loss = loss + lv
                parts = {k: parts[k] + float(p[k]) for k in parts}
                levels.append((o, f, intra, inter))
        value = float(loss.detach())
        if ddp is not None:
            mine_value, (value, parts) = value, D.global_means(value, parts, share, device)
            if not math.isfinite(value):  # every process stops here, rank 0 names the term
                raise C.NonFiniteError(D.first_message(
                    _diagnose(fod, levels, mine_value, epoch, step) if share and not math.isfinite(mine_value)
                    else None))
        if not math.isfinite(value):
            raise C.NonFiniteError(_diagnose(fod, levels, value, epoch, step))
        del levels
        opt.zero_grad(set_to_none=True)
        if ddp is not None:
            with D.collective(f"epoch {epoch}, step {step}"):
                (loss * share).backward()  # DDP averages the gradients over the processes
        else:
            loss.backward()
        opt.step()
        w = len(idx) / n
        sums["loss"] += value * w
        for k in parts:
            sums[k] += parts[k] * w
        bar.set_postfix(loss=f"{value:.4f}", rec=f"{parts['rec']:.4f}")
    return sums


@torch.no_grad()
def _diagnose(fod: FOD, levels, total: float, epoch: int, step: int) -> str:
    where = f"epoch {epoch}, step {step}"
    for lv_name, (o, f, intra, inter) in zip(fod.backbone.levels, levels):
        terms = {k: float(v) for k, v in loss_terms(o.float(), f, intra, inter).items()}
        bad = [k for k in LOSS_TERMS if not math.isfinite(terms[k])]
        if bad:
            return (f"training diverged at {where}: the first non-finite loss term is {bad[0]} = {terms[bad[0]]} "
                    f"(level {lv_name}" + (f"; also {', '.join(bad[1:])}" if bad[1:] else "") + ")")
    return f"training diverged at {where}: the total loss is {total} although every term is finite"


def data_fingerprint(ds: AnomalyDataset) -> dict:
    """What --resume checks about the training images: their count, names and sizes."""
    h = hashlib.sha256()
    for smp in ds.samples:
        h.update(f"{smp.image.relative_to(ds.root).as_posix()}\0{smp.image.stat().st_size}\n".encode())
    return {"count": len(ds.samples), "sha256": h.hexdigest()}


def train(cfg: Config, output, *, resume: bool = False, overwrite: bool = False, log=R.say) -> dict:
    """Train, evaluate once (or per epoch with compat_official), write all outputs; return metrics.

    Everything that can be checked is checked before the output folder is touched: the options, the
    checkpoint to resume, the backbone weights, the image size, every test image and mask, the output
    folder. A fresh run writes checkpoint.pt (and config.toml) into the folder after every epoch (so that
    --resume can continue it); an --overwrite run stages them with the other products until it succeeds.

    Under torchrun (several processes, fod.distributed): the same run with the global batch N * batch_size,
    rank 0 logs, writes every file and returns the metrics; the other processes return None.
    """
    ctx = D.current()
    if not ctx.is_main:
        log = D.quiet
    cfg.check()
    if ctx.distributed:
        cfg = dataclasses.replace(cfg, device=D.local_device(cfg.device))
    if resume and overwrite:
        raise ValueError("--resume and --overwrite contradict each other: --resume continues the run in --output, "
                         "--overwrite replaces it")
    check_device(cfg.device)
    refuse_inside(output, cfg.data)
    folder = OutputFolder(output, "train", overwrite=overwrite, resume=resume)
    if ctx.is_main:  # the other processes never look at the output folder's contents
        folder.check()
    ck_path = folder.path / "checkpoint.pt"
    ck = None
    if resume:
        if not ck_path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint to resume from at {ck_path}")
        ck = C.load_raw(ck_path, resume=True, log=log)
        saved_cfg = C.config_of(ck, ck_path)
        diff = resume_differences(saved_cfg, cfg)
        diff.pop("batch_size", None)  # the batch per process; the global batch must be the same (below)
        global_batch = ck.get("global_batch_size", saved_cfg.batch_size)
        if ctx.world_size * cfg.batch_size != global_batch:
            raise ValueError(f"--resume with {ctx.world_size} process(es) x --batch-size {cfg.batch_size}: {ck_path} "
                             f"was trained with a global batch of {global_batch} ({ck.get('world_size', 1)} "
                             f"process(es) x {saved_cfg.batch_size}); keep the global batch: "
                             + (f"--batch-size {global_batch // ctx.world_size}"
                                if global_batch % ctx.world_size == 0 else
                                f"a number of processes that divides {global_batch}"))
        if diff:
            raise ValueError(f"--resume with a different configuration than {ck_path}: "
                             + ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items()))
        if cfg.epochs < ck["epoch"]:
            raise ValueError(f"--resume --epochs {cfg.epochs}: {ck_path} has already been trained for {ck['epoch']} "
                             f"epochs; pass --epochs {ck['epoch']} or more (fod test evaluates it as it is)")
    if cfg.compat_official and ctx.is_main:
        R.banner(R.COMPAT_WARNING)
    device = cfg.device
    C.seed_all(cfg.seed)
    backbone = C.backbone_from_checkpoint(ck, ck_path) if ck else build_backbone(cfg)
    if backbone.weights_note:
        log(f"fod: weights: {backbone.weights_note}")
    pre = Preprocess(cfg.image_size, cfg.resize, cfg.interpolation, backbone.mean, backbone.std)
    train_ds = AnomalyDataset(cfg.data, "train", cfg.dataset, pre=pre)
    test_ds = AnomalyDataset(cfg.data, "test", cfg.dataset, pre=pre)
    fingerprint = data_fingerprint(train_ds)  # of the whole training folder; fit_ds leaves out the held-out images
    fit_ds, val_ds, cal_plan = CAL.datasets(cfg, train_ds)
    if ck and ck.get("train_data", fingerprint) != fingerprint:
        raise ValueError(f"--resume: the training images under {cfg.data} are not those {ck_path} was trained on "
                         f"({ck['train_data']['count']} images then, {fingerprint['count']} now, or other names or "
                         "sizes); resume with the same data, or train anew")
    backbone.to(device)
    grids = backbone.check_image_size(cfg.image_size)
    for lv, g, w in zip(backbone.levels, grids, cfg.d_model or [default_d_model(g[0] * g[1]) for g in grids]):
        if w % cfg.n_heads:
            raise ValueError(f"--heads {cfg.n_heads} does not divide the model width {w} of level {lv}"
                             + ("" if cfg.d_model else f" (the default for its {g[0]}x{g[1]} grid)")
                             + "; choose --heads dividing it, or --d-model")
    fod = FOD(cfg, backbone, grids)
    backend = resolve_backend(cfg.backend, torch.device(device))
    fod.to(device)
    fod.set_backend(backend)
    log(f"fod: {len(train_ds)} training and {len(test_ds)} test images from {cfg.data} ({cfg.dataset} layout)")
    R.log_preprocessing(pre, scan_sizes(train_ds) + scan_sizes(test_ds), log)
    if ctx.distributed and len(fit_ds) < ctx.world_size:
        raise ValueError(f"{len(fit_ds)} training images for {ctx.world_size} processes: use at most "
                         f"{len(fit_ds)} processes")
    log(f"fod: {cal_plan['note']}" + (f" ({len(val_ds)} image{'s' * (len(val_ds) != 1)})" if val_ds else ""))
    if ctx.is_main:
        check_split(test_ds)  # every test image and mask, before the first epoch
        if val_ds is not None:
            check_split(val_ds, need_both_classes=False)
    log(f"fod: backbone {cfg.backbone} levels {backbone.levels} (channels {backbone.channels}, grids {grids}), "
        f"weights: {backbone.weights_source}")
    log(f"fod: d_model {fod.d_models}, {cfg.n_heads} heads, {cfg.n_layers} layers, backend {backend!r}, "
        f"device {device}{', bf16 autocast' if cfg.amp else ''}")

    if ctx.distributed:
        log(f"fod: {ctx.world_size} processes (torchrun): global batch {ctx.world_size * cfg.batch_size} = "
            f"{ctx.world_size} x --batch-size {cfg.batch_size}")
    with (folder.open() if ctx.is_main else D.no_folder(folder.path)) as o:
        D.checks_passed()  # several processes: every one passed its checks (else all stop here)
        replacing = o.replacing
        run_dir = o.stage if replacing else o.path  # where checkpoint.pt and config.toml go during training
        if not replacing:
            o.in_place = {"checkpoint.pt", "config.toml"}
        ck_file = run_dir / "checkpoint.pt"
        mine = D.shard_of(fit_ds)  # several processes: each extracts the features of its shard
        cached = extract_features(fod, mine, cfg, device, "features") if cfg.cache_features else None
        if ck:
            fod.memories = [m.to(device) for m in ck["memory"]]
            fod.models.load_state_dict(ck["models"])
        else:
            fod.memories = [m.to(device) for m in reference_memory(
                fod, mine, cfg, device, cached, reduce=D.all_reduce_sum if ctx.distributed else None)]
        if cached is not None and ctx.distributed:  # every process can serve any image of a global batch
            cached = [D.all_gather_rows(f, "gathering the features") for f in cached]
        ddp = D.wrap(fod.models, device, find_unused=not (cfg.with_intra or cfg.with_inter)) \
            if ctx.distributed else None
        opt = torch.optim.Adam(fod.models.parameters(), lr=cfg.lr)
        gen = torch.Generator().manual_seed(cfg.seed)
        start, history, train_seconds, compat = 0, [], 0.0, {"epochs": []}
        if ck:
            opt.load_state_dict(ck["optimizer"])
            C.set_rng_state(ck["rng"], gen)
            start, history, train_seconds = ck["epoch"], ck["history"], ck["train_seconds"]
            compat = ck.get("compat", compat)
            log(f"fod: resuming {ck_path} after epoch {start}")
        saved = {"epoch": start if ck else None, "config": False}

        def save(epoch, extra=None):
            if not ctx.is_main:  # rank 0 writes
                saved["epoch"] = epoch
                return
            C.save(ck_file, cfg=cfg, fod=fod, optimizer=opt, gen=gen, epoch=epoch, history=history,
                   train_seconds=train_seconds, compat=compat,
                   extra={"train_data": fingerprint, "world_size": ctx.world_size,
                          "global_batch_size": ctx.world_size * cfg.batch_size, **(extra or {})})
            if not saved["config"]:  # with the first checkpoint of this run
                atomic_write_text(run_dir / "config.toml", to_toml(cfg))
                saved["config"] = True
            saved["epoch"] = epoch

        def kept() -> str:
            if replacing:
                return f"the previous results in {o.path} are unchanged"
            if saved["epoch"] is None:
                return "no checkpoint was written"
            return f"{ck_path} keeps the last good model (epoch {saved['epoch']}; --resume continues from it)"

        n = len(fit_ds)
        try:
            for epoch in range(start, cfg.epochs):
                t0 = time.perf_counter()
                sums = train_epoch(fod, opt, cfg, gen, n, cached=cached, train_ds=fit_ds,
                                   desc=f"epoch {epoch + 1}/{cfg.epochs}", epoch=epoch + 1, ddp=ddp)
                bad = C.nonfinite(fod.models.state_dict())
                if bad:
                    raise C.NonFiniteError(f"training diverged in epoch {epoch + 1}: every loss was finite but the "
                                           f"last update made weights non-finite ({', '.join(bad[:3])})")
                secs = time.perf_counter() - t0
                train_seconds += secs
                history.append({"epoch": epoch + 1, "seconds": secs, **sums})
                log(f"epoch {epoch + 1}/{cfg.epochs}: loss {sums['loss']:.4f} rec {sums['rec']:.4f} "
                    f"K_intra {sums['k_intra']:.3f} K_inter {sums['k_inter']:.3f} ({secs:.1f} s, {n / secs:.1f} img/s)")
                if cfg.compat_official:
                    r = evaluate(fod, test_ds, cfg, device, desc=f"test-set selection, epoch {epoch + 1}")
                    if r is not None:  # None: a process other than rank 0
                        e = {"epoch": epoch + 1, **{k: r[k] for k in ("image_auroc", "pixel_auroc", "aupro")}}
                        compat["epochs"].append(e)
                        log(f"  [compat-official] test set after epoch {epoch + 1}: image AUROC "
                            f"{e['image_auroc']:.4f} pixel AUROC {e['pixel_auroc']:.4f}")
                save(epoch + 1)
        except C.NonFiniteError as exc:
            if not ctx.is_main:
                raise D.Elsewhere("reported by rank 0") from None
            raise C.NonFiniteError(f"{exc}; {kept()}. Lower --lr (now {cfg.lr}) or check the data") from None
        except D.DistributedError as exc:
            raise D.DistributedError(f"{exc}; {kept()}") from None
        except WriteError as exc:
            raise WriteError(exc.errno, f"{exc}; {kept()}") from None

        # the calibration images are scored by rank 0 alone (the level models are equal on every process)
        calib = CAL.calibrate(fod, val_ds, cfg, device, cal_plan, log) if val_ds is not None and ctx.is_main else None
        log("fod: evaluating the final model on the test set")
        res = evaluate(fod, test_ds, cfg, device)
        if res is None:  # a process other than rank 0: rank 0 has the maps and writes the results
            return None
        scale = R.map_scale(res)
        save(max(cfg.epochs, start), {"map_scale": scale, "calibration": calib})
        metrics = public_metrics(res)
        metrics.update(thresholds=CAL.threshold_metrics(res, calib), calibration=calib)
        metrics.update(protocol="honest: trained the configured epochs, final model evaluated once",
                       epochs=cfg.epochs, train_seconds=train_seconds,
                       train_seconds_per_epoch=train_seconds / max(1, len(history)) if history else None,
                       weights=backbone.weights_source, backend=backend, config=to_dict(cfg),
                       preprocess=pre.describe(), score=fod.score_description,
                       versions=R.versions(backend), history=history, world_size=ctx.world_size,
                       global_batch_size=ctx.world_size * cfg.batch_size)
        if cfg.compat_official and compat["epochs"]:
            bi = max(compat["epochs"], key=lambda e: e["image_auroc"])
            bp = max(compat["epochs"], key=lambda e: e["pixel_auroc"])
            metrics.update(protocol="COMPAT-OFFICIAL (test-set model selection; see warning)",
                           warning=R.COMPAT_WARNING,
                           final_epoch={k: metrics[k] for k in ("image_auroc", "pixel_auroc", "aupro")},
                           image_auroc=bi["image_auroc"], image_auroc_epoch=bi["epoch"],
                           pixel_auroc=bp["pixel_auroc"], pixel_auroc_epoch=bp["epoch"],
                           aupro=bp["aupro"], per_epoch=compat["epochs"])
        written = R.write_outputs(o.stage, cfg=cfg, ds=test_ds, res=res, metrics=metrics, history=history,
                                  scale=scale, heatmaps=cfg.heatmaps)
        o.commit()
    CAL.log_threshold_metrics(metrics["thresholds"], log)
    R.log_metrics(metrics, folder.path, ", ".join(["checkpoint.pt", "config.toml"] + written), log)
    return metrics
