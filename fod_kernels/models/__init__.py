"""Models built on the fused I2Correlation operator (an integration package, as Liger-Kernel's
``liger_kernel.transformers``).

    AnomalyTransformer(win_size, enc_in, c_out, ...)     # Xu et al., ICLR 2022; official state_dict keys
    anomaly_transformer_loss(x, out, stats, k=3.0)       # the official two-backward minimax as one loss
    anomaly_energy(x, out, stats, temperature=50.0)      # the official test-time criterion, (B, L)
    association_discrepancy(stats)                       # (B, L), summed over layers

See docs/ANOMALY_TRANSFORMER.md.
"""
from .anomaly_transformer import (AnomalyTransformer, anomaly_energy, anomaly_transformer_loss,
                                  association_discrepancy)

__all__ = ["AnomalyTransformer", "anomaly_energy", "anomaly_transformer_loss", "association_discrepancy"]
