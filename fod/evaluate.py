"""Scoring: anomaly maps of a test set with all metrics (``evaluate``), and of new images (``predict``)."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from . import checkpoint as C
from . import distributed as D
from . import metrics as M
from . import report as R
from . import tracking as T
from . import viz
from .config import Config, check_run_options, to_dict
from .data import AnomalyDataset, check_split, image_size_of, scan_sizes
from .files import (OutputFolder, atomic_write_text, open_for_write, refuse_inputs_inside, refuse_inside, write_npz,
                    write_png, writing)
from .model import FOD, loader


@torch.no_grad()
def evaluate(fod: FOD, ds, cfg: Config, device: str, desc: str = "evaluate") -> Optional[dict]:
    """Maps for the whole test set and all metrics. Returns a dict with the arrays too.

    Several processes (fod.distributed): each scores its contiguous shard of ``ds``; rank 0 gathers the maps
    in the dataset's order and computes the metrics; the other processes return None."""
    ctx = D.current()
    fod.eval()
    maps, masks, labels, defects, paths = [], [], [], [], []
    t0 = time.perf_counter()
    n = 0
    bar = tqdm(loader(D.shard_of(ds), cfg, cfg.batch_size), desc=desc, unit="batch", leave=False)
    for batch in bar:
        m = fod.anomaly_maps(batch["image"].to(device), amp=cfg.amp)
        maps.append(m.float().cpu().numpy())
        masks.append(batch["mask"].numpy())
        labels += batch["label"].tolist()
        defects += list(batch["defect"])
        paths += list(batch["path"])
        n += m.shape[0]
        bar.set_postfix(img_per_s=f"{n / (time.perf_counter() - t0):.2f}")
    if ctx.distributed:
        got = _gather(maps, masks, labels, defects, paths, cfg.image_size)
        if got is None:
            return None
        maps, masks, labels, defects, paths = got
        n = len(labels)
    seconds = time.perf_counter() - t0
    maps, masks = np.concatenate(maps), np.concatenate(masks)
    res = M.evaluate_maps(maps, masks, labels, defects)
    res.update(maps=maps, masks=masks, labels=np.array(labels), defects=defects, paths=paths,
               eval_seconds=seconds, eval_images_per_second=n / seconds)
    return res


def _gather(maps, masks, labels, defects, paths, size: int):
    """This process's maps and labels of its shard -> all of them in the dataset's order on rank 0 (else None)."""
    def rows(arrays, dtype):
        return torch.from_numpy(np.concatenate(arrays)) if arrays else torch.zeros((0, size, size), dtype=dtype)
    maps = D.gather_rows(rows(maps, torch.float32), "gathering the anomaly maps")
    masks = D.gather_rows(rows(masks, torch.bool).to(torch.uint8), "gathering the masks")  # gloo: no bool
    meta = D.gather_objects((labels, defects, paths), "gathering the labels")
    if meta is None:
        return None
    labels, defects, paths = ([x for m in meta for x in m[i]] for i in range(3))
    return [maps.numpy()], [masks.numpy().astype(bool)], labels, defects, paths  # as the lists of batches


def public_metrics(res: dict) -> dict:
    keys = ("image_auroc", "pixel_auroc", "aupro", "aupro_fpr_limit", "per_type_image_auroc",
            "eval_seconds", "eval_images_per_second")
    return {k: res[k] for k in keys}


def check_device(device: str):
    """A clear error if ``device`` (cpu, cuda, cuda:N; format checked by the config) is not on this machine."""
    if device.startswith("cuda"):
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= n:
            raise ValueError(f"--device {device}: this machine has {n} CUDA device(s)")


def _run_setup(checkpoint, *, device, backend, amp, workers, heatmaps, batch_size, log):
    """The checkpoint's FOD bundle with this run's execution options applied (all of them: none is ignored)."""
    probe = Config(device=device, amp=bool(amp), num_workers=0 if workers is None else workers, heatmaps=heatmaps)
    check_run_options(probe, batch_size)
    check_device(device)
    fod = C.load(checkpoint, device, backend, log=log)
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
         log=R.say) -> dict:
    """Evaluate a saved checkpoint on DATA/test: metrics.json, heatmaps/, summary.png, and the metrics in log.csv
    and (``tensorboard``) tensorboard/ at the checkpoint's epoch and step (fod.tracking).

    Under torchrun (several processes): each process scores its shard (``batch_size`` per process), rank 0
    computes the metrics, writes the outputs and returns the metrics; the other processes return None."""
    ctx = D.current()
    if not ctx.is_main:
        log = D.quiet
    refuse_inside(output, data)
    folder = OutputFolder(output, "test", overwrite=overwrite)
    if ctx.is_main:
        folder.check()
    device = D.local_device(device)
    fod, cfg, pre = _run_setup(checkpoint, device=device, backend=backend, amp=amp, workers=workers,
                               heatmaps=heatmaps, batch_size=batch_size, log=log)
    layout = dataset or cfg.dataset
    ds = AnomalyDataset(data, "test", layout, pre=pre)
    if ctx.is_main:
        R.log_preprocessing(pre, scan_sizes(ds), log)
        check_split(ds)
    from . import calibrate as CAL
    with (folder.open() if ctx.is_main else D.no_folder(folder.path)) as o:
        D.checks_passed()  # several processes: every one passed its checks (else all stop here)
        res = evaluate(fod, ds, cfg, device)
        if res is None:  # a process other than rank 0
            return None
        metrics = public_metrics(res)
        metrics.update(thresholds=CAL.threshold_metrics(res, C.calibration_of(fod.checkpoint)))
        metrics.update(protocol="evaluation of a saved checkpoint", checkpoint=str(checkpoint), data=str(data),
                       weights=fod.backbone.weights_source, backend=fod.backend, config=to_dict(cfg),
                       preprocess=pre.describe(), score=fod.score_description,
                       versions=R.versions(fod.backend), world_size=ctx.world_size)
        shown = dataclasses.replace(cfg, data=str(data), dataset=layout)  # the summary names the data evaluated
        written = R.write_outputs(o.stage, cfg=shown, ds=ds, res=res, metrics=metrics,
                                  history=fod.checkpoint.get("history", []), heatmaps=heatmaps,
                                  title_extra=" (fod test)")
        T.add_evaluation(o.stage, fod.checkpoint, T.evaluation_values(res), "test", tensorboard=tensorboard,
                         examples=R.summary_examples(ds, res, *R.map_scale(res), k=T.HEATMAPS), log=log)
        written += [p.name + "/" * p.is_dir() for p in map(o.stage.joinpath, T.LOGS) if p.exists()]
        o.commit()
    CAL.log_threshold_metrics(metrics["thresholds"], log)
    R.log_metrics(metrics, folder.path, ", ".join(written), log)
    return metrics


def predict(checkpoint, images, output, *, device: str = "cpu", backend: Optional[str] = None,
            batch_size: int = 8, overwrite: bool = False, amp: bool = False, workers: Optional[int] = None,
            heatmaps: int = -1, log=R.say) -> dict:
    """Anomaly maps, image scores and decisions of new images (through ``fod.api.Detector``): scores.json
    (per image: score, normalized_score, anomalous, heatmap, mask, map_key), maps.npz, masks/*.png (the
    map above the pixel threshold, white = anomalous; every image) and heatmaps/*.png (the first
    ``heatmaps``; -1: all). Without thresholds in the checkpoint: raw scores only (no decisions, no masks).
    Memory is bounded: maps are kept on disk in the staging folder until maps.npz is written."""
    from . import calibrate as CAL
    from .api import Detector
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
    R.log_preprocessing(pre, sum(w != h for w, h in map(image_size_of, paths)), log)
    if cal is None:
        log(f"fod: {CAL.NO_THRESHOLDS}: raw scores only (no normalized_score, decision or mask)")
    names = R.unique_names(p.stem for p in paths)
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
             "calibration": calibration if cal is not None else CAL.NO_THRESHOLDS, "images": result}, indent=2))
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


class _LazyMaps:
    """maps.npz's members, read one at a time from the staged .npy files."""

    def __init__(self, names, parts: Path):
        self.names, self.parts = names, parts

    def items(self):
        for i, name in enumerate(self.names):
            yield name, np.load(self.parts / f"{i}.npy")
