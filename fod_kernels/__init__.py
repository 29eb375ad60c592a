"""fod_kernels: the I2Correlation operator as fused kernels (C++ CPU, CUDA, Triton).

Public API:
    correlation_attention(q, k, v, sigma, grid, *, scale=None, eps=1e-4, backend="auto", key_padding_mask=None)
    i2correlation(q, k, v, sigma, q_ref, k_ref, v_ref, sigma_ref, grid, ...)  # -> I2CorrelationResult
    I2Correlation(d_model, n_heads, grid, *, sigma_max=2.0, ...)   # nn.Module drop-in
    sigma_from_logits(z, sigma_max=2.0)             # the module's width parametrisation, in tokens
    available_backends()                            # {name: (available, reason)}
    SIGMA_MIN                                       # widths below it (tokens) are raised to it
The formulas are in correlation_attention's docstring; the specification is docs/I2CORRELATION.md.
"""
from ._backends import BACKENDS, BackendStatus, available_backends
from ._validate import SIGMA_MIN
from .functional import CorrelationStats, I2CorrelationResult, correlation_attention, i2correlation
from .module import I2Correlation, sigma_from_logits
from .reference import correlation_reference

__all__ = ["BACKENDS", "BackendStatus", "available_backends", "CorrelationStats", "I2CorrelationResult",
           "correlation_attention",
           "i2correlation", "I2Correlation", "sigma_from_logits", "correlation_reference", "SIGMA_MIN"]
__version__ = "0.1.0"
