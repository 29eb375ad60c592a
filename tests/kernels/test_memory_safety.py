"""Memory safety of the Triton kernels: no load or store outside the tensor it addresses.

Under the Triton interpreter every masked-in address of every launch is checked against the tensor
argument the pointer derives from (tests/kernels/triton_memcheck.py), over the launch shapes that
matter: batch-shared (Bk = 1) and per-image (Bk = B) memories, one branch or two fused branches of
either kind, grids that are no tile multiple, padded head dims, with and without statistics, forward
and backward, contiguous and strided (B, L, H, D)-layout inputs. Shapes are tiny: the interpreter is slow.
The CUDA kernels get the same check in their CPU simulation (tests/kernels/test_cuda_sim.py).
"""
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import fod_kernels as fk
from helpers import make_branch

bt = pytest.importorskip("fod_kernels.backend_triton")
if not bt._INTERPRET:
    pytest.skip("the memory check runs under the Triton interpreter (TRITON_INTERPRET=1)", allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.runtime.errors import InterpreterError  # noqa: E402

from triton_memcheck import checked_launches  # noqa: E402

KERNELS = ("fwd_kernel", "logz_kernel", "bwd_dkdv_kernel", "bwd_dq_kernel")
GRIDS = [(1, 1), (3, 5), (1, 17), (17, 1), (4, 5), (5, 7)]


def _layout(t, strided):
    """t itself, or the same values as a (B, L, H, D)-memory view transposed to (B, H, L, D)."""
    return t.transpose(1, 2).contiguous().transpose(1, 2) if strided else t


def _run_checked(branches, grid, need, eps=1e-4, masks=(None, None)):
    """Forward and backward of one branch or the fused pair under the memory check; returns the counts."""
    leaves = [[t.detach().clone().requires_grad_(True) for t in br] for br in branches]
    with checked_launches() as counts:
        if len(leaves) == 1:
            out, st_ = fk.correlation_attention(*leaves[0], grid, eps=eps, backend="triton", need_stats=need[0],
                                                key_padding_mask=masks[0])
            res = [(out, st_)]
        else:
            oi, oe, si, se = fk.i2correlation(*leaves[0], *leaves[1], grid, eps=eps, backend="triton",
                                              need_stats=tuple(need), key_padding_mask=masks[0],
                                              key_padding_mask_ref=masks[1])
            res = [(oi, si), (oe, se)]
        loss = 0
        for out, st_ in res:
            loss = loss + out.float().square().sum()
            if st_ is not None:
                loss = loss + (st_.kl_attn - st_.kl_prior + 0.5 * st_.entropy).sum()
        loss.backward()
    for lv in leaves:
        for t in lv:
            assert torch.isfinite(t.grad).all()
    return counts


@settings(max_examples=8, deadline=None)
@given(grid=st.sampled_from(GRIDS), B=st.integers(1, 3), H=st.integers(1, 2), D=st.sampled_from([1, 16, 20]),
       shared=st.lists(st.booleans(), min_size=1, max_size=2), need=st.tuples(st.booleans(), st.booleans()),
       dtype=st.sampled_from([torch.float32, torch.float16]), strided=st.booleans(), seed=st.integers(0, 99),
       m=st.integers(1, 3), mask_kind=st.sampled_from(["none", "last", "per_batch"]))
# The defect this file was written for: a batch-shared branch fused with a per-image one made the
# programs kb >= 1 of the shared branch load K and V rows past the memory tensor (bwd_dkdv_kernel).
@example(grid=(3, 5), B=2, H=1, D=16, shared=[False, True], need=(True, True), dtype=torch.float32, strided=False,
         seed=0, m=1, mask_kind="none")
@example(grid=(1, 17), B=3, H=2, D=20, shared=[True, False], need=(False, True), dtype=torch.float16, strided=True,
         seed=1, m=1, mask_kind="none")
# key_padding_mask and S = m * L: a masked memory of 3 images fused with a masked per-image branch, and alone
@example(grid=(3, 5), B=2, H=1, D=16, shared=[False, True], need=(True, True), dtype=torch.float32, strided=True,
         seed=2, m=3, mask_kind="per_batch")
@example(grid=(1, 17), B=3, H=1, D=20, shared=[True], need=(True, True), dtype=torch.float16, strided=False,
         seed=3, m=2, mask_kind="last")
def test_every_access_in_bounds(grid, B, H, D, shared, need, dtype, strided, seed, m, mask_kind):
    L = grid[0] * grid[1]
    branches, masks = [], []
    g = torch.Generator().manual_seed(seed)
    for i, sh in enumerate(shared):
        q, k, v, s = make_branch(B, H, L, D, 1 if sh else B, dtype=dtype, seed=seed + i, sigma_lo=0.5)
        last = i == len(shared) - 1
        if last and m > 1:  # the last branch reads a memory of m images
            k, v = (torch.cat([t, t.flip(2)] * m, dim=2)[:, :, :m * L] for t in (k, v))
        branches.append(tuple(_layout(t, strided) for t in (q, k, v, s)))
        mask = None
        if mask_kind == "per_batch" or (mask_kind == "last" and last):
            mask = torch.rand(B if mask_kind == "per_batch" else 1, k.shape[2], generator=g) < 0.4
            mask[:, 0] = False  # every row keeps a key
        masks.append(mask)
    counts = _run_checked(branches, grid, list(need[:len(shared)]), masks=masks + [None])
    ran = {k for k, _ in counts}
    # logz (backward) and the two gradient kernels always run; so does the forward.
    assert ran == set(KERNELS), ran


@triton.jit
def _copy_kernel(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.load(X + offs, mask=offs < n), mask=offs < n)


def test_the_check_catches_an_out_of_bounds_access():
    """The harness must be able to fail: a load one element past x, a store one element past y."""
    x, y = torch.arange(8.0), torch.zeros(8)
    with checked_launches() as counts:
        _copy_kernel[(1,)](x, y, 8, BLOCK=8)
    assert torch.equal(x, y) and counts[("_copy_kernel", "load")] == 8
    with pytest.raises(InterpreterError, match=r"OutOfBounds\('load in _copy_kernel program \(0, 0, 0\): 1 of 9"):
        with checked_launches():
            _copy_kernel[(1,)](x, torch.zeros(9), 9, BLOCK=16)
    with pytest.raises(InterpreterError, match=r"OutOfBounds\('store in _copy_kernel"):
        with checked_launches():
            _copy_kernel[(1,)](torch.zeros(9), y, 9, BLOCK=16)
    # A pointer that runs from x into a neighbouring tensor is caught too (provenance, not "any tensor").
    both = torch.zeros(16)
    with pytest.raises(InterpreterError, match="OutOfBounds"):
        with checked_launches():
            _copy_kernel[(1,)](both[:8], both[8:], 9, BLOCK=16)
