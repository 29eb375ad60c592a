"""Triton backend: FlashAttention-2 style fused kernels (fod_kernels/triton_kernels.py).

Fusion of the two branches: branches that share ``need_stats`` and the head
dim go into one launch each (program id axis 2 picks the branch), so the usual
training call (both branches with statistics) is one forward launch and three
backward launches (logZ, dk/dv, dq/dsigma) for both branches together.

Inputs: float32 (fp32 dots in IEEE precision by default, see
``set_fp32_precision``), bfloat16 and float16 (fp32 accumulation and fp32
statistics). CUDA tensors when a GPU is present; CPU tensors only under the
Triton interpreter (``TRITON_INTERPRET=1``, slow, for tests).
"""
from __future__ import annotations

import contextlib
import os

import torch

from ._custom_op import register_backend

try:
    import triton

    from . import triton_kernels as _tk
    _IMPORT_ERROR = None
except ImportError as exc:  # reported by status()
    triton = _tk = None
    _IMPORT_ERROR = exc

# Whether the kernels were built for the interpreter (triton.jit reads the variable at decoration time).
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_PRECISIONS = ("ieee", "tf32")
_fp32_precision = "ieee"


def set_fp32_precision(precision: str) -> None:
    """Dot input precision for float32 inputs: "ieee" (default, exact fp32 products) or "tf32"
    (tensor cores, ~1e-3 relative error on the scores; an explicit opt-in)."""
    global _fp32_precision
    if precision not in _PRECISIONS:
        raise ValueError(f"precision must be one of {_PRECISIONS}, got {precision!r}")
    _fp32_precision = precision


def get_fp32_precision() -> str:
    return _fp32_precision


def status():
    if _IMPORT_ERROR is not None:
        return False, f"triton is not importable: {_IMPORT_ERROR}"
    if torch.cuda.is_available():
        return True, f"triton {triton.__version__} on CUDA"
    if _INTERPRET:
        return True, f"triton {triton.__version__} interpreter (TRITON_INTERPRET=1; CPU tensors, slow)"
    return False, "no CUDA device, and the Triton interpreter is off (set TRITON_INTERPRET=1 before importing triton)"


def supports_device(device):
    device = torch.device(device)
    if device.type == "cuda":
        if torch.cuda.is_available():
            return True, ""
        return False, "no CUDA device is available"
    if device.type == "meta":  # the op's meta kernel gives the shapes
        return True, ""
    if device.type == "cpu":
        if _INTERPRET:
            return True, ""
        return False, ("CPU tensors run only under the Triton interpreter "
                       "(TRITON_INTERPRET=1 set before importing triton)")
    return False, f"the triton backend runs on cuda devices, not {device.type}"


def _check(q):
    if q.shape[0] * q.shape[1] > 65535:  # program id axis 1 is (batch, head); CUDA caps grid y at 65535
        raise ValueError(f"the triton backend takes at most 65535 (batch x heads), got {q.shape[0]} x {q.shape[1]}")
    if q.dtype not in DTYPES:
        raise TypeError(f"the triton backend takes float32, bfloat16 and float16 inputs, got {q.dtype}; "
                        f"{q.dtype} runs on the 'reference' backend (and float64 on 'cpu')")
    ok, why = supports_device(q.device)
    if not ok:
        raise RuntimeError(f"triton backend cannot run on {q.device}: {why}")


def _device_guard(device):
    """Launch on the tensors' device, not the current one (a tensor on cuda:1 with cuda:0 current)."""
    device = torch.device(device)
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _inner(t):
    """t with a contiguous last dimension: the kernels take any (batch, head, row) strides, but read
    each row as one contiguous run (as FlashAttention does). Views such as the module's (B, L, H, D)
    projections transposed to (B, H, L, D) qualify and are used in place."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _strides(t, shared=False):
    """(batch, head, row) strides of a 4-D tensor; 0 for the batch of a batch-shared memory and for any
    dimension of size 1 (never stepped over), so that such strides do not create compiled variants."""
    if t.dim() != 4:
        raise ValueError(f"expected a 4-D tensor, got shape {tuple(t.shape)}")
    st = [0 if n == 1 else s for n, s in zip(t.shape[:3], t.stride()[:3])]
    if shared:
        st[0] = 0
    # Offsets within one (batch, head) slab are 32-bit in the kernels.
    if (t.shape[2] - 1) * st[2] + t.shape[3] >= 2 ** 31:
        raise ValueError(f"the triton backend addresses one (batch, head) slab with 32-bit offsets; a tensor of shape "
                         f"{tuple(t.shape)} and strides {t.stride()} spans more")
    return st


def _like(t):
    """An output of t's shape, dtype and device: contiguous, as the op's contract (and its fake) says."""
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


# Tile shapes per kernel and head-dim bucket (BLOCK_D): (BLOCK_M, BLOCK_N, num_warps). For the key-side
# kernel (bwd_dkdv) BLOCK_N is its key block and BLOCK_M the query block it loops over. Every variant
# compiles for sm_90 without register spills: tests/kernels/test_triton.py::test_no_register_spills_on_sm90
# lowers each one the launcher can choose and checks its stack frame.
#
# fp32 with IEEE dots: the products run on the FMA units, and Triton keeps both dot operands in registers,
# replicated across the threads that share a row or column of the result (about (rows + cols per thread) x
# K registers), so the tiles shrink as the head dim grows. Each kernel gets its own shape: they compute the
# same per-element sequential FMA chain over D for the scores, whatever the tile, so the forward and both
# backward kernels still see bitwise the same s.
_TILES_FP32_IEEE = {
    16: {"fwd": (64, 64, 8), "dkdv": (32, 32, 4), "dq": (32, 64, 8)},
    32: {"fwd": (64, 64, 8), "dkdv": (64, 32, 8), "dq": (32, 64, 8)},
    64: {"fwd": (64, 32, 8), "dkdv": (64, 32, 8), "dq": (32, 16, 8)},
    128: {"fwd": (32, 16, 8), "dkdv": (16, 32, 4), "dq": (16, 16, 4)},
}
# Tensor-core dots (bfloat16, float16, and float32 as tf32): one shape for all three kernels, so that they
# select the same MMA instructions and see bitwise the same scores. The elementwise work per score tile
# (p, t, four log terms, ds, the prior sums) keeps many tiles live at once; these are the largest shapes
# found without spills (128 x 64 with 8 warps, used before, spilled up to 2 KB per thread in dq). Whether
# smaller, spill-free tiles are also faster is for the GPU benchmarks to show: change them here.
_TILES_MMA = {
    torch.bfloat16: {16: (64, 16, 4), 32: (64, 16, 4), 64: (64, 16, 4), 128: (32, 16, 4)},
    torch.float16: {16: (64, 16, 4), 32: (64, 16, 4), 64: (64, 16, 4), 128: (32, 16, 4)},
    torch.float32: {16: (32, 16, 4), 32: (64, 16, 4), 64: (16, 64, 4), 128: (16, 16, 4)},  # tf32
}


def _blocks(kernel, D, dtype):
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps) of kernel "fwd", "dkdv" or "dq". Tiles >= 16 (tl.dot's minimum).
    Sizes do not select tiles (only the head-dim bucket does), so every L shares one compiled variant."""
    bd = max(16, triton.next_power_of_2(D))
    if _INTERPRET:
        return 16, 16, bd, 4
    if dtype == torch.float32 and _fp32_precision == "ieee":
        bm, bn, warps = _TILES_FP32_IEEE[bd][kernel]
    else:
        bm, bn, warps = _TILES_MMA[dtype][bd]
    return bm, bn, bd, warps


def _stages(dtype):
    # fp32 tiles are twice as large and the IEEE fp32 dot does not use the tensor cores: a shallower
    # pipeline keeps shared memory (and registers) in check.
    return 2 if dtype == torch.float32 else 3


def _precision(dtype):
    return _fp32_precision if dtype == torch.float32 else "ieee"


def _upcast(dtype):
    # The interpreter cannot multiply bfloat16 tiles; it gets the same values as fp32 (exact).
    return _INTERPRET and dtype == torch.bfloat16


def _masks(qs, ks, masks):
    """(EXT, per-branch (uint8 mask, batch stride)). EXT (any mask, or a memory of S = m * L keys): the
    kernels' general path, where every branch reads a mask (an all-kept (1, S) one where it has none);
    otherwise the plain path, and dummies that are never read."""
    masks = list(masks or [None] * len(qs))
    if all(m is None for m in masks) and all(k.shape[2] == q.shape[2] for q, k in zip(qs, ks)):
        dummy = torch.zeros((1,), dtype=torch.uint8, device=qs[0].device)
        return False, [(dummy, 0)] * len(qs)
    res = []
    for k, m in zip(ks, masks):
        if m is None:
            m = torch.zeros((1, k.shape[2]), dtype=torch.bool, device=k.device)
        m = m.contiguous().view(torch.uint8)
        res.append((m, m.shape[1] if m.shape[0] > 1 else 0))
    return True, res


def _groups(qs, need_stats):
    """Branch indices that can share a launch: equal need_stats and head dim."""
    groups = {}
    for i, (q, need) in enumerate(zip(qs, need_stats)):
        groups.setdefault((bool(need), q.shape[-1]), []).append(i)
    return list(groups.values())


def _pair(per_branch, idx):
    """The flattened (branch 0, branch 1) arguments of a launch over the branches idx (1 or 2 of them)."""
    return [a for j in (idx[0], idx[-1]) for a in per_branch[j]]


def fwd(qs, ks, vs, sigmas, rows, cols, scale, eps, need_stats, masks=None):
    qs, ks, vs, sigmas = ([_inner(t) for t in ts] for ts in (qs, ks, vs, sigmas))
    for q in qs:
        _check(q)
    B, H, L, _ = qs[0].shape
    dev = qs[0].device
    res = []
    for q, need in zip(qs, need_stats):
        stat = (lambda: torch.empty((B, H, L), dtype=torch.float32, device=dev)) if need else \
            (lambda: torch.empty((0,), dtype=torch.float32, device=dev))
        lse = torch.empty((B, H, L), dtype=torch.float32, device=dev)
        res.append([_like(q), lse, stat(), stat(), stat(), stat()])
    dtype = qs[0].dtype
    ext, mks = _masks(qs, ks, masks)
    ptrs, strides = [], []
    for i, need in enumerate(need_stats):
        out, lse, kl, ent, r1, r2 = res[i]
        if not need:  # statistics pointers are not touched when STATS is off
            kl = ent = r1 = r2 = lse
        ptrs.append([qs[i], ks[i], vs[i], sigmas[i], out, lse, kl, ent, r1, r2, mks[i][0]])
        shared = ks[i].shape[0] == 1
        strides.append([*_strides(qs[i]), *_strides(ks[i], shared), *_strides(vs[i], shared), *_strides(sigmas[i]),
                        *_strides(out), ks[i].shape[2], mks[i][1]])
    with _device_guard(dev):
        for idx in _groups(qs, need_stats):
            need = bool(need_stats[idx[0]])
            D = qs[idx[0]].shape[-1]
            bm, bn, bd, warps = _blocks("fwd", D, dtype)
            grid = (triton.cdiv(L, bm), B * H, len(idx))
            _tk.fwd_kernel[grid](*_pair(ptrs, idx), *_pair(strides, idx), H, L, D, rows, cols, float(scale),
                                 float(eps), STATS=need, EPS_ZERO=need and eps == 0, PREC=_precision(dtype),
                                 UPCAST=_upcast(dtype), EXT=ext, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd,
                                 BLOCK_G=16 if _INTERPRET else 32, num_warps=warps, num_stages=_stages(dtype))
    return [t for r in res for t in r]


def bwd(g_outs, g_kl_attns, g_kl_priors, g_ents, dfulls, qs, ks, vs, sigmas, lses, rows, cols, scale, eps,
        masks=None):
    qs, ks, vs, sigmas, g_outs = ([_inner(t) for t in ts] for ts in (qs, ks, vs, sigmas, g_outs))
    for q in qs:
        _check(q)
    n = len(qs)
    B, H, L, _ = qs[0].shape
    dev = qs[0].device
    # Per-row float32 inputs of both branches in one buffer: lse, dfull, g_kl_attn, g_kl_prior, g_ent, and the
    # prior's normaliser lz, lmax (filled below by logz_kernel).
    row = torch.empty((n, 7, B, H, L), dtype=torch.float32, device=dev)
    for i in range(n):
        for j, x in enumerate((lses[i], dfulls[i], g_kl_attns[i], g_kl_priors[i], g_ents[i])):
            row[i, j].copy_(x)
    nrow = B * H * L
    dqs = [_like(q) for q in qs]
    dks = [_like(k) for k in ks]
    dvs = [_like(v) for v in vs]
    dss = [_like(s) for s in sigmas]
    st = []
    for i in range(n):
        shared = ks[i].shape[0] == 1
        st.append(dict(q=_strides(qs[i]), k=_strides(ks[i], shared), v=_strides(vs[i], shared),
                       s=_strides(sigmas[i]), do=_strides(g_outs[i]), dq=_strides(dqs[i]),
                       dk=_strides(dks[i], shared), dv=_strides(dvs[i], shared), ds=_strides(dss[i])))
    dtype = qs[0].dtype
    ext, mks = _masks(qs, ks, masks)
    keys = [(k.shape[2], mk[1]) for k, mk in zip(ks, mks)]  # (S, mask batch stride) per branch
    with _device_guard(dev):
        bm_z = 16 if _INTERPRET else 64
        _tk.logz_kernel[(triton.cdiv(L, bm_z), B * H, n)](
            sigmas[0], sigmas[-1], mks[0][0], mks[-1][0], row, *st[0]["s"], *st[-1]["s"], *keys[0], *keys[-1], H,
            nrow, L, rows, cols, EXT=ext, BLOCK_M=bm_z, BLOCK_N=16 if _INTERPRET else 64,
            BLOCK_G=16 if _INTERPRET else 32, num_warps=4, num_stages=3)
        for idx in _groups(qs, [True] * n):
            D = qs[idx[0]].shape[-1]
            row_g = row[idx[0]:]  # the launch's branch 0 is slot idx[0] of the row buffer
            common = dict(EPS_ZERO=eps == 0, PREC=_precision(dtype), UPCAST=_upcast(dtype), EXT=ext,
                          num_stages=_stages(dtype))
            bm, bn, bd, warps = _blocks("dkdv", D, dtype)
            ptrs = [[qs[j], ks[j], vs[j], sigmas[j], g_outs[j], dks[j], dvs[j], mks[j][0]] for j in range(n)]
            strides = [[x for key in ("q", "k", "v", "s", "do", "dk", "dv") for x in st[j][key]] + list(keys[j])
                       for j in range(n)]
            bk = [k.shape[0] for k in ks]
            bk_max = max(bk[j] for j in idx)
            s_max = max(keys[j][0] for j in idx)
            _tk.bwd_dkdv_kernel[(triton.cdiv(s_max, bn), bk_max * H, len(idx))](
                *_pair(ptrs, idx), row_g, *_pair(strides, idx), bk[idx[0]], bk[idx[-1]], B, H, L, D, rows, cols,
                float(scale), float(eps), nrow, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=warps, **common)
            bm, bn, bd, warps = _blocks("dq", D, dtype)
            ptrs = [[qs[j], ks[j], vs[j], sigmas[j], g_outs[j], dqs[j], dss[j], mks[j][0]] for j in range(n)]
            strides = [[x for key in ("q", "k", "v", "s", "do", "dq", "ds") for x in st[j][key]] + list(keys[j])
                       for j in range(n)]
            _tk.bwd_dq_kernel[(triton.cdiv(L, bm), B * H, len(idx))](
                *_pair(ptrs, idx), row_g, *_pair(strides, idx), H, L, D, rows, cols, float(scale), float(eps), nrow,
                BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=warps, **common)
    res = []
    for i in range(n):
        res += [dqs[i], dks[i], dvs[i], dss[i]]
    return res


run = register_backend("triton", fwd, bwd)
