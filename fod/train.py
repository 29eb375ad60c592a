"""Training FOD (docs/I2CORRELATION.md sections 5-6): the epoch loop and the run around it.

Honest protocol by default: train the configured epochs, evaluate the final model once.
``compat_official`` reproduces the public code instead (output projection discarded, test-set
evaluation after every epoch, best image and best pixel AUROC reported from possibly different
epochs) and says so.

``train`` runs in phases: check (the options, the checkpoint to resume, the output folder), build (backbone,
data, model; every test image read), fit (features, reference memory, the epoch loop, a checkpoint and then
the run's log, fod.tracking, after every epoch) and finish (calibration, the final evaluation, the outputs).
One process or several under torchrun is the runner's business (``fod.runner``): the loop itself has no
distributed branches.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import time
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from . import calibrate, checkpoint, distributed, interrupt, report, tracking
from .backbone import Backbone, build_backbone
from .config import Config, check_device, resume_differences, to_dict, to_toml
from .data import AnomalyDataset, Preprocess, check_split, scan_sizes
from .evaluate import evaluate, public_metrics
from .files import LOGS, OutputFolder, WriteError, atomic_write_text, refuse_inside
from .model import FOD, default_d_model, extract_features, fod_loss, reconstruction_loss, reference_memory, \
    resolve_backend
from .runner import Runner, runner_for

LOSS_TERMS = ("rec", "K_intra", "K_inter", "E_intra", "E_inter")


def _mean(stats, field):
    return torch.stack([getattr(s, field).float().mean() for s in stats]).mean()


def loss_terms(out, x, intra, inter) -> dict:
    """The terms of one level's loss by name (the order in which a non-finite one is reported)."""
    return {"rec": reconstruction_loss(out, x), "K_intra": _mean(intra, "kl_attn"), "K_inter": _mean(inter, "kl_attn"),
            "E_intra": _mean(intra, "entropy"), "E_inter": _mean(inter, "entropy")}


def train_epoch(fod: FOD, opt: torch.optim.Optimizer, cfg: Config, gen: torch.Generator, n: int, *, cached=None,
                train_ds=None, desc: str = "epoch", epoch: int = 0, runner: Optional[Runner] = None,
                on_step=None) -> dict:
    """One pass over the ``n`` training images in the order drawn from ``gen``: sample-weighted means of
    the loss and its parts ({"loss", "rec", "k_intra", "k_inter", "e_intra", "e_inter"}); ``on_step(step, values)``
    after each step with that step's (the global batch's). A non-finite loss raises
    checkpoint.NonFiniteError naming the first non-finite term, the level, the epoch and the step, before the
    weights are updated.

    ``runner`` (default: one process) runs the level models (``runner.wrap`` took them). Under torchrun
    (fod.runner.DDPRunner) each global batch of N * batch_size images of the same order is shared out and the
    loss and its parts are those of the global batch: the step equals the single-process step with batch
    N * batch_size."""
    if runner is None:
        runner = Runner()
        runner.wrap(fod.models, cfg.device, find_unused=False)
    device = cfg.device
    fod.models.train()
    perm = torch.randperm(n, generator=gen)
    sums = {"loss": 0.0, "rec": 0.0, "k_intra": 0.0, "k_inter": 0.0, "e_intra": 0.0, "e_inter": 0.0}
    bar = tqdm(perm.split(cfg.batch_size * runner.world_size), desc=desc, unit="batch", leave=False)
    for step, idx in enumerate(bar, 1):
        mine, share = runner.share(idx)
        if cached is not None:
            feats = [f[mine].to(device) for f in cached]
        else:
            imgs = torch.stack([train_ds[int(i)]["image"] for i in mine]).to(device)
            feats = fod.tokens(imgs)
        loss = 0.0
        parts = {"rec": 0.0, "k_intra": 0.0, "k_inter": 0.0, "e_intra": 0.0, "e_inter": 0.0}
        levels = []
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.amp):
            for f, (o, intra, inter) in zip(feats, runner.forward(feats, fod.memories)):
                lv, p = fod_loss(o.float(), f, intra, inter, cfg.lambda1, cfg.lambda2)
                loss = loss + lv
                parts = {k: parts[k] + float(p[k]) for k in parts}
                levels.append((o, f, intra, inter))
        value, parts = runner.reduce_loss(float(loss.detach()), parts, share, device,
                                          lambda total: _diagnose(fod, levels, total, epoch, step))
        levels.clear()  # the outputs kept for the diagnosis: freed before the backward
        opt.zero_grad(set_to_none=True)
        runner.backward(loss, share, f"epoch {epoch}, step {step}")
        opt.step()
        w = len(idx) / n
        sums["loss"] += value * w
        for k in parts:
            sums[k] += parts[k] * w
        if on_step is not None:
            on_step(step, {"loss": value, **parts})
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


def train(cfg: Config, output, *, resume: bool = False, overwrite: bool = False, log=report.say) -> Optional[dict]:
    """Train, evaluate once (or per epoch with compat_official), write all outputs; return metrics.

    Everything that can be checked is checked before the output folder is touched: the options, the
    checkpoint to resume, the backbone weights, the image size, every test image and mask, the output
    folder. A fresh run writes checkpoint.pt (and config.toml), then log.csv and tensorboard/ (fod.tracking), into
    the folder after every epoch (so that --resume can continue it); an --overwrite run stages them with the other
    products until it succeeds. SIGINT or SIGTERM (fod.interrupt) is told which epoch the folder keeps.

    Under torchrun (several processes, fod.distributed): the same run with the global batch N * batch_size,
    rank 0 logs, writes every file and returns the metrics; the other processes return None.
    """
    runner = runner_for()
    log = runner.log(log)
    cfg, folder, ck = _check(cfg, output, resume, overwrite, runner, log)
    run = _build(cfg, folder, ck, runner, log)
    with runner.output(folder) as o, contextlib.ExitStack() as cleanup:
        distributed.checks_passed()  # several processes: every one passed its checks (else all stop here)
        fit = _Fit(run, o, runner, log)
        cleanup.callback(fit.close_log)
        fit.epochs()
        done = _finish(run, fit, o, runner, log)
    if done is None:  # a process other than rank 0: rank 0 has the maps and writes the results
        return None
    metrics, written = done
    calibrate.log_threshold_metrics(metrics["thresholds"], log)
    logs = [tracking.CSV_NAME] + ([tracking.EVENTS_NAME + "/"] if (folder.path / tracking.EVENTS_NAME).is_dir() else [])
    report.log_metrics(metrics, folder.path, ", ".join(["checkpoint.pt", "config.toml"] + written + logs), log)
    return metrics


# ----------------------------------------------------------------------------- check

def _check(cfg: Config, output, resume: bool, overwrite: bool, runner: Runner, log):
    """(the configuration as this process runs it, the output folder, the checkpoint to resume or None)."""
    cfg = runner.configure(cfg.check())
    if resume and overwrite:
        raise ValueError("--resume and --overwrite contradict each other: --resume continues the run in --output, "
                         "--overwrite replaces it")
    check_device(cfg.device)
    refuse_inside(output, cfg.data)
    folder = OutputFolder(output, "train", overwrite=overwrite, resume=resume)
    if runner.is_main:  # the other processes never look at the output folder's contents
        folder.check()
    return cfg, folder, _resumed(cfg, folder.path / "checkpoint.pt", runner, log) if resume else None


def _resumed(cfg: Config, ck_path: Path, runner: Runner, log) -> dict:
    """The checkpoint that --resume continues, checked against this run's configuration."""
    if not ck_path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint to resume from at {ck_path}")
    ck = checkpoint.load_raw(ck_path, resume=True, log=log)
    saved_cfg = checkpoint.config_of(ck, ck_path)
    diff = resume_differences(saved_cfg, cfg)
    diff.pop("batch_size", None)  # the batch per process; the global batch must be the same (below)
    global_batch = ck.get("global_batch_size", saved_cfg.batch_size)
    world = runner.world_size
    if world * cfg.batch_size != global_batch:
        raise ValueError(f"--resume with {world} process(es) x --batch-size {cfg.batch_size}: {ck_path} "
                         f"was trained with a global batch of {global_batch} ({ck.get('world_size', 1)} "
                         f"process(es) x {saved_cfg.batch_size}); keep the global batch: "
                         + (f"--batch-size {global_batch // world}"
                            if global_batch % world == 0 else
                            f"a number of processes that divides {global_batch}"))
    if diff:
        raise ValueError(f"--resume with a different configuration than {ck_path}: "
                         + ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items()))
    if runner.is_main:
        tracking.read_rows(ck_path.parent / tracking.CSV_NAME)  # a damaged log.csv is said now, not after the features
    if cfg.epochs < ck["epoch"]:
        raise ValueError(f"--resume --epochs {cfg.epochs}: {ck_path} has already been trained for {ck['epoch']} "
                         f"epochs; pass --epochs {ck['epoch']} or more (fod test evaluates it as it is)")
    return ck


# ----------------------------------------------------------------------------- build

@dataclasses.dataclass
class _Run:
    """What the build phase made: the configuration, the data, the model and the folder the run writes."""
    cfg: Config
    folder: OutputFolder
    ck: Optional[dict]
    backbone: Backbone
    pre: Preprocess
    train_ds: AnomalyDataset
    test_ds: AnomalyDataset
    fit_ds: AnomalyDataset
    val_ds: Optional[AnomalyDataset]
    cal_plan: dict
    fingerprint: dict
    fod: FOD
    backend: str

    @property
    def ck_path(self) -> Path:
        return self.folder.path / "checkpoint.pt"


def _build(cfg: Config, folder: OutputFolder, ck: Optional[dict], runner: Runner, log) -> _Run:
    """The backbone, the datasets (every test image and mask read) and the model, on the device."""
    ck_path = folder.path / "checkpoint.pt"
    if cfg.compat_official and runner.is_main:
        report.banner(report.COMPAT_WARNING)
    device = cfg.device
    checkpoint.seed_all(cfg.seed)
    backbone = checkpoint.backbone_from_checkpoint(ck, ck_path) if ck else build_backbone(cfg)
    if backbone.weights_note:
        log(f"fod: weights: {backbone.weights_note}")
    pre = Preprocess(cfg.image_size, cfg.resize, cfg.interpolation, backbone.mean, backbone.std)
    train_ds = AnomalyDataset(cfg.data, "train", cfg.dataset, pre=pre)
    test_ds = AnomalyDataset(cfg.data, "test", cfg.dataset, pre=pre)
    fingerprint = data_fingerprint(train_ds)  # of the whole training folder; fit_ds leaves out the held-out images
    fit_ds, val_ds, cal_plan = calibrate.datasets(cfg, train_ds)
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
    if ck:
        checkpoint.restore(fod, ck, ck_path)  # before any long work: models and memory must fit the rebuilt model
    backend = resolve_backend(cfg.backend, torch.device(device))
    fod.to(device)
    fod.set_backend(backend)
    log(f"fod: {len(train_ds)} training and {len(test_ds)} test images from {cfg.data} ({cfg.dataset} layout)")
    report.log_preprocessing(pre, scan_sizes(train_ds) + scan_sizes(test_ds), log)
    if runner.world_size > 1 and len(fit_ds) < runner.world_size:
        raise ValueError(f"{len(fit_ds)} training images for {runner.world_size} processes: use at most "
                         f"{len(fit_ds)} processes")
    log(f"fod: {cal_plan['note']}" + (f" ({len(val_ds)} image{'s' * (len(val_ds) != 1)})" if val_ds else ""))
    if runner.is_main:
        check_split(test_ds)  # every test image and mask, before the first epoch
        if val_ds is not None:
            check_split(val_ds, need_both_classes=False)
    log(f"fod: backbone {cfg.backbone} levels {backbone.levels} (channels {backbone.channels}, grids {grids}), "
        f"weights: {backbone.weights_source}")
    log(f"fod: d_model {fod.d_models}, {cfg.n_heads} heads, {cfg.n_layers} layers, backend {backend!r}, "
        f"device {device}{', bf16 autocast' if cfg.amp else ''}")
    if runner.world_size > 1:
        log(f"fod: {runner.world_size} processes (torchrun): global batch {runner.world_size * cfg.batch_size} = "
            f"{runner.world_size} x --batch-size {cfg.batch_size}")
    return _Run(cfg, folder, ck, backbone, pre, train_ds, test_ds, fit_ds, val_ds, cal_plan, fingerprint, fod,
                backend)


# ----------------------------------------------------------------------------- fit

class _Fit:
    """The fit phase: the features and the reference memory, the optimiser (or the resumed state), the epoch
    loop, a checkpoint after every epoch and then the epoch's row of the run's log (rank 0; ``tlog``)."""

    def __init__(self, run: _Run, o, runner: Runner, log):
        cfg, fod, ck, device = run.cfg, run.fod, run.ck, run.cfg.device
        self.run, self.runner, self.log = run, runner, log
        self.replacing, self.path = o.replacing, o.path
        run_dir = o.stage if self.replacing else o.path  # where checkpoint.pt and config.toml go during training
        if not self.replacing:
            o.write_in_place({"checkpoint.pt", "config.toml", *LOGS})
        self.run_dir, self.ck_file = run_dir, run_dir / "checkpoint.pt"
        mine = runner.shard(run.fit_ds)  # several processes: each extracts the features of its shard
        cached = extract_features(fod, mine, cfg, device, "features") if cfg.cache_features else None
        if ck:
            fod.memories = [m.to(device) for m in fod.memories]
        else:
            fod.memories = [m.to(device) for m in reference_memory(fod, mine, cfg, device, cached,
                                                                   reduce=runner.reduce_sums)]
        self.cached = runner.gather(cached)  # several processes: every one can serve any image of a global batch
        runner.wrap(fod.models, device, find_unused=not (cfg.with_intra or cfg.with_inter))
        self.opt = torch.optim.Adam(fod.models.parameters(), lr=cfg.lr)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.start, self.history, self.train_seconds, self.compat = 0, [], 0.0, {"epochs": []}
        if ck:
            self.opt.load_state_dict(ck["optimizer"])
            checkpoint.set_rng_state(ck["rng"], self.gen)
            self.start, self.history, self.train_seconds = ck["epoch"], ck["history"], ck["train_seconds"]
            self.compat = ck.get("compat", self.compat)
            log(f"fod: resuming {run.ck_path} after epoch {self.start}")
        self.saved = {"epoch": self.start if ck else None, "config": False}
        self.steps_per_epoch = math.ceil(len(run.fit_ds) / (runner.world_size * cfg.batch_size))
        self.tlog = None
        if runner.is_main:  # rank 0 logs: log.csv and the event files go where the checkpoint goes
            self.tlog = tracking.RunLog.for_training(run_dir, steps_per_epoch=self.steps_per_epoch,
                                                     history=self.history, resume=bool(ck),
                                                     tensorboard=cfg.tensorboard, log=log)
            if self.tlog.events:
                log(f"fod: watch the run: tensorboard --logdir {self.path}")
        interrupt.set_hint(self.interrupted if runner.is_main else None)

    def close_log(self):
        if self.tlog is not None:
            self.tlog.close()

    def save(self, epoch, extra=None):
        run, cfg, world = self.run, self.run.cfg, self.runner.world_size
        if not self.runner.is_main:  # rank 0 writes
            self.saved["epoch"] = epoch
            return
        checkpoint.save(self.ck_file, cfg=cfg, fod=run.fod, optimizer=self.opt, gen=self.gen, epoch=epoch,
                        history=self.history, train_seconds=self.train_seconds, compat=self.compat,
                        extra={"train_data": run.fingerprint, "world_size": world,
                               "global_batch_size": world * cfg.batch_size,
                               "steps_per_epoch": self.steps_per_epoch, **(extra or {})})
        if not self.saved["config"]:  # with the first checkpoint of this run
            atomic_write_text(self.run_dir / "config.toml", to_toml(cfg))
            self.saved["config"] = True
        self.saved["epoch"] = epoch

    def interrupted(self) -> str:
        if self.replacing:
            return f"before the end; the previous results in {self.path} are unchanged"
        if self.saved["epoch"] is None:
            return "before the first checkpoint; run the same command to start again"
        return f"after epoch {self.saved['epoch']}; run the same command with --resume to continue"

    def kept(self) -> str:
        if self.replacing:
            return f"the previous results in {self.path} are unchanged"
        if self.saved["epoch"] is None:
            return "no checkpoint was written"
        return (f"{self.run.ck_path} keeps the last good model (epoch {self.saved['epoch']}; --resume continues "
                "from it)")

    def epochs(self):
        """Train from the start epoch to the configured one; a failure says what the folder still holds."""
        cfg = self.run.cfg
        try:
            for epoch in range(self.start, cfg.epochs):
                self.epoch(epoch)
        except checkpoint.NonFiniteError as exc:
            if not self.runner.is_main:
                raise distributed.Elsewhere("reported by rank 0") from None
            raise checkpoint.NonFiniteError(f"{exc}; {self.kept()}. Lower --lr (now {cfg.lr}) or check the "
                                            "data") from None
        except distributed.DistributedError as exc:
            raise distributed.DistributedError(f"{exc}; {self.kept()}") from None
        except WriteError as exc:
            raise WriteError(exc.errno, f"{exc}; {self.kept()}") from None

    def epoch(self, epoch: int):
        run, cfg, fod, log = self.run, self.run.cfg, self.run.fod, self.log
        n = len(run.fit_ds)
        t0 = time.perf_counter()
        tlog, spe = self.tlog, self.steps_per_epoch
        sums = train_epoch(fod, self.opt, cfg, self.gen, n, cached=self.cached, train_ds=run.fit_ds,
                           desc=f"epoch {epoch + 1}/{cfg.epochs}", epoch=epoch + 1, runner=self.runner,
                           on_step=tlog and (lambda s, v: tlog.train_step(epoch * spe + s, v)))
        bad = checkpoint.nonfinite(fod.models.state_dict())
        if bad:
            raise checkpoint.NonFiniteError(f"training diverged in epoch {epoch + 1}: every loss was finite but the "
                                            f"last update made weights non-finite ({', '.join(bad[:3])})")
        secs = time.perf_counter() - t0
        self.train_seconds += secs
        self.history.append({"epoch": epoch + 1, "seconds": secs, **sums, "lr": self.opt.param_groups[0]["lr"],
                             "images_per_second": n / secs})
        log(f"epoch {epoch + 1}/{cfg.epochs}: loss {sums['loss']:.4f} rec {sums['rec']:.4f} "
            f"K_intra {sums['k_intra']:.3f} K_inter {sums['k_inter']:.3f} ({secs:.1f} s, {n / secs:.1f} img/s)")
        r = None
        if cfg.compat_official:
            r = evaluate(fod, run.test_ds, cfg, cfg.device, desc=f"test-set selection, epoch {epoch + 1}")
            if r is not None:  # None: a process other than rank 0
                e = {"epoch": epoch + 1, **{k: r[k] for k in ("image_auroc", "pixel_auroc", "aupro")}}
                self.compat["epochs"].append(e)
                log(f"  [compat-official] test set after epoch {epoch + 1}: image AUROC "
                    f"{e['image_auroc']:.4f} pixel AUROC {e['pixel_auroc']:.4f}")
        self.save(epoch + 1)
        if tlog:  # after the checkpoint: log.csv never holds an epoch it lacks
            tlog.epoch(self.history[-1])
            if r is not None:
                tlog.evaluation(epoch + 1, tracking.evaluation_values(r), "compat_test")


# ----------------------------------------------------------------------------- finish

def _finish(run: _Run, fit: _Fit, o, runner: Runner, log) -> Optional[tuple]:
    """Calibrate, evaluate the final model, save it with the thresholds, write the outputs and commit the
    folder: (metrics, the files written) on rank 0, None on the other processes."""
    cfg, fod, device = run.cfg, run.fod, run.cfg.device
    # the calibration images are scored by rank 0 alone (the level models are equal on every process)
    calib = calibrate.calibrate(fod, run.val_ds, cfg, device, run.cal_plan, log) \
        if run.val_ds is not None and runner.is_main else None
    log("fod: evaluating the final model on the test set")
    res = evaluate(fod, run.test_ds, cfg, device)
    if res is None:  # a process other than rank 0
        return None
    scale = report.map_scale(res)
    done = max(cfg.epochs, fit.start)
    fit.save(done, {"map_scale": scale, "calibration": calib})
    metrics = _metrics(run, fit, res, calib, runner)
    written = report.write_outputs(o.stage, cfg=cfg, ds=run.test_ds, res=res, metrics=metrics, history=fit.history,
                                   scale=scale, heatmaps=cfg.heatmaps)
    fit.tlog.evaluation(done, tracking.evaluation_values(res), "test")  # the final model's (compat: not the selection)
    fit.tlog.heatmaps(done, report.summary_examples(run.test_ds, res, *scale, k=tracking.HEATMAPS), "test")
    fit.close_log()
    o.commit()
    return metrics, written


def _metrics(run: _Run, fit: _Fit, res: dict, calib: Optional[dict], runner: Runner) -> dict:
    """metrics.json of the run: the test-set metrics, the thresholds' scores, and how the run was made."""
    cfg, history, compat = run.cfg, fit.history, fit.compat
    metrics = public_metrics(res)
    metrics.update(thresholds=calibrate.threshold_metrics(res, calib), calibration=calib)
    metrics.update(protocol="honest: trained the configured epochs, final model evaluated once",
                   epochs=cfg.epochs, train_seconds=fit.train_seconds,
                   train_seconds_per_epoch=fit.train_seconds / max(1, len(history)) if history else None,
                   weights=run.backbone.weights_source, backend=run.backend, config=to_dict(cfg),
                   preprocess=run.pre.describe(), score=run.fod.score_description,
                   versions=report.versions(run.backend), history=history, world_size=runner.world_size,
                   global_batch_size=runner.world_size * cfg.batch_size)
    if cfg.compat_official and compat["epochs"]:
        bi = max(compat["epochs"], key=lambda e: e["image_auroc"])
        bp = max(compat["epochs"], key=lambda e: e["pixel_auroc"])
        metrics.update(protocol="COMPAT-OFFICIAL (test-set model selection; see warning)",
                       warning=report.COMPAT_WARNING,
                       final_epoch={k: metrics[k] for k in ("image_auroc", "pixel_auroc", "aupro")},
                       image_auroc=bi["image_auroc"], image_auroc_epoch=bi["epoch"],
                       pixel_auroc=bp["pixel_auroc"], pixel_auroc_epoch=bp["epoch"],
                       aupro=bp["aupro"], per_epoch=compat["epochs"])
    return metrics
