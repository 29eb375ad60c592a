"""Input checks shared by every backend: each bad input gets an error that names it."""
from __future__ import annotations

import math
import operator
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Widths below this many tokens are raised to it by every backend (max(sigma, SIGMA_MIN), with clamp_min's
# gradient, 0 below): at 1e-6 the prior is already a one-hot (exp(-1 / (2 sigma^2)) underflows to 0 in float64)
# and its gradient 0, so nothing changes but the NaN of sigma^2 underflowing to 0 (at about 1e-20 in float32).
# csrc/i2corr_math.h (kSigmaMin) and fod_kernels/triton_kernels.py hold the same value.
SIGMA_MIN = 1e-6
ROW_MAJOR = "tokens are numbered row-major on the grid: token i sits at row i // cols, column i % cols"


def parse_grid(grid) -> tuple[int, int]:
    """(rows, cols) as Python ints; only integers are accepted (numpy/torch integer scalars included)."""
    try:
        pair = tuple(grid)
    except TypeError:
        pair = None
    if pair is None or len(pair) != 2 or isinstance(grid, (str, bytes)):
        raise TypeError(f"grid must be a pair (rows, cols) of ints, got {grid!r}")
    rc = []
    for g in pair:
        if isinstance(g, bool):
            g = None
        else:
            try:
                g = operator.index(g)  # int, numpy integer, integer 0-d tensor; not float or str
            except TypeError:
                g = None
        if g is None:
            raise TypeError(f"grid must be a pair (rows, cols) of ints, got {grid!r}")
        rc.append(g)
    rows, cols = rc
    if rows <= 0 or cols <= 0:
        raise ValueError(f"grid must be positive, got {(rows, cols)}")
    return rows, cols


def _plain(t: torch.Tensor) -> torch.Tensor:
    """The tensor under torch.func wrappers (vmap, grad), so that a value scan covers every vmapped slice."""
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t


def scans_enabled(check_values: bool, device: torch.device) -> bool:
    """Data-dependent scans run eagerly only (not while torch.compile/export or torch.jit.trace trace), and
    only on tensors that hold data (meta tensors have shapes only)."""
    return check_values and device.type != "meta" and not torch.compiler.is_compiling() and \
        not torch.jit.is_tracing()


def check_branch(q, k, v, sigma, grid, *, name: str = "", check_values: bool = True, key_padding_mask=None):
    """Validate one branch; returns (rows, cols). Raises TypeError or ValueError."""
    pre = f"{name}: " if name else ""
    tensors = {"q": q, "k": k, "v": v, "sigma": sigma}
    for n, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{pre}{n} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{pre}{n} must have 4 dimensions, got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{pre}{n} must be a floating tensor, got dtype {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{pre}q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if sigma.dtype not in (q.dtype, torch.float32):
        raise TypeError(f"{pre}sigma must be float32 or q's dtype {q.dtype}, got {sigma.dtype}")
    devices = {n: t.device for n, t in tensors.items()}
    if len(set(devices.values())) != 1:
        raise ValueError(f"{pre}q, k, v, sigma must be on one device, got {devices}")
    rows, cols = parse_grid(grid)
    B, H, L, D = q.shape
    Bk, Hk, S, Dk = k.shape
    n_cells = rows * cols
    if L != n_cells and H == n_cells:
        raise ValueError(f"{pre}q has shape {tuple(q.shape)}: it looks like the (B, L, H, D) layout (the grid "
                         f"{(rows, cols)} has {n_cells} tokens, q's dimension 1 has {H}); the operator takes "
                         f"heads-first (B, H, L, D) tensors like scaled_dot_product_attention: pass q.transpose(1, 2) "
                         f"(and the same for k, v, sigma)")
    if L != n_cells:
        raise ValueError(f"{pre}grid (rows, cols) = {(rows, cols)} has {n_cells} cells but q has L={L} tokens "
                         f"({ROW_MAJOR})")
    if Hk != H or Dk != D:
        raise ValueError(f"{pre}k must have shape (1 or {B}, {H}, S, {D}) like q {tuple(q.shape)}, "
                         f"got {tuple(k.shape)}")
    if Bk != 1 and Bk != B:
        raise ValueError(f"{pre}k batch must be 1 (shared memory) or B={B}, got {Bk}")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"{pre}v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if tuple(sigma.shape) != (B, H, L, 2):
        raise ValueError(f"{pre}sigma must have shape (B, H, L, 2) = {(B, H, L, 2)}, got {tuple(sigma.shape)}")
    if S % L != 0:
        raise ValueError(f"{pre}the Gaussian prior needs keys on the queries' grid: S must be a multiple m*L of "
                         f"L={L} (m images of the grid {(rows, cols)}), got S={S}")
    if B == 0 or H == 0 or D == 0 or S == 0:  # one comparison per size: no relation between sizes for torch.export
        raise ValueError(f"{pre}empty input: q has shape {tuple(q.shape)}, k {tuple(k.shape)}")
    if key_padding_mask is not None:
        m = key_padding_mask
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
            raise TypeError(f"{pre}key_padding_mask must be a bool tensor (True = ignore the key), got "
                            f"{m.dtype if isinstance(m, torch.Tensor) else type(m).__name__}")
        if m.dim() != 2 or m.shape[1] != S or (m.shape[0] != 1 and m.shape[0] != B):
            raise ValueError(f"{pre}key_padding_mask must have shape (1 or B={B}, S={S}), got {tuple(m.shape)}")
        if m.device != q.device:
            raise ValueError(f"{pre}key_padding_mask must be on q's device {q.device}, got {m.device}")
    if scans_enabled(check_values, q.device):
        for n, t in tensors.items():
            if not bool(torch.isfinite(_plain(t)).all()):
                raise ValueError(f"{pre}{n} contains NaN or inf")
        if not bool((_plain(sigma) > 0).all()):
            raise ValueError(f"{pre}sigma must be > 0 everywhere (min {_plain(sigma).min().item():.3g})")
        if key_padding_mask is not None and bool(_plain(key_padding_mask).all(-1).any()):
            raise ValueError(f"{pre}key_padding_mask masks every key of a batch row: its attention is undefined "
                             f"(keep at least one key per row)")
    return rows, cols


def _real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_scalars(scale, eps):
    if scale is not None and not (_real(scale) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite number > 0 or None, got {scale!r}")
    if not (_real(eps) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")


def check_finite_result(out: torch.Tensor, dtype: torch.dtype, name: str = ""):
    """After the forward: finite inputs must give a finite output; the only way not to is q.k overflowing."""
    if not bool(torch.isfinite(_plain(out)).all()):
        pre = f"{name}: " if name else ""
        raise ValueError(
            f"{pre}the output contains NaN/inf although every input is finite: the scaled scores scale * <q, k> "
            f"overflow {dtype} (|q| * |k| * scale beyond {torch.finfo(dtype).max:.3g}); normalise q and k "
            f"(e.g. a LayerNorm before the projections), lower `scale`, or compute in float64")
