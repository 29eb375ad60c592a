"""FOD ("Focus the Discrepancy", ICCV 2023): the train / evaluate / predict pipeline on fod_kernels.I2Correlation.

Modules: config (every parameter, its default and help; TOML run files), data (MVTec AD, BTAD,
MVTec 3D-AD layouts), synthetic (the embedded demo data), backbone (frozen timm features), model
(one reconstruction transformer per level, the loss, the scores, the FOD bundle, the reference
memory), checkpoint (format, save, load), train (the training loop), evaluate (test-set metrics,
predictions), metrics (AUROC, AUPRO), report (metrics.json, heat maps, summary page), viz, files
(atomic writes, output folders), calibrate (decision thresholds), api (``fod.Detector``: fit, load,
predict), export (ONNX / TorchScript), cli.
"""
from .version import __version__

__all__ = ["Detector", "Prediction", "__version__"]


def __getattr__(name):  # fod.Detector without importing torch at `import fod`
    if name in ("Detector", "Prediction"):
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'fod' has no attribute {name!r}")
