"""The commands above the library: ``fod test``, ``fod predict`` and ``fod demo``.

The command line (``fod.cli``) parses and checks the options and hands each command to a function here, as
anomalib's CLI hands its subcommands to the engine; ``fod train`` is ``fod.train.train`` itself and ``fod
benchmark`` is ``fod.benchmark.benchmark``. These functions write a run folder and log what they did; the
library below them (``fod.train``, ``fod.evaluate``, ``fod.api``) does not know about the command line.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm import tqdm

from . import calibrate, distributed, report, tracking, viz
from .api import Detector
from .checkpoint import calibration_of
from .checkpoint import load as load_checkpoint
from .config import Config, check_device, check_run_options, to_dict
from .data import AnomalyDataset, check_split, image_size_of, scan_sizes
from .evaluate import evaluate, public_metrics
from .files import (LOGS, OutputFolder, OutputLock, atomic_write_text, check_writable, open_for_write,
                    refuse_inputs_inside, refuse_inside, write_npz, write_png, writing)
from .synthetic import demo_files, make_dataset, remove_dataset
from .train import train


def _run_setup(checkpoint, *, device, backend, amp, workers, heatmaps, batch_size, log):
    """The checkpoint's FOD bundle with this run's execution options applied (all of them: none is ignored)."""
    probe = Config(device=device, amp=bool(amp), num_workers=0 if workers is None else workers, heatmaps=heatmaps)
    check_run_options(probe, batch_size)
    check_device(device)
    fod = load_checkpoint(checkpoint, device, backend, log=log)
    cfg = fod.cfg
    cfg.amp, cfg.heatmaps = probe.amp, heatmaps
    if workers is not None:
        cfg.num_workers = workers
    if batch_size:
        cfg.batch_size = batch_size
    pre = fod.preprocess()
    return fod, cfg, pre


def test(checkpoint, data, output, *, dataset: Optional[str] = None, device: str = "cpu",
         backend: Optional[str] = None, batch_size: Optional[int] = None, overwrite: bool = False,
         heatmaps: int = -1, amp: bool = False, workers: Optional[int] = None, tensorboard: bool = True,
         log=report.say) -> dict:
    """Evaluate a saved checkpoint on DATA/test: metrics.json, heatmaps/, summary.png, and the metrics in log.csv
    and (``tensorboard``) tensorboard/ at the checkpoint's epoch and step (fod.tracking).

    Under torchrun (several processes): each process scores its shard (``batch_size`` per process), rank 0
    computes the metrics, writes the outputs and returns the metrics; the other processes return None."""
    ctx = distributed.current()
    if not ctx.is_main:
        log = distributed.quiet
    refuse_inside(output, data)
    folder = OutputFolder(output, "test", overwrite=overwrite)
    if ctx.is_main:
        folder.check()
    device = distributed.local_device(device)
    fod, cfg, pre = _run_setup(checkpoint, device=device, backend=backend, amp=amp, workers=workers,
                               heatmaps=heatmaps, batch_size=batch_size, log=log)
    layout = dataset or cfg.dataset
    ds = AnomalyDataset(data, "test", layout, pre=pre)
    if ctx.is_main:
        report.log_preprocessing(pre, scan_sizes(ds), log)
        check_split(ds)
    with (folder.open() if ctx.is_main else distributed.no_folder(folder.path)) as o:
        distributed.checks_passed()  # several processes: every one passed its checks (else all stop here)
        res = evaluate(fod, ds, cfg, device)
        if res is None:  # a process other than rank 0
            return None
        metrics = public_metrics(res)
        metrics.update(thresholds=calibrate.threshold_metrics(res, calibration_of(fod.checkpoint)))
        metrics.update(protocol="evaluation of a saved checkpoint", checkpoint=str(checkpoint), data=str(data),
                       weights=fod.backbone.weights_source, backend=fod.backend, config=to_dict(cfg),
                       preprocess=pre.describe(), score=fod.score_description,
                       versions=report.versions(fod.backend), world_size=ctx.world_size)
        shown = dataclasses.replace(cfg, data=str(data), dataset=layout)  # the summary names the data evaluated
        written = report.write_outputs(o.stage, cfg=shown, ds=ds, res=res, metrics=metrics,
                                       history=fod.checkpoint.get("history", []), heatmaps=heatmaps,
                                       title_extra=" (fod test)")
        tracking.add_evaluation(o.stage, fod.checkpoint, tracking.evaluation_values(res), "test",
                                tensorboard=tensorboard, log=log,
                                examples=report.summary_examples(ds, res, *report.map_scale(res), k=tracking.HEATMAPS))
        written += [p.name + "/" * p.is_dir() for p in map(o.stage.joinpath, LOGS) if p.exists()]
        o.commit()
    calibrate.log_threshold_metrics(metrics["thresholds"], log)
    report.log_metrics(metrics, folder.path, ", ".join(written), log)
    return metrics


def predict(checkpoint, images, output, *, device: str = "cpu", backend: Optional[str] = None,
            batch_size: int = 8, overwrite: bool = False, amp: bool = False, workers: Optional[int] = None,
            heatmaps: int = -1, log=report.say) -> dict:
    """Anomaly maps, image scores and decisions of new images (through ``fod.api.Detector``): scores.json
    (per image: score, normalized_score, anomalous, heatmap, mask, map_key), maps.npz, masks/*.png (the
    map above the pixel threshold, white = anomalous; every image) and heatmaps/*.png (the first
    ``heatmaps``; -1: all). Without thresholds in the checkpoint: raw scores only (no decisions, no masks).
    Memory is bounded: maps are kept on disk in the staging folder until maps.npz is written."""
    folder = OutputFolder(output, "predict", overwrite=overwrite).check()
    paths = list(dict.fromkeys(Path(p) for p in images))  # an image given twice is scored once (keyed by path)
    if not paths:
        raise ValueError("no images given to predict")
    refuse_inputs_inside(output, paths)
    for p in paths:
        if p.is_dir():
            raise IsADirectoryError(f"{p} is a folder, not an image file (give the image files, e.g. {p}/*.png)")
        if not p.is_file():
            raise FileNotFoundError(f"image not found: {p}")
        image_size_of(p)  # an unreadable file fails here, naming it
    fod, cfg, pre = _run_setup(checkpoint, device=device, backend=backend, amp=amp, workers=workers,
                               heatmaps=heatmaps, batch_size=batch_size, log=log)
    det = Detector(fod, batch_size=cfg.batch_size, amp=cfg.amp, num_workers=cfg.num_workers,
                   checkpoint_path=str(checkpoint))
    cal = det.calibration
    report.log_preprocessing(pre, sum(w != h for w, h in map(image_size_of, paths)), log)
    if cal is None:
        log(f"fod: {calibrate.NO_THRESHOLDS}: raw scores only (no normalized_score, decision or mask)")
    names = report.unique_names(p.stem for p in paths)
    count = len(paths) if heatmaps < 0 else min(heatmaps, len(paths))
    scale = fod.checkpoint.get("map_scale")
    with folder.open() as o:
        parts = o.stage / ".maps"  # one .npy per image until maps.npz is written
        parts.mkdir()
        if cal is not None:
            (o.stage / "masks").mkdir()
        lo, hi = np.inf, -np.inf
        result = {}
        preds = det.predict([str(p) for p in paths])
        for i, pr in enumerate(tqdm(preds, total=len(paths), desc="predict", unit="image", leave=False)):
            with writing(parts / f"{i}.npy"), open_for_write(parts / f"{i}.npy") as f:
                np.save(f, pr.anomaly_map)
            lo, hi = min(lo, float(pr.anomaly_map.min())), max(hi, float(pr.anomaly_map.max()))
            mask = None
            if pr.mask is not None:
                write_png(o.stage / "masks" / f"{names[i]}.png", pr.mask.astype(np.uint8) * 255)
                mask = str(folder.path / "masks" / f"{names[i]}.png")
            result[str(paths[i])] = {"score": pr.score, "normalized_score": pr.normalized_score,
                                     "anomalous": pr.anomalous, "heatmap": None, "mask": mask, "map_key": names[i]}
        vmin, vmax = scale if scale else (lo, hi)
        if count:
            (o.stage / "heatmaps").mkdir()
        for i, p in enumerate(paths[:count]):
            write_png(o.stage / "heatmaps" / f"{names[i]}.png",
                      viz.overlay(pre.denormalize(pre.image(p)), np.load(parts / f"{i}.npy"), None, vmin, vmax))
            result[str(p)]["heatmap"] = str(folder.path / "heatmaps" / f"{names[i]}.png")
        write_npz(o.stage / "maps.npz", _LazyMaps(names, parts))
        calibration = None if cal is None else {
            k: cal[k] for k in ("rule", "image_threshold", "pixel_threshold", "image_method", "pixel_method",
                                "fpr_target", "source", "normalization")}
        atomic_write_text(o.stage / "scores.json", json.dumps(
            {"checkpoint": str(checkpoint), "image_score": "max of the sigma-4 Gaussian-filtered anomaly map",
             "heatmap_scale": [vmin, vmax], "preprocess": pre.describe(),
             "calibration": calibration if cal is not None else calibrate.NO_THRESHOLDS, "images": result}, indent=2))
        o.commit()
    for p, r in result.items():
        if r["anomalous"] is None:
            log(f"{r['score']:.6g}  {p}")
        else:
            log(f"{'ANOMALOUS' if r['anomalous'] else 'normal   '} {r['normalized_score']:.3f} (score "
                f"{r['score']:.6g})  {p}")
    if cal is not None:
        n = sum(r["anomalous"] for r in result.values())
        log(f"fod: {n} of {len(paths)} images anomalous (image threshold {cal['image_threshold']:.6g}, normalised "
            f"score > 0.5; pixel threshold {cal['pixel_threshold']:.6g} for the masks)")
    log(f"fod: maps and scores of {len(paths)} images in {folder.path}/ (scores.json, maps.npz"
        + (", masks/" if cal is not None else "") + (", heatmaps/" if count else "") + ")")
    return result


def demo(cfg: Config, output, *, train_images: int = 66, overwrite: bool = False) -> int:
    """``fod demo``: write the synthetic dataset to OUTPUT/data (``cfg.data``), train and evaluate on it in
    OUTPUT/run, predict one image of each test type in OUTPUT/predict. Everything is checked before anything
    is written."""
    out = Path(output)
    data = out / "data"
    cfg = dataclasses.replace(cfg, data=str(data)).check()
    if train_images < 1:
        raise ValueError(f"--train-images must be >= 1, got {train_images}")
    calibrate.holdout_count(train_images, calibrate.plan(cfg)["fraction"])  # the held-out images leave some to train
    check_writable(out)
    existing = [p for p in ("data", "run", "predict", "metrics.json", "checkpoint.pt") if (out / p).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds {', '.join(existing)}; pass --overwrite to replace the demo's "
                              "results, or choose another --output")
    if data.exists():
        demo_files(data)  # refuses if data/ holds files the demo did not write
    for sub, command in (("run", "train"), ("predict", "predict")):  # their folders' checks, before any work
        if (out / sub).exists() and not (out / sub).is_dir():
            raise FileExistsError(f"--output {out / sub} exists and is not a folder")
        OutputFolder(out / sub, command, overwrite=overwrite).check()
    t0 = time.perf_counter()
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
    lock = OutputLock(out, "fod demo")
    lock.acquire()
    try:
        if data.exists():
            remove_dataset(data)
        make_dataset(data, n_train=train_images)
        report.say(f"fod demo: synthetic dataset written to {data} (train/good, test/good|scratch|spot|cut, "
                   "ground_truth)")
        if cfg.weights is None:
            report.say("fod demo: backbone weights: RANDOM INITIALISATION (no download is attempted; pass --weights "
                       "FILE for ImageNet weights). Shallow levels of a random network still separate these textures.")
        metrics = train(cfg, out / "run", overwrite=overwrite)
        samples = sorted((data / "test").glob("*/000.png"))
        predict(out / "run" / "checkpoint.pt", samples, out / "predict", device=cfg.device, backend=cfg.backend,
                overwrite=overwrite, amp=cfg.amp, workers=cfg.num_workers)
    finally:
        lock.release()
    thr = metrics.get("thresholds")
    decisions = "no thresholds (--val-fraction 0)" if not thr else (
        f"at the calibrated thresholds image precision {thr['image']['precision']:.3f} recall "
        f"{thr['image']['recall']:.3f} F1 {thr['image']['f1']:.3f}, pixel F1 {thr['pixel']['f1']:.3f}")
    report.say(f"fod demo: done in {time.perf_counter() - t0:.0f} s; weights: {metrics['weights']}; "
               f"image AUROC {metrics['image_auroc']:.3f}, pixel AUROC {metrics['pixel_auroc']:.3f}, "
               f"AUPRO {metrics['aupro']:.3f}; {decisions}; decisions and masks of {len(samples)} test images in "
               f"{out / 'predict'}; see {out / 'run' / 'summary.png'}")
    return 0


class _LazyMaps:
    """maps.npz's members, read one at a time from the staged .npy files."""

    def __init__(self, names, parts: Path):
        self.names, self.parts = names, parts

    def items(self):
        for i, name in enumerate(self.names):
            yield name, np.load(self.parts / f"{i}.npy")
