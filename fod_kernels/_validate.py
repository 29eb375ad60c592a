"""Input checks shared by every backend: each bad input gets an error that names it."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def parse_grid(grid, L: int) -> tuple[int, int]:
    try:
        rows, cols = (int(g) for g in grid)
    except (TypeError, ValueError):
        raise TypeError(f"grid must be a pair (rows, cols) of ints, got {grid!r}") from None
    if rows <= 0 or cols <= 0:
        raise ValueError(f"grid must be positive, got {(rows, cols)}")
    if rows * cols != L:
        raise ValueError(f"grid {(rows, cols)} has {rows * cols} cells but there are L={L} query tokens")
    return rows, cols


def check_branch(q, k, v, sigma, grid, *, name: str = "", check_values: bool = True):
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
    dtypes = {n: t.dtype for n, t in tensors.items()}
    if len(set(dtypes.values())) != 1:
        raise TypeError(f"{pre}q, k, v, sigma must share one dtype, got {dtypes}")
    devices = {n: t.device for n, t in tensors.items()}
    if len(set(devices.values())) != 1:
        raise ValueError(f"{pre}q, k, v, sigma must be on one device, got {devices}")
    B, H, L, D = q.shape
    Bk, Hk, S, Dk = k.shape
    if Hk != H or Dk != D:
        raise ValueError(f"{pre}k must have shape (1 or {B}, {H}, S, {D}) like q {tuple(q.shape)}, got {tuple(k.shape)}")
    if Bk not in (1, B):
        raise ValueError(f"{pre}k batch must be 1 (shared memory) or B={B}, got {Bk}")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"{pre}v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if tuple(sigma.shape) != (B, H, L, 2):
        raise ValueError(f"{pre}sigma must have shape (B, H, L, 2) = {(B, H, L, 2)}, got {tuple(sigma.shape)}")
    if S != L:
        raise ValueError(f"{pre}the Gaussian prior needs S == L (keys on the same grid as queries), got S={S}, L={L}")
    if min(B, H, L, D) == 0:
        raise ValueError(f"{pre}empty input: q has shape {tuple(q.shape)}")
    rows, cols = parse_grid(grid, L)
    if check_values and not torch.compiler.is_compiling():  # data-dependent: skipped inside torch.compile
        for n, t in tensors.items():
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{pre}{n} contains NaN or inf")
        if not bool((sigma > 0).all()):
            raise ValueError(f"{pre}sigma must be > 0 everywhere (min {sigma.min().item():.3g})")
    return rows, cols


def check_scalars(scale, eps):
    if scale is not None and not (isinstance(scale, (int, float)) and scale > 0 and scale == scale):
        raise ValueError(f"scale must be a positive number or None, got {scale!r}")
    if not (isinstance(eps, (int, float)) and eps >= 0 and eps == eps and eps != float("inf")):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
