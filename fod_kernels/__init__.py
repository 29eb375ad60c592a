"""fod_kernels: the I2Correlation operator as fused kernels (C++ CPU, CUDA, Triton).

Public API:
    correlation_attention(q, k, v, sigma, grid, *, scale=None, eps=1e-4, backend="auto")
    i2correlation(q, k, v, sigma, q_ref, k_ref, v_ref, sigma_ref, grid, ...)
    I2Correlation(d_model, n_heads, grid, ...)      # nn.Module drop-in
    available_backends()                            # {name: (available, reason)}
The specification is shared/I2CORRELATION.md.
"""
from ._backends import BACKENDS, BackendStatus, available_backends
from .functional import CorrelationStats, correlation_attention, i2correlation
from .module import I2Correlation, sigma_from_logits
from .reference import correlation_reference

__all__ = ["BACKENDS", "BackendStatus", "available_backends", "CorrelationStats", "correlation_attention",
           "i2correlation", "I2Correlation", "sigma_from_logits", "correlation_reference"]
__version__ = "0.1.0"
