"""End-to-end speed of the FOD pipeline: training seconds per epoch and evaluation images per second.

    python benchmarks/pipeline_speed.py [--configs demo,wrn50] [--backends reference,cpu] [--device cpu]
                                        [--train-images N] [--test-good N] [--threads N]

Runs ``fod.train.train`` for one epoch on a synthetic dataset (random-init
backbone: timing only, the metrics mean nothing here) and prints one line per
(configuration, backend). The demo configuration is the one of ``fod demo``;
"wrn50" is the paper's: wide_resnet50_2 at 256x256, layer2 + layer3, d_model
256/512, 8 heads, 3 layers, batch 8.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import torch

from fod.config import DEMO_DEFAULTS, Config
from fod.synthetic import make_dataset
from fod.train import train

CONFIGS = {
    "demo": dict(DEMO_DEFAULTS),
    "wrn50": dict(backbone="wide_resnet50_2", levels=["layer2", "layer3"], pretrained=False, image_size=256,
                  batch_size=8, lr=1e-4, d_model=None, n_heads=8, n_layers=3),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="demo,wrn50")
    ap.add_argument("--backends", default="reference,cpu")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--train-images", type=int, default=16)
    ap.add_argument("--test-good", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None, help="override the configuration's batch size "
                    "(the reference backend materialises B*H*L*L matrices: wrn50 at batch 8 needs > 16 GB)")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs.split(","):
            c = dict(CONFIGS[name], epochs=1)
            if args.batch_size:
                c["batch_size"] = args.batch_size
            data = make_dataset(Path(tmp) / f"data_{name}", size=c["image_size"], n_train=args.train_images,
                                n_test_good=args.test_good, n_test_defect=2)
            for backend in args.backends.split(","):
                cfg = Config(data=str(data), device=args.device, backend=backend, heatmaps=0, **c)
                t0 = time.perf_counter()
                m = train(cfg, Path(tmp) / f"run_{name}_{backend}", log=lambda s: None)
                row = {"config": name, "backend": m["backend"], "device": args.device, "batch": c["batch_size"],
                       "threads": torch.get_num_threads(), "train_images": args.train_images,
                       "train_s_per_epoch": round(m["train_seconds_per_epoch"], 2),
                       "train_images_per_s": round(args.train_images / m["train_seconds_per_epoch"], 2),
                       "eval_images_per_s": round(m["eval_images_per_second"], 2),
                       "wall_s": round(time.perf_counter() - t0, 1)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
