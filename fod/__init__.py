"""FOD ("Focus the Discrepancy", ICCV 2023): the train / evaluate / predict pipeline on fod_kernels.I2Correlation.

Layers, top down (no module imports one above it; docs/pipeline.md, "Code layout"):

- the command line: cli (parsing, options generated from config), commands (fod test, predict, demo),
  benchmark (fod benchmark), export (fod export), upgrade (fod checkpoint upgrade), interrupt (SIGTERM as
  SIGINT); api (``fod.Detector``: fit, load, predict);
- the run: train (check, build, fit, finish), runner (one process or DDP), distributed (torchrun's process
  group), calibrate (decision thresholds), evaluate (the scoring loop), report and viz (metrics.json, heat
  maps, summary page), tracking (log.csv, TensorBoard events), checkpoint (format, save, load) on safeformat
  (safetensors + JSON behind a checksum), files (atomic writes, output folders, the manifest);
- the model: model/ (torch_model: level transformers and the FOD bundle; loss; anomaly_map: token scores;
  memory: features and the reference memory), backbone (frozen timm features), baselines, metrics (AUROC,
  AUPRO);
- the data and the settings: data (reading, preprocessing), layouts (the dataset layout registry), synthetic
  (the embedded demo data), config (every parameter, its default and help; TOML run files), version.
"""
from .version import __version__

__all__ = ["Detector", "Prediction", "__version__"]


def __getattr__(name):  # fod.Detector without importing torch at `import fod`
    if name in ("Detector", "Prediction"):
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'fod' has no attribute {name!r}")
