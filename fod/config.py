"""The run configuration: one place for every parameter's type, default and help.

``Config`` is the whole configuration of a training run. The command line is built from its
fields (``fod.cli``), a run folder stores the resolved configuration as ``config.toml``
(``fod train --config RUN/config.toml --output NEW`` reproduces the run), and a checkpoint
stores it too. ``RESUME_MUTABLE`` says what ``--resume`` may change.
"""
from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

from .layouts import LAYOUTS

INTERPOLATIONS = ("lanczos", "bilinear", "bicubic")  # image resizing filters (masks: nearest neighbour)
MAX_SIZE = 4096  # pixels: (4096/8)^2 = 262144 tokens at stride 8, far beyond any machine's budget for L x L correlation
RUN_OPTIONS = "run"      # execution options: every command has them
MODEL_OPTIONS = "model"  # what defines a trained model: train and demo


def opt(help: str, *, flag: Optional[str] = None, group: str = MODEL_OPTIONS, cli: bool = True, **kw) -> dict:
    """Field metadata: the help text, the command-line flag (default: --field-name), the option group."""
    return {"help": help, "flag": flag, "group": group, "cli": cli, **kw}


@dataclass
class Config:
    data: str = field(default="", metadata=opt("category directory, e.g. mvtec/bottle", cli=False))
    dataset: str = field(default="mvtec", metadata=opt("directory layout", choices=tuple(LAYOUTS), cli=False))
    backbone: str = field(default="wide_resnet50_2", metadata=opt(
        "timm model name, e.g. wide_resnet50_2, resnet18, efficientnet_b6"))
    levels: Optional[list[str]] = field(default=None, metadata=opt(
        "comma-separated feature levels (timm module names); if none are given, the stride-8 and stride-16 "
        "levels (layer2,layer3 for ResNets)"))
    pretrained: bool = field(default=True, metadata=opt(
        "random initialisation instead of ImageNet weights (much weaker; warned)", flag="--no-pretrained"))
    weights: Optional[str] = field(default=None, metadata=opt(
        "backbone weights from a local file (timm or torchvision state dict; works offline)", metavar="FILE"))
    image_size: int = field(default=256, metadata=opt("input size after the centre crop"))
    resize: Optional[int] = field(default=None, metadata=opt(
        "resize the shorter side to this, keeping the aspect ratio, before the centre crop (if not given: the "
        "image size)"))
    interpolation: str = field(default="lanczos", metadata=opt(
        "image resizing filter (lanczos as the authors' code; masks always use nearest neighbour)",
        choices=INTERPOLATIONS))
    epochs: int = field(default=100, metadata=opt("training epochs"))
    batch_size: int = field(default=8, metadata=opt(
        "batch size per process (under torchrun the global batch is the number of processes times this)"))
    lr: float = field(default=1e-4, metadata=opt("Adam learning rate"))
    lambda1: float = field(default=0.5, metadata=opt("weight of the KL discrepancy terms"))
    lambda2: float = field(default=0.5, metadata=opt("weight of the entropy terms"))
    d_model: Optional[list[int]] = field(default=None, metadata=opt(
        "model width per level, comma-separated; if not given, 256 for 32x32 levels and 512 for 16x16"))
    n_heads: int = field(default=8, metadata=opt("attention heads", flag="--heads"))
    n_layers: int = field(default=3, metadata=opt("encoder layers", flag="--layers"))
    eps: float = field(default=1e-4, metadata=opt("smoothing constant inside the KL and entropy logs"))
    with_intra: bool = field(default=True, metadata=opt(
        "train without the intra-correlation branch (ablation; the official code's with_intra): each layer is "
        "h = x + inter, no intra loss terms", flag="--no-intra"))
    with_inter: bool = field(default=True, metadata=opt(
        "train without the inter-correlation branch (ablation; the official code's with_inter): each layer is "
        "h = x + intra, no inter loss terms, score rec x softmax(-K_intra); with --no-intra too: plain "
        "self-attention reconstruction, score rec only", flag="--no-inter"))
    embed_bias: bool = field(default=True, metadata=opt(
        "1x1 token and reference embeddings without a bias (the official Conv1d has one)", flag="--no-embed-bias"))
    val_fraction: Optional[float] = field(default=None, metadata=opt(
        "hold out this fraction of the normal training images (a split drawn from --seed) to calibrate the decision "
        "thresholds; they are used neither for training nor for the reference memory. Default 0.1, or 0 when --val "
        "or the dataset's validation split (MVTec 3D-AD validation/) calibrates; 0 with neither: no thresholds "
        "(fod predict then reports raw scores only)", metavar="F"))
    val: Optional[str] = field(default=None, metadata=opt(
        "calibrate on this folder of normal images instead of held-out training images (all training images are "
        "then used for training)", metavar="DIR"))
    fpr: float = field(default=0.01, metadata=opt(
        "false-positive rate on the normal calibration images at which the image and pixel thresholds are set "
        "(F1-optimal thresholds instead when the calibration data has labelled defects)"))
    device: str = field(default="cpu", metadata=opt("cpu, cuda or cuda:N", group=RUN_OPTIONS))
    backend: str = field(default="auto", metadata=opt(
        "I2Correlation kernel backend; auto picks the fastest available one for the device", group=RUN_OPTIONS))
    seed: int = field(default=0, metadata=opt("random seed (weights, shuffling)"))
    amp: bool = field(default=False, metadata=opt("bf16 autocast (CUDA only)", group=RUN_OPTIONS))
    compat_official: bool = field(default=False, metadata=opt(
        "reproduce the public code: discard the output projection and pick the best epochs ON THE TEST SET "
        "(optimistic numbers, flagged in the output); also its batch size 1 and seed 3407 unless given"))
    cache_features: bool = field(default=True, metadata=opt(
        "recompute backbone features every epoch instead of keeping them in memory", flag="--no-cache-features"))
    num_workers: int = field(default=0, metadata=opt("data-loading worker processes", flag="--workers",
                                                     group=RUN_OPTIONS))
    heatmaps: int = field(default=-1, metadata=opt("how many heat-map PNGs to write (-1: all)", group=RUN_OPTIONS))
    tensorboard: bool = field(default=True, metadata=opt(
        "no TensorBoard event files in OUTPUT/tensorboard/ (written when the tensorboard package is installed; "
        "OUTPUT/log.csv is always written)", flag="--no-tensorboard", group=RUN_OPTIONS))

    def check(self) -> "Config":
        """Raise ValueError naming the first invalid field; returns self."""
        check_config(self)
        return self


# --resume may change these; every other field must equal the checkpoint's.
RESUME_MUTABLE = frozenset({"epochs", "device", "backend", "num_workers", "heatmaps", "tensorboard",
                            "fpr"})  # fpr: used only by the calibration after the last epoch

# The demo: CPU in about a minute with a randomly initialised resnet18. Only layer2 (stride 8, 16x16 tokens at
# 128 px) is used: a random network's shallow features are local colour/edge filters that still separate these
# textures, while deeper random features mostly mix noise; a 32x32 level would quadruple the token count and the
# cost. lr 5e-4 for 10 epochs: the paper's 1e-4 needs far more epochs, and beyond ~10 epochs at 5e-4 the intra-KL
# maximisation starts to dominate the loss.
DEMO_DEFAULTS = dict(backbone="resnet18", levels=["layer2"], pretrained=False, image_size=128,
                     epochs=10, batch_size=8, lr=5e-4, d_model=[64], n_heads=4, n_layers=2)

FIELDS = {f.name: f for f in dataclasses.fields(Config)}

# The public code's defaults that differ from ours; --compat-official takes them unless given explicitly.
OFFICIAL_DEFAULTS = dict(batch_size=1, seed=3407)


def apply_compat_defaults(values: dict, explicit) -> dict:
    """With compat_official, set OFFICIAL_DEFAULTS in ``values`` for the keys not in ``explicit``; returns those set."""
    if not values.get("compat_official"):
        return {}
    taken = {k: v for k, v in OFFICIAL_DEFAULTS.items() if k not in explicit}
    values.update(taken)
    return taken


def field_type(name: str):
    """(base type, is_list, optional) of a Config field, from its annotation."""
    hint = typing.get_type_hints(Config)[name]
    optional = False
    if typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint, optional = args[0], True
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], True, optional
    return hint, False, optional


def _finite_number(name, v, lo=None, *, lo_open=False, hi=None):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {v!r}")
    if hi is not None and v > hi:
        raise ValueError(f"{name} must be <= {hi}, got {v!r}")


def check_config(cfg: Config):
    """Everything about a Config that can be checked without data or a model."""
    for name in FIELDS:
        check_value(name, getattr(cfg, name))
    _finite_number("--epochs", cfg.epochs, 0)
    _finite_number("--batch-size", cfg.batch_size, 1)
    _finite_number("--image-size", cfg.image_size, 8, hi=MAX_SIZE)
    if cfg.resize is not None:
        _finite_number("--resize", cfg.resize, cfg.image_size, hi=MAX_SIZE)
    _finite_number("--lr", cfg.lr, 0, lo_open=True)
    _finite_number("--lambda1", cfg.lambda1, 0)
    _finite_number("--lambda2", cfg.lambda2, 0)
    _finite_number("--eps", cfg.eps, 0, lo_open=True, hi=1)
    _finite_number("--heads", cfg.n_heads, 1)
    _finite_number("--layers", cfg.n_layers, 1)
    _finite_number("--workers", cfg.num_workers, 0)
    _finite_number("--heatmaps", cfg.heatmaps, -1)
    _finite_number("--seed", cfg.seed, 0, hi=2**32 - 1)
    if cfg.interpolation not in INTERPOLATIONS:
        raise ValueError(f"--interpolation must be one of {INTERPOLATIONS}, got {cfg.interpolation!r}")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", cfg.device):
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {cfg.device!r}")
    if cfg.d_model is not None:
        for d in cfg.d_model:
            _finite_number("--d-model", d, 1)
            if d % 4 or d % cfg.n_heads:
                raise ValueError(f"--d-model {d} must be a multiple of 4 and of --heads {cfg.n_heads}")
    if cfg.levels is not None and not cfg.levels:
        raise ValueError("--levels is empty")
    if cfg.levels is not None and len(set(cfg.levels)) != len(cfg.levels):
        raise ValueError(f"--levels names a level twice: {','.join(cfg.levels)}")
    if cfg.dataset not in LAYOUTS:
        raise ValueError(f"--dataset must be one of {tuple(LAYOUTS)}, got {cfg.dataset!r}")
    if cfg.amp and not str(cfg.device).startswith("cuda"):
        raise ValueError("--amp (bf16 autocast) is for CUDA only")
    if cfg.weights is not None and not Path(cfg.weights).is_file():
        raise FileNotFoundError(f"weights file not found: {cfg.weights}")
    if cfg.val_fraction is not None:
        _finite_number("--val-fraction", cfg.val_fraction, 0)
        if cfg.val_fraction >= 1:
            raise ValueError(f"--val-fraction must be < 1 (images must remain to train on), got {cfg.val_fraction}")
    _finite_number("--fpr", cfg.fpr, 0, hi=0.5)
    if cfg.val is not None:
        if not str(cfg.val).strip():
            raise ValueError("--val is empty")
        if cfg.val_fraction:
            raise ValueError(f"--val {cfg.val} and --val-fraction {cfg.val_fraction} are alternatives: calibrate on "
                             "the folder, or on held-out training images")
        if not Path(cfg.val).is_dir():
            raise FileNotFoundError(f"--val folder not found: {cfg.val}" if not Path(cfg.val).exists()
                                    else f"--val {cfg.val} is a file, not a folder of normal images")


def check_run_options(cfg: Config, batch_size=None):
    """The execution options of fod test / fod predict (the model's options come from the checkpoint)."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", cfg.device):
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {cfg.device!r}")
    if cfg.amp and not cfg.device.startswith("cuda"):
        raise ValueError("--amp (bf16 autocast) is for CUDA only")
    _finite_number("--workers", cfg.num_workers, 0)
    _finite_number("--heatmaps", cfg.heatmaps, -1)
    if batch_size is not None:
        _finite_number("--batch-size", batch_size, 1)


def check_device(device: str):
    """A clear error if ``device`` (cpu, cuda, cuda:N; format checked by the config) is not on this machine."""
    if device.startswith("cuda"):
        import torch  # here: `import fod.config` (the command line's parser) does not load torch
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= n:
            raise ValueError(f"--device {device}: this machine has {n} CUDA device(s)")


def check_value(name: str, value):
    """Type check of one field's value (as it comes from a config file or a checkpoint)."""
    if name not in FIELDS:
        raise ValueError(f"unknown configuration key {name!r}; known keys: {', '.join(FIELDS)}")
    base, is_list, optional = field_type(name)
    if value is None:
        if optional:
            return
        raise ValueError(f"configuration key {name!r} may not be empty")
    values = value if is_list else [value]
    if is_list and not isinstance(value, list):
        raise ValueError(f"configuration key {name!r} must be a list of {base.__name__}, got {value!r}")
    for v in values:
        ok = (isinstance(v, bool) if base is bool else
              isinstance(v, (int, float)) and not isinstance(v, bool) if base is float else
              isinstance(v, int) and not isinstance(v, bool) if base is int else isinstance(v, base))
        if not ok:
            raise ValueError(f"configuration key {name!r} must be {'a list of ' if is_list else ''}"
                             f"{base.__name__}, got {value!r}")


def from_dict(d: dict, where: str = "configuration") -> Config:
    """A Config from a mapping (a config file or a checkpoint); unknown keys and wrong types are errors."""
    unknown = sorted(set(d) - set(FIELDS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(FIELDS)}")
    for k, v in d.items():
        try:
            check_value(k, v)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    d = {k: (float(v) if field_type(k)[0] is float and v is not None else v) for k, v in d.items()}
    return Config(**d)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def resume_differences(saved: Config, now: Config) -> dict:
    """{field: (saved, now)} for the fields --resume may not change."""
    return {k: (getattr(saved, k), getattr(now, k)) for k in FIELDS
            if k not in RESUME_MUTABLE and getattr(saved, k) != getattr(now, k)}


# ----------------------------------------------------------------------------- TOML

def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):  # a TOML basic string: escape quotes, backslashes and control characters
        return '"' + "".join(f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else "\\" + c if c in '"\\'
                             else c for c in v) + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} to TOML")


def to_toml(cfg: Config) -> str:
    """The configuration as TOML; fields that are None (TOML has no null) are left out: None is their default."""
    lines = ["# fod run configuration: `fod train --config THIS_FILE --output NEW_DIR` reproduces the run"]
    for k, v in to_dict(cfg).items():
        if v is not None:
            lines.append(f"{k} = {_toml_value(v)}")
    return "\n".join(lines) + "\n"


def load_toml(path) -> dict:
    """The key/value pairs of a config file, checked against Config's fields (not yet merged with defaults)."""
    path = Path(path)
    try:
        d = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read config file {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"config file {path} is not valid TOML: {exc}") from None
    from_dict(d, where=f"config file {path}")  # validates keys and types
    return d
