"""FOD ("Focus the Discrepancy", ICCV 2023): the train / evaluate / predict pipeline on fod_kernels.I2Correlation.

Modules: data (MVTec AD, BTAD, MVTec 3D-AD layouts), synthetic (the embedded demo data),
backbone (frozen timm features), model (one reconstruction transformer per level, the loss,
the scores), train (training, evaluation, prediction, checkpoints), metrics, viz, cli.
"""
__version__ = "0.1.0"
