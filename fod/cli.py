"""Command line: ``fod train | test | predict | demo`` (also ``python -m fod``)."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

DESCRIPTION = """\
FOD ("Focus the Discrepancy", ICCV 2023): unsupervised anomaly detection and
localisation. A frozen ImageNet backbone gives patch features; per feature
level, a small transformer with intra- and inter-correlation (I2Correlation)
learns to reconstruct the features of normal images; test images are scored by
reconstruction error times the discrepancy from the normal reference.

Start here:   fod demo                  (synthetic data, CPU, a few minutes, no downloads)
Your data:    fod train --data mvtec/bottle --output runs/bottle
Re-evaluate:  fod test --data mvtec/bottle --checkpoint runs/bottle/checkpoint.pt --output runs/bottle-test
New images:   fod predict --checkpoint runs/bottle/checkpoint.pt img1.png img2.png --output preds
"""

# The demo runs on CPU in about two minutes with a randomly initialised resnet18. Only layer2 (stride 8,
# 16x16 tokens at 128 px) is used: a random network's shallow features are local colour/edge filters that
# still separate these textures, while deeper random features mostly mix noise; a 32x32 level would
# quadruple the token count and the cost. lr 5e-4 for 10 epochs: the paper's 1e-4 needs far more epochs,
# and beyond ~10 epochs at 5e-4 the intra-KL maximisation starts to dominate the loss.
DEMO_DEFAULTS = dict(backbone="resnet18", levels=["layer2"], pretrained=False, image_size=128,
                     epochs=10, batch_size=8, lr=5e-4, d_model=[64], n_heads=4, n_layers=2)


def _int_list(s):
    return [int(x) for x in s.split(",")]


def _str_list(s):
    return [x for x in s.split(",") if x]


def _add_model_args(p, demo=False):
    g = p.add_argument_group("backbone")
    g.add_argument("--backbone", default=None if demo else "wide_resnet50_2",
                   help="timm model name, e.g. wide_resnet50_2 (default), resnet18, efficientnet_b6"
                   + (" (demo: resnet18)" if demo else ""))
    g.add_argument("--levels", type=_str_list, default=None,
                   help="comma-separated feature levels (timm module names), default: the stride-8 and stride-16 "
                        "levels (layer2,layer3 for ResNets)")
    w = g.add_mutually_exclusive_group()
    w.add_argument("--weights", default=None, metavar="FILE",
                   help="backbone weights from a local file (timm or torchvision state dict; works offline)")
    w.add_argument("--no-pretrained", action="store_true",
                   help="random initialisation instead of ImageNet weights (much weaker; warned)")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=None, help="training epochs (default 100; demo 10)")
    g.add_argument("--batch-size", type=int, default=None, help="batch size (default 8)")
    g.add_argument("--image-size", type=int, default=None, help="input size after the centre crop (default 256)")
    g.add_argument("--resize", type=int, default=None, help="resize to this before the crop (default: image size)")
    g.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 1e-4)")
    g.add_argument("--lambda1", type=float, default=0.5, help="weight of the KL discrepancy terms (0.5)")
    g.add_argument("--lambda2", type=float, default=0.5, help="weight of the entropy terms (0.5)")
    g.add_argument("--d-model", type=_int_list, default=None,
                   help="model width per level, comma-separated (default 256 for 32x32 levels, 512 for 16x16)")
    g.add_argument("--heads", type=int, default=None, help="attention heads (default 8)")
    g.add_argument("--layers", type=int, default=None, help="encoder layers (default 3)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-cache-features", action="store_true",
                   help="recompute backbone features every epoch instead of keeping them in memory")
    g.add_argument("--compat-official", action="store_true",
                   help="reproduce the public code: discard the output projection and pick the best epochs ON THE "
                        "TEST SET (optimistic numbers, flagged in the output)")
    _add_run_args(p)


def _add_run_args(p):
    g = p.add_argument_group("execution")
    g.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    g.add_argument("--backend", default="auto", choices=["auto", "cpu", "triton", "cuda", "reference"],
                   help="I2Correlation kernel backend; auto picks the fastest available one for the device")
    g.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA only)")
    g.add_argument("--workers", type=int, default=0, help="data-loading worker processes (default 0)")
    g.add_argument("--heatmaps", type=int, default=-1, help="how many heat-map PNGs to write (default all)")
    g.add_argument("--overwrite", action="store_true", help="replace results already in --output")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fod", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train on a category's normal images, then evaluate the final model once",
                       description="Train on DATA/train, then evaluate the final model once on DATA/test. Writes "
                                   "metrics.json, checkpoint.pt (after every epoch), heatmaps/ and summary.png.")
    p.add_argument("--data", required=True, help="category directory, e.g. mvtec/bottle")
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument("--dataset", default="mvtec", choices=["mvtec", "btad", "mvtec3d"], help="directory layout")
    p.add_argument("--resume", action="store_true", help="continue the run in --output from its checkpoint "
                   "(same configuration; --epochs may be raised)")
    _add_model_args(p)

    p = sub.add_parser("test", help="evaluate a checkpoint on a test set",
                       description="Evaluate a trained checkpoint on DATA/test: metrics.json, heatmaps/, summary.png.")
    p.add_argument("--data", required=True, help="category directory")
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt of a training run")
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument("--dataset", default=None, choices=["mvtec", "btad", "mvtec3d"],
                   help="directory layout (default: the one of training)")
    p.add_argument("--batch-size", type=int, default=None)
    _add_run_args(p)

    p = sub.add_parser("predict", help="anomaly maps and scores for new images",
                       description="Score new images with a trained checkpoint: scores.json (image scores), "
                                   "maps.npz (anomaly maps) and heatmaps/*.png.")
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt of a training run")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument("--batch-size", type=int, default=8)
    _add_run_args(p)

    p = sub.add_parser("demo", help="generate the embedded synthetic dataset, train and evaluate (CPU, minutes)",
                       description="Writes a synthetic textured-fabric dataset with scratches, spots and cuts (MVTec "
                                   "layout) to OUTPUT/data, then trains and evaluates on it and predicts a few "
                                   "images. No downloads: the backbone is randomly initialised unless --weights is "
                                   "given.")
    p.add_argument("--output", default="fod-demo", help="output directory (default ./fod-demo)")
    p.add_argument("--train-images", type=int, default=60, help="synthetic training images (default 60)")
    _add_model_args(p, demo=True)
    return ap


def _config(args, demo=False):
    from .train import Config
    base = dict(DEMO_DEFAULTS) if demo else {}
    pick = lambda name, key, default: getattr(args, name) if getattr(args, name) is not None else base.get(key, default)  # noqa: E731
    cfg = Config(
        data=str(args.data), dataset=getattr(args, "dataset", "mvtec"),
        backbone=pick("backbone", "backbone", "wide_resnet50_2"), levels=args.levels or base.get("levels"),
        pretrained=not (args.no_pretrained or (demo and args.weights is None)), weights=args.weights,
        image_size=pick("image_size", "image_size", 256), resize=args.resize,
        epochs=pick("epochs", "epochs", 100), batch_size=pick("batch_size", "batch_size", 8),
        lr=pick("lr", "lr", 1e-4), lambda1=args.lambda1, lambda2=args.lambda2,
        d_model=pick("d_model", "d_model", None), n_heads=pick("heads", "n_heads", 8),
        n_layers=pick("layers", "n_layers", 3), device=args.device, backend=args.backend, seed=args.seed,
        amp=args.amp, compat_official=args.compat_official, cache_features=not args.no_cache_features,
        num_workers=args.workers, heatmaps=args.heatmaps)
    if demo and args.backbone is not None and args.backbone != DEMO_DEFAULTS["backbone"] and args.levels is None:
        cfg.levels = None
        cfg.d_model = args.d_model
    return cfg


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import torch
    torch.set_num_threads(max(1, int(os.environ.get("FOD_THREADS", torch.get_num_threads()))))
    from . import train as T
    try:
        if args.command == "train":
            cfg = _config(args)
            T.train(cfg, args.output, resume=args.resume, overwrite=args.overwrite)
        elif args.command == "test":
            T.test(args.checkpoint, args.data, args.output, dataset=args.dataset, device=args.device,
                   backend=args.backend, batch_size=args.batch_size, overwrite=args.overwrite,
                   heatmaps=args.heatmaps)
        elif args.command == "predict":
            T.predict(args.checkpoint, args.images, args.output, device=args.device, backend=args.backend,
                      batch_size=args.batch_size, overwrite=args.overwrite)
        elif args.command == "demo":
            return demo(args)
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError) as exc:
        print(f"fod {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


def demo(args) -> int:
    from . import train as T
    from .synthetic import make_dataset
    out = Path(args.output)
    T.prepare_output(out, overwrite=args.overwrite, products=("data", "metrics.json", "checkpoint.pt"))
    t0 = time.perf_counter()
    data = out / "data"
    if data.exists() and args.overwrite:
        import shutil
        shutil.rmtree(data)
    make_dataset(data, n_train=args.train_images)
    T.say(f"fod demo: synthetic dataset written to {data} (train/good, test/good|scratch|spot|cut, ground_truth)")
    args.data = data
    cfg = _config(args, demo=True)
    if cfg.weights is None:
        T.say("fod demo: backbone weights: RANDOM INITIALISATION (no download is attempted; pass --weights FILE "
              "for ImageNet weights). Shallow levels of a random network still separate these textures.")
    metrics = T.train(cfg, out / "run", overwrite=args.overwrite)
    samples = sorted((data / "test").glob("*/000.png"))
    T.predict(out / "run" / "checkpoint.pt", samples, out / "predict", device=cfg.device, backend=cfg.backend,
              overwrite=args.overwrite)
    T.say(f"fod demo: done in {time.perf_counter() - t0:.0f} s; weights: {metrics['weights']}; "
          f"image AUROC {metrics['image_auroc']:.3f}, pixel AUROC {metrics['pixel_auroc']:.3f}, "
          f"AUPRO {metrics['aupro']:.3f}; see {out / 'run' / 'summary.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
