"""Command line: ``fod train | test | predict | export | demo | benchmark | checkpoint`` (also ``python -m fod``).

It parses and resolves the options and hands each command to the layer above the library: ``fod.train.train``,
``fod.commands`` (test, predict, demo), ``fod.export.export``, ``fod.benchmark.benchmark`` and
``fod.upgrade.upgrade``; every error they raise becomes one line ``fod <command>: error: ...`` with exit code 2.

The options of the model and of the run are generated from ``fod.config.Config``'s fields (type,
default and help in one place). Their argparse default is None, so that what the user typed can be
told from what was left out: an option given on the command line beats the ``--config`` file, which
beats the defaults (``Config``'s, and for ``fod demo`` the demo's).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import config, interrupt
from .layouts import LAYOUTS

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
Export:       fod export --checkpoint runs/bottle/checkpoint.pt --format onnx --output bottle.onnx
Reproduce:    fod train --config runs/bottle/config.toml --output runs/bottle-again
Benchmark:    fod benchmark --data mvtec --dataset mvtec --output runs/mvtec [--devices cuda:0,cuda:1]
Several GPUs: torchrun --nproc-per-node 4 -m fod train --device cuda --batch-size 2 ...  (global batch 4 x 2)
Old checkpoint (pickle, earlier fod): fod checkpoint upgrade OLD.pt NEW.pt --trust   (only files you trust)
"""

DEMO_DEFAULTS = config.DEMO_DEFAULTS  # public name, kept


def _flag(name: str) -> str:
    return config.FIELDS[name].metadata.get("flag") or "--" + name.replace("_", "-")


def _dest(name: str) -> str:
    return "cfg_" + name


def _parser_type(name: str):
    base, is_list, _ = config.field_type(name)
    if is_list:
        def parse(s, base=base):
            items = [x.strip() for x in s.split(",") if x.strip()]
            try:
                return [base(x) for x in items]
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected comma-separated {base.__name__} values, got {s!r}")
        return parse
    return base


def _default_text(name: str, demo: bool) -> str:
    v = config.DEMO_DEFAULTS.get(name, config.FIELDS[name].default) if demo else config.FIELDS[name].default
    if v is None:
        return ""
    if isinstance(v, list):
        v = ",".join(map(str, v))
    return f" (default {v})"


def add_config_options(p: argparse.ArgumentParser, groups=(config.MODEL_OPTIONS, config.RUN_OPTIONS),
                       demo: bool = False, skip=()):
    """One option per Config field of the given groups, named and documented by the field."""
    from fod_kernels import BACKENDS
    titles = {config.MODEL_OPTIONS: "model and training", config.RUN_OPTIONS: "execution"}
    for group in groups:
        g = p.add_argument_group(titles[group])
        excl = g.add_mutually_exclusive_group() if group == config.MODEL_OPTIONS else None
        for name, f in config.FIELDS.items():
            md = f.metadata
            if md["group"] != group or not md["cli"] or name in skip:
                continue
            base, _, _ = config.field_type(name)
            kw = dict(dest=_dest(name), default=None, help=md["help"])
            if base is bool:
                kw.update(action="store_const", const=not f.default)
            else:
                kw.update(type=_parser_type(name), help=md["help"] + _default_text(name, demo))
                kw["metavar"] = md.get("metavar", _flag(name).lstrip("-").replace("-", "_").upper())
                if name == "backend":
                    kw["choices"] = ["auto", *BACKENDS]
                    del kw["metavar"]
                elif "choices" in md:
                    kw["choices"] = md["choices"]
                    del kw["metavar"]
            target = excl if name in ("weights", "pretrained") and excl is not None else g
            target.add_argument(_flag(name), **kw)


def _max_pixels(p: argparse.ArgumentParser):
    from PIL import Image
    p.add_argument("--max-pixels", type=int, default=None, metavar="N",
                   help=f"refuse images with more than N pixels (width x height), checked before they are decoded "
                        f"(default {Image.MAX_IMAGE_PIXELS}, Pillow's decompression-bomb limit)")


def _add_train(sub):
    p = sub.add_parser("train", help="train on a category's normal images, then evaluate the final model once",
                       description="Train on DATA/train, then evaluate the final model once on DATA/test. Writes "
                                   "config.toml, checkpoint.pt and log.csv (after every epoch), tensorboard/ (as it "
                                   "goes; watch with: tensorboard --logdir OUTPUT), metrics.json, heatmaps/ and "
                                   "summary.png.")
    p.add_argument("--data", dest=_dest("data"), default=None, metavar="DIR",
                   help="category directory, e.g. mvtec/bottle (required unless --config gives it)")
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument("--dataset", dest=_dest("dataset"), default=None, choices=tuple(LAYOUTS),
                   help="directory layout (default mvtec)")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="a TOML configuration (e.g. RUN/config.toml of an earlier run); options given here win")
    p.add_argument("--resume", action="store_true", help="continue the run in --output from its checkpoint "
                   "(same configuration; --epochs may be raised)")
    p.add_argument("--overwrite", action="store_true", help="replace results already in --output")
    _max_pixels(p)
    add_config_options(p)


def _add_test(sub):
    p = sub.add_parser("test", help="evaluate a checkpoint on a test set",
                       description="Evaluate a trained checkpoint on DATA/test: metrics.json, heatmaps/, summary.png, "
                                   "log.csv and tensorboard/ (the metrics at the checkpoint's training step).")
    p.add_argument("--data", required=True, help="category directory")
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt of a training run")
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument("--dataset", default=None, choices=tuple(LAYOUTS),
                   help="directory layout (default: the one of training)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="batch size per process (default: the one of training)")
    p.add_argument("--overwrite", action="store_true", help="replace results already in --output")
    _max_pixels(p)
    add_config_options(p, groups=(config.RUN_OPTIONS,))


def _add_predict(sub):
    p = sub.add_parser("predict", help="anomaly maps and scores for new images",
                       description="Score new images with a trained checkpoint: scores.json (image scores), "
                                   "maps.npz (anomaly maps) and heatmaps/*.png.")
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt of a training run")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument("--batch-size", type=int, default=8, help="batch size (default 8)")
    p.add_argument("--overwrite", action="store_true", help="replace results already in --output")
    _max_pixels(p)
    add_config_options(p, groups=(config.RUN_OPTIONS,), skip=("tensorboard",))  # predict logs no run


def _add_export(sub):
    p = sub.add_parser("export", help="export a checkpoint to ONNX or TorchScript (runs without fod installed)",
                       description="Write the model of a checkpoint as an ONNX or TorchScript file taking a float32 "
                                   "batch (N, 3, S, S) already resized and normalised and returning the anomaly maps "
                                   "(N, S, S) and image scores (N), and FILE.json beside it with the preprocessing, "
                                   "the thresholds and the score definitions. The I2Correlation layers are exported "
                                   "in their reference formulation. The written file is checked against the eager "
                                   "model (onnxruntime for ONNX, when installed).")
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt of a training run")
    p.add_argument("--format", dest="fmt", required=True, choices=("onnx", "torchscript"), help="file format")
    p.add_argument("--output", required=True, metavar="FILE", help="the file to write (and FILE.json)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18, the lowest torch's exporter writes)")
    p.add_argument("--overwrite", action="store_true", help="replace FILE and FILE.json if they exist")


def _add_checkpoint(sub):
    p = sub.add_parser("checkpoint", help="convert a checkpoint of an earlier fod version (docs/SECURITY.md)",
                       description="fod checkpoint upgrade OLD NEW --trust: convert a checkpoint written by an "
                                   "earlier fod version (a pickle, which can run code when read) into the current "
                                   "format, which cannot. Run it only on files you trust.")
    csub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    u = csub.add_parser("upgrade", help="convert OLD (pickled) to NEW (current format)")
    u.add_argument("old", metavar="OLD", help="the old checkpoint.pt")
    u.add_argument("new", metavar="NEW", help="the file to write (must not exist)")
    u.add_argument("--trust", action="store_true",
                   help="required: OLD is unpickled, which runs any code it holds; say so only for files you trust")


def _add_demo(sub):
    p = sub.add_parser("demo", help="generate the embedded synthetic dataset, train and evaluate (CPU, minutes)",
                       description="Writes a synthetic textured-fabric dataset with scratches, spots and cuts (MVTec "
                                   "layout) to OUTPUT/data, then trains and evaluates on it and predicts a few "
                                   "images. No downloads: the backbone is randomly initialised unless --weights is "
                                   "given.")
    p.add_argument("--output", default="fod-demo", help="output directory (default ./fod-demo)")
    p.add_argument("--train-images", type=int, default=66,
                   help="synthetic normal training images (default 66: --val-fraction 0.1 holds out 7 to calibrate "
                        "the thresholds, 59 train)")
    p.add_argument("--overwrite", action="store_true", help="replace results already in --output")
    _max_pixels(p)
    add_config_options(p, demo=True)


def _add_benchmark(sub):
    p = sub.add_parser("benchmark", help="train and evaluate every category of a dataset, with baselines",
                       description="Train and evaluate every category under ROOT with one configuration (a run "
                                   "folder per category under OUTPUT), compute the baselines (knn, memory_distance) "
                                   "and FOD's ablations (rec, inter, rec_x_inter) on the same features, and write "
                                   "OUTPUT/results.json, results.csv, results.md and a bar chart per metric. "
                                   "Resumable: rerun the same command to skip finished categories and resume an "
                                   "interrupted one. Exit code 0 if every category succeeded, 1 if some failed.")
    p.add_argument("--data", dest="root", required=True, metavar="ROOT",
                   help="dataset root holding the categories, e.g. mvtec_anomaly_detection")
    p.add_argument("--dataset", dest=_dest("dataset"), default="mvtec", choices=tuple(LAYOUTS),
                   help="dataset (its standard categories and layout; default mvtec)")
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument("--categories", default=None, metavar="A,B,...",
                   help="only these categories (default: the dataset's standard categories found under ROOT, or "
                        "every sub-folder with the layout's training folder)")
    p.add_argument("--devices", default=None, metavar="D1,D2,...",
                   help="run categories concurrently, one process per device, e.g. cuda:0,cuda:1 (default: "
                        "--device, in this process)")
    p.add_argument("--knn-coreset", type=float, default=1.0, metavar="RATIO",
                   help="knn baseline: keep this fraction of the training tokens (greedy coreset; default 1: all)")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="a TOML configuration for every category; options given here win")
    p.add_argument("--overwrite", action="store_true", help="start every category over, replacing earlier results")
    _max_pixels(p)
    add_config_options(p)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fod", description=DESCRIPTION,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_train, _add_test, _add_predict, _add_export, _add_checkpoint, _add_demo, _add_benchmark):
        add(sub)
    return ap


def _given(args) -> dict:
    """The Config fields the user gave on the command line."""
    return {k[len("cfg_"):]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}


def resolve_config(args, demo: bool = False) -> config.Config:
    """Config from (lowest to highest) the defaults, the demo's defaults, --config FILE, the command line."""
    given = _given(args)
    values = dict(config.DEMO_DEFAULTS) if demo else {}
    from_file = config.load_toml(args.config) if getattr(args, "config", None) else {}
    values.update(from_file)
    values.update(given)
    taken = config.apply_compat_defaults(values, set(given) | set(from_file))
    if taken and int(os.environ.get("RANK", "0") or 0) == 0:  # under torchrun, rank 0 says it
        from .report import say
        say("fod: --compat-official: the official code's " + ", ".join(f"{k} {v}" for k, v in taken.items())
            + " (give them explicitly to override)")
    if demo and "weights" in given:
        values["pretrained"] = True  # the weights file is the ImageNet substitute
    if demo and given.get("backbone", config.DEMO_DEFAULTS["backbone"]) != config.DEMO_DEFAULTS["backbone"]:
        # another backbone: its own default levels and widths unless given
        values["levels"] = given.get("levels")
        values["d_model"] = given.get("d_model")
    if not values.get("data"):
        raise ValueError("--data is required (or a --config file that gives `data`)")
    return config.from_dict(values, where="configuration")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    handlers = interrupt.install()
    import torch
    torch.set_num_threads(max(1, int(os.environ.get("FOD_THREADS", torch.get_num_threads()))))
    from . import commands, distributed
    from .train import train
    rc = 0
    from .data import MAX_PIXELS_ENV
    saved_limit = os.environ.get(MAX_PIXELS_ENV)
    try:
        if getattr(args, "max_pixels", None) is not None:  # in the environment: DataLoader workers read it too
            if args.max_pixels < 1:
                raise ValueError(f"--max-pixels must be >= 1, got {args.max_pixels}")
            os.environ[MAX_PIXELS_ENV] = str(args.max_pixels)
        if distributed.launched():  # torchrun started this process as one of several
            if args.command not in distributed.COMMANDS:
                raise ValueError(f"fod {args.command} runs in one process: launch it without torchrun (under "
                                 f"torchrun: fod {', fod '.join(distributed.COMMANDS)})")
            distributed.setup()
        if not str(getattr(args, "output", "-")).strip():
            raise ValueError("--output is empty")
        if args.command == "train":
            train(resolve_config(args), args.output, resume=args.resume, overwrite=args.overwrite)
        elif args.command in ("test", "predict"):
            run = _given(args)
            kw = dict(device=run.get("device", "cpu"), backend=run.get("backend"), overwrite=args.overwrite,
                      amp=run.get("amp", False), workers=run.get("num_workers"), heatmaps=run.get("heatmaps", -1))
            if args.command == "test":
                commands.test(args.checkpoint, args.data, args.output, dataset=args.dataset, batch_size=args.batch_size,
                              tensorboard=run.get("tensorboard", True), **kw)
            else:
                commands.predict(args.checkpoint, args.images, args.output, batch_size=args.batch_size, **kw)
        elif args.command == "export":
            from .export import export
            export(args.checkpoint, args.fmt, args.output, opset=args.opset, overwrite=args.overwrite)
        elif args.command == "checkpoint":
            from .report import say
            from .upgrade import upgrade
            upgrade(args.old, args.new, trust=args.trust, log=say)
        elif args.command == "demo":
            args.cfg_data = str(Path(args.output) / "data")
            return commands.demo(resolve_config(args, demo=True), args.output, train_images=args.train_images,
                                 overwrite=args.overwrite)
        elif args.command == "benchmark":
            rc = _benchmark(args, argv)
    except (OSError, ValueError, RuntimeError) as exc:  # OSError: files (missing, full disk, read-only, ...)
        msg = distributed.settle(exc)  # several processes: None where another process reports the error
        distributed.shutdown(destroy=False)
        if msg is not None:
            print(f"fod {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # SIGINT or SIGTERM (fod.interrupt): the finally blocks have cleaned up
        line, code = interrupt.message(exc, hint=args.command == "train")  # demo and benchmark run train() too
        if args.command == "benchmark":
            line += ("; run the same command to continue (finished categories are skipped, an interrupted one "
                     "resumes from its last checkpoint)")
        print(f"fod {args.command}: {line}", file=sys.stderr)
        return code
    finally:
        interrupt.restore(handlers)
        if saved_limit is None:
            os.environ.pop(MAX_PIXELS_ENV, None)
        else:
            os.environ[MAX_PIXELS_ENV] = saved_limit
    distributed.shutdown()
    return rc


def _benchmark(args, argv=None) -> int:
    import shlex

    from .benchmark import benchmark as run_benchmark
    from .benchmark import parse_list
    args.cfg_data = args.root
    cfg = resolve_config(args)
    rows = run_benchmark(cfg, args.root, cfg.dataset, args.output, categories=parse_list(args.categories),
                         devices=parse_list(args.devices), coreset=args.knn_coreset, overwrite=args.overwrite,
                         command="fod " + shlex.join(sys.argv[1:] if argv is None else argv))
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
